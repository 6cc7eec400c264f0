"""The embedded base model of the shapes world: a tiny text-conditioned rectified-flow model.

Parts (all stock Hugging Face classes, configured small; nothing here is a hand-written network):

- tokenizer: a word-level `tokenizers` model over the shapes world's words plus specials, built in
  memory and wrapped in `transformers.PreTrainedTokenizerFast` (`<bos> words <eos> <pad>...`, fixed
  length `MAX_LENGTH`; unknown words map to `<unk>`).
- text encoder: `transformers.CLIPTextModel` (hidden 64, 2 layers); its `last_hidden_state`
  [P, MAX_LENGTH, 64] is the cross-attention context.
- denoiser: `diffusers.UNet2DConditionModel`. For speed on CPU the 16x16 RGB image is folded into
  an 8x8 grid of 2x2 patches (`pixel_unshuffle`, 12 channels) before the UNet and unfolded after;
  the UNet itself runs at 8x8 (levels 8x8 and 4x4, cross-attention at 4x4 only).

Convention (SD3 / Flow-GRPO): images x0 in [-1, 1], `x_sigma = (1 - sigma) x0 + sigma eps`, the
network predicts the velocity `v = eps - x0`; the UNet receives `sigma * TIME_SCALE` as timestep.
Classifier-free guidance `v = v_u + w (v_c - v_u)` runs cond and uncond in one batched UNet call; the
unconditional context is the encoding of the empty prompt (trained with 10% prompt dropout).

The step schedule comes from diffusers' `FlowMatchEulerDiscreteScheduler` with `shift` (default 3.0,
the SD3 value: it spends more of the T steps at high noise, where the shape is decided, which is
also where RL has something to change); the last sigma is 0. Default guidance scale 3.0 (ODE shape
accuracy 0.63 against 0.61 at w = 2, colour and background 1.0 at both).

Size and speed: UNet 0.50 M parameters, text encoder 0.07 M. On 2 shared CPU cores one UNet
forward at batch 256 takes ~40-50 ms (~70-100 ms for a guided `predict`, which runs batch 512).

Shipped weights (`assets/shapes_base`, made by `treegrpo.worlds.pretrain.pretrain_shapes`), ODE
sampling with T = 10, w = 3 over the 54 prompts x 16 held-out seeds, scored by
`treegrpo.rewards.shapes.shapes_accuracy`: colour 1.000, background 1.000, shape 0.631 (circles
0.71, squares 0.33, triangles 0.85: squares come out with rounded corners). Good but imperfect on
purpose, so that RL has something real to fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from treegrpo.policies.base import Schedule
from treegrpo.worlds.shapes import BACKGROUNDS, COLOURS, SHAPES, ShapePrompt

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "shapes_base"
MAX_LENGTH = 10
TIME_SCALE = 1000.0
PATCH = 2  # pixel_unshuffle factor: 16x16x3 <-> 8x8x12
DEFAULT_GUIDANCE = 3.0
DEFAULT_SHIFT = 3.0
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
POLICY_CONFIG = "policy_config.json"


def world_words() -> list[str]:
    """Every word the shapes world's prompts use, in a fixed order."""
    return ["a", "an", "on", "background", *COLOURS, *SHAPES, *BACKGROUNDS]


def build_tokenizer(max_length: int = MAX_LENGTH):
    """Word-level tokenizer over `world_words()`; output ids [P, max_length] with bos/eos/pad.

    Lower-cases, splits on whitespace and punctuation; unknown words become `<unk>`; longer inputs
    are truncated to `max_length` (the `<eos>` is kept).
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *world_words()])}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=max_length, padding_side="right",
    )


def build_text_encoder(vocab_size: int, hidden: int = 64, layers: int = 2, max_length: int = MAX_LENGTH):
    """A small `CLIPTextModel` (random init): ids [P, L] -> last_hidden_state [P, L, hidden]."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=max_length, pad_token_id=0, bos_token_id=2,
        eos_token_id=3, projection_dim=hidden,
    )
    return CLIPTextModel(config)


def build_unet(cross_attention_dim: int = 64):
    """A small `UNet2DConditionModel` on the 2x2-patch grid: [B, 12, 8, 8] -> [B, 12, 8, 8].

    Levels 8x8 (32 channels, no attention) and 4x4 (48 channels, cross-attention to the text, 2
    heads; `attention_head_dim` is diffusers' legacy name for the number of heads), no mid block.
    `only_cross_attention` turns the blocks' self-attention into a second cross-attention: at 4x4
    self-attention buys little and costs a lot on CPU.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16 // PATCH, in_channels=3 * PATCH**2, out_channels=3 * PATCH**2,
        block_out_channels=(32, 48), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type=None, only_cross_attention=True, attention_head_dim=2, norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
    )


@dataclass
class ShapesCond:
    """Encoded prompts: cond [P, L, D] (one row per prompt), uncond [1, L, D] (the empty prompt)."""

    cond: torch.Tensor
    uncond: torch.Tensor

    def __len__(self) -> int:
        return int(self.cond.shape[0])

    def to(self, device: torch.device | str) -> "ShapesCond":
        return ShapesCond(cond=self.cond.to(device), uncond=self.uncond.to(device))

    @staticmethod
    def cat(parts: list["ShapesCond"]) -> "ShapesCond":
        """Prompt rows of `parts` in order, the first part's uncond (the same empty prompt); prompt caching."""
        return ShapesCond(cond=torch.cat([p.cond for p in parts]), uncond=parts[0].uncond)


def _prompt_texts(prompts: Sequence[str | ShapePrompt]) -> list[str]:
    return [p.text if isinstance(p, ShapePrompt) else str(p) for p in prompts]


class ModelLoadError(ValueError):
    """Model weights exist but cannot be loaded (truncated, not safetensors, incomplete folder)."""


class ShapesPolicy:
    """The embedded base model as a `treegrpo.policies.base.Policy` (rectified flow, velocity).

    `unet` is trained by RL (`trainable_parameters`); `text_encoder` stays frozen.
    """

    latent_shape: tuple[int, ...] = (3, 16, 16)

    def __init__(self, unet=None, text_encoder=None, tokenizer=None, guidance_scale: float = DEFAULT_GUIDANCE,
                 shift: float = DEFAULT_SHIFT) -> None:
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
        self.text_encoder = text_encoder if text_encoder is not None else build_text_encoder(len(self.tokenizer))
        self.unet = unet if unet is not None else build_unet(self.text_encoder.config.hidden_size)
        self.text_encoder.requires_grad_(False)
        self.text_encoder.eval()
        self.unet.eval()
        self.guidance_scale = float(guidance_scale)
        self.shift = float(shift)
        self._unet_call: torch.nn.Module | None = None  # the UNet as wrapped for training (DDP), if any

    # ---------------------------------------------------------------- loading and saving
    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, guidance_scale: float | None = None,
                        shift: float | None = None) -> "ShapesPolicy":
        """Load weights saved by `save_pretrained` (default: the shipped `assets/shapes_base`), offline.

        guidance_scale / shift: override the values stored in the checkpoint's policy config.
        """
        from diffusers import UNet2DConditionModel
        from diffusers.utils import logging as df_logging
        from transformers import CLIPTextModel, PreTrainedTokenizerFast
        from transformers.utils import logging as hf_logging

        path = Path(path) if path is not None else DEFAULT_WEIGHTS
        config_file = path / POLICY_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(
                f"no shapes-model checkpoint at {path} (missing {POLICY_CONFIG}); pass the folder written by "
                f"ShapesPolicy.save_pretrained or `treegrpo pretrain shapes`, or None for the shipped weights"
            )
        try:
            options = json.loads(config_file.read_text())
            # use_safetensors: never fall back to pickled .bin weights (loading those can run code)
            level = df_logging.get_verbosity()
            df_logging.set_verbosity(df_logging.CRITICAL)  # its failure is in our one-line error below, not logged too
            try:
                unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True, use_safetensors=True)
            finally:
                df_logging.set_verbosity(level)
            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # a 36-tensor model needs no "Loading weights" bar
            try:
                text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True,
                                                             use_safetensors=True)
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path / "tokenizer", local_files_only=True)
        except Exception as err:  # missing / truncated / pickled-only files: one message, not a library traceback
            raise ModelLoadError(f"cannot load the shapes model from {path}: {type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''} (it needs policy_config.json and "
                                 f"unet/, text_encoder/ as safetensors, tokenizer/, as written by save_pretrained)") from None
        return cls(
            unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
            guidance_scale=options.get("guidance_scale", DEFAULT_GUIDANCE) if guidance_scale is None else guidance_scale,
            shift=options.get("shift", DEFAULT_SHIFT) if shift is None else shift,
        )

    def save_pretrained(self, path: str | Path, extra: dict | None = None) -> None:
        """Write unet/ (diffusers), text_encoder/ (transformers), tokenizer/ and policy_config.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / "unet", safe_serialization=True)
        self.text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(path / "tokenizer")
        options = {"guidance_scale": self.guidance_scale, "shift": self.shift, "time_scale": TIME_SCALE,
                   "patch": PATCH, "max_length": MAX_LENGTH, **(extra or {})}
        (path / POLICY_CONFIG).write_text(json.dumps(options, indent=2) + "\n")

    def use_wrapped_module(self, wrapped: torch.nn.Module | None) -> None:
        """Run the UNet through `wrapped` (e.g. DDP around `self.unet`, from accelerate's prepare)
        so its forwards take part in gradient synchronisation; None = the plain UNet."""
        self._unet_call = wrapped

    def to(self, device: torch.device | str) -> "ShapesPolicy":
        self.unet.to(device)
        self.text_encoder.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ---------------------------------------------------------------- Policy protocol
    def schedule(self, num_steps: int) -> Schedule:
        """Flow schedule: sigmas [T + 1] from 1 down to exactly 0; times = sigmas[:-1]."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=self.shift)
        scheduler.set_timesteps(num_steps)
        sigmas = scheduler.sigmas.detach().to(torch.float32).clone()[: num_steps + 1]
        sigmas[-1] = 0.0
        return Schedule(kind="flow", times=sigmas[:-1].clone(), sigmas=sigmas)

    def tokenize(self, prompts: Sequence[str | ShapePrompt]) -> torch.Tensor:
        """Prompts -> ids [P, MAX_LENGTH] long."""
        enc = self.tokenizer(_prompt_texts(prompts), padding="max_length", truncation=True,
                             max_length=MAX_LENGTH, return_tensors="pt")
        return enc["input_ids"]

    def text_states(self, prompts: Sequence[str | ShapePrompt]) -> torch.Tensor:
        """Text-encoder states [P, MAX_LENGTH, D] (grad flows if enabled and the encoder is trainable)."""
        ids = self.tokenize(prompts).to(self.device)
        return self.text_encoder(input_ids=ids).last_hidden_state

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str | ShapePrompt]) -> ShapesCond:
        """Encode prompts once: cond [P, L, D] and the empty prompt's uncond [1, L, D]."""
        states = self.text_states([*_prompt_texts(prompts), ""])
        return ShapesCond(cond=states[:-1].float(), uncond=states[-1:].float())

    def velocity(self, x: torch.Tensor, times: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Raw UNet velocity: x [B, 3, 16, 16], times [B] sigma in [0, 1], context [B, L, D] -> [B, 3, 16, 16]."""
        h = F.pixel_unshuffle(x, PATCH)  # [B, 12, 8, 8]
        t = (times.to(device=x.device, dtype=x.dtype) * TIME_SCALE).reshape(-1).expand(x.shape[0])
        unet = self._unet_call if self._unet_call is not None else self.unet
        out = unet(h, t, encoder_hidden_states=context.to(x.dtype)).sample
        return F.pixel_shuffle(out, PATCH)

    def predict(self, x: torch.Tensor, times: torch.Tensor, cond: ShapesCond, prompt_index: torch.Tensor,
                guidance_scale: float | None = None) -> torch.Tensor:
        """Guided velocity [B, 3, 16, 16] float32.

        x: [B, 3, 16, 16]; times: [B] sigmas (or one shared scalar); prompt_index: [B] long rows of
        `cond.cond`. Cond and uncond go through one UNet call of batch 2B (only B when the guidance
        scale is 1); `guidance_scale` overrides `self.guidance_scale` for this call.
        """
        w = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        x = x.float()
        times = times.to(device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        ctx_c = cond.cond[prompt_index.to(cond.cond.device)]
        if w == 1.0:
            return self.velocity(x, times, ctx_c).float()
        ctx_u = cond.uncond.expand(x.shape[0], -1, -1)
        v = self.velocity(torch.cat([x, x]), torch.cat([times, times]), torch.cat([ctx_c, ctx_u]))
        v_c, v_u = v.float().chunk(2)
        return v_u + w * (v_c - v_u)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents in [-1, 1] [B, 3, 16, 16] -> images [B, 3, 16, 16] float32 in [0, 1]."""
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        """The UNet's parameters (the text encoder is frozen during RL)."""
        return self.unet.parameters()

    def trainable_module(self) -> torch.nn.Module:
        """The module holding the trainable parameters (the UNet)."""
        return self.unet

    def num_parameters(self) -> dict[str, int]:
        return {"unet": sum(p.numel() for p in self.unet.parameters()),
                "text_encoder": sum(p.numel() for p in self.text_encoder.parameters())}


def initial_noise(batch: int, seeds: Sequence[int] | None = None, generator: torch.Generator | None = None,
                  shape: tuple[int, ...] = (3, 16, 16)) -> torch.Tensor:
    """Gaussian noise [B, *shape]: one `torch.Generator` per seed if `seeds`, else from `generator`."""
    if seeds is not None:
        if len(seeds) != batch:
            raise ValueError(f"got {len(seeds)} seeds for {batch} prompts")
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return torch.randn((batch, *shape), generator=generator)


@torch.no_grad()
def sample_ode(policy: ShapesPolicy, prompts: Sequence[str | ShapePrompt], seeds: Sequence[int] | None = None,
               generator: torch.Generator | None = None, num_steps: int = 10,
               guidance_scale: float | None = None, batch_size: int = 512) -> torch.Tensor:
    """Plain Euler ODE sampling (`x <- x + (sigma_next - sigma) v`): images [B, 3, 16, 16] in [0, 1]."""
    texts = _prompt_texts(prompts)
    unique = sorted(set(texts))
    cond = policy.encode_prompts(unique)
    index = torch.tensor([unique.index(t) for t in texts], dtype=torch.long)
    x = initial_noise(len(texts), seeds, generator, policy.latent_shape).to(policy.device)
    sigmas = policy.schedule(num_steps).sigmas
    out = []
    for start in range(0, len(texts), batch_size):
        xb, ib = x[start:start + batch_size], index[start:start + batch_size]
        for i in range(num_steps):
            t = torch.full((xb.shape[0],), float(sigmas[i]), device=xb.device)
            v = policy.predict(xb, t, cond, ib, guidance_scale=guidance_scale)
            xb = xb + (sigmas[i + 1] - sigmas[i]).item() * v
        out.append(policy.decode(xb))
    return torch.cat(out)
