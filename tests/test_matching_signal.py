"""benchmarks/matching_signal.py: the advantage-weighted flow-matching loss moves the model toward
its prompt's better leaves, and shared (t, eps) draws cancel the noise term exactly."""

import torch

from benchmark_loader import load_benchmark

matching_signal = load_benchmark("matching_signal")


class LinearVelocity(torch.nn.Module):
    """v = W x + b, flattened: a model whose gradient is easy to read."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)

    def predict(self, x, t, cond, prompt_index):
        return self.lin(x.flatten(1)).view_as(x)


def experiment(shared_noise: bool, dim: int = 6) -> "matching_signal.MatchingExperiment":
    exp = object.__new__(matching_signal.MatchingExperiment)  # the loss only: no trainer, no pipeline
    torch.manual_seed(0)
    exp.policy = LinearVelocity(dim)
    exp.sigmas = torch.linspace(1, 0, 11)
    exp.times = 1000 * exp.sigmas[:-1]  # SD3's time input for each step
    exp.conditional = False
    exp.beta, exp.t_samples, exp.shared_noise = 1.0, 3, shared_noise
    exp.generator = torch.Generator().manual_seed(1)
    return exp


def grad(exp, x0, prompt, adv) -> torch.Tensor:
    exp.policy.zero_grad()
    exp.backward(x0, prompt, None, adv)
    return torch.cat([p.grad.flatten() for p in exp.policy.parameters()])


def test_shared_noise_cancels_identical_leaves():
    # Every leaf of a prompt is the same image: advantages (centred per prompt) carry no information,
    # and with one (t, eps) per prompt the gradient is exactly zero; with a draw per leaf it is noise.
    x0 = torch.randn(2, 6).repeat_interleave(4, dim=0)
    prompt = torch.arange(2).repeat_interleave(4)
    adv = torch.tensor([1.5, -0.5, 0.3, -1.3, 0.2, 2.0, -1.0, -1.2])
    assert grad(experiment(shared_noise=True), x0, prompt, adv).abs().max() < 1e-6
    assert grad(experiment(shared_noise=False), x0, prompt, adv).abs().max() > 1e-3


def test_a_step_moves_the_clean_estimate_toward_the_better_leaf():
    exp = experiment(shared_noise=True)
    good, bad = torch.ones(1, 6), -torch.ones(1, 6)
    x0, prompt, adv = torch.cat([good, bad]), torch.zeros(2, dtype=torch.long), torch.tensor([1.0, -1.0])
    t = torch.full((64,), 0.5)
    xt = 0.5 * torch.randn(64, 6, generator=torch.Generator().manual_seed(2))  # states between the two leaves
    before = (xt - t[:, None] * exp.policy.predict(xt, t, None, None)).mean(0)  # x0-hat = x - t v
    optimizer = torch.optim.SGD(exp.policy.parameters(), lr=0.05)
    for _ in range(20):
        optimizer.zero_grad()
        exp.backward(x0, prompt, None, adv)
        optimizer.step()
    after = (xt - t[:, None] * exp.policy.predict(xt, t, None, None)).mean(0)
    assert float(((after - before) * (good - bad)).sum()) > 0.5
