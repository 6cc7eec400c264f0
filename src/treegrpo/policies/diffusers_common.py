"""What the diffusers adapters (SD3, FLUX, SD1.5) share: prompt encoding once per batch, CFG in one
batched call, chunked VAE decoding, mixed precision, gradient checkpointing, LoRA and its export.

A family subclass says how to encode prompts with its pipeline, how to call its denoiser, its step
schedule and how latents become VAE inputs. Everything the engine sees goes through the `Policy`
protocol of `policies.base`: float32 latents in, float32 guided predictions out.
"""

from __future__ import annotations

import copy

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from treegrpo.policies.base import Schedule

DTYPES = {"no": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(mixed_precision: str) -> torch.dtype:
    if mixed_precision not in DTYPES:
        raise ValueError(f"mixed_precision must be one of no, bf16, fp16, got {mixed_precision!r}")
    return DTYPES[mixed_precision]


@dataclass
class PromptEmbeds:
    """Per-prompt text conditioning, computed once: `cond` and (with CFG) `uncond` map a denoiser
    keyword to a tensor whose first dimension is the prompt; `shared` holds keyword tensors that are
    the same for every row (e.g. FLUX's text ids)."""

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None = None
    shared: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return int(next(iter(self.cond.values())).shape[0])

    def to(self, device: torch.device | str) -> "PromptEmbeds":
        def move(d: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
            return None if d is None else {k: v.to(device) for k, v in d.items()}

        return PromptEmbeds(move(self.cond), move(self.uncond), move(self.shared))  # type: ignore[arg-type]

    @staticmethod
    def cat(parts: list["PromptEmbeds"]) -> "PromptEmbeds":
        """Rows of `parts` stacked in order (prompt caching); `shared` is the first part's (the same for all)."""
        def stack(ds: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor] | None:
            return None if ds[0] is None else {k: torch.cat([d[k] for d in ds]) for k in ds[0]}  # type: ignore[index]

        return PromptEmbeds(stack([p.cond for p in parts]), stack([p.uncond for p in parts]),  # type: ignore[arg-type]
                            parts[0].shared)


class DiffusersPolicy:
    """Base of the diffusers adapters. Subclasses set `family`, `default_lora_targets` and implement
    `_encode`, `_denoise`, `schedule`, `_to_vae` and `_export_lora`."""

    family = ""
    default_lora_targets: tuple[str, ...] = ()
    denoiser_name = "transformer"
    default_guidance = 1.0  # CFG scale when none is given

    def __init__(self, pipe: Any, *, resolution: int | None = None, guidance_scale: float | None = None,
                 negative_prompt: str = "", mixed_precision: str = "no", gradient_checkpointing: bool = False,
                 device: str | torch.device | None = None, decode_batch: int = 8, max_sequence_length: int | None = None,
                 offload_text_encoders: bool = False) -> None:
        self.pipe = pipe
        self.dtype = resolve_dtype(mixed_precision)
        self.negative_prompt = negative_prompt or ""
        self.guidance_scale = float(self.default_guidance if guidance_scale is None else guidance_scale)
        self.decode_batch = decode_batch
        self.max_sequence_length = max_sequence_length
        self.vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self.resolution = int(resolution or self._default_resolution())
        if self.resolution % self.latent_multiple() != 0:
            raise ValueError(f"{self.family}: resolution must be a multiple of {self.latent_multiple()}, got {self.resolution}")
        # Frozen parts live in the compute dtype; the denoiser too (LoRA weights are made fp32 in add_lora).
        self.text_encoders_offloaded = offload_text_encoders
        if device is not None or offload_text_encoders:
            self._place(device if device is not None else self.device)
        if pipe.dtype != self.dtype:
            pipe.to(dtype=self.dtype)
        for module in self._components():
            module.requires_grad_(False)
            module.eval()
        self.denoiser.requires_grad_(True)  # full fine-tuning unless LoRA adapters are added
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.lora_config: Any = None
        self._wrapped: torch.nn.Module | None = None  # DDP / FSDP around the denoiser, when training on many processes

    # ------------------------------------------------------------------ pieces
    @property
    def denoiser(self) -> torch.nn.Module:
        own = self.__dict__.get("_own_denoiser")  # set on a frozen_copy() only
        return own if own is not None else getattr(self.pipe, self.denoiser_name)

    def frozen_copy(self) -> "DiffusersPolicy":
        """A frozen copy of the denoiser behind the same pipeline: the KL reference of full
        fine-tuning. Text encoders and VAE are shared, not copied (a deepcopy of the policy would
        copy the whole pipeline)."""
        ref = copy.copy(self)
        ref._own_denoiser = copy.deepcopy(self.denoiser).requires_grad_(False).eval()
        ref._wrapped = None
        return ref

    @property
    def denoiser_call(self) -> torch.nn.Module:
        """What forwards go through: the wrapper from accelerate's prepare (so gradients
        synchronise across processes) or, in one process, the denoiser itself."""
        return self._wrapped if self._wrapped is not None else self.denoiser

    def use_wrapped_module(self, wrapped: torch.nn.Module | None) -> None:
        self._wrapped = None if wrapped is self.denoiser else wrapped

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def _components(self) -> list[torch.nn.Module]:
        return [m for m in self.pipe.components.values() if isinstance(m, torch.nn.Module)]

    def _default_resolution(self) -> int:
        size = getattr(self.pipe, "default_sample_size", None) or self.denoiser.config.sample_size
        return int(size) * self.vae_scale_factor

    def latent_multiple(self) -> int:
        """Image sizes must be multiples of this."""
        return self.vae_scale_factor

    def to(self, device: str | torch.device) -> "DiffusersPolicy":
        self._place(device)
        return self

    def _text_encoder_names(self) -> list[str]:
        return [n for n, m in self.pipe.components.items() if n.startswith("text_encoder") and isinstance(m, torch.nn.Module)]

    def _place(self, device: str | torch.device) -> None:
        """Every component on `device`, except the text encoders when offloaded: those stay on the CPU
        (moved one by one, so they never pass through the accelerator)."""
        text = set(self._text_encoder_names()) if self.text_encoders_offloaded else set()
        for name, module in self.pipe.components.items():
            if isinstance(module, torch.nn.Module):
                module.to("cpu" if name in text else device)

    def offload_text_encoders(self) -> None:
        """Move the text encoders to the CPU for good: prompts are encoded there (on demand, each
        distinct prompt once with the prompt cache) and their embeddings moved to `device`."""
        self.text_encoders_offloaded = True
        self._place(self.device)

    @property
    def text_device(self) -> torch.device:
        """Where the text encoders run (the CPU when offloaded)."""
        encoder = getattr(self.pipe, self._text_encoder_names()[0])
        return next(encoder.parameters()).device

    @property
    def do_cfg(self) -> bool:
        """CFG runs when the scale is above 1, as in the diffusers pipelines."""
        return self.guidance_scale > 1.0

    # ------------------------------------------------------------------ the Policy protocol
    def schedule(self, num_steps: int) -> Schedule:  # pragma: no cover - per family
        raise NotImplementedError

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Text embeddings of `prompts` (and of the negative prompt, once per prompt row, with CFG),
        computed once by the pipeline's own `encode_prompt` on `text_device`, returned on `device`."""
        return self._encode(list(prompts)).to(self.device)

    def predict(self, x: torch.Tensor, times: torch.Tensor, cond: PromptEmbeds, prompt_index: torch.Tensor) -> torch.Tensor:
        """Guided prediction u + w (c - u) in float32; cond and uncond rows in one denoiser call.
        x: [B, *latent_shape]; times: [B] (Schedule.times); prompt_index: [B] rows of `cond`."""
        rows = prompt_index.to(self.device)
        embeds = {k: v[rows] for k, v in cond.cond.items()}
        batch = x.shape[0]
        x_in = x.to(self.device, self.dtype)
        t_in = times.to(self.device, torch.float32).reshape(-1).expand(batch)
        if self.do_cfg:
            assert cond.uncond is not None, "prompts were encoded without CFG"
            embeds = {k: torch.cat([cond.uncond[k][rows], embeds[k]]) for k in embeds}
            x_in, t_in = torch.cat([x_in, x_in]), torch.cat([t_in, t_in])
        out = self._denoise(x_in, t_in, embeds, cond.shared or {}).float()
        if self.do_cfg:
            uncond_out, cond_out = out.chunk(2)
            out = uncond_out + self.guidance_scale * (cond_out - uncond_out)
        return self._model_output_to_engine(out, x, times)

    def _model_output_to_engine(self, out: torch.Tensor, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        return out

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Final latents [B, *latent_shape] -> images [B, 3, H, W] float32 in [0, 1], the VAE run in
        chunks of `decode_batch` (its activations dominate memory at high resolution)."""
        vae = self.pipe.vae
        images = []
        for s in range(0, x.shape[0], self.decode_batch):
            z = self._to_vae(x[s:s + self.decode_batch].to(self.device, torch.float32))
            image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
            images.append((image.float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(images)

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def trainable_module(self) -> torch.nn.Module:
        return self.denoiser

    # ------------------------------------------------------------------ LoRA
    def add_lora(self, rank: int, alpha: float, targets: list[str] | None = None) -> int:
        """peft LoRA adapters on the denoiser (targets default to the family's attention
        projections); the adapter weights train in float32 whatever the base dtype. Returns the
        number of trainable parameters."""
        from treegrpo.policies.lora import add_lora

        targets = list(targets) if targets else list(self.default_lora_targets)
        add_lora(self.denoiser, rank, alpha, targets)
        for p in self.denoiser.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self.lora_config = self.denoiser.peft_config["default"]
        return sum(p.numel() for p in self.trainable_parameters())

    def save_denoiser(self, directory: str | Path) -> Path:
        """Write the (fully fine-tuned) denoiser with its own `save_pretrained`, atomically (temp folder,
        then rename), so `type(denoiser).from_pretrained(directory)` reads it into a plain pipeline."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            self.denoiser.save_pretrained(tmp, safe_serialization=True)
            _replace_dir(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    def save_lora_weights(self, directory: str | Path) -> Path:
        """Write the LoRA adapters where `pipe.load_lora_weights(directory)` reads them (diffusers'
        own format, with the adapter config so rank and alpha survive). Atomic: written to a temp
        folder, then renamed over `directory`."""
        if self.lora_config is None:
            raise ValueError("this policy has no LoRA adapters to save (set model.lora_rank > 0)")
        from peft.utils import get_peft_model_state_dict

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            layers = get_peft_model_state_dict(self.denoiser)
            layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
            self._export_lora(tmp, layers, self.lora_config.to_dict())
            _replace_dir(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    # ------------------------------------------------------------------ per family
    def _encode(self, prompts: list[str]) -> PromptEmbeds:  # pragma: no cover
        raise NotImplementedError

    def _denoise(self, x: torch.Tensor, t: torch.Tensor, embeds: dict[str, torch.Tensor],
                 shared: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _to_vae(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _export_lora(self, directory: Path, layers: dict[str, torch.Tensor], metadata: dict) -> None:  # pragma: no cover
        raise NotImplementedError


def _replace_dir(new: Path, directory: Path) -> None:
    """Put the finished folder `new` where `directory` is, keeping the old one until the rename is done."""
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        directory.rename(old)
    new.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def flow_schedule(scheduler: Any, num_steps: int, *, sigmas: list[float] | None = None, mu: float | None = None) -> Schedule:
    """A flow-matching schedule exactly as the pipeline's scheduler sets it: times = its timesteps
    (sigma * num_train_timesteps), sigmas = its [T + 1] sigmas (shift included, final 0)."""
    scheduler = type(scheduler).from_config(scheduler.config)  # a private copy: the pipeline's own stays untouched
    kwargs: dict[str, Any] = {}
    if mu is not None:
        kwargs["mu"] = mu
    if sigmas is not None:
        scheduler.set_timesteps(sigmas=sigmas, device="cpu", **kwargs)
    else:
        scheduler.set_timesteps(num_steps, device="cpu", **kwargs)
    return Schedule(kind="flow", times=scheduler.timesteps.float().clone(), sigmas=scheduler.sigmas.float().clone())


def shift_mu(image_seq_len: int, config: Any, max_shift_default: float) -> float:
    """The dynamic-shift exponent mu, linear in the image token count between the scheduler's
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as the pipelines compute it."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", max_shift_default)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len
