"""Two "nodes" on this machine, started as a cluster would start them: one torchrun per node,
`--nnodes 2 --node_rank R --rdzv_backend c10d --rdzv_endpoint localhost:PORT`, one gloo process each.
embed and balance must write what one process writes, cluster the same clustering up to float rounding
(k-means sums are all-reduced); distill what one node with two processes trains (the same world size, so
the same global batches)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from conftest import REPO_ROOT, make_shards, run_ok, run_two_gloo_processes, same_files
from test_cluster import same_clustering


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(args: list[str], timeout: int = 600) -> None:
    port = _port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank)]
        cmd += ["--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}"]
        cmd += ["--rdzv_id", f"clipcid-test-{port}", "-m", "clipcid", *args]
        nodes.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for node in nodes:
        _, err = node.communicate(timeout=timeout)
        assert node.returncode == 0, err.decode()[-3000:]


def test_two_nodes_write_what_one_process_writes(tmp_path, tiny_checkpoint):
    make_shards(tmp_path / "shards", n_shards=4, per_shard=24)

    def clipcid(*args: str) -> list[str]:
        return [sys.executable, "-m", "clipcid", *args]

    embed = ["embed", "--data", str(tmp_path / "shards"), "--model", "clipcid-tiny", "--pretrained",
             str(tiny_checkpoint), "--workers", "0", "--out"]  # fmt: skip
    run_ok(clipcid(*embed, str(tmp_path / "one" / "emb")))
    run_two_nodes([*embed, str(tmp_path / "two" / "emb")])
    same_files(tmp_path / "one" / "emb", tmp_path / "two" / "emb")

    for where in ("one", "two"):
        emb = str(tmp_path / "one" / "emb")  # the same input for both, to compare the stage alone
        balance = ["balance", "--emb", emb, "--target-removal", "0.3", "--memory-gb", "0.00001"]
        balance += ["--out", str(tmp_path / where / "bal")]
        cluster = ["cluster", "--emb", emb, "--k", "5", "--balance", str(tmp_path / where / "bal")]
        cluster += ["--out", str(tmp_path / where / "cl")]
        if where == "one":
            run_ok(clipcid(*balance))
            run_ok(clipcid(*cluster))
        else:
            run_two_nodes(balance)
            run_two_nodes(cluster)
    same_files(tmp_path / "one" / "bal", tmp_path / "two" / "bal")
    same_clustering(tmp_path / "one" / "cl", tmp_path / "two" / "cl")  # sums all-reduced: float rounding

    distill = ["distill", "--data", str(tmp_path / "shards"), "--teacher-emb", str(tmp_path / "one" / "emb"),
               "--clusters", str(tmp_path / "one" / "cl"), "--model", "clipcid-tiny", "--batch-size", "8",
               "--workers", "0", "--warmup", "2", "--out"]  # fmt: skip
    run_two_gloo_processes(["-m", "clipcid", *distill, str(tmp_path / "one_node" / "run")])
    run_two_nodes([*distill, str(tmp_path / "two_nodes" / "run")])
    a = torch.load(Path(tmp_path / "one_node" / "run" / "student.pt"), weights_only=True)["state_dict"]
    b = torch.load(Path(tmp_path / "two_nodes" / "run" / "student.pt"), weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
