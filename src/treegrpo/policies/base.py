"""The `Policy` protocol: what the engine needs from an image generator, and nothing more.

A policy wraps one model family (the embedded shapes model, SD3/3.5, FLUX, SD1.5). The engine never
sees text encoders, VAEs or CFG; it hands the policy noisy samples and step times and gets back the
model's guided prediction in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class Schedule:
    """The discretisation a rollout walks, for T steps.

    kind: "flow" (rectified flow, velocity prediction) or "ddim" (epsilon-prediction diffusion).
    times: [T] what the model is called with at step i (sigma for our flow models, the
        diffusers timestep for others; the policy decides).
    sigmas: [T + 1] flow noise levels, 1 -> ~0 (kind "flow").
    alphas_cumprod: [T + 1] alpha-bar at each step's start and the final target (kind "ddim").
    """

    kind: Literal["flow", "ddim"]
    times: torch.Tensor
    sigmas: torch.Tensor | None = None
    alphas_cumprod: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        return int(self.times.shape[0])


@runtime_checkable
class Policy(Protocol):
    """An image generator the engine can roll out and train."""

    latent_shape: tuple[int, ...]  # per-sample shape of x, e.g. (3, 16, 16)

    def schedule(self, num_steps: int) -> Schedule:
        """The step schedule for `num_steps` denoising steps."""

    def encode_prompts(self, prompts: list[str]) -> Any:
        """Encode prompts once (no grad); the result is passed back to `predict`."""

    def predict(self, x: torch.Tensor, times: torch.Tensor, cond: Any, prompt_index: torch.Tensor) -> torch.Tensor:
        """Guided model output (velocity or epsilon) in float32.

        x: [B, *latent_shape]; times: [B] (from `Schedule.times`); prompt_index: [B] long rows of
        `cond`. Differentiable w.r.t. the trainable parameters when grad is enabled.
        """

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Final latents [B, *latent_shape] -> images [B, 3, H, W] float32 in [0, 1]."""

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        """The parameters RL updates."""

    def trainable_module(self) -> torch.nn.Module:
        """The module holding the trainable parameters (checkpoints save its trainable entries)."""

    # Multi-process training also needs `use_wrapped_module(wrapped: nn.Module | None)`: from then on
    # `predict` must call `wrapped` (DDP / FSDP around `trainable_module()`) instead of the bare
    # module, so gradients synchronise. Optional for single-process use (see `attach_wrapped`).


def attach_wrapped(policy: Policy, wrapped: torch.nn.Module) -> None:
    """Make `policy.predict` go through `wrapped` (what accelerate's prepare returned for its
    trainable module). Raises a clear error for a policy without the hook when a wrapper exists."""
    hook = getattr(policy, "use_wrapped_module", None)
    if hook is not None:
        hook(wrapped)
    elif wrapped is not policy.trainable_module():
        raise TypeError(f"{type(policy).__name__} has no use_wrapped_module(wrapped) method, so it cannot train "
                        "with several processes (DDP / FSDP); add one that makes predict call the wrapped module")


def trainable_state_dict(policy: Policy) -> dict[str, torch.Tensor]:
    """Named trainable parameters of a policy (those that require grad: LoRA weights when adapters
    are on), for checkpoints."""
    wanted = {id(p) for p in policy.trainable_parameters() if p.requires_grad}
    return {name: p.detach() for name, p in policy.trainable_module().named_parameters() if id(p) in wanted}


def load_trainable_state_dict(policy: Policy, weights: dict[str, torch.Tensor]) -> None:
    """Load checkpoint weights into the policy's trainable parameters; names and shapes must match."""
    own = trainable_state_dict(policy)
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    params = dict(policy.trainable_module().named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            if params[name].shape != value.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(value.shape)}, model has {tuple(params[name].shape)}")
            params[name].copy_(value)
