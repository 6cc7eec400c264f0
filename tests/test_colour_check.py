"""benchmarks/colour_check.py, the reward-independent second opinion: clean renders of every
held-out prompt pass it, renders that break a prompt's count or relation fail it."""

import json
import random
from pathlib import Path

from PIL import Image

from treegrpo.worlds.compose import parse_prompt, render_scenes, sample_scene, split_prompts
from treegrpo.worlds.compose_pipeline import miscaptioned

from benchmark_loader import load_benchmark

colour_check = load_benchmark("colour_check")


def _write(folder: Path, prompts: list[str], specs) -> None:
    folder.mkdir()
    images = render_scenes([sample_scene(s, random.Random(i)) for i, s in enumerate(specs)])
    rows = []
    for i, (p, img) in enumerate(zip(prompts, images)):
        name = f"{i:04d}.png"
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(folder / name)
        rows.append(json.dumps({"file": name, "prompt": p, "seed": 0}))
    (folder / "index.jsonl").write_text("\n".join(rows) + "\n")


def test_clean_renders_pass_and_broken_counts_and_relations_fail(tmp_path):
    prompts = [s.text for s in split_prompts()["heldout"]]
    _write(tmp_path / "clean", prompts, [parse_prompt(p) for p in prompts])
    clean = colour_check.check(tmp_path / "clean")
    assert clean["mean"] == 1.0 and clean["images"] == 300

    # it ignores shapes: it cannot see swapped colours, nor which of two same-coloured objects is the subject
    broken = [p for p in prompts if parse_prompt(p).template == "count"
              or (parse_prompt(p).template == "position" and len({o.colour for o in parse_prompt(p).objects}) == 2)]
    rng = random.Random(0)
    _write(tmp_path / "broken", broken, [miscaptioned(parse_prompt(p), rng) for p in broken])
    wrong = colour_check.check(tmp_path / "broken")
    assert wrong["count"] == 0.0 and wrong["position"] == 0.0
