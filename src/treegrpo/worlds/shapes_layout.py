"""The shapes world's diversity feature ``layout``: where the shape is and how big, from its colour mask.

Registered with `treegrpo.diversity.register_diversity_feature` for model family ``shapes``, so
held-out evaluation logs ``diversity/layout`` (mean pairwise Euclidean distance of the vectors
below over the seeds of a prompt) and GARDO can weight advantages by it. The example for a world's
own feature: a new world registers its detector's object layout the same way.
"""

from __future__ import annotations

import torch

from treegrpo.diversity import register_diversity_feature

FOREGROUND_DIST = 0.25  # RGB distance from the background above which a pixel is the shape's
MIN_PIXELS = 1.0  # below this soft pixel count there is no shape: centre of the image, extent 0


def shapes_layout(images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> [N, 3]: (centroid x, centroid y, RMS radius) of the foreground, in
    fractions of the image side (a disc of radius r has RMS radius r / sqrt(2)).

    The background is the per-channel median of the 1-pixel border; a pixel's foreground weight is
    a soft threshold (sigmoid, width 0.03) of its RGB distance to it at `FOREGROUND_DIST`. The
    prompt is not needed: one shape per image."""
    x = images.float()
    n, _, h, w = x.shape
    border = torch.cat([x[:, :, 0, :], x[:, :, -1, :], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], dim=2)
    background = border.median(dim=2).values.view(n, 3, 1, 1)
    weight = torch.sigmoid(((x - background).norm(dim=1) - FOREGROUND_DIST) / 0.03)  # [N, H, W]
    ys = ((torch.arange(h, dtype=torch.float32) + 0.5) / h).view(1, h, 1)
    xs = ((torch.arange(w, dtype=torch.float32) + 0.5) / w).view(1, 1, w)
    mass = weight.sum(dim=(1, 2))
    safe = mass.clamp_min(1e-8)
    cx = (weight * xs).sum(dim=(1, 2)) / safe
    cy = (weight * ys).sum(dim=(1, 2)) / safe
    spread = (weight * ((xs - cx.view(-1, 1, 1)) ** 2 + (ys - cy.view(-1, 1, 1)) ** 2)).sum(dim=(1, 2)) / safe
    layout = torch.stack([cx, cy, spread.sqrt()], dim=1)
    empty = torch.tensor([0.5, 0.5, 0.0]).expand(n, 3)
    return torch.where((mass < MIN_PIXELS).unsqueeze(1), empty, layout)


register_diversity_feature("layout", shapes_layout, metric="euclidean", families=("shapes",))
