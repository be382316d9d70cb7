"""`clipcid balance`: Image Semantic Balance (CLIP-CID §3.1).

Join every two valid images whose normalised teacher embeddings are closer than a threshold, take the
connected components of that graph (the paper's union-find, here scipy.sparse.csgraph), keep in each
component the member nearest to the component's mean, drop the rest.

Every threshold is turned into one on the dot product s of unit vectors, and an edge needs s > s*:
  l2:      |a - b|   < t  <=>  s > 1 - t^2 / 2
  sql2:    |a - b|^2 < t  <=>  s > 1 - t / 2
  cosine:  1 - s     < t  <=>  s > 1 - t

Search: exact (blocked matrix products against a threshold, the upper triangle only, blocks sized to
--memory-gb, embeddings read by memmap) or faiss IVF (range search, its pair recall measured against
exact search on a sample). Edges are found once at a looser threshold and kept with their
similarities, so the removal curve and --target-removal need no second search.

With a hold-out (--holdout, clipcid/holdout.py), its rows take part in the search but not in the graph
that is balanced, and every row within the threshold of a held-out picture is dropped too, so that
the held-out figures measure generalisation rather than memory. The threshold of --target-removal is
chosen on the rows that are not held out. --held-out-threshold fixes that guard's radius apart from
the balance threshold, so that balances of different strength (and --random-removal, even at 0: no
balance) can be compared under one guard: the same training rows kept from the held-out pictures.

Outputs in OUT (balance/artifact.py owns the layout): keep and group masks per part, stats.json, plots;
edges/ holds the per-block edge files that make a crashed run resumable.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

from clipcid.balance.artifact import SETTINGS_FILE, keep_path, plot_paths, write_masks
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
    read_record,
    record_matches,
    row_chunks,
    unit_rows,
    write_record,
)
from clipcid.util.fileio import atomic_path, save_npy_atomic
from clipcid.util.plots import new_figure, save_png
from clipcid.util.progress import progress_bar

log = logging.getLogger("clipcid")

METRICS = ("l2", "sql2", "cosine")
# Edges are collected up to this multiple of the threshold, for the removal curve.
CURVE_REACH = 1.5


@dataclass
class BalanceConfig:
    emb: str = option(help="teacher embeddings folder (clipcid embed)")
    out: str = option(help="output folder: keep masks, groups, stats.json, plots")
    threshold: float = option(0.07, "distance below which two images merge", above=0)
    metric: str = option("l2", "what the threshold bounds: |a-b|, |a-b|^2, or 1 - cos", METRICS)
    target_removal: float | None = option(
        None, "pick the threshold that removes this fraction instead", above=0, below=1
    )
    random_removal: float | None = option(
        None, "a control, not the method: remove this fraction at random (--seed)", at_least=0, below=1
    )
    holdout: str | None = option(None, "hold-out folder (clipcid holdout): not balanced, near-duplicates dropped")
    held_out_threshold: float | None = option(
        None,
        "with --holdout: drop training rows within this distance (--metric) of a held-out picture (default: the "
        "balance threshold; with --random-removal, none unless given)",
        above=0,
    )
    search: str = option("exact", "exact (blocked matrix products) or ivf (faiss cells: millions)", ("exact", "ivf"))
    nlist: int | None = option(None, "ivf: number of cells (default sqrt(N*nprobe))", at_least=1)
    nprobe: int = option(4, "ivf: cells each point is compared against", at_least=1)
    memory_gb: float = option(2.0, "memory for one block of the search", above=0)
    recall_sample: int = option(1000, "ivf: queries checked against exact search", at_least=1)
    seed: int = option(0, "seed of the IVF cells and of --random-removal")
    device: str = option("auto", "auto, cpu or cuda")
    plots: bool = option(True, "write group_sizes.png and removal_curve.png")
    overwrite: bool = option(False, "replace what --out holds if it was made with other settings")


# Settings that do not change what is written (how fast, where, with which pictures).
RUNTIME_FIELDS = ("out", "memory_gb", "recall_sample", "device", "plots", "overwrite")


def run_settings(cfg: BalanceConfig, embeddings: Embeddings) -> dict:
    """What the folder's content follows from: the config, and what its inputs were made from (the
    embeddings' and the hold-out's identities, so that either made again means balance again)."""
    # The inputs by what they hold, not where they are: a run folder moved or copied stays valid.
    own = {k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS and k not in ("emb", "holdout")}
    if cfg.held_out_threshold is None:
        del own["held_out_threshold"]  # the settings of before the option: such folders stay finished
    return {
        **own,
        "embeddings": embeddings.identity,
        "holdout": HoldOut.open(cfg.holdout).identity if cfg.holdout else None,
        "rows": embeddings.images.total,
    }


def to_similarity(threshold: float, metric: str) -> float:
    if metric == "l2":
        return 1.0 - threshold * threshold / 2.0
    if metric == "sql2":
        return 1.0 - threshold / 2.0
    if metric == "cosine":
        return 1.0 - threshold
    raise ClipcidError(f"--metric must be one of {', '.join(METRICS)}, not {metric}")


def from_similarity(similarity: float, metric: str) -> float:
    if metric == "l2":
        return math.sqrt(max(0.0, 2.0 * (1.0 - similarity)))
    if metric == "sql2":
        return 2.0 * (1.0 - similarity)
    if metric == "cosine":
        return 1.0 - similarity
    raise ClipcidError(f"--metric must be one of {', '.join(METRICS)}, not {metric}")


def thresholds_in_all_metrics(similarity: float) -> dict[str, float]:
    return {"similarity": similarity, **{m: from_similarity(similarity, m) for m in METRICS}}


def block_size_for(memory_gb: float, dim: int) -> int:
    """Largest B whose B x B float32 score block plus two B x D operand blocks fit half the budget."""
    budget = memory_gb * 1e9 / 2
    b = int((-8 * dim + math.sqrt(64 * dim * dim + 16 * budget)) / 8)
    return max(256, min(b, ROW_CHUNK))


class ValidEmbeddings:
    """The valid rows of an embedding store as one matrix of unit vectors, by position 0..n-1.

    The stored rows (of whatever dtype the parts hold) are held in memory when they fit half the
    budget, else read from the memmapped parts; either way a block is normalised in float32 the same
    way, so results do not depend on which. On a GPU, the normalised rows stay on the device when they
    fit half the budget, so that a block is not normalised and uploaded again for every block pair.
    """

    def __init__(self, store: EmbeddingStore, memory_gb: float):
        self.store, self.memory_gb = store, memory_gb
        valid = store.valid_mask()
        self.global_rows = np.flatnonzero(valid)
        self.n = len(self.global_rows)
        self._raw = None
        if self.n * store.dim * store.itemsize <= memory_gb * 1e9 / 2:
            self._raw = np.concatenate([store.read(i, np.flatnonzero(store.valid(i))) for i in store.part_ids])
        self._on_device: torch.Tensor | None = None

    def device_block(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """block(start, stop) on `device`; on a GPU from the rows kept there when they fit."""
        if (
            device.type == "cuda"
            and self._on_device is None
            and self.n * self.store.dim * 4 <= self.memory_gb * 1e9 / 2
        ):
            chunks = [torch.from_numpy(self.block(s, e)).to(device) for s, e in row_chunks(self.n)]
            self._on_device = torch.cat(chunks) if chunks else torch.zeros(0, self.store.dim, device=device)
        if self._on_device is not None and self._on_device.device == device:
            return self._on_device[start:stop]
        return torch.from_numpy(self.block(start, stop)).to(device)

    def block(self, start: int, stop: int) -> np.ndarray:
        if self._raw is not None:
            return unit_rows(self._raw[start:stop])
        return unit_rows(self.store.rows(self.global_rows[start:stop]))

    def gather(self, positions: np.ndarray) -> np.ndarray:
        if self._raw is not None:
            return unit_rows(self._raw[positions])
        return unit_rows(self.store.rows(self.global_rows[positions]))


def exact_block_edges(
    data: ValidEmbeddings, blocks: list[tuple[int, int]], i: int, sim_min: float, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (a < b) with similarity > sim_min, a in block i and b in block i or a later one."""
    a0, a1 = blocks[i]
    q = data.device_block(a0, a1, device)
    rows, cols, sims = [], [], []
    for b0, b1 in blocks[i:]:
        k = q if b0 == a0 else data.device_block(b0, b1, device)
        scores = q @ k.T
        r, c = torch.nonzero(scores > sim_min, as_tuple=True)
        if b0 == a0:  # the diagonal block: each pair once, no self pairs
            upper = r < c
            r, c = r[upper], c[upper]
        sims.append(scores[r, c].float().cpu().numpy())
        rows.append(r.cpu().numpy() + a0)
        cols.append(c.cpu().numpy() + b0)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims)


def train_cells(data: ValidEmbeddings, nlist: int, seed: int) -> np.ndarray:
    """IVF cells: faiss spherical k-means on 40 points per cell, 10 iterations (cells only need to be
    roughly right: a pair is found as long as one point probes the other's cell)."""
    import faiss

    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(data.n, size=min(data.n, nlist * 40), replace=False))
    km = faiss.Kmeans(data.store.dim, nlist, niter=10, seed=seed, spherical=True, verbose=False)
    km.train(data.gather(sample))
    return km.centroids.astype(np.float32)


def probe_cells(data: ValidEmbeddings, cells: np.ndarray, nprobe: int, rows: np.ndarray | None = None) -> np.ndarray:
    """len(rows) x nprobe: each point's nearest cells, nearest first (column 0 is the cell it is stored
    in), for the contiguous positions `rows` (all by default)."""
    import faiss

    index = faiss.IndexFlatIP(cells.shape[1])
    index.add(cells)
    first, n = (int(rows[0]), len(rows)) if rows is not None and len(rows) else (0, data.n if rows is None else 0)
    out = np.empty((n, nprobe), dtype=np.int64)
    for s, e in row_chunks(n):
        out[s:e] = index.search(data.block(first + s, first + e), nprobe)[1]
    return out


class CellJoin:
    """IVF search as a join: each cell's stored points against every point that probes the cell, one
    dense matrix product per cell. The pairs are those faiss's IVF range search would find with the
    same cells and nprobe, at the speed of a matrix product instead of a per-query scan."""

    def __init__(self, probes: np.ndarray, nlist: int, rows_per_job: int):
        n, nprobe = probes.shape
        primary = probes[:, 0]
        self.members = np.argsort(primary, kind="stable")
        self.member_bounds = np.searchsorted(primary[self.members], np.arange(nlist + 1))
        flat = probes.ravel()
        order = np.argsort(flat, kind="stable")
        self.queries = order // nprobe
        self.query_bounds = np.searchsorted(flat[order], np.arange(nlist + 1))
        # Jobs of whole cells with about rows_per_job stored points each: the unit of resumption.
        sizes = np.diff(self.member_bounds)
        job_of_cell = np.cumsum(sizes) // max(1, rows_per_job)
        self.jobs = [np.flatnonzero(job_of_cell == j) for j in np.unique(job_of_cell)]

    def job_edges(self, data: ValidEmbeddings, job: int, sim_min: float, device: torch.device):
        rows, cols, sims = [], [], []
        for c in self.jobs[job]:
            members = self.members[self.member_bounds[c] : self.member_bounds[c + 1]]
            queries = self.queries[self.query_bounds[c] : self.query_bounds[c + 1]]
            if len(members) == 0 or len(queries) == 0:
                continue
            scores = (
                torch.from_numpy(data.gather(queries)).to(device) @ torch.from_numpy(data.gather(members)).to(device).T
            )
            r, k = torch.nonzero(scores > sim_min, as_tuple=True)
            q, m = queries[r.cpu().numpy()], members[k.cpu().numpy()]
            keep = q != m
            rows.append(np.minimum(q, m)[keep])
            cols.append(np.maximum(q, m)[keep])
            sims.append(scores[r, k].cpu().numpy()[keep])
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(rows), np.concatenate(cols), np.concatenate(sims).astype(np.float32)


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def central_members_of_shard(
    data: ValidEmbeddings,
    labels: np.ndarray,
    positions: np.ndarray,
    shard: int,
    shards: int,
    memory_gb: float,
    device: torch.device,
) -> np.ndarray:
    """The kept position of every merged group g with g % shards == shard: the member nearest the group's
    mean (the highest similarity to the sum of its unit rows; ties to the earliest row). Groups are taken
    a batch at a time, their sums within the memory budget, so no rank holds every group's rows.
    `labels[i]` is the group of vertex i, which stands for the data position positions[i]."""
    sizes = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
    mine = np.flatnonzero((sizes > 1) & (np.arange(len(sizes)) % shards == shard))
    if len(mine) == 0:
        return np.zeros(0, dtype=np.int64)
    owned = np.zeros(len(sizes), dtype=bool)
    owned[mine] = True
    members = np.flatnonzero(owned[labels])  # vertices in row order
    members = members[np.argsort(labels[members], kind="stable")]  # by group, rows ascending inside
    bounds = np.append(np.searchsorted(labels[members], mine, side="left"), len(members))
    per_batch = max(1, int(memory_gb * 1e9 / 4 / (8 * data.store.dim)))  # float64 sums in a quarter
    kept = []
    for g0 in range(0, len(mine), per_batch):
        g1 = min(g0 + per_batch, len(mine))
        batch = members[bounds[g0] : bounds[g1]]
        local = np.repeat(np.arange(g1 - g0), np.diff(bounds[g0 : g1 + 1]))
        sums = torch.zeros(g1 - g0, data.store.dim, dtype=torch.float64, device=device)
        scores = np.empty(len(batch), dtype=np.float64)
        spans = row_chunks(len(batch))
        for s, e in spans:  # pass 1: the groups' sums (the mean's direction), rows in order
            x = torch.from_numpy(data.gather(positions[batch[s:e]])).to(device, torch.float64)
            sums.index_add_(0, torch.from_numpy(local[s:e]).to(device), x)
        for s, e in spans:  # pass 2: each member's similarity to its group's mean direction
            x = torch.from_numpy(data.gather(positions[batch[s:e]])).to(device, torch.float64)
            scores[s:e] = (x * sums[torch.from_numpy(local[s:e]).to(device)]).sum(dim=1).cpu().numpy()
        order = np.lexsort((batch, -scores, local))
        first = np.ones(len(order), dtype=bool)
        first[1:] = local[order[1:]] != local[order[:-1]]
        kept.append(batch[order[first]])
    return np.concatenate(kept)


def _size_histogram(labels: np.ndarray) -> dict[str, int]:
    """Number of groups by size, in power-of-two bins: '1', '2', '3-4', '5-8', ..."""
    sizes = np.bincount(labels) if len(labels) else np.zeros(0, dtype=np.int64)
    hist: dict[str, int] = {}
    lo = 1
    while lo <= (sizes.max() if len(sizes) else 0):
        hi = lo if lo <= 2 else 2 * (lo - 1)
        label = str(lo) if lo == hi else f"{lo}-{hi}"
        count = int(((sizes >= lo) & (sizes <= hi)).sum())
        if count:
            hist[label] = count
        lo = hi + 1
    return hist


class EdgeSearch:
    """Finds (and caches on disk, block by block) every pair above a similarity floor."""

    def __init__(self, cfg: BalanceConfig, data: ValidEmbeddings, env: DistEnv, device: torch.device):
        self.cfg, self.data, self.env, self.device = cfg, data, env, device
        self.block = block_size_for(cfg.memory_gb, data.store.dim)
        self.blocks = row_chunks(data.n, self.block)
        self.folder = Path(cfg.out) / "edges"
        # Cost ~ n*nlist*d to probe plus n*nprobe*(n/nlist)*d to join: balanced at nlist = sqrt(n*nprobe).
        self.nlist = cfg.nlist or max(1, min(int(math.sqrt(max(data.n, 1) * cfg.nprobe)), data.n // 40 or 1))

    def _settings(self, sim_min: float) -> dict:
        return {
            "n_valid": self.data.n,
            "sizes": self.data.store.sizes,
            "block": self.block,
            "sim_min": sim_min,
            "search": self.cfg.search,
            "nlist": self.nlist,
            "nprobe": self.cfg.nprobe,
            "seed": self.cfg.seed,
        }

    def _prepare_ivf(self) -> CellJoin:
        """Rank 0 trains the cells (on a sample: cheap); every rank probes its share of the points (half the
        search's arithmetic), and every rank reads all the probes (N x nprobe integers: O(N))."""
        cells_file = self.folder / "ivf_cells.npy"
        if self.env.is_main and not cells_file.is_file():
            save_npy_atomic(cells_file, train_cells(self.data, self.nlist, self.cfg.seed))
        barrier(self.env)
        cells = np.load(cells_file)
        shares = np.array_split(np.arange(self.data.n), self.env.world_size)
        mine = self.folder / f"ivf_probes_{self.env.rank}_of_{self.env.world_size}.npy"
        if not mine.is_file():
            rows = shares[self.env.rank]
            save_npy_atomic(mine, probe_cells(self.data, cells, min(self.cfg.nprobe, self.nlist), rows))
        barrier(self.env)
        probes = np.concatenate(
            [np.load(self.folder / f"ivf_probes_{r}_of_{self.env.world_size}.npy") for r in range(self.env.world_size)]
        )
        return CellJoin(probes, self.nlist, self.block)

    def run(self, sim_min: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        settings = self._settings(sim_min)
        settings_file = self.folder / "settings.json"
        if self.env.is_main:
            previous = read_record(settings_file)
            if previous is not None and not record_matches(settings_file, settings):
                # Edges of another threshold are not reusable; IVF cells of the same data are.
                for f in self.folder.glob("block_*.npz"):
                    f.unlink()
                old = previous.get("settings", {})
                if {k: v for k, v in old.items() if k != "sim_min"} != {
                    k: v for k, v in settings.items() if k != "sim_min"
                }:
                    shutil.rmtree(self.folder)
            write_record(settings_file, settings)
        barrier(self.env)
        join = self._prepare_ivf() if self.cfg.search == "ivf" else None
        n_jobs = len(join.jobs) if join is not None else len(self.blocks)
        mine = parts_of_rank(range(n_jobs), self.env)
        todo = [i for i in mine if not (self.folder / f"block_{i:06d}.npz").is_file()]
        if len(todo) < len(mine):
            log.info("rank %d: %d of %d edge blocks already done", self.env.rank, len(mine) - len(todo), len(mine))
        with progress_bar(
            len(todo), f"{self.cfg.search} search (rank {self.env.rank})", "block", self.env.is_main
        ) as bar:
            for i in todo:
                if join is None:
                    a, b, s = exact_block_edges(self.data, self.blocks, i, sim_min, self.device)
                else:
                    a, b, s = join.job_edges(self.data, i, sim_min, self.device)
                with atomic_path(self.folder / f"block_{i:06d}.npz") as tmp, open(tmp, "wb") as f:
                    np.savez(f, a=a, b=b, s=s)
                bar.update(1)
        barrier(self.env)
        self.n_jobs = n_jobs

    def block_file(self, i: int) -> Path:
        return self.folder / f"block_{i:06d}.npz"

    def _edges(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with np.load(self.block_file(i)) as f:
            return f["a"].astype(np.int64), f["b"].astype(np.int64), f["s"].astype(np.float32)

    def reduce(self, members: np.ndarray, marked: np.ndarray | None = None, tag: str = "forest"):
        """Stream this rank's edge blocks, each reduced to a maximum-similarity spanning forest of its edges
        among `members`; the blocks' forests are merged into the rank's once they hold as many edges as it
        (so each edge takes part in a logarithmic number of merges, and memory stays O(N)); the ranks'
        forests then merge in a tree, pairs of ranks at a time, onto rank 0. Returns, on rank 0, the forest
        (at most N - 1 edges: at any threshold it has the components of all the edges) and, with `marked`,
        each position's best similarity to a marked position (None elsewhere)."""
        forest, pending = Forest.empty(), []
        best = np.full(self.data.n, -np.inf, dtype=np.float32) if marked is not None else None
        for i in parts_of_rank(range(self.n_jobs), self.env):
            a, b, s = self._edges(i)
            if best is not None:
                touching = marked[a] != marked[b]
                other = np.where(marked[a[touching]], b[touching], a[touching])
                np.maximum.at(best, other, s[touching])
            inside = members[a] & members[b]
            pending.append(Forest.of(a[inside], b[inside], s[inside]))
            if sum(len(f.a) for f in pending) >= max(len(forest.a), ROW_CHUNK):
                forest = Forest.union(forest, *pending)
                pending = []
        forest = Forest.union(forest, *pending)
        step = 1
        while step < self.env.world_size:  # a tree over the ranks: log2(ranks) rounds, in parallel
            path = self.folder / f"{tag}_rank{self.env.rank}.npz"
            if self.env.rank % (2 * step) == step:  # hand this rank's forest over and leave the tree
                with atomic_path(path) as tmp, open(tmp, "wb") as f:
                    np.savez(f, a=forest.a, b=forest.b, s=forest.s, best=best if best is not None else np.zeros(0))
            barrier(self.env)
            partner = self.env.rank + step
            if self.env.rank % (2 * step) == 0 and partner < self.env.world_size:
                with np.load(self.folder / f"{tag}_rank{partner}.npz") as f:
                    forest = Forest.union(forest, Forest(f["a"], f["b"], f["s"]))
                    if best is not None:
                        np.maximum(best, f["best"], out=best)
            barrier(self.env)
            step *= 2
        if not self.env.is_main:
            return None, None
        return forest, best

    def edges_touching(self, rows: np.ndarray) -> set[tuple[int, int]]:
        """Every found pair with an end among `rows` (the IVF recall check's sample), from every block."""
        wanted = np.zeros(self.data.n, dtype=bool)
        wanted[rows] = True
        found = set()
        for i in range(self.n_jobs):
            a, b, _ = self._edges(i)
            sel = wanted[a] | wanted[b]
            found |= set(zip(a[sel].tolist(), b[sel].tolist(), strict=True))
        return found


class Forest:
    """A maximum-similarity spanning forest: edges (a < b, similarity s) over data positions. Its edges
    above any threshold t join exactly the components that all the edges above t join, so the removal
    at t is the number of its edges above t over the rows, and components come from it."""

    def __init__(self, a: np.ndarray, b: np.ndarray, s: np.ndarray):
        self.a, self.b, self.s = a.astype(np.int64), b.astype(np.int64), s.astype(np.float32)

    @classmethod
    def empty(cls) -> Forest:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))

    @classmethod
    def of(cls, a: np.ndarray, b: np.ndarray, s: np.ndarray) -> Forest:
        """Kruskal's forest of these edges (scipy's minimum spanning tree of 2 - s: every weight positive,
        the lightest the most similar). A pair found twice counts once, at its highest similarity."""
        if len(a) == 0:
            return cls.empty()
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        vertices, inverse = np.unique(np.concatenate([lo, hi]), return_inverse=True)
        m, u, v = len(vertices), inverse[: len(lo)], inverse[len(lo) :]
        weight = 2.0 - s.astype(np.float64)  # exact for float32 similarities in [-1, 1]
        order = np.lexsort((weight, u * m + v))
        first = np.ones(len(order), dtype=bool)
        first[1:] = (u * m + v)[order[1:]] != (u * m + v)[order[:-1]]
        keep = order[first]
        tree = minimum_spanning_tree(coo_matrix((weight[keep], (u[keep], v[keep])), shape=(m, m))).tocoo()
        x, y = vertices[tree.row], vertices[tree.col]
        return cls(np.minimum(x, y), np.maximum(x, y), (2.0 - tree.data).astype(np.float32))

    def merge(self, other: Forest) -> Forest:
        return Forest.union(self, other)

    @staticmethod
    def union(*forests: Forest) -> Forest:
        """The forest of all these forests' edges (one spanning-tree pass over their union)."""
        forests = [f for f in forests if len(f.a)]
        if len(forests) <= 1:
            return forests[0] if forests else Forest.empty()
        return Forest.of(
            np.concatenate([f.a for f in forests]),
            np.concatenate([f.b for f in forests]),
            np.concatenate([f.s for f in forests]),
        )

    def removed_fraction(self, n: int, similarity: float) -> float:
        return float((self.s > similarity).sum() / n) if n else 0.0


def ivf_pair_recall(data: ValidEmbeddings, search: EdgeSearch, similarity: float, sample: int, seed: int) -> dict:
    """Share of the exact pairs (above `similarity`) of random query rows that IVF search found."""
    rng = np.random.default_rng(seed)
    queries = np.sort(rng.choice(data.n, size=min(sample, data.n), replace=False))
    found = search.edges_touching(queries)
    q = torch.from_numpy(data.gather(queries))
    exact = set()
    for s, e in row_chunks(data.n):
        scores = q @ torch.from_numpy(data.block(s, e)).T
        r, c = torch.nonzero(scores > similarity, as_tuple=True)
        for qi, j in zip(queries[r.numpy()], c.numpy() + s, strict=True):
            if qi != j:
                exact.add((min(qi, j), max(qi, j)))
    hits = sum(1 for pair in exact if pair in found)
    return {
        "sample_queries": len(queries),
        "exact_pairs": len(exact),
        "pair_recall": hits / len(exact) if exact else 1.0,
    }


def choose_threshold_for_removal(n: int, forest: Forest, target: float, metric: str, upper: float) -> float:
    """Bisection on the threshold (in `metric` units) so that the removed fraction reaches `target`."""
    lo, hi = 0.0, upper
    for _ in range(40):
        mid = (lo + hi) / 2
        if forest.removed_fraction(n, to_similarity(mid, metric)) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def balance(cfg: BalanceConfig) -> dict:
    validate(cfg)
    if cfg.random_removal is not None and cfg.target_removal is not None:
        raise ClipcidError("--random-removal and --target-removal exclude each other")
    embeddings = Embeddings.open(cfg.emb)
    folder = RunFolder(cfg.out, SETTINGS_FILE, run_settings(cfg, embeddings), cfg.overwrite)
    done = folder.finished_run(lambda: all(keep_path(cfg.out, i).is_file() for i in embeddings.part_ids))
    if done is not None:
        return done
    with distributed(cfg.device) as env:
        if env.is_main:
            folder.claim()
        barrier(env)
        try:
            if cfg.random_removal is not None:
                if cfg.holdout and cfg.held_out_threshold is None and env.is_main:
                    log.warning(
                        "--random-removal without --held-out-threshold keeps the near-copies of held-out pictures "
                        "that balance would drop: the held-out figures then include that leak"
                    )
                stats = _random_removal(cfg, embeddings)
            else:
                stats = _balance(cfg, env, embeddings)
            return folder.finish(stats) if env.is_main else {}
        finally:
            folder.release()


def held_out_positions(cfg: BalanceConfig, embeddings: Embeddings, data_rows: np.ndarray) -> np.ndarray:
    """Per valid position, whether its row is held out (all False without --holdout)."""
    if not cfg.holdout:
        return np.zeros(len(data_rows), dtype=bool)
    return HoldOut.open(cfg.holdout).masks(embeddings.sizes)[data_rows]


def _shared(env: DistEnv, folder: Path, name: str, value=None):
    """What rank 0 decided (a threshold, a mask, the groups), for every rank: through a file in the
    edge folder, as the edges themselves travel."""
    if env.world_size == 1:
        return value
    path = folder / f"{name}.npy"
    if env.is_main:
        save_npy_atomic(path, np.asarray(value))
    barrier(env)
    out = np.load(path, allow_pickle=False)
    barrier(env)
    return out


def _balance(cfg: BalanceConfig, env: DistEnv, embeddings: Embeddings) -> dict:
    start = time.monotonic()
    out = Path(cfg.out)
    store = embeddings.images
    data = ValidEmbeddings(store, cfg.memory_gb)
    held = held_out_positions(cfg, embeddings, data.global_rows)
    device = env.device
    search = EdgeSearch(cfg, data, env, device)
    timings: dict[str, float] = {}
    training = ~held  # the rows that are balanced: not held out
    n_training = int(training.sum())

    threshold = cfg.threshold
    # The search must also reach the held-out guard's radius when that is wider.
    reach = max(threshold * CURVE_REACH, cfg.held_out_threshold or 0.0)
    t0 = time.monotonic()
    search.run(to_similarity(reach, cfg.metric))
    forest, best_to_held = search.reduce(training, held if held.any() else None)
    if cfg.target_removal is not None:
        # Widen the search until the wanted removal is within reach, then bisect on the forest (rank 0).
        def short_of_target() -> bool:
            if not env.is_main:
                return bool(_shared(env, search.folder, "widen"))
            short = forest.removed_fraction(n_training, to_similarity(reach, cfg.metric)) < cfg.target_removal
            return bool(_shared(env, search.folder, "widen", short))

        while short_of_target():
            if to_similarity(reach, cfg.metric) <= -1.0:
                raise ClipcidError(f"no threshold removes {cfg.target_removal:.0%}: the data has too few images")
            reach *= 2
            search.run(to_similarity(reach, cfg.metric))
            forest, best_to_held = search.reduce(training, held if held.any() else None)
        if env.is_main:
            threshold = choose_threshold_for_removal(n_training, forest, cfg.target_removal, cfg.metric, reach)
    timings["search_s"] = time.monotonic() - t0

    t0 = time.monotonic()
    similarity = to_similarity(threshold, cfg.metric)
    # Training rows within the threshold of a held-out picture are not trained on either; the graph is
    # then the one without them (a second pass over the edges, only when there are such rows).
    guard = similarity if cfg.held_out_threshold is None else to_similarity(cfg.held_out_threshold, cfg.metric)
    near = best_to_held > guard if env.is_main and best_to_held is not None else np.zeros(data.n, dtype=bool)
    near = _shared(env, search.folder, "near", near)
    balanced = training & ~near
    training_forest = forest  # the removal curve is the training graph's, before the near rows go
    if near.any():
        forest, _ = search.reduce(balanced, tag="balanced")
    positions = np.flatnonzero(balanced)
    labels = None
    if env.is_main:
        compact = np.full(data.n, -1, dtype=np.int64)
        compact[positions] = np.arange(len(positions))
        sel = forest.s > similarity
        labels = components(len(positions), compact[forest.a[sel]], compact[forest.b[sel]])
    labels = _shared(env, search.folder, "groups", labels)
    kept = central_members_of_shard(data, labels, positions, env.rank, env.world_size, cfg.memory_gb, device)
    if env.world_size > 1:
        save_npy_atomic(search.folder / f"kept_rank{env.rank}.npy", kept)
        barrier(env)
    timings["components_s"] = time.monotonic() - t0
    if not env.is_main:
        return {}
    sizes = np.bincount(labels) if len(labels) else np.zeros(0, np.int64)
    keep = sizes[labels] == 1
    for r in range(env.world_size):
        keep[np.load(search.folder / f"kept_rank{r}.npy") if env.world_size > 1 else kept] = True
    write_masks(out, store, data.global_rows[positions], labels, keep)

    curve = [
        (reach * f / 12, training_forest.removed_fraction(n_training, to_similarity(reach * f / 12, cfg.metric)))
        for f in range(1, 13)
    ]
    stats = {
        "rows": store.total,
        "valid": data.n,
        "invalid": store.total - data.n,
        "held_out": int(held.sum()),
        "near_held_out": int(near.sum()),
        "held_out_threshold": (cfg.held_out_threshold or threshold) if held.any() else None,
        "balanced": len(positions),
        "kept": int(keep.sum()),
        "removed": int(len(positions) - keep.sum()),
        "removed_fraction": float(1 - keep.sum() / len(positions)) if len(positions) else 0.0,
        "groups": int(len(sizes)),
        "merged_groups": int((sizes > 1).sum()),
        "largest_group": int(sizes.max()) if len(sizes) else 0,
        "group_size_histogram": _size_histogram(labels),
        "metric": cfg.metric,
        "threshold": threshold,
        "threshold_all_metrics": thresholds_in_all_metrics(similarity),
        "target_removal": cfg.target_removal,
        "search": cfg.search,
        "forest_edges": int(len(forest.a)),
        "block_size": search.block,
        "removal_curve": [{"threshold": t, "removed_fraction": f} for t, f in curve],
        "config": asdict(cfg),
        "non_finite_rows": embeddings.non_finite_rows(),
    }
    if cfg.search == "ivf":
        stats["ivf"] = {
            "nlist": search.nlist,
            "nprobe": cfg.nprobe,
            **ivf_pair_recall(data, search, similarity, cfg.recall_sample, cfg.seed),
        }
    timings["total_s"] = time.monotonic() - start
    stats["timings"] = timings
    if cfg.plots:
        _plots(out, sizes, curve, cfg.metric, threshold)
    return stats


def _random_removal(cfg: BalanceConfig, embeddings: Embeddings) -> dict:
    """The control for Image Semantic Balance: remove exactly round(f * rows) of the valid rows that are
    not held out, drawn uniformly by the seed, in the same layout (every row is a group of its own).
    With --held-out-threshold, the rows that near a held-out picture go first, as balance drops them
    (--random-removal 0 with it is "no balance" under the same guard); without it no search is made."""
    store = embeddings.images
    valid = np.flatnonzero(store.valid_mask())
    held = held_out_positions(cfg, embeddings, valid)
    near = np.zeros(len(valid), dtype=bool)
    if cfg.held_out_threshold is not None and held.any():
        best = best_similarity_to(ValidEmbeddings(store, cfg.memory_gb), np.flatnonzero(held), cfg.memory_gb)
        near = ~held & (best > to_similarity(cfg.held_out_threshold, cfg.metric))
    rows = valid[~held & ~near]
    n = len(rows)
    removed = round(cfg.random_removal * n)
    keep = np.ones(n, dtype=bool)
    keep[np.random.default_rng(cfg.seed).choice(n, size=removed, replace=False)] = False
    write_masks(Path(cfg.out), store, rows, np.arange(n), keep)
    return {
        "rows": store.total,
        "valid": len(valid),
        "invalid": store.total - len(valid),
        "held_out": int(held.sum()),
        "near_held_out": int(near.sum()),
        "held_out_threshold": cfg.held_out_threshold if held.any() else None,
        "balanced": n,
        "kept": int(keep.sum()),
        "removed": removed,
        "removed_fraction": removed / n if n else 0.0,
        "groups": n,
        "merged_groups": 0,
        "largest_group": 1 if n else 0,
        "random_removal": cfg.random_removal,
        "seed": cfg.seed,
        "config": asdict(cfg),
    }


def best_similarity_to(data: ValidEmbeddings, marked: np.ndarray, memory_gb: float) -> np.ndarray:
    """Each position's best cosine similarity to the positions `marked` (a few, e.g. the held-out
    pictures), by blocks of rows whose score matrix fits the memory budget."""
    targets = torch.from_numpy(data.gather(marked))
    best = np.full(data.n, -np.inf, dtype=np.float32)
    rows = max(1, min(data.n, int(memory_gb * 1e9 / 4 / max(len(marked), 1) / 2)))
    for start, stop in row_chunks(data.n, rows):
        scores = torch.from_numpy(data.block(start, stop)) @ targets.T
        best[start:stop] = scores.max(dim=1).values.numpy()
    best[marked] = 1.0
    return best


def _plots(out: Path, sizes: np.ndarray, curve, metric: str, threshold: float) -> None:
    fig, ax = new_figure()
    if len(sizes):
        bins = np.unique(np.logspace(0, np.log10(max(sizes.max(), 2)) + 0.01, 30).astype(int))
        ax.hist(sizes, bins=bins)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="group size (images)",
        ylabel="groups",
        title="Image Semantic Balance: group sizes",
    )
    save_png(fig, plot_paths(out)["group_sizes"])

    fig, ax = new_figure()
    ax.plot([t for t, _ in curve], [100 * f for _, f in curve], marker="o")
    ax.axvline(threshold, color="tab:red", linestyle="--", label=f"chosen {threshold:.4g}")
    ax.set(xlabel=f"threshold ({metric})", ylabel="removed (%)", title="Removed fraction against threshold")
    ax.legend()
    save_png(fig, plot_paths(out)["removal_curve"])


def summary_text(stats: dict) -> str:
    lines = [f"rows {stats['rows']:,}  valid {stats['valid']:,}  invalid {stats['invalid']:,}"]
    if stats.get("held_out"):
        lines.append(
            f"held out {stats['held_out']:,}, and {stats.get('near_held_out', 0):,} near-duplicates of held-out "
            f"pictures dropped; balanced {stats.get('balanced', stats['valid']):,}"
        )
    if stats.get("random_removal") is not None:
        lines.append(
            f"random removal (a control, seed {stats['seed']}): kept {stats['kept']:,}  removed {stats['removed']:,} "
            f"({100 * stats['removed_fraction']:.2f}%)"
        )
        return "\n".join(lines)
    t = stats["threshold_all_metrics"]
    lines += [
        f"threshold {stats['threshold']:.5g} ({stats['metric']}) = l2 {t['l2']:.5g} = sql2 {t['sql2']:.5g} "
        f"= cosine distance {t['cosine']:.5g} (similarity > {t['similarity']:.6f})",
        f"kept {stats['kept']:,}  removed {stats['removed']:,} ({100 * stats['removed_fraction']:.2f}%)",
        f"groups {stats['groups']:,}  merged groups {stats['merged_groups']:,}  largest {stats['largest_group']:,}",
        "group sizes: " + ", ".join(f"{k}: {v:,}" for k, v in stats["group_size_histogram"].items()),
        "removed by threshold: "
        + ", ".join(f"{p['threshold']:.3g}: {100 * p['removed_fraction']:.1f}%" for p in stats["removal_curve"][::2]),
    ]
    if "ivf" in stats:
        ivf = stats["ivf"]
        lines.append(
            f"ivf nlist {ivf['nlist']} nprobe {ivf['nprobe']}: pair recall {ivf['pair_recall']:.4f} "
            f"on {ivf['exact_pairs']:,} exact pairs of {ivf['sample_queries']:,} sampled queries"
        )
    lines.append(f"time {stats['timings']['total_s']:.1f} s (search {stats['timings']['search_s']:.1f} s)")
    return "\n".join(lines)
