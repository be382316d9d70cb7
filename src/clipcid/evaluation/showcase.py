"""Models at work, for a reader's eyes: each model's top answers on a few held-out pictures of a
zero-shot task, and its top images for a few text queries over the same pictures."""

from __future__ import annotations

import numpy as np

from clipcid.evaluation.datasets import EvalDataset
from clipcid.evaluation.features import Encoder, image_features, text_features
from clipcid.evaluation.zeroshot_classification import zeroshot_classifier

# Queries tried in this order; those that are class names of the dataset are used.
PREFERRED_QUERIES = ("dog face", "rocket", "pizza", "red heart", "umbrella", "sun", "camera", "house")


def pick_examples(n_images: int, count: int) -> list[int]:
    """Evenly spread picture indices: the same pictures for every model and every run."""
    return sorted({int(i) for i in np.linspace(0, n_images - 1, num=min(count, n_images))})


def pick_queries(classnames: list[str], count: int) -> list[str]:
    chosen = [q for q in PREFERRED_QUERIES if q in classnames][:count]
    for name in classnames:
        if len(chosen) >= count:
            break
        if name not in chosen:
            chosen.append(name)
    return chosen


def showcase(encoder: Encoder, dataset: EvalDataset, examples: list[int], queries: list[str], top: int = 5) -> dict:
    """{"top3": per example, the 3 best classes; "queries": per query, the `top` best pictures}."""
    feats, targets = image_features(encoder, dataset, "test", workers=0)
    classifier = zeroshot_classifier(encoder, dataset.classnames, dataset.templates)
    scores = feats[examples] @ classifier.T
    top3 = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    query_feats = text_features(encoder, [dataset.templates[0].replace("{c}", q) for q in queries])
    ranked = np.argsort(-(query_feats @ feats.T), axis=1, kind="stable")[:, :top]
    return {
        "dataset": dataset.name,
        "examples": examples,
        "targets": [int(targets[i]) for i in examples],
        "top3": top3.tolist(),
        "queries": queries,
        "retrieved": ranked.tolist(),
        "query_targets": [dataset.classnames.index(q) if q in dataset.classnames else -1 for q in queries],
        "retrieved_targets": [[int(targets[j]) for j in row] for row in ranked],
    }


def names_showcase(encoder: Encoder, dataset: EvalDataset, examples: int = 12, queries: int = 4) -> dict:
    """`showcase` on evenly spread pictures and the preferred queries: the same choice for every model."""
    n_images = sum(1 for _ in dataset.iter_split("test"))
    return showcase(encoder, dataset, pick_examples(n_images, examples), pick_queries(dataset.classnames, queries))


def pictures(dataset: EvalDataset, indices: set[int]) -> dict[int, bytes]:
    """The image bytes of the test split's pictures at these positions (the order features follow)."""
    out = {}
    for i, (image, _) in enumerate(dataset.iter_split("test")):
        if i in indices:
            out[i] = image
    return out
