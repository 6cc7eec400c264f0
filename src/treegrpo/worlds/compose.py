"""The embedded compositional world: 32x32 RGB scenes of 1 to 4 objects on a plain gray background,
with GenEval-style prompts (single object, two objects, counting, position).

- Shapes: circle of radius r; square of half-side 0.85 r; triangle = the upward equilateral triangle
  inscribed in the circle of radius r (apex at (0, -r), base at y = r / 2, y grows downwards).
  Every shape's centroid is its centre, so a detector's centroid estimates the centre directly.
- Colours: red, green (0, .8, 0), blue, yellow, magenta, cyan; background (0.5, 0.5, 0.5).
- Radius uniform in [3.5, 5.5] px; every object inside the image, centres at least r1 + r2 + 2 px
  apart; anti-aliased by 4x4 supersampled coverage.
- Prompts (lower case, exactly four templates):
  single `a {colour} {shape}`; two `a {c1} {s1} and a {c2} {s2}` (the objects differ);
  count `{two|three|four} {colour} {shape}s`; position `a {c1} {s1} {relation} a {c2} {s2}` with
  relation in to the left of / to the right of / above / below (the first object is the subject).
  Rendered scenes of a position prompt keep at least 6 px between the centres on the relation's axis.

The split (`split_prompts`) is fixed by a seeded shuffle per template: 300 held-out prompts (6 single,
18 count, 138 two, 138 position) that RL never trains on, the rest (1,302) for training. The base
model's pretraining renders scenes for every prompt of the world (it plays the part of a
web-pretrained model's knowledge); the split separates what RL optimises from what it is judged on.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from treegrpo.worlds.shapes import COLOURS, SHAPES, SQUARE_HALF_SIDE  # the same palette and shapes as the shapes world

IMAGE_SIZE = 32
BACKGROUND = (0.5, 0.5, 0.5)
RADIUS_RANGE = (3.5, 5.5)  # pixels
MIN_GAP = 2.0  # pixels between two objects' circumscribed circles
RELATION_MARGIN = 6.0  # pixels between centres on the relation's axis, in rendered training scenes
NUMBERS = {"two": 2, "three": 3, "four": 4}
RELATIONS = ("to the left of", "to the right of", "above", "below")
TEMPLATES = ("single", "two", "count", "position")
HELDOUT_SIZES = {"single": 6, "two": 138, "count": 18, "position": 138}
SPLIT_SEED = 12


@dataclass(frozen=True)
class Obj:
    """A named object: colour and shape."""

    colour: str
    shape: str

    @property
    def text(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for. objects: the named objects (count prompts: `count` copies of one);
    relation: for position prompts, relation of objects[0] (subject) to objects[1]."""

    template: str
    objects: tuple[Obj, ...]
    relation: str | None = None

    @property
    def text(self) -> str:
        o = self.objects
        if self.template == "single":
            return f"a {o[0].text}"
        if self.template == "two":
            return f"a {o[0].text} and a {o[1].text}"
        if self.template == "count":
            number = {v: k for k, v in NUMBERS.items()}[len(o)]
            return f"{number} {o[0].text}s"
        return f"a {o[0].text} {self.relation} a {o[1].text}"


def all_objects() -> list[Obj]:
    return [Obj(c, s) for c in COLOURS for s in SHAPES]


@lru_cache(maxsize=1)
def all_specs() -> tuple[PromptSpec, ...]:
    """Every prompt of the world (1,602), template by template in a fixed order."""
    objs = all_objects()
    specs = [PromptSpec("single", (o,)) for o in objs]
    specs += [PromptSpec("two", (a, b)) for a in objs for b in objs if a != b]
    specs += [PromptSpec("count", (o,) * n) for n in NUMBERS.values() for o in objs]
    specs += [PromptSpec("position", (a, b), rel) for rel in RELATIONS for a in objs for b in objs if a != b]
    return tuple(specs)


@lru_cache(maxsize=1)
def split_prompts() -> dict[str, tuple[PromptSpec, ...]]:
    """The fixed split {"train": ..., "heldout": ...}: per template a seeded shuffle, the first
    `HELDOUT_SIZES[template]` held out."""
    rng = random.Random(SPLIT_SEED)
    train: list[PromptSpec] = []
    heldout: list[PromptSpec] = []
    for template in TEMPLATES:
        specs = [s for s in all_specs() if s.template == template]
        rng.shuffle(specs)
        n = HELDOUT_SIZES[template]
        heldout += specs[:n]
        train += specs[n:]
    return {"train": tuple(train), "heldout": tuple(heldout)}


_OBJ = r"(\w+) (\w+)"
_PATTERNS = {
    "single": re.compile(rf"^an? {_OBJ}$"),
    "two": re.compile(rf"^an? {_OBJ} and an? {_OBJ}$"),
    "count": re.compile(r"^(two|three|four) (\w+) (\w+)s$"),
    "position": re.compile(rf"^an? {_OBJ} (to the left of|to the right of|above|below) an? {_OBJ}$"),
}


def _obj(colour: str, shape: str, text: str) -> Obj:
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"not a prompt of the compositional world: {text!r} (colours {', '.join(COLOURS)}; "
                         f"shapes {', '.join(SHAPES)})")
    return Obj(colour, shape)


def parse_prompt(text: str) -> PromptSpec:
    """The spec of a world prompt; ValueError naming the four templates otherwise."""
    t = " ".join(text.strip().lower().split())
    if m := _PATTERNS["position"].match(t):
        return PromptSpec("position", (_obj(m[1], m[2], text), _obj(m[4], m[5], text)), m[3])
    if m := _PATTERNS["two"].match(t):
        a, b = _obj(m[1], m[2], text), _obj(m[3], m[4], text)
        if a == b:
            raise ValueError(f"{text!r}: the two objects must differ (say 'two {a.text}s')")
        return PromptSpec("two", (a, b))
    if m := _PATTERNS["count"].match(t):
        return PromptSpec("count", (_obj(m[2], m[3], text),) * NUMBERS[m[1]])
    if m := _PATTERNS["single"].match(t):
        return PromptSpec("single", (_obj(m[1], m[2], text),))
    raise ValueError(
        f"not a prompt of the compositional world: {text!r}; expected one of 'a {{colour}} {{shape}}', "
        f"'a {{colour}} {{shape}} and a {{colour}} {{shape}}', '{{two|three|four}} {{colour}} {{shape}}s', "
        f"'a {{colour}} {{shape}} {{to the left of|to the right of|above|below}} a {{colour}} {{shape}}'")


def world_words() -> list[str]:
    """Every word of the world's prompts, in a fixed order (the tokenizer's vocabulary)."""
    return ["a", "and", *NUMBERS, "to", "the", "left", "right", "of", "above", "below", *COLOURS, *SHAPES,
            *(s + "s" for s in SHAPES)]


# ------------------------------------------------------------------------------------ scenes
@dataclass(frozen=True)
class Placed:
    """An object placed in a scene: centre (cx, cy) and radius r in pixels (y grows downwards)."""

    colour: str
    shape: str
    cx: float
    cy: float
    r: float


def relation_holds_between(a: tuple[float, float], b: tuple[float, float], relation: str, margin: float) -> bool:
    """Whether centre a is `relation` centre b by more than `margin` px on the relation's axis."""
    if relation == "to the left of":
        return b[0] - a[0] > margin
    if relation == "to the right of":
        return a[0] - b[0] > margin
    if relation == "above":
        return b[1] - a[1] > margin
    if relation == "below":
        return a[1] - b[1] > margin
    raise ValueError(f"unknown relation {relation!r}")


def sample_scene(spec: PromptSpec, rng: random.Random, size: int = IMAGE_SIZE, tries: int = 1000,
                 relation_margin: float = RELATION_MARGIN) -> list[Placed]:
    """A random layout that satisfies `spec`: radii uniform in RADIUS_RANGE, inside the image,
    apart by MIN_GAP, position prompts with `relation_margin` px on the axis (rejection sampling)."""
    for _ in range(tries):
        placed: list[Placed] = []
        for obj in spec.objects:
            r = rng.uniform(*RADIUS_RANGE)
            for _ in range(100):
                cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
                if all(math.hypot(cx - p.cx, cy - p.cy) >= r + p.r + MIN_GAP for p in placed):
                    placed.append(Placed(obj.colour, obj.shape, cx, cy, r))
                    break
            else:
                break
        if len(placed) != len(spec.objects):
            continue
        if spec.relation is not None and not relation_holds_between(
                (placed[0].cx, placed[0].cy), (placed[1].cx, placed[1].cy), spec.relation, relation_margin):
            continue
        return placed
    raise RuntimeError(f"could not place the objects of {spec.text!r} in {tries} tries")


def shape_masks(shape_ids: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, size: int = IMAGE_SIZE,
                supersample: int = 4) -> torch.Tensor:
    """Coverage of each shape on the pixel grid: [N, size, size] in [0, 1] (shape ids index SHAPES).

    Exact point-in-shape tests on a supersample x supersample grid per pixel, averaged."""
    n = size * supersample
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / supersample
    py, px = coords.view(1, n, 1), coords.view(1, 1, n)
    cx, cy, r = (t.float().view(-1, 1, 1) for t in (cx, cy, r))
    dx, dy = px - cx, py - cy
    circle = dx**2 + dy**2 <= r**2
    half = SQUARE_HALF_SIDE * r
    square = (dx.abs() <= half) & (dy.abs() <= half)
    triangle = (dy <= r / 2) & (math.sqrt(3.0) * dx.abs() <= dy + r)
    ids = shape_ids.view(-1, 1, 1)
    inside = torch.where(ids == 0, circle, torch.where(ids == 1, square, triangle))
    return inside.float().view(-1, size, supersample, size, supersample).mean(dim=(2, 4))


def render_scenes(scenes: list[list[Placed]], size: int = IMAGE_SIZE) -> torch.Tensor:
    """Images of placed objects on the gray background: [B, 3, size, size] float32 in [0, 1]."""
    flat = [(b, p) for b, scene in enumerate(scenes) for p in scene]
    images = torch.tensor(BACKGROUND).view(1, 3, 1, 1).repeat(len(scenes), 1, size, size)
    if not flat:
        return images
    masks = shape_masks(torch.tensor([SHAPES.index(p.shape) for _, p in flat]), torch.tensor([p.cx for _, p in flat]),
                        torch.tensor([p.cy for _, p in flat]), torch.tensor([p.r for _, p in flat]), size)
    for (b, p), alpha in zip(flat, masks):  # objects never overlap, so compositing order does not matter
        colour = torch.tensor(COLOURS[p.colour]).view(3, 1, 1)
        images[b] = images[b] * (1 - alpha) + colour * alpha
    return images


def render_prompts(prompts: list[str | PromptSpec], seed: int = 0) -> tuple[torch.Tensor, list[list[Placed]]]:
    """One random scene per prompt: (images [B, 3, 32, 32], the layouts)."""
    rng = random.Random(seed)
    specs = [parse_prompt(p) if isinstance(p, str) else p for p in prompts]
    scenes = [sample_scene(s, rng) for s in specs]
    return render_scenes(scenes), scenes
