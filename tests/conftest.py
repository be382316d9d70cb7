"""Shared fixtures: tiny shards of generated images and a tiny saved checkpoint."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clipcid.inputs.shards import write_tar_atomic
from clipcid.models import register_model_configs

register_model_configs()  # the project's configs, for open_clip.create_model("clipcid-tiny")

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "cyan"]
SHAPES = ["circle", "square", "triangle", "cross"]
REPO_ROOT = Path(__file__).resolve().parent.parent
NPM_ROOT = REPO_ROOT / "node_modules"

# Keep the tests off both cores' worth of threads fighting each other in DataLoader workers.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def shape_png(colour: str, shape: str, size: int = 64, jitter: int = 0) -> bytes:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    a, b = 8 + jitter, size - 8 - jitter
    if shape == "circle":
        draw.ellipse((a, a, b, b), fill=colour)
    elif shape == "square":
        draw.rectangle((a, a, b, b), fill=colour)
    elif shape == "triangle":
        draw.polygon([(size // 2, a), (a, b), (b, b)], fill=colour)
    else:
        draw.rectangle((size // 2 - 6, a, size // 2 + 6, b), fill=colour)
        draw.rectangle((a, size // 2 - 6, b, size // 2 + 6), fill=colour)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_shards(folder: Path, n_shards: int, per_shard: int, seed: int = 0) -> list[list[str]]:
    """img2dataset-like shards of coloured shapes with captions; returns the keys of each shard."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(n_shards):
        samples = []
        for r in range(per_shard):
            colour, shape = COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
            key = f"{s:05d}{r:04d}"
            samples.append(
                {
                    "__key__": key,
                    "png": shape_png(colour, shape, jitter=int(rng.integers(4))),
                    "txt": f"a {colour} {shape}",
                    "json": {"colour": colour, "shape": shape},
                }
            )
        write_tar_atomic(folder / f"{s:05d}.tar", samples)
        keys.append([x["__key__"] for x in samples])
    return keys


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, list[list[str]]]:
    folder = tmp_path / "shards"
    return folder, make_shards(folder, n_shards=3, per_shard=10)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A saved clipcid-tiny state dict, loadable by open_clip as `pretrained=PATH`."""
    import open_clip
    import torch

    torch.manual_seed(123)
    model = open_clip.create_model("clipcid-tiny")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def needs_sources():
    """Skip a test that renders real artwork when the corpus sources are not installed
    (`make test` installs them, so in CI these tests always run)."""
    present = (NPM_ROOT / "@iconify-json" / "twemoji").is_dir() and Path(
        "/usr/share/unicode/emoji/emoji-test.txt"
    ).is_file()
    in_ci = os.environ.get("CI") == "true"  # CI installs them: a missing source there is a failure
    return pytest.mark.skipif(not present and not in_ci, reason="corpus sources not installed (run `make sources`)")


def run_two_gloo_processes(args: list[str], timeout: int = 600) -> None:
    """Run `torchrun --nproc_per_node 2 ARGS` (gloo on CPU) from the repository root; fail with its stderr."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free port, so parallel or repeated runs do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            *args,
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
