"""`clipcid paper`: the paper's tables, in its order, and a verdict on each of its claims, from a study.

A layout (JSON; the demo's is clipcid/configs/paper.json) lists sections. Each reads one plan's results
in the study folder (PLAN.json, written by `clipcid study`) and names its rows (the plan's variants), its
metrics (the suite's averages, or a weight statistic "weights/TOWER/w|change/STAT" of the plan's
"weights" variants), the teachers it shows ("given": the main one; "all": every teacher the plan names)
and the paper's claims: [A, B] reads "A above B" on each of the section's metrics; an object
{"a", "b", "metrics", "lower"} narrows the metrics or turns it into "A below B"; {"a", "b", "than": [C, D]}
compares two gains, "A's gain over B is larger than C's over D" (e.g. CID's gain after 9 epochs against
after 1), each gain taken per seed.

Each claim is judged on the paired differences over the seeds both variants ran (the 95 % t interval the
study uses, and the paired t test's p). Each section names its primary metric, and the section's claims
on it are one family: their p values are adjusted by Holm's step-down method, and a claim "holds" only
where its adjusted p is below 0.05 with the mean on the claimed side, is "reversed" where it is below
0.05 on the other, and is "unresolved" otherwise (or where one seed gives no test). On the section's
other metrics the raw interval is shown and no verdict is counted. A claim whose
variant has no finished run yet (a plan run in parts, `clipcid study --only`) is "not run" and left out
of the counts. A comparison of gains is judged the same way on the per-seed differences of the two gains
("larger", "smaller" or "unresolved") and counted apart: it is a question the paper does not ask, not
one of its claims. Nothing is rounded before the verdict. Writes OUT/paper.md and OUT/paper.json (every
number and verdict).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from clipcid.config import option
from clipcid.errors import ClipcidError
from clipcid.evaluation.run import AVERAGES
from clipcid.study import GIVEN, describe_teacher, mean_sd, paired_interval, read_study
from clipcid.util.fileio import atomic_path, output_folder, read_user_json, save_json_atomic
from clipcid.util.tables import markdown_table

LAYOUT = Path(__file__).parent / "configs" / "paper.json"
VERDICTS = ("holds", "reversed", "unresolved")
SECONDARY = "secondary"  # a claim on a section's other metrics: its raw interval, no verdict
FAMILY_LEVEL = 0.05
GAIN_VERDICTS = {"holds": "larger", "reversed": "smaller", "unresolved": "unresolved"}
NOT_RUN = "not run"
PAPER_MARKDOWN = "paper.md"  # the study folder's paper tables (with paper.json, its record)
WEIGHT_STATS = {"std": "sd", "kurtosis": "kurtosis", "near_zero": "near zero"}
WEIGHT_WHAT = {"w": "w", "change": "w − w₀"}


@dataclass
class PaperConfig:
    study: str = option(help="a study folder (clipcid study, clipcid demo --study): the PLAN.json of each plan")
    layout: str = option(str(LAYOUT), "the sections in the paper's order: plan, rows, metrics and claims (JSON)")
    out: str | None = option(None, "folder for paper.md and paper.json (default: the study folder)")


@dataclass
class Claim:
    a: str
    b: str
    metrics: list[str]
    lower: bool = False  # the paper says A is below B (e.g. fewer near-zero weights)
    than: tuple[str, str] | None = None  # compare A's gain over B with C's gain over D


@dataclass
class Section:
    title: str
    plan: str
    paper: str
    rows: list[str]
    metrics: list[str]
    claims: list[Claim] = field(default_factory=list)
    teachers: str | None = None  # None, "given" or "all"
    primary: str = ""  # the metric the section's claims are judged on (one Holm family); the first by default


def load_layout(path: str | Path) -> list[Section]:
    raw = read_user_json(path, "--layout")
    sections = []
    for i, s in enumerate(raw.get("sections", []) if isinstance(raw, dict) else []):
        where = f"--layout {path}, section {i + 1}"
        missing = [k for k in ("title", "plan", "rows", "metrics") if k not in s]
        if missing:
            raise ClipcidError(f"{where} lacks {', '.join(missing)}")
        for m in s["metrics"]:
            _metric_format(m, where)
        primary = s.get("primary", s["metrics"][0] if s["metrics"] else "")
        if primary not in s["metrics"]:
            raise ClipcidError(f"{where}: its primary metric {primary!r} is not one of its metrics")
        if s.get("teachers") not in (None, "given", "all"):
            raise ClipcidError(f'{where}: teachers is "given", "all" or absent, not {s["teachers"]!r}')
        claims = []
        for c in s.get("claims", []):
            c = {"a": c[0], "b": c[1]} if isinstance(c, list) and len(c) == 2 else c
            if not isinstance(c, dict) or not {"a", "b"} <= set(c):
                raise ClipcidError(f'{where}: a claim is [A, B] or {{"a": A, "b": B, ...}}, not {c!r}')
            metrics = c.get("metrics", s["metrics"])
            for m in metrics:
                _metric_format(m, where)
            than = c.get("than")
            if than is not None and not (isinstance(than, list) and len(than) == 2):
                raise ClipcidError(f'{where}: a claim\'s "than" is [C, D] (the gain it is compared with), not {than!r}')
            claims.append(
                Claim(c["a"], c["b"], list(metrics), bool(c.get("lower", False)), tuple(than) if than else None)
            )
        sections.append(
            Section(
                s["title"],
                s["plan"],
                s.get("paper", ""),
                list(s["rows"]),
                list(s["metrics"]),
                claims,
                s.get("teachers"),
                primary,
            )
        )
    if not sections:
        raise ClipcidError(f"--layout {path} has no sections")
    return sections


def _metric_format(metric: str, where: str = "") -> tuple[str, float, int]:
    """(column label, display scale, decimals) of a metric; a clear error for an unknown one."""
    labels = dict(AVERAGES)
    if metric in labels:
        return labels[metric] + " (%)", 100.0, 2
    parts = metric.split("/")
    if len(parts) == 4 and parts[0] == "weights" and parts[2] in WEIGHT_WHAT and parts[3] in WEIGHT_STATS:
        _, tower, what, stat = parts
        label = f"{tower}: {WEIGHT_STATS[stat]} of {WEIGHT_WHAT[what]}"
        if stat == "std":
            return label + " (×10⁻³)", 1000.0, 3
        if stat == "near_zero":
            return label + " (%)", 100.0, 2
        return label, 1.0, 3
    known = ", ".join(labels)
    raise ClipcidError(f"{where}: unknown metric {metric!r} (known: {known}, or weights/TOWER/w|change/STAT)")


def seed_values(study: dict, variant: str, metric: str) -> dict[int, float]:
    """seed -> value of one variant's metric in a plan's results."""
    if metric.startswith("weights/"):
        _, tower, what, stat = metric.split("/")
        per_seed = (study.get("weights") or {}).get(variant, {}).get("seeds", {})
        values = {int(s): r.get(tower, {}).get(what, {}).get(stat) for s, r in per_seed.items()}
    else:
        entry = study["aggregate"].get(variant, {}).get(metric)
        values = {int(s): v for s, v in entry["seeds"].items()} if entry else {}
    return {s: v for s, v in values.items() if v is not None}


def gain_values(study: dict, a: str, b: str, metric: str) -> dict[int, float]:
    """seed -> A's value minus B's, over the seeds both ran."""
    va, vb = seed_values(study, a, metric), seed_values(study, b, metric)
    return {s: va[s] - vb[s] for s in va.keys() & vb.keys()}


def claim_label(c: dict) -> str:
    if c.get("than"):
        first, second = c["than"]
        return f"gain of `{c['a']}` over `{c['b']}` against that of `{first}` over `{second}`"
    return f"`{c['a']}` {'below' if c['lower'] else 'above'} `{c['b']}`"


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family's p values (None: no test, left out of the family): the
    i-th smallest of m is multiplied by m - i + 1, capped at 1 and kept from falling below the one before."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


def verdict(difference: dict | None, lower: bool = False, adjusted_p: float | None = None) -> str:
    """On the claimed side, beyond the family's level after adjustment: holds; beyond it on the other side:
    reversed; else unresolved."""
    if difference is None or difference.get("low") is None or adjusted_p is None or adjusted_p >= FAMILY_LEVEL:
        return "unresolved"
    above = difference["mean"] > 0
    return "holds" if above != lower else "reversed"


def _teacher_rows(section: Section, study: dict, others: list[dict]) -> list[dict]:
    if section.teachers is None:
        return []
    found = []
    for source in [study, *others]:  # the main teacher's evaluation may sit in another plan's results
        for t in (source.get("teachers") or {}).values():
            is_given = t["spec"] == GIVEN
            if (section.teachers == "all" and source is study) or (section.teachers == "given" and is_given):
                found.append(t)
        if found:
            break
    rows = []
    for t in found:
        summary = t.get("summary") or {}
        name = (
            f"the main teacher ({summary.get('model', 'given')})" if t["spec"] == GIVEN else describe_teacher(t["spec"])
        )
        rows.append(
            {
                "teacher": name,
                "variants": t.get("variants", []),
                "metrics": {m: summary.get(m) for m in section.metrics},
            }
        )
    return rows


def judge_section(section: Section, study: dict | None, others: list[dict]) -> dict:
    """One section's rows (mean ± sd over seeds per metric), teachers and claims with their verdicts."""
    out: dict = {
        "title": section.title,
        "plan": section.plan,
        "paper": section.paper,
        "metrics": section.metrics,
        "primary": section.primary,
    }
    if study is None:
        return {**out, "found": False, "rows": [], "teachers": [], "claims": []}
    labels = {v["name"]: v["label"] for v in study["variants"]}
    named = section.rows + [n for c in section.claims for n in (c.a, c.b, *(c.than or ()))]
    unknown = sorted({n for n in named if n not in labels})
    if unknown:
        raise ClipcidError(
            f"layout section {section.title!r}: plan {section.plan} has no variant {', '.join(unknown)} "
            f"(it has {', '.join(labels)})"
        )
    ran = {r["variant"] for r in study.get("runs", [])}
    rows = []
    for name in section.rows:
        cells = {}
        for m in section.metrics:
            values = seed_values(study, name, m)
            mean, sd = mean_sd(list(values.values())) if values else (None, None)
            cells[m] = {"n": len(values), "mean": mean, "sd": sd}
        rows.append(
            {
                "variant": name,
                "label": labels[name],
                "ran": name in ran,
                "seeds": max(c["n"] for c in cells.values()),
                "metrics": cells,
            }
        )
    differences = {}
    for k, c in enumerate(section.claims):
        for m in c.metrics:
            if c.than:
                d = paired_interval(gain_values(study, c.a, c.b, m), gain_values(study, *c.than, m))
            else:
                d = paired_interval(seed_values(study, c.a, m), seed_values(study, c.b, m))
            differences[k, m] = (
                (d or {"n": 0, "mean": None, "low": None, "high": None, "p": None}),
                ({c.a, c.b, *(c.than or ())} <= ran),
            )
    # The families: the section's claims on its primary metric whose variants ran; its gain comparisons
    # (a question the paper does not ask) are a family of their own.
    adjusted, family_size = {}, {}
    for gains in (False, True):
        family = [
            (k, m)
            for (k, m), (_, done) in differences.items()
            if m == section.primary and done and bool(section.claims[k].than) == gains
        ]
        adjusted.update(zip(family, holm([differences[key][0].get("p") for key in family]), strict=True))
        tested = sum(differences[key][0].get("p") is not None for key in family)  # Holm's m
        family_size.update(dict.fromkeys(family, tested))
    claims = []
    for k, c in enumerate(section.claims):
        judged = {}
        for m in c.metrics:
            d, done = differences[k, m]
            if not done:
                shown = NOT_RUN
            elif m != section.primary:
                shown = SECONDARY
            else:
                shown = verdict(d, c.lower, adjusted[k, m])
                shown = GAIN_VERDICTS[shown] if c.than else shown
            judged[m] = {**d, "p_holm": adjusted.get((k, m)), "family": family_size.get((k, m), 0), "verdict": shown}
        claims.append(
            {
                "a": c.a,
                "b": c.b,
                "lower": c.lower,
                "than": list(c.than) if c.than else None,
                "a_label": labels[c.a],
                "b_label": labels[c.b],
                "metrics": judged,
            }
        )
    return {**out, "found": True, "rows": rows, "teachers": _teacher_rows(section, study, others), "claims": claims}


def _value(x: float | None, metric: str, signed: bool = False) -> str:
    if x is None:
        return "–"
    _, scale, digits = _metric_format(metric)
    return f"{scale * x:+.{digits}f}" if signed else f"{scale * x:.{digits}f}"


def _mean_sd(cell: dict, metric: str, ran: bool) -> str:
    if not ran:
        return "not run yet"
    if cell["mean"] is None:
        return "–"
    sd = f" ± {_value(cell['sd'], metric)}" if cell["sd"] is not None else ""
    return _value(cell["mean"], metric) + sd


def _claim_cell(d: dict, metric: str) -> str:
    if d["verdict"] == NOT_RUN:
        return "not run yet"
    if d["mean"] is None:
        return "– (no shared seed)"
    if d["low"] is None:
        return f"{_value(d['mean'], metric, True)} (1 seed) unresolved"
    interval = f"[{_value(d['low'], metric, True)}, {_value(d['high'], metric, True)}]"
    if d["verdict"] == SECONDARY:
        return f"{_value(d['mean'], metric, True)} {interval} (raw)"
    shown = d["verdict"] if d["verdict"] == "unresolved" else f"**{d['verdict']}**"
    return f"{_value(d['mean'], metric, True)} {interval} p_Holm {d['p_holm']:.3g} {shown}"


def section_markdown(s: dict) -> list[str]:
    lines = [f"## {s['title']}", ""]
    if s["paper"]:
        lines += [f"*The paper:* {s['paper']}", ""]
    if not s["found"]:
        return lines + [f"Not run yet: the study folder holds no results of plan `{s['plan']}`.", ""]
    labels = [_metric_format(m)[0] for m in s["metrics"]]
    rows = [
        [
            r["label"],
            f"`{r['variant']}`",
            str(r["seeds"]),
            *[_mean_sd(r["metrics"][m], m, r["ran"]) for m in s["metrics"]],
        ]
        for r in s["rows"]
    ]
    rows += [
        [f"teacher: {t['teacher']}", "", "–", *[_value(t["metrics"][m], m) for m in s["metrics"]]]
        for t in s["teachers"]
    ]
    head = ["", "variant", "seeds", *labels]
    lines += [f"Mean ± sd over seeds (plan `{s['plan']}`):", "", *markdown_table(head, rows, 2), ""]
    primary = _metric_format(s["primary"])[0]
    intros = {
        False: f"The paper's claims, first minus second paired by seed: mean [95 % interval]; on the primary "
        f"metric ({primary}) the Holm-adjusted p over the section's claims and the verdict, elsewhere the raw "
        "interval only:",
        True: "Gains compared, the first gain minus the second paired by seed: mean [95 % interval] and, on the "
        "primary metric, the Holm-adjusted p and whether the first is larger:",
    }
    for gains, intro in intros.items():
        claim_rows = [
            [
                claim_label(c),
                str(max(d["n"] for d in c["metrics"].values())),
                *[_claim_cell(c["metrics"][m], m) if m in c["metrics"] else "" for m in s["metrics"]],
            ]
            for c in s["claims"]
            if bool(c.get("than")) == gains
        ]
        if claim_rows:
            lines += [intro, "", *markdown_table(["claim", "seeds", *labels], claim_rows, 1), ""]
    return lines


def _counts_text(result: dict) -> str:
    text = ", ".join(f"{result['verdicts'].get(v, 0)} {v}" for v in VERDICTS)
    text += f" ({result['not_run']} more not run yet)" if result.get("not_run") else ""
    gains = result.get("gain_verdicts") or {}
    if sum(gains.values()):
        text += "; besides, gains compared: " + ", ".join(
            f"{n} {'more not run yet' if v == NOT_RUN else v}" for v, n in gains.items()
        )
    return text


def paper_markdown(result: dict) -> str:
    total = sum(result["verdicts"].values())
    lines = [
        "# The paper's tables at this scale",
        "",
        f"From `clipcid paper --study {result['study']}` (plans: "
        + ", ".join(f"{name}, {n} runs" for name, n in result["plans"].items())
        + "). Each claim of the paper is judged on its section's primary metric, on the differences paired "
        "by seed: the claims of a section are one family, their paired t tests' p values adjusted by Holm's "
        "method; a claim holds where its adjusted p is below 0.05 with the difference on the claimed side, "
        "is reversed where it is below 0.05 on the other side, and is unresolved otherwise (or where one "
        "seed gives no test). The other metrics show their raw 95 % intervals, which judge nothing.",
        "",
        f"Of {total} judgements on the primary metrics: {_counts_text(result)}. Within a section the chance "
        "that any claim holds or is reversed from noise alone is at most 5 %; across the "
        f"{result['families']} sections, at most {min(1.0, 0.05 * result['families']):.0%} that one does "
        "somewhere.",
        "",
    ]
    for s in result["sections"]:
        lines += section_markdown(s)
    return "\n".join(lines).rstrip() + "\n"


def paper_html(result: dict) -> str:
    """The claims and their verdicts, one table per section (the demo report; paper.md has the rows)."""
    from clipcid.util.templates import render

    sections = []
    for s in result["sections"]:
        if not s["claims"]:
            continue
        rows = []
        for c in s["claims"]:
            cells = []
            for m in s["metrics"]:
                d = c["metrics"].get(m)
                text = _claim_cell(d, m).replace("**", "") if d else ""
                decisive = d and d["verdict"] not in ("unresolved", NOT_RUN, SECONDARY)
                cells.append(text + (" **" if decisive else ""))
            rows.append([claim_label(c).replace("`", ""), *cells])
        head = ["claim", *[_metric_format(m)[0] for m in s["metrics"]]]
        sections.append({"title": s["title"], "paper": s["paper"], "head": head, "rows": rows})
    return render("paper.html.j2", counts=_counts_text(result), sections=sections)


def read_paper(folder: str | Path) -> dict | None:
    """What `clipcid paper` wrote into a folder (paper.json), or None."""
    path = Path(folder) / "paper.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_paper(cfg: PaperConfig) -> dict:
    folder = Path(cfg.study)
    if not folder.is_dir():
        raise ClipcidError(f"--study {folder} is not a folder: run `clipcid study` (or `clipcid demo --study`) first")
    sections = load_layout(cfg.layout)
    studies = {name: read_study(folder, name) for name in dict.fromkeys(s.plan for s in sections)}
    found = {name: s for name, s in studies.items() if s is not None}
    if not found:
        raise ClipcidError(
            f"--study {folder} holds no results of the layout's plans ({', '.join(studies)}): run `clipcid study`"
        )
    judged = []
    for s in sections:
        study = studies[s.plan]
        judged.append(judge_section(s, study, [o for name, o in found.items() if name != s.plan]))
    claims = [c for s in judged for c in s["claims"] if not c["than"]]
    counts = Counter(d["verdict"] for c in claims for d in c["metrics"].values())
    gains = Counter(d["verdict"] for s in judged for c in s["claims"] if c["than"] for d in c["metrics"].values())
    result = {
        "study": str(folder),
        "layout": str(cfg.layout),
        "plans": {name: len(s["runs"]) for name, s in found.items()},
        "verdicts": {v: counts.get(v, 0) for v in VERDICTS},
        "not_run": counts.get(NOT_RUN, 0),
        "with_interval": sum(d["low"] is not None for c in claims for d in c["metrics"].values()),
        "families": sum(any(d["family"] for c in s["claims"] for d in c["metrics"].values()) for s in judged),
        "gain_verdicts": {v: gains[v] for v in (*GAIN_VERDICTS.values(), NOT_RUN) if gains.get(v)},
        "sections": judged,
    }
    out = output_folder(cfg.out or folder)
    save_json_atomic(out / "paper.json", result)
    with atomic_path(out / PAPER_MARKDOWN) as tmp:
        tmp.write_text(paper_markdown(result), encoding="utf-8")
    return result
