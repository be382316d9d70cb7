"""Readers for the artwork the offline corpus is made from (shared/DATA.md).

Each reader turns one installed package into `Artwork` records: what to render (an SVG document or
a font glyph sequence) and what it depicts (name, Unicode group and subgroup, tags, licence). Names
are matched to the Unicode emoji list so the same emoji in different styles share one label.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

UNICODE_EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
NOTO_COLOR_EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")

# Iconify emoji sets in the training corpus. The two Fluent 3D/high-contrast sets and circle-flags are
# held out for evaluation and must never appear here.
TRAIN_EMOJI_SETS = (
    "twemoji",
    "noto",
    "noto-v1",
    "fluent-emoji-flat",
    "emojione",
    "emojione-v1",
    "fxemoji",
    "streamline-emojis",
)
TRAIN_FLAG_SETS = ("flag", "flagpack", "cif")
TRAIN_ICON_SETS = ("icon-park", "mdi", "game-icons")
EVAL_EMOJI_SETS = ("fluent-emoji", "fluent-emoji-high-contrast")
EVAL_FLAG_SET = "circle-flags"
EVAL_ICON_SET = "lucide"  # line icons in a style none of the training icon sets has

# Unicode "Component" entries are skin-tone and hair swatches, not pictures of anything.
SKIPPED_GROUPS = {"Component"}


class SourceMissing(Exception):
    """A package the corpus needs is not installed."""


@dataclass(frozen=True)
class EmojiInfo:
    codepoints: str  # "1F600" or "1F3F4-E0067-..." (upper-case hex joined by '-', FE0F kept)
    name: str  # Unicode CLDR short name, e.g. "grinning face", "flag: Japan"
    group: str  # e.g. "Smileys & Emotion"
    subgroup: str  # e.g. "face-smiling"
    order: int  # position in emoji-test.txt; gives classes a stable order


@dataclass
class Artwork:
    source: str  # the package it comes from, e.g. "npm:@iconify-json/twemoji"
    style: str  # e.g. "twemoji"
    kind: str  # "emoji" | "flag" | "icon"
    name: str
    group: str
    subgroup: str
    licence: str
    render: tuple[str, str]  # ("svg", document) or ("font", text)
    tags: list[str] = field(default_factory=list)
    codepoints: str = ""
    country_code: str = ""


def slugify(text: str) -> str:
    """'Flag: Côte d’Ivoire' -> 'flag-cote-d-ivoire', the way Iconify names emoji."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")


def _codepoint_key(codepoints: str) -> str:
    """Normalise for matching: lower-case, no variation selector FE0F."""
    values = [int(p, 16) for p in re.split(r"[-\s_]+", codepoints) if p]
    return "-".join(f"{v:x}" for v in values if v != 0xFE0F)


def read_unicode_emoji(path: Path = UNICODE_EMOJI_TEST) -> list[EmojiInfo]:
    if not path.is_file():
        raise SourceMissing(f"{path} (Debian package unicode-data)")
    entries: list[EmojiInfo] = []
    group = subgroup = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line and group not in SKIPPED_GROUPS:
            codes, rest = line.split(";", 1)
            # "# 😀 E1.0 grinning face": the name follows the emoji and its version.
            name = re.sub(r"^.*?E\d+\.\d+\s+", "", rest.split("#", 1)[1].strip())
            cps = "-".join(codes.split()).upper()
            entries.append(EmojiInfo(cps, name, group, subgroup, len(entries)))
    return entries


_TONE_NUMBERS = {
    "tone1": "light",
    "tone2": "medium-light",
    "tone3": "medium",
    "tone4": "medium-dark",
    "tone5": "dark",
}
_TONE_SUFFIX = re.compile(r"-(light|medium-light|medium|medium-dark|dark)$")


def _slug_variants(slug: str) -> list[str]:
    """Spellings of one Unicode name across icon sets: 'artist-dark' and 'artist-tone5' both mean
    'artist: dark skin tone'; '0' means 'keycap: 0'."""
    variants = [slug]
    for number, tone in _TONE_NUMBERS.items():
        if slug.endswith(f"-{number}"):
            slug = slug[: -len(number)] + tone
            variants.append(slug)
    if _TONE_SUFFIX.search(slug):
        variants.append(slug + "-skin-tone")
    variants.append("keycap-" + slug)
    return variants


class EmojiIndex:
    """Find the Unicode entry behind an artwork name or code point sequence."""

    def __init__(self, entries: list[EmojiInfo]):
        self.entries = entries
        self.by_codepoints = {_codepoint_key(e.codepoints): e for e in entries}
        self.by_slug = {slugify(e.name): e for e in entries}
        self.by_squashed = {slugify(e.name).replace("-", ""): e for e in entries}

    def lookup(self, slug: str, codepoints: str | None = None) -> EmojiInfo | None:
        if codepoints:
            hit = self.by_codepoints.get(_codepoint_key(codepoints))
            if hit:
                return hit
        for candidate in _slug_variants(slug):
            hit = self.by_slug.get(candidate) or self.by_squashed.get(candidate.replace("-", ""))
            if hit:
                return hit
        return None

    def country_flags(self) -> dict[str, EmojiInfo]:
        """ISO code ('jp', 'gb-eng') -> the Unicode flag entry, decoded from its code points."""
        flags: dict[str, EmojiInfo] = {}
        for e in self.entries:
            if e.subgroup not in ("country-flag", "subdivision-flag"):
                continue
            cps = [int(c, 16) for c in e.codepoints.split("-")]
            if e.subgroup == "country-flag":
                code = "".join(chr(ord("a") + c - 0x1F1E6) for c in cps)
            else:  # black flag + tag letters 'gbeng' + cancel tag
                tags = "".join(chr(c - 0xE0000) for c in cps[1:-1])
                code = f"{tags[:2]}-{tags[2:]}"
            flags[code] = e
        return flags


def flag_country_name(info: EmojiInfo) -> str:
    return info.name.split(":", 1)[1].strip()


def _read_iconify(npm_root: Path, prefix: str) -> tuple[dict, dict, dict, dict]:
    folder = npm_root / "@iconify-json" / prefix
    icons_file = folder / "icons.json"
    if not icons_file.is_file():
        raise SourceMissing(f"npm package @iconify-json/{prefix} (run `make sources`)")
    icons = json.loads(icons_file.read_text())
    info = json.loads((folder / "info.json").read_text())
    meta_file, chars_file = folder / "metadata.json", folder / "chars.json"
    metadata = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    chars = json.loads(chars_file.read_text()) if chars_file.is_file() else {}
    return icons, info, metadata, chars


def iconify_svg(icon_set: dict, name: str) -> str:
    """The standalone SVG document for one icon of an Iconify JSON set."""
    icon = icon_set["icons"][name]
    left, top = icon.get("left", icon_set.get("left", 0)), icon.get("top", icon_set.get("top", 0))
    width = icon.get("width", icon_set.get("width", 16))
    height = icon.get("height", icon_set.get("height", 16))
    body = icon["body"]
    transforms = []
    if icon.get("hFlip"):
        transforms.append(f"translate({left * 2 + width} 0) scale(-1 1)")
    if icon.get("vFlip"):
        transforms.append(f"translate(0 {top * 2 + height}) scale(1 -1)")
    if icon.get("rotate"):
        cx, cy = left + width / 2, top + height / 2
        transforms.append(f"rotate({90 * icon['rotate']} {cx} {cy})")
    if transforms:
        body = f'<g transform="{" ".join(transforms)}">{body}</g>'
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'width="{width}" height="{height}" viewBox="{left} {top} {width} {height}" '
        f'color="#000000">{body}</svg>'
    )


def _category_of(metadata: dict) -> dict[str, str]:
    out: dict[str, str] = {}
    for category, names in metadata.get("categories", {}).items():
        for n in names:
            out.setdefault(n, category)
    return out


def read_iconify_emoji(npm_root: Path, prefix: str, index: EmojiIndex) -> list[Artwork]:
    icon_set, info, metadata, chars = _read_iconify(npm_root, prefix)
    codepoints_of = {slug: cps for cps, slug in chars.items()}
    category_of = _category_of(metadata)
    licence = info["license"]["spdx"]
    out = []
    for slug in sorted(icon_set["icons"]):
        e = index.lookup(slug, codepoints_of.get(slug))
        if e is not None and e.group in SKIPPED_GROUPS:
            continue
        out.append(
            Artwork(
                source=f"npm:@iconify-json/{prefix}",
                style=prefix,
                kind="flag" if e is not None and e.subgroup.endswith("-flag") else "emoji",
                name=e.name if e else slug.replace("-", " "),
                group=e.group if e else category_of.get(slug, ""),
                subgroup=e.subgroup if e else "",
                licence=licence,
                render=("svg", iconify_svg(icon_set, slug)),
                codepoints=e.codepoints if e else "",
            )
        )
    return out


def read_iconify_flags(npm_root: Path, prefix: str, index: EmojiIndex) -> list[Artwork]:
    icon_set, info, _, _ = _read_iconify(npm_root, prefix)
    flags = index.country_flags()
    licence = info["license"]["spdx"]
    out = []
    for icon_name in sorted(icon_set["icons"]):
        # flag-icons ships every flag twice, square ('jp-1x1') and 4:3 ('jp-4x3'): two styles.
        code, style = icon_name, prefix
        if prefix == "flag":
            code, aspect = icon_name.rsplit("-", 1)
            style = f"flag-{aspect}"
        e = flags.get(code)
        if e is None:  # regional, historical or language flags without a Unicode emoji
            continue
        out.append(
            Artwork(
                source=f"npm:@iconify-json/{prefix}",
                style=style,
                kind="flag",
                name=flag_country_name(e),
                group=e.group,
                subgroup=e.subgroup,
                licence=licence,
                render=("svg", iconify_svg(icon_set, icon_name)),
                codepoints=e.codepoints,
                country_code=code,
            )
        )
    return out


def read_iconify_icons(npm_root: Path, prefix: str) -> list[Artwork]:
    icon_set, info, metadata, _ = _read_iconify(npm_root, prefix)
    category_of = _category_of(metadata)
    licence = info["license"]["spdx"]
    return [
        Artwork(
            source=f"npm:@iconify-json/{prefix}",
            style=prefix,
            kind="icon",
            name=slug.replace("-", " "),
            group=category_of.get(slug, ""),
            subgroup="",
            licence=licence,
            render=("svg", iconify_svg(icon_set, slug)),
        )
        for slug in sorted(icon_set["icons"])
    ]


def read_openmoji(npm_root: Path, index: EmojiIndex) -> list[Artwork]:
    folder = npm_root / "openmoji"
    data_file = folder / "data" / "openmoji.json"
    if not data_file.is_file():
        raise SourceMissing("npm package openmoji (run `make sources`)")
    out = []
    for row in json.loads(data_file.read_text()):
        svg_file = folder / "color" / "svg" / f"{row['hexcode']}.svg"
        if not svg_file.is_file():
            continue
        e = index.lookup(slugify(row["annotation"]), row["hexcode"])
        if e is not None and e.group in SKIPPED_GROUPS:
            continue
        tags = [t.strip() for t in (row.get("tags") or "").split(",") if t.strip()]
        out.append(
            Artwork(
                source="npm:openmoji",
                style="openmoji",
                kind="flag" if e is not None and e.subgroup.endswith("-flag") else "emoji",
                name=e.name if e else row["annotation"],
                group=e.group if e else row["group"],
                subgroup=e.subgroup if e else row.get("subgroups", ""),
                licence="CC-BY-SA-4.0",
                render=("svg", svg_file.read_text(encoding="utf-8")),
                tags=tags,
                codepoints=e.codepoints if e else row["hexcode"],
            )
        )
    return out


def read_noto_font(index: EmojiIndex, font_path: Path = NOTO_COLOR_EMOJI_FONT) -> list[Artwork]:
    if not font_path.is_file():
        raise SourceMissing(f"{font_path} (Debian package fonts-noto-color-emoji)")
    return [
        Artwork(
            source="debian:fonts-noto-color-emoji",
            style="noto-color-emoji-font",
            kind="flag" if e.subgroup.endswith("-flag") else "emoji",
            name=e.name,
            group=e.group,
            subgroup=e.subgroup,
            licence="OFL-1.1",
            render=("font", "".join(chr(int(c, 16)) for c in e.codepoints.split("-"))),
            codepoints=e.codepoints,
        )
        for e in index.entries
    ]
