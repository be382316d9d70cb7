"""Small file helpers shared by every stage: atomic writes, so that a crash never leaves a half file."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    # The pid keeps two processes that race on the same output from writing into one temp file.
    tmp = final.with_name(f"{final.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def output_folder(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create an output folder, or say in one line why it cannot be one (it is a file)."""
    from clipcid.errors import ClipcidError

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ClipcidError(f"{flag} {folder} is a file, not a folder; give a folder path")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def read_user_json(path: str | os.PathLike, what: str) -> dict:
    """The JSON object in a file a user hands in (`what` names it in the error: "--recipe", "study plan",
    ...), or one line saying what is wrong: not found, unreadable, not JSON, not an object."""
    from clipcid.errors import ClipcidError

    file = Path(path)
    if not file.is_file():
        raise ClipcidError(f"{what} {path}: file not found")
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise ClipcidError(f"{what} {path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise ClipcidError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ClipcidError(f"{what} {path}: expected a JSON object, found a {type(value).__name__}")
    return value


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def save_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete temporaries left by a crashed run; returns how many were removed."""
    removed = 0
    for tmp in Path(folder).rglob(f"*{TMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink()
            removed += 1
    return removed
