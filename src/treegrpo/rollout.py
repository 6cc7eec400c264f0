"""Grow trees level by level with one batched model call per level.

At each step every frontier node of every tree of every prompt goes through the model together (in
chunks of `max_batch`), one call per node; a branching SDE step then draws k children around the
node's single mean. The rollout does not know which method it serves: the `TreeShape` says it all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from tqdm.auto import tqdm

from treegrpo.policies.base import Policy, Schedule
from treegrpo.pruning import clean_estimate
from treegrpo.steps import SDE_KINDS, ddim_mean_std, euler_step, gaussian_log_prob, sde_mean_std
from treegrpo.tree import Tree, TreeShape


@dataclass(frozen=True)
class SamplerConfig:
    """How stochastic steps are taken.

    sde_kind: flow models: "flow_grpo" (default, TreeGRPO's), "dance" (constant coefficient) or "cps".
    noise_level: `a` of flow_grpo / cps, or DanceGRPO's constant `eta`.
    ddim_eta: stochasticity of DDIM steps for epsilon-prediction diffusion models (DDPO uses 1.0).
    """

    sde_kind: Literal["flow_grpo", "dance", "cps"] = "flow_grpo"
    noise_level: float = 0.7
    ddim_eta: float = 1.0

    def __post_init__(self) -> None:
        if self.sde_kind not in SDE_KINDS:
            raise ValueError(f"sde_kind must be one of {SDE_KINDS}, got {self.sde_kind!r}")
        if self.noise_level < 0 or self.ddim_eta < 0:
            raise ValueError("noise_level and ddim_eta must be >= 0")


def transition(schedule: Schedule, sampler: SamplerConfig, x: torch.Tensor, model_out: torch.Tensor,
               step: torch.Tensor, stochastic: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean [B, ...] (float32, carries the gradient of `model_out`) and std [B, 1, ...] of step
    `step` ([B] long, may mix steps) from states x; std is None for a deterministic step."""
    if schedule.kind == "flow":
        assert schedule.sigmas is not None
        sigmas = schedule.sigmas.to(x.device)
        sigma, sigma_next = sigmas[step], sigmas[step + 1]
        if not stochastic:
            return euler_step(x, model_out, sigma, sigma_next), None
        return sde_mean_std(x, model_out, sigma, sigma_next, kind=sampler.sde_kind,
                            noise_level=sampler.noise_level, sigma_max=sigmas[1])
    assert schedule.alphas_cumprod is not None
    alphas = schedule.alphas_cumprod.to(x.device)
    mean, std = ddim_mean_std(x, model_out, alphas[step], alphas[step + 1],
                              eta=sampler.ddim_eta if stochastic else 0.0)
    return mean, (std if stochastic else None)


def predict_chunked(policy: Policy, x: torch.Tensor, times: torch.Tensor, cond: Any,
                    prompt_index: torch.Tensor, max_batch: int,
                    on_chunk: Callable[[int], Any] | None = None) -> torch.Tensor:
    """`policy.predict` over chunks of at most `max_batch` rows; [B, ...] -> [B, ...] float32.
    on_chunk(rows) is called after each chunk (progress bars)."""
    outs = []
    for s in range(0, x.shape[0], max_batch):
        outs.append(policy.predict(x[s:s + max_batch], times[s:s + max_batch], cond, prompt_index[s:s + max_batch]))
        if on_chunk is not None:
            on_chunk(outs[-1].shape[0])
    return torch.cat(outs).float()


def draw_noise(shape: tuple[int, ...], generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """[N, ...] standard normal noise on the CPU. With one generator per prompt (a list), rows are
    split into equal prompt-major blocks and block p comes from generator p: a prompt's noise then
    does not depend on which other prompts share the batch (or the process)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator)
    if shape[0] % len(generator):
        raise ValueError(f"{shape[0]} rows do not split into {len(generator)} equal prompt blocks")
    rows = shape[0] // len(generator)
    return torch.cat([torch.randn((rows, *shape[1:]), generator=g) for g in generator])


@torch.no_grad()
def rollout(policy: Policy, prompts: list[str], shape: TreeShape, *, num_steps: int | None = None,
            sampler: SamplerConfig = SamplerConfig(),
            generator: torch.Generator | Sequence[torch.Generator] | None = None,
            max_batch: int = 256, cond: Any = None, keep_all_latents: bool = False,
            root_latents: torch.Tensor | None = None, progress: bool = False, desc: str = "rollout",
            probe: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> Tree:
    """Grow one forest for `prompts` with `shape`; returns the `Tree` (its `num_model_calls` counts
    model evaluations without CFG).

    Noise is drawn per level for the whole level, so the result depends on the seed, not on
    `max_batch`; `generator` may be one generator per prompt (see `draw_noise`). Only the levels
    training needs (trained nodes, their children, leaves) keep their
    latents unless `keep_all_latents`. root_latents: optional [P * R, *latent_shape] initial noise.
    progress: a bar (model calls done / total, with ETA) on a terminal, titled `desc`.
    probe: value-guided pruning (`treegrpo.pruning`). At `shape.prune_level` the rollout passes the
    one-step clean estimates [N, *latent_shape] of that level's nodes (from the model call it makes
    there anyway) and their prompt indices [N] to `probe`, which returns a [N] bool mask of the
    nodes to complete; the others are pruned (`Tree.prune`) and their tails never computed.
    """
    num_steps = num_steps or shape.num_steps
    if shape.num_steps != num_steps:
        raise ValueError(f"tree shape has {shape.num_steps} steps but the rollout asks for {num_steps}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    schedule = policy.schedule(num_steps)
    cond = policy.encode_prompts(prompts) if cond is None else cond
    num_roots = len(prompts) * shape.roots_per_prompt
    device = torch.device(getattr(policy, "device", "cpu"))
    if root_latents is None:
        # Noise comes from the (CPU) generator, then moves: the same seed gives the same trees anywhere.
        root_latents = draw_noise((num_roots, *policy.latent_shape), generator)
    tree = Tree.roots_for(shape, len(prompts), root_latents.float().to(device))
    x = tree.latents[0]

    def keep(level: int) -> bool:
        return (keep_all_latents or level == num_steps or shape.trained[min(level, num_steps - 1)]
                or (level > 0 and shape.trained[level - 1]))

    if not keep(0):
        tree.latents[0] = None
    if probe is not None and (shape.prune_level is None or shape.prune_level >= num_steps):
        raise ValueError("value-guided pruning needs an untrained step after the last trained one "
                         "(its model call gives the probe)")
    bar = tqdm(total=num_roots * shape.num_model_calls, desc=desc, unit="call", disable=None if progress else True,
               leave=False, dynamic_ncols=True)
    for i in range(num_steps):
        prompt_index = tree.prompt[i]
        step = torch.full((x.shape[0],), i, dtype=torch.long, device=device)
        out = predict_chunked(policy, x, schedule.times.to(device)[step], cond, prompt_index, max_batch, bar.update)
        tree.num_model_calls += x.shape[0]
        if probe is not None and i == shape.prune_level:
            kept = probe(clean_estimate(schedule, x, out, step), prompt_index)
            tree.prune(kept.to(torch.bool).cpu())
            rows = torch.nonzero(tree.kept).squeeze(1).to(device)
            x, out, step = x[rows], out[rows], step[rows]
            bar.total = bar.n + x.shape[0] * (num_steps - i - 1)  # the pruned tails are never run
        mean, std = transition(schedule, sampler, x, out, step, shape.stochastic[i])
        if std is None:
            children, log_prob = mean, None
        else:
            k = shape.branching[i]
            mean, std = mean.repeat_interleave(k, dim=0), std.repeat_interleave(k, dim=0)
            children = mean + std * draw_noise(tuple(mean.shape), generator).to(device)
            # A zero std (the cps step into sigma = 0) makes the step deterministic: its log-density
            # is not finite, so it stores none (such a step is never trained).
            log_prob = gaussian_log_prob(children, mean, std) if bool((std > 0).all()) else None
        tree.add_level(children, log_prob, keep_latents=keep(i + 1))
        x = children
    bar.close()
    return tree
