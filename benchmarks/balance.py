"""Image Semantic Balance benchmark, in one run:

(a) exact search on N x D planted data against the floor 2*N^2*D / (GEMM rate measured here);
(b) against faiss IndexFlatIP.range_search + scipy components (what clip-retrieval's dedup does),
    same threshold: same groups? time ratio;
(c) IVF: pair recall against exact search and time ratio;
(d) --big: 1M x 512 end to end with IVF (goal: under 3 minutes on the 2-core machine);
(e) --real EMB_DIR: removed fraction against threshold on real embeddings.

    python benchmarks/balance.py --n 200000 --dim 512 [--big] [--real demo/teacher_emb] [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from clipcid.balance.run import BalanceConfig, balance, block_size_for, to_similarity


def planted_embeddings(root: Path, n: int, dim: int, seed: int = 0, part_rows: int = 100_000) -> Path:
    """Random unit vectors, about 10% of them in planted groups of 2-8 near-duplicates, as float16
    parts in clip-retrieval's layout, written part by part (1M x 512 never sits in memory whole)."""
    rng = np.random.default_rng(seed)
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, n, part_rows)):
        rows = min(part_rows, n - start)
        x = rng.standard_normal((rows, dim), dtype=np.float32)
        n_dup = rows // 10
        bases = rng.integers(0, rows, size=n_dup // 4)
        targets = rng.choice(rows, size=n_dup, replace=False)
        noise = rng.standard_normal((n_dup, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        noise *= 0.02 / np.linalg.norm(noise, axis=1, keepdims=True)
        x[targets] = x[bases[rng.integers(0, len(bases), size=n_dup)]] + noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(root / "img_emb" / f"img_emb_{i}.npy", x.astype(np.float16))
        pq.write_table(
            pa.table({"key": [str(start + j) for j in range(rows)], "valid": np.ones(rows, bool)}),
            root / "metadata" / f"metadata_{i}.parquet",
        )
    return root


def gemm_rate(block: int, dim: int, device: str = "cpu") -> float:
    """FLOP/s of the block product the exact search runs (best of 3)."""
    a = torch.randn(block, dim, device=device)
    b = torch.randn(block, dim, device=device)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b.T
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * block * block * dim / best


def load_groups(out: Path) -> np.ndarray:
    files = sorted((out / "groups").glob("groups_*.npy"), key=lambda p: int(p.stem.split("_")[1]))
    return np.concatenate([np.load(f) for f in files])


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labelings describe the same grouping (labels may be numbered differently)."""
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def faiss_range_search_groups(emb: Path, similarity: float) -> tuple[np.ndarray, float]:
    import faiss

    files = sorted((emb / "img_emb").glob("img_emb_*.npy"), key=lambda p: int(p.stem.split("_")[2]))
    x = np.concatenate([np.load(f).astype(np.float32) for f in files])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    start = time.perf_counter()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, _, ids = index.range_search(x, similarity)
    query = np.repeat(np.arange(len(x)), np.diff(lims).astype(np.int64))
    graph = coo_matrix((np.ones(len(ids), np.int8), (query, ids)), shape=(len(x), len(x)))
    labels = connected_components(graph, directed=False)[1]
    return labels, time.perf_counter() - start


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--threshold", type=float, default=0.07)
    p.add_argument("--memory-gb", type=float, default=2.0)
    p.add_argument("--nprobe", type=int, default=4)
    p.add_argument("--skip-faiss-flat", action="store_true")
    p.add_argument("--big", action="store_true", help="also run 1M x 512 end to end with IVF")
    p.add_argument("--real", default=None, help="embeddings folder for the removal table")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the search's matrix products)")
    args = p.parse_args()
    sim = to_similarity(args.threshold, "l2")
    print(f"threads {torch.get_num_threads()}, threshold l2 {args.threshold} (similarity > {sim:.6f})")
    with tempfile.TemporaryDirectory(prefix="clipcid-bench-balance-") as tmp:
        tmp = Path(tmp)
        emb = planted_embeddings(tmp / "emb", args.n, args.dim)
        block = block_size_for(args.memory_gb, args.dim)
        rate = gemm_rate(block, args.dim, args.device)
        floor = 2 * args.n * args.n * args.dim / rate
        exact = balance(
            BalanceConfig(
                emb=str(emb),
                out=str(tmp / "exact"),
                threshold=args.threshold,
                memory_gb=args.memory_gb,
                plots=False,
                device=args.device,
            )
        )
        exact_s = exact["timings"]["total_s"]
        exact_groups = load_groups(tmp / "exact")
        ivf = balance(
            BalanceConfig(
                emb=str(emb),
                out=str(tmp / "ivf"),
                threshold=args.threshold,
                search="ivf",
                nprobe=args.nprobe,
                memory_gb=args.memory_gb,
                plots=False,
                device=args.device,
            )
        )
        ivf_s = ivf["timings"]["total_s"]
        print(
            f"\n{args.n:,} x {args.dim} planted, block {block}, GEMM {rate / 1e9:.1f} GFLOP/s, "
            f"floor 2*N^2*D/rate = {floor:.1f} s; exact removed {100 * exact['removed_fraction']:.2f}%\n"
        )
        print(row("method", "seconds", "ratio", "note"))
        print(row("---", "---:", "---:", "---"))
        print(row("floor 2·N²·D / GEMM rate (anchor)", f"{floor:.1f}", "1.000", ""))
        print(row("clipcid exact", f"{exact_s:.1f}", f"{exact_s / floor:.3f}", "upper triangle only"))
        if not args.skip_faiss_flat:
            flat_groups, flat_s = faiss_range_search_groups(emb, sim)
            print(
                row(
                    "faiss IndexFlatIP.range_search + components",
                    f"{flat_s:.1f}",
                    f"{flat_s / floor:.3f}",
                    f"same groups as exact: {same_partition(flat_groups, exact_groups)}",
                )
            )
        print(
            row(
                f"clipcid ivf (nlist {ivf['ivf']['nlist']}, nprobe {args.nprobe})",
                f"{ivf_s:.1f}",
                f"{ivf_s / floor:.3f}",
                f"pair recall {ivf['ivf']['pair_recall']:.4f}, {exact_s / ivf_s:.1f}x faster than exact",
            )
        )
        if args.big:
            big = planted_embeddings(tmp / "big", 1_000_000, 512, seed=1)
            start = time.perf_counter()
            stats = balance(
                BalanceConfig(
                    emb=str(big),
                    out=str(tmp / "big_out"),
                    threshold=args.threshold,
                    search="ivf",
                    nprobe=args.nprobe,
                    memory_gb=args.memory_gb,
                    plots=False,
                    device=args.device,
                )
            )
            big_s = time.perf_counter() - start
            print(
                f"\n1,000,000 x 512 with IVF end to end: {big_s:.1f} s (goal < 180 s); removed "
                f"{100 * stats['removed_fraction']:.2f}%, pair recall {stats['ivf']['pair_recall']:.4f} "
                f"(nlist {stats['ivf']['nlist']}, nprobe {args.nprobe})"
            )
    if args.real:
        with tempfile.TemporaryDirectory() as tmp:
            stats = balance(BalanceConfig(emb=args.real, out=tmp, threshold=args.threshold, plots=False))
        print(f"\nremoved fraction against threshold on {args.real} ({stats['valid']:,} images):\n")
        print(row("threshold (l2)", "removed"))
        print(row("---:", "---:"))
        for point in stats["removal_curve"]:
            print(row(f"{point['threshold']:.4f}", f"{100 * point['removed_fraction']:.1f}%"))


if __name__ == "__main__":
    main()
