"""benchmarks/count_failures.py: clean counting renders are "ok"; a missing, an extra, a merged
or a reshaped object each gets its own verdict."""

import dataclasses
import random

import pytest

from treegrpo.worlds.compose import Placed, parse_prompt, render_scenes, sample_scene

from benchmark_loader import load_benchmark

count_failures = load_benchmark("count_failures")


def test_each_kind_of_counting_failure_gets_its_verdict():
    prompt = "three red squares"
    clean = sample_scene(parse_prompt(prompt), random.Random(0))
    extra = sample_scene(parse_prompt("four red squares"), random.Random(1))
    reshaped = [dataclasses.replace(clean[0], shape="circle"), *clean[1:]]
    # Two touching squares at the image's centre: one blob, too large for one shape.
    merged = [Placed("red", "square", 12.0, 16.0, 5.0), Placed("red", "square", 20.0, 16.0, 5.0),
              Placed("red", "square", 6.0, 5.0, 4.0)]
    scenes = [clean, clean[:2], extra, reshaped, merged]
    verdicts = count_failures.count_verdicts(render_scenes(scenes), [prompt] * len(scenes))
    assert verdicts == ["ok", "too few", "too many", "wrong shape", "merged"]


def test_other_templates_are_refused():
    with pytest.raises(ValueError, match="not a counting prompt"):
        count_failures.count_verdicts(render_scenes([[]]), ["a red square"])
