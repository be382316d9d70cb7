"""Linear probe: multinomial logistic regression on frozen, normalised image features.

Full-batch L-BFGS (torch, CPU or GPU) minimising mean cross-entropy + wd/2 * ||W||^2 (bias not
penalised, as scikit-learn does: wd = 1 / (C * n_samples) in its terms). The weight decay is chosen
on a validation split carved from train with CLIP_benchmark's coarse-to-fine search over
logspace(-6, 2, 97), then the probe is refit on train + val at that weight decay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from clipcid.errors import ClipcidError
from clipcid.evaluation.zeroshot_classification import classification_metrics, topk_accuracy

WD_GRID = np.logspace(-6, 2, 97)
COARSE_STEP = 16  # logspace(-6, 2, 7) sits at every 16th point of the grid


@dataclass
class Probe:
    weight: torch.Tensor  # C x D
    bias: torch.Tensor  # C

    def logits(self, x: np.ndarray) -> np.ndarray:
        xt = torch.as_tensor(x, dtype=torch.float32, device=self.weight.device)
        return (xt @ self.weight.T + self.bias).cpu().numpy()


def fit_logistic_regression(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    weight_decay: float,
    init: Probe | None = None,
    max_iter: int = 1000,
    device: str | torch.device = "cpu",
) -> Probe:
    xt = torch.as_tensor(x, dtype=torch.float32, device=device)
    yt = torch.as_tensor(y, dtype=torch.long, device=device)
    if init is not None:
        w, b = init.weight.clone().to(device), init.bias.clone().to(device)
    else:
        w = torch.zeros(n_classes, x.shape[1], device=device)
        b = torch.zeros(n_classes, device=device)
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-5,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w.T + b, yt) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return Probe(w.detach(), b.detach())


def search_weight_decay(evaluate_wd: Callable[[int], float]) -> tuple[int, dict[int, float]]:
    """Coarse-to-fine search of the grid index maximising validation accuracy (CLIP_benchmark's)."""
    scores: dict[int, float] = {}

    def score(i: int) -> float:
        if i not in scores:
            scores[i] = evaluate_wd(i)
        return scores[i]

    best = max(range(0, len(WD_GRID), COARSE_STEP), key=lambda i: (score(i), -i))
    step = COARSE_STEP // 2
    while step > 0:
        candidates = [max(best - step, 0), best, min(best + step, len(WD_GRID) - 1)]
        best = max(candidates, key=lambda i: (score(i), -i))
        step //= 2
    return best, scores


def fewshot_indices(y: np.ndarray, k: int, seed: int, classnames: list[str] | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if len(members) < k:
            name = classnames[c] if classnames and c < len(classnames) else str(c)
            raise ClipcidError(f"class '{name}' has {len(members)} training samples, fewer than --fewshot-k {k}")
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


def validation_split(y: np.ndarray, proportion: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of (train, val) carved from train; stratified when every class has two samples."""
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    return train_test_split(np.arange(len(y)), test_size=proportion, random_state=seed, stratify=stratify)


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    n_classes: int,
    val_proportion: float = 0.2,
    fewshot_k: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    classnames: list[str] | None = None,
) -> dict:
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if fewshot_k:
        idx = fewshot_indices(train_y, fewshot_k, seed, classnames)
        train_x, train_y = train_x[idx], train_y[idx]
    tr, va = validation_split(train_y, val_proportion, seed)
    last: dict[str, Probe | None] = {"probe": None}

    def val_accuracy(i: int) -> float:
        # Warm start from the previous fit: neighbouring weight decays have close optima.
        probe = fit_logistic_regression(train_x[tr], train_y[tr], n_classes, WD_GRID[i], last["probe"], device=device)
        last["probe"] = probe
        return topk_accuracy(probe.logits(train_x[va]), train_y[va], 1)

    best, scores = search_weight_decay(val_accuracy)
    probe = fit_logistic_regression(train_x, train_y, n_classes, WD_GRID[best], device=device)
    metrics = classification_metrics(probe.logits(test_x), test_y, prefix="lp_")
    metrics.update({"lp_weight_decay": float(WD_GRID[best]), "lp_val_acc1": scores[best], "lp_fits": len(scores) + 1})
    # CLIP_benchmark's keys too. Its probe runs SGD for a number of epochs; this one fits L-BFGS to
    # convergence, so there is no epoch count to report.
    metrics.update(
        {
            "weight_decay": float(WD_GRID[best]),
            "epochs": None,
            "seed": seed,
            "fewshot_k": fewshot_k or -1,
            "normalized": True,
        }
    )
    return metrics
