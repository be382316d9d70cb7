"""The demo's recipe (clipcid/configs/demo.json): read by the demo, and by the study for its base."""

from __future__ import annotations

import json
from pathlib import Path

from clipcid.errors import ClipcidError

RECIPE = Path(__file__).parent / "configs" / "demo.json"


def load_recipe(quick: bool = False, path: str | None = None) -> dict:
    """The 'full' recipe (what `make demo` runs) or the 'quick' one, from `path` or the shipped file."""
    file = Path(path) if path else RECIPE
    if not file.is_file():
        raise ClipcidError(f"demo recipe not found: {file}")
    return json.loads(file.read_text())["quick" if quick else "full"]
