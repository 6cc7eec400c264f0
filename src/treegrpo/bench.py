"""`treegrpo bench`: methods side by side under an equal budget, on held-out evaluation.

Each (method, seed) is a full `treegrpo train` run with the method's config from `configs/`, the
same model, reward, prompts and held-out evaluation, and the same budget (training wall-clock and/or
model calls; both are recorded). Runs go one after another on the same machine, so seconds compare.

Outputs in the bench directory: one run directory per (method, seed), `results.json`, `results.md`
(per method: seconds and model calls per iteration, final held-out reward with its spread over
seeds, and the wall-clock each method needs to reach every rival's final reward) and plots
(held-out reward vs wall-clock and vs model calls; final reward vs seconds per iteration).

Ablations are method variants: ``--variant NAME:key=value,key=value`` adds a run of a method
config with overrides, e.g. ``--variant k2:method.k=2`` or ``--variant softmax:method.backup=softmax``.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from treegrpo.config import ConfigError, load_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_METHODS = ("treegrpo", "dance_grpo", "flow_grpo", "mix_grpo", "branch_grpo")
METRIC = "eval/reward/shapes"
DIVERSITY = "eval/diversity/"  # held-out diversity across seeds (treegrpo.diversity), shown next to accuracy


@dataclass
class Variant:
    """One line of the comparison: a method config plus overrides."""

    name: str
    config: Path
    overrides: list[str] = field(default_factory=list)


def parse_variant(text: str) -> Variant:
    """``NAME:key=value,key=value`` or ``NAME@METHOD:key=value`` (base config METHOD, default treegrpo)."""
    head, _, tail = text.partition(":")
    name, _, base = head.partition("@")
    overrides = [kv for kv in tail.split(",") if kv.strip()]
    return Variant(name, method_config(base or "treegrpo"), overrides)


def method_config(method: str) -> Path:
    path = CONFIG_DIR / f"{method}.yaml"
    if not path.is_file():
        raise ConfigError(f"no method config {str(path)!r}; available: "
                          f"{', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml')))}")
    return path


def run_variant(variant: Variant, seed: int, out: Path, common: list[str], progress: bool) -> Path:
    """Train one (variant, seed) into `out` (an existing finished run is reused); returns the run dir."""
    from treegrpo.trainer import Trainer

    run = out / f"{variant.name}-seed{seed}"
    if (run / "summary.json").is_file():
        return run
    config = load_config(variant.config, [*common, *variant.overrides, f"train.seed={seed}"])
    config.train.progress = progress
    Trainer(config, run).train()
    return run


def _curve(run: Path) -> list[dict[str, float]]:
    """Evaluation points of a run: iteration, wall seconds, model calls, reward."""
    points = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if METRIC in r:
            points.append({"iteration": r["iteration"], "seconds": r["wall_seconds"],
                           "calls": r.get("model_calls/total", 0.0), "reward": r[METRIC],
                           "shape_acc": r.get("eval/acc/shape", math.nan),
                           **{k[len("eval/"):]: v for k, v in r.items() if k.startswith(DIVERSITY)}})
    return points


def _per_iteration(run: Path) -> tuple[float, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["iteration"] > 0]
    if not rows:
        return math.nan, math.nan
    seconds = rows[-1]["wall_seconds"] / rows[-1]["iteration"]
    calls = statistics.mean(r["model_calls/rollout"] + r["model_calls/train"] for r in rows)
    return seconds, calls


def time_to_reach(curve: list[dict[str, float]], target: float, key: str = "seconds") -> float | None:
    """First `key` (seconds or calls) at which the curve's reward reaches `target`, else None."""
    for point in curve:
        if point["reward"] >= target:
            return point[key]
    return None


def summarise(runs: dict[str, list[Path]]) -> dict[str, Any]:
    """Aggregate runs {variant: [run dirs over seeds]} into the results structure."""
    results: dict[str, Any] = {"metric": METRIC, "methods": {}}
    for name, dirs in runs.items():
        curves = [_curve(d) for d in dirs]
        finals = [c[-1]["reward"] for c in curves]
        per_iter = [_per_iteration(d) for d in dirs]
        results["methods"][name] = {
            "seeds": len(dirs),
            "seconds_per_iteration": statistics.mean(p[0] for p in per_iter),
            "model_calls_per_iteration": statistics.mean(p[1] for p in per_iter),
            "base_reward": statistics.mean(c[0]["reward"] for c in curves),
            "final_reward": statistics.mean(finals),
            "final_reward_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "final_shape_acc": statistics.mean(c[-1]["shape_acc"] for c in curves),
            "iterations": statistics.mean(c[-1]["iteration"] for c in curves),
            "diversity": {k: {"base": statistics.mean(c[0].get(k, math.nan) for c in curves),
                              "final": statistics.mean(c[-1].get(k, math.nan) for c in curves)}
                          for k in dict.fromkeys(k for c in curves for k in c[-1] if k.startswith("diversity/"))},
            "curves": curves,
        }
    # Time (and calls) each method needs to reach each rival's final mean reward, per seed then averaged
    # over the seeds that reached it.
    for name, m in results["methods"].items():
        m["to_reach"] = {}
        for rival, r in results["methods"].items():
            if rival == name:
                continue
            hits = [time_to_reach(c, r["final_reward"]) for c in m["curves"]]
            calls = [time_to_reach(c, r["final_reward"], "calls") for c in m["curves"]]
            reached = [h for h in hits if h is not None]
            m["to_reach"][rival] = {
                "seconds": statistics.mean(reached) if reached else None,
                "model_calls": statistics.mean([c for c in calls if c is not None]) if reached else None,
                "seeds_reached": len(reached),
            }
    return results


def format_table(results: dict[str, Any]) -> str:
    methods = results["methods"]
    names = list(methods)
    div_keys = list(dict.fromkeys(k for m in methods.values() for k in m.get("diversity", {})))
    lines = [f"Held-out metric: `{results['metric']}` (ODE samples, all prompts x held-out seeds); mean over seeds."
             + (" Diversity across held-out seeds: final (base)." if div_keys else ""), "",
             "| method | s / iteration | model calls / iteration | iterations | base | final (+- std) | shape acc | "
             + "".join(f"{k.split('/', 1)[1]} div | " for k in div_keys)
             + " | ".join(f"s to reach {n}" for n in names) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * (len(div_keys) + len(names))]
    for name, m in methods.items():
        reach = []
        for rival in names:
            if rival == name:
                reach.append("-")
                continue
            hit = m["to_reach"][rival]
            reach.append("not reached" if hit["seconds"] is None else
                         f"{hit['seconds']:.0f} ({hit['seeds_reached']}/{m['seeds']})")
        lines.append(f"| {name} | {m['seconds_per_iteration']:.2f} | {m['model_calls_per_iteration']:.0f} | "
                     f"{m['iterations']:.0f} | {m['base_reward']:.3f} | {m['final_reward']:.3f} +- {m['final_reward_std']:.3f} | "
                     f"{m['final_shape_acc']:.3f} | " + "".join(_diversity_cell(m, k) for k in div_keys)
                     + " | ".join(reach) + " |")
    return "\n".join(lines) + "\n"


def _diversity_cell(method: dict[str, Any], key: str) -> str:
    d = method.get("diversity", {}).get(key)
    return "- | " if d is None else f"{d['final']:.3f} ({d['base']:.3f}) | "


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    """Reward vs wall-clock, reward vs model calls, final reward vs seconds per iteration (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, label, file in (("seconds", "training wall-clock (s)", "reward_vs_seconds.png"),
                             ("calls", "model calls (no CFG)", "reward_vs_calls.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, m in results["methods"].items():
            for i, curve in enumerate(m["curves"]):
                ax.plot([p[key] for p in curve], [p["reward"] for p in curve], marker="o", ms=3,
                        color=f"C{list(results['methods']).index(name)}", alpha=0.8, label=name if i == 0 else None)
        ax.set_xlabel(label)
        ax.set_ylabel(f"held-out {results['metric'].split('/')[-1]} reward")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / file, dpi=120)
        plt.close(fig)
        written.append(out / file)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, m) in enumerate(results["methods"].items()):
        ax.errorbar(m["seconds_per_iteration"], m["final_reward"], yerr=m["final_reward_std"], fmt="o", color=f"C{i}", label=name)
    ax.set_xlabel("seconds per iteration")
    ax.set_ylabel("final held-out reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "final_vs_seconds_per_iteration.png", dpi=120)
    plt.close(fig)
    written.append(out / "final_vs_seconds_per_iteration.png")
    return written


def run_bench(out: str | Path, methods: list[str], seeds: list[int], variants: list[str], common: list[str],
              progress: bool = True) -> dict[str, Any]:
    """Run every (method or variant, seed), then write results.json, results.md and the plots."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [Variant(m, method_config(m)) for m in methods] + [parse_variant(v) for v in variants]
    for line in lines:  # validate every config before the first run starts
        load_config(line.config, [*common, *line.overrides])
    from tqdm.auto import tqdm

    runs: dict[str, list[Path]] = {}
    # Runs done / total with an ETA, on a terminal only; each run's own train bar shows below it.
    with tqdm(total=len(seeds) * len(lines), desc="bench runs", unit="run", disable=None if progress else True) as bar:
        for seed in seeds:  # seed-major: an interrupted bench still has every method for the first seeds
            for line in lines:
                bar.set_postfix_str(f"{line.name} seed {seed}")
                runs.setdefault(line.name, []).append(run_variant(line, seed, out, common, progress))
                bar.update(1)
    results = summarise(runs)
    results["seeds"] = seeds
    results["common_overrides"] = common
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = format_table(results)
    (out / "results.md").write_text(table)
    plot(results, out)
    return results
