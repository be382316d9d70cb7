"""`clipcid cluster`: spherical k-means of the kept teacher image embeddings, one pseudo-label per row.

Training is spherical k-means trained by every rank (cluster/kmeans.py) on a sample of at most
k * max_points_per_centroid kept rows (faiss's rule, applied while reading so that the rest never leaves
the memmap), seeded with greedy k-means++ where that is affordable. Then every kept row is assigned to
its nearest centroid, part by part (split across ranks under torchrun), by matrix products in torch. For
very large k (the paper used 1M) a two-level mode trains sqrt(k) coarse clusters, then k-means inside
each coarse cell with a share of k proportional to the cell's size, and assigns through the coarse cells
(the fine centroids of each row's nprobe nearest cells).

With a balance folder, the rows balance removed are assigned too (the labels of the corpus before balance,
a file of their own: the training labels stay -1 for them), and stats.json compares the cluster sizes
before and after balance (entropy, Gini coefficient; the paper's Fig. 2(d)).

Outputs in OUT (cluster/artifact.py owns the layout): centroids, labels and similarities per part,
corpus labels, stats.json, cluster_sizes.png, cluster_balance.png.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import clipcid.cluster.artifact as artifact
from clipcid.balance.artifact import BalanceResult
from clipcid.balance.artifact import identity_of as balance_identity
from clipcid.cluster import kmeans
from clipcid.config import option, validate
from clipcid.embed.artifact import Embeddings, EmbeddingStore
from clipcid.errors import ClipcidError
from clipcid.holdout import HoldOut
from clipcid.stage import (
    ROW_CHUNK,
    DistEnv,
    RunFolder,
    barrier,
    distributed,
    parts_of_rank,
    row_chunks,
    unit_rows,
)
from clipcid.util.plots import new_figure, save_png
from clipcid.util.progress import progress_bar

log = logging.getLogger("clipcid")

PAPER_IMAGES_PER_CLUSTER = 225  # 1M clusters for 225M images
TWO_LEVEL_ABOVE_K = 65536
ROWS_PER_PRODUCT = 65536  # centroids filed at once (a block of k x cells scores)
# A CPU's score block: 4,096 rows x 1,000 centroids, 0.80 s per 256k rows where 65,536-row blocks took
# 1.08 (AMD EPYC, 32 MB L3; docs/benchmarks.md).
CPU_SCORE_BLOCK_BYTES = 16 * 2**20
AGREEMENT_ROWS = 10_000  # rows checked against the exact nearest centroid after a two-level assignment
AGREEMENT_FLOP = 2 * 10**11  # and at most this many multiply-adds for it (k = 1M, D = 1,280: 156 rows)


@dataclass
class ClusterConfig:
    emb: str = option(help="teacher embeddings folder (clipcid embed)")
    out: str = option(help="output folder: centroids, labels, stats.json")
    k: str = option("auto", "number of clusters, or auto (kept rows / --images-per-cluster)")
    balance: str | None = option(None, "balance folder: cluster only the kept rows")
    holdout: str | None = option(None, "hold-out folder (clipcid holdout): its rows are not clustered")
    images_per_cluster: float = option(225.0, "what --k auto aims at: the paper's 1M clusters for 225M images", above=0)
    niter: int = option(20, "k-means iterations", at_least=1)
    seed: int = option(0, "seed of the sample and the seeding")
    max_points_per_centroid: int = option(256, "training sample per centroid (faiss's rule)", at_least=1)
    init: str = option("auto", "seeding; auto = greedy k-means++ when n*k*d <= 2e10", ("auto", "kmeans++", "random"))
    nredo: int = option(1, "restarts; the best objective is kept", at_least=1)
    two_level: str = option("auto", "coarse then fine k-means; auto = on above k = 65,536", ("auto", "on", "off"))
    device: str = option("auto", "where training and assignment run: auto, cpu or cuda")
    gpu: bool = option(False, "old spelling of --device cuda")
    memory_gb: float = option(8.0, "memory of a rank: its share of the training sample, and score blocks", above=0)
    assign_nprobe: int = option(8, "two-level mode: coarse cells searched when assigning a row", at_least=1)
    refine_iterations: int = option(5, "two-level mode: Lloyd iterations over all centroids after training", at_least=0)
    plots: bool = option(True, "write cluster_sizes.png")
    overwrite: bool = option(False, "replace what --out holds if it was made with other settings")


def kept_mask(embeddings: Embeddings, balance_dir: str | None, holdout_dir: str | None = None) -> np.ndarray:
    """Global rows to cluster: valid, kept by Image Semantic Balance when a balance folder is given,
    and not held out when a hold-out folder is."""
    mask = embeddings.valid_mask()
    if balance_dir is not None:
        mask &= BalanceResult.open(balance_dir, embeddings).keep_mask()
    if holdout_dir is not None:
        mask &= ~HoldOut.open(holdout_dir).masks(embeddings.sizes)
    return mask


def resolve_k(k: int | str, n_kept: int, images_per_cluster: float = PAPER_IMAGES_PER_CLUSTER) -> int:
    if k == "auto":
        if not images_per_cluster > 0:
            raise ClipcidError("--images-per-cluster must be positive")
        return max(1, round(n_kept / images_per_cluster))
    try:
        k = int(k)
    except ValueError as e:
        raise ClipcidError(f"--k must be a number or auto, not {k}") from e
    if k < 1:
        raise ClipcidError("--k must be at least 1")
    if k > n_kept:
        raise ClipcidError(f"--k {k} is larger than the {n_kept} kept rows; use a smaller k or --k auto")
    return k


class Assigner:
    """Nearest centroid by inner product, as matrix products in torch on the stage's device.

    Flat: every centroid. Two-level: each row's `nprobe` nearest coarse cells first, then the fine
    centroids filed under those cells (a fine centroid is filed under its own nearest coarse centroid, as
    faiss's IVF files it on add), one matrix product per cell for all the rows that probe it, which is
    what faiss's IVFFlat search computes query by query. The same labels as faiss's index, exact ties
    aside; with nprobe = every cell, the exact nearest centroid."""

    def __init__(
        self,
        centroids: np.ndarray,
        coarse: np.ndarray | None,
        nprobe: int,
        device: torch.device | str = "cpu",
        memory_gb: float = 2.0,
    ):
        self.device = torch.device(device)
        self.centroids = torch.as_tensor(centroids, dtype=torch.float32).to(self.device)
        self.coarse = None
        width = len(centroids)
        if coarse is not None:
            self.coarse = torch.as_tensor(coarse, dtype=torch.float32).to(self.device)
            self.nprobe = min(nprobe, len(coarse))
            cell = torch.cat([(c @ self.coarse.T).argmax(dim=1) for c in self.centroids.split(ROWS_PER_PRODUCT)])
            order = torch.argsort(cell, stable=True)
            self.filed, self.filed_ids = self.centroids[order], order
            self.bounds = torch.cat([cell.new_zeros(1), torch.bincount(cell, minlength=len(coarse)).cumsum(0)]).tolist()
            width = len(coarse) + self.nprobe * int(torch.bincount(cell).max())
        # Rows per call: the score block (rows x width floats) within half the budget, and on a CPU within
        # the cache, where the max over a block read back from memory cost a quarter of the product.
        rows = int(memory_gb * 1e9 / 2 / (4 * max(width, 1)))
        if self.device.type == "cpu":
            rows = min(rows, CPU_SCORE_BLOCK_BYTES // (4 * max(width, 1)))
        self.rows_at_once = max(256, min(ROW_CHUNK, rows))

    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels, sims = np.empty(len(x), np.int64), np.empty(len(x), np.float32)
        for s, e in row_chunks(len(x), self.rows_at_once):
            rows = torch.from_numpy(np.ascontiguousarray(x[s:e], dtype=np.float32)).to(self.device)
            best, ids = self._flat(rows) if self.coarse is None else self._two_level(rows)
            labels[s:e], sims[s:e] = ids.cpu().numpy(), best.cpu().numpy()
        return labels, sims

    def assign_tensor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same for rows already on the device: (labels, similarities), on the device."""
        parts = [self._flat(x[s:e]) if self.coarse is None else self._two_level(x[s:e])
                 for s, e in row_chunks(len(x), self.rows_at_once)]  # fmt: skip
        if not parts:
            return torch.zeros(0, dtype=torch.long, device=self.device), torch.zeros(0, device=self.device)
        return torch.cat([ids for _, ids in parts]), torch.cat([best for best, _ in parts])

    def _flat(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (rows @ self.centroids.T).max(dim=1)

    def _two_level(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probes = (rows @ self.coarse.T).topk(self.nprobe, dim=1).indices  # n x nprobe, nearest first
        n = len(rows)
        best = torch.full((n, self.nprobe), -torch.inf, device=self.device)
        ids = torch.zeros((n, self.nprobe), dtype=torch.long, device=self.device)
        flat = probes.reshape(-1)
        order = torch.argsort(flat, stable=True)
        cells, counts = torch.unique_consecutive(flat[order], return_counts=True)
        starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()
        for cell, lo, hi in zip(cells.tolist(), starts[:-1], starts[1:], strict=True):
            a, b = self.bounds[cell], self.bounds[cell + 1]
            if a == b:
                continue  # a coarse cell with no fine centroid filed under it
            slots = order[lo:hi]  # positions in the n x nprobe grid
            row, probe = slots // self.nprobe, slots % self.nprobe
            score, arg = (rows[row] @ self.filed[a:b].T).max(dim=1)
            best[row, probe], ids[row, probe] = score, self.filed_ids[a + arg]
        top, which = best.max(dim=1)  # the nearest probed cell wins a tie
        return top, ids.gather(1, which[:, None])[:, 0]


def cluster(cfg: ClusterConfig) -> dict:
    validate(cfg)
    embeddings = Embeddings.open(cfg.emb)
    kept = kept_mask(embeddings, cfg.balance, cfg.holdout)
    kept_rows = kmeans.KeptRows(kept, embeddings.images.offsets)
    if len(kept_rows) == 0:
        raise ClipcidError("no kept, valid rows to cluster")
    k = resolve_k(cfg.k, len(kept_rows), cfg.images_per_cluster)
    settings = _settings(cfg, k, embeddings, len(kept_rows))
    folder = RunFolder(cfg.out, artifact.SETTINGS_FILE, settings, cfg.overwrite)
    with_corpus = cfg.balance is not None
    done = folder.finished_run(
        lambda: all(artifact.labels_done(Path(cfg.out), i, with_corpus) for i in embeddings.part_ids)
    )
    if done is not None:
        return done
    if cfg.gpu:
        log.warning("--gpu is now spelled --device cuda; using --device cuda")
        cfg.device = "cuda"
    with distributed(cfg.device) as env:
        if env.is_main:
            folder.claim()
        barrier(env)
        try:
            corpus = kept_mask(embeddings, None, cfg.holdout) if with_corpus else None
            stats = _cluster(cfg, env, embeddings, kept, kept_rows, k, settings, corpus)
            return folder.finish(stats) if env.is_main else {}
        finally:
            folder.release()


def _settings(cfg: ClusterConfig, k: int, embeddings: Embeddings, n_kept: int) -> dict:
    """What the centroids and labels follow from: the config, and what the inputs were made from (the
    identities of the embeddings, the balance and the hold-out), so that any of them made again means
    clustering again."""
    store = embeddings.images
    return {
        "k": k,
        "n_kept": n_kept,
        "sizes": store.sizes,
        "dim": store.dim,
        "embeddings": embeddings.identity,
        "balance_identity": balance_identity(cfg.balance) if cfg.balance else None,
        "holdout": HoldOut.open(cfg.holdout).identity if cfg.holdout else None,
        "niter": cfg.niter,
        "seed": cfg.seed,
        "max_points_per_centroid": cfg.max_points_per_centroid,
        "init": cfg.init,
        "nredo": cfg.nredo,
        "two_level": cfg.two_level,
    }


def _cluster(cfg, env: DistEnv, embeddings: Embeddings, kept, kept_rows, k: int, settings: dict, corpus) -> dict:
    """`corpus`: the rows before balance (valid, not held out), assigned too; None without a balance."""
    start = time.monotonic()
    out = Path(cfg.out)
    store = embeddings.images
    two_level = cfg.two_level == "on" or (cfg.two_level == "auto" and k > TWO_LEVEL_ABOVE_K)
    timings: dict[str, float] = {}

    if not artifact.trained(out, settings):
        t0 = time.monotonic()
        sample = kmeans.draw_sample(kept_rows, k, cfg.max_points_per_centroid, cfg.seed)
        kmeans.check_memory(len(sample), store.dim, k, env, cfg.memory_gb)
        if env.is_main:
            artifact.begin_training(out, settings)
        barrier(env)
        training_setup = kmeans.Training(
            k, cfg.niter, cfg.seed, cfg.init, cfg.nredo, cfg.assign_nprobe, cfg.refine_iterations, cfg.memory_gb, out,
            settings,
        )  # fmt: skip

        def make_assigner(centroids, coarse):
            return Assigner(centroids, coarse, cfg.assign_nprobe, env.device, cfg.memory_gb)

        centroids, coarse, obj = kmeans.train(env, store, sample, training_setup, two_level, make_assigner)
        if env.is_main:
            record = {
                "settings": settings,
                "objective": obj,
                "two_level": two_level,
                "train_rows": len(sample),
                "train_s": time.monotonic() - t0,
                "world_size": env.world_size,
            }
            artifact.write_training(out, unit_rows(centroids), coarse, record)
    barrier(env)
    training, centroids, coarse = artifact.read_training(out)
    assigner = Assigner(centroids, coarse, cfg.assign_nprobe, env.device, cfg.memory_gb)

    t0 = time.monotonic()
    todo = [i for i in parts_of_rank(store.part_ids, env) if not artifact.labels_done(out, i, corpus is not None)]
    with progress_bar(sum(store.sizes[i] for i in todo), f"assign (rank {env.rank})", "row", env.is_main) as bar:
        for i in todo:
            local = kept[store.offsets[i] : store.offsets[i + 1]]
            wanted = local if corpus is None else corpus[store.offsets[i] : store.offsets[i + 1]]
            every = np.full(store.sizes[i], -1, dtype=np.int64)
            sims = np.full(store.sizes[i], np.nan, dtype=np.float32)
            rows = np.flatnonzero(wanted)  # the kept rows are among them: one assignment serves both
            for s, e in row_chunks(len(rows)):
                chunk = rows[s:e]
                every[chunk], sims[chunk] = assigner.assign(unit_rows(store.read(i, chunk)))
            labels = np.where(local, every, -1)
            sims = np.where(local, sims, np.float32(np.nan))
            artifact.write_labels(out, i, labels, sims, None if corpus is None else every)
            bar.update(store.sizes[i])
    timings["assign_s"] = time.monotonic() - t0
    barrier(env)
    summary = _part_summaries(out, store, k, env, corpus is not None)
    if not env.is_main:
        return {}
    if coarse is not None:  # two-level: how often a row's label is its exact nearest centroid
        summary["exact_agreement"] = _exact_agreement(out, store, centroids, kept_rows, cfg, env.device)
    return _write_stats(cfg, out, summary, k, training, timings, time.monotonic() - start)


def _exact_agreement(out: Path, store: EmbeddingStore, centroids: np.ndarray, kept_rows: kmeans.KeptRows, cfg,
                     device) -> dict:  # fmt: skip
    """The share of a seeded sample of labelled rows whose two-level label is the exact nearest centroid
    (every centroid scored): what nprobe costs. The sample is bounded by its cost (rows x k x D)."""
    size = int(min(len(kept_rows), AGREEMENT_ROWS, max(100, AGREEMENT_FLOP // max(len(centroids) * store.dim, 1))))
    sample = kept_rows.choose(size, cfg.seed)[np.arange(size)]
    exact, _ = Assigner(centroids, None, 1, device, cfg.memory_gb).assign(unit_rows(store.rows(sample)))
    labels = np.concatenate(
        [np.load(artifact.labels_path(out, i), mmap_mode="r")[local] for i, local in zip(store.part_ids,
         store.split_global(sample), strict=True) if len(local)]
    )  # fmt: skip
    return {"rows": size, "nprobe": cfg.assign_nprobe, "share": float((labels == exact).mean())}


def _part_summaries(out: Path, store: EmbeddingStore, k: int, env: DistEnv, with_corpus: bool) -> dict:
    """What the stats need, summed per part by the rank that owns the part and then reduced: no rank
    holds every label. Cluster sizes are integer sums (exact in any order); the similarity sums stay per
    part and are added in part order, so the stats do not depend on the number of ranks."""
    n_parts = len(store.part_ids)
    sizes = torch.zeros(k, dtype=torch.int64)
    before = torch.zeros(k if with_corpus else 0, dtype=torch.int64)
    per_part = torch.zeros(3, n_parts, dtype=torch.float64)  # rows, assigned rows, their summed similarity
    for i in parts_of_rank(store.part_ids, env):
        labels, sims, every = artifact.read_part_labels(out, i, with_corpus)
        assigned = labels >= 0
        sizes += torch.from_numpy(np.bincount(labels[assigned], minlength=k))
        if every is not None:
            before += torch.from_numpy(np.bincount(every[every >= 0], minlength=k))
        per_part[:, i] = torch.tensor([len(labels), assigned.sum(), sims[assigned].sum(dtype=np.float64)])
    if env.world_size > 1:
        for t in (sizes, before, per_part):
            on_device = t.to(env.device)  # NCCL reduces device tensors only
            dist.all_reduce(on_device)  # each part's entries come from one rank: the others add zeros
            t.copy_(on_device.cpu())
    rows, assigned, similarity = (float(v) for v in per_part.sum(dim=1))
    return {"sizes": sizes.numpy(), "before": before.numpy() if with_corpus else None, "rows": int(rows),
            "assigned": int(assigned), "similarity": similarity}  # fmt: skip


def _write_stats(cfg, out: Path, summary: dict, k: int, training: dict, timings: dict, total_s: float):
    sizes, assigned = summary["sizes"], summary["assigned"]
    stats = {
        "k": k,
        "rows": summary["rows"],
        "assigned": assigned,
        "unassigned": summary["rows"] - assigned,
        "images_per_cluster": float(assigned / k),
        "two_level": training["two_level"],
        "train_rows": training["train_rows"],
        "objective_per_iteration": training["objective"],
        "mean_similarity_to_centroid": summary["similarity"] / assigned if assigned else float("nan"),
        **({"exact_agreement": summary["exact_agreement"]} if "exact_agreement" in summary else {}),
        "cluster_size": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
        "empty_clusters": int((sizes == 0).sum()),
        "timings": {"train_s": training["train_s"], **timings, "total_s": total_s},
        "config": {**asdict(cfg), "k": cfg.k},
    }
    before = summary["before"]
    if before is not None:
        stats["before_and_after_balance"] = {"before": spread(before), "after": spread(sizes)}
    if cfg.plots:
        _plot_sizes(out, sizes)
        if before is not None:
            _plot_balance(out, before, sizes)
    return stats


def spread(sizes: np.ndarray) -> dict:
    """How evenly rows spread over the clusters: rows, entropy (bits) against its maximum log2 k, and the
    Gini coefficient of the sizes (0 = all equal, towards 1 = all in one cluster)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    n, k = sizes.sum(), len(sizes)
    p = sizes[sizes > 0] / n if n else np.zeros(0)
    entropy = float(-(p * np.log2(p)).sum())
    ordered = np.sort(sizes)
    gini = float(2 * (np.arange(1, k + 1) * ordered).sum() / (k * n) - (k + 1) / k) if n and k else 0.0
    return {
        "rows": int(n),
        "entropy_bits": entropy,
        "max_entropy_bits": float(np.log2(k)) if k else 0.0,
        "normalized_entropy": entropy / float(np.log2(k)) if k > 1 else 1.0,
        "gini": gini,
        "largest_share": float(ordered[-1] / n) if n else 0.0,
    }


def _plot_balance(out: Path, before: np.ndarray, after: np.ndarray) -> None:
    """The paper's Fig. 2(d): clusters sorted by size, the corpus before and after balance."""
    fig, ax = new_figure()
    ranks = np.arange(1, len(before) + 1)
    for sizes, label in ((before, "whole corpus"), (after, "balanced")):
        s = spread(sizes)
        text = f"{label} ({s['rows']:,} rows; entropy {s['normalized_entropy']:.3f} of max, Gini {s['gini']:.3f})"
        ax.plot(ranks, np.sort(sizes)[::-1], label=text)
    ax.set(
        xlabel="cluster (sorted by size)",
        ylabel="images",
        yscale="log",
        title=f"images per cluster (k = {len(before):,})",
    )
    ax.legend(fontsize=8)
    save_png(fig, artifact.plot_paths(out)["balance"])


def _plot_sizes(out: Path, sizes: np.ndarray) -> None:
    fig, ax = new_figure()
    ax.hist(sizes, bins=min(60, max(10, len(sizes) // 5)))
    ax.set(xlabel="images in cluster", ylabel="clusters", title=f"cluster sizes (k = {len(sizes):,})")
    save_png(fig, artifact.plot_paths(out)["sizes"])


def summary_text(stats: dict) -> str:
    size = stats["cluster_size"]
    return "\n".join(
        [
            f"k {stats['k']:,} ({'two-level' if stats['two_level'] else 'flat'}), trained on {stats['train_rows']:,} "
            f"rows; {stats['assigned']:,} rows assigned, {stats['unassigned']:,} dropped or invalid",
            f"cluster size min {size['min']:,} median {size['median']:,.0f} max {size['max']:,}; "
            f"empty clusters {stats['empty_clusters']:,}; {stats['images_per_cluster']:.1f} images per cluster",
            f"mean similarity to centroid {stats['mean_similarity_to_centroid']:.4f}; "
            f"time {stats['timings']['total_s']:.1f} s",
        ]
    )
