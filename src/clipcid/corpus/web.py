"""`clipcid data build-web`: a corpus with near-copies as web data has them, where Image Semantic
Balance can do what the paper says it does.

The demo corpus draws one picture in many styles: its near-duplicates are style variants, which teach
invariance. Web data repeat one picture: re-uploads, re-encoded, rescaled, cropped, framed or stamped,
each with a caption of its own (SemDeDup removed half of LAION-440M with little loss). This builder
takes a built corpus (the demo's) as the originals and gives each picture a number of near-copies drawn
from a Zipf law, P(n copies) ∝ (n + 1)^-a for n = 0 ... --max-copies, with the exponent a solved so that
the expected share of rows that are copies is --copy-share (default 43.7 %, the share the paper's balance
removed). A copy is the original re-encoded as JPEG (quality 30-95), rescaled (50-100 %), cropped by up to
10 %, given a border or a small text stamp (or neither), and captioned another way: another template of
its kind, words dropped or added, or its name alone. Originals and copies are shuffled together.

Each row's JSON metadata is its source row's plus "copy_group" (the source key of its original: the same
for the original and every copy of it) and, for a copy, "copy_of" (that key) and "edit" (what was done).
`clipcid holdout --group-by copy_group` holds out a picture with all its copies (their bytes differ,
so their hashes do too). --exclude-holdout leaves out the source's held-out rows, so that a suite built
from that hold-out (the demo's seen tasks) stays unseen by anything trained on this corpus, and
--exclude-unbalanced a balance of the source made with that hold-out also leaves out the near-copies
of held-out pictures it kept out of balancing (the same emoji in other styles), as the demo's own
training data do.

Layout as build-demo writes it (img2dataset): OUT/00000.tar (KEY.png or KEY.jpg, KEY.txt, KEY.json),
OUT/00000_stats.json, and OUT/web.json (settings, counts and the exponent, by stage.py's rule).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from clipcid.config import default_workers, option, validate
from clipcid.corpus import sources as S
from clipcid.corpus.build import caption_options, clean_name, shard_stats_path
from clipcid.errors import ClipcidError
from clipcid.inputs.shards import write_tar_atomic
from clipcid.stage import RunFolder
from clipcid.util.fileio import save_json_atomic
from clipcid.util.tables import markdown_table, run_pool

log = logging.getLogger("clipcid")

SETTINGS_FILE = "web.json"
GROUP_FIELD = "copy_group"  # the field `clipcid holdout --group-by` takes for this corpus
WEB_WORDS = ["free", "download", "png", "hd", "high quality", "clipart", "vector", "stock image", "transparent"]
STAMPS = ["sample", "preview", "(c)", "stock", "www", "free", "hd"]


@dataclass
class BuildWebConfig:
    source: str = option(help="a built corpus (clipcid data build-demo): its pictures are the originals")
    out: str = option(help="output folder of the web-like corpus")
    copy_share: float = option(0.437, "expected share of rows that are copies (the paper's balance removed 43.7 %)",
                               above=0, below=0.95)  # fmt: skip
    max_copies: int = option(50, "most copies of one picture (where the Zipf tail is cut)", at_least=1)
    limit: int | None = option(None, "originals: the first N rows of the source (after --exclude-holdout)", at_least=1)
    exclude_holdout: str | None = option(None, "a hold-out of --source: its rows are left out of this corpus")
    exclude_unbalanced: str | None = option(
        None,
        "a balance of --source made with that hold-out: the rows it left out of balancing (held-out pictures "
        "and their near-duplicates, e.g. the same emoji in other styles) are left out too",
    )
    shard_size: int = option(1000, "samples per shard", at_least=1, at_most=10000)
    seed: int = option(0, "seed of the copies and of the order")
    workers: int = option(help="processes making copies", default_factory=default_workers, at_least=0)
    overwrite: bool = option(False, "replace what --out holds if it was built with other settings")


def copies_law(copy_share: float, max_copies: int) -> tuple[float, np.ndarray]:
    """The Zipf exponent a whose truncated law P(n) ∝ (n + 1)^-a on 0 ... max_copies has expected
    copies / (1 + copies) = copy_share, and that law's probabilities."""
    from scipy.optimize import brentq

    n = np.arange(max_copies + 1, dtype=np.float64)
    wanted = copy_share / (1 - copy_share)  # expected copies per original

    def law(a: float) -> np.ndarray:
        p = (n + 1) ** -a
        return p / p.sum()

    if float(law(1e-6) @ n) < wanted:
        raise ClipcidError(
            f"--copy-share {copy_share:g} needs more than {max_copies} copies of a picture on average; "
            "raise --max-copies"
        )
    a = brentq(lambda a: float(law(a) @ n) - wanted, 1e-6, 50.0)
    return float(a), law(a)


def near_copy(image: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """A web re-upload of a picture: cropped (up to 10 %), rescaled, framed or stamped, re-encoded as
    JPEG; returns the bytes and what was done."""
    im = Image.open(io.BytesIO(image)).convert("RGB")
    edits = []
    if rng.random() < 0.7:
        cut = rng.uniform(0.02, 0.10)
        w, h = im.size
        left, top = int(w * cut * rng.random()), int(h * cut * rng.random())
        im = im.crop((left, top, left + max(8, round(w * (1 - cut))), top + max(8, round(h * (1 - cut)))))
        edits.append(f"crop {cut:.0%}")
    scale = rng.uniform(0.5, 1.0)
    im = im.resize((max(8, round(im.width * scale)), max(8, round(im.height * scale))), Image.Resampling.BILINEAR)
    edits.append(f"scale {scale:.2f}")
    mark = rng.random()
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    if mark < 0.3:
        im = ImageOps.expand(im, border=max(1, round(0.05 * im.width)), fill=colour)
        edits.append("border")
    elif mark < 0.6:
        ImageDraw.Draw(im).text((1, max(0, im.height - 11)), str(rng.choice(STAMPS)), fill=colour)
        edits.append("stamp")
    quality = int(rng.integers(30, 96))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    edits.append(f"jpeg q{quality}")
    return buf.getvalue(), ", ".join(edits)


def copy_caption(caption: str, meta: dict, rng: np.random.Generator) -> str:
    """Another caption of the same picture: another template of its kind, words dropped or added, or its
    name alone."""
    how = rng.integers(4)
    words = caption.split()
    if how == 0 and meta.get("kind") and meta.get("name"):
        art = S.Artwork(
            meta.get("source", ""), meta.get("style", ""), meta["kind"], meta["name"], meta.get("group", ""),
            meta.get("subgroup", ""), "", ("", ""), list(meta.get("tags") or []),
        )  # fmt: skip
        others = [c for c in caption_options(art) if c != caption]
        if others:
            return str(rng.choice(others))
    if how == 1 and len(words) > 2:
        drop = set(rng.choice(len(words), size=int(rng.integers(1, min(3, len(words) - 1) + 1)), replace=False))
        return " ".join(w for i, w in enumerate(words) if i not in drop)
    if how == 3 and meta.get("name"):
        return clean_name(meta["name"])
    extra = str(rng.choice(WEB_WORDS))
    return f"{caption} {extra}" if rng.random() < 0.5 else f"{extra} {caption}"


def _write_shard(job: tuple[str, int, list[tuple[str, dict]]]) -> dict:
    """One shard: each planned row is an original (its source sample) or a copy made here."""
    out, shard, planned = job
    samples, copies = [], 0
    for key, row in planned:
        meta = {**row["meta"], GROUP_FIELD: row["group"]}
        image, caption, ext = row["image"], row["caption"], row["ext"]
        if row["copy"] is not None:
            rng = np.random.default_rng(row["copy"])
            image, edit = near_copy(image, rng)
            caption, ext = copy_caption(caption, row["meta"], rng), "jpg"
            meta.update(copy_of=row["group"], edit=edit)
            copies += 1
        samples.append({"__key__": key, ext: image, "txt": caption, "json": meta})
    write_tar_atomic(Path(out) / f"{shard:05d}.tar", samples)
    stats = {"count": len(planned), "successes": len(samples), "copies": copies}
    save_json_atomic(shard_stats_path(out, shard), stats)  # last: the shard is whole
    return stats


def _shard_done(out: Path, shard: int) -> bool:
    return (out / f"{shard:05d}.tar").is_file() and shard_stats_path(out, shard).is_file()


def build_web_corpus(cfg: BuildWebConfig) -> dict:
    """Build (or finish building) the web-like corpus; returns its counts."""
    from clipcid.balance.artifact import identity_of as balance_identity
    from clipcid.holdout import HoldOut
    from clipcid.inputs.parts import discover_parts, fingerprint

    validate(cfg)
    parts = discover_parts(cfg.source)
    holdout = HoldOut.open(cfg.exclude_holdout) if cfg.exclude_holdout else None
    if holdout is not None:
        holdout.check_parts(len(parts))
    exponent, law = copies_law(cfg.copy_share, cfg.max_copies)
    settings = {
        "source": [fingerprint(p) for p in parts],
        "exclude_holdout": holdout.identity if holdout else None,
        "exclude_unbalanced": balance_identity(cfg.exclude_unbalanced) if cfg.exclude_unbalanced else None,
        **{k: getattr(cfg, k) for k in ("copy_share", "max_copies", "limit", "shard_size", "seed")},
    }
    out = Path(cfg.out)
    folder = RunFolder(out, SETTINGS_FILE, settings, cfg.overwrite)
    done = folder.finished_run(lambda: all(_shard_done(out, s) for s in range(folder.recorded().get("shards", 0))))
    if done is not None:
        return done
    with folder:
        originals = _originals(parts, holdout, cfg.exclude_unbalanced, cfg.limit)
        rng = np.random.default_rng(cfg.seed)
        n_copies = rng.choice(len(law), size=len(originals), p=law)
        rows = [(i, None) for i in range(len(originals))]
        rows += [(i, (cfg.seed, i, c)) for i in range(len(originals)) for c in range(int(n_copies[i]))]
        order = rng.permutation(len(rows))  # copies scattered among the originals, as on the web
        jobs = []
        for shard, start in enumerate(range(0, len(rows), cfg.shard_size)):
            if _shard_done(out, shard):
                continue
            planned = []
            for r, index in enumerate(order[start : start + cfg.shard_size]):
                i, copy = rows[index]
                planned.append((f"{shard:05d}{r:04d}", {**originals[i], "copy": copy}))
            jobs.append((str(out), shard, planned))
        n_shards = (len(rows) + cfg.shard_size - 1) // cfg.shard_size
        for _ in run_pool(_write_shard, jobs, cfg.workers, "web copies", "row", sum(len(j[2]) for j in jobs)):
            pass
        copies = len(rows) - len(originals)
        summary = {
            "shards": n_shards,
            "originals": len(originals),
            "copies": copies,
            "rows": len(rows),
            "copy_share": copies / len(rows),
            "zipf_exponent": exponent,
            "pictures_with_copies": int((n_copies > 0).sum()),
            "most_copies": int(n_copies.max()),
        }
        log.info(
            "web-like corpus: %d originals, %d copies (%.1f %% of %d rows; Zipf exponent %.3f, at most %d copies)",
            len(originals), copies, 100 * summary["copy_share"], len(rows), exponent, summary["most_copies"],
        )  # fmt: skip
        return folder.finish(summary)


def _originals(parts, holdout, unbalanced: str | None, limit: int | None) -> list[dict]:
    """The source's rows with an image and a caption (less its held-out rows, and those a balance left
    out of balancing), up to `limit`."""
    from clipcid.balance.artifact import balanced_rows
    from clipcid.inputs.parts import iter_rows

    found = []
    for i, part in enumerate(parts):
        rows = list(iter_rows(part))
        mask = holdout.mask(i, len(rows)) if holdout is not None else np.zeros(len(rows), dtype=bool)
        if unbalanced:
            balanced = balanced_rows(unbalanced, i)
            if len(balanced) != len(rows):
                raise ClipcidError(
                    f"--exclude-unbalanced {unbalanced}: part {i} has {len(balanced)} rows, the source {len(rows)}"
                )
            mask = mask | ~balanced
        for r, row in enumerate(rows):
            if mask[r] or row.image is None or not (row.caption or "").strip():
                continue
            ext = "jpg" if row.image[:3] == b"\xff\xd8\xff" else "png"
            meta = dict(row.meta or {})
            found.append({"image": row.image, "caption": row.caption, "ext": ext, "meta": meta, "group": row.key})
            if limit is not None and len(found) >= limit:
                return found
    if not found:
        raise ClipcidError(f"--source {parts[0].path if parts else ''}: no row with an image and a caption to copy")
    return found


def read_web_summary(folder: str | Path) -> dict | None:
    """The counts of a finished web-like corpus (web.json), or None."""
    path = Path(folder) / SETTINGS_FILE
    record = json.loads(path.read_text()) if path.is_file() else None
    return record if record and record.get("complete") else None


def summary_text(stats: dict) -> str:
    return (
        f"{stats['originals']:,} originals and {stats['copies']:,} near-copies ({100 * stats['copy_share']:.1f} % of "
        f"{stats['rows']:,} rows; Zipf exponent {stats['zipf_exponent']:.3f}, at most {stats['most_copies']} copies "
        f"of one picture) in {stats['shards']} shards"
    )


# -- how well a removal finds the copies ---------------------------------------------------------------


def copy_groups(corpus: str | Path) -> list[str]:
    """Each row's copy group, in the order every stage numbers the rows (a row without one is its own)."""
    from clipcid.inputs.parts import discover_parts, iter_rows

    return [
        str((row.meta or {}).get(GROUP_FIELD, f"\x00{i}:{row.key}"))
        for i, part in enumerate(discover_parts(str(corpus)))
        for row in iter_rows(part, (GROUP_FIELD,))
    ]


def copy_detection(groups: list[str], removed: np.ndarray) -> dict:
    """How well a removal finds the copies. The rows that may go are all but one of each picture's group
    (its copies count); a removed row is right while its group keeps a row, so a group that lost every
    row counts one mistake. Precision: right removals / removals; recall: right removals / rows that may
    go. A removed row of a picture without copies is a mistake here even where it is a near-duplicate of
    another source picture (an emoji's skin tones, one icon in two sets): the metadata cannot tell those
    apart, so precision is a lower bound, and `removed_without_copies` says how many there were."""
    removed = np.asarray(removed, dtype=bool)
    if len(removed) != len(groups):
        raise ClipcidError(f"the removal covers {len(removed)} rows, the corpus has {len(groups)}")
    _, inverse, sizes = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True, return_counts=True)
    gone = np.bincount(inverse, weights=removed, minlength=len(sizes)).astype(np.int64)
    right = int(np.minimum(gone, sizes - 1).sum())
    may_go, n_removed = int((sizes - 1).sum()), int(removed.sum())
    return {
        "removed": n_removed,
        "copies": may_go,
        "right": right,
        "precision": right / n_removed if n_removed else None,
        "recall": right / may_go if may_go else None,
        "pictures_lost": int(((gone == sizes) & (sizes > 0)).sum()),
        "removed_without_copies": int(gone[sizes == 1].sum()),
    }


@dataclass
class WebCheckConfig:
    corpus: str = option(help="a web-like corpus (clipcid data build-web)")
    emb: str = option(help="the teacher's embeddings of it (clipcid embed)")
    out: str = option(help="folder for the balance runs, web_check.json and web_check.md")
    seed: int = option(0, "seed of the random removals")
    device: str = option("auto", "auto, cpu or cuda")


# The paper's "Euclidean distance 0.07" read both ways (unit vectors): |a - b| < 0.07 is cos > 0.99755,
# |a - b|^2 < 0.07 is cos > 0.965.
PAPER_READINGS = (("l2", 0.07), ("sql2", 0.07))


def check_web_balance(cfg: WebCheckConfig) -> dict:
    """Balance's precision and recall at finding the copies, at three thresholds (the one that removes the
    copy share, and 0.07 in both readings of the paper's distance), against random removal of the same
    counts; written to OUT/web_check.json and .md."""
    from clipcid.balance import BalanceConfig, balance
    from clipcid.balance.artifact import BalanceResult
    from clipcid.balance.run import to_similarity
    from clipcid.embed.artifact import Embeddings

    validate(cfg)
    built = read_web_summary(cfg.corpus)
    if built is None:
        raise ClipcidError(f"--corpus {cfg.corpus} is not a finished web-like corpus: run `clipcid data build-web`")
    groups = copy_groups(cfg.corpus)
    embeddings = Embeddings.open(cfg.emb)
    sizes = embeddings.sizes
    if sum(sizes) != len(groups):
        raise ClipcidError(f"--emb {cfg.emb} has {sum(sizes)} rows, --corpus {len(groups)}: embed this corpus")
    out = Path(cfg.out)
    settings = {
        "copy share": {"target_removal": built["copy_share"]},
        **{f"0.07 {metric}": {"threshold": t, "metric": metric} for metric, t in PAPER_READINGS},
    }
    rows = []
    for name, spec in settings.items():
        folder = out / f"balance-{name.replace(' ', '-')}"
        stats = balance(BalanceConfig(emb=cfg.emb, out=str(folder), seed=cfg.seed, device=cfg.device, **spec))
        removed = ~BalanceResult.open(folder, embeddings).keep_mask()
        share = float(removed.mean())
        random_folder = out / f"random-{name.replace(' ', '-')}"
        balance(BalanceConfig(emb=cfg.emb, out=str(random_folder), random_removal=share, seed=cfg.seed))
        random_removed = ~BalanceResult.open(random_folder, embeddings).keep_mask()
        metric = spec.get("metric", "l2")
        rows.append(
            {
                "threshold": name,
                "cos_above": to_similarity(stats.get("threshold", spec.get("threshold")), metric),
                "balance": copy_detection(groups, removed),
                "random": copy_detection(groups, random_removed),
            }
        )
    result = {"corpus": built, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    save_json_atomic(out / "web_check.json", result)
    (out / "web_check.md").write_text(web_check_markdown(result), encoding="utf-8")
    return result


def web_check_markdown(result: dict) -> str:
    c = result["corpus"]
    lines = [
        f"Copies found on a web-like corpus of {c['rows']:,} rows ({c['originals']:,} pictures, "
        f"{c['copies']:,} copies: {100 * c['copy_share']:.1f} %):",
        "",
    ]
    head = ["threshold", "cos above", "removed", "balance precision", "balance recall", "random precision",
            "random recall", "removed without copies (balance)"]  # fmt: skip
    rows = []
    for r in result["rows"]:
        b, x = r["balance"], r["random"]
        rows.append([
            str(r["threshold"]), f"{r['cos_above']:.4f}", f"{b['removed']:,}", f"{100 * (b['precision'] or 0):.1f}",
            f"{100 * (b['recall'] or 0):.1f}", f"{100 * (x['precision'] or 0):.1f}", f"{100 * (x['recall'] or 0):.1f}",
            f"{b['removed_without_copies']:,}",
        ])  # fmt: skip
    return "\n".join(lines + markdown_table(head, rows)) + "\n"
