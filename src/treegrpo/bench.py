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

Statistics: finals and areas as mean +- the 95% Student-t half-width over seeds; the area under the
held-out curve (trapezoids over training seconds, divided by the span: the run's mean reward);
`--lr-sweep` runs every line at each learning rate and reports each at its best (`--lr-pick`: by
mean final reward, the default, or by mean area; docs/benchmarks.md section 25 saw the area pick a
rate whose finals were the worst and least stable);
"time to reach" interpolates linearly between the two evaluations around the crossing, so it is
not quantised by `eval.every` (`--eval-every` sets the cadence of every run).
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
# The held-out metric each line is judged on, and a second one shown beside it, by world: the
# compositional world's strict accuracy (and partial credit), or the old shapes world's reward (and
# shape accuracy). A run's metric is the first of these its evaluations log.
METRICS = {"eval/acc/strict": "eval/reward/compose", "eval/reward/shapes": "eval/acc/shape"}
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
        metric = next((m for m in METRICS if m in r), None)
        if metric is not None:
            points.append({"iteration": r["iteration"], "seconds": r["wall_seconds"], "metric": metric,
                           "calls": r.get("model_calls/total", 0.0), "reward": r[metric],
                           "second": r.get(METRICS[metric], math.nan),
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


# Two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30 (beyond: the normal 1.96).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval over seeds (0 for a single value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, 0.0
    df = len(values) - 1
    t = T_975[df - 1] if df <= len(T_975) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def area_under_curve(curve: list[dict[str, float]], key: str = "seconds") -> float:
    """Mean held-out reward over the run: the trapezoid area under reward vs `key` (seconds or
    calls) divided by the span, so it reads in reward units (a run that rises early scores higher
    than one that only ends at the same value). A single point gives its reward."""
    if len(curve) < 2 or curve[-1][key] <= curve[0][key]:
        return curve[-1]["reward"]
    area = sum((b[key] - a[key]) * (a["reward"] + b["reward"]) / 2 for a, b in zip(curve, curve[1:]))
    return area / (curve[-1][key] - curve[0][key])


def time_to_reach(curve: list[dict[str, float]], target: float, key: str = "seconds",
                  interpolate: bool = True) -> float | None:
    """`key` (seconds or calls) at which the curve's reward first reaches `target`, else None.

    interpolate: linear between the last evaluation below the target and the first at or above it
    (the crossing is then not quantised to the evaluation cadence); False gives that first
    evaluation's `key` itself. A curve that starts at or above the target reaches it at its start."""
    for i, point in enumerate(curve):
        if point["reward"] >= target:
            if not interpolate or i == 0:
                return point[key]
            prev = curve[i - 1]
            frac = (target - prev["reward"]) / (point["reward"] - prev["reward"])
            return prev[key] + frac * (point[key] - prev[key])
    return None


def _summarise_line(dirs: list[Path]) -> dict[str, Any]:
    """Statistics of one line (a method, variant or swept learning rate) over its seeds' runs."""
    curves = [_curve(d) for d in dirs]
    finals = [c[-1]["reward"] for c in curves]
    aucs = [area_under_curve(c) for c in curves]
    per_iter = [_per_iteration(d) for d in dirs]
    final, final_ci = mean_ci95(finals)
    auc, auc_ci = mean_ci95(aucs)
    return {
        "seeds": len(dirs),
        "runs": [d.name for d in dirs],
        "seconds_per_iteration": statistics.mean(p[0] for p in per_iter),
        "model_calls_per_iteration": statistics.mean(p[1] for p in per_iter),
        "base_reward": statistics.mean(c[0]["reward"] for c in curves),
        "final_reward": final,
        "final_reward_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
        "final_reward_ci95": final_ci,
        "final_rewards": finals,
        "peak_drop": statistics.mean(max(p["reward"] for p in c) - c[-1]["reward"] for c in curves),
        "auc": auc,
        "auc_ci95": auc_ci,
        "final_second": statistics.mean(c[-1]["second"] for c in curves),
        "iterations": statistics.mean(c[-1]["iteration"] for c in curves),
        "diversity": {k: {"base": statistics.mean(c[0].get(k, math.nan) for c in curves),
                          "final": statistics.mean(c[-1].get(k, math.nan) for c in curves)}
                      for k in dict.fromkeys(k for c in curves for k in c[-1] if k.startswith("diversity/"))},
        "curves": curves,
    }


LR_PICKS = {"final": "final_reward", "area": "auc"}  # --lr-pick: which mean over seeds names a line's best lr


def _check_lr_pick(lr_pick: str) -> None:
    if lr_pick not in LR_PICKS:
        raise ValueError(f"lr_pick must be one of {sorted(LR_PICKS)}, got {lr_pick!r}")


def summarise(runs: dict[str, list[Path]], sweeps: dict[str, dict[str, list[Path]]] | None = None,
              interpolate: bool = True, lr_pick: str = "final") -> dict[str, Any]:
    """Aggregate runs {line: [run dirs over seeds]} into the results structure.

    sweeps: {line: {lr: [run dirs]}} for learning-rate swept lines: each line is then reported at
    its best lr (`best_lr`: the highest mean final reward, or with lr_pick="area" the highest mean
    area under the held-out curve), every lr's final reward and area under `lr_sweep`.
    interpolate: see `time_to_reach`."""
    _check_lr_pick(lr_pick)
    results: dict[str, Any] = {"methods": {}, "reach": "interpolated" if interpolate else "first evaluation"}
    for name, dirs in runs.items():
        results["methods"][name] = _summarise_line(dirs)
    if sweeps:
        results["lr_pick"] = lr_pick
    for name, by_lr in (sweeps or {}).items():
        lines = {lr: _summarise_line(dirs) for lr, dirs in by_lr.items()}
        best = max(lines, key=lambda lr: lines[lr][LR_PICKS[lr_pick]])
        results["methods"][name] = {**lines[best], "best_lr": float(best), "lr_sweep": {
            lr: {k: m[k] for k in ("final_reward", "final_reward_ci95", "auc", "auc_ci95", "seeds", "runs")}
            for lr, m in lines.items()}}
    metrics = {p["metric"] for m in results["methods"].values() for c in m["curves"] for p in c}
    if len(metrics) > 1:
        raise ValueError(f"the bench's runs were judged on different held-out metrics {sorted(metrics)}: one world per bench")
    results["metric"] = metrics.pop() if metrics else next(iter(METRICS))
    results["second_metric"] = METRICS[results["metric"]]
    # Time (and calls) each method needs to reach each rival's final mean reward, per seed then averaged
    # over the seeds that reached it.
    for name, m in results["methods"].items():
        m["to_reach"] = {}
        for rival, r in results["methods"].items():
            if rival == name:
                continue
            hits = [time_to_reach(c, r["final_reward"], interpolate=interpolate) for c in m["curves"]]
            calls = [time_to_reach(c, r["final_reward"], "calls", interpolate=interpolate) for c in m["curves"]]
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
    second = results["second_metric"].split("/", 1)[1]  # e.g. reward/compose: partial credit beside strict accuracy
    lines = [f"Held-out metric: `{results['metric']}` (ODE samples, all prompts x held-out seeds); mean +- 95% "
             "t-interval over seeds; area = mean held-out reward over the run's training seconds (trapezoids)."
             + (" Diversity across held-out seeds: final (base)." if div_keys else ""), "",
             "| method | lr | s / iteration | model calls / iteration | iterations | base | final | area | peak - final | " + second + " | "
             + "".join(f"{k.split('/', 1)[1]} div | " for k in div_keys)
             + " | ".join(f"s to reach {n}" for n in names) + " |",
             "|---|---|---|---|---|---|---|---|---|---|" + "---|" * (len(div_keys) + len(names))]
    for name, m in methods.items():
        reach = []
        for rival in names:
            if rival == name:
                reach.append("-")
                continue
            hit = m["to_reach"][rival]
            reach.append("not reached" if hit["seconds"] is None else
                         f"{hit['seconds']:.0f} ({hit['seeds_reached']}/{m['seeds']})")
        lr = f"{m['best_lr']:g} (best of {len(m['lr_sweep'])})" if "best_lr" in m else "config"
        ci = m.get("final_reward_ci95", m.get("final_reward_std", 0.0))
        lines.append(f"| {name} | {lr} | {m['seconds_per_iteration']:.2f} | {m['model_calls_per_iteration']:.0f} | "
                     f"{m['iterations']:.0f} | {m['base_reward']:.3f} | {m['final_reward']:.3f} +- {ci:.3f} | "
                     f"{m.get('auc', math.nan):.3f} +- {m.get('auc_ci95', 0.0):.3f} | {m.get('peak_drop', math.nan):.3f} | "
                     f"{m['final_second']:.3f} | " + "".join(_diversity_cell(m, k) for k in div_keys)
                     + " | ".join(reach) + " |")
    sweeps = {n: m["lr_sweep"] for n, m in methods.items() if "lr_sweep" in m}
    if sweeps:
        pick = results.get("lr_pick", "area")  # results.json written before --lr-pick: area
        lines += ["", f"Learning-rate sweep (each method reported at its lr with the highest mean {pick}):", "",
                  "| method | lr | final | area |", "|---|---|---|---|"]
        for name, sweep in sweeps.items():
            for lr, m in sweep.items():
                lines.append(f"| {name} | {lr} | {m['final_reward']:.3f} +- {m['final_reward_ci95']:.3f} | "
                             f"{m['auc']:.3f} +- {m['auc_ci95']:.3f} |")
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
        ax.errorbar(m["seconds_per_iteration"], m["final_reward"], yerr=m.get("final_reward_ci95", m["final_reward_std"]),
                    fmt="o", color=f"C{i}", label=name)
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
              progress: bool = True, lr_sweep: list[str] | None = None, interpolate: bool = True,
              lr_pick: str = "final") -> dict[str, Any]:
    """Run every (method or variant, seed), then write results.json, results.md and the plots.

    lr_sweep: learning rates (as written, e.g. "1e-4") to try for every line: runs go to
    ``{line}-lr{lr}-seed{seed}`` and ``{line}-seed{seed}`` becomes a link to the best lr's run (by
    `lr_pick`, see `summarise`). interpolate: see `time_to_reach`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [Variant(m, method_config(m)) for m in methods] + [parse_variant(v) for v in variants]
    lrs = [_check_lr(lr) for lr in lr_sweep or []]
    _check_lr_pick(lr_pick)  # before the first run, not after hours of them
    names = [line.name for line in lines]
    if len(set(names)) != len(names):
        raise ConfigError(f"two bench lines share a name: {sorted(n for n in names if names.count(n) > 1)}")
    runs_to_do = [(line, Variant(f"{line.name}-lr{lr}", line.config, [*line.overrides, f"optim.lr={lr}"]) if lr else line)
                  for line in lines for lr in (lrs or [None])]
    for _, run in runs_to_do:  # validate every config before the first run starts
        load_config(run.config, [*common, *run.overrides])
    from tqdm.auto import tqdm

    runs: dict[str, list[Path]] = {}
    sweeps: dict[str, dict[str, list[Path]]] = {}
    # Runs done / total with an ETA, on a terminal only; each run's own train bar shows below it.
    with tqdm(total=len(seeds) * len(runs_to_do), desc="bench runs", unit="run", disable=None if progress else True) as bar:
        for seed in seeds:  # seed-major: an interrupted bench still has every method for the first seeds
            for line, run in runs_to_do:
                bar.set_postfix_str(f"{run.name} seed {seed}")
                path = run_variant(run, seed, out, common, progress)
                if lrs:
                    lr = run.name[len(line.name) + 3:]
                    sweeps.setdefault(line.name, {}).setdefault(lr, []).append(path)
                else:
                    runs.setdefault(line.name, []).append(path)
                bar.update(1)
    results = summarise(runs, sweeps, interpolate=interpolate, lr_pick=lr_pick)
    for name, m in results["methods"].items():
        if "best_lr" in m:  # {line}-seed{seed} -> the best lr's run, so every line has its usual run dirs
            best = next(lr for lr in m["lr_sweep"] if float(lr) == m["best_lr"])
            for seed in seeds:
                link = out / f"{name}-seed{seed}"
                if link.is_symlink():
                    link.unlink()
                if not link.exists():
                    link.symlink_to(f"{name}-lr{best}-seed{seed}", target_is_directory=True)
    results["seeds"] = seeds
    results["common_overrides"] = common
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = format_table(results)
    (out / "results.md").write_text(table)
    plot(results, out)
    return results


def _check_lr(text: str) -> str:
    """A learning rate of --lr-sweep, kept as written (it names run directories)."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--lr-sweep takes numbers like 1e-4,2e-4, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise ConfigError(f"--lr-sweep learning rates must be > 0, got {text!r}")
    return text.strip()
