"""The compositional world's diversity feature ``scene_layout``: where the objects are and how much
of each part of the image they cover.

Registered with `treegrpo.diversity.register_diversity_feature` for the ``compose`` world (chosen
when every evaluation prompt is a compositional-world prompt), so held-out evaluation logs
``diversity/scene_layout`` (mean pairwise Euclidean distance of the vectors below over the seeds
of a prompt) and GARDO can weight advantages by it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from treegrpo.diversity import register_diversity_feature
from treegrpo.rewards.compose import palette_blend

GRID = 4  # cells per side: 8x8-pixel cells on the 32x32 images


def scene_layout(images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> [N, GRID * GRID]: the share of each cell covered by objects, from
    the reward detector's palette blend (soft coverage of gray blended with a palette colour), so
    two samples with their objects in other places or of other sizes are far apart. Colour and
    shape do not count: they are what the prompt fixes."""
    _, cover = palette_blend(images)
    return F.adaptive_avg_pool2d(cover.unsqueeze(1), GRID).flatten(1)


register_diversity_feature("scene_layout", scene_layout, metric="euclidean", families=("compose",))
