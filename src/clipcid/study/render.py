"""A study's outputs for people: its Markdown, CSV, HTML tables and plots."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from clipcid.evaluation.run import AVERAGES
from clipcid.study.plan import GIVEN, TUNING, Plan, Variant, describe_teacher
from clipcid.study.stats import _xs
from clipcid.util.plots import new_figure, save_png
from clipcid.util.tables import markdown_table


def choices_markdown(chosen: dict[str, dict], plan: Plan) -> str:
    if not chosen:
        return ""
    metric = " and ".join(plan.select_by)
    lines = ["", f"## Choices (on {plan.split} figures: the mean over seeds of the mean of {metric})", ""]
    xs = _xs(chosen)
    lines += ["| series | " + " | ".join(f"x {x:g}" for x in xs) + " | chosen |", "|---" * (len(xs) + 2) + "|"]
    for series, c in chosen.items():
        by_x = {c["x"][name]: value for name, value in c["criterion"].items()}
        cells = [_pct(by_x.get(x)) for x in xs]
        pick = plan.variant(c["chosen"]).label if c["chosen"] else f"not yet ({c['runs']} of {c['planned']} runs)"
        lines.append(f"| {series} | " + " | ".join(cells) + f" | {pick} |")
    return "\n".join(lines) + "\n"


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _cell(entry: dict | None) -> str:
    if not entry:
        return "–"
    sd = f" ± {_pct(entry['sd'])}" if entry["sd"] is not None else ""
    return f"{_pct(entry['mean'])}{sd}"


def _diff_cell(entry: dict | None) -> str:
    return _interval_cell((entry or {}).get("vs_reference"))


def _interval_cell(d: dict | None) -> str:
    if not d:
        return "–"
    if d["low"] is None:
        return f"{_pct(d['mean'], True)} (1 seed)"
    mark = " **" if d["low"] > 0 or d["high"] < 0 else ""  # the interval excludes zero
    return f"{_pct(d['mean'], True)} [{_pct(d['low'], True)}, {_pct(d['high'], True)}]{mark}"


def summary_rows(tables: dict, plan: Plan) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the averages table: one row per variant, mean ± sd per average."""
    head = ["group", "variant", "seeds", *[label for _, label in AVERAGES]]
    rows = []
    for v in plan.variants:
        row = tables.get(v.name)
        if row:
            n = max(e["n"] for e in row.values())
            rows.append([v.group, v.label, str(n), *[_cell(row.get(k)) for k, _ in AVERAGES]])
    return head, rows


def difference_rows(tables: dict, plan: Plan) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the paired differences from the reference, with their intervals."""
    head = ["variant", *[label for _, label in AVERAGES]]
    rows = [
        [v.label, *[_diff_cell(tables[v.name].get(k)) for k, _ in AVERAGES]]
        for v in plan.variants
        if v.name != plan.reference and v.name in tables
    ]
    return head, rows


def comparison_rows(compared: list[dict], plan: Plan) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the plan's own comparisons (first minus second, paired by seed)."""
    head = ["variant", "against", *[label for _, label in AVERAGES]]
    rows = [
        [
            plan.variant(c["variant"]).label,
            plan.variant(c["against"]).label,
            *[_interval_cell(c["differences"].get(k)) for k, _ in AVERAGES],
        ]
        for c in compared
    ]
    return head, rows


WEIGHT_COLUMNS = (
    ("w", "std", "sd of w"),
    ("w", "kurtosis", "kurtosis of w"),
    ("w", "near_zero", "near zero (%)"),
    ("change", "std", "sd of w − w₀"),
    ("change", "kurtosis", "kurtosis of w − w₀"),
)


def weight_rows(weights: dict, plan: Plan) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the weights over seeds: per variant and tower, mean ± sd of each statistic."""
    head = ["variant", "tower", "seeds", *[label for _, _, label in WEIGHT_COLUMNS]]
    rows = []
    for name, entry in weights.items():
        for tower, stats in entry["over_seeds"].items():
            cells = []
            for what, key, _ in WEIGHT_COLUMNS:
                e = stats.get(what, {}).get(key)
                scale = 100 if key == "near_zero" else 1
                digits = 3 if key != "std" else 5
                sd = f" ± {scale * e['sd']:.{digits}f}" if e and e["sd"] is not None else ""
                cells.append(f"{scale * e['mean']:.{digits}f}{sd}" if e else "–")
            rows.append([plan.variant(name).label, tower, str(len(entry["seeds"])), *cells])
    return head, rows


def teacher_rows(teachers: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the teachers a plan distils from, with their own suite averages."""
    head = ["teacher", "variants", *[label for _, label in AVERAGES]]
    rows = []
    for t in teachers.values():
        spec = t["spec"]
        name = "the artifacts' teacher" if spec == GIVEN else describe_teacher(spec)
        summary = t.get("summary") or {}
        rows.append([name, ", ".join(t["variants"]), *[_pct(summary.get(k)) for k, _ in AVERAGES]])
    return head, rows


def study_markdown(
    tables: dict,
    plan: Plan,
    compared: list[dict] | None = None,
    teachers: dict[str, dict] | None = None,
    weights: dict[str, dict] | None = None,
    task_about: dict[str, tuple[str, str]] | None = None,
) -> str:
    ref = plan.variant(plan.reference).label
    keys = {k for k, _ in AVERAGES}
    lines = [
        "# Study",
        "",
        f"Mean ± standard deviation over seeds (%, held-out suite). Reference: **{ref}**. The second table gives",
        "each variant minus the reference, paired by seed, with its 95 % t interval; ** marks an interval",
        "that excludes zero.",
        "",
        *markdown_table(*summary_rows(tables, plan), left=2),
        "",
        f"Difference from {ref} (paired by seed):",
        "",
        *markdown_table(*difference_rows(tables, plan), left=1),
    ]
    if compared:
        lines += ["", "The plan's other comparisons (first minus second, paired by seed):", ""]
        lines += markdown_table(*comparison_rows(compared, plan), left=2)
    if teachers:
        lines += ["", "The teachers (each evaluated once on the suite, %):", ""]
        lines += markdown_table(*teacher_rows(teachers), left=2)
    if weights:
        lines += [
            "",
            "The last block's last linear layer of each tower, mean ± sd over seeds (the paper's Fig. 4):",
            "",
        ]
        lines += markdown_table(*weight_rows(weights, plan), left=3)
    tasks = sorted({m for row in tables.values() for m in row if m not in keys})
    shown = [v for v in plan.variants if v.name in tables]
    if tasks:
        about = task_about or {}
        task_rows = [
            [task, *about.get(task, ("–", "–")), *[_cell(tables[v.name].get(task)) for v in shown]] for task in tasks
        ]
        lines += ["", "Every task (mean ± sd over seeds, %; pictures and chance level of its metric):", ""]
        lines += markdown_table(["task", "pictures", "chance", *[v.name for v in shown]], task_rows, left=1)
    return "\n".join(lines) + "\n"


def study_tables_html(study: dict) -> str:
    """The averages and the differences, as HTML tables (the demo report), from a study.json."""
    from clipcid.util.templates import render

    plan = Plan(study["reference"], study["seeds"], study["base"], [Variant(**v) for v in study["variants"]])
    compared = study.get("comparisons") or []
    teachers = study.get("teachers") or {}
    return render(
        "study_tables.html.j2",
        summary=summary_rows(study["aggregate"], plan),
        teachers=teacher_rows(teachers) if teachers else None,
        reference=plan.variant(plan.reference).label,
        differences=difference_rows(study["aggregate"], plan),
        comparisons=comparison_rows(compared, plan) if compared else None,
    )


def study_csv(tables: dict, reference: str, compared: list[dict]) -> str:
    """One row per variant and metric (its mean, sd and difference from the reference), then one per
    comparison of the plan and average (the difference only)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["variant", "metric", "seeds", "mean", "sd", "against", "diff", "ci95_low", "ci95_high"])
    for variant, row in tables.items():
        for metric, e in row.items():
            d = e.get("vs_reference") or {}
            against = reference if d else None
            w.writerow(
                [variant, metric, e["n"], e["mean"], e["sd"], against, d.get("mean"), d.get("low"), d.get("high")]
            )
    for c in compared:
        for metric, d in c["differences"].items():
            if d:
                w.writerow([c["variant"], metric, d["n"], None, None, c["against"], d["mean"], d["low"], d["high"]])
    return buf.getvalue()


def study_plot(tables: dict, plan: Plan, path: Path) -> None:
    shown = [v for v in plan.variants if v.name in tables]
    fig, axes = new_figure(4.2 * len(AVERAGES), 0.45 * len(shown) + 1.6, ncols=len(AVERAGES))
    y = np.arange(len(shown))
    for ax, (key, label) in zip(axes, AVERAGES, strict=True):
        means = [100 * tables[v.name].get(key, {}).get("mean", np.nan) for v in shown]
        sds = [100 * (tables[v.name].get(key, {}).get("sd") or 0.0) for v in shown]
        colours = ["tab:gray" if v.name == plan.reference else "tab:blue" for v in shown]
        ax.barh(y, means, xerr=sds, color=colours, capsize=3)
        ref = tables.get(plan.reference, {}).get(key)
        if ref:
            ax.axvline(100 * ref["mean"], color="tab:gray", linestyle="--", linewidth=1)
        ax.set(title=label + " (%)", yticks=y)
        ax.set_yticklabels([v.label for v in shown] if ax is axes[0] else [], fontsize=8)
        ax.invert_yaxis()
    save_png(fig, path)


CURVE_METRICS = (
    ("seen_zeroshot_mean_acc1", "seen distribution: zero-shot mean acc1"),
    ("seen_retrieval_mean_recall@5", "seen distribution: retrieval mean R@5"),
    ("linear_probe_mean_acc1", "linear-probe mean acc1"),
    ("seen_coarse_zeroshot_mean_per_class_recall", "seen distribution: coarse zero-shot per-class recall"),
)


def curves_plot(tables: dict, plan: Plan, path: Path) -> None:
    """Each series (e.g. a method) against its variants' x (e.g. epochs): the mean over seeds with its
    95 % t interval, one panel per metric of CURVE_METRICS."""
    from scipy import stats

    series: dict[str, list[Variant]] = {}
    for v in plan.variants:
        if v.x is not None and v.series and v.name in tables:
            series.setdefault(v.series, []).append(v)
    fig, axes = new_figure(5.0 * len(CURVE_METRICS), 3.6, ncols=len(CURVE_METRICS))
    for ax, (key, label) in zip(axes, CURVE_METRICS, strict=True):
        for name, variants in series.items():
            points = sorted((v.x, tables[v.name][key]) for v in variants if key in tables[v.name])
            if not points:
                continue
            xs = [x for x, _ in points]
            means = np.array([100 * e["mean"] for _, e in points])
            half = np.array(
                [
                    100 * stats.t.ppf(0.975, e["n"] - 1) * e["sd"] / math.sqrt(e["n"]) if e["sd"] is not None else 0.0
                    for _, e in points
                ]
            )
            ax.errorbar(xs, means, yerr=half, marker="o", capsize=3, label=name)
        ax.set(title=label + " (%)", xlabel=_axis_name(plan), xscale="log")
        ax.set_xticks(sorted({v.x for vs in series.values() for v in vs}))
        ax.get_xaxis().set_major_formatter("{x:g}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    save_png(fig, path)


def _axis_name(plan: Plan) -> str:
    if plan.purpose == TUNING:
        return "× the papers' setting"
    trained = [v for v in plan.variants if v.x is not None]
    epochs = [v.train.get("epochs", plan.base.get("epochs", 1)) for v in trained]
    return "epochs" if trained and all(e == v.x for e, v in zip(epochs, trained, strict=True)) else "x"
