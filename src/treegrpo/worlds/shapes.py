"""The embedded "shapes" world: 16x16 RGB images of one shape on a plain background.

Prompts read ``"a {colour} {shape} on a {background} background"`` (6 x 3 x 3 = 54 prompts). The
renderer is exact and anti-aliased (supersampled coverage), so it doubles as ground truth for the
rewards and as training data for the embedded base model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

IMAGE_SIZE = 16

# `section.key=value` overrides that put a run on this world (the default is the compositional
# world): its model (a small UNet, ~5x cheaper per sample than the embedded SD3 pipeline, which is
# why fast tests use it), its learned reward, its 54 prompts, and the optimiser settings it was
# tuned with (lr 2e-4, KL 0.5).
SHAPES_WORLD = ["model.family=shapes", "reward.weights={shapes: 1.0}", "reward.eval=[shapes, shape, color, background]",
                "train.prompts=shapes", "eval.prompts=shapes", "optim.lr=2e-4", "optim.kl_coef=0.5"]

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 0.8, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "gray": (0.5, 0.5, 0.5),
}

RADIUS_RANGE = (0.2, 0.35)  # as a fraction of the image size
SQUARE_HALF_SIDE = 0.85  # square half-side as a fraction of the radius

_PROMPT_RE = re.compile(r"^an? (\w+) (\w+) on an? (\w+) background$")


@dataclass(frozen=True)
class ShapePrompt:
    colour: str
    shape: str
    background: str

    @property
    def text(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def all_prompts() -> list[ShapePrompt]:
    """The 54 prompts in a fixed order (colour, then shape, then background)."""
    return [ShapePrompt(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def parse_prompt(text: str) -> ShapePrompt:
    """Parse a shapes-world prompt; raises ValueError naming the expected form."""
    match = _PROMPT_RE.match(text.strip().lower())
    if match is None or match[1] not in COLOURS or match[2] not in SHAPES or match[3] not in BACKGROUNDS:
        raise ValueError(
            f"not a shapes-world prompt: {text!r}; expected 'a {{colour}} {{shape}} on a {{background}} "
            f"background' with colour in {list(COLOURS)}, shape in {list(SHAPES)}, "
            f"background in {list(BACKGROUNDS)}"
        )
    return ShapePrompt(match[1], match[2], match[3])


def _coverage(shape_ids: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor,
              size: int, supersample: int) -> torch.Tensor:
    """Fraction of each pixel covered by the shape: [B, size, size] in [0, 1]."""
    n = size * supersample
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / supersample  # sub-pixel centres
    py = coords.view(1, n, 1)
    px = coords.view(1, 1, n)
    cx, cy, r = cx.view(-1, 1, 1), cy.view(-1, 1, 1), r.view(-1, 1, 1)
    dx, dy = px - cx, py - cy
    circle = dx**2 + dy**2 <= r**2
    half = SQUARE_HALF_SIDE * r
    square = (dx.abs() <= half) & (dy.abs() <= half)
    # Upward equilateral triangle inscribed in the circle of radius r: apex at (0, -r) (y grows
    # downwards), base at y = r / 2, sides with slope sqrt(3).
    sqrt3 = 3.0**0.5
    triangle = (dy <= r / 2) & (sqrt3 * dx.abs() <= dy + r)
    inside = torch.where(shape_ids.view(-1, 1, 1) == 0, circle, torch.where(shape_ids.view(-1, 1, 1) == 1, square, triangle))
    cover = inside.float().view(-1, size, supersample, size, supersample).mean(dim=(2, 4))
    return cover


def render_batch(prompts: list[ShapePrompt], generator: torch.Generator | None = None,
                 size: int = IMAGE_SIZE, supersample: int = 4) -> torch.Tensor:
    """Render one random image per prompt: [B, 3, size, size] float32 in [0, 1].

    Radius is uniform in ``RADIUS_RANGE * size``; the centre is uniform in ``[r, size - r]`` on both
    axes, so every shape stays inside the image.
    """
    b = len(prompts)
    lo, hi = RADIUS_RANGE
    r = (lo + (hi - lo) * torch.rand(b, generator=generator)) * size
    cx = r + (size - 2 * r) * torch.rand(b, generator=generator)
    cy = r + (size - 2 * r) * torch.rand(b, generator=generator)
    shape_ids = torch.tensor([SHAPES.index(p.shape) for p in prompts])
    alpha = _coverage(shape_ids, cx, cy, r, size, supersample).unsqueeze(1)  # [B, 1, H, W]
    fg = torch.tensor([COLOURS[p.colour] for p in prompts]).view(b, 3, 1, 1)
    bg = torch.tensor([BACKGROUNDS[p.background] for p in prompts]).view(b, 3, 1, 1)
    return bg * (1 - alpha) + fg * alpha


def render(prompt: ShapePrompt | str, seed: int = 0, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render one image for a prompt (object or text) with a seed: [3, size, size] in [0, 1]."""
    if isinstance(prompt, str):
        prompt = parse_prompt(prompt)
    return render_batch([prompt], torch.Generator().manual_seed(seed), size=size)[0]
