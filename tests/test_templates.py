"""The HTML pages' templates: text is escaped, a missing figure fails, findings are bold, images inline."""

from __future__ import annotations

import io

import jinja2
import pytest
from PIL import Image

from clipcid.util.templates import png_src, render, table


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_caption_is_text_and_a_missing_figure_fails():
    groups = [[{"key": "k<1>", "image": _png(), "caption": "<script>alert(1)</script>", "kept": True}]]
    page = render("balance_groups.html.j2", groups=groups)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'alt="k&lt;1&gt;"' in page and 'class="kept"' in page and 'src="data:image/png;base64,' in page
    with pytest.raises(jinja2.UndefinedError, match="stats"):
        render("balance_inspect.html.j2", title="t", groups="")


def test_table_cells_marked_as_findings_are_bold_and_headline_rows_stand_out():
    html = table(
        ["task", "a − b"], [["x & y", "+1.00 [+0.20, +1.80] **"], {"cells": ["mean", "0.5"], "headline": True}]
    )
    assert "<th>a − b</th>" in html and "<td>x &amp; y</td>" in html
    assert "<td><b>+1.00 [+0.20, +1.80]</b></td>" in html and "**" not in html
    assert "<tr class=avg><td><b>mean</b></td><td>0.5</td></tr>" in html


def test_png_src_names_the_type_its_bytes_say():
    jpeg = io.BytesIO()
    Image.new("RGB", (2, 2)).save(jpeg, format="JPEG")
    assert png_src(_png()).startswith("data:image/png;base64,")
    assert png_src(jpeg.getvalue()).startswith("data:image/jpeg;base64,")
