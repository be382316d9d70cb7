"""Spherical k-means trained by every rank.

- **The sample**: at most k × max_points_per_centroid of the kept rows (faiss's rule), drawn by the seed
  over the kept rows: the same rows whatever the number of ranks. Each rank reads and keeps only its
  contiguous share, so no rank holds more than its share; the share's size is checked against
  --memory-gb before anything is read.
- **Seeding** (rank 0, then broadcast): greedy k-means++ on a bounded subsample (at most
  KMEANS_PP_BUDGET / (k · d) rows, the whole sample where `--init auto` chooses it), else k distinct
  sample rows drawn by the seed; `--nredo` restarts keep the best objective.
- **A Lloyd iteration** is each rank's sums and counts over its share (matrix products in torch on the
  stage's device), all-reduced: every rank then holds the same centroids. The sums are integers (fixed
  point, 2^-32): the same bit for bit on any number of ranks, so the clustering is too. An empty cluster takes half of
  a large one (faiss's split: the centroid copied and both nudged apart), decided by the seed, the same
  on every rank.
- **Two-level** (large k): √k coarse centroids trained that way; every sample row's coarse cell; each fine
  cell trained, single-process, by the rank that owns it (cell id modulo the ranks) on its rows, read by
  that rank alone; the fine centroids gathered; then Lloyd iterations over all k with the two-level
  assignment, all-reduced (the refinement that repairs the cells' borders).
- **Resume**: rank 0 writes the centroids after every finished iteration (and each fine cell as it is
  done) through cluster/artifact.py, so a killed run resumes from the last finished iteration.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import clipcid.cluster.artifact as artifact
from clipcid.embed.artifact import EmbeddingStore
from clipcid.errors import ClipcidError
from clipcid.stage import DistEnv, barrier, row_chunks, unit_rows
from clipcid.util.progress import progress_bar

log = logging.getLogger("clipcid")

KMEANS_PP_BUDGET = 2e10  # n * k * d beyond which greedy k-means++ seeding costs more than it saves
SPLIT_EPS = 1 / 1024  # how far apart an empty cluster and the one it splits are nudged (faiss's EPS)
# The k x D copies a Lloyd iteration holds, in bytes a number: the centroids, their int64 sums, the update
# and the assignment's filed copy (4 + 8 + 4 + 4).
CENTROID_COPY_BYTES = 20
FIXED_POINT = 2.0**32  # the Lloyd sums' unit: a row's coordinate is kept to 2^-32
FIXED_POINT_ROWS = 8192  # rows converted at once (8192 x 1,280 x 8 bytes: 84 MB; larger blocks measured slower)


@dataclass
class Training:
    """What training needs besides the rows: the settings it runs with and where it keeps its state."""

    k: int
    niter: int
    seed: int
    init: str
    nredo: int
    nprobe: int
    refine_iterations: int
    memory_gb: float
    folder: Path
    settings: dict


class KeptRows:
    """The kept rows (a mask over the corpus, one byte a row) and a seeded choice of them, as positions in
    the sequence of kept rows, turned into global rows part by part: no rank lists every kept row (8 bytes a
    row of the corpus on every rank, 3.2 GB at 400M)."""

    def __init__(self, kept: np.ndarray, offsets: np.ndarray, positions: np.ndarray | None = None):
        self.kept, self.offsets, self.positions = kept, np.asarray(offsets), positions
        per_part = [int(kept[a:b].sum()) for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True)]
        self.kept_before = np.concatenate([[0], np.cumsum(per_part)]).astype(np.int64)
        self.n_kept = int(self.kept_before[-1])

    def __len__(self) -> int:
        return self.n_kept if self.positions is None else len(self.positions)

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        """The global rows of the chosen rows at `index` (positions in the choice)."""
        positions = np.asarray(index, dtype=np.int64) if self.positions is None else self.positions[index]
        out = np.empty(len(positions), dtype=np.int64)
        part_of = np.searchsorted(self.kept_before, positions, side="right") - 1
        for p in np.unique(part_of):
            sel = np.flatnonzero(part_of == p)
            local = np.flatnonzero(self.kept[self.offsets[p] : self.offsets[p + 1]])
            out[sel] = local[positions[sel] - self.kept_before[p]] + self.offsets[p]
        return out

    def choose(self, count: int, seed: int) -> KeptRows:
        """`count` of the kept rows drawn by the seed (all of them when there are no more): the same rows as
        choosing from the list of every kept row would give, whatever the number of ranks."""
        if self.n_kept <= count:
            return self
        positions = np.sort(np.random.default_rng(seed).choice(self.n_kept, size=count, replace=False))
        return KeptRows(self.kept, self.offsets, positions)

    def share(self, env: DistEnv) -> np.ndarray:
        """This rank's contiguous share of the chosen rows (np.array_split's split), as global rows."""
        n, w = len(self), env.world_size
        lo = env.rank * (n // w) + min(env.rank, n % w)
        return self[np.arange(lo, lo + n // w + (env.rank < n % w))]


def draw_sample(kept: KeptRows, k: int, max_points_per_centroid: int, seed: int) -> KeptRows:
    """The training sample: at most k x max_points_per_centroid kept rows, the same for any number of ranks."""
    return kept.choose(k * max_points_per_centroid, seed)


def check_memory(n_sample: int, dim: int, k: int, env: DistEnv, memory_gb: float) -> None:
    """One line, before anything is read, when this rank's peak would not fit in --memory-gb: its share of
    the sample, the k x D copies training holds (CENTROID_COPY_BYTES a number), and the score blocks, which
    the assignment sizes to half the budget."""
    share = -(-n_sample // env.world_size) * dim * 4 / 1e9
    copies = k * dim * CENTROID_COPY_BYTES / 1e9
    if share + copies > memory_gb / 2:
        raise ClipcidError(
            f"k-means expects a peak of {share + copies + memory_gb / 2:.1f} GB per rank on {env.world_size} rank(s) "
            f"(its share of the {n_sample:,} x {dim} sample {share:.1f} GB, k = {k:,} centroids' copies {copies:.1f} "
            f"GB, score blocks {memory_gb / 2:g} GB), more than --memory-gb {memory_gb:g}; raise --memory-gb, lower "
            "--max-points-per-centroid, or use more ranks"
        )


def read_rows(store: EmbeddingStore, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """This rank's rows as unit float32 rows on the device, normalised in place (one copy in memory)."""
    x = store.rows(rows)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return torch.from_numpy(x).to(device)


def kmeans_plus_plus(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Greedy k-means++ seeding on unit vectors (|a - b|^2 = 2 - 2 a.b): each step draws 2 + log k
    candidates by D^2 sampling and keeps the one that lowers the potential most. Plain k-means++
    still merges well-separated blobs now and then; the greedy variant rarely does."""
    rng = np.random.default_rng(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    trials = 2 + int(math.log(k))
    chosen = [int(rng.integers(len(x)))]
    dist_ = (2 - 2 * (xt @ xt[chosen[0]])).clamp_min(0)
    for _ in range(1, k):
        cumulative = np.cumsum(dist_.numpy(), dtype=np.float64)
        if cumulative[-1] <= 0:  # fewer distinct points than k: pick the rest at random
            chosen.append(int(rng.integers(len(x))))
            continue
        candidates = np.minimum(np.searchsorted(cumulative, rng.random(trials) * cumulative[-1]), len(x) - 1)
        cand_dist = torch.minimum(dist_[None, :], (2 - 2 * (xt[candidates] @ xt.T)).clamp_min(0))
        best = int(torch.argmin(cand_dist.sum(dim=1)))
        chosen.append(int(candidates[best]))
        dist_ = cand_dist[best]
    return x[chosen].copy()


def uses_kmeans_plus_plus(init: str, n: int, k: int, dim: int) -> bool:
    return init == "kmeans++" or (init == "auto" and n * k * dim <= KMEANS_PP_BUDGET and k > 1)


def seed_centroids(
    read: Callable[[np.ndarray], np.ndarray], n: int, k: int, dim: int, init: str, seed: int
) -> np.ndarray:
    """Starting centroids from the sample (positions 0..n-1, read by `read`): greedy k-means++ on a
    bounded subsample, or k distinct positions drawn by the seed."""
    rng = np.random.default_rng(seed)
    if uses_kmeans_plus_plus(init, n, k, dim):
        bound = min(n, max(k, int(KMEANS_PP_BUDGET / max(k * dim, 1))))
        picked = np.sort(rng.permutation(n)[:bound])
        return kmeans_plus_plus(read(picked), k, seed)
    return read(np.sort(rng.choice(n, size=k, replace=False)))


def split_empty(centroids: torch.Tensor, counts: torch.Tensor, seed: int, iteration: int) -> torch.Tensor:
    """Each empty cluster takes the place of half a cluster drawn in proportion to its size beyond one
    (faiss's rule), the two centroids nudged apart; the same on every rank (a seeded generator)."""
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if not empty:
        return centroids
    rng = np.random.default_rng([seed, iteration])
    sizes = counts.double().cpu().numpy().copy()
    sign = torch.ones(centroids.shape[1], device=centroids.device)
    sign[1::2] = -1
    for ci in empty:
        weights = np.maximum(sizes - 1, 0)
        if weights.sum() <= 0:
            break
        cj = int(rng.choice(len(sizes), p=weights / weights.sum()))
        centroids[ci] = centroids[cj] * (1 + SPLIT_EPS * sign)
        centroids[cj] = centroids[cj] * (1 - SPLIT_EPS * sign)
        sizes[ci] = sizes[cj] / 2
        sizes[cj] -= sizes[ci]
    return F.normalize(centroids, dim=1)


def fixed_point_sums(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Each cluster's sum of its rows, in integers (FIXED_POINT units): integer addition does not depend
    on the order of the terms, so the sums, and so the centroids, are the same bit for bit whether one
    process or many summed them and in whatever order the ranks' parts arrive (float sums differ in their
    last bits, which k-means amplifies over the iterations). Rows are unit vectors: a sum stays below
    2^63 up to 2^31 rows in one cluster."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.int64, device=x.device)
    for s, e in row_chunks(len(x), FIXED_POINT_ROWS):
        # Truncated toward zero (an error below 2^-32, and a pass cheaper than rounding): the same integers
        # for the same row on every rank, which is all the order-free sum needs.
        sums.index_add_(0, labels[s:e], (x[s:e] * FIXED_POINT).long())
    return sums


def _all_reduce(env: DistEnv, *tensors: torch.Tensor) -> None:
    if env.world_size > 1:
        for t in tensors:
            dist.all_reduce(t)


def _broadcast(env: DistEnv, tensor: torch.Tensor) -> torch.Tensor:
    if env.world_size > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def lloyd(
    env: DistEnv,
    x: torch.Tensor,
    centroids: torch.Tensor,
    assign: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    iterations: range,
    seed: int,
    after: Callable[[int, torch.Tensor, float], None] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Lloyd iterations of spherical k-means over every rank's share `x`; `after(i, centroids, objective)`
    runs once each iteration is done (rank 0 writes it down). Returns the centroids and the objective of
    each iteration (the summed similarity of the rows to their centroids, as faiss reports it)."""
    objective = []
    for i in iterations:
        labels, sims = assign(x, centroids)
        sums = fixed_point_sums(x, labels, len(centroids))
        counts = torch.bincount(labels, minlength=len(centroids))
        total = sims.double().sum().reshape(1)
        _all_reduce(env, sums, counts, total)
        means = F.normalize(sums.double(), dim=1).to(centroids.dtype)
        updated = torch.where(counts[:, None] > 0, means, centroids)
        centroids = split_empty(updated, counts, seed, i)
        objective.append(float(total))
        if after is not None:
            after(i, centroids, objective[-1])
    return centroids, objective


def train(
    env: DistEnv,
    store: EmbeddingStore,
    sample: KeptRows,
    t: Training,
    two_level: bool,
    make_assigner: Callable,
) -> tuple[np.ndarray, np.ndarray | None, list[float]]:
    """The centroids (and coarse centroids in two-level mode) trained by every rank on the sample; the
    objective per iteration (of the flat, or the coarse, training)."""
    check_memory(len(sample), store.dim, t.k, env, t.memory_gb)
    mine = sample.share(env)
    x = read_rows(store, mine, env.device)
    log.info(
        "rank %d: training %s k-means, k=%d, on its %d of %d sample rows",
        env.rank,
        "two-level" if two_level else "flat",
        t.k,
        len(mine),
        len(sample),
    )

    def flat(rows: torch.Tensor, c: torch.Tensor):
        return make_assigner(c, None).assign_tensor(rows)

    if not two_level:
        centroids, objective = _train_flat(env, store, sample, x, t, t.k, "flat", flat)
        return centroids.cpu().numpy(), None, objective
    k1 = max(1, min(int(round(math.sqrt(t.k))), len(sample)))
    coarse, objective = _train_flat(env, store, sample, x, t, k1, "coarse", flat)
    fine = _train_fine_cells(env, store, sample, x, t, coarse, make_assigner)
    stage = "refine"
    state = artifact.read_kmeans_state(t.folder, stage)
    start, centroids = (state[0], torch.from_numpy(state[1]).to(env.device)) if state else (0, fine)
    coarse_np = coarse.cpu().numpy()

    def two_level_assign(rows: torch.Tensor, c: torch.Tensor):
        return make_assigner(c, coarse_np).assign_tensor(rows)

    centroids, _ = lloyd(
        env,
        x,
        centroids,
        two_level_assign,
        range(start, t.refine_iterations),
        t.seed,
        _recorder(env, t, stage, 0, state[2] if state else []),
    )
    return centroids.cpu().numpy(), coarse_np, objective


def _recorder(env: DistEnv, t: Training, stage: str, redo: int, earlier: list[float]):
    """Rank 0 writes down each finished iteration, with the objective of every iteration so far."""
    history = list(earlier)

    def after(i: int, centroids: torch.Tensor, objective: float) -> None:
        history.append(objective)
        if env.is_main:
            artifact.write_kmeans_state(t.folder, stage, redo, i + 1, centroids.cpu().numpy(), history)

    return after


def _train_flat(env, store, sample, x, t: Training, k: int, stage: str, assign) -> tuple[torch.Tensor, list[float]]:
    """k centroids on the whole sample (every rank its share), with `nredo` restarts for random seeding."""
    redos = 1 if uses_kmeans_plus_plus(t.init, len(sample), k, store.dim) else t.nredo
    best: tuple[torch.Tensor, list[float]] | None = None
    for redo in range(redos):
        state = artifact.read_kmeans_state(t.folder, stage, redo)
        if state is not None:
            start, centroids = state[0], torch.from_numpy(state[1]).to(env.device)
            objective = state[2]
        else:
            start, objective = 0, []
            centroids = torch.zeros(k, store.dim, device=env.device)
            if env.is_main:
                seeded = seed_centroids(lambda p: unit_rows(store.rows(sample[p])), len(sample), k, store.dim,
                                        t.init, t.seed + redo)  # fmt: skip
                centroids = torch.from_numpy(np.ascontiguousarray(seeded, dtype=np.float32)).to(env.device)
            centroids = _broadcast(env, centroids)
        centroids, more = lloyd(
            env, x, centroids, assign, range(start, t.niter), t.seed + redo, _recorder(env, t, stage, redo, objective)
        )
        objective = objective + more
        if best is None or objective[-1] > best[1][-1]:
            best = (centroids, objective)
    return best


def _train_fine_cells(env, store, sample, x, t: Training, coarse: torch.Tensor, make_assigner) -> torch.Tensor:
    """Every fine cell trained by its owner on its own rows; the fine centroids gathered, in cell order."""
    k1 = len(coarse)
    labels, _ = make_assigner(coarse, None).assign_tensor(x)
    counts = torch.bincount(labels, minlength=k1)
    _all_reduce(env, counts)
    per_cell = proportional_split(t.k, counts.cpu().numpy())
    # Each rank hands every other the rows of its share that fall in the cells that rank trains, so a
    # rank holds the cell labels of its own cells' rows only (in sample order: the shares are contiguous).
    mine, cells = sample.share(env), labels.cpu().numpy()
    for owner in range(env.world_size):
        to_owner = cells % env.world_size == owner
        artifact.write_share_cells(t.folder, env.rank, owner, mine[to_owner], cells[to_owner])
    barrier(env)
    received = [artifact.read_share_cells(t.folder, source, env.rank) for source in range(env.world_size)]
    rows_here = np.concatenate([r for r, _ in received])
    cells_here = np.concatenate([c for _, c in received])
    del received
    owned = [c for c in range(k1) if c % env.world_size == env.rank and per_cell[c] > 0]
    todo = [c for c in owned if not artifact.fine_cell_path(t.folder, c).is_file()]
    with progress_bar(len(todo), f"fine cells (rank {env.rank})", "cell", env.is_main) as bar:
        for c in todo:
            members = rows_here[cells_here == c]
            rows = unit_rows(store.rows(members))
            if per_cell[c] >= len(members):
                fine = rows[: per_cell[c]]
            else:
                local = DistEnv(0, 1, 0, env.device)
                xc = torch.from_numpy(rows).to(env.device)
                start = seed_centroids(lambda p, r=rows: r[p], len(rows), int(per_cell[c]), store.dim, t.init,
                                       t.seed + 1 + c)  # fmt: skip
                centroids = torch.from_numpy(np.ascontiguousarray(start, dtype=np.float32)).to(env.device)

                def assign(r: torch.Tensor, cc: torch.Tensor):
                    return make_assigner(cc, None).assign_tensor(r)

                fine = lloyd(local, xc, centroids, assign, range(t.niter), t.seed + 1 + c)[0].cpu().numpy()
            artifact.write_fine_cell(t.folder, c, np.ascontiguousarray(fine, dtype=np.float32))
            bar.update(1)
    barrier(env)
    gathered = [np.load(artifact.fine_cell_path(t.folder, c)) for c in range(k1) if per_cell[c] > 0]
    return torch.from_numpy(np.concatenate(gathered)).to(env.device)


def proportional_split(k: int, sizes: np.ndarray) -> np.ndarray:
    """Integers summing to k, proportional to sizes (largest remainder), at least 1 and at most the
    cell's size for every non-empty cell."""
    sizes = np.asarray(sizes, dtype=np.float64)
    share = k * sizes / sizes.sum()
    out = np.floor(share).astype(np.int64)
    out = np.minimum(np.maximum(out, (sizes > 0).astype(np.int64)), sizes.astype(np.int64))
    while out.sum() < k:
        room = (out < sizes) & (sizes > 0)
        gap = np.where(room, share - out, -np.inf)
        out[int(np.argmax(gap))] += 1
    while out.sum() > k:
        over = np.where(out > 1, out - share, -np.inf)
        out[int(np.argmax(over))] -= 1
    return out
