"""Training data: the shards streamed part by part, each row joined with its teacher embeddings and
cluster label by (part, row) and checked against the embedding metadata's key.

Order is a pure function of (seed, epoch, rank): the parts of an epoch are shuffled, dealt to ranks
and then to DataLoader workers, and each worker shuffles rows within a window with its own seeded
generator and yields whole batches. The DataLoader takes batches from workers in turn, so the
sequence of batches is reproducible, and resuming at step s means each worker skipping the batches
it had produced by then (without decoding them). Every rank runs the same number of steps.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import Compose, Normalize, ToTensor

from clipcid.balance.artifact import BalanceResult
from clipcid.cluster.artifact import Clusters
from clipcid.embed.artifact import Embeddings, EmbeddingStore
from clipcid.errors import ClipcidError
from clipcid.holdout import HoldOut
from clipcid.inputs.parts import Part, discover_parts, iter_rows
from clipcid.inputs.shards import DamagedShard

log = logging.getLogger("clipcid")

SHUFFLE_WINDOW = 1000


# Per part: the row numbers used (in file order), the cluster label of each (-1 without clusters), and
# its embedding-metadata key (an Arrow string array: an offset table, not a Python object a row).
PartRows = tuple[np.ndarray, np.ndarray, pa.StringArray]


@dataclass
class TrainRows:
    """What every part contributes: how many rows (every rank knows every part's count, for the steps),
    and the rows themselves, read when a part is read (`part`): a rank holds the rows of the parts it is
    reading, not of the corpus."""

    parts: list[Part]
    counts: np.ndarray  # per part: the rows used
    select: Callable[[int], PartRows]  # per part: its rows, labels and keys
    store_img: EmbeddingStore | None  # None: training without a teacher (a CLIP-only run)
    store_txt: EmbeddingStore | None
    num_classes: int
    centroids: np.ndarray | None = None  # k x D (memory-mapped), the classifier's starting point

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def part(self, p: int) -> PartRows:
        return self.select(p)


@dataclass
class KnownRows:
    """Rows chosen by a pass over the shards (a run without teacher embeddings: small data), kept."""

    rows: list[PartRows]

    def __call__(self, p: int) -> PartRows:
        return self.rows[p]


@dataclass
class PartSelector:
    """The rows of a part to train on: valid, kept by balance, not held out and (with clusters) labelled,
    read from the artifacts when the part is read. Picklable: a loader worker opens the artifacts itself."""

    teacher_emb: str
    balance: str | None
    clusters: str | None
    holdout: str | None

    def __call__(self, i: int) -> PartRows:
        rows, labels = self.rows(i)
        return rows, labels, self._artifacts()[0].keys(i).take(pa.array(rows))

    def rows(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The part's rows to train on and their labels (without the keys: what counting needs)."""
        embeddings, kept, labelled, held_out = self._artifacts()
        use = embeddings.valid(i).copy()
        if kept is not None:
            use &= kept.keep(i)
        if held_out is not None:
            use &= ~held_out.mask(i, embeddings.sizes[i])
        labels = labelled.labels(i) if labelled is not None else np.full(embeddings.sizes[i], -1, dtype=np.int64)
        if labelled is not None:
            use &= labels >= 0
        rows = np.flatnonzero(use).astype(np.int32)  # a row within a part: int32 halves the table
        return rows, labels[rows].astype(np.int32)

    def _artifacts(self):
        if "_opened" not in self.__dict__:
            embeddings = Embeddings.open(self.teacher_emb)
            self._opened = (
                embeddings,
                BalanceResult.open(self.balance, embeddings) if self.balance else None,
                Clusters.open(self.clusters, embeddings) if self.clusters else None,
                HoldOut.open(self.holdout) if self.holdout else None,
            )
        return self._opened

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_opened"}


def _decodes(image: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(image)) as im:
            im.verify()  # headers and structure, without decoding every pixel
        return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False


def rows_without_teacher(parts: list[Part], holdout: HoldOut | None = None) -> tuple[TrainRows, BadData]:
    """Every row with an image that opens and a caption (and not held out), for a run without teacher
    embeddings. A damaged shard gives the rows before its damage."""
    rows, keys, bad = [], [], BadData()
    if holdout is not None:
        holdout.check_parts(len(parts))
    for i, part in enumerate(parts):
        usable, seen = [], 0
        held = holdout.mask(i) if holdout is not None else None
        try:
            for r, row in enumerate(iter_rows(part)):
                seen += 1
                if held is not None and held[r]:
                    continue
                if row.image is not None and row.caption and _decodes(row.image):
                    usable.append((r, row.key))
        except DamagedShard as e:
            log.warning("%s", e)
            bad.shards.append(part.name)
        bad.rows += seen - len(usable) - (int(held[:seen].sum()) if held is not None else 0)
        rows.append(np.array([r for r, _ in usable], dtype=np.int32))
        keys.append(pa.array([k for _, k in usable], pa.string()))
    known = KnownRows([(r, np.full(len(r), -1, dtype=np.int32), k) for r, k in zip(rows, keys, strict=True)])
    bad.total_rows = sum(len(r) for r in rows) + bad.rows
    return TrainRows(parts, np.array([len(r) for r in rows], dtype=np.int64), known, None, None, 0), bad


@dataclass
class BadData:
    """What could not be trained on: rows (unreadable images, no caption, invalid embeddings) and
    damaged shards."""

    rows: int = 0
    total_rows: int = 0
    shards: list[str] = field(default_factory=list)
    total_shards: int = 0

    def check(self, max_fraction: float) -> None:
        row_share = self.rows / max(self.total_rows, 1)
        shard_share = len(self.shards) / max(self.total_shards, 1)
        if self.rows or self.shards:
            log.warning(
                "skipping %d of %d rows (%.2f%%) and %d damaged shard(s) of %d",
                self.rows,
                self.total_rows,
                100 * row_share,
                len(self.shards),
                self.total_shards,
            )
        if row_share > max_fraction or shard_share > max_fraction:
            raise ClipcidError(
                f"{self.rows} of {self.total_rows} rows and {len(self.shards)} of {self.total_shards} shards cannot "
                f"be trained on, more than --max-bad-fraction {max_fraction:g}; fix the data (see the warnings), "
                "or raise --max-bad-fraction"
            )


def load_train_rows(
    data: str,
    teacher_emb: str | None,
    balance: str | None,
    clusters: str | None,
    max_bad_fraction: float = 0.01,
    holdout: str | None = None,
) -> TrainRows:
    parts = discover_parts(data)
    held_out = HoldOut.open(holdout) if holdout else None
    if teacher_emb is None:
        if balance or clusters:
            raise ClipcidError("--balance and --clusters refer to teacher embeddings: pass --teacher-emb too")
        train, bad = rows_without_teacher(parts, held_out)
        bad.total_shards = len(parts)
        bad.check(max_bad_fraction)
        return train
    embeddings = Embeddings.open(teacher_emb)
    img, txt = embeddings.images, embeddings.texts
    if len(parts) != len(img.part_ids):
        raise ClipcidError(
            f"--data has {len(parts)} shards but {teacher_emb} has {len(img.part_ids)} parts; "
            "they must be the same shards in the same order"
        )
    kept = BalanceResult.open(balance, embeddings) if balance else None
    labelled = Clusters.open(clusters, embeddings) if clusters else None
    if held_out is not None:
        held_out.check_parts(len(parts))
    select = PartSelector(teacher_emb, balance, clusters, holdout)
    select._opened = (embeddings, kept, labelled, held_out)  # this process opened them already
    counts = np.zeros(len(parts), dtype=np.int64)
    bad = BadData(total_shards=len(parts))
    for i in img.part_ids:  # every part's count (each part's rows read, counted and let go)
        valid = embeddings.valid(i)
        bad.rows += int((~valid).sum())
        bad.total_rows += len(valid)
        if embeddings.damage_of(i):
            bad.shards.append(parts[i].name)
        counts[i] = len(select.rows(i)[0])
    bad.check(max_bad_fraction)
    if counts.sum() == 0:
        raise ClipcidError(f"no usable rows in {teacher_emb} (after balance and clusters): nothing to train on")
    num_classes = labelled.num_classes if labelled is not None else 0
    centroids = labelled.centroids if labelled is not None else None
    return TrainRows(parts, counts, select, img, txt, num_classes, centroids)


def epoch_assignment(
    n_parts: int, epoch: int, seed: int, rank: int, world_size: int, workers: int, resampled: bool = False
) -> list[list[int]]:
    """Per DataLoader worker of this rank, the parts it reads this epoch (with --dataset-resampled,
    drawn with replacement, as webdataset's resampled shards are)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.integers(n_parts, size=n_parts) if resampled else rng.permutation(n_parts)
    mine = order[rank::world_size]
    return [mine[w::workers].tolist() for w in range(max(1, workers))]


def batches_per_worker(train: TrainRows, assignment: list[list[int]], batch_size: int) -> list[int]:
    return [int(sum(train.counts[p] for p in parts)) // batch_size for parts in assignment]


def interleave(counts: list[int]) -> list[int]:
    """Which worker each batch comes from: the DataLoader asks its workers in turn, skipping the
    finished ones."""
    order, left, w = [], list(counts), 0
    while any(left):
        if left[w]:
            order.append(w)
            left[w] -= 1
        w = (w + 1) % len(left)
    return order


def _uint8_chw(picture: Image.Image) -> torch.Tensor:
    """A PIL image as a C x H x W uint8 tensor (ToTensor's layout, before its division by 255)."""
    array = np.array(picture, np.uint8, copy=True)
    return torch.from_numpy(array).view(picture.size[1], picture.size[0], -1).permute(2, 0, 1).contiguous()


@dataclass
class DeviceNormalize:
    """ToTensor's float conversion and Normalize, on the device, for a uint8 batch: the same arithmetic
    as open_clip's transform, so the same numbers, with a quarter of the bytes through the loader."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        x = images.float().div(255)
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x.sub(mean).div(std)


def split_preprocess(preprocess) -> tuple[Callable, DeviceNormalize | None]:
    """(what the loader workers run, what the device runs): a transform that ends in ToTensor +
    Normalize (open_clip's do) stops at uint8 in the workers; any other runs whole in the workers."""
    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) >= 2 and isinstance(steps[-2], ToTensor) and isinstance(steps[-1], Normalize):
        normalize = steps[-1]
        return Compose([*steps[:-2], _uint8_chw]), DeviceNormalize(tuple(normalize.mean), tuple(normalize.std))
    return preprocess, None


class TrainBatches(torch.utils.data.IterableDataset):
    def __init__(
        self,
        train: TrainRows,
        preprocess,
        tokenizer,
        batch_size: int,
        epoch: int,
        seed: int,
        rank: int,
        world_size: int,
        workers: int,
        steps: int,
        start_step: int = 0,
        resampled: bool = False,
    ):
        self.train, self.preprocess, self.tokenizer = train, preprocess, tokenizer
        self.batch_size, self.epoch, self.seed = batch_size, epoch, seed
        self.rank, self.world_size, self.workers = rank, world_size, max(1, workers)
        self.assignment = epoch_assignment(len(train.parts), epoch, seed, rank, world_size, self.workers, resampled)
        order = interleave(batches_per_worker(train, self.assignment, batch_size))[:steps]
        # Per worker: how many of its batches this epoch's `steps` use, and how many were used before
        # `start_step` (to skip on resume).
        self.quota = [order.count(w) for w in range(self.workers)]
        self.skip = [order[:start_step].count(w) for w in range(self.workers)]
        # A DataLoader always asks its worker 0 first. On resume the next batch may be due from another
        # worker, so DataLoader worker i plays worker (first + i) mod n: the turns continue as they were.
        self.first_worker = order[start_step] if start_step < len(order) else 0

    def _part_samples(self, p: int):
        """The used rows of part p in file order, read from the shard and checked against the key."""
        used, labels, keys = self.train.part(p)
        if len(used) == 0:
            return
        j = 0
        for r, row in enumerate(iter_rows(self.train.parts[p])):
            if r != used[j]:
                continue
            key = keys[j].as_py()
            if row.key != key:
                raise ClipcidError(
                    f"shard {self.train.parts[p].name} row {r} has key {row.key} but the teacher "
                    f"embeddings say {key}: --data and --teacher-emb are not the same shards"
                )
            yield p, r, int(labels[j]), row.image, row.caption or ""
            j += 1
            if j == len(used):
                return
        raise ClipcidError(f"shard {self.train.parts[p].name} ended before row {used[j]}")

    def _rows(self, worker: int):
        """This worker's samples for the epoch, shuffled within a sliding window."""
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        window: list = []
        for p in self.assignment[worker]:
            for sample in self._part_samples(p):
                window.append(sample)
                if len(window) >= SHUFFLE_WINDOW:
                    yield window.pop(int(rng.integers(len(window))))
        while window:
            yield window.pop(int(rng.integers(len(window))))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else (self.first_worker + info.id) % self.workers
        if info is None and self.workers > 1:
            raise RuntimeError("TrainBatches built for several workers must run in a DataLoader with them")
        quota, skip = self.quota[worker], self.skip[worker]
        pending: list = []
        produced = 0
        for item in self._rows(worker):
            pending.append(item)
            if len(pending) < self.batch_size:
                continue
            if produced >= skip:
                yield self._collate(pending)
            produced += 1
            pending = []
            if produced >= quota:
                return

    def _blank(self) -> torch.Tensor:
        return self.preprocess(Image.new("RGB", (64, 64)))

    def _collate(self, items: list) -> dict:
        images = []
        for p, r, _, image, _ in items:
            # Augmentation drawn from a seed of its own per (epoch, sample): the same whether or not the
            # batches before it were skipped on resume.
            torch.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, p, r]).generate_state(1)[0]))
            try:
                with Image.open(io.BytesIO(image)) as im:
                    images.append(self.preprocess(im.convert("RGB")))
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
                # Opened when the rows were chosen, but not decodable to the end: a row is never fatal.
                # The batch keeps its size (every rank gathers the same) with a neighbour in its place.
                log.warning(
                    "shard %s row %d: image does not decode; a neighbour stands in", self.train.parts[p].name, r
                )
                images.append(images[-1] if images else torch.zeros_like(self._blank()))
        parts = np.array([it[0] for it in items])
        rows = np.array([it[1] for it in items])
        if self.train.store_img is None:
            teacher_img = teacher_txt = np.zeros((len(items), 0), dtype=np.float32)
        else:
            teacher_img = self.train.store_img.pairs(parts, rows)
            teacher_txt = self.train.store_txt.pairs(parts, rows)
        return {
            "images": torch.stack(images),
            "tokens": self.tokenizer([it[4] for it in items]),
            "teacher_img": torch.from_numpy(teacher_img.astype(np.float32)),
            "teacher_txt": torch.from_numpy(teacher_txt.astype(np.float32)),
            "labels": torch.tensor([it[2] for it in items], dtype=torch.long),
            "index": torch.from_numpy(np.stack([parts, rows], axis=1)),
        }
