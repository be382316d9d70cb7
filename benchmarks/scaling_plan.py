"""docs/scaling.md's plan for LAION-400M, computed rather than written by hand.

Reads what `benchmarks/scale.py --json` measured on this machine (seconds per stage at several sizes,
and the plain matrix-product rate of the same machine) and turns it into the GPU plan: each stage's
floating-point work at the paper's scale (counted from the algorithm: the same formulas give the CPU
runs' work, from which the efficiency of each stage against the plain product is measured), divided
by an H200's rate at that efficiency; reads and all-reduces from bandwidths. Every constant below is
named and sourced; the printed table marks each figure measured or estimated.

    python benchmarks/scaling_plan.py --scale scale.json [--gemm-gflops 190]
"""

from __future__ import annotations

import argparse
import json
import math

# The paper's scale (docs/scaling.md): LAION-400M, a ViT-bigG-14 teacher, k = 1M over 225M kept rows.
N, D, KEPT, K = 400e6, 1280, 225e6, 1e6
N_LABELLED = 0.99 * N  # cluster's assignment with a balance: the corpus less the 1 % hold-out
RECALL_QUERIES = 1000
NPROBE_BALANCE = 4
K1 = math.sqrt(K)  # coarse cells of two-level k-means
NPROBE_ASSIGN, NITER, REFINE, POINTS_PER_CENTROID = 8, 20, 5, 256
# Hardware (estimated, from vendors' sheets): an H200's dense fp32 rate (torch's default for float32
# products: no TF32), the per-GPU network of an 8-GPU node (400 Gb/s per GPU), its local disk.
H200_FP32 = 67e12
NET_BYTES_S = 50e9
READ_BYTES_S_PER_NODE = 6e9
EMBED_DAYS = {8: 1.5, 64: 4.6 / 24}  # embed's own estimate (upper, docs/scaling.md): the budget of each stage


def flop_join(n: float, d: float) -> float:
    """Balance's IVF cell join: probing (n x nlist) plus the join (n x nprobe x n / nlist), 2 FLOP a term."""
    nlist = math.sqrt(n * NPROBE_BALANCE)
    return 2 * n * nlist * d + 2 * n * NPROBE_BALANCE * (n / nlist) * d


def flop_lloyd(n: float, k: float, d: float) -> float:
    return 2 * n * k * d  # assignment; the sums are n x d


def flop_assign(n: float, k: float, cells: float, d: float) -> float:
    return 2 * n * (cells + NPROBE_ASSIGN * k / cells) * d


def efficiency(results: list[dict], stage: str, flop, gemm: float) -> tuple[float, dict]:
    """The stage's effective rate at the largest 256-d size measured on 1 rank, against the plain product."""
    rows = [r for r in results if r["stage"] == stage and r["ranks"] == 1 and r["dim"] == 256]
    r = max(rows, key=lambda r: r["rows"])
    return flop(r) / r["seconds"] / gemm, r


def human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", required=True, help="the JSON of benchmarks/scale.py")
    p.add_argument("--gemm-gflops", type=float, default=None, help="this machine's plain product (else the JSON's)")
    args = p.parse_args()
    from scale import CELLS, K_ASSIGN, K_LLOYD

    data = json.loads(open(args.scale).read())
    if isinstance(data, list):  # written before scale.py measured the plain product too
        data = {"results": data}
    results, gemm = data["results"], (args.gemm_gflops or data["gemm_gflops"]) * 1e9
    e_join, join = efficiency(results, "join", lambda r: flop_join(r["rows"], r["dim"]), gemm)
    e_lloyd, lloyd = efficiency(results, "lloyd", lambda r: flop_lloyd(r["rows"], K_LLOYD, r["dim"]), gemm)
    e_assign, assign = efficiency(results, "assign", lambda r: flop_assign(r["rows"], K_ASSIGN, CELLS, r["dim"]), gemm)
    merge = max((r for r in results if r["stage"] == "merge" and r["ranks"] == 1), key=lambda r: r["rows"])
    edges_per_row = merge["edges"] / merge["rows"]
    edges_per_s = merge["edges"] / merge["seconds"]

    print(f"measured here: plain product {gemm / 1e9:.0f} GFLOP/s; efficiency against it: join {e_join:.2f} "
          f"({join['rows']:,} rows), one Lloyd iteration {e_lloyd:.2f}, assignment {e_assign:.2f}; merge "
          f"{edges_per_s:,.0f} edges/s at {edges_per_row:.2f} edges per row\n")  # fmt: skip
    sample = min(KEPT, K * POINTS_PER_CENTROID)
    work = {
        "balance: IVF join (nlist = sqrt(N nprobe), nprobe 4)": (flop_join(N, D), e_join),
        "k-means: coarse, 20 iterations over the sample": (NITER * flop_lloyd(sample, K1, D), e_lloyd),
        "k-means: fine cells, 20 iterations each": (NITER * flop_lloyd(sample, K / K1, D), e_lloyd),
        "k-means: 5 refining iterations (two-level)": (REFINE * flop_assign(sample, K, K1, D), e_assign),
        # With a balance, cluster labels the corpus before balance too (the paper's Fig. 2(d)): every valid
        # row that is not held out, about N, in one assignment that serves the kept rows as well.
        "cluster: assignment of every valid, not held-out row (two-level)": (
            flop_assign(N_LABELLED, K, K1, D),
            e_assign,
        ),
    }
    print("| stage | FLOP | efficiency (measured here) | 8 GPUs | 64 GPUs |")
    print("|---|---:|---:|---:|---:|")
    totals = {8: {}, 64: {}}
    for name, (flop, eff) in work.items():
        cells = []
        for gpus in (8, 64):
            seconds = flop / (eff * H200_FP32 * gpus)
            totals[gpus][name.split(":")[0]] = totals[gpus].get(name.split(":")[0], 0) + seconds
            cells.append(human(seconds))
        print(f"| {name} | {flop:.2e} | {eff:.2f} | {cells[0]} | {cells[1]} |")
    edges = N * edges_per_row

    def merge_seconds(gpus: int) -> float:
        """Each rank's blocks into its forest, then log2(ranks) rounds of merging two forests of < N edges
        (on the CPU, scipy's spanning tree, at the rate measured here)."""
        return edges / gpus / edges_per_s + math.log2(gpus) * 2 * N / edges_per_s

    for gpus in (8, 64):
        totals[gpus]["balance"] += merge_seconds(gpus)
    print(f"| balance: forests' merge, {edges:.1e} edges (the measured edges per row; CPU) | – | measured rate | "
          f"{human(merge_seconds(8))} | {human(merge_seconds(64))} |")  # fmt: skip
    # Cluster reads its sample share and then every labelled row once (float16 embeddings).
    cluster_reads = (min(KEPT, K * POINTS_PER_CENTROID) + N_LABELLED) * D * 2
    for gpus in (8, 64):
        totals[gpus]["cluster"] += cluster_reads / (READ_BYTES_S_PER_NODE * gpus / 8)
    read_8, read_64 = cluster_reads / READ_BYTES_S_PER_NODE, cluster_reads / (READ_BYTES_S_PER_NODE * 8)
    print(f"| cluster: reading the sample and every labelled row, {cluster_reads / 1e12:.1f} TB in all | – | – | "
          f"{human(read_8)} | {human(read_64)} |")  # fmt: skip
    # Balance's IVF recall check finds its 1,000 queries' exact pairs by scanning every valid row on rank 0
    # alone (one node's reads), however many ranks there are.
    recall_read = N * D * 2 / READ_BYTES_S_PER_NODE
    for gpus in (8, 64):
        totals[gpus]["balance"] += recall_read
    print(f"| balance: recall check, {RECALL_QUERIES:,} queries against every valid row on rank 0 "
          f"({2 * RECALL_QUERIES * N * D:.1e} FLOP, {N * D * 2 / 1e12:.1f} TB read) | – | – | {human(recall_read)} | "
          f"{human(recall_read)} |")  # fmt: skip
    reads = N * (NPROBE_BALANCE + 1) * D * 2  # each row read as a query and by the cells that probe it
    for gpus in (8, 64):
        totals[gpus]["balance"] += reads / (READ_BYTES_S_PER_NODE * gpus / 8)
    print(f"| balance: reading the image embeddings, {reads / 1e12:.1f} TB in all | – | – | "
          f"{human(reads / READ_BYTES_S_PER_NODE)} | {human(reads / (READ_BYTES_S_PER_NODE * 8))} |")  # fmt: skip
    allreduce = 2 * K * D * 8 / NET_BYTES_S  # ring all-reduce: twice the 10.2 GB of int64 sums per GPU
    print(f"| k-means: all-reduce of k x D int64 sums per refining iteration ({K * D * 8 / 1e9:.1f} GB) | – | – | "
          f"{human(REFINE * allreduce)} | {human(REFINE * allreduce)} |")  # fmt: skip
    print()
    for gpus in (8, 64):
        budget = EMBED_DAYS[gpus] * 86400
        for stage, seconds in totals[gpus].items():
            verdict = "within" if seconds <= budget else "OVER"
            print(f"{gpus} GPUs: {stage} {human(seconds)}, {verdict} embed's {human(budget)}")


if __name__ == "__main__":
    main()
