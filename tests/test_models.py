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


def test_loading_a_model_leaves_the_global_generator_alone_and_heads_come_from_the_seed():
    import torch

    from clipcid.distill.objective import Student
    from clipcid.models import load_model

    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = load_model("clipcid-tiny", seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    b = load_model("clipcid-tiny", seed=1)
    assert all(
        torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True)
    )

    from clipcid.distill.objective import Objective
    from clipcid.distill.train import DistillConfig
    from clipcid.stage import DistEnv

    cfg = DistillConfig(data="", out="", model="clipcid-tiny", seed=3, w_cls=0.0, w_kl=0.0)
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    heads = []
    for draws in (0, 100):  # whatever drew from the global generator before
        torch.rand(draws)
        objective = Objective(cfg, a.model, 256, 512, None, env)
        heads.append(objective.student.ins_img_head.weight.detach().clone())
    assert torch.equal(heads[0], heads[1]) and isinstance(objective.student, Student)


def test_lit_configs_are_json_files_registered_through_open_clip_public_api():
    import json

    import open_clip

    from clipcid.models import LIT_PRETRAINED_MODELS, minilm_folder, register_model_configs, write_config_folder

    register_model_configs()
    if minilm_folder() is None:
        return  # the LiT configs need the MiniLM package (installed by `make setup`)
    folder = write_config_folder({}, str(minilm_folder()))
    for name in LIT_PRETRAINED_MODELS:
        assert json.loads((folder / f"{name}.json").read_text()) == open_clip.get_model_config(name)
