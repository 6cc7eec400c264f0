"""Stable Diffusion 1.x (`StableDiffusionPipeline`): an epsilon-prediction UNet, stepped with DDIM.

The timesteps are those `DDIMScheduler` (built from the pipeline's scheduler config) picks for T
steps; the engine's DDIM step needs alpha-bar at each timestep and at the one DDIM steps to next
(`t - num_train_timesteps // T`, or the scheduler's final alpha-bar past 0). v-prediction models are
converted to epsilon: eps = sqrt(ab) v + sqrt(1 - ab) x.
"""

from __future__ import annotations

from pathlib import Path

import torch

from treegrpo.policies.base import Schedule
from treegrpo.policies.diffusers_common import DiffusersPolicy, PromptEmbeds


class SD15Policy(DiffusersPolicy):
    family = "sd15"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    default_guidance = 7.5
    denoiser_name = "unet"

    def __init__(self, pipe, **options) -> None:
        from diffusers import DDIMScheduler

        super().__init__(pipe, **options)
        side = self.resolution // self.vae_scale_factor
        self.latent_shape = (int(self.denoiser.config.in_channels), side, side)
        self.ddim = DDIMScheduler.from_config(pipe.scheduler.config)
        c = self.ddim.config
        if c.get("clip_sample", False) or c.get("thresholding", False):
            # Our DDIM step (SPEC.md) has no x0 clipping; a scheduler that clips would sample differently.
            raise ValueError("sd15: the pipeline's scheduler config sets clip_sample or thresholding, which the "
                             "engine's DDIM step does not do; use a scheduler config with clip_sample: false")
        self.prediction_type = c.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"sd15: prediction_type {self.prediction_type!r} is not supported (epsilon or v_prediction)")
        self.alphas_cumprod = self.ddim.alphas_cumprod.float()

    def schedule(self, num_steps: int) -> Schedule:
        self.ddim.set_timesteps(num_steps)
        timesteps = self.ddim.timesteps.long()
        prev = timesteps - self.ddim.config.num_train_timesteps // num_steps
        final = float(self.ddim.final_alpha_cumprod)
        alpha_bar = [float(self.alphas_cumprod[int(t)]) for t in timesteps]
        alpha_next = [float(self.alphas_cumprod[int(p)]) if p >= 0 else final for p in prev]
        if any(a != b for a, b in zip(alpha_bar[1:], alpha_next[:-1])):
            raise ValueError("sd15: this timestep spacing does not chain (step i must end where step i+1 starts)")
        return Schedule(kind="ddim", times=timesteps.float(), alphas_cumprod=torch.tensor(alpha_bar + alpha_next[-1:]))

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        pe, npe = self.pipe.encode_prompt(prompts, self.text_device, 1, self.do_cfg,
                                          negative_prompt=[self.negative_prompt] * len(prompts) if self.do_cfg else None)
        return PromptEmbeds({"encoder_hidden_states": pe}, {"encoder_hidden_states": npe} if self.do_cfg else None)

    def _denoise(self, x, t, embeds, shared):
        return self.denoiser_call(x, t.long(), return_dict=False, **embeds)[0]

    def _model_output_to_engine(self, out: torch.Tensor, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return out
        ab = self.alphas_cumprod.to(out.device)[times.to(out.device).long()].view(-1, *([1] * (out.ndim - 1)))
        return ab.sqrt() * out + (1 - ab).sqrt() * x.to(out.device).float()

    def _to_vae(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.pipe.vae.config.scaling_factor

    def _export_lora(self, directory: Path, layers, metadata) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers

        type(self.pipe).save_lora_weights(directory, unet_lora_layers=convert_state_dict_to_diffusers(layers),
                                          unet_lora_adapter_metadata=metadata)
