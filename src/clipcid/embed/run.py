"""`clipcid embed`: teacher image and text embeddings, computed once, in clip-retrieval's layout.

OUT/img_emb/img_emb_{i}.npy, OUT/text_emb/text_emb_{i}.npy (float16, L2-normalised, zeros where
invalid) and OUT/metadata/metadata_{i}.parquet (key, shard, row, caption, valid, error), one part per
input shard, row j of part i being row j of shard i. A part is written under temporary names and
renamed, metadata last, so a part with metadata is complete and is skipped on resume.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from clipcid.errors import ClipcidError
from clipcid.inputs.parts import Part, discover_parts, iter_rows
from clipcid.models import LoadedModel, load_model, padding_trimmer
from clipcid.stage import DistEnv, barrier, init_distributed, shutdown
from clipcid.util import precision
from clipcid.util.fileio import atomic_path, remove_stale_temporaries, save_json_atomic, save_npy_atomic
from clipcid.util.progress import progress_bar

log = logging.getLogger("clipcid")


@dataclass
class EmbedConfig:
    data: str
    model: str
    out: str
    pretrained: str | None = None
    batch_size: int = 256
    precision: str = "fp32"
    workers: int = 2
    device: str = "auto"
    rows_per_part: int = 10000
    image_column: str | None = None
    caption_column: str | None = None
    seed: int = 0


@dataclass
class PairEncoder:
    """What embed computes for each valid row: an image vector and a text vector (widths may differ)."""

    image: Callable[[torch.Tensor], torch.Tensor]
    text: Callable[[torch.Tensor], torch.Tensor]
    image_dim: int
    text_dim: int
    normalize: bool = True
    dtype: type = np.float16  # the layout's; features that are computed on from keep float32


def clip_embeddings(loaded: LoadedModel) -> PairEncoder:
    """The model's shared image-text space, L2-normalised: what `clipcid embed` writes."""
    return PairEncoder(loaded.model.encode_image, loaded.model.encode_text, loaded.embed_dim, loaded.embed_dim)


def img_emb_path(root: Path, i: int) -> Path:
    return root / "img_emb" / f"img_emb_{i}.npy"


def text_emb_path(root: Path, i: int) -> Path:
    return root / "text_emb" / f"text_emb_{i}.npy"


def metadata_path(root: Path, i: int) -> Path:
    return root / "metadata" / f"metadata_{i}.parquet"


def part_done(root: Path, i: int) -> bool:
    return all(p.is_file() for p in (metadata_path(root, i), img_emb_path(root, i), text_emb_path(root, i)))


class PartBatches(torch.utils.data.IterableDataset):
    """Decoded, transformed, tokenised batches; each batch holds rows of one part only, and the
    last batch of a part says so. Each DataLoader worker takes whole parts, so rows stay in order."""

    def __init__(self, parts: list[tuple[int, Part]], preprocess, tokenizer, batch_size: int):
        self.parts, self.preprocess, self.tokenizer, self.batch_size = (
            parts,
            preprocess,
            tokenizer,
            batch_size,
        )

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        mine = self.parts if info is None else self.parts[info.id :: info.num_workers]
        for index, part in mine:
            yield from self._part_batches(index, part)

    def _decode(self, image: bytes | None) -> tuple[torch.Tensor | None, str]:
        if image is None:
            return None, "no image"
        try:
            with Image.open(io.BytesIO(image)) as im:
                return self.preprocess(im.convert("RGB")), ""
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            return None, f"undecodable image: {type(e).__name__}"

    def _part_batches(self, index: int, part: Part) -> Iterator[dict]:
        rows = iter_rows(part)
        row_number, pending = 0, []
        while True:
            try:
                pending.append(next(rows))
            except StopIteration:
                # Always close a part with a batch marked last, even an empty one.
                yield self._collate(index, part, row_number, pending, last=True)
                return
            if len(pending) == self.batch_size:
                yield self._collate(index, part, row_number, pending, last=False)
                row_number += len(pending)
                pending = []

    def _collate(self, index: int, part: Part, first_row: int, rows: list, last: bool) -> dict:
        decoded = [self._decode(r.image) for r in rows]
        errors = [
            err if err else ("no caption" if r.caption is None else "")
            for r, (_, err) in zip(rows, decoded, strict=True)
        ]
        valid = [not e for e in errors]
        images = [img for (img, _), ok in zip(decoded, valid, strict=True) if ok]
        captions = [r.caption or "" for r in rows]
        return {
            "part": index,
            "shard": part.name,
            "first_row": first_row,
            "keys": [r.key for r in rows],
            "captions": captions,
            "valid": torch.tensor(valid, dtype=torch.bool),
            "errors": errors,
            "images": torch.stack(images) if images else None,
            "tokens": self.tokenizer([captions[i] for i in range(len(rows)) if valid[i]]) if any(valid) else None,
            "last": last,
        }


def _write_part(root: Path, index: int, chunks: list[dict], encoder: PairEncoder) -> dict:
    """Assemble one part's batches (in row order) and write it; metadata last marks it complete."""
    chunks.sort(key=lambda c: c["first_row"])
    n = sum(len(c["keys"]) for c in chunks)
    img = np.zeros((n, encoder.image_dim), dtype=encoder.dtype)
    txt = np.zeros((n, encoder.text_dim), dtype=encoder.dtype)
    valid = np.zeros(n, dtype=bool)
    keys, captions, errors = [], [], []
    for c in chunks:
        rows = np.arange(c["first_row"], c["first_row"] + len(c["keys"]))
        ok = c["valid"].numpy()
        valid[rows] = ok
        if c["img"] is not None:
            img[rows[ok]] = c["img"]
            txt[rows[ok]] = c["txt"]
        keys += c["keys"]
        captions += c["captions"]
        errors += c["errors"]
    shard = chunks[0]["shard"] if chunks else ""
    save_npy_atomic(img_emb_path(root, index), img)
    save_npy_atomic(text_emb_path(root, index), txt)
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "shard": pa.array([shard] * n, pa.string()),
            "row": pa.array(np.arange(n), pa.int64()),
            "caption": pa.array(captions, pa.string()),
            "valid": pa.array(valid),
            "error": pa.array([e or None for e in errors], pa.string()),
        }
    )
    with atomic_path(metadata_path(root, index)) as tmp:
        pq.write_table(table, tmp)
    return {"rows": n, "invalid": int((~valid).sum())}


def _check_existing(root: Path, settings: dict) -> None:
    """Refuse to mix embeddings of another model or input into a folder being resumed."""
    f = root / "embed.json"
    if f.is_file():
        previous = json.loads(f.read_text())
        keys = ("model", "pretrained", "shards", "dim", "text_dim", "precision")
        mismatch = [k for k in keys if previous.get(k) != settings.get(k)]
        if mismatch:
            what = ", ".join(f"{k}: {previous.get(k)} != {settings.get(k)}" for k in mismatch)
            raise ClipcidError(f"{root} holds embeddings made with other settings ({what}); use another --out")


def embed(cfg: EmbedConfig, encoder: Callable[[LoadedModel], PairEncoder] = clip_embeddings) -> dict:
    """Compute teacher embeddings for every part not yet done; returns the summary (rank 0).
    `encoder` picks what is computed (default: the CLIP embeddings; `clipcid lit` asks for the
    locked towers' features instead)."""
    cfg.precision = precision.canonical(cfg.precision)
    env = init_distributed(cfg.device)
    try:
        return _embed(cfg, env, encoder)
    finally:
        shutdown(env)


def _embed(cfg: EmbedConfig, env: DistEnv, make_encoder: Callable[[LoadedModel], PairEncoder]) -> dict:
    root = Path(cfg.out)
    parts = discover_parts(cfg.data, cfg.rows_per_part, cfg.image_column, cfg.caption_column)
    teacher = load_model(cfg.model, cfg.pretrained, env.device, cfg.seed)
    encoder = make_encoder(teacher)
    if cfg.pretrained is None and env.is_main and encoder.normalize:
        log.warning("no --pretrained given: embedding with a randomly initialised %s (seed %d)", cfg.model, cfg.seed)
    settings = {
        "model": cfg.model,
        "pretrained": cfg.pretrained,
        "data": str(cfg.data),
        "parts": len(parts),
        "shards": [p.name for p in parts],
        "dim": encoder.image_dim,
        "text_dim": encoder.text_dim,
        "precision": cfg.precision,
        "seed": cfg.seed,
    }
    if env.is_main:
        _check_existing(root, settings)
        if root.exists():
            remove_stale_temporaries(root)
        save_json_atomic(root / "embed.json", {**settings, "complete": False})
    barrier(env)

    todo = [(i, p) for i, p in enumerate(parts) if i % env.world_size == env.rank and not part_done(root, i)]
    skipped = sum(1 for i in range(len(parts)) if i % env.world_size == env.rank) - len(todo)
    if skipped:
        log.info("rank %d: %d part(s) already done, %d to go", env.rank, skipped, len(todo))
    dataset = PartBatches(todo, teacher.preprocess, teacher.tokenizer, cfg.batch_size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=min(cfg.workers, len(todo)),
        pin_memory=env.device.type == "cuda",
        persistent_workers=False,
    )
    trim = padding_trimmer(teacher.model)
    pending: dict[int, list[dict]] = {}
    images_done, start = 0, time.monotonic()
    with torch.inference_mode(), progress_bar(None, f"embed (rank {env.rank})", "img", env.is_main) as bar:
        for batch in loader:
            chunk = {k: batch[k] for k in ("shard", "first_row", "keys", "captions", "valid", "errors")}
            chunk["img"] = chunk["txt"] = None
            if batch["images"] is not None:
                with precision.autocast(env.device, cfg.precision):
                    img = encoder.image(batch["images"].to(env.device, non_blocking=True))
                    txt = encoder.text(trim(batch["tokens"]).to(env.device, non_blocking=True))
                img, txt = img.float(), txt.float()
                if encoder.normalize:
                    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
                chunk["img"] = img.cpu().numpy().astype(encoder.dtype)
                chunk["txt"] = txt.cpu().numpy().astype(encoder.dtype)
            pending.setdefault(batch["part"], []).append(chunk)
            images_done += len(batch["keys"])
            bar.update(len(batch["keys"]))
            if batch["last"]:
                stats = _write_part(root, batch["part"], pending.pop(batch["part"]), encoder)
                if stats["invalid"]:
                    log.warning("part %d (%s): %d invalid row(s)", batch["part"], chunk["shard"], stats["invalid"])
    elapsed = time.monotonic() - start
    if pending:
        raise RuntimeError(f"parts {sorted(pending)} ended without their last batch")
    barrier(env)
    if not env.is_main:
        return {}
    return _summarise(root, settings, images_done, elapsed)


def _summarise(root: Path, settings: dict, images_done: int, elapsed: float) -> dict:
    rows = invalid = 0
    for i in range(settings["parts"]):
        if not part_done(root, i):
            raise ClipcidError(f"part {i} is missing after the run; run `clipcid embed` again to finish it")
        valid = pq.read_table(metadata_path(root, i), columns=["valid"]).column("valid").to_numpy()
        rows += len(valid)
        invalid += int((~valid).sum())
    summary = {
        **settings,
        "complete": True,
        "rows": rows,
        "invalid": invalid,
        "rank0_images_per_second": images_done / elapsed if elapsed > 0 else None,
    }
    save_json_atomic(root / "embed.json", summary)
    log.info("embedded %d rows in %d part(s) (%d invalid) into %s", rows, settings["parts"], invalid, root)
    return summary


def project_embeddings(
    features: str | Path,
    out: str | Path,
    image_head: Callable[[torch.Tensor], torch.Tensor],
    text_head: Callable[[torch.Tensor], torch.Tensor],
    settings: dict,
) -> dict:
    """Write embeddings in this layout from features another embed run wrote (same parts, same rows):
    each row's vectors go through the heads and are normalised. For a model whose towers end in a head
    after locked trunks, this is what a second `clipcid embed` pass would write, without the pass."""
    src, root = Path(features), Path(out)
    info = json.loads((src / "embed.json").read_text()) if (src / "embed.json").is_file() else {}
    if not info.get("complete"):
        raise ClipcidError(f"{src} is not a finished embed folder; run it again to finish it")
    probe = torch.zeros(1, info["dim"])
    with torch.inference_mode():
        dim = int(image_head(probe).shape[1])
    settings = {
        **{k: info[k] for k in ("data", "parts", "shards", "precision", "seed")},
        **settings,
        "dim": dim,
        "text_dim": dim,
        "projected_from": str(src),
    }
    _check_existing(root, settings)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root)
    save_json_atomic(root / "embed.json", {**settings, "complete": False})
    with torch.inference_mode():
        for i in range(info["parts"]):
            if part_done(root, i):
                continue
            valid = torch.from_numpy(
                pq.read_table(metadata_path(src, i), columns=["valid"]).column("valid").to_numpy()
            )[:, None]
            img = torch.from_numpy(np.load(img_emb_path(src, i)).astype(np.float32))
            txt = torch.from_numpy(np.load(text_emb_path(src, i)).astype(np.float32))
            save_npy_atomic(
                img_emb_path(root, i), (F.normalize(image_head(img), dim=-1) * valid).numpy().astype(np.float16)
            )
            save_npy_atomic(
                text_emb_path(root, i), (F.normalize(text_head(txt), dim=-1) * valid).numpy().astype(np.float16)
            )
            with atomic_path(metadata_path(root, i)) as tmp:
                tmp.write_bytes(metadata_path(src, i).read_bytes())
    return _summarise(root, settings, 0, 0.0)
