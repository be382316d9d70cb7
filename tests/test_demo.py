from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import NPM_ROOT, needs_sources, plain_open_clip

from clipcid.demo import DemoConfig, Stages, run_demo
from clipcid.errors import ClipcidError
from clipcid.models import load_model

TINY_RECIPE = {
    "quick": {
        "corpus_limit": 240,
        "image_size": 64,
        "teacher": {"model": "clipcid-lit-efficientnet-lite0", "epochs": 4, "batch_size": 32, "lr": 0.001, "warmup": 2},
        "balance": {"target_removal": 0.4, "metric": "l2"},
        "cluster": {"k": 8},
        "student": {"model": "clipcid-tiny", "epochs": 1, "batch_size": 32, "lr": 0.001, "warmup": 2, "wd": 0.1},
        "cid_weights": {"w_clip": 1.0, "w_cls": 1.0, "w_kl": 0.5, "w_ins": 1.0},
    }
}
SUITE = ["digits", "flags_circle", "names_icons_lucide"]


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

    # Every artifact exists and agrees with the others.
    n_rows = sum(pq.read_table(f).num_rows for f in sorted((out / "teacher_emb" / "metadata").glob("*.parquet")))
    assert n_rows == 240
    keep = np.concatenate([np.load(out / "balance" / "keep" / f"keep_{i}.npy") for i in range(1)])
    labels = np.concatenate([np.load(out / "clusters" / "labels" / f"labels_{i}.npy") for i in range(1)])
    assert len(keep) == len(labels) == 240 and ((labels >= 0) == keep).all()
    assert np.load(out / "clusters" / "centroids.npy").shape[0] == 8
    models = json.loads((out / "models" / "models.json").read_text())
    assert models == {
        "teacher": "clipcid-lit-efficientnet-lite0",
        "student-clip": "clipcid-tiny",
        "student-cid": "clipcid-tiny",
    }
    assert np.load(out / "teacher_emb" / "text_emb" / "text_emb_0.npy").shape == (240, 512)
    assert np.load(out / "teacher_emb" / "img_emb" / "img_emb_0.npy").shape == (240, 512)
    trained = load_model("clipcid-lit-efficientnet-lite0", str(out / "models" / "teacher.pt")).model.state_dict()
    fresh = load_model("clipcid-lit-efficientnet-lite0").model.state_dict()  # ImageNet trunk, pretrained MiniLM
    locked = [k for k in fresh if k.startswith(("visual.trunk.", "text.transformer."))]
    assert locked and all(torch.equal(trained[k], fresh[k]) for k in locked)  # both towers stayed locked
    for name, arch in models.items():
        load_model(arch, str(out / "models" / f"{name}.pt"))
        plain_open_clip(out / "models" / name, tmp_path)  # each also a folder plain open_clip loads
        assert "## Held-out results" in (out / "models" / name / "README.md").read_text()
        summary = json.loads((out / "results" / name / "summary.json").read_text())
        assert summary["linear_probe_mean_acc1"] is not None
    cid_log = (out / "runs" / "student-cid" / "train_log.jsonl").read_text().splitlines()
    clip_log = (out / "runs" / "student-clip" / "train_log.jsonl").read_text().splitlines()
    assert len(cid_log) == len(clip_log)  # same data, same steps
    assert {"cls", "kl", "ins"} <= set(json.loads(cid_log[-1]))
    page = (out / "report.html").read_text()
    for heading in ("Results (%)", "The models at work", "What ran", "Image Semantic Balance", "Training curves"):
        assert heading in page
    showcase = json.loads((out / "results" / "showcase.json").read_text())
    assert set(showcase) == set(models) and len(showcase["teacher"]["top3"]) == 12
    assert page.count("data:image/png;base64,") >= 6 + 12
    table = (out / "results.md").read_text().splitlines()
    assert table[0] == "| task (%) | teacher | student, CLIP loss only | student, CLIP-CID |"
    # 4 means; digits zero-shot and probe, flags zero-shot, icon names zero-shot
    assert table[2].startswith("| **zero-shot mean acc1** |") and len(table) == 2 + 4 + 4
    assert table[3].startswith("| **name-level zero-shot mean acc1** |")
    assert set(result["timings"]) >= {"corpus", "teacher", "embed", "balance", "cluster", "student_cid", "showcase"}

    # Run again: every stage is found done and skipped.
    again = run_demo(DemoConfig(out=str(out), quick=True, workers=1, npm_root=str(NPM_ROOT), recipe=str(recipe)))
    assert again["timings"] == result["timings"]


def test_a_finished_stage_is_skipped_only_with_the_same_settings(tmp_path):
    calls = []
    stages = Stages(tmp_path)
    assert stages.run("teacher", lambda: calls.append(1) or {"steps": 3}, {"teacher": {"epochs": 1}}) == {"steps": 3}
    assert stages.run("teacher", lambda: calls.append(1), {"teacher": {"epochs": 1}}) == {"steps": 3}
    assert calls == [1]
    with pytest.raises(ClipcidError, match="teacher.json was made with other settings.*use another --out"):
        stages.run("teacher", lambda: calls.append(1), {"teacher": {"epochs": 2}})
    assert calls == [1] and set(stages.timings()) == {"teacher"}
