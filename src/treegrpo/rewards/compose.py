"""Rule-based, verifiable rewards of the compositional world (GenEval in miniature).

The detector (`detect`) works on decoded images, no learned part:

1. Each pixel p is explained as the gray background g blended with one palette colour c:
   `p ~ g + a (c - g)`, a = <p - g, c - g> / |c - g|^2; the colour with the smallest residual
   `|p - g - a (c - g)|` among those with a > 0 wins. A pixel is an object pixel when a >= 0.5 and
   the residual is below `RESIDUAL_MAX`; its soft coverage is a (clamped to [0, 1]).
2. Object pixels of one colour form objects by 8-connectivity (rendered objects are at least 2 px
   apart, so distinct objects never touch). Components with a soft area below `MIN_AREA` px are
   specks and are ignored (the smallest object of the world covers about 16 px).
3. Each object's centre is its coverage-weighted centroid (every shape's centroid is its centre).
   Its shape is the template (circle, square, upward triangle) of the same area and centre that
   fits its coverage best (L1 error over the image, relative to the area); an error above `FIT_MAX`
   or an area above `MAX_AREA` means no shape (a blob, two merged objects, a broken shape): it
   counts as an object but matches no named shape.

Verdicts per template (`constraints`), each constraint scored in [0, 1]:

- single `a c s`: an object of colour c; that object has shape s; no other object.
- two `a c1 s1 and a c2 s2`: each named object found (1 with the right colour and shape, 0.5 with the
  right colour only; exact matches are assigned first); exactly two objects.
- count `n c s`: 1 - |m - n| / n (clipped at 0), m = objects of colour c and shape s; exactly n objects.
- position `a c1 s1 REL a c2 s2`: the two named objects as for `two`; exactly two objects; the
  relation holds between the matched objects' centres by more than `RELATION_MIN` px on its axis.

`compose_strict` is 1 when every constraint is fully met, else 0 (GenEval's per-image verdict);
`compose` (the partial-credit reward RL trains on) is the mean of the constraint scores; so strict
is 1 exactly when `compose` is 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from treegrpo.rewards.base import register_reward
from treegrpo.worlds.compose import BACKGROUND, COLOURS, SHAPES, SQUARE_HALF_SIDE, PromptSpec, parse_prompt, shape_masks

RESIDUAL_MAX = 0.2  # colour residual (RGB distance) above which a pixel is no blend of gray and a palette colour
MIN_AREA = 6.0  # px of soft coverage: smaller components are specks, not objects
FIT_MAX = 0.3  # relative L1 error of the best shape template above which an object has no shape
MAX_AREA = 1.3 * (2 * SQUARE_HALF_SIDE * 5.5) ** 2  # px: 1.3 x the largest object's area; bigger is no shape
RELATION_MIN = 2.0  # px between centres on the relation's axis
# area of each shape of radius r, divided by r^2 (circle, square of half-side 0.85 r, inscribed triangle)
AREA_PER_R2 = (math.pi, (2 * SQUARE_HALF_SIDE) ** 2, 3 * math.sqrt(3) / 4)
COLOUR_NAMES = tuple(COLOURS)


@dataclass(frozen=True)
class Detection:
    """One detected object: colour name, shape name (None = fits no template), centre, area (px),
    relative fit error of the best template, and of each template (circle, square, triangle)."""

    colour: str
    shape: str | None
    cx: float
    cy: float
    area: float
    fit_error: float
    fit_errors: tuple[float, ...] = ()


def palette_blend(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel as gray blended with its best palette colour: images [B, 3, H, W] in [0, 1] ->
    (colour index [B, H, W] long, coverage a [B, H, W] in [0, 1]; 0 where no blend explains the pixel
    within RESIDUAL_MAX)."""
    g = torch.tensor(BACKGROUND, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    d = torch.tensor(list(COLOURS.values()), dtype=torch.float32, device=images.device) - g.view(1, 3)  # [K, 3]
    diff = images.float() - g  # [B, 3, H, W]
    a = torch.einsum("bchw,kc->bkhw", diff, d) / (d * d).sum(1).view(1, -1, 1, 1)  # [B, K, H, W]
    a_c = a.clamp(0, 1)
    residual = (diff.unsqueeze(1) - a_c.unsqueeze(2) * d.view(1, -1, 3, 1, 1)).norm(dim=2)  # [B, K, H, W]
    residual = torch.where(a > 0, residual, torch.full_like(residual, float("inf")))
    best_res, best = residual.min(dim=1)
    cover = a_c.gather(1, best.unsqueeze(1)).squeeze(1)
    return best, torch.where(best_res < RESIDUAL_MAX, cover, torch.zeros_like(cover))


def pixel_colours(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(object-pixel colour index [B, H, W], -1 where coverage < 0.5; coverage [B, H, W])."""
    best, cover = palette_blend(images)
    return torch.where(cover >= 0.5, best, torch.full_like(best, -1)), cover


def components(index: torch.Tensor) -> torch.Tensor:
    """8-connected components of equal colour index (>= 0): [B, H, W] labels, 0 = none; labels are
    unique within an image. Label propagation: repeated maximum over same-colour neighbours."""
    b, h, w = index.shape
    fg = index >= 0
    labels = torch.where(fg, torch.arange(1, h * w + 1).view(1, h, w).expand(b, h, w), torch.zeros_like(index))
    for _ in range(h * w):
        new = _neighbour_max(labels, fg, index)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


WINDOW = 16  # px side of the window around an object in which shape templates are fitted (objects span <= 12 px)


def _fit_shapes(soft: torch.Tensor, areas: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Relative L1 error of each shape template of the object's area and centre: [N, 3].

    soft: [N, H, W] each object's coverage map (zero elsewhere). The fit runs on a WINDOW x WINDOW
    crop around the centre (4x4 supersampled templates, as the renderer draws)."""
    n, h, w = soft.shape
    ox = (cx.round().long() - WINDOW // 2).clamp(0, w - WINDOW)
    oy = (cy.round().long() - WINDOW // 2).clamp(0, h - WINDOW)
    ar = torch.arange(WINDOW)
    rows = (oy.view(n, 1) + ar.view(1, -1)).view(n, WINDOW, 1).expand(n, WINDOW, WINDOW)
    cols = (ox.view(n, 1) + ar.view(1, -1)).view(n, 1, WINDOW).expand(n, WINDOW, WINDOW)
    crop = soft[torch.arange(n).view(n, 1, 1), rows, cols]
    # mass outside the window cannot match any template: count it as error
    outside = areas - crop.flatten(1).sum(1)
    errors = torch.empty(n, len(SHAPES))
    for s, k in enumerate(AREA_PER_R2):
        r = (areas / k).sqrt()
        template = shape_masks(torch.full((n,), s), cx - ox, cy - oy, r, size=WINDOW, supersample=4)
        errors[:, s] = ((crop - template).abs().flatten(1).sum(1) + outside) / areas
    return errors


def _neighbour_max(labels: torch.Tensor, allowed: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Max of `labels` over each pixel's 8 neighbours whose `key` equals the pixel's, where `allowed`."""
    h, w = labels.shape[1:]
    padded = F.pad(labels, (1, 1, 1, 1), value=0)
    pad_key = F.pad(key, (1, 1, 1, 1), value=-2)
    out = labels
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                nb = padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                same = pad_key[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] == key
                out = torch.where(allowed & same, torch.maximum(out, nb), out)
    return out


@torch.no_grad()
def detect(images: torch.Tensor) -> list[list[Detection]]:
    """The objects in each image [B, 3, H, W] (in [0, 1]), as `Detection`s sorted by area (largest first)."""
    images = images.detach().float().cpu()
    best, cover = palette_blend(images)
    index = torch.where(cover >= 0.5, best, torch.full_like(best, -1))
    labels = components(index)
    b, h, w = index.shape
    # the anti-aliased rim (0 < coverage < 0.5) joins an adjacent component of its colour
    rim = (labels == 0) & (cover > 0)
    labels = torch.where(rim, _neighbour_max(labels, rim, best), labels)
    key = torch.arange(b).view(b, 1, 1) * (h * w + 1) + labels
    ids, inverse = torch.unique(key.flatten(), return_inverse=True)
    valid = (ids % (h * w + 1)) != 0  # label 0 = background
    n = ids.numel()
    flat_cover = cover.flatten()
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5,
                            indexing="ij")
    xs, ys = xs.flatten().repeat(b), ys.flatten().repeat(b)
    areas = torch.zeros(n).index_add_(0, inverse, flat_cover)
    keep = valid & (areas >= MIN_AREA)
    result: list[list[Detection]] = [[] for _ in range(b)]
    if not bool(keep.any()):
        return result
    cx = torch.zeros(n).index_add_(0, inverse, flat_cover * xs) / areas.clamp_min(1e-6)
    cy = torch.zeros(n).index_add_(0, inverse, flat_cover * ys) / areas.clamp_min(1e-6)
    colour = torch.zeros(n, dtype=torch.long)
    colour[inverse] = best.flatten()  # one colour per component (labels only join pixels of one colour)
    kept = keep.nonzero().flatten()
    slot = torch.full((n,), -1, dtype=torch.long)
    slot[kept] = torch.arange(kept.numel())
    pixel_slot = slot[inverse]
    image_of = (ids // (h * w + 1))
    soft = torch.zeros(kept.numel(), h * w)
    on = pixel_slot >= 0
    pixel_pos = torch.arange(b * h * w) % (h * w)
    soft[pixel_slot[on], pixel_pos[on]] = flat_cover[on]
    errors = _fit_shapes(soft.view(-1, h, w), areas[kept], cx[kept], cy[kept])
    best_err, best_shape = errors.min(dim=1)
    for j, c in enumerate(kept.tolist()):
        fits = float(best_err[j]) <= FIT_MAX and float(areas[c]) <= MAX_AREA
        shape = SHAPES[int(best_shape[j])] if fits else None
        result[int(image_of[c])].append(Detection(COLOUR_NAMES[int(colour[c])], shape, float(cx[c]), float(cy[c]),
                                                  float(areas[c]), float(best_err[j]),
                                                  tuple(float(e) for e in errors[j])))
    for dets in result:
        dets.sort(key=lambda d: -d.area)
    return result


# ------------------------------------------------------------------------------------ verdicts
def relation_margin(a: Detection, b: Detection, relation: str) -> float:
    """How far (px) centre a is `relation` centre b on the relation's axis (negative: the wrong way)."""
    return {"to the left of": b.cx - a.cx, "to the right of": a.cx - b.cx,
            "above": b.cy - a.cy, "below": a.cy - b.cy}[relation]


def match_objects(spec: PromptSpec, dets: list[Detection]) -> list[tuple[Detection | None, float]]:
    """For each named object of a two/position prompt: (matched detection, credit 1 / 0.5 / 0).
    Exact (colour and shape) matches are assigned before colour-only ones."""
    free = list(dets)
    out: list[tuple[Detection | None, float]] = [(None, 0.0)] * len(spec.objects)
    for exact in (True, False):
        for k, obj in enumerate(spec.objects):
            if out[k][0] is not None:
                continue
            for d in free:
                if d.colour == obj.colour and (not exact or d.shape == obj.shape):
                    out[k] = (d, 1.0 if d.shape == obj.shape else 0.5)
                    free.remove(d)
                    break
    return out


def constraints(spec: PromptSpec, dets: list[Detection]) -> list[float]:
    """The prompt's constraint scores in [0, 1] for one image's detections (see the module docstring)."""
    if spec.template == "single":
        obj = spec.objects[0]
        coloured = [d for d in dets if d.colour == obj.colour]
        return [float(bool(coloured)), float(any(d.shape == obj.shape for d in coloured)), float(len(dets) == 1)]
    if spec.template == "count":
        n, obj = len(spec.objects), spec.objects[0]
        m = sum(d.colour == obj.colour and d.shape == obj.shape for d in dets)
        return [max(0.0, 1.0 - abs(m - n) / n), float(len(dets) == n)]
    matched = match_objects(spec, dets)
    scores = [credit for _, credit in matched] + [float(len(dets) == 2)]
    if spec.template == "position":
        (a, _), (b, _) = matched
        holds = a is not None and b is not None and relation_margin(a, b, spec.relation) > RELATION_MIN
        scores.append(float(holds))
    return scores


SOFT_SHAPE_LEAD = 0.1  # fit-error lead over the next template at which `compose_soft` gives full shape credit
SOFT_FIT_BAND = 0.1  # half-width of the band around FIT_MAX over which its shape credit fades out


def _ramp(value: float) -> float:
    return min(1.0, max(0.0, value))


def shape_credit(det: Detection, shape: str) -> float:
    """How clearly `det` is a `shape`, in [0, 1]: the product of its lead over the best other
    template (0 when it trails by SOFT_SHAPE_LEAD, 1 when it leads by as much, linear between) and
    its own fit (1 at FIT_MAX - SOFT_FIT_BAND, 0 at FIT_MAX + SOFT_FIT_BAND). 0 for an object too
    large to be one shape (merged objects)."""
    if det.area > MAX_AREA or not det.fit_errors:
        return 0.0 if det.area > MAX_AREA else float(det.shape == shape)
    i = SHAPES.index(shape)
    own = det.fit_errors[i]
    other = min(e for j, e in enumerate(det.fit_errors) if j != i)
    lead = _ramp(0.5 + (other - own) / (2 * SOFT_SHAPE_LEAD))
    return lead * _ramp((FIT_MAX + SOFT_FIT_BAND - own) / (2 * SOFT_FIT_BAND))


def soft_constraints(spec: PromptSpec, dets: list[Detection]) -> list[float]:
    """`constraints` with continuous credit where the detector measures a continuous quantity: an
    object's shape (`shape_credit`, instead of the best template's name), the count of the named
    object (the sum of the shape credits of the objects of its colour) and the relation (its margin
    over 2 RELATION_MIN px, clipped to [0, 1]). The number of objects stays a count. A training
    reward: the pixels' small changes move it, where the thresholded `compose` mostly stays put."""
    if spec.template == "single":
        obj = spec.objects[0]
        coloured = [d for d in dets if d.colour == obj.colour]
        return [float(bool(coloured)), max((shape_credit(d, obj.shape) for d in coloured), default=0.0),
                float(len(dets) == 1)]
    if spec.template == "count":
        n, obj = len(spec.objects), spec.objects[0]
        m = sum(shape_credit(d, obj.shape) for d in dets if d.colour == obj.colour)
        return [max(0.0, 1.0 - abs(m - n) / n), float(len(dets) == n)]
    matched = match_objects(spec, dets)
    scores = [0.0 if d is None else 0.5 + 0.5 * shape_credit(d, obj.shape) for (d, _), obj in zip(matched, spec.objects)]
    scores.append(float(len(dets) == 2))
    if spec.template == "position":
        (a, _), (b, _) = matched
        scores.append(0.0 if a is None or b is None else _ramp(relation_margin(a, b, spec.relation) / (2 * RELATION_MIN)))
    return scores


def soft_scores(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """`compose_soft` [B]: the mean of `soft_constraints` per image."""
    if images.ndim != 4 or images.shape[0] != len(prompts):
        raise ValueError(f"compose rewards need images [B, 3, H, W] and B prompts, got {tuple(images.shape)} and "
                         f"{len(prompts)} prompts")
    specs = [parse_prompt(p) for p in prompts]
    scores = [soft_constraints(s, d) for s, d in zip(specs, detect(images))]
    return torch.tensor([sum(c) / len(c) for c in scores], dtype=torch.float32)


def verdicts(images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial credit [B] in [0, 1], strict [B] in {0, 1}) for images [B, 3, H, W] and B prompts."""
    if images.ndim != 4 or images.shape[0] != len(prompts):
        raise ValueError(f"compose rewards need images [B, 3, H, W] and B prompts, got {tuple(images.shape)} and "
                         f"{len(prompts)} prompts")
    specs = [parse_prompt(p) for p in prompts]
    scores = [constraints(s, d) for s, d in zip(specs, detect(images))]
    partial = torch.tensor([sum(c) / len(c) for c in scores], dtype=torch.float32)
    strict = torch.tensor([float(all(x == 1.0 for x in c)) for c in scores], dtype=torch.float32)
    return partial, strict


def strict_accuracy(images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Per-image strict verdicts for held-out evaluation: {"strict": [B], "strict/TEMPLATE": [B] with NaN
    for images of other templates} (the evaluation averages over the non-NaN entries)."""
    _, strict = verdicts(images, prompts)
    out = {"strict": strict}
    templates = [parse_prompt(p).template for p in prompts]
    for t in ("single", "two", "count", "position"):
        mask = torch.tensor([x == t for x in templates])
        out[f"strict/{t}"] = torch.where(mask, strict, torch.full_like(strict, float("nan")))
    return out


@register_reward("compose")
class ComposeReward:
    """Partial credit of the compositional world: the share of the prompt's constraints met, in [0, 1]."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return verdicts(images, prompts)[0]


@register_reward("compose_strict")
class ComposeStrictReward:
    """GenEval-style verdict of the compositional world: 1 when the image shows exactly the named
    objects (colour, shape, count) and the relation holds by more than 2 px, else 0."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return verdicts(images, prompts)[1]


@register_reward("compose_soft")
class ComposeSoftReward:
    """Continuous partial credit of the compositional world (`soft_constraints`): how clearly each
    named object has its shape, how far the relation holds, how close the count is; in [0, 1]."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return soft_scores(images, prompts)
