"""Model creation on top of open_clip: the project's tiny configs, checkpoints, tokenizers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from clipcid.errors import ClipcidError

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_model_configs() -> None:
    """Make clipcid-tiny / clipcid-small (and any JSON in model_configs/) known to open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess: Any
    tokenizer: Any
    name: str
    embed_dim: int


def _check_model_name(name: str) -> None:
    register_model_configs()
    known = open_clip.list_models()
    if name not in known and not name.startswith(("hf-hub:", "local-dir:")):
        near = [m for m in known if name.lower() in m.lower()][:5]
        hint = f" (did you mean {', '.join(near)}?)" if near else " (see `clipcid models` for the list)"
        raise ClipcidError(f"unknown model architecture '{name}'{hint}")


def load_model(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """Create an open_clip model with its eval transform and tokenizer.

    `pretrained` is an open_clip tag or a checkpoint path; None gives a random init from `seed`
    (reproducible, so that every rank of a distributed job builds the same weights).
    """
    _check_model_name(name)
    if pretrained and (os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        if not Path(pretrained).is_file():
            raise ClipcidError(f"checkpoint not found: {pretrained}")
    if pretrained and Path(pretrained).is_file():
        check_checkpoint(name, pretrained)
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained or None)
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(name)
    embed_dim = int(model.text_projection.shape[1]) if hasattr(model, "text_projection") else None
    if embed_dim is None:
        with torch.no_grad():
            embed_dim = int(model.encode_text(tokenizer(["x"]).to(device)).shape[-1])
    return LoadedModel(model, preprocess, tokenizer, name, embed_dim)


def check_checkpoint(name: str, path: str) -> None:
    """Raise a ClipcidError naming the keys that differ when `path` was not saved from `name`."""
    state = open_clip.factory.load_state_dict(path)
    expected = open_clip.create_model(name).state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if keys:
            problems.append(f"{len(keys)} {label} key(s), e.g. {', '.join(keys[:3])}")
    if problems:
        raise ClipcidError(f"checkpoint {path} does not match architecture {name}: {'; '.join(problems)}")


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    visual = sum(p.numel() for p in model.visual.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"visual": visual, "text": total - visual, "total": total}


def project_model_names() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def describe_models(include_all: bool = False) -> str:
    """A table of the project's configs (parameters counted by building each model)."""
    register_model_configs()
    lines = [f"{'model':<16} {'embed':>5} {'image':>5} {'ctx':>4} {'visual':>10} {'text':>10} {'total':>10}"]
    for name in project_model_names():
        cfg = open_clip.get_model_config(name)
        model = open_clip.create_model(name)
        n = count_parameters(model)
        ctx = cfg["text_cfg"].get("context_length", 77)
        lines.append(
            f"{name:<16} {cfg['embed_dim']:>5} {cfg['vision_cfg']['image_size']:>5} {ctx:>4} "
            f"{n['visual']:>10,} {n['text']:>10,} {n['total']:>10,}"
        )
    if include_all:
        lines.append("")
        lines.append("open_clip architectures: " + ", ".join(open_clip.list_models()))
    return "\n".join(lines)
