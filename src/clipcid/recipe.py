"""The demo's recipes (clipcid/configs/demo.json and demo-quick.json), in the schema of `clipcid run`'s
recipe.json plus the demo's own sections (corpus, lit): read by the demo, and by the study for its base."""

from __future__ import annotations

from pathlib import Path

from clipcid.errors import ClipcidError
from clipcid.util.fileio import read_user_json

CONFIGS = Path(__file__).parent / "configs"
RECIPE = CONFIGS / "demo.json"
QUICK_RECIPE = CONFIGS / "demo-quick.json"


def recipe_path(quick: bool = False, path: str | None = None) -> Path:
    return Path(path) if path else (QUICK_RECIPE if quick else RECIPE)


def load_recipe(quick: bool = False, path: str | None = None) -> dict:
    """The full recipe (what `make demo` runs), the quick one, or the file at `path`."""
    file = recipe_path(quick, path)
    recipe = read_user_json(file, "demo recipe")
    missing = [s for s in ("corpus", "lit", "distill") if s not in recipe]
    if missing:
        raise ClipcidError(f"demo recipe {file} has no section {', '.join(missing)} (see clipcid/configs/demo.json)")
    return recipe
