"""Policies: adapters from model families to the engine's `Policy` protocol, and `load_policy`."""

from __future__ import annotations

from treegrpo.policies.base import Policy, Schedule, load_trainable_state_dict, trainable_state_dict
from treegrpo.policies.loading import FAMILIES, family_of, load_pipeline, load_policy
from treegrpo.policies.prompt_cache import PromptCache, enable_prompt_cache

# LoRA targets of the embedded shapes model (attention projections and the ResNet convolutions);
# the diffusers families carry their own defaults (`default_lora_targets`).
SHAPES_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


def build_policy(model_config) -> Policy:
    """The policy a `ModelConfig` describes: `load_policy`, plus LoRA adapters when `lora_rank > 0`."""
    c = model_config
    options = {"guidance_scale": c.guidance_scale, "device": c.device}
    if c.family != "shapes":
        options.update(resolution=c.resolution, negative_prompt=c.negative_prompt, mixed_precision=c.mixed_precision,
                       gradient_checkpointing=c.gradient_checkpointing, true_cfg_scale=c.true_cfg_scale,
                       offload_text_encoders=c.offload_text_encoders)
    policy = load_policy(c.pretrained, c.family, **options)
    if c.lora_rank > 0:
        if hasattr(policy, "add_lora"):
            policy.add_lora(c.lora_rank, c.lora_alpha, c.lora_targets)
        else:
            from treegrpo.policies.lora import add_lora

            add_lora(policy.trainable_module(), c.lora_rank, c.lora_alpha, c.lora_targets or SHAPES_LORA_TARGETS)
    return policy


__all__ = ["FAMILIES", "Policy", "PromptCache", "SHAPES_LORA_TARGETS", "Schedule", "build_policy", "enable_prompt_cache",
           "family_of", "load_pipeline", "load_policy", "load_trainable_state_dict", "trainable_state_dict"]
