"""The `Reward` protocol and a registry of rewards by name.

A reward maps a batch of images and their prompts to one float per image. Rewards register a
factory under a name; configs refer to rewards by that name (no if/elif chains).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import torch


@runtime_checkable
class Reward(Protocol):
    """images: [B, 3, H, W] float32 in [0, 1]; prompts: B strings -> [B] float32 scores."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator: register a reward factory (a class or function returning a Reward) under `name`."""

    def decorator(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_rewards() -> list[str]:
    _import_builtin_rewards()
    return sorted(_REGISTRY)


def build_reward(name: str, **options) -> Reward:
    """Instantiate the reward registered as `name`; unknown names list the closest valid ones."""
    _import_builtin_rewards()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"unknown reward {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**options)


def reward_options(name: str) -> list[str]:
    """The option names (constructor keywords) the reward registered as `name` accepts."""
    _import_builtin_rewards()
    params = inspect.signature(_REGISTRY[name]).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def build_rewards(names: list[str] | tuple[str, ...] | set[str], options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Reward]:
    """{name: reward} for each name, built with its options from ``reward.options`` (if any)."""
    options = options or {}
    return {name: build_reward(name, **dict(options.get(name, {}))) for name in sorted(names)}


def _import_builtin_rewards() -> None:
    # Importing the modules runs their @register_reward decorators.
    # The pretrained-model rewards import transformers only when one of them is built.
    import treegrpo.rewards.imagereward  # noqa: F401
    import treegrpo.rewards.preference  # noqa: F401
    import treegrpo.rewards.compose  # noqa: F401
    import treegrpo.rewards.remote  # noqa: F401
    import treegrpo.rewards.shapes  # noqa: F401
