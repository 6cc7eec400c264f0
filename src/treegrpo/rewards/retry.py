"""Retries for rewards that fail transiently (a remote scorer timing out, a GPU hiccup).

A failing call is retried `retries` times with a delay that doubles each time; if it still fails,
one `RewardError` names the reward, the prompts of the failing batch and the last error.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

import torch

from treegrpo.rewards.base import Reward


class RewardError(RuntimeError):
    """A reward model kept failing on a batch after its retries."""


class RetryingReward:
    """Wraps a Reward: same call signature, retried on any Exception."""

    def __init__(self, name: str, reward: Reward, retries: int = 2, delay: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.name, self.reward, self.retries, self.delay, self.sleep = name, reward, retries, delay, sleep

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        delay = self.delay
        for attempt in range(self.retries + 1):
            try:
                return self.reward(images, prompts)
            except Exception as err:  # noqa: BLE001 - any failure of a user's reward is retried
                last = err
                if attempt < self.retries:
                    self.sleep(delay)
                    delay *= 2
        unique = list(dict.fromkeys(prompts))
        shown = ", ".join(repr(p) for p in unique[:3]) + (f" and {len(unique) - 3} more" if len(unique) > 3 else "")
        raise RewardError(f"reward {self.name!r} failed {self.retries + 1} times on prompt {shown}: "
                          f"{type(last).__name__}: {last}") from last

    def __getattr__(self, attr: str):  # the wrapped reward's own attributes (e.g. device) stay reachable
        if attr == "reward":
            raise AttributeError(attr)
        return getattr(self.reward, attr)


def with_retries(rewards: Mapping[str, Reward], retries: int, delay: float) -> dict[str, Reward]:
    """{name: reward} with each reward wrapped in RetryingReward."""
    return {name: RetryingReward(name, reward, retries, delay) for name, reward in rewards.items()}
