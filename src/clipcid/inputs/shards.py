"""Webdataset shard I/O shared by the corpus builders and the stages that read shards."""

from __future__ import annotations

import glob
import os
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import braceexpand
import webdataset as wds

from clipcid.errors import ClipcidError
from clipcid.util.fileio import atomic_path


def write_tar_atomic(path: str | os.PathLike, samples: list[dict]) -> None:
    """Write samples ({'__key__': ..., 'png': bytes, 'txt': str, ...}) as one reproducible tar.

    mtime and owner are fixed so that the same samples always give the same bytes.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer = wds.TarWriter(f, mtime=0.0, user="clipcid", group="clipcid", encoder=True)
        for sample in samples:
            writer.write(sample)
        writer.close()


def expand_shards(spec: str | os.PathLike | list[str]) -> list[str]:
    """Shard list from a folder, a brace pattern ('data/{00000..00041}.tar'), a glob, or a list.

    Sorted by name, so part i of every stage is always shard i.
    """
    if isinstance(spec, list | tuple):
        paths = [str(p) for p in spec]
    else:
        spec = str(spec)
        if os.path.isdir(spec):
            paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
        else:
            paths = []
            for pattern in braceexpand.braceexpand(spec):
                paths.extend(sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern])
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ClipcidError(f"shard not found: {missing[0]} ({len(missing)} of {len(paths)} missing)")
    if not paths:
        raise ClipcidError(f"no .tar shards found at {spec}")
    return paths


class DamagedShard(ClipcidError):
    """A shard that ends before its end (a truncated download) or is not a tar at all. The samples
    before the damage were whole and were yielded."""

    def __init__(self, path: str | Path, complete: int, reason: str):
        super().__init__(
            f"shard {path} is damaged after {complete} whole sample(s) ({reason}); download it again, or leave it out"
        )
        self.path, self.complete = str(path), complete


def iter_tar_samples(path: str | Path) -> Iterator[dict]:
    """Raw samples of one tar in file order: {'__key__': str, 'png': bytes, 'txt': bytes, ...}.

    Grouping by key prefix is webdataset's; nothing is decoded here. Each member is read whole before its
    sample is yielded, so every yielded sample is complete; damage raises DamagedShard after them.
    """
    complete = 0
    try:
        with open(path, "rb") as stream:
            files = wds.tariterators.tar_file_expander([{"url": str(path), "stream": stream}])
            for sample in wds.tariterators.group_by_keys(files):
                yield sample
                complete += 1
    except (tarfile.TarError, EOFError, zlib.error) as e:
        reason = e.args[0] if e.args and isinstance(e.args[0], str) else type(e).__name__
        raise DamagedShard(path, complete, reason) from e
    except OSError as e:
        raise ClipcidError(f"cannot read shard {path}: {e.strerror or e}") from e
