"""Rewards: the `Reward` protocol, the registry, and the built-in rewards."""

from treegrpo.rewards.base import Reward, available_rewards, build_reward, build_rewards, register_reward, reward_options

__all__ = ["Reward", "available_rewards", "build_reward", "build_rewards", "register_reward", "reward_options"]
