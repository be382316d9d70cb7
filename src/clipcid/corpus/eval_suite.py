"""`clipcid data build-eval`: the held-out evaluation suite in CLIP_benchmark's `wds/` layout.

OUT/NAME/{train,test}/{0..n-1}.tar with nshards.txt, classnames.txt,
zeroshot_classification_templates.txt, dataset_type.txt; OUT/suite.json lists the datasets and the
tasks each one is for. None of the styles here is in the training corpus (shared/DATA.md), except
in the seen-distribution tasks (heldout_*, built when --holdout is given): pictures of the corpus's own
sources that its hold-out kept out of every training set (the paper's Table 1 setting), named by the
corpus's names of their kind, and their pairs for retrieval.

The suite's groups (seen, robustness) are named in evaluation/datasets.py.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from clipcid.config import default_workers, option, validate
from clipcid.corpus import sources as S
from clipcid.corpus.build import DEFAULT_NPM_ROOT, clean_name
from clipcid.corpus.render import RenderError, render_png
from clipcid.errors import ClipcidError
from clipcid.evaluation.datasets import (
    SEEN_COARSE,
    SEEN_PREFIX,
    SUITE_INDEX,
    write_wds_description,
    write_wds_shard_count,
)
from clipcid.inputs.shards import write_tar_atomic
from clipcid.stage import RunFolder
from clipcid.util.fileio import save_json_atomic
from clipcid.util.tables import run_pool

log = logging.getLogger("clipcid")

SHARD_SIZE = 1000
MIN_SHARDS = 4
EMOJI_TEMPLATES = ["an emoji of {c}.", "a {c} emoji.", "an icon of {c}."]
FLAG_TEMPLATES = ["the flag of {c}."]
DIGIT_TEMPLATES = ["the digit {c}.", "a drawing of the digit {c}.", "the number {c}."]
ICON_TEMPLATES = ["an icon of {c}.", "a {c} icon.", "{c}."]
EVAL_STYLES = {"fluent3d": "fluent-emoji", "fluenthc": "fluent-emoji-high-contrast"}


@dataclass
class SuiteDataset:
    name: str
    tasks: list[str]
    dataset_type: str  # "classification" | "retrieval"
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    # split -> list of (render spec or ready PNG bytes, label int or captions list, metadata)
    splits: dict[str, list[tuple[tuple[str, str] | bytes, int | list[str], dict]]] = field(default_factory=dict)
    failed_to_render: int = 0  # artwork dropped before the dataset was assembled
    # Zero-shot over names the training captions use, like ImageNet's zero-shot over its class names:
    # reported as a mean of its own besides the suite's.
    name_level: bool = False


def _in_test_split(style: str, name: str) -> bool:
    return hashlib.sha256(f"{style}\x1f{name}".encode()).digest()[0] % 2 == 0


def _group_classname(group: str) -> str:
    return group.replace("&", "and").lower()


def _subgroup_classname(subgroup: str) -> str:
    return subgroup.replace("-", " ")


def _render_batch(job: tuple[int, list[tuple[str, str]], int]) -> dict:
    index, specs, image_size = job
    pngs: list[bytes | None] = []
    for spec in specs:
        try:
            pngs.append(render_png(spec, image_size))
        except RenderError:
            pngs.append(None)
    return {"count": len(specs), "index": index, "pngs": pngs}


def prerender(arts: list[S.Artwork], image_size: int, workers: int, desc: str) -> tuple[list[S.Artwork], int]:
    """Render once, in parallel, the artwork that several datasets share; drop what fails to render."""
    batches = [arts[i : i + 200] for i in range(0, len(arts), 200)]
    jobs = [(i, [a.render for a in batch], image_size) for i, batch in enumerate(batches)]
    pngs_of = {r["index"]: r["pngs"] for r in run_pool(_render_batch, jobs, workers, desc, "img", len(arts))}
    out = []
    for i, batch in enumerate(batches):
        for art, png in zip(batch, pngs_of[i], strict=True):
            if png is None:
                log.warning("%s: %s did not render", desc, art.name)
            else:
                out.append(dataclasses.replace(art, render=("png", png)))
    return out, len(arts) - len(out)


def emoji_classification(
    rendered: tuple[list[S.Artwork], int], index: S.EmojiIndex, tag: str, level: str
) -> SuiteDataset:
    """Emoji of one held-out style labelled by Unicode group or subgroup; half train, half test."""
    arts, failed = rendered
    label_of = (lambda a: a.group) if level == "groups" else (lambda a: a.subgroup)
    to_name = _group_classname if level == "groups" else _subgroup_classname
    # Classes in Unicode order, which groups related subgroups together.
    order = {}
    for e in index.entries:
        order.setdefault(e.group if level == "groups" else e.subgroup, len(order))
    labels = sorted({label_of(a) for a in arts}, key=order.__getitem__)
    class_id = {lab: i for i, lab in enumerate(labels)}
    ds = SuiteDataset(
        f"emoji_{level}_{tag}",
        ["zeroshot_classification", "linear_probe"],
        "classification",
        [to_name(lab) for lab in labels],
        EMOJI_TEMPLATES,
        {"train": [], "test": []},
        failed,
    )
    for a in arts:
        split = "test" if _in_test_split(a.style, a.name) else "train"
        ds.splits[split].append((a.render, class_id[label_of(a)], {"name": a.name, "style": a.style}))
    return ds


def emoji_retrieval(rendered: tuple[list[S.Artwork], int], tag: str) -> SuiteDataset:
    """Every emoji of one held-out style with three captions naming it."""
    arts, failed = rendered
    ds = SuiteDataset(
        f"retrieval_emoji_{tag}",
        ["zeroshot_retrieval"],
        "retrieval",
        splits={"test": []},
        failed_to_render=failed,
    )
    for a in arts:
        name = a.name.replace(": ", ", ")
        captions = [name, f"an emoji of {name}", f"{name}, {_subgroup_classname(a.subgroup)}"]
        ds.splits["test"].append((a.render, captions, {"name": a.name, "style": a.style}))
    return ds


def emoji_names(rendered: tuple[list[S.Artwork], int], tag: str) -> SuiteDataset:
    """Zero-shot by emoji name on a held-out style: one class per emoji, named as the training captions
    name it. Skin-tone variants are left out: they are one picture in five colours."""
    arts, failed = rendered
    by_name: dict[str, S.Artwork] = {}
    for a in arts:
        if "skin tone" not in a.name:
            by_name.setdefault(clean_name(a.name), a)
    names = list(by_name)
    ds = SuiteDataset(
        f"names_emoji_{tag}", ["zeroshot_classification"], "classification", names, EMOJI_TEMPLATES, {"test": []}
    )
    ds.failed_to_render, ds.name_level = failed, True
    for i, name in enumerate(names):
        a = by_name[name]
        ds.splits["test"].append((a.render, i, {"name": a.name, "style": a.style}))
    return ds


def names_dataset(name: str, names: set[str], templates: list[str]) -> tuple[SuiteDataset, dict[str, int]]:
    """An empty zero-shot dataset whose classes are `names`, sorted; and the class id of each name."""
    classnames = sorted(names)
    ds = SuiteDataset(name, ["zeroshot_classification"], "classification", classnames, templates, {"test": []})
    return ds, {n: i for i, n in enumerate(classnames)}


def icon_names(npm_root: Path) -> SuiteDataset:
    """Zero-shot by icon name on a held-out icon set: the icons whose names the training icon sets use too."""
    training_names = {a.name for prefix in S.TRAIN_ICON_SETS for a in S.read_iconify_icons(npm_root, prefix)}
    arts = [a for a in S.read_iconify_icons(npm_root, S.EVAL_ICON_SET) if a.name in training_names]
    ds, class_id = names_dataset(f"names_icons_{S.EVAL_ICON_SET}", {a.name for a in arts}, ICON_TEMPLATES)
    ds.name_level = True
    for a in arts:
        ds.splits["test"].append((a.render, class_id[a.name], {"name": a.name, "style": a.style}))
    return ds


def circle_flags(npm_root: Path, index: S.EmojiIndex) -> SuiteDataset:
    arts = S.read_iconify_flags(npm_root, S.EVAL_FLAG_SET, index)
    ds, class_id = names_dataset("flags_circle", {a.name for a in arts}, FLAG_TEMPLATES)
    for a in arts:
        ds.splits["test"].append((a.render, class_id[a.name], {"name": a.name, "style": a.style}))
    return ds


def sklearn_digits(image_size: int) -> SuiteDataset:
    """scikit-learn's 8x8 digits, drawn dark on white like the rest of the suite; stratified halves."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx_train, idx_test = train_test_split(
        np.arange(len(digits.target)), test_size=0.5, stratify=digits.target, random_state=0
    )
    ds = SuiteDataset(
        "digits",
        ["zeroshot_classification", "linear_probe"],
        "classification",
        [str(d) for d in range(10)],
        DIGIT_TEMPLATES,
        {"train": [], "test": []},
    )
    for split, idx in (("train", idx_train), ("test", idx_test)):
        for i in sorted(idx):
            pixels = (255 - digits.images[i] * (255 / 16)).clip(0, 255).astype(np.uint8)
            image = Image.fromarray(pixels, "L").resize((image_size, image_size), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="PNG")
            ds.splits[split].append((buf.getvalue(), int(digits.target[i]), {"index": int(i)}))
    return ds


def _render_eval_shard(job: tuple[str, str, int, int, list]) -> dict:
    folder, dataset_type, shard, image_size, entries = job
    samples, failed = [], 0
    for row, (spec, target, meta) in enumerate(entries):
        try:
            png = spec if isinstance(spec, bytes) else render_png(spec, image_size)
        except RenderError:
            failed += 1
            continue
        sample = {"__key__": f"s{shard:04d}r{row:05d}", "png": png, "json": meta}
        if dataset_type == "retrieval":
            sample["txt"] = "\n".join(target)
        else:
            sample["cls"] = str(target)
        samples.append(sample)
    write_tar_atomic(Path(folder) / f"{shard}.tar", samples)
    return {"count": len(entries), "failed": failed, "written": len(samples)}


def write_wds_dataset(ds: SuiteDataset, out: Path, image_size: int, workers: int) -> dict:
    """Write one dataset into a temporary folder and rename it into place when complete."""
    final, tmp = out / ds.name, out / f"{ds.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    jobs, total = [], 0
    for split, entries in ds.splits.items():
        (tmp / split).mkdir(parents=True)
        # CLIP_benchmark hands a wds split's shards to its 4 loader workers: each must get at least one.
        n_shards = min(max(MIN_SHARDS, (len(entries) + SHARD_SIZE - 1) // SHARD_SIZE), max(1, len(entries)))
        write_wds_shard_count(tmp / split, n_shards)
        for shard in range(n_shards):
            lo, hi = len(entries) * shard // n_shards, len(entries) * (shard + 1) // n_shards
            chunk = entries[lo:hi]  # contiguous and never empty: the split's order is kept
            jobs.append((str(tmp / split), ds.dataset_type, shard, image_size, chunk))
            total += len(chunk)
    results = list(run_pool(_render_eval_shard, jobs, workers, ds.name, "img", total))
    write_wds_description(tmp, ds.dataset_type, ds.classnames, ds.templates)
    info = {
        "name": ds.name,
        "tasks": ds.tasks,
        "dataset_type": ds.dataset_type,
        "classes": len(ds.classnames),
        "splits": {split: len(entries) for split, entries in ds.splits.items()},
        # The share of the most common class per split: what answering it always scores (acc1).
        "majority": {
            split: float(max(np.bincount([target for _, target, _ in entries])) / len(entries))
            for split, entries in ds.splits.items()
            if ds.dataset_type == "classification" and entries
        },
        "written": sum(r["written"] for r in results),
        "failed_to_render": ds.failed_to_render + sum(r["failed"] for r in results),
        "name_level": ds.name_level,
    }
    save_json_atomic(tmp / "info.json", info)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return info


# Coarser grains of the same held-out pictures, which a small student can learn where it cannot name
# 4,000 emoji: emoji by Unicode group and subgroup, flags by country, icons by their set's category.
COARSE_DATASETS = SEEN_COARSE
HELDOUT_DATASETS = (
    *(f"{SEEN_PREFIX}{n}" for n in ("names_emoji", "names_flags", "names_icons", "retrieval")),
    *COARSE_DATASETS,
)
ICON_CATEGORY_TEMPLATES = ["an icon of {c}.", "a {c} icon.", "{c}."]
HELDOUT_TEMPLATES = {"emoji": EMOJI_TEMPLATES, "flag": FLAG_TEMPLATES, "icon": ICON_TEMPLATES}


def _coarse_labels(meta: dict, index_groups: set[str], index_subgroups: set[str]) -> dict[str, str]:
    """A corpus row's labels at the coarse grains (dataset -> label), where it has them: Unicode group
    and subgroup for emoji the Unicode list knows, the country of a country flag, an icon's category."""
    kind, group, subgroup = meta.get("kind"), meta.get("group") or "", meta.get("subgroup") or ""
    out = {}
    if kind == "emoji":
        if group in index_groups:
            out[f"{SEEN_PREFIX}emoji_groups"] = _group_classname(group)
        if subgroup in index_subgroups:
            out[f"{SEEN_PREFIX}emoji_subgroups"] = _subgroup_classname(subgroup)
    elif kind == "flag" and subgroup == "country-flag" and meta.get("name"):
        out[f"{SEEN_PREFIX}flags_countries"] = meta["name"].removeprefix("flag: ")
    elif kind == "icon" and group:
        out[f"{SEEN_PREFIX}icons_categories"] = group.lower()
    return out


def heldout_datasets(corpus: str, holdout, index: S.EmojiIndex | None = None) -> dict[str, SuiteDataset]:
    """The seen-distribution tasks from a hold-out of the demo corpus: per kind (emoji, flag, icon),
    zero-shot by name over its held-out pictures, the classes being every name of that kind in the
    corpus (skin-tone variants left out, as in names_emoji_*: one picture in five colours); and
    retrieval over the held-out pairs with their own captions. Each has a validation and a test split,
    the hold-out's division of its pairs (holdout.split_held_out): choices read validation, tables test."""
    from clipcid.holdout import SPLITS
    from clipcid.inputs.parts import discover_parts, iter_rows

    parts = discover_parts(corpus)
    holdout.check_parts(len(parts))
    names: dict[str, set[str]] = {kind: set() for kind in HELDOUT_TEMPLATES}
    held: list[tuple[bytes, str, str, str, dict]] = []  # image, kind, name, caption, metadata
    strata_meta: list[tuple[dict | None, bytes]] = []
    coarse: list[dict[str, str]] = []  # each held-out row's coarse labels
    coarse_classes: dict[str, set[str]] = {name: set() for name in COARSE_DATASETS}
    entries = index.entries if index is not None else []
    index_groups, index_subgroups = {e.group for e in entries}, {e.subgroup for e in entries}
    fields = tuple(f for f in (holdout.stratify_by, holdout.record["settings"].get("group_by")) if f)
    for i, part in enumerate(parts):
        rows = list(iter_rows(part, fields))
        mask = holdout.mask(i, len(rows))
        for r, row in enumerate(rows):
            meta = row.meta or {}
            kind, name = meta.get("kind"), meta.get("name")
            if kind not in names or not name or row.image is None:
                continue
            name = clean_name(name)
            if kind != "emoji" or "skin tone" not in name:
                names[kind].add(name)
            labels = _coarse_labels(meta, index_groups, index_subgroups)
            for dataset, label in labels.items():
                coarse_classes[dataset].add(label)
            if mask[r]:
                held.append((row.image, kind, name, row.caption or "", {"key": row.key, "style": meta.get("style")}))
                strata_meta.append((row.meta, row.image))
                coarse.append(labels)
    split_of = holdout.split_of(strata_meta)
    out = {}
    for kind, plural in (("emoji", "emoji"), ("flag", "flags"), ("icon", "icons")):
        ds, class_id = names_dataset(f"{SEEN_PREFIX}names_{plural}", names[kind], HELDOUT_TEMPLATES[kind])
        ds.splits = {split: [] for split in SPLITS}
        for (image, k, name, _, meta), split in zip(held, split_of, strict=True):
            if k == kind and name in class_id:
                ds.splits[split].append((image, class_id[name], meta))
        out[ds.name] = ds
    retrieval = SuiteDataset(f"{SEEN_PREFIX}retrieval", ["zeroshot_retrieval"], "retrieval")
    retrieval.splits = {split: [] for split in SPLITS}
    for (image, _, _, caption, meta), split in zip(held, split_of, strict=True):
        if caption.strip():
            retrieval.splits[split].append((image, [" ".join(caption.split())], meta))
    out[retrieval.name] = retrieval
    templates = {"emoji_groups": EMOJI_TEMPLATES, "emoji_subgroups": EMOJI_TEMPLATES, "flags_countries": FLAG_TEMPLATES,
                 "icons_categories": ICON_CATEGORY_TEMPLATES}  # fmt: skip
    for dataset in COARSE_DATASETS if index is not None else ():
        ds, class_id = names_dataset(dataset, coarse_classes[dataset], templates[dataset.removeprefix(SEEN_PREFIX)])
        ds.tasks = ["zeroshot_classification"]
        ds.splits = {split: [] for split in SPLITS}
        for (image, *_, meta), labels, split in zip(held, coarse, split_of, strict=True):
            if dataset in labels:
                ds.splits[split].append((image, class_id[labels[dataset]], meta))
        out[dataset] = ds
    return out


@dataclass
class BuildEvalConfig:
    out: str = option(help="output folder of the suite")
    image_size: int = option(64, "rendered image size in pixels", at_least=8)
    npm_root: str = option(DEFAULT_NPM_ROOT, "where `make sources` installed the npm sets")
    workers: int = option(help="rendering processes", default_factory=default_workers, at_least=0)
    only: list[str] | None = option(None, "build only these datasets")
    corpus: str | None = option(None, "the training corpus (with --holdout: its held-out rows become heldout_* tasks)")
    holdout: str | None = option(None, "a hold-out of --corpus (clipcid holdout): build the seen-distribution tasks")
    overwrite: bool = option(False, "replace a suite built at another image size")


def build_eval_suite(cfg: BuildEvalConfig) -> list[dict]:
    """Build every dataset of the suite (or those named in `only`); finished datasets are kept."""
    out, image_size, npm_root, workers = cfg.out, cfg.image_size, cfg.npm_root, cfg.workers
    validate(cfg)
    out_dir = Path(out)
    root = Path(npm_root)
    try:
        index = S.EmojiIndex(S.read_unicode_emoji())
    except S.SourceMissing as e:
        raise ClipcidError(f"missing {e}: run `make setup`") from e

    @functools.cache
    def style_artwork(tag: str) -> tuple[list[S.Artwork], int]:
        # Only emoji matched to a Unicode subgroup have labels; render each once for three datasets.
        arts = [a for a in S.read_iconify_emoji(root, EVAL_STYLES[tag], index) if a.subgroup]
        return prerender(arts, image_size, workers, f"render {tag}")

    builders = {}
    for tag in EVAL_STYLES:
        for level in ("subgroups", "groups"):
            builders[f"emoji_{level}_{tag}"] = lambda lv=level, t=tag: emoji_classification(
                style_artwork(t), index, t, lv
            )
        builders[f"retrieval_emoji_{tag}"] = lambda t=tag: emoji_retrieval(style_artwork(t), t)
        builders[f"names_emoji_{tag}"] = lambda t=tag: emoji_names(style_artwork(t), t)
    builders[f"names_icons_{S.EVAL_ICON_SET}"] = lambda: icon_names(root)
    builders["flags_circle"] = lambda: circle_flags(root, index)
    builders["digits"] = lambda: sklearn_digits(image_size)
    settings: dict = {"image_size": image_size}
    if cfg.holdout or cfg.corpus:
        if not (cfg.holdout and cfg.corpus):
            raise ClipcidError("the seen-distribution tasks need both --corpus and --holdout (a hold-out of it)")
        from clipcid.holdout import SPLITS, HoldOut

        holdout = HoldOut.open(cfg.holdout)
        settings["holdout"] = holdout.identity
        settings["heldout_splits"] = list(SPLITS)  # suites before the validation split had one, "test"
        seen = functools.cache(lambda: heldout_datasets(cfg.corpus, holdout, index))
        for name in HELDOUT_DATASETS:
            builders[name] = lambda n=name: seen()[n]

    if cfg.only:
        unknown = sorted(set(cfg.only) - set(builders))
        if unknown:
            raise ClipcidError(f"unknown eval dataset(s) {', '.join(unknown)}; known: {', '.join(builders)}")
        builders = {name: build for name, build in builders.items() if name in cfg.only}
    # stage.py's rule: the suite folder holds datasets of one image size; each dataset is whole once its
    # info.json is there (written last), and suite.json lists those present.
    folder = RunFolder(out_dir, SUITE_INDEX, settings, cfg.overwrite)
    done = folder.finished_run(lambda: all((out_dir / name / "info.json").is_file() for name in builders))
    if done is not None:
        return [info for info in done["datasets"] if info["name"] in builders]
    with folder:
        return _build(builders, folder, out_dir, image_size, workers)


def _build(builders: dict, folder: RunFolder, out_dir: Path, image_size: int, workers: int) -> list[dict]:
    infos = []
    for name, build in builders.items():
        info_file = out_dir / name / "info.json"
        if info_file.is_file():
            info = json.loads(info_file.read_text())
            log.info("%s: already built (%d images)", name, info["written"])
        else:
            try:
                info = write_wds_dataset(build(), out_dir, image_size, workers)
            except S.SourceMissing as e:
                raise ClipcidError(f"{name}: missing {e}") from e
        infos.append(info)
    # The suite file lists every dataset present, including ones built by an earlier `--only` run.
    present = [json.loads(f.read_text()) for f in sorted(out_dir.glob("*/info.json"))]
    folder.finish({"datasets": present})
    return infos
