from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from conftest import NPM_ROOT, make_shards, needs_sources, run_two_gloo_processes

import clipcid.distill.train as train_module
from clipcid.cluster import ClusterConfig, cluster
from clipcid.distill.data import interleave
from clipcid.distill.train import DistillConfig, distill
from clipcid.embed import EmbedConfig, embed
from clipcid.errors import ClipcidError


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("pipeline")
    make_shards(root / "shards", n_shards=4, per_shard=24)
    embed(
        EmbedConfig(
            data=str(root / "shards"),
            model="clipcid-tiny",
            out=str(root / "emb"),
            pretrained=str(tiny_checkpoint),
            batch_size=32,
            workers=0,
        )
    )
    cluster(ClusterConfig(emb=str(root / "emb"), out=str(root / "clusters"), k=6, plots=False))
    return root


def _cfg(pipeline, out, **kw) -> DistillConfig:
    base = dict(
        data=str(pipeline / "shards"),
        teacher_emb=str(pipeline / "emb"),
        clusters=str(pipeline / "clusters"),
        out=str(out),
        model="clipcid-tiny",
        batch_size=16,
        workers=0,
        warmup=2,
        lr=1e-3,
        log_every_n_steps=1,
        seed=0,
    )
    base.update(kw)
    return DistillConfig(**base)


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_training_lowers_every_loss_term(pipeline, tmp_path):
    out = tmp_path / "run"
    result = distill(_cfg(pipeline, out, epochs=8))
    log = _log(out)
    assert result["steps"] == len(log) == 8 * 6  # 96 rows, batch 16
    for term in ("clip", "cls", "kl", "ins"):
        first = np.mean([r[term] for r in log[:6]])
        last = np.mean([r[term] for r in log[-6:]])
        assert last < first, f"{term}: {first:.4f} -> {last:.4f}"
    params = json.loads((out / "params.json").read_text())
    assert params["steps_per_epoch"] == 6 and params["w_kl"] == 0.5
    # The student alone loads in open_clip as is.
    model, _, _ = open_clip.create_model_and_transforms("clipcid-tiny", pretrained=str(out / "student.pt"))
    saved = torch.load(out / "student.pt")["state_dict"]
    torch.testing.assert_close(model.state_dict()["visual.conv1.weight"], saved["visual.conv1.weight"])
    assert (out / "distill_heads.pt").is_file() and (out / "classifier_rank0.pt").is_file()
    assert list((out / "tensorboard").iterdir())


def test_resume_equals_uninterrupted(pipeline, tmp_path):
    straight = tmp_path / "straight"
    distill(_cfg(pipeline, straight, epochs=2, max_steps=9))
    interrupted = tmp_path / "interrupted"
    distill(_cfg(pipeline, interrupted, epochs=2, max_steps=4, save_every_n_steps=4))
    assert (interrupted / "checkpoints" / "latest.txt").read_text().strip() == "step_00000004"
    distill(_cfg(pipeline, interrupted, epochs=2, max_steps=9, resume="latest"))
    a = torch.load(straight / "student.pt")["state_dict"]
    b = torch.load(interrupted / "student.pt")["state_dict"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    wa = torch.load(straight / "classifier_rank0.pt")["weight"]
    wb = torch.load(interrupted / "classifier_rank0.pt")["weight"]
    torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in _log(interrupted)][-5:] == [5, 6, 7, 8, 9]


def test_only_the_newest_checkpoints_are_kept(pipeline, tmp_path):
    pruned = tmp_path / "pruned"
    distill(_cfg(pipeline, pruned, max_steps=4, save_every_n_steps=1, keep_checkpoints=2))
    assert sorted(p.name for p in (pruned / "checkpoints").iterdir()) == [
        "latest.txt",
        "step_00000003",
        "step_00000004",
    ]
    distill(_cfg(pipeline, pruned, max_steps=5, save_every_n_steps=1, keep_checkpoints=2, resume="latest"))
    assert sorted(p.name for p in (pruned / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000005"]
    every = tmp_path / "every"
    distill(_cfg(pipeline, every, max_steps=3, save_every_n_steps=1, keep_checkpoints=0))
    assert len(list((every / "checkpoints").glob("step_*"))) == 3
    with pytest.raises(ClipcidError, match="--keep-checkpoints"):
        distill(_cfg(pipeline, tmp_path / "bad", keep_checkpoints=-1))


def test_resume_with_two_loader_workers_continues_their_turns(pipeline, tmp_path):
    # Stopped after an odd step, the next batch is due from the second worker, not the first.
    straight = tmp_path / "straight"
    distill(_cfg(pipeline, straight, epochs=1, workers=2))
    interrupted = tmp_path / "interrupted"
    distill(_cfg(pipeline, interrupted, epochs=1, workers=2, max_steps=3, save_every_n_steps=3))
    with open(interrupted / "train_log.jsonl", "a") as f:  # rows written after the checkpoint, then a kill
        f.write(json.dumps({"step": 4, "epoch": 0, "total": 1.0}) + "\n")
    distill(_cfg(pipeline, interrupted, epochs=1, workers=2, resume="latest"))
    a = torch.load(straight / "student.pt")["state_dict"]
    b = torch.load(interrupted / "student.pt")["state_dict"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert [r["step"] for r in _log(interrupted)] == [1, 2, 3, 4, 5, 6]  # each step logged once


def test_non_finite_loss_stops_without_corrupting_the_checkpoint(pipeline, tmp_path, monkeypatch):
    out = tmp_path / "run"
    distill(_cfg(pipeline, out, max_steps=2, save_every_n_steps=2))
    before = (out / "checkpoints" / "step_00000002" / "model.pt").read_bytes()
    real_losses = train_module.Trainer.losses

    def poisoned(self, batch):
        terms = real_losses(self, batch)
        terms["kl"] = terms["kl"] * float("nan")
        return terms

    monkeypatch.setattr(train_module.Trainer, "losses", poisoned)
    with pytest.raises(ClipcidError, match="loss is not finite \\(kl\\)"):
        distill(_cfg(pipeline, out, max_steps=4, save_every_n_steps=1, resume="latest"))
    assert (out / "checkpoints" / "latest.txt").read_text().strip() == "step_00000002"
    assert (out / "checkpoints" / "step_00000002" / "model.pt").read_bytes() == before


def test_terms_switch_off_and_baselines_run(pipeline, tmp_path):
    result = distill(
        _cfg(pipeline, tmp_path / "base", clusters=None, w_cls=0, w_kl=0, w_ins=0, w_simkd=1.0, w_fd=1.0, max_steps=2)
    )
    assert set(result["last"]) == {"clip", "simkd", "fd", "total", "lr"}
    with pytest.raises(ClipcidError, match="need --clusters"):
        distill(_cfg(pipeline, tmp_path / "x", clusters=None, max_steps=1))


def test_interleave_follows_the_dataloader_turns():
    assert interleave([2, 1, 3]) == [0, 1, 2, 0, 2, 2]


def test_two_gloo_processes_train(pipeline, tmp_path):
    out = tmp_path / "ddp"
    run_two_gloo_processes(
        [
            "-m",
            "clipcid",
            "distill",
            "--data",
            str(pipeline / "shards"),
            "--teacher-emb",
            str(pipeline / "emb"),
            "--clusters",
            str(pipeline / "clusters"),
            "--model",
            "clipcid-tiny",
            "--out",
            str(out),
            "--batch-size",
            "8",
            "--workers",
            "0",
            "--max-steps",
            "3",
            "--save-every-n-steps",
            "3",
            "--device",
            "cpu",
        ]
    )
    assert (out / "student.pt").is_file()
    assert sorted(p.name for p in (out / "checkpoints" / "step_00000003").iterdir()) == [
        "model.pt",
        "rank0.pt",
        "rank1.pt",
    ]
    shards = [torch.load(out / f"classifier_rank{r}.pt")["shard"] for r in range(2)]
    assert shards == [(0, 3), (3, 6)]


@needs_sources()
def test_eval_every_logs_the_suite_averages(pipeline, tmp_path):
    from clipcid.corpus.eval_suite import BuildEvalConfig, build_eval_suite

    build_eval_suite(BuildEvalConfig(str(tmp_path / "suite"), npm_root=str(NPM_ROOT), workers=1, only=["digits"]))
    out = tmp_path / "run"
    distill(_cfg(pipeline, out, max_steps=2, eval_every=2, eval_suite_root=str(tmp_path / "suite")))
    (line,) = (out / "results.jsonl").read_text().splitlines()
    result = json.loads(line)
    assert result["step"] == 2 and 0 < result["linear_probe_mean_acc1"] <= 1 and result["zeroshot_mean_acc1"] >= 0


def test_clip_only_run_needs_no_teacher(pipeline, tmp_path):
    cfg = dict(teacher_emb=None, clusters=None, w_cls=0, w_kl=0, w_ins=0, max_steps=2)
    result = distill(_cfg(pipeline, tmp_path / "clip_only", **cfg))
    assert set(result["last"]) == {"clip", "total", "lr"} and result["steps"] == 2
    with pytest.raises(ClipcidError, match="--w-ins need --teacher-emb"):
        distill(_cfg(pipeline, tmp_path / "x", **{**cfg, "w_ins": 1.0}))


def test_a_run_too_short_to_judge_says_so_and_its_warm_up_scales_with_it():
    from clipcid.distill.train import DistillConfig, too_short, warmup_steps

    # Unset, the warm-up is 5 % of the run; set, it is kept.
    assert warmup_steps(DistillConfig(data="", out="", model="m"), 29) == 1
    assert warmup_steps(DistillConfig(data="", out="", model="m"), 4000) == 200
    assert warmup_steps(DistillConfig(data="", out="", model="m", warmup=50), 29) == 50
    # The run: 29 steps against the recipe's 50 warm-up steps.
    reason = too_short(29, 50, 29, 1)
    assert "fewer than its 50 warm-up steps and fewer than the 100 a comparison of students needs" in reason
    assert reason.endswith("--epochs 4 (or more data) would give 116")
    assert too_short(188, 50, 188, 1) is None and too_short(188, 200, 188, 1).endswith(
        "--epochs 2 (or more data) would give 376"
    )


def test_a_rank_holds_the_rows_of_the_parts_it_reads_not_of_the_corpus(pipeline, monkeypatch):
    """Every part's count is known (the steps need them); a part's rows, labels and keys are read from the
    artifacts when the part is read, by a selector a loader worker can take with it."""
    import pickle

    from clipcid.cluster.artifact import Clusters
    from clipcid.distill.data import PartSelector, load_train_rows
    from clipcid.embed.artifact import Embeddings

    train = load_train_rows(str(pipeline / "shards"), str(pipeline / "emb"), None, str(pipeline / "clusters"))
    assert isinstance(train.select, PartSelector) and not hasattr(train, "rows")
    embeddings = Embeddings.open(pipeline / "emb")
    clusters = Clusters.open(pipeline / "clusters", embeddings)
    for p in range(4):
        rows, labels, keys = train.part(p)
        assert rows.dtype == np.int32 and labels.dtype == np.int32 and len(rows) == train.counts[p] == 24
        assert np.array_equal(labels, clusters.labels(p)[rows])
        assert keys.to_pylist() == [embeddings.keys(p)[int(r)].as_py() for r in rows]
    # A worker's copy opens the artifacts itself (none travels with it) and selects the same rows.
    copy = pickle.loads(pickle.dumps(train.select))
    assert "_opened" not in copy.__dict__
    assert all(np.array_equal(copy(p)[0], train.part(p)[0]) for p in range(4))
