"""`clipcid run`: the whole method on img2dataset-layout shards, its rerun, a kill and a full disk on the
way, 2 gloo ranks against 1 process, changed settings, and bad inputs refused before any stage starts."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import (
    _clipcid,
    make_img2dataset_shards,
    plain_open_clip,
    run_and_kill_when,
    run_ok,
    run_two_gloo_processes,
    same_files,
)
from test_cluster import same_clustering

from clipcid.cli import main
from clipcid.errors import ClipcidError
from clipcid.evaluation.run import ModelEvalConfig, evaluate_model, read_results, read_suite_results
from clipcid.holdout import HoldOut
from clipcid.layout import RunLayout
from clipcid.pipeline import RunConfig, read_models, resolve_recipe, run_pipeline
from clipcid.report import wall_total

RECIPE = {
    "holdout": {"min_pairs": 20},
    "balance": {"target_removal": 0.2},
    "cluster": {"k": "6"},
    "distill": {"batch_size": 16, "warmup": 2, "save_every_n_steps": 2, "log_every_n_steps": 1},
    "eval": {"workers": 0, "batch_size": 64},
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_checkpoint) -> Path:
    root = tmp_path_factory.mktemp("run_inputs")
    make_img2dataset_shards(root / "shards", n_shards=4, per_shard=60, seed=2)
    (root / "recipe.json").write_text(json.dumps(RECIPE))
    shutil.copyfile(tiny_checkpoint, root / "teacher.pt")
    return root


def args(inputs: Path, out: Path, *more: str) -> list[str]:
    return [
        "run", "--data", str(inputs / "shards"), "--teacher", "clipcid-tiny", "--teacher-pretrained",
        str(inputs / "teacher.pt"), "--student", "clipcid-tiny", "--out", str(out), "--holdout", "0.15",
        "--baseline", "--recipe", str(inputs / "recipe.json"), "--workers", "0", *more,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    # Two threads to share, as on a 2-core machine outside pytest-xdist: the students train side by side.
    with mock.patch.object(torch, "get_num_threads", return_value=2):
        assert main(args(inputs, out)) == 0
    return out


def test_one_command_runs_every_stage_on_img2dataset_shards(finished, inputs, tmp_path):
    out = finished
    for folder in ("holdout", "teacher_emb", "balance", "clusters", "runs/student", "runs/baseline", "models"):
        assert (out / folder).is_dir(), folder
    recipe = json.loads(RunLayout(out).recipe.read_text())
    assert set(recipe) == {"run", "holdout", "embed", "balance", "cluster", "distill", "eval", "inside"}
    assert recipe["embed"]["model"] == "clipcid-tiny" and recipe["distill"]["batch_size"] == 16  # flag, then file
    assert recipe["holdout"]["fraction"] == 0.15 and recipe["cluster"]["k"] == "6"
    assert recipe["distill"]["lr"] == 5e-4 and recipe["balance"]["metric"] == "l2"  # the stages' defaults

    # The held-out rows: chosen by hash, trained on by no stage, near-duplicates dropped too.
    held = HoldOut.open(RunLayout(out).holdout).masks([60] * 4)
    keep = np.concatenate([np.load(RunLayout(out).balance / "keep" / f"keep_{i}.npy") for i in range(4)])
    labels = np.concatenate([np.load(RunLayout(out).clusters / "labels" / f"labels_{i}.npy") for i in range(4)])
    assert 20 <= held.sum() < 60 and not (keep & held).any() and (labels[held] == -1).all()
    stats = json.loads((RunLayout(out).balance / "stats.json").read_text())
    assert stats["held_out"] == held.sum() and stats["balanced"] == 240 - held.sum() - stats["near_held_out"]

    # Results: every record in CLIP_benchmark's schema with a role; held-out recall with its interval.
    records = read_results(out / "results.json")
    assert sorted(r["role"] for r in records) == ["baseline", "student", "teacher"]
    for r in records:
        # About a dozen steps per student: their comparison is marked too short to judge, the teacher's not.
        short = {"too_short_to_judge"} if r["role"] != "teacher" else set()
        assert set(r) == {"dataset", "model", "pretrained", "task", "metrics", "language", "role", *short}
        assert r["dataset"] == "wds/holdout_pairs" and r["task"] == "zeroshot_retrieval"
        m = r["metrics"]
        for k in (1, 5, 10):
            low, high = m[f"image_retrieval_recall@{k}_ci95_low"], m[f"image_retrieval_recall@{k}_ci95_high"]
            assert low <= m[f"image_retrieval_recall@{k}"] <= high
    student = next(r for r in records if r["role"] == "student")
    assert student["pretrained"].endswith("runs/student/student.pt") and student["model"] == "clipcid-tiny"

    # The students in folders plain open_clip loads; the teacher, a small local file, too.
    models = read_models(out)
    assert set(models) == {"teacher", "baseline", "student"} and all(m["folder"] for m in models.values())
    assert models["student"]["parameters"]["total"] > 0 and models["student"]["images_per_second"] > 0
    plain_open_clip(RunLayout(out).model("student"), tmp_path)
    page = (out / "report.html").read_text()
    for heading in ("Results (%)", "The models at work on held-out pairs", "Models: size and speed", "What ran",
                    "Hold-out", "Image Semantic Balance", "Clusters", "Training curves"):  # fmt: skip
        assert heading in page, heading
    table = (out / "results.md").read_text().splitlines()
    assert "| student − baseline (too short to judge: " in table[0] and len(table) == 2 + 6
    assert "fewer than the 100 a comparison of students needs; --epochs" in student["too_short_to_judge"]
    assert not any(row.endswith("] ** |") for row in table)  # no difference of it is marked as a finding

    # On a CPU with two threads, the students trained side by side, one process each; the report's total
    # counts them once, as the longer of the two.
    stages = json.loads(RunLayout(out).run_record.read_text())["stages"]
    assert stages["student"]["side_by_side"] == ["baseline"] and stages["baseline"]["side_by_side"] == ["student"]
    assert stages["student"]["seconds"] > 0 and stages["student"]["user_seconds"] > 0
    assert "student (side by side with baseline)" in page
    both = {"student": {"side_by_side": ["baseline"]}, "baseline": {"side_by_side": ["student"]}}
    assert wall_total({"cluster": 1.0, "student": 5.0, "baseline": 4.0}, both) == 6.0

    # Both students trained on the same rows for the same steps.
    logs = [(RunLayout(out).run(n) / "train_log.jsonl").read_text().splitlines() for n in ("student", "baseline")]
    assert len(logs[0]) == len(logs[1]) and json.loads(logs[0][-1])["step"] == json.loads(logs[1][-1])["step"]


def test_the_same_line_again_redoes_nothing(finished, inputs):
    done = RunLayout(finished)
    watched = [done.run("student") / "student.pt", done.teacher_emb / "embed.json",
               done.evaluation("student") / "eval.json", done.models / "models.json"]  # fmt: skip
    before = [p.stat().st_mtime_ns for p in watched]
    stages = json.loads(RunLayout(finished).run_record.read_text())["stages"]
    assert main(args(inputs, finished)) == 0
    assert [p.stat().st_mtime_ns for p in watched] == before
    assert json.loads(RunLayout(finished).run_record.read_text())["stages"] == stages  # the times of the real work


def test_a_changed_setting_is_named_and_overwrite_redoes_that_stage_and_the_later_ones(finished, inputs, capsys):
    out = finished.parent / "changed"
    shutil.copytree(finished.parent / "out", out, symlinks=True)
    # The stage whose settings changed refuses, naming the setting, before anything is redone.
    layout = RunLayout(out)
    kept = [layout.holdout / "holdout.json", layout.teacher_emb / "embed.json", layout.balance / "stats.json"]
    redone = [layout.clusters / "stats.json", layout.run("student") / "student.pt"]
    before = [p.stat().st_mtime_ns for p in kept + redone]
    assert main([*args(inputs, out), "--k", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{layout.clusters} holds a run with other settings (k: 6 -> 5)" in err[0], err
    assert "--overwrite" in err[0]
    assert [p.stat().st_mtime_ns for p in kept + redone] == before and not (layout.clusters / ".lock").exists()
    # --overwrite redoes the clusters and what reads them; the stages before are kept as they are.
    assert main([*args(inputs, out), "--k", "5", "--overwrite"]) == 0
    assert [p.stat().st_mtime_ns for p in kept] == before[: len(kept)]
    assert all(p.stat().st_mtime_ns != t for p, t in zip(redone, before[len(kept) :], strict=True))
    assert json.loads(layout.clusters.joinpath("stats.json").read_text())["settings"]["k"] == 5
    assert json.loads(layout.recipe.read_text())["cluster"]["k"] == "5"


def test_a_full_disk_then_a_kill_and_the_same_line_resumes_to_the_same_results(finished, inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    import clipcid.cluster.artifact as cluster_artifact

    real = cluster_artifact.save_npy_atomic

    def disk_full(path, array):
        if Path(path).name == "labels_2.npy":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, array)

    monkeypatch.setattr(cluster_artifact, "save_npy_atomic", disk_full)
    assert main(args(inputs, out)) == 2
    assert (RunLayout(out).clusters / "labels" / "labels_1.npy").is_file() and not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    # Killed by SIGKILL as soon as the CID student has saved a checkpoint, then the same line again; this
    # time the students train in turn, in the command's own process.
    in_turn = (*args(inputs, out), "--set", "run.side_by_side=false")
    assert run_and_kill_when(_clipcid(*in_turn), RunLayout(out).run("student") / "checkpoints", "step_*")
    assert not (RunLayout(out).run("student") / "student.pt").exists()
    run_ok(_clipcid(*in_turn))
    assert "side_by_side" not in json.loads(RunLayout(out).run_record.read_text())["stages"]["student"]
    same_files(RunLayout(finished).holdout, RunLayout(out).holdout)
    same_files(RunLayout(finished).clusters, RunLayout(out).clusters)
    # The reference trained side by side, each student in a process of one thread; these in turn, resumed,
    # on this process's threads: the sums differ in their last bits (3e-6 seen). A batch skipped or repeated
    # on resume moves weights by 1e-2.
    for name in ("student", "baseline"):
        a = torch.load(RunLayout(finished).run(name) / "student.pt", weights_only=True)["state_dict"]
        b = torch.load(RunLayout(out).run(name) / "student.pt", weights_only=True)["state_dict"]
        assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-4) for k in a), name
    metrics = {r["role"]: r["metrics"] for r in read_results(out / "results.json")}
    expected = {r["role"]: r["metrics"] for r in read_results(finished / "results.json")}
    assert set(metrics) == set(expected) and metrics["teacher"] == expected["teacher"]


def test_two_gloo_ranks_write_what_one_process_writes(finished, inputs, tmp_path):
    two = tmp_path / "two"
    run_two_gloo_processes(["-m", "clipcid", *args(inputs, two)], timeout=900)
    for stage in ("holdout", "teacher_emb", "balance"):
        same_files(finished / stage, two / stage)
    same_clustering(RunLayout(finished).clusters, RunLayout(two).clusters)  # k-means sums all-reduced: float rounding
    teacher = [r for r in read_results(two / "results.json") if r["role"] == "teacher"]
    assert teacher == [r for r in read_results(finished / "results.json") if r["role"] == "teacher"]
    # Distill equals a run at the same world size: `clipcid distill` under 2 ranks, on the same inputs.
    recipe = json.loads(RunLayout(two).recipe.read_text())["distill"]
    direct = tmp_path / "direct"
    made = RunLayout(two)
    distill = ["distill", "--data", str(inputs / "shards"), "--teacher-emb", str(made.teacher_emb),
               "--balance", str(made.balance), "--clusters", str(made.clusters),
               "--holdout", str(made.holdout), "--model", "clipcid-tiny", "--batch-size", str(recipe["batch_size"]),
               "--warmup", str(recipe["warmup"]), "--workers", "0", "--out", str(direct)]  # fmt: skip
    run_two_gloo_processes(["-m", "clipcid", *distill])
    a = torch.load(RunLayout(two).run("student") / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(direct / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    # Each model was evaluated on one rank; one process evaluating the same student gives the same records.
    alone = evaluate_model(
        ModelEvalConfig(
            str(tmp_path / "alone"),
            "clipcid-tiny",
            str(RunLayout(two).run("student") / "student.pt"),
            None,
            holdout=str(RunLayout(two).holdout),
            workers=0,
            batch_size=64,
        )  # fmt: skip
    )
    _, records = read_suite_results(RunLayout(two).evaluation("student"))
    assert alone["summary"]["holdout_retrieval"] == pytest.approx(
        records["holdout_pairs_zeroshot_retrieval"]["metrics"]
    )
    assert (two / "report.html").is_file() and json.loads(RunLayout(two).run_record.read_text())["world_size"] == 2


def _error_of(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipcid: error: "), lines
    return lines[0]


def test_bad_inputs_are_refused_before_any_stage_starts(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    no_captions = tmp_path / "no_captions"
    make_img2dataset_shards(no_captions, n_shards=1, per_shard=8, captions=False)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    cases = {
        "shard not found": ["--data", str(tmp_path / "missing" / "{00000..00003}.tar")],
        "has a caption": ["--data", str(no_captions)],
        "unknown model architecture 'ViT-Nope'": ["--teacher", "ViT-Nope"],
        "checkpoint not found": ["--teacher-pretrained", str(tmp_path / "gone.pt")],
        "is not a checkpoint clipcid can load": ["--teacher-pretrained", str(garbage)],
        "unknown model architecture 'not-a-net'": ["--student", "not-a-net"],
        "--lr must be a number above 0, not -1": ["--lr", "-1"],
        "--holdout must be a number at least 0 and below 1": ["--holdout", "1.5"],
        "section 'distill' has no setting 'warmpu'": ["--set", "distill.warmpu=5"],
        "not an embeddings folder": ["--teacher-emb", str(inputs / "shards")],
    }
    for expected, change in cases.items():
        argv = args(inputs, out)
        for i in range(0, len(change), 2):
            if change[i] in argv:
                argv[argv.index(change[i]) + 1] = change[i + 1]
            else:
                argv += change[i : i + 2]
        assert expected in _error_of(argv, capsys), expected
        assert not (RunLayout(out).teacher_emb).exists() and not (RunLayout(out).holdout).exists(), expected
    # A hold-out too small to measure: the masks are a cheap first pass; nothing else runs, and the line
    # says which --holdout would do. Then the same line with that --holdout is not refused for the change.
    argv = args(inputs, out)
    argv[argv.index("--holdout") + 1] = "0.01"
    line = _error_of(argv, capsys)
    assert "fewer than the 20 needed" in line and "use --holdout" in line
    assert not (RunLayout(out).teacher_emb).exists()
    suggested = float(line.split("use --holdout ")[1].split()[0])
    assert 0.05 < suggested < 0.5


def test_flags_win_over_the_recipe_and_every_section_is_checked(inputs):
    recipe, sources = resolve_recipe(
        RunConfig(
            out="x",
            data="d",
            student="clipcid-tiny",
            recipe=str(inputs / "recipe.json"),
            lr=0.01,
            set=["distill.warmup=7", "balance.search=ivf"],
        )  # fmt: skip
    )
    assert recipe["distill"]["lr"] == 0.01 and sources["distill"]["lr"] == "flag"
    assert recipe["distill"]["batch_size"] == 16 and sources["distill"]["batch_size"].startswith("--recipe")
    assert recipe["distill"]["warmup"] == 7 and recipe["balance"]["search"] == "ivf"
    assert recipe["distill"]["epochs"] == 1 and "epochs" not in sources["distill"]
    # A run's recipe.json as a recipe: its settings are taken, its inputs are not.
    old = inputs / "old_run_recipe.json"
    old.write_text(json.dumps({"run": {"data": "elsewhere", "teacher_emb": "old_emb", "baseline": True}}))
    recipe, _ = resolve_recipe(RunConfig(out="x", data="d", recipe=str(old)))
    assert recipe["run"] == {"data": "d", "teacher_emb": None, "baseline": True, "side_by_side": True}
    # The default hold-out fits small data (up to 10 %); a fraction asked for is kept (or refused).
    assert recipe["holdout"]["fraction"] == 0.01 and recipe["holdout"]["fit_up_to"] == 0.1
    asked, _ = resolve_recipe(RunConfig(out="x", data="d", holdout=0.05))
    assert asked["holdout"]["fraction"] == 0.05 and asked["holdout"]["fit_up_to"] == 0.0
    with pytest.raises(ClipcidError, match="--k must be|no setting"):
        resolve_recipe(RunConfig(out="x", set=["cluster.kk=3"]))
    with pytest.raises(ClipcidError, match="--search must be one of exact, ivf, not x"):
        resolve_recipe(RunConfig(out="x", set=["balance.search=x"]))


def test_run_under_the_python_api_returns_the_timings(finished, inputs):
    result = run_pipeline(
        RunConfig(
            out=str(finished),
            data=str(inputs / "shards"),
            teacher="clipcid-tiny",
            teacher_pretrained=str(inputs / "teacher.pt"),
            student="clipcid-tiny",
            holdout=0.15,
            baseline=True,
            recipe=str(inputs / "recipe.json"),
            workers=0,
        )  # fmt: skip
    )
    assert {"holdout", "embed", "balance", "cluster", "student", "baseline", "eval", "export"} <= set(result["timings"])
    assert Path(result["report"]).is_file()


def test_the_stages_are_declared_once_and_everything_follows_from_the_list(monkeypatch, tmp_path):
    import dataclasses

    from clipcid import pipeline

    names = [s.name for s in pipeline.STAGES]
    assert len(set(names)) == len(names)
    for i, stage in enumerate(pipeline.STAGES):
        assert set(stage.inputs) <= set(names[:i]), f"{stage.name} reads a stage declared after it"
        fields = {f.name for f in dataclasses.fields(stage.config)} if stage.config else set()
        assert set(stage.filled) <= fields and set(stage.runtime) <= fields | {"out", "overwrite"}, stage.name
        assert set(dict(stage.defaults)) <= fields, stage.name
    # The recipe's sections are the pipeline's own and each stage's with settings, in the stages' order.
    recipe, sources = resolve_recipe(RunConfig(out="x", data="d"))
    assert list(recipe) == ["run", *[s.name for s in pipeline.STAGES if s.config]]
    assert recipe["inside"] == {"pictures": 8}
    # Runtime settings are printed apart from those that decide what a stage writes.
    text = pipeline.describe(recipe, sources)
    embed = text.split("[embed]")[1].split("[balance]")[0]
    assert embed.index("model=null") < embed.index(" | ") < embed.index("batch_size=")
    # A flag is typed, bounded and helped by the field it sets: a stage's default changed there shows in
    # the help; a flag naming a field that does not exist fails at once.
    flags = {f.name: f for f in dataclasses.fields(RunConfig)}
    assert flags["lr"].type == "float | None" and flags["lr"].metadata["above"] == 0
    assert "(default 0.0005)" in flags["lr"].metadata["help"]
    monkeypatch.setattr(pipeline.DistillConfig.__dataclass_fields__["lr"], "default", 0.003)
    assert "(default 0.003)" in pipeline._run_config().__dataclass_fields__["lr"].metadata["help"]
    monkeypatch.setattr(pipeline, "RUN_FLAGS", (*pipeline.RUN_FLAGS, pipeline.RunFlag("x", ("distill.no_such",))))
    with pytest.raises(ValueError, match="distill has no field no_such"):
        pipeline._run_config()
    # A stage added to the list is run, timed and recorded like the others (here: a trivial one).
    ran = []
    extra = pipeline.Stage(name="extra", config=None, run=lambda p: ran.append(p.layout.out), made=lambda p: "made")
    monkeypatch.setattr(pipeline, "STAGES", (extra,))
    monkeypatch.setattr("clipcid.report.write_report", lambda out, extras=None: out / "report.html")
    with pipeline.distributed("cpu") as env:
        result = pipeline.Pipeline(tmp_path, recipe, env).run()
    assert ran == [tmp_path] and set(result["timings"]) == {"extra"}
    assert RunLayout(tmp_path).read_run_record()["stages"]["extra"]["identity"] == "made"
