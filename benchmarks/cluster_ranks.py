"""The same clusters on any number of ranks, tried as a user would (issue: planted blobs, two-level k-means):
`clipcid cluster` on 1 process, then under torchrun on 2 and 4 gloo ranks (CPU), the same data and seed.
Prints, per rank count, the share of rows with the same label as on 1 process, the ARI against it, whether
the centroids are equal bit for bit, the last objective, and the wall time; the anchor is the 1-process run.

    python benchmarks/cluster_ranks.py --n 400000 --dim 128 --blobs 4096 --k 4096 --niter 10 [--ranks 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from cluster import write_blobs
from sklearn.metrics import adjusted_rand_score


def run(emb: Path, out: Path, ranks: int, args) -> float:
    command = ["-m", "clipcid", "cluster", "--emb", str(emb), "--out", str(out), "--k", str(args.k),
               "--two-level", args.two_level, "--niter", str(args.niter), "--seed", "0", "--device", "cpu",
               "--no-plots"]  # fmt: skip
    if ranks > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
                   "--master_port", str(port), *command]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    start = time.perf_counter()
    subprocess.run([sys.executable, *command], check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def labels(out: Path) -> np.ndarray:
    files = sorted((out / "labels").glob("labels_*.npy"), key=lambda p: int(p.stem.split("_")[1]))
    return np.concatenate([np.load(f) for f in files])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=400_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--blobs", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--niter", type=int, default=10)
    p.add_argument("--two-level", default="on")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        emb = write_blobs(Path(tmp) / "emb", args.n, args.dim, args.blobs)
        rows = []
        for ranks in args.ranks:
            out = Path(tmp) / f"ranks{ranks}"
            seconds = run(emb, out, ranks, args)
            stats = json.loads((out / "stats.json").read_text())
            rows.append((ranks, labels(out), np.load(out / "centroids.npy"), stats, seconds))
        anchor = rows[0]
        print(f"{'ranks':>5} {'same labels':>11} {'ARI':>8} {'centroids equal':>15} {'objective':>16} {'seconds':>8}")
        for ranks, lab, cen, stats, seconds in rows:
            same = float((lab == anchor[1]).mean())
            ari = adjusted_rand_score(anchor[1], lab)
            objective = (stats.get("objective_per_iteration") or [float("nan")])[-1]
            print(f"{ranks:>5} {100 * same:>10.3f}% {ari:>8.5f} {str(np.array_equal(cen, anchor[2])):>15} "
                  f"{objective:>16.6f} {seconds:>8.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
