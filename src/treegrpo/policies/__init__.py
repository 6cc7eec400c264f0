"""Policies: adapters from model families to the engine's `Policy` protocol."""

from treegrpo.policies.base import Policy, Schedule

__all__ = ["Policy", "Schedule"]
