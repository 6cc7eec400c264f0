"""benchmarks/relation_signal.py's `relation` reward: a position prompt's clean render holds its
relation, the render of the reversed relation does not, and other templates score 1."""

import dataclasses
import random

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


def test_the_position_prompt_files_hold_each_split_s_position_prompts_and_only_them(tmp_path):
    relation_signal.write_position_prompts(tmp_path)
    for split in ("train", "heldout"):
        lines = (tmp_path / f"position_{split}.txt").read_text().splitlines()
        expected = [s.text for s in split_prompts()[split] if parse_prompt(s.text).template == "position"]
        assert lines == expected and len(lines) > 100
    train = set((tmp_path / "position_train.txt").read_text().splitlines())
    assert not train & set((tmp_path / "position_heldout.txt").read_text().splitlines())
