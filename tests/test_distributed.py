"""Multi-process training: 2 processes on CPU (gloo) compute what 1 process doing all prompts does.

Launcher quirk (accelerate 1.15): `accelerate launch --cpu --num_processes 2` starts ONE process
(it expects MPI for multi-CPU); `--multi_gpu --num_processes 2` with model.device=cpu starts two
that talk over gloo. The tests use the latter, one torch thread per process.
FSDP: `--use_fsdp` with model.device=cpu; accelerate 1.15 does not shard on CPU, so the trainer
applies torch's FSDP2 `fully_shard` itself (see treegrpo.distributed.accelerate_without_fsdp).

Tolerance: the weights after an update agree to float rounding in the L2 sense (relative 1e-3);
element-wise, Adam's first step is ~lr * sign(grad), so a parameter whose gradient is at rounding
level can move differently; at most 0.01% of the entries may exceed 2e-5 (measured: 1 of 500k).
The movement itself is > 10x that tolerance, so a missing or wrong gradient sync fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from treegrpo.cli import main
from treegrpo.distributed import check_divisible, padded_shard, reduce_metrics, shard_slice
from treegrpo.config import ConfigError

EVAL_PROMPTS = ["a red circle on a black background", "a blue square on a white background",
                "a green triangle on a black background"]  # 3 prompts: uneven eval shards on 2 ranks


def _config(tmp: Path) -> Path:
    (tmp / "eval.txt").write_text("\n".join(EVAL_PROMPTS) + "\n")
    path = tmp / "tiny.yaml"
    # max_batch 2: several chunks per minibatch, so gradients accumulate under no_sync first;
    # global_std: the one advantage statistic that crosses ranks.
    path.write_text(f"""
model: {{family: shapes, num_steps: 4}}
method: {{k: 2, window: 2, global_std: true}}
reward: {{weights: {{shapes: 1.0}}, eval: [shapes, shape, color, background]}}
optim: {{lr: 2.0e-4, kl_coef: 0.5}}  # the settings its tolerances were set with
train: {{prompts: shapes, iterations: 2, prompts_per_iteration: 4, max_batch: 2, checkpoint_every: 1, keep_checkpoints: 5,
        progress: false}}
eval: {{prompts: {tmp / 'eval.txt'}, num_seeds: 1, every: 0, grid_prompts: 3}}
log: {{trackers: [], tree_every: 0}}
""")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], timeout: float = 240, fsdp: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    # FSDP: `--use_fsdp` (accelerate's defaults, FSDP1); on CPU the trainer shards with torch's fully_shard.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp" if fsdp else "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "treegrpo", "train", *args, "--quiet"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _weights(run: Path, iteration: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"iter_{iteration:06d}" / "trainable.safetensors"))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    config = _config(tmp)
    result = _launch([str(config), "--output-dir", str(tmp / "two")])
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, config, result


def test_two_processes_train_like_one_process_doing_all_prompts(two_procs):
    tmp, config, result = two_procs
    assert result.stdout.count("held-out evaluation") == 1  # only the main process reports
    torch.set_num_threads(1)
    assert main(["train", str(config), "train.iterations=1", "--output-dir", str(tmp / "one"), "--quiet"]) == 0
    from treegrpo.policies import load_policy

    base = {k: v.detach() for k, v in load_policy("shapes").unet.named_parameters()}
    one, two = _weights(tmp / "one", 1), _weights(tmp / "two", 1)
    assert set(one) == set(two)
    diff = torch.cat([(one[k] - two[k]).flatten() for k in one])
    moved = torch.cat([(one[k] - base[k]).flatten() for k in one])
    print(f"max |one - two| {float(diff.abs().max()):.2e}, relative L2 {float(diff.norm() / moved.norm()):.2e}, "
          f"entries > 2e-5: {int((diff.abs() > 2e-5).sum())} of {diff.numel()}, max move {float(moved.abs().max()):.2e}")
    assert float(moved.abs().max()) > 10 * 2e-5  # the update is large against the tolerance
    assert float(diff.norm() / moved.norm()) < 1e-3  # without the gradient sync this is ~1
    assert int((diff.abs() > 2e-5).sum()) <= 1e-4 * diff.numel()
    m1, m2 = _metrics(tmp / "one")[1], _metrics(tmp / "two")[1]
    for key in ["leaves", "window_start", "model_calls/rollout", "model_calls/train", "model_calls/total"]:
        assert m1[key] == m2[key], key
    for key in ["train/reward_mean", "train/shapes_std", "train/advantage_abs_mean", "train/grad_norm", "train/loss",
                "train/approx_kl"]:
        assert m1[key] == pytest.approx(m2[key], rel=1e-4, abs=1e-7), key
    # The start evaluation, sharded 2 + 1 prompts over the ranks and gathered, equals one process's.
    e1, e2 = _metrics(tmp / "one")[0], _metrics(tmp / "two")[0]
    assert {k for k in e1 if k.startswith("eval/")} == {k for k in e2 if k.startswith("eval/")} != set()
    for key in (k for k in e1 if k.startswith("eval/")):
        assert e1[key] == pytest.approx(e2[key], rel=1e-5), key
    assert m2["memory/peak_rss_mb"] > 50
    # Only the main process wrote: one metrics line per iteration, one grid per evaluation.
    assert [r["iteration"] for r in _metrics(tmp / "two")] == [0, 1, 2]
    assert sorted(p.name for p in (tmp / "two" / "samples").glob("*.png")) == ["iter_000002.png", "start.png",
                                                                             "start_vs_latest.png"]


def test_checkpoint_holds_every_ranks_rng_and_a_two_process_resume_continues_exactly(two_procs):
    tmp, config, _ = two_procs
    state = json.loads((tmp / "two" / "checkpoints" / "iter_000001" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["rng"][0]["torch"] != state["rng"][1]["torch"]  # each rank's own torch RNG
    assert state["rng"][0]["generator"] == state["rng"][1]["generator"]  # the shared generator
    assert state["window_schedule"]["schedule"]["mode"] == "random"
    assert state["window_schedule"]["last_start"] in (0, 1)
    run = tmp / "resumed"
    first = _launch([str(config), "train.iterations=1", "--output-dir", str(run)])
    assert first.returncode == 0, first.stderr[-3000:]
    second = _launch([str(config), "--output-dir", str(run)])  # same command, longer: resumes
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("resuming") == 1
    straight, resumed = _weights(tmp / "two", 2), _weights(run, 2)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-7, msg=key)
    skip = {"wall_seconds", "memory/peak_rss_mb", "memory/peak_rss_growth_mb", "memory/peak_rss_reset"}
    a, b = _metrics(tmp / "two")[2], _metrics(run)[2]
    assert {k: v for k, v in a.items() if k not in skip} == pytest.approx({k: v for k, v in b.items() if k not in skip},
                                                                          rel=1e-6, abs=1e-9)


def test_fsdp_on_two_cpu_processes_equals_ddp_and_resumes_its_sharded_optimiser_state(two_procs):
    """FSDP (torch's fully_shard over gloo: accelerate 1.15 does not shard on CPU) trains like DDP up to
    float rounding; its checkpoint holds the full AdamW state gathered from the shards, and a run
    resumed from it (re-sharded) ends where the uninterrupted FSDP run ends."""
    tmp, config, _ = two_procs
    fsdp = tmp / "fsdp"
    result = _launch([str(config), "--output-dir", str(fsdp)], fsdp=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "treegrpo applies torch's FSDP2 fully_shard" in result.stderr  # the sharded path ran, and says so
    for iteration in (1, 2):
        ddp, sharded = _weights(tmp / "two", iteration), _weights(fsdp, iteration)
        assert set(ddp) == set(sharded)
        for key in ddp:
            torch.testing.assert_close(sharded[key], ddp[key], rtol=0, atol=2e-6, msg=key)
        state = json.loads((fsdp / "checkpoints" / f"iter_{iteration:06d}" / "state.json").read_text())
        assert state["world_size"] == 2
    # The optimiser state: gathered from both shards into full tensors keyed by parameter name, the
    # same moments as DDP's (keyed by index, in parameter order).
    full = torch.load(fsdp / "checkpoints" / "iter_000001" / "optimizer.pt", weights_only=True)
    plain = torch.load(tmp / "two" / "checkpoints" / "iter_000001" / "optimizer.pt", weights_only=True)
    names = list(_weights(tmp / "two", 1))
    assert set(full["state"]) == set(names) and len(plain["state"]) == len(names)
    from treegrpo.policies import load_policy

    order = [n for n, p in load_policy("shapes").unet.named_parameters() if p.requires_grad]
    for index, name in enumerate(order):
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(full["state"][name][moment], plain["state"][index][moment], rtol=1e-4,
                                       atol=1e-9, msg=f"{name} {moment}")
        assert float(full["state"][name]["step"]) == float(plain["state"][index]["step"]) > 0
    # Interrupted after iteration 1 (its checkpoint, iteration 2's removed), resumed by the same command.
    resumed = tmp / "fsdp_resumed"
    shutil.copytree(fsdp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "iter_000002")
    again = _launch([str(config), "--output-dir", str(resumed)], fsdp=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("resuming") == 1
    straight, after = _weights(fsdp, 2), _weights(resumed, 2)
    for key in straight:
        torch.testing.assert_close(after[key], straight[key], rtol=0, atol=1e-7, msg=key)
    a = torch.load(fsdp / "checkpoints" / "iter_000002" / "optimizer.pt", weights_only=True)["state"]
    b = torch.load(resumed / "checkpoints" / "iter_000002" / "optimizer.pt", weights_only=True)["state"]
    for name in a:
        for moment in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(b[name][moment], a[name][moment], rtol=0, atol=1e-9, msg=f"{name} {moment}")


def test_prompts_must_divide_among_the_processes(two_procs):
    tmp, config, _ = two_procs
    result = _launch([str(config), "train.prompts_per_iteration=3", "--output-dir", str(tmp / "bad")], timeout=120)
    assert result.returncode != 0
    assert "train.prompts_per_iteration=3 is not divisible by the 2 processes" in result.stderr
    # One line per process; the only traceback is the launcher's own report of the exit code.
    assert not any(f"treegrpo/{m}.py" in result.stderr for m in ("cli", "trainer", "distributed", "config"))
    assert not (tmp / "bad" / "checkpoints").exists()


# ---- the helpers, without processes


class FakeAccelerator:
    """Stands in for two ranks: `gather` returns preset rows (rank 0 = the caller's)."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        return torch.cat([values, self.other.to(values.dtype).unsqueeze(0)])


def test_metrics_combine_like_one_process():
    x0, x1 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0])
    rank = lambda x, calls, rmin: {"leaves": float(len(x)), "train/r_mean": float(x.mean()),  # noqa: E731
                                    "train/r_std": float(x.std(unbiased=False)), "train/ratio_min": rmin,
                                    "model_calls/train": calls}
    r0, r1 = rank(x0, 5.0, 0.9), rank(x1, 7.0, 0.8)
    weights0 = {"train/r_mean": 3.0, "train/r_std": 3.0}
    other = torch.stack([torch.tensor(list(r1.values()), dtype=torch.float64),
                         torch.tensor([1.0, 2.0, 2.0, 1.0, 1.0], dtype=torch.float64)])
    out = reduce_metrics(FakeAccelerator(other), r0, weights0)
    both = torch.cat([x0, x1])
    assert out["leaves"] == 5 and out["model_calls/train"] == 12 and out["train/ratio_min"] == 0.8
    assert out["train/r_mean"] == pytest.approx(float(both.mean()))
    assert out["train/r_std"] == pytest.approx(float(both.std(unbiased=False)))


def test_shards_cover_everything_once_and_pad_to_equal_sizes():
    parts = [list(range(7))[shard_slice(7, r, 3)] for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert padded_shard(list(range(7)), 1, 3) == ([3, 4, 4], 2)
    assert padded_shard(["a"], 1, 2) == (["a"], 0)
    check_divisible(8, 4)
    with pytest.raises(ConfigError, match="not divisible by the 3 processes.*e.g. 6 or 9"):
        check_divisible(8, 3)


def test_two_processes_train_a_diffusers_lora_like_one_process(tmp_path):
    """The diffusers policies forward through the DDP wrapper (use_wrapped_module): LoRA on a tiny
    random SD3 pipeline, 2 processes vs 1 after one iteration, and the LoRA export written once."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiny_clip import save_tiny_clip
    from tiny_pipelines import tiny_sd3

    tiny_sd3().save_pretrained(tmp_path / "pipe")
    save_tiny_clip(tmp_path / "clip")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\na green tree\na small house\n")
    config = tmp_path / "sd3.yaml"
    # max_batch 3: several chunks per minibatch, so gradients accumulate under no_sync first.
    config.write_text(f"""
model: {{family: auto, pretrained: {tmp_path / 'pipe'}, resolution: 32, num_steps: 4, guidance_scale: 4.5,
        lora_rank: 2, lora_alpha: 2}}
method: {{k: 2, window: 2}}
reward: {{weights: {{clipscore: 1.0}}, eval: [clipscore], options: {{clipscore: {{model: {tmp_path / 'clip'}}}}}}}
optim: {{lr: 1.0e-2, clip_range: 0.2, kl_coef: 0.1}}
train: {{prompts: {prompts}, iterations: 1, prompts_per_iteration: 4, max_batch: 3, progress: false}}
eval: {{prompts: {prompts}, num_seeds: 1, every: 0, grid_prompts: 2}}
log: {{trackers: [], tree_every: 0}}
""")
    result = _launch([str(config), "--output-dir", str(tmp_path / "two")])
    assert result.returncode == 0, result.stderr[-3000:]
    torch.set_num_threads(1)
    assert main(["train", str(config), "--output-dir", str(tmp_path / "one"), "--quiet"]) == 0
    one, two = _weights(tmp_path / "one", 1), _weights(tmp_path / "two", 1)
    assert set(one) == set(two) and all("lora" in k for k in one)
    from treegrpo.config import load_config
    from treegrpo.policies import build_policy

    torch.manual_seed(0)  # the trainer's seed before it builds the policy: the same LoRA init
    start = {k: v.detach() for k, v in build_policy(load_config(config).model).trainable_module().named_parameters()
             if v.requires_grad}
    diff = torch.cat([(one[k] - two[k]).flatten() for k in one])
    moved = torch.cat([(one[k] - start[k]).flatten() for k in one])
    print(f"max |one - two| {float(diff.abs().max()):.2e}, relative L2 {float(diff.norm() / moved.norm()):.2e}")
    assert float(moved.abs().max()) > 1e-3  # a real step (lr 1e-2)
    assert float(diff.norm() / moved.norm()) < 1e-3  # without the gradient sync this is ~1
    assert (tmp_path / "two" / "lora").is_dir() and not list((tmp_path / "two").glob(".tmp*"))
    # Two processes really ran: the checkpoint holds two ranks' RNG states, each rank's own torch stream.
    state = json.loads((tmp_path / "two" / "checkpoints" / "iter_000001" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["rng"][0]["torch"] != state["rng"][1]["torch"]
    assert json.loads((tmp_path / "one" / "checkpoints" / "iter_000001" / "state.json").read_text())["world_size"] == 1


def test_two_processes_train_the_flow_matching_objective_like_one_process(two_procs):
    """optim.objective=flow_matching: per-prompt (step, noise) draws and minibatches, so the ranks'
    averaged gradient equals the one-process gradient over all prompts (2 minibatches: the second
    uses the rollout policy's stored velocity)."""
    tmp, config, _ = two_procs
    args = [str(config), "train.iterations=1", "optim.objective=flow_matching", "optim.minibatches=2", "optim.kl_coef=0"]
    result = _launch([*args, "--output-dir", str(tmp / "two_fm")])
    assert result.returncode == 0, result.stderr[-3000:]
    torch.set_num_threads(1)
    assert main(["train", *args, "--output-dir", str(tmp / "one_fm"), "--quiet"]) == 0
    from treegrpo.policies import load_policy

    base = {k: v.detach() for k, v in load_policy("shapes").unet.named_parameters()}
    one, two = _weights(tmp / "one_fm", 1), _weights(tmp / "two_fm", 1)
    diff = torch.cat([(one[k] - two[k]).flatten() for k in one])
    moved = torch.cat([(one[k] - base[k]).flatten() for k in one])
    print(f"relative L2 {float(diff.norm() / moved.norm()):.2e}, max move {float(moved.abs().max()):.2e}")
    assert float(moved.abs().max()) > 10 * 2e-5
    assert float(diff.norm() / moved.norm()) < 1e-3
    m1, m2 = _metrics(tmp / "one_fm")[1], _metrics(tmp / "two_fm")[1]
    assert m1["model_calls/train"] == m2["model_calls/train"] > 0
    for key in ["train/reward_mean", "train/matching_loss", "train/grad_norm"]:
        assert m1[key] == pytest.approx(m2[key], rel=1e-4, abs=1e-7), key
