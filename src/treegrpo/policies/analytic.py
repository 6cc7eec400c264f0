"""A closed-form policy for tests and benchmarks of the engine.

For data ``x0 ~ N(0, s^2 I)`` and ``x_sigma = (1 - sigma) x0 + sigma eps`` the exact velocity is
``v(x, sigma) = E[eps - x0 | x] = (sigma - (1 - sigma) s^2) / ((1 - sigma)^2 s^2 + sigma^2) * x``.
A trainable `gain` multiplies it, so the policy has one parameter to take gradients through.
"""

from __future__ import annotations

from typing import Iterable

import torch

from treegrpo.policies.base import Schedule


def linear_sigmas(num_steps: int) -> torch.Tensor:
    """[T + 1] sigmas from 1 to 0, evenly spaced."""
    return torch.linspace(1.0, 0.0, num_steps + 1)


class GaussianPolicy(torch.nn.Module):
    """Exact rectified-flow velocity of an isotropic Gaussian with std `data_std`."""

    def __init__(self, data_std: float = 0.5, latent_shape: tuple[int, ...] = (1, 8, 8),
                 sigmas: torch.Tensor | None = None) -> None:
        super().__init__()
        self.data_std = data_std
        self.latent_shape = latent_shape
        self.gain = torch.nn.Parameter(torch.tensor(1.0))
        self._sigmas = sigmas
        self.calls = 0  # model evaluations (rows), counted to check the rollout's accounting
        self._wrapped: list[torch.nn.Module] = []  # a list, so a DDP wrapper of self is no submodule

    def use_wrapped_module(self, wrapped: torch.nn.Module | None) -> None:
        """Compute through `wrapped` (DDP around this module) so gradients synchronise."""
        self._wrapped = [] if wrapped is None or wrapped is self else [wrapped]

    def forward(self, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        sigma = times.float().view(-1, *([1] * (x.ndim - 1)))
        s2 = self.data_std**2
        coef = (sigma - (1 - sigma) * s2) / ((1 - sigma) ** 2 * s2 + sigma**2)
        return self.gain * coef * x

    def schedule(self, num_steps: int) -> Schedule:
        sigmas = linear_sigmas(num_steps) if self._sigmas is None else self._sigmas
        if sigmas.shape[0] != num_steps + 1:
            raise ValueError(f"this policy's schedule has {sigmas.shape[0] - 1} steps, not {num_steps}")
        return Schedule(kind="flow", times=sigmas[:-1], sigmas=sigmas)

    def encode_prompts(self, prompts: list[str]) -> None:
        return None

    def predict(self, x: torch.Tensor, times: torch.Tensor, cond: object, prompt_index: torch.Tensor) -> torch.Tensor:
        self.calls += x.shape[0]
        return (self._wrapped[0] if self._wrapped else self)(x, times)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        return [self.gain]

    def trainable_module(self) -> torch.nn.Module:
        return self
