"""`clipcid paper`: the paper's tables in its order, and a verdict per claim, from a study folder."""

from __future__ import annotations

import json
from importlib.resources import files

import numpy as np
import pytest
from scipy import stats

from clipcid.cli import main
from clipcid.errors import ClipcidError
from clipcid.paper import PaperConfig, holm, load_layout, paper_html, read_paper, verdict, write_paper
from clipcid.study import Plan, Variant, aggregate, load_plan

SEEN = "seen_zeroshot_mean_acc1"
LP = "linear_probe_mean_acc1"
# Per seed (0, 1, 2) on two averages: cid is above clip_only by about a point on every seed, fd is above
# cid on every seed, simkd crosses cid; one_seed ran only seed 0.
VALUES = {
    "clip_only": {SEEN: [0.100, 0.120, 0.110], LP: [0.50, 0.52, 0.51]},
    "cid": {SEEN: [0.110, 0.131, 0.119], LP: [0.55, 0.56, 0.57]},
    "fd": {SEEN: [0.130, 0.150, 0.140], LP: [0.60, 0.61, 0.62]},
    "simkd": {SEEN: [0.120, 0.120, 0.110], LP: [0.50, 0.58, 0.53]},
    "one_seed": {SEEN: [0.5], LP: [0.9]},
}
WEIGHTS = {"cid": [0.030, 0.031, 0.032], "clip_only": [0.020, 0.021, 0.022]}  # image tower, sd of w
NEAR_ZERO = {"cid": [0.010, 0.011, 0.012], "clip_only": [0.030, 0.029, 0.031]}


def _study(variants: dict, teachers: dict | None = None, weights: bool = False) -> dict:
    plan = Plan("clip_only", [0, 1, 2], {}, [Variant(n, f"label of {n}", "A") for n in variants])
    records = [
        {"variant": n, "seed": s, "summary": {m: v[s] for m, v in metrics.items()}, "tasks": {}}
        for n, metrics in variants.items()
        for s in range(len(next(iter(metrics.values()))))
    ]
    found_weights = {}
    if weights:
        for n in WEIGHTS:
            found_weights[n] = {
                "seeds": {
                    str(s): {"image": {"w": {"std": WEIGHTS[n][s], "near_zero": NEAR_ZERO[n][s], "kurtosis": 0.0}}}
                    for s in range(3)
                }
            }
    return {
        "reference": "clip_only",
        "seeds": [0, 1, 2],
        "base": {},
        "variants": [v.__dict__ for v in plan.variants],
        "runs": records,
        "aggregate": aggregate(records, plan),
        "teachers": teachers or {},
        "weights": found_weights,
    }


LAYOUT = {
    "sections": [
        {
            "title": "Table 1: seen",
            "plan": "study",
            "paper": "CID beats the baselines.",
            "teachers": "given",
            "rows": ["clip_only", "fd", "simkd", "cid", "one_seed"],
            "metrics": [SEEN, LP],
            "claims": [["cid", "clip_only"], ["cid", "fd"], ["cid", "simkd"], ["cid", "one_seed"]],
        },
        {
            "title": "Table 7: teachers",
            "plan": "study_teachers",
            "teachers": "all",
            "rows": ["cid"],
            "metrics": [SEEN],
            "claims": [],
        },
        {
            "title": "Fig. 4: weights",
            "plan": "study",
            "rows": ["clip_only", "cid"],
            "metrics": ["weights/image/w/std", "weights/image/w/near_zero"],
            "claims": [
                {"a": "cid", "b": "clip_only", "metrics": ["weights/image/w/std"]},
                {"a": "cid", "b": "clip_only", "metrics": ["weights/image/w/near_zero"], "lower": True},
            ],
        },
    ]
}


@pytest.fixture
def folder(tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    teacher = {"given": {"spec": "given", "variants": ["cid"], "summary": {"model": "big-teacher", SEEN: 0.4, LP: 0.7}}}
    (study / "study.json").write_text(json.dumps(_study(VALUES, weights=True)))
    # The main plan lists no teacher here: Table 1's row comes from the plan that evaluated it.
    lit = {"spec": {"lit": {"model": "small-lit", "epochs": 2}}, "variants": ["cid"], "summary": {SEEN: 0.2}}
    teachers = {**teacher, "abc": lit}
    (study / "study_teachers.json").write_text(
        json.dumps(_study({n: VALUES[n] for n in ("clip_only", "cid")}, teachers))
    )
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps(LAYOUT))
    return study, layout


def test_verdicts_follow_the_paired_intervals(folder):
    study, layout = folder
    result = write_paper(PaperConfig(study=str(study), layout=str(layout)))
    table1 = result["sections"][0]
    claims = {c["b"]: c["metrics"] for c in table1["claims"]}
    # cid - clip_only on the seen mean: 0.010, 0.011, 0.009 -> mean 0.010, t interval by hand.
    diffs = np.array([0.010, 0.011, 0.009])
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    d = claims["clip_only"][SEEN]
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.010)
    assert d["low"] == pytest.approx(0.010 - half) and d["high"] == pytest.approx(0.010 + half)
    # The section's primary metric (its first here) is judged, as one Holm family of the three tested claims;
    # the other metric shows its raw interval only.
    p_raw = {
        b: stats.ttest_1samp(np.array(VALUES["cid"][SEEN]) - VALUES[b][SEEN], 0).pvalue
        for b in ("clip_only", "fd", "simkd")
    }
    assert p_raw["fd"] < p_raw["clip_only"] < 0.05 < p_raw["simkd"]
    assert claims["fd"][SEEN]["p_holm"] == pytest.approx(3 * p_raw["fd"])
    assert claims["clip_only"][SEEN]["p_holm"] == pytest.approx(2 * p_raw["clip_only"])
    assert claims["simkd"][SEEN]["p_holm"] == pytest.approx(p_raw["simkd"])
    assert d["family"] == 3
    assert d["verdict"] == "holds" and claims["clip_only"][LP]["verdict"] == "secondary"
    assert claims["fd"][SEEN]["verdict"] == "reversed" and claims["fd"][LP]["verdict"] == "secondary"
    assert claims["simkd"][SEEN]["verdict"] == "unresolved"  # -0.010, +0.011, +0.009: spans zero
    assert claims["one_seed"][SEEN] == {"n": 1, "mean": pytest.approx(-0.39), "low": None, "high": None, "p": None,
                                        "p_holm": None, "family": 3, "verdict": "unresolved"}  # fmt: skip
    rows = {r["variant"]: r for r in table1["rows"]}
    assert rows["cid"]["seeds"] == 3 and rows["cid"]["metrics"][LP]["mean"] == pytest.approx(0.56)
    assert rows["cid"]["metrics"][LP]["sd"] == pytest.approx(0.01)
    assert rows["one_seed"]["metrics"][LP] == {"n": 1, "mean": 0.9, "sd": None}
    # The main teacher's row, found in the other plan's results; Table 7 lists every teacher of its plan.
    assert [t["teacher"] for t in table1["teachers"]] == ["the main teacher (big-teacher)"]
    assert table1["teachers"][0]["metrics"] == {SEEN: 0.4, LP: 0.7}
    assert [t["teacher"] for t in result["sections"][1]["teachers"]] == [
        "the main teacher (big-teacher)",
        "small-lit, LiT (locked towers, projections trained), 2 epochs",
    ]
    # Fig. 4: wider spread holds; fewer near-zero weights, a "lower" claim, holds too.
    weights = result["sections"][2]
    assert [c["metrics"][m]["verdict"] for c in weights["claims"] for m in c["metrics"]] == ["holds", "secondary"]
    assert weights["rows"][1]["metrics"]["weights/image/w/std"]["mean"] == pytest.approx(0.031)
    # Four judgements on Table 1's primary metric, one on Fig. 4's.
    assert result["verdicts"] == {"holds": 2, "reversed": 1, "unresolved": 2} and result["families"] == 2
    assert result["with_interval"] == 8  # the one-seed claim's two metrics have none
    assert read_paper(study) == json.loads(json.dumps(result))

    md = (study / "paper.md").read_text()
    assert md.index("## Table 1: seen") < md.index("## Table 7: teachers") < md.index("## Fig. 4: weights")
    assert "*The paper:* CID beats the baselines." in md
    assert "across the 2 sections, at most 10% that one does somewhere" in md
    assert "| label of cid | `cid` | 3 | 12.00 ± 1.05 | 56.00 ± 1.00 |" in md
    assert "| teacher: the main teacher (big-teacher) |  | – | 40.00 | 70.00 |" in md
    assert (
        f"| `cid` above `clip_only` | 3 | +1.00 [{100 * (0.01 - half):+.2f}, {100 * (0.01 + half):+.2f}] "
        f"p_Holm {2 * p_raw['clip_only']:.3g} **holds**" in md
    )
    assert "| `cid` below `clip_only` | 3 |  | -1.90 [" in md  # near zero, in %
    assert "**unresolved**" not in md and "**reversed**" in md  # only a decisive verdict stands out
    assert "| label of clip_only | `clip_only` | 3 | 21.000 ± 1.000 | 3.00 ± 0.10 |" in md  # sd of w, x1e-3
    assert "(raw)" in md and "2 holds, 1 reversed, 2 unresolved" in paper_html(result)


def test_a_plan_not_run_yet_is_said_and_the_rest_is_written(folder):
    study, layout = folder
    (study / "study_teachers.json").unlink()
    result = write_paper(PaperConfig(study=str(study), layout=str(layout), out=str(study / "elsewhere")))
    assert result["sections"][1]["found"] is False and list(result["plans"]) == ["study"]
    md = (study / "elsewhere" / "paper.md").read_text()
    assert "Not run yet: the study folder holds no results of plan `study_teachers`." in md
    assert not (study / "paper.md").exists()
    # The main teacher's row is not invented where no plan evaluated it.
    assert result["sections"][0]["teachers"] == []


def test_a_variant_not_run_yet_is_said_and_left_out_of_the_counts(folder):
    # A plan run in parts (`clipcid study --only`): the plan names ce_only, no run of it has finished.
    study, layout = folder
    results = json.loads((study / "study.json").read_text())
    results["variants"].append(Variant("ce_only", "label of ce_only", "C").__dict__)
    (study / "study.json").write_text(json.dumps(results))
    raw = json.loads(layout.read_text())
    raw["sections"][0]["rows"].append("ce_only")
    raw["sections"][0]["claims"].append(["cid", "ce_only"])
    layout.write_text(json.dumps(raw))
    result = write_paper(PaperConfig(study=str(study), layout=str(layout)))
    table1 = result["sections"][0]
    assert table1["rows"][-1]["seeds"] == 0 and table1["rows"][-1]["ran"] is False and table1["rows"][0]["ran"]
    assert [d["verdict"] for d in table1["claims"][-1]["metrics"].values()] == ["not run", "not run"]
    # The same counts as with the plan's other variants alone: nothing is judged on a missing run.
    assert result["verdicts"] == {"holds": 2, "reversed": 1, "unresolved": 2} and result["not_run"] == 2
    md = (study / "paper.md").read_text()
    assert "| label of ce_only | `ce_only` | 0 | not run yet | not run yet |" in md
    assert "| `cid` above `ce_only` | 0 | not run yet | not run yet |" in md
    assert "2 holds, 1 reversed, 2 unresolved (2 more not run yet)." in md
    assert "(2 more not run yet)" in paper_html(result) and "not run yet **" not in paper_html(result)


def test_gains_are_compared_seed_by_seed_and_counted_apart(folder):
    # "Does CID's gain grow with training length": A's gain over B against C's gain over D, per seed.
    study, layout = folder
    raw = json.loads(layout.read_text())
    raw["sections"][0]["claims"] += [
        {"a": "fd", "b": "clip_only", "than": ["cid", "clip_only"]},
        {"a": "cid", "b": "clip_only", "than": ["fd", "clip_only"], "metrics": [SEEN]},
        {"a": "simkd", "b": "clip_only", "than": ["cid", "clip_only"], "metrics": [SEEN]},
        {"a": "one_seed", "b": "clip_only", "than": ["cid", "clip_only"], "metrics": [SEEN]},
    ]
    layout.write_text(json.dumps(raw))
    result = write_paper(PaperConfig(study=str(study), layout=str(layout)))
    gains = [c for c in result["sections"][0]["claims"] if c["than"]]
    # fd - clip_only on the seen mean: 0.030 every seed; cid - clip_only: 0.010, 0.011, 0.009.
    diffs = np.array([0.020, 0.019, 0.021])
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    d = gains[0]["metrics"][SEEN]
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.020)
    assert d["low"] == pytest.approx(0.020 - half) and d["high"] == pytest.approx(0.020 + half)
    assert d["verdict"] == "larger" and gains[0]["metrics"][LP]["verdict"] == "secondary"
    assert gains[1]["metrics"][SEEN]["verdict"] == "smaller"
    assert gains[2]["metrics"][SEEN]["verdict"] == "unresolved"  # 0.020, 0, 0 against cid's gains: spans zero
    # Only the seeds all four variants ran are paired: one_seed ran seed 0 alone.
    assert gains[3]["metrics"][SEEN] == {"n": 1, "mean": pytest.approx(0.39), "low": None, "high": None, "p": None,
                                         "p_holm": None, "family": 3, "verdict": "unresolved"}  # fmt: skip
    # The paper's claims keep their counts and their family; the gains are a family and a count apart.
    assert result["verdicts"] == {"holds": 2, "reversed": 1, "unresolved": 2} and result["with_interval"] == 8
    assert result["gain_verdicts"] == {"larger": 1, "smaller": 1, "unresolved": 2}
    md = (study / "paper.md").read_text()
    assert "besides, gains compared: 1 larger, 1 smaller, 2 unresolved" in md
    head = "Gains compared, the first gain minus the second paired by seed"
    assert md.index("The paper's claims, first minus second") < md.index(head) < md.index("## Table 7")
    assert (
        f"| gain of `fd` over `clip_only` against that of `cid` over `clip_only` | 3 | "
        f"+2.00 [{100 * (0.02 - half):+.2f}, {100 * (0.02 + half):+.2f}] p_Holm "
        f"{gains[0]['metrics'][SEEN]['p_holm']:.3g} **larger** | +5.00 [+5.00, +5.00] (raw) |" in md
    )
    assert "gain of fd over clip_only against that of cid over clip_only" in paper_html(result)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s[0]["rows"].append("nope"), "plan study has no variant nope"),
        (lambda s: s[0]["claims"].append(["cid", "nada"]), "plan study has no variant nada"),
        (lambda s: s[0]["metrics"].append("accuracy"), "unknown metric 'accuracy'"),
        (lambda s: s[2]["metrics"].append("weights/image/w/median"), "unknown metric 'weights/image/w/median'"),
        (lambda s: s[0].pop("plan"), "section 1 lacks plan"),
        (lambda s: s[0].update(teachers="best"), 'teachers is "given", "all" or absent'),
        (lambda s: s[0]["claims"].append(["cid"]), "a claim is \\[A, B\\]"),
        (lambda s: s[0]["claims"].append({"a": "cid", "b": "fd", "than": "simkd"}), 'a claim.s "than" is \\[C, D\\]'),
        (
            lambda s: s[0]["claims"].append({"a": "cid", "b": "fd", "than": ["cid", "nil"]}),
            "plan study has no variant nil",
        ),
    ],
)
def test_layout_errors_name_the_problem(folder, change, message):
    study, layout = folder
    broken = json.loads(json.dumps(LAYOUT))
    change(broken["sections"])
    layout.write_text(json.dumps(broken))
    with pytest.raises(ClipcidError, match=message):
        write_paper(PaperConfig(study=str(study), layout=str(layout)))
    assert not (study / "paper.md").exists() and not (study / "paper.json").exists()


def test_bad_inputs_give_one_line_errors(folder, tmp_path, capsys):
    study, layout = folder
    layout.write_text("{not json")
    assert main(["paper", "--study", str(study), "--layout", str(layout)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert main(["paper", "--study", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["paper", "--study", str(empty)]) == 2
    assert "holds no results of the layout's plans" in capsys.readouterr().err


def test_the_cli_prints_the_tables(folder, capsys):
    study, layout = folder
    assert main(["paper", "--study", str(study), "--layout", str(layout)]) == 0
    assert "## Fig. 4: weights" in capsys.readouterr().out


def test_verdict_directions():
    assert verdict({"n": 3, "mean": 1, "low": 0.5, "high": 1.5}, adjusted_p=0.01) == "holds"
    assert verdict({"n": 3, "mean": 1, "low": 0.5, "high": 1.5}, lower=True, adjusted_p=0.01) == "reversed"
    assert verdict({"n": 3, "mean": -1, "low": -1.5, "high": -0.5}, lower=True, adjusted_p=0.01) == "holds"
    # The raw interval excludes zero, but not after the family's adjustment.
    assert verdict({"n": 3, "mean": 1, "low": 0.5, "high": 1.5}, adjusted_p=0.08) == "unresolved"
    assert verdict({"n": 1, "mean": 2, "low": None, "high": None}) == "unresolved"
    assert verdict(None) == "unresolved"


def test_holm_matches_a_hand_computed_case():
    # Sorted 0.005, 0.01, 0.03, 0.04 of m = 4: x4 = 0.02, x3 = 0.03, x2 = 0.06, x1 = 0.04 -> kept at 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005, None]) == pytest.approx([0.03, 0.06, 0.06, 0.02, None])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and holm([]) == []


def test_the_shipped_layout_names_only_variants_of_the_shipped_plans():
    """Every row and claim of the paper's layout is a variant of the plan its section reads, and every
    metric is known: the layout cannot drift from the plans unnoticed."""
    configs = files("clipcid").joinpath("configs")
    sections = load_layout(str(configs.joinpath("paper.json")))
    assert [s.title.split(":")[0] for s in sections] == [
        *(f"Table {i}" for i in range(1, 8)),
        "Training length",
        "Fig. 4",
    ]
    for s in sections:
        plan = load_plan(str(configs.joinpath(f"{s.plan}.json")), {"model": "clipcid-tiny", "epochs": 1})
        names = {v.name for v in plan.variants}
        assert set(s.rows) <= names, s.title
        assert {n for c in s.claims for n in (c.a, c.b, *(c.than or ()))} <= set(s.rows), s.title  # each is shown
        if any(m.startswith("weights/") for m in s.metrics):
            assert set(s.rows) <= set(plan.weights)


def test_the_demo_report_leads_its_study_section_with_the_claims(folder):
    from clipcid.demo import study_html

    study, layout = folder
    assert "The paper's claims" not in study_html(study.parent)  # not written yet: the plans' tables only
    write_paper(PaperConfig(study=str(study), layout=str(layout)))
    page = study_html(study.parent)
    assert page.index("The paper's claims at this scale") < page.index("Study <code>study</code>")
    assert "<td>cid above fd</td><td><b>-2.00 [" in page and "reversed</b>" in page
