"""benchmarks/relation_signal.py's `relation` reward: a position prompt's clean render holds its
relation, the render of the reversed relation does not, and other templates score 1; its
`relation_graded` reward reads the same margins, scaled and clipped."""

import dataclasses
import random

import pytest

from treegrpo.worlds.compose import parse_prompt, render_scenes, sample_scene, split_prompts

from benchmark_loader import load_benchmark

relation_signal = load_benchmark("relation_signal")

REVERSED = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}


def test_the_relation_reward_passes_clean_renders_and_fails_reversed_ones():
    prompts = [s.text for s in split_prompts()["heldout"]]
    position = [p for p in prompts if parse_prompt(p).template == "position"]
    other = [p for p in prompts if parse_prompt(p).template != "position"][:40]
    specs = [parse_prompt(p) for p in position]
    clean = render_scenes([sample_scene(s, random.Random(i)) for i, s in enumerate(specs)])
    reversed_ = render_scenes([sample_scene(dataclasses.replace(s, relation=REVERSED[s.relation]), random.Random(i))
                               for i, s in enumerate(specs)])
    assert relation_signal.relation_holds(clean, position).mean() > 0.97
    assert relation_signal.relation_holds(reversed_, position).mean() < 0.03
    assert relation_signal.relation_following(clean, position) == {"found": 1.0, "holds": 1.0, "reversed": 0.0}
    backwards = relation_signal.relation_following(reversed_, position)
    assert backwards["found"] == 1.0 and backwards["holds"] == 0.0 and backwards["reversed"] == 1.0
    others = render_scenes([sample_scene(parse_prompt(p), random.Random(i)) for i, p in enumerate(other)])
    assert relation_signal.relation_holds(others, other).tolist() == [1.0] * len(other)


def test_the_graded_relation_reward_reads_the_rendered_margin():
    """relation_graded = margin / 12 px clipped to [-1, 1]: the reward's own margins (`relation_margins`)
    scaled, full credit for wide layouts, negative for reversed ones, -1 when an object is missing."""
    prompts = [s.text for s in split_prompts()["heldout"]]
    position = [p for p in prompts if parse_prompt(p).template == "position"]
    specs = [parse_prompt(p) for p in position]
    clean = render_scenes([sample_scene(s, random.Random(i)) for i, s in enumerate(specs)])
    graded = relation_signal.relation_graded(clean, position)
    margins = relation_signal.relation_margins(clean, position)
    expected = [max(-1.0, min(1.0, m / 12.0)) for m in margins]
    assert graded.tolist() == pytest.approx(expected)
    assert float(graded.min()) > 0 and float(graded.max()) == 1.0 and float(graded.min()) < 1.0  # graded, not 0/1
    reversed_ = render_scenes([sample_scene(dataclasses.replace(s, relation=REVERSED[s.relation]), random.Random(i))
                               for i, s in enumerate(specs)])
    assert float(relation_signal.relation_graded(reversed_, position).max()) < 0
    lone = render_scenes([sample_scene(dataclasses.replace(s, objects=s.objects[:1], relation=None), random.Random(0))
                          for s in specs[:4]])
    assert relation_signal.relation_graded(lone, position[:4]).tolist() == [-1.0] * 4
    other = [p for p in prompts if parse_prompt(p).template == "single"][:3]
    singles = render_scenes([sample_scene(parse_prompt(p), random.Random(0)) for p in other])
    assert relation_signal.relation_graded(singles, other).tolist() == [1.0] * 3


def test_the_position_prompt_files_hold_each_split_s_position_prompts_and_only_them(tmp_path):
    relation_signal.write_position_prompts(tmp_path)
    for split in ("train", "heldout"):
        lines = (tmp_path / f"position_{split}.txt").read_text().splitlines()
        expected = [s.text for s in split_prompts()[split] if parse_prompt(s.text).template == "position"]
        assert lines == expected and len(lines) > 100
    train = set((tmp_path / "position_train.txt").read_text().splitlines())
    assert not train & set((tmp_path / "position_heldout.txt").read_text().splitlines())
