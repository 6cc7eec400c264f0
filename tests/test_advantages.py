import math

import pytest
import torch

from treegrpo.advantages import (backup, combine_rewards, normalize_by_group, normalize_per_depth, parent_baseline,
                                 tree_advantages)
from treegrpo.tree import Tree, TreeShape


def _binary_tree(leaf_log_probs=None, num_prompts=1):
    """T = 2, branching (2, 2): per prompt one root, 2 nodes at level 1, 4 leaves."""
    shape = TreeShape((2, 2), (True, True), (True, True), 1)
    tree = Tree.roots_for(shape, num_prompts, torch.zeros(num_prompts, 1))
    tree.add_level(torch.zeros(2 * num_prompts, 1), torch.zeros(2 * num_prompts))
    lp = torch.zeros(4 * num_prompts) if leaf_log_probs is None else leaf_log_probs
    tree.add_level(torch.zeros(4 * num_prompts, 1), lp)
    return tree


def test_mean_backup_on_a_hand_computed_tree():
    tree = _binary_tree()
    edges = backup(tree, torch.tensor([1.0, 3.0, -2.0, 0.0]), rule="mean")
    assert edges[0] is None
    assert edges[2].tolist() == [1.0, 3.0, -2.0, 0.0]
    assert edges[1].tolist() == [2.0, -1.0]


def test_softmax_backup_weights_siblings_by_their_old_log_probs():
    tree = _binary_tree(leaf_log_probs=torch.tensor([0.0, math.log(3.0), 0.0, 0.0]))
    edges = backup(tree, torch.tensor([1.0, 3.0, -2.0, 0.0]), rule="softmax", temperature=1.0)
    torch.testing.assert_close(edges[1], torch.tensor([0.25 * 1 + 0.75 * 3, -1.0]))
    # A higher temperature flattens the weights towards the plain mean.
    hot = backup(tree, torch.tensor([1.0, 3.0, -2.0, 0.0]), rule="softmax", temperature=1e6)
    torch.testing.assert_close(hot[1], torch.tensor([2.0, -1.0]))


def test_leaf_mask_removes_subtrees_from_their_parents_mean():
    tree = _binary_tree()
    edges = backup(tree, torch.tensor([1.0, 3.0, -2.0, 0.0]), leaf_mask=torch.tensor([True, False, False, False]))
    assert edges[1].tolist() == [1.0, 0.0]
    assert edges[2].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_chains_give_trajectory_level_grpo_advantages():
    shape = TreeShape.flow_grpo(num_steps=4, group_size=5)
    tree = Tree.roots_for(shape, 2, torch.zeros(10, 1))
    for _ in range(4):
        tree.add_level(torch.zeros(10, 1), torch.zeros(10))
    rewards = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3, 2.0, 1.0, 4.0, 3.0, 0.0])
    edges = tree_advantages(tree, {"r": rewards})
    grpo = torch.cat([(r - r.mean()) / (r.std(unbiased=False) + 1e-8) for r in rewards.view(2, 5)])
    for level in range(1, 5):
        torch.testing.assert_close(edges[level], grpo)


def test_leaf_normalisation_pools_all_trees_of_a_prompt():
    shape = TreeShape.treegrpo(num_steps=2, k=2, w=1, start=0, trees_per_prompt=2)
    tree = Tree.roots_for(shape, 1, torch.zeros(2, 1))
    tree.add_level(torch.zeros(4, 1), torch.zeros(4))
    tree.add_level(torch.zeros(4, 1), None)
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    edges = tree_advantages(tree, {"r": rewards})
    expected = (rewards - 3.0) / rewards.std(unbiased=False)
    torch.testing.assert_close(edges[2], expected)
    torch.testing.assert_close(edges[1], expected)  # the ODE link passes values through


def test_per_depth_normalisation_standardises_each_level_per_prompt():
    tree = _binary_tree(num_prompts=2)
    leaf = torch.tensor([1.0, 3.0, -2.0, 0.0, 5.0, 5.0, 5.0, 9.0])
    edges = normalize_per_depth(tree, backup(tree, leaf))
    # level 1, prompt 0: values (2, -1) -> (+1, -1); prompt 1: (5, 7) -> (-1, +1)
    torch.testing.assert_close(edges[1], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    for p in range(2):
        level2 = edges[2][4 * p:4 * p + 4]
        assert abs(float(level2.mean())) < 1e-6 and abs(float(level2.std(unbiased=False)) - 1) < 1e-5


def test_zero_variance_groups_give_zero_never_nan():
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    values = torch.tensor([0.3, 0.3, 0.3, 1.0, 2.0, 3.0])
    adv = normalize_by_group(values, group)
    assert torch.isfinite(adv).all()
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(adv[3:], torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(2 / 3))
    tree = _binary_tree()
    edges = tree_advantages(tree, {"r": torch.full((4,), 0.7)})
    assert all(torch.equal(e, torch.zeros_like(e)) for e in edges[1:])


def test_unbiased_and_global_std_options():
    group = torch.tensor([0, 0, 1, 1])
    values = torch.tensor([0.0, 2.0, 10.0, 14.0])
    torch.testing.assert_close(normalize_by_group(values, group, unbiased=True),
                               torch.tensor([-1.0, 1.0, -2.0, 2.0]) / torch.tensor([math.sqrt(2), math.sqrt(2), math.sqrt(8), math.sqrt(8)]))
    centred = torch.tensor([-1.0, 1.0, -2.0, 2.0])
    # Flow-GRPO's global std is np.std of every reward of the batch (around the batch mean 6.5), not
    # the pooled within-prompt std (sqrt(10 / 4)): the spread between prompts counts.
    batch_std = math.sqrt((6.5**2 + 4.5**2 + 3.5**2 + 7.5**2) / 4)
    torch.testing.assert_close(normalize_by_group(values, group, global_std=True), centred / batch_std)
    # Summed over ranks: two halves of the batch see the same std as the whole.
    halves = [normalize_by_group(values[i:i + 2], torch.zeros(2, dtype=torch.long), global_std=True,
                                 sum_over_ranks=lambda t: t * 0 + torch.stack([values.double().sum(), (values.double() ** 2).sum(),
                                                                               torch.tensor(4.0, dtype=torch.float64)]))
              for i in (0, 2)]
    torch.testing.assert_close(torch.cat(halves), centred / batch_std)


def test_std_floor_limits_the_advantages_of_near_deterministic_groups():
    group = torch.tensor([0, 0, 1, 1])
    values = torch.tensor([0.500, 0.502, 0.0, 0.4])  # group 0 spread 0.001: unit advantages without a floor
    plain = normalize_by_group(values, group)
    floored = normalize_by_group(values, group, std_floor=0.05)
    torch.testing.assert_close(plain, torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    torch.testing.assert_close(floored, torch.tensor([-0.001 / 0.05, 0.001 / 0.05, -1.0, 1.0]))
    with pytest.raises(ValueError, match="std_floor"):
        normalize_by_group(values, group, std_floor=-1.0)


def test_parent_baseline_centres_each_edge_on_its_siblings():
    tree = _binary_tree()
    leaf = torch.tensor([1.0, 3.0, -2.0, 0.0])
    plain = backup(tree, leaf)
    centred = parent_baseline(tree, plain)
    # V(root) = 0.5; level 1 values 2, -1 -> 1.5, -1.5; leaves minus their parent's value.
    assert centred[1].tolist() == [1.5, -1.5]
    assert centred[2].tolist() == [-1.0, 1.0, -1.0, 1.0]
    # Every node's children now sum to 0: the V(u) * sum_c grad log pi(c|u) noise term is gone.
    for level in (1, 2):
        sums = torch.zeros(tree.prompt[level - 1].shape[0]).index_add_(0, tree.parent[level], centred[level])
        torch.testing.assert_close(sums, torch.zeros_like(sums))
    via_chain = tree_advantages(tree, {"r": leaf}, edge_baseline="parent")
    norm = backup(tree, normalize_by_group(leaf, tree.leaf_prompt))
    torch.testing.assert_close(via_chain[2], parent_baseline(tree, norm)[2])
    with pytest.raises(ValueError, match="edge_baseline"):
        tree_advantages(tree, {"r": leaf}, edge_baseline="sibling")


def test_parent_baseline_keeps_chains_and_masked_subtrees():
    # Chains (single-child links) keep the trajectory advantage: one child is its own mean.
    shape = TreeShape.dance_grpo(num_steps=3, group_size=3)
    tree = Tree.roots_for(shape, 1, torch.zeros(1, 1))
    for _ in range(3):
        tree.add_level(torch.zeros(3, 1), torch.zeros(3))
    r = torch.tensor([0.0, 1.0, 5.0])
    plain, centred = tree_advantages(tree, {"r": r}), tree_advantages(tree, {"r": r}, edge_baseline="parent")
    for level in (1, 2, 3):  # the root's value is the leaf mean, 0 after normalisation
        torch.testing.assert_close(centred[level], plain[level])
    # A subtree whose leaves are all masked keeps advantage 0 (not minus its parent's value).
    binary = _binary_tree()
    mask = torch.tensor([True, True, True, False])
    edges = parent_baseline(binary, backup(binary, torch.tensor([1.0, 3.0, -2.0, 0.0]), leaf_mask=mask), leaf_mask=mask)
    assert edges[2].tolist() == [-1.0, 1.0, 0.0, 0.0]
    assert edges[1].tolist() == [2.0, -2.0]  # node values 2 and -2 (its one valid leaf), root 0


def test_per_depth_std_can_be_unbiased():
    tree = _binary_tree()
    edges = normalize_per_depth(tree, [None, torch.tensor([0.0, 2.0]), torch.tensor([1.0, 3.0, -2.0, 0.0])], unbiased=True)
    torch.testing.assert_close(edges[1], torch.tensor([-1.0, 1.0]) / math.sqrt(2))
    leaf = torch.tensor([1.0, 3.0, -2.0, 0.0])
    torch.testing.assert_close(edges[2], (leaf - leaf.mean()) / leaf.std(unbiased=True))


def test_masked_entries_do_not_enter_the_statistics():
    group = torch.zeros(4, dtype=torch.long)
    values = torch.tensor([1.0, 3.0, float("nan"), 1e9])
    mask = torch.tensor([True, True, False, False])
    adv = normalize_by_group(values, group, mask=mask)
    assert adv.tolist() == [-1.0, 1.0, 0.0, 0.0]


def test_multi_reward_combination():
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    a = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 3.0])
    b = torch.tensor([30.0, 10.0, 20.0, 5.0, 6.0, 7.0])
    combined = combine_rewards({"a": a, "b": b}, {"a": 0.8, "b": 0.2}, group)
    za, zb = normalize_by_group(a, group), normalize_by_group(b, group)
    torch.testing.assert_close(combined, normalize_by_group(0.8 * za + 0.2 * zb, group))
    with pytest.raises(ValueError, match="no weight"):
        combine_rewards({"a": a, "b": b}, {"a": 1.0}, group)
