"""Zero-shot classification: a text classifier built from class names and prompt templates."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import balanced_accuracy_score

from clipcid.evaluation.features import Encoder, text_features

LOGIT_SCALE = 100.0


def zeroshot_classifier(encoder: Encoder, classnames: list[str], templates: list[str], batch_size: int = 256):
    """C x D: per class, the mean of its normalised template embeddings, renormalised."""
    texts = [t.replace("{c}", name) for name in classnames for t in templates]
    emb = text_features(encoder, texts, batch_size).reshape(len(classnames), len(templates), -1)
    mean = emb.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def topk_accuracy(logits: np.ndarray, targets: np.ndarray, k: int) -> float:
    topk = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((topk == targets[:, None]).any(axis=1).mean())


def classification_metrics(logits: np.ndarray, targets: np.ndarray, prefix: str = "") -> dict:
    """acc1, acc5 (None below 5 classes, where CLIP_benchmark writes NaN), mean per-class recall."""
    targets = np.asarray(targets)
    preds = logits.argmax(axis=1)
    with warnings.catch_warnings():  # predictions of classes no target has are expected, not news
        warnings.simplefilter("ignore", UserWarning)
        recall = float(balanced_accuracy_score(targets, preds))
    return {
        f"{prefix}acc1": topk_accuracy(logits, targets, 1),
        f"{prefix}acc5": topk_accuracy(logits, targets, 5) if logits.shape[1] >= 5 else None,
        f"{prefix}mean_per_class_recall": recall,
    }


def evaluate(image_feats: np.ndarray, targets: list[int], classifier: np.ndarray) -> dict:
    logits = LOGIT_SCALE * image_feats @ classifier.T
    return classification_metrics(logits, np.asarray(targets))
