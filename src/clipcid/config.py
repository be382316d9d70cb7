"""Stage configs are dataclasses; each field carries its command-line help here, so the CLI is generated
from them (cli.py) and every setting a stage has can be reached from the command line. A field may
also carry its bounds, so that every stage checks its numbers the same way on entry (`validate`)."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from clipcid.errors import ClipcidError


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    choices: tuple | None = None,
    default_factory: Any = None,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
) -> Any:
    """A config field with its help text (and allowed values or bounds) for the generated CLI."""
    bounds = {k: v for k, v in (("above", above), ("at_least", at_least), ("below", below), ("at_most", at_most))}
    return dataclasses.field(
        default=default,
        default_factory=default_factory or dataclasses.MISSING,
        metadata={"help": help, "choices": choices, **{k: v for k, v in bounds.items() if v is not None}},
    )


def default_of(config: type, name: str) -> Any:
    """A config class's default for one field: help text elsewhere reads it rather than restating it."""
    return next(f.default for f in dataclasses.fields(config) if f.name == name)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bounds_text(meta: dict) -> str:
    parts = []
    if "above" in meta:
        parts.append(f"above {meta['above']:g}")
    if "at_least" in meta:
        parts.append(f"at least {meta['at_least']:g}")
    if "below" in meta:
        parts.append(f"below {meta['below']:g}")
    if "at_most" in meta:
        parts.append(f"at most {meta['at_most']:g}")
    return " and ".join(parts)


def validate(cfg: Any) -> None:
    """One clear line for the first setting of `cfg` outside its bounds or choices (NaN and infinities
    are outside every bound). Every stage calls this on entry, the Python API as the command line."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        meta = f.metadata
        if value is None:
            continue
        choices = meta.get("choices")
        if choices and value not in choices:
            raise ClipcidError(f"{flag(f.name)} must be one of {', '.join(map(str, choices))}, not {value}")
        if not any(k in meta for k in ("above", "at_least", "below", "at_most")):
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and ("above" not in meta or v > meta["above"])
            ok = ok and ("at_least" not in meta or v >= meta["at_least"])
            ok = ok and ("below" not in meta or v < meta["below"])
            ok = ok and ("at_most" not in meta or v <= meta["at_most"])
            if not ok:
                raise ClipcidError(f"{flag(f.name)} must be a number {_bounds_text(meta)}, not {v}")


def default_workers() -> int:
    """Data-loading processes: one per core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))
