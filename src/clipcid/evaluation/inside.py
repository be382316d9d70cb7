"""Inside the students: their weights (the paper's Fig. 4) and their patch features (its Fig. 5).

Weights: for each student, the last linear layer of the last block of the image tower and of the text
tower (the MLP's output projection of a transformer block), as trained and as changed from the shared
initialisation (w - w0; w0 is rebuilt from the run's seed, the init every student of a run starts from):
standard deviation, excess kurtosis and the fraction of |w| < 1e-3, with overlaid histograms.

Patch features: for a few held-out pictures and each ViT student, the last block's patch tokens (the
class token left out) go through one PCA per model fitted on every patch of the pictures; the first
component, thresholded at zero and signed so that the picture's border is background, separates object
from background, and a second PCA over the object patches gives three components shown as RGB
(background black), as DINOv2 and the paper draw them. The teacher's image tower here is a CNN whose
last feature map is 4 x 4 at 128 px: it is left out.

OUT/inside/inside.json (settings, "complete", the weight statistics), OUT/inside/weights.json (the same
numbers alone, beside the results: not CLIP_benchmark records), weights.png, patches.png.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipcid.config import option
from clipcid.stage import RunFolder, read_record
from clipcid.util.fileio import save_json_atomic
from clipcid.util.plots import new_figure, save_png

log = logging.getLogger("clipcid")

SETTINGS_FILE = "inside.json"
WEIGHTS_FILE = "weights.json"
SMALL = 1e-3  # |w| below this counts as near zero (the paper's observation: fewer after distillation)


@dataclass
class InsideConfig:
    """The stage's settings (section "inside" of `clipcid run`'s recipe); the pipeline fills the paths."""

    out: str = option(help="output folder (a run's inside/)")
    gallery: str | None = option(None, "held-out pictures for the patch features (a hold-out's gallery)")
    pictures: int = option(8, "held-out pictures whose patch features are drawn", at_least=1)
    overwrite: bool = option(False, "replace a look inside made with other settings")


@dataclass
class Student:
    name: str  # e.g. "baseline", "student"
    label: str
    model: str  # architecture
    pretrained: str  # the trained weights
    init: str | None  # what it started from (None: random, from `seed`)
    seed: int
    identity: str | None  # what made it (its run's settings), for the settings


def last_linear(tower: torch.nn.Module) -> torch.nn.Linear | None:
    """The last linear layer of the last block of a transformer tower (open_clip's resblocks)."""
    blocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    if blocks is None or len(blocks) == 0:
        return None
    linears = [m for m in blocks[-1].modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1] if linears else None


def towers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The image tower and the text tower (open_clip's CLIP keeps the text transformer on the model)."""
    text = getattr(model, "text", None) or model
    return {"image": model.visual, "text": text}


def weight_statistics(w: np.ndarray) -> dict:
    from scipy import stats

    w = np.asarray(w, dtype=np.float64).ravel()
    return {
        "n": int(w.size),
        "std": float(w.std()),
        # Excess kurtosis (0 for a normal distribution); undefined (None) for weights that are all equal.
        "kurtosis": float(stats.kurtosis(w)) if w.std() > 0 else None,
        "near_zero": float((np.abs(w) < SMALL).mean()),
    }


def last_layer_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    out = {}
    for tower, module in towers(model).items():
        layer = last_linear(module)
        if layer is not None:
            out[tower] = layer.weight.detach().float().cpu().numpy()
    return out


def student_weights(
    student: Student, model: torch.nn.Module | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(trained, initial) weights of the last linear layer of each tower; `model`: the trained student
    where the caller has it loaded already."""
    from clipcid.models import load_model

    trained = last_layer_weights(model if model is not None else load_model(student.model, student.pretrained).model)
    initial = last_layer_weights(load_model(student.model, student.init, seed=student.seed).model)
    return trained, initial


def weight_report(students: list[Student], models: dict[str, torch.nn.Module] | None = None) -> tuple[dict, dict]:
    """Per student and tower: statistics of w and of w - w0; and the arrays, for the histograms.
    `models`: trained students already loaded, by name."""
    numbers, arrays = {}, {}
    for s in students:
        trained, initial = student_weights(s, (models or {}).get(s.name))
        numbers[s.name] = {
            tower: {"w": weight_statistics(w), "change": weight_statistics(w - initial[tower])}
            for tower, w in trained.items()
        }
        arrays[s.name] = {tower: (w, w - initial[tower]) for tower, w in trained.items()}
    return numbers, arrays


def plot_weights(students: list[Student], arrays: dict, path: Path) -> None:
    tower_names = sorted({t for a in arrays.values() for t in a})
    fig, axes = new_figure(4.2 * 2, 3.0 * len(tower_names), ncols=2, nrows=len(tower_names))
    axes = np.asarray(axes).reshape(len(tower_names), 2)
    for row, tower in enumerate(tower_names):
        for col, (what, title) in enumerate(((0, "w"), (1, "w − w₀"))):
            ax = axes[row, col]
            values = [arrays[s.name][tower][what].ravel() for s in students if tower in arrays[s.name]]
            edges = np.histogram_bin_edges(np.concatenate(values), bins=80)
            for s, v in zip(students, values, strict=True):
                ax.hist(v, bins=edges, histtype="step", linewidth=1.4, label=f"{s.label} (sd {v.std():.4f})")
            ax.set(title=f"{tower} tower, last block's last linear: {title}", yscale="log")
            ax.legend(fontsize=7)
    save_png(fig, path)


# -- patch features -------------------------------------------------------------------------------


def patch_tokens(model: torch.nn.Module, preprocess, images: list[bytes]) -> np.ndarray | None:
    """The last block's tokens of each picture's patches (n, grid, grid, D), or None for a tower that is
    not a ViT."""
    visual = model.visual
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    grid = getattr(visual, "grid_size", None)
    if blocks is None or grid is None:
        return None
    seen: list[torch.Tensor] = []
    hook = blocks[-1].register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        batch = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        with torch.no_grad():
            model.encode_image(batch.to(next(model.parameters()).device))
    finally:
        hook.remove()
    tokens = seen[-1]
    if not getattr(visual.transformer, "batch_first", True):
        tokens = tokens.transpose(0, 1)
    n_patches = grid[0] * grid[1]
    patches = tokens[:, -n_patches:, :]  # the class (and any register) tokens come first
    return patches.reshape(len(images), grid[0], grid[1], -1).float().cpu().numpy()


def patch_pca(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(foreground mask (n, g, g), RGB (n, g, g, 3)) from one model's patch tokens of every picture."""
    from sklearn.decomposition import PCA

    n, g1, g2, d = tokens.shape
    flat = tokens.reshape(-1, d)
    first = PCA(n_components=1, random_state=0).fit_transform(flat)[:, 0].reshape(n, g1, g2)
    border = np.concatenate([first[:, 0, :], first[:, -1, :], first[:, :, 0], first[:, :, -1]], axis=1)
    if border.mean() > 0:  # the border is background: its side of the threshold is the low one
        first = -first
    foreground = first > 0
    rgb = np.zeros((n, g1, g2, 3), dtype=np.float32)
    inside = flat[foreground.ravel()]
    if len(inside) >= 3:
        parts = PCA(n_components=3, random_state=0).fit_transform(inside)
        low, high = np.percentile(parts, 1, axis=0), np.percentile(parts, 99, axis=0)
        rgb.reshape(-1, 3)[foreground.ravel()] = np.clip((parts - low) / np.maximum(high - low, 1e-8), 0, 1)
    return foreground, rgb


def plot_patches(pictures: list[bytes], rows: list[tuple[str, np.ndarray, np.ndarray]], path: Path) -> None:
    """One column per picture: the picture, then per model its object mask and its RGB components."""
    n = len(pictures)
    fig, axes = new_figure(1.3 * n, 1.35 * (1 + 2 * len(rows)), ncols=n, nrows=1 + 2 * len(rows))
    axes = np.asarray(axes).reshape(1 + 2 * len(rows), n)
    for j, png in enumerate(pictures):
        axes[0, j].imshow(Image.open(io.BytesIO(png)).convert("RGB"))
    for r, (label, mask, rgb) in enumerate(rows):
        for j in range(n):
            axes[1 + 2 * r, j].imshow(mask[j], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            axes[2 + 2 * r, j].imshow(rgb[j], interpolation="nearest")
        axes[1 + 2 * r, 0].set_ylabel(f"{label}\nobject", fontsize=7)
        axes[2 + 2 * r, 0].set_ylabel(f"{label}\nPCA 2-4", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("picture", fontsize=7)
    save_png(fig, path)


def held_out_pictures(gallery: Path, count: int) -> list[bytes]:
    """`count` pictures spread evenly over a retrieval gallery (the same for every model)."""
    from clipcid.evaluation.datasets import build_dataset

    images = [image for image, _ in build_dataset(f"wds:{gallery}").iter_split("test")]
    chosen = np.unique(np.linspace(0, len(images) - 1, num=min(count, len(images))).astype(int))
    return [images[i] for i in chosen]


# -- the stage ------------------------------------------------------------------------------------


def look_inside(cfg: InsideConfig, students: list[Student]) -> dict:
    """The folder (a run's inside/): the weight statistics and histograms of every student, and the
    patch-feature PCA of each ViT student on `cfg.pictures` held-out pictures; returns the record
    (finished runs are kept)."""
    from clipcid.models import load_model

    gallery = Path(cfg.gallery) if cfg.gallery else None
    settings = {"students": [[s.name, s.identity] for s in students], "gallery": str(gallery), "pictures": cfg.pictures}
    folder = RunFolder(cfg.out, SETTINGS_FILE, settings, cfg.overwrite)
    paths = inside_paths(Path(cfg.out))
    wanted = [paths["numbers"], paths["weights"]]  # patches.png only where a ViT student had pictures
    done = folder.finished_run(lambda: all(p.is_file() for p in wanted))
    if done is not None and (not done.get("patches") or paths["patches"].is_file()):
        return done
    with folder:
        loaded = {s.name: load_model(s.model, s.pretrained) for s in students}  # each once: weights and patches
        numbers, arrays = weight_report(students, {name: m.model for name, m in loaded.items()})
        save_json_atomic(paths["numbers"], numbers)
        plot_weights(students, arrays, paths["weights"])
        summary: dict = {"weights": numbers, "patches": []}
        if gallery is not None:
            pictures = held_out_pictures(gallery, cfg.pictures)
            rows = []
            for s in students:
                tokens = patch_tokens(loaded[s.name].model, loaded[s.name].preprocess, pictures)
                if tokens is not None:
                    mask, rgb = patch_pca(tokens)
                    rows.append((s.label, mask, rgb))
                    summary["patches"].append({"student": s.name, "object_fraction": float(mask.mean())})
            if rows:
                plot_patches(pictures, rows, paths["patches"])
        return folder.finish(summary)


def read_inside(folder: Path) -> dict | None:
    """The finished record of the folder look_inside wrote, or None."""
    record = read_record(Path(folder) / SETTINGS_FILE)
    return record if record and record.get("complete") else None


def identity_of(folder: Path) -> str | None:
    """What the folder holds (its record's digest), for run.json; None when nothing was written."""
    from clipcid.stage import identity

    return identity(Path(folder) / SETTINGS_FILE)


def inside_paths(folder: Path) -> dict[str, Path]:
    folder = Path(folder)
    return {"weights": folder / "weights.png", "patches": folder / "patches.png", "numbers": folder / WEIGHTS_FILE}
