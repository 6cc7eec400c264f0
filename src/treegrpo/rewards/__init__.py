"""Rewards: the `Reward` protocol, the registry, and the built-in rewards."""

from treegrpo.rewards.base import Reward, available_rewards, build_reward, register_reward

__all__ = ["Reward", "available_rewards", "build_reward", "register_reward"]
