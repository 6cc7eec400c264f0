"""The compositional world's diversity features:

- ``scene_layout``: where the objects are and how much of each part of the image they cover;
- ``single_centre``: for single-object prompts, the object's centre in pixels (the issue's layout
  diversity: ``diversity/single_centre`` is the mean pairwise distance in pixels between a single
  object's centres over the seeds of its prompt, averaged over the single-object prompts).

Registered with `treegrpo.diversity.register_diversity_feature` for the ``compose`` world (chosen
when every evaluation prompt is a compositional-world prompt), so held-out evaluation logs
``diversity/scene_layout`` and ``diversity/single_centre`` (mean pairwise Euclidean distance of
the vectors below over the seeds of a prompt); GARDO can weight advantages by ``scene_layout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from treegrpo.diversity import register_diversity_feature
from treegrpo.rewards.compose import palette_blend
from treegrpo.worlds.compose import parse_prompt

GRID = 4  # cells per side: 8x8-pixel cells on the 32x32 images


def scene_layout(images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> [N, GRID * GRID]: the share of each cell covered by objects, from
    the reward detector's palette blend (soft coverage of gray blended with a palette colour), so
    two samples with their objects in other places or of other sizes are far apart. Colour and
    shape do not count: they are what the prompt fixes."""
    _, cover = palette_blend(images)
    return F.adaptive_avg_pool2d(cover.unsqueeze(1), GRID).flatten(1)


def single_centre(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> [N, 2]: for a single-object prompt the coverage-weighted centroid
    (x, y) in pixels of the detector's palette blend, i.e. the object's centre; NaN for the other
    templates (left out of the mean) and for an image with no object pixels."""
    _, cover = palette_blend(images)
    h, w = cover.shape[-2:]
    # Pixel i spans [i, i + 1], as in the renderer's coordinates, so its centre is i + 0.5.
    ys, xs = torch.meshgrid(torch.arange(h, dtype=cover.dtype) + 0.5, torch.arange(w, dtype=cover.dtype) + 0.5,
                            indexing="ij")
    mass = cover.sum(dim=(1, 2))
    centre = torch.stack([(cover * xs).sum(dim=(1, 2)), (cover * ys).sum(dim=(1, 2))], dim=1) / mass.unsqueeze(1)
    single = torch.tensor([parse_prompt(p).template == "single" for p in prompts])
    return torch.where((single & (mass > 0)).unsqueeze(1), centre, torch.full_like(centre, float("nan")))


register_diversity_feature("scene_layout", scene_layout, metric="euclidean", families=("compose",))
register_diversity_feature("single_centre", single_centre, metric="euclidean", families=("compose",), partial=True)
