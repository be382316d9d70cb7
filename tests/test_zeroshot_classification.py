from __future__ import annotations

import numpy as np
import pytest
from eval_stubs import StubEncoder, solid_png, write_classification_wds

from clipcid.evaluation.datasets import build_dataset
from clipcid.evaluation.features import image_features
from clipcid.evaluation.run import EvalConfig, run_eval
from clipcid.evaluation.zeroshot_classification import classification_metrics, zeroshot_classifier
from clipcid.inputs.shards import write_tar_atomic

# 4 red, 3 green, 3 blue-labelled images; one "blue" image is purple, which the stub encodes as red:
# acc1 = 9/10, recall per class 1, 1, 2/3.
TEST_ITEMS = [("red", 0)] * 4 + [("green", 1)] * 3 + [("blue", 2)] * 2 + [("purple", 2)]


def test_classifier_is_renormalised_mean_of_templates():
    classifier = zeroshot_classifier(StubEncoder(), ["red", "green"], ["a {c} thing.", "a photo."])
    # Each class: mean of its axis and the "no colour" axis, renormalised.
    want = np.array([[1, 0, 0, 1], [0, 1, 0, 1]], dtype=np.float32) / np.sqrt(2)
    np.testing.assert_allclose(classifier, want, atol=1e-6)


def test_known_answers_through_run_eval(tmp_path):
    root = write_classification_wds(
        tmp_path / "colours", {"test": TEST_ITEMS}, ["red", "green", "blue"], ["a {c} square.", "{c}"]
    )
    (record,) = run_eval(
        EvalConfig(
            model="stub",
            dataset=str(root),
            task="zeroshot_classification",
            output=str(tmp_path / "out.json"),
            workers=0,
        ),
        encoder=StubEncoder(),
    )
    m = record["metrics"]
    assert m["acc1"] == pytest.approx(9 / 10)
    assert m["mean_per_class_recall"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert m["acc5"] is None  # fewer than 5 classes
    assert set(record) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert (tmp_path / "out.json").is_file()


def test_topk_and_recall_on_handmade_logits():
    logits = np.array([[5, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [0, 9, 1, 1, 1, 1]], dtype=np.float32)
    m = classification_metrics(logits, np.array([0, 0, 2]))
    assert m["acc1"] == pytest.approx(1 / 3)
    assert m["acc5"] == pytest.approx(2 / 3)  # class 0 is last for sample 1
    assert m["mean_per_class_recall"] == pytest.approx((0.5 + 0.0) / 2)


def test_feature_cache_round_trip(tmp_path):
    root = write_classification_wds(tmp_path / "colours", {"test": TEST_ITEMS}, ["red", "green", "blue"], ["{c}"])
    ds = build_dataset(str(root))
    first = image_features(StubEncoder(), ds, "test", workers=0, feature_root=str(tmp_path / "cache"))
    assert (tmp_path / "cache" / "stub" / "colours" / "test.npy").is_file()

    class Exploding(StubEncoder):
        def encode_images(self, images):
            raise AssertionError("features should have come from the cache")

    second = image_features(Exploding(), ds, "test", workers=0, feature_root=str(tmp_path / "cache"))
    np.testing.assert_array_equal(first[0], second[0])
    assert first[1] == second[1] == [label for _, label in TEST_ITEMS]
    # The dataset rebuilt under its name with other pictures: the cache is not taken for it.
    items = TEST_ITEMS[:-1]
    root = write_classification_wds(tmp_path / "colours", {"test": items}, ["red", "green", "blue"], ["{c}"])
    third = image_features(
        StubEncoder(), build_dataset(str(root)), "test", workers=0, feature_root=str(tmp_path / "cache")
    )
    assert third[1] == [label for _, label in items]  # encoded again (the cache held three)


def test_features_come_in_the_splits_order_whatever_the_workers(tmp_path):
    # Four shards read by two workers come back interleaved batch by batch; the features must not.
    colours = ["red", "green", "blue", "purple"]
    root = tmp_path / "shards4"
    (root / "test").mkdir(parents=True)
    labels = []
    for shard in range(4):
        items = [colours[(shard + i) % 4] for i in range(5 + shard)]
        labels += [(shard + i) % 4 for i in range(5 + shard)]
        samples = [
            {"__key__": f"{shard}{i:03d}", "png": solid_png(c), "cls": str(colours.index(c))}
            for i, c in enumerate(items)
        ]
        write_tar_atomic(root / "test" / f"{shard}.tar", samples)
    (root / "classnames.txt").write_text("\n".join(colours) + "\n")
    ds = build_dataset(str(root))
    alone = image_features(StubEncoder(), ds, "test", batch_size=2, workers=0)
    two = image_features(StubEncoder(), ds, "test", batch_size=2, workers=2)
    assert alone[1] == two[1] == labels
    np.testing.assert_array_equal(alone[0], two[0])


def test_a_skewed_coarse_task_is_scored_by_per_class_recall_not_by_its_majority():
    """A student that always answers the most common group scores its share in acc1 but 1/C in mean
    per-class recall, the figure the seen coarse mean takes (and the name-level seen mean leaves out)."""
    from clipcid.evaluation.run import summarise, task_figures

    targets = np.array([0] * 8 + [1, 2])
    always_first = np.tile([5.0, 0.0, 0.0], (10, 1))
    m = classification_metrics(always_first, targets)
    assert m["acc1"] == pytest.approx(0.8) and m["mean_per_class_recall"] == pytest.approx(1 / 3)
    record = {"dataset": "wds/heldout_emoji_groups", "task": "zeroshot_classification", "metrics": m}
    names = {"dataset": "wds/heldout_names_emoji", "task": "zeroshot_classification", "metrics": {"acc1": 0.25}}
    summary = summarise([record, names])
    assert summary["seen_coarse_zeroshot_mean_per_class_recall"] == pytest.approx(1 / 3)
    assert summary["seen_zeroshot_mean_acc1"] == pytest.approx(0.25)
    assert summarise([record, names], coarse=[])["seen_coarse_zeroshot_mean_per_class_recall"] is None
    figures = task_figures([record, names])
    assert figures["wds/heldout_emoji_groups/zeroshot_classification:mean_per_class_recall"] == pytest.approx(1 / 3)
    assert "wds/heldout_names_emoji/zeroshot_classification:mean_per_class_recall" not in figures
