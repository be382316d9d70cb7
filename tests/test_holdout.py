"""The hold-out: chosen by the image bytes alone, written as masks per part and a retrieval gallery."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_img2dataset_shards

from clipcid.errors import ClipcidError
from clipcid.evaluation.datasets import build_dataset
from clipcid.holdout import (
    HoldOut,
    HoldoutConfig,
    below,
    cut_of,
    held_out,
    hold_out,
    image_hash,
    split_held_out,
    stratum_cuts,
)
from clipcid.inputs.parts import discover_parts, iter_rows
from clipcid.inputs.shards import iter_tar_samples, write_tar_atomic


def _held_pictures(folder, data) -> set[bytes]:
    h = HoldOut.open(folder)
    out = set()
    for i, part in enumerate(discover_parts(str(data))):
        mask = h.mask(i)
        out |= {row.image for r, row in enumerate(iter_rows(part)) if mask[r]}
    return out


def test_the_choice_follows_the_pictures_not_the_shards_or_keys(tmp_path):
    make_img2dataset_shards(tmp_path / "a", n_shards=3, per_shard=40, seed=1)
    hold_out(HoldoutConfig(str(tmp_path / "a"), str(tmp_path / "ho_a"), fraction=0.2, min_pairs=1))
    # The same pairs with new keys, in other shards, and a shard of new pairs added in front.
    make_img2dataset_shards(tmp_path / "new", n_shards=1, per_shard=40, seed=9)
    (tmp_path / "b").mkdir()
    write_tar_atomic(tmp_path / "b" / "00000.tar", list(iter_tar_samples(tmp_path / "new" / "00000.tar")))
    old = [s for p in sorted((tmp_path / "a").glob("*.tar")) for s in iter_tar_samples(p)]
    for n, chunk in enumerate((old[:70], old[70:])):
        renamed = [{**{k: v for k, v in s.items() if not k.startswith("__")}, "__key__": f"x{n}{j:05d}"}
                   for j, s in enumerate(chunk)]  # fmt: skip
        write_tar_atomic(tmp_path / "b" / f"0000{n + 1}.tar", renamed)
    hold_out(HoldoutConfig(str(tmp_path / "b"), str(tmp_path / "ho_b"), fraction=0.2, min_pairs=1))
    held_a, held_b = (
        _held_pictures(tmp_path / "ho_a", tmp_path / "a"),
        _held_pictures(tmp_path / "ho_b", tmp_path / "b"),
    )
    old_pictures = {s["jpg"] for s in old}
    assert held_a and held_b & old_pictures == held_a
    assert all(held_out(image_hash(p), 0.2) for p in held_b)


def test_the_gallery_is_a_retrieval_dataset_of_the_smallest_hashes(tmp_path):
    make_img2dataset_shards(tmp_path / "shards", n_shards=3, per_shard=40, seed=3)
    stats = hold_out(HoldoutConfig(str(tmp_path / "shards"), str(tmp_path / "ho"), fraction=0.3, min_pairs=5,
                                   eval_pairs=12))  # fmt: skip
    h = HoldOut.open(tmp_path / "ho")
    assert stats["gallery_pairs"] == 12 and stats["usable"] == stats["held_out"] > 12
    pairs = h.pairs().to_pylist()
    dataset = build_dataset(f"wds:{h.gallery}")
    shown = list(dataset.iter_split("test"))
    assert dataset.kind == "retrieval" and len(shown) == 12 and len(dataset.sources("test")) == 4
    assert [c[0] for _, c in shown] == [p["caption"] for p in pairs]
    hashes = [image_hash(image) for image, _ in shown]
    assert hashes == sorted(hashes)  # in hash order
    every = sorted(int(v) for i in range(3) for v in np.load(tmp_path / "ho" / "index" / f"holdout_{i}.npz")["hash"])
    assert hashes == every[:12]  # the smallest
    for p, (image, _) in zip(pairs, shown, strict=True):  # (part, row) points at the same picture
        row = list(iter_rows(discover_parts(str(tmp_path / "shards"))[p["part"]]))[p["row"]]
        assert row.image == image and row.key == p["key"]
    assert not (tmp_path / "ho" / "staging").exists()


def test_a_hold_out_too_small_says_which_fraction_would_do_and_another_is_then_accepted(tmp_path):
    make_img2dataset_shards(tmp_path / "shards", n_shards=2, per_shard=50, seed=4)
    with pytest.raises(ClipcidError, match=r"fewer than the 30 needed to measure retrieval; use --holdout (\S+)") as e:
        hold_out(HoldoutConfig(str(tmp_path / "shards"), str(tmp_path / "ho"), fraction=0.05, min_pairs=30))
    suggested = float(str(e.value).split("use --holdout ")[1].split()[0])
    stats = hold_out(HoldoutConfig(str(tmp_path / "shards"), str(tmp_path / "ho"), fraction=suggested, min_pairs=30))
    assert stats["usable"] >= 30 * 0.8  # the suggestion is an estimate from the first count
    record = json.loads((tmp_path / "ho" / "holdout.json").read_text())
    assert record["complete"] and record["settings"]["fraction"] == suggested


def test_small_data_are_fitted_up_to_a_cap_instead_of_refused(tmp_path):
    """`clipcid run`'s default: 1 % that holds out too few pairs rises to what gives --min-pairs, up to its
    cap; the summary says what was used and why. Beyond the cap it is refused, saying why."""
    make_img2dataset_shards(tmp_path / "shards", n_shards=2, per_shard=100, seed=4)
    cfg = HoldoutConfig(str(tmp_path / "shards"), str(tmp_path / "ho"), fraction=0.01, min_pairs=30, fit_up_to=0.3)
    stats = hold_out(cfg)
    assert stats["usable"] >= 30 and 0.01 < stats["fraction"] <= 0.3 and "0.01 held out" in stats["fitted"]
    h = HoldOut.open(tmp_path / "ho")
    assert h.masks([100, 100]).sum() == stats["held_out"] and h.record["settings"]["fit_up_to"] == 0.3
    assert len(h.pairs()) == stats["gallery_pairs"] == stats["usable"]  # the gallery of the fraction used
    with pytest.raises(ClipcidError, match="even --holdout 0.05 holds out only .* the data are too small"):
        hold_out(HoldoutConfig(str(tmp_path / "shards"), str(tmp_path / "ho2"), 0.01, min_pairs=80, fit_up_to=0.05))


def test_rows_without_a_caption_are_held_out_but_not_in_the_gallery(tmp_path):
    make_img2dataset_shards(tmp_path / "shards", n_shards=1, per_shard=60, seed=6, captions=False)
    stats = hold_out(HoldoutConfig(str(tmp_path / "shards"), str(tmp_path / "ho"), fraction=0.3, min_pairs=0))
    assert stats["held_out"] > 0 and stats["usable"] == 0 and stats["gallery_pairs"] == 0


def _with_sources(src, dst, rare: int) -> None:
    """The shards again, each sample's JSON given a "source": the first `rare` samples "rare", the rest "common"."""
    dst.mkdir()
    n = 0
    for tar in sorted(src.glob("*.tar")):
        samples = []
        for s in iter_tar_samples(tar):
            meta = json.loads(s["json"])
            meta["source"] = "rare" if n < rare else "common"
            n += 1
            samples.append({**{k: v for k, v in s.items() if not k.startswith("__")}, "__key__": s["__key__"],
                            "json": json.dumps(meta)})  # fmt: skip
        write_tar_atomic(dst / tar.name, samples)


def test_a_stratified_hold_out_gives_each_stratum_its_floor_and_the_rest_by_the_cut(tmp_path):
    make_img2dataset_shards(tmp_path / "plain", n_shards=2, per_shard=60, seed=5)
    _with_sources(tmp_path / "plain", tmp_path / "shards", rare=8)
    cfg = HoldoutConfig(str(tmp_path / "shards"), str(tmp_path / "ho"), fraction=0.1, min_pairs=1,
                        stratify_by="source", min_per_stratum=5)  # fmt: skip
    stats = hold_out(cfg)
    h = HoldOut.open(tmp_path / "ho")
    by_source: dict[str, list[tuple[int, bool]]] = {"rare": [], "common": []}
    for i, part in enumerate(discover_parts(str(tmp_path / "shards"))):
        mask = h.mask(i)
        for r, row in enumerate(iter_rows(part)):
            by_source[row.meta["source"]].append((image_hash(row.image), bool(mask[r])))
    rare = sorted(by_source["rare"])
    assert [out for _, out in rare] == [True] * 5 + [False] * 3  # the floor: its 5 smallest hashes
    assert all(out == held_out(v, 0.1) for v, out in by_source["common"])  # the cut alone
    assert sum(out for _, out in by_source["common"]) >= 5  # (so no floor there)
    strata = h.strata()
    assert strata["field"] == "source" and strata["strata"]["rare"]["held_out"] == 5
    assert strata["strata"]["common"]["rows"] == 112 and stats["held_out"] == 5 + strata["strata"]["common"]["held_out"]
    assert not (tmp_path / "ho" / "strata").exists()
    # Unstratified settings are the settings of before: a hold-out made then is still finished.
    hold_out(HoldoutConfig(str(tmp_path / "shards"), str(tmp_path / "ho2"), fraction=0.1, min_pairs=1))
    plain = HoldOut.open(tmp_path / "ho2")
    assert "stratify_by" not in plain.record["settings"] and plain.strata() is None
    with pytest.raises(ClipcidError, match="--min-per-stratum needs --stratify-by"):
        hold_out(HoldoutConfig(str(tmp_path / "shards"), str(tmp_path / "ho3"), min_per_stratum=3))


def test_stratum_cuts_stream_the_parts_and_keep_the_floor_across_them():
    """Counts and the smallest hashes per stratum are merged part by part (a stratum split over parts gets
    the floor of its whole), and the cut compares uint64 hashes right up to 2^64 - 1."""
    top = 2**64 - 1
    half = cut_of(0.5)
    parts = [
        {"small": np.array([top, 40], dtype=np.uint64), "big": np.array([1, 2, half + 5], dtype=np.uint64)},
        {"small": np.array([half + 9, 30], dtype=np.uint64)},
        {"big": np.array([3, top], dtype=np.uint64)},
    ]
    cuts = stratum_cuts(iter(parts), fraction=0.5, minimum=3)
    assert cuts == {"small": half + 10, "big": half}  # small: 2 below the cut < 3, so its 3rd smallest + 1
    assert list(below(np.array([half + 9, half + 10, top], dtype=np.uint64), cuts["small"])) == [True, False, False]
    assert below(np.array([top], dtype=np.uint64), 2**64).all() and not below(np.array([0], dtype=np.uint64), 0).any()
    assert stratum_cuts(iter(parts), fraction=0.5, minimum=0) == {"small": half, "big": half}


def test_the_held_out_pairs_split_into_validation_and_test_by_hash_within_each_stratum():
    rng = np.random.default_rng(3)
    strata = ["a"] * 7 + ["b"] * 40 + ["c"] * 1
    hashes = [int(h) for h in rng.integers(0, 2**63, size=len(strata), dtype=np.int64)]
    hashes[5] = hashes[6]  # two byte-identical copies in stratum a
    split = split_held_out(strata, hashes)
    assert set(split) == {"validation", "test"} and len(split) == len(strata)
    assert split[5] == split[6]  # a picture's copies stay on one side
    for stratum in "abc":
        sides = [s for s, st in zip(split, strata, strict=True) if st == stratum]
        distinct = len({h for h, st in zip(hashes, strata, strict=True) if st == stratum})
        # Halved by distinct pictures, validation taking the odd one.
        pictures = {h: s for h, s, st in zip(hashes, split, strata, strict=True) if st == stratum}
        n_val = sum(v == "validation" for v in pictures.values())
        assert n_val == (distinct + 1) // 2 and len(sides) == strata.count(stratum)
    # In each stratum, the smallest hash is validation, and sides alternate along the hashes.
    b = sorted((h, s) for h, s, st in zip(hashes, split, strata, strict=True) if st == "b")
    assert [s for _, s in b] == ["validation", "test"] * 20
    # The same pairs in another order get the same sides: the split follows the pictures.
    order = rng.permutation(len(strata))
    again = split_held_out([strata[i] for i in order], [hashes[i] for i in order])
    assert [again[list(order).index(i)] for i in range(len(strata))] == split
