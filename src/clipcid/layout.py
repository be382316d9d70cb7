"""The folder `clipcid run` and `clipcid demo` write: the only place its paths are spelled.

    OUT/
      recipe.json        the settings of every stage (pipeline.py), read with read_recipe
      run.json           when each stage last did its work, its time and what it made (pipeline.StageTimes)
      holdout/           holdout.py
      teacher_emb/       embed/artifact.py (unless the run was given --teacher-emb)
      balance/           balance/artifact.py
      clusters/          cluster/artifact.py
      runs/NAME/         a student's training (distill/checkpoint.py); the demo's teacher (lit.py)
      eval/NAME/         a model's evaluation (evaluation/run.py)
      models/NAME/       a model as a folder plain open_clip loads (export.py); models/models.json its index
      inside/            the students' weights and patch features (evaluation/inside.py)
      results.json, results.md, report.html    the results and the page (report.py)
    and the demo's own:
      corpus/            the rendered shards (corpus/build.py)
      suite/             the held-out evaluation suite (corpus/eval_suite.py); in eval/ for a demo made
                         before it had a folder of its own, and found there
      showcase/          the models at work on names (demo.py)
      study/             the studies (the study package, paper.py)

What is inside each stage's folder is its owner module's to spell.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from clipcid.evaluation.datasets import is_suite

RECIPE_FILE = "recipe.json"
RUN_FILE = "run.json"

# The models of a run, by the name of their folders under runs/, eval/ and models/.
TEACHER, BASELINE, STUDENT = "teacher", "baseline", "student"


@dataclass(frozen=True)
class RunLayout:
    out: Path

    def __init__(self, out: str | Path):
        object.__setattr__(self, "out", Path(out))

    @property
    def recipe(self) -> Path:
        return self.out / RECIPE_FILE

    @property
    def run_record(self) -> Path:
        return self.out / RUN_FILE

    @property
    def holdout(self) -> Path:
        return self.out / "holdout"

    @property
    def teacher_emb(self) -> Path:
        return self.out / "teacher_emb"

    @property
    def balance(self) -> Path:
        return self.out / "balance"

    @property
    def clusters(self) -> Path:
        return self.out / "clusters"

    def run(self, name: str) -> Path:
        return self.out / "runs" / name

    def evaluation(self, name: str) -> Path:
        return self.out / "eval" / name

    @property
    def models(self) -> Path:
        return self.out / "models"

    def model(self, name: str) -> Path:
        return self.models / name

    @property
    def inside(self) -> Path:
        return self.out / "inside"

    # -- the demo's own

    @property
    def corpus(self) -> Path:
        return self.out / "corpus"

    @property
    def suite(self) -> Path:
        """The demo's suite: OUT/suite, or OUT/eval where a finished demo of an earlier clipcid built it
        (so that running it again redoes nothing)."""
        earlier = self.out / "eval"
        return earlier if is_suite(earlier) else self.out / "suite"

    @property
    def showcase(self) -> Path:
        return self.out / "showcase"

    @property
    def study(self) -> Path:
        return self.out / "study"

    # -- readers of the two files the run folder itself holds

    def read_recipe(self) -> dict | None:
        """The resolved settings of the run (recipe.json), or None before the first run."""
        return json.loads(self.recipe.read_text()) if self.recipe.is_file() else None

    def read_run_record(self) -> dict:
        """run.json: {"stages": {name: {"seconds", ..., "identity", "at"}}, "complete", ...}; empty before
        any stage ran."""
        return json.loads(self.run_record.read_text()) if self.run_record.is_file() else {"stages": {}}
