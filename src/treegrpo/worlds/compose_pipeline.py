"""The embedded base model of the compositional world: a real, tiny diffusers `StableDiffusion3Pipeline`.

Parts (stock diffusers / transformers classes, configured small):

- two word-level tokenizers (`PreTrainedTokenizerFast` over the world's 27 words, `<bos> words
  <eos> <pad>...`, length `MAX_LENGTH`), saved as files;
- two `CLIPTextModelWithProjection` text encoders (hidden 64, 3 layers), trained from scratch with
  the denoiser; SD3's penultimate-layer states of both are concatenated (128 = the transformer's
  `joint_attention_dim`) and their pooled projections too (`pooled_projection_dim` 128). No T5:
  the pipeline then appends `max_sequence_length` zero tokens, so this model is used with
  `max_sequence_length=0` (stored in `treegrpo.json`, read by `load_policy`);
- `AutoencoderKL` (factor 4: 32x32x3 images <-> 8x8x8 latents, no attention), with the latents'
  measured mean and std as `shift_factor` / `scaling_factor`;
- `SD3Transformer2DModel` (patch 1 -> 8x8 = 64 image tokens, width 64, 4 heads, 4 layers);
- `FlowMatchEulerDiscreteScheduler` (shift 3).

Why factor 4 with 8 channels and patch 1 rather than factor 2 with 4 channels and patch 2 (the same
64 tokens and cost): the convolutional decoder then draws the edges, and the transformer only has to
place a compact code per 4x4 pixel cell. Trained from scratch the same number of steps, the factor-4
denoiser draws shapes the reward recognises far more often (docs/benchmarks.md section 16).

`pretrain_compose` makes it from rendered scenes (`treegrpo pretrain compose --out DIR`): the VAE first
(pixel L1 + a small KL), then transformer and text encoders together on the rectified-flow loss
(velocity eps - z0, noise levels drawn with the schedule's shift, 10% empty prompts for CFG), with an
exponential moving average of the weights (what is saved). A share of the denoiser's training scenes
can be mis-captioned (`caption_noise`), as web captions are wrong about composition. The folder loads
with plain `StableDiffusion3Pipeline.from_pretrained(DIR)`.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from treegrpo.worlds.compose import (NUMBERS, RELATION_MARGIN, TEMPLATES, Obj, PromptSpec, all_specs, render_scenes,
                                     sample_scene, world_words)

DEFAULT_PIPELINE = Path(__file__).resolve().parent.parent / "assets" / "compose_sd3"
MAX_LENGTH = 16
SHIFT = 3.0
DEFAULTS_FILE = "treegrpo.json"  # what load_policy needs beyond the diffusers folder
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
REVERSED = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}


def build_tokenizer(max_length: int = MAX_LENGTH):
    """Word-level tokenizer over the world's words: ids [P, max_length] = <bos> words <eos> <pad>..."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *world_words()])}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length, padding_side="right")


def build_text_encoder(vocab_size: int, hidden: int = 64, layers: int = 3):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
                            pad_token_id=0, bos_token_id=2, eos_token_id=3, projection_dim=hidden)
    return CLIPTextModelWithProjection(config)


LATENT_CHANNELS = 8
LATENT_SIDE = 8  # 32 px / factor 4


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32, 64), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         latent_channels=LATENT_CHANNELS, norm_num_groups=8, sample_size=32, use_quant_conv=False,
                         use_post_quant_conv=False, mid_block_add_attention=False, scaling_factor=1.0,
                         shift_factor=0.0)


def build_transformer(layers: int = 4, heads: int = 4, head_dim: int = 16):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=LATENT_SIDE, patch_size=1, in_channels=LATENT_CHANNELS,
                                 out_channels=LATENT_CHANNELS, num_layers=layers, attention_head_dim=head_dim,
                                 num_attention_heads=heads, joint_attention_dim=128,
                                 caption_projection_dim=heads * head_dim, pooled_projection_dim=128,
                                 pos_embed_max_size=LATENT_SIDE)


def build_pipeline(seed: int = 0):
    """A randomly initialised pipeline of the embedded model's architecture."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tok, tok2 = build_tokenizer(), build_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=build_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), vae=build_vae(),
        text_encoder=build_text_encoder(len(tok)), tokenizer=tok, text_encoder_2=build_text_encoder(len(tok2)),
        tokenizer_2=tok2, text_encoder_3=None, tokenizer_3=None)


def read_defaults(folder: str | Path) -> dict[str, Any]:
    """The policy options stored beside a pipeline by `pretrain_compose` (empty if none)."""
    path = Path(folder) / DEFAULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


# ------------------------------------------------------------------------------------ data
def miscaptioned(spec: PromptSpec, rng: random.Random) -> PromptSpec:
    """What the picture shows when its caption is wrong about the composition, as web captions often
    are: two objects with their colours swapped (attribute binding), one object too few or too many
    (counting, kept within 1..4), the relation reversed (position). Single-object captions stay right."""
    if spec.template == "two":
        a, b = spec.objects
        return PromptSpec("two", (Obj(b.colour, a.shape), Obj(a.colour, b.shape)))
    if spec.template == "count":
        n = len(spec.objects)
        m = rng.choice([k for k in (n - 1, n + 1) if 1 <= k <= max(NUMBERS.values())])
        return PromptSpec("count" if m > 1 else "single", spec.objects[:1] * m)
    if spec.template == "position":
        return PromptSpec("position", spec.objects, REVERSED[spec.relation])
    return spec


def sample_batch(n: int, rng: random.Random, caption_noise: float = 0.0, position_share: float | None = None,
                 relation_margin: float = RELATION_MARGIN) -> tuple[list[str], torch.Tensor]:
    """n prompts (templates equally likely, prompts uniform within a template) and one rendered
    scene each: (prompts, images [n, 3, 32, 32] in [0, 1]). caption_noise: the share of scenes that
    show `miscaptioned(prompt)` instead of the prompt. position_share: the position template's share
    (the other three share the rest equally); relation_margin: px between a position scene's two
    centres on the relation's axis."""
    by_template = {t: [s for s in all_specs() if s.template == t] for t in TEMPLATES}
    weights = None if position_share is None else [
        (1 - position_share) / 3 if t != "position" else position_share for t in TEMPLATES]

    def template() -> str:
        return rng.choice(TEMPLATES) if weights is None else rng.choices(TEMPLATES, weights=weights)[0]

    specs = [rng.choice(by_template[template()]) for _ in range(n)]
    shown = [miscaptioned(s, rng) if rng.random() < caption_noise else s for s in specs]
    scenes = [sample_scene(s, rng, relation_margin=relation_margin) for s in shown]
    return [s.text for s in specs], render_scenes(scenes)


def _log(message: str, progress: bool) -> None:
    if progress:
        print(message, flush=True)


def _cosine_lr(step: int, total: int, base: float, warmup: int = 200) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae, steps: int, rng: random.Random, batch: int = 64, lr: float = 2e-3, kl_weight: float = 1e-6,
              progress: bool = True) -> None:
    """Pixel L1 + kl_weight * KL on rendered scenes (images scaled to [-1, 1])."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr)
        _, images = sample_batch(batch, rng)
        x = images * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - x).abs().mean() + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            _log(f"vae step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)", progress)
    vae.eval()


@torch.no_grad()
def encode_dataset(vae, n: int, rng: random.Random, chunk: int = 500, **scenes) -> tuple[list[str], torch.Tensor]:
    """n (prompt, VAE latent mean [8, 8, 8]) pairs of freshly rendered scenes (`scenes`: sample_batch's
    options)."""
    prompts, latents = [], []
    for s in range(0, n, chunk):
        p, images = sample_batch(min(chunk, n - s), rng, **scenes)
        prompts += p
        latents.append(vae.encode(images * 2 - 1).latent_dist.mean)
    return prompts, torch.cat(latents)


def _encode_text(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's CLIP conditioning with gradients (the pipeline's encode_prompt runs without): sequence
    [B, L, 128] from both encoders' penultimate states, pooled [B, 128] from their projections."""
    seqs, pooled = [], []
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out = enc(ids, output_hidden_states=True)
        seqs.append(out.hidden_states[-2])
        pooled.append(out[0])
    return torch.cat(seqs, dim=-1), torch.cat(pooled, dim=-1)


def train_denoiser(pipe, prompts: list[str], latents: torch.Tensor, steps: int, rng: random.Random,
                   batch: int = 256, lr: float = 1e-3, drop_prompt: float = 0.1, ema_decay: float = 0.999,
                   progress: bool = True, save_every: int = 0, save_to: Path | None = None) -> None:
    """Rectified flow on normalised latents: z_s = (1 - s) z0 + s eps, target eps - z0, s from the
    shift-3 law s = 3u / (1 + 2u), u ~ U(0, 1); transformer and both text encoders train. With
    ema_decay > 0 the weights left in `pipe` (and saved every `save_every` steps) are their
    exponential moving average, warmed up as min(decay, (1 + n) / (10 + n))."""
    from treegrpo.ema import EMA

    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    named = {f"{j}.{n}": p for j, m in enumerate(modules) for n, p in m.named_parameters()}
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = EMA(named, ema_decay) if ema_decay > 0 else None
    averaged = ema.applied if ema is not None else contextlib.nullcontext
    for m in modules:
        m.train()
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr)
        idx = torch.randint(0, latents.shape[0], (batch,), generator=g)
        z0 = latents[idx]
        texts = ["" if rng.random() < drop_prompt else prompts[i] for i in idx.tolist()]
        u = torch.rand(batch, generator=g)
        sigma = SHIFT * u / (1 + (SHIFT - 1) * u)
        eps = torch.randn(z0.shape, generator=g)
        zs = (1 - sigma.view(-1, 1, 1, 1)) * z0 + sigma.view(-1, 1, 1, 1) * eps
        seq, pooled = _encode_text(pipe, texts)
        v = pipe.transformer(hidden_states=zs, timestep=sigma * 1000, encoder_hidden_states=seq,
                             pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(v, eps - z0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            ema.decay = min(ema_decay, (1 + step) / (10 + step))  # warm-up: early weights forgotten fast
            ema.update()
        if step % 100 == 0 or step == steps - 1:
            _log(f"denoiser step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)", progress)
        if save_every and save_to is not None and step and step % save_every == 0:
            with averaged():
                save_pipeline(pipe, save_to)
            for m in modules:
                m.train()
    if ema is not None:  # leave the average in the pipeline
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(ema.shadow[name])
    for m in modules:
        m.eval()


def save_pipeline(pipe, out: Path, guidance_scale: float = 4.5) -> None:
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        m.eval()
    pipe.save_pretrained(out, safe_serialization=True)
    (Path(out) / DEFAULTS_FILE).write_text(json.dumps(
        {"max_sequence_length": 0, "guidance_scale": guidance_scale, "resolution": 32}, indent=1) + "\n")


# From scratch with these defaults: the clean-caption base (seed 0, one CPU thread). The shipped
# weights continue it on mis-captioned scenes (README "The compositional world" lists both commands
# and the measured result).
SHIPPED_VAE_STEPS = 2000
SHIPPED_STEPS = 8000
SHIPPED_LR = 1e-3


def pretrain_compose(out: str | Path, seed: int = 0, vae_steps: int = SHIPPED_VAE_STEPS, steps: int = SHIPPED_STEPS,
                     lr: float = SHIPPED_LR, dataset_size: int = 60_000, init: str | Path | None = None,
                     progress: bool = True, save_every: int = 1000, caption_noise: float = 0.0,
                     position_share: float | None = None, relation_margin: float = RELATION_MARGIN,
                     ema_decay: float = 0.999, num_threads: int | None = 1) -> dict[str, Any]:
    """Make the embedded pipeline into `out` (see the module docstring): from scratch (the
    autoencoder, then the denoiser), or with `init` (a pipeline folder) continue the denoiser's
    training from it, its autoencoder and latent statistics kept.

    steps, lr: the denoiser's steps and peak learning rate (warm-up, then cosine); its data are
    `dataset_size` fresh renders drawn with random.Random(seed) (seed + 1 with `init`, so a
    continuation sees new scenes). caption_noise: the share of the denoiser's training scenes whose
    caption is wrong about the composition (`miscaptioned`); position_share (default: a quarter, as
    every template) and relation_margin (px between a position scene's centres on the relation's
    axis, more than the reward's 2) shape the denoiser's scenes too (a 12 px margin teaches the
    relation words, docs/benchmarks.md section 18); the autoencoder's data do not depend on them.
    num_threads: torch's CPU threads while it runs (restored after; results depend on the thread
    count, so the shipped weights pin one). Returns {"out", "latent_mean", "latent_std" (from
    scratch), "seconds"}."""
    if position_share is not None and not 0 <= position_share <= 1:
        raise ValueError(f"position_share must be in [0, 1], got {position_share}")
    if not 2 < relation_margin <= 16:
        raise ValueError(f"relation_margin must be in (2, 16] px (the reward needs more than 2; the image is "
                         f"32 px), got {relation_margin}")
    scenes = {"caption_noise": caption_noise, "position_share": position_share, "relation_margin": relation_margin}
    was_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        return _pretrain_compose(Path(out), seed, vae_steps, steps, lr, dataset_size, init, progress, save_every,
                                 scenes, ema_decay)
    finally:
        torch.set_num_threads(was_threads)


def _pretrain_compose(out: Path, seed: int, vae_steps: int, steps: int, lr: float, dataset_size: int,
                      init: str | Path | None, progress: bool, save_every: int, scenes: dict[str, Any],
                      ema_decay: float) -> dict[str, Any]:
    start = time.time()
    rng = random.Random(seed)
    stats: dict[str, Any] = {"out": str(out)}
    if init is not None:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(init, text_encoder_3=None, tokenizer_3=None,
                                                        local_files_only=True)
        rng = random.Random(seed + 1)
    else:
        pipe = build_pipeline(seed)
        train_vae(pipe.vae, vae_steps, rng, progress=progress)
        pipe.vae.save_pretrained(out / "vae")  # kept while the denoiser trains
    prompts, latents = encode_dataset(pipe.vae, dataset_size, rng, **scenes)
    if init is None:
        mean, std = float(latents.mean()), float(latents.std())
        pipe.vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
        stats.update(latent_mean=mean, latent_std=std)
        _log(f"latents: mean {mean:.4f} std {std:.4f}", progress)
    latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    train_denoiser(pipe, prompts, latents, steps, rng, lr=lr, ema_decay=ema_decay, progress=progress,
                   save_every=save_every, save_to=out)
    save_pipeline(pipe, out)
    stats["seconds"] = round(time.time() - start, 1)
    return stats
