import torch

from treegrpo.loss import clipped_surrogate, kl_to_reference, per_node_mean, policy_loss


def test_surrogate_sign_and_clipping_on_hand_made_ratios():
    old = torch.zeros(6)
    ratio = torch.tensor([1.0, 1.5, 0.5, 1.5, 0.5, 1.05])
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, 2.0])
    loss, r = clipped_surrogate(torch.log(ratio), old, adv, clip_range=0.1, adv_clip=5.0)
    torch.testing.assert_close(r, ratio)
    # A > 0: the gain is capped at 1 + eps; a ratio below 1 - eps keeps its full (pessimistic) loss.
    # A < 0: the loss is capped at 1 - eps from below; a ratio above 1 + eps keeps its full loss.
    expected = torch.tensor([-1.0, -1.1, -0.5, 1.5, 0.9, -2.1])
    torch.testing.assert_close(loss, expected)


def test_advantages_are_clipped():
    loss, _ = clipped_surrogate(torch.zeros(2), torch.zeros(2), torch.tensor([100.0, -100.0]), adv_clip=5.0)
    torch.testing.assert_close(loss, torch.tensor([-5.0, 5.0]))


def test_gradient_pushes_log_prob_up_for_positive_advantage_and_stops_when_clipped():
    lp = torch.zeros(3, requires_grad=True)
    loss, _ = clipped_surrogate(lp, torch.tensor([0.0, 0.0, -1.0]), torch.tensor([1.0, -1.0, 1.0]), clip_range=0.2)
    loss.sum().backward()
    assert lp.grad[0] < 0  # minimising the loss raises the log-prob of a good edge
    assert lp.grad[1] > 0  # and lowers that of a bad edge
    assert lp.grad[2] == 0  # ratio e^1 is beyond 1 + eps with A > 0: no gradient


def test_per_node_reduction_sums_edges_and_averages_nodes():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0])
    edge_node = torch.tensor([0, 0, 0, 1])
    assert float(per_node_mean(values, edge_node, 2)) == (6.0 + 10.0) / 2


def test_first_on_policy_minibatch_has_ratio_one_and_no_clipping():
    lp = torch.randn(9)
    out = policy_loss(lp, lp.clone(), torch.randn(9), torch.arange(9) // 3, 3, clip_range=1e-4)
    assert out.stats["ratio_min"] == out.stats["ratio_max"] == 1.0
    assert out.stats["clip_frac"] == 0.0 and out.stats["approx_kl"] == 0.0


def test_kl_term_uses_the_transition_std_and_only_moves_the_policy_mean():
    mean = torch.ones(2, 3, requires_grad=True)
    ref = torch.zeros(2, 3, requires_grad=True)
    std = torch.tensor([[0.5], [1.0]])
    kl = kl_to_reference(mean, ref, std)
    torch.testing.assert_close(kl, torch.tensor([1 / (2 * 0.25), 1 / 2]))
    out = policy_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.arange(2), 2, kl=kl, kl_coef=0.1)
    out.loss.backward()
    assert abs(out.stats["kl_ref"] - float(kl.detach().mean())) < 1e-6
    assert mean.grad is not None and mean.grad.abs().sum() > 0 and ref.grad is None


def test_diagnostics_report_the_ratio_range():
    lp = torch.log(torch.tensor([0.5, 1.0, 2.0]))
    out = policy_loss(lp, torch.zeros(3), torch.ones(3), torch.arange(3), 3, clip_range=0.2)
    assert abs(out.stats["ratio_min"] - 0.5) < 1e-6 and abs(out.stats["ratio_max"] - 2.0) < 1e-6
    assert abs(out.stats["clip_frac"] - 2 / 3) < 1e-9
    assert out.stats["approx_kl"] > 0
