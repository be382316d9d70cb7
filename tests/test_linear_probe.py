from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from clipcid.errors import ClipcidError
from clipcid.evaluation.linear_probe import (
    WD_GRID,
    fewshot_indices,
    fit_logistic_regression,
    linear_probe,
    search_weight_decay,
)


@pytest.fixture(scope="module")
def digits_features():
    """scikit-learn's digits as L2-normalised pixel features: a real small task."""
    digits = load_digits()
    x = digits.data.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return train_test_split(x, digits.target, test_size=0.5, stratify=digits.target, random_state=0)


def _sklearn_accuracy(train_x, train_y, test_x, test_y, wd):
    # Our loss is mean CE + wd/2 |W|^2; scikit-learn's is C * sum CE + 1/2 |W|^2: C = 1 / (wd * n).
    clf = LogisticRegression(C=1.0 / (wd * len(train_y)), max_iter=5000, tol=1e-8)
    clf.fit(train_x, train_y)
    return clf.score(test_x, test_y)


def test_same_optimum_as_sklearn_at_a_fixed_weight_decay(digits_features):
    train_x, test_x, train_y, test_y = digits_features
    for wd in (1e-4, 1e-2):
        probe = fit_logistic_regression(train_x, train_y, 10, wd)
        ours = float((probe.logits(test_x).argmax(1) == test_y).mean())
        assert abs(ours - _sklearn_accuracy(train_x, train_y, test_x, test_y, wd)) <= 0.005


def test_probe_with_search_matches_sklearn_within_one_point(digits_features):
    train_x, test_x, train_y, test_y = digits_features
    m = linear_probe(train_x, train_y, test_x, test_y, n_classes=10)
    assert m["lp_acc1"] > 0.9
    assert abs(m["lp_acc1"] - _sklearn_accuracy(train_x, train_y, test_x, test_y, m["lp_weight_decay"])) <= 0.01
    assert m["lp_weight_decay"] in WD_GRID
    assert set(m) >= {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall"}


def test_coarse_to_fine_search_finds_the_peak_of_a_unimodal_curve():
    calls = []

    def score(i):
        calls.append(i)
        return -abs(i - 37)

    best, scores = search_weight_decay(score)
    assert best == 37
    assert len(calls) == len(set(calls)) <= 7 + 4 * 2  # 7 coarse points, then 2 new points per round


def test_fewshot_selection_and_too_few_samples():
    y = np.array([0] * 5 + [1] * 3 + [2] * 4)
    idx = fewshot_indices(y, 3, seed=0)
    assert np.bincount(y[idx]).tolist() == [3, 3, 3]
    assert np.array_equal(idx, fewshot_indices(y, 3, seed=0))
    with pytest.raises(ClipcidError, match="class 'cat' has 3 training samples, fewer than --fewshot-k 4"):
        fewshot_indices(y, 4, seed=0, classnames=["dog", "cat", "bird"])
