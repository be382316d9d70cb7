"""layout.py: the run folder's paths in one place, an earlier demo's suite found where it was, and a check
over the source that every file name is spelled by one owner module only."""

from __future__ import annotations

import ast
import json
import re
from collections import defaultdict
from pathlib import Path

from clipcid.layout import RunLayout

SRC = Path(__file__).resolve().parent.parent / "src" / "clipcid"
FILE_NAME = re.compile(r"^[\w.-]+\.(json|jsonl|pt|png|md|html|npy|npz|parquet|csv|txt|tar|safetensors)$")

# Names two modules own, each for an artifact of its own: listed here, both owners named.
SHARED = {
    "stats.json": {"balance/artifact.py", "cluster/artifact.py"},
    "settings.json": {"balance/run.py", "cluster/artifact.py"},  # the edge cache's, the k-means cells'
    "params.json": {"distill/checkpoint.py", "lit.py"},
    "model.pt": {"distill/checkpoint.py", "lit.py"},  # a checkpoint's student; a LiT teacher
    "train_log.jsonl": {"distill/checkpoint.py", "lit.py"},
    "run.json": {"layout.py", "study/runner.py"},  # the run folder's stage times; a study run's record
    "weights.json": {"evaluation/inside.py", "study/runner.py"},  # a run's students; a study's cache of them
    "showcase.json": {"evaluation/run.py", "demo.py"},  # held-out pairs per model; the demo's names
    "info.json": {"corpus/eval_suite.py", "corpus/sources.py"},  # a suite dataset's; an npm set's
}


def file_name_literals() -> dict[str, set[str]]:
    """{file name: modules whose code (not docstrings) holds it as a whole string constant}."""
    found: dict[str, set[str]] = defaultdict(set)
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if FILE_NAME.match(node.value):
                    found[node.value].add(path.relative_to(SRC).as_posix())
    return found


def test_every_file_name_is_spelled_by_its_owner_module_only():
    found = file_name_literals()
    assert "holdout.json" in found and "recipe.json" in found  # the check sees what it should
    spelled_twice = {
        name: sorted(modules) for name, modules in found.items() if len(modules) > 1 and modules != SHARED.get(name)
    }
    assert not spelled_twice, (
        f"file names spelled outside their owner module: {spelled_twice}; import the owner's constant or "
        "accessor (or, for two artifacts of one name, list both owners in SHARED)"
    )
    stale = {name: sorted(owners) for name, owners in SHARED.items() if found.get(name) != owners}
    assert not stale, f"SHARED names owners that no longer spell these names: {stale}"


def test_the_folder_spells_each_place_once(tmp_path):
    layout = RunLayout(tmp_path / "out")
    places = [layout.holdout, layout.teacher_emb, layout.balance, layout.clusters, layout.run("student"),
              layout.evaluation("student"), layout.model("student"), layout.inside, layout.corpus, layout.suite,
              layout.showcase, layout.study, layout.recipe, layout.run_record]  # fmt: skip
    assert len(set(places)) == len(places) and all(p.is_relative_to(tmp_path / "out") for p in places)
    assert layout.read_recipe() is None and layout.read_run_record() == {"stages": {}}
    layout.out.mkdir()
    layout.recipe.write_text(json.dumps({"run": {"data": "d"}}))
    assert layout.read_recipe() == {"run": {"data": "d"}}


def test_a_demo_made_before_the_suite_had_its_own_folder_finds_it_where_it_is(tmp_path):
    layout = RunLayout(tmp_path)
    assert layout.suite == tmp_path / "suite"
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "suite.json").write_text("{}")  # a finished demo of an earlier clipcid
    assert layout.suite == tmp_path / "eval"
