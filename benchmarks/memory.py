"""Peak memory of one TreeGRPO iteration against the tree shape (k, w) and `train.max_batch`.

    .venv/bin/python benchmarks/memory.py [--out runs/memory] [--prompts 16] [--shapes 2x1 3x3 4x4]
                                           [--max-batches 512] [--extra 4x4@64 4x4@4096]

Each point is a fresh `treegrpo train` process on the shapes world: one iteration, 16 prompts, the
window fixed at step 0 (the largest trees: all k^w leaves go through the remaining steps), a one-
prompt evaluation so it leaves little behind. The table reads the iteration's metrics:
``memory/peak_rss_growth_mb`` (what the iteration added on top of the process, the number that
grows with the tree) and ``memory/peak_rss_mb`` (the whole process), plus the tree's size and time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def run_point(out: Path, k: int, w: int, max_batch: int, prompts: int) -> dict:
    run = out / f"k{k}w{w}_mb{max_batch}"
    eval_file = out / "one_prompt.txt"
    eval_file.write_text("a red circle on a black background\n")
    cmd = [sys.executable, "-m", "treegrpo", "train", f"method.k={k}", f"method.window={w}", "method.window_mode=fixed",
           "method.window_start=0", f"train.max_batch={max_batch}", f"train.prompts_per_iteration={prompts}",
           "train.iterations=1", "train.checkpoint_every=0", f"eval.prompts={eval_file}", "eval.num_seeds=1",
           "eval.grid_prompts=1", "log.trackers=[]", "log.tree_every=0", "--output-dir", str(run), "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    record = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1]
    return {"k": k, "w": w, "max_batch": max_batch, "leaves": int(record["leaves"]),
            "calls": int(record["model_calls/rollout"] + record["model_calls/train"]),
            "growth_mb": record.get("memory/peak_rss_growth_mb"), "peak_mb": record["memory/peak_rss_mb"],
            "seconds": record["wall_seconds"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/memory")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--shapes", nargs="+", default=["2x1", "2x2", "3x2", "3x3", "4x3", "4x4"], help="KxW")
    parser.add_argument("--max-batches", type=int, nargs="+", default=[512])
    parser.add_argument("--extra", nargs="*", default=["4x4@64", "4x4@4096"], help="KxW@MAX_BATCH points")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points = [(*map(int, s.split("x")), mb) for s in args.shapes for mb in args.max_batches]
    points += [(*map(int, e.split("@")[0].split("x")), int(e.split("@")[1])) for e in args.extra]
    rows = [run_point(out, k, w, mb, args.prompts) for k, w, mb in points]
    (out / "memory.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"| k | w | max_batch | leaves ({args.prompts} prompts) | model calls | iteration peak growth MB | "
          "process peak MB | iteration s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['w']} | {r['max_batch']} | {r['leaves']} | {r['calls']} | {r['growth_mb']} | "
              f"{r['peak_mb']} | {r['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
