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
    assert list(m) == [
        "image_retrieval_recall@1",
        "image_retrieval_recall@2",
        "text_retrieval_recall@1",
        "text_retrieval_recall@2",
    ]


def test_caption_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="text embeddings"):
        evaluate(np.eye(2), [["a"], ["b", "c"]], np.eye(2))
