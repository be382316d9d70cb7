"""Never loses work, never runs what it should not.

Kill-and-resume: each stage is started as a real process and killed with SIGKILL the moment a file
appears (a trigger, not a time), then run again to the end; its outputs must equal an uninterrupted
run's. Bad inputs: every one gives one line `clipcid: error: ...`, exit code 2, no traceback, and leaves
nothing half written. A crafted checkpoint must not run code.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import _clipcid, make_shards, run_and_kill_when, run_ok, same_files, shape_png
from test_cluster import same_clustering

from clipcid.cli import main
from clipcid.inputs.shards import write_tar_atomic


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("faults")
    make_shards(root / "shards", n_shards=4, per_shard=40)
    run_ok(
        _clipcid(
            "embed",
            "--data",
            str(root / "shards"),
            "--model",
            "clipcid-tiny",
            "--pretrained",
            str(tiny_checkpoint),
            "--out",
            str(root / "emb"),
            "--workers",
            "0",
        )
    )
    run_ok(_clipcid("cluster", "--emb", str(root / "emb"), "--out", str(root / "clusters"), "--k", "4"))
    return root


# -- kill and resume -------------------------------------------------------------------------------


def test_embed_killed_after_a_part_resumes_to_the_same_bytes(corpus, tmp_path, tiny_checkpoint):
    args = ["embed", "--data", str(corpus / "shards"), "--model", "clipcid-tiny"]
    args += ["--pretrained", str(tiny_checkpoint), "--workers", "0", "--batch-size", "16", "--out"]
    out = tmp_path / "emb"
    assert run_and_kill_when(_clipcid(*args, str(out)), out / "metadata", "metadata_1.parquet")
    assert not (out / "metadata" / "metadata_3.parquet").exists()
    code = main(["balance", "--emb", str(out), "--out", str(tmp_path / "bal")])  # a half-made input is refused
    assert code == 2
    run_ok(_clipcid(*args, str(out)))
    same_files(corpus / "emb", out)


@pytest.fixture(scope="module")
def many_rows(tmp_path_factory) -> Path:
    """4,000 unit vectors in 8 parts with near-duplicates planted, in the embeddings layout."""
    from clipcid.embed.artifact import write_part

    root = tmp_path_factory.mktemp("many_rows")
    rng = np.random.default_rng(3)
    base = rng.normal(size=(2500, 16))
    x = np.concatenate([base, base[:1500] + 0.01 * rng.normal(size=(1500, 16))])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    for i, rows in enumerate(np.array_split(np.arange(len(x)), 8)):
        keys = pa.array([f"{i}-{r}" for r in range(len(rows))])
        write_part(root, i, 8, x[rows], x[rows], {"key": keys, "valid": pa.array([True] * len(rows))})
    return root


def test_balance_killed_after_an_edge_block_resumes_to_the_same_bytes(many_rows, tmp_path):
    args = ["balance", "--emb", str(many_rows), "--target-removal", "0.3", "--memory-gb", "0.00002"]
    run_ok(_clipcid(*args, "--out", str(tmp_path / "straight")))
    out = tmp_path / "killed"
    assert run_and_kill_when(_clipcid(*args, "--out", str(out)), out / "edges", "block_000001.npz")
    run_ok(_clipcid(*args, "--out", str(out)))
    same_files(tmp_path / "straight", out)


def test_cluster_killed_after_a_labels_part_resumes_to_the_same_bytes(many_rows, tmp_path):
    args = ["cluster", "--emb", str(many_rows), "--k", "20"]
    run_ok(_clipcid(*args, "--out", str(tmp_path / "straight")))
    out = tmp_path / "killed"
    assert run_and_kill_when(_clipcid(*args, "--out", str(out)), out / "labels", "labels_0.npy")
    run_ok(_clipcid(*args, "--out", str(out)))
    same_files(tmp_path / "straight", out)


def _torchrun_two() -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    return torchrun + ["--master_port", port, "-m", "clipcid"]


def test_two_ranks_killed_mid_merge_or_mid_assignment_resume_from_their_finished_parts(many_rows, tmp_path):
    """A rank lost mid-way costs its unfinished parts: the edge blocks and label parts written stay."""
    balance = ["balance", "--emb", str(many_rows), "--target-removal", "0.3", "--memory-gb", "0.00002"]
    run_ok(_clipcid(*balance, "--out", str(tmp_path / "bal_one")))
    out = tmp_path / "bal_two"
    assert run_and_kill_when(_torchrun_two() + [*balance, "--out", str(out)], out / "edges", "block_000003.npz")
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "edges").glob("block_*.npz")}
    run_ok(_torchrun_two() + [*balance, "--out", str(out)])
    assert all((out / "edges" / name).stat().st_mtime_ns == t for name, t in kept.items())  # not searched again
    same_files(tmp_path / "bal_one", out)
    cluster = ["cluster", "--emb", str(many_rows), "--k", "20", "--device", "cpu"]
    run_ok(_clipcid(*cluster, "--out", str(tmp_path / "cl_one")))
    out = tmp_path / "cl_two"
    assert run_and_kill_when(_torchrun_two() + [*cluster, "--out", str(out)], out / "labels", "labels_1.npy")
    done = {p.name: p.stat().st_mtime_ns for p in (out / "labels").glob("labels_*.npy")}
    run_ok(_torchrun_two() + [*cluster, "--out", str(out)])
    assert all((out / "labels" / name).stat().st_mtime_ns == t for name, t in done.items())
    same_clustering(tmp_path / "cl_one", out)


def _distill_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "distill",
        *("--data", str(corpus / "shards"), "--teacher-emb", str(corpus / "emb")),
        *("--clusters", str(corpus / "clusters"), "--model", "clipcid-tiny", "--out", str(out)),
        *("--batch-size", "8", "--epochs", "2", "--warmup", "2", "--lr", "1e-3", "--workers", "2"),
        *("--save-every-n-steps", "3", "--log-every-n-steps", "1", "--resume", "latest", *extra),
    ]


def _weights(run: Path) -> dict:
    return torch.load(run / "student.pt", weights_only=True)["state_dict"]


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_distill_with_two_loader_workers_killed_mid_epoch_resumes_exactly(corpus, tmp_path):
    run_ok(_clipcid(*_distill_args(corpus, tmp_path / "straight")))
    out = tmp_path / "killed"
    # Killed the moment the first checkpoint (step 3) is pointed at: mid-epoch, an odd step.
    assert run_and_kill_when(_clipcid(*_distill_args(corpus, out)), out / "checkpoints", "latest.txt")
    run_ok(_clipcid(*_distill_args(corpus, out)))
    a, b = _weights(tmp_path / "straight"), _weights(out)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    assert _steps(out) == _steps(tmp_path / "straight")  # each step logged once


def test_distill_on_two_gloo_ranks_killed_mid_epoch_resumes_exactly(corpus, tmp_path):
    torchrun = _torchrun_two()

    def cmd(out: Path) -> list[str]:
        return torchrun + _distill_args(corpus, out, "--batch-size", "4", "--workers", "1")

    run_ok(cmd(tmp_path / "straight"))
    out = tmp_path / "killed"
    assert run_and_kill_when(cmd(out), out / "checkpoints", "latest.txt")
    run_ok(cmd(out))
    a, b = _weights(tmp_path / "straight"), _weights(out)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    assert _steps(out) == _steps(tmp_path / "straight")


# -- bad inputs: one line, exit 2, nothing half --------------------------------------------------------


def _one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    last = err[-1]
    assert last.startswith("clipcid: error: "), err
    assert not any("Traceback" in line for line in err), err
    for needle in needles:
        assert needle in last, last
    return last


def test_out_that_is_a_file_is_refused_by_every_command(corpus, tmp_path, capsys, tiny_checkpoint):
    taken = tmp_path / "a_file"
    taken.write_text("not a folder")
    emb, data = str(corpus / "emb"), str(corpus / "shards")
    commands = [
        ["embed", "--data", data, "--model", "clipcid-tiny", "--pretrained", str(tiny_checkpoint), "--out"],
        ["balance", "--emb", emb, "--out"],
        ["cluster", "--emb", emb, "--k", "4", "--out"],
        ["distill", "--data", data, "--model", "clipcid-tiny", "--w-cls", "0", "--w-kl", "0", "--w-ins", "0", "--out"],
        ["eval-suite", "--model", "clipcid-tiny", "--suite-root", str(tmp_path), "--out"],
        ["data", "build-demo", "--out"],
        ["data", "build-eval", "--out"],
        ["study", "--demo", str(tmp_path), "--out"],
    ]
    for args in commands:
        _one_line_error(capsys, main([*args, str(taken)]), str(taken))
        assert taken.read_text() == "not a folder"


def test_numbers_that_are_not_numbers_are_refused(corpus, tmp_path, capsys):
    emb = str(corpus / "emb")
    _one_line_error(capsys, main(["balance", "--emb", emb, "--out", str(tmp_path / "b"), "--threshold", "nan"]))
    _one_line_error(capsys, main(["balance", "--emb", emb, "--out", str(tmp_path / "b"), "--memory-gb", "-1"]))
    assert not (tmp_path / "b").exists()


def test_distill_refuses_unknown_models_tags_and_foreign_checkpoints(corpus, tmp_path, capsys):
    base = ["distill", "--data", str(corpus / "shards"), "--out", str(tmp_path / "run")]
    base += ["--w-cls", "0", "--w-kl", "0", "--w-ins", "0"]
    _one_line_error(capsys, main([*base, "--model", "ViT-Q-99"]), "unknown model architecture")
    _one_line_error(capsys, main([*base, "--model", "clipcid-tiny", "--pretrained", "laion9000"]), "pretrained tag")
    other = tmp_path / "small.pt"
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(3)}}, other)
    _one_line_error(capsys, main([*base, "--model", "clipcid-tiny", "--pretrained", str(other)]), "does not match")
    text = tmp_path / "notes.pt"
    text.write_text("these are my notes, not weights")
    _one_line_error(capsys, main([*base, "--model", "clipcid-tiny", "--pretrained", str(text)]), "not a checkpoint")


def test_a_clusters_folder_missing_a_labels_part_is_refused(corpus, tmp_path, capsys):
    import shutil

    broken = tmp_path / "clusters"
    shutil.copytree(corpus / "clusters", broken)
    (broken / "labels" / "labels_2.npy").unlink()
    args = ["distill", "--data", str(corpus / "shards"), "--teacher-emb", str(corpus / "emb")]
    args += ["--clusters", str(broken), "--model", "clipcid-tiny", "--out", str(tmp_path / "run")]
    _one_line_error(capsys, main(args), "no labels for part(s) [2]")


def test_a_rerun_with_other_settings_is_refused_and_overwrite_replaces_it(corpus, tmp_path, capsys):
    args = ["balance", "--emb", str(corpus / "emb"), "--out", str(tmp_path / "bal")]
    assert main([*args, "--threshold", "0.2"]) == 0
    keep = (tmp_path / "bal" / "keep" / "keep_0.npy").read_bytes()
    _one_line_error(capsys, main([*args, "--threshold", "0.3"]), "other settings", "threshold", "--overwrite")
    assert (tmp_path / "bal" / "keep" / "keep_0.npy").read_bytes() == keep  # nothing touched
    assert main([*args, "--threshold", "0.3", "--overwrite"]) == 0
    assert json.loads((tmp_path / "bal" / "stats.json").read_text())["threshold"] == 0.3


def test_embed_into_a_folder_of_other_shards_is_refused(corpus, tmp_path, capsys, tiny_checkpoint):
    make_shards(tmp_path / "other", n_shards=4, per_shard=30, seed=9)  # same names, other content
    args = ["embed", "--model", "clipcid-tiny", "--pretrained", str(tiny_checkpoint), "--workers", "0"]
    import shutil

    shutil.copytree(corpus / "emb", tmp_path / "emb")
    _one_line_error(capsys, main([*args, "--data", str(tmp_path / "other"), "--out", str(tmp_path / "emb")]), "inputs")


def test_one_run_per_folder_and_a_dead_holders_lock_is_taken_over(corpus, tmp_path, capsys, caplog):
    args = ["cluster", "--emb", str(corpus / "emb"), "--k", "4", "--out", str(tmp_path / "cl")]
    (tmp_path / "cl").mkdir()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lock = {"pid": holder.pid, "host": socket.gethostname(), "since": "2026-01-01 00:00:00"}
        (tmp_path / "cl" / ".lock").write_text(json.dumps(lock))
        _one_line_error(capsys, main(args), f"in use by pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert main(args) == 0  # the holder is gone: its lock is taken over
    assert "taking over the lock" in caplog.text and not (tmp_path / "cl" / ".lock").exists()


def test_non_finite_embedding_rows_are_invalid_everywhere(tmp_path):
    from clipcid.balance import BalanceConfig, balance
    from clipcid.cluster import ClusterConfig, cluster

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 16)).astype(np.float16)
    x[[3, 50]] = np.nan
    x[70, 0] = np.inf
    for kind in ("img_emb", "metadata"):
        (tmp_path / "emb" / kind).mkdir(parents=True, exist_ok=True)
    np.save(tmp_path / "emb" / "img_emb" / "img_emb_0.npy", x)
    pq.write_table(
        pa.table({"key": [str(i) for i in range(120)], "valid": [True] * 120}),
        tmp_path / "emb" / "metadata" / "metadata_0.parquet",
    )
    stats = balance(BalanceConfig(emb=str(tmp_path / "emb"), out=str(tmp_path / "bal"), threshold=0.01))
    assert stats["valid"] == 117 and stats["non_finite_rows"] == 3
    assert not np.load(tmp_path / "bal" / "keep" / "keep_0.npy")[[3, 50, 70]].any()
    cstats = cluster(ClusterConfig(emb=str(tmp_path / "emb"), out=str(tmp_path / "cl"), k=3))
    labels = np.load(tmp_path / "cl" / "labels" / "labels_0.npy")
    assert (labels[[3, 50, 70]] == -1).all() and cstats["assigned"] == 117


def test_damaged_shards_are_kept_up_to_the_damage_and_training_counts_them(tmp_path, capsys, tiny_checkpoint):
    make_shards(tmp_path / "shards", n_shards=3, per_shard=40)
    whole = (tmp_path / "shards" / "00002.tar").read_bytes()
    (tmp_path / "shards" / "00002.tar").write_bytes(whole[: len(whole) // 2])
    emb = str(tmp_path / "emb")
    code = main(["embed", "--data", str(tmp_path / "shards"), "--model", "clipcid-tiny", "--pretrained",
                 str(tiny_checkpoint), "--out", emb, "--workers", "0"])  # fmt: skip
    assert code == 0
    record = json.loads((tmp_path / "emb" / "embed.json").read_text())
    assert [d["shard"] for d in record["damaged_shards"]] == ["00002.tar"]
    assert 0 < pq.read_table(tmp_path / "emb" / "metadata" / "metadata_2.parquet").num_rows < 40
    args = ["distill", "--data", str(tmp_path / "shards"), "--teacher-emb", emb, "--model", "clipcid-tiny"]
    args += ["--w-cls", "0", "--w-kl", "0", "--batch-size", "8", "--workers", "0", "--max-steps", "2"]
    _one_line_error(capsys, main([*args, "--out", str(tmp_path / "r1")]), "--max-bad-fraction")
    assert main([*args, "--out", str(tmp_path / "r2"), "--max-bad-fraction", "0.5"]) == 0


def test_undecodable_images_are_skipped_in_training_without_a_teacher(tmp_path, caplog):
    samples = [{"__key__": f"{i:04d}", "png": shape_png("red", "circle"), "txt": "a red circle"} for i in range(200)]
    samples[17]["png"] = b"\x89PNG\r\n\x1a\n but nothing after the signature"
    write_tar_atomic(tmp_path / "shards" / "00000.tar", samples)
    args = ["distill", "--data", str(tmp_path / "shards"), "--model", "clipcid-tiny", "--out", str(tmp_path / "run")]
    args += ["--w-cls", "0", "--w-kl", "0", "--w-ins", "0", "--batch-size", "8", "--workers", "0", "--max-steps", "2"]
    assert main(args) == 0
    assert "skipping 1 of 200 rows" in caplog.text


def test_a_full_disk_gives_one_line_and_no_half_file(corpus, tmp_path, capsys, monkeypatch):
    import errno

    import clipcid.util.fileio as fileio

    real = fileio.np.save
    calls = {"n": 0}

    def fill_up(f, array):
        calls["n"] += 1
        if calls["n"] == 3:
            f.write(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(getattr(f, "name", "")))
        return real(f, array)

    monkeypatch.setattr(fileio.np, "save", fill_up)
    _one_line_error(capsys, main(["balance", "--emb", str(corpus / "emb"), "--out", str(tmp_path / "bal")]), "No space")
    written = list((tmp_path / "bal").rglob("*.npy"))
    assert all(np.load(f).size >= 0 for f in written)  # every file there is whole
    assert not list((tmp_path / "bal").rglob("*.tmp"))


# -- security --------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_runs_no_code(corpus, tmp_path, capsys):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "checkpoints" / "step_00000001"
    crafted.mkdir(parents=True)
    torch.save({"student": _Payload(marker)}, crafted / "model.pt")  # torch.load(weights_only=False) runs it
    (crafted / "rank0.pt").write_bytes((crafted / "model.pt").read_bytes())
    (tmp_path / "checkpoints" / "latest.txt").write_text("step_00000001\n")
    base = ["distill", "--data", str(corpus / "shards"), "--model", "clipcid-tiny", "--w-cls", "0", "--w-kl", "0"]
    base += ["--w-ins", "0", "--workers", "0", "--batch-size", "8"]
    _one_line_error(capsys, main([*base, "--out", str(tmp_path), "--resume", "latest"]), "not a checkpoint")
    _one_line_error(capsys, main([*base, "--out", str(tmp_path / "r2"), "--pretrained", str(crafted / "model.pt")]))
    assert not marker.exists()
