"""`clipcid study`: student variants × seeds on one set of artifacts, with error bars.

A plan (JSON; the demo's are clipcid/configs/study*.json) names a reference variant, seeds (and
"group_seeds": seeds of its own for a group, e.g. more for the methods), a base training recipe and
variants. A variant overrides the base's DistillConfig fields ("train") and/or the data ("data":
{"teacher": ..., "balance": ..., "cluster": ...}): "given" uses the artifacts' folder, null drops
the stage (no balance: train on every valid row), an object runs the stage with those settings
inside the study folder (cached, shared by every variant that asks for the same; random removal is
drawn per seed). A teacher is {"lit": LitConfig fields} (`clipcid lit`), {"clip": DistillConfig
fields} (trained from scratch with the CLIP loss, then `clipcid embed`), or {"emb": FOLDER}; it is
evaluated on the suite, and its embeddings are the targets; with another teacher, "given" clusters
are the artifacts' cluster settings on its embeddings, while a "given" balance is the artifacts'
keep mask. "same_steps_as": VARIANT trains for as many steps as that variant did with the same seed.
"comparisons": [[A, B], ...] asks for A minus B besides each variant minus the reference (the plan's
questions that are not about the reference, e.g. CID against the strongest baseline).

Per seed, every variant starts from the same student initialisation and reads the same data in the
same order where its data are the same (both follow DistillConfig.seed). Each (variant, seed) is a
distill run plus a held-out evaluation in OUT/runs/VARIANT/seedS/; it resumes from its checkpoints
and is skipped once its evaluation is written. After every run, OUT/PLAN.json (PLAN: the plan file's
name, e.g. study; every run's settings and per-task metrics), PLAN.md and PLAN.csv (mean ± sd over
seeds; against the reference, the paired difference per seed with a 95 % t interval) and PLAN.png
are rewritten from what is finished, so several plans share one folder and the runs they have in
common (same variant name, same settings). Variants with an "x" (e.g. epochs) and a "series" are
also drawn as curves, PLAN_curves.png.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from clipcid.balance import BalanceConfig, balance
from clipcid.cluster import ClusterConfig, cluster
from clipcid.config import option
from clipcid.distill.train import DistillConfig, distill
from clipcid.errors import ClipcidError
from clipcid.evaluation.run import AVERAGES, SUMMARY_FILE, EvalSuiteConfig, run_eval_suite, task_figures
from clipcid.util.fileio import atomic_path, output_folder, read_user_json, save_json_atomic
from clipcid.util.plots import new_figure, save_png
from clipcid.util.tables import markdown_table

log = logging.getLogger("clipcid")


def bundled_plan(name: str) -> Path:
    """A plan shipped in the package (src/clipcid/configs/NAME.json)."""
    return Path(__file__).parent / "configs" / f"{name}.json"


PLAN = bundled_plan("study")
GIVEN = "given"
TEST, VALIDATION = "test", "validation"
TUNING = "tuning"
TEACHER_KINDS = {"lit", "clip", "emb"}


@dataclass
class StudyConfig:
    out: str = option(help="study folder: runs/, data/, study.json, study.md, study.csv, study.png")
    plan: str = option(str(PLAN), "plan JSON (default: the one shipped for the demo)")
    demo: str | None = option(None, "a finished `clipcid demo` folder: its artifacts and recipe")
    data: str | None = option(None, "training shards")
    teacher_emb: str | None = option(None, "teacher embeddings folder")
    balance: str | None = option(None, 'balance folder of the plan\'s "given" data')
    clusters: str | None = option(None, 'clusters folder of the plan\'s "given" data')
    suite_root: str | None = option(None, "held-out suite (clipcid data build-eval)")
    seeds: list[int] | None = option(None, "seeds to run (default: the plan's)")
    only: list[str] | None = option(None, "run only these variants (and those they take their steps from)")
    holdout: str | None = option(None, "hold-out folder (clipcid holdout): never trained on")
    teacher_model: str | None = option(None, "the teacher's architecture, to evaluate it (default: the demo's)")
    teacher_weights: str | None = option(None, "the teacher's weights (with --teacher-model)")
    workers: int = option(2, "data loading processes of each run (it sets the data order: keep it fixed)", at_least=0)
    overwrite: bool = option(False, "redo a run whose settings the plan has changed")
    tuned_from: str | None = option(None, "the study folder holding the tuning plans' choices (default: --out)")


@dataclass
class Variant:
    name: str
    label: str
    group: str
    train: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    same_steps_as: str | None = None
    seeds: list[int] = field(default_factory=list)  # the plan's seeds for the variant's groups
    series: str | None = None  # a curve of the plan (e.g. a method over training lengths) ...
    x: float | None = None  # ... and the variant's place on it
    # {"plan": TUNING_PLAN, "series": SERIES}: the training settings the tuning plan chose for that series
    # on validation figures, under this variant's own "train" overrides (e.g. epochs).
    tuned: dict | None = None
    # A student that never trains: its random initialisation, evaluated (the floor of every table).
    untrained: bool = False


def groups_of(group: str) -> list[str]:
    return [g.strip() for g in group.split(",") if g.strip()]


@dataclass
class Plan:
    reference: str
    seeds: list[int]
    base: dict
    variants: list[Variant]
    # Further questions the plan asks, as (variant, against) pairs: each gets its paired differences.
    comparisons: list[tuple[str, str]] = field(default_factory=list)
    # Variants whose students' last-layer weights are compared over seeds (the paper's Fig. 4).
    weights: list[str] = field(default_factory=list)
    # Which figures the plan reads: "test" (what tables report) or "validation" (what choices are made on).
    split: str = TEST
    # A tuning plan chooses a setting per series by the mean of these suite averages on validation.
    purpose: str = "comparison"
    select_by: list[str] = field(default_factory=list)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ClipcidError(f"the plan has no variant '{name}' (it has {', '.join(v.name for v in self.variants)})")


def _check_teacher(teacher, where: str) -> None:
    """A teacher spec is "given", {"lit": LitConfig fields}, {"clip": DistillConfig fields} or {"emb": FOLDER}."""
    from clipcid.lit import LitConfig

    if teacher == GIVEN:
        return
    if not (isinstance(teacher, dict) and len(teacher) == 1 and set(teacher) <= TEACHER_KINDS):
        raise ClipcidError(
            f'{where}: a teacher is "given", {{"lit": {{...}}}}, {{"clip": {{...}}}} or {{"emb": FOLDER}}'
        )
    kind, spec = next(iter(teacher.items()))
    if kind == "emb":
        return
    config = LitConfig if kind == "lit" else DistillConfig
    unknown = sorted(set(spec) - {f.name for f in fields(config)} | ({"data", "out"} & set(spec)))
    if unknown or "model" not in spec:
        what = f"{', '.join(unknown)} are not {kind} settings here" if unknown else "a teacher needs its model"
        raise ClipcidError(f"{where}: teacher {kind}: {what}")


def load_plan(path: str, base_train: dict) -> Plan:
    raw = read_user_json(path, "study plan")
    known = {f.name for f in fields(DistillConfig)}
    variants = []
    for item in raw.get("variants", []):
        if "name" not in item:
            raise ClipcidError(f"{path}: every variant needs a name")
        unknown = sorted(set(item.get("train", {})) - known)
        if unknown:
            raise ClipcidError(f"{path}: variant {item['name']}: {', '.join(unknown)} are not distill settings")
        bad = sorted(set(item.get("data", {})) - {"teacher", "balance", "cluster"})
        if bad:
            raise ClipcidError(
                f"{path}: variant {item['name']}: data takes teacher, balance and cluster, not {', '.join(bad)}"
            )
        _check_teacher(item.get("data", {}).get("teacher", GIVEN), f"{path}: variant {item['name']}")
        group = item.get("group", "")
        group_seeds = raw.get("group_seeds", {})
        seeds = sorted({s for g in groups_of(group) for s in group_seeds.get(g, raw.get("seeds", [0]))})
        variants.append(
            Variant(
                item["name"],
                item.get("label", item["name"]),
                group,
                item.get("train", {}),
                item.get("data", {}),
                item.get("same_steps_as"),
                seeds or list(raw.get("seeds", [0])),
                item.get("series"),
                item.get("x"),
                _check_tuned(item.get("tuned"), f"{path}: variant {item['name']}"),
                bool(item.get("untrained", False)),
            )
        )
    if len({v.name for v in variants}) != len(variants):
        raise ClipcidError(f"{path}: variant names must be unique")
    base = {**base_train, **raw.get("base", {}).get("train", {})}
    unknown = sorted(set(base) - known)
    if unknown:
        raise ClipcidError(f"{path}: base: {', '.join(unknown)} are not distill settings")
    if "model" not in base:
        raise ClipcidError(f"{path}: the base recipe names no student model (base.train.model)")
    comparisons = raw.get("comparisons", [])
    if not all(isinstance(c, list) and len(c) == 2 and all(isinstance(n, str) for n in c) for c in comparisons):
        raise ClipcidError(f'{path}: comparisons must be pairs of variant names, e.g. [["cid", "fd"]]')
    split, purpose, select_by = raw.get("split", TEST), raw.get("purpose", "comparison"), raw.get("select_by", [])
    if split not in (TEST, VALIDATION):
        raise ClipcidError(f'{path}: "split" is "test" or "validation", not {split!r}')
    if purpose == TUNING:
        if split != VALIDATION:
            raise ClipcidError(
                f'{path}: a tuning plan chooses settings, so it reads validation figures only; it asks for "{split}". '
                'Set "split": "validation" (test figures are for the plan that runs the chosen settings)'
            )
        averages = {key for key, _ in AVERAGES}
        if not select_by or not set(select_by) <= averages:
            raise ClipcidError(
                f'{path}: a tuning plan names its criterion before its runs: "select_by", suite averages among '
                f"{', '.join(sorted(averages))}"
            )
    plan = Plan(
        raw.get("reference", variants[0].name if variants else ""),
        raw.get("seeds", [0]),
        base,
        variants,
        [(a, b) for a, b in comparisons],
        list(raw.get("weights", [])),
        split,
        purpose,
        list(select_by),
    )
    plan.variant(plan.reference)
    for name in plan.weights:
        plan.variant(name)
    for pair in plan.comparisons:
        for name in pair:
            plan.variant(name)
    for v in variants:
        if v.same_steps_as:
            plan.variant(v.same_steps_as)
    return plan


def _check_tuned(tuned, where: str) -> dict | None:
    if tuned is None:
        return None
    ok = isinstance(tuned, dict) and (
        set(tuned) == {"plan", "series"}
        or (set(tuned) == {"plan", "best_of"} and isinstance(tuned["best_of"], list) and tuned["best_of"])
    )
    if not ok:
        raise ClipcidError(
            f'{where}: "tuned" is {{"plan": TUNING_PLAN_NAME, "series": SERIES}} or {{"plan": ..., "best_of": '
            "[SERIES, ...]} (the series whose chosen setting scored highest)"
        )
    return tuned


# -- data variants -------------------------------------------------------------------------------


def _key(spec: object) -> str:
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


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


# -- runs ----------------------------------------------------------------------------------------


def run_folder(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / variant / f"seed{seed}"


RUN_FILE = "run.json"
EVAL_FILE = "evaluation.json"


def training_record(record: dict) -> dict:
    """What run.json says of the training (a record written before evaluations had folders of their own
    also carries that old evaluation: it is not this plan's and is left out)."""
    return {k: v for k, v in record.items() if k in ("variant", "seed", "steps", "train_seconds", "trained_as")}


def evaluation_folder(folder: Path, split: str) -> Path:
    return folder / f"eval-{split}"


EVAL_KEYS = ("split", "summary", "tasks", "eval_seconds")


def _evaluation_folder(folder: Path, student: dict, suite_root: str, split: str):
    """The evaluation's run folder, its settings naming what its figures follow from: the split, the
    suite (its datasets and their splits) and the student."""
    from clipcid.evaluation.datasets import suite_identity
    from clipcid.stage import RunFolder, digest

    settings = {"split": split, "suite": suite_identity(suite_root), "student": digest(student)}
    return RunFolder(folder, EVAL_FILE, settings, overwrite=True)  # a stale evaluation is redone


def evaluate_at(folder: Path, model: str, weights: str, suite_root: str, split: str, workers: int,
                student: dict | None = None) -> dict:  # fmt: skip
    """A model's suite evaluation at `split` in `folder`, done once per (suite, split, student): a suite
    rebuilt (new tasks, the validation split) or a student retrained means evaluating again, never
    training again. Returns {"split", "summary", "tasks", "eval_seconds"}."""
    run = _evaluation_folder(folder, student or {"model": model, "weights": weights}, suite_root, split)
    done = run.finished_run(lambda: (folder / SUMMARY_FILE).is_file())
    if done is not None:
        return {k: done[k] for k in EVAL_KEYS}
    start = time.monotonic()
    with run:
        suite = EvalSuiteConfig(model, str(folder), weights, suite_root, workers=workers, split=split)
        evaluation = run_eval_suite(suite)
        record = {
            "split": split,
            "summary": evaluation["summary"],
            "tasks": task_figures(evaluation["records"]),
            "eval_seconds": time.monotonic() - start,
        }
        run.finish(record)
    return record


def evaluate_run(folder: Path, settings: dict, suite_root: str, split: str, workers: int) -> dict:
    """A study run's student evaluated at `split` (once)."""
    from clipcid.distill.checkpoint import student_path

    weights = str(student_path(folder / "train"))
    return evaluate_at(evaluation_folder(folder, split), settings["model"], weights, suite_root, split, workers,
                       settings)  # fmt: skip


def read_evaluation(folder: Path, settings: dict, suite_root: str, split: str) -> dict | None:
    """A study run's finished evaluation at `split` of this suite and this student, or None."""
    done = _evaluation_folder(evaluation_folder(folder, split), settings, suite_root, split).finished_run()
    return None if done is None else {k: done[k] for k in EVAL_KEYS}


def _finished(folder: Path) -> dict | None:
    from clipcid.stage import finished, read_record

    record = read_record(folder / RUN_FILE)
    return record if finished(record) else None


def study_figures(folder: str | Path, name: str) -> dict[str, Path]:
    """A plan's figures in the study folder: the means per variant, and the curves over a plan's axis."""
    return {"means": Path(folder) / f"{name}.png", "curves": Path(folder) / f"{name}_curves.png"}


def read_study(folder: str | Path, name: str = "study") -> dict | None:
    """The results of plan `name` in a study folder (NAME.json), or None."""
    path = Path(folder) / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def study_names(folder: str | Path) -> list[str]:
    """The plans whose results a study folder holds, the main one first."""
    found = [f.stem for f in Path(folder).glob("*.json") if _is_study(f)]
    return sorted(found, key=lambda n: (n != "study", n))


def _is_study(path: Path) -> bool:
    try:
        return {"aggregate", "variants", "runs"} <= set(json.loads(path.read_text()))
    except (ValueError, OSError, TypeError):
        return False


class Study:
    def __init__(self, cfg: StudyConfig):
        self.cfg = cfg
        self.out = output_folder(cfg.out)
        self.artifacts, base_train = resolve_artifacts(cfg)
        self.plan = load_plan(cfg.plan, base_train)
        every = sorted({s for v in self.plan.variants for s in v.seeds} | set(self.plan.seeds))
        self.seeds = cfg.seeds if cfg.seeds is not None else every
        if not self.seeds:
            raise ClipcidError("the study needs at least one seed")
        self.name = Path(cfg.plan).stem  # the plan's results: OUT/NAME.json, .md, .csv, .png
        self.data = DataCache(self.out, self.artifacts, cfg.workers)
        # Seconds of each run trained in this sitting, for the time-left estimate: runs finished in an
        # earlier sitting return at once and would make it far too hopeful.
        self.run_seconds: list[float] = []
        self._tuning: dict[tuple[str, str], dict | None] = {}

    def settings(self, variant: Variant, seed: int) -> dict:
        """The distill settings of one run: base (or the setting a tuning plan chose), the variant's
        overrides, the seed and the data."""
        base = self.tuned_settings(variant) if variant.tuned else self.plan.base
        if variant.untrained:
            return {"model": base["model"], "seed": seed, "untrained": True}
        train = {**base, **variant.train, "seed": seed}
        balance_spec = variant.data.get("balance", GIVEN)
        cluster_spec = variant.data.get("cluster", GIVEN)
        teacher = variant.data.get("teacher", GIVEN)
        paths = {
            "data": self.artifacts["data"],
            "teacher_emb": self.data.teacher(teacher),
            "holdout": self.artifacts.get("holdout"),
        }
        paths["balance"] = self.data.balance(balance_spec, seed, teacher)
        probe = DistillConfig(data="", out="", **train)  # the defaults of what the variant leaves unset
        needs_clusters = probe.w_cls or probe.w_kl
        paths["clusters"] = self.data.clusters(balance_spec, cluster_spec, seed, teacher) if needs_clusters else None
        if variant.same_steps_as:
            reference = self.run(self.plan.variant(variant.same_steps_as), seed)
            per_step = probe.batch_size * probe.accum_freq
            train["train_num_samples"] = reference["steps"] // probe.epochs * per_step
        return {**train, **paths}

    def tuned_choice(self, variant: Variant) -> tuple[str, dict]:
        """(series, choice) the variant's tuning plan made, from that plan's results (OUT/PLAN.json, or
        --tuned-from's); with "best_of", the series whose chosen setting scored highest on its criterion.
        Refused until every setting of the series has every seed."""
        plan_name = variant.tuned["plan"]
        folder = self.cfg.tuned_from or self.out
        results = self._tuning_results(str(folder), plan_name)
        choices = {}
        for series in variant.tuned.get("best_of") or [variant.tuned["series"]]:
            choice = (results or {}).get("choices", {}).get(series)
            if not choice or not choice.get("complete"):
                done = f" ({choice['runs']} of {choice['planned']} runs done)" if choice else ""
                plan_file = Path(self.cfg.plan).with_name(f"{plan_name}.json")
                raise ClipcidError(
                    f"variant {variant.name} runs the setting plan {plan_name} chooses for {series}, which it has "
                    f"not chosen yet{done}: run `clipcid study --plan {plan_file} --out {folder}` first"
                )
            choices[series] = choice
        best = max(choices, key=lambda s: choices[s]["criterion"][choices[s]["chosen"]])
        return best, choices[best]

    def _tuning_results(self, folder: str, plan_name: str) -> dict | None:
        """A tuning plan's results, read once per study (every run's settings ask for them, and another
        plan's results do not change while this one runs)."""
        if (folder, plan_name) not in self._tuning:
            self._tuning[folder, plan_name] = read_study(folder, plan_name)
        return self._tuning[folder, plan_name]

    def tuned_settings(self, variant: Variant) -> dict:
        return self.tuned_choice(variant)[1]["settings"]

    def run(self, variant: Variant, seed: int) -> dict:
        """Train one (variant, seed) unless trained, evaluate it at the plan's split unless evaluated;
        returns its record."""
        folder = run_folder(self.out, variant.name, seed)
        settings = self.settings(variant, seed)
        suite, split = self.artifacts["suite_root"], self.plan.split
        finished = _finished(folder) is not None and read_evaluation(folder, settings, suite, split) is not None
        start = time.monotonic()
        trained = self.train(variant, seed, folder, settings)
        evaluated = evaluate_run(folder, settings, suite, split, self.cfg.workers)
        if not finished:  # the time-left estimate counts the runs that did work in this sitting
            self.run_seconds.append(time.monotonic() - start)
        return {**trained, **evaluated, "settings": settings}

    def train(self, variant: Variant, seed: int, folder: Path, settings: dict) -> dict:
        """The run's student (folder/train), trained once: a run of another variant with these very
        settings and seed lends its student (train/ links to it: a tuned method's first seeds are its
        tuning runs). Returns the training record."""
        from clipcid.distill.checkpoint import discard_checkpoints, write_untrained_student
        from clipcid.stage import RunFolder

        run = RunFolder(folder, RUN_FILE, settings, self.cfg.overwrite)
        done = run.finished_run()
        if done is not None:
            return training_record(run.recorded())
        try:
            run.claim()
        except ClipcidError as e:
            raise ClipcidError(
                f"{e} (the plan now gives variant {variant.name} other settings: rename the variant, or --overwrite)"
            ) from None
        start = time.monotonic()
        try:  # the lock goes with this process, whether the run ends or raises
            if settings.get("untrained"):
                write_untrained_student(folder / "train", settings["model"], seed)
                record = {"variant": variant.name, "seed": seed, "steps": 0, "train_seconds": 0.0}
                run.finish(record)
                return record
            lender = self._lend_student(folder, settings, seed)
            log.info("study: %s, seed %d%s", variant.name, seed, f" (trained as {lender['variant']})" if lender else "")
            result = distill(
                DistillConfig(
                    out=str(folder / "train"),
                    workers=self.cfg.workers,
                    resume="latest",
                    save_every_n_steps=50,
                    log_every_n_steps=20,
                    **settings,
                )
            )
            record = {"variant": variant.name, "seed": seed, "steps": result["steps"]}
            if lender:
                record.update(train_seconds=lender.get("train_seconds"), trained_as=lender["variant"])
            else:
                record["train_seconds"] = time.monotonic() - start
            run.finish(record)  # written last: marks the run trained
        finally:
            run.release()
        # The student is kept; resume points are not needed any more (and a study of many runs would fill
        # the disk with them).
        discard_checkpoints(folder / "train")
        return record

    def _lend_student(self, folder: Path, settings: dict, seed: int) -> dict | None:
        """Link folder/train to the student of a finished run of another variant with the same settings
        and seed, and return that run's record; None when there is none (or the run has its own)."""
        import os

        if (folder / "train").exists():
            return None
        for other in sorted((self.out / "runs").glob(f"*/seed{seed}")):
            record = _finished(other)
            train = other / "train"
            if other == folder or record is None or record.get("settings") != settings or train.is_symlink():
                continue
            if train.is_dir():
                (folder / "train").symlink_to(os.path.relpath(train, folder), target_is_directory=True)
                return training_record(record)
        return None

    def execute(self) -> dict:
        names = [v.name for v in self.plan.variants]
        if self.cfg.only:
            unknown = sorted(set(self.cfg.only) - set(names))
            if unknown:
                raise ClipcidError(f"--only: no variant {', '.join(unknown)} in the plan")
            names = [n for n in names if n in self.cfg.only]
        planned = [(seed, name) for seed in self.seeds for name in names if seed in self.variant_seeds(name)]
        total = len(planned)
        done_count = 0
        for seed, name in planned:  # seeds outermost: after one pass every variant has a first result
            self.run(self.plan.variant(name), seed)
            done_count += 1
            left = total - done_count
            if left and self.run_seconds:
                per_run = sum(self.run_seconds) / len(self.run_seconds) / 60
                # "At most": a later run may have finished in an earlier sitting and will take no time.
                log.info(
                    "study: %d/%d runs done; at most %.0f min left (%d runs at this sitting's %.1f min a run)",
                    done_count,
                    total,
                    left * per_run,
                    left,
                    per_run,
                )
            else:
                log.info("study: %d/%d runs done", done_count, total)
            self.write_results()
        return self.write_results()

    def variant_seeds(self, name: str) -> list[int]:
        """The seeds a variant runs: --seeds when given, else its groups' seeds of the plan."""
        return self.cfg.seeds if self.cfg.seeds is not None else self.plan.variant(name).seeds

    def finished_seeds(self) -> list[int]:
        """Every seed with a finished run in the folder: `--seeds` chooses what to run, but the tables
        cover all that was run, so a study finished in several sittings (or seeds run on other
        machines and copied in) reads as one."""
        found = {int(f.parent.name.removeprefix("seed")) for f in (self.out / "runs").glob("*/seed*/run.json")}
        return sorted(found | set(self.seeds))

    @functools.cached_property
    def coarse_kept(self) -> dict:
        """The seen coarse tasks the averages keep: those where the main teacher's validation acc1 is at
        least twice what always answering the most common class scores (on validation too, so that the
        choice reads no test figure). Without the teacher's model, every coarse task is kept."""
        from clipcid.evaluation.datasets import SEEN_COARSE, suite_datasets

        present = {e["name"]: e for e in suite_datasets(self.artifacts["suite_root"]) if e["name"] in SEEN_COARSE}
        teacher = self.data.teacher_evaluation(GIVEN, VALIDATION) if present else None
        if teacher is None:
            return {"kept": sorted(present), "why": "no teacher model to judge them by: every coarse task kept"}
        judged = {}
        for name, entry in present.items():
            acc1 = teacher["tasks"].get(f"wds/{name}/zeroshot_classification")
            majority = entry.get("majority", {}).get(VALIDATION)
            if acc1 is not None and majority is not None:
                judged[name] = {"teacher_acc1": acc1, "majority": majority, "kept": acc1 >= 2 * majority}
        kept = sorted(n for n, j in judged.items() if j["kept"])
        return {"kept": kept, "judged": judged, "why": "teacher's validation acc1 >= 2 x the majority class's share"}

    def _with_coarse_mean(self, evaluated: dict) -> dict:
        """The coarse mean over the kept tasks only (the evaluation's own mean takes every one)."""
        values = [
            evaluated["tasks"][key]
            for name in self.coarse_kept["kept"]
            if (key := f"wds/{name}/zeroshot_classification:mean_per_class_recall") in evaluated["tasks"]
        ]
        summary = {
            **evaluated["summary"],
            "seen_coarse_zeroshot_mean_per_class_recall": float(np.mean(values)) if values else None,
        }
        return {**evaluated, "summary": summary}

    def tuned_record(self) -> dict[str, dict]:
        """Each tuned variant's series and chosen setting (those whose choice is made)."""
        out = {}
        for v in self.plan.variants:
            if v.tuned:
                try:
                    series, choice = self.tuned_choice(v)
                except ClipcidError:
                    continue
                out[v.name] = {"series": series, "chosen": choice["chosen"], "criterion": choice["criterion"]}
        return out

    def records(self) -> list[dict]:
        """Every run of the plan trained and evaluated at its split (an evaluation of another suite, or of
        a student since retrained, does not count)."""
        out = []
        for v in self.plan.variants:
            for seed in self.finished_seeds():
                folder = run_folder(self.out, v.name, seed)
                trained = _finished(folder)
                if trained is None:
                    continue
                evaluated = read_evaluation(folder, trained["settings"], self.artifacts["suite_root"], self.plan.split)
                if evaluated is not None:
                    evaluated = self._with_coarse_mean(evaluated)
                    out.append({**training_record(trained), **evaluated, "settings": trained["settings"]})
        return out

    def write_results(self) -> dict:
        records = self.records()
        tables = aggregate(records, self.plan)
        compared = comparisons(tables, self.plan)
        teachers = self.teachers()
        weights = self.weights()
        chosen = choices(tables, self.plan)
        payload = {
            "plan": self.cfg.plan,
            "name": self.name,
            "split": self.plan.split,
            "purpose": self.plan.purpose,
            "select_by": self.plan.select_by,
            "choices": chosen,
            "tuned": self.tuned_record(),
            "coarse_tasks": self.coarse_kept,
            "reference": self.plan.reference,
            "seeds": self.finished_seeds(),
            "artifacts": self.artifacts,
            "base": self.plan.base,
            "variants": [v.__dict__ for v in self.plan.variants],
            "runs": records,
            "aggregate": tables,
            "comparisons": compared,
            "teachers": teachers,
            "weights": weights,
        }
        output_folder(self.out)
        save_json_atomic(self.out / f"{self.name}.json", payload)
        with atomic_path(self.out / f"{self.name}.md") as tmp:
            text = study_markdown(tables, self.plan, compared, teachers, weights, self.task_about(records))
            tmp.write_text(text + choices_markdown(chosen, self.plan), encoding="utf-8")
        with atomic_path(self.out / f"{self.name}.csv") as tmp:
            tmp.write_text(study_csv(tables, self.plan.reference, compared), encoding="utf-8")
        if records:
            figures = study_figures(self.out, self.name)
            study_plot(tables, self.plan, figures["means"])
            if any(v.x is not None for v in self.plan.variants):
                curves_plot(tables, self.plan, figures["curves"])
        return payload

    def task_about(self, records: list[dict]) -> dict[str, tuple[str, str]]:
        """Each task's pictures and chance level (%), from the records of one finished run's evaluation."""
        from clipcid.evaluation.run import read_suite_results

        for r in records:
            _, found = read_suite_results(evaluation_folder(run_folder(self.out, r["variant"], r["seed"]), r["split"]))
            about = {}
            for record in found.values():
                m = record["metrics"]
                if m.get("n_images") is not None and m.get("chance") is not None:
                    about[f"{record['dataset']}/{record['task']}"] = (f"{m['n_images']:,}", f"{100 * m['chance']:.2g}")
            if about:
                return about
        return {}

    def weights(self) -> dict[str, dict]:
        """For each variant the plan names under "weights": per tower, the statistics of the last block's
        last linear layer (w and w - w0) of every finished seed (each computed once, kept in its run folder),
        and their mean and sd over seeds."""
        from clipcid.distill.checkpoint import student_path
        from clipcid.evaluation.inside import Student, weight_report
        from clipcid.stage import digest, record_matches, write_record

        out: dict[str, dict] = {}
        for name in self.plan.weights:
            per_seed = {}
            for seed in self.finished_seeds():
                folder = run_folder(self.out, name, seed)
                record = _finished(folder)
                if record is None:
                    continue
                # Computed once per student: the cache names the settings it was made from, so a run
                # trained again (--overwrite) is not summarised from its predecessor's weights.
                cache, made_from = folder / "weights.json", {"student": digest(record["settings"])}
                if not record_matches(cache, made_from):
                    settings = record["settings"]
                    student = Student(
                        name, name, settings["model"], str(student_path(folder / "train")), settings.get("pretrained"),
                        seed, None,
                    )  # fmt: skip
                    write_record(cache, made_from, report=weight_report([student])[0][name])
                per_seed[seed] = json.loads(cache.read_text())["report"]
            if per_seed:
                out[name] = {"seeds": per_seed, "over_seeds": _weights_over_seeds(list(per_seed.values()))}
        return out

    def teachers(self) -> dict[str, dict]:
        """Each teacher the plan's variants name, with its suite averages (the paper's Table 7 rows; the main
        teacher's row also heads Tables 1-3)."""
        out: dict[str, dict] = {}
        for v in self.plan.variants:
            spec = v.data.get("teacher", GIVEN)
            key = GIVEN if spec == GIVEN else _key(spec)
            if key not in out:
                evaluation = self.data.teacher_evaluation(spec, self.plan.split)
                summary = self._with_coarse_mean(evaluation)["summary"] if evaluation else None
                # The main teacher is listed where it was evaluated (the paper's Table 1 shows it) or where
                # the plan distils from others too (so that its row says it could not be).
                if spec != GIVEN or summary is not None or any("teacher" in w.data for w in self.plan.variants):
                    out[key] = {"spec": spec, "variants": [], "summary": summary}
            if key in out:
                out[key]["variants"].append(v.name)
        return out


def resolve_artifacts(cfg: StudyConfig) -> tuple[dict, dict]:
    """The shards, teacher embeddings, balance, clusters and suite, from --demo and/or explicit flags;
    and the base training recipe (the demo's student recipe with its CID weights, when --demo)."""
    keys = ("data", "teacher_emb", "balance", "clusters", "suite_root", "holdout", "teacher_model", "teacher_weights")
    artifacts: dict[str, str | None] = {k: None for k in keys}
    base: dict = {}
    if cfg.demo:
        from clipcid.cluster.artifact import identity_of as clusters_identity
        from clipcid.distill.train import RUNTIME_FIELDS
        from clipcid.holdout import HoldOut
        from clipcid.layout import TEACHER, RunLayout
        from clipcid.lit import model_path

        demo = RunLayout(cfg.demo)
        used = demo.read_recipe()
        if clusters_identity(demo.clusters) is None or used is None:
            raise ClipcidError(f"{cfg.demo} is not a finished demo (no clusters or recipe): run `clipcid demo`")
        artifacts.update(
            data=str(demo.corpus),
            teacher_emb=str(demo.teacher_emb),
            balance=str(demo.balance),
            clusters=str(demo.clusters),
            suite_root=str(demo.suite),
            holdout=str(demo.holdout) if HoldOut.exists(demo.holdout) else None,
        )
        # The demo's teacher (a LiT run of its own), evaluated at each plan's split.
        weights = model_path(demo.run(TEACHER))
        if weights.is_file() and used.get("embed", {}).get("model"):
            artifacts.update(teacher_model=used["embed"]["model"], teacher_weights=str(weights))
        # The student's training settings as the demo's run resolved them, not where or how often it saves
        # and logs: each study run sets those itself.
        base = {k: v for k, v in used.get("distill", {}).items() if k not in RUNTIME_FIELDS and k != "workers"}
    for key in artifacts:
        if getattr(cfg, key, None):
            artifacts[key] = getattr(cfg, key)
    missing = [k for k in ("data", "teacher_emb", "suite_root") if not artifacts[k]]
    if missing:
        raise ClipcidError(
            f"the study needs {', '.join('--' + m.replace('_', '-') for m in missing)} (or --demo DEMO_FOLDER)"
        )
    for key, value in artifacts.items():
        if value and key != "teacher_model" and not Path(value).exists():
            raise ClipcidError(f"--{key.replace('_', '-')} {value} does not exist")
    return artifacts, base


# -- statistics ----------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None with one value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None)


def paired_interval(values: dict[int, float], reference: dict[int, float], level: float = 0.95) -> dict | None:
    """Mean of the per-seed differences (variant - reference) over the seeds both have, with a
    Student-t confidence interval; None when no seed is shared."""
    from scipy import stats

    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    diffs = np.array([values[s] - reference[s] for s in seeds], dtype=np.float64)
    mean = float(diffs.mean())
    if len(diffs) < 2:
        return {"n": 1, "mean": mean, "low": None, "high": None, "p": None}
    sd = float(diffs.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, len(diffs) - 1) * sd / math.sqrt(len(diffs)))
    # The paired t test's two-sided p (the interval excludes zero exactly when p < 1 - level).
    p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if sd > 0 else (0.0 if mean else 1.0)
    return {"n": len(diffs), "mean": mean, "low": mean - half, "high": mean + half, "p": p}


def metric_values(records: list[dict]) -> dict[str, dict[str, dict[int, float]]]:
    """variant -> metric -> seed -> value; metrics are the suite's averages then every task."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for r in records:
        per = out.setdefault(r["variant"], {})
        for key, _ in AVERAGES:
            if r["summary"].get(key) is not None:
                per.setdefault(key, {})[r["seed"]] = r["summary"][key]
        for task, value in r["tasks"].items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                per.setdefault(task, {})[r["seed"]] = value
    return out


def aggregate(records: list[dict], plan: Plan) -> dict:
    values = metric_values(records)
    reference = values.get(plan.reference, {})
    table: dict[str, dict] = {}
    for variant, metrics in values.items():
        table[variant] = {}
        for metric, by_seed in metrics.items():
            mean, sd = mean_sd(list(by_seed.values()))
            entry = {"n": len(by_seed), "mean": mean, "sd": sd, "seeds": {str(k): v for k, v in by_seed.items()}}
            if variant != plan.reference and metric in reference:
                entry["vs_reference"] = paired_interval(by_seed, reference[metric])
            table[variant][metric] = entry
    return table


def choices(tables: dict, plan: Plan) -> dict[str, dict]:
    """A tuning plan's choice per series (a method's settings): the variant with the highest criterion,
    the mean over its seeds of the mean of the plan's `select_by` averages (validation figures). Made
    only once every variant of the series has every seed ("complete"); until then none is chosen."""
    if plan.purpose != TUNING:
        return {}
    by_series: dict[str, list[Variant]] = {}
    for v in plan.variants:
        by_series.setdefault(v.series or v.name, []).append(v)
    out = {}
    for series, variants in by_series.items():
        criterion, runs, planned = {}, 0, 0
        for v in variants:
            row = tables.get(v.name, {})
            seeds = [s for s in v.seeds if all(str(s) in row.get(k, {}).get("seeds", {}) for k in plan.select_by)]
            planned, runs = planned + len(v.seeds), runs + len(seeds)
            if seeds:
                per_seed = [np.mean([row[k]["seeds"][str(s)] for k in plan.select_by]) for s in seeds]
                criterion[v.name] = float(np.mean(per_seed))
        complete = runs == planned
        best = max(criterion, key=criterion.__getitem__) if complete and criterion else None
        out[series] = {
            "select_by": plan.select_by,
            "criterion": criterion,
            "x": {v.name: v.x for v in variants},
            "runs": runs,
            "planned": planned,
            "complete": complete,
            "chosen": best,
            "settings": {**plan.base, **plan.variant(best).train} if best else None,
        }
    return out


def choices_markdown(chosen: dict[str, dict], plan: Plan) -> str:
    if not chosen:
        return ""
    metric = " and ".join(plan.select_by)
    lines = ["", f"## Choices (on {plan.split} figures: the mean over seeds of the mean of {metric})", ""]
    xs = _xs(chosen)
    lines += ["| series | " + " | ".join(f"x {x:g}" for x in xs) + " | chosen |", "|---" * (len(xs) + 2) + "|"]
    for series, c in chosen.items():
        by_x = {c["x"][name]: value for name, value in c["criterion"].items()}
        cells = [_pct(by_x.get(x)) for x in xs]
        pick = plan.variant(c["chosen"]).label if c["chosen"] else f"not yet ({c['runs']} of {c['planned']} runs)"
        lines.append(f"| {series} | " + " | ".join(cells) + f" | {pick} |")
    return "\n".join(lines) + "\n"


def _xs(chosen: dict[str, dict]) -> list[float]:
    return sorted({x for c in chosen.values() for x in c["x"].values() if x is not None})


def comparisons(tables: dict, plan: Plan) -> list[dict]:
    """The plan's own questions: for each (variant, against), the paired difference of each average,
    from the per-seed values the aggregate already holds."""
    out = []
    for a, b in plan.comparisons:
        if a in tables and b in tables:
            diffs = {
                k: paired_interval(tables[a][k]["seeds"], tables[b][k]["seeds"])
                for k, _ in AVERAGES
                if k in tables[a] and k in tables[b]
            }
            out.append({"variant": a, "against": b, "differences": diffs})
    return out


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _cell(entry: dict | None) -> str:
    if not entry:
        return "–"
    sd = f" ± {_pct(entry['sd'])}" if entry["sd"] is not None else ""
    return f"{_pct(entry['mean'])}{sd}"


def _diff_cell(entry: dict | None) -> str:
    return _interval_cell((entry or {}).get("vs_reference"))


def _interval_cell(d: dict | None) -> str:
    if not d:
        return "–"
    if d["low"] is None:
        return f"{_pct(d['mean'], True)} (1 seed)"
    mark = " **" if d["low"] > 0 or d["high"] < 0 else ""  # the interval excludes zero
    return f"{_pct(d['mean'], True)} [{_pct(d['low'], True)}, {_pct(d['high'], True)}]{mark}"


def summary_rows(tables: dict, plan: Plan) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the averages table: one row per variant, mean ± sd per average."""
    head = ["group", "variant", "seeds", *[label for _, label in AVERAGES]]
    rows = []
    for v in plan.variants:
        row = tables.get(v.name)
        if row:
            n = max(e["n"] for e in row.values())
            rows.append([v.group, v.label, str(n), *[_cell(row.get(k)) for k, _ in AVERAGES]])
    return head, rows


def difference_rows(tables: dict, plan: Plan) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the paired differences from the reference, with their intervals."""
    head = ["variant", *[label for _, label in AVERAGES]]
    rows = [
        [v.label, *[_diff_cell(tables[v.name].get(k)) for k, _ in AVERAGES]]
        for v in plan.variants
        if v.name != plan.reference and v.name in tables
    ]
    return head, rows


def comparison_rows(compared: list[dict], plan: Plan) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the plan's own comparisons (first minus second, paired by seed)."""
    head = ["variant", "against", *[label for _, label in AVERAGES]]
    rows = [
        [
            plan.variant(c["variant"]).label,
            plan.variant(c["against"]).label,
            *[_interval_cell(c["differences"].get(k)) for k, _ in AVERAGES],
        ]
        for c in compared
    ]
    return head, rows


def _weights_over_seeds(runs: list[dict]) -> dict:
    """tower -> (w | change) -> statistic -> {"mean", "sd"} over the runs."""
    out: dict = {}
    for tower, both in runs[0].items():
        for what, stats in both.items():
            for key in stats:
                values = [r[tower][what][key] for r in runs if r[tower][what][key] is not None]
                if values and key != "n":
                    mean, sd = mean_sd(values)
                    out.setdefault(tower, {}).setdefault(what, {})[key] = {"mean": mean, "sd": sd, "n": len(values)}
    return out


WEIGHT_COLUMNS = (
    ("w", "std", "sd of w"),
    ("w", "kurtosis", "kurtosis of w"),
    ("w", "near_zero", "near zero (%)"),
    ("change", "std", "sd of w − w₀"),
    ("change", "kurtosis", "kurtosis of w − w₀"),
)


def weight_rows(weights: dict, plan: Plan) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the weights over seeds: per variant and tower, mean ± sd of each statistic."""
    head = ["variant", "tower", "seeds", *[label for _, _, label in WEIGHT_COLUMNS]]
    rows = []
    for name, entry in weights.items():
        for tower, stats in entry["over_seeds"].items():
            cells = []
            for what, key, _ in WEIGHT_COLUMNS:
                e = stats.get(what, {}).get(key)
                scale = 100 if key == "near_zero" else 1
                digits = 3 if key != "std" else 5
                sd = f" ± {scale * e['sd']:.{digits}f}" if e and e["sd"] is not None else ""
                cells.append(f"{scale * e['mean']:.{digits}f}{sd}" if e else "–")
            rows.append([plan.variant(name).label, tower, str(len(entry["seeds"])), *cells])
    return head, rows


def teacher_rows(teachers: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the teachers a plan distils from, with their own suite averages."""
    head = ["teacher", "variants", *[label for _, label in AVERAGES]]
    rows = []
    for t in teachers.values():
        spec = t["spec"]
        name = "the artifacts' teacher" if spec == GIVEN else describe_teacher(spec)
        summary = t.get("summary") or {}
        rows.append([name, ", ".join(t["variants"]), *[_pct(summary.get(k)) for k, _ in AVERAGES]])
    return head, rows


def describe_teacher(spec: dict) -> str:
    kind, fields_ = next(iter(spec.items()))
    if kind == "emb":
        return f"embeddings {fields_}"
    how = "LiT (locked towers, projections trained)" if kind == "lit" else "CLIP loss from scratch"
    return f"{fields_.get('model', '?')}, {how}, {fields_.get('epochs', '?')} epochs"


def study_markdown(
    tables: dict,
    plan: Plan,
    compared: list[dict] | None = None,
    teachers: dict[str, dict] | None = None,
    weights: dict[str, dict] | None = None,
    task_about: dict[str, tuple[str, str]] | None = None,
) -> str:
    ref = plan.variant(plan.reference).label
    keys = {k for k, _ in AVERAGES}
    lines = [
        "# Study",
        "",
        f"Mean ± standard deviation over seeds (%, held-out suite). Reference: **{ref}**. The second table gives",
        "each variant minus the reference, paired by seed, with its 95 % t interval; ** marks an interval",
        "that excludes zero.",
        "",
        *markdown_table(*summary_rows(tables, plan), left=2),
        "",
        f"Difference from {ref} (paired by seed):",
        "",
        *markdown_table(*difference_rows(tables, plan), left=1),
    ]
    if compared:
        lines += ["", "The plan's other comparisons (first minus second, paired by seed):", ""]
        lines += markdown_table(*comparison_rows(compared, plan), left=2)
    if teachers:
        lines += ["", "The teachers (each evaluated once on the suite, %):", ""]
        lines += markdown_table(*teacher_rows(teachers), left=2)
    if weights:
        lines += [
            "",
            "The last block's last linear layer of each tower, mean ± sd over seeds (the paper's Fig. 4):",
            "",
        ]
        lines += markdown_table(*weight_rows(weights, plan), left=3)
    tasks = sorted({m for row in tables.values() for m in row if m not in keys})
    shown = [v for v in plan.variants if v.name in tables]
    if tasks:
        about = task_about or {}
        task_rows = [
            [task, *about.get(task, ("–", "–")), *[_cell(tables[v.name].get(task)) for v in shown]] for task in tasks
        ]
        lines += ["", "Every task (mean ± sd over seeds, %; pictures and chance level of its metric):", ""]
        lines += markdown_table(["task", "pictures", "chance", *[v.name for v in shown]], task_rows, left=1)
    return "\n".join(lines) + "\n"


def html_table(head: list[str], rows: list[list[str]]) -> str:
    """A table of the demo report; a cell ending in " **" is bold (an interval that excludes zero)."""
    import html

    def cell(text: str) -> str:
        bold = text.endswith(" **")
        text = html.escape(text.removesuffix(" **"))
        return f"<td><b>{text}</b></td>" if bold else f"<td>{text}</td>"

    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<table><tr>{header}</tr>" + "".join("<tr>" + "".join(map(cell, r)) + "</tr>" for r in rows) + "</table>"


def study_tables_html(study: dict) -> str:
    """The averages and the differences, as HTML tables (the demo report), from a study.json."""
    import html

    plan = Plan(study["reference"], study["seeds"], study["base"], [Variant(**v) for v in study["variants"]])
    compared = study.get("comparisons") or []

    ref = html.escape(plan.variant(plan.reference).label)
    teachers = study.get("teachers") or {}
    return (
        html_table(*summary_rows(study["aggregate"], plan))
        + (
            "<p>The teachers, each evaluated once on the suite:</p>" + html_table(*teacher_rows(teachers))
            if teachers
            else ""
        )
        + f"<p>Difference from {ref}, paired by seed [95 % interval]:</p>"
        + html_table(*difference_rows(study["aggregate"], plan))
        + (
            "<p>The plan's other comparisons, first minus second, paired by seed [95 % interval]:</p>"
            + html_table(*comparison_rows(compared, plan))
            if compared
            else ""
        )
    )


def study_csv(tables: dict, reference: str, compared: list[dict]) -> str:
    """One row per variant and metric (its mean, sd and difference from the reference), then one per
    comparison of the plan and average (the difference only)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["variant", "metric", "seeds", "mean", "sd", "against", "diff", "ci95_low", "ci95_high"])
    for variant, row in tables.items():
        for metric, e in row.items():
            d = e.get("vs_reference") or {}
            against = reference if d else None
            w.writerow(
                [variant, metric, e["n"], e["mean"], e["sd"], against, d.get("mean"), d.get("low"), d.get("high")]
            )
    for c in compared:
        for metric, d in c["differences"].items():
            if d:
                w.writerow([c["variant"], metric, d["n"], None, None, c["against"], d["mean"], d["low"], d["high"]])
    return buf.getvalue()


def study_plot(tables: dict, plan: Plan, path: Path) -> None:
    shown = [v for v in plan.variants if v.name in tables]
    fig, axes = new_figure(4.2 * len(AVERAGES), 0.45 * len(shown) + 1.6, ncols=len(AVERAGES))
    y = np.arange(len(shown))
    for ax, (key, label) in zip(axes, AVERAGES, strict=True):
        means = [100 * tables[v.name].get(key, {}).get("mean", np.nan) for v in shown]
        sds = [100 * (tables[v.name].get(key, {}).get("sd") or 0.0) for v in shown]
        colours = ["tab:gray" if v.name == plan.reference else "tab:blue" for v in shown]
        ax.barh(y, means, xerr=sds, color=colours, capsize=3)
        ref = tables.get(plan.reference, {}).get(key)
        if ref:
            ax.axvline(100 * ref["mean"], color="tab:gray", linestyle="--", linewidth=1)
        ax.set(title=label + " (%)", yticks=y)
        ax.set_yticklabels([v.label for v in shown] if ax is axes[0] else [], fontsize=8)
        ax.invert_yaxis()
    save_png(fig, path)


CURVE_METRICS = (
    ("seen_zeroshot_mean_acc1", "seen distribution: zero-shot mean acc1"),
    ("seen_retrieval_mean_recall@5", "seen distribution: retrieval mean R@5"),
    ("linear_probe_mean_acc1", "linear-probe mean acc1"),
    ("seen_coarse_zeroshot_mean_per_class_recall", "seen distribution: coarse zero-shot per-class recall"),
)


def curves_plot(tables: dict, plan: Plan, path: Path) -> None:
    """Each series (e.g. a method) against its variants' x (e.g. epochs): the mean over seeds with its
    95 % t interval, one panel per metric of CURVE_METRICS."""
    from scipy import stats

    series: dict[str, list[Variant]] = {}
    for v in plan.variants:
        if v.x is not None and v.series and v.name in tables:
            series.setdefault(v.series, []).append(v)
    fig, axes = new_figure(5.0 * len(CURVE_METRICS), 3.6, ncols=len(CURVE_METRICS))
    for ax, (key, label) in zip(axes, CURVE_METRICS, strict=True):
        for name, variants in series.items():
            points = sorted((v.x, tables[v.name][key]) for v in variants if key in tables[v.name])
            if not points:
                continue
            xs = [x for x, _ in points]
            means = np.array([100 * e["mean"] for _, e in points])
            half = np.array(
                [
                    100 * stats.t.ppf(0.975, e["n"] - 1) * e["sd"] / math.sqrt(e["n"]) if e["sd"] is not None else 0.0
                    for _, e in points
                ]
            )
            ax.errorbar(xs, means, yerr=half, marker="o", capsize=3, label=name)
        ax.set(title=label + " (%)", xlabel=_axis_name(plan), xscale="log")
        ax.set_xticks(sorted({v.x for vs in series.values() for v in vs}))
        ax.get_xaxis().set_major_formatter("{x:g}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    save_png(fig, path)


def _axis_name(plan: Plan) -> str:
    if plan.purpose == TUNING:
        return "× the papers' setting"
    trained = [v for v in plan.variants if v.x is not None]
    epochs = [v.train.get("epochs", plan.base.get("epochs", 1)) for v in trained]
    return "epochs" if trained and all(e == v.x for e, v in zip(epochs, trained, strict=True)) else "x"


def run_study(cfg: StudyConfig) -> dict:
    return Study(cfg).execute()
