"""`clipcid demo`: `clipcid run` on the embedded offline corpus, with a teacher made here.

corpus -> hold-out (the pipeline's, before any model runs, stratified by style) -> held-out suite (its
seen-distribution tasks made of the hold-out) -> teacher (LiT: an
ImageNet-pretrained image network and the pretrained MiniLM text tower, both locked; projections
trained on their features, computed once, never on held-out pairs) -> `clipcid run` with the demo's
recipe: the teacher's embeddings are given (--teacher-emb: projected from the features it was trained
on, so its feature pass is not run twice), the suite is the evaluation (--eval-suite), and a CLIP-only
baseline trains beside the CID student. What is the demo's own: the corpus, the suite, the teacher,
its showcase on names of held-out styles, and --study. Settings: clipcid/configs/demo.json (the run's
recipe schema, plus the sections corpus and lit).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from clipcid.config import default_workers, option, validate
from clipcid.corpus.build import BuildDemoConfig, build_demo_corpus, summary_table
from clipcid.corpus.build import identity_of as corpus_identity
from clipcid.corpus.eval_suite import BuildEvalConfig, build_eval_suite
from clipcid.evaluation.datasets import SUITE_INDEX
from clipcid.holdout import hold_out
from clipcid.holdout import identity_of as holdout_identity
from clipcid.layout import TEACHER, RunLayout
from clipcid.lit import LitConfig, lit, model_path, read_history
from clipcid.lit import identity_of as lit_identity
from clipcid.pipeline import RunConfig, StageTimes, resolve_recipe, run_pipeline, stage_config
from clipcid.recipe import load_recipe, recipe_path
from clipcid.report import MODELS, Extras
from clipcid.stage import RunFolder, identity
from clipcid.util.fileio import output_folder
from clipcid.util.templates import render

log = logging.getLogger("clipcid")

SHOWCASE_FILE = "showcase.json"  # the demo's showcase on names (OUT/showcase), written and read only here
# The tuning plan first: the main and length plans run the settings it chooses on validation.
STUDY_PLANS = ("study_tuning", "study", "study_teachers", "study_length")


@dataclass
class DemoConfig:
    out: str = option("demo", "output folder of every stage and the report")
    quick: bool = option(False, "a small slice, for a smoke run")
    workers: int = option(help="processes for rendering and data loading", default_factory=default_workers, at_least=0)
    npm_root: str = option("node_modules", "where `make sources` installed the npm sets")
    recipe: str | None = option(None, "settings JSON (default: clipcid/configs/demo.json, or demo-quick.json)")
    study: bool = option(
        False,
        "then run `clipcid study` with the shipped plans (study_tuning, study, study_teachers, study_length) into "
        "OUT/study, and `clipcid paper` on it",
    )


def run_demo(cfg: DemoConfig) -> dict:
    validate(cfg)
    out = output_folder(cfg.out)
    recipe = load_recipe(cfg.quick, cfg.recipe)
    times = StageTimes(out)
    layout = RunLayout(out)
    corpus_dir, suite_dir, teacher_run = layout.corpus, layout.suite, layout.run(TEACHER)
    corpus = times.timed(
        "corpus",
        lambda: build_demo_corpus(
            BuildDemoConfig(out=str(corpus_dir), workers=cfg.workers, npm_root=cfg.npm_root, **recipe["corpus"])
        ),
        lambda: corpus_identity(corpus_dir),
    )
    print(summary_table(corpus))
    # The pipeline's own hold-out (stratified by style), made first: the teacher must not train on it
    # either, and the suite's seen-distribution tasks are made of it. The pipeline then finds it finished
    # with the same settings: its config is the pipeline's own, from the same command.
    holdout_dir = layout.holdout
    teacher = recipe["lit"]
    run_cfg = RunConfig(
        out=str(out),
        data=str(corpus_dir),
        teacher=teacher["model"],
        teacher_pretrained=str(model_path(teacher_run)),
        teacher_emb=str(layout.teacher_emb),
        recipe=str(recipe_path(cfg.quick, cfg.recipe)),
        eval_suite=str(suite_dir),
        workers=cfg.workers,
    )
    run_recipe, _ = resolve_recipe(run_cfg)
    holdout_cfg = stage_config(run_recipe, "holdout", data=str(corpus_dir), out=str(holdout_dir), overwrite=False)
    times.timed("holdout", lambda: hold_out(holdout_cfg), lambda: holdout_identity(holdout_dir))
    times.timed(
        "eval_suite",
        lambda: build_eval_suite(
            BuildEvalConfig(
                str(suite_dir),
                recipe["corpus"]["image_size"],
                cfg.npm_root,
                cfg.workers,
                corpus=str(corpus_dir),
                holdout=str(holdout_dir),
                # A suite made by an earlier clipcid (before the validation split, the coarse tasks) is
                # rebuilt: it is derived from the sources and the hold-out, and so are the evaluations
                # beside it, which the run then makes again.
                overwrite=True,
            )
        ),
        lambda: identity(suite_dir / SUITE_INDEX),
    )
    times.timed(
        "teacher",
        lambda: lit(
            LitConfig(
                data=str(corpus_dir),
                out=str(teacher_run),
                workers=cfg.workers,
                emb_out=str(layout.teacher_emb),
                holdout=str(holdout_dir),
                **teacher,
            )
        ),
        lambda: lit_identity(teacher_run),
    )

    def extras() -> Extras:
        times.timed(
            "showcase", lambda: _showcase(out, str(suite_dir)), lambda: identity(layout.showcase / SHOWCASE_FILE)
        )
        return Extras(
            title="clipcid demo",
            intro=render("demo_intro.html.j2"),
            after_results=[showcase_html(out, suite_dir), study_html(out)],
            curves=[(read_history(teacher_run), "teacher (LiT: CLIP loss on the projections, per epoch)")],
        )

    result = run_pipeline(run_cfg, extras=extras)
    if cfg.study:
        from clipcid.paper import PaperConfig, write_paper
        from clipcid.report import write_report
        from clipcid.study import StudyConfig, bundled_plan, run_study

        for plan in STUDY_PLANS:  # one folder: the plans share the runs they have in common
            run_study(
                StudyConfig(out=str(layout.study), plan=str(bundled_plan(plan)), demo=str(out), workers=cfg.workers)
            )
        write_paper(PaperConfig(study=str(layout.study)))  # the paper's tables in its order, with verdicts
        write_report(out, extras())  # again, now with the study
    return {"report": result["report"], "timings": times.seconds()}


# -- the demo's showcase: names of held-out styles -------------------------------------------------


def _showcase(out: Path, suite_root: str) -> dict:
    """Each model's top-3 answers on held-out pictures of the name-level emoji task, and its top-5
    pictures for a few text queries (OUT/showcase/showcase.json)."""
    from clipcid.evaluation.datasets import build_dataset, suite_datasets
    from clipcid.evaluation.run import load_encoder, read_names_showcase
    from clipcid.evaluation.showcase import names_showcase
    from clipcid.pipeline import read_models

    models = {name: (m["model"], m["pretrained"]) for name, m in read_models(out).items() if m["model"]}
    names = [d["name"] for d in suite_datasets(suite_root) if d.get("name_level")]
    settings = {"models": {n: read_models(out)[n].get("identity") for n in models}, "datasets": names}
    folder = RunFolder(RunLayout(out).showcase, SHOWCASE_FILE, settings)
    done = folder.finished_run()
    if done is not None or not names:
        return done or {}
    with folder:
        dataset = build_dataset(names[0], suite_root)
        shown = {}
        for name, (arch, ckpt) in models.items():
            # Each model's evaluation wrote its answers from the features it had computed; an evaluation
            # made before it did is asked again here.
            made = read_names_showcase(RunLayout(out).evaluation(name))
            ok = made is not None and made["dataset"] == dataset.name
            shown[name] = made if ok else names_showcase(load_encoder(arch, ckpt), dataset)
        return folder.finish({"dataset": dataset.name, "shown": shown})


def showcase_html(out: Path, suite_root: Path) -> str:
    """The models at work on names: top-3 zero-shot answers beside pictures of a held-out style, top-5
    pictures per query."""
    from clipcid.stage import read_record

    record = read_record(RunLayout(out).showcase / SHOWCASE_FILE)
    if not record or not record.get("complete") or "shown" not in record:
        return ""
    from clipcid.evaluation.datasets import build_dataset
    from clipcid.evaluation.showcase import pictures

    shown = record["shown"]
    models = [(n, label) for n, label in MODELS if n in shown]
    first = shown[models[0][0]]
    dataset = build_dataset(first["dataset"], suite_root)
    names = dataset.classnames
    wanted = set(first["examples"]) | {i for n, _ in models for row in shown[n]["retrieved"] for i in row}
    images = pictures(dataset, wanted)
    examples = [
        {
            "picture": images[index],
            "truth": names[first["targets"][k]],
            "answers": [[(names[c], c == first["targets"][k]) for c in shown[n]["top3"][k]] for n, _ in models],
        }
        for k, index in enumerate(first["examples"])
    ]
    queries = [
        {
            "text": query,
            "lines": [
                {
                    "label": label,
                    "pictures": [
                        (images[i], t == first["query_targets"][q])
                        for i, t in zip(shown[n]["retrieved"][q], shown[n]["retrieved_targets"][q], strict=True)
                    ],
                }
                for n, label in models
            ],
        }
        for q, query in enumerate(first["queries"])
    ]
    return render(
        "demo_showcase.html.j2",
        dataset=dataset.name,
        classes=len(names),
        labels=[label for _, label in models],
        examples=examples,
        queries=queries,
    )


def study_html(out: Path) -> str:
    """The tables and plots of each plan OUT/study holds results of."""
    from clipcid.paper import paper_html, read_paper
    from clipcid.report import png_of
    from clipcid.study import read_study, study_figures, study_names, study_tables_html

    folder = RunLayout(out).study
    paper = read_paper(folder) if folder.is_dir() else None
    plans = []
    for name in study_names(folder) if folder.is_dir() else []:
        study = read_study(folder, name)
        figures = study_figures(folder, name)
        plans.append(
            {
                "name": name,
                "runs": len(study["runs"]),
                "tables": study_tables_html(study),
                "means": png_of(figures["means"]),
                "curves": png_of(figures["curves"]),
            }
        )
    return render("demo_study.html.j2", paper=paper_html(paper) if paper else None, plans=plans, folder=str(folder))
