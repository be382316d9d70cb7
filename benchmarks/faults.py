"""Kill each stage at many random moments and check that running it again gives the uninterrupted result.

For every stage (embed, balance, cluster, distill with two loader workers) one run goes straight
through (the reference, also timing it); then each probe starts the stage, SIGKILLs its whole process
tree after a random delay in [0, reference time], sometimes kills the resumed run too, and finally runs
it to the end. A probe passes when the outputs equal the reference's (embed, balance, cluster: the same
bytes in every .npy and .parquet; distill: the same weights within float tolerance and every step
logged once). Run by hand:

    python benchmarks/faults.py --out /tmp/faults --probes 10
    python benchmarks/faults.py --out /tmp/faults --probes 10 --stages distill
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
from conftest import REPO_ROOT, _clipcid, _env, kill_tree, make_shards, run_ok, same_files  # noqa: E402


def kill_after(cmd: list[str], seconds: float) -> bool:
    """Start cmd and SIGKILL its tree after `seconds`; True if it was still running."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.wait()
        return True


def stages(root: Path) -> dict[str, tuple[callable, callable]]:
    """name -> (command for an output folder, check(reference, candidate) -> bool)."""
    shards, emb, clusters, ckpt = root / "shards", root / "emb", root / "clusters", root / "tiny.pt"

    def bytes_equal(a: Path, b: Path) -> bool:
        try:
            same_files(a, b)
            return True
        except AssertionError:
            return False

    def weights_equal(a: Path, b: Path) -> bool:
        wa = torch.load(a / "student.pt", weights_only=True)["state_dict"]
        wb = torch.load(b / "student.pt", weights_only=True)["state_dict"]
        steps = [[json.loads(x)["step"] for x in (r / "train_log.jsonl").read_text().splitlines()] for r in (a, b)]
        return all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6) for k in wa) and steps[0] == steps[1]

    embed = ["embed", "--data", str(shards), "--model", "clipcid-tiny", "--pretrained", str(ckpt)]
    embed += ["--workers", "2", "--batch-size", "32"]
    distill = ["distill", "--data", str(shards), "--teacher-emb", str(emb), "--clusters", str(clusters)]
    distill += ["--model", "clipcid-tiny", "--batch-size", "16", "--epochs", "2", "--warmup", "2", "--workers", "2"]
    distill += ["--save-every-n-steps", "5", "--log-every-n-steps", "1", "--resume", "latest"]
    return {
        "embed": (lambda out: _clipcid(*embed, "--out", str(out)), bytes_equal),
        "balance": (
            lambda out: _clipcid(
                "balance", "--emb", str(emb), "--target-removal", "0.3", "--memory-gb", "0.0001", "--out", str(out)
            ),  # fmt: skip
            bytes_equal,
        ),
        "cluster": (lambda out: _clipcid("cluster", "--emb", str(emb), "--k", "8", "--out", str(out)), bytes_equal),
        "distill": (lambda out: _clipcid(*distill, "--out", str(out)), weights_equal),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--probes", type=int, default=10, help="random kill points per stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", nargs="+", default=None, help="only these stages (embed, balance, cluster, distill)")
    args = p.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    make_shards(root / "shards", n_shards=8, per_shard=64)
    from clipcid.models import register_model_configs

    register_model_configs()
    import open_clip

    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.create_model("clipcid-tiny").state_dict()}, root / "tiny.pt")
    plan = stages(root)
    if args.stages:
        unknown = set(args.stages) - set(plan)
        if unknown:
            p.error(f"--stages: no stage {', '.join(sorted(unknown))}; choose from {', '.join(plan)}")
        plan = {name: plan[name] for name in plan if name in args.stages}
    every = stages(root)  # the inputs of balance, cluster and distill are made whichever stages are probed
    run_ok(every["embed"][0](root / "emb"))
    run_ok(every["cluster"][0](root / "clusters"))
    rows = []
    for name, (command, check) in plan.items():
        reference = root / f"{name}-reference"
        start = time.monotonic()
        run_ok(command(reference))
        seconds = time.monotonic() - start
        passed = killed = 0
        for probe in range(args.probes):
            out = root / f"{name}-probe{probe}"
            killed += kill_after(command(out), rng.uniform(0.0, seconds))
            if rng.random() < 0.3:  # killed again while resuming
                killed += kill_after(command(out), rng.uniform(0.0, seconds))
            run_ok(command(out))
            passed += check(reference, out)
            shutil.rmtree(out)
        rows.append((name, args.probes, passed, killed, seconds))
        print(f"{name}: {passed}/{args.probes} probes passed ({killed} kills)", flush=True)
    print("\n| stage | probes | passed | kills landed | reference run (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, probes, passed, killed, seconds in rows:
        print(f"| {name} | {probes} | {passed} | {killed} | {seconds:.1f} |")
    total, ok = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"\nprobes tried {total}, passed {ok}")


if __name__ == "__main__":
    main()
