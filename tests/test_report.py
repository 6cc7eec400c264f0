"""`treegrpo report` without a browser: the bench page, the Pareto front, the table, errors."""

import json
import re

import pytest

from treegrpo.cli import main
from treegrpo.report import md_table_html, pareto_front, reward_names, write_report


def _fake_run(run, finals, seconds_per_iter, calls_per_iter):
    """A finished run directory with evaluations at iterations 0, 1, 2 (the files bench reads)."""
    run.mkdir(parents=True)
    rows = [{"iteration": 0, "wall_seconds": 0.0, "model_calls/total": 0, "eval/reward/shapes": 0.5}]
    for it, reward in enumerate(finals, start=1):
        rows.append({"iteration": it, "wall_seconds": it * seconds_per_iter, "model_calls/rollout": calls_per_iter,
                     "model_calls/train": 0, "model_calls/total": it * calls_per_iter, "eval/reward/shapes": reward})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({"iterations": len(finals)}))


def test_pareto_front_keeps_the_points_nothing_beats():
    points = {"fast_bad": (1.0, 0.6), "slow_good": (3.0, 0.9), "dominated": (2.5, 0.55), "mid": (2.0, 0.8)}
    assert pareto_front(points) == ["fast_bad", "mid", "slow_good"]


def test_bench_page_from_finished_runs(tmp_path, capsys):
    bench = tmp_path / "bench"
    _fake_run(bench / "treegrpo-seed0", [0.7, 0.9], 1.0, 200)
    _fake_run(bench / "treegrpo-seed1", [0.6, 0.8], 1.2, 200)
    _fake_run(bench / "dance_grpo-seed0", [0.6, 0.7], 2.0, 300)
    assert main(["report", str(bench)]) == 0
    out = capsys.readouterr().out
    path = bench / "report.html"
    assert f"report: {path}" in out
    html = path.read_text()
    for anchor in ['id="bench-curves"', 'id="pareto-plot"', 'id="results-table"']:
        assert anchor in html
    assert html.count("<svg") == 2  # two inline matplotlib figures
    assert "treegrpo (Pareto)" in html and "dance_grpo (Pareto)" not in html  # faster and better dominates
    # The table is bench.format_table's: one row per method, its final reward mean +- 95% t-interval
    # over seeds (2 seeds 0.8 and 0.9: 12.706 * 0.0707 / sqrt(2)).
    row = re.search(r"<tr><td>treegrpo</td>(.*?)</tr>", html).group(1)
    assert "0.850 +- 0.635" in row
    assert not re.search(r"""(src|href)=["']https?:""", html)  # self-contained: nothing fetched


def test_markdown_table_to_html():
    html = md_table_html("Note `x`.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert html == "<p class='note'>Note x.</p>\n<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table>"


def test_reward_names_come_from_train_and_eval_keys_only():
    records = [{"iteration": 0, "eval/reward/shapes": 0.5, "eval/reward/color": 0.9},
               {"iteration": 1, "train/shapes_mean": 0.4, "train/shapes_std": 0.1, "train/ratio_mean": 1.0,
                "train/advantage_abs_mean": 0.8, "train/reward_mean": 0.4}]
    assert reward_names(records) == ["shapes", "color"]


def test_report_of_something_that_is_not_a_run_says_so(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope")]) == 2
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "nope")
