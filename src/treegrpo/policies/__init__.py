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


def build_policy(model_config) -> Policy:
    """The policy a `ModelConfig` describes: `load_policy`, plus LoRA adapters when `lora_rank > 0`."""
    policy = load_policy(model_config.family, model_config.pretrained, model_config.guidance_scale, model_config.device)
    if model_config.lora_rank > 0:
        from treegrpo.policies.lora import add_lora

        add_lora(policy.trainable_module(), model_config.lora_rank, model_config.lora_alpha, model_config.lora_targets)
    return policy


__all__ = ["FAMILIES", "Policy", "Schedule", "build_policy", "load_policy", "load_trainable_state_dict",
           "trainable_state_dict"]
