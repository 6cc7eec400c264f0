"""EMA of the trainable weights (`optim.ema_decay`): the update rule, one update per optimiser step,
and evaluation / export / `--checkpoint RUN_DIR` on the EMA while training goes on with the raw weights.

Training runs use the analytic Gaussian policy (one parameter, `gain`) and a reward on the spread
of its samples, so a few iterations move the gain visibly and take a second.
"""

import pytest
import torch
from safetensors.torch import load_file

from treegrpo.checkpoint import EMA_WEIGHTS, WEIGHTS, latest_checkpoint
from treegrpo.config import load_config
from treegrpo.ema import EMA
from treegrpo.evaluation import evaluate
from treegrpo.policies.analytic import GaussianPolicy
from treegrpo.rewards.base import _REGISTRY, register_reward
from treegrpo.trainer import Trainer


class _Spread:
    def __call__(self, images, prompts):
        return images.flatten(1).std(dim=1)


if "test_ema_spread" not in _REGISTRY:
    register_reward("test_ema_spread")(_Spread)


def test_ema_math_matches_a_hand_computation():
    a = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    b = torch.nn.Parameter(torch.tensor([[0.5]], dtype=torch.bfloat16))
    ema = EMA({"a": a, "b": b}, decay=0.75)
    history_a, history_b = [[1.0, -2.0]], [0.5]
    for step in range(3):
        with torch.no_grad():
            a.add_(torch.tensor([0.5, 1.0]) * (step + 1))
            b.mul_(2)
        history_a.append(a.tolist())
        history_b.append(float(b.detach()))
        ema.update()
    # ema_0 = theta_0; ema_t = 0.75 ema_{t-1} + 0.25 theta_t, in exact arithmetic (float64 here)
    expect_a, expect_b = history_a[0], history_b[0]
    for theta_a, theta_b in zip(history_a[1:], history_b[1:]):
        expect_a = [0.75 * e + 0.25 * t for e, t in zip(expect_a, theta_a)]
        expect_b = 0.75 * expect_b + 0.25 * theta_b
    assert torch.allclose(ema.shadow["a"], torch.tensor(expect_a), rtol=0, atol=1e-6)
    assert ema.shadow["b"].dtype == torch.float32  # kept in fp32, not in the parameter's bf16
    assert abs(float(ema.shadow["b"]) - expect_b) < 1e-6
    raw_a, raw_b = a.detach().clone(), b.detach().clone()
    with ema.applied():
        assert torch.equal(a.detach(), ema.shadow["a"])
        assert torch.equal(b.detach(), ema.shadow["b"].to(torch.bfloat16))
    assert torch.equal(a.detach(), raw_a) and torch.equal(b.detach(), raw_b)  # raw weights back, bit for bit


def test_ema_refuses_a_bad_decay_and_a_mismatched_state():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        EMA({"p": p}, decay=1.0)
    with pytest.raises(ValueError, match="missing"):
        EMA({"p": p}, decay=0.5).load_state_dict({"q": torch.zeros(2)})


def _train(tmp_path, decay: float, extra: tuple[str, ...] = ()) -> tuple[Trainer, GaussianPolicy, list[float], dict]:
    config = load_config(None, [
        "method.window=2", "method.k=3", "reward.weights={test_ema_spread: 1.0}", "reward.eval=[test_ema_spread]",
        "optim.lr=0.05", "optim.kl_coef=0", "optim.clip_range=0.2", "optim.minibatches=2", "train.iterations=3",
        "train.prompts_per_iteration=4", "train.progress=false", "eval.every=0", "eval.num_seeds=2",
        "eval.grid_prompts=2", "train.checkpoint_every=0", "model.family=analytic", "log.trackers=[]",
        f"optim.ema_decay={decay}", *extra])
    policy = GaussianPolicy(data_std=0.5, latent_shape=(1, 4, 4))
    trainer = Trainer(config, tmp_path / f"run_{decay}", policy=policy, train_prompts=["p0", "p1", "p2", "p3"])
    gains: list[float] = [float(policy.gain.detach())]  # the raw gain after every optimiser step
    trainer.optimizer.optimizer.register_step_post_hook(lambda *_: gains.append(float(policy.gain.detach())))
    summary = trainer.train()
    return trainer, policy, gains, summary


def test_training_updates_the_ema_after_every_optimizer_step_and_checkpoints_both(tmp_path):
    trainer, policy, gains, _ = _train(tmp_path, decay=0.6)
    assert len(gains) == 1 + 3 * 2  # 3 iterations x 2 minibatches
    expect = gains[0]
    for g in gains[1:]:
        expect = 0.6 * expect + 0.4 * g
    assert abs(float(trainer.ema.shadow["gain"]) - expect) < 1e-6
    assert abs(expect - gains[-1]) > 1e-3  # the EMA lags the raw weights, so the check above can fail
    ckpt = latest_checkpoint(trainer.out)
    assert torch.equal(load_file(str(ckpt / EMA_WEIGHTS))["gain"], trainer.ema.shadow["gain"])
    assert float(load_file(str(ckpt / WEIGHTS))["gain"]) == gains[-1]  # resume trains on the raw weights
    assert float(policy.gain.detach()) == gains[-1]  # the final evaluation put the raw weights back


def test_evaluation_and_checkpoint_runs_use_the_ema_weights(tmp_path):
    trainer, policy, gains, summary = _train(tmp_path, decay=0.5)
    ema_gain, raw_gain = float(trainer.ema.shadow["gain"]), gains[-1]
    prompts, seeds = trainer.eval_prompts, trainer.eval_seeds
    rewards = {"test_ema_spread": _Spread()}

    def eval_at(gain: float) -> float:
        probe = GaussianPolicy(data_std=0.5, latent_shape=(1, 4, 4))
        with torch.no_grad():
            probe.gain.fill_(gain)
        return evaluate(probe, prompts, seeds, rewards, 10)[0]["reward/test_ema_spread"]

    assert summary["final"]["reward/test_ema_spread"] == eval_at(ema_gain)
    assert abs(eval_at(raw_gain) - eval_at(ema_gain)) > 1e-4  # so the equality above can fail
    from treegrpo.cli import _resolve_policy  # what `treegrpo sample/eval --checkpoint RUN_DIR` loads

    loaded, _ = _resolve_policy(str(trainer.out))
    assert float(loaded.gain.detach()) == ema_gain


def test_a_decay_close_to_one_evaluates_the_base_model(tmp_path):
    _, _, gains, slow = _train(tmp_path, decay=1 - 1e-7)
    assert abs(gains[-1] - gains[0]) > 0.01  # the raw weights moved
    base, final = slow["base"]["reward/test_ema_spread"], slow["final"]["reward/test_ema_spread"]
    assert abs(final - base) < 1e-5
    _, _, _, plain = _train(tmp_path, decay=0.0)
    assert abs(plain["final"]["reward/test_ema_spread"] - plain["base"]["reward/test_ema_spread"]) > 1e-3
