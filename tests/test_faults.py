"""Bad input and faults: each fault of issue 6 is provoked here and its handling checked.

Training runs use the analytic Gaussian policy (fast, in-process) unless the fault is about the
shapes model or the command line.
"""

import errno
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from treegrpo import checkpoint as ckpt_module
from treegrpo.checkpoint import (MANIFEST, CheckpointError, CheckpointWriteError, checkpoint_dirs, load_state,
                                 resume_checkpoint, verify_checkpoint)
from treegrpo.cli import main
from treegrpo.config import ConfigError, load_config
from treegrpo.policies.analytic import GaussianPolicy
from treegrpo.rewards.base import _REGISTRY, register_reward
from treegrpo.rewards.retry import RetryingReward, RewardError
from treegrpo.trainer import Trainer
from treegrpo.worlds.shapes import SHAPES_WORLD


# ---------------------------------------------------------------- test rewards
def spread(images):
    return images.flatten(1).std(dim=1)


class Holes:
    """Spread, with NaN, +inf and -inf for three leaves of every batch."""

    def __call__(self, images, prompts):
        s = spread(images).clone()
        s[0], s[1], s[5] = float("nan"), float("inf"), float("-inf")
        return s


class Flaky:
    """Raises on its first `failures` calls, then scores like Spread."""

    def __init__(self, failures: int = 2):
        self.failures = failures

    def __call__(self, images, prompts):
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("scorer timed out")
        return spread(images)


class Broken:
    def __call__(self, images, prompts):
        raise ConnectionError("scorer is down")


FACTORIES = {
    "fault_spread": lambda: (lambda images, prompts: spread(images)),
    "fault_holes": Holes,
    "fault_constant": lambda: (lambda images, prompts: torch.full((images.shape[0],), 0.25)),
    "fault_nan": lambda: (lambda images, prompts: torch.full((images.shape[0],), float("nan"))),
    "fault_flaky": Flaky,
    "fault_broken": Broken,
}
for _name, _factory in FACTORIES.items():
    if _name not in _REGISTRY:
        register_reward(_name)(_factory)


def config(reward: str = "fault_spread", *extra: str):
    return load_config(None, [
        "model.family=analytic", "method.k=2", "method.window=2", "train.iterations=3", "train.prompts_per_iteration=2",
        "train.progress=false", "eval.every=0", "eval.num_seeds=1", "eval.grid_prompts=2", "train.checkpoint_every=1",
        "log.trackers=[]", "log.tree_every=0", "optim.kl_coef=0", "optim.lr=0.02", "optim.clip_range=0.2",
        f"reward.weights={{{reward}: 1.0}}", "reward.eval=[fault_spread]", "reward.retry_delay=0", *extra])


def trainer(run: Path, reward: str = "fault_spread", *extra: str) -> Trainer:
    return Trainer(config(reward, *extra), run, policy=GaussianPolicy(data_std=0.5, latent_shape=(1, 4, 4)),
                   train_prompts=["p0", "p1"])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- non-finite and degenerate rewards
def test_nonfinite_rewards_are_masked_counted_and_training_goes_on(tmp_path):
    t = trainer(tmp_path / "run", "fault_holes")
    t.train()
    steps = records(tmp_path / "run")[1:]
    assert len(steps) == 3
    for r in steps:
        assert r["nonfinite_rewards"] == 3.0  # 8 leaves per iteration, 3 of them NaN / inf / -inf
        for key in ("train/reward_mean", "train/fault_holes_std", "train/loss", "train/advantage_abs_mean", "train/grad_norm"):
            assert math.isfinite(r[key]), key
        assert r["train/advantage_abs_mean"] > 0
    assert math.isfinite(float(t.policy.gain.detach())) and float(t.policy.gain.detach()) != 1.0  # it trained, on the finite leaves


def test_all_equal_rewards_give_zero_advantages_and_no_update(tmp_path):
    t = trainer(tmp_path / "run", "fault_constant", "optim.weight_decay=0")
    t.train()
    for r in records(tmp_path / "run")[1:]:
        assert r["train/advantage_abs_mean"] == 0.0 and r["train/loss"] == 0.0 and r["nonfinite_rewards"] == 0.0
    assert float(t.policy.gain.detach()) == 1.0


def test_all_rewards_nan_skips_the_update_but_not_the_run(tmp_path):
    t = trainer(tmp_path / "run", "fault_nan")
    summary = t.train()
    assert summary["iterations"] == 3 and float(t.policy.gain.detach()) == 1.0
    for r in records(tmp_path / "run")[1:]:
        assert r["nonfinite_rewards"] == 8.0 and math.isnan(r["train/reward_mean"]) and "train/loss" not in r


# ---------------------------------------------------------------- rewards that raise
def test_a_failing_reward_is_retried_with_doubling_delays_then_names_reward_and_prompt():
    delays = []
    broken = RetryingReward("hpsv2.1", Broken(), retries=2, delay=1.0, sleep=delays.append)
    with pytest.raises(RewardError) as err:
        broken(torch.zeros(3, 3, 4, 4), ["a red circle", "a red circle", "a blue square"])
    assert delays == [1.0, 2.0]
    message = str(err.value)
    assert "reward 'hpsv2.1' failed 3 times" in message and "'a red circle'" in message and "scorer is down" in message
    flaky = RetryingReward("x", Flaky(2), retries=2, delay=0.5, sleep=delays.append)
    assert flaky(torch.rand(2, 3, 4, 4), ["p", "p"]).shape == (2,)
    with pytest.raises(RewardError):
        RetryingReward("x", Flaky(2), retries=1, delay=0.5, sleep=delays.append)(torch.rand(2, 3, 4, 4), ["p", "p"])


def test_training_survives_a_transient_reward_failure(tmp_path):
    assert trainer(tmp_path / "run", "fault_flaky", "reward.retries=2").train()["iterations"] == 3


def test_training_stops_with_one_error_when_the_reward_keeps_failing(tmp_path):
    with pytest.raises(RewardError, match=r"reward 'fault_broken' failed 2 times on prompt 'p[01]'"):
        trainer(tmp_path / "run", "fault_broken", "reward.retries=1").train()


# ---------------------------------------------------------------- config rejected before any work
@pytest.mark.parametrize("override, message", [
    ("method.window_every=0", "window_every must be >= 1"),
    ("method.noise_level=0", "noise_level must be > 0"),
    ("optim.lr=.nan", "optim.lr must be a finite number"),
    ("optim.betas=[0.9, 1.5]", "betas must be two numbers in"),
    ("optim.weight_decay=-1", "weight_decay must be >= 0"),
    ("reward.retries=-1", "reward.retries must be >= 0"),
    ("reward.weights={shapes: 0}", "must not all be 0"),
    ("train.max_seconds=-5", "max_seconds"),
    ("eval.grid_prompts=0", "grid_prompts must be >= 1"),
    ("method.k=0", "method.k must be >= 1"),
    ("optim.clip_range=-0.1", "clip_range must be > 0"),
    ("method.window=12", "does not fit"),
])
def test_bad_values_are_rejected_before_any_work(override, message, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", override, "--output-dir", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_branch_split_steps_must_fit_the_schedule():
    with pytest.raises(ConfigError, match="split_steps must lie in 0..8"):
        load_config(None, ["method.name=branch_grpo", "method.split_steps=[0, 9]"])


# ---------------------------------------------------------------- missing / malformed inputs: one line, exit 2
def _cli_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_missing_or_unreadable_model_weights(tmp_path, capsys):
    assert "no shapes-model checkpoint" in _cli_error(["train", "model.family=shapes", f"model.pretrained={tmp_path / 'nope'}", "--quiet"], capsys)
    from treegrpo.worlds.shapes_model import DEFAULT_WEIGHTS

    truncated = tmp_path / "truncated"
    shutil.copytree(DEFAULT_WEIGHTS, truncated)
    weights = truncated / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "cannot load the shapes model" in _cli_error(["train", "model.family=shapes", f"model.pretrained={truncated}", "--quiet"], capsys)


def test_model_weights_are_never_loaded_from_pickles(tmp_path, capsys):
    from treegrpo.worlds.shapes_model import DEFAULT_WEIGHTS, ShapesPolicy

    pickled = tmp_path / "pickled"
    shutil.copytree(DEFAULT_WEIGHTS, pickled)
    shutil.rmtree(pickled / "unet")
    ShapesPolicy.from_pretrained().unet.save_pretrained(pickled / "unet", safe_serialization=False)
    assert list((pickled / "unet").glob("*.bin")) and not list((pickled / "unet").glob("*.safetensors"))
    assert "cannot load the shapes model" in _cli_error(["eval", "--checkpoint", str(pickled), "--quiet"], capsys)


def test_missing_reward_weights(tmp_path, capsys):
    err = _cli_error(["train", "reward.weights={aesthetic: 1.0}", f"reward.options={{aesthetic: {{checkpoint: {tmp_path / 'head.pth'}}}}}",
                      "--output-dir", str(tmp_path / "run"), "--quiet"], capsys)
    assert "reward 'aesthetic'" in err


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "\n  \n", "holds no prompts"),
    ("bad.jsonl", '{"prompt": "a red circle"}\n{"prompt": \n', "bad.jsonl:2: not valid JSON"),
    ("bad.csv", "text\na red circle\n", "needs a header with a 'prompt' column"),
    ("binary.txt", b"\xff\xfe\x00junk", "is not UTF-8 text"),
    ("folder", None, "is a directory"),
    ("missing.txt", False, "does not exist"),
])
def test_empty_or_malformed_prompt_files(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not False:
        path.write_text(content)
    for key in ("train.prompts", "eval.prompts"):
        assert message in _cli_error(["train", f"{key}={path}", "--output-dir", str(tmp_path / "run"), "--quiet"], capsys)


# ---------------------------------------------------------------- disk full while checkpointing
def _enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def _in_temp_checkpoint(path, name: str) -> bool:
    path = Path(path)
    return path.name == name and path.parent.name.startswith(ckpt_module.TMP_PREFIX)


def _fail_writes(monkeypatch, at_calls: set[int], what: str = "weights"):
    """The disk fills up during the `at_calls`-th checkpoints (1-based), at one step of the write:
    `weights`, `optimizer`, `state`, `manifest` (each file cut short after a few bytes, as a full disk
    leaves it) or `rename` (the temporary directory renamed into place)."""
    calls = [0]

    def due() -> bool:
        calls[0] += 1
        return calls[0] in at_calls

    def cut_short(path) -> None:
        Path(path).write_bytes(b"\x00" * 7)

    if what == "weights":
        real_save_file = ckpt_module.save_file

        def save_file(tensors, filename, *args, **kwargs):
            if due():
                cut_short(filename)
                raise _enospc()
            return real_save_file(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(ckpt_module, "save_file", save_file)
    elif what == "optimizer":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if _in_temp_checkpoint(f, ckpt_module.OPTIMIZER) and due():
                cut_short(f)
                raise _enospc()
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    elif what == "state":
        real_write_text = Path.write_text

        def write_text(self, data, *args, **kwargs):
            if _in_temp_checkpoint(self, ckpt_module.STATE) and due():
                real_write_text(self, data[:7])
                raise _enospc()
            return real_write_text(self, data, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)
    elif what == "manifest":
        real_dump = json.dump

        def dump(obj, fp, *args, **kwargs):
            if _in_temp_checkpoint(getattr(fp, "name", ""), MANIFEST) and due():
                fp.write('{"iteration": ')
                raise _enospc()
            return real_dump(obj, fp, *args, **kwargs)

        monkeypatch.setattr(json, "dump", dump)
    elif what == "rename":
        real_rename = Path.rename

        def rename(self, target):
            if self.name.startswith(ckpt_module.TMP_PREFIX) and due():
                raise _enospc()
            return real_rename(self, target)

        monkeypatch.setattr(Path, "rename", rename)
    else:
        raise ValueError(what)


@pytest.mark.parametrize("what", ["weights", "optimizer", "state", "manifest", "rename"])
def test_a_failed_checkpoint_keeps_the_previous_one_warns_and_retries(tmp_path, monkeypatch, capsys, what):
    _fail_writes(monkeypatch, {2}, what)  # the checkpoint of iteration 2
    run = tmp_path / "run"
    summary = trainer(run, "fault_spread", "train.iterations=4", "train.keep_checkpoints=5").train()
    err = capsys.readouterr().err
    assert (f"could not write checkpoint {run / 'checkpoints' / 'iter_000002'} (No space left on device); the previous "
            "checkpoint iter_000001 stays valid; training goes on and retries at the next checkpoint") in err
    assert [c.name for c in checkpoint_dirs(run)] == ["iter_000001", "iter_000003", "iter_000004"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]  # no partial files left
    for c in checkpoint_dirs(run):
        verify_checkpoint(c)
    assert summary["checkpoint_failures"] == 1
    assert json.loads((run / "summary.json").read_text())["checkpoint_failures"] == 1
    # The run's result is intact: a 4-iteration run resumes from iter_000004 with nothing left to do.
    assert resume_checkpoint(run).name == "iter_000004"


@pytest.mark.parametrize("what", ["weights", "optimizer", "state", "manifest", "rename"])
def test_a_full_disk_at_any_file_leaves_the_previous_checkpoint_to_resume_from(tmp_path, monkeypatch, what):
    """Disk full at iteration 2's checkpoint, then the process dies: a resume starts from iteration 1."""
    _fail_writes(monkeypatch, {2}, what)
    run = tmp_path / "run"
    with pytest.raises(CheckpointWriteError, match="final checkpoint could not be written.*No space left on device.*"
                                                   "iter_000001 stays valid"):
        trainer(run, "fault_spread", "train.iterations=2").train()
    monkeypatch.undo()
    assert [c.name for c in checkpoint_dirs(run)] == ["iter_000001"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]  # no partial files left
    assert resume_checkpoint(run).name == "iter_000001"
    state, optimizer = load_state(run / "checkpoints" / "iter_000001")
    assert state["iteration"] == 1 and optimizer is not None
    summary = trainer(run, "fault_spread", "train.iterations=2").train()  # the same run, space freed: continues
    assert summary["iterations"] == 2 and resume_checkpoint(run).name == "iter_000002"


def test_a_failed_final_checkpoint_is_an_error(tmp_path, monkeypatch):
    _fail_writes(monkeypatch, {3})
    run = tmp_path / "run"
    with pytest.raises(CheckpointWriteError, match="final checkpoint could not be written.*iter_000002 stays valid"):
        trainer(run, "fault_spread").train()
    assert resume_checkpoint(run).name == "iter_000002"


def test_a_failed_final_checkpoint_exits_1_from_the_cli(tmp_path, monkeypatch, capsys):
    _fail_writes(monkeypatch, {1})
    run = tmp_path / "run"
    argv = ["train", *SHAPES_WORLD, "train.iterations=1", "train.prompts_per_iteration=1", "method.k=2", "method.window=2",
            "eval.num_seeds=1", "eval.grid_prompts=1", f"eval.prompts={_one_prompt(tmp_path)}", "log.trackers=[]",
            "--output-dir", str(run), "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "final checkpoint could not be written" in err and "No space left on device" in err and "Traceback" not in err


def _one_prompt(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle on a black background\n")
    return path


# ---------------------------------------------------------------- resume from damaged state
@pytest.fixture
def three(tmp_path):
    run = tmp_path / "run"
    trainer(run).train()  # keeps iter_000002 and iter_000003
    return run


def test_a_last_metrics_line_cut_short_is_dropped_on_resume(three):
    with (three / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 4, "wall_sec')  # killed mid-write
    trainer(three, "fault_spread", "train.iterations=5").train()
    assert [r["iteration"] for r in records(three)] == [0, 1, 2, 3, 4, 5]


def test_a_damaged_line_inside_metrics_is_an_error(three):
    lines = (three / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (three / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="metrics.jsonl:2 is not a metrics record"):
        trainer(three, "fault_spread", "train.iterations=5").train()


@pytest.mark.parametrize("damage, message", [
    ("truncate", "trainable.safetensors has .* bytes, the manifest says"),
    ("flip", "trainable.safetensors does not match its sha256"),
    ("manifest", "has no manifest.json"),
    ("state", "state.json is missing"),
])
def test_a_damaged_latest_checkpoint_is_refused_naming_the_valid_older_one(three, tmp_path, damage, message, capsys):
    last = three / "checkpoints" / "iter_000003"
    weights = last / "trainable.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-7])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
    elif damage == "manifest":
        (last / MANIFEST).unlink()
    else:
        (last / "state.json").unlink()
    with pytest.raises(CheckpointError, match=message) as err:
        trainer(three, "fault_spread", "train.iterations=5").train()
    assert "newest valid checkpoint is iter_000002" in str(err.value) and f"mv {last}" in str(err.value)
    # `sample` / `eval` verify a checkpoint too: one line, exit code 2. After moving it aside the run resumes.
    copy = shutil.copytree(last, tmp_path / "copied_checkpoint")
    assert re.search(message, _cli_error(["sample", "--checkpoint", str(copy), "--out", str(tmp_path / "s"), "--quiet"], capsys))
    last.rename(last.with_name("damaged_iter_000003"))
    trainer(three, "fault_spread", "train.iterations=4").train()
    assert [r["iteration"] for r in records(three)] == [0, 1, 2, 3, 4]


def test_stale_temp_dirs_are_ignored_and_removed(three):
    stale = three / "checkpoints" / ".tmp_iter_000004"
    stale.mkdir()
    (stale / "trainable.safetensors").write_bytes(b"half written")
    assert resume_checkpoint(three).name == "iter_000003"
    trainer(three, "fault_spread", "train.iterations=4").train()
    assert not stale.exists() and resume_checkpoint(three).name == "iter_000004"


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_malicious_pickle_in_optimizer_state_is_refused_and_not_run(three, tmp_path):
    marker = tmp_path / "pwned"
    last = three / "checkpoints" / "iter_000003"
    torch.save({"state": {}, "param_groups": [], "x": Evil(tmp_path / "control")}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)  # the payload is live: a plain unpickle runs it
    assert (tmp_path / "control").exists()
    torch.save({"state": {}, "param_groups": [], "x": Evil(marker)}, last / "optimizer.pt")
    # An attacker can rewrite the manifest too, so the sha256 check alone is no protection here.
    manifest = json.loads((last / MANIFEST).read_text())
    data = (last / "optimizer.pt").read_bytes()
    import hashlib

    manifest["files"]["optimizer.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (last / MANIFEST).write_text(json.dumps(manifest))
    verify_checkpoint(last)
    with pytest.raises(CheckpointError, match="not plain tensors"):
        load_state(last)
    with pytest.raises(CheckpointError, match="not plain tensors"):
        trainer(three, "fault_spread", "train.iterations=4").train()
    assert not marker.exists()


# ---------------------------------------------------------------- rerunning on an existing run directory
def test_a_run_directory_with_a_different_config_is_refused_not_mixed(three):
    with pytest.raises(ConfigError, match=r"different config \(optim.lr: 0.02 in the run, 0.05 now\).*--resume"):
        trainer(three, "fault_spread", "optim.lr=0.05").train()
    trainer(three, "fault_spread", "train.iterations=4").train()  # a longer run of the same config continues
    assert [r["iteration"] for r in records(three)] == [0, 1, 2, 3, 4]


def test_resume_refuses_overrides_that_change_the_training(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", *SHAPES_WORLD, "train.iterations=1", "train.prompts_per_iteration=1", "method.k=2", "method.window=2",
            "eval.num_seeds=1", "eval.grid_prompts=1", f"eval.prompts={_one_prompt(tmp_path)}", "log.trackers=[]",
            "--output-dir", str(run), "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    assert "method.k: 2 in the run, 3 now" in _cli_error(["train", "--resume", str(run), "method.k=3", "--quiet"], capsys)
    assert main(["train", "--resume", str(run), "train.iterations=2", "--quiet"]) == 0
    assert [r["iteration"] for r in records(run)] == [0, 1, 2]
    empty = tmp_path / "empty"
    shutil.copytree(run, empty)
    shutil.rmtree(empty / "checkpoints")
    assert "has no checkpoint yet" in _cli_error(["train", "--resume", str(empty), "--quiet"], capsys)


def test_a_resumed_run_may_move_to_another_device_but_not_change_its_training(tmp_path):
    from treegrpo.config import check_resume_config, load_config, save_config

    stored = tmp_path / "config.yaml"
    save_config(load_config(None, ["model.device=cpu"]), stored)
    check_resume_config(stored, load_config(None, ["model.device=cuda", "train.iterations=90"]))
    with pytest.raises(ConfigError, match="model.num_steps"):
        check_resume_config(stored, load_config(None, ["model.num_steps=8"]))
