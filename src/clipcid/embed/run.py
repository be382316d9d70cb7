"""`clipcid embed`: teacher image and text embeddings, computed once, in clip-retrieval's layout
(embed/artifact.py: float16, L2-normalised, one part per input shard, rows aligned with it). Parts
are split across torchrun ranks; a finished part is skipped when the command runs again.
"""

from __future__ import annotations

import io
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

import clipcid.embed.artifact as artifact
from clipcid.config import default_workers, option, validate
from clipcid.embed.artifact import Embeddings
from clipcid.errors import ClipcidError
from clipcid.inputs.parts import Part, discover_parts, fingerprint, iter_rows
from clipcid.inputs.shards import DamagedShard
from clipcid.models import LoadedModel, by_length, load_model
from clipcid.stage import DistEnv, RunFolder, barrier, distributed, parts_of_rank
from clipcid.util import precision
from clipcid.util.progress import progress_bar

log = logging.getLogger("clipcid")


@dataclass
class EmbedConfig:
    data: str = option(help="shards (folder, brace pattern or glob), img2dataset output, or a CSV/parquet table")
    model: str = option(help="open_clip architecture, e.g. ViT-bigG-14 or clipcid-small")
    out: str = option(help="output folder (clip-retrieval layout)")
    pretrained: str | None = option(None, "open_clip pretrained tag or checkpoint path")
    batch_size: int = option(256, "images per forward pass", at_least=1)
    precision: str = option("fp32", "autocast precision", ("fp32", "bf16", "fp16", "amp_bf16", "amp"))
    workers: int = option(help="data loading processes", default_factory=default_workers, at_least=0)
    device: str = option("auto", "auto, cpu or cuda")
    rows_per_part: int = option(10000, "table input: rows per part", at_least=1)
    image_column: str | None = option(None, "table input: column holding image paths")
    caption_column: str | None = option(None, "table input: column holding captions")
    seed: int = option(0, "seed of the random init when no --pretrained")
    overwrite: bool = option(False, "replace what --out holds if it was made with other settings")


# Settings that do not change what is written (how fast, where).
RUNTIME_FIELDS = ("out", "batch_size", "workers", "device", "overwrite")


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
            except DamagedShard as e:
                # The samples before the damage are whole: the part keeps them, rows stay aligned.
                yield {**self._collate(index, part, row_number, pending, last=True), "damaged": str(e)}
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
            "image_paths": [r.image_path or r.key for r in rows],
            "urls": [r.url for r in rows],
            "captions": captions,
            "valid": torch.tensor(valid, dtype=torch.bool),
            "errors": errors,
            "images": torch.stack(images) if images else None,
            "tokens": self.tokenizer([captions[i] for i in range(len(rows)) if valid[i]]) if any(valid) else None,
            "last": last,
            "damaged": None,
        }


def _write_part(
    root: Path, index: int, n_parts: int, chunks: list[dict], encoder: PairEncoder, damaged: str | None = None
) -> dict:
    """Assemble one part's batches (in row order) and write it through the artifact module."""
    chunks.sort(key=lambda c: c["first_row"])
    n = sum(len(c["keys"]) for c in chunks)
    img = np.zeros((n, encoder.image_dim), dtype=encoder.dtype)
    txt = np.zeros((n, encoder.text_dim), dtype=encoder.dtype)
    valid = np.zeros(n, dtype=bool)
    columns: dict[str, list] = {name: [] for name in ("keys", "image_paths", "urls", "captions", "errors")}
    for c in chunks:
        rows = np.arange(c["first_row"], c["first_row"] + len(c["keys"]))
        ok = c["valid"].numpy()
        valid[rows] = ok
        if c["img"] is not None:
            img[rows[ok]] = c["img"]
            txt[rows[ok]] = c["txt"]
        for name, values in columns.items():
            values += c[name]
    shard = chunks[0]["shard"] if chunks else ""
    # clip-retrieval's columns first (image_path, caption, key, url where known), then clipcid's.
    metadata = {
        "image_path": pa.array(columns["image_paths"], pa.string()),
        "caption": pa.array(columns["captions"], pa.string()),
        "key": pa.array(columns["keys"], pa.string()),
    }
    if any(columns["urls"]):
        metadata["url"] = pa.array(columns["urls"], pa.string())
    metadata.update(
        {
            "shard": pa.array([shard] * n, pa.string()),
            "row": pa.array(np.arange(n), pa.int64()),
            "valid": pa.array(valid),
            "error": pa.array([e or None for e in columns["errors"]], pa.string()),
        }
    )
    artifact.write_part(root, index, n_parts, img, txt, metadata, damaged=damaged)
    return {"rows": n, "invalid": int((~valid).sum())}


def embed(cfg: EmbedConfig, encoder: Callable[[LoadedModel], PairEncoder] = clip_embeddings) -> dict:
    """Compute teacher embeddings for every part not yet done; returns the summary (rank 0).
    `encoder` picks what is computed (default: the CLIP embeddings; `clipcid lit` asks for the
    locked towers' features instead)."""
    validate(cfg)
    cfg.precision = precision.canonical(cfg.precision)
    parts = discover_parts(cfg.data, cfg.rows_per_part, cfg.image_column, cfg.caption_column)
    settings = {
        "model": cfg.model,
        "pretrained": cfg.pretrained,
        "data": str(cfg.data),
        "parts": len(parts),
        "shards": [p.name for p in parts],
        "inputs": [fingerprint(p) for p in parts],
        "encoder": getattr(encoder, "__name__", "encoder"),  # what is computed: CLIP embeddings, or features
        "precision": cfg.precision,
        "seed": cfg.seed,
    }
    folder = RunFolder(cfg.out, artifact.SETTINGS_FILE, settings, cfg.overwrite)
    # Before the model loads: a finished run costs a file read.
    done = folder.finished_run(lambda: all(artifact.part_done(Path(cfg.out), i, len(parts)) for i in range(len(parts))))
    if done is not None:
        return done
    with distributed(cfg.device) as env:
        return _embed(cfg, env, encoder, parts, folder)


def _embed(
    cfg: EmbedConfig,
    env: DistEnv,
    make_encoder: Callable[[LoadedModel], PairEncoder],
    parts: list[Part],
    folder: RunFolder,
) -> dict:
    root = Path(cfg.out)
    teacher = load_model(cfg.model, cfg.pretrained, env.device, cfg.seed)
    encoder = make_encoder(teacher)
    weights_in_name = cfg.model.startswith(("local-dir:", "hf-hub:"))  # such a model brings its weights
    if cfg.pretrained is None and not weights_in_name and env.is_main and encoder.normalize:
        log.warning("no --pretrained given: embedding with a randomly initialised %s (seed %d)", cfg.model, cfg.seed)
    if env.is_main:
        folder.claim()
    barrier(env)
    try:
        done = _embed_parts(cfg, env, parts, root, teacher, encoder)
        barrier(env)
        if not env.is_main:
            return {}
        summary = _summarise(root, folder.settings, *done)
        return folder.finish({**summary, "dim": encoder.image_dim, "text_dim": encoder.text_dim})
    finally:
        folder.release()


def _embed_parts(cfg: EmbedConfig, env: DistEnv, parts: list[Part], root: Path, teacher, encoder) -> tuple:
    mine = parts_of_rank(range(len(parts)), env)
    todo = [(i, parts[i]) for i in mine if not artifact.part_done(root, i, len(parts))]
    if len(todo) < len(mine):
        log.info("rank %d: %d part(s) already done, %d to go", env.rank, len(mine) - len(todo), len(todo))
    dataset = PartBatches(todo, teacher.preprocess, teacher.tokenizer, cfg.batch_size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=min(cfg.workers, len(todo)),
        pin_memory=env.device.type == "cuda",
        persistent_workers=False,
    )
    encode_text = by_length(teacher.model, lambda tokens: encoder.text(tokens.to(env.device, non_blocking=True)))
    pending: dict[int, list[dict]] = {}
    images_done, start = 0, time.monotonic()
    with torch.inference_mode(), progress_bar(None, f"embed (rank {env.rank})", "img", env.is_main) as bar:
        for batch in loader:
            chunk = {
                k: batch[k]
                for k in ("shard", "first_row", "keys", "image_paths", "urls", "captions", "valid", "errors")
            }
            chunk["img"] = chunk["txt"] = None
            if batch["images"] is not None:
                with precision.autocast(env.device, cfg.precision):
                    img = encoder.image(batch["images"].to(env.device, non_blocking=True))
                    txt = encode_text(batch["tokens"])
                img, txt = img.float(), txt.float()
                if encoder.normalize:
                    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
                chunk["img"] = img.cpu().numpy().astype(encoder.dtype)
                chunk["txt"] = txt.cpu().numpy().astype(encoder.dtype)
            pending.setdefault(batch["part"], []).append(chunk)
            images_done += len(batch["keys"])
            bar.update(len(batch["keys"]))
            if batch["last"]:
                if batch["damaged"]:
                    log.warning("%s", batch["damaged"])
                part_chunks = pending.pop(batch["part"])
                stats = _write_part(root, batch["part"], len(parts), part_chunks, encoder, batch["damaged"])
                if stats["invalid"]:
                    log.warning("part %d (%s): %d invalid row(s)", batch["part"], chunk["shard"], stats["invalid"])
    if pending:
        raise RuntimeError(f"parts {sorted(pending)} ended without their last batch")
    return images_done, time.monotonic() - start


def _summarise(root: Path, settings: dict, images_done: int, elapsed: float) -> dict:
    rows = invalid = 0
    errors: dict[str, int] = {}
    damaged = []
    for i in range(settings["parts"]):
        if not artifact.part_done(root, i, settings["parts"]):
            raise ClipcidError(f"part {i} is missing after the run; run `clipcid embed` again to finish it")
        problem = artifact.damage_of(root, i, settings["parts"])
        if problem:
            damaged.append({"part": i, "shard": settings["shards"][i], "problem": problem})
        meta = pq.read_table(artifact.metadata_path(root, i, settings["parts"]), columns=["valid", "error"])
        valid = meta.column("valid").to_numpy(zero_copy_only=False)
        rows += len(valid)
        invalid += int((~valid).sum())
        for e in meta.column("error").to_pylist():
            if e:
                errors[e] = errors.get(e, 0) + 1
    if rows and invalid == rows:
        common = max(errors, key=errors.get) if errors else "unknown"
        raise ClipcidError(
            f"no row of {settings['data']} could be embedded ({rows} rows, most common problem: {common}); check --data"
        )
    log.info("embedded %d rows in %d part(s) (%d invalid) into %s", rows, settings["parts"], invalid, root)
    if damaged:
        log.warning("%d damaged shard(s): only their whole samples were embedded (embed.json lists them)", len(damaged))
    return {
        "rows": rows,
        "invalid": invalid,
        "validity": artifact.VALIDITY,  # every part went through write_part: its valid column is final
        "damaged_shards": damaged,
        "rank0_images_per_second": images_done / elapsed if elapsed > 0 else None,
    }


def project_embeddings(
    features: str | Path,
    out: str | Path,
    image_head: Callable[[torch.Tensor], torch.Tensor],
    text_head: Callable[[torch.Tensor], torch.Tensor],
    settings: dict,
    overwrite: bool = False,
) -> dict:
    """Write embeddings in this layout from features another embed run wrote (same parts, same rows):
    each row's vectors go through the heads and are normalised. For a model whose towers end in a head
    after locked trunks, this is what a second `clipcid embed` pass would write, without the pass."""
    source = Embeddings.open(features)
    info = source.settings or {}  # the features' run: the same data, parts and rows
    with torch.inference_mode():
        dim = int(image_head(torch.zeros(1, source.images.dim)).shape[1])
    settings = {
        **{k: info.get(k) for k in ("data", "parts", "shards", "inputs", "precision", "seed")},
        **settings,
        "projected_from": source.identity,
    }
    root = Path(out)
    folder = RunFolder(root, artifact.SETTINGS_FILE, settings, overwrite)
    done = folder.finished_run()
    if done is not None:
        return done
    with folder, torch.inference_mode():
        for i in source.part_ids:
            if artifact.part_done(root, i, source.n_parts):
                continue
            valid = torch.from_numpy(source.metadata(i, ["valid"]).column("valid").to_numpy(zero_copy_only=False))
            img = torch.from_numpy(np.array(source.images.read(i), dtype=np.float32))
            txt = torch.from_numpy(np.array(source.texts.read(i), dtype=np.float32))
            artifact.write_part(
                root,
                i,
                source.n_parts,
                (F.normalize(image_head(img), dim=-1) * valid[:, None]).numpy().astype(np.float16),
                (F.normalize(text_head(txt), dim=-1) * valid[:, None]).numpy().astype(np.float16),
                {name: source.metadata(i).column(name) for name in source.metadata(i).column_names},
                damaged=source.damage_of(i),
            )
        return folder.finish({**_summarise(root, settings, 0, 0.0), "dim": dim, "text_dim": dim})
