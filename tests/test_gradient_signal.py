"""benchmarks/gradient_signal.py: its cosine reads the signal share of synthetic gradients, and its
control keeps each prompt's advantages while breaking their tie to the edges."""

from collections import Counter

import torch

from treegrpo.tree import EdgeBatch

from benchmark_loader import load_benchmark

gradient_signal = load_benchmark("gradient_signal")


def synthetic(rollouts: int, signal: float, dim: int = 20_000, seed: int = 0) -> torch.Tensor:
    """Gradients = a shared direction of norm `signal` + independent unit-norm noise."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, generator=g)
    noise = torch.randn(rollouts, dim, generator=g)
    return signal * direction / direction.norm() + noise / noise.norm(dim=1, keepdim=True)


def test_cosine_estimates_the_signal_share():
    for signal in (0.0, 0.5, 1.0, 2.0):
        cos, half_width = gradient_signal.jackknife(synthetic(12, signal))
        share = signal**2 / (signal**2 + 1)  # |E g|^2 / E|g|^2
        assert abs(cos - share) < 0.03 + half_width, (signal, cos, share)
        assert half_width < 0.1


def test_control_permutes_advantages_within_each_prompt_only():
    nodes, edges = 6, 18
    batch = EdgeBatch(x=torch.zeros(nodes, 2), step=torch.zeros(nodes, dtype=torch.long),
                      prompt=torch.tensor([0, 0, 0, 1, 1, 1]), edge_node=torch.arange(nodes).repeat_interleave(3),
                      child=torch.zeros(edges, 2), old_log_prob=torch.zeros(edges), advantage=torch.arange(edges).float())
    out = gradient_signal.shuffled_within_prompts(batch, torch.Generator().manual_seed(0))
    assert not torch.equal(out.advantage, batch.advantage)
    edge_prompt = batch.prompt[batch.edge_node]
    for p in (0, 1):
        mask = edge_prompt == p
        assert Counter(out.advantage[mask].tolist()) == Counter(batch.advantage[mask].tolist())
    assert torch.equal(out.edge_node, batch.edge_node) and torch.equal(batch.advantage, torch.arange(edges).float())
