"""The pipeline's independent jobs on a CPU: in turn in one process (the anchor) against side by side,
one process each with the threads split (util/side_by_side.py), on a finished demo's inputs.

- students: the CID student and the CLIP-only baseline of the demo's recipe, --steps steps each;
- evaluation (--eval): the teacher's, the student's and the baseline's evaluations on the demo's suite
  (the whole of it, as the demo runs it: several minutes per variant).

Every job writes into a fresh folder under --work; the demo's folders are only read. Variants alternate
per round (--rounds), so machine noise hits both; the table gives wall seconds, CPU seconds and the
ratio to the anchor measured in the same run. The students' weights of the two variants are compared
too (largest difference of any parameter).

Run it from the folder the demo was made in: its recipe names its inputs by paths relative to there.

    python benchmarks/side_by_side.py --demo demo --work /tmp/sbs --steps 60
    python benchmarks/side_by_side.py --demo demo --work /tmp/sbs --steps 60 --eval
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

import torch

from clipcid.distill.checkpoint import student_path
from clipcid.distill.train import distill
from clipcid.evaluation.run import evaluate_model
from clipcid.pipeline import Pipeline
from clipcid.stage import DistEnv, read_record
from clipcid.util.allocator import keep_freed_memory
from clipcid.util.side_by_side import Job, own_usage, run_side_by_side, usage_since


def student_jobs(pipeline: Pipeline, work: Path, steps: int) -> list[Job]:
    return [
        Job(name, distill, dataclasses.replace(pipeline.distill_config(name), out=str(work / name), max_steps=steps))
        for name in pipeline.students
    ]


def eval_jobs(pipeline: Pipeline, work: Path) -> list[Job]:
    return [
        Job(name, evaluate_model, dataclasses.replace(cfg, out=str(work / name)))
        for name, cfg in pipeline.eval_configs().items()
    ]


def timed(variant: str, jobs: list[Job]) -> dict:
    start, before = time.monotonic(), own_usage()
    if variant == "in turn":
        for job in jobs:
            job.work(job.config)
    else:
        run_side_by_side(jobs, processes=min(len(jobs), torch.get_num_threads()))
    return {"wall": time.monotonic() - start, **usage_since(before)}


def largest_difference(a: Path, b: Path) -> float:
    x = torch.load(student_path(a), weights_only=True)["state_dict"]
    y = torch.load(student_path(b), weights_only=True)["state_dict"]
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="a finished `clipcid demo` (or `clipcid run --baseline`) folder")
    ap.add_argument("--work", required=True, help="scratch folder (emptied)")
    ap.add_argument("--steps", type=int, default=60, help="training steps per student")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--eval", action="store_true", help="time the three evaluations too")
    args = ap.parse_args()
    keep_freed_memory()  # as the CLI does
    demo, work = Path(args.demo), Path(args.work)
    recipe = read_record(demo / "recipe.json")
    if recipe is None:
        raise SystemExit(f"{demo}/recipe.json not found: give a finished demo or run folder")
    pipeline = Pipeline(demo, recipe, DistEnv(0, 1, 0, torch.device("cpu")), None)
    shutil.rmtree(work, ignore_errors=True)
    kinds = {"students": lambda w: student_jobs(pipeline, w, args.steps)}
    if args.eval:
        kinds["evaluation"] = lambda w: eval_jobs(pipeline, w)
    results: dict[tuple[str, str], list[dict]] = {}
    for r in range(args.rounds):
        for kind, make in kinds.items():
            for variant in ("in turn", "side by side"):
                where = work / f"{kind}-{variant.replace(' ', '_')}-{r}"
                results.setdefault((kind, variant), []).append(timed(variant, make(where)))
    print(f"\n{torch.get_num_threads()} threads; {args.steps} steps per student; best of {args.rounds} round(s)\n")
    print("| jobs | variant | wall s | user s | system s | ratio |")
    print("|---|---|---:|---:|---:|---:|")
    for kind in kinds:
        best = {v: min(results[(kind, v)], key=lambda x: x["wall"]) for v in ("in turn", "side by side")}
        for variant, m in best.items():
            ratio = m["wall"] / best["in turn"]["wall"]
            print(f"| {kind} | {variant} | {m['wall']:.1f} | {m['user_seconds']:.1f} | {m['system_seconds']:.1f} "
                  f"| {ratio:.2f} |")  # fmt: skip
    for name in pipeline.students:
        a, b = work / f"students-in_turn-0/{name}", work / f"students-side_by_side-0/{name}"
        print(f"\n{name}: largest weight difference, in turn vs side by side: {largest_difference(a, b):.2e}")


if __name__ == "__main__":
    main()
