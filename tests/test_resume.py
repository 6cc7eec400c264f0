"""Never lose a run: a run killed (SIGKILL) part-way through an iteration, or stopped by SIGTERM,
resumes to exactly the state of an uninterrupted run; one Ctrl-C finishes the iteration, checkpoints
and exits 130; a second Ctrl-C aborts at once.

Every run is a `treegrpo train` subprocess (tests/cli_child.py, one torch thread) on a tiny config;
the test-only `test_gate` reward holds iteration 4 until the test has killed or signalled it.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from treegrpo.checkpoint import checkpoint_dirs, verify_checkpoint
from treegrpo.worlds.shapes import SHAPES_WORLD

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "cli_child.py"


def tiny(prompts: Path) -> list[str]:
    return [*SHAPES_WORLD, "train.iterations=6", "train.prompts_per_iteration=2", "method.k=2", "method.window=2",
            "eval.num_seeds=1", "eval.every=2", "eval.grid_prompts=2", f"eval.prompts={prompts}",
            "train.checkpoint_every=1", "log.trackers=[]", "log.tree_every=0",
            "reward.weights={test_gate: 1.0}", "reward.eval=[shapes]", "--quiet"]


def start(args: list[str], log: Path, gate: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    env.pop("TREEGRPO_TEST_GATE", None)
    if gate is not None:
        gate.mkdir(parents=True, exist_ok=True)
        env["TREEGRPO_TEST_GATE"] = f"4:{gate}"
    return subprocess.Popen([sys.executable, str(CHILD), "train", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))


def wait_for(condition, what: str, proc: subprocess.Popen, limit: float = 120.0) -> None:
    """Poll until `condition()` (a generous limit only so a broken run cannot hang the suite)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def metrics(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Timing and the process's memory (memory/*: what this process happened to hold) may differ.
    return [{k: v for k, v in r.items() if k != "wall_seconds" and not k.startswith("memory/")} for r in records]


def assert_same_state(a: Path, b: Path) -> None:
    """Bitwise-equal trainable weights and optimiser state at iteration 6, equal metrics 0..6."""
    ca, cb = a / "checkpoints" / "iter_000006", b / "checkpoints" / "iter_000006"
    wa, wb = load_file(str(ca / "trainable.safetensors")), load_file(str(cb / "trainable.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "trainable weights differ"
    assert (ca / "ema.safetensors").is_file() == (cb / "ema.safetensors").is_file()
    if (ca / "ema.safetensors").is_file():  # optim.ema_decay > 0: the EMA resumes bitwise too
        ea, eb = load_file(str(ca / "ema.safetensors")), load_file(str(cb / "ema.safetensors"))
        assert ea.keys() == wa.keys() and all(torch.equal(ea[k], eb[k]) for k in ea), "EMA weights differ"
        assert any(not torch.equal(ea[k], wa[k]) for k in ea)  # an EMA, not a copy of the raw weights
    oa = torch.load(ca / "optimizer.pt", weights_only=True)
    ob = torch.load(cb / "optimizer.pt", weights_only=True)
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for key in oa["state"]:
        for name, value in oa["state"][key].items():
            assert torch.equal(value, ob["state"][key][name]), f"optimizer state {key}/{name} differs"
    ma, mb = metrics(a), metrics(b)
    assert [r["iteration"] for r in ma] == list(range(7))
    assert ma == mb


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    (d / "prompts.txt").write_text("a red circle on a black background\na blue square on a white background\n")
    return d


@pytest.fixture(scope="module")
def straight(workdir):
    run = workdir / "straight"
    proc = start([*tiny(workdir / "prompts.txt"), "--output-dir", str(run)], workdir / "straight.log")
    assert proc.wait(timeout=300) == 0, (workdir / "straight.log").read_text()
    return run


def test_sigkill_mid_iteration_then_resume_matches_an_uninterrupted_run(workdir, straight):
    run, gate, log = workdir / "killed", workdir / "gate_kill", workdir / "killed.log"
    proc = start([*tiny(workdir / "prompts.txt"), "--output-dir", str(run)], log, gate)
    wait_for(lambda: (gate / "blocked").exists(), "iteration 4's rewards", proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert [c.name for c in checkpoint_dirs(run)] == ["iter_000002", "iter_000003"]
    resumed = start(["--resume", str(run), "--quiet"], workdir / "resumed.log")
    assert resumed.wait(timeout=300) == 0, (workdir / "resumed.log").read_text()
    assert_same_state(straight, run)


@pytest.mark.parametrize("objective", ["policy_gradient", "flow_matching"])
def test_a_run_with_ema_resumed_after_sigkill_equals_an_uninterrupted_one(workdir, objective):
    # flow_matching with 2 minibatches: its (step, noise) draws come from the per-prompt streams and
    # its later minibatches use the rollout policy's stored velocity; both must resume exactly.
    extra = ["optim.objective=flow_matching", "optim.minibatches=2"] if objective == "flow_matching" else []
    args = ["optim.ema_decay=0.7", *extra, *tiny(workdir / "prompts.txt")]
    straight_ema = workdir / f"straight_ema_{objective}"
    proc = start([*args, "--output-dir", str(straight_ema)], workdir / "straight_ema.log")
    assert proc.wait(timeout=300) == 0, (workdir / "straight_ema.log").read_text()
    if objective == "flow_matching":
        assert "train/matching_loss" in metrics(straight_ema)[1]  # the objective really ran
    run, gate = workdir / f"killed_ema_{objective}", workdir / f"gate_kill_ema_{objective}"
    proc = start([*args, "--output-dir", str(run)], workdir / "killed_ema.log", gate)
    wait_for(lambda: (gate / "blocked").exists(), "iteration 4's rewards", proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    verify_checkpoint(checkpoint_dirs(run)[-1])  # the EMA file is in the manifest, so this checks it too
    assert "ema.safetensors" in json.loads((checkpoint_dirs(run)[-1] / "manifest.json").read_text())["files"]
    resumed = start(["--resume", str(run), "--quiet"], workdir / "resumed_ema.log")
    assert resumed.wait(timeout=300) == 0, (workdir / "resumed_ema.log").read_text()
    assert_same_state(straight_ema, run)


def test_sigterm_checkpoints_the_finished_iteration_and_the_same_command_resumes(workdir, straight):
    run, gate, log = workdir / "term", workdir / "gate_term", workdir / "term.log"
    args = [*tiny(workdir / "prompts.txt"), "--output-dir", str(run)]
    proc = start(args, log, gate)
    wait_for(lambda: (gate / "blocked").exists(), "iteration 4's rewards", proc)
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM received" in log.read_text(), "the first signal's message", proc)
    (gate / "release").touch()  # iteration 4 finishes, then the run stops
    assert proc.wait(timeout=120) == 143
    err = log.read_text()
    assert f"stopped by SIGTERM at iteration 4; resume with: treegrpo train --resume {run}" in err
    assert "Traceback" not in err
    assert checkpoint_dirs(run)[-1].name == "iter_000004"
    verify_checkpoint(checkpoint_dirs(run)[-1])
    again = start(args, workdir / "term2.log")  # the very same command continues the run
    assert again.wait(timeout=300) == 0, (workdir / "term2.log").read_text()
    assert_same_state(straight, run)


def test_a_single_ctrl_c_finishes_the_iteration_checkpoints_it_and_exits_130(workdir):
    run, gate, log = workdir / "ctrl_c", workdir / "gate_ctrl_c", workdir / "ctrl_c.log"
    proc = start([*tiny(workdir / "prompts.txt"), "--output-dir", str(run)], log, gate)
    wait_for(lambda: (gate / "blocked").exists(), "iteration 4's rewards", proc)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
    wait_for(lambda: "SIGINT received; finishing iteration 4, then checkpointing" in log.read_text(),
             "the first signal's message", proc)
    assert [c.name for c in checkpoint_dirs(run)] == ["iter_000002", "iter_000003"]  # iteration 4 still running
    (gate / "release").touch()
    assert proc.wait(timeout=120) == 130
    err = log.read_text()
    assert f"stopped by SIGINT at iteration 4; resume with: treegrpo train --resume {run}" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert checkpoint_dirs(run)[-1].name == "iter_000004"
    verify_checkpoint(checkpoint_dirs(run)[-1])
    state = json.loads((checkpoint_dirs(run)[-1] / "state.json").read_text())
    assert state["iteration"] == 4
    # Iteration 4 finished (its metrics line is written), and nothing after it started.
    assert [r["iteration"] for r in metrics(run)] == [0, 1, 2, 3, 4]


def test_a_second_ctrl_c_aborts_at_once_without_a_checkpoint(workdir):
    run, gate, log = workdir / "abort", workdir / "gate_abort", workdir / "abort.log"
    proc = start([*tiny(workdir / "prompts.txt"), "--output-dir", str(run)], log, gate)
    wait_for(lambda: (gate / "blocked").exists(), "iteration 4's rewards", proc)
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "SIGINT received" in log.read_text(), "the first signal's message", proc)
    proc.send_signal(signal.SIGINT)  # the gate never opens: only the abort can end this run
    assert proc.wait(timeout=60) == 130
    err = log.read_text()
    assert "aborted by a second SIGINT" in err and f"resume from iter_000003 with: treegrpo train --resume {run}" in err
    assert "Traceback" not in err
    assert checkpoint_dirs(run)[-1].name == "iter_000003"
