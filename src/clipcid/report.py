"""The report of a `clipcid run` (and of the demo, which is a run with sections of its own):
OUT/report.html, one self-contained page (images inline) of what ran and what came out, and
OUT/results.md, its results table. Every artifact is read through its owner module."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from clipcid.balance import artifact as balance_artifact
from clipcid.balance.inspect import groups_html
from clipcid.cluster import artifact as cluster_artifact
from clipcid.distill.checkpoint import read_train_log, too_short
from clipcid.distill.objective import TERMS
from clipcid.errors import ClipcidError
from clipcid.evaluation import zeroshot_retrieval as zsr
from clipcid.evaluation.datasets import ROBUST, SEEN, group_of
from clipcid.evaluation.run import (
    AVERAGES,
    HOLDOUT_DATASET,
    main_metric,
    read_model_evaluation,
    read_ranks,
    read_showcase,
    read_suite_results,
    task_label,
)
from clipcid.holdout import HoldOut
from clipcid.layout import BASELINE, STUDENT, RunLayout
from clipcid.util.fileio import atomic_path
from clipcid.util.machine import cpu_name
from clipcid.util.plots import new_figure, save_png
from clipcid.util.tables import markdown_table
from clipcid.util.templates import render

# The models of a run, in the order tables show them: (name, label).
MODELS = (("teacher", "teacher"), ("baseline", "baseline (CLIP loss only)"), ("student", "student (CLIP-CID)"))
HOLDOUT_ROWS = tuple(
    (f"{kind}_retrieval_recall@{k}", f"held-out {label} R@{k}")
    for kind, label in (("image", "text→image"), ("text", "image→text"))
    for k in zsr.RECALL_KS
)


@dataclass
class Extras:
    """What a caller adds to a run's report (the demo: its intro, its teacher's training, a showcase)."""

    title: str = "clipcid run"
    intro: str = ""
    after_results: list[str] = field(default_factory=list)  # HTML sections after the results
    timings: dict[str, float] = field(default_factory=dict)  # stages run before the pipeline
    curves: list[tuple[list[dict], str]] = field(default_factory=list)  # more training logs to plot


def png_of(path: Path) -> bytes | None:
    """A plot's bytes for a template (None: the template says it is missing)."""
    return path.read_bytes() if path.is_file() else None


def _loss_curves(rows: list[dict], title: str) -> tuple[bytes | None, str]:
    if not rows:
        return None, title
    terms = [k for k in (*TERMS, "total") if k in rows[-1]]
    fig, ax = new_figure(6.5, 3.6)
    steps = [r["step"] for r in rows]
    for term in terms:
        ax.plot(steps, [r.get(term) for r in rows], label=term, linewidth=2 if term == "total" else 1)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend(fontsize=8)
    return save_png(fig, dpi=90), title


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


@dataclass
class Table:
    """The results table: one column per model, and the CID student minus the baseline when both ran."""

    labels: list[str]
    rows: list[tuple[str, bool, list[str], str]]  # (task, is a headline row, cells, difference cell)
    difference: str | None


def results_table(out: Path) -> Table:
    out = Path(out)
    layout = RunLayout(out)
    present = [(n, label) for n, label in MODELS if layout.evaluation(n).is_dir()]
    results = {n: read_suite_results(layout.evaluation(n)) for n, _ in present}
    compare = "baseline" in results and "student" in results
    rows: list[tuple[str, bool, list[str], str]] = []
    holdout = {n: r[1].get(f"{HOLDOUT_DATASET}_zeroshot_retrieval") for n, r in results.items()}
    if any(holdout.values()):
        ranks = {n: read_ranks(layout.evaluation(n), HOLDOUT_DATASET) for n, _ in present}
        n_pairs = next(len(r.image_rank) for r in ranks.values() if r is not None)
        for key, label in HOLDOUT_ROWS:
            cells = []
            for n, _ in present:
                m = (holdout[n] or {}).get("metrics", {})
                interval = (m.get(f"{key}_ci95_low"), m.get(f"{key}_ci95_high"))
                ci = f" [{_pct(interval[0])}, {_pct(interval[1])}]" if interval[0] is not None else ""
                cells.append(f"{_pct(m.get(key))}{ci}")
            diff = ""
            if compare and ranks.get("student") is not None and ranks.get("baseline") is not None:
                k = int(key.rsplit("@", 1)[1])
                kind = key.split("_recall")[0]
                d, low, high = zsr.paired_difference(ranks["student"], ranks["baseline"], k)[kind]
                mark = " **" if low > 0 or high < 0 else ""
                diff = f"{_pct(d, True)} [{_pct(low, True)}, {_pct(high, True)}]{mark}"
            rows.append((f"{label} ({n_pairs:,} pairs)", True, cells, diff))
    summaries = {n: r[0] or {} for n, r in results.items()}
    every = {t: r for _, records in results.values() for t, r in records.items()}
    every.pop(f"{HOLDOUT_DATASET}_zeroshot_retrieval", None)
    order = {SEEN: 0, ROBUST: 1}
    tasks = sorted(every, key=lambda t: (order.get(group_of(every[t]["dataset"]), 2), t))  # seen, robust, the rest
    for key, label in AVERAGES if tasks else ():  # the means of the other tasks, when there are any
        values = [summaries[n].get(key) for n, _ in present]
        pair = [summaries[n].get(key) for n in ("student", "baseline")] if compare else [None]
        diff = _pct(pair[0] - pair[1], True) if None not in pair else ""
        rows.append((label, True, [_pct(v) for v in values], diff))
    for task in tasks:
        records = [results[n][1].get(task) for n, _ in present]
        values = [_main(r) for r in records]
        diff = ""
        if compare and values[-1] is not None and values[-2] is not None:
            diff = _pct(values[-1] - values[-2], True)
        rows.append((task_label(next(r for r in records if r)), False, [_pct(v) for v in values], diff))
    difference = "student − baseline" if compare else None
    short = [reason for n in (STUDENT, BASELINE) if compare and (reason := too_short(layout.run(n)))]
    if short:  # no difference of such a run is a finding: say so in the column and mark none
        difference = f"student − baseline (too short to judge: {short[0]})"
        rows = [(task, head, cells, diff.removesuffix(" **")) for task, head, cells, diff in rows]
    return Table([label for _, label in present], rows, difference)


def _main(record: dict | None) -> float | None:
    return None if record is None else main_metric(record)[1]


def results_rows(table: Table) -> dict:
    """The results table for the template: its head, and rows of cells (headline rows marked)."""
    head = ["task (%)", *table.labels, *([table.difference] if table.difference else [])]
    rows = [
        {"cells": [task, *cells, *([diff] if table.difference else [])], "headline": headline}
        for task, headline, cells, diff in table.rows
    ]
    return {"head": head, "rows": rows}


def results_markdown(table: Table) -> str:
    """The results table in Markdown, as docs/results.md shows it."""
    labels = table.labels + ([table.difference] if table.difference else [])
    rows = [
        [f"**{task}**" if headline else task, *cells, *([diff] if table.difference else [])]
        for task, headline, cells, diff in table.rows
    ]
    return "\n".join(markdown_table(["task (%)", *labels], rows)) + "\n"


def holdout_showcase(out: Path) -> dict | None:
    """Held-out captions with each model's five best held-out pictures (the pair's own framed green)."""
    layout = RunLayout(out)
    shown = {n: read_showcase(layout.evaluation(n)) for n, _ in MODELS}
    shown = {n: s for n, s in shown.items() if s and s["queries"]}
    if not shown:
        return None
    from clipcid.evaluation.datasets import build_dataset

    holdout = HoldOut.open(layout.holdout)
    captions = holdout.pairs().column("caption").to_pylist()
    first = next(iter(shown.values()))
    wanted = set(first["queries"]) | {i for s in shown.values() for row in s["retrieved"] for i in row}
    dataset = build_dataset(f"wds:{holdout.gallery}")
    images = {i: image for i, (image, _) in enumerate(dataset.iter_split("test")) if i in wanted}
    queries = []
    for q, query in enumerate(first["queries"]):
        lines = [
            {"label": label, "pictures": [(images[i], i == query) for i in shown[n]["retrieved"][q]]}
            for n, label in MODELS
            if n in shown
        ]
        queries.append({"caption": captions[query], "picture": images[query], "lines": lines})
    return {"gallery": len(captions), "queries": queries}


def models_rows(out: Path) -> list[dict]:
    """Each model's size and speed (measured in its evaluation, on its device)."""
    rows = []
    for n, label in MODELS:
        record = read_model_evaluation(RunLayout(out).evaluation(n))
        if record is None or "parameters" not in record:
            continue
        p = record["parameters"]
        rows.append(
            {"label": label, "total": p["total"], "visual": p["visual"], "text": p["text"],
             "images_per_second": record["images_per_second"], "device": record["speed_device"],
             "batch": record["speed_batch"]}
        )  # fmt: skip
    return rows


def holdout_figures(out: Path) -> dict | None:
    layout = RunLayout(out)
    if not HoldOut.exists(layout.holdout):
        return None
    h = HoldOut.open(layout.holdout)
    s = h.stats
    return {
        "held_out": s["held_out"], "rows": s["rows"], "fraction_held": s["held_out_fraction"],
        "fraction": h.record["settings"]["fraction"], "usable": s["usable"], "gallery_pairs": s["gallery_pairs"],
        "near_held_out": balance_artifact.read_stats(layout.balance).get("near_held_out", 0),
    }  # fmt: skip


def inside_figures(out: Path) -> dict | None:
    """The students' last-layer weights (the paper's Fig. 4) and patch features (its Fig. 5)."""
    from clipcid.evaluation.inside import SMALL, inside_paths, read_inside

    folder = RunLayout(out).inside
    record = read_inside(folder)
    if record is None:
        return None
    numbers, paths = record["weights"], inside_paths(folder)
    labels = dict(MODELS)
    rows = [
        {"label": labels.get(name, name), "tower": tower, "w": both["w"], "change": both["change"]}
        for name, towers in numbers.items()
        for tower, both in towers.items()
    ]
    verdict = []
    if {"baseline", "student"} <= set(numbers):
        for tower in numbers["student"]:
            cid, clip = numbers["student"][tower]["w"], numbers["baseline"][tower]["w"]
            wider = cid["std"] > clip["std"]
            fewer = cid["near_zero"] < clip["near_zero"]
            verdict.append(
                f"{tower} tower: CID's spread is {'wider' if wider else 'not wider'} (sd {cid['std']:.5f} against "
                f"{clip['std']:.5f}) and it has {'fewer' if fewer else 'no fewer'} near-zero weights "
                f"({100 * cid['near_zero']:.3f}% against {100 * clip['near_zero']:.3f}%)"
            )
    return {
        "small": SMALL,
        "rows": rows,
        "verdict": verdict,
        "weights": png_of(paths["weights"]),
        "patches": png_of(paths["patches"]),
    }


def wall_total(timings: dict[str, float], stages: dict[str, dict]) -> float:
    """The wall seconds of the stages in all: stages that ran side by side (run.json names them) count once,
    as the longest of them."""
    groups: dict[frozenset, float] = {}
    for name, seconds in timings.items():
        together = frozenset([name, *stages.get(name, {}).get("side_by_side", [])])
        groups[together] = max(groups.get(together, 0.0), seconds)
    return sum(groups.values())


RESULTS_MARKDOWN = "results.md"


def report_path(out: str | Path) -> Path:
    """Where a run's page is: OUT/report.html."""
    return Path(out) / "report.html"


def write_report(out: Path, extras: Extras | None = None) -> Path:
    """OUT/report.html and OUT/results.md of a finished run."""
    out = Path(out)
    extras = extras or Extras()
    layout = RunLayout(out)
    recipe = layout.read_recipe()
    if recipe is None:
        raise ClipcidError(f"{out} holds no run (no {layout.recipe.name}); run `clipcid run` first")
    table = results_table(out)
    balance_stats = balance_artifact.read_stats(layout.balance)
    cluster_stats = cluster_artifact.read_stats(layout.clusters)
    emb = recipe["run"]["teacher_emb"] or str(layout.teacher_emb)
    groups, _ = groups_html(str(layout.balance), recipe["run"]["data"], emb, top=8, per_group=10)
    t = balance_stats["threshold_all_metrics"]
    machine = (
        f"{platform.system()} {platform.machine()}, {cpu_name()}, {os.cpu_count()} CPU cores"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU")
        + f", torch {torch.__version__}; report written {time.strftime('%Y-%m-%d %H:%M %Z')}"
    )
    run_state = layout.read_run_record()
    if run_state.get("allocator"):
        machine += f"; memory allocator: {run_state['allocator']}"
    stages = run_state["stages"]
    timings = {**extras.timings, **{k: v["seconds"] for k, v in stages.items()}}

    def cpu(stage: dict) -> dict | None:  # None: recorded before CPU time was
        if "user_seconds" not in stage:
            return None
        return {"user": stage["user_seconds"], "system": stage["system_seconds"], "faults": stage["minor_faults"]}

    def stage_label(name: str) -> str:
        beside = stages.get(name, {}).get("side_by_side")
        return f"{name} (side by side with {', '.join(beside)})" if beside else name

    measured = [cpu(s) for s in stages.values() if cpu(s)]
    total = {
        "seconds": wall_total(timings, stages),
        **{k: sum(c[k] for c in measured) for k in ("user", "system", "faults")},
    }
    curves = [_loss_curves(rows, title) for rows, title in extras.curves]
    curves += [
        _loss_curves(read_train_log(layout.run(name)), title)
        for name, title in (("baseline", "baseline, CLIP loss only"), ("student", "student, CLIP-CID: every term"))
        if layout.run(name).is_dir()
    ]
    balance_plots = balance_artifact.plot_paths(layout.balance)
    cluster_plots = cluster_artifact.plot_paths(layout.clusters)
    body = render(
        "report.html.j2",
        title=extras.title,
        page_title=f"{extras.title} report",
        intro=extras.intro,
        teacher=recipe["embed"]["model"] or "(embeddings only)",
        student=recipe["distill"]["model"],
        data=recipe["run"]["data"],
        results=results_rows(table),
        holdout=holdout_figures(out),
        showcase=holdout_showcase(out),
        after_results=extras.after_results,
        models=models_rows(out),
        inside=inside_figures(out),
        machine=machine,
        world=run_state.get("world_size", 1),
        timings=[{"label": stage_label(k), "seconds": v, "cpu": cpu(stages.get(k, {}))} for k, v in timings.items()],
        total=total,
        recipe=json.dumps(recipe, indent=2),
        balance={
            **{k: balance_stats[k] for k in ("threshold", "metric", "kept", "balanced", "removed_fraction")},
            **{k: balance_stats[k] for k in ("merged_groups", "largest_group")},
            "l2": t["l2"],
            "cosine": t["cosine"],
            "largest_share": balance_stats["largest_group"] / max(balance_stats["balanced"], 1),
            "group_sizes": png_of(balance_plots["group_sizes"]),
            "removal_curve": png_of(balance_plots["removal_curve"]),
            "groups": groups,
        },
        clusters={
            "k": cluster_stats["k"],
            "assigned": cluster_stats["assigned"],
            "size": cluster_stats["cluster_size"],
            "empty": cluster_stats["empty_clusters"],
            "sizes": png_of(cluster_plots["sizes"]),
            "spread": cluster_stats.get("before_and_after_balance"),
            "balance_plot": png_of(cluster_plots["balance"]),
        },
        curves=curves,
    )
    with atomic_path(out / RESULTS_MARKDOWN) as tmp:
        tmp.write_text(results_markdown(table), encoding="utf-8")
    path = report_path(out)
    with atomic_path(path) as tmp:
        tmp.write_text(body, encoding="utf-8")
    return path
