"""The embeddings folder, written and read only here: clip-retrieval's layout plus a settings file.

ROOT/img_emb/img_emb_{i}.npy and ROOT/text_emb/text_emb_{i}.npy (one row per input row; zeros where
the row is invalid), ROOT/metadata/metadata_{i}.parquet (clip-retrieval's columns image_path, caption,
key and url where known, then clipcid's shard, row, valid, error), one part per input shard, row j of
part i being row j of shard i, part numbers zero-padded as clip-retrieval pads them; ROOT/embed.json
holds the settings and says "complete": true once every part is written (it is rewritten last). A part
is written under temporary names and renamed, metadata last, so a part with metadata is whole.

Readers memory-map the parts and never load them all. A row is valid when its metadata says so and
both of its vectors are finite. Validity is decided once, when a part is written: a row whose vectors
are not finite is marked invalid there (error "non-finite embedding", vectors zeroed), and embed.json
says so ("validity"), so that no reader reads every vector to find the valid rows. Folders from other
tools (clip-retrieval itself) and older ones have no such promise: their vectors are checked on read.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipcid.errors import ClipcidError
from clipcid.stage import ROW_CHUNK, digest, identity
from clipcid.util.fileio import atomic_path, save_npy_atomic

SETTINGS_FILE = "embed.json"
VALIDITY = "decided-when-written"  # embed.json's promise: the metadata's valid column covers finiteness
NON_FINITE = "non-finite embedding"
KINDS = ("img", "text")
DAMAGED_KEY = b"clipcid.damaged"


def part_label(i: int, n_parts: int) -> str:
    """Part numbers zero-padded as clip-retrieval pads them: int(log10(parts)) + 1 digits."""
    return str(i).zfill(int(math.log10(max(n_parts, 1))) + 1)


def _named(folder: Path, stem: str, i: int, n_parts: int, suffix: str) -> Path:
    """The padded name; an unpadded one already there (written elsewhere, or by an older clipcid) is read."""
    padded = folder / f"{stem}_{part_label(i, n_parts)}{suffix}"
    plain = folder / f"{stem}_{i}{suffix}"
    return plain if not padded.is_file() and plain.is_file() else padded


def vectors_path(root: Path, kind: str, i: int, n_parts: int) -> Path:
    return _named(Path(root) / f"{kind}_emb", f"{kind}_emb", i, n_parts, ".npy")


def metadata_path(root: Path, i: int, n_parts: int) -> Path:
    return _named(Path(root) / "metadata", "metadata", i, n_parts, ".parquet")


def part_done(root: Path, i: int, n_parts: int) -> bool:
    return metadata_path(root, i, n_parts).is_file() and all(vectors_path(root, k, i, n_parts).is_file() for k in KINDS)


def write_part(
    root: Path,
    i: int,
    n_parts: int,
    img: np.ndarray,
    txt: np.ndarray,
    metadata: dict[str, pa.Array],
    damaged: str | None = None,
) -> None:
    """One whole part: vectors first, metadata last (its presence marks the part done). A part of a
    damaged shard holds the samples before the damage, and says so in its metadata file's schema. Rows
    whose vectors are not finite are marked invalid here, once for every reader."""
    finite = np.ones(len(img), dtype=bool)
    for s in range(0, len(img), ROW_CHUNK):
        finite[s : s + ROW_CHUNK] = np.isfinite(img[s : s + ROW_CHUNK]).all(axis=1) & np.isfinite(
            txt[s : s + ROW_CHUNK]
        ).all(axis=1)
    if not finite.all():
        img, txt = img.copy(), txt.copy()
        img[~finite], txt[~finite] = 0, 0
        metadata = dict(metadata)
        valid = np.asarray(metadata["valid"].to_numpy(zero_copy_only=False), dtype=bool)
        metadata["valid"] = pa.array(valid & finite)
        errors = metadata.get("error")
        errors = [None] * len(img) if errors is None else errors.to_pylist()
        metadata["error"] = pa.array(
            [NON_FINITE if v and not f else e for v, f, e in zip(valid, finite, errors, strict=True)], pa.string()
        )
    save_npy_atomic(vectors_path(root, "img", i, n_parts), img)
    save_npy_atomic(vectors_path(root, "text", i, n_parts), txt)
    table = pa.table(metadata)
    if damaged:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), DAMAGED_KEY: damaged.encode()})
    with atomic_path(metadata_path(root, i, n_parts)) as tmp:
        pq.write_table(table, tmp)


def damage_of(root: Path, i: int, n_parts: int) -> str | None:
    """Why part i holds fewer rows than its shard, or None."""
    meta = pq.read_schema(metadata_path(root, i, n_parts)).metadata or {}
    return meta[DAMAGED_KEY].decode() if DAMAGED_KEY in meta else None


def read_record(root: Path) -> dict | None:
    """embed.json: {"settings": ..., "complete": ..., and the run's summary}, or None (another tool's)."""
    f = Path(root) / SETTINGS_FILE
    return json.loads(f.read_text()) if f.is_file() else None


@dataclass
class EmbeddingStore:
    """One kind's vectors (image or text) across the parts, with global row numbering."""

    root: Path
    part_ids: list[int]
    sizes: list[int]
    dim: int
    kind: str = "img"
    folder: Embeddings | None = None  # the folder it belongs to: validity comes from there

    @classmethod
    def open(cls, root: str | Path, kind: str = "img") -> EmbeddingStore:
        return Embeddings.open(root).store(kind)

    @cached_property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    @property
    def total(self) -> int:
        return int(self.offsets[-1])

    @property
    def itemsize(self) -> int:
        """Bytes per stored number (float16 from `clipcid embed`; other tools may store float32)."""
        return int(self.part(self.part_ids[0]).dtype.itemsize) if self.part_ids else 4

    def part(self, i: int) -> np.ndarray:
        cache = self.__dict__.setdefault("_memmaps", {})  # opening a memmap per row read is slow
        if i not in cache:
            cache[i] = np.load(vectors_path(self.root, self.kind, i, len(self.part_ids)), mmap_mode="r")
        return cache[i]

    def valid(self, i: int) -> np.ndarray:
        return self.folder.valid(i)

    def valid_mask(self) -> np.ndarray:
        return self.folder.valid_mask()

    def rows(self, global_rows: np.ndarray) -> np.ndarray:
        """float32 vectors of sorted global rows, read part by part through the memmap (checked: `read`)."""
        out = np.empty((len(global_rows), self.dim), dtype=np.float32)
        part_of = np.searchsorted(self.offsets, global_rows, side="right") - 1
        for p in np.unique(part_of):
            sel = np.flatnonzero(part_of == p)
            out[sel] = self.read(int(p), global_rows[sel] - self.offsets[p])
        return out

    def read(self, i: int, local_rows: np.ndarray | None = None) -> np.ndarray:
        """Part i's vectors (its rows `local_rows`, or all) in the stored dtype, checked as they are read:
        a row recorded valid whose vector is not finite means the file changed after embed wrote it, and is
        refused in one line (one vectorised isfinite on the block read: no pass of its own)."""
        block = np.asarray(self.part(i) if local_rows is None else self.part(i)[local_rows])
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            rows = np.flatnonzero(~finite) if local_rows is None else np.asarray(local_rows)[~finite]
            self.refuse_changed(i, rows)
        return block

    def pairs(self, parts: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The vectors of (part, row) pairs in their order, checked as `read` checks them."""
        block = np.stack([self.part(int(p))[r] for p, r in zip(parts, rows, strict=True)])
        finite = np.isfinite(block).all(axis=1)
        for p in np.unique(np.asarray(parts)[~finite]):
            self.refuse_changed(int(p), np.asarray(rows)[~finite & (np.asarray(parts) == p)])
        return block

    def refuse_changed(self, i: int, rows: np.ndarray) -> None:
        """Non-finite rows were read from part i: an error where embed recorded any of them valid (rows it
        found non-finite are marked invalid and zeroed; another tool's folder had them found on open)."""
        recorded_valid = self.valid(i)[rows] if self.folder is not None else np.ones(len(rows), bool)
        if recorded_valid.any():
            bad = np.asarray(rows)[recorded_valid]
            raise ClipcidError(
                f"{vectors_path(self.root, self.kind, i, len(self.part_ids))}: {len(bad)} row(s) that embed recorded "
                f"valid are not finite (row {int(bad[0])} first): the file changed after embed wrote it; embed "
                "again (another --out, or --overwrite)"
            )

    def split_global(self, global_rows: np.ndarray) -> list[np.ndarray]:
        """Per part, the local row numbers of the given global rows."""
        part_of = np.searchsorted(self.offsets, global_rows, side="right") - 1
        return [global_rows[part_of == p] - self.offsets[p] for p in self.part_ids]


class Embeddings:
    """An embeddings folder, checked once on open: complete, parts contiguous and of one width per kind,
    metadata and vectors of the same length."""

    def __init__(
        self, root: Path, settings: dict | None, stores: dict[str, EmbeddingStore], validity_decided: bool = False
    ):
        self.root, self.settings, self._stores = root, settings, stores
        self.validity_decided = validity_decided  # the metadata's valid column covers finiteness
        self._valid: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, root: str | Path) -> Embeddings:
        root = Path(root)
        if not root.is_dir():
            raise ClipcidError(f"embeddings folder not found: {root}")
        record = read_record(root)
        settings = None if record is None else record.get("settings", record)
        if record is not None and not record.get("complete", False):
            parts = settings.get("parts", 0)
            done = sum(part_done(root, i, parts) for i in range(parts))
            raise ClipcidError(
                f"{root} is an unfinished embed run ({done} of {parts} parts written); "
                "run the same `clipcid embed` again to finish it"
            )
        stores = {}
        for kind in KINDS:
            if kind == "img" or (root / f"{kind}_emb").is_dir():  # image-only folders are clip-retrieval's too
                part_ids, sizes, dims = _scan(root, kind)
                stores[kind] = EmbeddingStore(root, part_ids, sizes, dims, kind)
        img, txt = stores["img"], stores.get("text")
        if txt is not None and (img.part_ids != txt.part_ids or img.sizes != txt.sizes):
            raise ClipcidError(f"{root}: img_emb and text_emb hold different parts or row counts")
        if settings is not None and settings.get("parts") not in (None, len(img.part_ids)):
            raise ClipcidError(f"{root}: embed.json names {settings['parts']} parts but {len(img.part_ids)} are there")
        folder = cls(root, settings, stores, record is not None and record.get("validity") == VALIDITY)
        for store in stores.values():
            store.folder = folder
        return folder

    @property
    def identity(self) -> str:
        """What the vectors were made from and with (embed.json's settings); for another tool's folder,
        its parts' sizes and modification times."""
        own = identity(self.root / SETTINGS_FILE)
        if own is not None:
            return own
        files = [f for kind in self._stores for f in sorted((self.root / f"{kind}_emb").glob("*.npy"))]
        return digest([[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files])

    def store(self, kind: str) -> EmbeddingStore:
        if kind not in self._stores:
            raise ClipcidError(f"{self.root} has no {kind} embeddings ({kind}_emb/); `clipcid embed` writes both")
        return self._stores[kind]

    @property
    def images(self) -> EmbeddingStore:
        return self._stores["img"]

    @property
    def texts(self) -> EmbeddingStore:
        return self.store("text")

    @property
    def part_ids(self) -> list[int]:
        return self.images.part_ids

    @property
    def n_parts(self) -> int:
        return len(self.images.part_ids)

    def damage_of(self, i: int) -> str | None:
        return damage_of(self.root, i, self.n_parts)

    @property
    def sizes(self) -> list[int]:
        return self.images.sizes

    def metadata(self, i: int, columns: list[str] | None = None) -> pa.Table:
        path = metadata_path(self.root, i, self.n_parts)
        if not path.is_file():
            raise ClipcidError(f"{self.root}: part {i} has no metadata ({path.name}); the folder is incomplete")
        return pq.read_table(path, columns=columns)

    def keys(self, i: int) -> pa.StringArray:
        """Part i's sample keys as an Arrow string array: an offset table over one buffer (about 4 bytes a
        row beside the keys themselves), not a Python object per row."""
        return self.metadata(i, ["key"]).column("key").combine_chunks()

    def valid(self, i: int) -> np.ndarray:
        """Rows with a real pair of vectors: marked valid, and finite in both kinds (NaN/inf rows from a
        broken producer count as invalid)."""
        if i not in self._valid:
            n = self.sizes[i]
            if metadata_path(self.root, i, self.n_parts).is_file():
                marked = self.metadata(i, ["valid"]).column("valid").to_numpy(zero_copy_only=False).astype(bool)
                if len(marked) != n:
                    raise ClipcidError(
                        f"{metadata_path(self.root, i, self.n_parts)} has {len(marked)} rows but part {i} has {n}"
                    )
            else:
                marked = np.ones(n, dtype=bool)
            finite = np.ones(n, dtype=bool)
            for store in () if self.validity_decided else self._stores.values():
                part = store.part(i)
                for s in range(0, n, ROW_CHUNK):
                    finite[s : s + ROW_CHUNK] &= np.isfinite(part[s : s + ROW_CHUNK]).all(axis=1)
            self._valid[i] = marked & finite
        return self._valid[i]

    def valid_mask(self) -> np.ndarray:
        return np.concatenate([self.valid(i) for i in self.part_ids]) if self.part_ids else np.zeros(0, bool)

    def non_finite_rows(self) -> int:
        """Rows whose vectors are not finite (counted, and treated as invalid)."""
        count = 0
        if self.validity_decided:
            for i in self.part_ids:
                if "error" in pq.read_schema(metadata_path(self.root, i, self.n_parts)).names:
                    errors = self.metadata(i, ["error"]).column("error").to_pylist()
                    count += sum(e == NON_FINITE for e in errors)
            return count
        for i in self.part_ids:
            if metadata_path(self.root, i, self.n_parts).is_file():
                marked = self.metadata(i, ["valid"]).column("valid").to_numpy(zero_copy_only=False).astype(bool)
                count += int((marked & ~self.valid(i)).sum())
        return count


def _scan(root: Path, kind: str) -> tuple[list[int], list[int], int]:
    folder = root / f"{kind}_emb"
    if not folder.is_dir():
        raise ClipcidError(f"no {kind}_emb/ folder in {root}: not an embeddings folder (run `clipcid embed`)")
    pattern = re.compile(rf"{kind}_emb_(\d+)\.npy$")
    part_ids = sorted(int(m.group(1)) for f in folder.iterdir() if (m := pattern.match(f.name)))
    if not part_ids:
        raise ClipcidError(f"{folder} holds no {kind}_emb_N.npy parts")
    if part_ids != list(range(len(part_ids))):
        missing = sorted(set(range(max(part_ids) + 1)) - set(part_ids))
        raise ClipcidError(f"{folder}: part(s) {missing[:5]} missing; finish `clipcid embed` first")
    sizes, dims = [], set()
    for i in part_ids:
        path = vectors_path(root, kind, i, len(part_ids))
        arr = np.load(path, mmap_mode="r")
        if arr.ndim != 2:
            raise ClipcidError(f"{path} is not a 2-D array")
        sizes.append(arr.shape[0])
        dims.add(arr.shape[1])
    if len(dims) > 1:
        raise ClipcidError(f"{folder}: parts have different dimensions {sorted(dims)}; they must all be one model's")
    return part_ids, sizes, dims.pop()
