"""Encoders and feature extraction for evaluation, with an optional on-disk feature cache."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipcid.evaluation.datasets import EvalDataset
from clipcid.models import by_length
from clipcid.stage import read_record, record_matches, write_record
from clipcid.util import precision
from clipcid.util.fileio import atomic_path
from clipcid.util.progress import progress_bar


class Encoder(Protocol):
    """What evaluation needs of a model. Outputs are L2-normalised float32 tensors on the CPU."""

    preprocess: Callable[[Image.Image], torch.Tensor]
    cache_id: str

    def encode_images(self, images: torch.Tensor) -> torch.Tensor: ...

    def encode_texts(self, texts: list[str]) -> torch.Tensor: ...


class OpenClipEncoder:
    def __init__(self, model, preprocess, tokenizer, device: torch.device, precision: str = "fp32", cache_id: str = ""):
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer
        self.device, self.precision, self.cache_id = device, precision, cache_id
        self.encode_tokens = by_length(model, lambda tokens: self.model.encode_text(tokens.to(self.device)))
        # Features by image content: the suite's datasets share pictures (one style's emoji are labelled by
        # group, subgroup and name, and retrieved by caption), and each picture is encoded once.
        self.image_memo: dict[str, np.ndarray] = {}
        # Features by prompt: the suite's name tasks share class names and templates (every emoji style is
        # named among the corpus's 3,937 emoji names, the held-out icons among its 13,628), so a model
        # encodes each prompt once per run.
        self.text_memo: dict[str, np.ndarray] = {}

    def _autocast(self):
        return precision.autocast(self.device, self.precision)

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            out = self.model.encode_image(images.to(self.device))
        return F.normalize(out.float(), dim=-1).cpu()

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in self.text_memo]
        if new:
            with self._autocast():
                out = self.encode_tokens(self.tokenizer(new))
            self.text_memo.update(zip(new, F.normalize(out.float(), dim=-1).cpu().numpy(), strict=True))
        return torch.from_numpy(np.stack([self.text_memo[t] for t in texts]))


def weights_fingerprint(model: str, pretrained: str | None) -> str:
    """What a model's weights are, for the settings of a run that evaluates it: the architecture and the
    tag, or a checkpoint file's name, size and mtime (not its folder: a run folder moved elsewhere is
    still the same run)."""
    if pretrained and os.path.isfile(pretrained):
        st = os.stat(pretrained)
        return f"{model}__{Path(pretrained).name}:{st.st_size}:{st.st_mtime_ns}"
    return f"{model}__{pretrained or 'random'}"


def checkpoint_cache_id(model: str, pretrained: str | None) -> str:
    """Names a model's features in the cache; a checkpoint file is identified by size and mtime too,
    so features of a retrained checkpoint at the same path are not reused."""
    if pretrained and os.path.isfile(pretrained):
        st = os.stat(pretrained)
        digest = hashlib.sha1(f"{os.path.abspath(pretrained)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
        return f"{model}__{Path(pretrained).stem}-{digest[:10]}"
    return f"{model}__{pretrained or 'random'}"


class _SplitImages(torch.utils.data.IterableDataset):
    """Per row: its place (source, row), the transformed image (None when the features of the same
    picture are known already), its target and its content hash."""

    def __init__(self, dataset: EvalDataset, split: str, preprocess, known: set[str]):
        self.dataset, self.split, self.preprocess, self.known = dataset, split, preprocess, known

    def __iter__(self) -> Iterator[tuple]:
        sources = list(enumerate(self.dataset.sources(self.split)))
        info = torch.utils.data.get_worker_info()
        if info is not None:
            sources = sources[info.id :: info.num_workers]
        for s, source in sources:
            for r, (image, target) in enumerate(self.dataset.iter_source(source)):
                digest = hashlib.sha1(image).hexdigest()
                if digest in self.known:
                    yield (s, r), None, target, digest
                    continue
                with Image.open(io.BytesIO(image)) as im:
                    yield (s, r), self.preprocess(im.convert("RGB")), target, digest


def _collate(batch: list[tuple]) -> dict:
    images = [b[1] for b in batch if b[1] is not None]
    return {
        "places": [b[0] for b in batch],
        "images": torch.stack(images) if images else None,
        "sent": [b[3] for b in batch if b[1] is not None],  # digests of the rows that came with a picture
        "digests": [b[3] for b in batch],
        "targets": [b[2] for b in batch],
    }


def _encode_batch(encoder: Encoder, batch: dict, memo: dict) -> np.ndarray:
    """Features of a batch in order: pictures that came encoded (and remembered), the others looked up."""
    if batch["images"] is not None:
        for digest, feature in zip(batch["sent"], encoder.encode_images(batch["images"]).numpy(), strict=True):
            memo[digest] = feature
    return np.stack([memo[d] for d in batch["digests"]])


def _size(source: Path) -> int:
    """A shard's bytes; a class folder's number of files."""
    return len(os.listdir(source)) if source.is_dir() else source.stat().st_size


def image_features(
    encoder: Encoder,
    dataset: EvalDataset,
    split: str,
    batch_size: int = 256,
    workers: int = 2,
    feature_root: str | None = None,
) -> tuple[np.ndarray, list]:
    """(N x D float32 normalised features, N targets) for one split, in the split's own order (shard
    by shard, row by row) whatever the number of loader workers; read from the cache if there."""
    dataset.require_split(split)
    cache = Path(feature_root) / encoder.cache_id / dataset.name if feature_root else None
    # The cache holds what these very shards gave: a dataset rebuilt under its name is encoded again.
    made_from = {"sources": [[p.name, _size(p)] for p in dataset.sources(split)]}
    if cache is not None and record_matches(cache / f"{split}.json", made_from):
        return np.load(cache / f"{split}.npy"), read_record(cache / f"{split}.json")["targets"]
    n_sources = len(dataset.sources(split))
    memo = getattr(encoder, "image_memo", None)
    memo = {} if memo is None else memo
    # On a CPU the forward pass already keeps every core busy, and forking loader workers from a process
    # that holds gigabytes (a teacher's kept activations) cost more than decoding in place: a CPU
    # evaluation ran 1.5x faster without workers (docs/benchmarks.md). A GPU gets its loaders.
    on_gpu = str(getattr(encoder, "device", "cpu")).startswith("cuda")
    loader = torch.utils.data.DataLoader(
        _SplitImages(dataset, split, encoder.preprocess, set(memo)),
        batch_size=batch_size,
        num_workers=min(workers, n_sources) if on_gpu else 0,
        collate_fn=_collate,
    )
    feats, targets, places = [], [], []
    with progress_bar(None, f"features {dataset.name}/{split}", "img") as bar:
        for batch in loader:
            feats.append(_encode_batch(encoder, batch, memo))
            targets.extend(batch["targets"])
            places.extend(batch["places"])
            bar.update(len(batch["targets"]))
    features = np.concatenate(feats) if feats else np.zeros((0, 0), np.float32)
    order = sorted(range(len(places)), key=places.__getitem__)  # workers interleave their shards' batches
    features, targets = features[order] if len(order) else features, [targets[i] for i in order]
    if cache is not None:
        with atomic_path(cache / f"{split}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, features)
        write_record(cache / f"{split}.json", made_from, targets=targets)  # written last: marks the entry done
    return features, targets


def text_features(encoder: Encoder, texts: list[str], batch_size: int = 256) -> np.ndarray:
    out = [encoder.encode_texts(texts[i : i + batch_size]).numpy() for i in range(0, len(texts), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
