"""Summarise a `treegrpo bench` directory of pruning / adaptive-window variants (docs/benchmarks.md,
"Pruned and adaptive trees"): per line, model calls per iteration (rollout and total), the held-out
reward at the end and its spread over seeds, and the pruning diagnostics.

Usage: python benchmarks/prune_adaptive_table.py BENCH_DIR
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def main(bench: Path) -> None:
    rows: dict[str, list[dict[str, float]]] = defaultdict(list)
    for run in sorted(bench.glob("*-seed*")):
        if not (run / "summary.json").is_file():
            continue
        name = run.name.rsplit("-seed", 1)[0]
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if r["iteration"] > 0]
        evals = [r for r in records if "eval/reward/shapes" in r]
        mean = lambda key: statistics.fmean(r[key] for r in steps if key in r) if any(key in r for r in steps) else float("nan")
        rows[name].append({"rollout": mean("model_calls/rollout"),
                           "total": steps[-1]["model_calls/total"] / len(steps),
                           "final": evals[-1]["eval/reward/shapes"], "acc": evals[-1].get("eval/acc/shape", float("nan")),
                           "auc": statistics.fmean(r["eval/reward/shapes"] for r in evals[1:]),
                           "corr": mean("prune/probe_leaf_corr"), "start": mean("window_start"),
                           "seconds": steps[-1]["wall_seconds"] / len(steps)})
    print("| line | seeds | rollout calls / it | total calls / it | s / it | held-out reward (end) | shape acc (end) | "
          "mean held-out reward over evals | mean window start | probe-leaf corr |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, runs in rows.items():
        f = lambda k: statistics.fmean(r[k] for r in runs)
        sd = lambda k: statistics.stdev(r[k] for r in runs) if len(runs) > 1 else 0.0
        finals = ", ".join(f"{r['final']:.3f}" for r in runs)
        print(f"| {name} | {len(runs)} | {f('rollout'):.0f} | {f('total'):.0f} | {f('seconds'):.1f} | "
              f"{f('final'):.3f} +- {sd('final'):.3f} ({finals}) | {f('acc'):.3f} | {f('auc'):.3f} +- {sd('auc'):.3f} | "
              f"{f('start'):.2f} | {f('corr'):.2f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
