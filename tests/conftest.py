"""Shared fixtures: tiny shards of generated images and a tiny saved checkpoint."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clipcid.inputs.shards import write_tar_atomic
from clipcid.models import register_model_configs
from clipcid.util.allocator import keep_freed_memory

register_model_configs()  # the project's configs, for open_clip.create_model("clipcid-tiny")
keep_freed_memory()  # as the CLI does at start-up: the tests' batches reuse their pages (util/allocator.py)

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "cyan"]
SHAPES = ["circle", "square", "triangle", "cross"]
REPO_ROOT = Path(__file__).resolve().parent.parent
NPM_ROOT = REPO_ROOT / "node_modules"

# Keep the tests off both cores' worth of threads fighting each other in DataLoader workers. Under
# pytest-xdist (`make test` runs two workers) each worker takes one core: one thread each.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    os.environ.setdefault("OMP_NUM_THREADS", "2")


# The heaviest test files first (their tests' seconds, `pytest --durations=0` under two xdist workers, AMD
# EPYC 2-core: study 443, faults 405, pipeline 225, demo 164, distill 151, multinode 110, embed 67; the
# rest under 50 each). `make test` hands files to its two workers in this order (--dist loadfile
# --no-loadscope-reorder), so the long ones start first and the short ones fill in at the end; xdist's
# default, most tests first, left the one-test demo file for last with one worker idle.
HEAVIEST_FIRST = ("test_study.py", "test_faults.py", "test_pipeline.py", "test_demo.py", "test_distill.py",
                  "test_multinode.py", "test_embed.py")  # fmt: skip


def pytest_collection_modifyitems(config, items) -> None:
    missing = [name for name in HEAVIEST_FIRST if not (Path(__file__).parent / name).is_file()]
    if missing:
        raise pytest.UsageError(f"conftest.HEAVIEST_FIRST names files that are gone: {', '.join(missing)}")
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the others keep their order


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


def make_img2dataset_shards(folder: Path, n_shards: int, per_shard: int, seed: int = 0, captions: bool = True) -> None:
    """Shards as img2dataset's webdataset output writes them: KEY.jpg, KEY.txt, KEY.json (url, key, status,
    caption, sizes) in 00000.tar, and beside each tar its .parquet (every planned row, failed downloads
    too) and _stats.json. Pictures differ in shape, colour, place and size, so that few are byte-equal."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        samples, rows = [], []
        for r in range(per_shard + 1):
            colour, shape = COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
            key, url = f"{s:05d}{r:04d}", f"https://example.org/{s}/{r}.jpg"
            failed = r == per_shard  # img2dataset lists a failed download in the parquet, not in the tar
            rows.append(
                {
                    "key": key,
                    "url": url,
                    "caption": f"a {colour} {shape}",
                    "status": "failed_to_download" if failed else "success",
                }
            )
            if failed:
                continue
            image = Image.open(io.BytesIO(shape_png(colour, shape, size=64, jitter=int(rng.integers(12)))))
            image = image.rotate(float(rng.uniform(-20, 20)), fillcolor="white")
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="JPEG", quality=95)
            meta = {
                "url": url,
                "key": key,
                "status": "success",
                "caption": f"a {colour} {shape}",
                "width": 64,
                "height": 64,
            }
            sample = {"__key__": key, "jpg": buf.getvalue(), "json": json.dumps(meta)}
            if captions:
                sample["txt"] = f"a {colour} {shape}"
            samples.append(sample)
        write_tar_atomic(folder / f"{s:05d}.tar", samples)
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{s:05d}.parquet")
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard + 1, "successes": per_shard}))


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


# -- processes killed at a moment, for tests/test_faults.py and benchmarks/faults.py -------------------


def _clipcid(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipcid", *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process below it (torchrun starts its ranks in sessions of their own)."""
    for p in [pid, *_descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_and_kill_when(cmd: list[str], trigger: Path, pattern: str = "*", timeout: float = 300) -> bool:
    """Start `cmd`; SIGKILL its whole process group as soon as a file matching `pattern` appears in
    `trigger`. True when it was killed, False when it finished first."""
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if trigger.is_dir() and any(trigger.glob(pattern)):
            kill_tree(proc.pid)
            proc.wait()
            return True
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            return False
        time.sleep(0.005)
    kill_tree(proc.pid)
    raise AssertionError(f"{cmd} neither finished nor made {trigger}/{pattern} in {timeout} s")


def run_ok(cmd: list[str]) -> None:
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def same_files(a: Path, b: Path, patterns=("**/*.npy", "**/*.parquet")) -> None:
    names = sorted({p.relative_to(a) for pat in patterns for p in a.glob(pat) if "edges" not in p.parts})
    assert names, f"nothing to compare in {a}"
    assert names == sorted({p.relative_to(b) for pat in patterns for p in b.glob(pat) if "edges" not in p.parts})
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs after the kill and resume"


# Loads a folder the way a user of plain open_clip would, in a process that never imports clipcid.
PLAIN_OPEN_CLIP = """
import sys, numpy as np, open_clip, torch
folder, out = sys.argv[1], sys.argv[2]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
size = model.visual.preprocess_cfg["size"]
size = size if isinstance(size, int) else size[0]
images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(7))
with torch.no_grad():
    img = model.eval().encode_image(images)
    txt = model.encode_text(tokenizer(["a red heart", "the flag of Japan"]))
assert "clipcid" not in sys.modules
np.savez(out, img=img.numpy(), txt=txt.numpy(), mean=np.array(preprocess.transforms[-1].mean))
"""


def plain_open_clip(folder: Path, tmp_path: Path) -> dict:
    out = tmp_path / "plain.npz"
    subprocess.run([sys.executable, "-c", PLAIN_OPEN_CLIP, str(folder), str(out)], check=True, cwd=tmp_path)
    return dict(np.load(out))
