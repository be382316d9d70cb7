"""The demo's report.html: one self-contained page (images inline) of what ran and what came out."""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import time
from pathlib import Path

import torch

from clipcid.balance_inspect import GROUP_STYLE, groups_html
from clipcid.evaluation.run import AVERAGES, main_metric
from clipcid.fileio import atomic_path
from clipcid.plots import new_figure, save_png

MODELS = (("teacher", "teacher"), ("student-clip", "student, CLIP loss only"), ("student-cid", "student, CLIP-CID"))


def _img_tag(png: bytes, alt: str) -> str:
    return f'<img class=plot alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _file_img(path: Path, alt: str) -> str:
    return _img_tag(path.read_bytes(), alt) if path.is_file() else f"<p>({html.escape(alt)}: not found)</p>"


def _loss_curves(run: Path, title: str) -> str:
    log_file = run / "train_log.jsonl"
    if not log_file.is_file():
        return f"<p>no training log in {html.escape(str(run))}</p>"
    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    terms = [k for k in ("clip", "cls", "kl", "ins", "simkd", "fd", "total") if k in rows[-1]]
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


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def write_report(out: Path, timings: dict[str, float], recipe: dict) -> Path:
    out = Path(out)
    results = results_rows(out)
    table = _results_html(results)
    balance_stats = json.loads((out / "balance" / "stats.json").read_text())
    cluster_stats = json.loads((out / "clusters" / "stats.json").read_text())
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
            ("teacher", "teacher (CLIP loss)"),
            ("student-clip", "student, CLIP loss only"),
            ("student-cid", "student, CLIP-CID: every term"),
        )
    )
    body = f"""
<h1>clipcid demo</h1>
<p>CLIP-CID distillation (Yang et al., AAAI 2025) on the offline emoji, flag and icon corpus: a teacher
trained here, then two students of one architecture trained on the same balanced data for the same
steps, one with the CLIP loss alone, one with CLIP-CID's cluster- and instance-level distillation.
All numbers are on held-out styles the corpus does not contain.</p>
<h2>Results (%)</h2>{table}
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
        GROUP_STYLE + "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}td:first-child{text-align:left}tr.avg{background:#eef}img.plot{width:520px;"
        "margin:4px}pre{background:#f6f6f6;padding:8px;font-size:12px}"
    )
    page = (
        f"<!doctype html><html><head><meta charset=utf-8><title>clipcid demo report</title>"
        f"<style>{style}</style></head><body>{body}</body></html>"
    )
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(results_markdown(results), encoding="utf-8")
    path = out / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
