"""The whole loop (rollout -> rewards -> advantages -> clipped update) moves a policy the right way.

The analytic Gaussian policy has one parameter, a gain on its exact velocity, and the spread of its
samples depends on the gain. The test measures which way the reward rises (sampling at gains 0.9
and 1.1), then checks that training through the real `Trainer` moves the gain that way, for each
method of the engine and for a reward and its opposite.
"""

import json
import pytest
import torch

from treegrpo.config import load_config
from treegrpo.policies.analytic import GaussianPolicy
from treegrpo.rewards.base import _REGISTRY, register_reward
from treegrpo.trainer import Trainer


class Spread:
    def __init__(self, sign: float = 1.0) -> None:
        self.sign = sign

    def __call__(self, images, prompts):
        return self.sign * images.flatten(1).std(dim=1)


for name, sign in (("test_spread", 1.0), ("test_narrow", -1.0)):
    if name not in _REGISTRY:
        register_reward(name)(lambda sign=sign: Spread(sign))
if "test_mean_x1000" not in _REGISTRY:  # a second reward on a scale 1000x larger
    register_reward("test_mean_x1000")(lambda: (lambda images, prompts: 1000 * images.flatten(1).mean(dim=1)))


def _better_direction(reward_name: str) -> float:
    from treegrpo.evaluation import ode_sample

    scores = []
    for gain in (0.9, 1.1):
        policy = GaussianPolicy(data_std=0.5, latent_shape=(1, 4, 4))
        with torch.no_grad():
            policy.gain.fill_(gain)
        images = ode_sample(policy, ["p"], list(range(200)), num_steps=10)
        scores.append(float(_REGISTRY[reward_name]()(images, ["p"] * 200).mean()))
    assert abs(scores[1] - scores[0]) > 1e-3
    return 1.0 if scores[1] > scores[0] else -1.0


@pytest.mark.parametrize("method", ["treegrpo", "flow_grpo", "dance_grpo", "mix_grpo", "branch_grpo"])
@pytest.mark.parametrize("reward", ["test_spread", "test_narrow"])
def test_the_update_follows_the_reward(tmp_path, method, reward):
    direction = _better_direction(reward)
    config = load_config(None, [
        f"method.name={method}", "method.group_size=6", "method.window=2", "method.k=3",
        f"reward.weights={{{reward}: 1.0}}", f"reward.eval=[{reward}]", "optim.lr=0.02", "optim.kl_coef=0",
        "optim.clip_range=0.2", "train.iterations=6", "train.prompts_per_iteration=4", "train.progress=false",
        "eval.every=0", "eval.num_seeds=1", "eval.grid_prompts=2", "train.checkpoint_every=0", "model.family=analytic",
    ])
    policy = GaussianPolicy(data_std=0.5, latent_shape=(1, 4, 4))
    Trainer(config, tmp_path / "run", policy=policy, train_prompts=["p0", "p1", "p2", "p3"]).train()
    moved = float(policy.gain.detach()) - 1.0
    assert moved * direction > 0.01, f"{method} moved the gain by {moved:+.4f} for {reward}"


FIXES = {
    "parent": ["method.edge_baseline=parent"],
    "level_gain": ["optim.step_weight=level_gain"],
    "floor_kl_edge": ["method.std_floor=0.05", "optim.kl_per_edge=true", "optim.kl_coef=0.1"],
    "dance_per_iteration": ["method.name=dance_grpo", "method.train_steps_per=iteration"],
}


@pytest.mark.parametrize("fix", sorted(FIXES))
def test_the_fixes_still_follow_the_reward_and_change_the_update(tmp_path, fix):
    direction = _better_direction("test_spread")
    common = ["method.group_size=6", "method.window=2", "method.k=3", "reward.weights={test_spread: 1.0}",
              "reward.eval=[test_spread]", "optim.lr=0.02", "optim.kl_coef=0", "optim.clip_range=0.2",
              "train.iterations=6", "train.prompts_per_iteration=4", "train.progress=false", "eval.every=0",
              "eval.num_seeds=1", "eval.grid_prompts=2", "train.checkpoint_every=0", "model.family=analytic"]
    moved = {}
    for name, extra in (("plain", [o for o in FIXES[fix] if o.startswith("method.name")]), (fix, FIXES[fix])):
        policy = GaussianPolicy(data_std=0.5, latent_shape=(1, 4, 4))
        Trainer(load_config(None, [*common, *extra]), tmp_path / name, policy=policy,
                train_prompts=["p0", "p1", "p2", "p3"]).train()
        moved[name] = float(policy.gain.detach()) - 1.0
    assert moved[fix] * direction > 0.01, f"{fix} moved the gain by {moved[fix]:+.4f}"
    assert moved[fix] != moved["plain"]  # the option reaches the update


@pytest.mark.parametrize("objective", ["flow_matching", "both"])
@pytest.mark.parametrize("reward", ["test_spread", "test_narrow"])
def test_the_flow_matching_objective_follows_the_reward(tmp_path, reward, objective):
    """optim.objective=flow_matching (DiffusionNFT's loss on TreeGRPO's leaves) moves the gain the
    way the reward rises, as the policy gradient does; objective both takes both steps."""
    direction = _better_direction(reward)
    config = load_config(None, [
        "method.name=treegrpo", "method.window=2", "method.k=3", f"optim.objective={objective}",
        f"reward.weights={{{reward}: 1.0}}", f"reward.eval=[{reward}]", "optim.lr=0.02", "optim.kl_coef=0",
        "train.iterations=6", "train.prompts_per_iteration=4", "train.progress=false",
        "eval.every=0", "eval.num_seeds=1", "eval.grid_prompts=2", "train.checkpoint_every=0", "model.family=analytic",
    ])
    policy = GaussianPolicy(data_std=0.5, latent_shape=(1, 4, 4))
    Trainer(config, tmp_path / "run", policy=policy, train_prompts=["p0", "p1", "p2", "p3"]).train()
    moved = float(policy.gain.detach()) - 1.0
    assert moved * direction > 0.01, f"flow matching moved the gain by {moved:+.4f} for {reward}"
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    assert "train/matching_loss" in first
    if objective == "both":  # the policy gradient's step ran too, and each step's norm is logged
        assert first["train/grad_norm"] > 0 and first["train/matching_grad_norm"] > 0 and "train/ratio_max" in first


def _spy_matching_advantages(monkeypatch):
    """Records the trainer's `leaf_advantages` calls (args, kwargs, output) and what matching_weights receives."""
    import treegrpo.trainer as trainer_module

    calls: list[tuple[tuple, dict, torch.Tensor]] = []
    received: list[torch.Tensor] = []
    real_leaf, real_weights = trainer_module.leaf_advantages, trainer_module.matching_weights

    def spy_leaf(*args, **kwargs):
        out = real_leaf(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    def spy_weights(advantage, group, mask=None):
        received.append(advantage)
        return real_weights(advantage, group, mask)

    monkeypatch.setattr(trainer_module, "leaf_advantages", spy_leaf)
    monkeypatch.setattr(trainer_module, "matching_weights", spy_weights)
    return calls, received


def _one_matching_iteration(tmp_path, *overrides):
    config = load_config(None, [
        "method.name=treegrpo", "method.window=2", "method.k=3", "optim.objective=flow_matching",
        "train.iterations=1", "train.prompts_per_iteration=4", "train.progress=false",
        "eval.every=0", "train.checkpoint_every=0", "model.family=analytic", *overrides])
    Trainer(config, tmp_path / "run", policy=GaussianPolicy(data_std=0.5, latent_shape=(1, 4, 4)),
            train_prompts=["p0", "p1", "p2", "p3"]).train()


def test_the_flow_matching_objective_standardises_leaves_by_the_method_s_leaf_rule(tmp_path, monkeypatch):
    """method.std_floor / unbiased_std / global_std reach the flow-matching step's leaf advantages
    (they were once ignored there): the advantages matching_weights receives are those of the rule."""
    calls, received = _spy_matching_advantages(monkeypatch)
    _one_matching_iteration(tmp_path, "reward.weights={test_spread: 1.0}", "reward.eval=[test_spread]",
                            "method.std_floor=1000", "method.unbiased_std=true")
    assert len(received) == 1 and len(calls) == 1
    _, kwargs, out = calls[0]
    assert kwargs["std_floor"] == 1000 and kwargs["unbiased"] and not kwargs["global_std"]
    assert received[0] is out
    assert 0 < float(out.abs().max()) < 0.01  # reward units / 1000: the floor, not unit std


def test_the_flow_matching_objective_combines_several_rewards_as_the_policy_gradient_does(tmp_path, monkeypatch):
    """reward.weights mean the same for both objectives: each reward standardised per prompt, then
    weighted (`combine_rewards`), so a reward on a 1000x larger scale does not drown the other
    (the flow-matching step once trained on the raw weighted sum)."""
    from treegrpo.advantages import normalize_by_group

    calls, received = _spy_matching_advantages(monkeypatch)
    _one_matching_iteration(tmp_path, "reward.weights={test_spread: 1.0, test_mean_x1000: 1.0}",
                            "reward.eval=[test_spread]")
    (scores, weights, group), kwargs, out = calls[0]
    assert received[0] is out and dict(weights) == {"test_spread": 1.0, "test_mean_x1000": 1.0}
    a, b = scores["test_spread"], scores["test_mean_x1000"]
    expected = normalize_by_group(normalize_by_group(a, group) + normalize_by_group(b, group), group, eps=1e-4)
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=0)  # (the combined sum is standardised twice: eps apart)
    raw_sum = normalize_by_group(a + b, group, eps=1e-4)  # what the raw sum would have trained
    assert not torch.allclose(out, raw_sum, atol=0.05)


@pytest.mark.parametrize("steps", ["all", "stochastic"])
def test_matching_steps_stochastic_draws_only_the_rollout_s_stochastic_steps(tmp_path, monkeypatch, steps):
    """optim.matching_steps=stochastic: the flow-matching draws' noise levels are those of the
    steps where the tree branched (TreeGRPO's window, here steps 3 and 4 of 10); "all" draws every
    step (16 draws landing only on those two by chance: 0.2^16; seeded, so the test is exact)."""
    from treegrpo.trainer import Trainer as TrainerClass

    seen: list[torch.Tensor] = []
    real = TrainerClass._velocity

    def spy(self, policy, x, times, *rest):
        seen.append(torch.as_tensor(times).flatten())
        return real(self, policy, x, times, *rest)

    monkeypatch.setattr(TrainerClass, "_velocity", spy)
    _one_matching_iteration(tmp_path, "reward.weights={test_spread: 1.0}", "reward.eval=[test_spread]",
                            "method.window_mode=fixed", "method.window_start=3", "model.num_steps=10",
                            f"optim.matching_steps={steps}")
    drawn = set(torch.cat(seen).tolist())
    config = load_config(None, ["model.family=analytic", "model.num_steps=10"])
    times = Trainer(config, tmp_path / "probe", policy=GaussianPolicy(data_std=0.5, latent_shape=(1, 4, 4)),
                    train_prompts=["p0"]).schedule.times
    window = {float(times[3]), float(times[4])}
    assert drawn == window if steps == "stochastic" else not drawn <= window
