"""Value-guided pruning and the adaptive window: accounting, the probe, the backup, the selection."""

import math

import pytest
import torch

from treegrpo.advantages import backup, tree_advantages
from treegrpo.policies.analytic import GaussianPolicy
from treegrpo.pruning import clean_estimate, max_spread_subset, probe_correlation, random_subset
from treegrpo.rollout import rollout
from treegrpo.tree import StepSpread, Tree, TreeShape, WindowSchedule, sibling_spread, trained_edges
from treegrpo.tree_record import TreeRecord, record_tree
from treegrpo.tree_svg import tree_svg


def _keep_first_half(x0, prompt_index):
    kept = torch.zeros(x0.shape[0], dtype=torch.bool)
    for p in prompt_index.unique():
        rows = torch.nonzero(prompt_index == p).squeeze(1)
        kept[rows[: rows.shape[0] // 2]] = True
    return kept


def test_prune_level_and_tail_calls_of_the_presets():
    shape = TreeShape.treegrpo(10, k=3, w=3, start=0)
    assert shape.prune_level == 3 and shape.tail_calls() == 6
    assert TreeShape.treegrpo(10, k=3, w=3, start=6).tail_calls() == 0  # window ends at T - 1: nothing to save
    assert TreeShape.mix_grpo(10, group_size=4, window=4, start=2).prune_level == 6
    assert TreeShape.flow_grpo(10, 4).prune_level == 9


@pytest.mark.parametrize("start", [0, 2])
def test_calls_saved_equal_the_pruned_tails_and_kept_leaves_are_unchanged(start):
    shape = TreeShape.treegrpo(8, k=3, w=2, start=start)
    full_policy, pruned_policy = GaussianPolicy(), GaussianPolicy()
    full = rollout(full_policy, ["a", "b"], shape, generator=torch.Generator().manual_seed(3))
    pruned = rollout(pruned_policy, ["a", "b"], shape, generator=torch.Generator().manual_seed(3),
                     probe=_keep_first_half)
    level = shape.prune_level
    assert pruned.prune_level == level and pruned.kept.shape == (2 * 9,)
    assert pruned.num_pruned == 10  # 9 nodes per prompt, 4 kept of each
    saved = pruned.num_pruned * (8 - level - 1)
    assert full.num_model_calls - pruned.num_model_calls == saved == pruned.num_pruned * shape.tail_calls()
    assert pruned.num_model_calls == pruned_policy.calls  # the counter is what the model saw
    # Tails are deterministic ODE steps: each kept leaf is the unpruned tree's leaf of that node.
    torch.testing.assert_close(pruned.leaves, full.leaves[pruned.kept])
    assert pruned.leaf_prompt.tolist() == full.leaf_prompt[pruned.kept].tolist()
    # Training batches are untouched: pruning acts after the last trained step.
    zeros = [torch.zeros(p.shape[0]) for p in pruned.prompt]
    assert trained_edges(pruned, zeros).num_edges == trained_edges(full, [torch.zeros(p.shape[0]) for p in full.prompt]).num_edges


def test_probe_equals_the_posterior_mean_of_the_analytic_policy():
    s = 0.5
    shape = TreeShape.treegrpo(6, k=2, w=2, start=1)
    seen = {}

    def probe(x0, prompt_index):
        seen["x0"] = x0
        return torch.ones(x0.shape[0], dtype=torch.bool)

    tree = rollout(GaussianPolicy(data_std=s), ["a"], shape, generator=torch.Generator().manual_seed(0),
                   probe=probe, keep_all_latents=True)
    sigma = float(GaussianPolicy().schedule(6).sigmas[shape.prune_level])
    closed = (1 - sigma) * s**2 / ((1 - sigma) ** 2 * s**2 + sigma**2) * tree.latents[shape.prune_level]
    torch.testing.assert_close(seen["x0"], closed)
    # A gain != 1 gives a different (wrong) velocity: the probe follows the model, not the formula.
    policy = GaussianPolicy(data_std=s)
    policy.gain.data.fill_(1.3)
    rollout(policy, ["a"], shape, generator=torch.Generator().manual_seed(0), probe=probe)
    assert not torch.allclose(seen["x0"], closed)
    # The eps-prediction form inverts x = sqrt(ab) x0 + sqrt(1 - ab) eps.
    from treegrpo.policies.base import Schedule
    ab = torch.tensor([0.3, 0.8])
    x0, eps = torch.randn(2, 4), torch.randn(2, 4)
    x = ab.sqrt()[:, None] * x0 + (1 - ab).sqrt()[:, None] * eps
    est = clean_estimate(Schedule(kind="ddim", times=torch.zeros(2), alphas_cumprod=ab), x, eps, torch.tensor([0, 1]))
    torch.testing.assert_close(est, x0)


def test_max_spread_subset_keeps_the_extremes_of_each_group():
    values = torch.tensor([0.5, 0.1, 0.9, 0.45, 0.55, 0.0, 3.0, 2.0, 2.1, 2.2])
    group = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    kept = max_spread_subset(values, group, 0.4)  # 2 of 5 per group
    assert kept.tolist() == [False, True, True, False, False, True, True, False, False, False]
    # Brute force: no other subset of the same size has a larger variance.
    import itertools
    a = values[:5]
    best = max(a[list(c)].var(unbiased=False) for c in itertools.combinations(range(5), 3))
    k3 = max_spread_subset(a, torch.zeros(5, dtype=torch.long), 0.6)
    assert int(k3.sum()) == 3 and math.isclose(float(a[k3].var(unbiased=False)), float(best), rel_tol=1e-6)
    # Skewed values: the best 3-subset is one low and two high (not a fixed best/worst split).
    skew = torch.tensor([0.0, 10.0, 10.5, 1.0, 1.1])
    got = max_spread_subset(skew, torch.zeros(5, dtype=torch.long), 0.6)
    best = max(skew[list(c)].var(unbiased=False) for c in itertools.combinations(range(5), 3))
    assert math.isclose(float(skew[got].var(unbiased=False)), float(best), rel_tol=1e-6)
    # Non-finite probes are kept (no evidence to prune on) and use up the budget.
    nan = max_spread_subset(torch.tensor([float("nan"), 0.0, 1.0, 0.5]), torch.zeros(4, dtype=torch.long), 0.5)
    assert nan.tolist()[0] and int(nan.sum()) == 2
    with pytest.raises(ValueError, match="keep_share"):
        max_spread_subset(values, group, 0.0)


def test_random_subset_keeps_the_same_budget_and_follows_its_seeds():
    group = torch.tensor([0] * 27 + [1] * 27 + [2] * 4)
    kept = random_subset(group, 0.5, [11, 12, 13])
    assert [int(kept[group == p].sum()) for p in range(3)] == [14, 14, 2]  # max(2, round(0.5 n)), as max_spread_subset
    assert torch.equal(kept, random_subset(group, 0.5, [11, 12, 13]))  # deterministic: resumes and ranks agree
    assert not torch.equal(kept[:27], random_subset(group, 0.5, [99, 12, 13])[:27])  # a group's draw is its seed's
    assert torch.equal(kept[27:], random_subset(group, 0.5, [99, 12, 13])[27:])
    # Over many seeds every node is kept about half the time: blind to position and value.
    share = torch.stack([random_subset(group[:27], 0.5, [s]) for s in range(400)]).float().mean(0)
    assert float(share.min()) > 0.4 and float(share.max()) < 0.64


def _pruned_tree():
    """T = 3, branching (2, 2, 1): 4 prune-level nodes (level 2) per prompt; node 1 and 2 pruned."""
    shape = TreeShape((2, 2, 1), (True, True, False), (True, True, False), 1)
    tree = Tree.roots_for(shape, 1, torch.zeros(1, 1))
    tree.add_level(torch.zeros(2, 1), torch.zeros(2))
    tree.add_level(torch.zeros(4, 1), torch.zeros(4))
    tree.prune(torch.tensor([True, False, False, True]))
    tree.add_level(torch.zeros(2, 1), None)
    return tree


def test_backup_drops_pruned_subtrees_or_uses_their_probe():
    tree = _pruned_tree()
    assert tree.parent[3].tolist() == [0, 3]
    drop = backup(tree, torch.tensor([1.0, -1.0]))
    assert drop[3].tolist() == [1.0, -1.0]
    assert drop[2].tolist() == [1.0, 0.0, 0.0, -1.0]  # pruned: no value
    assert drop[1].tolist() == [1.0, -1.0]  # each parent's mean over its completed child only
    probe = backup(tree, torch.tensor([1.0, -1.0]), probe_advantages=torch.tensor([9.0, 0.5, -0.25, 9.0]))
    assert probe[2].tolist() == [1.0, 0.5, -0.25, -1.0]  # kept nodes keep their leaf values
    assert probe[1].tolist() == [0.75, -0.625]
    # Through tree_advantages: probe rewards join the leaves' normalisation.
    leaf = {"r": torch.tensor([1.0, 0.0])}
    probes = {"r": torch.tensor([float("nan"), 0.75, 0.25, float("nan")])}
    adv = tree_advantages(tree, leaf, probe_rewards=probes)
    terminal = torch.tensor([1.0, 0.0, 0.75, 0.25])  # leaves, then pruned nodes' probes
    z = (terminal - terminal.mean()) / terminal.std(unbiased=False)
    torch.testing.assert_close(adv[3], z[:2])
    torch.testing.assert_close(adv[2], torch.stack([z[0], z[2], z[3], z[1]]))
    dropped = tree_advantages(tree, leaf)
    assert dropped[3].tolist() == [1.0, -1.0] and dropped[2].tolist() == [1.0, 0.0, 0.0, -1.0]


def test_record_and_svg_show_pruned_nodes():
    tree = rollout(GaussianPolicy(), ["a", "b"], TreeShape.treegrpo(6, k=2, w=2, start=1),
                   generator=torch.Generator().manual_seed(1), probe=_keep_first_half)
    scores = {"r": torch.arange(tree.leaves.shape[0]).float()}
    probes = {"r": torch.linspace(0, 1, tree.kept.shape[0])}
    adv = tree_advantages(tree, scores, probe_rewards=probes)
    images = torch.rand(tree.leaves.shape[0], 3, 4, 4)
    record = record_tree(tree, adv, images, scores, ["a", "b"], 1, {"r": 1.0}, probe_rewards=probes)
    assert record.num_leaves == 2 and record.num_pruned == 2 and record.num_rows == 4
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        back = TreeRecord.load(record.save(d))
    assert back.prune_level == 3 and back.kept.tolist() == [True, True, False, False]
    torch.testing.assert_close(back.probe_rewards["r"], probes["r"][:4])
    svg = tree_svg(back)
    assert svg.count('class="pruned"') == 2 and svg.count('class="leaf-thumb"') == 2
    assert 'data-leaves="2"' in svg


def test_probe_correlation_is_within_prompt():
    probe = torch.tensor([0.0, 1.0, 10.0, 11.0])
    reward = torch.tensor([1.0, 0.0, 5.0, 4.0])  # inverted inside each prompt
    corr, n = probe_correlation(probe, reward, torch.tensor([0, 0, 1, 1]))
    assert corr == pytest.approx(-1.0) and n == 4
    assert probe_correlation(probe, probe, torch.zeros(4, dtype=torch.long))[0] == pytest.approx(1.0)


def test_adaptive_window_prefers_steps_whose_siblings_differed():
    w = WindowSchedule(num_starts=4, mode="adaptive", r=0.5, width=2, explore=0.2)
    geometric = WindowSchedule(num_starts=4).probabilities()
    torch.testing.assert_close(w.probabilities(None), geometric)  # nothing measured: the paper's law
    spread = [0.1, 0.1, 0.1, 1.0, 1.0, None]  # steps 3, 4 differed most; step 5 unseen (optimistic)
    p = w.probabilities(spread)
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-9)
    score = torch.tensor([0.1, 0.1, 0.55, 1.0], dtype=torch.float64)  # window means over 2 steps
    torch.testing.assert_close(p, 0.2 * geometric + 0.8 * score / score.sum())
    assert int(p.argmax()) == 3
    draws = torch.tensor([w.pick(0, torch.Generator().manual_seed(i), spread) for i in range(400)])
    assert (draws >= 2).float().mean() > 0.5 > float(geometric[2:].sum())


def test_step_spread_ema_and_state_round_trip():
    spread = StepSpread(4, decay=0.5)
    sums = torch.tensor([[2.0, 4.0], [0.0, 0.0], [3.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    spread.update(sums)
    assert spread.values == [0.5, None, 3.0, None]
    spread.update(torch.tensor([[4.0, 2.0], [0, 0], [1.0, 1.0], [0, 0]], dtype=torch.float64))
    assert spread.values == [0.5 * 0.5 + 0.5 * 2.0, None, 2.0, None]
    import json
    other = StepSpread(4, decay=0.5)
    other.load_state_dict(json.loads(json.dumps(spread.state_dict())))
    assert other.values == spread.values
    with pytest.raises(ValueError, match="steps"):
        StepSpread(5).load_state_dict(spread.state_dict())


def test_sibling_spread_measures_each_branching_step():
    shape = TreeShape((2, 2), (True, True), (True, True), 1)
    tree = Tree.roots_for(shape, 1, torch.zeros(1, 1))
    tree.add_level(torch.zeros(2, 1), torch.zeros(2))
    tree.add_level(torch.zeros(4, 1), torch.zeros(4))
    values = backup(tree, torch.tensor([1.0, 3.0, -2.0, 0.0]))
    valid = [None, torch.ones(2, dtype=torch.bool), torch.ones(4, dtype=torch.bool)]
    out = sibling_spread(tree, values, valid)
    # step 0: children 2 and -1 -> std 1.5; step 1: (1, 3) std 1, (-2, 0) std 1.
    torch.testing.assert_close(out, torch.tensor([[1.5, 1.0], [2.0, 2.0]], dtype=torch.float64))
    valid[2] = torch.tensor([True, False, True, True])  # a node with one valid child has no spread
    assert sibling_spread(tree, values, valid)[1].tolist() == [1.0, 1.0]


# ---------------------------------------------------------------- in the trainer
def _trainer(run, iterations, *extra):
    from treegrpo.config import load_config
    from treegrpo.rewards.base import _REGISTRY, register_reward
    from treegrpo.trainer import Trainer

    if "prune_spread" not in _REGISTRY:
        register_reward("prune_spread")(lambda: (lambda images, prompts: images.flatten(1).std(dim=1)))
    config = load_config(None, [
        "model.family=analytic", "model.num_steps=6", "method.k=2", "method.window=2", f"train.iterations={iterations}",
        "train.prompts_per_iteration=2", "train.progress=false", "eval.every=0", "eval.num_seeds=1",
        "eval.grid_prompts=2", "train.checkpoint_every=1", "log.trackers=[]", "log.tree_every=0", "optim.kl_coef=0",
        "optim.lr=0.02", "optim.clip_range=0.2", "reward.weights={prune_spread: 1.0}", "reward.eval=[prune_spread]",
        "method.window_mode=adaptive", "method.window_decay=0.5", *extra])
    return Trainer(config, run, policy=GaussianPolicy(data_std=0.5, latent_shape=(1, 4, 4)), train_prompts=["p0", "p1"])


def _records(run):
    import json
    return [{k: v for k, v in json.loads(line).items() if k != "wall_seconds" and not k.startswith("memory/")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("value, objective, select", [("drop", "policy_gradient", "spread"),
                                                      ("probe", "policy_gradient", "spread"),
                                                      ("drop", "flow_matching", "spread"),
                                                      ("drop", "flow_matching", "random")])
def test_pruned_adaptive_training_resumes_bitwise(tmp_path, value, objective, select):
    extra = ("method.prune_keep=0.5", f"method.prune_value={value}", f"optim.objective={objective}",
             f"method.prune_select={select}")
    if objective == "flow_matching":
        extra += ("optim.minibatches=1", "optim.matching_draws=2")
    straight = _trainer(tmp_path / "a", 6, *extra)
    straight.train()
    first = _trainer(tmp_path / "b", 3, *extra)
    first.train()
    resumed = _trainer(tmp_path / "b", 6, *extra)
    resumed.train()
    assert resumed.method.spread.values == straight.method.spread.values  # the law's memory came back
    assert any(v is not None for v in straight.method.spread.values)
    assert torch.equal(resumed.policy.gain, straight.policy.gain)
    a, b = _records(tmp_path / "a"), _records(tmp_path / "b")
    # The 3-iteration run also evaluated at its end (iteration 3): the one expected difference.
    b[3] = {k: v for k, v in b[3].items() if not k.startswith("eval/")}
    assert a == b
    steps = a[1:]
    # Accounting per iteration: rollout calls = unpruned calls of that window minus the saved tails.
    for r in steps:
        shape = TreeShape.treegrpo(6, k=2, w=2, start=int(r["window_start"]))
        assert r["pruned_nodes"] == 2 * 2  # 4 prune-level nodes per prompt, 2 kept
        assert r["model_calls/saved"] == r["pruned_nodes"] * shape.tail_calls()
        assert r["model_calls/rollout"] == 2 * shape.num_model_calls - r["model_calls/saved"]
        assert r["leaves"] == 4
        if objective == "flow_matching":  # the loss sees the kept leaves only: one call per leaf and draw
            assert r["model_calls/train"] == r["leaves"] * 2


def test_random_selection_completes_other_leaves_than_the_probes_choice(tmp_path):
    """prune_select=random is used, not just accepted: same budget, same seeds, other leaves completed."""
    runs = {}
    for select in ("spread", "random"):
        trainer = _trainer(tmp_path / select, 1, "method.prune_keep=0.5", f"method.prune_select={select}")
        trainer.train()
        runs[select] = _records(tmp_path / select)[1]
    assert runs["spread"]["pruned_nodes"] == runs["random"]["pruned_nodes"] == 4
    assert runs["spread"]["train/reward_mean"] != runs["random"]["train/reward_mean"]


@pytest.mark.parametrize("override, match", [
    ("method.prune_keep=0", "prune_keep must be in"),
    ("method.prune_keep=1.5", "prune_keep must be in"),
    ("method.prune_value=best", "prune_value must be drop or probe"),
    ("method.prune_value=probe", "set method.prune_keep < 1"),
    ("method.prune_select=best", "prune_select must be spread or random"),
    ("method.prune_select=random", "set method.prune_keep < 1"),
    ("method.window_mode=learnt", "random, shift, cycle, fixed or adaptive"),
    ("method.window_decay=1", "window_decay must be in"),
    ("method.window_explore=-0.1", "window_explore must be in"),
])
def test_bad_pruning_and_adaptive_settings_name_the_fix(override, match):
    from treegrpo.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])
