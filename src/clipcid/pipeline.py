"""`clipcid run`: the whole method on the user's own shards, in one command.

    holdout -> embed -> balance -> cluster -> distill (student, and with --baseline a CLIP-only
    student on the same rows, steps and seed) -> eval -> inside -> export -> report

The stages are declared once, in STAGES at the end of this module: name, settings (the config class
whose fields make the recipe's section), the fields the pipeline fills, the settings that do not
change what it writes, the stages it reads, and its run function. The recipe's sections, the printed
settings, `--set`, --overwrite, the order, the timing and OUT/run.json all come from that list.

Every stage writes its own folder under OUT through the stage's owner module and decides alone, by
stage.py's one rule (RunFolder), whether it finished with these settings: running the same line again
redoes nothing that finished and resumes what did not; a stage that finished with other settings is
refused with the setting that differs, and --overwrite redoes it (and so the stages that read it,
whose inputs' identities then change). The settings of every stage come from the stage's own
defaults, then a recipe file (--recipe, the schema of OUT/recipe.json: one section per stage holding
that stage's config fields), then the command line (its named flags, and --set SECTION.FIELD=VALUE for
any field); the result is printed at the start and written to OUT/recipe.json.

Under torchrun every stage uses every rank (parts, query blocks, DDP, models split across ranks for
evaluation); rank 0 alone writes the recipe, the models folder and the report.

The folders: layout.py (RunLayout), the one place a run folder's paths are spelled.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clipcid.balance.artifact import identity_of as balance_identity
from clipcid.balance.run import RUNTIME_FIELDS as BALANCE_RUNTIME
from clipcid.balance.run import BalanceConfig, balance
from clipcid.cluster.artifact import identity_of as clusters_identity
from clipcid.cluster.run import ClusterConfig, cluster
from clipcid.config import default_workers, option, validate
from clipcid.distill.checkpoint import identity_of as run_identity
from clipcid.distill.checkpoint import student_path
from clipcid.distill.train import RUNTIME_FIELDS as DISTILL_RUNTIME
from clipcid.distill.train import DistillConfig, distill, finished_training
from clipcid.embed.artifact import Embeddings
from clipcid.embed.run import RUNTIME_FIELDS as EMBED_RUNTIME
from clipcid.embed.run import EmbedConfig, embed
from clipcid.errors import ClipcidError
from clipcid.evaluation.features import weights_fingerprint
from clipcid.evaluation.inside import InsideConfig
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
from clipcid.holdout import RUNTIME_FIELDS as HOLDOUT_RUNTIME
from clipcid.holdout import HoldOut, HoldoutConfig, hold_out
from clipcid.inputs.parts import discover_parts, iter_rows
from clipcid.layout import BASELINE, STUDENT, RunLayout
from clipcid.models import check_model_spec
from clipcid.stage import DistEnv, RunFolder, barrier, digest, distributed, identity, pick_device
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
# The hold-out reads the shards as embed does: these settings of the embed section are the hold-out's too.
TABLE_FIELDS = ("rows_per_part", "image_column", "caption_column")


@dataclass
class RunSection:
    """The pipeline's own settings (section "run" of a recipe)."""

    data: str | None = option(None, "shards: a folder, brace pattern or glob; img2dataset's webdataset or files output")
    teacher_emb: str | None = option(None, "teacher embeddings already made (clipcid embed, clip-retrieval layout)")
    baseline: bool = option(False, "also train a CLIP-loss-only student on the same rows, steps and seed")
    side_by_side: bool = option(
        True, "on a CPU, train the students and evaluate the models in parallel processes, the cores split"
    )


@dataclass
class EvalSection:
    """How every model is evaluated (section "eval" of a recipe)."""

    datasets: list[str] | None = option(None, "more datasets, as `clipcid eval --dataset` takes them")
    dataset_root: str | None = option(None, "with wds/NAME datasets: their folder, may use {dataset}")
    suite_root: str | None = option(None, "a suite of `clipcid data build-eval`: every task of it")
    batch_size: int = option(256, "images per forward pass", at_least=1)
    workers: int = option(help="data loading processes", default_factory=default_workers, at_least=0)
    device: str = option("auto", "auto, cpu or cuda")
    precision: str = option("fp32", "autocast precision", ("fp32", "bf16", "fp16", "amp_bf16", "amp"))
    queries: int = option(4, "held-out captions the report shows with each model's best pictures", at_least=0)


@dataclass(frozen=True, kw_only=True)
class Section:
    """A section of the recipe: a config class, less the fields the pipeline fills."""

    config: type | None  # None: a stage without settings
    filled: tuple[str, ...] = ()  # fields the pipeline fills (paths between stages), not recipe settings
    runtime: tuple[str, ...] = ()  # settings that do not change what the stage writes (printed apart)
    defaults: tuple[tuple[str, object], ...] = ()  # the pipeline's defaults where they differ from the stage's


@dataclass(frozen=True, kw_only=True)
class Stage(Section):
    """One stage of `clipcid run`, declared once (STAGES)."""

    name: str  # its recipe section, its run.json entry, its log line, its folder's owner
    run: Callable[[Pipeline], None]  # the work: builds its config (`Pipeline.config`) and calls its module
    made: Callable[[Pipeline], str | None] | None  # what it wrote, as one fingerprint (run.json); None:
    # the stage notes its parts in run.json itself (the students, each with its own time)
    inputs: tuple[str, ...] = ()  # the stages whose outputs it reads: they come before it
    main_only: bool = False  # rank 0 alone (it writes small files from what every rank made)
    applies: Callable[[dict], bool] = lambda recipe: True  # whether it runs with these settings


RUN_SECTION = Section(config=RunSection)


# -- the command line -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFlag:
    """A named flag of `clipcid run`: the recipe fields it sets (SECTION.FIELD); its type, bounds and
    help come from the first of them, so that a stage's default is stated in one place."""

    name: str
    targets: tuple[str, ...]
    role: str = ""  # what the field is in the run's terms ("teacher", "student"), before the field's own help


RUN_FLAGS = (
    RunFlag("data", ("run.data",)),
    RunFlag("teacher", ("embed.model",), "teacher"),
    RunFlag("teacher_pretrained", ("embed.pretrained",), "teacher"),
    RunFlag("teacher_emb", ("run.teacher_emb",)),
    RunFlag("student", ("distill.model",)),
    RunFlag("student_pretrained", ("distill.pretrained",)),
    RunFlag("holdout", ("holdout.fraction",)),
    RunFlag("threshold", ("balance.threshold",), "balance"),
    RunFlag("target_removal", ("balance.target_removal",), "balance"),
    RunFlag("k", ("cluster.k",), "cluster"),
    RunFlag("epochs", ("distill.epochs",), "student"),
    RunFlag("batch_size", ("distill.batch_size",), "student"),
    RunFlag("lr", ("distill.lr",), "student"),
    RunFlag("seed", ("distill.seed",), "student"),
    RunFlag("baseline", ("run.baseline",)),
    RunFlag("eval", ("eval.datasets",)),
    RunFlag("dataset_root", ("eval.dataset_root",)),
    RunFlag("eval_suite", ("eval.suite_root",)),
    RunFlag("workers", ("embed.workers", "distill.workers", "eval.workers")),
    RunFlag("device", ("embed.device", "balance.device", "distill.device", "eval.device")),
    RunFlag("precision", ("embed.precision", "distill.precision", "eval.precision")),
)


def _field(section: str, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(sections()[section].config):
        if f.name == name:
            return f
    raise ValueError(f"RUN_FLAGS: {section} has no field {name}")


def _flag_field(flag: RunFlag) -> tuple[str, str, dataclasses.Field]:
    """The RunConfig field of a flag: optional (None: the recipe or the stage decides), typed, bounded
    and helped by its first target, whose default it names."""
    section, name = flag.targets[0].split(".")
    target = _field(section, name)
    meta = dict(target.metadata)
    where = ", ".join(t.split(".")[0] for t in flag.targets) if len(flag.targets) > 1 else ""
    default = section_defaults(section)[name]
    said = "" if default is None or default is False or where else f" (default {json.dumps(default)})"
    role = f"{flag.role}: " if flag.role else ""
    meta["help"] = f"{role}{meta['help']}{f' ({where})' if where else ''}{said}"
    kind = str(target.type).removesuffix(" | None")
    return flag.name, f"{kind} | None", dataclasses.field(default=None, metadata=meta)


def _run_config() -> type:
    own = [
        ("out", "str", option(help="output folder: every stage's folder, results.json, report.html, recipe.json")),
        *[_flag_field(f) for f in RUN_FLAGS],
        ("recipe", "str | None", option(None, "settings JSON (the schema of OUT/recipe.json); flags given here win")),
        ("set", "list[str] | None", option(None, "any setting: SECTION.FIELD=VALUE (e.g. distill.warmup=500)")),
        ("overwrite", "bool", option(False, "redo a stage made with other settings (and so the stages after it)")),
    ]
    doc = "`clipcid run`'s settings: RUN_FLAGS and its own."
    return dataclasses.make_dataclass("RunConfig", own, namespace={"__doc__": doc, "__module__": __name__})


# -- the recipe ------------------------------------------------------------------------------------


def sections() -> dict[str, Section]:
    """The recipe's sections: the pipeline's own ("run"), then each declared stage's that has settings."""
    return {"run": RUN_SECTION, **{s.name: s for s in STAGES if s.config is not None}}


def section_fields(name: str) -> list[dataclasses.Field]:
    section = sections()[name]
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
    out.update(dict(sections()[name].defaults))
    return out


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _set(recipe: dict, sources: dict, section: str, name: str, value, source: str) -> None:
    if section not in recipe:
        raise ClipcidError(f"{source}: no section '{section}' (sections: {', '.join(recipe)})")
    known = {f.name for f in section_fields(section)}
    if name not in known:
        raise ClipcidError(
            f"{source}: section '{section}' has no setting '{name}' (it has: {', '.join(sorted(known))})"
        )
    recipe[section][name] = value
    sources[section][name] = source


def resolve_recipe(cfg) -> tuple[dict[str, dict], dict[str, dict[str, str]]]:
    """The settings of every stage (stage defaults < recipe file < command line) and where each came
    from ("recipe" or "flag"; a default is absent from the sources)."""
    recipe = {name: section_defaults(name) for name in sections()}
    sources: dict[str, dict[str, str]] = {name: {} for name in recipe}
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
    for flag in RUN_FLAGS:
        value = getattr(cfg, flag.name)
        if value is not None:
            for target in flag.targets:
                section, name = target.split(".")
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
    for section in recipe:
        validate(stage_config(recipe, section))
    return recipe, sources


def stage_config(recipe: dict, section: str, **filled):
    """The stage's config from its recipe section plus the fields the pipeline fills (placeholders when
    not given: the config is then only good for validation)."""
    spec = sections()[section]
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
    """The settings, one section per paragraph, those that do not change what a stage writes after a |;
    * from the recipe file, ! from the command line."""
    marks = {"flag": "!"}
    lines = ["settings (* from --recipe, ! from the command line, the rest defaults; after |: runtime only):"]
    for section, values in recipe.items():
        runtime = sections()[section].runtime
        items: dict[bool, list[str]] = {False: [], True: []}
        for name, value in values.items():
            source = sources[section].get(name)
            mark = marks.get(source, "*" if source else "")
            items[name in runtime].append(f"{name}={json.dumps(value)}{mark}")
        text = ", ".join(items[False]) + (" | " + ", ".join(items[True]) if items[True] else "")
        body = textwrap.fill(text, width=116, initial_indent="  ", subsequent_indent="    ")
        lines.append(f"  [{section}]\n{body}")
    return "\n".join(lines)


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
    def __init__(self, out: Path, recipe: dict, env: DistEnv, overwrite: bool = False, extras=None):
        self.out, self.recipe, self.env, self.overwrite, self.extras = out, recipe, env, overwrite, extras
        self.layout = RunLayout(out)
        self.times = StageTimes(out)
        run = recipe["run"]
        self.data = run["data"]
        self.holdout_dir = str(self.layout.holdout) if recipe["holdout"]["fraction"] > 0 else None
        self.emb_dir = run["teacher_emb"] or str(self.layout.teacher_emb)
        self.balance_dir, self.clusters_dir = str(self.layout.balance), str(self.layout.clusters)
        self.students = [STUDENT] + ([BASELINE] if run["baseline"] else [])

    def config(self, stage: str, **filled):
        """A declared stage's config: its recipe section, the paths given here, and --overwrite."""
        return stage_config(self.recipe, stage, overwrite=self.overwrite, **filled)

    def run(self) -> dict:
        for stage in STAGES:
            if not stage.applies(self.recipe) or (stage.main_only and not self.env.is_main):
                continue
            if stage.made is None:
                stage.run(self)
                continue
            self.times.timed(
                stage.name,
                lambda s=stage: s.run(self),
                lambda s=stage: s.made(self),
                wait=None if stage.main_only else lambda: barrier(self.env),
                record=self.env.is_main,
            )
        if self.env.is_main:
            from clipcid.report import write_report

            report = write_report(self.out, self.extras() if self.extras else None)
            self.times.complete(self.env.world_size)
            log.info("report: %s", report)
        barrier(self.env)
        from clipcid.report import report_path

        return {"report": str(report_path(self.out)), "timings": self.times.seconds()}

    # -- the stages' work (each declared in STAGES below)

    def hold_out(self) -> None:
        hold_out(self.config("holdout", data=self.data, out=self.holdout_dir))

    def embed(self) -> None:
        embed(self.config("embed", data=self.data, out=self.emb_dir))

    def balance(self) -> None:
        balance(self.config("balance", emb=self.emb_dir, out=self.balance_dir, holdout=self.holdout_dir))

    def cluster(self) -> None:
        cluster(
            self.config(
                "cluster", emb=self.emb_dir, out=self.clusters_dir, balance=self.balance_dir, holdout=self.holdout_dir
            )
        )

    def train_students(self) -> None:
        """The students (CID, and the CLIP-only baseline when asked): in turn, or side by side on a CPU
        (util/side_by_side.py), each recorded in run.json with its own time."""
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
            self.times.timed(
                name,
                lambda n=name: distill(configs[n]),
                lambda n=name: run_identity(self.run_dir(n)),
                wait=lambda: barrier(self.env),
                record=self.env.is_main,
            )

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
        look_inside(self.config("inside", out=str(self.layout.inside), gallery=gallery and str(gallery)), students)

    def distill_config(self, name: str) -> DistillConfig:
        cfg = self.config(
            "distill",
            data=self.data,
            out=str(self.run_dir(name)),
            teacher_emb=self.emb_dir,
            balance=self.balance_dir,
            clusters=self.clusters_dir if name == STUDENT else None,
            holdout=self.holdout_dir,
            resume="latest",
        )
        if name == BASELINE:
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
                overwrite=self.overwrite,
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


# -- the stages, declared once ----------------------------------------------------------------------

STAGES: tuple[Stage, ...] = (
    Stage(
        name="holdout",
        config=HoldoutConfig,
        filled=("data", "out", "overwrite", *TABLE_FIELDS),
        runtime=HOLDOUT_RUNTIME,
        # Small data are fitted: the default 1 % rises to what gives --min-pairs usable pairs, up to 10 %.
        defaults=(("fit_up_to", 0.1),),
        run=Pipeline.hold_out,
        made=lambda p: HoldOut.open(p.holdout_dir).identity,
        applies=lambda recipe: recipe["holdout"]["fraction"] > 0,
    ),
    Stage(
        name="embed",
        config=EmbedConfig,
        filled=("data", "out", "overwrite"),
        runtime=EMBED_RUNTIME,
        run=Pipeline.embed,
        made=lambda p: Embeddings.open(p.emb_dir).identity,
        applies=lambda recipe: not recipe["run"]["teacher_emb"],
    ),
    Stage(
        name="balance",
        config=BalanceConfig,
        filled=("emb", "out", "holdout", "overwrite"),
        runtime=BALANCE_RUNTIME,
        inputs=("holdout", "embed"),
        run=Pipeline.balance,
        made=lambda p: balance_identity(p.balance_dir),
    ),
    Stage(
        name="cluster",
        config=ClusterConfig,
        filled=("emb", "out", "balance", "holdout", "overwrite"),
        runtime=("plots",),
        inputs=("holdout", "embed", "balance"),
        run=Pipeline.cluster,
        made=lambda p: clusters_identity(p.clusters_dir),
    ),
    Stage(
        name="distill",
        config=DistillConfig,
        filled=("data", "out", "teacher_emb", "balance", "clusters", "holdout", "resume", "overwrite"),
        runtime=DISTILL_RUNTIME,
        defaults=(("save_every_n_steps", 200), ("log_every_n_steps", 20)),  # resumable mid-epoch
        inputs=("holdout", "embed", "balance", "cluster"),
        run=Pipeline.train_students,
        made=None,  # each student its own entry in run.json
    ),
    Stage(
        name="eval",
        config=EvalSection,
        runtime=("batch_size", "workers", "device"),
        inputs=("holdout", "embed", "distill"),
        run=Pipeline.evaluate,
        made=Pipeline.evaluations_identity,
    ),
    Stage(
        name="inside",
        config=InsideConfig,
        filled=("out", "gallery", "overwrite"),
        inputs=("holdout", "distill"),
        run=Pipeline.look_inside,
        made=lambda p: inside_identity(p.layout.inside),
        main_only=True,
    ),
    Stage(
        name="export",
        config=None,
        inputs=("distill", "eval"),
        run=Pipeline.export,
        made=lambda p: identity(p.layout.models / MODELS_INDEX),
        main_only=True,
    ),
)

RunConfig = _run_config()


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


def run_pipeline(cfg, extras=None) -> dict:
    """`clipcid run`: check everything that can be checked, print and write the settings, run the stages.
    `extras` (Python only: the demo's) is called before the report is written and returns report.Extras."""
    validate(cfg)
    recipe, sources = resolve_recipe(cfg)
    out = output_folder(cfg.out)
    check_inputs(recipe)
    with distributed(recipe["distill"]["device"]) as env:
        if env.is_main:
            print(describe(recipe, sources), flush=True)
            save_json_atomic(RunLayout(out).recipe, recipe)
        barrier(env)
        return Pipeline(out, recipe, env, cfg.overwrite, extras).run()


def summary_text(result: dict) -> str:
    lines = [f"{name:<12} {seconds:8.1f} s" for name, seconds in result["timings"].items()]
    return "\n".join([*lines, f"report: {result['report']}"])
