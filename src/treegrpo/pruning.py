"""Value-guided pruning: a one-step value probe decides which nodes get their ODE tails.

At the prune level (the children of the last trained step; TreeGRPO's window leaves) the rollout
calls the model once per node anyway, for the first tail step. That prediction also gives the
one-step clean estimate (SPEC.md section 8, Pro-GRPO): ``x0_hat = x - sigma * v`` for rectified
flow, ``(x - sqrt(1 - ab) eps) / sqrt(ab)`` for epsilon prediction. Decoded and scored by the
training reward it is a value estimate of the node for the price of a decode and a reward call.
Only a share of each prompt's nodes is completed: the subset with the largest spread of probe
values (the lowest and highest ones), so the completed leaves keep the group's contrast. The rest
are pruned before their tails: each saves ``T - prune_level - 1`` model calls.

The backup then uses the completed leaves only (``prune_value: drop``) or also the probe value of
every pruned node (``probe``: probe rewards are normalised together with the leaf rewards).
``prune_select: random`` keeps a random share of the same size instead, blind to the probe: the
control that tells what the probe's choice adds to the mere halving of the leaves.
"""

from __future__ import annotations

import math

import torch

from treegrpo.policies.base import Schedule

PRUNE_VALUES = ("drop", "probe")


def clean_estimate(schedule: Schedule, x: torch.Tensor, model_out: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """[B, ...] float32 one-step estimate of the clean sample from states x [B, ...] at step `step`
    ([B] long) and the model's output there (velocity for flow, noise for epsilon prediction)."""
    x32, out = x.float(), model_out.float()
    view = (-1, *([1] * (x.ndim - 1)))
    if schedule.kind == "flow":
        assert schedule.sigmas is not None
        sigma = schedule.sigmas.to(x.device)[step].view(view)
        return x32 - sigma * out
    assert schedule.alphas_cumprod is not None
    ab = schedule.alphas_cumprod.to(x.device)[step].view(view)
    return (x32 - torch.sqrt(1 - ab) * out) / torch.sqrt(ab)


def _budget(n: int, keep_share: float) -> int:
    """Nodes of a group of n that get their tails: max(2, round(keep_share * n)), at most n."""
    if not 0 < keep_share <= 1:
        raise ValueError(f"keep_share must be in (0, 1], got {keep_share}")
    return min(n, max(2, round(keep_share * n)))


def max_spread_subset(values: torch.Tensor, group: torch.Tensor, keep_share: float) -> torch.Tensor:
    """[N] bool: per group, the ``max(2, round(keep_share * n))`` nodes (at most n) whose values
    have the largest variance. values: [N] float (probe rewards), group: [N] long (prompt index).

    A maximum-variance subset of fixed size is always some j lowest plus the rest highest values,
    so it suffices to try every j. Nodes with non-finite values are always kept (there is no
    evidence to prune them on) and count towards the group's budget.
    """
    if values.shape != group.shape:
        raise ValueError(f"values {tuple(values.shape)} and group {tuple(group.shape)} differ in shape")
    kept = torch.zeros(values.shape, dtype=torch.bool)
    v = values.detach().double().cpu()
    g = group.cpu()
    for p in torch.unique(g).tolist():
        members = torch.nonzero(g == p).squeeze(1)
        n = members.shape[0]
        budget = _budget(n, keep_share)
        finite = torch.isfinite(v[members])
        kept[members[~finite]] = True
        budget -= int((~finite).sum())
        candidates = members[finite]
        if budget <= 0:
            continue
        order = candidates[torch.sort(v[candidates], stable=True).indices]
        a = v[order]
        best, best_j = -1.0, 0
        for j in range(budget + 1):  # j lowest + (budget - j) highest
            chosen = torch.cat([a[:j], a[a.shape[0] - (budget - j):]]) if budget - j else a[:j]
            var = float(chosen.var(unbiased=False))
            if var > best + 1e-15:
                best, best_j = var, j
        hi = budget - best_j
        kept[order[:best_j]] = True
        if hi:
            kept[order[order.shape[0] - hi:]] = True
    return kept


def random_subset(group: torch.Tensor, keep_share: float, seeds: list[int]) -> torch.Tensor:
    """[N] bool: per group p, ``max(2, round(keep_share * n))`` of its nodes drawn uniformly with a
    generator seeded by ``seeds[p]``; the same budget as `max_spread_subset`, blind to the probe. The
    control that tells the probe's choice from the mere halving of the leaves (`prune_select: random`)."""
    kept = torch.zeros(group.shape, dtype=torch.bool)
    g = group.cpu()
    for p in torch.unique(g).tolist():
        members = torch.nonzero(g == p).squeeze(1)
        order = torch.randperm(members.shape[0], generator=torch.Generator().manual_seed(seeds[p]))
        kept[members[order[:_budget(members.shape[0], keep_share)]]] = True
    return kept


def probe_correlation(probe: torch.Tensor, reward: torch.Tensor, group: torch.Tensor) -> tuple[float, float]:
    """Pooled within-group Pearson correlation of the completed nodes' probe values [K] with their
    leaves' rewards [K] (group [K] long): how well the probe ranks a prompt's nodes. Returns
    (correlation, number of pairs used); NaN when there is no spread to correlate."""
    if probe.shape != reward.shape:
        return math.nan, 0.0
    ok = torch.isfinite(probe) & torch.isfinite(reward)
    p, r, g = probe[ok].double(), reward[ok].double(), group[ok]
    if p.numel() < 2:
        return math.nan, 0.0
    n = int(g.max()) + 1
    count = torch.zeros(n, dtype=torch.float64).index_add_(0, g, torch.ones_like(p)).clamp(min=1)
    pc = p - (torch.zeros(n, dtype=torch.float64).index_add_(0, g, p) / count)[g]
    rc = r - (torch.zeros(n, dtype=torch.float64).index_add_(0, g, r) / count)[g]
    denom = float(torch.sqrt((pc**2).sum() * (rc**2).sum()))
    return (float((pc * rc).sum()) / denom if denom > 0 else math.nan), float(p.numel())
