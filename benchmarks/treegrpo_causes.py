"""Measure the causes a review gave for TreeGRPO's instability on the shapes world (issue 13).

    PYTHONPATH=src python benchmarks/treegrpo_causes.py [--metrics RUN/metrics.jsonl ...] [--prompts 16]

Prints, as markdown:
1. the log-prob gradient gain |c_v| / std per step of the default schedule and sampler;
2. from `treegrpo train` runs' metrics.jsonl: mean gradient norm (before clipping) per window start;
3. on real rollouts of the base model (window start s = 0..T-w-1, `--prompts` prompts): the mean
   within-prompt std of the leaf rewards (how near-deterministic late windows are) and the per-node
   rms of the advantage-weighted score ``|| sum_c A_c eps_c || / sqrt(D)`` (eps_c = (x'_c - mu) / std,
   the part of d log pi / d mu shared by all nodes of a step) with the paper's A_c = V(c) and with
   the parent baseline A_c = V(c) - V(u);
4. after one real update on the first of two minibatches, the share of the second minibatch's
   edges whose surrogate is clipped (zero gradient), split by the sign of the advantage.
Section 3 also gives the norm of the policy loss gradient (on-policy, no KL) of each window start's
batch under each `optim.step_weight` mode: what Adam sees from one iteration to the next.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import tempfile

import torch

from treegrpo.advantages import backup, normalize_by_group, parent_baseline
from treegrpo.config import load_config
from treegrpo.evaluation import decode_chunked, score_images
from treegrpo.loss import policy_loss, step_weights
from treegrpo.rollout import rollout, transition
from treegrpo.trainer import Trainer
from treegrpo.tree import TreeShape, trained_edges
from treegrpo.worlds.shapes import SHAPES_WORLD


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # rows appear as they are measured
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", nargs="*", default=[], help="metrics.jsonl files of treegrpo train runs")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--skip-clip", action="store_true", help="skip section 4")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    config = load_config(None, [*SHAPES_WORLD, f"train.prompts_per_iteration={args.prompts}", "log.trackers=[]", "eval.num_seeds=1"])
    trainer = Trainer(config, tempfile.mkdtemp())
    gains = trainer.method.step_gains(trainer.schedule)
    T, w, k = config.model.num_steps, config.method.window, config.method.k
    print("## 1. log-prob gradient gain |c_v| / std per step\n")
    print("| step | " + " | ".join(str(i) for i in range(T - 1)) + " |\n|---|" + "---|" * (T - 1))
    print("| gain | " + " | ".join(f"{float(g):.3f}" for g in gains[:T - 1]) + " |")
    print(f"\nstep {T - 2} / step 0: {float(gains[T - 2] / gains[0]):.1f}x\n")

    if args.metrics:
        print("## 2. gradient norm (before clipping) per window start\n")
        print("| window start | iterations | mean grad norm | max |\n|---|---|---|---|")
        by_start: dict[int, list[float]] = collections.defaultdict(list)
        for path in args.metrics:
            for line in open(path):
                r = json.loads(line)
                if "train/grad_norm" in r:
                    by_start[int(r["window_start"])].append(r["train/grad_norm"])
        for s in sorted(by_start):
            v = by_start[s]
            print(f"| {s} | {len(v)} | {sum(v) / len(v):.3f} | {max(v):.3f} |")
        print()

    modes = ("none", "level", "gain", "level_gain")
    print("## 3. per window start (base model): leaf spread, per-node score rms, loss gradient norm\n")
    print("| window start | within-prompt reward std | score rms A = V(c) | A = V(c) - V(u) | "
          + " | ".join(f"grad norm {m}" for m in modes) + " | grad norm gain, parent |")
    print("|---|---|---|---|" + "---|" * (len(modes) + 1))
    norms: dict[str, list[float]] = collections.defaultdict(list)
    prompts = trainer.train_prompts[: args.prompts]
    cond = trainer.policy.encode_prompts(prompts)
    reward = {n: trainer.rewards[n] for n in config.reward.weights}
    for start in range(T - w):
        shape = TreeShape.treegrpo(T, k, w, start)
        g = torch.Generator().manual_seed(args.seed * 100 + start)
        tree = rollout(trainer.policy, prompts, shape, sampler=trainer.method.sampler, generator=g, cond=cond)
        images = decode_chunked(trainer.policy, tree.leaves, 512)
        r = score_images(images, [prompts[int(i)] for i in tree.leaf_prompt], reward, 512)["shapes"]
        spread = torch.stack([r[tree.leaf_prompt == p].std(unbiased=False) for p in range(len(prompts))]).mean()
        leaf = normalize_by_group(r, tree.leaf_prompt)
        plain = backup(tree, leaf)
        centred = parent_baseline(tree, plain)
        rms = []
        for adv in (plain, centred):
            total, count = 0.0, 0
            for i in shape.trained_steps:
                x, kids = tree.latents[i], tree.latents[i + 1]
                step = torch.full((x.shape[0],), i, dtype=torch.long)
                with torch.no_grad():
                    out = trainer.policy.predict(x, trainer.schedule.times[step], cond, tree.prompt[i])
                mean, std = transition(trainer.schedule, trainer.method.sampler, x, out, step, stochastic=True)
                eps = (kids - mean.repeat_interleave(k, 0)) / std.repeat_interleave(k, 0)
                weighted = (adv[i + 1].view(-1, *[1] * (eps.ndim - 1)) * eps).view(x.shape[0], k, -1).sum(1)
                total += float((weighted.pow(2).sum(1) / weighted.shape[1]).sum())
                count += x.shape[0]
            rms.append(math.sqrt(total / count))
        row = []
        for mode, adv in [(m, plain) for m in modes] + [("gain, parent", centred)]:
            batch = trained_edges(tree, adv)
            table = step_weights(batch.step, mode.split(",")[0], gains, float(gains[0]))
            trainer.optimizer.zero_grad()
            lp, _ = trainer._edge_log_probs(batch, cond)
            policy_loss(lp, lp.detach(), batch.advantage, batch.edge_node, batch.num_nodes,
                        node_weight=table[batch.step]).loss.backward()
            norm = float(torch.nn.utils.clip_grad_norm_(trainer.params, float("inf")))
            norms[mode].append(norm)
            row.append(f"{norm:.4f}")
        trainer.optimizer.zero_grad()
        print(f"| {start} | {float(spread):.4f} | {rms[0]:.3f} | {rms[1]:.3f} | " + " | ".join(row) + " |")
    print("| max / min over starts | | | | " + " | ".join(f"{max(v) / min(v):.1f}x" for v in norms.values()) + " |")

    if args.skip_clip:
        return 0
    print("\n## 4. clipped edges of the second minibatch after one update on the first (clip 1e-4)\n")
    o = config.optim
    shape = TreeShape.treegrpo(T, k, w, 0)
    streams = [torch.Generator().manual_seed(args.seed * 1000 + p) for p in range(len(prompts))]
    tree = rollout(trainer.policy, prompts, shape, sampler=trainer.method.sampler, generator=streams, cond=cond)
    images = decode_chunked(trainer.policy, tree.leaves, 512)
    r = score_images(images, [prompts[int(i)] for i in tree.leaf_prompt], reward, 512)["shapes"]
    print("| advantages | A > 0 clipped | A < 0 clipped | ratio range |\n|---|---|---|---|")
    for name in ("none", "parent"):
        edges = backup(tree, normalize_by_group(r, tree.leaf_prompt))
        if name == "parent":
            edges = parent_baseline(tree, edges)
        batch = trained_edges(tree, edges)
        state = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        opt_state = trainer.optimizer.state_dict()
        mb = batch.minibatches_per_prompt(2, [torch.Generator().manual_seed(p) for p in range(len(prompts))])
        for part in mb:
            with torch.no_grad():
                part.old_log_prob = trainer._edge_log_probs(part, cond)[0]
        trainer.optimizer.zero_grad()
        lp, kl = trainer._edge_log_probs(mb[0], cond, with_reference=True)
        policy_loss(lp, mb[0].old_log_prob, mb[0].advantage, mb[0].edge_node, mb[0].num_nodes,
                    clip_range=o.clip_range, kl=kl, kl_coef=o.kl_coef).loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.params, o.grad_clip)
        trainer.optimizer.step()
        with torch.no_grad():
            ratio = torch.exp(trainer._edge_log_probs(mb[1], cond)[0] - mb[1].old_log_prob)
        a = mb[1].advantage
        pos = ((a > 0) & (ratio > 1 + o.clip_range)).sum() / (a > 0).sum().clamp(min=1)
        neg = ((a < 0) & (ratio < 1 - o.clip_range)).sum() / (a < 0).sum().clamp(min=1)
        print(f"| {name} | {float(pos):.2f} | {float(neg):.2f} | {float(ratio.min()):.5f}..{float(ratio.max()):.5f} |")
        with torch.no_grad():  # undo the update for the next variant
            for n, p in trainer.model.named_parameters():
                p.copy_(state[n])
        trainer.optimizer.load_state_dict(opt_state)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
