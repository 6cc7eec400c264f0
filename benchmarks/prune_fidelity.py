"""How much of a full tree's credit assignment survives value-guided pruning (docs/benchmarks.md,
"Pruned and adaptive trees"), measured without training: one batched rollout of full TreeGRPO trees
per window start on the base shapes model, the probe's scores at the prune level recorded, then
every pruning rule replayed on the same trees (ODE tails are deterministic, so a pruned tree's
leaves are the full tree's leaves of its kept nodes).

Per window start and rule it prints the correlation, over all trained edges, of the pruned tree's
edge advantages with the full tree's (1 = the same training signal), for the first window level
(the decisions shared by most leaves) and for all window levels, the probe-leaf correlation, and
the rollout calls per tree. Rules: max-spread subset (`treegrpo.pruning`) with drop / probe backup,
and a random subset of the same size (drop) as the control.

Usage: python benchmarks/prune_fidelity.py [--starts 0 1 2 3] [--keep 0.3 0.5] [--trees 2] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch

from treegrpo.advantages import tree_advantages
from treegrpo.config import load_config
from treegrpo.evaluation import decode_chunked, score_images
from treegrpo.policies import build_policy
from treegrpo.prompts import load_prompts
from treegrpo.pruning import max_spread_subset, probe_correlation
from treegrpo.rewards import build_rewards
from treegrpo.rollout import rollout
from treegrpo.tree import Tree, TreeShape
from treegrpo.worlds.shapes import SHAPES_WORLD


def pruned_copy(full: Tree, kept: torch.Tensor) -> Tree:
    """The tree a pruned rollout with this `kept` mask would have grown (same draws)."""
    level = full.shape.prune_level
    assert level is not None
    tree = Tree(full.shape, full.num_prompts, full.latents[:level + 1], full.parent[:level + 1],
                full.prompt[:level + 1], full.root[:level + 1], full.log_prob[:level + 1])
    tree.prune(kept)
    for lvl in range(level + 1, full.num_steps + 1):
        lat = full.latents[lvl]
        tree.add_level(lat[kept] if lat is not None else torch.zeros(int(kept.sum()), 1), None)
    return tree


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum()).clamp(min=1e-300))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--keep", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--trees", type=int, default=1, help="trees per prompt")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    config = load_config(None, SHAPES_WORLD)
    policy = build_policy(config.model)
    reward = build_rewards(["shapes"], {})["shapes"]
    prompts = load_prompts("all")
    cond = policy.encode_prompts(prompts)
    print("| window start | keep | rule | rollout calls / tree | adv. corr, first window level | adv. corr, all window levels | probe-leaf corr |")
    print("|---|---|---|---|---|---|---|")
    for start in args.starts:
        shape = TreeShape.treegrpo(10, 3, 3, start, args.trees)
        seen: dict[str, torch.Tensor] = {}

        def probe(x0: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
            images = decode_chunked(policy, x0, 512)
            seen["probe"] = score_images(images, [prompts[int(i)] for i in prompt_index], {"shapes": reward}, 512)["shapes"]
            return torch.ones(x0.shape[0], dtype=torch.bool)  # keep all: the full tree, probes recorded

        full = rollout(policy, prompts, shape, generator=torch.Generator().manual_seed(args.seed + start), cond=cond,
                       probe=probe, keep_all_latents=True, max_batch=512)
        leaves = score_images(decode_chunked(policy, full.leaves, 512), [prompts[int(i)] for i in full.leaf_prompt],
                              {"shapes": reward}, 512)["shapes"]
        gold = tree_advantages(full, {"shapes": leaves})
        level = shape.prune_level
        group = full.prompt[level]
        trees = full.prompt[0].shape[0]
        window = list(range(start + 1, start + 4))
        pc, _ = probe_correlation(seen["probe"], leaves, group)
        print(f"| {start} | 1.0 | full tree | {shape.num_model_calls} | 1 | 1 | {pc:.2f} |")
        for keep in args.keep:
            smart = max_spread_subset(seen["probe"], group, keep)
            g = torch.Generator().manual_seed(args.seed)
            rand = torch.zeros_like(smart)
            for p in range(len(prompts)):  # the same number per prompt, drawn at random
                rows = torch.nonzero(group == p).squeeze(1)
                rand[rows[torch.randperm(rows.shape[0], generator=g)[:int(smart[rows].sum())]]] = True
            calls = (full.num_model_calls - int((~smart).sum()) * shape.tail_calls()) / trees
            for name, kept, probe_rewards in [("max-spread, drop", smart, None),
                                              ("max-spread, probe", smart, {"shapes": seen["probe"]}),
                                              ("random, drop", rand, None)]:
                tree = pruned_copy(full, kept)
                adv = tree_advantages(tree, {"shapes": leaves[kept]}, probe_rewards=probe_rewards)
                first = corr(adv[window[0]], gold[window[0]])
                every = corr(torch.cat([adv[i] for i in window]), torch.cat([gold[i] for i in window]))
                print(f"| {start} | {keep} | {name} | {calls:.0f} | {first:.3f} | {every:.3f} | |")


if __name__ == "__main__":
    main()
