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

from clipcid.study.data import DataCache, evaluate_at, evaluation_folder, read_evaluation
from clipcid.study.plan import GIVEN, PLAN, Plan, Variant, bundled_plan, describe_teacher, load_plan
from clipcid.study.render import study_markdown, study_tables_html
from clipcid.study.runner import (
    RUN_FILE,
    Study,
    StudyConfig,
    read_study,
    resolve_artifacts,
    run_folder,
    run_study,
    study_figures,
    study_names,
)
from clipcid.study.stats import aggregate, choices, comparisons, mean_sd, paired_interval

__all__ = [
    "GIVEN", "PLAN", "RUN_FILE", "DataCache", "Plan", "Study", "StudyConfig", "Variant", "aggregate", "bundled_plan",
    "choices", "comparisons", "describe_teacher", "evaluate_at", "evaluation_folder", "load_plan",
    "mean_sd", "paired_interval", "read_evaluation", "read_study", "resolve_artifacts", "run_folder", "run_study",
    "study_figures", "study_markdown", "study_names", "study_tables_html",
]  # fmt: skip
