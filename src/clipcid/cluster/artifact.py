"""The clusters folder, written and read only here.

OUT/centroids.npy (k x D float32, unit norm), OUT/coarse_centroids.npy (two-level mode),
OUT/training.json (the trained centroids' settings, so that a rerun only assigns), OUT/training/ while
training runs (the centroids after each finished Lloyd iteration of each stage, each fine cell, each
rank's sample cells: what a killed run resumes from; removed once training.json is written),
OUT/labels/labels_{i}.npy (int64 per embedding row, -1 for dropped or invalid rows; its presence marks
the part done), OUT/similarity/similarity_{i}.npy (to the centroid), OUT/corpus_labels/labels_{i}.npy
(with a balance folder: every valid row that is not held out, removed ones too, assigned to the same
centroids: the corpus before balance, for the paper's Fig. 2(d); the training labels stay -1 for the
removed rows), OUT/stats.json ({"settings", "complete", and the statistics}; rewritten complete last),
OUT/cluster_sizes.png, OUT/cluster_balance.png (sorted cluster sizes before and after balance).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from clipcid.embed.artifact import Embeddings
from clipcid.errors import ClipcidError
from clipcid.stage import finished, identity, read_finished, record_matches, write_record
from clipcid.util.fileio import atomic_path, save_json_atomic, save_npy_atomic

SETTINGS_FILE = "stats.json"


TRAINING_FILE = "training.json"


def plot_paths(folder: str | Path) -> dict[str, Path]:
    """The stage's figures: cluster sizes, and the sorted sizes before and after balance."""
    return {"sizes": Path(folder) / "cluster_sizes.png", "balance": Path(folder) / "cluster_balance.png"}


def labels_path(folder: Path, i: int) -> Path:
    return Path(folder) / "labels" / f"labels_{i}.npy"


def similarity_path(folder: Path, i: int) -> Path:
    return Path(folder) / "similarity" / f"similarity_{i}.npy"


def trained(folder: Path, settings: dict) -> bool:
    """Whether centroids of exactly these training settings are there."""
    return record_matches(Path(folder) / TRAINING_FILE, settings)


def _scratch(folder: Path) -> Path:
    return Path(folder) / "training"


def begin_training(folder: Path, settings: dict) -> None:
    """Rank 0, before training: the scratch state of a run with other settings goes."""
    scratch = _scratch(folder)
    if scratch.is_dir() and not record_matches(scratch / "settings.json", settings):
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    write_record(scratch / "settings.json", settings)


def write_kmeans_state(folder: Path, stage: str, redo: int, iteration: int, centroids: np.ndarray, objective) -> None:
    """The centroids after `iteration` finished Lloyd iterations of one stage (flat, coarse, refine)."""
    scratch = _scratch(folder)
    save_npy_atomic(scratch / f"{stage}_{redo}.npy", centroids)
    save_json_atomic(scratch / f"{stage}_{redo}.json", {"iteration": iteration, "objective": list(objective)})


def read_kmeans_state(folder: Path, stage: str, redo: int = 0) -> tuple[int, np.ndarray, list[float]] | None:
    state = _scratch(folder) / f"{stage}_{redo}.json"
    if not state.is_file():
        return None
    record = json.loads(state.read_text())
    return record["iteration"], np.load(_scratch(folder) / f"{stage}_{redo}.npy"), record["objective"]


def _cells_path(folder: Path, source: int, owner: int) -> Path:
    return _scratch(folder) / "cells" / f"from{source}_to{owner}.npz"


def write_share_cells(folder: Path, source: int, owner: int, rows: np.ndarray, cells: np.ndarray) -> None:
    """The sample rows of rank `source`'s share whose coarse cell rank `owner` trains, with their cells."""
    path = _cells_path(folder, source, owner)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, rows=rows, cells=cells)


def read_share_cells(folder: Path, source: int, owner: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(_cells_path(folder, source, owner)) as data:
        return data["rows"], data["cells"]


def fine_cell_path(folder: Path, cell: int) -> Path:
    return _scratch(folder) / "fine" / f"cell_{cell}.npy"


def write_fine_cell(folder: Path, cell: int, centroids: np.ndarray) -> None:
    save_npy_atomic(fine_cell_path(folder, cell), centroids)


def write_training(folder: Path, centroids: np.ndarray, coarse: np.ndarray | None, record: dict) -> None:
    """The trained centroids; labels of earlier centroids are stale and go first, and the scratch
    state of training last."""
    folder = Path(folder)
    for f in (folder / "labels").glob("labels_*.npy") if (folder / "labels").is_dir() else []:
        f.unlink()
    if coarse is not None:
        save_npy_atomic(folder / "coarse_centroids.npy", coarse)
    save_npy_atomic(folder / "centroids.npy", centroids)
    save_json_atomic(folder / TRAINING_FILE, record)  # last: marks the training done
    shutil.rmtree(_scratch(folder), ignore_errors=True)


def read_training(folder: Path) -> tuple[dict, np.ndarray, np.ndarray | None]:
    folder = Path(folder)
    training = json.loads((folder / TRAINING_FILE).read_text())
    coarse = np.load(folder / "coarse_centroids.npy") if training["two_level"] else None
    return training, np.load(folder / "centroids.npy"), coarse


def corpus_labels_path(folder: Path, i: int) -> Path:
    return Path(folder) / "corpus_labels" / f"labels_{i}.npy"


def write_labels(
    folder: Path, i: int, labels: np.ndarray, similarity: np.ndarray, corpus_labels: np.ndarray | None = None
) -> None:
    if corpus_labels is not None:
        save_npy_atomic(corpus_labels_path(folder, i), corpus_labels)
    save_npy_atomic(similarity_path(folder, i), similarity)
    save_npy_atomic(labels_path(folder, i), labels)  # last: marks the part done


def read_part_labels(folder: Path, i: int, with_corpus: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Part i's training labels, their similarities, and (`with_corpus`) the labels of the whole corpus
    before balance."""
    corpus = np.load(corpus_labels_path(folder, i)) if with_corpus else None
    return np.load(labels_path(folder, i)), np.load(similarity_path(folder, i)), corpus


def labels_done(folder: Path, i: int, corpus: bool = False) -> bool:
    """Whether part i is assigned (and, with `corpus`, its whole-corpus labels written)."""
    return labels_path(folder, i).is_file() and (not corpus or corpus_labels_path(folder, i).is_file())


def identity_of(folder: str | Path) -> str | None:
    """The fingerprint of the settings a clusters folder was made with."""
    return identity(Path(folder) / SETTINGS_FILE)


def read_stats(folder: str | Path) -> dict:
    """The statistics of a finished run (stats.json), for reports."""
    return read_finished(Path(folder) / SETTINGS_FILE, "cluster")


class Clusters:
    """A finished clusters folder, checked against the embeddings it is used with."""

    def __init__(self, folder: Path, centroids: np.ndarray, stats: dict, sizes: list[int]):
        self.folder, self.centroids, self.stats, self.sizes = folder, centroids, stats, sizes

    @property
    def num_classes(self) -> int:
        return int(self.centroids.shape[0])

    @classmethod
    def open(cls, folder: str | Path, embeddings: Embeddings) -> Clusters:
        folder = Path(folder)
        if not (folder / "centroids.npy").is_file():
            raise ClipcidError(f"{folder} is not a clusters folder (no centroids.npy); run `clipcid cluster`")
        record_file = folder / SETTINGS_FILE
        record = json.loads(record_file.read_text()) if record_file.is_file() else None
        if record is None or not finished(record):
            raise ClipcidError(
                f"{folder} holds an unfinished clustering; run the same `clipcid cluster` again to finish it"
            )
        centroids = np.load(folder / "centroids.npy", mmap_mode="r")  # a rank copies its classifier rows only
        if centroids.ndim != 2 or centroids.shape[1] != embeddings.images.dim:
            raise ClipcidError(
                f"{folder}: centroids are {centroids.shape}, the embeddings {embeddings.images.dim}-dimensional"
            )
        missing = [i for i in embeddings.part_ids if not labels_done(folder, i)]
        if missing:
            raise ClipcidError(
                f"{folder} has no labels for part(s) {missing[:5]}; run `clipcid cluster` again to assign them"
            )
        return cls(folder, centroids, record, embeddings.sizes)

    def labels(self, i: int) -> np.ndarray:
        labels = np.load(labels_path(self.folder, i))
        if len(labels) != self.sizes[i]:
            raise ClipcidError(f"cluster labels of part {i} do not match the embeddings ({self.folder})")
        return labels

    def similarity(self, i: int) -> np.ndarray:
        return np.load(similarity_path(self.folder, i))
