"""Numeric precision, named the same way in every stage: fp32, bf16 or fp16 autocast.

open_clip's training names (amp_bf16, amp) are accepted as aliases so that its users' habits work.
"""

from __future__ import annotations

import contextlib

import torch

from clipcid.errors import ClipcidError

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
ALIASES = {"amp_bf16": "bf16", "amp": "fp16"}
CHOICES = (*AUTOCAST_DTYPES, *ALIASES)


def canonical(precision: str) -> str:
    name = ALIASES.get(precision, precision)
    if name not in AUTOCAST_DTYPES:
        raise ClipcidError(f"--precision must be one of {', '.join(CHOICES)}, not {precision!r}")
    return name


def autocast(device: torch.device, precision: str):
    """Autocast context for `precision` on `device` (a no-op for fp32)."""
    dtype = AUTOCAST_DTYPES[canonical(precision)]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def needs_grad_scaler(precision: str, device: torch.device) -> bool:
    return canonical(precision) == "fp16" and device.type == "cuda"
