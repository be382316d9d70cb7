"""Pick the demo teacher by measurement: LiT teachers from each shipped ImageNet network at several
input sizes, trained on the corpus the same way, scored on the held-out suite, timed.

Each configuration runs `clipcid lit` (locked towers' features once, then 20 epochs of projections)
and `clipcid eval-suite`; the table gives the suite's means and the seconds of the feature pass, with
the ratio of each configuration's feature pass to the anchor's (the first configuration). Run by hand;
a configuration whose folder is complete is not run again:

    python benchmarks/teacher_choice.py --corpus demo128/corpus --suite demo128/eval --out /tmp/teachers \\
        --config mobilenetv2_100:128 --config mobilenetv2_100:96 --config tf_efficientnet_lite0:128

The corpus and suite must be rendered at least as large as the largest size asked (`clipcid data
build-demo --image-size 128`, `clipcid data build-eval --image-size 128`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import open_clip

from clipcid.evaluation.run import AVERAGES, EvalSuiteConfig, run_eval_suite
from clipcid.lit import LitConfig, lit
from clipcid.models import LIT_PRETRAINED_MODELS, minilm_folder, pretrained_trunk_config, register_model_configs
from clipcid.util.progress import setup_logging


def run_config(trunk: str, size: int, dim: int, args) -> dict:
    name = f"bench-{trunk}-{size}-{dim}"
    open_clip.factory._MODEL_CONFIGS[name] = pretrained_trunk_config(minilm_folder(), trunk, size, dim)
    LIT_PRETRAINED_MODELS[name] = (trunk, size, dim)
    folder = Path(args.out) / name
    result_file = folder / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    start = time.monotonic()
    trained = lit(LitConfig(data=args.corpus, out=str(folder), model=name, epochs=args.epochs, workers=args.workers))
    lit_s = time.monotonic() - start
    start = time.monotonic()
    evaluation = run_eval_suite(
        EvalSuiteConfig(name, str(folder / "eval"), str(folder / "model.pt"), args.suite, workers=args.workers)
    )
    result = {
        "config": f"{trunk} @ {size} px",
        "features_s": lit_s - trained["train_seconds"],
        "train_s": trained["train_seconds"],
        "eval_s": time.monotonic() - start,
        **evaluation["summary"],
    }
    result_file.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True)
    p.add_argument("--suite", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config", action="append", default=[], help="TIMM_TRUNK:IMAGE_SIZE (first = anchor)")
    p.add_argument("--dim", type=int, default=512, help="embedding width")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    setup_logging()
    register_model_configs()
    configs = args.config or ["mobilenetv2_100:128"]
    results = [run_config(c.split(":")[0], int(c.split(":")[1]), args.dim, args) for c in configs]
    anchor = results[0]["features_s"]
    keys = [k for k, _ in AVERAGES]
    print("| teacher | " + " | ".join(label for _, label in AVERAGES) + " | feature pass (s) | × anchor |")
    print("|---|" + "---:|" * (len(keys) + 2))
    for r in results:
        values = " | ".join("–" if r.get(k) is None else f"{100 * r[k]:.2f}" for k in keys)
        print(f"| {r['config']} | {values} | {r['features_s']:.0f} | {r['features_s'] / anchor:.2f} |")


if __name__ == "__main__":
    main()
