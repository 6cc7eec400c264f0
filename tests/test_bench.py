"""`treegrpo bench`: runs methods and variants, aggregates over seeds, writes table, JSON and plots."""

import json

import pytest

from treegrpo.bench import parse_variant, run_bench, summarise, time_to_reach
from treegrpo.cli import main
from treegrpo.config import ConfigError

TINY = ["train.iterations=2", "train.prompts_per_iteration=1", "eval.every=1", "eval.num_seeds=1",
        "eval.grid_prompts=2", "train.checkpoint_every=0", "method.group_size=3", "method.k=2", "method.window=2"]


def test_time_to_reach_reads_the_first_crossing():
    curve = [{"seconds": 0.0, "calls": 0.0, "reward": 0.5}, {"seconds": 10.0, "calls": 100.0, "reward": 0.7},
             {"seconds": 20.0, "calls": 200.0, "reward": 0.9}]
    assert time_to_reach(curve, 0.6) == 10.0
    assert time_to_reach(curve, 0.85, key="calls") == 200.0
    assert time_to_reach(curve, 0.95) is None


def test_variants_parse_into_a_base_config_and_overrides():
    v = parse_variant("k2:method.k=2,method.window=2")
    assert v.name == "k2" and v.config.name == "treegrpo.yaml" and v.overrides == ["method.k=2", "method.window=2"]
    assert parse_variant("eta@dance_grpo:method.noise_level=0.5").config.name == "dance_grpo.yaml"
    with pytest.raises(ConfigError, match="no method config"):
        parse_variant("x@nope:method.k=2")


def test_a_tiny_bench_writes_results_table_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", *TINY, "--methods", "treegrpo,dance_grpo", "--seeds", "0", "1",
                 "--variant", "k3:method.k=3", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"treegrpo", "dance_grpo", "k3"}
    tree = results["methods"]["treegrpo"]
    assert tree["seeds"] == 2 and tree["iterations"] == 2 and len(tree["curves"]) == 2
    assert tree["model_calls_per_iteration"] > 0 and tree["seconds_per_iteration"] > 0
    assert set(tree["to_reach"]) == {"dance_grpo", "k3"}
    table = (out / "results.md").read_text()
    assert "| treegrpo |" in table and "| dance_grpo |" in table and "s to reach k3" in table
    for plot in ["reward_vs_seconds.png", "reward_vs_calls.png", "final_vs_seconds_per_iteration.png"]:
        assert (out / plot).stat().st_size > 1000
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    assert 'id="pareto-plot"' in (out / "report.html").read_text()
    # Finished runs are reused: a second call does not retrain (metrics files untouched).
    before = (out / "treegrpo-seed0" / "metrics.jsonl").stat().st_mtime_ns
    run_bench(out, ["treegrpo"], [0], [], TINY, progress=False)
    assert (out / "treegrpo-seed0" / "metrics.jsonl").stat().st_mtime_ns == before


def test_summary_uses_the_mean_over_seeds(tmp_path):
    runs = {}
    for seed, final in ((0, 0.7), (1, 0.9)):
        run = tmp_path / f"m-seed{seed}"
        run.mkdir()
        rows = [{"iteration": 0, "wall_seconds": 0.0, "model_calls/total": 0, "eval/reward/shapes": 0.5},
                {"iteration": 1, "wall_seconds": 2.0, "model_calls/rollout": 10, "model_calls/train": 5,
                 "model_calls/total": 15, "eval/reward/shapes": final}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.setdefault("m", []).append(run)
    m = summarise(runs)["methods"]["m"]
    assert m["final_reward"] == pytest.approx(0.8) and m["final_reward_std"] == pytest.approx(0.1414, abs=1e-3)
    assert m["seconds_per_iteration"] == 2.0 and m["model_calls_per_iteration"] == 15


def test_the_table_shows_each_methods_diversity_next_to_its_accuracy(tmp_path):
    from treegrpo.bench import format_table

    runs = {}
    for name, finals in (("a", (0.10, 0.20)), ("b", (0.05, 0.07))):
        for seed, final in enumerate(finals):
            run = tmp_path / f"{name}-seed{seed}"
            run.mkdir()
            rows = [{"iteration": 0, "wall_seconds": 0.0, "eval/reward/shapes": 0.5, "eval/diversity/layout": 0.3},
                    {"iteration": 1, "wall_seconds": 2.0, "model_calls/rollout": 10, "model_calls/train": 5,
                     "eval/reward/shapes": 0.6, "eval/diversity/layout": final}]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            runs.setdefault(name, []).append(run)
    results = summarise(runs)
    assert results["methods"]["a"]["diversity"]["diversity/layout"] == {"base": pytest.approx(0.3), "final": pytest.approx(0.15)}
    table = format_table(results)
    assert "| layout div |" in table
    assert "| 0.150 (0.300) |" in table.splitlines()[4] and "| 0.060 (0.300) |" in table.splitlines()[5]
