"""The clipped policy-gradient surrogate per edge, the optional KL term, and diagnostics.

Per trained edge e (SPEC.md section 5): ``ratio = exp(log pi_theta(e) - log pi_old(e))``,
``A~ = clip(A, -adv_clip, adv_clip)``, ``loss_e = max(-A~ ratio, -A~ clip(ratio, 1 - eps, 1 + eps))``.
Edge losses are summed over a node's edges and averaged over nodes (the released code's reduction:
one model forward at a node serves all its k edges), optionally with a weight per node that
depends on its step (`step_weights`: equal weight per step, or the inverse of the step's
gradient gain |c_v| / std). The optional KL to a reference policy is
``beta * mean((mu_theta - mu_ref)^2) / (2 std^2)`` per node, with the real transition std, counted
once per node or once per edge (k times at a k-way node, as the policy term counts it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossOutput:
    """loss: scalar to minimise; stats: float diagnostics (see `surrogate_stats`)."""

    loss: torch.Tensor
    stats: dict[str, float]


def clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantage: torch.Tensor, *,
                      clip_range: float = 1e-4, adv_clip: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-edge PPO-clip loss [E] and ratio [E]; inputs [E]. Gradient flows through `log_prob`."""
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    ratio = torch.exp(log_prob - old_log_prob.detach())
    adv = advantage.detach().clamp(-adv_clip, adv_clip)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


def kl_to_reference(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample KL between Gaussians with a shared std: mean over elements of
    ``(mu - mu_ref)^2 / (2 std^2)``. mean, ref_mean: [N, ...]; std: [N, 1, ...] -> [N]."""
    return (((mean.float() - ref_mean.detach().float()) ** 2) / (2 * std.float() ** 2)).flatten(1).mean(dim=1)


def per_node_mean(edge_values: torch.Tensor, edge_node: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Sum edge values [E] per node (edge_node: [E] long), then average over the `num_nodes` nodes."""
    per_node = torch.zeros(num_nodes, dtype=edge_values.dtype, device=edge_values.device)
    return per_node.index_add(0, edge_node, edge_values).mean()


STEP_WEIGHTS = ("none", "level", "gain", "level_gain")


def step_weights(steps: torch.Tensor, mode: str, gains: torch.Tensor | None = None,
                 reference_gain: float | None = None) -> torch.Tensor:
    """Weight per step index [T] for the nodes of one iteration (`steps`: [Nn] long, each node's step).

    "none": 1. "level": ``Nn / (S * N_s)`` for the S distinct steps present (N_s nodes at step s), so
    every trained step has the same total weight and the weights average 1 over the nodes (a k-ary
    window otherwise puts k^(w-1) of its nodes on the deepest step). "gain": ``reference_gain /
    gains[s]`` with gains [T] the step's log-prob gradient gain |c_v| / std: the gradient of a
    unit advantage then has the same scale at every step (and a late window no larger a step than
    an early one). "level_gain": both factors.
    """
    if mode not in STEP_WEIGHTS:
        raise ValueError(f"step weight mode must be one of {STEP_WEIGHTS}, got {mode!r}")
    size = int(steps.max()) + 1 if steps.numel() else 1
    if gains is not None:
        size = max(size, gains.shape[0])
    table = torch.ones(size, dtype=torch.float64)
    if mode in ("level", "level_gain"):
        counts = torch.bincount(steps, minlength=size).double()
        present = counts > 0
        table = torch.where(present, steps.numel() / (int(present.sum()) * counts.clamp(min=1)), table)
    if mode in ("gain", "level_gain"):
        if gains is None or reference_gain is None:
            raise ValueError("step weights by gain need the steps' gains and a reference gain")
        if bool((gains[:size] <= 0).any()):
            raise ValueError("step gains must be > 0 (a trained step with zero std or no dependence on the model)")
        table = table * (reference_gain / gains.double())
    return table.float()


def policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantage: torch.Tensor,
                edge_node: torch.Tensor, num_nodes: int, *, clip_range: float = 1e-4, adv_clip: float = 5.0,
                kl: torch.Tensor | None = None, kl_coef: float = 0.0, node_weight: torch.Tensor | None = None,
                kl_per_edge: bool = False) -> LossOutput:
    """The training objective of one minibatch.

    log_prob, old_log_prob, advantage, edge_node: [E]; kl: optional [num_nodes] per-node KL to the
    reference (`kl_to_reference`), weighted by `kl_coef`; node_weight: optional [num_nodes] weight
    of each node's terms (`step_weights`); kl_per_edge: count a node's KL once per outgoing edge.
    """
    edge_loss, ratio = clipped_surrogate(log_prob, old_log_prob, advantage, clip_range=clip_range, adv_clip=adv_clip)
    if node_weight is not None:
        if node_weight.shape != (num_nodes,):
            raise ValueError(f"node_weight must be [{num_nodes}], got {tuple(node_weight.shape)}")
        edge_loss = edge_loss * node_weight.to(edge_loss)[edge_node]
    loss = per_node_mean(edge_loss, edge_node, num_nodes)
    stats = surrogate_stats(log_prob, old_log_prob, ratio, clip_range)
    stats["policy_loss"] = float(loss.detach())
    if kl is not None and kl_coef > 0:
        per_node = kl
        if kl_per_edge:
            per_node = per_node * torch.bincount(edge_node, minlength=num_nodes).to(kl)
        if node_weight is not None:
            per_node = per_node * node_weight.to(kl)
        kl_term = per_node.mean()
        loss = loss + kl_coef * kl_term
        stats["kl_ref"] = float(kl.detach().mean())  # the plain per-node KL, whatever the weighting
    stats["loss"] = float(loss.detach())
    return LossOutput(loss, stats)


@torch.no_grad()
def surrogate_stats(log_prob: torch.Tensor, old_log_prob: torch.Tensor, ratio: torch.Tensor,
                    clip_range: float) -> dict[str, float]:
    """approx_kl: mean of ``(r - 1) - log r`` (non-negative, unbiased for KL(old || new));
    clip_frac: share of edges with ``|r - 1| > clip_range``; ratio_mean / ratio_min / ratio_max."""
    log_ratio = (log_prob - old_log_prob).detach().double()
    r = ratio.detach().double()
    return {
        "approx_kl": float(((r - 1) - log_ratio).mean()),
        "clip_frac": float(((r - 1).abs() > clip_range).double().mean()),
        "ratio_mean": float(r.mean()),
        "ratio_min": float(r.min()),
        "ratio_max": float(r.max()),
    }


def matching_weights(advantage: torch.Tensor, group: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The flow-matching objective's r [L] in [0, 1] from leaf advantages [L] (groups `group` [L]):
    clipped to [-1, 1], centred per group after clipping (else the plain flow-matching pull on all
    leaves dominates the gradient), r = (1 + a) / 2. Masked-out leaves get r = 0.5 (no pull)."""
    keep = torch.ones_like(advantage, dtype=torch.bool) if mask is None else mask.bool()
    a = torch.where(keep, advantage.float().clamp(-1, 1), torch.zeros_like(advantage, dtype=torch.float32))
    n = int(group.max()) + 1 if group.numel() else 0
    count = torch.zeros(n).index_add_(0, group, keep.float()).clamp(min=1)
    mean = torch.zeros(n).index_add_(0, group, a) / count
    a = torch.where(keep, a - mean[group], torch.zeros_like(a))
    return 0.5 + 0.5 * a


def flow_matching_loss(v: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor, r: torch.Tensor, beta: float,
                       v_ref: torch.Tensor | None = None, kl_coef: float = 0.0, negatives: bool = True) -> LossOutput:
    """DiffusionNFT's advantage-weighted flow-matching loss (arXiv 2509.16117) on leaves.

    v: the model's velocity [B, ...] at forward-noised leaves; v_old: the rollout policy's (detached);
    target: eps - x0; r: [B] weights in [0, 1] (`matching_weights`). With v+ = (1 - beta) v_old +
    beta v and v- = (1 + beta) v_old - beta v the loss is the mean of
    r |v+ - target|^2 + (1 - r) |v- - target|^2: leaves above their prompt's mean pull v+ towards
    them, those below push v- (so v moves away). Its gradient at v = v_old is 2 beta (2r - 1)(v_old -
    target) dv: with centred r it has no plain flow-matching part. v_ref, kl_coef: an added
    kl_coef * mean |v - v_ref|^2 to the reference (base) model's velocity. negatives=False keeps
    only the pull towards leaves above their prompt's mean, (2r - 1)+ |v+ - target|^2 (reward-weighted
    regression): the same gradient on those leaves at v = v_old, none on the others, so a step moves
    v only towards samples the reward preferred, never away from the rest."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    v_old = v_old.detach()
    w = r.view(-1, *([1] * (v.ndim - 1))).to(v)
    v_pos = (1 - beta) * v_old + beta * v
    v_neg = (1 + beta) * v_old - beta * v
    if negatives:
        per_row = (w * (v_pos - target) ** 2 + (1 - w) * (v_neg - target) ** 2).flatten(1).mean(dim=1)
    else:
        per_row = ((2 * w - 1).clamp(min=0) * (v_pos - target) ** 2).flatten(1).mean(dim=1)
    loss = per_row.mean()
    stats = {"matching_loss": float(loss.detach())}
    if v_ref is not None and kl_coef > 0:
        drift = ((v - v_ref.detach()) ** 2).flatten(1).mean(dim=1).mean()
        loss = loss + kl_coef * drift
        stats["velocity_drift"] = float(drift.detach())
    stats["loss"] = float(loss.detach())
    return LossOutput(loss, stats)
