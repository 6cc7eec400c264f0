"""The micro-benchmark's per-node sampler grows the same trees as the batched one; the benchmark
functions return complete rows. No timing assertions (timings are only ratios on a noisy machine)."""

import json

import pytest
import torch

from treegrpo.bench_micro import (format_markdown, ideal_seconds, report_markdown, rollout_per_node, sampler_benchmark,
                                  scan_batch_sizes, train_step_benchmark)
from treegrpo.policies.analytic import GaussianPolicy
from treegrpo.rollout import SamplerConfig, rollout
from treegrpo.tree import TreeShape

SAMPLER_FIELDS = {"prompts", "k", "w", "num_steps", "start", "max_batch", "leaves", "calls", "batched_forwards",
                  "per_node_forwards", "batched_s", "batched_model_s", "per_node_s", "ideal_s", "ideal_best_s", "speedup",
                  "batched_over_ideal", "batched_over_best"}


def _both(policy, prompts, shape, sampler, roots):
    batched = rollout(policy, prompts, shape, sampler=sampler, generator=torch.Generator().manual_seed(1),
                      max_batch=5, root_latents=roots)
    per_node = rollout_per_node(policy, prompts, shape, sampler=sampler, generator=torch.Generator().manual_seed(1),
                                root_latents=roots)
    return batched, per_node


@pytest.mark.parametrize("shape", [
    TreeShape.treegrpo(6, k=3, w=2, start=1),
    TreeShape.treegrpo(5, k=2, w=3, start=0, trees_per_prompt=2),
    TreeShape((1,) * 4, (False,) * 4, (False,) * 4, roots_per_prompt=3),  # pure ODE chains
])
def test_per_node_matches_batched_without_noise(shape):
    policy = GaussianPolicy(latent_shape=(1, 4, 4))
    prompts = ["a", "b", "c"]
    roots = torch.randn((len(prompts) * shape.roots_per_prompt, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    batched, per_node = _both(policy, prompts, shape, SamplerConfig(noise_level=0.0), roots)
    assert per_node.leaves.shape == batched.leaves.shape
    assert per_node.leaves.shape[0] == shape.num_leaves * shape.roots_per_prompt * len(prompts)
    torch.testing.assert_close(per_node.leaves, batched.leaves, rtol=1e-5, atol=1e-6)
    assert per_node.num_model_calls == batched.num_model_calls == shape.num_model_calls * shape.roots_per_prompt * len(prompts)


def test_per_node_with_noise_has_the_same_structure():
    policy = GaussianPolicy(latent_shape=(1, 4, 4))
    shape = TreeShape.treegrpo(6, k=3, w=2, start=1)
    roots = torch.randn((2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    batched, per_node = _both(policy, ["a", "b"], shape, SamplerConfig(), roots)
    assert per_node.leaves.shape == batched.leaves.shape
    assert per_node.num_model_calls == shape.num_model_calls * 2
    assert torch.isfinite(per_node.leaves).all()
    # Noise makes siblings differ; the leaves' spread is of the same order for both samplers.
    assert per_node.leaves.std() == pytest.approx(float(batched.leaves.std()), rel=0.5)


def test_per_node_matches_batched_on_the_shapes_model():
    from treegrpo.policies import load_policy

    policy = load_policy("shapes")
    shape = TreeShape.treegrpo(4, k=2, w=2, start=1)
    roots = torch.randn((1, *policy.latent_shape), generator=torch.Generator().manual_seed(0))
    batched, per_node = _both(policy, ["a red circle on a black background"], shape, SamplerConfig(noise_level=0.0), roots)
    assert per_node.num_model_calls == batched.num_model_calls == shape.num_model_calls
    # Model outputs depend slightly on batch composition: equal within float tolerance.
    torch.testing.assert_close(per_node.leaves, batched.leaves, rtol=1e-3, atol=1e-3)
    (row,) = sampler_benchmark(policy, prompt_counts=(1,), k=2, w=2, num_steps=4, start=1, max_batch=16, repeats=1,
                               progress=False)
    assert SAMPLER_FIELDS <= set(row) and row["calls"] == shape.num_model_calls


def test_sampler_benchmark_rows_and_markdown():
    policy = GaussianPolicy(latent_shape=(1, 4, 4))
    rows = sampler_benchmark(policy, prompt_counts=(1, 2), k=2, w=2, num_steps=5, start=1, max_batch=8, repeats=1,
                             progress=False)
    assert len(rows) == 2
    shape = TreeShape.treegrpo(5, 2, 2, 1)
    for row, count in zip(rows, (1, 2)):
        assert SAMPLER_FIELDS <= set(row)
        assert row["prompts"] == count
        assert row["calls"] == row["per_node_forwards"] == shape.num_model_calls * count
        assert row["leaves"] == shape.num_leaves * count
        assert all(row[f] > 0 for f in ("batched_s", "per_node_s", "ideal_s", "ideal_best_s", "speedup", "batched_over_ideal"))
    json.dumps(rows)
    text = format_markdown(rows, "Sampler")
    assert text.startswith("### Sampler") and text.count("\n| ") == 3  # header + 2 rows
    assert "batched_over_ideal" in text
    assert format_markdown([]).strip() == "(no rows)"


def test_train_step_benchmark_variants_give_the_same_gradient():
    policy = GaussianPolicy(latent_shape=(1, 4, 4))
    rows = train_step_benchmark(policy, prompt_counts=(2,), k=2, w=2, num_steps=5, start=1, max_batch=4, repeats=1,
                                progress=False)
    (row,) = rows
    shape = TreeShape.treegrpo(5, 2, 2, 1)
    assert row["nodes"] == shape.num_trained_nodes * 2 and row["edges"] == shape.num_trained_edges * 2
    assert row["batched_forwards"] == 2  # 6 nodes in chunks of 4
    assert row["grad_rel_diff_per_node"] < 1e-5 and row["grad_rel_diff_per_edge"] < 1e-5
    assert policy.gain.grad is None  # gradients left cleared
    text = report_markdown([], rows, "python -m treegrpo.bench_micro --prompts 2")
    assert "Training step" in text and "speedup_per_node" in text


def test_ideal_seconds_scales_with_calls():
    policy = GaussianPolicy(latent_shape=(1, 4, 4))
    assert ideal_seconds(policy, 0, 16) == 0.0
    assert ideal_seconds(policy, 1000, 16, repeats=1) > 0
    assert ideal_seconds(policy, 1000, 16, repeats=1, batch_sizes=scan_batch_sizes(16, 4)) > 0
    assert scan_batch_sizes(512) == [32, 64, 128, 256, 512] and scan_batch_sizes(100) == [32, 64, 100]
    assert scan_batch_sizes(8) == [8]


def test_main_writes_json_and_markdown(tmp_path, capsys):
    from treegrpo.bench_micro import main

    result = main(["--prompts", "1", "--k", "2", "--w", "2", "--steps", "4", "--start", "1", "--max-batch", "8",
                   "--repeats", "1", "--no-per-edge", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "micro.json").read_text())
    assert saved["sampler"][0]["calls"] == TreeShape.treegrpo(4, 2, 2, 1).num_model_calls
    assert "per_edge_s" not in saved["train"][0] and [r["batch"] for r in saved["forward_curve"]] == [1, 8]
    assert result["config"]["max_batch"] == 8
    text = (tmp_path / "micro.md").read_text()
    assert "Sampler" in text and "Training step" in text and text in capsys.readouterr().out
