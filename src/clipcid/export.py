"""`clipcid export`: a model folder that plain open_clip loads, with no clipcid import.

OUT/open_clip_config.json ({"model_cfg", "preprocess_cfg"}), OUT/open_clip_model.safetensors (every
weight), OUT/README.md (a model card) and, for a Hugging Face text tower, its config and tokenizer files
(the folder is then its own tokenizer source, as open_clip's local-dir loading expects), so that

    open_clip.create_model_and_transforms("local-dir:OUT")
    open_clip.get_tokenizer("local-dir:OUT")

and CLIP_benchmark's `--model local-dir:OUT` give the model as clipcid trained it. The folder is written
under a temporary name, checked by loading it back through open_clip (same outputs on a test batch),
then renamed into place.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch

from clipcid.config import option
from clipcid.errors import ClipcidError
from clipcid.models import (
    HF_CONFIG,
    OPEN_CLIP_CONFIG,
    count_parameters,
    embedding_dim,
    load_model,
    quiet_model_creation,
    register_model_configs,
)
from clipcid.util.fileio import output_folder
from clipcid.util.tables import markdown_table

log = logging.getLogger("clipcid")

CONFIG_FILE = OPEN_CLIP_CONFIG
WEIGHTS_FILE = "open_clip_model.safetensors"
# What a Hugging Face text tower needs besides its weights (which are in WEIGHTS_FILE).
HF_FILES = (HF_CONFIG, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@dataclass
class ExportConfig:
    model: str = option(help="open_clip architecture of the checkpoint")
    pretrained: str = option(help="checkpoint to export (a clipcid student.pt, teacher.pt, or any state dict)")
    out: str = option(help="folder to write; open_clip loads it as local-dir:OUT")
    name: str | None = option(None, "the model's name in its card (default: the folder's name)")
    description: str | None = option(None, "what the model is and how it was trained, for the card")
    results: str | None = option(None, "a folder of results for the card (an eval-suite --out; or its summary.json)")
    overwrite: bool = option(False, "replace an existing folder")


def export_model(cfg: ExportConfig) -> dict:
    register_model_configs()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ClipcidError(f"--out {out} is a file, not a folder; give a folder path")
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ClipcidError(f"{out} exists and is not empty; use another --out, or --overwrite to replace it")
    loaded = load_model(cfg.model, cfg.pretrained)
    model_cfg = copy.deepcopy(open_clip.get_model_config(cfg.model))
    if model_cfg is None:
        raise ClipcidError(f"{cfg.model} has no open_clip config to export")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    output_folder(tmp)
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name"):
        source = Path(text_cfg["hf_model_name"])
        for name in HF_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, tmp / name)
        # open_clip reads the tokenizer from the folder itself; transformers reads the tower's config
        # from this path, so the folder must stay where it is exported (or be exported again).
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(out.resolve())
        text_cfg["hf_model_pretrained"] = False
    preprocess = dict(loaded.model.visual.preprocess_cfg)
    (tmp / CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2))
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in loaded.model.state_dict().items()}, str(tmp / WEIGHTS_FILE))
    card = model_card(cfg, loaded, model_cfg, preprocess)
    (tmp / "README.md").write_text(card, encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    check_export(out, loaded)
    return {"out": str(out), "parameters": count_parameters(loaded.model)}


def check_export(folder: Path, loaded) -> None:
    """Load the folder back the way a plain open_clip user would and compare outputs on a test batch."""
    with quiet_model_creation():
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    size = loaded.model.visual.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    texts = ["a red heart", "the flag of Japan"]
    model.eval()
    with torch.no_grad():
        ours = loaded.model.encode_image(images), loaded.model.encode_text(loaded.tokenizer(texts))
        theirs = model.encode_image(images), model.encode_text(tokenizer(texts))
    for a, b in zip(ours, theirs, strict=True):
        if not torch.allclose(a, b, atol=1e-5):
            raise ClipcidError(f"{folder}: the exported model does not give the original's outputs")


def _results_table(folder: Path) -> str:
    from clipcid.evaluation.run import AVERAGES, main_metric, read_suite_results

    summary, records = read_suite_results(folder)
    if summary is None and not records:
        return "(not given)"
    rows = [
        [f"**{label}**", f"{100 * summary[key]:.2f}"] for key, label in AVERAGES if (summary or {}).get(key) is not None
    ]
    for record in records.values():
        metric, value = main_metric(record)
        rows.append([f"{record['dataset']} {record['task']} ({metric})", f"{100 * value:.2f}"])
    return "\n".join(markdown_table(["held-out result (%)", "value"], rows))


def model_card(cfg: ExportConfig, loaded, model_cfg: dict, preprocess: dict) -> str:
    name = cfg.name or Path(cfg.out).name
    n = count_parameters(loaded.model)
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    image_tower = vision.get("timm_model_name") or f"ViT, width {vision.get('width')}, {vision.get('layers')} layers"
    if text.get("hf_model_name"):
        hf = loaded.model.text.config
        text_tower = (
            f"Hugging Face {hf.model_type}, width {hf.hidden_size}, {hf.num_hidden_layers} layers "
            "(its config and tokenizer are in this folder)"
        )
    else:
        text_tower = f"transformer, width {text.get('width')}, {text.get('layers')} layers"
    size = preprocess.get("size")
    size = size[0] if isinstance(size, list | tuple) else size
    mean = ", ".join(f"{v:.3f}" for v in preprocess.get("mean", ()))
    std = ", ".join(f"{v:.3f}" for v in preprocess.get("std", ()))
    results_folder = Path(cfg.results) if cfg.results else None
    if results_folder is not None and results_folder.is_file():
        results_folder = results_folder.parent  # a summary.json: its task JSONs are beside it
    results = _results_table(results_folder) if results_folder is not None else "(not given)"
    return f"""# {name}

A CLIP model exported by clipcid from `{cfg.model}` (`{Path(cfg.pretrained).name}`).

| | |
|---|---|
| image tower | {image_tower}, {size} px |
| text tower | {text_tower}, {text.get("context_length", 77)} tokens |
| embedding width | {embedding_dim(loaded.model)} |
| parameters | {n["total"]:,} (image {n["visual"]:,}, text {n["text"]:,}) |
| image normalisation | mean ({mean}), std ({std}) |

## Use it

```python
import open_clip

model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{Path(cfg.out).resolve()}")
tokenizer = open_clip.get_tokenizer("local-dir:{Path(cfg.out).resolve()}")
```

With CLIP_benchmark: `clip_benchmark eval --model local-dir:{Path(cfg.out).resolve()} --pretrained none ...`.
No clipcid import is needed.

## Training

{cfg.description or "(not given)"}

## Held-out results

{results}
"""
