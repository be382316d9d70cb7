"""A study's statistics: means and sd over seeds, paired intervals, a tuning plan's choices, the comparisons
a plan asks for."""

from __future__ import annotations

import math

import numpy as np

from clipcid.evaluation.run import AVERAGES
from clipcid.study.plan import TUNING, Plan, Variant

# -- statistics ----------------------------------------------------------------------------------


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None with one value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None)


def paired_interval(values: dict[int, float], reference: dict[int, float], level: float = 0.95) -> dict | None:
    """Mean of the per-seed differences (variant - reference) over the seeds both have, with a
    Student-t confidence interval; None when no seed is shared."""
    from scipy import stats

    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    diffs = np.array([values[s] - reference[s] for s in seeds], dtype=np.float64)
    mean = float(diffs.mean())
    if len(diffs) < 2:
        return {"n": 1, "mean": mean, "low": None, "high": None, "p": None}
    sd = float(diffs.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, len(diffs) - 1) * sd / math.sqrt(len(diffs)))
    # The paired t test's two-sided p (the interval excludes zero exactly when p < 1 - level).
    p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if sd > 0 else (0.0 if mean else 1.0)
    return {"n": len(diffs), "mean": mean, "low": mean - half, "high": mean + half, "p": p}


def metric_values(records: list[dict]) -> dict[str, dict[str, dict[int, float]]]:
    """variant -> metric -> seed -> value; metrics are the suite's averages then every task."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for r in records:
        per = out.setdefault(r["variant"], {})
        for key, _ in AVERAGES:
            if r["summary"].get(key) is not None:
                per.setdefault(key, {})[r["seed"]] = r["summary"][key]
        for task, value in r["tasks"].items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                per.setdefault(task, {})[r["seed"]] = value
    return out


def aggregate(records: list[dict], plan: Plan) -> dict:
    values = metric_values(records)
    reference = values.get(plan.reference, {})
    table: dict[str, dict] = {}
    for variant, metrics in values.items():
        table[variant] = {}
        for metric, by_seed in metrics.items():
            mean, sd = mean_sd(list(by_seed.values()))
            entry = {"n": len(by_seed), "mean": mean, "sd": sd, "seeds": {str(k): v for k, v in by_seed.items()}}
            if variant != plan.reference and metric in reference:
                entry["vs_reference"] = paired_interval(by_seed, reference[metric])
            table[variant][metric] = entry
    return table


def choices(tables: dict, plan: Plan) -> dict[str, dict]:
    """A tuning plan's choice per series (a method's settings): the variant with the highest criterion,
    the mean over its seeds of the mean of the plan's `select_by` averages (validation figures). Made
    only once every variant of the series has every seed ("complete"); until then none is chosen."""
    if plan.purpose != TUNING:
        return {}
    by_series: dict[str, list[Variant]] = {}
    for v in plan.variants:
        by_series.setdefault(v.series or v.name, []).append(v)
    out = {}
    for series, variants in by_series.items():
        criterion, runs, planned = {}, 0, 0
        for v in variants:
            row = tables.get(v.name, {})
            seeds = [s for s in v.seeds if all(str(s) in row.get(k, {}).get("seeds", {}) for k in plan.select_by)]
            planned, runs = planned + len(v.seeds), runs + len(seeds)
            if seeds:
                per_seed = [np.mean([row[k]["seeds"][str(s)] for k in plan.select_by]) for s in seeds]
                criterion[v.name] = float(np.mean(per_seed))
        complete = runs == planned
        best = max(criterion, key=criterion.__getitem__) if complete and criterion else None
        out[series] = {
            "select_by": plan.select_by,
            "criterion": criterion,
            "x": {v.name: v.x for v in variants},
            "runs": runs,
            "planned": planned,
            "complete": complete,
            "chosen": best,
            "settings": {**plan.base, **plan.variant(best).train} if best else None,
        }
    return out


def _xs(chosen: dict[str, dict]) -> list[float]:
    return sorted({x for c in chosen.values() for x in c["x"].values() if x is not None})


def comparisons(tables: dict, plan: Plan) -> list[dict]:
    """The plan's own questions: for each (variant, against), the paired difference of each average,
    from the per-seed values the aggregate already holds."""
    out = []
    for a, b in plan.comparisons:
        if a in tables and b in tables:
            diffs = {
                k: paired_interval(tables[a][k]["seeds"], tables[b][k]["seeds"])
                for k, _ in AVERAGES
                if k in tables[a] and k in tables[b]
            }
            out.append({"variant": a, "against": b, "differences": diffs})
    return out


def _weights_over_seeds(runs: list[dict]) -> dict:
    """tower -> (w | change) -> statistic -> {"mean", "sd"} over the runs."""
    out: dict = {}
    for tower, both in runs[0].items():
        for what, stats in both.items():
            for key in stats:
                values = [r[tower][what][key] for r in runs if r[tower][what][key] is not None]
                if values and key != "n":
                    mean, sd = mean_sd(values)
                    out.setdefault(tower, {}).setdefault(what, {})[key] = {"mean": mean, "sd": sd, "n": len(values)}
    return out
