"""The demo's report.html: one self-contained page (images inline) of what ran and what came out."""

from __future__ import annotations

import html
import json
import os
import platform
import time
from pathlib import Path

import torch

from clipcid.balance import artifact as balance_artifact
from clipcid.balance.inspect import groups_html
from clipcid.cluster import artifact as cluster_artifact
from clipcid.distill.objective import TERMS
from clipcid.evaluation.run import AVERAGES, main_metric
from clipcid.util.fileio import atomic_path
from clipcid.util.html import page, png_src
from clipcid.util.plots import new_figure, save_png

MODELS = (("teacher", "teacher"), ("student-clip", "student, CLIP loss only"), ("student-cid", "student, CLIP-CID"))


def _img_tag(png: bytes, alt: str) -> str:
    return f'<img class=plot alt="{html.escape(alt)}" src="{png_src(png)}">'


def _file_img(path: Path, alt: str) -> str:
    return _img_tag(path.read_bytes(), alt) if path.is_file() else f"<p>({html.escape(alt)}: not found)</p>"


def _loss_curves(run: Path, title: str) -> str:
    log_file = run / "train_log.jsonl"
    if not log_file.is_file():
        return f"<p>no training log in {html.escape(str(run))}</p>"
    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    terms = [k for k in (*TERMS, "total") if k in rows[-1]]
    fig, ax = new_figure(6.5, 3.6)
    steps = [r["step"] for r in rows]
    for term in terms:
        ax.plot(steps, [r.get(term) for r in rows], label=term, linewidth=2 if term == "total" else 1)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend(fontsize=8)
    return _img_tag(save_png(fig, dpi=90), title)


def results_rows(out: Path) -> tuple[list[str], list[tuple[str, bool, list[float | None]]]]:
    """(model labels, rows of (task, is_average, value per model)) from OUT/results/NAME/."""
    summaries, records = {}, {}
    for name, _ in MODELS:
        folder = out / "results" / name
        if (folder / "summary.json").is_file():
            summaries[name] = json.loads((folder / "summary.json").read_text())
            records[name] = {
                f.stem: json.loads(f.read_text()) for f in folder.glob("*_*.json") if f.name != "summary.json"
            }
    names = [n for n, _ in MODELS if n in summaries]
    rows = [(label, True, [summaries[n].get(key) for n in names]) for key, label in AVERAGES]
    for task in sorted({t for r in records.values() for t in r}):
        rows.append((task, False, [_main(records[n].get(task)) for n in names]))
    return [label for n, label in MODELS if n in summaries], rows


def _results_html(table: tuple[list[str], list[tuple[str, bool, list[float | None]]]]) -> str:
    labels, rows = table
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    body = []
    for task, is_average, values in rows:
        cells = "".join(f"<td>{_pct(v)}</td>" for v in values)
        name = f"<b>{task}</b>" if is_average else html.escape(task)
        body.append(f"<tr{' class=avg' if is_average else ''}><td>{name}</td>{cells}</tr>")
    return f"<table><tr><th>task</th>{head}</tr>{''.join(body)}</table>"


def results_markdown(table: tuple[list[str], list[tuple[str, bool, list[float | None]]]]) -> str:
    """The results table (from results_rows) in Markdown, as docs/results.md shows it."""
    labels, rows = table
    lines = ["| task (%) | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for task, is_average, values in rows:
        name = f"**{task}**" if is_average else task
        lines.append(f"| {name} | " + " | ".join(_pct(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def _main(record: dict | None) -> float | None:
    return None if record is None else main_metric(record)[1]


def _thumb(png: bytes, frame: str = "#ddd", size: int = 64) -> str:
    return f'<img class=thumb style="border:3px solid {frame};width:{size}px" src="{png_src(png)}">'


def showcase_html(out: Path, suite_root: Path) -> str:
    """The models at work: top-3 zero-shot answers beside held-out pictures, top-5 pictures per query."""
    path = out / "results" / "showcase.json"
    if not path.is_file():
        return ""
    from clipcid.evaluation.datasets import build_dataset
    from clipcid.evaluation.showcase import pictures

    shown = json.loads(path.read_text())
    models = [(n, label) for n, label in MODELS if n in shown]
    if not models:
        return ""
    first = shown[models[0][0]]
    dataset = build_dataset(first["dataset"], suite_root)
    names = dataset.classnames
    wanted = set(first["examples"]) | {i for n, _ in models for row in shown[n]["retrieved"] for i in row}
    images = pictures(dataset, wanted)
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in models)
    rows = []
    for k, index in enumerate(first["examples"]):
        truth = first["targets"][k]
        cells = []
        for n, _ in models:
            answers = []
            for c in shown[n]["top3"][k]:
                name = html.escape(names[c])
                answers.append(f"<b class=right>{name} ✓</b>" if c == truth else name)
            cells.append("<td>" + "<br>".join(answers) + "</td>")
        picture = f"<td>{_thumb(images[index])}<br><small>{html.escape(names[truth])}</small></td>"
        rows.append(f"<tr>{picture}{''.join(cells)}</tr>")
    queries = []
    for q, query in enumerate(first["queries"]):
        want = first["query_targets"][q]
        lines = []
        for n, label in models:
            thumbs = "".join(
                _thumb(images[i], "#2a2" if t == want else "#ccc", 48)
                for i, t in zip(shown[n]["retrieved"][q], shown[n]["retrieved_targets"][q], strict=True)
            )
            lines.append(f"<tr><td>{html.escape(label)}</td><td class=left>{thumbs}</td></tr>")
        queries.append(f"<h4>“{html.escape(query)}”</h4><table>{''.join(lines)}</table>")
    return (
        f"<h2>The models at work</h2><p>Held-out pictures of <code>{html.escape(dataset.name)}</code> "
        f"({len(names):,} classes: zero-shot by name in a style the corpus does not contain). Each model's three "
        "best names per picture, the right one marked ✓:</p>"
        f"<table class=show><tr><th>picture (true name)</th>{head}</tr>{''.join(rows)}</table>"
        f"<p>Text queries against the same {len(names):,} pictures: each model's five best, framed green when "
        f"right.</p>{''.join(queries)}"
    )


def study_html(out: Path) -> str:
    """The study's tables and plot, when OUT/study holds one."""
    folder = out / "study"
    if not (folder / "study.json").is_file():
        return ""
    from clipcid.study import study_tables_html

    study = json.loads((folder / "study.json").read_text())
    return (
        f"<h2>Study: {len(study['runs'])} runs</h2><p>From <code>clipcid study</code> on this demo's artifacts "
        f"(<code>{html.escape(str(folder))}</code>; study.md holds every task). Mean ± standard deviation over "
        "seeds; differences against the reference are paired by seed, with 95 % t intervals (bold: the interval "
        f"excludes zero).</p>{study_tables_html(study)}{_file_img(folder / 'study.png', 'study')}"
    )


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def write_report(out: Path, timings: dict[str, float], recipe: dict) -> Path:
    out = Path(out)
    results = results_rows(out)
    table = _results_html(results)
    balance_stats = balance_artifact.read_stats(out / "balance")
    cluster_stats = cluster_artifact.read_stats(out / "clusters")
    groups, _ = groups_html(str(out / "balance"), str(out / "corpus"), str(out / "teacher_emb"), top=8, per_group=10)
    t = balance_stats["threshold_all_metrics"]
    largest_share = balance_stats["largest_group"] / max(balance_stats["valid"], 1)
    chaining = (
        f" The largest group holds {100 * largest_share:.1f}% of all images: union-find joins neighbours of "
        "neighbours, so in a dense part of the teacher's space a chain of near pairs merges images that are "
        "not alike (see the grids below); a better teacher, or a lower threshold, makes fewer such chains."
        if largest_share > 0.01
        else ""
    )
    machine = (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU")
        + f", torch {torch.__version__}; report written {time.strftime('%Y-%m-%d %H:%M %Z')}"
    )
    timing_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f}</td></tr>" for k, v in timings.items())
    curves = "".join(
        _loss_curves(out / "runs" / run, title)
        for run, title in (
            ("teacher", "teacher (LiT: CLIP loss on the projections, per epoch)"),
            ("student-clip", "student, CLIP loss only"),
            ("student-cid", "student, CLIP-CID: every term"),
        )
    )
    body = f"""
<h1>clipcid demo</h1>
<p>CLIP-CID distillation (Yang et al., AAAI 2025) on the offline emoji, flag and icon corpus: a teacher
made here LiT-style from two pretrained networks (an ImageNet EfficientNet-Lite0 and the MiniLM sentence
encoder, both locked; only their projections learned the corpus), then two small students of one
architecture trained on the same balanced data for the same steps, one with the CLIP loss alone, one
with CLIP-CID's cluster- and instance-level distillation. All numbers are on held-out styles the
corpus does not contain.</p>
<h2>Results (%)</h2>{table}
{showcase_html(out, out / "eval")}
{study_html(out)}
<h2>What ran</h2>
<p>{html.escape(machine)}. Seconds per stage (installs not included); the settings follow.</p>
<table><tr><th>stage</th><th>seconds</th></tr>{timing_rows}
<tr><td><b>total</b></td><td><b>{sum(timings.values()):.1f}</b></td></tr></table>
<pre>{html.escape(json.dumps(recipe, indent=2))}</pre>
<h2>Image Semantic Balance</h2>
<p>threshold {balance_stats["threshold"]:.4g} ({html.escape(balance_stats["metric"])}; l2 {t["l2"]:.4g}, cosine
distance {t["cosine"]:.4g}): kept {balance_stats["kept"]:,} of {balance_stats["valid"]:,} images, removed
{100 * balance_stats["removed_fraction"]:.2f}%; {balance_stats["merged_groups"]:,} merged groups, the largest
{balance_stats["largest_group"]:,}.{chaining}</p>
{_file_img(out / "balance" / "group_sizes.png", "group sizes")}
{_file_img(out / "balance" / "removal_curve.png", "removed fraction against threshold")}
<h3>Largest merged groups (kept image framed green)</h3>{groups}
<h2>Clusters</h2>
<p>k = {cluster_stats["k"]:,} over {cluster_stats["assigned"]:,} kept images; sizes min
{cluster_stats["cluster_size"]["min"]}, median {cluster_stats["cluster_size"]["median"]:.0f}, max
{cluster_stats["cluster_size"]["max"]}; {cluster_stats["empty_clusters"]} empty.</p>
{_file_img(out / "clusters" / "cluster_sizes.png", "cluster sizes")}
<h2>Training curves</h2>{curves}
"""
    style = (
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}td:first-child{text-align:left}tr.avg{background:#eef}img.plot{width:520px;"
        "margin:4px}pre{background:#f6f6f6;padding:8px;font-size:12px}b.right{color:#181}td.left{text-align:left}"
        "table.show td{text-align:left;vertical-align:top;font-size:13px}img.thumb{margin:1px}"
    )
    text = page("clipcid demo report", body, style)
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(results_markdown(results), encoding="utf-8")
    path = out / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
