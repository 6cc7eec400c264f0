"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): a rectified-flow MMDiT.

The schedule is the pipeline's FlowMatchEulerDiscreteScheduler (static shift, or dynamic shift from
the image token count when its config asks); the transformer is called with timestep sigma * 1000;
latents are VAE latents normalised as (z - shift_factor) * scaling_factor.
"""

from __future__ import annotations

from pathlib import Path

import torch

from treegrpo.policies.base import Schedule
from treegrpo.policies.diffusers_common import DiffusersPolicy, PromptEmbeds, flow_schedule, shift_mu


class SD3Policy(DiffusersPolicy):
    family = "sd3"
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
    default_guidance = 4.5

    def __init__(self, pipe, **options) -> None:
        super().__init__(pipe, **options)
        side = self.resolution // self.vae_scale_factor
        self.latent_shape = (int(self.denoiser.config.in_channels), side, side)

    def latent_multiple(self) -> int:
        return self.vae_scale_factor * int(self.denoiser.config.patch_size)

    def schedule(self, num_steps: int) -> Schedule:
        config = self.pipe.scheduler.config
        mu = None
        if config.get("use_dynamic_shifting", False):
            patch = int(self.denoiser.config.patch_size)
            mu = shift_mu((self.latent_shape[1] // patch) * (self.latent_shape[2] // patch), config, 1.16)
        return flow_schedule(self.pipe.scheduler, num_steps, mu=mu)

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        n = len(prompts)
        extra = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        pe, npe, pooled, npooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.text_device, do_classifier_free_guidance=self.do_cfg,
            negative_prompt=[self.negative_prompt] * n if self.do_cfg else None, **extra)
        cond = {"encoder_hidden_states": pe, "pooled_projections": pooled}
        uncond = {"encoder_hidden_states": npe, "pooled_projections": npooled} if self.do_cfg else None
        return PromptEmbeds(cond, uncond)

    def _denoise(self, x, t, embeds, shared):
        # float32 timesteps, as the pipeline passes them (bf16 would round 960.1 to 960)
        return self.denoiser_call(hidden_states=x, timestep=t, return_dict=False, **embeds)[0]

    def _to_vae(self, x: torch.Tensor) -> torch.Tensor:
        config = self.pipe.vae.config
        return x / config.scaling_factor + (config.shift_factor or 0.0)

    def _export_lora(self, directory: Path, layers, metadata) -> None:
        type(self.pipe).save_lora_weights(directory, transformer_lora_layers=layers,
                                          transformer_lora_adapter_metadata=metadata)
