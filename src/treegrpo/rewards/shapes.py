"""Rewards of the embedded shapes world, plus DDPO's JPEG (in)compressibility rewards.

Registered names (``build_reward(name)``):

- ``shape``: classifier probability of the prompted shape, in [0, 1].
- ``color``: how well the foreground matches the prompted colour, in [0, 1].
- ``background``: how well the border matches the prompted background, in [0, 1].
- ``shapes``: the default RL reward, ``shape * color * background`` (see ``ShapesReward``).
- ``jpeg_compressibility`` / ``jpeg_incompressibility``: minus / plus the JPEG size in kB.

``shapes_accuracy`` gives the hard per-attribute correctness that evaluation reports.

All colour scores are decided from pixels, batched over the whole batch (no per-pixel Python):
the background is estimated from the 1-pixel image border (per-channel median, robust to a shape
touching the border), foreground pixels are those far from it, and a colour is scored with a
"soft nearest palette colour" rule: a softmax over ``-squared RGB distance / TAU`` to the palette
colours plus a "none of them" option at squared distance ``NONE_SQ``. So the score is ~1 when the
colour is (nearly) the prompted palette colour, 0.5 at squared distance ``NONE_SQ`` from it, and ~0
when it is nearer another palette colour or far from all of them. Written by hand: no library
scores this toy world.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from treegrpo.rewards.base import register_reward
from treegrpo.worlds.classifier import shape_probabilities
from treegrpo.worlds.shapes import BACKGROUNDS, COLOURS, SHAPES, ShapePrompt, parse_prompt

TAU = 0.02  # temperature of the soft palette match, in squared RGB distance
NONE_SQ = 0.12  # squared RGB distance at which "none of the palette" is as likely as a match
FOREGROUND_DIST = 0.25  # RGB distance from the background above which a pixel is foreground
MIN_FOREGROUND_PIXELS = 3.0  # below this many foreground pixels the colour score fades to 0
BORDER_KEEP = 0.75  # background score: mean over the best-matching 75% of border pixels

_PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # [6, 3]
_BACKGROUND_PALETTE = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32)  # [3, 3]
_COLOUR_NAMES = list(COLOURS)
_BACKGROUND_NAMES = list(BACKGROUNDS)


# --------------------------------------------------------------------------------------------
# Pixel statistics
# --------------------------------------------------------------------------------------------


def _check(images: torch.Tensor, prompts: list[str], reward: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"reward {reward!r} expects images [B, 3, H, W] in [0, 1], got {shape}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"reward {reward!r} got {images.shape[0]} images but {len(prompts)} prompts")


def _parse(images: torch.Tensor, prompts: list[str], reward: str) -> list[ShapePrompt]:
    """Validate the batch and parse its shapes-world prompts, naming the reward on failure."""
    _check(images, prompts, reward)
    parsed = []
    for text in prompts:
        try:
            parsed.append(parse_prompt(text))
        except ValueError as err:
            raise ValueError(f"reward {reward!r} only scores shapes-world prompts: {err}") from None
    return parsed


def border_pixels(images: torch.Tensor) -> torch.Tensor:
    """The 1-pixel border of each image: [B, 3, H, W] -> [B, 3, 2W + 2H - 4]."""
    top, bottom = images[:, :, 0, :], images[:, :, -1, :]
    left, right = images[:, :, 1:-1, 0], images[:, :, 1:-1, -1]
    return torch.cat([top, bottom, left, right], dim=2)


def estimate_background(images: torch.Tensor) -> torch.Tensor:
    """Background colour per image, the per-channel median of the border: [B, 3, H, W] -> [B, 3]."""
    return border_pixels(images.float()).median(dim=2).values


def soft_palette_match(colours: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Soft nearest-palette-colour probabilities: colours [..., 3], palette [K, 3] -> [..., K].

    Softmax over ``-d^2 / TAU`` to each palette colour and a "none" option at ``-NONE_SQ / TAU``;
    the "none" mass is dropped, so each row sums to at most 1.
    """
    d2 = ((colours.unsqueeze(-2) - palette.to(colours)) ** 2).sum(-1)  # [..., K]
    none = torch.full_like(d2[..., :1], NONE_SQ)
    return torch.softmax(-torch.cat([d2, none], dim=-1) / TAU, dim=-1)[..., :-1]


def foreground_colour(images: torch.Tensor, background: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimated foreground colour [B, 3] and soft count of foreground pixels [B].

    Pixels count as foreground by a soft threshold on their RGB distance d to the background
    (``FOREGROUND_DIST``). The colour is their mean weighted by d^4, so anti-aliased edge pixels
    (part background) barely pull it; with no foreground pixels it is meaningless and the count ~0.
    """
    x = images.float()
    bg = estimate_background(x) if background is None else background
    d = (x - bg.view(-1, 3, 1, 1)).norm(dim=1)  # [B, H, W]
    mask = torch.sigmoid((d - FOREGROUND_DIST) / 0.03)
    w = (mask * d**4).unsqueeze(1)
    colour = (w * x).sum(dim=(2, 3)) / w.sum(dim=(2, 3)).clamp_min(1e-8)
    return colour, mask.sum(dim=(1, 2))


def _colour_index(prompts: list[ShapePrompt], device: torch.device) -> torch.Tensor:
    return torch.tensor([_COLOUR_NAMES.index(p.colour) for p in prompts], device=device)


def _background_index(prompts: list[ShapePrompt], device: torch.device) -> torch.Tensor:
    return torch.tensor([_BACKGROUND_NAMES.index(p.background) for p in prompts], device=device)


def _shape_index(prompts: list[ShapePrompt], device: torch.device) -> torch.Tensor:
    return torch.tensor([SHAPES.index(p.shape) for p in prompts], device=device)


# --------------------------------------------------------------------------------------------
# Scores (functions), then the registered rewards (thin classes over them)
# --------------------------------------------------------------------------------------------


def shape_score(images: torch.Tensor, prompts: list[ShapePrompt], classifier_path=None) -> torch.Tensor:
    """Classifier probability of the prompted shape: [B] in [0, 1]."""
    probs = shape_probabilities(images, path=classifier_path)
    return probs.gather(1, _shape_index(prompts, probs.device).view(-1, 1))[:, 0]


def color_score(images: torch.Tensor, prompts: list[ShapePrompt]) -> torch.Tensor:
    """Soft match of the foreground colour to the prompted colour, faded to 0 without foreground: [B]."""
    colour, count = foreground_colour(images)
    match = soft_palette_match(colour, _PALETTE)  # [B, 6]
    prompted = match.gather(1, _colour_index(prompts, match.device).view(-1, 1))[:, 0]
    return prompted * (count / MIN_FOREGROUND_PIXELS).clamp(0, 1)


def background_score(images: torch.Tensor, prompts: list[ShapePrompt]) -> torch.Tensor:
    """Mean soft match of the best ``BORDER_KEEP`` of border pixels to the prompted background: [B].

    Scoring pixels (not their median) makes a noisy border score low; keeping the best 75% lets a
    shape touch the border without penalty.
    """
    border = border_pixels(images.float()).transpose(1, 2)  # [B, P, 3]
    match = soft_palette_match(border, _BACKGROUND_PALETTE)  # [B, P, 3]
    idx = _background_index(prompts, match.device).view(-1, 1, 1).expand(-1, match.shape[1], 1)
    prompted = match.gather(2, idx)[..., 0]  # [B, P]
    keep = max(1, round(BORDER_KEEP * prompted.shape[1]))
    return prompted.topk(keep, dim=1).values.mean(dim=1)


def shapes_accuracy(images: torch.Tensor, prompts: list[str], classifier_path=None) -> dict[str, torch.Tensor]:
    """Hard correctness per attribute: {"shape", "color", "background"} -> BoolTensor [B].

    shape: classifier argmax == prompted shape (so "other" is wrong); color: nearest palette colour
    of the foreground == prompted colour, with at least one foreground pixel; background: nearest
    background colour of the border median == prompted background.
    """
    parsed = _parse(images, prompts, "shapes_accuracy")
    x = images.float()
    probs = shape_probabilities(x, path=classifier_path)
    bg = estimate_background(x)
    colour, count = foreground_colour(x, bg)
    nearest_colour = torch.cdist(colour, _PALETTE.to(x)).argmin(dim=1)
    nearest_bg = torch.cdist(bg, _BACKGROUND_PALETTE.to(x)).argmin(dim=1)
    return {
        "shape": probs.argmax(dim=1) == _shape_index(parsed, probs.device),
        "color": (nearest_colour == _colour_index(parsed, x.device)) & (count >= 1.0),
        "background": nearest_bg == _background_index(parsed, x.device),
    }


@register_reward("shape")
class ShapeReward:
    """``shape``: classifier probability of the prompted shape. [B, 3, H, W], B prompts -> [B] in [0, 1]."""

    def __init__(self, classifier_path: str | None = None) -> None:
        self.classifier_path = classifier_path

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return shape_score(images, _parse(images, prompts, "shape"), self.classifier_path)


@register_reward("color")
class ColorReward:
    """``color``: soft match of the foreground colour to the prompted one (see ``color_score``). -> [B] in [0, 1]."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return color_score(images, _parse(images, prompts, "color"))


@register_reward("background")
class BackgroundReward:
    """``background``: soft match of the border to the prompted background (see ``background_score``). -> [B] in [0, 1]."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return background_score(images, _parse(images, prompts, "background"))


@register_reward("shapes")
class ShapesReward:
    """``shapes``: the default RL reward, ``shape * color * background``, [B] in [0, 1].

    Why a product and not a weighted mean: each factor is a probability-like score of one
    attribute, so the product reads as "the chance that the image is right in every way", and its
    maximum (1) is reached only by a clean image of the prompted shape, in the prompted colour, on
    the prompted background. A mean would pay partial credit to degenerate images (an empty
    image of the right background would get 1/3; a right-coloured blob 2/3), giving the policy
    cheap plateaus to hack; with the product, an empty image scores 0 (no foreground, so colour 0),
    pixel noise scores ~0 (the classifier says "other", no palette colour, noisy border), and a
    wrong attribute zeroes the reward. GRPO standardises rewards within a group, so the product's
    smaller scale for partly-right images does not starve learning of signal.
    """

    def __init__(self, classifier_path: str | None = None) -> None:
        self.classifier_path = classifier_path

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        parsed = _parse(images, prompts, "shapes")
        return (shape_score(images, parsed, self.classifier_path) * color_score(images, parsed)
                * background_score(images, parsed))


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG size in kB (1000 bytes) of each image encoded by Pillow: [B, 3, H, W] in [0, 1] -> [B].

    Images are quantised to uint8 first. One Pillow call per image (encoding is not batchable).
    """
    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array), mode="RGB").save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


@register_reward("jpeg_compressibility")
class JpegCompressibility:
    """DDPO's ``jpeg_compressibility``: minus the JPEG size in kB (Pillow, quality 95). -> [B] float32.

    Scale: for 16x16 shapes-world images the size is mostly the fixed JPEG header and tables, about
    0.63 kB for a flat image up to about 0.95 kB for pure noise, so rewards lie in about
    [-1.0, -0.6]; at 512x512 they range from about 5 kB (flat) to 300 kB (noise). Any prompts are accepted (the
    reward ignores them), so it also serves non-shapes models.
    """

    sign = -1.0
    name = "jpeg_compressibility"

    def __init__(self, quality: int = 95) -> None:
        if not 1 <= quality <= 100:
            raise ValueError(f"{self.name}: quality must be in [1, 100], got {quality}")
        self.quality = quality

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        _check(images, prompts, self.name)
        return self.sign * jpeg_sizes_kb(images, self.quality)


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(JpegCompressibility):
    """DDPO's ``jpeg_incompressibility``: plus the JPEG size in kB (Pillow, quality 95). -> [B] float32.

    Same scale as ``jpeg_compressibility`` with the opposite sign (about 0.6 to 1.0 at 16x16).
    """

    sign = 1.0
    name = "jpeg_incompressibility"
