"""From leaf rewards to one advantage per trained edge (SPEC.md section 4).

1. `combine_rewards`: standardise each reward over its prompt group, weighted sum, standardise again.
2. `normalize_by_group`: leaf advantage ``(r - mean) / (std + 1e-8)`` over all leaves of a prompt.
3. `backup`: post-order pass up the tree. A leaf edge carries its leaf's advantage; an internal
   node's value is the weighted mean of its child edges' advantages ("mean" or "softmax" of the
   old per-element-mean log-probs with a temperature) and the edge into it carries that value.
   Single-child links pass values through unchanged, so on a chain this is trajectory-level GRPO.
4. `parent_baseline` (optional, SPEC.md section 8): at branching steps the edge u -> c carries
   V(c) - V(u) instead of V(c), i.e. it is centred on its siblings (same expected gradient, the
   noise term V(u) * sum_c grad log pi(c | u) is gone). Single-child links keep V(c).
5. `normalize_per_depth`: BranchGRPO's rule, each level standardised within its prompt group.

`diversity_weighted_advantages` (GARDO, ``method.diversity_weight: gardo``) replaces step 2.
`leaf_advantages` is steps 1-2 (or GARDO), which the flow-matching objective uses on its own.

Groups with (numerically) zero spread get zero advantages, never NaN.
"""

from __future__ import annotations

from typing import Callable, Literal, Mapping

import torch

from treegrpo.tree import Tree

BackupRule = Literal["mean", "softmax"]
ZERO_SPREAD = 1e-6  # a group whose std is below this (relative to its scale) has no signal


def normalize_by_group(values: torch.Tensor, group: torch.Tensor, *, eps: float = 1e-8, unbiased: bool = False,
                       global_std: bool = False, std_floor: float = 0.0, mask: torch.Tensor | None = None,
                       sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Standardise `values` [L] within groups `group` [L] (long). Computed in float64.

    unbiased: divide by n - 1 (DanceGRPO) instead of n (population std, TreeGRPO).
    global_std: subtract the group mean but divide by ONE std of all values of the batch, taken
        around the batch mean (Flow-GRPO's `global_std`: ``np.std`` of every reward of the batch).
    std_floor: divide by ``max(std, std_floor)`` (in the values' units): a group whose spread is
        tiny (near-deterministic samples) then gets small advantages instead of unit-std noise.
    mask: [L] bool, entries to use; masked-out entries get 0 and do not enter the statistics.
    sum_over_ranks: with global_std under several processes, sums a float64 tensor over them (the
        global std then covers every rank's groups; group means stay local: a rank owns whole groups).
    Returns float32 [L]; groups with zero spread give exactly 0.
    """
    if std_floor < 0:
        raise ValueError(f"std_floor must be >= 0, got {std_floor}")
    v = values.double()
    keep = torch.ones_like(v, dtype=torch.bool) if mask is None else mask.bool()
    v = torch.where(keep, v, torch.zeros_like(v))
    g = torch.where(keep, group, torch.zeros_like(group))
    num_groups = int(group.max()) + 1 if group.numel() else 0
    weight = keep.double()
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, g, weight)
    mean = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, g, v * weight) / count.clamp(min=1)
    centred = (v - mean[g]) * weight
    ddof = 1 if unbiased else 0
    if global_std:
        # Sums of v and v^2 (not of the group-centred values): the spread between prompts counts too.
        sums = torch.stack([(v * weight).sum(), (v**2 * weight).sum(), weight.sum()])
        if sum_over_ranks is not None:
            sums = sum_over_ranks(sums)
        n = sums[2].clamp(min=1)
        sq_dev = (sums[1] - sums[0] ** 2 / n).clamp(min=0)
        std = torch.sqrt(sq_dev / (sums[2] - ddof).clamp(min=1)).expand(num_groups)
    else:
        var = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, g, centred**2) / (count - ddof).clamp(min=1)
        std = torch.sqrt(var)
    scale = torch.zeros(num_groups, dtype=torch.float64).scatter_reduce(0, g, v.abs() * weight, "amax")
    flat = std <= ZERO_SPREAD * scale.clamp(min=1.0)
    adv = centred / (std.clamp(min=std_floor)[g] + eps)
    adv = torch.where(flat[g] | ~keep, torch.zeros_like(adv), adv)
    return adv.float()


def combine_rewards(rewards: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None,
                    group: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-reward combination: standardise each reward [L] within its group, take the weighted
    sum, standardise again. A single reward is returned as is (leaf normalisation follows)."""
    if not rewards:
        raise ValueError("no rewards to combine")
    if len(rewards) == 1:
        return next(iter(rewards.values())).float()
    weights = weights or {name: 1.0 for name in rewards}
    missing = set(rewards) - set(weights)
    if missing:
        raise ValueError(f"no weight for rewards {sorted(missing)}")
    total = sum(weights[name] * normalize_by_group(r, group, mask=mask) for name, r in rewards.items())
    return normalize_by_group(total, group, mask=mask)


def backup(tree: Tree, leaf_advantages: torch.Tensor, rule: BackupRule = "mean",
           temperature: float = 1.0, leaf_mask: torch.Tensor | None = None,
           probe_advantages: torch.Tensor | None = None, probe_mask: torch.Tensor | None = None
           ) -> list[torch.Tensor | None]:
    """Per-level edge advantages: result[i] is [N_i], the advantage of the edge into each node of
    level i (result[0] is None: roots have no incoming edge). leaf_advantages: [N_T].

    rule "softmax" weights siblings by softmax(old log-prob / temperature) of their edges
    (per-element-mean log-probs, where siblings differ by ~1e-3, so the weights stay near uniform;
    summed log-densities would make them one-hot). Single children pass values through.
    leaf_mask: [N_T] bool, leaves to use (e.g. finite rewards); masked subtrees get no weight in
    their parents' means, and a node whose leaves are all masked gets 0.
    Pruned trees (`Tree.prune`): a pruned node has no leaves, so it is masked like that, unless
    probe_advantages ([N_prune_level], used where probe_mask [N_prune_level] bool is set) give it
    a value of its own (the `probe` option of value-guided pruning).
    """
    if rule not in ("mean", "softmax"):
        raise ValueError(f"backup rule must be 'mean' or 'softmax', got {rule!r}")
    if temperature <= 0:
        raise ValueError(f"softmax temperature must be > 0, got {temperature}")
    steps = tree.num_steps
    if leaf_advantages.shape != tree.prompt[steps].shape:
        raise ValueError(f"expected {tree.prompt[steps].shape[0]} leaf advantages, got {tuple(leaf_advantages.shape)}")
    edge: list[torch.Tensor | None] = [None] * (steps + 1)
    valid = torch.ones(leaf_advantages.shape, dtype=torch.bool) if leaf_mask is None else leaf_mask.bool()
    edge[steps] = torch.where(valid, leaf_advantages.float(), torch.zeros_like(leaf_advantages.float()))
    for level in range(steps, 0, -1):
        values = edge[level]
        parent = tree.parent[level]
        num_parents = tree.prompt[level - 1].shape[0]
        if tree.shape.branching[level - 1] == 1 and values.shape[0] == num_parents:
            node_value = values  # a single child passes its value through unchanged
        else:  # (also single children below a pruned level, where some parents have none)
            weights = valid.double()
            if rule == "softmax" and tree.shape.branching[level - 1] > 1:
                lp = tree.log_prob[level]
                if lp is None:
                    raise ValueError(f"softmax backup needs the log-probs of step {level - 1}")
                logits = lp.double() / temperature
                top = torch.full((num_parents,), -torch.inf, dtype=torch.float64).scatter_reduce(0, parent, logits, "amax")
                weights = weights * torch.exp(logits - top[parent])
            norm = torch.zeros(num_parents, dtype=torch.float64).index_add_(0, parent, weights)
            total = torch.zeros(num_parents, dtype=torch.float64).index_add_(0, parent, weights * values.double())
            node_value = (total / norm.clamp(min=1e-300)).float()
            valid = torch.zeros(num_parents, dtype=torch.float64).index_add_(0, parent, valid.double()) > 0
        if level - 1 == tree.prune_level and probe_advantages is not None:
            use = probe_mask.bool() if probe_mask is not None else ~tree.kept
            node_value = torch.where(use, probe_advantages.float(), node_value)
            valid = valid | use
        edge[level - 1] = node_value
    edge[0] = None
    return edge


def parent_baseline(tree: Tree, edge_values: list[torch.Tensor | None], leaf_mask: torch.Tensor | None = None,
                    rule: BackupRule = "mean", temperature: float = 1.0) -> list[torch.Tensor | None]:
    """Sibling-centred edge advantages: at every branching step the edge u -> c gets V(c) - V(u),
    with V(u) the backup's value of u (the same weighted mean of its children the backup used, so
    the centred values of u's valid children have weighted mean 0). Single-child links keep V(c)
    (one child is its own mean: centring would zero a chain's whole signal). Edges into subtrees
    whose leaves are all masked stay 0. edge_values: `backup`'s output; returns the same layout."""
    steps = tree.num_steps
    # V(root) is not among the edge values (no edge enters a root): back it up from level 1.
    valid = _valid_levels(tree, leaf_mask)
    values = [*edge_values]
    values[0] = _node_values(tree, edge_values[1], 0, valid[1], rule, temperature)
    out: list[torch.Tensor | None] = [None] * (steps + 1)
    for level in range(1, steps + 1):
        v = values[level]
        assert v is not None
        if tree.shape.branching[level - 1] > 1:
            parent_value = values[level - 1]
            assert parent_value is not None
            v = torch.where(valid[level], v - parent_value[tree.parent[level]], torch.zeros_like(v))
        out[level] = v
    return out


def _valid_levels(tree: Tree, leaf_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """[N_i] bool per level: whether a node has at least one valid leaf below it."""
    steps = tree.num_steps
    valid = [torch.empty(0, dtype=torch.bool)] * (steps + 1)
    valid[steps] = torch.ones(tree.prompt[steps].shape, dtype=torch.bool) if leaf_mask is None else leaf_mask.bool()
    for level in range(steps, 0, -1):
        n = tree.prompt[level - 1].shape[0]
        valid[level - 1] = torch.zeros(n, dtype=torch.float64).index_add_(0, tree.parent[level], valid[level].double()) > 0
    return valid


def _node_values(tree: Tree, child_values: torch.Tensor | None, level: int, child_valid: torch.Tensor,
                 rule: BackupRule, temperature: float) -> torch.Tensor:
    """[N_level] backup value of each node of `level` from its children's values [N_{level+1}]."""
    assert child_values is not None
    parent = tree.parent[level + 1]
    n = tree.prompt[level].shape[0]
    weights = child_valid.double()
    if rule == "softmax" and tree.shape.branching[level] > 1:
        lp = tree.log_prob[level + 1]
        if lp is None:
            raise ValueError(f"softmax backup needs the log-probs of step {level}")
        logits = lp.double() / temperature
        top = torch.full((n,), -torch.inf, dtype=torch.float64).scatter_reduce(0, parent, logits, "amax")
        weights = weights * torch.exp(logits - top[parent])
    norm = torch.zeros(n, dtype=torch.float64).index_add_(0, parent, weights)
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, parent, weights * child_values.double())
    return (total / norm.clamp(min=1e-300)).float()


def normalize_per_depth(tree: Tree, edge_advantages: list[torch.Tensor | None],
                        unbiased: bool = False) -> list[torch.Tensor | None]:
    """BranchGRPO's depth-wise normalisation: standardise each level's edge values within each
    prompt group (all trees of the prompt); unbiased: the n - 1 std (BranchGRPO's ``torch.std``)."""
    return [None if a is None else normalize_by_group(a, tree.prompt[i], unbiased=unbiased)
            for i, a in enumerate(edge_advantages)]


EdgeBaseline = Literal["none", "parent"]


def tree_advantages(tree: Tree, rewards: Mapping[str, torch.Tensor], *, weights: Mapping[str, float] | None = None,
                    rule: BackupRule = "mean", temperature: float = 1.0, per_depth: bool = False,
                    unbiased: bool = False, global_std: bool = False, std_floor: float = 0.0,
                    edge_baseline: EdgeBaseline = "none", mask: torch.Tensor | None = None,
                    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    probe_rewards: Mapping[str, torch.Tensor] | None = None,
                    diversity: torch.Tensor | None = None) -> list[torch.Tensor | None]:
    """The whole chain: rewards per leaf ({name: [L]}) -> per-level edge advantages.

    std_floor: see `normalize_by_group` (leaf normalisation only); edge_baseline "parent": see
    `parent_baseline` (applied after the backup, before any per-depth normalisation);
    sum_over_ranks: see `normalize_by_group`.
    probe_rewards: {name: [N_prune_level]} probe scores of a pruned tree's prune level; given, the
    pruned nodes' probe rewards join the leaf rewards of their prompt in the normalisation and
    stand in for their missing subtrees in the backup (`prune_value: probe`); else pruned subtrees
    are dropped from the backup.
    diversity: [L] each leaf's nearest-neighbour distance in its group; given, GARDO's
    `diversity_weighted_advantages` replaces leaf normalisation."""
    if edge_baseline not in ("none", "parent"):
        raise ValueError(f"edge_baseline must be 'none' or 'parent', got {edge_baseline!r}")
    if edge_baseline == "parent" and probe_rewards is not None:
        raise ValueError("edge_baseline 'parent' centres on the leaves below a node; it does not know probe values "
                         "of pruned nodes (use prune_value 'drop')")
    if diversity is not None and probe_rewards is not None:
        raise ValueError("GARDO's diversity weights are defined on leaves; pruned nodes' probe values have no "
                         "image features (use prune_value 'drop')")
    group = tree.leaf_prompt
    num_leaves = group.shape[0]
    mask = torch.ones(num_leaves, dtype=torch.bool) if mask is None and probe_rewards else mask
    probe_rows = None
    if probe_rewards is not None and tree.kept is not None:
        # Pruned nodes are extra members of their prompt's group: normalised with the leaves.
        probe_rows = torch.nonzero(~tree.kept).squeeze(1)
        rewards = {n: torch.cat([r.float(), probe_rewards[n].float()[probe_rows]]) for n, r in rewards.items()}
        group = torch.cat([group, tree.prompt[tree.prune_level][probe_rows]])
        finite = torch.stack([torch.isfinite(r[num_leaves:]) for r in rewards.values()]).all(dim=0)
        mask = torch.cat([mask, finite])
    terminal = leaf_advantages(rewards, weights, group, mask=mask, unbiased=unbiased, global_std=global_std,
                               std_floor=std_floor, sum_over_ranks=sum_over_ranks, diversity=diversity)
    leaf, leaf_mask = terminal[:num_leaves], None if mask is None else mask[:num_leaves]
    probe_adv = probe_mask = None
    if probe_rows is not None:
        assert tree.kept is not None and mask is not None
        probe_adv = torch.zeros(tree.kept.shape[0]).index_put_((probe_rows,), terminal[num_leaves:])
        probe_mask = torch.zeros(tree.kept.shape[0], dtype=torch.bool).index_put_((probe_rows,), mask[num_leaves:])
    edges = backup(tree, leaf, rule=rule, temperature=temperature, leaf_mask=leaf_mask,
                   probe_advantages=probe_adv, probe_mask=probe_mask)
    if edge_baseline == "parent":
        edges = parent_baseline(tree, edges, leaf_mask=leaf_mask, rule=rule, temperature=temperature)
    return normalize_per_depth(tree, edges, unbiased=unbiased) if per_depth else edges


def leaf_advantages(rewards: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None, group: torch.Tensor, *,
                    mask: torch.Tensor | None = None, unbiased: bool = False, global_std: bool = False,
                    std_floor: float = 0.0, eps: float = 1e-8,
                    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    diversity: torch.Tensor | None = None) -> torch.Tensor:
    """[L] the leaves' advantages, shared by both objectives: the rewards ({name: [L]}) combined by
    `combine_rewards`, then standardised within their prompt group by the leaf rule (unbiased,
    global_std, std_floor, eps: see `normalize_by_group`), or with `diversity` ([L] nearest-neighbour
    distances) GARDO's `diversity_weighted_advantages` instead."""
    combined = combine_rewards(rewards, weights, group, mask=mask)
    if diversity is not None:
        return diversity_weighted_advantages(combined, group, diversity, mask=mask)
    return normalize_by_group(combined, group, eps=eps, unbiased=unbiased, global_std=global_std, std_floor=std_floor,
                              mask=mask, sum_over_ranks=sum_over_ranks)


def diversity_weighted_advantages(values: torch.Tensor, group: torch.Tensor, distance: torch.Tensor,
                                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """GARDO's diversity-weighted leaf advantages (SPEC.md section 8): ``A_i = (r_i - mu) * w_i``,
    no division by the std, with ``w_i = d_i / mean(d)`` where ``r_i >= mu`` and 1 elsewhere: a
    better-than-average sample far from its group's others is pushed harder, a near-duplicate less.

    values: [L] rewards; group: [L] long; distance: [L] d_i >= 0, each leaf's distance to its
    nearest neighbour in its group (`treegrpo.diversity.group_nearest_neighbour`); mask: [L] bool,
    leaves to use (others get 0 and stay out of mu and mean(d)). Means in float64; a group whose
    mean distance is 0 (all leaves alike) gets w = 1, a group with no spread gets 0. Returns float32 [L].
    """
    if distance.shape != values.shape or group.shape != values.shape:
        raise ValueError(f"values, group and distance must all be [L], got {tuple(values.shape)}, "
                         f"{tuple(group.shape)}, {tuple(distance.shape)}")
    keep = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.bool()
    v = torch.where(keep, values.double(), torch.zeros_like(values, dtype=torch.float64))
    d = torch.where(keep, distance.double(), torch.zeros_like(v))
    g = torch.where(keep, group, torch.zeros_like(group))
    num_groups = int(group.max()) + 1 if group.numel() else 0
    weight = keep.double()

    def group_mean(x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, g, x * weight)
        count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, g, weight)
        return total / count.clamp(min=1)

    mean = group_mean(v)
    centred = v - mean[g]
    std = torch.sqrt(group_mean(centred**2))
    scale = torch.zeros(num_groups, dtype=torch.float64).scatter_reduce(0, g, v.abs() * weight, "amax")
    flat = std <= ZERO_SPREAD * scale.clamp(min=1.0)
    mean_d = group_mean(d)[g]
    w = torch.where((centred >= 0) & (mean_d > 0), d / mean_d.clamp(min=1e-300), torch.ones_like(d))
    adv = torch.where(flat[g] | ~keep, torch.zeros_like(v), centred * w)
    return adv.float()
