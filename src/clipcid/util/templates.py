"""The HTML pages (the run's report, the demo's showcase and study sections, balance's inspect page)
render from the Jinja2 templates in clipcid/templates: the Python side gathers the figures, the
templates say how they look. Autoescaping is on, so a caption or a path is shown as text; a section
rendered by another template is passed as `Markup`. Images go inline as data URIs (`png_src`)."""

from __future__ import annotations

import base64
import functools

from markupsafe import Markup


def png_src(data: bytes) -> str:
    """A data URI for an image's bytes, with the type its bytes say (PNG, JPEG or WebP)."""
    kind = "jpeg" if data[:2] == b"\xff\xd8" else "webp" if data[8:12] == b"WEBP" else "png"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


@functools.cache
def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("clipcid", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a figure the Python side forgot fails here, not as an empty cell
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["png_src"] = png_src
    return env


def render(template: str, **context) -> Markup:
    """The template clipcid/templates/TEMPLATE filled with `context`, as HTML."""
    return Markup(_environment().get_template(template).render(**context))


def table(head: list[str], rows: list) -> Markup:
    """A table from macros.html.j2 (a cell ending in " **" shown bold: an interval that excludes zero)."""
    return Markup(_environment().get_template("macros.html.j2").module.table(head, rows))
