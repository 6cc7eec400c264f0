import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from treegrpo.steps import ddim_step, euler_step, gaussian_log_prob, sde_mean_std, sde_step


def _xv(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 5, 5, generator=g), torch.randn(b, 3, 5, 5, generator=g)


@pytest.mark.parametrize("kind", ["flow_grpo", "cps"])
def test_noise_level_zero_is_the_euler_step(kind):
    x, v = _xv()
    sigma, sigma_next = torch.tensor([0.9, 0.7, 0.5, 0.2]), torch.tensor([0.8, 0.5, 0.3, 0.0])
    out = sde_step(x, v, sigma, sigma_next, kind=kind, noise_level=0.0, noise=torch.randn_like(x))
    expected = euler_step(x, v, sigma, sigma_next)
    torch.testing.assert_close(out.mean, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.sample, expected, rtol=1e-6, atol=1e-6)


def test_dance_equals_flow_grpo_with_the_same_constant_coefficient():
    x, v = _xv()
    sigma, sigma_next = 0.6, 0.45
    noise_level = 0.7
    s_flow = noise_level * math.sqrt(sigma / (1 - sigma))  # flow_grpo's coefficient at this sigma
    flow = sde_step(x, v, sigma, sigma_next, kind="flow_grpo", noise_level=noise_level, noise=torch.zeros_like(x))
    dance = sde_step(x, v, sigma, sigma_next, kind="dance", noise_level=s_flow, noise=torch.zeros_like(x))
    torch.testing.assert_close(dance.mean, flow.mean)
    torch.testing.assert_close(dance.std, flow.std)


# The reference table of SPEC.md section 2 (SD3.5 scheduler, shift 3, T = 10, a = 0.7).
REF_SIGMA = [1.00000, 0.96013, 0.91335, 0.85769, 0.79037, 0.70728, 0.60215, 0.46488, 0.27805, 0.00893]
REF_S = [3.50567, 3.43507, 2.27263, 1.71850, 1.35920, 1.08809, 0.86117, 0.65244, 0.43441, 0.06644]
REF_STD = [0.70000, 0.74296, 0.53615, 0.44590, 0.39179, 0.35280, 0.31907, 0.28201, 0.22536, 0.00628]


def test_spec_reference_table_from_diffusers_scheduler():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas.float()
    assert sigmas.shape[0] == 11 and float(sigmas[-1]) == 0.0
    torch.testing.assert_close(sigmas[:10], torch.tensor(REF_SIGMA), atol=1e-5, rtol=0)
    x = torch.zeros(10, 1, 2, 2)
    _, std = sde_mean_std(x, x, sigmas[:10], sigmas[1:], kind="flow_grpo", noise_level=0.7, sigma_max=sigmas[1])
    torch.testing.assert_close(std.flatten(), torch.tensor(REF_STD), atol=2e-5, rtol=0)
    s = std.flatten() / torch.sqrt(sigmas[:10] - sigmas[1:])
    torch.testing.assert_close(s, torch.tensor(REF_S), atol=2e-4, rtol=0)


def test_flow_grpo_at_sigma_one_requires_sigma_max():
    x, v = _xv()
    with pytest.raises(ValueError, match="sigma_max"):
        sde_step(x, v, 1.0, 0.9, kind="flow_grpo")
    out = sde_step(x, v, 1.0, 0.9, kind="flow_grpo", sigma_max=0.9)
    assert torch.isfinite(out.sample).all() and torch.isfinite(out.log_prob).all()


@pytest.mark.parametrize("kind", ["flow_grpo", "dance", "cps"])
def test_on_policy_log_prob_matches_its_expectation(kind):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 64, 64, generator=g)
    v = torch.randn(2, 4, 64, 64, generator=g)
    out = sde_step(x, v, 0.7, 0.6, kind=kind, noise_level=0.5, sigma_max=0.9, generator=g)
    std = out.std.flatten()
    expected = -0.5 - torch.log(std) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(out.log_prob, expected, atol=5e-3, rtol=0)


def test_recomputed_log_prob_of_a_stored_sample_gives_ratio_one():
    x, v = _xv()
    first = sde_step(x, v, 0.8, 0.7, generator=torch.Generator().manual_seed(3))
    again = sde_step(x.clone(), v.clone(), 0.8, 0.7, sample=first.sample)
    assert torch.equal(torch.exp(again.log_prob - first.log_prob), torch.ones(4))


def test_per_sample_sigmas_equal_separate_calls():
    x, v = _xv()
    sig, nxt = torch.tensor([0.9, 0.6, 0.4, 0.2]), torch.tensor([0.8, 0.5, 0.3, 0.1])
    noise = torch.randn_like(x)
    mixed = sde_step(x, v, sig, nxt, noise=noise)
    for b in range(4):
        one = sde_step(x[b:b + 1], v[b:b + 1], float(sig[b]), float(nxt[b]), noise=noise[b:b + 1])
        torch.testing.assert_close(mixed.sample[b:b + 1], one.sample)
        torch.testing.assert_close(mixed.log_prob[b:b + 1], one.log_prob)


def test_log_prob_gradient_flows_only_through_the_mean():
    x, v = _xv()
    v = v.requires_grad_()
    out = sde_step(x, v, 0.5, 0.4)
    sample = out.sample.clone().requires_grad_()
    lp = sde_step(x, v, 0.5, 0.4, sample=sample).log_prob.sum()
    lp.backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert sample.grad is None  # the stored child is a constant
    assert not out.sample.requires_grad


def test_gaussian_log_prob_is_the_mean_of_the_elementwise_density():
    sample, mean = torch.randn(3, 7), torch.randn(3, 7)
    std = torch.full((3, 1), 0.3)
    dist = torch.distributions.Normal(mean, std.expand(3, 7))
    torch.testing.assert_close(gaussian_log_prob(sample, mean, std), dist.log_prob(sample).mean(dim=1))


def test_ddim_matches_diffusers_ddim_scheduler():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(10)
    t, t_prev = int(scheduler.timesteps[3]), int(scheduler.timesteps[4])
    ab, ab_prev = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t_prev]
    x, eps = _xv()
    noise = torch.randn_like(x)
    ours = ddim_step(x, eps, ab, ab_prev, eta=1.0, noise=noise)
    theirs = scheduler.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
    torch.testing.assert_close(ours.sample, theirs, atol=1e-5, rtol=1e-5)
    det = ddim_step(x, eps, ab, ab_prev, eta=0.0)
    torch.testing.assert_close(det.sample, scheduler.step(eps, t, x, eta=0.0).prev_sample, atol=1e-5, rtol=1e-5)


# ---- the mean and std against SPEC.md section 2, written out here in float64 NumPy (independently of
# treegrpo.steps), on random states, velocities and per-sample sigmas.
def _reference_sde(x, v, sigma, sigma_next, kind, a, sigma_max):
    """SPEC.md 2: mean and std of one step, x, v: [B, D] float64, sigma, sigma_next: [B]."""
    import numpy as np

    sig, nxt = sigma[:, None], sigma_next[:, None]
    dt = nxt - sig
    if kind == "cps":
        x0_hat, x1_hat = x - sig * v, x + (1 - sig) * v
        s = nxt * np.sin(a * np.pi / 2)
        return (1 - nxt) * x0_hat + np.sqrt(nxt**2 - s**2) * x1_hat, s
    if kind == "flow_grpo":
        sig_tilde = np.where(sig == 1.0, sigma_max, sig)
        s = a * np.sqrt(sig / (1 - sig_tilde))
    else:
        s = np.full_like(sig, a)
    mu = x * (1 + s**2 * dt / (2 * sig)) + v * (1 + s**2 * (1 - sig) / (2 * sig)) * dt
    return mu, s * np.sqrt(-dt)


@pytest.mark.parametrize("kind", ["flow_grpo", "dance", "cps"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sde_mean_and_std_equal_the_spec_formula_on_random_inputs(kind, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    b = 64
    x, v = rng.normal(size=(b, 48)) * rng.uniform(0.2, 3.0), rng.normal(size=(b, 48)) * rng.uniform(0.2, 3.0)
    sigma = rng.uniform(0.05, 0.99, size=b)
    sigma[:4] = 1.0  # pure noise: flow_grpo uses sigma_max there
    sigma_next = sigma * rng.uniform(0.3, 0.97, size=b)
    a, sigma_max = float(rng.uniform(0.2, 1.0)), 0.93
    mu, std = _reference_sde(x, v, sigma, sigma_next, kind, a, sigma_max)
    t = lambda arr: torch.tensor(arr, dtype=torch.float32)  # noqa: E731
    ours_mu, ours_std = sde_mean_std(t(x).view(b, 3, 4, 4), t(v).view(b, 3, 4, 4), t(sigma), t(sigma_next), kind=kind,
                                     noise_level=a, sigma_max=sigma_max)
    # float32 against float64: relative 1e-5 of the terms' size (x and v enter with O(1..10) weights).
    scale = float(np.abs(x).max() + np.abs(v).max())
    torch.testing.assert_close(ours_mu.double().view(b, -1), torch.tensor(mu), rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(ours_std.double().flatten(), torch.tensor(np.broadcast_to(std, (b, 1))).flatten(),
                               rtol=1e-5, atol=1e-7)
    # The drift term matters: the mean differs from the Euler step by 100x the tolerance or more.
    if kind != "cps":
        euler = x + (sigma_next - sigma)[:, None] * v
        assert np.abs(mu - euler).max() > 100 * 1e-5 * scale


@pytest.mark.parametrize("seed", [0, 1])
def test_ddim_mean_and_std_equal_the_spec_formula_on_random_inputs(seed):
    import numpy as np

    from treegrpo.steps import ddim_mean_std

    rng = np.random.default_rng(seed)
    b = 32
    x, e = rng.normal(size=(b, 27)), rng.normal(size=(b, 27))
    ab = rng.uniform(0.01, 0.95, size=b)
    ab_prev = ab + (1 - ab) * rng.uniform(0.05, 0.95, size=b)  # less noisy: larger alpha-bar
    eta = float(rng.uniform(0.1, 1.0))
    abc, abp = ab[:, None], ab_prev[:, None]
    x0_hat = (x - np.sqrt(1 - abc) * e) / np.sqrt(abc)
    std = eta * np.sqrt((1 - abp) / (1 - abc)) * np.sqrt(1 - abc / abp)
    mu = np.sqrt(abp) * x0_hat + np.sqrt(1 - abp - std**2) * e
    t = lambda arr: torch.tensor(arr, dtype=torch.float32)  # noqa: E731
    ours_mu, ours_std = ddim_mean_std(t(x).view(b, 3, 3, 3), t(e).view(b, 3, 3, 3), t(ab), t(ab_prev), eta=eta)
    scale = float(np.abs(x).max() / np.sqrt(ab.min()) + np.abs(e).max() / np.sqrt(ab.min()))
    torch.testing.assert_close(ours_mu.double().view(b, -1), torch.tensor(mu), rtol=1e-5, atol=2e-6 * scale)
    torch.testing.assert_close(ours_std.double().flatten(), torch.tensor(std).flatten(), rtol=1e-5, atol=1e-7)
