"""Held-out evaluation: deterministic ODE samples on fixed seeds, scored by reward models.

The same prompts and seeds give the same initial noise every time, so evaluations at different
iterations (and of different methods) compare images of the same starting points.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from PIL import Image

from treegrpo.policies.base import Policy
from treegrpo.rewards.base import Reward
from treegrpo.rollout import rollout
from treegrpo.tree import TreeShape


def seeded_noise(seeds: list[int], latent_shape: tuple[int, ...]) -> torch.Tensor:
    """[S, *latent_shape] initial noise, one fixed draw per seed."""
    return torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def ode_sample(policy: Policy, prompts: list[str], seeds: list[int], num_steps: int, max_batch: int = 512,
               progress: bool = False, desc: str = "sample") -> torch.Tensor:
    """Deterministic (ODE / eta = 0) samples for every (prompt, seed): [P * S, 3, H, W] in [0, 1],
    prompt-major (index p * S + s). progress: a bar over model calls, titled `desc`, on a terminal."""
    noise = seeded_noise(seeds, policy.latent_shape)
    roots = noise.repeat(len(prompts), *([1] * (noise.ndim - 1)))  # prompt-major: each prompt gets all seeds
    chain = TreeShape((1,) * num_steps, (False,) * num_steps, (False,) * num_steps, roots_per_prompt=len(seeds))
    tree = rollout(policy, prompts, chain, num_steps=num_steps, max_batch=max_batch, root_latents=roots, progress=progress,
                   desc=desc)
    return decode_chunked(policy, tree.leaves, max_batch)


@torch.no_grad()
def decode_chunked(policy: Policy, latents: torch.Tensor, max_batch: int) -> torch.Tensor:
    return torch.cat([policy.decode(latents[s:s + max_batch]).float().cpu() for s in range(0, latents.shape[0], max_batch)])


@torch.no_grad()
def score_images(images: torch.Tensor, prompts: list[str], rewards: Mapping[str, Reward],
                 max_batch: int = 512) -> dict[str, torch.Tensor]:
    """{reward name: [N] float32} for images [N, 3, H, W] and their N prompts."""
    out: dict[str, torch.Tensor] = {}
    for name, reward in rewards.items():
        parts = [torch.as_tensor(reward(images[s:s + max_batch], prompts[s:s + max_batch]), dtype=torch.float32).flatten().cpu()
                 for s in range(0, images.shape[0], max_batch)]
        out[name] = torch.cat(parts)
    return out


@torch.no_grad()
def evaluate(policy: Policy, prompts: list[str], seeds: list[int], rewards: Mapping[str, Reward], num_steps: int,
             max_batch: int = 512, shapes_accuracy: bool = False, progress: bool = False) -> tuple[dict[str, float], torch.Tensor]:
    """Mean reward per reward model (``reward/NAME``) and, for the shapes world, accuracies
    (``acc/shape``, ``acc/color``, ``acc/background``, ``acc/all``) over every (prompt, seed).
    Returns (metrics, images [P * S, 3, H, W])."""
    images = ode_sample(policy, prompts, seeds, num_steps, max_batch, progress=progress, desc="eval")
    per_image_prompts = [p for p in prompts for _ in seeds]
    metrics = {f"reward/{k}": float(v.mean()) for k, v in score_images(images, per_image_prompts, rewards, max_batch).items()}
    if shapes_accuracy:
        from treegrpo.rewards.shapes import shapes_accuracy as accuracy

        acc = accuracy(images, per_image_prompts)
        for name, hits in acc.items():
            metrics[f"acc/{name}"] = float(hits.float().mean())
        metrics["acc/all"] = float(torch.stack([h.bool() for h in acc.values()]).all(dim=0).float().mean())
    return metrics, images


def image_grid(images: torch.Tensor, rows: int, cols: int, scale: int = 4, pad: int = 1) -> Image.Image:
    """Tile images [rows * cols, 3, H, W] (row-major) into one upscaled PIL image."""
    n, _, h, w = images.shape
    if n != rows * cols:
        raise ValueError(f"{n} images do not fill a {rows} x {cols} grid")
    canvas = torch.ones(3, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[i]
    array = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(array)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 16) -> Image.Image:
    out = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), (255, 255, 255))
    out.paste(left, (0, 0))
    out.paste(right, (left.width + gap, 0))
    return out


def save_image(img: Image.Image, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
