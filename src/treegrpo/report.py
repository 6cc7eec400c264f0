"""`treegrpo report DIR`: one self-contained HTML page for a run or a benchmark.

A run page (RUN_DIR/report.html) shows, from the files a run leaves behind:
- train and held-out reward per reward model, over iterations and over training wall-clock;
- diagnostics per iteration: approx KL, clip fraction, ratio range, advantage spread, model calls,
  loss and KL to the base model, gradient norm;
- the held-out sample grids (same prompts and seeds each time): base, then checkpoints over time;
- diversity across seeds (``eval/diversity/...``) over iterations, and a few prompts x 8 seeds, base vs latest;
- the tree (`treegrpo.tree_svg`) of the recorded iterations, with a selector;
- the resolved config.
A benchmark page (BENCH_DIR/report.html) shows held-out reward vs wall-clock and vs model calls per
method, final reward vs seconds per iteration with the Pareto front, and the results table.

Everything is inline (SVG plots drawn by matplotlib, PNGs as data URIs, a few lines of vanilla JS):
the page opens offline and can be mailed as one file.
"""

from __future__ import annotations

import io
import json
import math
import re
from html import escape
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from treegrpo.tree_record import TreeRecord, list_records
from treegrpo.tree_svg import png_data_uri, tree_svg

CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.plot svg { max-width: 100%; height: auto; }
.grids { display: flex; gap: 12px; align-items: flex-start; overflow-x: auto; }
.grid figure { margin: 0; } .grid img { image-rendering: pixelated; display: block; }
.grid figcaption, .labels div { font-size: 12px; } figcaption { text-align: center; }
.labels { display: flex; flex-direction: column; padding-top: 18px; }
.labels div { display: flex; align-items: center; justify-content: flex-end; white-space: nowrap; }
pre { background: #f6f6f6; padding: 8px; font-size: 12px; overflow-x: auto; }
#config-yaml { columns: 4; }
.tree-view { overflow-x: auto; } .note { color: #666; font-size: 13px; }
"""

SELECT_JS = """
function showTree(id) {
  document.querySelectorAll('.tree-view').forEach(function (v) { v.style.display = v.id === id ? 'block' : 'none'; });
}
"""


# ---------------------------------------------------------------------- shared pieces
def figure_svg(draw: Callable[[Any], None], rows: int, cols: int, size: tuple[float, float]) -> str:
    """Draw with matplotlib (`draw(axes)`, axes a 2-D array) and return the figure as inline SVG markup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"svg.fonttype": "none", "font.size": 9}):  # text stays text: smaller, searchable
        fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
        draw(axes)
        fig.tight_layout()
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
        plt.close(fig)
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and doctype: the markup goes inside HTML
    return re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)


def md_table_html(markdown: str) -> str:
    """The pipe tables of `markdown` (as `treegrpo.bench.format_table` writes them) as HTML; other lines as paragraphs."""
    out, rows = [], []

    def flush() -> None:
        if rows:
            head, *body = rows
            out.append("<table><tr>" + "".join(f"<th>{escape(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in body) + "</table>")
            rows.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):  # skip the |---| separator
                rows.append(cells)
        else:
            flush()
            if line.strip():
                out.append(f"<p class='note'>{escape(line.replace('`', ''))}</p>")
    flush()
    return "\n".join(out)


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{CSS}</style><script>{SELECT_JS}</script></head>\n<body>\n<h1>{escape(title)}</h1>\n{body}\n</body></html>\n")


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _series(records: list[dict[str, Any]], key: str, x: str = "iteration") -> tuple[list[float], list[float]]:
    points = [(r[x], r[key]) for r in records if key in r and x in r and r[key] is not None and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


# ---------------------------------------------------------------------- run page
def reward_names(records: list[dict[str, Any]]) -> list[str]:
    """Reward models seen in the metrics: train/NAME_mean (with its train/NAME_std) and eval/reward/NAME,
    in first-seen order."""
    names: dict[str, None] = {}
    for r in records:
        for key in r:
            if key.startswith("eval/reward/"):
                names[key[len("eval/reward/"):]] = None
            elif key.startswith("train/") and key.endswith("_mean") and f"{key[:-len('_mean')]}_std" in r:
                names[key[len("train/"):-len("_mean")]] = None
    return list(names)


def reward_curves_svg(records: list[dict[str, Any]]) -> str:
    """One row per reward model: train (leaves of the iteration) and held-out reward, vs iteration and vs wall-clock."""
    names = reward_names(records)
    if not names:
        return "<p class='note'>no rewards logged yet</p>"

    def draw(axes: Any) -> None:
        for row, name in enumerate(names):
            for col, (x, label) in enumerate((("iteration", "iteration"), ("wall_seconds", "training wall-clock (s)"))):
                ax = axes[row][col]
                tx, ty = _series(records, f"train/{name}_mean", x)
                if tx:
                    ax.plot(tx, ty, color="C0", alpha=0.6, lw=1, label="train (rollout leaves)")
                ex, ey = _series(records, f"eval/reward/{name}", x)
                if ex:
                    ax.plot(ex, ey, color="C3", marker="o", ms=4, label="held-out (ODE, fixed seeds)")
                ax.set_xlabel(label)
                ax.set_ylabel(f"{name} reward")
                ax.grid(alpha=0.3)
                if row == 0:
                    ax.legend(fontsize=8)

    return figure_svg(draw, len(names), 2, (11, 2.2 * len(names)))


DIAGNOSTICS = [  # (title, [(metric key, label)])
    ("approx KL (old -> new)", [("train/approx_kl", "approx KL")]),
    ("clip fraction", [("train/clip_frac", "clip frac")]),
    ("probability ratio", [("train/ratio_mean", "mean")]),  # the min-max band is drawn around it
    ("advantage spread", [("train/advantage_abs_mean", "mean |A| per edge")]),
    ("model calls per iteration", [("model_calls/rollout", "rollout"), ("model_calls/train", "training")]),
    ("loss", [("train/loss", "total"), ("train/policy_loss", "clipped surrogate"), ("train/kl_ref", "KL to base")]),
    ("gradient norm (before clipping)", [("train/grad_norm", "grad norm")]),
    ("train reward spread (std over leaves)", []),  # one line per trained reward, filled in below
]


def diagnostics_svg(records: list[dict[str, Any]]) -> str:
    """Per-iteration training diagnostics, one panel each (panels with no data are left out)."""
    spread = [(f"train/{n}_std", n) for n in reward_names(records)]
    panels = [(t, [(k, lab) for k, lab in (keys or spread) if _series(records, k)[0]]) for t, keys in DIAGNOSTICS]
    panels = [(t, keys) for t, keys in panels if keys]
    if not panels:
        return "<p class='note'>no training iterations logged yet</p>"
    cols = 4
    rows = math.ceil(len(panels) / cols)

    def draw(axes: Any) -> None:
        for i, ax in enumerate(axes.flat):
            if i >= len(panels):
                ax.axis("off")
                continue
            title, keys = panels[i]
            if title == "probability ratio":
                x, lo = _series(records, "train/ratio_min")
                _, hi = _series(records, "train/ratio_max")
                if x and len(lo) == len(hi):
                    ax.fill_between(x, lo, hi, color="C0", alpha=0.25, label="min-max")
            for j, (key, label) in enumerate(keys):
                x, y = _series(records, key)
                ax.plot(x, y, color=f"C{j}", lw=1.2, label=label)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
            if len(keys) > 1 or title == "probability ratio":
                ax.legend(fontsize=7)

    return figure_svg(draw, rows, cols, (13, 2.8 * rows))


def grids_html(run: Path, records: list[dict[str, Any]], max_grids: int = 6) -> str:
    """The held-out sample grids side by side (base first), rows labelled with their prompts."""
    samples = run / "samples"
    index_path = samples / "grids.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        grids = [(g["file"], g["iteration"]) for g in index["grids"] if (samples / g["file"]).is_file()]
        prompts, seeds = index.get("prompts", []), index.get("seeds", [])
    else:  # a run from before grids.json: the file names still say the iteration
        files = sorted(samples.glob("iter_*.png"))
        grids = ([("start.png", 0)] if (samples / "start.png").is_file() else []) + [(f.name, int(f.stem[5:])) for f in files]
        prompts, seeds = [], []
    if not grids:
        return "<p class='note'>no sample grids yet</p>"
    if len(grids) > max_grids:  # base, the last one, and evenly spaced ones between
        picks = sorted({round(i * (len(grids) - 1) / (max_grids - 1)) for i in range(max_grids)})
        grids = [grids[i] for i in picks]
    evals = {r["iteration"]: r for r in records}
    key = main_eval_key(records)
    parts = ['<div class="grids">']
    first = Image.open(samples / grids[0][0])
    if prompts:
        row_h = first.height / len(prompts)
        labels = "".join(f'<div style="height:{row_h:.2f}px">{escape(p)}</div>' for p in prompts)
        parts.append(f'<div class="labels">{labels}</div>')
    for file, iteration in grids:
        image = Image.open(samples / file).convert("RGB")
        reward = evals.get(iteration, {}).get(key) if key else None
        caption = "base" if iteration == 0 else f"iteration {iteration}"
        if reward is not None:
            caption += f" ({reward:.3f})"
        parts.append(f'<div class="grid"><figure><figcaption>{caption}</figcaption>'
                     f'<img src="{png_data_uri(image)}" width="{image.width}" height="{image.height}" alt="{escape(caption)}">'
                     f"</figure></div>")
    parts.append("</div>")
    note = f"Rows: prompts; columns: held-out seeds {', '.join(map(str, seeds))}." if seeds else ""
    what = f"mean held-out {key.split('/')[-1]} reward" if key else "iteration"
    return (f"<p class='note'>Deterministic ODE samples from the same initial noise each time; caption: {what}. {note}</p>"
            + "".join(parts))


def diversity_svg(records: list[dict[str, Any]]) -> str:
    """One panel per held-out diversity metric (``eval/diversity/KEY``) over iterations."""
    keys = list(dict.fromkeys(k for r in records for k in r if k.startswith("eval/diversity/")))
    if not keys:
        return "<p class='note'>no diversity metrics logged (needs eval.num_seeds >= 2)</p>"
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)

    def draw(axes: Any) -> None:
        for i, ax in enumerate(axes.flat):
            if i >= len(keys):
                ax.axis("off")
                continue
            x, y = _series(records, keys[i])
            ax.plot(x, y, color="C2", marker="o", ms=4)
            ax.set_title(keys[i][len("eval/diversity/"):], fontsize=10)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)

    return figure_svg(draw, rows, cols, (3.3 * cols, 2.6 * rows))


def diversity_grids_html(run: Path) -> str:
    """The diversity grid (a few prompts x 8 held-out seeds) of the base model next to the latest one."""
    folder = run / "samples" / "diversity"
    index_path = folder / "index.json"
    if not index_path.is_file():
        return "<p class='note'>no diversity grids (eval.diversity_grid_prompts = 0?)</p>"
    index = json.loads(index_path.read_text())
    grids = sorted(((it, tag) for tag, it in index["grids"].items() if (folder / f"{tag}.png").is_file()))
    if not grids:
        return "<p class='note'>no diversity grids yet</p>"
    shown = [grids[0]] + ([grids[-1]] if len(grids) > 1 else [])
    first = Image.open(folder / f"{shown[0][1]}.png")
    row_h = first.height / max(len(index["prompts"]), 1)
    parts = ['<div class="grids"><div class="labels">'
             + "".join(f'<div style="height:{row_h:.2f}px">{escape(p)}</div>' for p in index["prompts"]) + "</div>"]
    for iteration, tag in shown:
        image = Image.open(folder / f"{tag}.png").convert("RGB")
        caption = "base" if iteration == 0 else f"iteration {iteration}"
        parts.append(f'<div class="grid"><figure><figcaption>{caption}</figcaption>'
                     f'<img src="{png_data_uri(image)}" width="{image.width}" height="{image.height}" alt="{caption}">'
                     "</figure></div>")
    parts.append("</div>")
    return (f"<p class='note'>Each row: one prompt over held-out seeds {', '.join(map(str, index['seeds']))} (ODE, the "
            "same noise in both grids). A model that collapses draws the same image across a row.</p>" + "".join(parts))


def main_eval_key(records: list[dict[str, Any]]) -> str | None:
    """The held-out key of the trained reward (the first one with train/NAME_mean), else the first held-out reward."""
    keys = {k for r in records for k in r}
    trained = [n for n in reward_names(records) if f"train/{n}_mean" in keys and f"eval/reward/{n}" in keys]
    if trained:
        return f"eval/reward/{trained[0]}"
    return next((k for r in records for k in r if k.startswith("eval/reward/")), None)


def trees_html(run: Path) -> str:
    """A selector over the recorded iterations and one tree picture per record (the last one shown)."""
    paths = list_records(run)
    if not paths:
        return "<p class='note'>no tree records (set log.tree_every, or train at least one iteration)</p>"
    records = [TreeRecord.load(p) for p in paths]
    options = "".join(f'<option value="tree-{r.iteration}"{" selected" if i == len(records) - 1 else ""}>'
                      f"iteration {r.iteration}: {escape(r.prompt)}</option>" for i, r in enumerate(records))
    views = "".join(f'<div class="tree-view" id="tree-{r.iteration}" style="display:{"block" if i == len(records) - 1 else "none"}">'
                    f"{tree_svg(r)}</div>" for i, r in enumerate(records))
    return ("<p class='note'>The first prompt of the iteration's batch: every node's parent, leaves with their "
            "reward and advantage, each edge coloured by the advantage the backup gave it (what the update credited). "
            "Left: the root noise; shaded: the trained SDE window.</p>"
            f'<label>tree: <select id="tree-select" onchange="showTree(this.value)">{options}</select></label>{views}')


def summary_html(run: Path) -> str:
    path = run / "summary.json"
    if not path.is_file():
        return "<p class='note'>no summary.json (the run has not finished)</p>"
    s = json.loads(path.read_text())
    base, final = s.get("base") or {}, s.get("final") or {}
    rows = "".join(f"<tr><td>{escape(k)}</td><td>{base.get(k, math.nan):.4f}</td><td>{final.get(k, math.nan):.4f}</td></tr>"
                   for k in sorted(set(base) | set(final)))
    return (f"<p>{s['iterations']} iterations, {s['wall_seconds']:.0f} s of training, {s['model_calls']:,} model calls.</p>"
            f"<table><tr><th>held-out metric</th><th>base</th><th>final</th></tr>{rows}</table>")


def write_run_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the run page (default RUN_DIR/report.html) and return its path."""
    run = Path(run)
    records = read_metrics(run)
    config = (run / "config.yaml").read_text() if (run / "config.yaml").is_file() else "(no config.yaml)"
    body = [f"<p class='note'>{escape(str(run.resolve()))}</p>",
            "<h2 id='summary'>Summary</h2>", summary_html(run),
            "<h2 id='rewards'>Rewards</h2>", f'<div class="plot" id="reward-curves">{reward_curves_svg(records)}</div>',
            "<h2 id='diagnostics'>Diagnostics</h2>", f'<div class="plot" id="diagnostics-plot">{diagnostics_svg(records)}</div>',
            "<h2 id='samples'>Held-out samples</h2>", f'<div id="sample-grids">{grids_html(run, records)}</div>',
            "<h2 id='diversity'>Diversity across seeds</h2>", f'<div class="plot" id="diversity-curves">{diversity_svg(records)}</div>',
            f'<div id="diversity-grids">{diversity_grids_html(run)}</div>',
            "<h2 id='tree'>The tree</h2>", f'<div id="trees">{trees_html(run)}</div>',
            "<h2 id='config'>Config</h2>", f'<pre id="config-yaml">{escape(config)}</pre>']
    path = Path(out) if out else run / "report.html"
    path.write_text(page(f"treegrpo run: {run.name}", "\n".join(body)))
    return path


# ---------------------------------------------------------------------- benchmark page
def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names whose (seconds per iteration, final reward) no other point beats on both (faster and better)."""
    front, best = [], -math.inf
    for name, (sec, reward) in sorted(points.items(), key=lambda kv: (kv[1][0], -kv[1][1])):
        if reward > best:
            front.append(name)
            best = reward
    return front


def bench_curves_svg(results: dict[str, Any]) -> str:
    """Held-out reward vs training wall-clock and vs model calls, every seed of every method."""
    methods = results["methods"]
    metric = results.get("metric", "eval/reward").split("/")[-1]

    def draw(axes: Any) -> None:
        for col, (key, label) in enumerate((("seconds", "training wall-clock (s)"), ("calls", "model calls (no CFG)"))):
            ax = axes[0][col]
            for i, (name, m) in enumerate(methods.items()):
                for s, curve in enumerate(m["curves"]):
                    ax.plot([p[key] for p in curve], [p["reward"] for p in curve], color=f"C{i}", marker="o", ms=3,
                            alpha=0.8, lw=1.2, label=name if s == 0 else None)
            ax.set_xlabel(label)
            ax.set_ylabel(f"held-out {metric} reward")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)

    return figure_svg(draw, 1, 2, (12, 4))


def pareto_svg(results: dict[str, Any]) -> str:
    """Final held-out reward (+- std over seeds) vs seconds per iteration; the Pareto front joined."""
    methods = results["methods"]
    points = {n: (m["seconds_per_iteration"], m["final_reward"]) for n, m in methods.items()}
    front = pareto_front(points)

    def draw(axes: Any) -> None:
        ax = axes[0][0]
        for i, (name, m) in enumerate(methods.items()):
            ax.errorbar(m["seconds_per_iteration"], m["final_reward"], yerr=m.get("final_reward_std", 0.0), fmt="o",
                        color=f"C{i}", ms=7, capsize=3, label=name + (" (Pareto)" if name in front else ""))
        ax.plot([points[n][0] for n in front], [points[n][1] for n in front], "k--", lw=1, alpha=0.6)
        ax.set_xlabel("seconds per iteration")
        ax.set_ylabel("final held-out reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    return figure_svg(draw, 1, 1, (6.5, 4.2))


def load_bench(bench: Path) -> dict[str, Any]:
    """results.json, or (for an interrupted bench) a summary of the finished runs NAME-seedS/ found there."""
    path = bench / "results.json"
    if path.is_file():
        return json.loads(path.read_text())
    from treegrpo.bench import summarise

    runs: dict[str, list[Path]] = {}
    for run in sorted(bench.glob("*-seed*")):
        if (run / "summary.json").is_file():
            runs.setdefault(run.name.rsplit("-seed", 1)[0], []).append(run)
    if not runs:
        raise FileNotFoundError(f"{str(bench)!r} holds neither results.json nor finished runs NAME-seedS/")
    return summarise(runs)


def write_bench_report(bench: str | Path, out: str | Path | None = None) -> Path:
    """Write the benchmark page (default BENCH_DIR/report.html) and return its path."""
    from treegrpo.bench import format_table

    bench = Path(bench)
    results = load_bench(bench)
    facts = [str(bench.resolve())]
    if "seeds" in results:
        facts.append(f"training seeds {', '.join(map(str, results['seeds']))}")
    if results.get("common_overrides"):
        facts.append("every run: " + " ".join(results["common_overrides"]))
    body = [f"<p class='note'>{escape('; '.join(facts))}</p>",
            "<h2 id='curves'>Held-out reward over training</h2>", f'<div class="plot" id="bench-curves">{bench_curves_svg(results)}</div>',
            "<h2 id='pareto'>Final reward vs cost per iteration</h2>", f'<div class="plot" id="pareto-plot">{pareto_svg(results)}</div>',
            "<h2 id='table'>Results</h2>", f'<div id="results-table">{md_table_html(format_table(results))}</div>']
    path = Path(out) if out else bench / "report.html"
    path.write_text(page(f"treegrpo bench: {bench.name}", "\n".join(body)))
    return path


def write_report(directory: str | Path, out: str | Path | None = None) -> Path:
    """A run directory (metrics.jsonl) or a benchmark directory (results.json or NAME-seedS/ runs)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{str(directory)!r} is not a directory (give a run or a bench directory)")
    if (directory / "metrics.jsonl").is_file():
        return write_run_report(directory, out)
    if (directory / "results.json").is_file() or any(directory.glob("*-seed*/metrics.jsonl")):
        return write_bench_report(directory, out)
    raise FileNotFoundError(f"{str(directory)!r} is neither a run directory (metrics.jsonl) nor a bench directory (results.json)")
