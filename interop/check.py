"""`make interop`: clipcid's outputs against the real tools users run, installed in an environment of
their own (their declared pins clash with clipcid's): CLIP_benchmark 1.6.2 and autofaiss.

1. A student exported by clipcid (local-dir:) is evaluated by CLIP_benchmark's own CLI on clipcid's
   held-out suite (`--dataset wds/NAME --dataset_root ...`, its default 4 loader workers), and by
   `clipcid eval`; zero-shot acc1, acc5 and mean per-class recall must agree to every digit.
2. `clip_benchmark build` merges clipcid's result files with its own: one row per (model, dataset, task),
   the two agreeing.
3. autofaiss builds an index over a `clipcid embed` output (clip-retrieval's layout) and every row finds
   itself.

Run from the repository root with clipcid's environment: python interop/check.py --interop-python PY
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

AUTOFAISS_CHECK = """
import sys, numpy as np, glob
from autofaiss import build_index
emb_dir, index_dir = sys.argv[1], sys.argv[2]
index, info = build_index(embeddings=emb_dir + "/img_emb", index_path=index_dir + "/knn.index",
                          index_infos_path=index_dir + "/infos.json", max_index_memory_usage="1G",
                          current_memory_available="2G", metric_type="ip", verbose=30)
# Rows numbered as clipcid numbers them: parts in numeric order (autofaiss reads them sorted by name,
# the same order only because the names are zero-padded).
parts = sorted(glob.glob(emb_dir + "/img_emb/*.npy"), key=lambda p: int(p.rsplit("_", 1)[1].split(".")[0]))
x = np.concatenate([np.load(p) for p in parts]).astype("float32")
_, ids = index.search(x, 1)
hit = ids[:, 0]
# A row finds itself, or a byte-identical twin (the test shards repeat pictures): the same vector.
found = (hit == np.arange(len(x))) | (x[hit] == x).all(axis=1)
print("ROWS", len(x), "EXACT", float((hit == np.arange(len(x))).mean()), "FOUND_THEMSELVES", float(found.mean()))
"""


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{result.stderr[-3000:]}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interop-python", required=True, help="python of the environment with CLIP_benchmark")
    p.add_argument("--out", default="interop-out")
    args = p.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    clipcid = [sys.executable, "-m", "clipcid"]
    bin_dir = Path(args.interop_python).parent
    checks: list[tuple[str, bool, str]] = []

    # A small suite, a tiny student, its export, and an embed output.
    from conftest import make_shards

    run([*clipcid, "data", "build-eval", "--out", str(out / "suite"), "--only", "digits", "flags_circle"], cwd=REPO)
    make_shards(out / "shards", n_shards=12, per_shard=20)
    run([*clipcid, "distill", "--data", str(out / "shards"), "--model", "clipcid-tiny", "--out", str(out / "run"),
         "--w-cls", "0", "--w-kl", "0", "--w-ins", "0", "--batch-size", "16", "--workers", "0"], cwd=REPO)  # fmt: skip
    student = out / "run" / "open_clip"

    # 1. The same zero-shot numbers from CLIP_benchmark and from clipcid.
    for dataset in ("digits", "flags_circle"):
        cb = out / f"cb_{dataset}.json"
        run([str(bin_dir / "clip_benchmark"), "eval", "--model", f"local-dir:{student}", "--pretrained", "none",
             "--dataset", f"wds/{dataset}", "--dataset_root", str(out / "suite" / "{dataset}"),
             "--task", "zeroshot_classification", "--output", str(cb), "--no_amp"], cwd=out)  # fmt: skip
        ours = out / f"clipcid_{dataset}.json"
        run([*clipcid, "eval", "--model", "clipcid-tiny", "--pretrained", str(out / "run" / "student.pt"),
             "--dataset", f"wds/{dataset}", "--dataset_root", str(out / "suite" / "{dataset}"),
             "--task", "zeroshot_classification", "--output", str(ours), "--workers", "4"], cwd=REPO)  # fmt: skip
        theirs, mine = json.loads(cb.read_text()), json.loads(ours.read_text())
        keys = ("acc1", "acc5", "mean_per_class_recall")
        same = all(round(theirs["metrics"][k], 6) == round(mine["metrics"][k], 6) for k in keys)
        detail = ", ".join(f"{k} {theirs['metrics'][k]:.6f} / {mine['metrics'][k]:.6f}" for k in keys)
        checks.append((f"zero-shot on wds/{dataset}: CLIP_benchmark / clipcid", same, detail))
        checks.append((f"dataset name in both results is wds/{dataset}", theirs["dataset"] == mine["dataset"], ""))

    # 2. clip_benchmark build merges both kinds of result file.
    files = sorted(str(f) for f in out.glob("*_*.json") if f.name.startswith(("cb_", "clipcid_")))
    run([str(bin_dir / "clip_benchmark"), "build", *files, "--output", str(out / "merged.csv")], cwd=out)
    with open(out / "merged.csv") as f:
        rows = list(csv.DictReader(f))
    datasets = sorted({r["dataset"] for r in rows})
    checks.append(("clip_benchmark build merges 4 files into rows of 2 datasets", datasets == ["wds/digits",
                   "wds/flags_circle"] and len(rows) == 4, f"{len(rows)} rows, datasets {datasets}"))  # fmt: skip

    # 3. autofaiss over clipcid embed's clip-retrieval layout.
    run([*clipcid, "embed", "--data", str(out / "shards"), "--model", "clipcid-tiny", "--pretrained",
         str(out / "run" / "student.pt"), "--out", str(out / "emb"), "--workers", "0"], cwd=REPO)  # fmt: skip
    (out / "index").mkdir()
    result = run([args.interop_python, "-c", AUTOFAISS_CHECK, str(out / "emb"), str(out / "index")], cwd=out)
    line = next(x for x in result.stdout.splitlines() if x.startswith("ROWS"))
    found = float(line.split()[-1])
    checks.append(("autofaiss index over 12 padded parts: every row finds itself", found == 1.0, line))

    width = max(len(name) for name, _, _ in checks)
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name:<{width}}  {detail}")
    if not all(ok for _, ok, _ in checks):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
