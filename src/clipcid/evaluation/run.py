"""`clipcid eval` and `clipcid eval-suite`: tasks on datasets, results in CLIP_benchmark's JSON schema.

This module also owns the result files: a suite's folder (one JSON per task, summary.json/.md/.csv), a
model's evaluation folder in a `clipcid run` (the same, plus eval.json with the settings, the model's
size and speed, the retrieval ranks and the held-out showcase), and a run's results.json (every record
with its role). Everything else reads them through the functions here."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipcid.config import default_workers, option, validate
from clipcid.errors import ClipcidError
from clipcid.evaluation import linear_probe as lp
from clipcid.evaluation import zeroshot_classification as zsc
from clipcid.evaluation import zeroshot_retrieval as zsr
from clipcid.evaluation.datasets import (
    DEFAULT_SUITE_ROOT,
    ROBUST,
    SEEN,
    SEEN_COARSE,
    EvalDataset,
    build_dataset,
    group_of,
    suite_datasets,
)
from clipcid.evaluation.features import (
    Encoder,
    OpenClipEncoder,
    checkpoint_cache_id,
    image_features,
    text_features,
)
from clipcid.util import allocator
from clipcid.util.fileio import atomic_path, save_json_atomic
from clipcid.util.tables import markdown_table

log = logging.getLogger("clipcid")

TASKS = ("zeroshot_classification", "linear_probe", "zeroshot_retrieval")
VALIDATION = "validation"
# A linear probe's validation figure: trained on the rest of its train split, measured on this share of it.
VALIDATION_FOLD = 0.3


def tasks_of_split(tasks: list[str], dataset: EvalDataset, split: str) -> list[str]:
    """The tasks a suite evaluation at `split` runs on a dataset: all of them at test; at validation,
    those of a dataset with a validation split, and the linear probe (on a fold of its train split)."""
    if split != VALIDATION or VALIDATION in dataset.splits:
        return list(tasks)
    return [t for t in tasks if t == "linear_probe"]


@dataclass
class EvalConfig:
    model: str = option(help="open_clip architecture")
    dataset: str = option(help="a CLIP_benchmark wds folder (or wds:PATH), imagefolder:PATH, or a suite name")
    pretrained: str | None = option(None, "open_clip tag or checkpoint path")
    task: str = option("auto", "what to run", ("auto", "zeroshot_classification", "linear_probe", "zeroshot_retrieval"))
    output: str | None = option(None, "result JSON; may use {dataset} {model} {pretrained} {task}")
    batch_size: int = option(256, "images per forward pass", at_least=1)
    templates: str | None = option(None, "file with one prompt template per line, {c} = class")
    classnames: str | None = option(None, "file with one class name per line")
    fewshot_k: int | None = option(None, "linear probe: k training samples per class", at_least=1)
    feature_root: str | None = option(None, "cache image features here")
    suite_root: str = option(DEFAULT_SUITE_ROOT, "where `clipcid data build-eval` wrote the suite")
    dataset_root: str | None = option(
        None, "with --dataset wds/NAME (CLIP_benchmark's spelling): the dataset's folder, may use {dataset}"
    )
    workers: int = option(help="data loading processes", default_factory=default_workers, at_least=0)
    device: str = option("auto", "auto, cpu or cuda")
    precision: str = option("fp32", "autocast precision", ("fp32", "bf16", "fp16", "amp_bf16", "amp"))
    seed: int = option(0, "seed of the linear probe's few-shot sample")
    train_split: str = option("train", "split the linear probe trains on")
    test_split: str = option("test", "split every task is measured on")


@dataclass
class EvalSuiteConfig:
    model: str = option(help="open_clip architecture")
    out: str | None = option(help="folder for one JSON per task, summary.md, summary.csv, summary.json")
    pretrained: str | None = option(None, "open_clip tag or checkpoint path")
    suite_root: str = option(DEFAULT_SUITE_ROOT, "where `clipcid data build-eval` wrote the suite")
    batch_size: int = option(256, "images per forward pass", at_least=1)
    workers: int = option(help="data loading processes", default_factory=default_workers, at_least=0)
    device: str = option("auto", "auto, cpu or cuda")
    precision: str = option("fp32", "autocast precision", ("fp32", "bf16", "fp16", "amp_bf16", "amp"))
    feature_root: str | None = option(None, "cache image features here")
    only: list[str] | None = option(None, "only these datasets")
    split: str = option(
        "test",
        "test: the figures tables report; validation: the figures choices are made on (the held-out tasks' "
        "validation split and each linear probe on a validation fold of its train split; no test image is read)",
        ("test", "validation"),
    )
    weights_identity: str | None = option(
        None, "what the weights are, for the settings (default: the checkpoint's name, size and time)"
    )
    overwrite: bool = option(False, "replace an evaluation made with other settings (a stale one is not kept)")


def load_encoder(model: str, pretrained: str | None, device: str = "auto", precision: str = "fp32") -> Encoder:
    from clipcid.models import load_model
    from clipcid.stage import pick_device

    dev = pick_device(device)
    loaded = load_model(model, pretrained, dev)
    return OpenClipEncoder(
        loaded.model,
        loaded.preprocess,
        loaded.tokenizer,
        dev,
        precision,
        checkpoint_cache_id(model, pretrained),
    )


def auto_tasks(dataset: EvalDataset) -> list[str]:
    if dataset.kind == "retrieval":
        return ["zeroshot_retrieval"]
    tasks = ["zeroshot_classification"]
    if "train" in dataset.splits:
        tasks.append("linear_probe")
    return tasks


def _read_lines(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ClipcidError(f"file not found: {path}")
    return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


class TaskRunner:
    """Runs tasks on one dataset with one encoder, computing each split's features once."""

    def __init__(self, encoder: Encoder, dataset: EvalDataset, cfg: EvalConfig):
        self.encoder, self.dataset, self.cfg = encoder, dataset, cfg
        self._features: dict[str, tuple[np.ndarray, list]] = {}
        self.ranks: zsr.Ranks | None = None  # of the last retrieval task: paired comparisons need them

    def features(self, split: str) -> tuple[np.ndarray, list]:
        if split not in self._features:
            self._features[split] = image_features(
                self.encoder,
                self.dataset,
                split,
                self.cfg.batch_size,
                self.cfg.workers,
                self.cfg.feature_root,
            )
        return self._features[split]

    def _classnames(self) -> list[str]:
        names = _read_lines(self.cfg.classnames) if self.cfg.classnames else self.dataset.classnames
        if not names:
            raise ClipcidError(f"dataset {self.dataset.name} has no class names; pass --classnames FILE")
        return names

    def run(self, task: str) -> dict:
        if task not in TASKS:
            raise ClipcidError(f"unknown task '{task}'; choose one of {', '.join(TASKS)} or auto")
        if (task == "zeroshot_retrieval") != (self.dataset.kind == "retrieval"):
            raise ClipcidError(f"task {task} does not apply to {self.dataset.kind} dataset {self.dataset.name}")
        start = time.monotonic()
        if task == "zeroshot_classification":
            classnames = self._classnames()
            templates = _read_lines(self.cfg.templates) if self.cfg.templates else self.dataset.templates
            feats, targets = self.features(self.cfg.test_split)
            self._check_labels(targets, classnames)
            classifier = zsc.zeroshot_classifier(self.encoder, classnames, templates, self.cfg.batch_size)
            metrics = zsc.evaluate(feats, targets, classifier)
            metrics.update(n_images=len(targets), chance=1 / len(classnames))
        elif task == "linear_probe":
            classnames = self._classnames()
            train_x, train_y = self.features(self.cfg.train_split)
            if self.cfg.test_split == VALIDATION and VALIDATION not in self.dataset.splits:
                # A validation fold of the train split: the test split is never read.
                train_y = np.asarray(train_y)
                fit, fold = lp.validation_split(train_y, VALIDATION_FOLD, self.cfg.seed)
                train_x, train_y, test_x, test_y = train_x[fit], train_y[fit], train_x[fold], list(train_y[fold])
            else:
                test_x, test_y = self.features(self.cfg.test_split)
            self._check_labels(list(train_y) + list(test_y), classnames)
            metrics = lp.linear_probe(
                train_x,
                np.asarray(train_y),
                test_x,
                np.asarray(test_y),
                len(classnames),
                fewshot_k=self.cfg.fewshot_k,
                seed=self.cfg.seed,
                classnames=classnames,
                device=getattr(self.encoder, "device", "cpu"),
            )
            metrics.update(n_images=len(test_y), chance=1 / len(classnames))
        else:
            feats, captions = self.features(self.cfg.test_split)
            texts = [c for caps in captions for c in caps]
            self.ranks = zsr.ranks(feats, captions, text_features(self.encoder, texts, self.cfg.batch_size))
            metrics = zsr.metrics(self.ranks)
            metrics.update(n_images=len(captions), chance=retrieval_chance(len(captions)))
        metric, value = main_metric({"task": task, "metrics": metrics})
        log.info("%s %s: %s %.4f (%.1f s)", self.dataset.name, task, metric, value, time.monotonic() - start)
        return metrics

    def _check_labels(self, targets: list, classnames: list[str]) -> None:
        if targets and max(targets) >= len(classnames):
            raise ClipcidError(
                f"dataset {self.dataset.name} has label {max(targets)} but only {len(classnames)} class names"
            )


def result_record(dataset: str, model: str, pretrained: str | None, task: str, metrics: dict) -> dict:
    """CLIP_benchmark's result schema (NaN metrics are written as null, which JSON can hold);
    `clip_benchmark build` joins model and pretrained, so pretrained is always a string."""
    return {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained or "",
        "task": task,
        "metrics": metrics,
        "language": "en",
    }


def output_path(template: str, dataset: str, model: str, pretrained: str | None, task: str, n_tasks: int) -> Path:
    name = template.format(dataset=dataset, model=model, pretrained=Path(pretrained or "none").stem, task=task)
    path = Path(name)
    if n_tasks > 1 and "{task}" not in template:
        path = path.with_name(f"{path.stem}_{task}{path.suffix or '.json'}")
    return path


def run_eval(cfg: EvalConfig, encoder: Encoder | None = None) -> list[dict]:
    validate(cfg)
    dataset = build_dataset(cfg.dataset, cfg.suite_root, cfg.dataset_root)
    tasks = auto_tasks(dataset) if cfg.task == "auto" else [cfg.task]
    if cfg.task == "linear_probe" and "train" not in dataset.splits and cfg.train_split == "train":
        dataset.require_split("train")
    if encoder is None:
        encoder = load_encoder(cfg.model, cfg.pretrained, cfg.device, cfg.precision)
    runner = TaskRunner(encoder, dataset, cfg)
    records = []
    for task in tasks:
        record = result_record(dataset.benchmark_name, cfg.model, cfg.pretrained, task, runner.run(task))
        records.append(record)
        if cfg.output:
            save_json_atomic(output_path(cfg.output, dataset.name, cfg.model, cfg.pretrained, task, len(tasks)), record)
    return records


# The suite's averages, in the order tables show them: (summary key, label).
AVERAGES = (
    ("seen_zeroshot_mean_acc1", "seen distribution: zero-shot mean acc1"),
    ("seen_retrieval_mean_recall@5", "seen distribution: retrieval mean R@5"),
    ("seen_coarse_zeroshot_mean_per_class_recall", "seen distribution: coarse zero-shot mean per-class recall"),
    ("robustness_zeroshot_mean_acc1", "robustness (unseen styles): zero-shot mean acc1"),
    ("zeroshot_mean_acc1", "zero-shot mean acc1"),
    ("zeroshot_names_mean_acc1", "name-level zero-shot mean acc1"),
    ("linear_probe_mean_acc1", "linear-probe mean acc1"),
    ("retrieval_mean_recall@5", "retrieval mean R@5"),
)


def retrieval_chance(n_images: int, k: int = 5) -> float:
    """Recall@k of a random ranking, either way: a caption's picture among k of n pictures; a picture's
    c captions among k of the n·c texts (about k·c / (n·c) when k is small against n)."""
    return min(1.0, k / max(n_images, 1))


def task_label(record: dict) -> str:
    """A task's row name with its number of pictures and chance level (of its main metric), when known."""
    m = record["metrics"]
    name = f"{record['dataset'].removeprefix('wds/')} {TASK_SHORT.get(record['task'], record['task'])}"
    if m.get("n_images") is None or m.get("chance") is None:
        return name
    return f"{name} ({m['n_images']:,} pictures, chance {100 * m['chance']:.2g})"


TASK_SHORT = {"zeroshot_classification": "zero-shot", "linear_probe": "linear probe", "zeroshot_retrieval": "retrieval"}


def task_figures(records: list[dict]) -> dict[str, float]:
    """Each task's main figure by "dataset/task"; the skewed-class tasks (the seen coarse ones and the emoji
    groups of unseen styles) also by mean per-class recall, as "dataset/task:mean_per_class_recall"."""
    out = {}
    for r in records:
        out[f"{r['dataset']}/{r['task']}"] = main_metric(r)[1]
        name = r["dataset"].removeprefix("wds/")
        if r["task"] == "zeroshot_classification" and (name in SEEN_COARSE or name.startswith("emoji_")):
            out[f"{r['dataset']}/{r['task']}:{PER_CLASS}"] = r["metrics"][PER_CLASS]
    return out


PER_CLASS = "mean_per_class_recall"


def main_metric(record: dict) -> tuple[str, float]:
    """The one number a task's result is compared by: (its name, its value)."""
    m = record["metrics"]
    if record["task"] == "zeroshot_classification":
        return "acc1", m["acc1"]
    if record["task"] == "linear_probe":
        return "lp_acc1", m["lp_acc1"]
    return "mean recall@5", (m["image_retrieval_recall@5"] + m["text_retrieval_recall@5"]) / 2


def summarise(
    records: list[dict], name_level: set[str] | frozenset[str] = frozenset(), coarse: Iterable[str] | None = None
) -> dict:
    """Averages over the suite (AVERAGES): zero-shot acc1 by name and retrieval recall@5 (both ways) of
    the seen distribution, and the mean per-class recall of its coarse tasks (`coarse`: those kept, by
    default every one present); zero-shot acc1 of the robustness group; and, over every task but the seen
    ones (their definitions from before the seen tasks existed), zero-shot acc1, the same over the
    name-level datasets alone, linear-probe acc1 and retrieval recall@5."""
    coarse = set(SEEN_COARSE if coarse is None else coarse)
    seen_names = {r["dataset"].removeprefix("wds/") for r in records if group_of(r["dataset"]) == SEEN} - set(
        SEEN_COARSE
    )  # the seen tasks but the coarse ones, which have a mean of their own

    def mean(task: str, group: str | None = "other", only: set[str] | None = None, metric=None) -> float | None:
        values = [
            main_metric(r)[1] if metric is None else r["metrics"][metric]
            for r in records
            if r["task"] == task
            and (only is None or r["dataset"].removeprefix("wds/") in only)
            and (group_of(r["dataset"]) == group if group != "other" else group_of(r["dataset"]) != SEEN)
        ]
        return float(np.mean(values)) if values else None

    return {
        "seen_zeroshot_mean_acc1": mean("zeroshot_classification", SEEN, seen_names),
        "seen_retrieval_mean_recall@5": mean("zeroshot_retrieval", SEEN),
        "seen_coarse_zeroshot_mean_per_class_recall": mean(
            "zeroshot_classification", SEEN, coarse, "mean_per_class_recall"
        ),
        "robustness_zeroshot_mean_acc1": mean("zeroshot_classification", ROBUST),
        "zeroshot_mean_acc1": mean("zeroshot_classification"),
        "zeroshot_names_mean_acc1": mean("zeroshot_classification", only=set(name_level)),
        "linear_probe_mean_acc1": mean("linear_probe"),
        "retrieval_mean_recall@5": mean("zeroshot_retrieval"),
    }


def write_summary(records: list[dict], summary: dict, out: Path, title: str) -> None:
    rows = [
        [r["dataset"].removeprefix("wds/"), r["task"], *main_metric(r), r["metrics"].get("n_images"),
         r["metrics"].get("chance")]
        for r in records
    ]  # fmt: skip
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["dataset", "task", "metric", "value", "pictures", "chance"])
    for row in rows:
        chance = "" if row[5] is None else f"{row[5]:.4f}"
        writer.writerow([row[0], row[1], row[2], f"{row[3]:.4f}", row[4] or "", chance])
    for key, value in summary.items():
        writer.writerow(["average", key, key, "" if value is None else f"{value:.4f}"])
    with atomic_path(out / "summary.csv") as tmp:
        tmp.write_text(buf.getvalue())
    cells = [
        [d, t, m, f"{v * 100:.2f}", str(n or "–"), "–" if c is None else f"{c * 100:.2g}"] for d, t, m, v, n, c in rows
    ]
    lines = [f"# {title}", "", *markdown_table(["dataset", "task", "metric", "value", "pictures", "chance"], cells, 3)]
    averages = [[k, "–" if v is None else f"{v * 100:.2f}"] for k, v in summary.items()]
    lines += ["", *markdown_table(["average", "value"], averages)]
    with atomic_path(out / SUMMARY_MARKDOWN) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def suite_evaluation_folder(cfg: EvalSuiteConfig):
    """The run folder of a suite evaluation (cfg.out), its settings naming what its figures follow from:
    the split, the suite (its datasets and their splits), the weights, and the datasets when not all."""
    from clipcid.evaluation.datasets import suite_identity
    from clipcid.stage import RunFolder

    weights = cfg.weights_identity or checkpoint_cache_id(cfg.model, cfg.pretrained)
    # "student": the key the study's evaluations were first recorded with (a finished one stays finished).
    settings = {"split": cfg.split, "suite": suite_identity(cfg.suite_root), "student": weights}
    if cfg.only:
        settings["only"] = sorted(cfg.only)
    return RunFolder(cfg.out, SUITE_EVAL_FILE, settings, cfg.overwrite)


def run_eval_suite(cfg: EvalSuiteConfig, encoder: Encoder | None = None) -> dict:
    """Every task of the held-out suite; with cfg.out, one JSON per task plus summary.md, summary.csv and
    summary.json there, done once per settings (a finished evaluation is read back). Returns {"records",
    "summary", "split", "tasks" (each task's main figure), "eval_seconds"}."""
    validate(cfg)
    folder = suite_evaluation_folder(cfg) if cfg.out else None
    if folder is not None:
        done = folder.finished_run(lambda: (Path(cfg.out) / SUMMARY_FILE).is_file())
        if done is not None:
            return {"records": list(read_suite_results(cfg.out)[1].values()), **{k: done[k] for k in SUITE_EVAL_KEYS}}
    start = time.monotonic()
    with folder if folder is not None else contextlib.nullcontext():
        records = _suite_records(cfg, encoder)
        summary = summarise(records, {e["name"] for e in _suite_entries(cfg) if e.get("name_level")})
        made = {"split": cfg.split, "summary": summary, "tasks": task_figures(records)}
        made["eval_seconds"] = time.monotonic() - start
        if folder is not None:
            out_dir = Path(cfg.out)
            write_summary(records, summary, out_dir, f"{cfg.model} ({cfg.pretrained or 'random init'})")
            about = {"model": cfg.model, "pretrained": cfg.pretrained, "split": cfg.split}
            save_json_atomic(out_dir / SUMMARY_FILE, {**about, **summary})
            folder.finish(made)
    return {"records": records, **made}


def _suite_entries(cfg: EvalSuiteConfig) -> list[dict]:
    entries = suite_datasets(cfg.suite_root)
    return [e for e in entries if e["name"] in cfg.only] if cfg.only else entries


def _suite_records(cfg: EvalSuiteConfig, encoder: Encoder | None) -> list[dict]:
    """Every task's record, each also written to cfg.out as it is made."""
    model, pretrained, suite_root = cfg.model, cfg.pretrained, cfg.suite_root
    if encoder is None:
        encoder = load_encoder(model, pretrained, cfg.device, cfg.precision)
    records = []
    for entry in _suite_entries(cfg):
        dataset = build_dataset(entry["name"], suite_root)
        tasks = tasks_of_split(entry["tasks"], dataset, cfg.split)
        if not tasks:
            continue
        task_cfg = EvalConfig(
            model=model,
            pretrained=pretrained,
            dataset=entry["name"],
            suite_root=suite_root,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            feature_root=cfg.feature_root,
            test_split=cfg.split,
        )
        runner = TaskRunner(encoder, dataset, task_cfg)
        for task in tasks:
            record = result_record(dataset.benchmark_name, model, pretrained, task, runner.run(task))
            record["split"] = cfg.split
            records.append(record)
            if cfg.out:
                save_json_atomic(Path(cfg.out) / f"{dataset.name}_{task}.json", record)
    return records


# -- result files, read and written only here ------------------------------------------------------

SUMMARY_FILE = "summary.json"
SUITE_EVAL_FILE = "evaluation.json"  # a suite evaluation's settings and figures (RunFolder's record)
SUITE_EVAL_KEYS = ("split", "summary", "tasks", "eval_seconds")
SUMMARY_MARKDOWN = "summary.md"
RESULTS_FILE = "results.json"
MODEL_EVAL_FILE = "eval.json"


def task_file(folder: Path, dataset: str, task: str) -> Path:
    return Path(folder) / f"{dataset.removeprefix('wds/').replace('/', '_')}_{task}.json"


def read_suite_results(folder: str | Path) -> tuple[dict | None, dict[str, dict]]:
    """(summary.json or None, {file stem: record}) of a folder of results (a suite's, or a model's
    evaluation in a run)."""
    folder = Path(folder)
    summary = json.loads((folder / SUMMARY_FILE).read_text()) if (folder / SUMMARY_FILE).is_file() else None
    records = {}
    for f in sorted(folder.glob("*_*.json")):
        record = json.loads(f.read_text())
        if isinstance(record, dict) and {"dataset", "task", "metrics"} <= set(record):
            records[f.stem] = record
    return summary, records


def write_results(path: str | Path, records: list[dict]) -> None:
    """A run's results.json: CLIP_benchmark records, each with its `role` (teacher, student, baseline)."""
    save_json_atomic(path, records)


def read_results(path: str | Path) -> list[dict]:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else []


def read_model_evaluation(folder: str | Path) -> dict | None:
    """A model's finished evaluation in a run: eval.json's record (size, speed, summary), or None."""
    from clipcid.stage import finished, read_record

    record = read_record(Path(folder) / MODEL_EVAL_FILE)
    return record if finished(record) else None


def read_ranks(folder: str | Path, dataset: str) -> zsr.Ranks | None:
    path = Path(folder) / f"{dataset.removeprefix('wds/')}_ranks.npz"
    return zsr.Ranks.load(path) if path.is_file() else None


def read_showcase(folder: str | Path) -> dict | None:
    path = Path(folder) / "showcase.json"
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class ModelEvalConfig:
    """How one model of a `clipcid run` is evaluated: on the held-out pairs, on the extra datasets and
    on a suite (not a CLI command; the run and the demo use it)."""

    out: str
    model: str | None  # None: a teacher known only by its embeddings
    pretrained: str | None
    model_identity: str | None  # what the weights were made from (a run's settings), for the settings
    holdout: str | None = None
    teacher_emb: str | None = None  # take the held-out features from here instead of running the model
    datasets: list[str] | None = None
    dataset_root: str | None = None
    suite_root: str | None = None
    batch_size: int = 256
    workers: int = 2
    device: str = "auto"
    precision: str = "fp32"
    queries: int = 4
    overwrite: bool = False
    # Time the image tower here (off when evaluations run side by side: a process sharing the cores would
    # time itself slow; add_speed then times it alone).
    speed: bool = True


RUNTIME_FIELDS = ("out", "batch_size", "workers", "device", "overwrite", "speed")
NAMES_SHOWCASE_FILE = "names_showcase.json"


def _holdout_features(cfg: ModelEvalConfig, encoder: Encoder | None) -> tuple[np.ndarray, np.ndarray, list]:
    """(image features, caption features, captions) of the held-out gallery, in its order."""
    from clipcid.holdout import HoldOut

    holdout = HoldOut.open(cfg.holdout)
    pairs = holdout.pairs()
    captions = [[c] for c in pairs.column("caption").to_pylist()]
    if cfg.teacher_emb is not None:
        from clipcid.embed.artifact import Embeddings
        from clipcid.stage import unit_rows

        emb = Embeddings.open(cfg.teacher_emb)
        holdout.check_parts(emb.n_parts)
        rows = emb.images.offsets[pairs.column("part").to_numpy()] + pairs.column("row").to_numpy()
        order = np.argsort(rows, kind="stable")  # EmbeddingStore.rows reads sorted rows
        img, txt = np.empty((len(rows), emb.images.dim), np.float32), np.empty((len(rows), emb.texts.dim), np.float32)
        img[order], txt[order] = emb.images.rows(rows[order]), emb.texts.rows(rows[order])
        return unit_rows(img), unit_rows(txt), captions
    dataset = build_dataset(f"wds:{holdout.gallery}")
    feats, caps = image_features(encoder, dataset, "test", cfg.batch_size, cfg.workers)
    return feats, text_features(encoder, [c[0] for c in caps], cfg.batch_size), caps


def holdout_showcase(image_feats: np.ndarray, text_feats: np.ndarray, queries: int, top: int = 5) -> dict:
    """Each of a few held-out captions (evenly spread, the same for every model) with the model's `top`
    best pictures of the gallery, by position in the gallery."""
    n = len(image_feats)
    chosen = sorted({int(i) for i in np.linspace(0, n - 1, num=min(queries, n))}) if n else []
    scores = text_feats[chosen] @ image_feats.T if chosen else np.zeros((0, n))
    return {"queries": chosen, "retrieved": np.argsort(-scores, axis=1, kind="stable")[:, :top].tolist()}


def _evaluation_folder(cfg: ModelEvalConfig):
    from clipcid.stage import RunFolder

    settings = {k: v for k, v in cfg.__dict__.items() if k not in RUNTIME_FIELDS}
    if cfg.holdout:
        from clipcid.holdout import HoldOut

        settings["holdout"] = HoldOut.open(cfg.holdout).identity
    return RunFolder(cfg.out, MODEL_EVAL_FILE, settings, cfg.overwrite)


def finished_evaluation(cfg: ModelEvalConfig) -> dict | None:
    """What an evaluation finished with these settings recorded, or None (a file read)."""
    return _evaluation_folder(cfg).finished_run(lambda: (Path(cfg.out) / SUMMARY_FILE).is_file())


def evaluate_model(cfg: ModelEvalConfig) -> dict:
    """One model's records in cfg.out (one JSON per task, the held-out ranks and showcase, summary.json,
    eval.json with its size and speed); a finished evaluation with the same settings is returned as it is."""
    done = finished_evaluation(cfg)
    if done is not None:
        return done
    folder, out = _evaluation_folder(cfg), Path(cfg.out)
    with folder:
        encoder = load_encoder(cfg.model, cfg.pretrained, cfg.device, cfg.precision) if cfg.model else None
        records, extra = [], []
        if cfg.holdout:
            img, txt, captions = _holdout_features(cfg, encoder)
            ranks = zsr.ranks(img, captions, txt)
            ranks.save(out / "holdout_pairs_ranks.npz")
            metrics = zsr.metrics(ranks)
            records.append(
                result_record(f"wds/{HOLDOUT_DATASET}", cfg.model or "", cfg.pretrained, "zeroshot_retrieval", metrics)
            )
            save_json_atomic(out / "showcase.json", holdout_showcase(img, txt, cfg.queries))
        if cfg.datasets or cfg.suite_root:
            if encoder is None:
                raise ClipcidError(
                    "--eval and --eval-suite need the teacher's model (--teacher), not only its embeddings"
                )
            for spec in cfg.datasets or []:
                task_cfg = EvalConfig(
                    cfg.model,
                    spec,
                    cfg.pretrained,
                    dataset_root=cfg.dataset_root,
                    batch_size=cfg.batch_size,
                    workers=cfg.workers,
                    precision=cfg.precision,
                    device=cfg.device,
                    suite_root=cfg.suite_root or DEFAULT_SUITE_ROOT,
                )
                extra += run_eval(task_cfg, encoder)
            if cfg.suite_root:
                suite_cfg = EvalSuiteConfig(
                    cfg.model,
                    None,
                    cfg.pretrained,
                    cfg.suite_root,
                    cfg.batch_size,
                    cfg.workers,
                    cfg.device,
                    cfg.precision,
                )
                extra += run_eval_suite(suite_cfg, encoder)["records"]
        name_level = (
            [e["name"] for e in suite_datasets(cfg.suite_root) if e.get("name_level")] if cfg.suite_root else []
        )
        if name_level:  # the report's "models at work" on the first name task, from features already computed
            from clipcid.evaluation.showcase import names_showcase

            shown = names_showcase(encoder, build_dataset(name_level[0], cfg.suite_root))
            save_json_atomic(out / NAMES_SHOWCASE_FILE, shown)
        summary = summarise(extra, set(name_level))
        for record in records + extra:
            save_json_atomic(task_file(out, record["dataset"], record["task"]), record)
        if records:
            summary["holdout_retrieval"] = records[0]["metrics"]
        save_json_atomic(out / SUMMARY_FILE, {"model": cfg.model, "pretrained": cfg.pretrained, **summary})
        measured = model_size_and_speed(encoder, cfg.batch_size) if encoder is not None and cfg.speed else {}
        result = folder.finish({"records": len(records) + len(extra), "summary": summary, **measured})
    del encoder
    allocator.release()  # the next model's evaluation does not sit on this one's kept activations
    return result


def add_speed(cfg: ModelEvalConfig) -> None:
    """Time the image tower of a finished evaluation that was made without (`speed` off) and add its size
    and speed to the record; a record that has them, or a model known only by embeddings, is left."""
    folder = _evaluation_folder(cfg)
    record = folder.recorded()
    if not cfg.model or finished_evaluation(cfg) is None or "images_per_second" in record:
        return
    measured = model_size_and_speed(load_encoder(cfg.model, cfg.pretrained, cfg.device, cfg.precision), cfg.batch_size)
    folder.finish({**{k: v for k, v in record.items() if k not in ("settings", "complete")}, **measured})


def read_names_showcase(folder: str | Path) -> dict | None:
    """A model's answers on the first name task of its suite (evaluation/showcase.py), or None."""
    from clipcid.stage import read_record

    return read_record(Path(folder) / NAMES_SHOWCASE_FILE)


HOLDOUT_DATASET = "holdout_pairs"


def model_size_and_speed(encoder: OpenClipEncoder, batch_size: int, repeats: int = 3) -> dict:
    """Parameters, and images per second of the image tower at its own resolution (median of `repeats`
    timed batches after one warm-up, random pixels), on the evaluation's device."""
    import torch

    from clipcid.models import count_parameters

    model = encoder.model
    size = model.visual.preprocess_cfg.get("size", 224)
    size = size if isinstance(size, int) else size[0]
    batch = min(batch_size, 64)
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        encoder.encode_images(images)  # returns on the CPU: the device has finished
        if i:
            times.append(time.perf_counter() - start)
    return {
        "parameters": count_parameters(model),
        "images_per_second": batch / float(np.median(times)),
        "speed_batch": batch,
        "speed_device": str(encoder.device),
    }
