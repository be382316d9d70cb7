"""`clipcid run`: the whole method on the user's own shards, in one command.

    holdout -> embed -> balance -> cluster -> distill (student, and with --baseline a CLIP-only
    student on the same rows, steps and seed) -> eval -> export -> report

Every stage writes its own folder under OUT through the stage's owner module and decides alone, by
stage.py's one rule, whether it finished with these settings: running the same line again redoes
nothing that finished and resumes what did not. The settings of every stage come from the stage's
own defaults, then a recipe file (--recipe, the schema of OUT/recipe.json: one section per stage
holding that stage's config fields), then the command line (its named flags, and --set
SECTION.FIELD=VALUE for any field); the result is printed at the start and written to OUT/recipe.json.
A stage that finished with other settings is named with the setting that differs, and --overwrite
redoes it and every stage after it.

Under torchrun every stage uses every rank (parts, query blocks, DDP, models split across ranks for
evaluation); rank 0 alone writes the recipe, the models folder and the report.

OUT/holdout/  OUT/teacher_emb/ (unless --teacher-emb)  OUT/balance/  OUT/clusters/  OUT/runs/{student,
baseline}/  OUT/eval/{teacher,baseline,student}/  OUT/models/ (each student as a folder plain open_clip
loads; the teacher too when it is a small local checkpoint, else referenced)  OUT/results.json (every
record in CLIP_benchmark's schema with its role)  OUT/report.html  OUT/recipe.json  OUT/run.json (when
each stage ran and for how long)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from clipcid.balance.artifact import identity_of as balance_identity
from clipcid.balance.run import RUNTIME_FIELDS as BALANCE_RUNTIME
from clipcid.balance.run import BalanceConfig, balance
from clipcid.cluster.artifact import identity_of as clusters_identity
from clipcid.cluster.run import ClusterConfig, cluster
from clipcid.config import default_of, default_workers, option, validate
from clipcid.distill.checkpoint import identity_of as run_identity
from clipcid.distill.checkpoint import student_path
from clipcid.distill.train import RUNTIME_FIELDS as DISTILL_RUNTIME
from clipcid.distill.train import DistillConfig, distill, finished_training
from clipcid.embed.artifact import Embeddings
from clipcid.embed.run import RUNTIME_FIELDS as EMBED_RUNTIME
from clipcid.embed.run import EmbedConfig, embed
from clipcid.errors import ClipcidError
from clipcid.evaluation.features import weights_fingerprint
from clipcid.evaluation.inside import identity_of as inside_identity
from clipcid.evaluation.run import (
    RESULTS_FILE,
    ModelEvalConfig,
    add_speed,
    evaluate_model,
    finished_evaluation,
    read_model_evaluation,
    read_suite_results,
    write_results,
)
from clipcid.holdout import HoldOut, HoldoutConfig, hold_out
from clipcid.inputs.parts import discover_parts, iter_rows
from clipcid.layout import BASELINE, STUDENT, RunLayout
from clipcid.models import check_model_spec
from clipcid.stage import (
    DistEnv,
    RunFolder,
    barrier,
    digest,
    distributed,
    identity,
    pick_device,
    settings_difference,
)
from clipcid.util import allocator
from clipcid.util.fileio import output_folder, read_user_json, save_json_atomic
from clipcid.util.side_by_side import Job, own_usage, processes_for, run_side_by_side, usage_since

log = logging.getLogger("clipcid")

CLIP_ONLY = {"w_clip": 1.0, "w_cls": 0.0, "w_kl": 0.0, "w_ins": 0.0, "w_simkd": 0.0, "w_fd": 0.0}
ROLES = {"teacher": "teacher", "baseline": "baseline", "student": "student"}
# A teacher checkpoint up to this size is copied into OUT/models (a ViT-bigG folder is 10 GB: referenced).
COPY_TEACHER_BELOW_BYTES = 2 * 1024**3
# Sections a recipe may hold for stages `clipcid run` does not run (the demo's own).
OTHER_SECTIONS = ("corpus", "lit")
MODELS_INDEX = "models.json"  # models/: each model's role, folder, size and speed (written by export here)
# What a run was made from: recorded in recipe.json's "run" section, taken from the command line only.
INPUTS = ("data", "teacher_emb")


@dataclass
class RunSection:
    """The pipeline's own settings (section "run" of a recipe)."""

    data: str | None = option(None, "training shards")
    teacher_emb: str | None = option(None, "teacher embeddings already made (then embed does not run)")
    baseline: bool = option(False, "also train a CLIP-loss-only student on the same rows, steps and seed")
    side_by_side: bool = option(
        True, "on a CPU, train the students and evaluate the models in parallel processes, the cores split"
    )


@dataclass
class EvalSection:
    """How every model is evaluated (section "eval" of a recipe)."""

    datasets: list[str] | None = option(None, "datasets as `clipcid eval --dataset` takes them")
    dataset_root: str | None = option(None, "with wds/NAME datasets: their folder, may use {dataset}")
    suite_root: str | None = option(None, "a suite of `clipcid data build-eval` (every task of it)")
    batch_size: int = option(256, "images per forward pass", at_least=1)
    workers: int = option(help="data loading processes", default_factory=default_workers, at_least=0)
    device: str = option("auto", "auto, cpu or cuda")
    precision: str = option("fp32", "autocast precision", ("fp32", "bf16", "fp16", "amp_bf16", "amp"))
    queries: int = option(4, "held-out captions the report shows with each model's best pictures", at_least=0)


@dataclass(frozen=True)
class Section:
    config: type
    filled: tuple[str, ...]  # fields the pipeline fills (paths between stages), not recipe settings
    runtime: tuple[str, ...] = ()  # fields that do not change what the stage writes
    defaults: tuple[tuple[str, object], ...] = ()  # the pipeline's defaults where they differ from the stage's


TABLE_FIELDS = ("rows_per_part", "image_column", "caption_column")
SECTIONS: dict[str, Section] = {
    "run": Section(RunSection, ()),
    # Small data are fitted: the default 1 % rises to what gives --min-pairs usable pairs, up to 10 %.
    "holdout": Section(HoldoutConfig, ("data", "out", "overwrite", *TABLE_FIELDS), (), (("fit_up_to", 0.1),)),
    "embed": Section(EmbedConfig, ("data", "out", "overwrite"), EMBED_RUNTIME),
    "balance": Section(BalanceConfig, ("emb", "out", "holdout", "overwrite"), BALANCE_RUNTIME),
    "cluster": Section(ClusterConfig, ("emb", "out", "balance", "holdout", "overwrite"), ("plots",)),
    "distill": Section(
        DistillConfig,
        ("data", "out", "teacher_emb", "balance", "clusters", "holdout", "resume", "overwrite"),
        DISTILL_RUNTIME,
        (("save_every_n_steps", 200), ("log_every_n_steps", 20)),  # resumable mid-epoch
    ),
    "eval": Section(EvalSection, (), ("batch_size", "workers", "device")),
}

# Command-line flags of `clipcid run` -> the recipe fields they set.
FLAG_TARGETS: dict[str, tuple[tuple[str, str], ...]] = {
    "data": (("run", "data"),),
    "teacher_emb": (("run", "teacher_emb"),),
    "baseline": (("run", "baseline"),),
    "teacher": (("embed", "model"),),
    "teacher_pretrained": (("embed", "pretrained"),),
    "student": (("distill", "model"),),
    "student_pretrained": (("distill", "pretrained"),),
    "holdout": (("holdout", "fraction"),),
    "threshold": (("balance", "threshold"),),
    "target_removal": (("balance", "target_removal"),),
    "k": (("cluster", "k"),),
    "epochs": (("distill", "epochs"),),
    "batch_size": (("distill", "batch_size"),),
    "lr": (("distill", "lr"),),
    "seed": (("distill", "seed"),),
    "eval": (("eval", "datasets"),),
    "dataset_root": (("eval", "dataset_root"),),
    "eval_suite": (("eval", "suite_root"),),
    "workers": (("embed", "workers"), ("distill", "workers"), ("eval", "workers")),
    "device": (("embed", "device"), ("balance", "device"), ("distill", "device"), ("eval", "device")),
    "precision": (("embed", "precision"), ("distill", "precision"), ("eval", "precision")),
}


@dataclass
class RunConfig:
    out: str = option(help="output folder: every stage's folder, results.json, report.html, recipe.json")
    data: str | None = option(None, "shards: a folder, brace pattern or glob; img2dataset's webdataset or files output")
    teacher: str | None = option(None, "teacher: an open_clip architecture, or local-dir:FOLDER (`clipcid export`)")
    teacher_pretrained: str | None = option(None, "the teacher's open_clip tag or checkpoint path")
    teacher_emb: str | None = option(None, "teacher embeddings already made (clipcid embed, clip-retrieval layout)")
    student: str | None = option(None, "student architecture (open_clip or clipcid, e.g. ViT-B-32, clipcid-tiny)")
    student_pretrained: str | None = option(None, "start the student from this tag or checkpoint")
    recipe: str | None = option(None, "settings JSON (the schema of OUT/recipe.json); flags given here win")
    holdout: float | None = option(
        None,
        f"share of pairs held out by image hash (default {default_of(HoldoutConfig, 'fraction')})",
        at_least=0,
        below=1,
    )
    threshold: float | None = option(
        None,
        f"balance: merge distance (default {default_of(BalanceConfig, 'threshold')}, "
        f"{default_of(BalanceConfig, 'metric')})",
        above=0,
    )
    target_removal: float | None = option(None, "balance: pick the threshold removing this share", above=0, below=1)
    k: str | None = option(None, f"clusters, or auto (kept rows / {default_of(ClusterConfig, 'images_per_cluster'):g})")
    epochs: int | None = option(None, "student: passes over the data", at_least=1)
    batch_size: int | None = option(None, "student: pairs per step and process", at_least=1)
    lr: float | None = option(None, "student: peak learning rate", above=0)
    seed: int | None = option(None, "student: seed of its init and data order")
    baseline: bool | None = option(None, "also train a CLIP-loss-only student (same rows, steps, seed)")
    eval: list[str] | None = option(None, "more datasets, as `clipcid eval --dataset` takes them")
    dataset_root: str | None = option(None, "with --eval wds/NAME: the datasets' folder, may use {dataset}")
    eval_suite: str | None = option(None, "a suite of `clipcid data build-eval`: every task of it")
    workers: int | None = option(None, "data loading processes (embed, distill, eval)", at_least=0)
    device: str | None = option(None, "auto, cpu or cuda")
    precision: str | None = option(None, "fp32, bf16, fp16, amp_bf16 or amp")
    set: list[str] | None = option(None, "any setting: SECTION.FIELD=VALUE (e.g. distill.warmup=500)")
    overwrite: bool = option(False, "redo a stage made with other settings, and the stages after it")


# -- the recipe ------------------------------------------------------------------------------------


def section_fields(name: str) -> list[dataclasses.Field]:
    section = SECTIONS[name]
    return [f for f in dataclasses.fields(section.config) if f.name not in section.filled]


def section_defaults(name: str) -> dict:
    out = {}
    for f in section_fields(name):
        if f.default is not dataclasses.MISSING:
            out[f.name] = copy.deepcopy(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = None  # a required field (e.g. the student's model) that the recipe must give
    out.update(dict(SECTIONS[name].defaults))
    return out


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _set(recipe: dict, sources: dict, section: str, name: str, value, source: str) -> None:
    if section not in SECTIONS:
        raise ClipcidError(f"{source}: no section '{section}' (sections: {', '.join(SECTIONS)})")
    known = {f.name for f in section_fields(section)}
    if name not in known:
        raise ClipcidError(
            f"{source}: section '{section}' has no setting '{name}' (it has: {', '.join(sorted(known))})"
        )
    recipe[section][name] = value
    sources[section][name] = source


def resolve_recipe(cfg: RunConfig) -> tuple[dict[str, dict], dict[str, dict[str, str]]]:
    """The settings of every stage (stage defaults < recipe file < command line) and where each came
    from ("recipe" or "flag"; a default is absent from the sources)."""
    recipe = {name: section_defaults(name) for name in SECTIONS}
    sources: dict[str, dict[str, str]] = {name: {} for name in SECTIONS}
    if cfg.recipe:
        given = read_user_json(cfg.recipe, "--recipe")
        for section, values in given.items():
            if section.startswith("_") or section in OTHER_SECTIONS:
                continue  # comments, and the demo's sections
            if not isinstance(values, dict):
                raise ClipcidError(f"--recipe {cfg.recipe}: section '{section}' must be an object of settings")
            for name, value in values.items():
                if section == "run" and name in INPUTS:
                    continue  # a recipe is settings: the data and embeddings of another run are not taken
                _set(recipe, sources, section, name, value, f"--recipe {cfg.recipe}")
    for flag_name, targets in FLAG_TARGETS.items():
        value = getattr(cfg, flag_name)
        if value is not None:
            for section, name in targets:
                recipe[section][name] = value
                sources[section][name] = "flag"
    if sources["holdout"].get("fraction") and "fit_up_to" not in sources["holdout"]:
        recipe["holdout"]["fit_up_to"] = 0.0  # a fraction asked for is kept, or refused with its hint
    for item in cfg.set or []:
        key, sep, text = item.partition("=")
        section, dot, name = key.partition(".")
        if not (sep and dot):
            raise ClipcidError(f"--set {item}: expected SECTION.FIELD=VALUE, e.g. distill.warmup=500")
        _set(recipe, sources, section, name, _parse_value(text), f"--set {item}")
    for section in SECTIONS:
        validate(stage_config(recipe, section))
    return recipe, sources


def stage_config(recipe: dict, section: str, **filled):
    """The stage's config from its recipe section plus the fields the pipeline fills (placeholders when
    not given: the config is then only good for validation)."""
    spec = SECTIONS[section]
    values = {**recipe[section], **filled}
    for name in spec.filled:
        values.setdefault(name, "" if name in ("data", "out", "emb") else None)
    if section == "holdout":
        values.update({k: recipe["embed"][k] for k in TABLE_FIELDS})
    try:
        return spec.config(
            **{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(spec.config)}}
        )
    except TypeError as e:
        raise ClipcidError(f"recipe section '{section}': {e}") from e


def describe(recipe: dict, sources: dict) -> str:
    """The settings, one section per paragraph; * from the recipe file, ! from the command line."""
    marks = {"flag": "!"}
    lines = ["settings (* from --recipe, ! from the command line, the rest defaults):"]
    for section, values in recipe.items():
        items = []
        for name, value in values.items():
            source = sources[section].get(name)
            mark = marks.get(source, "*" if source else "")
            items.append(f"{name}={json.dumps(value)}{mark}")
        body = textwrap.fill(", ".join(items), width=116, initial_indent="  ", subsequent_indent="    ")
        lines.append(f"  [{section}]\n{body}")
    return "\n".join(lines)


def _comparable(recipe: dict, section: str) -> dict:
    runtime = set(SECTIONS[section].runtime)
    return {k: v for k, v in recipe.get(section, {}).items() if k not in runtime}


def _at_stage_default(section: str, key: str, value) -> bool:
    """Whether a setting is at a default: a setting added to a stage since a run finished, left at the
    pipeline's default or at the stage's own (which is how the stage behaved before it had the setting,
    e.g. holdout.fit_up_to 0 under an explicit --holdout), is not a change of that run's settings."""
    overrides = dict(SECTIONS[section].defaults)
    for f in dataclasses.fields(SECTIONS[section].config):
        if f.name == key:
            return value in [d for d in (overrides.get(key, f.default), f.default) if d is not dataclasses.MISSING]
    return False


# Each stage of the pipeline, the recipe sections its output follows from, in order.
STAGES = (
    ("holdout", ("holdout",)),
    ("embed", ("embed",)),
    ("balance", ("balance",)),
    ("cluster", ("cluster",)),
    ("student", ("distill",)),
    ("baseline", ("distill",)),
    ("eval", ("eval",)),
)


def first_changed_stage(out: Path, recipe: dict) -> tuple[str, str] | None:
    """(stage, what differs) for the first stage that finished in OUT with other settings than `recipe`."""
    old = RunLayout(out).read_recipe()
    if old is None:
        return None
    finished = StageTimes(out).finished()
    if old.get("run", {}).get("data") != recipe["run"]["data"] and finished:
        return "holdout", settings_difference({"data": old.get("run", {}).get("data")}, {"data": recipe["run"]["data"]})
    for stage, sections in STAGES:
        if stage not in finished:
            continue
        for section in sections:
            before, now = _comparable(old, section), _comparable(recipe, section)
            if section == "embed" and (old.get("run", {}).get("teacher_emb") or recipe["run"]["teacher_emb"]):
                before = {"teacher_emb": old.get("run", {}).get("teacher_emb")}
                now = {"teacher_emb": recipe["run"]["teacher_emb"]}
            now = {k: v for k, v in now.items() if k in before or not _at_stage_default(section, k, v)}
            if before != now:
                return stage, f"{section}: {settings_difference(before, now)}"
    return None


# -- checks before any stage starts ----------------------------------------------------------------


def check_inputs(recipe: dict) -> list:
    """Everything that can be refused before a stage runs: the shards (and that they hold captions),
    the teacher, the teacher embeddings, the student, the evaluation datasets."""
    run, emb, dist = recipe["run"], recipe["embed"], recipe["distill"]
    if not run["data"]:
        raise ClipcidError("clipcid run needs --data SHARDS (a folder, brace pattern or glob of webdataset shards)")
    parts = discover_parts(run["data"], emb["rows_per_part"], emb["image_column"], emb["caption_column"])
    _check_pairs(parts)
    if not run["teacher_emb"] and not emb["model"]:
        raise ClipcidError(
            "clipcid run needs a teacher: --teacher MODEL [--teacher-pretrained TAG_OR_PATH], or --teacher-emb DIR"
        )
    if emb["model"]:
        check_model_spec(emb["model"], emb["pretrained"], "--teacher")
    if run["teacher_emb"]:
        embeddings = Embeddings.open(run["teacher_emb"])
        if embeddings.n_parts != len(parts):
            raise ClipcidError(
                f"--teacher-emb {run['teacher_emb']} has {embeddings.n_parts} parts but --data has {len(parts)} "
                "shards; they must be the same shards in the same order"
            )
        embeddings.texts  # noqa: B018 - instance distillation needs the text embeddings too: refused here if absent
    if not dist["model"]:
        raise ClipcidError("clipcid run needs --student ARCH (an open_clip or clipcid architecture, e.g. clipcid-tiny)")
    check_model_spec(dist["model"], dist["pretrained"], "--student")
    ev = recipe["eval"]
    if ev["datasets"] or ev["suite_root"]:
        from clipcid.evaluation.datasets import DEFAULT_SUITE_ROOT, build_dataset, suite_datasets

        if ev["suite_root"]:
            suite_datasets(ev["suite_root"])
        for spec in ev["datasets"] or []:
            build_dataset(spec, ev["suite_root"] or DEFAULT_SUITE_ROOT, ev["dataset_root"])
        if not emb["model"]:
            log.warning("no --teacher model: the teacher is evaluated on the held-out pairs only (from its embeddings)")
    if not recipe["holdout"]["fraction"] and not (ev["datasets"] or ev["suite_root"]):
        log.warning("--holdout 0 and no --eval: the run will report no figure of quality")
    return parts


def _check_pairs(parts, look_at: int = 64) -> None:
    """The first rows of the first shard must hold images and captions: a folder of images alone (or of
    captions alone) is refused here rather than after the teacher's pass."""
    seen = images = captions = 0
    for row in iter_rows(parts[0]):
        seen += 1
        images += row.image is not None
        captions += bool(row.caption and row.caption.strip())
        if seen >= look_at:
            break
    if seen and not captions:
        raise ClipcidError(
            f"{parts[0].name}: none of its first {seen} samples has a caption (KEY.txt); clipcid learns from "
            "image-text pairs (img2dataset writes the caption as .txt with --caption_col)"
        )
    if seen and not images:
        raise ClipcidError(f"{parts[0].name}: none of its first {seen} samples has an image (jpg, jpeg, png or webp)")


# -- when each stage ran ----------------------------------------------------------------------------


class StageTimes:
    """OUT/run.json: per stage, the wall seconds it took when it last did its work, the CPU seconds (user,
    system) and minor page faults of this process and its children meanwhile, and what it made (its
    output's identity). A stage found finished keeps the figures of the run that made it."""

    def __init__(self, out: Path):
        self.layout = RunLayout(out)
        self.path = self.layout.run_record

    def read(self) -> dict:
        return self.layout.read_run_record()

    def finished(self) -> set[str]:
        return set(self.read().get("stages", {}))

    def record(self, name: str, seconds: float, made: str | None, cpu: dict | None = None) -> None:
        state = self.read()
        old = state["stages"].get(name)
        if old is None or old.get("identity") != made or made is None:
            state["stages"][name] = {
                "seconds": seconds,
                **(cpu or {}),
                "identity": made,
                "at": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
        state["complete"] = False
        state["allocator"] = allocator.describe()  # the process's malloc settings, which move system time
        save_json_atomic(self.path, state)

    def timed(self, name: str, work, made=None, wait=None, record: bool = True):
        """Run one stage, then note its wall time, CPU time and faults and what it made (`made()`).
        `wait` runs after the work and before the clock stops (the ranks' barrier); only the rank that
        records (`record`) announces the stage."""
        if record:
            log.info("== %s", name)
        start, before = time.monotonic(), own_usage()
        result = work()
        if wait is not None:
            wait()
        allocator.release()  # what this stage kept for its batches is not held through the next
        if record:
            self.record(name, time.monotonic() - start, made() if made else None, usage_since(before))
        return result

    def complete(self, world_size: int) -> None:
        state = self.read()
        state.update(complete=True, world_size=world_size)
        save_json_atomic(self.path, state)

    def seconds(self) -> dict[str, float]:
        return {name: s["seconds"] for name, s in self.read()["stages"].items()}


# -- the pipeline ----------------------------------------------------------------------------------


class Pipeline:
    def __init__(self, out: Path, recipe: dict, env: DistEnv, overwrite_from: str | None, extras=None):
        self.out, self.recipe, self.env, self.extras = out, recipe, env, extras
        self.layout = RunLayout(out)
        self.times = StageTimes(out)
        names = [s for s, _ in STAGES] + ["export"]
        self.overwrite = set(names[names.index(overwrite_from) :]) if overwrite_from else set()
        run = recipe["run"]
        self.data = run["data"]
        self.holdout_dir = str(self.layout.holdout) if recipe["holdout"]["fraction"] > 0 else None
        self.emb_dir = run["teacher_emb"] or str(self.layout.teacher_emb)
        self.balance_dir, self.clusters_dir = str(self.layout.balance), str(self.layout.clusters)
        self.students = [STUDENT] + ([BASELINE] if run["baseline"] else [])

    def stage(self, name: str, work, made=None):
        """Run one stage on every rank; rank 0 records how long it took and what it made."""
        return self.times.timed(name, work, made, wait=lambda: barrier(self.env), record=self.env.is_main)

    def run(self) -> dict:
        r = self.recipe
        if self.holdout_dir:
            cfg = stage_config(
                r, "holdout", data=self.data, out=self.holdout_dir, overwrite="holdout" in self.overwrite
            )
            self.stage("holdout", lambda: hold_out(cfg), lambda: HoldOut.open(self.holdout_dir).identity)
        if not r["run"]["teacher_emb"]:
            cfg = stage_config(r, "embed", data=self.data, out=self.emb_dir, overwrite="embed" in self.overwrite)
            self.stage("embed", lambda: embed(cfg), lambda: Embeddings.open(self.emb_dir).identity)
        balance_cfg = stage_config(
            r, "balance", emb=self.emb_dir, out=self.balance_dir, holdout=self.holdout_dir,
            overwrite="balance" in self.overwrite,
        )  # fmt: skip
        self.stage("balance", lambda: balance(balance_cfg), lambda: balance_identity(self.balance_dir))
        cluster_cfg = stage_config(
            r, "cluster", emb=self.emb_dir, out=self.clusters_dir, balance=self.balance_dir,
            holdout=self.holdout_dir, overwrite="cluster" in self.overwrite,
        )  # fmt: skip
        self.stage("cluster", lambda: cluster(cluster_cfg), lambda: clusters_identity(self.clusters_dir))
        self.train_students()
        self.stage("eval", self.evaluate, self.evaluations_identity)
        if self.env.is_main:
            self.stage_rank0("inside", self.look_inside, lambda: inside_identity(self.layout.inside))
            self.stage_rank0("export", self.export, lambda: identity(self.layout.models / MODELS_INDEX))
            from clipcid.report import write_report

            report = write_report(self.out, self.extras() if self.extras else None)
            self.times.complete(self.env.world_size)
            log.info("report: %s", report)
        barrier(self.env)
        from clipcid.report import report_path

        return {"report": str(report_path(self.out)), "timings": self.times.seconds()}

    def train_students(self) -> None:
        """The students (CID, and the CLIP-only baseline when asked): in turn, or side by side on a CPU
        (util/side_by_side.py), each then recorded in run.json with its own time."""
        configs = {name: self.distill_config(name) for name in self.students}
        pending = [name for name in self.students if finished_training(configs[name]) is None]
        device = pick_device(configs[self.students[0]].device).type
        processes = processes_for(len(pending), device, self.env.world_size, self.recipe["run"]["side_by_side"])
        if processes > 1:
            log.info("== %s", ", ".join(pending))
            for done in run_side_by_side([Job(name, distill, configs[name]) for name in pending], processes):
                others = [name for name in pending if name != done.name]
                self.times.record(
                    done.name, done.seconds, run_identity(self.run_dir(done.name)), {**done.cpu, "side_by_side": others}
                )
        for name in self.students:  # in turn; a student trained side by side is found finished
            self.stage(name, lambda n=name: distill(configs[n]), lambda n=name: run_identity(self.run_dir(n)))

    def stage_rank0(self, name: str, work, made) -> None:
        self.times.timed(name, work, made)

    def run_dir(self, name: str) -> Path:
        return self.layout.run(name)

    def look_inside(self) -> None:
        """The students' weights and patch features (evaluation/inside.py)."""
        from clipcid.evaluation.inside import Student, look_inside
        from clipcid.report import MODELS

        labels = dict(MODELS)
        d = self.recipe["distill"]
        students = [
            Student(
                m["name"], labels[m["name"]], m["model"], m["pretrained"], d["pretrained"], d["seed"], m["identity"]
            )
            for m in self.models()
            if m["name"] != "teacher"
        ]
        gallery = HoldOut.open(self.holdout_dir).gallery if self.holdout_dir else None
        look_inside(self.layout.inside, students, gallery)

    def distill_config(self, name: str) -> DistillConfig:
        paths = {
            "data": self.data,
            "out": str(self.run_dir(name)),
            "teacher_emb": self.emb_dir,
            "balance": self.balance_dir,
            "clusters": self.clusters_dir if name == "student" else None,
            "holdout": self.holdout_dir,
            "resume": "latest",
            "overwrite": name in self.overwrite,
        }
        cfg = stage_config(self.recipe, "distill", **paths)
        if name == "baseline":
            cfg = dataclasses.replace(cfg, **CLIP_ONLY)
        return cfg

    # -- evaluation: each model on one rank (models are independent; results do not depend on which)

    def models(self) -> list[dict]:
        """The models of this run: name, role, architecture, weights, and what made them."""
        emb = self.recipe["embed"]
        teacher_model = emb["model"]
        weights = weights_fingerprint(teacher_model, emb["pretrained"]) if teacher_model else None
        out = [
            {
                "name": "teacher",
                "model": teacher_model,
                "pretrained": emb["pretrained"],
                "identity": digest([Embeddings.open(self.emb_dir).identity, weights]),
            }
        ]
        arch = self.recipe["distill"]["model"]
        for name in ("baseline", "student"):
            if name in self.students:
                run = self.run_dir(name)
                out.append(
                    {"name": name, "model": arch, "pretrained": str(student_path(run)), "identity": run_identity(run)}
                )
        return out

    def eval_dir(self, name: str) -> Path:
        return self.layout.evaluation(name)

    def evaluations_identity(self) -> str:
        from clipcid.evaluation.run import MODEL_EVAL_FILE

        return digest([identity(self.eval_dir(m["name"]) / MODEL_EVAL_FILE) for m in self.models()])

    def eval_configs(self) -> dict[str, ModelEvalConfig]:
        """The evaluations of this rank: each model on one rank (models are independent)."""
        ev = self.recipe["eval"]
        device = _device_of_rank(ev["device"], self.env)
        return {
            m["name"]: ModelEvalConfig(
                out=str(self.eval_dir(m["name"])),
                model=m["model"],
                pretrained=m["pretrained"],
                model_identity=m["identity"],
                holdout=self.holdout_dir,
                teacher_emb=self.emb_dir if m["name"] == "teacher" else None,
                datasets=ev["datasets"],
                dataset_root=ev["dataset_root"],
                suite_root=ev["suite_root"] if m["model"] else None,
                batch_size=ev["batch_size"],
                workers=ev["workers"],
                device=device,
                precision=ev["precision"],
                queries=ev["queries"],
                overwrite="eval" in self.overwrite,
            )
            for i, m in enumerate(self.models())
            if i % self.env.world_size == self.env.rank
        }

    def evaluate(self) -> None:
        configs = self.eval_configs()
        pending = [name for name, cfg in configs.items() if finished_evaluation(cfg) is None]
        device = pick_device(next(iter(configs.values())).device).type if configs else "cpu"
        processes = processes_for(len(pending), device, self.env.world_size, self.recipe["run"]["side_by_side"])
        if processes > 1:
            jobs = [Job(name, evaluate_model, dataclasses.replace(configs[name], speed=False)) for name in pending]
            run_side_by_side(jobs, processes)
            for cfg in configs.values():  # each model's speed timed alone, on every thread
                add_speed(cfg)
        else:
            for name in pending:
                evaluate_model(configs[name])
        barrier(self.env)
        if self.env.is_main:
            from clipcid.distill.checkpoint import too_short

            # A student or baseline trained too briefly: their comparison is marked, not hidden.
            short = {n: too_short(self.run_dir(n)) for n in self.students}
            records = []
            for m in self.models():
                _, found = read_suite_results(self.eval_dir(m["name"]))
                extra = {"too_short_to_judge": short[m["name"]]} if short.get(m["name"]) else {}
                records += [{**record, "role": ROLES[m["name"]], **extra} for record in found.values()]
            write_results(self.out / RESULTS_FILE, records)

    # -- export: the students as folders plain open_clip loads, with model cards

    def export(self) -> None:
        from clipcid.export import ExportConfig, export_model

        models = self.models()
        settings = {m["name"]: m["identity"] for m in models}
        folder = RunFolder(self.layout.models, MODELS_INDEX, settings, overwrite=True)
        if folder.finished_run() is not None:
            return
        index = {}
        with folder:
            for m in models:
                entry = {"role": ROLES[m["name"]], "model": m["model"], "pretrained": m["pretrained"], "folder": None}
                if m["name"] == "teacher" and not _small_local_checkpoint(m["pretrained"]):
                    entry["referenced"] = True  # a tag, a local-dir folder or a big file: not copied
                elif m["model"]:
                    target = self.layout.model(m["name"])
                    export_model(
                        ExportConfig(
                            m["model"],
                            m["pretrained"],
                            str(target),
                            name=f"clipcid {m['name']}",
                            description=self.describe_model(m),
                            results=str(self.eval_dir(m["name"])),
                            overwrite=True,
                        )
                    )
                    entry["folder"] = str(target)
                measured = read_model_evaluation(self.eval_dir(m["name"])) or {}
                entry.update({k: measured[k] for k in ("parameters", "images_per_second") if k in measured})
                index[m["name"]] = entry
            folder.finish({"models": index})

    def describe_model(self, m: dict) -> str:
        d = self.recipe["distill"]
        if m["name"] == "teacher":
            return f"The teacher of this run: `{m['model']}` with weights `{m['pretrained']}`."
        loss = (
            "the CLIP loss only (the baseline)"
            if m["name"] == "baseline"
            else f"CLIP-CID: the CLIP loss plus cluster-level and instance-level distillation (w_cls {d['w_cls']:g}, "
            f"w_kl {d['w_kl']:g}, w_ins {d['w_ins']:g})"
        )
        return (
            f"A `{d['model']}` student trained by `clipcid run` with {loss}, {d['epochs']} epoch(s) of batch "
            f"{d['batch_size']} x {self.env.world_size} process(es), lr {d['lr']:g}, seed {d['seed']}, on the pairs of "
            f"`{self.data}` that Image Semantic Balance kept, none of the held-out pairs among them."
        )


def _device_of_rank(device: str, env: DistEnv) -> str:
    from clipcid.stage import pick_device

    return str(pick_device(device, env.local_rank))


def _small_local_checkpoint(pretrained: str | None) -> bool:
    return (
        bool(pretrained) and Path(pretrained).is_file() and Path(pretrained).stat().st_size < COPY_TEACHER_BELOW_BYTES
    )


def read_models(out: str | Path) -> dict[str, dict]:
    """OUT/models/models.json of a finished run: per model, its role, architecture, weights, folder (None
    when referenced), size and speed, and the identity of what made it."""
    from clipcid.stage import read_finished

    record = read_finished(RunLayout(out).models / MODELS_INDEX, "run")
    return {name: {**entry, "identity": record["settings"].get(name)} for name, entry in record["models"].items()}


def run_pipeline(cfg: RunConfig, extras=None) -> dict:
    """`clipcid run`: check everything that can be checked, print and write the settings, run the stages.
    `extras` (Python only: the demo's) is called before the report is written and returns report.Extras."""
    validate(cfg)
    recipe, sources = resolve_recipe(cfg)
    out = output_folder(cfg.out)
    check_inputs(recipe)
    changed = first_changed_stage(out, recipe)
    if changed and not cfg.overwrite:
        stage, what = changed
        raise ClipcidError(
            f"{out}: {stage} finished with other settings ({what}); use --overwrite to redo {stage} and the stages "
            "after it, or another --out"
        )
    with distributed(recipe["distill"]["device"]) as env:
        if env.is_main:
            print(describe(recipe, sources), flush=True)
            save_json_atomic(RunLayout(out).recipe, recipe)
        barrier(env)
        return Pipeline(out, recipe, env, changed[0] if changed else None, extras).run()


def summary_text(result: dict) -> str:
    lines = [f"{name:<12} {seconds:8.1f} s" for name, seconds in result["timings"].items()]
    return "\n".join([*lines, f"report: {result['report']}"])
