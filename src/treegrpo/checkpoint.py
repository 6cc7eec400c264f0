"""Checkpoints: trainable weights (safetensors), optimiser state and run state, written atomically.

Layout: ``RUN_DIR/checkpoints/iter_000020/{trainable.safetensors, optimizer.pt, state.json,
manifest.json}``, plus ``ema.safetensors`` (the EMA of the trainable weights) when `optim.ema_decay` > 0. A checkpoint is written under a temporary name, every file is fsynced, then
``manifest.json`` (sha256 and size of each file) is written last and the directory renamed into
place, so a crash or a full disk mid-write leaves the previous checkpoint valid. Loading verifies the
manifest first: a truncated or tampered checkpoint is refused with a message naming the newest valid
one. Loading never executes code: safetensors, JSON, and ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "trainable.safetensors"
EMA_WEIGHTS = "ema.safetensors"  # the EMA of the trainable weights: what evaluation and export use
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, tampered with or does not match the model."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, permissions...); the previous one stays valid."""


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run (renamed into place, so written to the end), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter_"))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def _sha256(path: Path, fsync: bool = False) -> str:
    """sha256 of a file, read in blocks (checkpoints of full models are gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if fsync:
            os.fsync(f.fileno())  # the data is on disk before the manifest says it is complete
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # makes the directory entries (new files, a rename) durable
    finally:
        os.close(fd)


def remove_stale_temp_dirs(run_dir: str | Path) -> list[Path]:
    """Delete temporary checkpoint directories left by a crash mid-write; returns what was removed."""
    root = Path(run_dir) / "checkpoints"
    stale = sorted(p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def save_checkpoint(run_dir: str | Path, iteration: int, weights: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any] | None, state: dict[str, Any], keep: int = 2,
                    ema_weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `iteration` atomically and keep only the newest `keep`. weights: the raw
    trainable weights (resume trains on); ema_weights: their EMA, when there is one.

    Raises CheckpointWriteError (with the temporary files removed) when anything cannot be written.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"iter_{iteration:06d}"
    tmp = root / f"{TMP_PREFIX}iter_{iteration:06d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(run_dir)
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
        if ema_weights is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in ema_weights.items()}, str(tmp / EMA_WEIGHTS))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER)
        (tmp / STATE).write_text(json.dumps(state))
        files = {p.name: {"sha256": _sha256(p, fsync=True), "size": p.stat().st_size} for p in sorted(tmp.iterdir())}
        with (tmp / MANIFEST).open("w") as f:
            json.dump({"iteration": iteration, "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(root)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [p.name for p in checkpoint_dirs(run_dir)]
        keep_note = f"the previous checkpoint {previous[-1]} stays valid" if previous else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"could not write checkpoint {final} ({err.strerror or err}); {keep_note}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(checkpoint: str | Path) -> None:
    """Raise CheckpointError unless every file listed in the manifest has its recorded size and sha256."""
    checkpoint = Path(checkpoint)
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and WEIGHTS in files and STATE in files
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {checkpoint} has no {MANIFEST} (incomplete, or not written by treegrpo)") from None
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"checkpoint {checkpoint} has an unreadable {MANIFEST}") from None
    for name, entry in files.items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {checkpoint}: {name} is missing")
        if path.stat().st_size != entry.get("size"):
            raise CheckpointError(f"checkpoint {checkpoint}: {name} has {path.stat().st_size} bytes, the manifest "
                                  f"says {entry.get('size')} (truncated or modified)")
        if _sha256(path) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint {checkpoint}: {name} does not match its sha256 in the manifest (modified)")


def resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run, verified; None when the run has none.

    A damaged newest checkpoint is refused, never silently skipped: the error names the newest valid
    older one and how to fall back to it (resuming from older weights is the user's call).
    """
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        return None
    try:
        verify_checkpoint(dirs[-1])
        return dirs[-1]
    except CheckpointError as err:
        problem = str(err)
    for older in reversed(dirs[:-1]):
        try:
            verify_checkpoint(older)
        except CheckpointError:
            continue
        aside = dirs[-1].with_name("damaged_" + dirs[-1].name)
        raise CheckpointError(f"{problem}. Refusing to resume from it. The newest valid checkpoint is {older.name}; "
                              f"to resume from there, move the damaged one aside: mv {dirs[-1]} {aside}")
    raise CheckpointError(f"{problem}. Refusing to resume from it, and no older valid checkpoint exists in "
                          f"{Path(run_dir) / 'checkpoints'}")


def load_weights(path: str | Path, prefer_ema: bool = False) -> dict[str, torch.Tensor]:
    """Trainable weights from a checkpoint directory (verified against its manifest) or a .safetensors
    file. prefer_ema: a checkpoint directory's EMA weights when it holds them (the run's result, as
    `sample` / `eval` use it), else its raw trainable weights."""
    path = Path(path)
    if path.is_dir():
        verify_checkpoint(path)
    file = path if not path.is_dir() else path / EMA_WEIGHTS if prefer_ema and (path / EMA_WEIGHTS).is_file() else path / WEIGHTS
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
            # weights_only: tensors and plain containers only; a pickle that would run code is refused
            optimizer = torch.load(checkpoint / OPTIMIZER, weights_only=True)
        except Exception as err:
            raise CheckpointError(f"optimiser state {str(checkpoint / OPTIMIZER)!r} is unreadable or not plain "
                                  f"tensors ({type(err).__name__}); refusing to load it") from None
    return state, optimizer
