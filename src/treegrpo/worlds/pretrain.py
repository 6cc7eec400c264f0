"""Pretraining of the embedded shapes base model (text encoder + UNet, rectified flow).

Each step renders a fresh batch (random prompts from all 54, random render seeds), draws sigma
(uniform by default; SD3's logit-normal is an option) and noise eps, and regresses the velocity:
`||v(x_sigma, sigma, c) - (eps - x0)||^2` with `x_sigma = (1 - sigma) x0 + sigma eps`, x0 in [-1, 1].
10% of prompts are replaced by the empty prompt so that classifier-free guidance works. AdamW with a
short warm-up, then a constant rate; an EMA of the weights is what gets saved. Reproducible for a
seed on the same machine and thread count.

The training is short on purpose: the base model must be good but imperfect (colour and background
right, shape often wrong) so that RL has something real to fix. With the defaults (1400 steps of
256 images, logit-normal sigma, ~5 minutes on one CPU thread) colour and background come out right in
~100% of ODE samples while circles and squares are still often confused (shape accuracy ~0.6 by the
shapes-world classifier; triangles are learned first). Uniform sigma sampling gives cleaner
backgrounds at the same shape accuracy, but in our RL trials (treegrpo train, 30-40 iterations) the
uniform-sigma model improved only ~8 points in shape accuracy where the logit-normal one improved
~25, so the shipped model uses logit-normal.

The shipped weights in `src/treegrpo/assets/shapes_base/` were made with:

    from treegrpo.worlds.pretrain import pretrain_shapes
    pretrain_shapes("src/treegrpo/assets/shapes_base")   # the defaults below, seed 0

(the CLI `treegrpo pretrain shapes` calls the same function).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from treegrpo.worlds.shapes import all_prompts, render_batch
from treegrpo.worlds.shapes_model import DEFAULT_GUIDANCE, DEFAULT_SHIFT, ShapesPolicy

DEFAULT_STEPS = 1400
DEFAULT_BATCH = 256
DEFAULT_LR = 1e-3
DEFAULT_EMA = 0.995
DEFAULT_SIGMA_LAW = "logit_normal"
DEFAULT_THREADS = 1  # pinned: float results (hence the weights) depend on the thread count


def sample_sigmas(batch: int, generator: torch.Generator, law: str = "logit_normal",
                  mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Training noise levels [B] in (0, 1): `sigmoid(N(mean, std))` ("logit_normal") or uniform."""
    if law == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(batch, generator=generator))
    if law == "uniform":
        return torch.rand(batch, generator=generator).clamp(1e-4, 1 - 1e-4)
    raise ValueError(f"unknown sigma law {law!r}; use 'logit_normal' or 'uniform'")


def pretrain_shapes(out_dir: str | Path | None, steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH,
                    seed: int = 0, progress: bool = True, lr: float = DEFAULT_LR, weight_decay: float = 0.01,
                    warmup: int = 50, cfg_dropout: float = 0.1, sigma_law: str = DEFAULT_SIGMA_LAW,
                    ema_decay: float = DEFAULT_EMA, guidance_scale: float = DEFAULT_GUIDANCE,
                    shift: float = DEFAULT_SHIFT, callback: Callable[[int, ShapesPolicy], None] | None = None,
                    num_threads: int | None = DEFAULT_THREADS) -> dict:
    """Train the shapes base model from scratch and save it to `out_dir` (skipped if None).

    Returns {"steps", "batch_size", "seed", "lr", "sigma_law", "ema_decay", "final_loss" (mean of
    the last 50 steps), "seconds", "parameters", "out_dir", "policy"}. With `ema_decay > 0` the saved
    and returned weights are an exponential moving average of the training weights (diffusers'
    `EMAModel`, with its `(1 + n) / (10 + n)` warm-up). `callback(step, policy)` is called after
    every step with the weights that would be saved at that step (EMA swapped in), for evaluations
    during tuning. The learning rate is constant after the warm-up, so the model after n steps of a
    longer run equals the model of a run with `steps=n`.

    Runs with `torch.use_deterministic_algorithms(True)` (restored afterwards) and its own RNG
    streams, so a seed gives the same weights on the same machine and thread count; the global
    torch RNG is left as it was.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    sample_sigmas(1, torch.Generator(), sigma_law)  # fail early on a bad law
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    was_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            policy = ShapesPolicy(guidance_scale=guidance_scale, shift=shift)
        info = _train(policy, steps, batch_size, seed, progress, lr, weight_decay, warmup, cfg_dropout,
                      sigma_law, ema_decay, callback)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(was_threads)
    if out_dir is not None:
        policy.save_pretrained(out_dir, extra={"pretrain": info})
    return {**info, "parameters": policy.num_parameters(), "out_dir": None if out_dir is None else str(out_dir),
            "policy": policy}


def _train(policy: ShapesPolicy, steps: int, batch_size: int, seed: int, progress: bool, lr: float,
           weight_decay: float, warmup: int, cfg_dropout: float, sigma_law: str, ema_decay: float,
           callback: Callable[[int, ShapesPolicy], None] | None) -> dict:
    """The loop of `pretrain_shapes`; leaves `policy` in eval mode, text encoder frozen, EMA applied."""
    unet, text_encoder = policy.unet, policy.text_encoder
    text_encoder.requires_grad_(True)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    ema = None
    if ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=ema_decay)
    gen = torch.Generator().manual_seed(seed + 1)  # data: prompts, renders, noise, sigmas, dropout
    prompts = all_prompts()
    texts = [*(p.text for p in prompts), ""]  # row len(prompts) is the empty prompt

    def set_train(mode: bool) -> None:
        unet.train(mode)
        text_encoder.train(mode)

    losses: list[float] = []
    start = time.perf_counter()
    set_train(True)
    with tqdm(total=steps, desc="pretrain shapes", disable=None if progress else True) as bar:
        for step in range(steps):
            idx = torch.randint(len(prompts), (batch_size,), generator=gen)
            x0 = render_batch([prompts[i] for i in idx.tolist()], gen) * 2.0 - 1.0  # [B, 3, 16, 16]
            eps = torch.randn(x0.shape, generator=gen)
            sigma = sample_sigmas(batch_size, gen, sigma_law)  # [B]
            drop = torch.rand(batch_size, generator=gen) < cfg_dropout
            row = torch.where(drop, torch.full_like(idx, len(prompts)), idx)
            states = policy.text_states(texts)  # [55, L, D], with grad
            s = sigma.view(-1, 1, 1, 1)
            v = policy.velocity((1.0 - s) * x0 + s * eps, sigma, states[row])
            loss = F.mse_loss(v, eps - x0)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            scheduler.step()
            if ema is not None:
                ema.step(params)
            losses.append(loss.item())
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
            if callback is not None:
                set_train(False)
                if ema is not None:
                    ema.store(params)
                    ema.copy_to(params)
                callback(step + 1, policy)
                if ema is not None:
                    ema.restore(params)
                set_train(True)
    seconds = time.perf_counter() - start

    if ema is not None:
        ema.copy_to(params)
    set_train(False)
    text_encoder.requires_grad_(False)
    final_loss = sum(losses[-50:]) / len(losses[-50:])
    if not math.isfinite(final_loss):
        raise RuntimeError(f"pretraining diverged (loss {final_loss}); lower lr (now {lr})")
    return {"steps": steps, "batch_size": batch_size, "seed": seed, "lr": lr, "sigma_law": sigma_law,
            "ema_decay": ema_decay, "final_loss": final_loss, "seconds": seconds}
