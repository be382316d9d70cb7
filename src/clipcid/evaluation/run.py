"""`clipcid eval` and `clipcid eval-suite`: tasks on datasets, results in CLIP_benchmark's JSON schema."""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipcid.config import default_workers, option
from clipcid.errors import ClipcidError
from clipcid.evaluation import linear_probe as lp
from clipcid.evaluation import zeroshot_classification as zsc
from clipcid.evaluation import zeroshot_retrieval as zsr
from clipcid.evaluation.datasets import DEFAULT_SUITE_ROOT, EvalDataset, build_dataset, suite_datasets
from clipcid.evaluation.features import (
    Encoder,
    OpenClipEncoder,
    checkpoint_cache_id,
    image_features,
    text_features,
)
from clipcid.util.fileio import atomic_path, output_folder, save_json_atomic

log = logging.getLogger("clipcid")

TASKS = ("zeroshot_classification", "linear_probe", "zeroshot_retrieval")


@dataclass
class EvalConfig:
    model: str = option(help="open_clip architecture")
    dataset: str = option(help="a CLIP_benchmark wds folder (or wds:PATH), imagefolder:PATH, or a suite name")
    pretrained: str | None = option(None, "open_clip tag or checkpoint path")
    task: str = option("auto", "what to run", ("auto", "zeroshot_classification", "linear_probe", "zeroshot_retrieval"))
    output: str | None = option(None, "result JSON; may use {dataset} {model} {pretrained} {task}")
    batch_size: int = option(256, "images per forward pass")
    templates: str | None = option(None, "file with one prompt template per line, {c} = class")
    classnames: str | None = option(None, "file with one class name per line")
    fewshot_k: int | None = option(None, "linear probe: k training samples per class")
    feature_root: str | None = option(None, "cache image features here")
    suite_root: str = option(DEFAULT_SUITE_ROOT, "where `clipcid data build-eval` wrote the suite")
    dataset_root: str | None = option(
        None, "with --dataset wds/NAME (CLIP_benchmark's spelling): the dataset's folder, may use {dataset}"
    )
    workers: int = option(help="data loading processes", default_factory=default_workers)
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
    batch_size: int = option(256, "images per forward pass")
    workers: int = option(help="data loading processes", default_factory=default_workers)
    device: str = option("auto", "auto, cpu or cuda")
    precision: str = option("fp32", "autocast precision", ("fp32", "bf16", "fp16", "amp_bf16", "amp"))
    feature_root: str | None = option(None, "cache image features here")
    only: list[str] | None = option(None, "only these datasets")


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
        elif task == "linear_probe":
            classnames = self._classnames()
            train_x, train_y = self.features(self.cfg.train_split)
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
        else:
            feats, captions = self.features(self.cfg.test_split)
            texts = [c for caps in captions for c in caps]
            metrics = zsr.evaluate(feats, captions, text_features(self.encoder, texts, self.cfg.batch_size))
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
    ("zeroshot_mean_acc1", "zero-shot mean acc1"),
    ("zeroshot_names_mean_acc1", "name-level zero-shot mean acc1"),
    ("linear_probe_mean_acc1", "linear-probe mean acc1"),
    ("retrieval_mean_recall@5", "retrieval mean R@5"),
)


def main_metric(record: dict) -> tuple[str, float]:
    """The one number a task's result is compared by: (its name, its value)."""
    m = record["metrics"]
    if record["task"] == "zeroshot_classification":
        return "acc1", m["acc1"]
    if record["task"] == "linear_probe":
        return "lp_acc1", m["lp_acc1"]
    return "mean recall@5", (m["image_retrieval_recall@5"] + m["text_retrieval_recall@5"]) / 2


def summarise(records: list[dict], name_level: set[str] | frozenset[str] = frozenset()) -> dict:
    """Averages over the suite (AVERAGES): zero-shot acc1, the same over the name-level datasets alone,
    linear-probe acc1, retrieval recall@5 (both ways)."""

    def mean(task: str, only: set[str] | None = None) -> float | None:
        values = [
            main_metric(r)[1]
            for r in records
            if r["task"] == task and (only is None or r["dataset"].removeprefix("wds/") in only)
        ]
        return float(np.mean(values)) if values else None

    return {
        "zeroshot_mean_acc1": mean("zeroshot_classification"),
        "zeroshot_names_mean_acc1": mean("zeroshot_classification", set(name_level)),
        "linear_probe_mean_acc1": mean("linear_probe"),
        "retrieval_mean_recall@5": mean("zeroshot_retrieval"),
    }


def write_summary(records: list[dict], summary: dict, out: Path, title: str) -> None:
    rows = [[r["dataset"].removeprefix("wds/"), r["task"], *main_metric(r)] for r in records]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["dataset", "task", "metric", "value"])
    for row in rows:
        writer.writerow([row[0], row[1], row[2], f"{row[3]:.4f}"])
    for key, value in summary.items():
        writer.writerow(["average", key, key, "" if value is None else f"{value:.4f}"])
    with atomic_path(out / "summary.csv") as tmp:
        tmp.write_text(buf.getvalue())
    lines = [f"# {title}", "", "| dataset | task | metric | value |", "|---|---|---|---:|"]
    lines += [f"| {d} | {t} | {m} | {v * 100:.2f} |" for d, t, m, v in rows]
    lines += ["", "| average | value |", "|---|---:|"]
    lines += [f"| {k} | {'–' if v is None else f'{v * 100:.2f}'} |" for k, v in summary.items()]
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def run_eval_suite(cfg: EvalSuiteConfig, encoder: Encoder | None = None) -> dict:
    """Every task of the held-out suite; one JSON per task plus summary.md and summary.csv in cfg.out."""
    model, pretrained, suite_root = cfg.model, cfg.pretrained, cfg.suite_root
    out_dir = output_folder(cfg.out) if cfg.out else None
    entries = suite_datasets(suite_root)
    if cfg.only:
        entries = [e for e in entries if e["name"] in cfg.only]
    if encoder is None:
        encoder = load_encoder(model, pretrained, cfg.device, cfg.precision)
    records = []
    for entry in entries:
        task_cfg = EvalConfig(
            model=model,
            pretrained=pretrained,
            dataset=entry["name"],
            suite_root=suite_root,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            feature_root=cfg.feature_root,
        )
        dataset = build_dataset(entry["name"], suite_root)
        runner = TaskRunner(encoder, dataset, task_cfg)
        for task in entry["tasks"]:
            record = result_record(dataset.benchmark_name, model, pretrained, task, runner.run(task))
            records.append(record)
            if out_dir:
                save_json_atomic(out_dir / f"{dataset.name}_{task}.json", record)
    summary = summarise(records, {e["name"] for e in entries if e.get("name_level")})
    if out_dir:
        write_summary(records, summary, out_dir, f"{model} ({pretrained or 'random init'})")
        save_json_atomic(out_dir / "summary.json", {"model": model, "pretrained": pretrained, **summary})
    return {"records": records, "summary": summary}
