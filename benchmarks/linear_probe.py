"""Linear probe: our L-BFGS probe against scikit-learn's LogisticRegression (lbfgs), same features,
same validation split, same coarse-to-fine weight-decay search, in one run.

    python benchmarks/linear_probe.py [--suite demo/eval --model clipcid-tiny --pretrained PATH]

Tasks: scikit-learn digits (normalised pixels, 64-d), synthetic Gaussian classes (10,000 x 512,
100 classes), and, with --suite, the held-out emoji subgroup task on a model's features.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from clipcid.evaluation.linear_probe import WD_GRID, linear_probe, search_weight_decay, validation_split


def sklearn_probe(train_x, train_y, test_x, test_y, val_proportion=0.2, seed=0) -> dict:
    tr, va = validation_split(train_y, val_proportion, seed)

    def fit(x, y, wd):
        return LogisticRegression(C=1.0 / (wd * len(y)), max_iter=1000).fit(x, y)

    best, _ = search_weight_decay(lambda i: fit(train_x[tr], train_y[tr], WD_GRID[i]).score(train_x[va], train_y[va]))
    clf = fit(train_x, train_y, WD_GRID[best])
    return {"lp_acc1": clf.score(test_x, test_y), "lp_weight_decay": WD_GRID[best]}


def digits_task():
    d = load_digits()
    x = d.data.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return train_test_split(x, d.target, test_size=0.5, stratify=d.target, random_state=0)


def gaussian_task(n=10000, dim=512, classes=100, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    y = rng.integers(classes, size=n)
    x = centres[y] * 0.15 + rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return train_test_split(x, y, test_size=0.5, stratify=y, random_state=0)


def suite_task(suite: str, model: str, pretrained: str | None):
    from clipcid.evaluation.datasets import build_dataset
    from clipcid.evaluation.features import image_features
    from clipcid.evaluation.run import load_encoder

    encoder = load_encoder(model, pretrained)
    ds = build_dataset("emoji_subgroups_fluent3d", suite)
    train_x, train_y = image_features(encoder, ds, "train")
    test_x, test_y = image_features(encoder, ds, "test")
    return train_x, test_x, np.asarray(train_y), np.asarray(test_y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default=None)
    p.add_argument("--model", default="clipcid-tiny")
    p.add_argument("--pretrained", default=None)
    args = p.parse_args()
    tasks = {"digits (1797 x 64, 10 cl.)": digits_task(), "gaussian (10000 x 512, 100 cl.)": gaussian_task()}
    if args.suite:
        tasks[f"emoji subgroups, {args.model}"] = suite_task(args.suite, args.model, args.pretrained)
    print(f"| {'task':<32} | {'method':<22} | {'lp_acc1':>7} | {'wd':>8} | {'seconds':>7} | {'ratio':>6} |")
    print(f"|{'-' * 34}|{'-' * 24}|{'-' * 9}|{'-' * 10}|{'-' * 9}|{'-' * 8}|")
    for name, (train_x, test_x, train_y, test_y) in tasks.items():
        n_classes = int(max(train_y.max(), test_y.max()) + 1)
        start = time.perf_counter()
        anchor = sklearn_probe(train_x, train_y, test_x, test_y)
        anchor_s = time.perf_counter() - start
        start = time.perf_counter()
        ours = linear_probe(train_x, train_y, test_x, test_y, n_classes)
        ours_s = time.perf_counter() - start
        for method, m, s in (("scikit-learn (anchor)", anchor, anchor_s), ("clipcid", ours, ours_s)):
            print(
                f"| {name:<32} | {method:<22} | {m['lp_acc1'] * 100:>7.2f} | {m['lp_weight_decay']:>8.1e} | "
                f"{s:>7.2f} | {s / anchor_s:>6.3f} |"
            )


if __name__ == "__main__":
    main()
