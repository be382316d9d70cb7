"""The middle stages' cost per row, measured: what docs/scaling.md's plan is computed from.

On synthetic clustered embeddings (unit vectors around 20,000 random centres, 60 % of them planted
near-duplicates of others, 0.03 away, so that balance at 0.07 removes a third, near the paper's 43.7 %) of
0.5M, 1M, 2M and 4M rows at 256-d, and 1M at 1,280-d, on 1 and 2 ranks (torchrun, gloo), it measures
each stage alone, each in a process of its own so that its peak memory is its own:

- join: balance's IVF cell join (nlist = sqrt(N * nprobe), nprobe 4), the edge blocks written;
- merge: the blocks' spanning forests merged and the components taken (balance's reduce);
- lloyd: one k-means iteration at k = 4,096 (flat: assign, sums, all-reduce);
- assign: the two-level assignment of every row at k = 65,536 (256 cells, nprobe 8).

With --memory it instead runs whole stages (balance with IVF search, cluster) on planted 8-d embeddings
(so that the per-row bookkeeping, not the vectors, dominates) at two sizes on 1, 2 and 4 ranks, takes
each rank's tracemalloc peak (numpy reports its arrays there), fits memory = a + b·N/ranks + c·N per stage
for rank 0 and for the other ranks, and prints c, the bytes each rank holds per row of the whole corpus.

    python benchmarks/scale.py --memory [--memory-sizes 250000 500000] [--memory-ranks 1 2 4]

It prints a table per stage: rows, ranks, seconds, rows per second, peak resident memory per rank, and
the exponent of time against rows fitted over the 256-d sizes (the anchor: exponent 1, the cost of
reading each row once; the IVF join is expected near 1.5 by nlist = sqrt(N * nprobe)). With --json it
writes every figure there, and with --plot a log-log plot of seconds against rows.

    python benchmarks/scale.py [--sizes 500000 1000000 2000000 4000000] [--ranks 1 2] [--json OUT.json]
        [--plot OUT.png] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

STAGES = ("join", "merge", "lloyd", "assign")
K_LLOYD, K_ASSIGN, CELLS, NPROBE_ASSIGN = 4096, 65536, 256, 8
PART_ROWS = 250_000


def write_data(root: Path, n: int, dim: int, seed: int = 0, part_rows: int = PART_ROWS) -> Path:
    """Parts of unit float16 rows around 20,000 centres, 60 % planted near-duplicates, with embed.json
    saying validity is decided (as `clipcid embed` writes it)."""
    from clipcid.embed.artifact import VALIDITY

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20_000, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    n_parts = -(-n // part_rows)
    for i in range(n_parts):
        rows = min(part_rows, n - i * part_rows)
        x = centres[rng.integers(len(centres), size=rows)] + 0.5 * rng.standard_normal((rows, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        dup = rng.choice(rows, size=rows * 6 // 10, replace=False)
        noise = rng.standard_normal((len(dup), dim), dtype=np.float32)  # |noise| 0.03: within 0.07 of the original
        x[dup] = x[rng.integers(rows, size=len(dup))] + 0.03 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(root / "img_emb" / f"img_emb_{i}.npy", x.astype(np.float16))
        pq.write_table(pa.table({"key": [str(j) for j in range(rows)], "valid": np.ones(rows, bool)}),
                       root / "metadata" / f"metadata_{i}.parquet")  # fmt: skip
    settings = {"parts": n_parts, "inputs": [f"synthetic-{n}-{dim}-{seed}"]}
    (root / "embed.json").write_text(json.dumps({"settings": settings, "complete": True, "validity": VALIDITY}))
    return root


def worker(stage: str, emb: str, out: str, device: str) -> None:
    """One stage, measured inside this process (and its rank peers under torchrun)."""
    import torch

    from clipcid.balance.run import BalanceConfig, EdgeSearch, ValidEmbeddings, components, to_similarity
    from clipcid.cluster.kmeans import lloyd
    from clipcid.cluster.run import Assigner
    from clipcid.embed.artifact import Embeddings
    from clipcid.stage import barrier, distributed, unit_rows

    with distributed(device) as env:
        embeddings = Embeddings.open(emb)
        store = embeddings.images
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.world_size))
        cfg = BalanceConfig(emb=emb, out=out, search="ivf", nprobe=4, memory_gb=2.0, device=device)
        if stage in ("join", "merge"):
            data = ValidEmbeddings(store, cfg.memory_gb)
            search = EdgeSearch(cfg, data, env, env.device)
            sim = to_similarity(0.07 * 1.5, "l2")
            if stage == "merge":
                search.run(sim)  # the blocks the merge reads, not timed
            barrier(env)
            start = time.perf_counter()
            if stage == "join":
                search.run(sim)
            else:
                forest, _ = search.reduce(np.ones(data.n, dtype=bool))
                if env.is_main:
                    components(
                        data.n,
                        forest.a[forest.s > to_similarity(0.07, "l2")],
                        forest.b[forest.s > to_similarity(0.07, "l2")],
                    )
            barrier(env)
        else:
            rows = np.array_split(np.arange(store.total), env.world_size)[env.rank]
            x = torch.from_numpy(unit_rows(store.rows(rows))).to(env.device)
            rng = np.random.default_rng(0)
            k = min(K_LLOYD if stage == "lloyd" else K_ASSIGN, store.total)
            centroids = torch.from_numpy(unit_rows(store.rows(np.sort(rng.choice(store.total, k, replace=False))))).to(
                env.device
            )
            coarse = (
                None if stage == "lloyd" else centroids[torch.from_numpy(rng.choice(k, min(CELLS, k), replace=False))]
            )
            barrier(env)
            start = time.perf_counter()
            if stage == "lloyd":
                lloyd(env, x, centroids, lambda r, c: Assigner(c, None, 1, env.device).assign_tensor(r), range(1), 0)
            else:
                Assigner(centroids, coarse, NPROBE_ASSIGN, env.device).assign_tensor(x)
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            barrier(env)
        seconds = time.perf_counter() - start
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        report = {"stage": stage, "seconds": seconds, "peak_gb": peak_gb, "rank": env.rank, "ranks": env.world_size}
        if stage == "merge":  # counted after the clock stopped
            report["edges"] = sum(len(np.load(search.block_file(i))["a"]) for i in range(search.n_jobs))
        Path(out, f"report_{env.rank}.json").write_text(json.dumps(report))


MEMORY_STAGES = ("balance", "cluster")


def memory_worker(stage: str, emb: str, out: str, device: str) -> None:
    """One whole stage, as `clipcid STAGE` runs it, with tracemalloc tracing: its peak is what numpy (and
    so every per-row array of the stage) held at most in this rank, beside torch's own allocations, which
    it does not count (the resident size would hide the arrays behind torch's ~0.5 GB)."""
    import tracemalloc

    from clipcid.balance.run import BalanceConfig, balance
    from clipcid.cluster.run import ClusterConfig, cluster
    from clipcid.stage import distributed

    with distributed(device) as env:
        tracemalloc.start()
        if stage == "balance":
            balance(BalanceConfig(emb=emb, out=str(Path(out) / "balance"), search="ivf", device=device, plots=False))
        else:
            cluster(ClusterConfig(emb=emb, out=str(Path(out) / "clusters"), device=device, plots=False))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        report = {"stage": stage, "rank": env.rank, "ranks": env.world_size, "peak_bytes": peak}
        Path(out, f"report_{env.rank}.json").write_text(json.dumps(report))


def memory_model(results: list[dict]) -> None:
    """Per stage, memory = a + b N / ranks + c N fitted by least squares, over every rank but rank 0 and
    over rank 0 apart: c is what each rank holds per row of the whole corpus (replicated), b its share's
    bytes per row. Then the GB per rank that gives at 400M rows on 8 and 64 ranks."""
    print(
        "\n| stage | ranks fitted | a (MB) | b: bytes per own row | c: bytes per corpus row (replicated) | "
        "c x 400M (GB) | at 400M on 8 ranks (GB) | on 64 ranks (GB) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for stage in MEMORY_STAGES:
        for who, pick in (("rank 0", lambda r: r["rank"] == 0), ("the others", lambda r: r["rank"] > 0)):
            rows = [r for r in results if r["stage"] == stage and pick(r)]
            if len({(r["rows"], r["ranks"]) for r in rows}) < 3:
                continue
            design = np.array([[1.0, r["rows"] / r["ranks"], r["rows"]] for r in rows])
            (a, b, c), *_ = np.linalg.lstsq(design, np.array([r["peak_bytes"] for r in rows], float), rcond=None)
            at = {g: (a + b * 400e6 / g + c * 400e6) / 1e9 for g in (8, 64)}
            print(f"| {stage} | {who} | {a / 1e6:.1f} | {b:.1f} | {c:.1f} | {c * 400e6 / 1e9:.1f} | {at[8]:.1f} | "
                  f"{at[64]:.1f} |")  # fmt: skip


def measure(stage: str, emb: Path, ranks: int, device: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="clipcid-scale-") as out:
        cmd = [sys.executable, __file__, "--worker", stage, "--emb", str(emb), "--out", out, "--device", device]
        if stage in MEMORY_STAGES:
            cmd[2] = "--memory-worker"
        if ranks > 1:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
                   "127.0.0.1", "--master_port", str(port), *cmd[1:]]  # fmt: skip
        subprocess.run(
            cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
        )
        reports = [json.loads(p.read_text()) for p in sorted(Path(out).glob("report_*.json"))]
    if stage in MEMORY_STAGES:
        return {"per_rank": reports}
    measured = {"seconds": max(r["seconds"] for r in reports), "peak_gb": max(r["peak_gb"] for r in reports)}
    if "edges" in reports[0]:
        measured["edges"] = reports[0]["edges"]
    return measured


def plain_product_gflops(dim: int = 1280) -> float:
    import torch

    a, b = torch.randn(4096, dim), torch.randn(dim, 4096)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 4096 * 4096 * dim / best / 1e9


def fitted_exponent(points: list[tuple[int, float]]) -> float | None:
    if len(points) < 2:
        return None
    n, t = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(n, t, 1)[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[500_000, 1_000_000, 2_000_000, 4_000_000])
    p.add_argument("--wide", type=int, default=1_000_000, help="rows of the 1,280-d run (0: none)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--stages", nargs="+", default=list(STAGES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--from-json", default=None, help="print the tables (and --plot) of an earlier --json")
    p.add_argument("--memory", action="store_true", help="the per-rank memory model (tracemalloc) instead")
    p.add_argument("--memory-sizes", type=int, nargs="+", default=[250_000, 500_000])
    p.add_argument("--memory-dim", type=int, default=8, help="small, so that bookkeeping dominates")
    p.add_argument("--memory-ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--memory-stages", nargs="+", default=list(MEMORY_STAGES), choices=MEMORY_STAGES)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--emb", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.emb, args.out, args.device)
        return
    if args.memory_worker:
        memory_worker(args.memory_worker, args.emb, args.out, args.device)
        return
    if args.memory:
        results = []
        with tempfile.TemporaryDirectory(prefix="clipcid-scale-data-") as tmp:
            for n in args.memory_sizes:
                emb = write_data(Path(tmp) / f"{n}", n, args.memory_dim, part_rows=max(1, n // 20))
                for ranks in args.memory_ranks:
                    for stage in args.memory_stages:
                        for r in measure(stage, emb, ranks, args.device)["per_rank"]:
                            results.append({**r, "rows": n})
                            print(f"{stage:<8} {n:>9,} rows, rank {r['rank']} of {ranks}: "
                                  f"{r['peak_bytes'] / 1e6:8.1f} MB traced peak", flush=True)  # fmt: skip
                shutil.rmtree(emb)
        memory_model(results)
        if args.json:
            Path(args.json).write_text(json.dumps({"memory": results}, indent=2))
        return
    if args.from_json:  # the tables and the plot of an earlier run (or of several merged)
        earlier = json.loads(Path(args.from_json).read_text())
        report(earlier["results"], sorted({r["stage"] for r in earlier["results"]}, key=STAGES.index),
               sorted({r["ranks"] for r in earlier["results"]}), args.plot)  # fmt: skip
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="clipcid-scale-data-") as tmp:
        shapes = [(n, 256) for n in args.sizes] + ([(args.wide, 1280)] if args.wide else [])
        for n, dim in shapes:
            emb = write_data(Path(tmp) / f"{n}_{dim}", n, dim)
            for ranks in args.ranks:
                for stage in args.stages:
                    m = measure(stage, emb, ranks, args.device)
                    results.append({"stage": stage, "rows": n, "dim": dim, "ranks": ranks, **m})
                    edges = f", {m['edges']:,} edges" if "edges" in m else ""
                    line = f"{stage:<7} {n:>10,} x {dim:<5} {ranks} rank(s){edges}: {m['seconds']:8.1f} s, "
                    print(line + f"{n / m['seconds']:>12,.0f} rows/s, peak {m['peak_gb']:.2f} GB per rank", flush=True)
            shutil.rmtree(emb)
    report(results, args.stages, args.ranks, args.plot)
    gemm = plain_product_gflops()
    print(f"\nplain 4096 x 1280 x 4096 product, best of 5 after a warm-up, same run: {gemm:.1f} GFLOP/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "gemm_gflops": gemm}, indent=2))


def report(results: list[dict], stages: list[str], ranks_seen: list[int], plot: str | None) -> None:
    print(f"\n{os.cpu_count()} CPU cores\n")
    print("| stage | rows | dim | ranks | seconds | rows/s | peak GB per rank | exponent (256-d) | anchor exponent |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for stage in stages:
        for ranks in ranks_seen:
            rows = [r for r in results if r["stage"] == stage and r["ranks"] == ranks]
            exponent = fitted_exponent([(r["rows"], r["seconds"]) for r in rows if r["dim"] == 256])
            for r in sorted(rows, key=lambda r: (r["dim"], r["rows"])):
                exp = f"{exponent:.2f}" if exponent is not None else "–"
                edges = f" ({r['edges']:,} edges)" if "edges" in r else ""
                print(f"| {stage}{edges} | {r['rows']:,} | {r['dim']} | {ranks} | {r['seconds']:.1f} | "
                      f"{r['rows'] / r['seconds']:,.0f} | {r['peak_gb']:.2f} | {exp} | 1.00 |")  # fmt: skip
    if plot:
        from clipcid.util.plots import new_figure, save_png

        fig, ax = new_figure(6.5, 4.2)
        for stage in stages:
            for ranks in ranks_seen:
                rows = sorted((r for r in results if r["stage"] == stage and r["ranks"] == ranks and r["dim"] == 256),
                              key=lambda r: r["rows"])  # fmt: skip
                ax.plot([r["rows"] for r in rows], [r["seconds"] for r in rows], marker="o",
                        linestyle="-" if ranks == 1 else "--", label=f"{stage}, {ranks} rank(s)")  # fmt: skip
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="rows (256-d)",
            ylabel="seconds",
            title="middle stages: time against rows",
        )
        ax.legend(fontsize=7)
        save_png(fig, plot)


if __name__ == "__main__":
    main()
