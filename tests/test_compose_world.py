"""The compositional world: prompts and split, scene sampling, and the rule-based rewards.

The rewards are checked on hand-made scenes for every template, and against an oracle that reads
the verdict off the scene description (not the pixels) for many random scenes and prompts.
"""

import random
from collections import Counter

import pytest
import torch

from treegrpo.rewards import build_reward
from treegrpo.rewards.compose import constraints, detect, shape_credit, soft_scores, verdicts
from treegrpo.worlds.compose import (HELDOUT_SIZES, IMAGE_SIZE, MIN_GAP, RELATION_MARGIN, Placed, all_specs,
                                     parse_prompt, render_prompts, render_scenes, sample_scene, split_prompts)


def scene(*objects):
    return [Placed(*o) for o in objects]


def verdict(objects, prompt):
    partial, strict = verdicts(render_scenes([scene(*objects)]), [prompt])
    return float(partial[0]), float(strict[0])


# ------------------------------------------------------------------------------------ prompts
def test_prompt_counts_and_split():
    counts = Counter(s.template for s in all_specs())
    assert counts == {"single": 18, "two": 306, "count": 54, "position": 1224}
    split = split_prompts()
    train, held = {s.text for s in split["train"]}, {s.text for s in split["heldout"]}
    assert not train & held and len(train) + len(held) == 1602
    assert Counter(s.template for s in split["heldout"]) == HELDOUT_SIZES
    assert 200 <= len(held) <= 400


def test_split_is_fixed():
    split_prompts.cache_clear()
    first = [s.text for s in split_prompts()["heldout"]]
    split_prompts.cache_clear()
    assert [s.text for s in split_prompts()["heldout"]] == first
    assert first[:2] == ["a cyan triangle", "a magenta triangle"]  # the documented split, pinned


def test_every_prompt_parses_back():
    for spec in all_specs():
        assert parse_prompt(spec.text) == spec
    assert parse_prompt("three red squares").objects[0].shape == "square"
    assert parse_prompt("A Blue Circle  above a red square").relation == "above"


@pytest.mark.parametrize("bad", ["a purple circle", "a red hexagon", "five red circles", "a red circle near a blue square",
                                 "a red circle and a red circle", "red circle"])
def test_bad_prompts_are_refused(bad):
    with pytest.raises(ValueError, match="compositional world|must differ"):
        parse_prompt(bad)


def test_sampled_scenes_keep_the_rules():
    rng = random.Random(0)
    for spec in random.Random(1).sample(all_specs(), 300):
        placed = sample_scene(spec, rng)
        assert [(p.colour, p.shape) for p in placed] == [(o.colour, o.shape) for o in spec.objects]
        for i, p in enumerate(placed):
            assert 3.5 <= p.r <= 5.5 and p.r <= p.cx <= IMAGE_SIZE - p.r and p.r <= p.cy <= IMAGE_SIZE - p.r
            for q in placed[i + 1:]:
                assert ((p.cx - q.cx) ** 2 + (p.cy - q.cy) ** 2) ** 0.5 >= p.r + q.r + MIN_GAP
        if spec.relation:
            a, b = placed
            gap = {"to the left of": b.cx - a.cx, "to the right of": a.cx - b.cx, "above": b.cy - a.cy,
                   "below": a.cy - b.cy}[spec.relation]
            assert gap >= RELATION_MARGIN


# ------------------------------------------------------------------------------------ hand-made scenes
RED_CIRCLE = ("red", "circle", 8.0, 16.0, 4.5)
BLUE_SQUARE = ("blue", "square", 24.0, 16.0, 4.5)
GREEN_TRIANGLE = ("green", "triangle", 16.0, 6.0, 4.5)


def test_single():
    assert verdict([RED_CIRCLE], "a red circle") == (1.0, 1.0)
    assert verdict([], "a red circle") == (0.0, 0.0)  # nothing drawn: no constraint holds
    assert verdict([("red", "square", 8.0, 16.0, 4.5)], "a red circle") == pytest.approx((2 / 3, 0.0))  # wrong shape
    assert verdict([("blue", "circle", 8.0, 16.0, 4.5)], "a red circle") == pytest.approx((1 / 3, 0.0))  # wrong colour
    assert verdict([RED_CIRCLE, BLUE_SQUARE], "a red circle") == pytest.approx((2 / 3, 0.0))  # an extra object


def test_two_objects():
    assert verdict([RED_CIRCLE, BLUE_SQUARE], "a red circle and a blue square") == (1.0, 1.0)
    assert verdict([BLUE_SQUARE, RED_CIRCLE], "a blue square and a red circle") == (1.0, 1.0)
    assert verdict([RED_CIRCLE], "a red circle and a blue square") == pytest.approx((1 / 3, 0.0))  # one missing
    swapped = [("blue", "circle", 8.0, 16.0, 4.5), ("red", "square", 24.0, 16.0, 4.5)]  # colours swapped
    assert verdict(swapped, "a red circle and a blue square") == pytest.approx(((0.5 + 0.5 + 1) / 3, 0.0))
    assert verdict([RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE], "a red circle and a blue square")[1] == 0.0
    # same colour, different shapes: exact matches are assigned first
    two_reds = [("red", "triangle", 8.0, 16.0, 4.5), ("red", "square", 24.0, 16.0, 4.5)]
    assert verdict(two_reds, "a red square and a red triangle") == (1.0, 1.0)


def test_counting():
    reds = [("red", "circle", 6.0, 6.0, 4.0), ("red", "circle", 26.0, 6.0, 4.0), ("red", "circle", 6.0, 26.0, 4.0)]
    assert verdict(reds, "three red circles") == (1.0, 1.0)
    assert verdict(reds[:2], "three red circles") == pytest.approx(((2 / 3 + 0.0) / 2, 0.0))  # one missing
    assert verdict(reds + [("red", "circle", 26.0, 26.0, 4.0)], "three red circles")[1] == 0.0  # one too many
    wrong = reds[:2] + [("red", "square", 6.0, 26.0, 4.0)]  # three objects, but one is a square
    assert verdict(wrong, "three red circles") == pytest.approx(((2 / 3 + 1.0) / 2, 0.0))
    assert verdict(reds, "two red circles")[1] == 0.0


def test_position_and_its_margin():
    assert verdict([RED_CIRCLE, BLUE_SQUARE], "a red circle to the left of a blue square") == (1.0, 1.0)
    assert verdict([RED_CIRCLE, BLUE_SQUARE], "a blue square to the right of a red circle") == (1.0, 1.0)
    assert verdict([RED_CIRCLE, BLUE_SQUARE], "a red circle to the right of a blue square") == pytest.approx((0.75, 0.0))
    assert verdict([RED_CIRCLE, BLUE_SQUARE], "a red circle above a blue square")[1] == 0.0  # same height
    above = [("red", "circle", 10.0, 8.0, 4.0), ("blue", "square", 12.0, 22.0, 4.0)]
    assert verdict(above, "a red circle above a blue square") == (1.0, 1.0)
    assert verdict(above, "a blue square below a red circle") == (1.0, 1.0)
    # the relation needs more than 2 px between centres on its axis: 3 px passes, 1 px fails
    near = [("red", "circle", 8.0, 8.0, 4.0), ("blue", "square", 11.0, 22.0, 4.0)]
    assert verdict(near, "a red circle to the left of a blue square")[1] == 1.0
    too_near = [("red", "circle", 8.0, 8.0, 4.0), ("blue", "square", 9.0, 22.0, 4.0)]
    assert verdict(too_near, "a red circle to the left of a blue square") == pytest.approx((0.75, 0.0))


def test_merged_objects_are_one_malformed_object():
    merged = [("red", "circle", 12.0, 16.0, 5.0), ("red", "circle", 19.0, 16.0, 5.0)]  # overlapping: one blob
    dets = detect(render_scenes([scene(*merged)]))[0]
    assert len(dets) == 1 and dets[0].shape is None
    assert verdict(merged, "two red circles")[1] == 0.0
    assert verdict(merged, "a red circle")[1] == 0.0


def test_noise_and_blank_images_fail():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(8, 3, 32, 32, generator=g)
    blank = torch.full((1, 3, 32, 32), 0.5)
    prompts = ["a red circle", "two blue squares", "a cyan triangle and a red square",
               "a red circle above a blue square"] * 2
    assert verdicts(noise, prompts)[1].sum() == 0
    assert verdicts(blank, ["a red circle"])[1].item() == 0.0


def test_registered_rewards_and_shapes_of_output():
    images, _ = render_prompts(["a red circle", "three blue squares"], seed=3)
    partial = build_reward("compose")(images, ["a red circle", "three blue squares"])
    strict = build_reward("compose_strict")(images, ["a red circle", "two blue squares"])
    assert partial.shape == (2,) and partial.tolist() == [1.0, 1.0]
    assert strict.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="B prompts"):
        build_reward("compose")(images, ["a red circle"])


# ------------------------------------------------------------------------------------ the oracle
def _oracle(placed, spec) -> bool:
    """The strict verdict read off the scene description: the multiset of (colour, shape) equals the
    prompt's, and a position prompt's relation holds by more than 2 px."""
    if Counter((p.colour, p.shape) for p in placed) != Counter((o.colour, o.shape) for o in spec.objects):
        return False
    if spec.relation is None:
        return True
    a = next(p for p in placed if (p.colour, p.shape) == (spec.objects[0].colour, spec.objects[0].shape))
    b = next(p for p in placed if (p.colour, p.shape) == (spec.objects[1].colour, spec.objects[1].shape))
    gap = {"to the left of": b.cx - a.cx, "to the right of": a.cx - b.cx, "above": b.cy - a.cy,
           "below": a.cy - b.cy}[spec.relation]
    return gap > 2.0


def test_strict_verdict_agrees_with_the_scene_oracle():
    """Scenes rendered for random prompts, judged against their own prompt and against prompts that
    differ by one edit (colour, shape, count, relation) or at random: detector == oracle."""
    rng = random.Random(5)
    specs = list(all_specs())
    pairs = []
    for _ in range(300):
        spec = rng.choice(specs)
        placed = sample_scene(spec, rng)
        other = rng.choice([s for s in specs if s.template == spec.template])
        pairs.append((placed, spec))
        pairs.append((placed, other))
    images = render_scenes([p for p, _ in pairs])
    _, strict = verdicts(images, [s.text for _, s in pairs])
    expected = torch.tensor([float(_oracle(p, s)) for p, s in pairs])
    assert expected.sum() >= 300  # every scene passes its own prompt, and a few others match by chance
    assert torch.equal(strict, expected)


def test_constraint_scores_lie_in_unit_interval():
    rng = random.Random(2)
    for spec in rng.sample(all_specs(), 50):
        dets = detect(render_scenes([sample_scene(rng.choice(all_specs()), rng)]))[0]
        assert all(0.0 <= c <= 1.0 for c in constraints(spec, dets))


# ------------------------------------------------------------------------------------ continuous credit
def soft(objects, prompt):
    return float(soft_scores(render_scenes([scene(*objects)]), [prompt])[0])


def test_soft_credit_is_full_on_clean_scenes_and_tracks_the_verdicts():
    for objects, prompt in [([RED_CIRCLE], "a red circle"), ([RED_CIRCLE, BLUE_SQUARE], "a red circle and a blue square"),
                            ([RED_CIRCLE, BLUE_SQUARE], "a red circle to the left of a blue square")]:
        assert soft(objects, prompt) == pytest.approx(1.0)
    assert soft([("red", "square", 8.0, 16.0, 4.5)], "a red circle") == pytest.approx(2 / 3, abs=0.02)  # wrong shape
    assert soft([], "a red circle") == 0.0
    assert soft([RED_CIRCLE, BLUE_SQUARE], "a red circle to the right of a blue square") == pytest.approx(0.75)
    merged = [("red", "circle", 12.0, 16.0, 5.0), ("red", "circle", 19.0, 16.0, 5.0)]
    assert soft(merged, "a red circle") == pytest.approx(2 / 3)  # colour and count right, no shape credit


def test_soft_relation_credit_grows_with_the_margin():
    credits = [soft([("red", "circle", 8.0, 8.0, 4.0), ("blue", "square", 8.0 + dx, 22.0, 4.0)],
                    "a red circle to the left of a blue square") for dx in (-2.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0)]
    assert credits == sorted(credits) and credits[0] == pytest.approx(0.75) and credits[-1] == pytest.approx(1.0)
    assert 0.75 < credits[3] < 1.0  # partial credit inside the margin, where the verdict is still 0


def test_soft_shape_credit_falls_as_a_shape_blurs_towards_another():
    """A circle blended step by step into a square of the same centre: the circle's credit falls,
    the square's rises, and both lie in [0, 1]."""
    circle = render_scenes([scene(("red", "circle", 16.0, 16.0, 5.0))])
    square = render_scenes([scene(("red", "square", 16.0, 16.0, 5.0))])
    as_circle, as_square = [], []
    for t in torch.linspace(0, 1, 6):
        det = detect(circle * (1 - t) + square * t)[0][0]
        as_circle.append(shape_credit(det, "circle"))
        as_square.append(shape_credit(det, "square"))
    assert as_circle[0] == 1.0 and as_square[-1] == 1.0 and as_circle[-1] < 0.2 and as_square[0] < 0.2
    assert all(a >= b - 1e-6 for a, b in zip(as_circle, as_circle[1:]))
    assert all(a <= b + 1e-6 for a, b in zip(as_square, as_square[1:]))
    assert 0 < as_circle[2] < 1 or 0 < as_circle[3] < 1  # a continuous passage, not a switch


def test_soft_scores_lie_in_unit_interval_and_are_registered():
    rng = random.Random(3)
    specs = rng.sample(all_specs(), 40)
    images = render_scenes([sample_scene(rng.choice(all_specs()), rng) for _ in specs])
    prompts = [s.text for s in specs]
    scores = build_reward("compose_soft")(images, prompts)
    assert scores.shape == (40,) and bool(((scores >= 0) & (scores <= 1)).all())
    assert torch.equal(scores, soft_scores(images, prompts))
