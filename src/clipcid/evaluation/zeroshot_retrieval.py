"""Zero-shot retrieval: recall@k from texts to images and from images to texts, several captions
per image, with bootstrap 95 % intervals.

Every figure comes from ranks: for each text, the rank of its own image among all images; for each
image, the best rank of its own captions among all texts (ties go to the earlier item, as a stable
sort orders them). Recall@k is the share of ranks below k. The intervals resample the images with
replacement (an image with its captions), 1,000 times with a fixed seed, and take the 2.5 and 97.5
percentiles; a difference between two models on the same pairs resamples both alike (paired).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RECALL_KS = (1, 5, 10)
BOOTSTRAP_SAMPLES = 1000
QUERY_CHUNK = 4096  # queries scored at once: the score block stays small for large galleries


@dataclass
class Ranks:
    """text_rank[j]: rank of text j's image; image_rank[i]: best rank of image i's captions;
    text_image[j]: the image text j belongs to."""

    text_rank: np.ndarray
    image_rank: np.ndarray
    text_image: np.ndarray

    def recall(self, k: int, weights: np.ndarray | None = None) -> np.ndarray:
        """[text -> image recall@k, image -> text recall@k]; with `weights` (samples x images: how often
        each image is drawn), one row per resample."""
        n = len(self.image_rank)
        w = np.ones((1, n)) if weights is None else np.atleast_2d(weights)
        hits_per_image = np.bincount(self.text_image, weights=self.text_rank < k, minlength=n)
        texts_per_image = np.bincount(self.text_image, minlength=n).astype(np.float64)
        image_retrieval = (w @ hits_per_image) / np.maximum(w @ texts_per_image, 1e-12)
        text_retrieval = (w @ (self.image_rank < k)) / np.maximum(w.sum(axis=1), 1e-12)
        out = np.stack([image_retrieval, text_retrieval], axis=1)
        return out[0] if weights is None else out

    def save(self, path) -> None:
        np.savez(path, text_rank=self.text_rank, image_rank=self.image_rank, text_image=self.text_image)

    @classmethod
    def load(cls, path) -> Ranks:
        data = np.load(path)
        return cls(data["text_rank"], data["image_rank"], data["text_image"])


def _rank_of(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per row, the place of column target[row] when the row is sorted descending, ties by column."""
    true = scores[np.arange(len(scores)), target][:, None]
    before = np.arange(scores.shape[1])[None, :] < target[:, None]
    return ((scores > true) | ((scores == true) & before)).sum(axis=1)


def ranks(image_feats: np.ndarray, captions: list[list[str]], text_feats: np.ndarray) -> Ranks:
    """`text_feats` holds the captions flattened in order; caption j of image i is one text."""
    text_image = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
    if len(text_image) != len(text_feats):
        raise ValueError(f"{len(text_feats)} text embeddings for {len(text_image)} captions")
    text_rank = np.empty(len(text_feats), dtype=np.int64)
    for s in range(0, len(text_feats), QUERY_CHUNK):
        scores = text_feats[s : s + QUERY_CHUNK] @ image_feats.T
        text_rank[s : s + QUERY_CHUNK] = _rank_of(scores, text_image[s : s + QUERY_CHUNK])
    image_rank = np.full(len(captions), np.iinfo(np.int64).max, dtype=np.int64)
    first = np.concatenate([[0], np.cumsum([len(c) for c in captions])])
    for s in range(0, len(captions), QUERY_CHUNK):
        scores = image_feats[s : s + QUERY_CHUNK] @ text_feats.T
        for i in range(s, min(s + QUERY_CHUNK, len(captions))):
            own = np.arange(first[i], first[i + 1])
            if len(own):
                rows = np.repeat(scores[i - s][None, :], len(own), axis=0)
                image_rank[i] = _rank_of(rows, own).min()
    return Ranks(text_rank, image_rank, text_image)


def _resampled_weights(n_images: int, samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=samples).astype(np.float64)


def metrics(r: Ranks, ks: tuple[int, ...] = RECALL_KS, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict:
    """CLIP_benchmark's recall@k keys, each with `_ci95_low` and `_ci95_high` beside it."""
    point = {k: r.recall(k) for k in ks}
    out: dict[str, float] = {}
    for column, name in enumerate(("image_retrieval", "text_retrieval")):  # CLIP_benchmark's key order
        for k in ks:
            out[f"{name}_recall@{k}"] = float(point[k][column])
    if len(r.image_rank) == 0:
        return out
    weights = _resampled_weights(len(r.image_rank), samples, seed)
    for k in ks:
        draws = r.recall(k, weights)  # samples x 2
        for column, name in enumerate(("image_retrieval", "text_retrieval")):
            low, high = np.percentile(draws[:, column], [2.5, 97.5])
            out[f"{name}_recall@{k}_ci95_low"] = float(low)
            out[f"{name}_recall@{k}_ci95_high"] = float(high)
    return out


def paired_difference(
    a: Ranks, b: Ranks, k: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """a minus b on the same pairs: {"image_retrieval"|"text_retrieval": (difference, low, high)}."""
    if len(a.image_rank) != len(b.image_rank) or not np.array_equal(a.text_image, b.text_image):
        raise ValueError("a paired difference needs the same pairs for both models")
    weights = _resampled_weights(len(a.image_rank), samples, seed)
    point = a.recall(k) - b.recall(k)
    draws = a.recall(k, weights) - b.recall(k, weights)
    out = {}
    for column, name in enumerate(("image_retrieval", "text_retrieval")):
        low, high = np.percentile(draws[:, column], [2.5, 97.5])
        out[name] = (float(point[column]), float(low), float(high))
    return out


def evaluate(
    image_feats: np.ndarray,
    captions: list[list[str]],
    text_feats: np.ndarray,
    ks: tuple[int, ...] = RECALL_KS,
) -> dict:
    """Recall@k both ways with their intervals (CLIP_benchmark's keys, plus the interval keys)."""
    return metrics(ranks(image_feats, captions, text_feats), ks)
