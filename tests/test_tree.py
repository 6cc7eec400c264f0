import pytest
import torch

from treegrpo.policies.analytic import GaussianPolicy
from treegrpo.rollout import SamplerConfig, rollout
from treegrpo.tree import TreeShape, WindowSchedule, dance_trained_steps, trained_edges


def test_treegrpo_accounting_matches_the_spec():
    at0 = TreeShape.treegrpo(num_steps=10, k=3, w=3, start=0)
    assert (at0.num_leaves, at0.num_trained_nodes, at0.num_trained_edges) == (27, 13, 39)
    assert at0.num_model_calls == 202
    assert TreeShape.treegrpo(num_steps=10, k=3, w=3, start=3).num_model_calls == 124
    assert TreeShape.flow_grpo(10, group_size=27).num_model_calls * 27 == 270  # 27 chains of 10 steps, per root


def test_general_accounting_formulas():
    for k, w, start, steps in [(2, 3, 1, 10), (4, 2, 5, 10), (3, 4, 0, 12)]:
        shape = TreeShape.treegrpo(steps, k, w, start)
        assert shape.num_leaves == k**w
        assert shape.num_trained_nodes == (k**w - 1) // (k - 1)
        assert shape.num_trained_edges == k * (k**w - 1) // (k - 1)
        assert shape.num_model_calls == start + (k**w - 1) // (k - 1) + k**w * (steps - start - w)


PRESETS = {
    "treegrpo": TreeShape.treegrpo(6, k=3, w=2, start=1),
    "two_trees": TreeShape.treegrpo(6, k=2, w=2, start=0, trees_per_prompt=2),
    "flow_grpo": TreeShape.flow_grpo(6, group_size=4),
    "dance_grpo": TreeShape.dance_grpo(6, group_size=5, trained_steps=(0, 2, 3)),
    "mix_grpo": TreeShape.mix_grpo(6, group_size=4, window=3, start=2),
    "branch_grpo": TreeShape.branch_grpo(6, split_steps=(0, 2, 4), k=2),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_rollout_counts_the_calls_the_shape_predicts(name):
    shape = PRESETS[name]
    policy = GaussianPolicy()
    tree = rollout(policy, ["a", "b", "c"], shape, generator=torch.Generator().manual_seed(0), max_batch=7)
    expected = 3 * shape.roots_per_prompt * shape.num_model_calls
    assert tree.num_model_calls == expected == policy.calls
    assert tree.leaves.shape[0] == 3 * shape.roots_per_prompt * shape.num_leaves
    edges = trained_edges(tree, [torch.zeros(p.shape[0]) for p in tree.prompt])
    assert edges.num_nodes == 3 * shape.roots_per_prompt * shape.num_trained_nodes
    assert edges.num_edges == 3 * shape.roots_per_prompt * shape.num_trained_edges


def test_rollout_is_deterministic_and_independent_of_the_chunk_size():
    shape = TreeShape.treegrpo(6, k=3, w=2, start=1)
    a = rollout(GaussianPolicy(), ["p", "q"], shape, generator=torch.Generator().manual_seed(5), max_batch=4)
    b = rollout(GaussianPolicy(), ["p", "q"], shape, generator=torch.Generator().manual_seed(5), max_batch=100)
    c = rollout(GaussianPolicy(), ["p", "q"], shape, generator=torch.Generator().manual_seed(6), max_batch=100)
    torch.testing.assert_close(a.leaves, b.leaves)
    assert not torch.allclose(a.leaves, c.leaves)


def test_children_of_one_node_share_a_mean_and_differ_by_their_noise():
    shape = TreeShape.treegrpo(4, k=3, w=1, start=0)
    tree = rollout(GaussianPolicy(), ["p"], shape, generator=torch.Generator().manual_seed(0), keep_all_latents=True)
    kids = tree.latents[1]
    assert kids.shape[0] == 3 and torch.equal(tree.parent[1], torch.zeros(3, dtype=torch.long))
    assert not torch.allclose(kids[0], kids[1])
    # Re-derive the one mean from the root and check each child's noise is standard normal-sized.
    from treegrpo.steps import sde_mean_std
    policy, sched = GaussianPolicy(), GaussianPolicy().schedule(4)
    root = tree.latents[0]
    v = policy.predict(root, sched.times[:1], None, torch.zeros(1, dtype=torch.long))
    mean, std = sde_mean_std(root, v, sched.sigmas[0], sched.sigmas[1], sigma_max=sched.sigmas[1])
    z = (kids - mean) / std
    assert 0.7 < float(z.detach().std()) < 1.3
    # The ODE steps after the window are deterministic: leaves differ only through the window.
    assert tree.log_prob[2] is None


def _variance_after(shape, steps, data_std=0.5, n=4000, seed=0, sampler=SamplerConfig()):
    policy = GaussianPolicy(data_std=data_std, latent_shape=(1, 4, 4))
    tree = rollout(policy, ["p"] * (n // shape.roots_per_prompt) , shape, generator=torch.Generator().manual_seed(seed),
                   max_batch=10_000, sampler=sampler)
    return float(tree.leaves.var())


def test_ode_rollouts_end_at_the_data_variance():
    steps = 100
    var = _variance_after(TreeShape((1,) * steps, (False,) * steps, (False,) * steps, 1), steps)
    assert abs(var - 0.25) / 0.25 < 0.05


# CPS re-noises the posterior-mean x0 with fresh noise whose size does not shrink with the step, so
# it keeps the marginal only for small noise levels; flow_grpo and dance discretise one SDE.
@pytest.mark.parametrize("kind, level", [("flow_grpo", 0.7), ("dance", 0.3), ("cps", 0.1)])
def test_sde_rollouts_keep_the_marginal_variance(kind, level):
    steps = 200
    shape = TreeShape((1,) * steps, (True,) * steps, (False,) * steps, 1)
    var = _variance_after(shape, steps, sampler=SamplerConfig(sde_kind=kind, noise_level=level))
    assert abs(var - 0.25) / 0.25 < 0.08


def test_wrong_gain_changes_the_marginal():
    # The analytic checks above can fail: a policy with the wrong velocity misses the variance.
    steps = 100
    policy = GaussianPolicy(data_std=0.5, latent_shape=(1, 4, 4))
    with torch.no_grad():
        policy.gain.fill_(1.3)
    shape = TreeShape((1,) * steps, (False,) * steps, (False,) * steps, 1)
    tree = rollout(policy, ["p"] * 2000, shape, generator=torch.Generator().manual_seed(0), max_batch=10_000)
    assert abs(float(tree.leaves.var()) - 0.25) / 0.25 > 0.2


def test_random_window_follows_the_truncated_geometric_law():
    sched = WindowSchedule(num_starts=7, mode="random", r=0.5)
    p = sched.probabilities()
    assert abs(float(p.sum()) - 1) < 1e-12
    assert abs(float(p[0]) - 0.5 / (1 - 0.5**7)) < 1e-12
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sched.pick(i, g) for i in range(20000)])
    freq = torch.bincount(draws, minlength=7).double() / draws.numel()
    assert (freq - p).abs().max() < 0.015


def test_shift_and_fixed_windows():
    shift = WindowSchedule(num_starts=7, mode="shift", every=50)
    assert [shift.pick(i) for i in (0, 49, 50, 149, 10_000)] == [0, 0, 1, 2, 6]
    assert WindowSchedule(num_starts=7, mode="fixed", start=4).pick(123) == 4


def test_dance_trained_steps_draws_sixty_percent():
    steps = dance_trained_steps(10, 0.6, torch.Generator().manual_seed(0))
    assert len(steps) == 5 and all(0 <= s < 9 for s in steps) and list(steps) == sorted(set(steps))


@pytest.mark.parametrize("bad", [
    dict(num_steps=10, k=3, w=10, start=0),
    dict(num_steps=10, k=3, w=3, start=7),
    dict(num_steps=10, k=0, w=3, start=0),
])
def test_bad_shapes_are_rejected(bad):
    with pytest.raises(ValueError):
        TreeShape.treegrpo(**bad)


def test_ode_steps_cannot_branch():
    with pytest.raises(ValueError, match="cannot branch"):
        TreeShape((2, 1), (False, True), (False, True))
