"""`clipcid data build-web`: near-copies drawn from a Zipf law, recorded in the metadata, held out together."""

from __future__ import annotations

import io
from collections import defaultdict

import numpy as np
import pytest
from conftest import make_shards
from PIL import Image

from clipcid.corpus.web import GROUP_FIELD, BuildWebConfig, build_web_corpus, copies_law, near_copy
from clipcid.errors import ClipcidError
from clipcid.holdout import HoldOut, HoldoutConfig, hold_out
from clipcid.inputs.parts import discover_parts, iter_rows


def test_the_zipf_exponent_gives_the_asked_share_of_copies():
    a, law = copies_law(0.437, 50)
    n = np.arange(51)
    expected = float(law @ n)
    assert expected / (1 + expected) == pytest.approx(0.437, abs=1e-9)
    assert 2 < a < 3 and law[0] > law[1] > law[50] > 0  # most pictures have none, a few have many
    assert law == pytest.approx((n + 1.0) ** -a / ((n + 1.0) ** -a).sum())
    with pytest.raises(ClipcidError, match="raise --max-copies"):
        copies_law(0.9, 2)


def test_a_near_copy_is_another_file_of_about_the_same_picture():
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    copy, edit = near_copy(buf.getvalue(), rng)
    im = Image.open(io.BytesIO(copy))
    assert im.format == "JPEG" and 8 <= im.width <= 72 and "jpeg q" in edit and "scale" in edit
    centre = np.asarray(im.convert("RGB"))[im.height // 2, im.width // 2].astype(int)
    assert np.abs(centre - [200, 30, 30]).max() < 40  # still the red picture


def test_the_web_builder_records_its_copies_and_the_hold_out_keeps_each_picture_with_them(tmp_path):
    make_shards(tmp_path / "src", n_shards=2, per_shard=60, seed=1)
    hold_out(HoldoutConfig(str(tmp_path / "src"), str(tmp_path / "src_ho"), fraction=0.1, min_pairs=1))
    source_held = HoldOut.open(tmp_path / "src_ho")
    cfg = BuildWebConfig(str(tmp_path / "src"), str(tmp_path / "web"), copy_share=0.4, max_copies=8, limit=80,
                         exclude_holdout=str(tmp_path / "src_ho"), shard_size=50, workers=0)  # fmt: skip
    stats = build_web_corpus(cfg)
    rows = [row for part in discover_parts(str(tmp_path / "web")) for row in iter_rows(part)]
    assert len(rows) == stats["rows"] == stats["originals"] + stats["copies"] and stats["originals"] == 80
    originals = {r.meta[GROUP_FIELD]: r for r in rows if "copy_of" not in r.meta}
    copies = [r for r in rows if "copy_of" in r.meta]
    assert len(originals) == 80 and len(copies) == stats["copies"] > 0
    for c in copies:  # each copy names its original, and is another file with another caption of it
        original = originals[c.meta["copy_of"]]
        assert c.meta[GROUP_FIELD] == c.meta["copy_of"] and c.image != original.image and c.image[:2] == b"\xff\xd8"
        assert c.meta["shape"] == original.meta["shape"] and c.meta["edit"]
    assert sum(c.caption != originals[c.meta["copy_of"]].caption for c in copies) > len(copies) / 2
    # Nothing held out of the source was copied in: a suite made from that hold-out stays unseen.
    source_keys = [row.key for i, p in enumerate(discover_parts(str(tmp_path / "src"))) for row in iter_rows(p)
                   if source_held.mask(i)[int(row.key[-4:])]]  # fmt: skip
    assert source_keys and not set(source_keys) & set(originals)
    # Grouped by copy_group, a picture and all its copies fall on one side of the hold-out and of its split.
    hold_out(HoldoutConfig(str(tmp_path / "web"), str(tmp_path / "ho"), fraction=0.3, min_pairs=1,
                           group_by=GROUP_FIELD))  # fmt: skip
    ho = HoldOut.open(tmp_path / "ho")
    masks = ho.masks([len(list(iter_rows(p))) for p in discover_parts(str(tmp_path / "web"))])
    sides = defaultdict(set)
    for row, held in zip(rows, masks, strict=True):
        sides[row.meta[GROUP_FIELD]].add(bool(held))
    assert all(len(s) == 1 for s in sides.values())
    held_groups = [g for g, s in sides.items() if s == {True}]
    assert held_groups and any(sum(r.meta[GROUP_FIELD] == g for r in rows) > 1 for g in held_groups)
    held_rows = [r for r, held in zip(rows, masks, strict=True) if held]
    split = dict(zip([id(r) for r in held_rows], ho.split_of([(r.meta, r.image) for r in held_rows]), strict=True))
    by_group = defaultdict(set)
    for r in held_rows:
        by_group[r.meta[GROUP_FIELD]].add(split[id(r)])
    assert all(len(s) == 1 for s in by_group.values()) and {"validation", "test"} <= set(split.values())
    # Built again: finished, nothing redone.
    assert build_web_corpus(cfg)["rows"] == stats["rows"]


def test_copy_detection_counts_a_removal_right_while_its_picture_keeps_a_row():
    from clipcid.corpus.web import copy_detection

    groups = ["a", "a", "a", "b", "c", "c"]  # a: two copies, b: none, c: one
    found = copy_detection(groups, np.array([1, 1, 0, 1, 0, 0], dtype=bool))
    assert found == {"removed": 3, "copies": 3, "right": 2, "precision": 2 / 3, "recall": 2 / 3, "pictures_lost": 1,
                     "removed_without_copies": 1}  # fmt: skip
    every_a = copy_detection(groups, np.array([1, 1, 1, 0, 0, 1], dtype=bool))
    assert every_a["right"] == 3 and every_a["precision"] == 3 / 4 and every_a["pictures_lost"] == 1
    assert copy_detection(groups, np.zeros(6, dtype=bool))["precision"] is None
    with pytest.raises(ClipcidError, match="covers 2 rows, the corpus has 6"):
        copy_detection(groups, np.zeros(2, dtype=bool))


def test_web_check_measures_balance_and_random_removal_at_three_thresholds(tmp_path, tiny_checkpoint):
    from clipcid.corpus.web import WebCheckConfig, check_web_balance
    from clipcid.embed import EmbedConfig, embed

    make_shards(tmp_path / "src", n_shards=1, per_shard=60, seed=2)
    stats = build_web_corpus(BuildWebConfig(str(tmp_path / "src"), str(tmp_path / "web"), copy_share=0.4, workers=0))
    embed(EmbedConfig(str(tmp_path / "web"), "clipcid-tiny", str(tmp_path / "emb"), str(tiny_checkpoint), workers=0))
    result = check_web_balance(WebCheckConfig(str(tmp_path / "web"), str(tmp_path / "emb"), str(tmp_path / "check")))
    assert [r["threshold"] for r in result["rows"]] == ["copy share", "0.07 l2", "0.07 sql2"]
    first = result["rows"][0]
    # The copy-share threshold removes about the copies' share; random removal takes exactly as many rows.
    assert first["random"]["removed"] == first["balance"]["removed"] == pytest.approx(stats["copies"], rel=0.35)
    assert first["balance"]["copies"] == stats["copies"] and 0 <= first["balance"]["precision"] <= 1
    assert result["rows"][1]["cos_above"] == pytest.approx(1 - 0.07**2 / 2)
    assert result["rows"][2]["cos_above"] == pytest.approx(0.965)
    assert "| copy share |" in (tmp_path / "check" / "web_check.md").read_text()


def test_rows_a_balance_left_out_of_balancing_are_not_copied(tmp_path):
    """With the demo's balance: its held-out pictures' near-duplicates (group -1) stay out, as they stay
    out of the demo's own training data."""
    from clipcid.balance.artifact import groups_path
    from clipcid.util.fileio import save_npy_atomic

    keys = make_shards(tmp_path / "src", n_shards=1, per_shard=30, seed=3)[0]
    groups = np.arange(30)
    groups[[2, 5, 7]] = -1
    groups_path(tmp_path / "bal", 0).parent.mkdir(parents=True)
    save_npy_atomic(groups_path(tmp_path / "bal", 0), groups)
    cfg = BuildWebConfig(str(tmp_path / "src"), str(tmp_path / "web"), exclude_unbalanced=str(tmp_path / "bal"),
                         workers=0)  # fmt: skip
    build_web_corpus(cfg)
    rows = [row for part in discover_parts(str(tmp_path / "web")) for row in iter_rows(part)]
    originals = {r.meta[GROUP_FIELD] for r in rows}
    assert originals == set(keys) - {keys[2], keys[5], keys[7]}
