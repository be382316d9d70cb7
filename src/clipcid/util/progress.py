"""Progress: a tqdm bar on a terminal, plain periodic log lines otherwise (CI logs, nohup, files)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
log = logging.getLogger("clipcid")
_bars_allowed = True


def log_lines_only() -> None:
    """Progress as log lines even on a terminal: for processes that share one (util/side_by_side.py)."""
    global _bars_allowed
    _bars_allowed = False


def setup_logging(verbose: bool = False) -> None:
    # Libraries (open_clip logs model creation on the root logger) speak only on warnings unless -v.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


class LogProgress:
    """A tqdm-like counter that logs a line at most every `interval` seconds."""

    def __init__(self, total: int | None, desc: str, unit: str, interval: float = 30.0):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval or (self.total is not None and self.n >= self.total):
            self.last = now
            rate = self.n / max(now - self.start, 1e-9)
            of = f"/{self.total}" if self.total is not None else ""
            log.info("%s: %d%s %s (%.1f %s/s)", self.desc, self.n, of, self.unit, rate, self.unit)

    def close(self) -> None:
        pass

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True) -> tqdm | LogProgress:
    if enabled and _bars_allowed and sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
    return LogProgress(total, desc, unit, interval=30.0 if enabled else float("inf"))


def track(items: Iterable[T], total: int | None, desc: str, unit: str = "it") -> Iterator[T]:
    with progress_bar(total, desc, unit) as bar:
        for item in items:
            yield item
            bar.update(1)
