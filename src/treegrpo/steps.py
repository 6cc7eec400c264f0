"""Pure sampler step functions: one denoising transition, its mean, std and Gaussian log-prob.

Conventions (SPEC.md section 2): rectified flow with ``x_sigma = (1 - sigma) x0 + sigma eps`` and
velocity ``v ~ eps - x0``; sigma runs from 1 (noise) to 0. Every function computes in float32 and
accepts ``sigma`` / ``sigma_next`` as floats or ``[B]`` tensors, so one batch may mix nodes from
different steps. Gradients reach the result only through the model output (``v`` or ``eps``): the
sample whose log-prob is evaluated is a constant.

Log-probs are the per-element MEAN of the Gaussian log-density over all non-batch dimensions, as in
every public Flow-GRPO / DanceGRPO implementation (SPEC.md 4.3 explains why that matters for the
softmax backup).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

SdeKind = Literal["flow_grpo", "dance", "cps"]
SDE_KINDS: tuple[str, ...] = ("flow_grpo", "dance", "cps")

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class StepOutput(NamedTuple):
    """sample: [B, ...] the next state; log_prob: [B] per-element-mean log pi(sample | x);
    mean: [B, ...] transition mean (carries the gradient); std: [B, 1, ...] transition std."""

    sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float or [B] tensor as float32 [B, 1, 1, ...], broadcastable against `like`."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    if t.shape != (like.shape[0],):
        raise ValueError(f"expected a float or a [{like.shape[0]}] tensor, got shape {tuple(t.shape)}")
    return t.view(-1, *([1] * (like.ndim - 1)))


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-element-mean Gaussian log-density: [B, ...] x [B, ...] x [B, 1, ...] -> [B] float32."""
    sample = sample.detach().float()
    std = std.float()
    log_density = -((sample - mean.float()) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    return log_density.flatten(1).mean(dim=1)


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor,
               sigma_next: float | torch.Tensor) -> torch.Tensor:
    """Deterministic ODE step ``x + (sigma_next - sigma) v``. x, v: [B, ...] -> [B, ...] float32."""
    x32, v32 = x.float(), v.float()
    dt = _per_sample(sigma_next, x32) - _per_sample(sigma, x32)
    return x32 + dt * v32


def sde_mean_std(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor,
                 sigma_next: float | torch.Tensor, *, kind: SdeKind = "flow_grpo",
                 noise_level: float = 0.7, sigma_max: float | torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [B, ...] and std [B, 1, ...] of one stochastic transition (see `sde_step`)."""
    if kind not in SDE_KINDS:
        raise ValueError(f"unknown SDE kind {kind!r}; choose one of {SDE_KINDS}")
    x32, v32 = x.float(), v.float()
    s_now = _per_sample(sigma, x32)
    s_next = _per_sample(sigma_next, x32)
    dt = s_next - s_now
    if kind == "cps":
        # Coefficient-preserving sampling: re-noise the predicted x0 with the predicted noise.
        x0_hat = x32 - s_now * v32
        x1_hat = x32 + (1 - s_now) * v32
        std = s_next * math.sin(noise_level * math.pi / 2)
        mean = (1 - s_next) * x0_hat + torch.sqrt(torch.clamp(s_next**2 - std**2, min=0.0)) * x1_hat
        return mean, std
    if kind == "flow_grpo":
        # At sigma == 1 the ratio sigma / (1 - sigma) is infinite; use the schedule's second sigma.
        denominator_sigma = s_now
        if sigma_max is not None:
            denominator_sigma = torch.where(s_now >= 1.0, _per_sample(sigma_max, x32), s_now)
        elif bool((s_now >= 1.0).any()):
            raise ValueError("sigma == 1 needs sigma_max (the schedule's second sigma) for kind 'flow_grpo'")
        s = noise_level * torch.sqrt(s_now / (1 - denominator_sigma))
    else:  # "dance": a constant diffusion coefficient
        s = torch.full_like(s_now, noise_level)
    mean = x32 * (1 + s**2 * dt / (2 * s_now)) + v32 * (1 + s**2 * (1 - s_now) / (2 * s_now)) * dt
    std = s * torch.sqrt(-dt)
    return mean, std


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor,
             sigma_next: float | torch.Tensor, *, kind: SdeKind = "flow_grpo", noise_level: float = 0.7,
             sigma_max: float | torch.Tensor | None = None, noise: torch.Tensor | None = None,
             sample: torch.Tensor | None = None, generator: torch.Generator | None = None) -> StepOutput:
    """One stochastic rectified-flow step and the log-prob of its result.

    kind: ``flow_grpo`` (``s = noise_level sqrt(sigma / (1 - sigma))``), ``dance`` (constant
    ``s = noise_level``) or ``cps`` (coefficient-preserving). ``sigma_max`` is the schedule's second
    sigma, used in place of sigma where sigma == 1 (flow_grpo). ``noise`` fixes eps; ``sample``
    evaluates the log-prob of a given next state instead of drawing one.
    x, v: [B, ...]; returns StepOutput with float32 tensors.
    """
    mean, std = sde_mean_std(x, v, sigma, sigma_next, kind=kind, noise_level=noise_level, sigma_max=sigma_max)
    return _draw(mean, std, noise, sample, generator)


def ddim_mean_std(x: torch.Tensor, eps: torch.Tensor, alpha_bar: float | torch.Tensor,
                  alpha_bar_prev: float | torch.Tensor, *, eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [B, ...] and std [B, 1, ...] of the DDIM transition (see `ddim_step`)."""
    x32, e32 = x.float(), eps.float()
    ab = _per_sample(alpha_bar, x32)
    ab_prev = _per_sample(alpha_bar_prev, x32)
    x0_hat = (x32 - torch.sqrt(1 - ab) * e32) / torch.sqrt(ab)
    std = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
    mean = torch.sqrt(ab_prev) * x0_hat + torch.sqrt(torch.clamp(1 - ab_prev - std**2, min=0.0)) * e32
    return mean, std


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_bar: float | torch.Tensor,
              alpha_bar_prev: float | torch.Tensor, *, eta: float = 1.0, noise: torch.Tensor | None = None,
              sample: torch.Tensor | None = None, generator: torch.Generator | None = None) -> StepOutput:
    """DDIM step with stochasticity eta for epsilon-prediction diffusion models (DDPO's formula).

    ``x0^ = (x - sqrt(1 - ab) eps) / sqrt(ab)``, ``std = eta sqrt((1 - ab') / (1 - ab)) sqrt(1 - ab / ab')``,
    ``mean = sqrt(ab') x0^ + sqrt(1 - ab' - std^2) eps`` with ab = alpha-bar now, ab' = at the next
    (less noisy) step. x, eps: [B, ...]; returns StepOutput (float32). eta = 0 is deterministic DDIM.
    """
    mean, std = ddim_mean_std(x, eps, alpha_bar, alpha_bar_prev, eta=eta)
    return _draw(mean, std, noise, sample, generator)


def _draw(mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor | None, sample: torch.Tensor | None,
          generator: torch.Generator | None) -> StepOutput:
    """Draw ``mean + std * noise`` (unless `sample` is given) and score it."""
    if sample is None:
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device=mean.device)
        sample = mean.detach() + std * noise.float()
    return StepOutput(sample.detach().float(), gaussian_log_prob(sample, mean, std), mean, std)
