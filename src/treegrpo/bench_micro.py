"""Micro-benchmark: the batched tree sampler and training step against one model call per node.

The released TreeGRPO code grows a tree one node per model call in a Python loop (batch 1, CFG
inside the call) and trains with micro-batch 1. This engine grows every frontier node of every tree
of every prompt with one batched call per level (`treegrpo.rollout.rollout`, chunked by
`max_batch`) and trains with one forward per trained node, batched (`Trainer._update`). Measured
here, on the same `TreeShape.treegrpo(num_steps, k, w, start)` and the same root noise:

Sampler (`sampler_benchmark`), per prompt count, under `torch.no_grad()`:
  - batched: `rollout` (one call per level, chunks of `max_batch` rows);
  - per-node: `rollout_per_node`, the released code's way (one `predict` per node, batch 1);
  - ideal: per-sample cost of one guided forward at a full batch of `max_batch` rows (median of
    several repeats after a warm-up) times the number of model calls: what a perfectly batched
    sampler with zero overhead would cost;
  - ideal_best: the same with the cheapest per-sample cost over batch sizes 32, 64, ... max_batch
    (on a CPU, a full batch of 512 rows, 1024 with CFG, is not always the fastest per sample).
  `batched_model_s` is the time the batched rollout spent inside `predict`; the rest of
  `batched_s` is step math, noise and bookkeeping.
Training step (`train_step_benchmark`): forward + backward of the clipped surrogate over all trained
edges of one rolled-out forest (random advantages, rollout log-probs as old log-probs, no optimiser
step, gradients zeroed between variants):
  - batched: chunks of `max_batch` nodes, one forward per node gives all k edges' log-probs;
  - per-node: micro-batch 1 node (the released code), k edges per forward;
  - per-edge: micro-batch 1 edge, one forward per edge.
  All three sum to the same gradient (`grad_rel_diff_*` checks it).

Variants run interleaved within each repeat (order rotated) so machine noise hits them alike; each
time is the median over `repeats`. Timings are only meaningful as ratios within one run.

Allocator caveat (Linux/glibc, CPU): the activations of a guided forward on a few hundred rows are
large enough that glibc serves them with fresh `mmap`s and returns them on free, so every call pays
page faults. That makes large batches cost up to ~1.5x more per sample than the compute alone, and
unevenly (it depends on the heap's history), so `ideal_s` at 512 rows can come out *above* the
batched rollout. `MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=40000000000` in the
environment removes the effect for every variant (the per-sample cost is then flat from ~200 to 512
rows); `forward_curve` shows the per-sample cost per batch size either way.

Run: `.venv/bin/python -m treegrpo.bench_micro --out runs/bench_micro` (shapes model, prompt counts
1 4 8 16, k = w = 3, T = 10, window start 0, max_batch 512, 3 repeats); writes `micro.json` and
`micro.md` in the output folder and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
from tqdm.auto import tqdm

from treegrpo.loss import clipped_surrogate, per_node_mean
from treegrpo.policies.base import Policy, Schedule
from treegrpo.rollout import SamplerConfig, rollout, transition
from treegrpo.steps import gaussian_log_prob
from treegrpo.tree import EdgeBatch, TreeShape, trained_edges


# ----------------------------------------------------------------------------- the released way
class PerNodeRollout(NamedTuple):
    """leaves: [L, *latent_shape] in the batched rollout's order; num_model_calls: predict calls (batch 1)."""

    leaves: torch.Tensor
    num_model_calls: int


@torch.no_grad()
def rollout_per_node(policy: Policy, prompts: list[str], shape: TreeShape, *, num_steps: int | None = None,
                     sampler: SamplerConfig = SamplerConfig(), generator: torch.Generator | None = None,
                     cond: Any = None, root_latents: torch.Tensor | None = None) -> PerNodeRollout:
    """Grow the same forest as `rollout`, the released code's way: a Python loop over prompts, trees
    and frontier nodes, one `policy.predict` call (batch 1, CFG inside) per node; at a branching SDE
    step k children are drawn around that node's one mean, each with its log-prob.

    Leaves come out prompt-major, tree by tree, children of a parent contiguous: the batched
    rollout's order. root_latents: optional [P * R, *latent_shape] initial noise.
    """
    num_steps = num_steps or shape.num_steps
    if shape.num_steps != num_steps:
        raise ValueError(f"tree shape has {shape.num_steps} steps but the rollout asks for {num_steps}")
    schedule = policy.schedule(num_steps)
    cond = policy.encode_prompts(prompts) if cond is None else cond
    roots = shape.roots_per_prompt
    device = torch.device(getattr(policy, "device", "cpu"))
    if root_latents is None:
        root_latents = torch.randn((len(prompts) * roots, *policy.latent_shape), generator=generator)
    times = schedule.times.to(device)
    leaves: list[torch.Tensor] = []
    log_probs: list[torch.Tensor] = []  # kept, as the released code keeps them for training
    calls = 0
    for p in range(len(prompts)):
        prompt_index = torch.tensor([p], device=device)
        for r in range(roots):
            row = p * roots + r
            frontier = [root_latents[row:row + 1].float().to(device)]
            for i in range(num_steps):
                step = torch.tensor([i], device=device)
                children: list[torch.Tensor] = []
                for x in frontier:
                    out = policy.predict(x, times[step], cond, prompt_index).float()
                    calls += 1
                    mean, std = transition(schedule, sampler, x, out, step, shape.stochastic[i])
                    if std is None:
                        children.append(mean)
                        continue
                    for _ in range(shape.branching[i]):
                        child = mean + std * torch.randn(mean.shape, generator=generator).to(device)
                        log_probs.append(gaussian_log_prob(child, mean, std))
                        children.append(child)
                frontier = children
            leaves.extend(frontier)
    return PerNodeRollout(torch.cat(leaves), calls)


# ----------------------------------------------------------------------------- timing helpers
def _bench_prompts(count: int, prompts: Sequence[str] | None = None) -> list[str]:
    """`count` prompts, cycling through `prompts` (default: the shapes world's 54)."""
    if prompts is None:
        from treegrpo.worlds.shapes import all_prompts

        prompts = [p.text for p in all_prompts()]
    return [prompts[i % len(prompts)] for i in range(count)]


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _device(policy: Policy) -> torch.device:
    return torch.device(getattr(policy, "device", "cpu"))


@torch.no_grad()
def forward_seconds(policy: Policy, batch: int, *, num_steps: int = 10, repeats: int = 5,
                    cond: Any = None, num_prompts: int = 8) -> float:
    """Median seconds of one guided `predict` call on `batch` rows (after one warm-up call); the rows
    cycle through `num_prompts` prompts (those `cond` encodes, or the first shapes prompts)."""
    g = torch.Generator().manual_seed(0)
    schedule = policy.schedule(num_steps)
    cond = policy.encode_prompts(_bench_prompts(num_prompts)) if cond is None else cond
    device = _device(policy)
    x = torch.randn((batch, *policy.latent_shape), generator=g).to(device)
    times = schedule.times.to(device)[torch.full((batch,), num_steps // 2, dtype=torch.long, device=device)]
    prompt_index = (torch.arange(batch) % num_prompts).to(device)
    policy.predict(x, times, cond, prompt_index)  # warm-up
    return _median_time(lambda: policy.predict(x, times, cond, prompt_index), repeats)


def ideal_seconds(policy: Policy, total_calls: int, max_batch: int, *, num_steps: int = 10,
                  repeats: int = 5, cond: Any = None, num_prompts: int = 8,
                  batch_sizes: Sequence[int] | None = None) -> float:
    """Lower bound for `total_calls` model evaluations: the per-sample cost of one guided forward at
    a full batch of `max_batch` rows (CFG included, median of `repeats` after a warm-up) times
    `total_calls`. cond: optional encoding of `num_prompts` prompts the rows cycle through.
    batch_sizes: if given, take the cheapest per-sample cost over these batch sizes instead."""
    sizes = [max_batch] if batch_sizes is None else list(batch_sizes)
    per_sample = min(forward_seconds(policy, b, num_steps=num_steps, repeats=repeats, cond=cond,
                                     num_prompts=num_prompts) / b for b in sizes)
    return per_sample * total_calls


def scan_batch_sizes(max_batch: int, smallest: int = 32) -> list[int]:
    """Powers of two from `smallest` below `max_batch`, then `max_batch`."""
    sizes, b = [], smallest
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


def forward_curve(policy: Policy, batches: Sequence[int] = (1, 8, 32, 128, 512), *, num_steps: int = 10,
                  repeats: int = 5) -> list[dict[str, Any]]:
    """Cost of one guided `predict` per batch size: rows of batch, seconds, ms_per_sample. Says how
    much a bigger batch buys (on a small CPU model throughput saturates early)."""
    rows = []
    for batch in batches:
        seconds = forward_seconds(policy, batch, num_steps=num_steps, repeats=repeats)
        rows.append({"batch": batch, "seconds": seconds, "ms_per_sample": 1000 * seconds / batch})
    return rows


class _TimedPolicy:
    """Delegates to a policy and accumulates the wall time spent inside `predict`."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self.predict_seconds = 0.0
        self.predict_invocations = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)

    def predict(self, x: torch.Tensor, times: torch.Tensor, cond: Any, prompt_index: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self._policy.predict(x, times, cond, prompt_index)
        self.predict_seconds += time.perf_counter() - t0
        self.predict_invocations += 1
        return out


# ----------------------------------------------------------------------------- sampler benchmark
def sampler_benchmark(policy: Policy, prompt_counts: Sequence[int] = (1, 4, 8, 16), k: int = 3, w: int = 3,
                      num_steps: int = 10, start: int = 0, max_batch: int = 512, repeats: int = 3, *,
                      sampler: SamplerConfig = SamplerConfig(), prompts: Sequence[str] | None = None,
                      seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """Time the batched rollout, the per-node rollout and the ideal for each prompt count.

    Each row: prompts, k, w, num_steps, start, max_batch, leaves, calls (model evaluations without
    CFG, the same for both samplers), batched_forwards / per_node_forwards (predict invocations),
    batched_s, batched_model_s (inside predict), per_node_s, ideal_s, ideal_best_s (medians over
    repeats), speedup (per_node_s / batched_s), batched_over_ideal (batched_s / ideal_s) and
    batched_over_best (batched_s / ideal_best_s).
    """
    shape = TreeShape.treegrpo(num_steps, k, w, start)
    rows = []
    bar = tqdm(total=len(prompt_counts) * repeats, desc="sampler", disable=not progress)
    for count in prompt_counts:
        names = _bench_prompts(count, prompts)
        timed = _TimedPolicy(policy)
        cond = policy.encode_prompts(names)
        root_latents = torch.randn((count * shape.roots_per_prompt, *policy.latent_shape),
                                   generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():  # warm-up: allocator, lazy init
            rollout(policy, names[:1], shape, sampler=sampler, generator=torch.Generator().manual_seed(seed),
                    max_batch=max_batch, cond=cond, root_latents=root_latents[:shape.roots_per_prompt])
        results: dict[str, list[float]] = {"batched": [], "batched_model": [], "per_node": [], "ideal": [],
                                           "ideal_best": []}
        calls: dict[str, int] = {}
        forwards: dict[str, int] = {}
        leaves = 0

        def run_batched() -> None:
            nonlocal leaves
            timed.predict_seconds, timed.predict_invocations = 0.0, 0
            g = torch.Generator().manual_seed(seed + 1)
            t0 = time.perf_counter()
            with torch.no_grad():
                tree = rollout(timed, names, shape, sampler=sampler, generator=g, max_batch=max_batch,  # type: ignore[arg-type]
                               cond=cond, root_latents=root_latents)
            results["batched"].append(time.perf_counter() - t0)
            results["batched_model"].append(timed.predict_seconds)
            calls["batched"], forwards["batched"] = tree.num_model_calls, timed.predict_invocations
            leaves = int(tree.leaves.shape[0])

        def run_per_node() -> None:
            g = torch.Generator().manual_seed(seed + 1)
            t0 = time.perf_counter()
            out = rollout_per_node(policy, names, shape, sampler=sampler, generator=g, cond=cond,
                                   root_latents=root_latents)
            results["per_node"].append(time.perf_counter() - t0)
            calls["per_node"] = forwards["per_node"] = out.num_model_calls

        def run_ideal() -> None:
            total = shape.num_model_calls * count
            results["ideal"].append(ideal_seconds(policy, total, max_batch, num_steps=num_steps, cond=cond,
                                                  num_prompts=count))
            results["ideal_best"].append(ideal_seconds(policy, total, max_batch, num_steps=num_steps, cond=cond,
                                                       num_prompts=count, repeats=3,
                                                       batch_sizes=scan_batch_sizes(max_batch)))

        variants = [run_batched, run_per_node, run_ideal]
        for r in range(repeats):
            for fn in variants[r % 3:] + variants[:r % 3]:  # rotate the order: noise hits all alike
                fn()
            bar.update(1)
        if calls["batched"] != calls["per_node"]:
            raise RuntimeError(f"call counts differ: batched {calls['batched']}, per-node {calls['per_node']}")
        med = {name: statistics.median(v) for name, v in results.items()}
        rows.append({
            "prompts": count, "k": k, "w": w, "num_steps": num_steps, "start": start, "max_batch": max_batch,
            "leaves": leaves, "calls": calls["batched"],
            "batched_forwards": forwards["batched"], "per_node_forwards": forwards["per_node"],
            "batched_s": med["batched"], "batched_model_s": med["batched_model"], "per_node_s": med["per_node"],
            "ideal_s": med["ideal"], "speedup": med["per_node"] / med["batched"],
            "ideal_best_s": med["ideal_best"], "batched_over_ideal": med["batched"] / med["ideal"],
            "batched_over_best": med["batched"] / med["ideal_best"],
        })
    bar.close()
    return rows


# ----------------------------------------------------------------------------- training-step benchmark
def _forest_edges(policy: Policy, names: list[str], shape: TreeShape, sampler: SamplerConfig, cond: Any,
                  max_batch: int, seed: int) -> EdgeBatch:
    """Roll out one forest and gather its trained edges with random advantages."""
    g = torch.Generator().manual_seed(seed)
    tree = rollout(policy, names, shape, sampler=sampler, generator=g, max_batch=max_batch, cond=cond)
    advantages: list[torch.Tensor | None] = [None]
    for i in range(shape.num_steps):
        n = tree.prompt[i + 1].shape[0]
        advantages.append(torch.randn(n, generator=g) if shape.trained[i] else None)
    return trained_edges(tree, advantages)


def _surrogate(policy: Policy, schedule: Schedule, sampler: SamplerConfig, batch: EdgeBatch, cond: Any,
               total_nodes: int) -> torch.Tensor:
    """The trainer's loss on `batch` (one forward per node, k edges each), weighted by its share of
    `total_nodes` so that chunks sum to the full-batch loss."""
    times = schedule.times.to(batch.x.device)[batch.step]
    out = policy.predict(batch.x, times, cond, batch.prompt)
    mean, std = transition(schedule, sampler, batch.x, out, batch.step, stochastic=True)
    assert std is not None
    log_prob = gaussian_log_prob(batch.child, mean[batch.edge_node], std[batch.edge_node])
    edge_loss, _ = clipped_surrogate(log_prob, batch.old_log_prob, batch.advantage)
    return per_node_mean(edge_loss, batch.edge_node, batch.num_nodes) * (batch.num_nodes / total_nodes)


def _split_edges(batch: EdgeBatch) -> list[EdgeBatch]:
    """One EdgeBatch per edge: its node (batch 1) with only that edge."""
    zero = torch.zeros(1, dtype=torch.long)
    out = []
    for e in range(batch.num_edges):
        n = int(batch.edge_node[e])
        out.append(EdgeBatch(batch.x[n:n + 1], batch.step[n:n + 1], batch.prompt[n:n + 1], zero,
                             batch.child[e:e + 1], batch.old_log_prob[e:e + 1], batch.advantage[e:e + 1]))
    return out


def _grads(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def train_step_benchmark(policy: Policy, prompt_counts: Sequence[int] = (1, 4, 8, 16), k: int = 3, w: int = 3,
                         num_steps: int = 10, start: int = 0, max_batch: int = 512, repeats: int = 3, *,
                         sampler: SamplerConfig = SamplerConfig(), prompts: Sequence[str] | None = None,
                         per_edge: bool = True, seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """Time forward + backward over all trained edges of one forest per prompt count.

    Each row: prompts, nodes, edges, forwards per variant, batched_s, per_node_s, per_edge_s (medians
    over repeats; per_edge_s absent when `per_edge` is False), speedup_per_node / speedup_per_edge
    (their time over batched) and grad_rel_diff_per_node / _per_edge (max |g - g_batched| / max
    |g_batched|: the variants compute the same gradient).
    """
    shape = TreeShape.treegrpo(num_steps, k, w, start)
    schedule = policy.schedule(num_steps)
    params = [p for p in policy.trainable_parameters() if p.requires_grad]
    rows = []
    bar = tqdm(total=len(prompt_counts) * repeats, desc="train step", disable=not progress)
    for count in prompt_counts:
        names = _bench_prompts(count, prompts)
        cond = policy.encode_prompts(names)
        batch = _forest_edges(policy, names, shape, sampler, cond, max_batch, seed)
        total = batch.num_nodes
        layouts = {
            "batched": [batch.select_nodes(torch.arange(s, min(s + max_batch, total)))
                        for s in range(0, total, max_batch)],
            "per_node": [batch.select_nodes(torch.tensor([n])) for n in range(total)],
        }
        if per_edge:
            layouts["per_edge"] = _split_edges(batch)
        # Warm-up (autograd graph caches, allocator) on a one-node batch.
        _surrogate(policy, schedule, sampler, layouts["per_node"][0], cond, total).backward()
        for p in params:
            p.grad = None
        results: dict[str, list[float]] = {name: [] for name in layouts}
        grads: dict[str, torch.Tensor] = {}

        def run(name: str) -> None:
            for p in params:
                p.grad = None
            t0 = time.perf_counter()
            for part in layouts[name]:
                _surrogate(policy, schedule, sampler, part, cond, total).backward()
            results[name].append(time.perf_counter() - t0)
            if name not in grads:
                grads[name] = _grads(params).clone()

        names_order = list(layouts)
        for r in range(repeats):
            shift = r % len(names_order)
            for name in names_order[shift:] + names_order[:shift]:
                run(name)
            bar.update(1)
        for p in params:
            p.grad = None
        med = {name: statistics.median(v) for name, v in results.items()}
        scale = float(grads["batched"].abs().max()) or 1.0
        row: dict[str, Any] = {
            "prompts": count, "k": k, "w": w, "num_steps": num_steps, "start": start, "max_batch": max_batch,
            "nodes": total, "edges": batch.num_edges,
            "batched_forwards": len(layouts["batched"]), "per_node_forwards": total,
            "batched_s": med["batched"], "per_node_s": med["per_node"],
            "speedup_per_node": med["per_node"] / med["batched"],
            "grad_rel_diff_per_node": float((grads["per_node"] - grads["batched"]).abs().max()) / scale,
        }
        if per_edge:
            row.update({"per_edge_forwards": batch.num_edges, "per_edge_s": med["per_edge"],
                        "speedup_per_edge": med["per_edge"] / med["batched"],
                        "grad_rel_diff_per_edge": float((grads["per_edge"] - grads["batched"]).abs().max()) / scale})
        rows.append(row)
    bar.close()
    return rows


# ----------------------------------------------------------------------------- reporting
def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
        return f"{value:.2e}"
    return str(value)


def format_markdown(rows: list[dict[str, Any]], title: str | None = None) -> str:
    """One markdown table of `rows` (columns: the keys of the first row, in order), with an optional
    `### title` line above it."""
    if not rows:
        return (f"### {title}\n\n" if title else "") + "(no rows)\n"
    columns = list(rows[0])
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    lines.extend("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows)
    return "\n".join(lines) + "\n"


def report_markdown(sampler_rows: list[dict[str, Any]], train_rows: list[dict[str, Any]], command: str,
                    curve_rows: list[dict[str, Any]] | None = None) -> str:
    """The tables, with the command that produced them."""
    keep_s = ["prompts", "leaves", "calls", "batched_forwards", "per_node_forwards", "batched_s", "batched_model_s",
              "per_node_s", "ideal_s", "ideal_best_s", "speedup", "batched_over_ideal", "batched_over_best"]
    keep_t = ["prompts", "nodes", "edges", "batched_forwards", "per_node_forwards", "per_edge_forwards", "batched_s",
              "per_node_s", "per_edge_s", "speedup_per_node", "speedup_per_edge", "grad_rel_diff_per_node"]
    first = (sampler_rows or train_rows or [{}])[0]
    head = (f"Command: `{command}`\n\nTreeShape.treegrpo(T={first.get('num_steps')}, k={first.get('k')}, "
            f"w={first.get('w')}, start={first.get('start')}), max_batch {first.get('max_batch')}, "
            f"torch threads {torch.get_num_threads()}; times are medians (seconds) over repeats, "
            "variants interleaved.\n")
    return "\n".join([
        head,
        format_markdown([{c: r[c] for c in keep_s if c in r} for r in sampler_rows], "Sampler (no grad)"),
        format_markdown([{c: r[c] for c in keep_t if c in r} for r in train_rows],
                        "Training step (forward + backward over all trained edges)"),
    ] + ([format_markdown(curve_rows, "One guided forward (CFG included) per batch size")] if curve_rows else []))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line: run both benchmarks on the shipped shapes model, print and write the tables."""
    parser = argparse.ArgumentParser(prog="python -m treegrpo.bench_micro", description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 4, 8, 16], help="prompt counts")
    parser.add_argument("--k", type=int, default=3, help="children per node inside the window")
    parser.add_argument("--w", type=int, default=3, help="window width")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps T")
    parser.add_argument("--start", type=int, default=0, help="window start")
    parser.add_argument("--max-batch", type=int, default=512, help="rows per batched model call")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per variant (median)")
    parser.add_argument("--no-per-edge", action="store_true", help="skip the per-edge training variant")
    parser.add_argument("--skip-train", action="store_true", help="only the sampler benchmark")
    parser.add_argument("--skip-curve", action="store_true", help="skip the forward-cost-per-batch-size table")
    parser.add_argument("--out", type=Path, default=None, help="folder for micro.json and micro.md")
    args = parser.parse_args(argv)
    if any(p < 1 for p in args.prompts) or args.repeats < 1 or args.max_batch < 1:
        parser.error("--prompts, --repeats and --max-batch must be >= 1")
    TreeShape.treegrpo(args.steps, args.k, args.w, args.start)  # validate the shape before any work

    from treegrpo.policies import load_policy

    policy = load_policy("shapes")
    common = dict(prompt_counts=args.prompts, k=args.k, w=args.w, num_steps=args.steps, start=args.start,
                  max_batch=args.max_batch, repeats=args.repeats)
    sampler_rows = sampler_benchmark(policy, **common)  # type: ignore[arg-type]
    train_rows = [] if args.skip_train else train_step_benchmark(policy, per_edge=not args.no_per_edge, **common)  # type: ignore[arg-type]
    curve_rows = [] if args.skip_curve else forward_curve(
        policy, sorted({1, 8, *scan_batch_sizes(args.max_batch)}), num_steps=args.steps)
    command = "python -m treegrpo.bench_micro " + " ".join(argv if argv is not None else sys.argv[1:])
    markdown = report_markdown(sampler_rows, train_rows, command.strip(), curve_rows)
    print(markdown)
    result = {"config": vars(args) | {"out": str(args.out) if args.out else None},
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
              "sampler": sampler_rows, "train": train_rows, "forward_curve": curve_rows}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "micro.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "micro.md").write_text(markdown)
    return result


if __name__ == "__main__":
    main()
