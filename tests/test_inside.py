"""Inside the students: last-layer weight statistics (Fig. 4) and patch-feature PCA (Fig. 5)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import make_img2dataset_shards

from clipcid.errors import ClipcidError
from clipcid.evaluation.inside import (
    InsideConfig,
    Student,
    last_layer_weights,
    look_inside,
    patch_pca,
    read_inside,
    weight_statistics,
)
from clipcid.holdout import HoldOut, HoldoutConfig, hold_out
from clipcid.models import load_model


def test_weight_statistics_known_answers():
    w = np.array([0.0, 0.0005, -0.0005, 0.5, -0.5, 0.002, 1.0, -1.0])
    s = weight_statistics(w)
    assert s["n"] == 8 and s["near_zero"] == 3 / 8 and s["std"] == pytest.approx(w.std())
    normal = weight_statistics(np.random.default_rng(0).normal(size=200_000))
    assert abs(normal["kurtosis"]) < 0.05  # excess kurtosis of a normal sample
    assert weight_statistics(np.random.default_rng(0).laplace(size=200_000))["kurtosis"] == pytest.approx(3, abs=0.2)


def test_the_last_linear_of_each_tower_and_the_rebuilt_initialisation():
    model = load_model("clipcid-tiny", seed=5).model
    w = last_layer_weights(model)
    assert w["image"].shape == tuple(model.visual.transformer.resblocks[-1].mlp.c_proj.weight.shape)
    assert w["text"].shape == tuple(model.transformer.resblocks[-1].mlp.c_proj.weight.shape)
    again = last_layer_weights(load_model("clipcid-tiny", seed=5).model)  # what distill's seed builds
    assert all(np.array_equal(w[t], again[t]) for t in w)
    assert not np.array_equal(w["image"], last_layer_weights(load_model("clipcid-tiny", seed=6).model)["image"])


def test_patch_pca_separates_a_planted_object_from_its_background():
    rng = np.random.default_rng(0)
    n, g, d = 4, 8, 32
    # Objects differ from the background more than among themselves (as an icon from its white page).
    background = rng.normal(size=d)
    objects = background + 4 * rng.normal(size=d) + rng.normal(size=(4, d))
    tokens = np.tile(background, (n, g, g, 1)) + 0.05 * rng.normal(size=(n, g, g, d))
    planted = np.zeros((n, g, g), bool)
    planted[:, 2:6, 2:6] = True
    kinds = rng.integers(4, size=(n, g, g))  # 4 kinds span the 3 components
    tokens[planted] = objects[kinds[planted]] + 0.05 * rng.normal(size=(planted.sum(), d))
    mask, rgb = patch_pca(tokens)
    assert (mask == planted).all()  # the border is background, whatever the component's sign
    assert (rgb[~planted] == 0).all() and rgb[planted].max() > 0.5
    # Patches of one kind get one colour; different kinds differ.
    colours = {k: rgb[planted & (kinds == k)].mean(0) for k in range(4)}
    assert all(np.abs(rgb[planted & (kinds == k)] - colours[k]).max() < 0.2 for k in range(4))
    assert min(np.abs(colours[a] - colours[b]).max() for a in range(4) for b in range(a)) > 0.3


def test_look_inside_writes_the_numbers_the_figures_and_skips_when_finished(tmp_path, tiny_checkpoint, monkeypatch):
    make_img2dataset_shards(tmp_path / "shards", n_shards=1, per_shard=40, seed=2)
    hold_out(HoldoutConfig(str(tmp_path / "shards"), str(tmp_path / "ho"), fraction=0.3, min_pairs=1))
    # A student equal to its initialisation changes by nothing; another trained away from it does.
    init = load_model("clipcid-tiny", seed=3).model
    same = tmp_path / "same.pt"
    torch.save({"state_dict": init.state_dict()}, same)
    students = [
        Student("baseline", "baseline", "clipcid-tiny", str(same), None, 3, "a"),
        Student("student", "student", "clipcid-tiny", str(tiny_checkpoint), None, 3, "b"),
    ]
    import clipcid.models

    loads = []
    real_load = clipcid.models.load_model
    monkeypatch.setattr(clipcid.models, "load_model", lambda *a, **k: loads.append(a[1]) or real_load(*a, **k))
    gallery = str(HoldOut.open(tmp_path / "ho").gallery)
    cfg = InsideConfig(str(tmp_path / "run" / "inside"), gallery, pictures=4)
    record = look_inside(cfg, students)
    # Each student loaded once trained (weights and patches) and once as it started (w0).
    assert sorted(map(str, loads)) == sorted([str(same), str(tiny_checkpoint), "None", "None"])
    numbers = json.loads((tmp_path / "run" / "inside" / "weights.json").read_text())
    assert numbers == record["weights"] and set(numbers) == {"baseline", "student"}
    assert numbers["baseline"]["image"]["change"]["std"] == 0 and numbers["student"]["image"]["change"]["std"] > 0
    assert numbers["baseline"]["text"]["w"]["std"] > 0
    assert [p["student"] for p in record["patches"]] == ["baseline", "student"]
    for name in ("weights.png", "patches.png"):
        assert (tmp_path / "run" / "inside" / name).stat().st_size > 1000
    assert read_inside(tmp_path / "run" / "inside")["complete"]
    for name in ("weights.png", "patches.png"):  # a figure deleted since is drawn again
        (tmp_path / "run" / "inside" / name).unlink()
        look_inside(cfg, students)
        assert (tmp_path / "run" / "inside" / name).stat().st_size > 1000
    monkeypatch.setattr("clipcid.evaluation.inside.weight_report", lambda *a: pytest.fail("done again"))
    assert look_inside(cfg, students)["complete"]
    # Other settings are refused with what differs, or replaced under overwrite.
    with pytest.raises(ClipcidError, match="other settings .*pictures: 4 -> 2"):
        look_inside(dataclasses.replace(cfg, pictures=2), students)
    monkeypatch.undo()
    assert look_inside(dataclasses.replace(cfg, pictures=2, overwrite=True), students)["pictures"] == 2
