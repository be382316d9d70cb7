"""Input parts: what the stages read, one part per input shard, rows in file order.

Accepted inputs: webdataset tars (a folder, a brace pattern, a glob; img2dataset's `webdataset`
output), img2dataset's `files` output (folders of KEY.jpg + KEY.txt), img2dataset's `parquet` output
(image bytes in a column), and a CSV/TSV/parquet table of (image path, caption) rows, cut into parts
of `rows_per_part` rows. Every later stage refers to a row as (part index, row in part).
"""

from __future__ import annotations

import functools
import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from clipcid.errors import ClipcidError
from clipcid.inputs.shards import expand_shards, iter_tar_samples

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TABLE_IMAGE_COLUMNS = ("image", "filepath", "image_path", "path", "file")
TABLE_CAPTION_COLUMNS = ("caption", "text", "title", "txt")


@dataclass(frozen=True)
class Part:
    kind: str  # "tar" | "files" | "parquet_bytes" | "table"
    path: str
    name: str  # recorded as `shard` in metadata
    start: int = 0  # table parts: first row of the table
    stop: int = 0  # table parts: one past the last row
    image_column: str = ""
    caption_column: str = ""


@dataclass
class Row:
    key: str
    image: bytes | None  # None: the sample has no image
    caption: str | None
    image_path: str | None = None  # where the image came from, when it is a file of its own
    url: str | None = None  # where it was downloaded from, when the source says (img2dataset does)
    meta: dict | None = None  # the sample's JSON metadata (webdataset, files), or the asked table columns


def _pick_column(names: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: str) -> str:
    if wanted:
        if wanted not in names:
            raise ClipcidError(f"{path}: no column '{wanted}' for the {what} (columns: {', '.join(names)})")
        return wanted
    for c in candidates:
        if c in names:
            return c
    raise ClipcidError(
        f"{path}: no {what} column found (looked for {', '.join(candidates)}); name it with --{what}-column"
    )


@functools.lru_cache(maxsize=1)  # consecutive parts of one table are read by the same worker
def _read_table(path: str):
    if path.endswith(".parquet"):
        return pq.read_table(path)
    delimiter = "\t" if path.endswith(".tsv") else ","
    return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter))


def discover_parts(
    data: str | list[str],
    rows_per_part: int = 10000,
    image_column: str | None = None,
    caption_column: str | None = None,
) -> list[Part]:
    """The ordered list of parts behind a --data argument."""
    if isinstance(data, str) and os.path.isfile(data) and data.endswith((".csv", ".tsv", ".parquet")):
        table = _read_table(data)
        names = table.column_names
        if any(c in names for c in IMAGE_EXTENSIONS):  # an img2dataset parquet shard, bytes inside
            return [Part("parquet_bytes", data, Path(data).name)]
        img_col = _pick_column(names, image_column, TABLE_IMAGE_COLUMNS, "image", data)
        cap_col = _pick_column(names, caption_column, TABLE_CAPTION_COLUMNS, "caption", data)
        n = table.num_rows
        return [
            Part("table", data, f"{Path(data).name}:{s}", s, min(s + rows_per_part, n), img_col, cap_col)
            for s in range(0, n, rows_per_part)
        ]
    if isinstance(data, str) and os.path.isdir(data):
        if glob.glob(os.path.join(data, "*.tar")):
            return [Part("tar", p, Path(p).name) for p in expand_shards(data)]
        parquets = sorted(glob.glob(os.path.join(data, "*.parquet")))
        if parquets and any(c in pq.read_schema(parquets[0]).names for c in IMAGE_EXTENSIONS):
            return [Part("parquet_bytes", p, Path(p).name) for p in parquets]
        subdirs = sorted(d for d in glob.glob(os.path.join(data, "*")) if os.path.isdir(d))
        if subdirs:
            return [Part("files", d, Path(d).name) for d in subdirs]
        raise ClipcidError(
            f"{data}: no shards found (expected *.tar, img2dataset parquet with image bytes, or folders of "
            "KEY.jpg + KEY.txt)"
        )
    return [Part("tar", p, Path(p).name) for p in expand_shards(data)]


def fingerprint(part: Part) -> list:
    """What identifies a part's content cheaply: its name and its size on disk (table parts: their
    rows). Two runs over different shards of the same names are told apart."""
    if part.kind == "table":
        return [part.name, part.start, part.stop]
    if part.kind == "files":
        return [part.name, len(os.listdir(part.path))]
    return [part.name, os.path.getsize(part.path)]


def _image_of(sample: dict) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        if sample.get(ext) is not None:
            return sample[ext]
    return None


def _text(value) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _meta_of(raw) -> dict | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _url_of(meta: dict | None) -> str | None:
    value = (meta or {}).get("url")
    return str(value) if value else None


def _columns(table, names: tuple[str, ...], i: int) -> dict | None:
    return {n: table.column(n)[i].as_py() for n in names if n in table.column_names} if names else None


def iter_rows(part: Part, fields: tuple[str, ...] = ()) -> Iterator[Row]:
    """Rows of one part, in the order every stage numbers them. `fields`: the table columns to read
    into Row.meta (webdataset and files layouts give their whole JSON metadata)."""
    if part.kind == "tar":
        for sample in iter_tar_samples(part.path):
            meta = _meta_of(sample.get("json"))
            yield Row(sample["__key__"], _image_of(sample), _text(sample.get("txt")), url=_url_of(meta), meta=meta)
    elif part.kind == "files":
        by_key: dict[str, dict] = {}
        for f in sorted(os.listdir(part.path)):
            key, _, ext = f.rpartition(".")
            if ext.lower() in IMAGE_EXTENSIONS + ("txt", "json"):
                by_key.setdefault(key, {})[ext.lower()] = os.path.join(part.path, f)
        for key in sorted(by_key):
            files = by_key[key]
            image_file = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
            if image_file is None and "txt" not in files:
                continue  # a stray .json (img2dataset writes one per failed download too)
            image = Path(image_file).read_bytes() if image_file else None
            caption = Path(files["txt"]).read_text(encoding="utf-8") if "txt" in files else None
            meta = _meta_of(Path(files["json"]).read_bytes()) if "json" in files else None
            yield Row(key, image, caption, image_path=image_file, url=_url_of(meta), meta=meta)
    elif part.kind == "parquet_bytes":
        table = pq.read_table(part.path)
        img_col = next(c for c in IMAGE_EXTENSIONS if c in table.column_names)
        cap_col = next((c for c in TABLE_CAPTION_COLUMNS if c in table.column_names), None)
        keys = table.column("key").to_pylist() if "key" in table.column_names else None
        urls = table.column("url").to_pylist() if "url" in table.column_names else None
        images = table.column(img_col).to_pylist()
        captions = table.column(cap_col).to_pylist() if cap_col else [None] * len(images)
        for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
            key = str(keys[i]) if keys else f"{i:09d}"
            url = str(urls[i]) if urls and urls[i] else None
            yield Row(key, image, _text(caption), url=url, meta=_columns(table, fields, i))
    elif part.kind == "table":
        table = _read_table(part.path).slice(part.start, part.stop - part.start)
        base = Path(part.path).parent
        keys = table.column("key").to_pylist() if "key" in table.column_names else None
        urls = table.column("url").to_pylist() if "url" in table.column_names else None
        for i, (path, caption) in enumerate(
            zip(
                table.column(part.image_column).to_pylist(),
                table.column(part.caption_column).to_pylist(),
                strict=True,
            )
        ):
            image = None
            full = None
            if path:
                full = Path(path) if os.path.isabs(path) else base / path
                image = full.read_bytes() if full.is_file() else None
            key = str(keys[i]) if keys else f"{part.start + i:09d}"
            url = str(urls[i]) if urls and urls[i] else None
            meta = _columns(table, fields, i)
            yield Row(key, image, _text(caption), image_path=str(full) if full else None, url=url, meta=meta)
    else:
        raise ValueError(f"unknown part kind {part.kind}")
