"""Methods as data: the rivals' fidelity details and TreeGRPO's window options (issue 13)."""

import math

import pytest
import torch

from treegrpo.bench import method_config
from treegrpo.config import ConfigError, MethodConfig, load_config
from treegrpo.methods import Method, drop_edges
from treegrpo.policies.analytic import GaussianPolicy
from treegrpo.rollout import SamplerConfig, rollout
from treegrpo.tree import TreeShape, WindowSchedule, trained_edges


def _dance_batch(steps=6, group=4, prompts=2, seed=0):
    method = Method(MethodConfig(name="dance_grpo", group_size=group, train_fraction=0.6), steps)
    shape = method.shape_for(0, torch.Generator().manual_seed(0))
    tree = rollout(GaussianPolicy(), [f"p{i}" for i in range(prompts)], shape, generator=torch.Generator().manual_seed(seed))
    # Mark every edge by (trajectory, step) so the selection can be checked edge by edge.
    marks = [None] + [torch.arange(tree.prompt[i].shape[0]).float() * 100 + (i - 1) for i in range(1, steps + 1)]
    batch = trained_edges(tree, marks)
    gens = [torch.Generator().manual_seed(10 + p) for p in range(prompts)]
    return method, tree, batch, method.select_trained(tree, batch, gens)


def test_dance_grpo_draws_its_trained_steps_per_trajectory():
    steps, group, prompts = 6, 4, 2
    method, tree, batch, picked = _dance_batch(steps, group, prompts)
    assert method.shape_for(1, torch.Generator()).trained_steps == tuple(range(steps - 1))  # any step may be picked
    count = round(0.6 * (steps - 1))
    trajectory, step = (picked.advantage // 100).long(), (picked.advantage % 100).round().long()
    sets = [tuple(sorted(step[trajectory == j].tolist())) for j in range(prompts * group)]
    assert all(len(s) == count and all(0 <= i < steps - 1 for i in s) for s in sets)
    assert len(set(sets)) > 1  # not one subset for the whole iteration
    # Each kept edge still leaves its own node: the node's step is the edge's step.
    assert torch.equal(picked.step[picked.edge_node], step)
    # Nodes without a kept edge are gone (the root stays only if some trajectory trains step 0).
    assert picked.num_edges == prompts * group * count
    assert picked.num_nodes == int(torch.unique(picked.edge_node).numel())
    roots = int((picked.step == 0).sum())
    assert roots == sum(any(0 in s for s in sets[p * group:(p + 1) * group]) for p in range(prompts))
    # A prompt's draws come from its own generator only.
    _, _, _, again = _dance_batch(steps, group, prompts)
    assert torch.equal(again.advantage, picked.advantage)


def test_dance_grpo_per_iteration_option_keeps_one_subset():
    method = Method(MethodConfig(name="dance_grpo", group_size=3, train_steps_per="iteration"), 10)
    shape = method.shape_for(0, torch.Generator().manual_seed(3))
    assert len(shape.trained_steps) == 5 and 9 not in shape.trained_steps
    tree = rollout(GaussianPolicy(), ["a"], TreeShape.dance_grpo(10, 3, shape.trained_steps), generator=torch.Generator().manual_seed(0))
    batch = trained_edges(tree, [None] + [torch.zeros(3)] * 10)
    assert method.select_trained(tree, batch, [torch.Generator()]) is batch


def test_an_explicit_trained_step_list_never_includes_the_last_step():
    with pytest.raises(ValueError, match="last step"):
        TreeShape.dance_grpo(10, 12, trained_steps=(0, 9))
    assert TreeShape.dance_grpo(10, 12, trained_steps=(0, 8)).trained_steps == (0, 8)


def test_drop_edges_keeps_nodes_with_edges_and_rejects_bad_masks():
    _, _, batch, _ = _dance_batch()
    keep = torch.zeros(batch.num_edges, dtype=torch.bool)
    keep[[0, 2, batch.num_edges - 1]] = True
    sub = drop_edges(batch, keep)
    assert sub.num_edges == 3 and sub.num_nodes == 2  # edges 0 and 2 leave the same root
    torch.testing.assert_close(sub.child, batch.child[keep])
    with pytest.raises(ValueError, match="keep must be"):
        drop_edges(batch, keep[:-1])


def test_mix_grpo_cycle_rolls_the_window_back_to_zero():
    cycle = WindowSchedule(num_starts=3, mode="cycle", every=2)
    assert [cycle.pick(i) for i in range(8)] == [0, 0, 1, 1, 2, 2, 0, 0]
    shift = WindowSchedule(num_starts=3, mode="shift", every=2)
    assert shift.pick(7) == 2
    config = load_config(method_config("mix_grpo"))
    assert config.method.window_mode == "cycle"
    method = Method(config.method, config.model.num_steps)
    last = config.model.num_steps - config.method.window - 1
    every = config.method.window_every
    starts = [method.shape_for(i, torch.Generator()).trained_steps[0] for i in (0, last * every, (last + 1) * every)]
    assert starts == [0, last, 0]


def test_window_max_start_truncates_the_law():
    method = Method(MethodConfig(window_max_start=3), 10)
    assert method.window is not None and method.window.num_starts == 4
    g = torch.Generator().manual_seed(0)
    starts = {method.shape_for(i, g).trained_steps[0] for i in range(400)}
    assert starts == {0, 1, 2, 3}
    with pytest.raises(ConfigError, match="window_max_start"):
        load_config(None, ["method.window_max_start=7"])
    with pytest.raises(ConfigError, match="window_max_start"):
        load_config(None, ["method.window_max_start=-2"])


def test_flow_grpo_config_uses_one_global_std_and_branch_grpo_an_unbiased_per_depth_std():
    flow = load_config(method_config("flow_grpo")).method
    assert flow.global_std and not flow.per_depth
    branch = load_config(method_config("branch_grpo")).method
    assert branch.per_depth and branch.unbiased_std
    rule = Method(branch, 10).advantage_rule
    assert rule.per_depth and rule.unbiased


def test_a_cps_last_step_stores_no_nan_log_probs():
    shape = TreeShape.flow_grpo(4, group_size=2)
    tree = rollout(GaussianPolicy(), ["a"], shape, sampler=SamplerConfig(sde_kind="cps", noise_level=0.5),
                   generator=torch.Generator().manual_seed(0))
    assert tree.log_prob[-1] is None  # the step into sigma = 0 has zero std: deterministic
    assert all(torch.isfinite(lp).all() for lp in tree.log_prob[1:-1])
    assert torch.isfinite(tree.leaves).all()
    batch = trained_edges(tree, [None] + [torch.ones(2)] * 4)
    assert torch.isfinite(batch.old_log_prob).all() and set(batch.step.tolist()) == {0, 1, 2}


def test_step_gains_are_the_log_prob_gradient_gain():
    policy = GaussianPolicy()
    schedule = policy.schedule(10)
    method = Method(MethodConfig(), 10)
    gains = method.step_gains(schedule)
    sigmas = schedule.sigmas
    for i in (0, 4, 8):  # |c_v| / std from the Flow-GRPO step formulas (SPEC.md section 2)
        s_now, s_next = float(sigmas[i]), float(sigmas[i + 1])
        den = float(sigmas[1]) if s_now >= 1 else s_now
        s = 0.7 * math.sqrt(s_now / (1 - den))
        dt = s_next - s_now
        c_v = (1 + s**2 * (1 - s_now) / (2 * s_now)) * dt
        assert float(gains[i]) == pytest.approx(abs(c_v) / (s * math.sqrt(-dt)), rel=1e-5)
    assert bool((gains[1:9] > gains[:8]).all())  # the gain grows towards the clean end
