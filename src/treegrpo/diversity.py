"""Diversity across the seeds of one prompt: is the model still drawing different images?

Metrics (SPEC.md section 8, TMPO's definitions), computed per prompt over its held-out seeds and
averaged over prompts:

- ``cosine_diversity``: mean over pairs i != j of (1 - cos(e_i, e_j)) of L2-normalised image
  features e (CLIP image embeddings when a CLIP-based reward is loaded). 0 = all seeds look the
  same to the feature, 1 = orthogonal features.
- ``lgmd``: mean over pairs of log(||z_i - z_j|| / sqrt(D)) on the flattened final latents z
  (D elements each). Higher = more diverse; identical latents are floored at `LGMD_FLOOR`.
- ``pixel_distance``: mean pairwise RMS distance of the images in [0, 1], a feature-free fallback.

Features come from one hook, `DiversityFeature`: a function ``(images [N, 3, H, W] in [0, 1],
prompts: N strings) -> [N, D]`` and the distance that compares its vectors ("cosine" for
embeddings, "euclidean" for coordinates such as an object layout). Two sources:

1. a loaded reward with an ``image_features(images) -> [B, D]`` method (the CLIP-based rewards of
   ``treegrpo.rewards.preference``): feature ``cosine_NAME``, cosine distance (`reward_feature`);
2. a world's own feature, registered with `register_diversity_feature(name, fn, metric=...,
   families=(...))`; it is used by default when the run's world (``compose`` or ``shapes`` for the
   embedded worlds, else ``model.family``) is one of `families`. The shapes world registers
   ``layout`` (its shape's centroid and extent from the colour mask, see `shapes_layout`), the
   compositional world ``scene_layout`` (object coverage per image cell, see `compose_layout`).

Evaluation logs ``diversity/lgmd``, ``diversity/pixel`` and ``diversity/FEATURE`` per feature
(`per_image_diversity`); GARDO's diversity-weighted advantages (``treegrpo.advantages``) use
`nearest_neighbour_distance` of the same features over the leaves of a prompt group.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

import torch

Metric = Literal["cosine", "euclidean"]
FeatureFn = Callable[[torch.Tensor, list[str]], torch.Tensor]
LGMD_FLOOR = 1e-6  # ||z_i - z_j|| / sqrt(D) below this counts as this (log(0) would be -inf)


@dataclass(frozen=True)
class DiversityFeature:
    """An image feature for diversity: fn(images [N, 3, H, W] in [0, 1], prompts) -> [N, D] float,
    compared with `metric` ("cosine": 1 - cos of L2-normalised vectors; "euclidean": L2 distance)."""

    name: str
    fn: FeatureFn
    metric: Metric = "euclidean"
    families: tuple[str, ...] = field(default=())  # model families that use it by default
    partial: bool = False  # NaN rows for images it does not apply to: evaluation only, not GARDO's feature

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        out = torch.as_tensor(self.fn(images, prompts)).float().cpu()
        if out.ndim != 2 or out.shape[0] != images.shape[0]:
            raise ValueError(f"diversity feature {self.name!r} must return [N, D] for {images.shape[0]} images, "
                             f"got {tuple(out.shape)}")
        return out


_FEATURES: dict[str, DiversityFeature] = {}


def register_diversity_feature(name: str, fn: FeatureFn, *, metric: Metric = "euclidean",
                               families: tuple[str, ...] = (), partial: bool = False) -> DiversityFeature:
    """Register a world's feature under `name` (logged as ``diversity/NAME``); used by default for
    models of `families`, and by name in ``eval.diversity_features`` / ``method.diversity_feature``.
    partial: the feature is NaN for images it does not apply to (their prompts drop out of its mean),
    so it cannot weight GARDO's advantages."""
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"diversity feature metric must be 'cosine' or 'euclidean', got {metric!r}")
    if name in _FEATURES:
        raise ValueError(f"diversity feature {name!r} is registered twice")
    feature = DiversityFeature(name, fn, metric, tuple(families), partial)
    _FEATURES[name] = feature
    return feature


def available_features() -> list[str]:
    _import_builtin_features()
    return sorted(_FEATURES)


def reward_feature(name: str, reward: object) -> DiversityFeature | None:
    """The ``cosine_NAME`` feature of a reward exposing ``image_features(images) -> [B, D]``, else None."""
    image_features = getattr(reward, "image_features", None)
    if not callable(image_features):
        return None
    return DiversityFeature(f"cosine_{name}", lambda images, prompts: image_features(images), "cosine")


def resolve_features(names: list[str] | None, rewards: Mapping[str, object], family: str,
                     option: str = "eval.diversity_features") -> dict[str, DiversityFeature]:
    """{feature name: feature} to compute. names None: every reward with image features (in the
    given order), then the features registered for `family`; else each name is a reward with image
    features or a registered feature. An unknown name raises ValueError naming the valid ones."""
    _import_builtin_features()
    from_rewards = {n: f for n, r in rewards.items() if (f := reward_feature(n, r)) is not None}
    if names is None:
        out = {f.name: f for f in from_rewards.values()}
        out.update({n: f for n, f in _FEATURES.items() if family in f.families})
        return out
    out = {}
    for name in names:
        if name in from_rewards:
            out[from_rewards[name].name] = from_rewards[name]
        elif name in _FEATURES:
            out[name] = _FEATURES[name]
        else:
            valid = sorted(from_rewards) + sorted(_FEATURES)
            close = difflib.get_close_matches(name, valid, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"{option}: {name!r} is neither a loaded reward with image features nor a registered "
                             f"diversity feature.{hint} Valid here: {', '.join(valid) or 'none'}")
    return out


# ---------------------------------------------------------------------------- pairwise distances
def pairwise_distance(features: torch.Tensor, metric: Metric) -> torch.Tensor:
    """[S, D] -> [S, S] float64: 1 - cos of L2-normalised rows ("cosine") or L2 distance ("euclidean")."""
    x = features.double().flatten(1)
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
        return (1.0 - x @ x.T).clamp_min(0.0)
    if metric == "euclidean":
        return torch.cdist(x, x)
    raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")


def _off_diagonal_mean(d: torch.Tensor) -> torch.Tensor:
    """[..., S, S] -> [..., S]: row means over j != i (so the mean of the rows is the pair mean)."""
    s = d.shape[-1]
    if s < 2:
        raise ValueError("diversity needs at least 2 samples per prompt (eval.num_seeds >= 2)")
    eye = torch.eye(s, dtype=torch.bool, device=d.device)
    return d.masked_fill(eye, 0.0).sum(-1) / (s - 1)


def cosine_diversity(features: torch.Tensor) -> float:
    """Mean over pairs i != j of (1 - cos(e_i, e_j)) of features [S, D]."""
    return float(_off_diagonal_mean(pairwise_distance(features, "cosine")).mean())


def lgmd(latents: torch.Tensor) -> float:
    """Mean over pairs i != j of log(||z_i - z_j|| / sqrt(D)) of latents [S, ...] (flattened to D)."""
    return float(_off_diagonal_mean(_log_distance(latents.flatten(1))).mean())


def pixel_distance(images: torch.Tensor) -> float:
    """Mean over pairs i != j of the RMS distance of images [S, 3, H, W]."""
    x = images.flatten(1)
    return float(_off_diagonal_mean(torch.cdist(x.double(), x.double()) / math.sqrt(x.shape[1])).mean())


def _log_distance(z: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(z.double(), z.double()) / math.sqrt(z.shape[-1])
    return torch.log(d.clamp_min(LGMD_FLOOR))


def nearest_neighbour_distance(features: torch.Tensor, metric: Metric = "cosine") -> torch.Tensor:
    """[G, D] -> [G] float64: each row's distance to its nearest other row (GARDO's d_i)."""
    d = pairwise_distance(features, metric)
    if d.shape[0] < 2:
        raise ValueError("a nearest neighbour needs at least 2 samples in the group")
    return d.masked_fill(torch.eye(d.shape[0], dtype=torch.bool), math.inf).min(dim=1).values


def group_nearest_neighbour(features: torch.Tensor, group: torch.Tensor, metric: Metric = "cosine",
                            mask: torch.Tensor | None = None) -> torch.Tensor:
    """GARDO's d_i for every leaf: features [L, D], group [L] long (prompt of each leaf) -> [L]
    float64, the distance to the nearest other leaf of the same group. Masked-out leaves (mask [L]
    bool False) are nobody's neighbour and get 0; so does a leaf with no other valid leaf."""
    keep = torch.ones(group.shape, dtype=torch.bool) if mask is None else mask.bool()
    out = torch.zeros(group.shape, dtype=torch.float64)
    for g in torch.unique(group[keep]).tolist():
        idx = torch.nonzero((group == g) & keep).flatten()
        if idx.numel() >= 2:
            out[idx] = nearest_neighbour_distance(features[idx], metric)
    return out


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def per_image_diversity(images: torch.Tensor, latents: torch.Tensor, prompts: list[str], num_seeds: int,
                        features: Mapping[str, DiversityFeature]) -> dict[str, torch.Tensor]:
    """Per-image diversity terms, prompt-major like the evaluation ({``diversity/KEY``: [P * S] float32}):
    entry p * S + s is the mean over the other seeds of prompt p of the pair term, so the mean over
    all images is the per-prompt pair mean averaged over prompts (every prompt has S seeds), and
    ranks holding different prompts can concatenate theirs.

    images [P * S, 3, H, W] in [0, 1]; latents [P * S, ...] final latents; prompts: P * S strings.
    Keys: ``lgmd``, ``pixel``, and one per feature (its own metric)."""
    n = images.shape[0]
    if n % num_seeds or latents.shape[0] != n or len(prompts) != n:
        raise ValueError(f"expected P * {num_seeds} images, latents and prompts, got {n}, {latents.shape[0]}, {len(prompts)}")
    p = n // num_seeds
    out = {"diversity/lgmd": _off_diagonal_mean(_log_distance(latents.flatten(1).view(p, num_seeds, -1)))}
    pixels = images.float().flatten(1).view(p, num_seeds, -1).double()
    out["diversity/pixel"] = _off_diagonal_mean(torch.cdist(pixels, pixels) / math.sqrt(pixels.shape[-1]))
    for name, feature in features.items():
        e = feature(images, prompts).view(p, num_seeds, -1)
        out[f"diversity/{name}"] = _off_diagonal_mean(torch.stack([pairwise_distance(g, feature.metric) for g in e]))
    return {k: v.flatten().float().cpu() for k, v in out.items()}


def _import_builtin_features() -> None:
    import treegrpo.worlds.compose_layout  # noqa: F401  (registers "scene_layout" for the compositional world)
    import treegrpo.worlds.shapes_layout  # noqa: F401  (registers "layout" for the shapes family)
