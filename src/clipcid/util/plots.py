"""Figures for stats folders and the report: matplotlib without a display, saved atomically."""

from __future__ import annotations

import io
from pathlib import Path

from clipcid.util.fileio import atomic_path


def new_figure(width: float = 6.0, height: float = 4.0, ncols: int = 1, nrows: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows=nrows, ncols=ncols, figsize=(width, height))


def save_png(fig, path: str | Path | None = None, dpi: int = 100) -> bytes | None:
    """Write the figure to `path` (atomically), or return its PNG bytes when no path is given."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        if path is None:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=dpi)
            return buf.getvalue()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
        return None
    finally:
        plt.close(fig)
