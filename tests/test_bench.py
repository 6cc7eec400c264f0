"""`treegrpo bench`: runs methods and variants, aggregates over seeds, writes table, JSON and plots."""

import json

import pytest

from treegrpo.bench import area_under_curve, format_table, mean_ci95, parse_variant, run_bench, summarise, time_to_reach
from treegrpo.cli import main
from treegrpo.config import ConfigError
from treegrpo.worlds.shapes import SHAPES_WORLD

TINY = [*SHAPES_WORLD, "train.iterations=2", "train.prompts_per_iteration=1", "eval.every=1", "eval.num_seeds=1",
        "eval.grid_prompts=2", "train.checkpoint_every=0", "method.group_size=3", "method.k=2", "method.window=2"]


def test_time_to_reach_reads_the_first_crossing():
    curve = [{"seconds": 0.0, "calls": 0.0, "reward": 0.5}, {"seconds": 10.0, "calls": 100.0, "reward": 0.7},
             {"seconds": 20.0, "calls": 200.0, "reward": 0.9}]
    assert time_to_reach(curve, 0.6, interpolate=False) == 10.0
    assert time_to_reach(curve, 0.85, key="calls", interpolate=False) == 200.0
    assert time_to_reach(curve, 0.95) is None
    # Interpolated between the evaluations around the crossing: not quantised by the cadence.
    assert time_to_reach(curve, 0.6) == pytest.approx(5.0)
    assert time_to_reach(curve, 0.85, key="calls") == pytest.approx(175.0)
    assert time_to_reach(curve, 0.4) == 0.0


def test_area_under_curve_is_the_mean_reward_over_the_run():
    curve = [{"seconds": 0.0, "reward": 0.5}, {"seconds": 10.0, "reward": 0.7}, {"seconds": 30.0, "reward": 0.7}]
    assert area_under_curve(curve) == pytest.approx((10 * 0.6 + 20 * 0.7) / 30)
    early = [{"seconds": 0.0, "reward": 0.5}, {"seconds": 5.0, "reward": 0.9}, {"seconds": 30.0, "reward": 0.7}]
    late = [{"seconds": 0.0, "reward": 0.5}, {"seconds": 25.0, "reward": 0.5}, {"seconds": 30.0, "reward": 0.7}]
    assert area_under_curve(early) > area_under_curve(late)  # same final, earlier rise
    assert area_under_curve(curve[:1]) == 0.5


def test_mean_ci95_is_the_student_t_half_width():
    mean, half = mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / 3**0.5)
    assert mean_ci95([0.7]) == (0.7, 0.0)
    many = [float(i % 2) for i in range(100)]
    assert mean_ci95(many)[1] == pytest.approx(1.96 * 0.50252 / 10, rel=1e-3)


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
    assert m["final_reward_ci95"] == pytest.approx(12.706 * 0.1414 / 2**0.5, rel=1e-3)
    assert m["auc"] == pytest.approx(((0.5 + 0.7) / 2 + (0.5 + 0.9) / 2) / 2)
    assert m["seconds_per_iteration"] == 2.0 and m["model_calls_per_iteration"] == 15


def _write_run(run, rows):
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_the_compositional_world_is_judged_on_strict_accuracy_and_worlds_do_not_mix(tmp_path):
    def rows(strict, partial):
        return [{"iteration": 0, "wall_seconds": 0.0, "model_calls/total": 0, "eval/acc/strict": 0.2,
                 "eval/reward/compose": 0.7, "eval/reward/compose_strict": 0.1},
                {"iteration": 1, "wall_seconds": 2.0, "model_calls/rollout": 10, "model_calls/train": 5,
                 "model_calls/total": 15, "eval/acc/strict": strict, "eval/reward/compose": partial,
                 "eval/reward/compose_strict": 0.9}]

    runs = {"m": [_write_run(tmp_path / "m-seed0", rows(0.3, 0.8)), _write_run(tmp_path / "m-seed1", rows(0.5, 0.9))]}
    results = summarise(runs)
    m = results["methods"]["m"]
    assert (results["metric"], results["second_metric"]) == ("eval/acc/strict", "eval/reward/compose")
    assert m["final_reward"] == pytest.approx(0.4) and m["final_second"] == pytest.approx(0.85)
    shapes = [{"iteration": 0, "wall_seconds": 0.0, "eval/reward/shapes": 0.5},
              {"iteration": 1, "wall_seconds": 2.0, "model_calls/rollout": 1, "model_calls/train": 1, "eval/reward/shapes": 0.6}]
    with pytest.raises(ValueError, match="different held-out metrics"):
        summarise({**runs, "s": [_write_run(tmp_path / "s-seed0", shapes)]})


def test_lr_sweep_reports_each_method_at_its_best_lr_with_the_usual_run_dirs(tmp_path):
    out = tmp_path / "bench"
    tiny = [o for o in TINY if not o.startswith("train.iterations")] + ["train.iterations=1"]
    assert main(["bench", *tiny, "--methods", "treegrpo", "--seeds", "0", "--lr-sweep", "1e-4,3e-1",
                 "--eval-every", "1", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    tree = results["methods"]["treegrpo"]
    assert set(tree["lr_sweep"]) == {"1e-4", "3e-1"}
    best = max(tree["lr_sweep"], key=lambda lr: tree["lr_sweep"][lr]["final_reward"])  # --lr-pick final, the default
    assert results["lr_pick"] == "final"
    assert tree["best_lr"] == float(best) and tree["final_reward"] == tree["lr_sweep"][best]["final_reward"]
    assert tree["runs"] == [f"treegrpo-lr{best}-seed0"]
    for lr in ("1e-4", "3e-1"):
        assert (out / f"treegrpo-lr{lr}-seed0" / "summary.json").is_file()
        assert f"lr: {float(lr)}" in (out / f"treegrpo-lr{lr}-seed0" / "config.yaml").read_text()
    link = out / "treegrpo-seed0"  # the usual run dir, with the final checkpoint, is the best lr's run
    assert link.resolve() == (out / f"treegrpo-lr{best}-seed0").resolve()
    assert any((link / "checkpoints").iterdir())
    assert "Learning-rate sweep" in (out / "results.md").read_text()
    assert "to_reach" in tree and "curves" in tree


def test_lr_pick_names_the_best_lr_by_final_or_by_area(tmp_path):
    # lr 2e-4 rises fast and falls back (the larger area, the lower final); lr 5e-5 climbs steadily
    def rows(curve):
        return [{"iteration": i, "wall_seconds": 10.0 * i, "model_calls/rollout": 10, "model_calls/train": 5,
                 "model_calls/total": 15 * i, "eval/acc/strict": r, "eval/reward/compose": r} for i, r in enumerate(curve)]

    sweeps = {"m": {lr: [_write_run(tmp_path / f"m-lr{lr}-seed{seed}", rows(curve)) for seed in (0, 1)]
                    for lr, curve in (("2e-4", [0.2, 0.8, 0.5]), ("5e-5", [0.2, 0.4, 0.6]))}}
    by_final = summarise({}, sweeps)
    by_area = summarise({}, sweeps, lr_pick="area")
    assert by_final["lr_pick"] == "final" and by_area["lr_pick"] == "area"
    assert by_final["methods"]["m"]["best_lr"] == 5e-5 and by_final["methods"]["m"]["final_reward"] == pytest.approx(0.6)
    assert by_area["methods"]["m"]["best_lr"] == 2e-4 and by_area["methods"]["m"]["final_reward"] == pytest.approx(0.5)
    assert by_final["methods"]["m"]["lr_sweep"] == by_area["methods"]["m"]["lr_sweep"]
    assert "highest mean final" in format_table(by_final) and "highest mean area" in format_table(by_area)
    with pytest.raises(ValueError, match="lr_pick"):
        summarise({}, sweeps, lr_pick="peak")
    with pytest.raises(ValueError, match="lr_pick"):  # refused before any run starts
        run_bench(tmp_path / "bench", ["treegrpo"], [0], [], TINY, progress=False, lr_sweep=["1e-4"], lr_pick="peak")
    assert not (tmp_path / "bench" / "treegrpo-lr1e-4-seed0").exists()


def test_bad_lr_sweep_and_eval_cadence_are_refused(tmp_path, capsys):
    assert main(["bench", *TINY, "--methods", "treegrpo", "--lr-sweep", "1e-4,fast", "--out", str(tmp_path), "--quiet"]) != 0
    assert "--lr-sweep" in capsys.readouterr().err
    assert main(["bench", *TINY, "--methods", "treegrpo", "--eval-every", "0", "--out", str(tmp_path), "--quiet"]) != 0
    assert "--eval-every" in capsys.readouterr().err


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
