"""benchmarks/object_areas.py measures what the renders were drawn with: circles of known radius
come back with area pi r^2, and larger circles read larger."""

import json
import math
import random
from pathlib import Path

from PIL import Image

from treegrpo.worlds.compose import Placed, render_scenes

from benchmark_loader import load_benchmark

object_areas = load_benchmark("object_areas")


def _circles(folder: Path, radius: float, n: int = 6) -> None:
    folder.mkdir()
    rng = random.Random(0)
    scenes = [[Placed("red", "circle", rng.uniform(8, 24), rng.uniform(8, 24), radius)] for _ in range(n)]
    rows = []
    for i, img in enumerate(render_scenes(scenes)):
        name = f"{i:02d}.png"
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(folder / name)
        rows.append(json.dumps({"file": name, "prompt": "a red circle", "seed": i}))
    (folder / "index.jsonl").write_text("\n".join(rows) + "\n")


def test_object_areas_reads_the_rendered_size(tmp_path):
    _circles(tmp_path / "small", 3.5)
    _circles(tmp_path / "large", 5.5)
    small, large = object_areas.areas(tmp_path / "small"), object_areas.areas(tmp_path / "large")
    assert len(small) == len(large) == 6
    for areas, r in ((small, 3.5), (large, 5.5)):
        for a in areas:
            assert abs(a - math.pi * r * r) < 0.1 * math.pi * r * r
    assert min(large) > max(small)
