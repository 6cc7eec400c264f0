"""How much signal does one iteration's policy gradient carry? (Minutes, not a training run.)

At fixed parameters, R independent rollouts of the same prompts each give a policy gradient g_r
(the config's loss with one minibatch, no KL, no clipping: the ratio is 1). If the gradient were
all signal, the g_r would point the same way; if all noise, they would be orthogonal. The mean
pairwise cosine c estimates |E g|^2 / E|g|^2, the share of the gradient's energy that is signal,
for a rollout of this size (for n rollouts averaged, the share grows as n c / (1 + (n - 1) c)).

The control: the same rollouts with each prompt's edge advantages shuffled among its edges. The
shuffled advantages no longer belong to the noise that produced each edge, so their gradients have
no signal at all; their cosine (about 0) is what "no signal" reads at this R. A setting's signal is
its cosine above the control's, with a jackknife 95% interval over the rollouts.

    .venv/bin/python benchmarks/gradient_signal.py --rollouts 12            # the default config
    .venv/bin/python benchmarks/gradient_signal.py --rollouts 12 "reward.weights={compose_strict: 1.0}"
    .venv/bin/python benchmarks/gradient_signal.py --rollouts 12 "reward.weights={brightness: 1.0}"

`brightness` (registered here, the images' mean pixel value) is the positive control: a smooth
reward of every pixel, whose gradient the same rollouts must show.

Prints one table row per run; `--json FILE` also writes the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from treegrpo.config import load_config
from treegrpo.prompts import draw_prompts, load_prompts, prompt_groups
from treegrpo.rewards.base import register_reward
from treegrpo.trainer import Trainer


@register_reward("brightness")
class Brightness:
    """Mean pixel value of each image: smooth in every pixel (the positive control)."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return images.float().mean(dim=(1, 2, 3))


def mean_pairwise_cosine(grads: torch.Tensor) -> float:
    unit = grads / grads.norm(dim=1, keepdim=True).clamp_min(1e-30)
    cos = unit @ unit.T
    r = grads.shape[0]
    return float((cos.sum() - cos.diagonal().sum()) / (r * (r - 1)))


def jackknife(grads: torch.Tensor) -> tuple[float, float]:
    """(mean pairwise cosine, half-width of its 95% jackknife interval over the rollouts)."""
    r = grads.shape[0]
    full = mean_pairwise_cosine(grads)
    loo = torch.tensor([mean_pairwise_cosine(torch.cat([grads[:i], grads[i + 1:]])) for i in range(r)])
    se = math.sqrt((r - 1) / r * float(((loo - loo.mean()) ** 2).sum()))
    return full, 1.96 * se


def permuted_within_groups(values: torch.Tensor, group: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`values` [N] with each group's entries (`group` [N] long) permuted among themselves."""
    out = values.clone()
    for g in group.unique():
        idx = (group == g).nonzero().squeeze(1)
        out[idx] = values[idx[torch.randperm(idx.numel(), generator=generator)]]
    return out


def shuffled_within_prompts(batch, generator: torch.Generator):
    """The batch with each prompt's edge advantages permuted among that prompt's edges."""
    return dataclasses.replace(batch, advantage=permuted_within_groups(batch.advantage, batch.prompt[batch.edge_node],
                                                                       generator))


def measure(config_path: str, overrides: list[str], prompts: list[str], rollouts: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file = Path(tmp) / "prompts.txt"
        prompt_file.write_text("\n".join(prompts) + "\n")
        cfg = load_config(config_path, [
            f"train.prompts={prompt_file}", f"train.prompts_per_iteration={len(prompts)}", "train.prompt_balance=none",
            f"eval.prompts={prompt_file}", "log.trackers=[]", "train.progress=false", "log.tree_every=0",
            *overrides, "optim.kl_coef=0", "optim.minibatches=1", "optim.epochs=1", "optim.grad_clip=1e30",
            "optim.recompute_old_log_probs=true"])
        trainer = Trainer(cfg, Path(tmp) / "run")
        grads: list[torch.Tensor] = []
        trainer.optimizer.step = lambda *a, **k: grads.append(  # type: ignore[method-assign]
            torch.cat([p.grad.detach().flatten().clone() for p in trainer.params]))
        trainer.lr_schedule.step = lambda *a, **k: None  # type: ignore[method-assign]
        update = trainer._update
        control: list[torch.Tensor] = []
        shuffle_gen = torch.Generator().manual_seed(0)

        def both(batch, cond, streams):  # the real gradient, then the shuffled control's
            stats = update(batch, cond, streams)
            update(shuffled_within_prompts(batch, shuffle_gen), cond, streams)
            control.append(grads.pop())
            return stats

        trainer._update = both  # type: ignore[method-assign]
        rewards, leaves = [], 0.0
        for r in range(rollouts):
            record = trainer.step()
            rewards.append(record["train/reward_mean"])
            leaves = record["leaves"]
            print(f"  rollout {r + 1}/{rollouts}: reward {rewards[-1]:.3f}", file=sys.stderr, flush=True)
    signal, signal_ci = jackknife(torch.stack(grads))
    noise, noise_ci = jackknife(torch.stack(control))
    return {"cosine": signal, "cosine_ci95": signal_ci, "control_cosine": noise, "control_ci95": noise_ci,
            "leaves_per_rollout": leaves, "reward_mean": sum(rewards) / len(rewards)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("overrides", nargs="*", help="config overrides of the measured setting (key=value)")
    ap.add_argument("--config", default="configs/compose_policy_gradient.yaml")
    ap.add_argument("--prompts", default="", help="prompt file; default: 8 training prompts, two per template")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--rollouts", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="", help="also write the numbers here")
    args = ap.parse_args(argv)
    if args.rollouts < 3:
        ap.error("--rollouts must be >= 3 (the interval is a jackknife over rollouts)")
    torch.set_num_threads(args.threads)
    if args.prompts:
        prompts = load_prompts(args.prompts)
    else:
        pool = load_prompts("train")
        prompts = draw_prompts(pool, args.num_prompts, torch.Generator().manual_seed(0), prompt_groups(pool, "template"))
    result = measure(args.config, args.overrides, prompts, args.rollouts)
    result.update(overrides=args.overrides, rollouts=args.rollouts, prompts=prompts)
    print("| setting | leaves per rollout | reward | cosine (95% CI) | shuffled control |")
    print("|---|---|---|---|---|")
    print(f"| {' '.join(args.overrides) or '(config as is)'} | {result['leaves_per_rollout']:.0f} | "
          f"{result['reward_mean']:.3f} | {result['cosine']:.4f} +- {result['cosine_ci95']:.4f} | "
          f"{result['control_cosine']:.4f} +- {result['control_ci95']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
