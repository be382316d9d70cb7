"""A study plan: its variants, groups, seeds and questions, read and checked (the format: study/__init__.py)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from clipcid.distill.train import DistillConfig
from clipcid.errors import ClipcidError
from clipcid.evaluation.run import AVERAGES
from clipcid.util.fileio import read_user_json


def bundled_plan(name: str) -> Path:
    """A plan shipped in the package (src/clipcid/configs/NAME.json)."""
    return Path(__file__).parent.parent / "configs" / f"{name}.json"


PLAN = bundled_plan("study")
GIVEN = "given"
TEST, VALIDATION = "test", "validation"
TUNING = "tuning"
TEACHER_KINDS = {"lit", "clip", "emb"}


@dataclass
class Variant:
    name: str
    label: str
    group: str
    train: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    same_steps_as: str | None = None
    seeds: list[int] = field(default_factory=list)  # the plan's seeds for the variant's groups
    series: str | None = None  # a curve of the plan (e.g. a method over training lengths) ...
    x: float | None = None  # ... and the variant's place on it
    # {"plan": TUNING_PLAN, "series": SERIES}: the training settings the tuning plan chose for that series
    # on validation figures, under this variant's own "train" overrides (e.g. epochs).
    tuned: dict | None = None
    # A student that never trains: its random initialisation, evaluated (the floor of every table).
    untrained: bool = False


def groups_of(group: str) -> list[str]:
    return [g.strip() for g in group.split(",") if g.strip()]


@dataclass
class Plan:
    reference: str
    seeds: list[int]
    base: dict
    variants: list[Variant]
    # Further questions the plan asks, as (variant, against) pairs: each gets its paired differences.
    comparisons: list[tuple[str, str]] = field(default_factory=list)
    # Variants whose students' last-layer weights are compared over seeds (the paper's Fig. 4).
    weights: list[str] = field(default_factory=list)
    # Which figures the plan reads: "test" (what tables report) or "validation" (what choices are made on).
    split: str = TEST
    # A tuning plan chooses a setting per series by the mean of these suite averages on validation.
    purpose: str = "comparison"
    select_by: list[str] = field(default_factory=list)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ClipcidError(f"the plan has no variant '{name}' (it has {', '.join(v.name for v in self.variants)})")


def _check_teacher(teacher, where: str) -> None:
    """A teacher spec is "given", {"lit": LitConfig fields}, {"clip": DistillConfig fields} or {"emb": FOLDER}."""
    from clipcid.lit import LitConfig

    if teacher == GIVEN:
        return
    if not (isinstance(teacher, dict) and len(teacher) == 1 and set(teacher) <= TEACHER_KINDS):
        raise ClipcidError(
            f'{where}: a teacher is "given", {{"lit": {{...}}}}, {{"clip": {{...}}}} or {{"emb": FOLDER}}'
        )
    kind, spec = next(iter(teacher.items()))
    if kind == "emb":
        return
    config = LitConfig if kind == "lit" else DistillConfig
    unknown = sorted(set(spec) - {f.name for f in fields(config)} | ({"data", "out"} & set(spec)))
    if unknown or "model" not in spec:
        what = f"{', '.join(unknown)} are not {kind} settings here" if unknown else "a teacher needs its model"
        raise ClipcidError(f"{where}: teacher {kind}: {what}")


def load_plan(path: str, base_train: dict) -> Plan:
    raw = read_user_json(path, "study plan")
    known = {f.name for f in fields(DistillConfig)}
    variants = []
    for item in raw.get("variants", []):
        if "name" not in item:
            raise ClipcidError(f"{path}: every variant needs a name")
        unknown = sorted(set(item.get("train", {})) - known)
        if unknown:
            raise ClipcidError(f"{path}: variant {item['name']}: {', '.join(unknown)} are not distill settings")
        bad = sorted(set(item.get("data", {})) - {"teacher", "balance", "cluster"})
        if bad:
            raise ClipcidError(
                f"{path}: variant {item['name']}: data takes teacher, balance and cluster, not {', '.join(bad)}"
            )
        _check_teacher(item.get("data", {}).get("teacher", GIVEN), f"{path}: variant {item['name']}")
        group = item.get("group", "")
        group_seeds = raw.get("group_seeds", {})
        seeds = sorted({s for g in groups_of(group) for s in group_seeds.get(g, raw.get("seeds", [0]))})
        variants.append(
            Variant(
                item["name"],
                item.get("label", item["name"]),
                group,
                item.get("train", {}),
                item.get("data", {}),
                item.get("same_steps_as"),
                seeds or list(raw.get("seeds", [0])),
                item.get("series"),
                item.get("x"),
                _check_tuned(item.get("tuned"), f"{path}: variant {item['name']}"),
                bool(item.get("untrained", False)),
            )
        )
    if len({v.name for v in variants}) != len(variants):
        raise ClipcidError(f"{path}: variant names must be unique")
    base = {**base_train, **raw.get("base", {}).get("train", {})}
    unknown = sorted(set(base) - known)
    if unknown:
        raise ClipcidError(f"{path}: base: {', '.join(unknown)} are not distill settings")
    if "model" not in base:
        raise ClipcidError(f"{path}: the base recipe names no student model (base.train.model)")
    comparisons = raw.get("comparisons", [])
    if not all(isinstance(c, list) and len(c) == 2 and all(isinstance(n, str) for n in c) for c in comparisons):
        raise ClipcidError(f'{path}: comparisons must be pairs of variant names, e.g. [["cid", "fd"]]')
    split, purpose, select_by = raw.get("split", TEST), raw.get("purpose", "comparison"), raw.get("select_by", [])
    if split not in (TEST, VALIDATION):
        raise ClipcidError(f'{path}: "split" is "test" or "validation", not {split!r}')
    if purpose == TUNING:
        if split != VALIDATION:
            raise ClipcidError(
                f'{path}: a tuning plan chooses settings, so it reads validation figures only; it asks for "{split}". '
                'Set "split": "validation" (test figures are for the plan that runs the chosen settings)'
            )
        averages = {key for key, _ in AVERAGES}
        if not select_by or not set(select_by) <= averages:
            raise ClipcidError(
                f'{path}: a tuning plan names its criterion before its runs: "select_by", suite averages among '
                f"{', '.join(sorted(averages))}"
            )
    plan = Plan(
        raw.get("reference", variants[0].name if variants else ""),
        raw.get("seeds", [0]),
        base,
        variants,
        [(a, b) for a, b in comparisons],
        list(raw.get("weights", [])),
        split,
        purpose,
        list(select_by),
    )
    plan.variant(plan.reference)
    for name in plan.weights:
        plan.variant(name)
    for pair in plan.comparisons:
        for name in pair:
            plan.variant(name)
    for v in variants:
        if v.same_steps_as:
            plan.variant(v.same_steps_as)
    return plan


def _check_tuned(tuned, where: str) -> dict | None:
    if tuned is None:
        return None
    ok = isinstance(tuned, dict) and (
        set(tuned) == {"plan", "series"}
        or (set(tuned) == {"plan", "best_of"} and isinstance(tuned["best_of"], list) and tuned["best_of"])
    )
    if not ok:
        raise ClipcidError(
            f'{where}: "tuned" is {{"plan": TUNING_PLAN_NAME, "series": SERIES}} or {{"plan": ..., "best_of": '
            "[SERIES, ...]} (the series whose chosen setting scored highest)"
        )
    return tuned


# -- data variants -------------------------------------------------------------------------------


def _key(spec: object) -> str:
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]


def describe_teacher(spec: dict) -> str:
    kind, fields_ = next(iter(spec.items()))
    if kind == "emb":
        return f"embeddings {fields_}"
    how = "LiT (locked towers, projections trained)" if kind == "lit" else "CLIP loss from scratch"
    return f"{fields_.get('model', '?')}, {how}, {fields_.get('epochs', '?')} epochs"
