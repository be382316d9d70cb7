from __future__ import annotations

import re

import pytest
from conftest import make_shards

from clipcid.balance import BalanceConfig, balance
from clipcid.balance.inspect import InspectConfig, inspect_balance
from clipcid.embed import EmbedConfig, embed
from clipcid.errors import ClipcidError


def test_inspect_page_shows_groups_with_the_kept_image_marked(tmp_path, tiny_checkpoint):
    make_shards(tmp_path / "shards", n_shards=2, per_shard=12)
    embed(
        EmbedConfig(
            data=str(tmp_path / "shards"),
            model="clipcid-tiny",
            out=str(tmp_path / "emb"),
            pretrained=str(tiny_checkpoint),
            batch_size=8,
            workers=0,
        )
    )
    # A random-init model maps these simple shapes close together: a wide threshold merges many.
    stats = balance(BalanceConfig(emb=str(tmp_path / "emb"), out=str(tmp_path / "bal"), target_removal=0.5))
    assert stats["merged_groups"] >= 1
    page = tmp_path / "inspect.html"
    n = inspect_balance(InspectConfig(str(tmp_path / "bal"), str(tmp_path / "shards"), str(page), top=5, per_group=50))
    text = page.read_text()
    assert n == min(5, stats["merged_groups"])
    assert text.count("<section>") == n
    assert text.count('class="kept"') == n  # one kept image per group, shown first
    for section in re.findall(r"<section>(.*?)</section>", text):
        assert section.index('class="kept"') < section.index('class="dropped"')
    assert "data:image/png;base64," in text and re.search(r"<figcaption>a \w+ \w+</figcaption>", text)

    make_shards(tmp_path / "other", n_shards=2, per_shard=12, seed=1)
    (tmp_path / "other" / "00000.tar").rename(tmp_path / "other" / "00009.tar")
    with pytest.raises(ClipcidError, match="not the embedded data"):
        inspect_balance(InspectConfig(str(tmp_path / "bal"), str(tmp_path / "other"), str(tmp_path / "x.html")))
