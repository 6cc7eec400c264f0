"""Run the default demo training for several seeds and print the held-out results as a markdown table.

    .venv/bin/python benchmarks/demo_seeds.py --seeds 0 1 2 [--out runs/demo_seeds] [extra section.key=value ...]

Each seed is a full `treegrpo train` run (the demo's config, `train.seed=S`); the table reads each run's
summary.json (held-out ODE samples: the 300 held-out prompts x eval.num_seeds held-out seeds):
strict accuracy overall (the mean of its templates) and per template, and the partial-credit reward.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

KEYS = ["acc/strict", "acc/strict/single", "acc/strict/two", "acc/strict/count", "acc/strict/position", "reward/compose"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/demo_seeds")
    parser.add_argument("--config", default="configs/compose_treegrpo.yaml", help="the demo's config (`make demo`'s)")
    parser.add_argument("--skip-existing", action="store_true", help="reuse finished runs (their summary.json)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        run = Path(args.out) / f"seed{seed}"
        if not (args.skip_existing and (run / "summary.json").is_file()):
            cmd = [sys.executable, "-m", "treegrpo.cli", "train", args.config, f"train.seed={seed}", *args.overrides,
                   "--output-dir", str(run), "--quiet"]
            subprocess.run(cmd, check=True)
        rows.append((seed, json.loads((run / "summary.json").read_text())))
    print("| seed | training s | " + " | ".join(f"{k} base -> final" for k in KEYS) + " |")
    print("|---|---|" + "---|" * len(KEYS))
    for seed, s in rows:
        cells = [f"{s['base'][k]:.3f} -> {s['final'][k]:.3f}" for k in KEYS]
        print(f"| {seed} | {s['wall_seconds']:.0f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
