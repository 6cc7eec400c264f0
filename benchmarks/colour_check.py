"""A second opinion on `treegrpo sample` images of the compositional world, independent of the reward.

    .venv/bin/python benchmarks/colour_check.py DIR [DIR ...]

The training reward's detector (`treegrpo.rewards.compose`) fits shape templates to palette-blended
pixels. This check shares none of its code and ignores shapes: a pixel belongs to a colour when it
lies within 0.25 (RGB distance) of that palette colour and farther than 0.25 from the gray
background; 4-connected regions of one colour of at least 6 pixels are objects. Per template:
single: exactly one object, of the named colour; two: the named colours' objects are all there is
(one of each, two when both share a colour); count: exactly n objects, all of the named colour;
position: one object of each named colour (two of one when they share it) and the subject's
centroid past the other's by more than 2 px on the relation's axis. Blind by design to what only
shapes tell: swapped colours (attribute binding), and which of two same-coloured objects is the
subject (either may be). Prints the share of images
passing, per template and as the mean of the templates, for each DIR (its index.jsonl).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from treegrpo.worlds.compose import BACKGROUND, COLOURS, TEMPLATES, parse_prompt, relation_holds_between

NEAR = 0.25
MIN_PIXELS = 6
MARGIN = 2.0  # px between centroids on the relation's axis (the world's relation, GenEval's margin)


def objects(image: np.ndarray) -> list[tuple[str, float, float]]:
    """(colour, centroid x, centroid y) of each region of one palette colour (image [H, W, 3] in [0, 1])."""
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names])
    dist = np.linalg.norm(image[:, :, None, :] - palette[None, None], axis=-1)  # [H, W, C]
    near_bg = np.linalg.norm(image - np.array(BACKGROUND), axis=-1) < NEAR
    label = np.where((dist.min(-1) < NEAR) & ~near_bg, dist.argmin(-1), -1)
    seen = np.zeros(label.shape, dtype=bool)
    h, w = label.shape
    found = []
    for y in range(h):
        for x in range(w):
            if label[y, x] < 0 or seen[y, x]:
                continue
            stack, pixels, c = [(y, x)], [], label[y, x]
            seen[y, x] = True
            while stack:
                cy, cx = stack.pop()
                pixels.append((cy, cx))
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and label[ny, nx] == c:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
            if len(pixels) >= MIN_PIXELS:
                ys, xs = np.array(pixels).T + 0.5
                found.append((names[c], float(xs.mean()), float(ys.mean())))
    return found


def passes(prompt: str, found: list[tuple[str, float, float]]) -> bool:
    spec = parse_prompt(prompt)
    want = Counter(o.colour for o in spec.objects)
    if Counter(c for c, _, _ in found) != want:
        return False
    if spec.template != "position":
        return True
    a, b = spec.objects
    if a.colour == b.colour:  # same colour: either object may be the subject
        (_, x1, y1), (_, x2, y2) = found
        first, second = (x1, y1), (x2, y2)
        return any(relation_holds_between(p, q, spec.relation, MARGIN) for p, q in ((first, second), (second, first)))
    pa = next((x, y) for c, x, y in found if c == a.colour)
    pb = next((x, y) for c, x, y in found if c == b.colour)
    return relation_holds_between(pa, pb, spec.relation, MARGIN)


def check(folder: Path) -> dict[str, float]:
    by_template: dict[str, list[bool]] = {t: [] for t in TEMPLATES}
    for line in (folder / "index.jsonl").read_text().splitlines():
        row = json.loads(line)
        image = np.asarray(Image.open(folder / row["file"]).convert("RGB"), dtype=np.float64) / 255
        by_template[parse_prompt(row["prompt"]).template].append(passes(row["prompt"], objects(image)))
    out = {t: float(np.mean(v)) for t, v in by_template.items() if v}
    out["mean"] = float(np.mean(list(out.values())))
    out["images"] = float(sum(len(v) for v in by_template.values()))
    return out


def main() -> int:
    for folder in sys.argv[1:]:
        print(folder, json.dumps({k: round(v, 3) for k, v in check(Path(folder)).items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
