import pytest
import torch

from treegrpo.loss import clipped_surrogate, kl_to_reference, per_node_mean, policy_loss, step_weights


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


def test_kl_per_edge_counts_a_node_once_per_outgoing_edge():
    # Node 0 has 3 edges, node 1 one: per node the KL term is mean(kl); per edge it is (3 kl0 + kl1) / 2.
    kl = torch.tensor([0.2, 0.6])
    edge_node = torch.tensor([0, 0, 0, 1])
    zeros = torch.zeros(4)
    per_node = policy_loss(zeros, zeros, zeros, edge_node, 2, kl=kl, kl_coef=1.0)
    per_edge = policy_loss(zeros, zeros, zeros, edge_node, 2, kl=kl, kl_coef=1.0, kl_per_edge=True)
    assert float(per_node.loss) == pytest.approx(0.4)
    assert float(per_edge.loss) == pytest.approx((3 * 0.2 + 0.6) / 2)
    assert per_edge.stats["kl_ref"] == pytest.approx(0.4)  # the diagnostic stays the plain per-node KL


def test_node_weights_scale_each_nodes_terms():
    lp = torch.zeros(4, requires_grad=True)
    edge_node = torch.tensor([0, 0, 1, 1])
    adv = torch.tensor([1.0, -1.0, 2.0, 1.0])
    out = policy_loss(lp, torch.zeros(4), adv, edge_node, 2, node_weight=torch.tensor([1.0, 0.5]))
    # loss = (w0 * (-1 + 1) + w1 * (-2 - 1)) / 2
    assert float(out.loss.detach()) == pytest.approx(0.5 * -3 / 2)
    out.loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([-0.5, 0.5, -0.5, -0.25]))
    with pytest.raises(ValueError, match="node_weight"):
        policy_loss(lp, torch.zeros(4), adv, edge_node, 2, node_weight=torch.ones(3))


def test_step_weights_level_gives_every_step_the_same_total_weight():
    steps = torch.tensor([0] + [1] * 3 + [2] * 9)  # a k = 3, w = 3 window at start 0
    table = step_weights(steps, "level")
    w = table[steps]
    totals = torch.zeros(3).index_add_(0, steps, w)
    torch.testing.assert_close(totals, torch.full((3,), 13 / 3))
    assert float(w.mean()) == pytest.approx(1.0)
    torch.testing.assert_close(step_weights(steps, "none")[steps], torch.ones(13))


def test_step_weights_gain_cancels_the_steps_gradient_gain():
    gains = torch.tensor([0.05, 0.1, 0.4, 1.6])
    steps = torch.tensor([1, 2, 2, 3])
    table = step_weights(steps, "gain", gains, reference_gain=0.05)
    torch.testing.assert_close(table * gains, torch.full((4,), 0.05))
    both = step_weights(steps, "level_gain", gains, reference_gain=0.05)
    torch.testing.assert_close(both, step_weights(steps, "level") * table)
    with pytest.raises(ValueError, match="gain"):
        step_weights(steps, "gain")
    with pytest.raises(ValueError, match="step weight mode"):
        step_weights(steps, "depth")


def test_flow_matching_loss_gradient_is_the_centred_advantage_pull():
    """At v = v_old the gradient of DiffusionNFT's loss is 2 beta (2r - 1)(v_old - target) / numel
    per element; r = 1/2 gives none, whatever the target; the drift term adds 2 kl (v - v_ref) / numel."""
    from treegrpo.loss import flow_matching_loss, matching_weights

    torch.manual_seed(0)
    v_old, target, v_ref = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    r = torch.tensor([0.9, 0.1, 0.5, 0.7])
    for beta in (1.0, 0.3):
        v = v_old.clone().requires_grad_(True)
        flow_matching_loss(v, v_old, target, r, beta).loss.backward()
        expected = 2 * beta * (2 * r.view(-1, 1) - 1) * (v_old - target) / v.numel()
        torch.testing.assert_close(v.grad, expected)
    v = v_old.clone().requires_grad_(True)
    out = flow_matching_loss(v, v_old, target, r, 1.0, v_ref=v_ref, kl_coef=0.5)
    out.loss.backward()
    expected = 2 * (2 * r.view(-1, 1) - 1) * (v_old - target) / 12 + 2 * 0.5 * (v_old - v_ref) / 12
    torch.testing.assert_close(v.grad, expected)
    assert out.stats["velocity_drift"] > 0

    adv = torch.tensor([3.0, -1.0, 0.0, 0.5, float("nan"), 2.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = torch.tensor([True, True, True, True, False, True])
    w = matching_weights(torch.nan_to_num(adv), group, mask)
    # group 0: clipped to [1, -1, 0], centred -> [1, -1, 0]; group 1: [0.5, 1] -> [-0.25, 0.25]; masked 0.5
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0, 0.5, 0.375, 0.5, 0.625]))


def test_flow_matching_loss_without_negatives_pulls_only_towards_the_better_leaves():
    """negatives=False: the gradient is 2 beta (2r - 1)(v+ - target) on leaves with r > 1/2 (equal to
    the full loss's at v = v_old) and exactly zero on the others, wherever v is (the full loss keeps
    pushing v away from a below-mean leaf's target)."""
    from treegrpo.loss import flow_matching_loss

    torch.manual_seed(1)
    v_old, target = torch.randn(4, 3), torch.randn(4, 3)
    r = torch.tensor([0.9, 0.1, 0.5, 0.7])
    for beta in (1.0, 0.3):
        v = v_old.clone().requires_grad_(True)
        flow_matching_loss(v, v_old, target, r, beta, negatives=False).loss.backward()
        expected = 2 * beta * (2 * r.view(-1, 1) - 1).clamp(min=0) * (v_old - target) / v.numel()
        torch.testing.assert_close(v.grad, expected)
        assert v.grad[1].abs().sum() == 0 and v.grad[2].abs().sum() == 0
    for negatives in (False, True):
        v = (v_old + torch.randn(4, 3)).requires_grad_(True)
        flow_matching_loss(v, v_old, target, r, 1.0, negatives=negatives).loss.backward()
        assert (v.grad[1].abs().sum() == 0) == (not negatives)
