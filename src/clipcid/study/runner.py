"""Runs a plan: each (variant, seed) trained once and evaluated at the plan's split, its record in the study
folder; the results rewritten after every run."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipcid.config import option
from clipcid.distill.train import DistillConfig, distill
from clipcid.errors import ClipcidError
from clipcid.study.data import DataCache, evaluate_run, evaluation_folder, read_evaluation
from clipcid.study.plan import GIVEN, PLAN, VALIDATION, Variant, _key, load_plan
from clipcid.study.render import choices_markdown, curves_plot, study_csv, study_markdown, study_plot
from clipcid.study.stats import _weights_over_seeds, aggregate, choices, comparisons
from clipcid.util.fileio import atomic_path, output_folder, save_json_atomic

log = logging.getLogger("clipcid")


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


# -- runs ----------------------------------------------------------------------------------------


def run_folder(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / variant / f"seed{seed}"


RUN_FILE = "run.json"


def training_record(record: dict) -> dict:
    """What run.json says of the training (a record written before evaluations had folders of their own
    also carries that old evaluation: it is not this plan's and is left out)."""
    return {k: v for k, v in record.items() if k in ("variant", "seed", "steps", "train_seconds", "trained_as")}


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
        with contextlib.ExitStack() as claimed:  # the lock goes with this process, whether the run ends or raises
            try:
                claimed.enter_context(run)
            except ClipcidError as e:
                raise ClipcidError(
                    f"{e} (the plan now gives variant {variant.name} other settings: rename the variant, or "
                    "--overwrite)"
                ) from None
            start = time.monotonic()
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


def run_study(cfg: StudyConfig) -> dict:
    return Study(cfg).execute()
