"""`clipcid data build-demo`: the offline training corpus as img2dataset-style webdataset shards.

Layout (as img2dataset writes it): OUT/00000.tar (KEY.png, KEY.txt, KEY.json), OUT/00000.parquet
(one row per planned sample, with its status), OUT/00000_stats.json, plus OUT/build.json (settings and
counts, by stage.py's run folder rule) and OUT/sources.json (per source and style: planned, written, failed).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipcid.config import default_workers, option, validate
from clipcid.corpus import sources as S
from clipcid.corpus.render import RenderError, render_png
from clipcid.errors import ClipcidError
from clipcid.inputs.shards import write_tar_atomic
from clipcid.stage import RunFolder, identity
from clipcid.util.fileio import atomic_path, save_json_atomic
from clipcid.util.tables import format_table, run_pool

SETTINGS_FILE = "build.json"  # the corpus's settings and summary, written last
log = logging.getLogger("clipcid")

DEFAULT_NPM_ROOT = "node_modules"


@dataclass
class BuildDemoConfig:
    out: str = option(help="output folder for the shards")
    image_size: int = option(64, "rendered image size in pixels", at_least=8)
    limit: int | None = option(None, "build only the first N planned samples", at_least=1)
    shard_size: int = option(1000, "samples per shard (keys hold 4 digits for the row)", at_least=1, at_most=10000)
    workers: int = option(help="rendering processes", default_factory=default_workers, at_least=0)
    seed: int = option(0, "seed of the sample order")
    npm_root: str = option(DEFAULT_NPM_ROOT, "where `make sources` installed the npm sets")
    allow_missing: bool = option(False, "build even if some sources are missing")
    overwrite: bool = option(False, "replace what --out holds if it was built with other settings")


@dataclass
class SourceStatus:
    source: str
    style: str
    planned: int = 0
    written: int = 0
    failed: int = 0
    missing: str = ""  # why the source could not be read, if it could not


def _stable_hash(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big")


def clean_name(name: str) -> str:
    # "waving hand: medium skin tone" reads better in a caption as "waving hand, medium skin tone".
    return name.replace(": ", ", ")


def make_caption(art: S.Artwork) -> str:
    """One caption per image, its template picked by a hash of (style, name) so text varies but is
    reproducible."""
    options = caption_options(art)
    return options[_stable_hash(art.style, art.name) % len(options)]


def caption_options(art: S.Artwork) -> list[str]:
    """The captions an artwork may have: templates of its kind around its name."""
    name = clean_name(art.name)
    if art.kind == "flag":
        country = art.name.split(":", 1)[1].strip() if art.name.startswith("flag:") else art.name
        options = [f"the flag of {country}", f"{country} flag", f"a flag of {country}", f"flag: {country}"]
    elif art.kind == "icon":
        options = [f"an icon of {name}", f"{name} icon", name]
        if art.group:
            options.append(f"{art.group.lower()} icon: {name}")
    else:
        options = [name, f"an emoji of {name}", f"{name} emoji"]
        if art.tags:
            options.append(f"{name}, {', '.join(art.tags[:4])}")
        if art.subgroup:
            options.append(f"{art.subgroup.replace('-', ' ')} emoji: {name}")
    return options


def collect_training_artwork(npm_root: Path) -> tuple[list[S.Artwork], dict[tuple[str, str], SourceStatus]]:
    """Read every training source; a source that is not installed is recorded, not skipped silently."""
    status: dict[tuple[str, str], SourceStatus] = {}
    items: list[S.Artwork] = []

    def add(source: str, style: str, read) -> None:
        try:
            got = read()
        except S.SourceMissing as e:
            status[(source, style)] = SourceStatus(source, style, missing=str(e))
            return
        for art in got:
            status.setdefault((art.source, art.style), SourceStatus(art.source, art.style)).planned += 1
        items.extend(got)

    try:
        index = S.EmojiIndex(S.read_unicode_emoji())
    except S.SourceMissing as e:
        raise ClipcidError(f"missing {e}: run `make setup` or apt-get install unicode-data") from e
    add("debian:fonts-noto-color-emoji", "noto-color-emoji-font", lambda: S.read_noto_font(index))
    add("npm:openmoji", "openmoji", lambda: S.read_openmoji(npm_root, index))
    for prefix in S.TRAIN_EMOJI_SETS:
        add(f"npm:@iconify-json/{prefix}", prefix, lambda p=prefix: S.read_iconify_emoji(npm_root, p, index))
    for prefix in S.TRAIN_FLAG_SETS:
        add(f"npm:@iconify-json/{prefix}", prefix, lambda p=prefix: S.read_iconify_flags(npm_root, p, index))
    for prefix in S.TRAIN_ICON_SETS:
        add(f"npm:@iconify-json/{prefix}", prefix, lambda p=prefix: S.read_iconify_icons(npm_root, p))
    return items, status


def _shard_name(shard: int) -> str:
    return f"{shard:05d}"


def _render_training_shard(args: tuple[str, int, int, list[tuple[str, S.Artwork]]]) -> dict:
    out, shard, image_size, planned = args
    samples, rows = [], []
    counts: Counter = Counter()
    failed: Counter = Counter()
    for key, art in planned:
        caption = make_caption(art)
        error = ""
        try:
            png = render_png(art.render, image_size)
        except RenderError as e:
            error = str(e)[:200]
            failed[f"{art.source}|{art.style}"] += 1
        meta = {
            "key": key,
            "caption": caption,
            "source": art.source,
            "style": art.style,
            "kind": art.kind,
            "name": art.name,
            "group": art.group,
            "subgroup": art.subgroup,
            "licence": art.licence,
            "tags": art.tags,
            "codepoints": art.codepoints,
        }
        rows.append(
            {
                **{k: meta[k] for k in ("key", "caption", "source", "style", "kind", "name", "group", "subgroup")},
                "status": "failed_to_render" if error else "success",
                "error_message": error or None,
                "width": None if error else image_size,
                "height": None if error else image_size,
                "sha256": None if error else hashlib.sha256(png).hexdigest(),
            }
        )
        if not error:
            counts[f"{art.source}|{art.style}"] += 1
            samples.append({"__key__": key, "png": png, "txt": caption, "json": meta})
    base = Path(out) / _shard_name(shard)
    write_tar_atomic(f"{base}.tar", samples)
    with atomic_path(f"{base}.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    stats = {
        "count": len(planned),
        "successes": len(samples),
        "failed_to_render": len(planned) - len(samples),
        "written_by_style": dict(counts),
        "failed_by_style": dict(failed),
    }
    # The stats file is written last: its presence marks the shard as finished.
    save_json_atomic(shard_stats_path(out, shard), stats)
    return stats


def shard_stats_path(out: str | Path, shard: int) -> Path:
    """img2dataset's per-shard statistics beside the shard (NNNNN_stats.json), written last: the shard is whole."""
    return Path(out) / f"{_shard_name(shard)}_stats.json"


def _shard_done(out: Path, shard: int) -> bool:
    base = out / _shard_name(shard)
    return (
        Path(f"{base}.tar").is_file() and Path(f"{base}.parquet").is_file() and shard_stats_path(out, shard).is_file()
    )


def plan_training_corpus(items: list[S.Artwork], limit: int | None, seed: int) -> list[S.Artwork]:
    """A fixed order: sorted, then shuffled with `seed`, so every shard mixes sources and styles and
    a --limit slice is a fair sample of the whole."""
    items = sorted(items, key=lambda a: (a.style, a.name, a.codepoints, a.country_code))
    order = np.random.default_rng(seed).permutation(len(items))
    planned = [items[i] for i in order]
    return planned[:limit] if limit is not None else planned


def build_demo_corpus(cfg: BuildDemoConfig) -> dict:
    """Build (or finish building) the training corpus; returns the per-source summary."""
    validate(cfg)
    out = Path(cfg.out)
    settings = {
        "image_size": cfg.image_size,
        "limit": cfg.limit,
        "shard_size": cfg.shard_size,
        "seed": cfg.seed,
    }
    folder = RunFolder(out, SETTINGS_FILE, settings, cfg.overwrite)

    def whole() -> bool:  # a shard deleted or left unfinished since is built again
        shards = (folder.recorded() or {}).get("shards", 0)
        return (out / "sources.json").is_file() and all(_shard_done(out, shard) for shard in range(shards))

    done = folder.finished_run(whole)
    if done is not None:
        return json.loads((out / "sources.json").read_text())
    with folder:
        return _build(cfg, out, folder)


def _build(cfg: BuildDemoConfig, out: Path, folder: RunFolder) -> dict:

    items, status = collect_training_artwork(Path(cfg.npm_root))
    missing = [s for s in status.values() if s.missing]
    if missing and not cfg.allow_missing:
        names = "; ".join(s.missing for s in missing)
        raise ClipcidError(
            f"{len(missing)} corpus source(s) not installed: {names}. Run `make sources`, "
            "or pass --allow-missing to build without them"
        )
    planned = plan_training_corpus(items, cfg.limit, cfg.seed)
    if not planned:
        raise ClipcidError("no artwork found to build the corpus from; run `make sources`")
    folder.update({"planned": len(planned)})

    # img2dataset keys: 5 digits of shard, 4 of row.
    jobs, sizes = [], []
    for shard, start in enumerate(range(0, len(planned), cfg.shard_size)):
        chunk = planned[start : start + cfg.shard_size]
        if _shard_done(out, shard):
            continue
        keyed = [(f"{_shard_name(shard)}{row:04d}", art) for row, art in enumerate(chunk)]
        jobs.append((str(out), shard, cfg.image_size, keyed))
        sizes.append(len(chunk))
    n_shards = (len(planned) + cfg.shard_size - 1) // cfg.shard_size
    if len(jobs) < n_shards:
        log.info("resuming: %d of %d shards already built", n_shards - len(jobs), n_shards)
    for _ in run_pool(_render_training_shard, jobs, cfg.workers, "render", "img", sum(sizes)):
        pass

    # Totals from every shard's stats (including shards built by an earlier, interrupted run).
    for s in status.values():
        s.planned = 0
    for art in planned:
        status[(art.source, art.style)].planned += 1
    for shard in range(n_shards):
        stats = json.loads(shard_stats_path(out, shard).read_text())
        for field_name, attr in (("written_by_style", "written"), ("failed_by_style", "failed")):
            for key, n in stats[field_name].items():
                source, style = key.split("|", 1)
                setattr(status[(source, style)], attr, getattr(status[(source, style)], attr) + n)
    summary = {
        "shards": n_shards,
        "planned": len(planned),
        "written": sum(s.written for s in status.values()),
        "failed": sum(s.failed for s in status.values()),
        "sources": [asdict(s) for s in sorted(status.values(), key=lambda s: (s.source, s.style))],
    }
    save_json_atomic(out / "sources.json", summary)
    folder.finish({k: summary[k] for k in ("shards", "planned", "written", "failed")})
    return summary


def identity_of(folder: str | Path) -> str | None:
    """What a built corpus was made with, for run.json; None before it was built."""
    return identity(Path(folder) / SETTINGS_FILE)


def summary_table(summary: dict) -> str:
    rows = [
        [
            s["source"],
            s["style"],
            s["planned"],
            s["written"],
            s["failed"],
            s["missing"] and "MISSING: " + s["missing"],
        ]
        for s in summary["sources"]
    ]
    rows.append(["total", "", summary["planned"], summary["written"], summary["failed"], ""])
    return format_table(["source", "style", "planned", "written", "failed", "note"], rows)
