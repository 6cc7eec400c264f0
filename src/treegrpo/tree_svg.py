"""Draw a `TreeRecord` as an inline SVG: the denoising tree, edges coloured by their advantage.

Layout (left to right = denoising steps): level i sits at x = i columns; leaves are stacked one per
row at the right, each with its thumbnail, reward and advantage; an inner node sits at the mean
height of its children, so the ODE trunk before the window is a horizontal chain, the window fans
out k ways per step, and the ODE tails run straight to the leaves. Trained (SDE window) steps are
shaded. Every edge is one `<line class="edge">` whose colour comes from a diverging scale
(red = negative advantage, grey = 0, blue = positive) symmetric around 0, so a reader sees which
branch decisions the update credited. Written by hand: no library draws this tree.
"""

from __future__ import annotations

import base64
import io
import math
from html import escape

import torch
from PIL import Image

from treegrpo.tree_record import TreeRecord

NEGATIVE = (215, 48, 39)  # red
NEUTRAL = (190, 190, 190)  # grey
POSITIVE = (33, 102, 172)  # blue


def advantage_colour(value: float, vmax: float) -> str:
    """Hex colour of `value` on a red-grey-blue scale over [-vmax, vmax] (linear in RGB, clipped).
    Blue minus red grows monotonically with the value; NaN is drawn neutral."""
    if not math.isfinite(value) or vmax <= 0:
        t = 0.0
    else:
        t = max(-1.0, min(1.0, value / vmax))
    end = POSITIVE if t >= 0 else NEGATIVE
    rgb = [round(n + abs(t) * (e - n)) for n, e in zip(NEUTRAL, end)]
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def png_data_uri(image: torch.Tensor | Image.Image) -> str:
    """A [3, h, w] uint8 tensor or PIL image as a data:image/png;base64 URI."""
    if isinstance(image, torch.Tensor):
        image = Image.fromarray(image.permute(1, 2, 0).numpy())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def layout(record: TreeRecord, row: float, top: float) -> list[torch.Tensor]:
    """y coordinate of every node, per level: leaves one per row, inner nodes at their children's mean.
    A pruned tree gets one row per node of its prune level (pruned nodes end there, kept ones run
    straight on to their leaves)."""
    ys = [torch.empty(0)] * (record.num_steps + 1)
    last = record.num_steps
    if record.kept is not None and record.prune_level is not None:
        last = record.prune_level
        ys[last] = top + row * (torch.arange(record.kept.shape[0], dtype=torch.float64) + 0.5)
        for level in range(last + 1, record.num_steps + 1):  # single-child tails: straight lines
            ys[level] = ys[level - 1][record.parent[level]]
    else:
        ys[-1] = top + row * (torch.arange(record.num_leaves, dtype=torch.float64) + 0.5)
    for level in range(last, 0, -1):
        parent = record.parent[level]
        count = max(int(parent.max()) + 1, 0) if parent.numel() else 0
        total = torch.zeros(count, dtype=torch.float64).index_add_(0, parent, ys[level])
        n = torch.zeros(count, dtype=torch.float64).index_add_(0, parent, torch.ones_like(ys[level]))
        ys[level - 1] = total / n.clamp(min=1)
    return ys


def tree_svg(record: TreeRecord, thumb: int = 40, column: int = 64, reward_name: str | None = None) -> str:
    """The SVG markup (a string) of `record`: one `line.edge` per edge (`record.num_edges`), one
    `image.leaf-thumb` per leaf, `rect.window` per trained step, a colour legend."""
    row = thumb + 8
    top, left = 72.0, 24.0
    steps = record.num_steps
    ys = layout(record, row, top)
    xs = [left + column * i for i in range(steps + 1)]
    finite = [a[torch.isfinite(a)].abs() for a in record.advantage[1:] if a.numel()]
    vmax = max([float(a.max()) for a in finite if a.numel()] + [0.0]) or 1.0
    height = top + row * record.num_rows + 64
    text_x = xs[-1] + 12 + thumb + 8
    width = text_x + 170
    uid = f"t{record.iteration}"
    parts = [f'<svg class="tree" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" data-edges="{record.num_edges}" data-leaves="{record.num_leaves}" '
             f'font-family="sans-serif" font-size="11">']
    parts.append(f'<text x="{left}" y="16" font-size="13" font-weight="bold">iteration {record.iteration}: '
                 f'&#8220;{escape(record.prompt)}&#8221;</text>')
    # Shaded columns for the trained steps (the SDE window), labels for every step.
    for i in range(steps):
        if record.trained[i]:
            parts.append(f'<rect class="window" x="{xs[i]:.1f}" y="{top - 22}" width="{column}" '
                         f'height="{row * record.num_rows + 22}" fill="#fff3c4"/>')
        kind = "SDE" if record.stochastic[i] else "ODE"
        label = f"{kind}" + (f" x{record.branching[i]}" if record.branching[i] > 1 else "")
        parts.append(f'<text x="{xs[i] + column / 2:.1f}" y="{top - 8}" text-anchor="middle" fill="#555">{i}</text>')
        parts.append(f'<text x="{xs[i] + column / 2:.1f}" y="{top + row * record.num_rows + 14}" '
                     f'text-anchor="middle" fill="#555" font-size="9">{label}</text>')
    parts.append(f'<text x="{left}" y="{top - 34}" fill="#555">step (shaded: trained SDE window)</text>')
    # Edges: parent (level i - 1) -> child (level i); width grows with |advantage|.
    for level in range(1, steps + 1):
        parent, adv = record.parent[level], record.advantage[level]
        for n in range(parent.shape[0]):
            a = float(adv[n])
            p = int(parent[n])
            colour = advantage_colour(a, vmax)
            stroke = 1.2 + 2.3 * (min(abs(a) / vmax, 1.0) if math.isfinite(a) else 0.0)
            parts.append(f'<line class="edge" x1="{xs[level - 1]:.1f}" y1="{float(ys[level - 1][p]):.1f}" '
                         f'x2="{xs[level]:.1f}" y2="{float(ys[level][n]):.1f}" stroke="{colour}" '
                         f'stroke-width="{stroke:.2f}" stroke-linecap="round" data-step="{level - 1}" data-adv="{a:.6g}">'
                         f'<title>step {level - 1}, advantage {a:+.3f}</title></line>')
    # Branch points and the roots as dots.
    for level in range(steps):
        if level == 0 or record.branching[level] > 1:
            for y in ys[level].tolist():
                parts.append(f'<circle class="node" cx="{xs[level]:.1f}" cy="{y:.1f}" r="2.5" fill="#333"/>')
    # Leaves: thumbnail, reward, leaf advantage.
    reward = record.rewards[reward_name] if reward_name else record.leaf_reward()
    name = reward_name or ("reward" if len(record.rewards) != 1 else next(iter(record.rewards)))
    leaf_adv = record.advantage[steps]
    for j in range(record.num_leaves):
        y = float(ys[steps][j])
        parts.append(f'<image class="leaf-thumb" x="{xs[-1] + 12:.1f}" y="{y - thumb / 2:.1f}" width="{thumb}" '
                     f'height="{thumb}" style="image-rendering:pixelated" href="{png_data_uri(record.thumbnails[j])}"/>')
        r, a = float(reward[j]), float(leaf_adv[j])
        parts.append(f'<text class="leaf-label" x="{text_x:.1f}" y="{y + 4:.1f}">{escape(name)} {r:.3f}  '
                     f'<tspan fill="{advantage_colour(a, vmax)}" font-weight="bold">A {a:+.2f}</tspan></text>')
    # Pruned nodes (value-guided pruning): a cross where their tail would start, with the probe's value.
    probe = record.probe_reward()
    if record.kept is not None and record.prune_level is not None:
        level = record.prune_level
        for n in torch.nonzero(~record.kept).squeeze(1).tolist():
            x, y = xs[level], float(ys[level][n])
            a = float(record.advantage[level][n]) if level > 0 else float("nan")
            value = f"probe {float(probe[n]):.3f}  " if probe is not None else ""
            parts.append(f'<g class="pruned" data-node="{n}"><path d="M{x - 4:.1f},{y - 4:.1f}L{x + 4:.1f},{y + 4:.1f}'
                         f'M{x - 4:.1f},{y + 4:.1f}L{x + 4:.1f},{y - 4:.1f}" stroke="#888" stroke-width="1.5"/>'
                         f'<text x="{x + 8:.1f}" y="{y + 4:.1f}" fill="#777">pruned: {value}'
                         f'<tspan fill="{advantage_colour(a, vmax)}" font-weight="bold">A {a:+.2f}</tspan></text></g>')
    # Legend: the colour scale from -vmax to +vmax.
    ly = height - 30
    stops = "".join(f'<stop offset="{s / 10:.1f}" stop-color="{advantage_colour((s / 5 - 1) * vmax, vmax)}"/>' for s in range(11))
    parts.append(f'<defs><linearGradient id="{uid}-scale">{stops}</linearGradient></defs>')
    parts.append(f'<rect class="legend" x="{left}" y="{ly}" width="200" height="10" fill="url(#{uid}-scale)"/>')
    for frac, value in ((0.0, -vmax), (0.5, 0.0), (1.0, vmax)):
        parts.append(f'<text x="{left + 200 * frac:.1f}" y="{ly + 24}" text-anchor="middle">{value:+.2f}</text>')
    parts.append(f'<text x="{left + 212}" y="{ly + 9}">edge advantage (after the backup)</text>')
    parts.append("</svg>")
    return "\n".join(parts)
