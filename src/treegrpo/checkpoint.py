"""Checkpoints: trainable weights (safetensors), optimiser state and run state, written atomically.

Layout: ``RUN_DIR/checkpoints/iter_000020/{trainable.safetensors, optimizer.pt, state.json}``. A
checkpoint directory is written under a temporary name and renamed into place, so a crash mid-write
leaves the previous checkpoint valid. Loading never executes code: safetensors, JSON, and
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or does not match the model."""


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_") and (p / STATE).is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: str | Path, iteration: int, weights: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any] | None, state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint `iteration` atomically and keep only the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter_{iteration:06d}"
    tmp = root / f".tmp_iter_{iteration:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER)
        (tmp / STATE).write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Trainable weights from a checkpoint directory or a .safetensors file."""
    path = Path(path)
    file = path / WEIGHTS if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no weights at {str(file)!r}")
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises several types for truncated or tampered files
        raise CheckpointError(f"checkpoint weights {str(file)!r} are unreadable ({err}); the file may be truncated") from None


def load_state(checkpoint: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(run state, optimiser state or None) of a checkpoint directory."""
    checkpoint = Path(checkpoint)
    try:
        state = json.loads((checkpoint / STATE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint state {str(checkpoint / STATE)!r} is unreadable ({err})") from None
    optimizer = None
    if (checkpoint / OPTIMIZER).is_file():
        try:
            optimizer = torch.load(checkpoint / OPTIMIZER, weights_only=True)
        except Exception as err:
            raise CheckpointError(f"optimiser state {str(checkpoint / OPTIMIZER)!r} is unreadable ({err})") from None
    return state, optimizer
