"""Self-contained HTML pages (images inline as data URIs): the report and the balance inspect page."""

from __future__ import annotations

import base64
import html

# Page basics and the image grids of merged balance groups (the kept image framed green).
PAGE_STYLE = (
    "body{font-family:sans-serif;margin:1em 2em}.grid{display:flex;flex-wrap:wrap;gap:8px}"
    "figure{margin:0;width:112px;border:3px solid #ddd;padding:2px}figure.kept{border-color:#2a2}"
    "figure img{width:104px;height:104px;image-rendering:pixelated}figcaption{font-size:11px}"
)


def png_src(data: bytes) -> str:
    """A data URI for an image's bytes, with the type its bytes say (PNG, JPEG or WebP)."""
    kind = "jpeg" if data[:2] == b"\xff\xd8" else "webp" if data[8:12] == b"WEBP" else "png"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def page(title: str, body: str, style: str = "") -> str:
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{PAGE_STYLE}{style}</style></head><body>{body}</body></html>"
    )
