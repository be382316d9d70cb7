"""Evaluation datasets behind one builder: CLIP_benchmark `wds/` folders, image folders, suite names.

A dataset yields (image bytes, target) per split, where the target is a class index
(classification) or a list of captions (retrieval).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from clipcid.errors import ClipcidError
from clipcid.inputs.parts import IMAGE_EXTENSIONS
from clipcid.inputs.shards import iter_tar_samples

DEFAULT_SUITE_ROOT = "demo/suite"  # where `make demo` builds it (layout.py); demo/eval in demos made before
DEFAULT_TEMPLATES = ["a photo of a {c}."]

# The suite's groups. "seen": tasks on held-out pictures of the training corpus's own sources (the
# paper's Table 1 setting); "robustness": zero-shot by name in styles the corpus does not contain (its
# Table 3 setting). The suite's older means leave the seen tasks out, so that they keep their definitions.
SEEN_PREFIX = "heldout_"
# The seen pictures at coarser grains (emoji by Unicode group and subgroup, flags by country, icons by
# category): scored by mean per-class recall, since their classes are skewed; kept out of the seen
# zero-shot mean, which stays the name-level one.
SEEN_COARSE = tuple(
    f"{SEEN_PREFIX}{n}" for n in ("emoji_groups", "emoji_subgroups", "flags_countries", "icons_categories")
)
# Zero-shot by name on unseen styles: the names (emoji, icons, countries, digits) in 3D, high contrast,
# Lucide, circle flags and scikit-learn's digits.
ROBUSTNESS = (
    "names_emoji_fluent3d",
    "names_emoji_fluenthc",
    "names_icons_lucide",
    "flags_circle",
    "digits",
)
SEEN, ROBUST = "seen", "robustness"


def group_of(dataset: str) -> str | None:
    """The dataset's group of the suite: "seen", "robustness" or None."""
    name = dataset.removeprefix("wds/")
    if name.startswith(SEEN_PREFIX):
        return SEEN
    return ROBUST if name in ROBUSTNESS else None


@dataclass
class EvalDataset:
    name: str
    kind: str  # "classification" | "retrieval"
    root: Path
    layout: str  # "wds" | "imagefolder"
    splits: list[str]
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    _folder_classes: list[str] = field(default_factory=list)  # imagefolder: folder name per class index

    @property
    def benchmark_name(self) -> str:
        """The name CLIP_benchmark gives it in results: `wds/NAME` for a webdataset folder."""
        return f"wds/{self.name}" if self.layout == "wds" else self.name

    def sources(self, split: str) -> list[Path]:
        """Independent pieces of a split (tar shards or class folders), for parallel reading."""
        self.require_split(split)
        if self.layout == "wds":
            return sorted((self.root / split).glob("*.tar"), key=lambda p: (len(p.stem), p.stem))
        return sorted(d for d in (self.root / split).iterdir() if d.is_dir())

    def require_split(self, split: str) -> None:
        if split not in self.splits:
            raise ClipcidError(
                f"dataset {self.name} has no '{split}' split (it has: {', '.join(self.splits) or 'none'})"
            )

    def iter_source(self, source: Path) -> Iterator[tuple[bytes, int | list[str]]]:
        if self.layout == "wds":
            for sample in iter_tar_samples(source):
                image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
                if image is None:
                    raise ClipcidError(f"{source}: sample {sample['__key__']} has no image")
                if self.kind == "retrieval":
                    yield image, sample["txt"].decode("utf-8").splitlines()
                else:
                    yield image, int(sample["cls"])
        else:
            label = self._folder_classes.index(source.name)
            for f in sorted(source.iterdir()):
                if f.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
                    yield f.read_bytes(), label

    def iter_split(self, split: str) -> Iterator[tuple[bytes, int | list[str]]]:
        for source in self.sources(split):
            yield from self.iter_source(source)


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# CLIP_benchmark's webdataset layout: ROOT/dataset_type.txt, ROOT/classnames.txt, ROOT/zeroshot_
# classification_templates.txt, ROOT/SPLIT/nshards.txt and the split's .tar shards.
WDS_TYPE, WDS_CLASSNAMES, WDS_TEMPLATES, WDS_NSHARDS = (
    "dataset_type.txt", "classnames.txt", "zeroshot_classification_templates.txt", "nshards.txt",
)  # fmt: skip


def write_wds_description(
    root: Path, kind: str, classnames: list[str] | None = None, templates: list[str] | None = None
) -> None:
    """What a wds dataset folder says of itself, as CLIP_benchmark reads it."""
    (root / WDS_TYPE).write_text(kind + "\n")
    if classnames:
        (root / WDS_CLASSNAMES).write_text("\n".join(classnames) + "\n")
        (root / WDS_TEMPLATES).write_text("\n".join(templates or []) + "\n")


def write_wds_shard_count(split_folder: Path, n_shards: int) -> None:
    (split_folder / WDS_NSHARDS).write_text(f"{n_shards}\n")


def load_wds(root: Path, name: str) -> EvalDataset:
    kind_file = root / WDS_TYPE
    kind = kind_file.read_text().strip().lower() if kind_file.is_file() else "classification"
    if kind not in ("classification", "retrieval"):
        raise ClipcidError(f"{root}: dataset type '{kind}' is not supported (classification or retrieval)")
    splits = sorted(d.name for d in root.iterdir() if d.is_dir() and any(d.glob("*.tar")))
    ds = EvalDataset(name, kind, root, "wds", splits)
    if kind == "classification":
        if (root / WDS_CLASSNAMES).is_file():
            ds.classnames = _read_lines(root / WDS_CLASSNAMES)
        templates = root / WDS_TEMPLATES
        ds.templates = _read_lines(templates) if templates.is_file() else list(DEFAULT_TEMPLATES)
    return ds


def load_imagefolder(root: Path, name: str) -> EvalDataset:
    if not root.is_dir():
        raise ClipcidError(f"image folder not found: {root}")
    splits = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not splits:
        raise ClipcidError(f"{root}: expected split folders such as train/ and test/ holding CLASS/ folders")
    classes = sorted({c.name for s in splits for c in (root / s).iterdir() if c.is_dir()})
    ds = EvalDataset(name, "classification", root, "imagefolder", splits)
    ds._folder_classes = classes
    if (root / WDS_CLASSNAMES).is_file():
        ds.classnames = _read_lines(root / WDS_CLASSNAMES)
        if len(ds.classnames) != len(classes):
            raise ClipcidError(
                f"{root}/{WDS_CLASSNAMES} has {len(ds.classnames)} names for {len(classes)} class folders"
            )
    else:
        ds.classnames = [c.replace("_", " ") for c in classes]
    templates = root / "templates.txt"
    ds.templates = _read_lines(templates) if templates.is_file() else list(DEFAULT_TEMPLATES)
    return ds


SUITE_INDEX = "suite.json"  # a built suite's index of datasets (corpus/eval_suite.py writes it, last)


def is_suite(folder: str | os.PathLike) -> bool:
    return (Path(folder) / SUITE_INDEX).is_file()


def suite_datasets(suite_root: str | os.PathLike) -> list[dict]:
    suite_file = Path(suite_root) / SUITE_INDEX
    if not suite_file.is_file():
        earlier = Path(suite_root).parent / "eval"
        hint = f" (a demo made before keeps it in {earlier}: --suite-root {earlier})" if is_suite(earlier) else ""
        raise ClipcidError(
            f"no evaluation suite at {suite_root}{hint}; build it with `clipcid data build-eval --out {suite_root}`"
        )
    return json.loads(suite_file.read_text())["datasets"]


def suite_identity(suite_root: str | os.PathLike) -> str:
    """What a suite's figures follow from: its settings and the datasets it holds with their splits (a
    dataset added or rebuilt with other splits changes it, so evaluations made before are redone)."""
    from clipcid.stage import digest

    suite_file = Path(suite_root) / SUITE_INDEX
    record = json.loads(suite_file.read_text()) if suite_file.is_file() else {}
    datasets = sorted(
        (d["name"], sorted(d.get("splits", {}).items()), d.get("tasks")) for d in record.get("datasets", [])
    )
    return digest({"settings": record.get("settings"), "datasets": datasets})


def build_dataset(
    spec: str, suite_root: str | os.PathLike = DEFAULT_SUITE_ROOT, dataset_root: str | None = None
) -> EvalDataset:
    """`wds:PATH` or a CLIP_benchmark wds folder, `imagefolder:PATH`, or a held-out suite name; and
    CLIP_benchmark's spelling, `wds/NAME` with `dataset_root` the dataset's folder (a template with
    {dataset} and {dataset_cleaned} as CLIP_benchmark takes it; default: the suite's folder NAME)."""
    if spec.startswith("wds/"):
        name = spec.removeprefix("wds/")
        if dataset_root:
            root = Path(dataset_root.format(dataset=name, dataset_cleaned=name.replace("/", "-")))
        else:
            root = Path(suite_root) / name
        if not root.is_dir():
            raise ClipcidError(f"dataset {spec}: no folder {root}; give the dataset's folder with --dataset-root")
        return load_wds(root, name)
    if spec.startswith("imagefolder:"):
        path = Path(spec.split(":", 1)[1])
        return load_imagefolder(path, path.name)
    if spec.startswith("wds:"):
        path = Path(spec.split(":", 1)[1])
        if not path.is_dir():
            raise ClipcidError(f"wds dataset folder not found: {path}")
        return load_wds(path, path.name)
    path = Path(spec)
    if path.is_dir():
        return load_wds(path, path.name)
    suite_path = Path(suite_root) / spec
    if suite_path.is_dir():
        return load_wds(suite_path, spec)
    known = []
    if is_suite(suite_root):
        known = [d["name"] for d in suite_datasets(suite_root)]
    hint = f"; suite datasets: {', '.join(known)}" if known else f" (no suite built at {suite_root})"
    raise ClipcidError(f"unknown dataset '{spec}': not a folder, wds:PATH or imagefolder:PATH{hint}")
