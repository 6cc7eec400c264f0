"""The clipped policy-gradient surrogate per edge, the optional KL term, and diagnostics.

Per trained edge e (SPEC.md section 5): ``ratio = exp(log pi_theta(e) - log pi_old(e))``,
``A~ = clip(A, -adv_clip, adv_clip)``, ``loss_e = max(-A~ ratio, -A~ clip(ratio, 1 - eps, 1 + eps))``.
Edge losses are summed over a node's edges and averaged over nodes (the released code's reduction:
one model forward at a node serves all its k edges). The optional KL to a reference policy is
``beta * mean((mu_theta - mu_ref)^2) / (2 std^2)`` per node, with the real transition std.
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


def policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantage: torch.Tensor,
                edge_node: torch.Tensor, num_nodes: int, *, clip_range: float = 1e-4, adv_clip: float = 5.0,
                kl: torch.Tensor | None = None, kl_coef: float = 0.0) -> LossOutput:
    """The training objective of one minibatch.

    log_prob, old_log_prob, advantage, edge_node: [E]; kl: optional [num_nodes] per-node KL to the
    reference (`kl_to_reference`), weighted by `kl_coef`.
    """
    edge_loss, ratio = clipped_surrogate(log_prob, old_log_prob, advantage, clip_range=clip_range, adv_clip=adv_clip)
    loss = per_node_mean(edge_loss, edge_node, num_nodes)
    stats = surrogate_stats(log_prob, old_log_prob, ratio, clip_range)
    stats["policy_loss"] = float(loss.detach())
    if kl is not None and kl_coef > 0:
        kl_term = kl.mean()
        loss = loss + kl_coef * kl_term
        stats["kl_ref"] = float(kl_term.detach())
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
