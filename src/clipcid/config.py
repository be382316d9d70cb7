"""Stage configs are dataclasses; each field carries its command-line help here, so the CLI is generated
from them (cli.py) and every setting a stage has can be reached from the command line."""

from __future__ import annotations

import dataclasses
import os
from typing import Any


def option(
    default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None, default_factory: Any = None
) -> Any:
    """A config field with its help text (and allowed values) for the generated CLI."""
    return dataclasses.field(
        default=default,
        default_factory=default_factory or dataclasses.MISSING,
        metadata={"help": help, "choices": choices},
    )


def default_workers() -> int:
    """Data-loading processes: one per core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))
