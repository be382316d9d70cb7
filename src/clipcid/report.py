"""The report of a `clipcid run` (and of the demo, which is a run with sections of its own):
OUT/report.html, one self-contained page (images inline) of what ran and what came out, and
OUT/results.md, its results table. Every artifact is read through its owner module."""

from __future__ import annotations

import html
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
from clipcid.util.html import page, png_src
from clipcid.util.machine import cpu_name
from clipcid.util.plots import new_figure, save_png
from clipcid.util.tables import markdown_table

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


def _img_tag(png: bytes, alt: str) -> str:
    return f'<img class=plot alt="{html.escape(alt)}" src="{png_src(png)}">'


def _file_img(path: Path, alt: str) -> str:
    return _img_tag(path.read_bytes(), alt) if path.is_file() else f"<p>({html.escape(alt)}: not found)</p>"


def _loss_curves(rows: list[dict], title: str) -> str:
    if not rows:
        return f"<p>no training log for {html.escape(title)}</p>"
    terms = [k for k in (*TERMS, "total") if k in rows[-1]]
    fig, ax = new_figure(6.5, 3.6)
    steps = [r["step"] for r in rows]
    for term in terms:
        ax.plot(steps, [r.get(term) for r in rows], label=term, linewidth=2 if term == "total" else 1)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend(fontsize=8)
    return _img_tag(save_png(fig, dpi=90), title)


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


def results_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for label in table.labels)
    head += f"<th>{html.escape(table.difference)}</th>" if table.difference else ""
    body = []
    for task, headline, cells, diff in table.rows:
        tds = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
        if table.difference:
            bold = diff.endswith(" **")
            text = html.escape(diff.removesuffix(" **"))
            tds += f"<td><b>{text}</b></td>" if bold else f"<td>{text}</td>"
        name = f"<b>{html.escape(task)}</b>" if headline else html.escape(task)
        body.append(f"<tr{' class=avg' if headline else ''}><td>{name}</td>{tds}</tr>")
    return f"<table><tr><th>task (%)</th>{head}</tr>{''.join(body)}</table>"


def results_markdown(table: Table) -> str:
    """The results table in Markdown, as docs/results.md shows it."""
    labels = table.labels + ([table.difference] if table.difference else [])
    rows = [
        [f"**{task}**" if headline else task, *cells, *([diff] if table.difference else [])]
        for task, headline, cells, diff in table.rows
    ]
    return "\n".join(markdown_table(["task (%)", *labels], rows)) + "\n"


def _thumb(image: bytes, frame: str = "#ddd", size: int = 64) -> str:
    return f'<img class=thumb style="border:3px solid {frame};width:{size}px" src="{png_src(image)}">'


def holdout_showcase_html(out: Path) -> str:
    """Held-out captions with each model's five best held-out pictures (the pair's own framed green)."""
    layout = RunLayout(out)
    shown = {n: read_showcase(layout.evaluation(n)) for n, _ in MODELS}
    shown = {n: s for n, s in shown.items() if s and s["queries"]}
    if not shown:
        return ""
    from clipcid.evaluation.datasets import build_dataset

    holdout = HoldOut.open(layout.holdout)
    captions = holdout.pairs().column("caption").to_pylist()
    first = next(iter(shown.values()))
    wanted = set(first["queries"]) | {i for s in shown.values() for row in s["retrieved"] for i in row}
    dataset = build_dataset(f"wds:{holdout.gallery}")
    images = {i: image for i, (image, _) in enumerate(dataset.iter_split("test")) if i in wanted}
    blocks = []
    for q, query in enumerate(first["queries"]):
        lines = []
        for n, label in MODELS:
            if n in shown:
                thumbs = "".join(
                    _thumb(images[i], "#2a2" if i == query else "#ccc", 56) for i in shown[n]["retrieved"][q]
                )
                lines.append(f"<tr><td>{html.escape(label)}</td><td class=left>{thumbs}</td></tr>")
        title = f"<h4>“{html.escape(captions[query])}” {_thumb(images[query], '#2a2', 40)}</h4>"
        blocks.append(f"{title}<table>{''.join(lines)}</table>")
    return (
        f"<h2>The models at work on held-out pairs</h2><p>Captions of pairs that no model trained on, and each "
        f"model's five best pictures among the {len(captions):,} held-out pictures; the caption's own picture is "
        f"framed green.</p>{''.join(blocks)}"
    )


def models_html(out: Path) -> str:
    """Each model's size and speed (measured in its evaluation, on its device)."""
    rows = []
    for n, label in MODELS:
        record = read_model_evaluation(RunLayout(out).evaluation(n))
        if record is None or "parameters" not in record:
            continue
        p = record["parameters"]
        rows.append(
            f"<tr><td>{html.escape(label)}</td><td>{p['total'] / 1e6:.2f} M</td><td>{p['visual'] / 1e6:.2f} M</td>"
            f"<td>{p['text'] / 1e6:.2f} M</td><td>{record['images_per_second']:,.0f}</td>"
            f"<td>{html.escape(record['speed_device'])}, batch {record['speed_batch']}</td></tr>"
        )
    if not rows:
        return ""
    return (
        "<h2>Models: size and speed</h2><table><tr><th>model</th><th>parameters</th><th>image tower</th>"
        "<th>text tower</th><th>images / s</th><th>measured on</th></tr>" + "".join(rows) + "</table>"
    )


def holdout_html(out: Path) -> str:
    layout = RunLayout(out)
    if not HoldOut.exists(layout.holdout):
        return "<h2>Hold-out</h2><p>No pairs were held out (--holdout 0).</p>"
    h = HoldOut.open(layout.holdout)
    s = h.stats
    settings = h.record["settings"]
    balance = balance_artifact.read_stats(layout.balance)
    return (
        f"<h2>Hold-out</h2><p>{s['held_out']:,} of {s['rows']:,} pairs ({100 * s['held_out_fraction']:.2f}%, "
        f"--holdout {settings['fraction']:g}) were set aside before any model ran, chosen by a hash of the image "
        f"bytes. No stage trained on them, and balance dropped the {balance.get('near_held_out', 0):,} training "
        f"pictures within its threshold of a held-out picture. {s['usable']:,} held-out pairs have a picture that "
        f"decodes and a caption; the {s['gallery_pairs']:,} of smallest hash form the retrieval gallery above "
        "(recall@k depends on the gallery's size). Intervals: 95 % bootstrap over the pairs; differences are "
        "paired (** : the interval excludes zero).</p>"
    )


def cluster_balance_html(folder: Path, stats: dict) -> str:
    """The paper's Fig. 2(d): the corpus over the clusters before and after balance."""
    spread = stats.get("before_and_after_balance")
    if not spread:
        return ""
    rows = "".join(
        f"<tr><td>{label}</td><td>{s['rows']:,}</td><td>{s['entropy_bits']:.3f} of {s['max_entropy_bits']:.3f}</td>"
        f"<td>{s['normalized_entropy']:.4f}</td><td>{s['gini']:.4f}</td><td>{100 * s['largest_share']:.2f}</td></tr>"
        for label, s in (("whole corpus (before balance)", spread["before"]), ("balanced (kept)", spread["after"]))
    )
    evener = spread["after"]["gini"] < spread["before"]["gini"]
    return (
        "<h3>The corpus over the clusters, before and after balance (the paper's Fig. 2(d))</h3><p>Every row "
        "balance took in is assigned to the same centroids, the removed ones too (a file of their own; their "
        f"training label stays −1). After balance the spread is {'more' if evener else 'less'} even "
        f"(Gini {spread['before']['gini']:.3f} → {spread['after']['gini']:.3f}).</p><table><tr><th>rows</th>"
        "<th>images</th><th>entropy (bits) of its maximum</th><th>normalised entropy</th><th>Gini</th>"
        f"<th>largest cluster (%)</th></tr>{rows}</table>"
        + _file_img(cluster_artifact.plot_paths(folder)["balance"], "cluster sizes before and after balance")
    )


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def inside_html(out: Path) -> str:
    """The students' last-layer weights (the paper's Fig. 4) and patch features (its Fig. 5)."""
    from clipcid.evaluation.inside import SMALL, inside_paths, read_inside

    folder = RunLayout(out).inside
    record = read_inside(folder)
    if record is None:
        return ""
    numbers, paths = record["weights"], inside_paths(folder)
    labels = dict(MODELS)
    rows = []
    for name, towers in numbers.items():
        for tower, both in towers.items():
            w, d = both["w"], both["change"]
            rows.append(
                f"<tr><td>{html.escape(labels.get(name, name))}</td><td>{tower}</td><td>{w['std']:.5f}</td>"
                f"<td>{_number(w['kurtosis'])}</td><td>{100 * w['near_zero']:.3f}</td><td>{d['std']:.5f}</td>"
                f"<td>{_number(d['kurtosis'])}</td></tr>"
            )
    verdict = ""
    if {"baseline", "student"} <= set(numbers):
        lines = []
        for tower in numbers["student"]:
            cid, clip = numbers["student"][tower]["w"], numbers["baseline"][tower]["w"]
            wider = cid["std"] > clip["std"]
            fewer = cid["near_zero"] < clip["near_zero"]
            lines.append(
                f"{tower} tower: CID's spread is {'wider' if wider else 'not wider'} (sd {cid['std']:.5f} against "
                f"{clip['std']:.5f}) and it has {'fewer' if fewer else 'no fewer'} near-zero weights "
                f"({100 * cid['near_zero']:.3f}% against {100 * clip['near_zero']:.3f}%)"
            )
        verdict = "<p>The paper's observation (a wider spread after distillation, fewer near-zero weights), here: " + (
            "; ".join(lines) + ".</p>"
        )
    patches = (
        "<h3>Patch features (the paper's Fig. 5)</h3><p>Held-out pictures; per ViT student, the first principal "
        "component of the last block's patch tokens thresholded (object white), then the next three components "
        "of the object patches as RGB, one PCA per model over all the pictures. The teacher's image tower is a CNN "
        "(a 4 × 4 last feature map at 128 px): left out.</p>" + _file_img(paths["patches"], "patch features")
        if paths["patches"].is_file()
        else ""
    )
    return (
        "<h2>Inside the students</h2><h3>Weights (the paper's Fig. 4)</h3><p>The last linear layer of the last "
        "block of each tower, as trained (w) and as changed from the initialisation both students share "
        f"(w − w₀). Near zero: |w| &lt; {SMALL:g}. Kurtosis is excess kurtosis (0 for a normal distribution); "
        f"the numbers are in <code>inside/weights.json</code>.</p>{verdict}<table><tr><th>model</th><th>tower</th>"
        "<th>sd of w</th><th>kurtosis of w</th><th>near zero (%)</th><th>sd of w − w₀</th><th>kurtosis of w − w₀"
        f"</th></tr>{''.join(rows)}</table>" + _file_img(paths["weights"], "weight distributions") + patches
    )


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
    balance_plots = balance_artifact.plot_paths(layout.balance)
    cluster_stats = cluster_artifact.read_stats(layout.clusters)
    emb = recipe["run"]["teacher_emb"] or str(layout.teacher_emb)
    groups, _ = groups_html(str(layout.balance), recipe["run"]["data"], emb, top=8, per_group=10)
    t = balance_stats["threshold_all_metrics"]
    largest_share = balance_stats["largest_group"] / max(balance_stats["balanced"], 1)
    chaining = (
        f" The largest group holds {100 * largest_share:.1f}% of the images: union-find joins neighbours of "
        "neighbours, so in a dense part of the teacher's space a chain of near pairs merges images that are "
        "not alike (see the grids below); a better teacher, or a lower threshold, makes fewer such chains."
        if largest_share > 0.01
        else ""
    )
    machine = (
        f"{platform.system()} {platform.machine()}, {cpu_name()}, {os.cpu_count()} CPU cores"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU")
        + f", torch {torch.__version__}; report written {time.strftime('%Y-%m-%d %H:%M %Z')}"
    )
    run_state = layout.read_run_record()
    timings = {**extras.timings, **{k: v["seconds"] for k, v in run_state["stages"].items()}}

    def cpu_cells(stage: dict) -> str:
        if "user_seconds" not in stage:  # recorded before CPU time was
            return "<td>–</td><td>–</td><td>–</td>"
        return (
            f"<td>{stage['user_seconds']:.1f}</td><td>{stage['system_seconds']:.1f}</td>"
            f"<td>{stage['minor_faults'] / 1e6:.2f}</td>"
        )

    def stage_label(name: str) -> str:
        beside = run_state["stages"].get(name, {}).get("side_by_side")
        return f"{name} (side by side with {', '.join(beside)})" if beside else name

    timing_rows = "".join(
        f"<tr><td>{html.escape(stage_label(k))}</td><td>{v:.1f}</td>{cpu_cells(run_state['stages'].get(k, {}))}</tr>"
        for k, v in timings.items()
    )
    cpu_total = [s for s in run_state["stages"].values() if "user_seconds" in s]
    total_cells = (
        f"<td><b>{sum(s['user_seconds'] for s in cpu_total):.1f}</b></td>"
        f"<td><b>{sum(s['system_seconds'] for s in cpu_total):.1f}</b></td>"
        f"<td><b>{sum(s['minor_faults'] for s in cpu_total) / 1e6:.2f}</b></td>"
    )
    wall = wall_total(timings, run_state["stages"])
    world = run_state.get("world_size", 1)
    if run_state.get("allocator"):
        machine += f"; memory allocator: {run_state['allocator']}"
    curves = "".join(_loss_curves(rows, title) for rows, title in extras.curves)
    curves += "".join(
        _loss_curves(read_train_log(layout.run(name)), title)
        for name, title in (("baseline", "baseline, CLIP loss only"), ("student", "student, CLIP-CID: every term"))
        if layout.run(name).is_dir()
    )
    teacher = recipe["embed"]["model"] or "(embeddings only)"
    intro = extras.intro or (
        f"<p>CLIP-CID distillation (Yang et al., AAAI 2025) of <code>{html.escape(teacher)}</code> into "
        f"<code>{html.escape(recipe['distill']['model'])}</code> on <code>{html.escape(recipe['run']['data'])}</code>. "
        "The held-out figures are on pairs of the same data that no stage trained on.</p>"
    )
    body = f"""
<h1>{html.escape(extras.title)}</h1>{intro}
<h2>Results (%)</h2>{results_html(table)}
{holdout_html(out)}
{holdout_showcase_html(out)}
{"".join(extras.after_results)}
{models_html(out)}
{inside_html(out)}
<h2>What ran</h2>
<p>{html.escape(machine)}; {world} process(es). Seconds per stage, when it last did its work (installs not
included); the settings follow (OUT/recipe.json).</p>
<table><tr><th>stage</th><th>seconds</th><th>user CPU s</th><th>system CPU s</th><th>minor faults (M)</th></tr>
{timing_rows}<tr><td><b>total</b></td><td><b>{wall:.1f}</b></td>{total_cells}</tr></table>
<pre>{html.escape(json.dumps(recipe, indent=2))}</pre>
<h2>Image Semantic Balance</h2>
<p>threshold {balance_stats["threshold"]:.4g} ({html.escape(balance_stats["metric"])}; l2 {t["l2"]:.4g}, cosine
distance {t["cosine"]:.4g}): kept {balance_stats["kept"]:,} of {balance_stats["balanced"]:,} images, removed
{100 * balance_stats["removed_fraction"]:.2f}%; {balance_stats["merged_groups"]:,} merged groups, the largest
{balance_stats["largest_group"]:,}.{chaining} The curve shows what other thresholds would remove.</p>
{_file_img(balance_plots["group_sizes"], "group sizes")}
{_file_img(balance_plots["removal_curve"], "removed fraction against threshold")}
<h3>Largest merged groups (kept image framed green)</h3>{groups}
<h2>Clusters</h2>
<p>k = {cluster_stats["k"]:,} over {cluster_stats["assigned"]:,} kept images; sizes min
{cluster_stats["cluster_size"]["min"]}, median {cluster_stats["cluster_size"]["median"]:.0f}, max
{cluster_stats["cluster_size"]["max"]}; {cluster_stats["empty_clusters"]} empty.</p>
{_file_img(cluster_artifact.plot_paths(layout.clusters)["sizes"], "cluster sizes")}
{cluster_balance_html(layout.clusters, cluster_stats)}
<h2>Training curves</h2>{curves}
"""
    style = (
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}td:first-child{text-align:left}tr.avg{background:#eef}img.plot{width:520px;"
        "margin:4px}pre{background:#f6f6f6;padding:8px;font-size:12px}b.right{color:#181}td.left{text-align:left}"
        "table.show td{text-align:left;vertical-align:top;font-size:13px}img.thumb{margin:1px;vertical-align:middle}"
    )
    with atomic_path(out / RESULTS_MARKDOWN) as tmp:
        tmp.write_text(results_markdown(table), encoding="utf-8")
    path = report_path(out)
    with atomic_path(path) as tmp:
        tmp.write_text(page(f"{extras.title} report", body, style), encoding="utf-8")
    return path
