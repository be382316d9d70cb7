"""The learning-rate schedule every trainer here uses: linear warm-up, then cosine decay to zero."""

from __future__ import annotations

import math


def cosine_with_warmup(step: int, lr: float, warmup: int, total: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * lr
