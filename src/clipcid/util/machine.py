"""What machine a figure was measured on: the CPU's name, for reports and benchmark tables."""

from __future__ import annotations

import platform
from functools import cache


@cache
def cpu_name() -> str:
    """The processor's model name (Linux /proc/cpuinfo), else what the platform module says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
