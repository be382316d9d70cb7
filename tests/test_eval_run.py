from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import NPM_ROOT, needs_sources
from eval_stubs import StubEncoder, solid_png, write_classification_wds

from clipcid.cli import main
from clipcid.errors import ClipcidError
from clipcid.evaluation.datasets import build_dataset
from clipcid.evaluation.run import EvalConfig, EvalSuiteConfig, run_eval, run_eval_suite
from clipcid.inputs.shards import write_tar_atomic

TRAIN = [("red", 0), ("green", 1), ("blue", 2)] * 6
TEST = [("red", 0), ("green", 1), ("blue", 2), ("purple", 2)]


def test_imagefolder_spec_and_auto_tasks(tmp_path):
    root = tmp_path / "folder"
    for split, items in (("train", TRAIN), ("test", TEST)):
        for i, (colour, label) in enumerate(items):
            cls = ["red_thing", "green_thing", "blue_thing"][label]
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            (root / split / cls / f"{i}.png").write_bytes(solid_png(colour))
    (root / "templates.txt").write_text("a {c}.\n")
    ds = build_dataset(f"imagefolder:{root}")
    assert ds.classnames == ["blue thing", "green thing", "red thing"]  # sorted folders, '_' read as space
    records = run_eval(
        EvalConfig(
            model="stub",
            dataset=f"imagefolder:{root}",
            workers=0,
            output=str(tmp_path / "res_{dataset}.json"),
        ),
        encoder=StubEncoder(),
    )
    assert [r["task"] for r in records] == ["zeroshot_classification", "linear_probe"]
    # Folder order is blue, green, red; the stub encodes purple like red, so 3 of 4 are right.
    assert records[0]["metrics"]["acc1"] == pytest.approx(3 / 4)
    assert records[1]["metrics"]["lp_acc1"] == pytest.approx(3 / 4)
    assert (tmp_path / "res_folder_zeroshot_classification.json").is_file()
    assert (tmp_path / "res_folder_linear_probe.json").is_file()


def test_classnames_and_templates_override(tmp_path):
    root = write_classification_wds(tmp_path / "c", {"test": TEST}, ["x", "y", "z"], ["{c}"])
    (tmp_path / "names.txt").write_text("red\ngreen\nblue\n")
    (tmp_path / "templates.txt").write_text("a {c} square.\n")
    (record,) = run_eval(
        EvalConfig(
            model="stub",
            dataset=str(root),
            task="zeroshot_classification",
            workers=0,
            classnames=str(tmp_path / "names.txt"),
            templates=str(tmp_path / "templates.txt"),
        ),
        encoder=StubEncoder(),
    )
    assert record["metrics"]["acc1"] == pytest.approx(3 / 4)


def test_retrieval_dataset_through_run_eval(tmp_path):
    root = tmp_path / "ret"
    (root / "test").mkdir(parents=True)
    samples = [
        {"__key__": f"{i}", "png": solid_png(c), "txt": f"{c}\na {c} square"}
        for i, c in enumerate(["red", "green", "blue"])
    ]
    write_tar_atomic(root / "test" / "0.tar", samples)
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "dataset_type.txt").write_text("retrieval\n")
    (record,) = run_eval(EvalConfig(model="stub", dataset=str(root), workers=0), encoder=StubEncoder())
    assert record["task"] == "zeroshot_retrieval"
    assert record["metrics"]["image_retrieval_recall@1"] == 1.0
    assert record["metrics"]["text_retrieval_recall@1"] == 1.0


def test_clear_errors(tmp_path):
    root = write_classification_wds(tmp_path / "c", {"test": TEST}, ["red", "green", "blue"], ["{c}"])
    with pytest.raises(ClipcidError, match="has no 'train' split"):
        run_eval(EvalConfig(model="stub", dataset=str(root), task="linear_probe", workers=0), encoder=StubEncoder())
    with pytest.raises(ClipcidError, match="unknown dataset 'cifar10'"):
        build_dataset("cifar10", suite_root=str(tmp_path / "nowhere"))
    with pytest.raises(ClipcidError, match="does not apply"):
        run_eval(
            EvalConfig(model="stub", dataset=str(root), task="zeroshot_retrieval", workers=0),
            encoder=StubEncoder(),
        )
    train = write_classification_wds(
        tmp_path / "few", {"train": TRAIN[:4], "test": TEST}, ["red", "green", "blue"], ["{c}"]
    )
    with pytest.raises(ClipcidError, match="fewer than --fewshot-k 5"):
        run_eval(
            EvalConfig(model="stub", dataset=str(train), task="linear_probe", fewshot_k=5, workers=0),
            encoder=StubEncoder(),
        )


def test_cli_names_the_keys_of_a_mismatched_checkpoint(tmp_path, capsys, tiny_checkpoint):
    root = write_classification_wds(tmp_path / "c", {"test": TEST}, ["red", "green", "blue"], ["{c}"])
    code = main(["eval", "--model", "clipcid-small", "--pretrained", str(tiny_checkpoint), "--dataset", str(root)])
    err = capsys.readouterr().err
    assert code == 2 and "does not match architecture clipcid-small" in err and "shape key(s)" in err


@needs_sources()
def test_eval_suite_on_a_real_model(tmp_path, tiny_checkpoint):
    from clipcid.corpus.eval_suite import BuildEvalConfig, build_eval_suite

    suite = tmp_path / "suite"
    build_eval_suite(BuildEvalConfig(str(suite), npm_root=str(NPM_ROOT), workers=2, only=["digits"]))
    result = run_eval_suite(
        EvalSuiteConfig("clipcid-tiny", str(tmp_path / "out"), str(tiny_checkpoint), str(suite), workers=0)
    )
    assert [(r["dataset"], r["task"]) for r in result["records"]] == [  # CLIP_benchmark's names (issue 14)
        ("wds/digits", "zeroshot_classification"),
        ("wds/digits", "linear_probe"),
    ]
    lp = result["records"][1]["metrics"]["lp_acc1"]
    assert 0.3 < lp <= 1.0  # random features still separate digits far above chance
    assert result["summary"]["linear_probe_mean_acc1"] == pytest.approx(lp)
    saved = json.loads((tmp_path / "out" / "digits_linear_probe.json").read_text())
    assert saved["metrics"]["lp_acc1"] == pytest.approx(lp)
    # CLIP_benchmark's linear-probe keys are there too, and the same dataset by its CLIP_benchmark spelling.
    assert {"weight_decay", "epochs", "seed", "fewshot_k", "normalized"} <= set(saved["metrics"])
    assert len(list((suite / "digits" / "test").glob("*.tar"))) >= 4  # enough shards for its 4 loader workers
    code = main(
        ["eval", "--model", "clipcid-tiny", "--pretrained", str(tiny_checkpoint), "--dataset", "wds/digits",
         "--dataset_root", str(suite / "{dataset}"), "--task", "zeroshot_classification", "--workers", "0",
         "--output", str(tmp_path / "cb.json")]
    )  # fmt: skip
    assert code == 0
    again = json.loads((tmp_path / "cb.json").read_text())
    assert again["dataset"] == "wds/digits" and again["metrics"]["acc1"] == result["records"][0]["metrics"]["acc1"]
    assert "linear_probe_mean_acc1" in (tmp_path / "out" / "summary.csv").read_text()
    assert "| digits | linear_probe | lp_acc1 |" in (tmp_path / "out" / "summary.md").read_text()


def test_a_checkpoint_moved_with_its_run_folder_keeps_its_fingerprint(tmp_path):
    import os
    import shutil

    from clipcid.evaluation.features import checkpoint_cache_id, weights_fingerprint

    (tmp_path / "a").mkdir()
    first = tmp_path / "a" / "model.pt"
    first.write_bytes(b"weights")
    moved = tmp_path / "b" / "model.pt"
    moved.parent.mkdir()
    shutil.copy2(first, moved)  # a run folder moved elsewhere: same name, size and time
    assert weights_fingerprint("m", str(first)) == weights_fingerprint("m", str(moved))
    assert checkpoint_cache_id("m", str(first)) != checkpoint_cache_id("m", str(moved))  # the feature cache's key
    os.utime(moved, ns=(0, 0))  # written again
    assert weights_fingerprint("m", str(first)) != weights_fingerprint("m", str(moved))
    assert weights_fingerprint("m", "laion2b") == "m__laion2b"


def test_text_features_are_encoded_once_per_prompt_and_equal_fresh_ones(tiny_checkpoint):
    from clipcid.evaluation.features import text_features
    from clipcid.evaluation.run import load_encoder

    cached = load_encoder("clipcid-tiny", str(tiny_checkpoint), "cpu")
    calls = []
    encode_text = cached.model.encode_text
    cached.model.encode_text = lambda tokens: calls.append(len(tokens)) or encode_text(tokens)
    names = [f"an emoji of thing {i}." for i in range(40)]
    first = text_features(cached, names, batch_size=16)
    again = text_features(cached, names[::-1] + names[:5], batch_size=16)  # another order, repeats
    assert sum(calls) == 40  # the second pass encoded nothing
    np.testing.assert_array_equal(again, np.concatenate([first[::-1], first[:5]]))
    fresh = text_features(load_encoder("clipcid-tiny", str(tiny_checkpoint), "cpu"), names, batch_size=16)
    np.testing.assert_allclose(first, fresh, rtol=0, atol=1e-6)


def test_a_validation_evaluation_reads_no_test_image(tmp_path, monkeypatch):
    import clipcid.evaluation.run as run_module

    suite = tmp_path / "suite"
    write_classification_wds(suite / "colours", {"train": TRAIN, "test": TEST}, ["red", "green", "blue"], ["{c}"])
    held = {"validation": [("red", 0), ("green", 1), ("purple", 2)], "test": [("blue", 2), ("purple", 2)]}
    write_classification_wds(suite / "heldout_colours", held, ["red", "green", "blue"], ["{c}"])
    write_classification_wds(suite / "only_test", {"test": TEST}, ["red", "green", "blue"], ["{c}"])
    entries = [
        {"name": "colours", "tasks": ["zeroshot_classification", "linear_probe"]},
        {"name": "heldout_colours", "tasks": ["zeroshot_classification"]},
        {"name": "only_test", "tasks": ["zeroshot_classification"]},
    ]
    (suite / "suite.json").write_text(json.dumps({"datasets": entries, "complete": True}))
    read = []
    original = run_module.image_features
    monkeypatch.setattr(
        run_module, "image_features", lambda enc, ds, split, *a: read.append(split) or original(enc, ds, split, *a)
    )
    cfg = EvalSuiteConfig("stub", str(tmp_path / "val"), None, str(suite), workers=0, split="validation")
    result = run_eval_suite(cfg, encoder=StubEncoder())
    assert "test" not in read and set(read) == {"train", "validation"}
    got = {(r["dataset"], r["task"]): r for r in result["records"]}
    assert set(got) == {("wds/colours", "linear_probe"), ("wds/heldout_colours", "zeroshot_classification")}
    assert all(r["split"] == "validation" for r in got.values())
    # The probe's figure is on a 30 % fold of train (6 of 18 pictures), which the stub separates exactly.
    probe = got["wds/colours", "linear_probe"]["metrics"]
    assert probe["n_images"] == 6 and probe["lp_acc1"] == 1.0
    assert got["wds/heldout_colours", "zeroshot_classification"]["metrics"]["acc1"] == pytest.approx(2 / 3)
    assert json.loads((tmp_path / "val" / "summary.json").read_text())["split"] == "validation"
    # Done once per settings: the same evaluation again reads nothing and returns what it wrote; other
    # weights are refused, naming the difference, or replace it under overwrite.
    read.clear()
    again = run_eval_suite(cfg, encoder=StubEncoder())
    assert read == [] and again["summary"] == result["summary"] and again["tasks"] == result["tasks"]
    assert sorted(r["dataset"] for r in again["records"]) == sorted(r["dataset"] for r in result["records"])
    with pytest.raises(ClipcidError, match="other settings .*student"):
        run_eval_suite(dataclasses.replace(cfg, weights_identity="other"), encoder=StubEncoder())
    run_eval_suite(dataclasses.replace(cfg, weights_identity="other", overwrite=True), encoder=StubEncoder())
    assert set(read) == {"train", "validation"}
    # At test, every task reads its test split, the held-out one its test half.
    result = run_eval_suite(EvalSuiteConfig("stub", None, None, str(suite), workers=0), encoder=StubEncoder())
    got = {(r["dataset"], r["task"]): r["metrics"] for r in result["records"]}
    assert len(got) == 4 and got["wds/heldout_colours", "zeroshot_classification"]["acc1"] == 0.5
