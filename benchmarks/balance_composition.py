"""What Image Semantic Balance removes from the demo corpus, against removing as many pairs at random.

Not a timing: the composition of the training set that each removal leaves, by kind (emoji, icon,
flag), in distinct names, and in the held-out name-level tasks' classes that a kept training caption
still names. Reads a finished demo folder (its corpus metadata, embeddings and balance; the random
removal is drawn with --seed). The anchor is the random removal. --also adds another keep mask, e.g. a
study teacher's own balance (Table 7), with the embeddings it was made from.

    python benchmarks/balance_composition.py --demo demo
    python benchmarks/balance_composition.py --demo demo --also demo/study/data/balance-… demo/study/data/teacher-…/emb
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from clipcid.balance.artifact import BalanceResult
from clipcid.embed.artifact import Embeddings
from clipcid.util.tables import format_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", required=True, help="a finished `clipcid demo` folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--also", nargs=2, action="append", default=[], metavar=("BALANCE", "EMB"),
                   help="another balance folder and the embeddings folder it balanced")  # fmt: skip
    args = p.parse_args()
    demo = Path(args.demo)
    shards = sorted((demo / "corpus").glob("*.parquet"))
    columns = {"kind": [], "name": []}
    for shard in shards:
        table = pq.read_table(shard, columns=list(columns)).to_pydict()
        for c in columns:
            columns[c] += table[c]
    kind, name = (np.array(columns[c], dtype=object) for c in ("kind", "name"))
    balance = BalanceResult.open(demo / "balance", Embeddings.open(demo / "teacher_emb"))
    by_balance = balance.keep_mask()
    if len(by_balance) != len(kind):
        raise SystemExit(f"error: {demo}: {len(by_balance)} balance rows but {len(kind)} corpus rows")
    rng = np.random.default_rng(args.seed)
    by_random = np.ones_like(by_balance)
    by_random[rng.choice(len(kind), int((~by_balance).sum()), replace=False)] = False
    removals = {"random removal (anchor)": by_random, "Image Semantic Balance": by_balance}
    for balance_dir, emb_dir in args.also:
        keep = BalanceResult.open(balance_dir, Embeddings.open(emb_dir)).keep_mask()
        if len(keep) != len(kind):
            raise SystemExit(f"error: {balance_dir}: {len(keep)} balance rows but {len(kind)} corpus rows")
        removals[f"{Path(balance_dir).name} ({(~keep).sum():,} removed)"] = keep

    tasks = ("names_emoji_fluent3d", "names_emoji_fluenthc", "names_icons_lucide")
    classes = {t: (demo / "eval" / t / "classnames.txt").read_text(encoding="utf-8").splitlines() for t in tasks}
    rows = []
    for label, keep in removals.items():
        row = [label, f"{keep.sum():,}"]
        for k in ("emoji", "icon", "flag"):
            sel = kind == k
            row.append(f"{(keep & sel).sum():,} ({(keep & sel).sum() / sel.sum():.1%})")
        row.append(f"{(keep & by_balance).sum() / (keep | by_balance).sum():.2f}")
        seen = set(name[keep])
        row.append(f"{len(seen):,}")
        row += [f"{np.mean([c in seen for c in classes[t]]):.1%}" for t in tasks]
        rows.append(row)
    header = ["removal", "kept", "emoji kept", "icons kept", "flags kept", "Jaccard with balance", "distinct names"]
    header += [f"{tasks[0]} classes named", *tasks[1:]]
    print(f"{demo}: {len(kind):,} pairs, {(~by_balance).sum():,} removed by balance and as many at random\n")
    print(format_table(header, rows))


if __name__ == "__main__":
    main()
