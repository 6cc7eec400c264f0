"""A small CNN that tells circle / square / triangle / "other" apart in 16x16 shapes-world images.

It backs the ``shape`` reward. Pure torch, about 126k parameters; the shipped weights live in
``treegrpo/assets/shape_classifier.safetensors`` (fp32, ~0.5 MB; the safetensors metadata holds
the architecture config and the training metrics). They are reproduced exactly (same machine,
same torch, same thread count) with::

    from treegrpo.worlds.classifier import train_shape_classifier
    train_shape_classifier("src/treegrpo/assets/shape_classifier.safetensors", steps=2500, seed=0)

Training data is drawn on the fly, never stored. The three shape classes are the renderer's own
shapes (same geometry, radius and placement as ``shapes.render_batch``), drawn half the time in
palette colours and half in random colour pairs so that the classifier judges geometry, not
colour. Class 3, "other", is everything that is NOT one clean prompted shape, so that a policy
cannot collect the ``shape`` reward with degenerate images: empty backgrounds, pixel noise (uniform,
Gaussian, smooth, salt and pepper), shapes stretched to a strong aspect ratio (ellipses,
rectangles, squashed triangles, optionally rotated), rotated squares and downward triangles,
blobs, two shapes (overlapping or apart), shapes much smaller or larger than ``RADIUS_RANGE``,
and shapes cut by the image border. Every sample then goes through robustness augmentations:
colour jitter, slight Gaussian blur, +-1 pixel translations and Gaussian pixel noise.

Written by hand: no library ships a classifier for this toy world.
"""

from __future__ import annotations

import json
import math
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from treegrpo.worlds.shapes import BACKGROUNDS, COLOURS, IMAGE_SIZE, RADIUS_RANGE, SHAPES, SQUARE_HALF_SIDE, all_prompts, render_batch

CLASSES: tuple[str, ...] = (*SHAPES, "other")  # ("circle", "square", "triangle", "other")
OTHER = len(SHAPES)  # index of the "other" class
DEFAULT_WEIGHTS = "shape_classifier.safetensors"  # file name inside treegrpo/assets

# Fractions of a training batch; the rest of the batch (1 - REAL_FRACTION) is "other".
REAL_FRACTION = 0.55
# Kinds of "other" images and their relative frequencies.
_OTHER_KINDS: dict[str, float] = {
    "empty": 1.0,
    "noise": 1.0,
    "stretched": 2.0,
    "rotated": 1.0,
    "blob": 1.5,
    "two_shapes": 2.0,
    "small": 1.0,
    "large": 1.0,
    "cut": 1.5,
}


class ShapeClassifier(nn.Module):
    """images [B, 3, 16, 16] float32 in [0, 1] -> logits [B, 4] over ``CLASSES``."""

    def __init__(self, width: int = 16, hidden: int = 64) -> None:
        super().__init__()
        w = width
        self.config = {"width": width, "hidden": hidden}
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, hidden), nn.ReLU(), nn.Linear(hidden, len(CLASSES)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images * 2.0 - 1.0))


# --------------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------------


def _coverage(kind: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor,
              sx: torch.Tensor, sy: torch.Tensor, angle: torch.Tensor,
              size: int = IMAGE_SIZE, supersample: int = 4) -> torch.Tensor:
    """Anti-aliased coverage of a (stretched, rotated) circle/square/up-triangle: [B, size, size].

    kind: [B] long, index into ``SHAPES``; cx, cy, r: [B] pixels; sx, sy: [B] axis stretch factors
    (1 = the renderer's shape); angle: [B] radians. With sx = sy = 1 and angle = 0 this is the
    geometry of ``shapes.render_batch``.
    """
    n = size * supersample
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / supersample
    col = lambda t: t.view(-1, 1, 1)  # noqa: E731
    dx = coords.view(1, 1, n) - col(cx)
    dy = coords.view(1, n, 1) - col(cy)
    cos, sin = col(torch.cos(angle)), col(torch.sin(angle))
    u = (cos * dx + sin * dy) / col(sx)
    v = (-sin * dx + cos * dy) / col(sy)
    rr = col(r)
    circle = u**2 + v**2 <= rr**2
    half = SQUARE_HALF_SIDE * rr
    square = (u.abs() <= half) & (v.abs() <= half)
    triangle = (v <= rr / 2) & (math.sqrt(3.0) * u.abs() <= v + rr)
    k = col(kind)
    inside = torch.where(k == 0, circle, torch.where(k == 1, square, triangle))
    return inside.float().view(-1, size, supersample, size, supersample).mean(dim=(2, 4))


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _colour_pairs(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background colours [n, 3]: half palette, half random with contrast >= 0.4."""
    pal = torch.tensor(list(COLOURS.values()))
    bgs = torch.tensor(list(BACKGROUNDS.values()))
    fg = pal[torch.randint(len(pal), (n,), generator=g)]
    bg = bgs[torch.randint(len(bgs), (n,), generator=g)]
    rfg, rbg = torch.rand(n, 3, generator=g), torch.rand(n, 3, generator=g)
    # Push random pairs apart until their contrast is at least 0.4 (Euclidean RGB).
    diff = rfg - rbg
    dist = diff.norm(dim=1, keepdim=True).clamp_min(1e-3)
    push = (0.4 - dist).clamp_min(0) / dist
    rfg = (rfg + diff * push).clamp(0, 1)
    rbg = (rbg - diff * push).clamp(0, 1)
    use_random = torch.rand(n, 1, generator=g) < 0.5
    return torch.where(use_random, rfg, fg), torch.where(use_random, rbg, bg)


def _paint(bg: torch.Tensor, fg: torch.Tensor, alpha: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """Composite fg [n, 3] with coverage alpha [n, H, W] over base (or flat bg): [n, 3, H, W]."""
    if base is None:
        base = bg.view(-1, 3, 1, 1).expand(-1, 3, *alpha.shape[1:])
    a = alpha.unsqueeze(1)
    return base * (1 - a) + fg.view(-1, 3, 1, 1) * a


def _real_shapes(n: int, g: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n clean prompted shapes (renderer geometry, random colours): images, labels [n]."""
    kind = torch.randint(len(SHAPES), (n,), generator=g)
    lo, hi = RADIUS_RANGE
    r = _uniform(n, lo, hi, g) * size
    cx = r + (size - 2 * r) * torch.rand(n, generator=g)
    cy = r + (size - 2 * r) * torch.rand(n, generator=g)
    one, zero = torch.ones(n), torch.zeros(n)
    fg, bg = _colour_pairs(n, g)
    return _paint(bg, fg, _coverage(kind, cx, cy, r, one, one, zero, size)), kind


def _other_images(kind_name: str, n: int, g: torch.Generator, size: int) -> torch.Tensor:
    """n "other" images of one kind: [n, 3, size, size] in [0, 1]."""
    fg, bg = _colour_pairs(n, g)
    one, zero = torch.ones(n), torch.zeros(n)
    lo, hi = RADIUS_RANGE
    shape = torch.randint(len(SHAPES), (n,), generator=g)

    def centred(r_ext: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # centre keeping an extent r_ext inside the image where possible
        room = (size - 2 * r_ext).clamp_min(0)
        off = (size - room) / 2
        return off + room * torch.rand(n, generator=g), off + room * torch.rand(n, generator=g)

    if kind_name == "empty":
        return _paint(bg, fg, torch.zeros(n, size, size))
    if kind_name == "noise":
        style = torch.randint(4, (n,), generator=g).view(n, 1, 1, 1)
        uniform = torch.rand(n, 3, size, size, generator=g)
        gauss = (torch.rand(n, 3, 1, 1, generator=g) + 0.25 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
        low = torch.rand(n, 3, 4, 4, generator=g)
        smooth = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
        salt = (torch.rand(n, 1, size, size, generator=g) < _uniform(n, 0.1, 0.4, g).view(n, 1, 1, 1)).float()
        pepper = _paint(bg, fg, salt[:, 0])
        return torch.where(style == 0, uniform, torch.where(style == 1, gauss, torch.where(style == 2, smooth, pepper)))
    if kind_name == "stretched":
        r = _uniform(n, lo, hi, g) * size
        a = _uniform(n, 1.8, 3.2, g).sqrt()
        wide = torch.rand(n, generator=g) < 0.5
        sx, sy = torch.where(wide, a, 1 / a), torch.where(wide, 1 / a, a)
        angle = torch.where(torch.rand(n, generator=g) < 0.5, zero, _uniform(n, 0, math.pi, g))
        cx, cy = centred(r * 0.8)
        return _paint(bg, fg, _coverage(shape, cx, cy, r, sx, sy, angle, size))
    if kind_name == "rotated":
        # squares turned by 25-65 degrees, triangles by 45-75 or 165-195 degrees (pointing down-ish)
        r = _uniform(n, lo, hi, g) * size
        sq_angle = _uniform(n, 25, 65, g)
        tri_angle = torch.where(torch.rand(n, generator=g) < 0.5, _uniform(n, 45, 75, g), _uniform(n, 165, 195, g))
        kind = torch.where(torch.rand(n, generator=g) < 0.5, torch.ones_like(shape), torch.full_like(shape, 2))
        angle = torch.deg2rad(torch.where(kind == 1, sq_angle, tri_angle))
        cx, cy = centred(r)
        return _paint(bg, fg, _coverage(kind, cx, cy, r, one, one, angle, size))
    if kind_name == "blob":
        # union of 3-6 discs around a common point, or a thresholded smooth random field
        cx, cy = centred(torch.full((n,), 4.0))
        alpha = torch.zeros(n, size, size)
        count = torch.randint(3, 7, (n,), generator=g)
        for i in range(6):
            ox, oy = _uniform(n, -3.5, 3.5, g), _uniform(n, -3.5, 3.5, g)
            ri = _uniform(n, 1.0, 3.0, g)
            disc = _coverage(torch.zeros_like(shape), cx + ox, cy + oy, ri, one, one, zero, size)
            alpha = torch.where((i < count).view(n, 1, 1), torch.maximum(alpha, disc), alpha)
        field = F.interpolate(torch.randn(n, 1, 5, 5, generator=g), size=(size * 4, size * 4), mode="bicubic", align_corners=False)
        flat = field.flatten(1).sort(dim=1).values
        idx = (_uniform(n, 0.6, 0.85, g) * (flat.shape[1] - 1)).long().view(n, 1)
        q = flat.gather(1, idx)  # per-image threshold at a random quantile
        field_alpha = F.avg_pool2d((field > q.view(n, 1, 1, 1)).float(), 4)[:, 0]
        use_field = (torch.rand(n, generator=g) < 0.4).view(n, 1, 1)
        return _paint(bg, fg, torch.where(use_field, field_alpha, alpha))
    if kind_name == "two_shapes":
        # Draw 2n candidate pairs, keep n where both shapes are clearly visible (so that the image
        # is never one clean shape with a sliver of another, which would be label noise).
        m = 2 * n
        ones, zeros = torch.ones(m), torch.zeros(m)
        kinds = torch.randint(len(SHAPES), (2, m), generator=g)
        r1, r2 = _uniform(m, 0.15, hi, g) * size, _uniform(m, 0.15, hi, g) * size
        cx1 = r1 + (size - 2 * r1) * torch.rand(m, generator=g)
        cy1 = r1 + (size - 2 * r1) * torch.rand(m, generator=g)
        dist = _uniform(m, 0.6, 1.6, g) * (r1 + r2)
        theta = _uniform(m, 0, 2 * math.pi, g)
        cx2 = torch.minimum((cx1 + dist * torch.cos(theta)).clamp_min(0.6 * r2), size - 0.6 * r2)
        cy2 = torch.minimum((cy1 + dist * torch.sin(theta)).clamp_min(0.6 * r2), size - 0.6 * r2)
        a1 = _coverage(kinds[0], cx1, cy1, r1, ones, ones, zeros, size)
        a2 = _coverage(kinds[1], cx2, cy2, r2, ones, ones, zeros, size)
        area1, area2 = a1.sum(dim=(1, 2)), a2.sum(dim=(1, 2))
        visible1 = (a1 * (1 - a2)).sum(dim=(1, 2))
        added = (a2 * (1 - a1)).sum(dim=(1, 2))
        ok = (visible1 >= torch.clamp_min(0.5 * area1, 4.0)) & (added >= 4.0) & (area2 >= 4.0)
        idx = torch.nonzero(ok)[:, 0]
        idx = idx[torch.arange(n) % max(1, len(idx))] if len(idx) else torch.arange(n)
        same = torch.rand(n, 1, generator=g) < 0.5
        fg2 = torch.where(same, fg, 1 - fg)
        return _paint(bg, fg2, a2[idx], base=_paint(bg, fg, a1[idx]))
    if kind_name == "small":
        r = _uniform(n, 0.05, 0.14, g) * size
        cx, cy = centred(r)
        return _paint(bg, fg, _coverage(shape, cx, cy, r, one, one, zero, size))
    if kind_name == "large":
        r = _uniform(n, 0.46, 0.75, g) * size
        cx, cy = centred(r * 0.7)
        return _paint(bg, fg, _coverage(shape, cx, cy, r, one, one, zero, size))
    if kind_name == "cut":
        r = _uniform(n, lo, hi, g) * size
        cx, cy = centred(r)
        edge_pos = _uniform(n, -0.3, 0.45, g) * r  # centre's distance from the cutting edge
        side = torch.randint(4, (n,), generator=g)
        cx = torch.where(side == 0, edge_pos, torch.where(side == 1, size - edge_pos, cx))
        cy = torch.where(side == 2, edge_pos, torch.where(side == 3, size - edge_pos, cy))
        return _paint(bg, fg, _coverage(shape, cx, cy, r, one, one, zero, size))
    raise ValueError(f"unknown 'other' kind {kind_name!r}")


def _augment(images: torch.Tensor, g: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Colour jitter, slight blur, +-1 px translation, Gaussian noise: [B, 3, H, W] -> same."""
    b, c, h, w = images.shape
    col = lambda t: t.view(b, 1, 1, 1)  # noqa: E731
    on = lambda p: col((torch.rand(b, generator=g) < p).float())  # noqa: E731
    # colour jitter: per-channel gain and offset, global brightness
    gain = 1 + strength * 0.15 * (2 * torch.rand(b, c, 1, 1, generator=g) - 1)
    offset = strength * 0.08 * (2 * torch.rand(b, c, 1, 1, generator=g) - 1)
    x = torch.lerp(images, images * gain + offset, on(0.5)).clamp(0, 1)
    # slight blur: 3x3 Gaussian with sigma in [0.3, 0.8], per image
    sigma = _uniform(b, 0.3, 0.3 + 0.5 * strength, g)
    taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0]).view(1, 3) / (2 * sigma.view(b, 1) ** 2))
    taps = taps / taps.sum(1, keepdim=True)
    kernel = (taps.view(b, 3, 1) * taps.view(b, 1, 3)).repeat_interleave(c, 0).unsqueeze(1)  # [b*c, 1, 3, 3]
    blurred = F.conv2d(F.pad(x.reshape(1, b * c, h, w), (1, 1, 1, 1), mode="replicate"), kernel, groups=b * c).view(b, c, h, w)
    x = torch.lerp(x, blurred, on(0.4))
    # translation by -1/0/+1 pixels on each axis (edges replicated)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    moved = on(0.4).view(b)
    sx = torch.where(moved > 0, torch.randint(-1, 2, (b,), generator=g), 0)
    sy = torch.where(moved > 0, torch.randint(-1, 2, (b,), generator=g), 0)
    out = torch.zeros_like(x)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            sel = col(((sx == dx) & (sy == dy)).float())
            out = out + sel * padded[:, :, 1 + dy: 1 + dy + h, 1 + dx: 1 + dx + w]
    # Gaussian pixel noise with sigma in [0, 0.06]
    noise_sigma = col(_uniform(b, 0.0, 0.06 * strength, g)) * on(0.6)
    return (out + noise_sigma * torch.randn(b, c, h, w, generator=g)).clamp(0, 1)


def sample_training_batch(batch_size: int, generator: torch.Generator, size: int = IMAGE_SIZE,
                          augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of classifier data: images [B, 3, size, size] in [0, 1], labels [B] long."""
    n_real = round(batch_size * REAL_FRACTION)
    images, labels = _real_shapes(n_real, generator, size)
    parts, part_labels = [images], [labels]
    n_other = batch_size - n_real
    weights = torch.tensor(list(_OTHER_KINDS.values()))
    kinds = torch.multinomial(weights, n_other, replacement=True, generator=generator)
    counts = torch.bincount(kinds, minlength=len(_OTHER_KINDS))
    for name, count in zip(_OTHER_KINDS, counts.tolist()):
        if count:
            parts.append(_other_images(name, count, generator, size))
            part_labels.append(torch.full((count,), OTHER))
    x, y = torch.cat(parts), torch.cat(part_labels)
    if augment:
        x = _augment(x, generator)
    perm = torch.randperm(batch_size, generator=generator)
    return x[perm], y[perm]


# --------------------------------------------------------------------------------------------
# Training, evaluation, loading
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_shape_classifier(model: ShapeClassifier, n: int = 2000, seed: int = 12345) -> dict[str, float]:
    """Held-out accuracies on freshly drawn data (seed never used for training).

    Returns ``acc_rendered`` (clean ``render_batch`` images of all 54 prompts), ``acc_other``
    (augmented "other" images), ``acc_augmented_real`` (augmented real shapes) and ``acc_overall``
    (a fresh augmented training-distribution batch).
    """
    model.eval()
    g = torch.Generator().manual_seed(seed)
    prompts = all_prompts()
    chosen = [prompts[i] for i in torch.randint(len(prompts), (n,), generator=g).tolist()]
    rendered = render_batch(chosen, g)
    truth = torch.tensor([SHAPES.index(p.shape) for p in chosen])
    acc_rendered = (model(rendered).argmax(1) == truth).float().mean().item()
    x, y = sample_training_batch(n, g)
    pred = model(x).argmax(1)
    other = y == OTHER
    return {
        "acc_rendered": acc_rendered,
        "acc_other": (pred[other] == OTHER).float().mean().item(),
        "acc_augmented_real": (pred[~other] == y[~other]).float().mean().item(),
        "acc_overall": (pred == y).float().mean().item(),
    }


def train_shape_classifier(out_path: str | Path, steps: int = 2500, seed: int = 0, progress: bool = True,
                           batch_size: int = 128, lr: float = 3e-3, num_threads: int | None = 1) -> dict[str, float]:
    """Train the classifier from scratch on rendered data and save it as safetensors at out_path.

    Reproducible for a seed: all randomness comes from ``seed`` and training runs on
    ``num_threads`` torch threads (1 by default, so the float results do not depend on the
    machine's core count; None keeps the current setting). Takes 1.5-2 minutes on one CPU core
    with the defaults. Returns the metrics (also stored in the file's metadata): final training
    loss, held-out accuracies (see ``evaluate_shape_classifier``), seconds, steps, seed.
    """
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(Path(out_path), steps, seed, progress, batch_size, lr)
    finally:
        torch.set_num_threads(previous_threads)


def _train(out_path: Path, steps: int, seed: int, progress: bool, batch_size: int, lr: float) -> dict[str, float]:
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = ShapeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 10)
    # linear warm-up over the first 10% of steps, then cosine decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warmup, 0.5 * (1 + math.cos(
        math.pi * min(1.0, max(0, i - warmup) / max(1, steps - warmup))))))
    start = time.perf_counter()
    running = float("nan")
    bar = tqdm(range(steps), desc="shape classifier", disable=None if progress else True)
    model.train()
    for step in bar:
        x, y = sample_training_batch(batch_size, g)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.02)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{running:.3f}")
    seconds = time.perf_counter() - start
    metrics = {"train_loss": running, **evaluate_shape_classifier(model), "train_seconds": seconds,
               "steps": float(steps), "seed": float(seed)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_path), metadata={"config": json.dumps(model.config), "classes": json.dumps(CLASSES),
                                              "metrics": json.dumps(metrics)})
    return metrics


def default_weights_path() -> Path:
    """Path of the shipped weights inside the installed package."""
    return Path(str(resources.files("treegrpo") / "assets" / DEFAULT_WEIGHTS))


@lru_cache(maxsize=8)
def _load(path: str, device: str) -> ShapeClassifier:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"shape classifier weights not found at {p}; train them with "
                                f"`treegrpo pretrain classifier` (or train_shape_classifier({str(p)!r})).")
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata() or {}
    config = json.loads(meta.get("config", "{}"))
    model = ShapeClassifier(**config)
    model.load_state_dict(load_file(str(p)))
    return model.eval().requires_grad_(False).to(device)


def load_shape_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> ShapeClassifier:
    """Load (and cache) the classifier in eval mode, without network; path=None: shipped weights."""
    return _load(str(path if path is not None else default_weights_path()), str(torch.device(device)))


@torch.no_grad()
def shape_probabilities(images: torch.Tensor, path: str | Path | None = None) -> torch.Tensor:
    """images [B, 3, H, W] float in [0, 1] -> [B, 4] float32 probabilities over ``CLASSES``.

    Images of another size are resized to 16x16 (area averaging / bilinear) first.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"shape_probabilities expects images [B, 3, H, W], got {tuple(images.shape)}")
    x = images.float()
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    model = load_shape_classifier(path, device=x.device)
    return model(x.clamp(0, 1)).softmax(-1)
