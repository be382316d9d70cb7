"""A timed `clipcid run` as a user would run it: on pairs the demo's training corpus does not contain,
with the demo's exported teacher.

The pairs: every emoji of the held-out suite's two styles the corpus lacks (Fluent 3D and Fluent high
contrast, `demo/eval/retrieval_emoji_*`), each picture with one of its three captions (in turn: the
name; "an emoji of NAME"; "NAME, SUBGROUP"), shuffled with a fixed seed and written as img2dataset's
webdataset output (KEY.png, KEY.txt, KEY.json with url and key; a .parquet and _stats.json per shard).
The teacher: `local-dir:DEMO/models/teacher`, the folder `clipcid demo` exports. Everything else is
`clipcid run`'s defaults (the paper's threshold 0.07, k auto) but the hold-out (10 %: 1 % of 4,415
pairs is too few to measure, and so is 5 %) and the student's recipe, which is the demo's
(clipcid-tiny, 1 epoch of batch 128, lr 1e-3, 50 warm-up steps, wd 0.1).

    python benchmarks/run_other_shards.py --demo demo --out /tmp/other [--holdout 0.1] [--workers 2]

Prints the seconds of every stage with its ratio to the anchor, the teacher's embed pass (the one cost
any offline distillation pays), then the results table of the run's report.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipcid.evaluation.datasets import build_dataset
from clipcid.inputs.shards import write_tar_atomic
from clipcid.util.tables import format_table

STYLES = ("retrieval_emoji_fluent3d", "retrieval_emoji_fluenthc")
SHARD_SIZE = 1000


def write_pairs(suite: Path, out: Path, seed: int = 0) -> int:
    pairs = []
    for name in STYLES:
        dataset = build_dataset(f"wds:{suite / name}")
        for i, (image, captions) in enumerate(dataset.iter_split("test")):
            pairs.append((image, captions[i % len(captions)], f"{name}/{i}"))
    order = np.random.default_rng(seed).permutation(len(pairs))
    out.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, len(pairs), SHARD_SIZE)):
        samples, rows = [], []
        for r, j in enumerate(order[start : start + SHARD_SIZE]):
            image, caption, source = pairs[j]
            key, url = f"{s:05d}{r:04d}", f"suite://{source}"
            meta = {"url": url, "key": key, "status": "success", "caption": caption}
            samples.append({"__key__": key, "png": image, "txt": caption, "json": json.dumps(meta)})
            rows.append(meta)
        write_tar_atomic(out / f"{s:05d}.tar", samples)
        pq.write_table(pa.Table.from_pylist(rows), out / f"{s:05d}.parquet")
        (out / f"{s:05d}_stats.json").write_text(json.dumps({"count": len(rows), "successes": len(rows)}))
    return len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="demo", help="a finished `clipcid demo` folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--holdout", type=float, default=0.1, help="1 % (and 5 %) of these pairs is under 200")
    parser.add_argument("--student", default="clipcid-tiny")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    demo, out = Path(args.demo), Path(args.out)
    teacher = demo / "models" / "teacher"
    if not (teacher / "open_clip_config.json").is_file():
        sys.exit(f"{teacher} is not an exported model folder: run `clipcid demo` first")
    if not (out / "pairs").is_dir():
        n = write_pairs(demo / "eval", out / "pairs")
        print(f"{n} pairs written to {out / 'pairs'}")
    command = [
        sys.executable, "-m", "clipcid", "run", "--data", str(out / "pairs"), "--teacher", f"local-dir:{teacher}",
        "--student", args.student, "--out", str(out / "run"), "--baseline", "--holdout", str(args.holdout),
        "--epochs", "1", "--batch-size", "128", "--lr", "0.001", "--set", "distill.warmup=50",
        "--set", "distill.wd=0.1", "--workers", str(args.workers),
    ]  # fmt: skip
    print(" ".join(command))
    start = time.monotonic()
    subprocess.run(command, check=True)
    wall = time.monotonic() - start
    stages = json.loads((out / "run" / "run.json").read_text())["stages"]
    anchor = stages["embed"]["seconds"]
    rows = [[name, f"{s['seconds']:.1f}", f"{s['seconds'] / anchor:.2f}"] for name, s in stages.items()]
    rows.append(["total (the command, wall clock)", f"{wall:.1f}", f"{wall / anchor:.2f}"])
    print(format_table(["stage", "seconds", "ratio to embed (anchor)"], rows))
    print((out / "run" / "results.md").read_text())


if __name__ == "__main__":
    main()
