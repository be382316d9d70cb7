"""`clipcid balance inspect`: a page of the largest merged groups, so a person can judge the threshold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipcid.balance.artifact import BalanceResult, read_stats
from clipcid.config import option, validate
from clipcid.embed.artifact import Embeddings
from clipcid.errors import ClipcidError
from clipcid.inputs.parts import discover_parts, iter_rows
from clipcid.util.fileio import atomic_path
from clipcid.util.templates import Markup, render


def largest_groups(result: BalanceResult, top: int, per_group: int) -> list[list[tuple[int, int, bool]]]:
    """The `top` largest groups, each as up to `per_group` members (part, row, kept), kept one first."""
    n_parts = len(result.sizes)
    groups = [result.groups(i) for i in range(n_parts)]
    labels = np.concatenate(groups)
    keep = result.keep_mask()
    part_of = np.concatenate([np.full(len(g), i) for i, g in enumerate(groups)])
    row_of = np.concatenate([np.arange(len(g)) for g in groups])
    valid = labels >= 0
    sizes = np.bincount(labels[valid])
    chosen = [g for g in np.argsort(-sizes, kind="stable")[:top] if sizes[g] > 1]
    out = []
    for g in chosen:
        members = np.flatnonzero(labels == g)
        members = members[np.argsort(~keep[members], kind="stable")][:per_group]  # the kept one first
        out.append([(int(part_of[m]), int(row_of[m]), bool(keep[m])) for m in members])
    return out


def groups_html(
    balance: str, data: str, emb: str | None = None, top: int = 24, per_group: int = 12
) -> tuple[Markup, int]:
    """HTML sections, one per large merged group, images inline; and the number of groups shown."""
    stats = read_stats(balance)
    embeddings = Embeddings.open(emb or stats["config"]["emb"])
    result = BalanceResult.open(balance, embeddings)
    parts = discover_parts(data)
    if len(parts) != len(result.sizes):
        raise ClipcidError(f"--data has {len(parts)} shards but the balance folder has {len(result.sizes)} parts")
    groups = largest_groups(result, top, per_group)
    wanted: dict[int, set[int]] = {}
    for members in groups:
        for part, row, _ in members:
            wanted.setdefault(part, set()).add(row)
    images: dict[tuple[int, int], dict] = {}
    for part, rows in wanted.items():
        keys = embeddings.keys(part).to_pylist()  # a few parts, for a page
        for row, sample in enumerate(iter_rows(parts[part])):
            if row in rows:
                if sample.key != keys[row]:
                    raise ClipcidError(
                        f"shard {parts[part].name} row {row} has key {sample.key}, but the "
                        f"embeddings say {keys[row]}: --data is not the embedded data"
                    )
                images[(part, row)] = {"key": sample.key, "image": sample.image, "caption": sample.caption or ""}
    shown = [[{**images[(part, row)], "kept": kept} for part, row, kept in members] for members in groups]
    return render("balance_groups.html.j2", groups=shown), len(groups)


@dataclass
class InspectConfig:
    balance: str = option(help="balance output folder")
    data: str = option(help="the shards the embeddings were made from")
    out: str = option(help="HTML file to write")
    emb: str | None = option(None, "embeddings folder (default: the one balance used)")
    top: int = option(24, "how many groups", at_least=1)
    per_group: int = option(12, "images shown per group", at_least=1)


def inspect_balance(cfg: InspectConfig) -> int:
    validate(cfg)
    sections, n = groups_html(cfg.balance, cfg.data, cfg.emb, cfg.top, cfg.per_group)
    text = render("balance_inspect.html.j2", title="clipcid balance", stats=read_stats(cfg.balance), groups=sections)
    with atomic_path(cfg.out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return n
