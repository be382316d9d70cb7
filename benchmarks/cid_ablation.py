"""Student variants on a finished demo's artifacts: what each CID setting does to the held-out means.

Reuses DEMO's corpus, teacher embeddings, balance, clusters and held-out suite, trains one student
per variant with the demo recipe's student settings (same architecture, data and steps) plus the
variant's overrides, evaluates it on the suite, and prints one table against the demo's CLIP-only
student (the anchor). Each variant resumes and is skipped once its summary exists. Run by hand:

    python benchmarks/cid_ablation.py --demo demo --out demo/ablation \\
        --variant no_kl:w_kl=0 --variant ins_only:w_cls=0,w_kl=0

Overrides are DistillConfig fields (w_clip, w_cls, w_kl, w_ins, cls_scale, kl_temperature,
pfc_sample_rate, lr, ...); `clusters=PATH` trains against another clustering of the same embeddings.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from clipcid.demo import CLIP_ONLY, DemoConfig, load_recipe
from clipcid.distill.train import DistillConfig, distill
from clipcid.evaluation.run import AVERAGES, run_eval_suite
from clipcid.progress import setup_logging

KEYS = [key for key, _ in AVERAGES]


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, spec = text.partition(":")
    types = {f.name: f.type for f in fields(DistillConfig)}
    overrides = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"error: {key!r} is not a DistillConfig field")
        kind = str(types[key])
        overrides[key] = value if "str" in kind else (int(value) if kind.startswith("int") else float(value))
    return name, overrides


def summary_of(folder: Path) -> dict | None:
    path = folder / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, help="a finished `clipcid demo --out` folder")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="the demo was run with --quick")
    p.add_argument("--variant", action="append", default=[], help="NAME:key=value,key=value")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    setup_logging()
    demo, out = Path(args.demo), Path(args.out)
    recipe = load_recipe(DemoConfig(quick=args.quick))
    student = recipe["student"]
    rows = [("CLIP loss only (demo, anchor)", CLIP_ONLY, summary_of(demo / "results" / "student-clip"))]
    rows.append(("CLIP-CID (demo recipe)", recipe["cid_weights"], summary_of(demo / "results" / "student-cid")))
    for text in args.variant:
        name, overrides = parse_variant(text)
        run, results = out / "runs" / name, out / "results" / name
        settings = {
            "data": str(demo / "corpus"),
            "teacher_emb": str(demo / "teacher_emb"),
            "balance": str(demo / "balance"),
            "clusters": str(demo / "clusters"),
            **{k: v for k, v in student.items() if k != "model"},
            **recipe["cid_weights"],
            **overrides,
        }
        if summary_of(results) is None:
            distill(
                DistillConfig(out=str(run), model=student["model"], workers=args.workers, resume="latest", **settings)
            )
            run_eval_suite(
                student["model"], str(run / "student.pt"), str(results), str(demo / "eval"), workers=args.workers
            )
        rows.append((f"{name} ({text.partition(':')[2]})", overrides, summary_of(results)))

    anchor = rows[0][2]
    print("| variant | zero-shot mean | linear-probe mean | retrieval mean | Δ zero-shot | Δ linear probe |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, _, summary in rows:
        if summary is None:
            print(f"| {name} | missing | | | | |")
            continue
        values = [100 * (summary.get(k) or 0.0) for k in KEYS]
        deltas = [100 * (summary[k] - anchor[k]) for k in KEYS[:2]] if anchor else [0.0, 0.0]
        cells = [f"{v:.2f}" for v in values] + [f"{d:+.2f}" for d in deltas]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
