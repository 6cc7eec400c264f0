"""Policies: adapters from model families to the engine's `Policy` protocol, and `load_policy`."""

from __future__ import annotations

from treegrpo.policies.base import Policy, Schedule, load_trainable_state_dict, trainable_state_dict

FAMILIES = ("shapes",)


def load_policy(family: str = "shapes", pretrained: str = "base", guidance_scale: float | None = None,
                device: str = "cpu") -> Policy:
    """Build the policy of a model family from "base" (shipped weights) or a local path."""
    if family == "shapes":
        from treegrpo.worlds.shapes_model import ShapesPolicy

        path = None if pretrained in ("base", "", None) else pretrained
        return ShapesPolicy.from_pretrained(path, guidance_scale=guidance_scale).to(device)
    raise ValueError(f"unknown model family {family!r}; available: {', '.join(FAMILIES)}")


__all__ = ["FAMILIES", "Policy", "Schedule", "load_policy", "load_trainable_state_dict", "trainable_state_dict"]
