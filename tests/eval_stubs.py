"""A stub encoder with fixed embeddings, so evaluation metrics have exactly known answers."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipcid.inputs.shards import write_tar_atomic

# Each solid colour an image can have, and the unit vector the stub encodes it to.
COLOUR_RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "purple": (128, 0, 128)}
AXIS = {"red": 0, "green": 1, "blue": 2}
# Purple images are encoded like red ones: the deliberate mistakes of the known answers.
IMAGE_AXIS = {**AXIS, "purple": 0}


def solid_png(colour: str, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), COLOUR_RGB[colour]).save(buf, format="PNG")
    return buf.getvalue()


class StubEncoder:
    cache_id = "stub"

    def __init__(self, dim: int = 4):
        self.dim = dim

    @staticmethod
    def preprocess(image: Image.Image) -> torch.Tensor:
        return torch.tensor(np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(axis=0))

    def _colour_of(self, rgb: torch.Tensor) -> str:
        return min(COLOUR_RGB, key=lambda c: float(((rgb - torch.tensor(COLOUR_RGB[c])) ** 2).sum()))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(images), self.dim)
        for i, rgb in enumerate(images):
            out[i, IMAGE_AXIS[self._colour_of(rgb)]] = 1.0
        return out

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.dim)
        for i, text in enumerate(texts):
            words = [AXIS[w] for w in text.replace(".", " ").split() if w in AXIS]
            if words:
                out[i, words[0]] = 1.0
            else:
                out[i, self.dim - 1] = 1.0  # text naming no colour points away from every image
        return out


def write_classification_wds(
    root: Path, splits: dict[str, list[tuple[str, int]]], classnames: list[str], templates: list[str]
) -> Path:
    for split, items in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        samples = [
            {"__key__": f"{i:05d}", "png": solid_png(colour), "cls": str(label)}
            for i, (colour, label) in enumerate(items)
        ]
        write_tar_atomic(root / split / "0.tar", samples)
        (root / split / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    (root / "dataset_type.txt").write_text("classification\n")
    return root
