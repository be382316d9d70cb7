"""What every stage shares: the torchrun context, which parts a rank takes, row chunks, unit rows,
and the one rule for a stage's output folder (RunFolder), with the records and identities built on it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from clipcid.errors import ClipcidError
from clipcid.util.fileio import remove_stale_temporaries, save_json_atomic

log = logging.getLogger("clipcid")

# Rows per chunk wherever a stage streams an N x D matrix through memory (assignment, probing, sums).
ROW_CHUNK = 65536


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # Both backends where there is a GPU: a stage that works on the CPU (k-means training, the
        # balance merge) can then share the group of a pipeline that trains on the GPU.
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, world_size, local_rank, dev)


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: str = "auto") -> Iterator[DistEnv]:
    """A stage's process group for its whole run (torchrun), or a single process. Inside a pipeline
    that holds the group already (`clipcid run` under torchrun) the stage joins it, on the device it
    asks for, and leaves it open for the next stage."""
    owner = not (dist.is_available() and dist.is_initialized())
    env = init_distributed(device)
    try:
        yield env
    finally:
        if owner:
            shutdown(env)


def parts_of_rank(part_ids: Sequence[int], env: DistEnv) -> list[int]:
    """The parts this rank handles: every world_size-th, so ranks never share a part."""
    return [i for i in part_ids if i % env.world_size == env.rank]


def row_chunks(n: int, size: int = ROW_CHUNK) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length in float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def settings_difference(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys[:4]) + (
        f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
    )


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def digest(value) -> str:
    """A short fingerprint of a JSON value (settings), stable across processes and machines."""
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_record(path: Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def record_matches(path: Path, settings: dict) -> bool:
    """Whether the record at `path` was written with exactly these settings (a cache inside a run
    folder, e.g. cluster's trained centroids or balance's edge blocks, is reused only then)."""
    record = read_record(path)
    return record is not None and record.get("settings") == settings


def write_record(path: Path, settings: dict, **summary) -> None:
    save_json_atomic(path, {**summary, "settings": settings})


def identity(path: Path) -> str | None:
    """What a finished artifact was made from and with, as one fingerprint (the digest of the settings
    in its settings file), for the settings of the stages that read it: a stage redone with other
    settings changes the identity, so the stages after it do not take their old outputs for current.
    None when there is no settings file (a folder made by another tool)."""
    record = read_record(path)
    if record is None:
        return None
    return digest(record.get("settings", record))


def finished(record: dict | None) -> bool:
    """A run is finished when its record says so; records of clipcid before run folders had settings
    were written only at the end, so such a record (no "settings") is a finished run too."""
    return record is not None and bool(record.get("complete", "settings" not in record))


def read_finished(path: Path, what: str) -> dict:
    """The record of a finished run (its settings file), or one clear error."""
    record = json.loads(path.read_text()) if path.is_file() else None
    if not finished(record):
        raise ClipcidError(f"{path.parent} holds no finished {what} run; run `clipcid {what}` (again) to finish it")
    return record


class RunFolder:
    """The one rule for a stage's output folder.

    - It is a folder, not a file.
    - One run at a time: OUT/.lock holds the pid and host of the run inside; a lock whose process is
      gone (same host) is taken over with a warning.
    - It holds a run with the same settings, or none: else one error names the folder, what differs
      and the flag that overwrites (--overwrite clears the folder first).
    - The settings file ({"settings": ..., "complete": ..., and the run's summary}) is written at the
      start with "complete": false and rewritten, complete, last; readers (the artifact modules) refuse
      a folder that is not complete.
    """

    LOCK = ".lock"

    def __init__(self, path: str | Path, settings_file: str, settings: dict, overwrite: bool = False):
        self.path, self.settings_file = Path(path), settings_file
        self.settings, self.overwrite = settings, overwrite
        self._locked = False

    @property
    def settings_path(self) -> Path:
        return self.path / self.settings_file

    def recorded(self) -> dict | None:
        return read_record(self.settings_path)

    def claim(self) -> RunFolder:
        if self.path.exists() and not self.path.is_dir():
            raise ClipcidError(f"--out {self.path} is a file, not a folder; give a folder path")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        previous = self.recorded()
        if previous is not None:
            old = previous.get("settings", {})
            if old != self.settings and self._holds_outputs():
                if not self.overwrite:
                    self.release()
                    raise ClipcidError(
                        f"{self.path} holds a run with other settings ({settings_difference(old, self.settings)}); "
                        "use another --out, or --overwrite to replace it"
                    )
                log.warning("--overwrite: clearing %s (it held a run with other settings)", self.path)
                self._clear()
        remove_stale_temporaries(self.path)
        if previous is None or not previous.get("complete") or self.overwrite:
            save_json_atomic(self.settings_path, {"settings": self.settings, "complete": False})
        return self

    def update(self, summary: dict) -> None:
        """Describe the run while it is still going (not complete)."""
        save_json_atomic(self.settings_path, {**summary, "settings": self.settings, "complete": False})

    def is_complete(self) -> bool:
        return self.finished_run() is not None

    def finished_run(self, whole: Callable[[], bool] | None = None) -> dict | None:
        """The flat view `finish` returned, when the folder holds a complete run with these very settings
        and `whole()` finds its outputs all there; else None. Stages ask this first, so that a finished run
        costs a file read, not a model load (and a file deleted since is made again)."""
        previous = self.recorded()
        if not (previous and previous.get("complete") and previous.get("settings") == self.settings):
            return None
        if whole is not None and not whole():
            return None
        summary = {k: v for k, v in previous.items() if k not in ("settings", "complete")}
        return {**self.settings, **summary, "complete": True}

    def finish(self, summary: dict | None = None) -> dict:
        """Record the run as complete (its summary and settings), atomically, last. Returns the flat
        view callers print: settings, then the summary."""
        save_json_atomic(self.settings_path, {**(summary or {}), "settings": self.settings, "complete": True})
        return {**self.settings, **(summary or {}), "complete": True}

    def discard(self) -> None:
        """Forget an unfinished run whose outputs are not worth keeping (its input was refused after a
        cheap first pass): the folder then holds nothing that a run with other settings must respect."""
        self._clear()
        save_json_atomic(self.settings_path, {"settings": self.settings, "complete": False})

    def release(self) -> None:
        if self._locked:
            with contextlib.suppress(FileNotFoundError):
                (self.path / self.LOCK).unlink()
            self._locked = False

    def __enter__(self) -> RunFolder:
        return self.claim()

    def __exit__(self, *exc) -> None:
        self.release()

    def _holds_outputs(self) -> bool:
        """Whether the run before got as far as writing anything (a run that stopped in its set-up, on a
        bad flag say, holds nothing to protect)."""
        return any(child.name not in (self.LOCK, self.settings_file) for child in self.path.iterdir())

    def _clear(self) -> None:
        for child in self.path.iterdir():
            if child.name == self.LOCK:
                continue
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    def _lock(self) -> None:
        lock = self.path / self.LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = _read_lock(lock)
                if holder and _process_gone(holder):
                    log.warning(
                        "%s: taking over the lock of pid %s (%s), which is gone",
                        self.path,
                        holder["pid"],
                        holder["host"],
                    )
                    lock.unlink(missing_ok=True)
                    continue
                who = f"pid {holder['pid']} on {holder['host']} since {holder['since']}" if holder else "another run"
                raise ClipcidError(
                    f"{self.path} is in use by {who}; wait for it to finish, or delete {lock} if that run is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self._locked = True
            return
        raise ClipcidError(f"could not lock {self.path}; delete {lock} if no run is using the folder")


def _read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
        return holder if {"pid", "host", "since"} <= set(holder) else None
    except (OSError, ValueError):
        return None


def _process_gone(holder: dict) -> bool:
    """Whether the run holding a lock is over: its process is gone, or it is this very process (an
    earlier stage call in it that was interrupted before it could let go)."""
    if holder["host"] != socket.gethostname():
        return False  # cannot tell from here
    pid = int(holder["pid"])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
