from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_two_gloo_processes

import clipcid.balance.run as balance_module
from clipcid.balance.run import BalanceConfig, balance, from_similarity, summary_text, to_similarity
from clipcid.errors import ClipcidError


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_embeddings(root: Path, vectors: np.ndarray, parts: int = 3, valid: np.ndarray | None = None) -> Path:
    """A clip-retrieval layout folder holding `vectors` (float16) split into `parts` parts."""
    valid = np.ones(len(vectors), bool) if valid is None else valid
    for kind in ("img_emb", "metadata"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(np.array_split(np.arange(len(vectors)), parts)):
        np.save(root / "img_emb" / f"img_emb_{i}.npy", vectors[idx].astype(np.float16))
        table = pa.table({"key": [f"{i:05d}{r:04d}" for r in range(len(idx))], "valid": valid[idx]})
        pq.write_table(table, root / "metadata" / f"metadata_{i}.parquet")
    return root


def planted(seed: int = 0, n_random: int = 400, dim: int = 64):
    """Random unit vectors plus groups of near-duplicates (pairwise l2 < 0.04) around random bases."""
    rng = np.random.default_rng(seed)
    vectors = [unit(rng.normal(size=(n_random, dim)))]
    groups = []
    start = n_random
    for size in [2, 3, 4, 5, 6] * 4:
        base = unit(rng.normal(size=dim))
        noise = rng.normal(size=(size, dim))
        noise = 0.02 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
        vectors.append(unit(base + noise))
        groups.append(list(range(start, start + size)))
        start += size
    x = np.concatenate(vectors)
    order = rng.permutation(len(x))  # spread each group over parts and blocks
    inverse = np.argsort(order)
    return x[order], [sorted(inverse[g].tolist()) for g in groups]


def read_outputs(out: Path, parts: int = 3) -> tuple[np.ndarray, np.ndarray]:
    groups = np.concatenate([np.load(out / "groups" / f"groups_{i}.npy") for i in range(parts)])
    keep = np.concatenate([np.load(out / "keep" / f"keep_{i}.npy") for i in range(parts)])
    return groups, keep


def as_partition(groups: np.ndarray) -> set[frozenset[int]]:
    out: dict[int, set[int]] = {}
    for i, g in enumerate(groups):
        if g >= 0:
            out.setdefault(int(g), set()).add(i)
    return {frozenset(v) for v in out.values()}


def test_threshold_conversions_are_exact():
    assert to_similarity(0.07, "l2") == pytest.approx(1 - 0.0049 / 2, abs=1e-15)
    assert to_similarity(0.0049, "sql2") == pytest.approx(to_similarity(0.07, "l2"), abs=1e-15)
    assert to_similarity(0.00245, "cosine") == pytest.approx(to_similarity(0.07, "l2"), abs=1e-15)
    for metric in ("l2", "sql2", "cosine"):
        for t in (0.01, 0.07, 0.3):
            assert from_similarity(to_similarity(t, metric), metric) == pytest.approx(t, rel=1e-12)
    # The definition on real vectors: |a - b| < t exactly when a.b > 1 - t^2/2.
    a, b = unit(np.array([1.0, 0.0])), unit(np.array([1.0, 0.05]))
    assert (np.linalg.norm(a - b) < 0.06) == (a @ b > to_similarity(0.06, "l2"))


def test_planted_groups_are_recovered_exactly(tmp_path):
    x, groups = planted()
    emb = write_embeddings(tmp_path / "emb", x)
    stats = balance(BalanceConfig(emb=str(emb), out=str(tmp_path / "bal"), threshold=0.07))
    labels, keep = read_outputs(tmp_path / "bal")
    merged = {g for g in as_partition(labels) if len(g) > 1}
    assert merged == {frozenset(g) for g in groups}
    assert stats["removed"] == sum(len(g) - 1 for g in groups) == len(x) - keep.sum()
    assert stats["merged_groups"] == 20 and stats["largest_group"] == 6
    assert all(keep[g].sum() == 1 for g in groups)
    assert stats["group_size_histogram"] == {"1": 400, "2": 4, "3-4": 8, "5-8": 8}
    assert (tmp_path / "bal" / "group_sizes.png").is_file() and (tmp_path / "bal" / "removal_curve.png").is_file()
    assert "removed 60 (12.50%)" in summary_text(stats)


def test_chain_forms_one_group(tmp_path):
    # a-b and b-c are 0.06 apart, a-c 0.12: under 0.07, union-find joins all three.
    angles = np.array([0.0, 0.06, 0.12])
    chain = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    x = np.zeros((3, 16))
    x[:, :2] = chain
    far = unit(np.random.default_rng(1).normal(size=(5, 16)))
    emb = write_embeddings(tmp_path / "emb", np.concatenate([x, far]), parts=1)
    stats = balance(BalanceConfig(emb=str(emb), out=str(tmp_path / "bal"), threshold=0.07))
    labels, keep = read_outputs(tmp_path / "bal", parts=1)
    assert labels[0] == labels[1] == labels[2] and len(set(labels[3:])) == 5
    assert keep[:3].tolist() == [False, True, False]  # b is nearest the mean of a, b, c
    assert stats["largest_group"] == 3


def test_kept_member_is_nearest_the_mean(tmp_path):
    rng = np.random.default_rng(3)
    base = unit(rng.normal(size=32))
    offsets = rng.normal(size=(6, 32))
    members = unit(base + 0.008 * offsets / np.linalg.norm(offsets, axis=1, keepdims=True))
    emb = write_embeddings(tmp_path / "emb", members, parts=2)
    balance(BalanceConfig(emb=str(emb), out=str(tmp_path / "bal"), threshold=0.07))
    labels, keep = read_outputs(tmp_path / "bal", parts=2)
    assert len(set(labels)) == 1
    stored = unit(members.astype(np.float16).astype(np.float32))
    mean = stored.mean(axis=0)
    assert np.flatnonzero(keep).tolist() == [int(np.argmin(np.linalg.norm(stored - mean, axis=1)))]


def test_invalid_rows_are_never_kept_or_grouped(tmp_path):
    x, groups = planted(n_random=50)
    valid = np.ones(len(x), bool)
    invalid = [groups[-1][0], groups[-1][1], 7]
    valid[invalid] = False
    emb = write_embeddings(tmp_path / "emb", x, valid=valid)
    stats = balance(BalanceConfig(emb=str(emb), out=str(tmp_path / "bal"), threshold=0.07))
    labels, keep = read_outputs(tmp_path / "bal")
    assert (labels[invalid] == -1).all() and not keep[invalid].any()
    assert stats["invalid"] == 3 and stats["valid"] == len(x) - 3
    assert {frozenset(set(groups[-1]) - set(invalid))} <= as_partition(labels)


def test_same_result_for_any_block_size_and_metric(tmp_path):
    x, _ = planted(n_random=600)
    emb = write_embeddings(tmp_path / "emb", x)
    balance(BalanceConfig(emb=str(emb), out=str(tmp_path / "one_block"), threshold=0.07))
    # 1e-4 GB forces 256-row blocks read straight from the memmapped parts.
    stats = balance(
        BalanceConfig(emb=str(emb), out=str(tmp_path / "blocks"), threshold=0.0049, metric="sql2", memory_gb=1e-4)
    )
    assert stats["block_size"] == 256
    for a, b in zip(read_outputs(tmp_path / "one_block"), read_outputs(tmp_path / "blocks"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_skips_finished_blocks(tmp_path, monkeypatch):
    x, _ = planted(n_random=600)
    emb = write_embeddings(tmp_path / "emb", x)
    out = tmp_path / "bal"
    real = balance_module.exact_block_edges
    calls = []

    def crash_on_third_block(data, blocks, i, sim_min, device):
        calls.append(i)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(data, blocks, i, sim_min, device)

    monkeypatch.setattr(balance_module, "exact_block_edges", crash_on_third_block)
    with pytest.raises(RuntimeError):
        balance(BalanceConfig(emb=str(emb), out=str(out), memory_gb=1e-4))
    assert sorted(p.name for p in (out / "edges").glob("block_*.npz")) == [
        "block_000000.npz",
        "block_000001.npz",
    ]
    calls.clear()
    balance(BalanceConfig(emb=str(emb), out=str(out), memory_gb=1e-4))
    assert calls == [2]  # only the unfinished block ran
    monkeypatch.setattr(balance_module, "exact_block_edges", real)
    balance(BalanceConfig(emb=str(emb), out=str(tmp_path / "clean"), memory_gb=1e-4))
    for a, b in zip(read_outputs(out), read_outputs(tmp_path / "clean"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_ivf_matches_exact_and_reports_recall(tmp_path):
    x, groups = planted(n_random=2000)
    emb = write_embeddings(tmp_path / "emb", x)
    stats = balance(BalanceConfig(emb=str(emb), out=str(tmp_path / "ivf"), search="ivf", nprobe=8, recall_sample=500))
    assert stats["ivf"]["pair_recall"] == 1.0 and stats["ivf"]["sample_queries"] == 500
    merged = {g for g in as_partition(read_outputs(tmp_path / "ivf")[0]) if len(g) > 1}
    assert merged == {frozenset(g) for g in groups}


def test_target_removal_picks_the_threshold(tmp_path):
    rng = np.random.default_rng(5)
    centres = unit(rng.normal(size=(40, 16)))
    x = unit(centres[rng.integers(40, size=800)] + 0.05 * rng.normal(size=(800, 16)))
    emb = write_embeddings(tmp_path / "emb", x)
    stats = balance(BalanceConfig(emb=str(emb), out=str(tmp_path / "bal"), target_removal=0.4, metric="cosine"))
    assert stats["removed_fraction"] >= 0.4
    below = balance(
        BalanceConfig(emb=str(emb), out=str(tmp_path / "below"), metric="cosine", threshold=stats["threshold"] * 0.99)
    )
    assert below["removed_fraction"] < 0.4
    assert stats["threshold_all_metrics"]["cosine"] == pytest.approx(stats["threshold"])


def test_bad_inputs(tmp_path):
    with pytest.raises(ClipcidError, match="not an embeddings folder"):
        balance(BalanceConfig(emb=str(tmp_path), out=str(tmp_path / "bal")))
    emb = write_embeddings(tmp_path / "emb", unit(np.ones((4, 8))), parts=2)
    np.save(emb / "img_emb" / "img_emb_1.npy", np.ones((2, 9), np.float16))
    with pytest.raises(ClipcidError, match="different dimensions"):
        balance(BalanceConfig(emb=str(emb), out=str(tmp_path / "bal")))
    with pytest.raises(ClipcidError, match="--metric"):
        balance(BalanceConfig(emb=str(emb), out=str(tmp_path / "bal"), metric="manhattan"))


@pytest.mark.parametrize("search", ["exact", "ivf"])
def test_two_gloo_processes_equal_one(tmp_path, search):
    x, _ = planted(n_random=600)
    emb = write_embeddings(tmp_path / "emb", x)
    balance(BalanceConfig(emb=str(emb), out=str(tmp_path / "single"), memory_gb=1e-4, search=search))
    run_two_gloo_processes(
        [
            "-m",
            "clipcid",
            "balance",
            "--emb",
            str(emb),
            "--out",
            str(tmp_path / "double"),
            "--memory-gb",
            "1e-4",
            "--device",
            "cpu",
            "--search",
            search,
        ]
    )
    for a, b in zip(read_outputs(tmp_path / "single"), read_outputs(tmp_path / "double"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_held_out_rows_and_their_near_duplicates_are_left_out_of_the_balanced_graph(tmp_path):
    """Held-out pictures take part in the search only: they and every row within the threshold of one are
    dropped, and the rest is balanced exactly as if those rows had never been there."""
    from conftest import make_shards

    from clipcid.holdout import HoldoutConfig, hold_out

    x, groups = planted()  # 480 rows
    make_shards(tmp_path / "shards", n_shards=3, per_shard=160, seed=5)
    hold_out(HoldoutConfig(str(tmp_path / "shards"), str(tmp_path / "ho"), fraction=0.3, min_pairs=1))
    held = np.concatenate([np.load(tmp_path / "ho" / "mask" / f"holdout_{i}.npy") for i in range(3)])
    emb = write_embeddings(tmp_path / "emb", x)
    stats = balance(BalanceConfig(emb=str(emb), out=str(tmp_path / "bal"), holdout=str(tmp_path / "ho")))
    labels, keep = read_outputs(tmp_path / "bal")
    near = np.zeros(len(x), bool)
    for g in groups:
        if held[g].any():
            near[g] = ~held[g]
    assert held.any() and near.any()
    assert (labels[held | near] == -1).all() and not keep[held | near].any()
    assert stats["held_out"] == held.sum() and stats["near_held_out"] == near.sum()
    assert stats["balanced"] == len(x) - held.sum() - near.sum()
    # The same partition and the same kept rows as balancing only the remaining rows.
    rest = np.flatnonzero(~(held | near))
    alone = write_embeddings(tmp_path / "alone", x[rest], parts=1)
    balance(BalanceConfig(emb=str(alone), out=str(tmp_path / "bal_alone")))
    labels_alone, keep_alone = read_outputs(tmp_path / "bal_alone", parts=1)
    assert as_partition(labels[rest]) == as_partition(labels_alone)
    np.testing.assert_array_equal(keep[rest], keep_alone)


def test_random_removal_prints_its_summary(tmp_path, capsys):
    from clipcid.cli import main

    x, _ = planted(n_random=100)
    emb = write_embeddings(tmp_path / "emb", x)
    assert main(["balance", "--emb", str(emb), "--out", str(tmp_path / "bal"), "--random-removal", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "random removal (a control, seed 0): kept 135  removed 45 (25.00%)" in out


def test_the_spanning_forest_has_the_components_of_all_edges_at_every_threshold():
    from clipcid.balance.run import Forest, components

    rng = np.random.default_rng(7)
    n, m = 300, 2000
    a, b = rng.integers(n, size=m), rng.integers(n, size=m)
    a, b = a[a != b], b[a != b]
    s = rng.uniform(0.5, 1.0, size=len(a)).astype(np.float32)
    s[::7] = s[1::7][: len(s[::7])]  # ties too
    halves = Forest.of(a[: len(a) // 2], b[: len(a) // 2], s[: len(a) // 2]).merge(
        Forest.of(a[len(a) // 2 :], b[len(a) // 2 :], s[len(a) // 2 :])
    )
    whole = Forest.of(np.concatenate([a, a]), np.concatenate([b, b]), np.concatenate([s, s]))  # pairs twice
    for forest in (whole, halves):
        assert len(forest.a) <= n - 1 and (forest.a < forest.b).all()
        for t in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99):
            all_edges = components(n, a[s > t], b[s > t])
            sel = forest.s > t
            assert as_partition(components(n, forest.a[sel], forest.b[sel])) == as_partition(all_edges)
            assert forest.removed_fraction(n, t) == pytest.approx(1 - (all_edges.max() + 1) / n)


def test_the_held_out_guard_has_its_own_radius_and_holds_for_random_removal_and_no_balance(tmp_path, caplog):
    """--held-out-threshold keeps the same training rows from the held-out pictures whatever the balance:
    a weaker balance, --random-removal, and --random-removal 0 (no balance at all) under one guard."""
    from conftest import make_shards

    from clipcid.holdout import HoldoutConfig, hold_out

    x, groups = planted()
    make_shards(tmp_path / "shards", n_shards=3, per_shard=160, seed=5)
    hold_out(HoldoutConfig(str(tmp_path / "shards"), str(tmp_path / "ho"), fraction=0.3, min_pairs=1))
    held = np.concatenate([np.load(tmp_path / "ho" / "mask" / f"holdout_{i}.npy") for i in range(3)])
    emb = str(write_embeddings(tmp_path / "emb", x))
    near = np.zeros(len(x), bool)
    for g in groups:
        if held[g].any():
            near[g] = ~held[g]
    assert near.any()

    def run(name: str, **settings) -> tuple[dict, np.ndarray, np.ndarray]:
        stats = balance(BalanceConfig(emb=emb, out=str(tmp_path / name), holdout=str(tmp_path / "ho"), **settings))
        return (stats, *read_outputs(tmp_path / name))

    plain, _, _ = run("plain")
    assert plain["near_held_out"] == near.sum() and plain["held_out_threshold"] == 0.07
    assert "held_out_threshold" not in json.loads((tmp_path / "plain" / "stats.json").read_text())["settings"]
    # A balance too weak to merge the planted groups still keeps their rows from the held-out pictures.
    weak, _, keep = run("weak", threshold=0.001, held_out_threshold=0.07)
    assert weak["near_held_out"] == near.sum() and weak["removed"] == 0
    np.testing.assert_array_equal(keep, ~(held | near))
    # No balance (random removal of nothing) under the same guard; and without the guard, as before.
    guarded, labels, keep = run("none", random_removal=0.0, held_out_threshold=0.07)
    assert guarded["near_held_out"] == near.sum() and guarded["held_out_threshold"] == 0.07
    np.testing.assert_array_equal(keep, ~(held | near))
    assert (labels[held | near] == -1).all()
    assert "include that leak" not in caplog.text
    bare, _, keep = run("bare", random_removal=0.0)
    assert bare["near_held_out"] == 0 and bare["held_out_threshold"] is None
    assert "--random-removal without --held-out-threshold" in caplog.text  # said, not silent
    np.testing.assert_array_equal(keep, ~held)
    # A radius below every planted distance drops nothing near; the groups are balanced as usual.
    tight, _, keep = run("tight", held_out_threshold=1e-4)
    assert tight["near_held_out"] == 0 and tight["removed"] > plain["removed"]
