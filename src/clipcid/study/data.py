"""The data a study's runs train on: the artifacts it was given (a demo's, or flags), the stages it runs for
data variants (teachers, balances, clusters) cached in the study folder by their settings, and the
evaluations of runs and teachers at a split."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from clipcid.balance import BalanceConfig, balance
from clipcid.cluster import ClusterConfig, cluster
from clipcid.distill.train import DistillConfig, distill
from clipcid.evaluation.run import (
    SUITE_EVAL_KEYS,
    EvalSuiteConfig,
    run_eval_suite,
    suite_evaluation_folder,
)
from clipcid.stage import digest
from clipcid.study.plan import GIVEN, TEST, _key

if TYPE_CHECKING:
    pass


class DataCache:
    """Teachers, balance and clusters of each data variant, made once inside the study folder (each stage
    returns at once when its folder finished with the same settings: stage.py's rule)."""

    def __init__(self, out: Path, artifacts: dict, workers: int):
        self.out, self.artifacts, self.workers = out / "data", artifacts, workers
        # Each teacher's (architecture, weights), so that a plan's many variants check its stages once.
        self._teacher_runs: dict[str, tuple[str, str]] = {}

    def _stage(self, kind: str, spec: dict, run) -> str:
        folder = self.out / f"{kind}-{_key(spec)}"
        run(str(folder))
        return str(folder)

    def teacher(self, spec) -> str:
        """The teacher's embeddings folder."""
        if spec == GIVEN:
            return self.artifacts["teacher_emb"]
        if "emb" in spec:
            return spec["emb"]
        folder = self.out / f"teacher-{_key(spec)}"
        self._teacher_run(spec, folder)
        return str(folder / "emb")

    def _teacher_run(self, spec: dict, folder: Path) -> tuple[str, str]:
        """Train the teacher (each step returns at once when finished) and embed the corpus with it;
        returns (architecture, weights)."""
        key = _key(spec)
        if key not in self._teacher_runs:
            self._teacher_runs[key] = self._make_teacher(spec, folder)
        return self._teacher_runs[key]

    def _make_teacher(self, spec: dict, folder: Path) -> tuple[str, str]:
        from clipcid.distill.checkpoint import student_path
        from clipcid.embed import EmbedConfig, embed
        from clipcid.lit import LitConfig, lit, model_path

        data, holdout = self.artifacts["data"], self.artifacts.get("holdout")
        if "lit" in spec:
            cfg = LitConfig(
                data=data, out=str(folder / "run"), emb_out=str(folder / "emb"), holdout=holdout, workers=self.workers,
                **spec["lit"],
            )  # fmt: skip
            lit(cfg)
            return cfg.model, str(model_path(folder / "run"))
        train = DistillConfig(
            data=data, out=str(folder / "run"), holdout=holdout, workers=self.workers, resume="latest", **spec["clip"]
        )
        distill(train)
        weights = str(student_path(folder / "run"))
        embed(
            EmbedConfig(data=data, model=train.model, out=str(folder / "emb"), pretrained=weights, workers=self.workers)
        )
        return train.model, weights

    def teacher_evaluation(self, spec, split: str = TEST) -> dict | None:
        """The teacher's suite evaluation at `split` (once, in its folder): {"summary", "tasks", ...}; None
        for embeddings given without their model."""
        if spec == GIVEN:
            model, weights = self.artifacts.get("teacher_model"), self.artifacts.get("teacher_weights")
            if not (model and weights):
                return None
            folder = self.out / "teacher-given"
        elif "emb" in spec:
            return None
        else:
            folder = self.out / f"teacher-{_key(spec)}"
            model, weights = self._teacher_run(spec, folder)
        return evaluate_at(folder / f"eval-{split}", model, weights, self.artifacts["suite_root"], split, self.workers)

    def held_out_guard(self, metric: str = "l2") -> dict:
        """{"held_out_threshold": radius in `metric`} of the artifacts' balance: the training rows it kept
        from the held-out pictures. Every data variant in the main teacher's space keeps the same ones
        (a weaker balance would otherwise train on near-copies of held-out pictures, no balance on all of
        them, and the seen-distribution figures would measure that leak); {} without a hold-out."""
        from clipcid.balance.run import from_similarity, to_similarity

        if self._given_radius is None:
            return {}
        radius, given_metric = self._given_radius
        return {"held_out_threshold": from_similarity(to_similarity(radius, given_metric), metric)}

    @functools.cached_property
    def _given_radius(self) -> tuple[float, str] | None:
        """The artifacts' balance's held-out radius, read once (every run's settings ask for it)."""
        from clipcid.balance.artifact import held_out_radius

        given = self.artifacts.get("balance")
        return held_out_radius(given) if self.artifacts.get("holdout") and given else None

    def balance(self, spec, seed: int, teacher=GIVEN) -> str | None:
        if spec == GIVEN:
            return self.artifacts["balance"]  # the artifacts' keep mask, whichever the teacher
        if spec is None or "random_removal" in spec:
            # No balance is random removal of nothing; neither depends on the teacher beyond the guard.
            guard = self.held_out_guard()
            if spec is None and not guard:
                return None
            spec, teacher = {"random_removal": 0.0, **(spec or {}), **guard}, GIVEN
        elif teacher == GIVEN:
            spec = {**spec, **self.held_out_guard(spec.get("metric", "l2"))}
        if "random_removal" in spec:
            spec = {**spec, "seed": seed}  # a control drawn anew per seed
        holdout = self.artifacts.get("holdout")
        emb = self.teacher(teacher)
        key = spec if teacher == GIVEN else {**spec, "teacher": teacher}
        return self._stage(
            "balance", key, lambda out: balance(BalanceConfig(emb=emb, out=out, holdout=holdout, **spec))
        )

    def clusters(self, balance_spec, cluster_spec, seed: int, teacher=GIVEN) -> str:
        if balance_spec == GIVEN and cluster_spec == GIVEN and teacher == GIVEN:
            return self.artifacts["clusters"]
        balance_dir = self.balance(balance_spec, seed, teacher)
        emb = self.teacher(teacher)
        settings = {} if cluster_spec == GIVEN else dict(cluster_spec)
        spec = {"balance": balance_dir, **settings, **({} if teacher == GIVEN else {"teacher": teacher})}
        return self._stage(
            "clusters",
            spec,
            lambda out: cluster(
                ClusterConfig(emb=emb, out=out, balance=balance_dir, holdout=self.artifacts.get("holdout"), **settings)
            ),
        )


def evaluation_folder(folder: Path, split: str) -> Path:
    return folder / f"eval-{split}"


def _suite_evaluation(folder: Path, model: str, weights: str | None, suite_root: str, split: str, workers: int,
                      student: dict) -> EvalSuiteConfig:  # fmt: skip
    """A student's suite evaluation at `split` in `folder`, named by the student's settings: a suite
    rebuilt (new tasks, the validation split) or a student retrained means evaluating again (a stale
    evaluation is replaced), never training again."""
    return EvalSuiteConfig(model, str(folder), weights, suite_root, workers=workers, split=split,
                           weights_identity=digest(student), overwrite=True)  # fmt: skip


def evaluate_at(folder: Path, model: str, weights: str, suite_root: str, split: str, workers: int,
                student: dict | None = None) -> dict:  # fmt: skip
    """A model's suite evaluation at `split` in `folder`, done once per (suite, split, student). Returns
    {"split", "summary", "tasks", "eval_seconds"}."""
    student = student or {"model": model, "weights": weights}
    result = run_eval_suite(_suite_evaluation(folder, model, weights, suite_root, split, workers, student))
    return {k: result[k] for k in SUITE_EVAL_KEYS}


def evaluate_run(folder: Path, settings: dict, suite_root: str, split: str, workers: int) -> dict:
    """A study run's student evaluated at `split` (once)."""
    from clipcid.distill.checkpoint import student_path

    weights = str(student_path(folder / "train"))
    return evaluate_at(evaluation_folder(folder, split), settings["model"], weights, suite_root, split, workers,
                       settings)  # fmt: skip


def read_evaluation(folder: Path, settings: dict, suite_root: str, split: str) -> dict | None:
    """A study run's finished evaluation at `split` of this suite and this student, or None."""
    cfg = _suite_evaluation(evaluation_folder(folder, split), settings["model"], None, suite_root, split, 0, settings)
    done = suite_evaluation_folder(cfg).finished_run()
    return None if done is None else {k: done[k] for k in SUITE_EVAL_KEYS}
