"""Zero-shot retrieval: recall@k from texts to images and from images to texts, several captions
per image."""

from __future__ import annotations

import numpy as np

RECALL_KS = (1, 5, 10)


def evaluate(
    image_feats: np.ndarray,
    captions: list[list[str]],
    text_feats: np.ndarray,
    ks: tuple[int, ...] = RECALL_KS,
) -> dict:
    """`text_feats` holds the captions flattened in order; caption j of image i is one text."""
    text_to_image = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
    if len(text_to_image) != len(text_feats):
        raise ValueError(f"{len(text_feats)} text embeddings for {len(text_to_image)} captions")
    scores = text_feats @ image_feats.T  # texts x images
    metrics = {}
    # Text -> image ("image retrieval"): the caption's own image among the top k images.
    image_rank = np.argsort(-scores, axis=1, kind="stable")
    for k in ks:
        hit = (image_rank[:, :k] == text_to_image[:, None]).any(axis=1)
        metrics[f"image_retrieval_recall@{k}"] = float(hit.mean())
    # Image -> text ("text retrieval"): any of the image's captions among the top k texts.
    text_rank = np.argsort(-scores.T, axis=1, kind="stable")
    for k in ks:
        hit = (text_to_image[text_rank[:, :k]] == np.arange(len(captions))[:, None]).any(axis=1)
        metrics[f"text_retrieval_recall@{k}"] = float(hit.mean())
    return metrics
