from __future__ import annotations

import numpy as np
import pytest

from clipcid.evaluation.zeroshot_retrieval import evaluate


def test_recall_with_several_captions_per_image():
    images = np.eye(3, dtype=np.float32)
    captions = [["a", "b"], ["c"], ["d", "e", "f"]]
    # Caption embeddings: a,b -> image 0; c -> image 2 (a miss); d -> 2; e -> 1 (miss); f -> 2.
    axes = [0, 0, 2, 2, 1, 2]
    texts = np.eye(3, dtype=np.float32)[axes] * np.array([[1.0], [0.9], [1.0], [0.8], [1.0], [0.7]])
    m = evaluate(images, captions, texts, ks=(1, 2))
    # Text -> image: a, b, d, f find their image first; c and e do not (their image is 2nd or 3rd).
    assert m["image_retrieval_recall@1"] == pytest.approx(4 / 6)
    # Image -> text: image 0's best text is a (hit); image 1's best is e (not its caption);
    # image 2's best is c (score 1.0, not its own) then d (0.8, its own).
    assert m["text_retrieval_recall@1"] == pytest.approx(1 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert list(m)[:4] == [
        "image_retrieval_recall@1",
        "image_retrieval_recall@2",
        "text_retrieval_recall@1",
        "text_retrieval_recall@2",
    ]
    for key in list(m)[:4]:  # each figure with its bootstrap interval, which holds it
        assert m[f"{key}_ci95_low"] <= m[key] <= m[f"{key}_ci95_high"]


def test_caption_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="text embeddings"):
        evaluate(np.eye(2), [["a"], ["b", "c"]], np.eye(2))


def test_bootstrap_interval_has_the_binomial_width_and_a_paired_difference_is_zero_against_itself():
    from clipcid.evaluation.zeroshot_retrieval import Ranks, metrics, paired_difference

    # 400 pairs, R@1 exactly 0.25 both ways: the 95 % interval is about +-1.96 * sqrt(p(1-p)/n) = +-0.042.
    n = 400
    rank = np.where(np.arange(n) % 4 == 0, 0, 7)
    r = Ranks(rank, rank.copy(), np.arange(n))
    m = metrics(r, ks=(1,))
    assert m["image_retrieval_recall@1"] == pytest.approx(0.25)
    half = (m["image_retrieval_recall@1_ci95_high"] - m["image_retrieval_recall@1_ci95_low"]) / 2
    assert half == pytest.approx(1.96 * np.sqrt(0.25 * 0.75 / n), rel=0.15)
    same = paired_difference(r, r, k=1)
    assert same["image_retrieval"] == (0.0, 0.0, 0.0)
    better = Ranks(np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64), np.arange(n))
    diff, low, high = paired_difference(better, r, k=1)["text_retrieval"]
    assert diff == pytest.approx(0.75) and low < 0.75 < high


def test_ranks_break_ties_as_a_stable_sort_does():
    from clipcid.evaluation.zeroshot_retrieval import ranks

    images = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)  # two identical pictures
    texts = np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    r = ranks(images, [["a"], ["b"]], texts)
    assert r.text_rank.tolist() == [0, 1] and r.image_rank.tolist() == [0, 1]
