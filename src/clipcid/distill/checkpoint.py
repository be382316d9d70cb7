"""The distill run folder, written and read only here.

RUN/params.json ({"settings", "complete", ...}), RUN/checkpoints/step_N/ (model.pt: the student with
its heads and the config; rank{R}.pt: that rank's optimizer, scaler, RNG and classifier shard),
RUN/checkpoints/latest.txt, RUN/train_log.jsonl and RUN/results.jsonl (one row per logged step),
RUN/tensorboard/, and when done RUN/student.pt (the student alone: open_clip loads it),
RUN/distill_heads.pt, RUN/classifier_rank{R}.pt, RUN/open_clip/ (the student as a folder plain
open_clip loads, export.py's layout). Other modules find these files through the functions here.

Every checkpoint file holds tensors and plain values only and is read with torch.load(weights_only=True):
a checkpoint from anywhere cannot run code. Random generator states are stored as tensors.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clipcid.errors import ClipcidError
from clipcid.stage import DistEnv, RunFolder, barrier, identity, read_finished
from clipcid.util.fileio import atomic_path

PARAMS_FILE = "params.json"
STUDENT_FILE = "student.pt"
TRAIN_LOG = "train_log.jsonl"
EVAL_LOG = "results.jsonl"  # --eval-every: the suite's summary at each evaluated step

log = logging.getLogger("clipcid")


def rng_state() -> dict:
    """Python's, NumPy's and torch's generator states as tensors and plain values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_safely(path: Path, device: torch.device | str = "cpu") -> dict:
    """torch.load with weights_only=True, and one clear line when the file is not such a checkpoint."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # an unpickling error names the offending global; anything else: not a checkpoint
        raise ClipcidError(
            f"{path} is not a checkpoint clipcid can load safely ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        ) from e


def student_path(run: str | Path) -> Path:
    """The finished student (its open_clip state dict) of a run folder."""
    return Path(run) / STUDENT_FILE


def write_untrained_student(run: str | Path, model: str, seed: int) -> Path:
    """RUN/student.pt of a student that never trained: its random initialisation from `seed` (the floor
    any training has to clear), in the layout a trained student has."""
    from clipcid.models import load_model

    path = student_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"state_dict": load_model(model, None, "cpu", seed).model.state_dict()}, tmp)
    return path


def open_clip_folder(run: str | Path) -> Path:
    return Path(run) / "open_clip"


def read_params(run: str | Path) -> dict:
    """params.json of a finished run, or one clear error."""
    return read_finished(Path(run) / PARAMS_FILE, "distill")


def too_short(run: str | Path) -> str | None:
    """Why a run was too short for its student to be compared with another (distill says so before it
    trains), or None; None too for a run that is not there or from before the check existed."""
    from clipcid.stage import read_record

    record = read_record(Path(run) / PARAMS_FILE)
    return (record or {}).get("too_short")


def identity_of(run: str | Path) -> str | None:
    """The fingerprint of the settings a run was trained with (and so of its student)."""
    return identity(Path(run) / PARAMS_FILE)


def read_train_log(run: str | Path) -> list[dict]:
    """The logged steps of a run (train_log.jsonl), oldest first; empty when there are none."""
    path = Path(run) / TRAIN_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def discard_checkpoints(run: str | Path) -> None:
    """Drop the resume points of a finished run (the student and the logs stay)."""
    shutil.rmtree(Path(run) / "checkpoints", ignore_errors=True)


class TrainingRun:
    def __init__(self, out: str | Path, env: DistEnv):
        self.out, self.env = Path(out), env

    @staticmethod
    def folder(out: str | Path, settings: dict, overwrite: bool = False) -> RunFolder:
        """The run folder's settings rule (params.json), stage.py's one rule."""
        return RunFolder(out, PARAMS_FILE, settings, overwrite)

    def tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.out / "tensorboard"))

    def export_open_clip(self, arch: str, description: str) -> None:
        """RUN/open_clip/: the finished student as a folder plain open_clip and CLIP_benchmark load."""
        from clipcid.export import ExportConfig, export_model

        student, folder = str(student_path(self.out)), str(open_clip_folder(self.out))
        export_model(ExportConfig(arch, student, folder, description=description, overwrite=True))

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def save(
        self,
        step: int,
        epoch: int,
        step_in_epoch: int,
        student: nn.Module,
        optimizer,
        scaler,
        pfc,
        config,
        keep: int = 0,
    ):
        """All ranks write into a temporary folder; rank 0 renames it, points `latest` at it, and then
        deletes all but the newest `keep` checkpoints (0: keeps all)."""
        folder = self.checkpoints / f"step_{step:08d}"
        tmp = folder.with_name(folder.name + ".partial")
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.env)
        state = {
            "step": step,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_state(),
            # The classifier shard with its own AdamW moments, step count and sampling generator.
            "pfc": None if pfc is None else {"buffers": pfc.state_dict(), **pfc.optimizer_state()},
        }
        torch.save(state, tmp / f"rank{self.env.rank}.pt")
        if self.env.is_main:
            torch.save({"student": student.state_dict(), "config": config}, tmp / "model.pt")
        barrier(self.env)
        if self.env.is_main:
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
            with atomic_path(self.checkpoints / "latest.txt") as f:
                f.write_text(folder.name + "\n")
            if keep:
                self.prune(keep, latest=folder.name)
        barrier(self.env)

    def prune(self, keep: int, latest: str) -> None:
        """Delete complete checkpoints older than the newest `keep`; `latest` (the one latest.txt names) is
        always kept. Only runs after latest.txt points at it, so a crash here loses nothing needed."""
        complete = sorted(p for p in self.checkpoints.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
        for old in complete[:-keep]:
            if old.name != latest:
                shutil.rmtree(old, ignore_errors=True)

    def resolve(self, which: str) -> Path | None:
        """The checkpoint folder `--resume` names (latest, or a path); None: nothing to resume."""
        if which == "latest":
            pointer = self.checkpoints / "latest.txt"
            if not pointer.is_file():
                log.info("--resume latest: no checkpoint in %s, starting fresh", self.checkpoints)
                return None
            return self.checkpoints / pointer.read_text().strip()
        return Path(which)

    def load(self, which: str, student: nn.Module, optimizer, scaler, pfc) -> tuple[int, int, int] | None:
        """Restore everything from a checkpoint; (step, epoch, step in epoch), or None."""
        folder = self.resolve(which)
        if folder is None:
            return None
        if not (folder / "model.pt").is_file():
            raise ClipcidError(f"no checkpoint at {folder}")
        model = load_safely(folder / "model.pt", self.env.device)
        try:
            student.load_state_dict(model["student"])
        except (KeyError, RuntimeError) as e:
            raise ClipcidError(f"{folder} is a checkpoint of another model or settings: {str(e)[:200]}") from e
        state_file = folder / f"rank{self.env.rank}.pt"
        if not state_file.is_file():
            raise ClipcidError(f"{folder} was saved by fewer ranks: resume with the same number of processes")
        state = load_safely(state_file, self.env.device)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        if pfc is not None and state["pfc"] is not None:
            pfc.load_state_dict(state["pfc"]["buffers"])
            pfc.load_optimizer_state(state["pfc"])
        step = state["step"]
        if self.env.is_main:
            self.truncate_logs(step)
        log.info(
            "resumed from %s at step %d (epoch %d, step %d of it)", folder, step, state["epoch"], state["step_in_epoch"]
        )
        return step, state["epoch"], state["step_in_epoch"]

    def truncate_logs(self, step: int) -> None:
        """Drop log rows of steps after the checkpoint: they are trained again, and logged again."""
        for name in (TRAIN_LOG, EVAL_LOG):
            path = self.out / name
            if path.is_file():
                rows = [line for line in path.read_text().splitlines() if line.strip()]
                kept = [line for line in rows if json.loads(line)["step"] <= step]
                if len(kept) != len(rows):
                    with atomic_path(path) as tmp:
                        tmp.write_text("".join(line + "\n" for line in kept))

    def append(self, name: str, row: dict) -> None:
        with open(self.out / name, "a") as f:
            f.write(json.dumps(row) + "\n")

    def export(self, student: nn.Module, pfc, config: dict) -> None:
        """The student alone, loadable by open_clip.create_model_and_transforms(ARCH, pretrained=PATH);
        heads and classifier apart."""
        if self.env.is_main:
            with atomic_path(student_path(self.out)) as tmp:
                torch.save({"state_dict": student.clip.state_dict()}, tmp)
            heads = {k: v for k, v in student.state_dict().items() if not k.startswith("clip.")}
            with atomic_path(self.out / "distill_heads.pt") as tmp:
                torch.save({"heads": heads, "config": config}, tmp)
        if pfc is not None:
            with atomic_path(self.out / f"classifier_rank{self.env.rank}.pt") as tmp:
                torch.save({"weight": pfc.weight.cpu(), "shard": (pfc.start, pfc.end)}, tmp)
        barrier(self.env)
