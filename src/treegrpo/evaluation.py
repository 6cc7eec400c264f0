"""Held-out evaluation: deterministic ODE samples on fixed seeds, scored by reward models.

The same prompts and seeds give the same initial noise every time, so evaluations at different
iterations (and of different methods) compare images of the same starting points.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from PIL import Image

from treegrpo.policies.base import Policy
from treegrpo.rewards.base import Reward
from treegrpo.rollout import rollout
from treegrpo.tree import TreeShape

if TYPE_CHECKING:
    from treegrpo.diversity import DiversityFeature


def seeded_noise(seeds: list[int], latent_shape: tuple[int, ...]) -> torch.Tensor:
    """[S, *latent_shape] initial noise, one fixed draw per seed."""
    return torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def ode_sample(policy: Policy, prompts: list[str], seeds: list[int], num_steps: int, max_batch: int = 512,
               progress: bool = False, desc: str = "sample") -> torch.Tensor:
    """Deterministic (ODE / eta = 0) samples for every (prompt, seed): [P * S, 3, H, W] in [0, 1],
    prompt-major (index p * S + s). progress: a bar over model calls, titled `desc`, on a terminal."""
    return decode_chunked(policy, ode_latents(policy, prompts, seeds, num_steps, max_batch, progress, desc), max_batch)


@torch.no_grad()
def ode_latents(policy: Policy, prompts: list[str], seeds: list[int], num_steps: int, max_batch: int = 512,
                progress: bool = False, desc: str = "sample") -> torch.Tensor:
    """`ode_sample`'s final latents before decoding: [P * S, *latent_shape], prompt-major."""
    noise = seeded_noise(seeds, policy.latent_shape)
    roots = noise.repeat(len(prompts), *([1] * (noise.ndim - 1)))  # prompt-major: each prompt gets all seeds
    chain = TreeShape((1,) * num_steps, (False,) * num_steps, (False,) * num_steps, roots_per_prompt=len(seeds))
    tree = rollout(policy, prompts, chain, num_steps=num_steps, max_batch=max_batch, root_latents=roots, progress=progress,
                   desc=desc)
    return tree.leaves


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
             max_batch: int = 512, accuracy: str | None = None, progress: bool = False,
             spread: bool = False) -> tuple[dict[str, float], torch.Tensor]:
    """Mean reward per reward model (``reward/NAME``) and the world's accuracies over every (prompt,
    seed): accuracy "compose" gives ``acc/strict`` and ``acc/strict/{single,two,count,position}``,
    "shapes" gives ``acc/shape``, ``acc/color``, ``acc/background``, ``acc/all`` (see `accuracy_kind`).
    spread: also ``reward_std/NAME`` (see `reward_statistics`). Returns (metrics, images [P * S, 3, H, W])."""
    per_image, images = evaluate_per_image(policy, prompts, seeds, rewards, num_steps, max_batch,
                                           accuracy=accuracy, progress=progress)
    return summarize_eval(per_image, spread=spread), images


@torch.no_grad()
def evaluate_per_image(policy: Policy, prompts: list[str], seeds: list[int], rewards: Mapping[str, Reward],
                       num_steps: int, max_batch: int = 512, accuracy: str | None = None,
                       progress: bool = False, diversity: Mapping[str, "DiversityFeature"] | None = None
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-image scores {``reward/NAME`` or ``acc/NAME``: [P * S] float32} (prompt-major) and the
    images; `summarize_eval` turns them into `evaluate`'s metrics (ranks concatenate theirs first).
    diversity: also ``diversity/lgmd``, ``diversity/pixel`` and ``diversity/FEATURE`` per feature
    (`treegrpo.diversity.per_image_diversity`; needs >= 2 seeds, else left out)."""
    latents = ode_latents(policy, prompts, seeds, num_steps, max_batch, progress=progress, desc="eval")
    images = decode_chunked(policy, latents, max_batch)
    per_image_prompts = [p for p in prompts for _ in seeds]
    out = {f"reward/{k}": v for k, v in score_images(images, per_image_prompts, rewards, max_batch).items()}
    out.update(world_accuracy(images, per_image_prompts, accuracy))
    if diversity is not None and len(seeds) >= 2:
        from treegrpo.diversity import per_image_diversity

        out.update(per_image_diversity(images, latents.float().cpu(), per_image_prompts, len(seeds), diversity))
    return out, images


def accuracy_kind(family: str, prompts: list[str]) -> str | None:
    """Which world's accuracies apply: "shapes" for the shapes model, "compose" when every prompt is a
    prompt of the compositional world, else None (rewards only)."""
    if family == "shapes":
        return "shapes"
    from treegrpo.worlds.compose import parse_prompt

    try:
        for p in prompts:
            parse_prompt(p)
    except ValueError:
        return None
    return "compose"


def world_accuracy(images: torch.Tensor, prompts: list[str], kind: str | None) -> dict[str, torch.Tensor]:
    """Per-image accuracy verdicts {``acc/NAME``: [N] float32} of a world (NaN = not applicable to
    that image, e.g. a template's accuracy on another template's image)."""
    if kind is None:
        return {}
    if kind == "compose":
        from treegrpo.rewards.compose import strict_accuracy

        return {f"acc/{k}": v for k, v in strict_accuracy(images, prompts).items()}
    if kind == "shapes":
        from treegrpo.rewards.shapes import shapes_accuracy

        acc = shapes_accuracy(images, prompts)
        out = {f"acc/{name}": hits.float() for name, hits in acc.items()}
        out["acc/all"] = torch.stack([h.bool() for h in acc.values()]).all(dim=0).float()
        return out
    raise ValueError(f"unknown accuracy kind {kind!r} (compose, shapes or None)")


def summarize_eval(per_image: Mapping[str, torch.Tensor], spread: bool = False) -> dict[str, float]:
    """Means of `evaluate_per_image`'s scores (and ``reward_std/NAME`` with `spread`).

    Accuracies average over the images they apply to (NaN entries left out). An accuracy with
    per-template parts (``acc/strict`` and ``acc/strict/TEMPLATE``) is the mean of its parts, as
    GenEval's overall score is the mean of its tasks; ``acc/strict_images`` keeps the plain mean over
    images."""
    rewards = {k[len("reward/"):]: v for k, v in per_image.items() if k.startswith("reward/")}
    if spread:
        metrics = reward_statistics(rewards)
    else:
        metrics = {f"reward/{k}": float(v.mean()) for k, v in rewards.items()}
    for key, hits in per_image.items():
        if key.startswith(("acc/", "diversity/")):
            hits = hits.float()
            hits = hits[~torch.isnan(hits)]
            metrics[key] = float(hits.mean()) if hits.numel() else float("nan")
    for key in [k for k in metrics if k.startswith("acc/") and k.count("/") == 1]:
        parts = [v for k, v in metrics.items() if k.startswith(key + "/") and math.isfinite(v)]
        if parts:
            metrics[key + "_images"] = metrics[key]
            metrics[key] = sum(parts) / len(parts)
    return metrics


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


def reward_statistics(scores: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``reward/NAME`` (mean) and ``reward_std/NAME`` (population std) over the images, per reward.
    Non-finite scores are left out and counted in ``nonfinite/NAME`` (only when there are any)."""
    out: dict[str, float] = {}
    for name, values in scores.items():
        finite = values[torch.isfinite(values)].double()
        out[f"reward/{name}"] = float(finite.mean()) if finite.numel() else float("nan")
        out[f"reward_std/{name}"] = float(finite.std(unbiased=False)) if finite.numel() else float("nan")
        if finite.numel() < values.numel():
            out[f"nonfinite/{name}"] = float(values.numel() - finite.numel())
    return out


def normalized_scores(metrics: Mapping[str, float], baseline: Mapping[str, float]) -> dict[str, float]:
    """Relative improvement over a baseline evaluation, per reward and averaged.

    ``normalized/NAME = (reward/NAME - base) / |base|`` for every ``reward/NAME`` in both, and
    ``normalized/average`` = their mean: the "average normalised score" axis of the TreeGRPO paper's
    Pareto figure, as we define it. The paper does not state its normalisation; this definition
    applied to its own table (SD3.5-M as the base; HPS-v2.1, ImageReward, Aesthetic, CLIPScore) gives
    TreeGRPO 22.2%, DanceGRPO 21.2%, MixGRPO 17.6%, DDPO 3.1% against the figure's 15.6%, 14.9%,
    12.1%, 2.4% (same order; no simple alternative we tried reproduces the figure's values, see
    docs/rewards.md).
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not key.startswith("reward/") or key not in baseline:
            continue
        base = float(baseline[key])
        if base == 0 or not (math.isfinite(base) and math.isfinite(float(value))):
            continue
        out["normalized/" + key[len("reward/"):]] = (float(value) - base) / abs(base)
    if out:
        out["normalized/average"] = sum(out.values()) / len(out)
    return out


def load_image_folder(folder: str | Path) -> tuple[list[torch.Tensor], list[str]]:
    """Images and prompts written by ``treegrpo sample`` (``index.jsonl`` lines ``{"file", "prompt"}``):
    ([3, H, W] float32 in [0, 1] per image, prompts)."""
    import json

    import numpy as np

    folder = Path(folder)
    index = folder / "index.jsonl"
    if not index.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no index.jsonl (write one with `treegrpo sample --out DIR`)")
    images, prompts = [], []
    for n, line in enumerate(index.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            path, prompt = folder / record["file"], record["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{index}:{n}: each line needs \"file\" and \"prompt\" fields") from None
        if not path.is_file():
            raise FileNotFoundError(f"{index}:{n}: image {str(path)!r} does not exist")
        array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        images.append(torch.from_numpy(array).permute(2, 0, 1).contiguous())
        prompts.append(prompt)
    if not images:
        raise ValueError(f"{index} lists no images")
    return images, prompts


@torch.no_grad()
def score_image_list(images: list[torch.Tensor], prompts: list[str], rewards: Mapping[str, Reward],
                     max_batch: int = 512) -> dict[str, torch.Tensor]:
    """`score_images` for images of possibly different sizes: same-size images are batched together;
    scores come back in the input order, {name: [N]}."""
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(i)
    out = {name: torch.full((len(images),), float("nan")) for name in rewards}
    for indices in by_size.values():
        batch = torch.stack([images[i] for i in indices])
        scores = score_images(batch, [prompts[i] for i in indices], rewards, max_batch)
        for name, values in scores.items():
            out[name][indices] = values
    return out
