"""Small helpers for multi-process training: sharding, cross-rank reductions of metrics and sums.

The trainer runs through `accelerate.Accelerator` (one process by default). A rank owns whole
prompts (their trees), so per-prompt statistics need no communication; what crosses ranks is the
few scalars gathered here (metrics, the global std's sums, stop decisions) and, in the update,
the gradients DDP all-reduces. Every helper is a no-op shortcut in a world of one.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import torch

from treegrpo.config import ConfigError


def check_divisible(count: int, world: int, what: str = "train.prompts_per_iteration") -> None:
    """Each rank must own the same number of prompts (equal minibatches keep DDP's averaged gradient
    equal to the one-process gradient); raise ConfigError otherwise."""
    if count % world:
        lower, upper = world * max(1, count // world), world * (count // world + 1)
        raise ConfigError(f"{what}={count} is not divisible by the {world} processes; use a multiple of {world} "
                          f"(e.g. {lower} or {upper})")


def shard_slice(count: int, rank: int, world: int) -> slice:
    """Rank `rank`'s contiguous part of `count` items (the first `count % world` ranks get one more)."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def padded_shard(items: Sequence[Any], rank: int, world: int) -> tuple[list[Any], int]:
    """(this rank's items padded to ceil(len / world) with copies of its last item, real count).

    Padding gives every rank the same number of model calls, which sharded models (FSDP, ZeRO-3)
    need: their forwards are collective."""
    part = list(items[shard_slice(len(items), rank, world)])
    size = math.ceil(len(items) / world)
    real = len(part)
    filler = part[-1] if part else items[-1]
    return part + [filler] * (size - real), real


def all_sum(accelerator: Any, values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks of a float64 tensor (returned on the CPU)."""
    if accelerator.num_processes == 1:
        return values
    # float64 for exact-enough statistics; gloo and NCCL both take it.
    return accelerator.reduce(values.double().to(accelerator.device), reduction="sum").cpu()


def gather_rows(accelerator: Any, values: torch.Tensor) -> torch.Tensor:
    """[world, *values.shape]: every rank's `values` (same shape on all ranks), in rank order."""
    if accelerator.num_processes == 1:
        return values.unsqueeze(0)
    out = accelerator.gather(values.double().to(accelerator.device).unsqueeze(0))
    return out.cpu().view(accelerator.num_processes, *values.shape)


def any_rank(accelerator: Any, flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (stop decisions must agree, or ranks hang)."""
    return bool(all_sum(accelerator, torch.tensor([float(flag)], dtype=torch.float64))[0] > 0)


def max_over_ranks(accelerator: Any, value: float) -> float:
    return float(gather_rows(accelerator, torch.tensor([value], dtype=torch.float64)).max())


# How each metric combines over ranks; keys not listed are averaged with weight = the rank's "leaves".
SUMMED = ("leaves", "nonfinite_rewards", "model_calls/rollout", "model_calls/train", "finite_leaves",
          "model_calls/saved", "pruned_nodes")
MINIMUM = ("train/ratio_min", "memory/peak_rss_reset")
MAXIMUM = ("train/ratio_max", "train/first_ratio_dev", "memory/peak_rss_mb", "memory/peak_rss_growth_mb",
           "memory/peak_cuda_allocated_mb")  # memory: the largest process
SAME = ("window_start", "lr", "train/grad_norm")  # identical on every rank (shared draws, synced gradients)


def reduce_metrics(accelerator: Any, record: dict[str, float], weights: dict[str, float] | None = None) -> dict[str, float]:
    """Combine one iteration's per-rank metrics into the numbers one process doing all prompts
    would report. Counts are summed, extremes take min / max, the rest are weighted means: weight
    `weights[key]` on this rank (e.g. its finite leaves for reward means; default 1 = plain mean).
    Per-reward std ``train/NAME_std`` is recombined exactly from each rank's mean, std and count
    (pass ``weights[...]`` = its count). NaN entries (a rank without finite rewards) get no weight.
    Every rank must pass the same keys in the same order."""
    if accelerator.num_processes == 1:
        return dict(record)
    keys = list(record)
    w = [float((weights or {}).get(k, 1.0)) for k in keys]
    values = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64)
    rows = gather_rows(accelerator, torch.stack([values, torch.tensor(w, dtype=torch.float64)]))  # [world, 2, K]
    vals, wts = rows[:, 0], rows[:, 1]
    out: dict[str, float] = {}
    for j, key in enumerate(keys):
        v, wt = vals[:, j], wts[:, j]
        ok = torch.isfinite(v) & (wt > 0)
        if key in SUMMED:
            out[key] = float(v.sum())
        elif key in MINIMUM:
            out[key] = float(v.min())
        elif key in MAXIMUM:
            out[key] = float(v.max())
        elif key in SAME:
            out[key] = float(v[0])
        elif not ok.any():
            out[key] = float("nan")
        elif key.endswith("_std") and key[:-4] + "_mean" in record:
            # Pooled population std: E[x^2] - E[x]^2 from each rank's mean, std and count.
            m = vals[:, keys.index(key[:-4] + "_mean")]
            second = (v**2 + m**2)[ok]
            mean = float((m[ok] * wt[ok]).sum() / wt[ok].sum())
            out[key] = math.sqrt(max(float((second * wt[ok]).sum() / wt[ok].sum()) - mean**2, 0.0))
        else:
            out[key] = float((v[ok] * wt[ok]).sum() / wt[ok].sum())
    return out


# ---- FSDP: sharded parameters and optimiser state, saved and restored as full (unsharded) state dicts.
# The functions of torch.distributed.checkpoint.state_dict work for FSDP1 (accelerate's default on GPU),
# FSDP2 (`fully_shard`) and unwrapped modules alike; they are collective: every rank calls them.


def fsdp_requested() -> bool:
    """Whether this process was started for FSDP (`accelerate launch --use_fsdp` or an FSDP config)."""
    import os

    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


@contextlib.contextmanager
def accelerate_without_fsdp() -> Iterator[None]:
    """Hide the FSDP request from accelerate while the Accelerator is built, for CPU processes.

    accelerate 1.15 cannot shard on CPU: with `fsdp_version: 1` (its default) building the Accelerator
    raises "There are currently no available devices found" (sync_module_states wants a GPU); with
    version 2 it selects FSDP only for GPU-like distributed types, so on CPU (MULTI_CPU) the plugin is
    dropped and the run is silently DDP. The trainer shards with torch's `fully_shard` itself there.
    """
    import os

    saved = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def _full_options(**extra: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded parameters of an FSDP module under their original names, on the CPU (on the main
    process; other ranks get an empty dict). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def load_full_model_state(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load full (unsharded) `weights` (a subset of the parameters: the trainable ones) into an FSDP
    module, each rank keeping its shard. Every rank passes the same weights. Collective."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    names = {name for name, _ in model.named_parameters()}
    unknown = sorted(set(weights) - names)
    if unknown:
        raise ValueError(f"checkpoint does not match the model: unexpected {unknown[:3]}")
    set_model_state_dict(model, weights, options=_full_options(strict=False))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser state of a sharded model gathered into one full state dict keyed by parameter
    names (AdamW: step, exp_avg, exp_avg_sq per parameter), on the CPU of the main process (other
    ranks get an empty dict). Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore a `full_optimizer_state` into the (sharded) optimiser: each rank keeps the slices of its
    own shards. Every rank passes the same full state. Collective."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_full_options())
