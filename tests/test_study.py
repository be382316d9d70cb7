"""`clipcid study`: variants x seeds end to end, resume, statistics, data variants."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import make_shards
from scipy import stats

import clipcid.evaluation.run as eval_run
import clipcid.study as study_module
import clipcid.study.data as study_data
import clipcid.study.runner as study_runner
from clipcid.balance import BalanceConfig, balance
from clipcid.cluster import ClusterConfig, cluster
from clipcid.corpus.eval_suite import BuildEvalConfig, build_eval_suite
from clipcid.embed import EmbedConfig, embed
from clipcid.errors import ClipcidError
from clipcid.evaluation.run import suite_evaluation_folder
from clipcid.study import StudyConfig, paired_interval, run_study

PLAN = {
    "reference": "clip_only",
    "seeds": [0, 1],
    "base": {"train": {"model": "clipcid-tiny", "batch_size": 16, "lr": 1e-3, "warmup": 2, "max_steps": 2}},
    "variants": [
        {"name": "clip_only", "label": "CLIP only", "train": {"w_cls": 0, "w_kl": 0, "w_ins": 0}},
        {"name": "random_half", "label": "CID, random half", "data": {"balance": {"random_removal": 0.5}}},
    ],
    "comparisons": [["clip_only", "random_half"]],
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("study_artifacts")
    make_shards(root / "shards", n_shards=2, per_shard=32)
    embed(
        EmbedConfig(
            data=str(root / "shards"), model="clipcid-tiny", out=str(root / "emb"), pretrained=str(tiny_checkpoint)
        )
    )
    cluster(ClusterConfig(emb=str(root / "emb"), out=str(root / "clusters"), k=4, plots=False))
    build_eval_suite(BuildEvalConfig(str(root / "suite"), workers=1, only=["digits"]))
    return root


def _config(artifacts, out, plan, name: str = "study") -> StudyConfig:
    plan_file = out.parent / f"plans_{out.name}" / f"{name}.json"  # the results are named after the plan file
    plan_file.parent.mkdir(exist_ok=True)
    plan_file.write_text(json.dumps(plan))
    return StudyConfig(
        out=str(out),
        plan=str(plan_file),
        data=str(artifacts / "shards"),
        teacher_emb=str(artifacts / "emb"),
        clusters=str(artifacts / "clusters"),
        suite_root=str(artifacts / "suite"),
        workers=0,
    )


def test_a_tiny_plan_runs_end_to_end_and_resumes(artifacts, tmp_path, monkeypatch, caplog):
    out = tmp_path / "study"
    with caplog.at_level(logging.INFO, logger=study_runner.log.name):
        result = run_study(_config(artifacts, out, PLAN))
    progress = [m for m in caplog.messages if m.startswith("study: ") and "runs done" in m]
    assert len(progress) == 4 and progress[-1] == "study: 4/4 runs done"
    estimate = r"study: 1/4 runs done; at most \d+ min left \(3 runs at this sitting's [\d.]+ min a run\)"
    assert re.fullmatch(estimate, progress[0])
    runs = {(r["variant"], r["seed"]): r for r in result["runs"]}
    assert set(runs) == {("clip_only", 0), ("clip_only", 1), ("random_half", 0), ("random_half", 1)}
    assert all(r["steps"] == 2 for r in runs.values())
    # Per seed, the data differ only where the variant says so: the random half is drawn per seed.
    half0, half1 = runs["random_half", 0]["settings"]["balance"], runs["random_half", 1]["settings"]["balance"]
    assert half0 != half1 and runs["clip_only", 0]["settings"]["balance"] is None
    assert runs["clip_only", 1]["settings"]["seed"] == 1 and runs["random_half", 1]["settings"]["seed"] == 1
    lp = result["aggregate"]["random_half"]["linear_probe_mean_acc1"]
    values = [runs["random_half", s]["summary"]["linear_probe_mean_acc1"] for s in (0, 1)]
    assert lp["n"] == 2 and lp["mean"] == pytest.approx(np.mean(values))
    assert lp["vs_reference"]["n"] == 2 and lp["vs_reference"]["low"] <= lp["vs_reference"]["mean"]
    md = (out / "study.md").read_text()
    assert "| CLIP only |" in md and "CID, random half" in md and "digits/linear_probe" in md
    assert "| wds/digits/linear_probe | 899 | 10 |" in md  # its pictures and chance level
    csv_rows = (out / "study.csv").read_text().splitlines()
    assert csv_rows[0].startswith("variant,metric,seeds,mean,sd,against,diff") and len(csv_rows) > 4
    # A comparison the plan asks for, here the reference against the variant: the same pairs, negated.
    (asked,) = result["comparisons"]
    assert (asked["variant"], asked["against"]) == ("clip_only", "random_half")
    back = asked["differences"]["linear_probe_mean_acc1"]
    assert back["mean"] == pytest.approx(-lp["vs_reference"]["mean"])
    assert back["low"] == pytest.approx(-lp["vs_reference"]["high"])
    assert "The plan's other comparisons" in md
    report_tables = study_module.study_tables_html(json.loads((out / "study.json").read_text()))
    assert "other comparisons" in report_tables and report_tables.count("<table>") == 3
    assert any(r.startswith("clip_only,linear_probe_mean_acc1,2,,,random_half,") for r in csv_rows)
    assert (out / "study.png").stat().st_size > 1000

    # Started again: every finished run is skipped, nothing is trained or evaluated.
    monkeypatch.setattr(study_runner, "distill", lambda cfg: pytest.fail("a finished run was trained again"))
    monkeypatch.setattr(eval_run, "_suite_records", lambda *a, **k: pytest.fail("evaluated again"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=study_runner.log.name):
        again = run_study(_config(artifacts, out, PLAN))
    assert "min left" not in caplog.text  # nothing was trained in this sitting: no estimate to give
    assert again["aggregate"] == result["aggregate"]
    # `--seeds 1` runs only seed 1, but the tables keep covering every finished run in the folder.
    one_seed = run_study(replace(_config(artifacts, out, PLAN), seeds=[1]))
    assert one_seed["aggregate"] == result["aggregate"] and one_seed["seeds"] == [0, 1]

    # A plan that changes a finished variant's settings is refused, not mixed in.
    changed = json.loads(json.dumps(PLAN))
    changed["variants"][0]["train"]["lr"] = 5e-4
    with pytest.raises(ClipcidError, match="other settings.*rename the variant"):
        run_study(_config(artifacts, out, changed))
    # A run that raises lets go of its folder: the next sitting is not told that it is in use.
    broken_plan = {**PLAN, "variants": [PLAN["variants"][0], {"name": "broken", "label": "broken", "train": {}}],
                   "comparisons": [["clip_only", "broken"]]}  # fmt: skip

    def broken(cfg):
        raise RuntimeError("the student's training failed")

    monkeypatch.setattr(study_runner, "distill", broken)
    with pytest.raises(RuntimeError, match="training failed"):
        run_study(replace(_config(artifacts, out, broken_plan), seeds=[0]))
    assert (out / "runs" / "broken" / "seed0").is_dir() and not (out / "runs" / "broken" / "seed0" / ".lock").exists()


def test_paired_difference_interval_equals_a_hand_computation():
    variant = {0: 0.50, 1: 0.60, 2: 0.70, 3: 0.90}
    reference = {0: 0.40, 1: 0.40, 2: 0.50}  # seed 3 has no pair and is left out
    d = paired_interval(variant, reference)
    # differences 0.1, 0.2, 0.2: mean 1/6, sd 0.0577350, t(0.975, 2) = 4.302653
    half = 4.302653 * 0.0577350 / np.sqrt(3)
    assert d["n"] == 3
    assert d["mean"] == pytest.approx(1 / 6)
    assert d["low"] == pytest.approx(1 / 6 - half, abs=1e-6) and d["high"] == pytest.approx(1 / 6 + half, abs=1e-6)
    assert d["p"] == pytest.approx(stats.ttest_1samp([0.1, 0.2, 0.2], 0).pvalue)  # the paired t test's
    assert paired_interval({0: 0.5}, {0: 0.25}) == {"n": 1, "mean": 0.25, "low": None, "high": None, "p": None}
    assert paired_interval({0: 0.5}, {1: 0.25}) is None


def test_random_removal_removes_exactly_the_asked_count_reproducibly(artifacts, tmp_path):
    def keep(seed: int, name: str) -> np.ndarray:
        stats = balance(
            BalanceConfig(emb=str(artifacts / "emb"), out=str(tmp_path / name), random_removal=0.3, seed=seed)
        )
        assert stats["removed"] == round(0.3 * 64) == 19 and stats["kept"] == 45
        return np.concatenate([np.load(tmp_path / name / "keep" / f"keep_{i}.npy") for i in range(2)])

    first, again, other = keep(7, "a"), keep(7, "b"), keep(8, "c")
    assert first.sum() == 45 and np.array_equal(first, again) and not np.array_equal(first, other)


def test_plan_errors_name_the_problem(artifacts, tmp_path):
    bad = {**PLAN, "variants": [{"name": "x", "train": {"w_typo": 1}}]}
    with pytest.raises(ClipcidError, match="w_typo are not distill settings"):
        run_study(_config(artifacts, tmp_path / "s1", bad))
    with pytest.raises(ClipcidError, match="no variant 'nope'"):
        run_study(_config(artifacts, tmp_path / "s2", {**PLAN, "reference": "nope"}))
    with pytest.raises(ClipcidError, match="no variant 'fd'"):
        run_study(_config(artifacts, tmp_path / "s3", {**PLAN, "comparisons": [["clip_only", "fd"]]}))
    with pytest.raises(ClipcidError, match="comparisons must be pairs"):
        run_study(_config(artifacts, tmp_path / "s4", {**PLAN, "comparisons": [["clip_only"]]}))
    for teacher, said in (
        ({"lit": {"model": "m", "epoch": 2}}, "teacher lit: epoch are not lit settings"),
        ({"clip": {"epochs": 1}}, "teacher clip: a teacher needs its model"),
        ({"distilled": {}}, 'a teacher is "given"'),
    ):
        bad = {**PLAN, "variants": [*PLAN["variants"], {"name": "t", "data": {"teacher": teacher}}]}
        with pytest.raises(ClipcidError, match=said):
            run_study(_config(artifacts, tmp_path / "s5", bad))


TUNING = {
    "purpose": "tuning",
    "split": "validation",
    "select_by": ["linear_probe_mean_acc1"],
    "reference": "lr_small",
    "seeds": [0, 1],
    "base": PLAN["base"],
    "variants": [
        {"name": "lr_small", "series": "clip", "x": 1, "train": {"w_cls": 0, "w_kl": 0, "w_ins": 0, "lr": 1e-4}},
        {"name": "lr_big", "series": "clip", "x": 4, "train": {"w_cls": 0, "w_kl": 0, "w_ins": 0, "lr": 4e-4}},
        {"name": "other", "series": "other", "x": 1, "train": {"w_cls": 0, "w_kl": 0, "w_ins": 0, "lr": 2e-4}},
    ],
}


def test_a_tuning_plan_chooses_on_validation_and_the_main_plan_runs_its_choice_on_test(
    artifacts, tmp_path, monkeypatch
):
    """The choice is made by the named criterion on validation figures only; the plan that reports runs
    the chosen setting at test, its first seed being the tuning run's student (not trained again)."""
    evaluated = []

    def fake_suite(cfg):  # the criterion known in advance: the larger learning rate wins on validation
        folder = suite_evaluation_folder(cfg)  # the real one: done once per settings
        if folder.finished_run() is not None:
            return folder.finished_run()
        evaluated.append((Path(cfg.pretrained).parts[-4], cfg.split))
        lp = (0.6 if "lr_big" in cfg.pretrained else 0.5) + 0.01 * len(evaluated)
        record = {"dataset": "wds/digits", "task": "linear_probe", "metrics": {"lp_acc1": lp}}
        with folder:
            made = {"split": cfg.split, "summary": {"linear_probe_mean_acc1": lp}, "tasks": {}, "eval_seconds": 0.0}
            return {"records": [record], **folder.finish(made)}

    monkeypatch.setattr(study_data, "run_eval_suite", fake_suite)
    out = tmp_path / "study"
    chosen_clip = {"name": "clip", "label": "CLIP only, tuned", "tuned": {"plan": "tuning", "series": "clip"}}
    floor = {"name": "floor", "label": "random initialisation", "untrained": True}
    main = {"reference": "clip", "seeds": [0], "base": PLAN["base"], "variants": [chosen_clip]}
    with pytest.raises(
        ClipcidError, match="variant clip runs the setting plan tuning chooses for clip, which it has not"
    ):
        run_study(_config(artifacts, out, main, "main"))
    tuned = run_study(_config(artifacts, out, TUNING, "tuning"))
    assert {split for _, split in evaluated} == {"validation"} and len(evaluated) == 6
    choice = tuned["choices"]["clip"]
    assert choice["complete"] and choice["chosen"] == "lr_big" and choice["settings"]["lr"] == 4e-4
    assert choice["criterion"]["lr_big"] > choice["criterion"]["lr_small"] and tuned["split"] == "validation"
    assert "## Choices (on validation figures" in (out / "tuning.md").read_text()
    best = {
        "name": "best",
        "label": "the best of clip and other",
        "tuned": {"plan": "tuning", "best_of": ["other", "clip"]},
    }
    main = {**main, "seeds": [0, 1], "variants": [chosen_clip, floor, best]}
    result = run_study(replace(_config(artifacts, out, main, "main"), seeds=[0, 1]))
    runs = {(r["variant"], r["seed"]): r for r in result["runs"]}
    assert runs["clip", 0]["settings"]["lr"] == 4e-4 and runs["clip", 0]["trained_as"] == "lr_big"
    assert runs["clip", 1]["trained_as"] == "lr_big" and runs["clip", 0]["split"] == "test"
    # best_of: the series whose chosen setting scored highest (clip's lr_big, 0.6 against other's 0.5).
    assert runs["best", 0]["settings"]["lr"] == 4e-4 and result["tuned"]["best"]["series"] == "clip"
    assert (out / "runs" / "clip" / "seed0" / "train").is_symlink() and ("clip", "test") in evaluated
    # The floor: students that never trained, a random initialisation per seed, evaluated like the rest.
    assert runs["floor", 0]["steps"] == 0 and runs["floor", 0]["settings"] == {"model": "clipcid-tiny", "seed": 0,
                                                                               "untrained": True}  # fmt: skip
    weights = [(out / "runs" / "floor" / f"seed{s}" / "train" / "student.pt").read_bytes() for s in (0, 1)]
    assert weights[0] != weights[1] and ("floor", "test") in evaluated
    # A tuning plan that would read the test split is refused before anything runs.
    with pytest.raises(ClipcidError, match="a tuning plan chooses settings, so it reads validation figures only"):
        run_study(_config(artifacts, tmp_path / "s", {**TUNING, "split": "test"}, "tuning"))
    with pytest.raises(ClipcidError, match='names its criterion before its runs: "select_by"'):
        run_study(_config(artifacts, tmp_path / "s", {**TUNING, "select_by": ["val_loss"]}, "tuning"))


def test_the_shipped_plans_load_with_known_settings():
    from importlib.resources import files

    plans = sorted(p.name for p in files("clipcid").joinpath("configs").iterdir() if p.name.startswith("study"))
    assert plans == [
        "study.json",
        "study_length.json",
        "study_scale.json",
        "study_settings.json",
        "study_teachers.json",
        "study_tuning.json",
        "study_web.json",
    ]
    tuning = study_module.load_plan(str(files("clipcid").joinpath("configs", "study_tuning.json")), {"model": "m"})
    assert tuning.purpose == "tuning" and tuning.split == "validation" and tuning.seeds == [0, 1]
    series: dict[str, list[float]] = {}
    for v in tuning.variants:
        series.setdefault(v.series, []).append(v.x)
    # The same budget for every method: five settings, x4 apart, around the paper's own (x = 1).
    assert len(series) == 6 and all(xs == [1 / 16, 1 / 4, 1, 4, 16] for xs in series.values())
    web = study_module.load_plan(str(files("clipcid").joinpath("configs", "study_web.json")), {"model": "m"})
    # Three tuned methods on four data sets each; the same-steps control takes the balanced run's steps.
    assert len(web.variants) == 12 and all(v.tuned for v in web.variants)
    assert {v.same_steps_as for v in web.variants if v.same_steps_as} == {
        f"web_{m}_balance" for m in ("clip", "base", "cid")
    }
    for name in plans:
        plan = study_module.load_plan(str(files("clipcid").joinpath("configs", name)), {"model": "clipcid-tiny"})
        assert plan.reference in {v.name for v in plan.variants} and plan.seeds
    main = study_module.load_plan(str(files("clipcid").joinpath("configs", "study.json")), {"model": "clipcid-tiny"})
    assert len(main.variants) == 24 and main.seeds == [0, 1, 2] and main.split == "test"
    seeds = {v.name: v.seeds for v in main.variants}
    assert seeds["cid_tuned"] == seeds["icl_tuned"] == [0, 1, 2, 3, 4] and seeds["k_half"] == seeds["cid"] == [0, 1, 2]
    # Every tuned method takes the tuning plan's choice for its own series; the floor never trains.
    tuned = {v.name: v.tuned["series"] for v in main.variants if v.tuned}
    assert tuned == {f"{s}_tuned": s for s in series} and main.variant("floor").untrained
    demo_base = {"model": "clipcid-tiny", "epochs": 1}  # the demo's recipe trains one epoch
    main = study_module.load_plan(str(files("clipcid").joinpath("configs", "study.json")), demo_base)
    length = study_module.load_plan(str(files("clipcid").joinpath("configs", "study_length.json")), demo_base)
    assert sorted((v.series, v.x) for v in length.variants if v.series) == sorted(
        (s, e) for s in ("CLIP only", "FD", "CID", "ICL", "SimKD") for e in (1, 3, 9)
    )
    # The 1-epoch runs are the main study's: the same names with the same settings.
    for v in length.variants:
        if v.x == 1:
            same = next(m for m in main.variants if m.name == v.name)
            assert same.tuned == v.tuned and same.train == v.train == {} and same.data == v.data
        elif v.x is not None:
            assert v.train == {"epochs": v.x} and v.tuned["plan"] == "study_tuning"


def test_group_seeds_other_teachers_and_curves(artifacts, tmp_path):
    """Seeds per group; a teacher given as embeddings, one trained from scratch with the CLIP loss and a
    LiT one, each evaluated once; a given keep mask with another teacher's clusters; the curves."""
    other = tmp_path / "other_emb"
    embed(EmbedConfig(data=str(artifacts / "shards"), model="clipcid-tiny", out=str(other), seed=7))
    balance(BalanceConfig(emb=str(artifacts / "emb"), out=str(tmp_path / "main_balance"), random_removal=0.25))
    scratch = {"clip": {"model": "clipcid-tiny", "batch_size": 16, "max_steps": 2, "w_cls": 0, "w_kl": 0, "w_ins": 0}}
    lit = {"lit": {"model": "clipcid-lit-mobilenetv2-64", "epochs": 1, "batch_size": 16, "warmup": 1}}
    plan = {
        "reference": "clip_only",
        "seeds": [0],
        "group_seeds": {"A": [0, 1]},
        "weights": ["clip_only"],
        "base": PLAN["base"],
        "variants": [
            {"name": "clip_only", "group": "A", "train": {"w_cls": 0, "w_kl": 0, "w_ins": 0}, "series": "s", "x": 1},
            {"name": "longer", "group": "B", "train": {"w_cls": 0, "w_kl": 0, "w_ins": 0, "max_steps": 3},
             "series": "s", "x": 3},
            {"name": "emb_mask", "group": "B", "data": {"teacher": {"emb": str(other)}}},
            {"name": "scratch_own", "group": "B",
             "data": {"teacher": scratch, "balance": {"random_removal": 0.5}, "cluster": {"k": 3}}},
            {"name": "lit_mask", "group": "B", "data": {"teacher": lit}},
        ],
    }  # fmt: skip
    cfg = replace(_config(artifacts, tmp_path / "s", plan, "study_t"), balance=str(tmp_path / "main_balance"))
    result = run_study(cfg)
    runs = {(r["variant"], r["seed"]): r["settings"] for r in result["runs"]}
    assert set(runs) == {("clip_only", 0), ("clip_only", 1)} | {
        (n, 0) for n in ("longer", "emb_mask", "scratch_own", "lit_mask")
    }
    # Another teacher with the given keep mask: its targets, the main keep mask, clusters made anew on its embeddings.
    emb_mask = runs["emb_mask", 0]
    assert emb_mask["teacher_emb"] == str(other) and emb_mask["balance"] == str(tmp_path / "main_balance")
    assert emb_mask["clusters"] not in (str(artifacts / "clusters"), None)
    from clipcid.cluster.artifact import identity_of

    made = json.loads((tmp_path / "s" / "data" / emb_mask["clusters"].split("/")[-1] / "stats.json").read_text())
    assert (
        made["settings"]["embeddings"]
        != json.loads((artifacts / "clusters" / "stats.json").read_text())["settings"]["embeddings"]
    )
    assert identity_of(emb_mask["clusters"]) is not None
    own = runs["scratch_own", 0]
    assert own["teacher_emb"].endswith("/emb") and "teacher-" in own["teacher_emb"]
    assert own["balance"] != str(tmp_path / "main_balance") and own["teacher_emb"] != runs["lit_mask", 0]["teacher_emb"]
    assert len(np.load(Path(own["clusters"]) / "centroids.npy")) == 3
    teachers = result["teachers"]
    assert len(teachers) == 4 and teachers["given"]["summary"] is None
    evaluated = [t for t in teachers.values() if t["summary"]]
    assert len(evaluated) == 2 and all(t["summary"]["linear_probe_mean_acc1"] is not None for t in evaluated)
    md = (tmp_path / "s" / "study_t.md").read_text()
    assert "The teachers" in md and "clipcid-lit-mobilenetv2-64, LiT" in md
    assert (tmp_path / "s" / "study_t_curves.png").stat().st_size > 1000
    assert study_module.study_names(tmp_path / "s") == ["study_t"]
    # The weights of the named variants over their seeds, each computed once and kept in its run folder.
    weights = result["weights"]["clip_only"]
    assert sorted(weights["seeds"]) == [0, 1] and weights["over_seeds"]["image"]["change"]["std"]["n"] == 2
    cached = json.loads((tmp_path / "s" / "runs" / "clip_only" / "seed1" / "weights.json").read_text())
    assert cached["report"] == weights["seeds"][1] and set(cached["settings"]) == {"student"}  # made from what
    assert "last block's last linear layer" in md

    # `clipcid paper` on these results: the plan's teachers (the given one without an evaluation), the
    # suite's averages and the weights over seeds, as the study computed them.
    from clipcid.paper import PaperConfig, write_paper

    section = {
        "title": "Teachers",
        "plan": "study_t",
        "teachers": "all",
        "rows": ["clip_only", "scratch_own"],
        "metrics": ["linear_probe_mean_acc1", "weights/image/change/std"],
        "claims": [["scratch_own", "clip_only"]],
    }
    (tmp_path / "layout.json").write_text(json.dumps({"sections": [section]}))
    (judged,) = write_paper(PaperConfig(study=str(tmp_path / "s"), layout=str(tmp_path / "layout.json")))["sections"]
    lp = [t["metrics"]["linear_probe_mean_acc1"] for t in judged["teachers"]]
    assert len(lp) == 4 and sum(v is not None for v in lp) == 2
    clip = judged["rows"][0]["metrics"]
    assert clip["linear_probe_mean_acc1"]["mean"] == pytest.approx(
        result["aggregate"]["clip_only"]["linear_probe_mean_acc1"]["mean"]
    )
    assert clip["weights/image/change/std"]["mean"] == pytest.approx(
        weights["over_seeds"]["image"]["change"]["std"]["mean"]
    )
    (claim,) = judged["claims"]
    assert claim["metrics"]["linear_probe_mean_acc1"]["n"] == 1  # scratch_own ran seed 0 only
    assert claim["metrics"]["weights/image/change/std"]["verdict"] == "secondary"  # not the primary metric
    assert claim["metrics"]["weights/image/change/std"]["n"] == 0  # and no weights of scratch_own


def test_each_teacher_is_checked_once_per_study(tmp_path, monkeypatch):
    """Many variants name one teacher: its stages are checked (trained, embedded) once, not per variant."""
    cache = study_module.DataCache(tmp_path, {"data": "unused"}, workers=0)
    made = []
    monkeypatch.setattr(cache, "_make_teacher", lambda spec, folder: made.append(spec) or ("arch", "weights"))
    one, other = {"lit": {"model": "a"}}, {"lit": {"model": "b"}}
    assert (
        cache.teacher(one)
        == cache.teacher(dict(one))
        == str(tmp_path / "data" / f"teacher-{study_data._key(one)}" / "emb")
    )
    cache.teacher(other)
    assert made == [one, other]


def test_every_data_variant_keeps_the_main_balance_s_rows_away_from_the_held_out_pictures(tmp_path):
    """No balance, a weaker balance and random removal keep out the same near-copies of held-out pictures
    as the main balance, so that their seen-distribution figures measure no leak the main one lacks."""
    from test_balance import planted, read_outputs, write_embeddings

    from clipcid.balance.artifact import read_stats
    from clipcid.holdout import HoldoutConfig, hold_out

    x, groups = planted()
    make_shards(tmp_path / "shards", n_shards=3, per_shard=160, seed=5)
    hold_out(HoldoutConfig(str(tmp_path / "shards"), str(tmp_path / "ho"), fraction=0.3, min_pairs=1))
    held = np.concatenate([np.load(tmp_path / "ho" / "mask" / f"holdout_{i}.npy") for i in range(3)])
    emb = str(write_embeddings(tmp_path / "emb", x))
    main = balance(BalanceConfig(emb=emb, out=str(tmp_path / "main"), holdout=str(tmp_path / "ho")))
    near = np.zeros(len(x), bool)
    for g in groups:
        if held[g].any():
            near[g] = ~held[g]
    assert main["near_held_out"] == near.sum() > 0
    given = {"data": str(tmp_path / "shards"), "teacher_emb": emb, "holdout": str(tmp_path / "ho")}
    cache = study_module.DataCache(tmp_path / "study", {**given, "balance": str(tmp_path / "main")}, workers=0)
    assert cache.held_out_guard() == {"held_out_threshold": pytest.approx(0.07)}
    assert cache.held_out_guard("cosine")["held_out_threshold"] == pytest.approx(0.07**2 / 2)
    variants = {
        "none": cache.balance(None, seed=0),
        "weak": cache.balance({"threshold": 0.001}, seed=0),
        "random": cache.balance({"random_removal": 0.5}, seed=1),
    }
    for name, folder in variants.items():
        assert read_stats(folder)["near_held_out"] == near.sum(), name
        _, keep = read_outputs(Path(folder))
        assert not keep[held | near].any(), name
    for name in ("none", "weak"):
        np.testing.assert_array_equal(read_outputs(Path(variants[name]))[1], ~(held | near))
    # Without a hold-out, no balance is no folder, as before.
    plain = study_module.DataCache(tmp_path / "s2", {**given, "holdout": None, "balance": str(tmp_path / "main")}, 0)
    assert plain.held_out_guard() == {} and plain.balance(None, seed=0) is None


def test_a_run_that_raises_leaves_no_lock_behind(artifacts, tmp_path, monkeypatch):
    def broken(cfg):
        raise RuntimeError("the machine fell over")

    monkeypatch.setattr(study_runner, "distill", broken)
    out = tmp_path / "study"
    plan = {**PLAN, "seeds": [0], "variants": PLAN["variants"][:1], "comparisons": []}
    with pytest.raises(RuntimeError, match="fell over"):
        run_study(_config(artifacts, out, plan))
    folder = out / "runs" / "clip_only" / "seed0"
    assert (folder / "run.json").is_file() and not (folder / ".lock").exists()
