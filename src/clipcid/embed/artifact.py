"""Read teacher embeddings in clip-retrieval's layout without loading them all: memmapped parts,
a validity mask per part, and global row numbering (part offset + row)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from clipcid.errors import ClipcidError


@dataclass
class EmbeddingStore:
    root: Path
    part_ids: list[int]
    sizes: list[int]
    dim: int
    kind: str = "img"  # "img" or "text"

    @classmethod
    def open(cls, root: str | Path, kind: str = "img") -> EmbeddingStore:
        root = Path(root)
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
            arr = np.load(folder / f"{kind}_emb_{i}.npy", mmap_mode="r")
            if arr.ndim != 2:
                raise ClipcidError(f"{folder}/{kind}_emb_{i}.npy is not a 2-D array")
            sizes.append(arr.shape[0])
            dims.add(arr.shape[1])
        if len(dims) > 1:
            raise ClipcidError(
                f"{folder}: parts have different dimensions {sorted(dims)}; they must all be one model's"
            )
        return cls(root, part_ids, sizes, dims.pop(), kind)

    @cached_property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    @property
    def total(self) -> int:
        return int(self.offsets[-1])

    def part(self, i: int) -> np.ndarray:
        cache = self.__dict__.setdefault("_memmaps", {})  # opening a memmap per row read is slow
        if i not in cache:
            cache[i] = np.load(self.root / f"{self.kind}_emb" / f"{self.kind}_emb_{i}.npy", mmap_mode="r")
        return cache[i]

    def valid(self, i: int) -> np.ndarray:
        """Rows that hold a real embedding; all rows when the part has no metadata."""
        meta = self.root / "metadata" / f"metadata_{i}.parquet"
        if not meta.is_file():
            return np.ones(self.sizes[i], dtype=bool)
        valid = pq.read_table(meta, columns=["valid"]).column("valid").to_numpy(zero_copy_only=False)
        if len(valid) != self.sizes[i]:
            raise ClipcidError(f"{meta} has {len(valid)} rows but part {i} has {self.sizes[i]} embeddings")
        return valid.astype(bool)

    def valid_mask(self) -> np.ndarray:
        return np.concatenate([self.valid(i) for i in self.part_ids]) if self.part_ids else np.zeros(0, bool)

    def rows(self, global_rows: np.ndarray) -> np.ndarray:
        """float32 embeddings of sorted global rows, read part by part through the memmap."""
        out = np.empty((len(global_rows), self.dim), dtype=np.float32)
        part_of = np.searchsorted(self.offsets, global_rows, side="right") - 1
        for p in np.unique(part_of):
            sel = np.flatnonzero(part_of == p)
            out[sel] = self.part(int(p))[global_rows[sel] - self.offsets[p]]
        return out

    def split_global(self, global_rows: np.ndarray) -> list[np.ndarray]:
        """Per part, the local row numbers of the given global rows."""
        part_of = np.searchsorted(self.offsets, global_rows, side="right") - 1
        return [global_rows[part_of == p] - self.offsets[p] for p in self.part_ids]
