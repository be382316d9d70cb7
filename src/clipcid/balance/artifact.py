"""The balance folder, written and read only here.

OUT/keep/keep_{i}.npy (bool per embedding row: kept by Image Semantic Balance), OUT/groups/groups_{i}.npy
(group id per row; -1 for invalid rows, held-out rows and their near-duplicates), OUT/stats.json
({"settings", "complete", and the statistics}; rewritten complete last), OUT/group_sizes.png,
OUT/removal_curve.png; OUT/edges/ caches the search.
A folder of keep masks made elsewhere (no stats.json) is read as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from clipcid.embed.artifact import Embeddings, EmbeddingStore
from clipcid.errors import ClipcidError
from clipcid.stage import finished, identity, read_finished
from clipcid.util.fileio import save_npy_atomic

SETTINGS_FILE = "stats.json"


def keep_path(folder: Path, i: int) -> Path:
    return Path(folder) / "keep" / f"keep_{i}.npy"


def groups_path(folder: Path, i: int) -> Path:
    return Path(folder) / "groups" / f"groups_{i}.npy"


def write_masks(out: Path, store: EmbeddingStore, global_rows: np.ndarray, labels, keep) -> None:
    """Per part, the group of every valid row and whether it is kept (invalid rows: -1, not kept)."""
    keep_rows = np.zeros(store.total, dtype=bool)
    keep_rows[global_rows] = keep
    group_rows = np.full(store.total, -1, dtype=np.int64)
    group_rows[global_rows] = labels
    for i in store.part_ids:
        lo, hi = store.offsets[i], store.offsets[i + 1]
        save_npy_atomic(groups_path(out, i), group_rows[lo:hi])
        save_npy_atomic(keep_path(out, i), keep_rows[lo:hi])


def balanced_rows(folder: str | Path, i: int) -> np.ndarray:
    """Rows of part i that took part in balancing (a group of their own or a merged one): not the
    held-out rows, their near-duplicates, or rows without a valid embedding (group -1)."""
    return np.load(groups_path(Path(folder), i)) >= 0


def plot_paths(folder: str | Path) -> dict[str, Path]:
    """The stage's figures: group sizes, and the removed fraction against the threshold."""
    return {"group_sizes": Path(folder) / "group_sizes.png", "removal_curve": Path(folder) / "removal_curve.png"}


def identity_of(folder: str | Path) -> str | None:
    """The fingerprint of the settings a balance folder was made with (None: masks made elsewhere)."""
    return identity(Path(folder) / SETTINGS_FILE)


def read_stats(folder: str | Path) -> dict:
    """The statistics of a finished run (stats.json), for reports."""
    return read_finished(Path(folder) / SETTINGS_FILE, "balance")


def held_out_radius(folder: str | Path) -> tuple[float, str] | None:
    """(radius, metric) within which a finished balance kept training rows from held-out pictures; None
    for a folder without a hold-out, or masks made elsewhere."""
    if not (Path(folder) / SETTINGS_FILE).is_file():
        return None
    stats = read_stats(folder)
    if not stats.get("held_out"):
        return None
    # Folders made before --held-out-threshold guarded at the balance threshold.
    return stats.get("held_out_threshold") or stats["threshold"], stats["metric"]


class BalanceResult:
    """A finished balance folder, checked against the embeddings it is used with."""

    def __init__(self, folder: Path, stats: dict, sizes: list[int]):
        self.folder, self.stats, self.sizes = folder, stats, sizes

    @classmethod
    def open(cls, folder: str | Path, embeddings: Embeddings) -> BalanceResult:
        folder = Path(folder)
        record_file = folder / SETTINGS_FILE
        if not folder.is_dir() or not (folder / "keep").is_dir():
            raise ClipcidError(f"{folder} is not a balance folder (no keep/); run `clipcid balance` first")
        # Without stats.json the masks were made elsewhere (a mask of one's own is welcome); with it,
        # the run must have finished.
        record = json.loads(record_file.read_text()) if record_file.is_file() else {"complete": True}
        if not finished(record):
            raise ClipcidError(
                f"{folder} holds an unfinished balance run; run the same `clipcid balance` again to finish it"
            )
        n_keep = len(list((folder / "keep").glob("keep_*.npy")))
        if n_keep != len(embeddings.part_ids):
            raise ClipcidError(f"balance folder {folder} has {n_keep} parts, the embeddings {len(embeddings.part_ids)}")
        for i in embeddings.part_ids:
            if not keep_path(folder, i).is_file():
                raise ClipcidError(f"balance folder {folder} has no keep_{i}.npy; run `clipcid balance` again")
        return cls(folder, record, embeddings.sizes)

    def keep(self, i: int) -> np.ndarray:
        keep = np.load(keep_path(self.folder, i))
        if len(keep) != self.sizes[i]:
            raise ClipcidError(
                f"balance part {i} has {len(keep)} rows but embedding part {i} has {self.sizes[i]}: "
                "the balance folder was made from other embeddings"
            )
        return keep

    def groups(self, i: int) -> np.ndarray:
        return np.load(groups_path(self.folder, i))

    def keep_mask(self) -> np.ndarray:
        return np.concatenate([self.keep(i) for i in range(len(self.sizes))])
