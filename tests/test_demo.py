from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import torch
from conftest import NPM_ROOT, needs_sources, plain_open_clip

from clipcid.demo import DemoConfig, run_demo
from clipcid.evaluation.datasets import build_dataset
from clipcid.evaluation.run import load_encoder, read_names_showcase, read_results, read_suite_results
from clipcid.evaluation.showcase import names_showcase
from clipcid.holdout import HoldOut
from clipcid.layout import RunLayout
from clipcid.models import load_model
from clipcid.pipeline import read_models

TINY_RECIPE = {
    "corpus": {"limit": 240, "image_size": 64},
    "lit": {"model": "clipcid-lit-efficientnet-lite0", "epochs": 4, "batch_size": 32, "lr": 0.001, "warmup": 2},
    "run": {"baseline": True},
    "holdout": {"fraction": 0.15, "min_pairs": 20, "stratify_by": "style", "min_per_stratum": 3},
    "balance": {"target_removal": 0.4, "metric": "l2"},
    "cluster": {"k": 8},
    "distill": {"model": "clipcid-tiny", "epochs": 1, "batch_size": 32, "lr": 0.001, "warmup": 2, "wd": 0.1},
}
SUITE = ["digits", "flags_circle", "names_icons_lucide", "heldout_names_emoji", "heldout_retrieval"]


@needs_sources()
def test_demo_end_to_end_on_a_tiny_slice(tmp_path, monkeypatch):
    import clipcid.corpus.eval_suite as eval_suite

    # The held-out suite in full takes minutes; these exercise every evaluation task but retrieval.
    real_build = eval_suite.build_eval_suite
    monkeypatch.setattr("clipcid.demo.build_eval_suite", lambda cfg: real_build(dataclasses.replace(cfg, only=SUITE)))
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(TINY_RECIPE))
    out = tmp_path / "demo"
    result = run_demo(DemoConfig(out=str(out), quick=True, workers=1, npm_root=str(NPM_ROOT), recipe=str(recipe)))

    # Every artifact exists and agrees with the others; the held-out rows are in none of the training sets.
    n_rows = sum(pq.read_table(f).num_rows for f in sorted((RunLayout(out).teacher_emb / "metadata").glob("*.parquet")))
    assert n_rows == 240
    held = HoldOut.open(RunLayout(out).holdout).masks([240])
    keep = np.load(RunLayout(out).balance / "keep" / "keep_0.npy")
    labels = np.load(RunLayout(out).clusters / "labels" / "labels_0.npy")
    assert len(keep) == len(labels) == 240 and ((labels >= 0) == keep).all()
    assert held.sum() >= 20 and not (keep & held).any()
    assert np.load(RunLayout(out).clusters / "centroids.npy").shape[0] == 8
    models = read_models(out)
    assert {n: m["model"] for n, m in models.items()} == {
        "teacher": "clipcid-lit-efficientnet-lite0",
        "baseline": "clipcid-tiny",
        "student": "clipcid-tiny",
    }
    assert np.load(RunLayout(out).teacher_emb / "text_emb" / "text_emb_0.npy").shape == (240, 512)
    assert np.load(RunLayout(out).teacher_emb / "img_emb" / "img_emb_0.npy").shape == (240, 512)
    teacher_weights = str(RunLayout(out).run("teacher") / "model.pt")
    trained = load_model("clipcid-lit-efficientnet-lite0", teacher_weights).model.state_dict()
    fresh = load_model("clipcid-lit-efficientnet-lite0").model.state_dict()  # ImageNet trunk, pretrained MiniLM
    locked = [k for k in fresh if k.startswith(("visual.trunk.", "text.transformer."))]
    assert locked and all(torch.equal(trained[k], fresh[k]) for k in locked)  # both towers stayed locked
    for name, m in models.items():
        load_model(m["model"], m["pretrained"])
        plain_open_clip(RunLayout(out).model(name), tmp_path)  # each also a folder plain open_clip loads
        assert "## Held-out results" in (RunLayout(out).model(name) / "README.md").read_text()
        summary, _ = read_suite_results(RunLayout(out).evaluation(name))
        assert summary["linear_probe_mean_acc1"] is not None and summary["holdout_retrieval"]
        assert None not in (summary["seen_zeroshot_mean_acc1"], summary["seen_retrieval_mean_recall@5"])
        # The robustness mean is over its tasks alone; the older means leave the seen tasks out.
        _, records = read_suite_results(RunLayout(out).evaluation(name))
        robust = [records[f"{d}_zeroshot_classification"]["metrics"]["acc1"] for d in SUITE[:3]]
        assert summary["robustness_zeroshot_mean_acc1"] == summary["zeroshot_mean_acc1"] == np.mean(robust)
    student_log = (RunLayout(out).run("student") / "train_log.jsonl").read_text().splitlines()
    baseline_log = (RunLayout(out).run("baseline") / "train_log.jsonl").read_text().splitlines()
    assert len(student_log) == len(baseline_log)  # same data, same steps
    assert {"cls", "kl", "ins"} <= set(json.loads(student_log[-1]))
    page = (out / "report.html").read_text()
    for heading in (
        "Results (%)",
        "The models at work",
        "What ran",
        "Image Semantic Balance",
        "Training curves",
        "Inside the students",
        "Patch features (the paper's Fig. 5)",
        "before and after balance (the paper's Fig. 2(d))",
    ):
        assert heading in page
    weights = json.loads((RunLayout(out).inside / "weights.json").read_text())
    assert set(weights) == {"baseline", "student"} and weights["student"]["image"]["change"]["std"] > 0
    spread = json.loads((RunLayout(out).clusters / "stats.json").read_text())["before_and_after_balance"]
    assert spread["before"]["rows"] == 240 - held.sum() and spread["after"]["rows"] == keep.sum()
    records = read_results(out / "results.json")
    assert {r["role"] for r in records} == {"teacher", "baseline", "student"}
    assert page.count("data:image/png;base64,") >= 6 + 12
    table = (out / "results.md").read_text().splitlines()
    # The slice trains each student 3 steps: their difference is marked too short to judge.
    assert table[0].startswith(
        "| task (%) | teacher | baseline (CLIP loss only) | student (CLIP-CID) | student − baseline (too short to "
        "judge: 3 steps (1 epoch(s) of 3)"
    )
    # 6 held-out recalls, 8 means; held-out emoji names and pairs, digits zero-shot and probe, flags
    # zero-shot, icon names zero-shot: the seen tasks first, each with its pictures and chance
    assert table[2].startswith("| **held-out text→image R@1 (") and len(table) == 2 + 6 + 8 + 6
    assert table[8].startswith("| **seen distribution: zero-shot mean acc1** |")
    assert table[16].startswith("| heldout_names_emoji zero-shot (") and "chance" in table[16]
    assert set(result["timings"]) >= {"corpus", "teacher", "holdout", "balance", "cluster", "student", "showcase"}
    # The showcase is each model's evaluation's own answers (made from the features it had computed), and
    # they equal what a fresh encoder gives.
    shown = json.loads((RunLayout(out).showcase / "showcase.json").read_text())["shown"]
    assert shown == {name: read_names_showcase(RunLayout(out).evaluation(name)) for name in models}
    fresh = names_showcase(load_encoder("clipcid-tiny", models["student"]["pretrained"]),
                           build_dataset(shown["student"]["dataset"], str(RunLayout(out).suite)))  # fmt: skip
    assert fresh == shown["student"]

    # Run again: every stage is found done and skipped; its outputs are not written again (the recorded
    # timings alone would not tell: they keep the time of the real work either way).
    made = RunLayout(out)
    assert made.suite == out / "suite" and (made.suite / "suite.json").is_file()  # a folder of its own
    watched = [made.corpus / "00000.tar", made.holdout / "holdout.json", made.suite / "suite.json",
               made.run("teacher") / "model.pt", made.teacher_emb / "embed.json", made.balance / "stats.json",
               made.clusters / "centroids.npy", made.run("student") / "student.pt",
               made.run("baseline") / "student.pt", made.evaluation("student") / "eval.json",
               made.models / "models.json", made.showcase / "showcase.json"]  # fmt: skip
    before = [p.stat().st_mtime_ns for p in watched]
    again = run_demo(DemoConfig(out=str(out), quick=True, workers=1, npm_root=str(NPM_ROOT), recipe=str(recipe)))
    assert [p.stat().st_mtime_ns for p in watched] == before
    assert again["timings"] == result["timings"]
