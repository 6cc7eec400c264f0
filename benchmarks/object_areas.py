"""Mean area of the objects the compositional reward's detector finds in `treegrpo sample` images.

    .venv/bin/python benchmarks/object_areas.py DIR [DIR ...]

A drift check beside accuracy: RL on a detector's verdict can shrink objects (small objects merge
less), which moves the model off its training renders (radius 3.5-5.5 px, so 16-95 px of area by
shape). Prints, for each DIR (its index.jsonl), the number of objects and their mean and median
area in pixels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from treegrpo.evaluation import load_image_folder
from treegrpo.rewards.compose import detect


def areas(folder: Path) -> list[float]:
    images, _ = load_image_folder(folder)
    return [d.area for found in detect(torch.stack(images)) for d in found]


def main() -> int:
    for folder in sys.argv[1:]:
        a = areas(Path(folder))
        print(folder, json.dumps({"objects": len(a), "mean_area": round(float(np.mean(a)), 1),
                                  "median_area": round(float(np.median(a)), 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
