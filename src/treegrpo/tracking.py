"""Run logging: `metrics.jsonl` on disk, scalars and images forwarded to accelerate's trackers.

The metrics file stays the source of truth (the report and the benchmark read it); trackers are
views of the same numbers for people who watch runs live. They are accelerate's own tracker classes
(`accelerate.tracking`), picked by name from `log.trackers`: TensorBoard by default (event files in
RUN_DIR/tensorboard), wandb when it is installed and named, any other accelerate tracker likewise,
and none with `log.trackers: []`. Nothing is hard-wired.

Only the main process writes (metrics, tracker events, tree records): under `accelerate launch`
every rank runs the loop, and one copy of each file is what we want.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from treegrpo.config import ConfigError
from treegrpo.tree_record import TreeRecord


def known_trackers() -> list[str]:
    """Tracker names accelerate knows (tensorboard, wandb, mlflow, ...)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return sorted(LOGGER_TYPE_TO_CLASS)


def installed_trackers() -> list[str]:
    """Tracker names whose library is importable here."""
    from accelerate.tracking import get_available_trackers

    return sorted(str(getattr(t, "value", t)) for t in get_available_trackers())


def check_trackers(names: list[str]) -> None:
    """Raise ConfigError for an unknown tracker name or one whose library is not installed."""
    known = known_trackers()
    for name in names:
        if name not in known:
            raise ConfigError(f"log.trackers: unknown tracker {name!r}; accelerate knows {', '.join(known)} "
                              "(or use log.trackers=[] for metrics.jsonl only)")
        if name not in installed_trackers():
            raise ConfigError(f"log.trackers: {name!r} is not installed; `pip install {name}` or drop it "
                              f"(e.g. log.trackers=[tensorboard])")


def flat_config(config: dict[str, Any]) -> dict[str, bool | int | float | str | None]:
    """{"section": {"key": v}} -> {"section.key": v}, lists and mappings as text (hparam stores take scalars)."""
    flat: dict[str, bool | int | float | str | None] = {}
    for section, values in config.items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return flat


def _make_tracker(name: str, out: Path, config: dict[str, Any] | None) -> Any:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    cls = LOGGER_TYPE_TO_CLASS[name]
    if name == "tensorboard":
        tracker = cls("tensorboard", out)  # event files in RUN_DIR/tensorboard
    elif name == "wandb":
        tracker = cls("treegrpo", name=out.name, dir=str(out), config=config)
    elif getattr(cls, "requires_logging_directory", False):
        tracker = cls(out.name, str(out / name))
    else:
        tracker = cls(out.name)
    tracker.start()
    return tracker


class RunLogger:
    """Appends one JSON line per record to RUN_DIR/metrics.jsonl and forwards it to trackers.

    trackers: accelerate tracker names (see `known_trackers`); config: the resolved config as a
    nested dict, stored as the trackers' hyper-parameters. is_main_process: whether this process
    writes (the trainer passes `accelerator.is_main_process`); default: accelerate's view of this
    process (`PartialState().is_main_process`, True without a launcher).
    """

    def __init__(self, out_dir: str | Path, trackers: list[str], config: dict[str, Any] | None = None,
                 is_main_process: bool | None = None) -> None:
        self.out = Path(out_dir)
        if is_main_process is None:
            from accelerate import PartialState

            is_main_process = PartialState().is_main_process
        self.is_main = is_main_process
        self.trackers: list[Any] = []
        if not self.is_main:
            return
        check_trackers(trackers)
        self.out.mkdir(parents=True, exist_ok=True)
        self.trackers = [_make_tracker(name, self.out, config) for name in trackers]
        if config is not None:
            for tracker in self.trackers:
                tracker.store_init_configuration(flat_config(config))

    def log(self, record: dict[str, Any], step: int | None = None) -> None:
        """Append `record` to metrics.jsonl; numbers (except the step itself) go to the trackers."""
        if not self.is_main:
            return
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        step = int(record.get("iteration", 0)) if step is None else step
        scalars = {k: float(v) for k, v in record.items()
                   if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for tracker in self.trackers:
            tracker.log(scalars, step=step)

    def log_image(self, name: str, image: Image.Image, step: int) -> None:
        """Send one RGB image (e.g. a sample grid) to every tracker that takes images."""
        if not self.is_main:
            return
        array = np.asarray(image.convert("RGB"))  # [H, W, 3] uint8
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({name: array[None]}, step=step, dataformats="NHWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({name: [array]}, step=step)

    def log_grid(self, tag: str, grid: Image.Image, step: int, prompts: list[str], seeds: list[int]) -> None:
        """Index a held-out sample grid saved as samples/TAG.png (rows = `prompts`, columns = `seeds`)
        in samples/grids.json for the report, and send it to the trackers."""
        if not self.is_main:
            return
        index_path = self.out / "samples" / "grids.json"
        index = json.loads(index_path.read_text()) if index_path.is_file() else {"grids": []}
        index.update(prompts=prompts, seeds=seeds)
        index["grids"] = [g for g in index["grids"] if g["file"] != f"{tag}.png"] + [{"file": f"{tag}.png", "iteration": step}]
        index_path.parent.mkdir(parents=True, exist_ok=True)
        index_path.write_text(json.dumps(index, indent=1) + "\n")
        self.log_image("samples/held_out", grid, step)

    def save_tree(self, record: TreeRecord) -> None:
        """Write a tree record under RUN_DIR/trees/ (see `treegrpo.tree_record`)."""
        if self.is_main:
            record.save(self.out / "trees")

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def truncate_metrics(path: str | Path, last_iteration: int) -> None:
    """On resume: keep the records of iterations <= `last_iteration` (those of the checkpoint).

    A last line cut short (the process was killed mid-write) is dropped; a damaged line anywhere
    else means the file was edited, and is an error naming the line.
    """
    path = Path(path)
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            iteration = int(record["iteration"])
        except (ValueError, KeyError, TypeError):
            if n == len(lines):
                break  # a write interrupted by the kill: the checkpoint's records are all before it
            raise ConfigError(f"{path}:{n} is not a metrics record; repair or remove that line to resume") from None
        if iteration <= last_iteration:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
