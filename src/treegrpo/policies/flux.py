"""FLUX.1 (`FluxPipeline`): a guidance-distilled rectified-flow transformer on packed latents.

Latents are packed 2x2: the engine's sample is [(H/16)(W/16), 4C] (a token sequence), with fixed
latent image ids. The schedule is the pipeline's: sigmas linspace(1, 1/T, T) with the dynamic shift
mu computed from the image token count; the transformer is called with timestep sigma. The guidance
scale is the distilled guidance embedding (one call per row); true CFG with a negative prompt is
optional (`true_cfg_scale` > 1, cond and uncond in one batched call).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from treegrpo.policies.base import Schedule
from treegrpo.policies.diffusers_common import DiffusersPolicy, PromptEmbeds, flow_schedule, shift_mu


class FluxPolicy(DiffusersPolicy):
    family = "flux"
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")

    def __init__(self, pipe, *, guidance_scale: float | None = None, true_cfg_scale: float = 1.0, **options) -> None:
        # The base class's guidance scale drives CFG batching: for FLUX that is true CFG.
        self.embedded_guidance = 3.5 if guidance_scale is None else float(guidance_scale)
        super().__init__(pipe, guidance_scale=true_cfg_scale, **options)
        side = self.resolution // (self.vae_scale_factor * 2)
        channels = int(self.denoiser.config.in_channels)  # already 4x the VAE channels
        self.latent_shape = (side * side, channels)
        self.latent_side = side
        ids = torch.zeros(side, side, 3)
        ids[..., 1] += torch.arange(side)[:, None]
        ids[..., 2] += torch.arange(side)[None, :]
        self.image_ids = ids.reshape(side * side, 3)

    def _default_resolution(self) -> int:
        return int(self.pipe.default_sample_size) * self.vae_scale_factor

    def latent_multiple(self) -> int:
        return self.vae_scale_factor * 2

    def schedule(self, num_steps: int) -> Schedule:
        config = self.pipe.scheduler.config
        sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps).tolist()
        mu = shift_mu(self.latent_shape[0], config, 1.15)
        return flow_schedule(self.pipe.scheduler, num_steps, sigmas=sigmas, mu=mu)

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        extra = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        pe, pooled, text_ids = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.text_device, **extra)
        cond = {"encoder_hidden_states": pe, "pooled_projections": pooled}
        uncond = None
        if self.do_cfg:
            npe, npooled, _ = self.pipe.encode_prompt(prompt=[self.negative_prompt] * len(prompts), prompt_2=None,
                                                      device=self.text_device, **extra)
            uncond = {"encoder_hidden_states": npe, "pooled_projections": npooled}
        return PromptEmbeds(cond, uncond, shared={"txt_ids": text_ids})

    def _denoise(self, x, t, embeds, shared):
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), self.embedded_guidance, device=x.device, dtype=torch.float32)
        # The pipeline casts the timestep to the latent dtype before dividing by 1000; same here.
        return self.denoiser_call(hidden_states=x, timestep=t.to(x.dtype) / 1000, guidance=guidance,
                             txt_ids=shared["txt_ids"], img_ids=self.image_ids.to(x.device, x.dtype),
                             return_dict=False, **embeds)[0]

    def _to_vae(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape[0], self.latent_side, self.latent_shape[1] // 4
        z = x.view(b, s, s, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, s * 2, s * 2)  # unpack 2x2 patches
        config = self.pipe.vae.config
        return z / config.scaling_factor + (config.shift_factor or 0.0)

    def pack(self, z: torch.Tensor) -> torch.Tensor:
        """VAE-space latents [B, C, 2s, 2s] -> the engine's packed [B, s*s, 4C]."""
        b, c, h, w = z.shape
        return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    def _export_lora(self, directory: Path, layers, metadata) -> None:
        type(self.pipe).save_lora_weights(directory, transformer_lora_layers=layers,
                                          transformer_lora_adapter_metadata=metadata)
