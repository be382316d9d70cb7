from __future__ import annotations

import open_clip
import pytest
import torch

from clipcid.errors import ClipcidError
from clipcid.models import count_parameters, describe_models, load_model


def test_project_configs_are_registered_with_open_clip():
    names = open_clip.list_models()
    assert "clipcid-tiny" in names and "clipcid-small" in names


def test_checkpoint_round_trip_through_open_clip(tiny_checkpoint):
    model, _, preprocess = open_clip.create_model_and_transforms("clipcid-tiny", pretrained=str(tiny_checkpoint))
    saved = torch.load(tiny_checkpoint, map_location="cpu")["state_dict"]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)
    loaded = load_model("clipcid-tiny", str(tiny_checkpoint))
    image = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert loaded.model.encode_image(image).shape == (2, loaded.embed_dim) == (2, 256)
        assert loaded.model.encode_text(loaded.tokenizer(["a cat", "a dog"])).shape == (2, 256)


def test_random_init_is_reproducible_from_seed():
    a = load_model("clipcid-tiny", None, seed=7).model.state_dict()
    b = load_model("clipcid-tiny", None, seed=7).model.state_dict()
    c = load_model("clipcid-tiny", None, seed=8).model.state_dict()
    key = "visual.conv1.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_wrong_checkpoint_names_the_mismatch(tiny_checkpoint):
    with pytest.raises(ClipcidError, match="does not match architecture clipcid-small"):
        load_model("clipcid-small", str(tiny_checkpoint))


def test_unknown_model_and_missing_checkpoint():
    with pytest.raises(ClipcidError, match="unknown model architecture 'clipcid-huge'.*clipcid"):
        load_model("clipcid-huge")
    with pytest.raises(ClipcidError, match="checkpoint not found"):
        load_model("clipcid-tiny", "/nonexistent/model.pt")


def test_sizes_match_the_documented_ones():
    tiny = count_parameters(open_clip.create_model("clipcid-tiny"))
    small = count_parameters(open_clip.create_model("clipcid-small"))
    assert tiny["total"] == 9_033_345 and small["total"] == 31_937_793  # docs/models.md
    assert small["visual"] > 5 * tiny["visual"]
    table = describe_models()
    assert "clipcid-tiny" in table and "9,033,345" in table
