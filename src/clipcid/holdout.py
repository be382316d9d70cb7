"""`clipcid holdout`: pairs set aside before any model runs, and the folder that records them (written
and read only here).

A row is held out when a hash of its image bytes falls below --fraction: the choice follows the
picture alone, so it does not move when shards are added, renamed or re-keyed, and byte-identical
copies of a picture all fall on the same side. --stratify-by FIELD (a key of each sample's JSON
metadata, or a table column) adds a floor per stratum: a stratum (a source, a style) with fewer rows
below the cut than --min-per-stratum holds out its --min-per-stratum rows of smallest hash instead,
so that a small source is measured too; it takes a first pass of hashes and strata. --group-by FIELD
hashes a metadata value instead of the bytes, so that rows sharing it go together (near-copies of one
picture, whose re-encoded bytes differ: `clipcid data build-web` writes copy_group). Nothing trains
on a held-out row (balance, cluster, distill and lit all take the masks), and balance also drops the
training rows that are near-duplicates of a held-out picture. The held-out pairs whose image decodes
and whose caption is not empty are the retrieval gallery: the --eval-pairs of them with the smallest
hashes (a uniform sample; recall@k depends on the gallery's size, so it is bounded and stated),
written as a CLIP_benchmark retrieval dataset that any model can be evaluated on (`clipcid eval
--dataset wds:OUT/holdout_pairs`).

OUT/mask/holdout_{i}.npy      bool per row of part i (rows as every stage numbers them)
OUT/index/holdout_{i}.npz     the held-out rows of part i: row, hash, usable
OUT/holdout_pairs/            the gallery: test/{j}.tar (image, txt caption, json with part, row, key),
                              dataset_type.txt, pairs.parquet (part, row, key, caption, in dataset order)
OUT/strata.json               --stratify-by: each stratum's rows, cut and held-out rows
OUT/holdout.json              settings, "complete", and the counts

The held-out rows divide into validation and test (`split_held_out`): within each stratum, pictures
ranked by hash alternate between the two, so each stratum is halved and byte-identical copies stay on
one side. The division is a function of the hold-out, not a setting of it: adding it changed no
hold-out's identity, so no training run was invalidated.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from clipcid.config import option, validate
from clipcid.errors import ClipcidError
from clipcid.evaluation.datasets import write_wds_description, write_wds_shard_count
from clipcid.inputs.parts import IMAGE_EXTENSIONS, Part, discover_parts, fingerprint, iter_rows
from clipcid.inputs.shards import DamagedShard, iter_tar_samples, write_tar_atomic
from clipcid.stage import DistEnv, RunFolder, barrier, distributed, identity, parts_of_rank, read_finished
from clipcid.util.fileio import atomic_path, save_json_atomic, save_npy_atomic
from clipcid.util.progress import progress_bar

log = logging.getLogger("clipcid")

SETTINGS_FILE = "holdout.json"
PAIRS = "holdout_pairs"
PAIRS_INDEX = "pairs.parquet"
STRATA_FILE = "strata.json"
GALLERY_SHARDS = 4  # CLIP_benchmark hands a split's shards to 4 loader workers
# Precision of a retrieval figure: at 200 pairs, R@1 near 10 % has a 95 % interval of about ±4 points.
MIN_PAIRS = 200


@dataclass
class HoldoutConfig:
    data: str = option(help="shards (as `clipcid embed --data` takes them)")
    out: str = option(help="output folder: masks per part, the held-out gallery, holdout.json")
    fraction: float = option(0.01, "share of pairs held out, chosen by a hash of the image bytes", at_least=0, below=1)
    min_pairs: int = option(MIN_PAIRS, "refuse a hold-out with fewer usable pairs than this", at_least=0)
    stratify_by: str | None = option(None, "a metadata field (sample JSON key or table column) to stratify by")
    min_per_stratum: int = option(0, "with --stratify-by: hold out at least this many rows of each stratum", at_least=0)
    eval_pairs: int = option(5000, "held-out pairs in the retrieval gallery (those of smallest hash)", at_least=1)
    group_by: str | None = option(
        None, "a metadata field whose equal values are held out together (copies of one picture: copy_group)"
    )
    fit_up_to: float = option(
        0.0,
        "where --fraction holds out fewer than --min-pairs usable pairs, raise the fraction up to this share "
        "instead of refusing (0: refuse; `clipcid run` fits small data up to 0.1 unless --holdout is given)",
        at_least=0,
        below=1,
    )
    rows_per_part: int = option(10000, "table input: rows per part", at_least=1)
    image_column: str | None = option(None, "table input: column holding image paths")
    caption_column: str | None = option(None, "table input: column holding captions")
    overwrite: bool = option(False, "replace what --out holds if it was made with other settings")


RUNTIME_FIELDS = ("out", "overwrite")


def image_hash(image: bytes) -> int:
    """64 bits of BLAKE2b over the image bytes: the row's place in [0, 2^64), uniform over pictures."""
    return int.from_bytes(hashlib.blake2b(image, digest_size=8).digest(), "big")


def row_hash(image: bytes, meta: dict | None, group_by: str | None) -> int:
    """What decides a row's side: the hash of its group (--group-by FIELD: copies of one picture, whose
    bytes differ, go together), or of its image bytes."""
    group = (meta or {}).get(group_by) if group_by else None
    return image_hash(str(group).encode()) if group is not None else image_hash(image)


def cut_of(fraction: float) -> int:
    """Rows whose hash is below this are held out."""
    return int(fraction * 2**64)


def held_out(hash_value: int, fraction: float) -> bool:
    return hash_value < cut_of(fraction)


def stratum_of(meta: dict | None, field: str) -> str:
    value = (meta or {}).get(field)
    return "" if value is None else str(value)


def below(hashes: np.ndarray, cut: int) -> np.ndarray:
    """hashes < cut for uint64 hashes and a cut anywhere in [0, 2^64]."""
    return hashes <= np.uint64(cut - 1) if cut > 0 else np.zeros(len(hashes), dtype=bool)


def stratum_cuts(parts: Iterable[dict[str, np.ndarray]], fraction: float, minimum: int) -> dict[str, int]:
    """Per stratum, the hash below which its rows are held out: the fraction's cut, or just above its
    `minimum`-th smallest hash where the cut would hold out fewer (every row of a stratum that small).
    `parts`: each part's hashes by stratum; what is kept per stratum is a count and its `minimum` smallest
    hashes, so memory does not grow with the rows."""
    cut = cut_of(fraction)
    n_below: dict[str, int] = {}
    smallest: dict[str, np.ndarray] = {}
    for by_stratum in parts:
        for stratum, hashes in by_stratum.items():
            n_below[stratum] = n_below.get(stratum, 0) + int(below(hashes, cut).sum())
            if minimum:
                both = np.concatenate([smallest.get(stratum, hashes[:0]), hashes])
                smallest[stratum] = np.sort(both)[:minimum]
    cuts = {}
    for stratum, n in n_below.items():
        few = smallest.get(stratum)
        cuts[stratum] = int(few[-1]) + 1 if minimum and n < minimum and len(few) else cut
    return cuts


VALIDATION, TEST = "validation", "test"
SPLITS = (VALIDATION, TEST)


def split_held_out(strata: list[str], hashes: list[int]) -> list[str]:
    """The split ("validation" or "test") of each held-out row, from its stratum and its image hash: in
    each stratum the distinct hashes in increasing order alternate validation, test, validation, ... So
    each stratum is halved (validation takes the odd one), the choice follows the pictures (uniform, like
    the hold-out itself), and byte-identical copies of a picture fall on one side."""
    if len(strata) != len(hashes):
        raise ValueError("one stratum per hash")
    ranks: dict[str, dict[int, int]] = {}
    for stratum, h in sorted(set(zip(strata, (int(h) for h in hashes), strict=True))):
        ranked = ranks.setdefault(stratum, {})
        ranked[h] = len(ranked)
    return [SPLITS[ranks[s][int(h)] % 2] for s, h in zip(strata, hashes, strict=True)]


def _usable(image: bytes, caption: str | None) -> bool:
    if not caption or not caption.strip():
        return False
    try:
        with Image.open(io.BytesIO(image)) as im:
            im.convert("RGB")
        return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False


def mask_path(folder: Path, i: int) -> Path:
    return Path(folder) / "mask" / f"holdout_{i}.npy"


def index_path(folder: Path, i: int) -> Path:
    return Path(folder) / "index" / f"holdout_{i}.npz"


def _staging_path(folder: Path, i: int) -> Path:
    return Path(folder) / "staging" / f"part_{i}.tar"


def _ext_of(image: bytes) -> str:
    """The file extension the gallery stores an image under (what it is, not what it was called)."""
    try:
        with Image.open(io.BytesIO(image)) as im:
            kind = (im.format or "png").lower()
    except (UnidentifiedImageError, OSError):
        kind = "png"
    kind = "jpg" if kind == "jpeg" else kind
    return kind if kind in IMAGE_EXTENSIONS else "png"


def _strata_path(folder: Path, i: int) -> Path:
    return Path(folder) / "strata" / f"part_{i}.npz"


def _hash_part(folder: Path, i: int, part: Part, field: str, group_by: str | None) -> None:
    """The first pass of a stratified hold-out: every pictured row's hash (uint64) and its stratum."""
    names: dict[str, int] = {}
    codes, hashes = [], []
    try:
        for row in iter_rows(part, tuple(f for f in (field, group_by) if f)):
            if row.image is not None:
                codes.append(names.setdefault(stratum_of(row.meta, field), len(names)))
                hashes.append(row_hash(row.image, row.meta, group_by))
    except DamagedShard as e:
        log.warning("%s", e)
    with atomic_path(_strata_path(folder, i)) as tmp, open(tmp, "wb") as f:
        np.savez(
            f, names=np.asarray(list(names), dtype=str), code=np.asarray(codes, dtype=np.int32),
            hash=np.asarray(hashes, dtype=np.uint64),
        )  # fmt: skip


def _read_strata(folder: Path, i: int) -> dict[str, np.ndarray]:
    """One part's hashes by stratum, from the first pass."""
    with np.load(_strata_path(folder, i)) as z:
        code, names = z["code"], z["names"]  # each z[...] reads the array from the file again
        order = np.argsort(code, kind="stable")
        bounds = np.searchsorted(code[order], np.arange(len(names) + 1))
        hashes = z["hash"][order]
        return {str(name): hashes[bounds[c] : bounds[c + 1]] for c, name in enumerate(names)}


def _hold_out_part(
    folder: Path, i: int, part: Part, cuts: dict[str, int] | int, field: str | None, group_by: str | None
) -> int:
    """Mask, index and staged samples of one part, mask last (it marks the part done). Returns the rows.
    `cuts`: the hash cut, or the cut per stratum of `field`."""
    mask, rows, hashes, usable, staged = [], [], [], [], []
    try:
        for r, row in enumerate(iter_rows(part, tuple(f for f in (field, group_by) if f))):
            h = row_hash(row.image, row.meta, group_by) if row.image is not None else None
            cut = cuts if isinstance(cuts, int) else cuts[stratum_of(row.meta, field)]
            out = h is not None and h < cut
            mask.append(out)
            if out:
                ok = _usable(row.image, row.caption)
                rows.append(r)
                hashes.append(h)
                usable.append(ok)
                if ok:
                    caption = " ".join(row.caption.split())  # one line: a retrieval sample's txt lists captions
                    staged.append(
                        {
                            "__key__": f"{i:06d}_{r:09d}",
                            _ext_of(row.image): row.image,
                            "txt": caption,
                            "json": {"part": i, "row": r, "key": row.key},
                        }
                    )
    except DamagedShard as e:
        log.warning("%s", e)  # the rows before the damage are whole, as embed keeps them
    write_tar_atomic(_staging_path(folder, i), staged)
    with atomic_path(index_path(folder, i)) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            row=np.asarray(rows, dtype=np.int64),
            hash=np.asarray(hashes, dtype=np.uint64),
            usable=np.asarray(usable, dtype=bool),
        )
    save_npy_atomic(mask_path(folder, i), np.asarray(mask, dtype=bool))
    return len(mask)


def suggested_fraction(fraction: float, usable: int, wanted: int) -> float:
    """The fraction that should give `wanted` usable pairs, from the `usable` that `fraction` gave."""
    per_unit = max(usable, 1) / max(fraction, 1e-12)
    return min(0.5, wanted / per_unit * 1.1)


def hold_out(cfg: HoldoutConfig) -> dict:
    """Mask every part, then assemble the gallery; returns the counts (rank 0)."""
    validate(cfg)
    parts = discover_parts(cfg.data, cfg.rows_per_part, cfg.image_column, cfg.caption_column)
    # Unstratified: the settings of a hold-out made before stratification existed (its folder stays finished).
    unset = ("stratify_by", "min_per_stratum") if cfg.stratify_by is None else ()
    unset += ("fit_up_to",) if not cfg.fit_up_to else ()  # likewise a hold-out made before fitting existed
    unset += ("group_by",) if cfg.group_by is None else ()
    if cfg.min_per_stratum and cfg.stratify_by is None:
        raise ClipcidError("--min-per-stratum needs --stratify-by FIELD (the metadata field of each sample's stratum)")
    settings = {
        **{k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS + unset},
        "data": str(cfg.data),
        "inputs": [fingerprint(p) for p in parts],
    }
    folder = RunFolder(cfg.out, SETTINGS_FILE, settings, cfg.overwrite)
    out = Path(cfg.out)
    done = folder.finished_run(
        lambda: (out / PAIRS / PAIRS_INDEX).is_file() and all(mask_path(out, i).is_file() for i in range(len(parts)))
    )
    if done is not None:
        return done
    with distributed("cpu") as env:
        if env.is_main:
            folder.claim()
        barrier(env)
        try:
            return _hold_out(cfg, env, parts, folder)
        finally:
            folder.release()


FIT_TRIES = 4  # each try aims 10 % above the pairs wanted; hashes are uniform, so one or two suffice


def _hold_out(cfg: HoldoutConfig, env: DistEnv, parts: list[Part], folder: RunFolder) -> dict:
    out = Path(cfg.out)
    fraction, fitted = cfg.fraction, None
    for attempt in range(FIT_TRIES + 1):
        rows, n_held, n_usable, chosen, cuts = _mask_parts(cfg, env, parts, out, fraction)
        if not (cfg.fraction > 0 and n_usable < cfg.min_pairs and fraction < cfg.fit_up_to and attempt < FIT_TRIES):
            break
        # Small data under the default: hold out more, up to --fit-up-to, rather than refuse.
        wider = min(cfg.fit_up_to, max(suggested_fraction(fraction, n_usable, cfg.min_pairs), fraction * 1.25))
        fitted = (
            f"{cfg.fraction:g} held out {n_usable} usable pairs of {rows:,}, fewer than the {cfg.min_pairs} "
            f"retrieval needs: {wider:.3g} instead (the default fits small data, up to {cfg.fit_up_to:g})"
        )
        if env.is_main:
            log.warning("hold-out: %s", fitted)
            for sub in ("mask", "index", "staging"):
                shutil.rmtree(out / sub, ignore_errors=True)
        barrier(env)
        fraction = wider
    if cfg.fraction > 0 and n_usable < cfg.min_pairs:
        barrier(env)
        if env.is_main:
            folder.discard()  # cheap to redo (a small corpus), and another --holdout must not be refused
        better = suggested_fraction(fraction, n_usable, cfg.min_pairs)
        if fitted:
            raise ClipcidError(
                f"even --holdout {fraction:.3g} holds out only {n_usable} usable pairs of {rows:,}, fewer than the "
                f"{cfg.min_pairs} needed to measure retrieval: the data are too small to measure on (--holdout "
                f"{better:.3g} would hold out about {cfg.min_pairs}), or pass --holdout 0 to hold out nothing"
            )
        raise ClipcidError(
            f"--holdout {cfg.fraction:g} holds out {n_usable} usable pairs of {rows:,}, fewer than the {cfg.min_pairs} "
            f"needed to measure retrieval; use --holdout {better:.3g} (about {cfg.min_pairs} pairs), "
            "or --holdout 0 to hold out nothing"
        )
    if cfg.stratify_by and env.is_main:
        _count_strata(out, len(parts), cuts, cfg.stratify_by)
    if env.is_main and not (out / PAIRS / PAIRS_INDEX).is_file():
        _write_gallery(out, chosen)
    barrier(env)
    if not env.is_main:
        return {}
    shutil.rmtree(out / "staging", ignore_errors=True)
    shutil.rmtree(out / "strata", ignore_errors=True)
    gallery = pq.read_metadata(out / PAIRS / PAIRS_INDEX).num_rows
    summary = {
        "rows": rows,
        "held_out": n_held,
        "usable": n_usable,
        "gallery_pairs": gallery,
        "held_out_fraction": n_held / rows if rows else 0.0,
        "fraction": fraction,  # the one used: --fraction, or what fitting small data chose
        **({"fitted": fitted} if fitted else {}),
    }
    log.info(
        "held out %d of %d rows (%.2f%%); %d usable pairs, %d in the retrieval gallery",
        n_held,
        rows,
        100 * summary["held_out_fraction"],
        n_usable,
        gallery,
    )
    return folder.finish(summary)


def _mask_parts(
    cfg: HoldoutConfig, env: DistEnv, parts: list[Part], out: Path, fraction: float
) -> tuple[int, int, int, np.ndarray, dict[str, int] | int]:
    """Mask, index and stage every part at `fraction` (parts already masked are kept: a resumed run).
    Returns the rows, the held-out rows, the usable ones, the gallery's pairs (the `eval_pairs` usable
    held-out pairs of smallest hash, in hash order) and the cut (per stratum, when stratified). Each rank
    reads only its own parts' index: the counts are summed across ranks, and each rank hands on only its
    parts' `eval_pairs` best candidates, so no rank lists every held-out row."""
    for sub in ("mask", "index", "staging"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    cuts: dict[str, int] | int = cut_of(fraction)
    if cfg.stratify_by:
        _hash_strata(cfg, env, parts, out)
        cuts = stratum_cuts((_read_strata(out, i) for i in range(len(parts))), fraction, cfg.min_per_stratum)
    own = parts_of_rank(range(len(parts)), env)
    mine = [i for i in own if not mask_path(out, i).is_file()]
    with progress_bar(len(mine), f"hold out (rank {env.rank})", "part", env.is_main) as bar:
        for i in mine:
            _hold_out_part(out, i, parts[i], cuts, cfg.stratify_by, cfg.group_by)
            bar.update(1)
    counts = np.zeros(3, dtype=np.int64)  # rows, held out, usable
    candidates = np.zeros(0, dtype=CANDIDATE)
    for i in own:
        index = np.load(index_path(out, i))
        counts += [len(np.load(mask_path(out, i), mmap_mode="r")), len(index["row"]), int(index["usable"].sum())]
        usable = index["usable"]
        part = np.zeros(int(usable.sum()), dtype=CANDIDATE)
        part["hash"], part["part"], part["row"] = index["hash"][usable], i, index["row"][usable]
        candidates = _smallest(np.concatenate([candidates, part]), cfg.eval_pairs)
    np.save(_candidates_path(out, env.rank), candidates)  # this rank's best: at most eval_pairs rows
    counts = _summed(env, counts)
    barrier(env)
    chosen = np.zeros(0, dtype=CANDIDATE)
    if env.is_main:
        for rank in range(env.world_size):
            chosen = _smallest(np.concatenate([chosen, np.load(_candidates_path(out, rank))]), cfg.eval_pairs)
    rows, held, usable = (int(c) for c in counts)
    return rows, held, usable, chosen, cuts


# A gallery candidate: a usable held-out pair, ordered by its hash (then part and row: the order is total).
CANDIDATE = np.dtype([("hash", np.uint64), ("part", np.int64), ("row", np.int64)])


def _smallest(candidates: np.ndarray, count: int) -> np.ndarray:
    """The `count` candidates of smallest hash, in hash order."""
    return np.sort(candidates, order=["hash", "part", "row"])[:count]


def _candidates_path(folder: Path, rank: int) -> Path:
    return Path(folder) / "staging" / f"candidates_rank{rank}.npy"


def _summed(env: DistEnv, counts: np.ndarray) -> np.ndarray:
    """Per-rank counts summed over the ranks (on the device: NCCL reduces device tensors only)."""
    if env.world_size == 1:
        return counts
    import torch
    import torch.distributed as dist

    total = torch.from_numpy(counts).to(env.device)
    dist.all_reduce(total)
    return total.cpu().numpy()


def _hash_strata(cfg: HoldoutConfig, env: DistEnv, parts: list[Part], out: Path) -> None:
    """The first pass of a stratified hold-out: hashes by stratum, part by part across ranks."""
    (out / "strata").mkdir(parents=True, exist_ok=True)
    mine = [i for i in parts_of_rank(range(len(parts)), env) if not _strata_path(out, i).is_file()]
    with progress_bar(len(mine), f"hash strata (rank {env.rank})", "part", env.is_main) as bar:
        for i in mine:
            _hash_part(out, i, parts[i], cfg.stratify_by, cfg.group_by)
            bar.update(1)
    barrier(env)


def _count_strata(out: Path, n_parts: int, cuts: dict[str, int], field: str) -> None:
    """OUT/strata.json: per stratum, its pictured rows, its cut and how many are held out."""
    counts = {stratum: {"rows": 0, "held_out": 0, "cut": cut} for stratum, cut in cuts.items()}
    for i in range(n_parts):
        for stratum, hashes in _read_strata(out, i).items():
            counts[stratum]["rows"] += len(hashes)
            counts[stratum]["held_out"] += int(below(hashes, cuts[stratum]).sum())
    save_json_atomic(out / STRATA_FILE, {"field": field, "strata": dict(sorted(counts.items()))})


def _write_gallery(out: Path, chosen: np.ndarray) -> None:
    """The chosen pairs (the usable held-out pairs of smallest hash, in hash order) as a CLIP_benchmark
    retrieval dataset, read from the parts' staged samples."""
    chosen = [(int(c["hash"]), int(c["part"]), int(c["row"])) for c in chosen]
    wanted = {(i, r): n for n, (_, i, r) in enumerate(chosen)}
    samples: list[dict | None] = [None] * len(chosen)
    for i in sorted({i for _, i, _ in chosen}):
        for sample in iter_tar_samples(_staging_path(out, i)):
            meta = json.loads(sample["json"])
            n = wanted.get((meta["part"], meta["row"]))
            if n is not None:
                samples[n] = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
                samples[n]["__meta__"] = meta
    tmp = out / f"{PAIRS}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "test").mkdir(parents=True)
    n_shards = max(1, min(GALLERY_SHARDS, len(samples)))
    for shard in range(n_shards):
        lo, hi = len(samples) * shard // n_shards, len(samples) * (shard + 1) // n_shards
        chunk = [{k: v for k, v in s.items() if k != "__meta__"} for s in samples[lo:hi]]
        write_tar_atomic(tmp / "test" / f"{shard}.tar", chunk)
    write_wds_shard_count(tmp / "test", n_shards)
    write_wds_description(tmp, "retrieval")
    table = pa.table(
        {
            "part": pa.array([s["__meta__"]["part"] for s in samples], pa.int64()),
            "row": pa.array([s["__meta__"]["row"] for s in samples], pa.int64()),
            "key": pa.array([s["__meta__"]["key"] for s in samples], pa.string()),
            "caption": pa.array([s["txt"].decode() if isinstance(s["txt"], bytes) else s["txt"] for s in samples]),
        }
    )
    pq.write_table(table, tmp / PAIRS_INDEX)
    shutil.rmtree(out / PAIRS, ignore_errors=True)
    tmp.rename(out / PAIRS)


def identity_of(folder: str | Path) -> str | None:
    """What a hold-out folder was made from and with (None before it was made)."""
    return identity(Path(folder) / SETTINGS_FILE)


class HoldOut:
    """A finished hold-out folder: the mask of each part, and the gallery of held-out pairs."""

    def __init__(self, folder: Path, record: dict):
        self.folder, self.record = folder, record

    @staticmethod
    def exists(folder: str | Path) -> bool:
        """Whether the folder holds a hold-out (finished or not)."""
        return (Path(folder) / SETTINGS_FILE).is_file()

    @classmethod
    def open(cls, folder: str | Path) -> HoldOut:
        folder = Path(folder)
        if not (folder / SETTINGS_FILE).is_file():
            raise ClipcidError(f"{folder} is not a hold-out folder (no {SETTINGS_FILE}); run `clipcid holdout` first")
        return cls(folder, read_finished(folder / SETTINGS_FILE, "holdout"))

    @property
    def identity(self) -> str | None:
        return identity(self.folder / SETTINGS_FILE)

    @property
    def n_parts(self) -> int:
        return len(self.record["settings"]["inputs"])

    def mask(self, i: int, n_rows: int | None = None) -> np.ndarray:
        """Held-out rows of part i; `n_rows` (the part's rows in the stage asking) is checked."""
        mask = np.load(mask_path(self.folder, i))
        if n_rows is not None and len(mask) != n_rows:
            raise ClipcidError(
                f"hold-out part {i} has {len(mask)} rows but the data asking has {n_rows}: {self.folder} was made "
                "from other shards"
            )
        return mask

    def check_parts(self, n_parts: int) -> None:
        if n_parts != self.n_parts:
            raise ClipcidError(f"the hold-out {self.folder} has {self.n_parts} parts, the data {n_parts}")

    def masks(self, sizes: list[int]) -> np.ndarray:
        """The held-out rows of every part, concatenated (global row numbering)."""
        self.check_parts(len(sizes))
        if not sizes:
            return np.zeros(0, dtype=bool)
        return np.concatenate([self.mask(i, n) for i, n in enumerate(sizes)])

    @property
    def gallery(self) -> Path:
        """The held-out pairs as a CLIP_benchmark retrieval dataset (wds layout)."""
        return self.folder / PAIRS

    def pairs(self) -> pa.Table:
        """(part, row, key, caption) of each gallery pair, in the dataset's order."""
        return pq.read_table(self.gallery / PAIRS_INDEX)

    def strata(self) -> dict | None:
        """{"field", "strata": {stratum: {"rows", "held_out"}}} of a stratified hold-out, else None."""
        path = self.folder / STRATA_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def stats(self) -> dict:
        return {k: v for k, v in self.record.items() if k not in ("settings", "complete")}

    @property
    def stratify_by(self) -> str | None:
        return self.record["settings"].get("stratify_by")

    def split_of(self, rows: list[tuple[dict | None, bytes]]) -> list[str]:
        """The split of each held-out row, given (its metadata, its image bytes): stratified by the field
        this hold-out was stratified by (one stratum when it was not); copies of a picture (--group-by)
        on one side."""
        field, group_by = self.stratify_by, self.record["settings"].get("group_by")
        strata = [stratum_of(meta, field) if field else "" for meta, _ in rows]
        return split_held_out(strata, [row_hash(image, meta, group_by) for meta, image in rows])


def summary_text(stats: dict) -> str:
    return (
        f"held out {stats['held_out']:,} of {stats['rows']:,} rows ({100 * stats['held_out_fraction']:.2f}%); "
        f"{stats['usable']:,} usable pairs, {stats['gallery_pairs']:,} in the retrieval gallery"
    )
