"""Render artwork to small RGB PNGs on a white square, as a web image would arrive."""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

import resvg_py
from PIL import Image, ImageDraw, ImageFont

from clipcid.corpus.sources import NOTO_COLOR_EMOJI_FONT

# The CBDT bitmap font only renders at its one strike size.
NOTO_STRIKE_SIZE = 109


class RenderError(Exception):
    pass


def _fit_on_white(image: Image.Image, size: int) -> Image.Image:
    """Scale to fit a size x size square, keep the aspect ratio, centre on white (alpha composited)."""
    image = image.convert("RGBA")
    w, h = image.size
    if w == 0 or h == 0:
        raise RenderError("empty image")
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new != (w, h):
        image = image.resize(new, Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(image, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas.convert("RGB")


def render_svg(svg: str, size: int) -> Image.Image:
    # Render at 2x and downsample: thin strokes of line icons survive better than at 1x.
    # resvg rather than cairosvg: cairosvg draws masked artwork (circle-flags) wrongly.
    try:
        png = resvg_py.svg_to_bytes(svg_string=svg, width=2 * size, skip_system_fonts=True)
    except (ValueError, RuntimeError) as e:
        raise RenderError(f"svg: {e}") from e
    return _fit_on_white(Image.open(io.BytesIO(bytes(png))), size)


@lru_cache(maxsize=2)
def _font(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, NOTO_STRIKE_SIZE, layout_engine=ImageFont.Layout.RAQM)


def render_glyphs(text: str, size: int, font_path: Path = NOTO_COLOR_EMOJI_FONT) -> Image.Image:
    font = _font(str(font_path))
    canvas = Image.new("RGBA", (NOTO_STRIKE_SIZE * 4, NOTO_STRIKE_SIZE * 2), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), text, font=font, embedded_color=True)
    bbox = canvas.getbbox()
    if bbox is None:
        raise RenderError("font: nothing drawn")
    # A sequence the font lacks falls apart into several glyphs side by side.
    if font.getlength(text) > 1.5 * font.getlength("\U0001f600"):
        raise RenderError(f"font: no single glyph for {text!r}")
    return _fit_on_white(canvas.crop(bbox), size)


def render_png(spec: tuple[str, str | bytes], size: int) -> bytes:
    kind, payload = spec
    if kind == "png":  # already rendered (shared between datasets)
        return payload
    if kind == "svg":
        image = render_svg(payload, size)
    elif kind == "font":
        image = render_glyphs(payload, size)
    else:
        raise RenderError(f"unknown render kind {kind}")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
