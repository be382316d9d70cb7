"""Clustering benchmark, in one run:

(a) `clipcid cluster` (random init, as faiss) against calling faiss.Kmeans directly on the same data
    and settings (loading the same parts, training, labelling every row with its index): time ratio
    (goal <= 1.1) and objective;
(b) with --two-level-n: two-level k-means against flat k-means at k = --two-level-k on that many
    rows (the issue asks 1M x 512 at k = 10k): time and mean similarity to the centroid;
(c) with --assign-k: two-level assignment, faiss's IndexIVFFlat search (anchor) against clipcid's
    per-cell matrix products (cluster.run.Assigner) on the same centroids, cells, nprobe and rows:
    rows per second, the effective GFLOP/s, a plain matrix product's GFLOP/s in the same run, and the
    share of equal labels.

    python benchmarks/cluster.py --n 200000 --dim 512 --k 1000 [--two-level-n 1000000 --two-level-k 10000]
    python benchmarks/cluster.py --assign-k 1000000 --assign-dim 1280 --assign-cells 1000 --assign-rows 20000 \
        [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from clipcid.cluster import ClusterConfig, cluster


def write_blobs(root: Path, n: int, dim: int, centres: int, seed: int = 0, part_rows: int = 100_000) -> Path:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, n, part_rows)):
        rows = min(part_rows, n - start)
        x = c[rng.integers(centres, size=rows)] + 0.05 * rng.standard_normal((rows, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(root / "img_emb" / f"img_emb_{i}.npy", x.astype(np.float16))
    return root


def load_all(root: Path) -> np.ndarray:
    files = sorted((root / "img_emb").glob("*.npy"), key=lambda p: int(p.stem.split("_")[2]))
    x = np.concatenate([np.load(f).astype(np.float32) for f in files])
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def faiss_direct(emb: Path, k: int, niter: int, seed: int, max_points: int) -> tuple[float, float]:
    """What a user would write: load the parts, normalise, train, label every row."""
    start = time.perf_counter()
    x = load_all(emb)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, max_points_per_centroid=max_points)
    km.train(x)
    sims, _ = km.index.search(x, 1)
    return time.perf_counter() - start, float(sims.mean())


def ours(emb: Path, out: Path, k: int, niter: int, seed: int, max_points: int, **kw) -> tuple[float, dict]:
    start = time.perf_counter()
    stats = cluster(
        ClusterConfig(
            emb=str(emb),
            out=str(out),
            k=k,
            niter=niter,
            seed=seed,
            max_points_per_centroid=max_points,
            plots=False,
            **kw,
        )
    )
    return time.perf_counter() - start, stats


def assignment(k: int, dim: int, cells: int, rows: int, nprobe: int, device: str) -> None:
    """faiss IVFFlat search against the per-cell products, on clustered synthetic data."""

    from clipcid.cluster.run import Assigner

    rng = np.random.default_rng(0)
    centroids = np.empty((k, dim), np.float32)
    for s in range(0, k, 65536):  # in blocks: a 1M x 1280 draw at once would double the memory
        block = rng.standard_normal((min(65536, k - s), dim), dtype=np.float32)
        centroids[s : s + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    coarse = centroids[rng.choice(k, cells, replace=False)].copy()
    x = centroids[rng.integers(k, size=rows)] + 0.05 * rng.standard_normal((rows, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(coarse)
    ivf = faiss.IndexIVFFlat(quantizer, dim, cells, faiss.METRIC_INNER_PRODUCT)
    ivf.is_trained, ivf.nprobe = True, nprobe
    ivf.add(centroids)
    start = time.perf_counter()
    _, anchor_ids = ivf.search(x, 1)
    anchor_s = time.perf_counter() - start
    del ivf
    assigner = Assigner(centroids, coarse, nprobe, device)
    assigner.assign(x[:256])  # warm-up
    start = time.perf_counter()
    labels, _ = assigner.assign(x)
    ours_s = time.perf_counter() - start
    # The work both do: each row against its nprobe cells' centroids (k / cells each) and the cells.
    flop = 2 * rows * (nprobe * k / cells + cells) * dim
    from scale import plain_product_gflops

    gemm = plain_product_gflops(dim)
    print(f"\nassignment: {rows:,} rows x {dim}, k {k:,} in {cells:,} cells, nprobe {nprobe}, {device}\n")
    print(row("method", "rows/s", "ratio", "effective GFLOP/s", "labels equal to faiss"))
    print(row("---", "---:", "---:", "---:", "---:"))
    print(
        row(
            "faiss IndexIVFFlat.search (anchor)",
            f"{rows / anchor_s:,.0f}",
            "1.00",
            f"{flop / anchor_s / 1e9:.1f}",
            "1.0000",
        )
    )
    print(row("clipcid Assigner (per-cell products)", f"{rows / ours_s:,.0f}", f"{anchor_s / ours_s:.2f}",
              f"{flop / ours_s / 1e9:.1f}", f"{(labels == anchor_ids[:, 0]).mean():.4f}"))  # fmt: skip
    print(f"\nplain 4096 x {dim} x 4096 matrix product, same run, best of 5 after a warm-up: {gemm:.1f} GFLOP/s (cpu)")


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--max-points-per-centroid", type=int, default=256)
    p.add_argument("--two-level-n", type=int, default=0)
    p.add_argument("--two-level-k", type=int, default=10_000)
    p.add_argument("--assign-k", type=int, default=0)
    p.add_argument("--assign-dim", type=int, default=1280)
    p.add_argument("--assign-cells", type=int, default=1000)
    p.add_argument("--assign-rows", type=int, default=20_000)
    p.add_argument("--assign-nprobe", type=int, default=8)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.assign_k:
        assignment(args.assign_k, args.assign_dim, args.assign_cells, args.assign_rows, args.assign_nprobe, args.device)
        return
    with tempfile.TemporaryDirectory(prefix="clipcid-bench-cluster-") as tmp:
        tmp = Path(tmp)
        emb = write_blobs(tmp / "emb", args.n, args.dim, centres=args.k)
        anchor_s, anchor_sim = faiss_direct(emb, args.k, args.niter, 0, args.max_points_per_centroid)
        ours_s, stats = ours(
            emb, tmp / "ours", args.k, args.niter, 0, args.max_points_per_centroid, init="random", device=args.device
        )
        print(f"{args.n:,} x {args.dim}, k {args.k:,}, niter {args.niter}, random init, seed 0\n")
        print(row("method", "seconds", "ratio", "mean similarity to centroid"))
        print(row("---", "---:", "---:", "---:"))
        print(row("faiss.Kmeans + index.search (anchor)", f"{anchor_s:.1f}", "1.000", f"{anchor_sim:.5f}"))
        print(
            row(
                "clipcid cluster",
                f"{ours_s:.1f}",
                f"{ours_s / anchor_s:.3f}",
                f"{stats['mean_similarity_to_centroid']:.5f}",
            )
        )
        if args.two_level_n:
            big = write_blobs(tmp / "big", args.two_level_n, args.dim, centres=args.two_level_k, seed=1)
            flat_s, flat = ours(
                big,
                tmp / "flat",
                args.two_level_k,
                args.niter,
                0,
                args.max_points_per_centroid,
                two_level="off",
                init="random",
                device=args.device,
            )
            two_s, two = ours(
                big,
                tmp / "two",
                args.two_level_k,
                args.niter,
                0,
                args.max_points_per_centroid,
                two_level="on",
                init="random",
                device=args.device,
            )
            print(f"\n{args.two_level_n:,} x {args.dim}, k {args.two_level_k:,}\n")
            print(row("mode", "seconds", "ratio", "mean similarity to centroid", "empty clusters"))
            print(row("---", "---:", "---:", "---:", "---:"))
            print(
                row(
                    "flat (anchor)",
                    f"{flat_s:.1f}",
                    "1.000",
                    f"{flat['mean_similarity_to_centroid']:.5f}",
                    flat["empty_clusters"],
                )
            )
            print(
                row(
                    "two-level",
                    f"{two_s:.1f}",
                    f"{two_s / flat_s:.3f}",
                    f"{two['mean_similarity_to_centroid']:.5f}",
                    two["empty_clusters"],
                )
            )


if __name__ == "__main__":
    main()
