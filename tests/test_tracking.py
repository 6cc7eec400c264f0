"""Run logging: metrics.jsonl plus accelerate's trackers, chosen by name in the config."""

import json

import pytest
from PIL import Image

from treegrpo.config import ConfigError, load_config
from treegrpo.tracking import RunLogger, flat_config


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_gets_the_scalars_and_images_that_metrics_jsonl_gets(tmp_path):
    logger = RunLogger(tmp_path, ["tensorboard"], {"optim": {"lr": 1e-3, "betas": [0.9, 0.99]}})
    logger.log({"iteration": 0, "eval/reward/shapes": 0.5})
    logger.log({"iteration": 1, "train/loss": 0.25, "train/note": "text", "eval/reward/shapes": 0.75})
    grid = Image.new("RGB", (12, 8), (255, 0, 0))
    logger.log_grid("iter_000001", grid, 1, ["a red circle", "a blue square"], [7])
    logger.finish()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[1] == {"iteration": 1, "train/loss": 0.25, "train/note": "text", "eval/reward/shapes": 0.75}
    acc = _events(tmp_path)
    assert [(e.step, e.value) for e in acc.Scalars("eval/reward/shapes")] == [(0, 0.5), (1, 0.75)]
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 0.25)]
    assert "iteration" not in acc.Tags()["scalars"]  # it is the step, not a curve
    (image,) = acc.Images("samples/held_out")
    assert (image.step, image.width, image.height) == (1, 12, 8)
    index = json.loads((tmp_path / "samples" / "grids.json").read_text())
    assert index == {"grids": [{"file": "iter_000001.png", "iteration": 1}], "prompts": ["a red circle", "a blue square"],
                     "seeds": [7]}


def test_no_trackers_means_metrics_jsonl_only(tmp_path):
    logger = RunLogger(tmp_path, [])
    logger.log({"iteration": 3, "lr": 0.1})
    logger.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_only_the_main_process_writes(tmp_path):
    # The trainer passes accelerator.is_main_process (False on every rank but 0 under accelerate launch).
    logger = RunLogger(tmp_path / "run", ["tensorboard"], {"a": {"b": 1}}, is_main_process=False)
    logger.log({"iteration": 1, "lr": 0.1})
    logger.log_grid("start", Image.new("RGB", (4, 4)), 0, ["p"], [0])
    logger.finish()
    assert not (tmp_path / "run").exists()


def test_trackers_are_checked_with_the_config():
    assert load_config(None, ["log.trackers=[]"]).log.trackers == []
    assert load_config().log.trackers == ["tensorboard"]
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'.*tensorboard"):
        load_config(None, ["log.trackers=[tensorbord]"])


def test_a_tracker_that_is_not_installed_names_the_fix():
    from treegrpo.tracking import installed_trackers

    missing = [n for n in ("wandb", "mlflow", "comet_ml") if n not in installed_trackers()]
    if not missing:
        pytest.skip("every optional tracker is installed here")
    with pytest.raises(ConfigError, match=f"pip install {missing[0]}"):
        load_config(None, [f"log.trackers=[{missing[0]}]"])


def test_flat_config_keeps_scalars_and_writes_lists_as_text():
    flat = flat_config({"optim": {"lr": 1e-3, "betas": [0.9, 0.99]}, "model": {"guidance_scale": None}})
    assert flat == {"optim.lr": 1e-3, "optim.betas": "[0.9, 0.99]", "model.guidance_scale": None}
