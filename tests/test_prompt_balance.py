"""Template-balanced training prompts: the compositional world's split is 83% position prompts, so
`train.prompt_balance` (auto by default) draws the four templates equally often."""

from collections import Counter

import pytest
import torch

from treegrpo.config import ConfigError, load_config
from treegrpo.prompts import draw_prompts, load_prompts, prompt_groups
from treegrpo.worlds.compose import parse_prompt


def templates_drawn(balance: str, n: int = 16, iterations: int = 50) -> Counter:
    pool = load_prompts("train")
    groups = prompt_groups(pool, balance)
    g = torch.Generator().manual_seed(0)
    return Counter(parse_prompt(p).template for _ in range(iterations) for p in draw_prompts(pool, n, g, groups))


def test_training_split_is_dominated_by_position_prompts():
    counts = Counter(parse_prompt(p).template for p in load_prompts("train"))
    assert counts["position"] / sum(counts.values()) > 0.8 and counts["single"] == 12


def test_balanced_draws_give_each_template_a_quarter():
    counts = templates_drawn("auto")
    assert set(counts.values()) == {200}  # 16 per iteration, 4 per template, for 50 iterations
    uniform = templates_drawn("none")
    assert uniform["position"] > 600 and uniform["single"] < 20


def test_balanced_draws_cycle_a_small_template_without_repeats_within_a_pass():
    pool = ["a red circle", "a blue square", "two red circles", *[f"a red circle above a {c} square" for c in
                                                                  ("blue", "green", "cyan", "yellow", "magenta")]]
    groups = prompt_groups(pool, "template")
    picks = draw_prompts(pool, 9, torch.Generator().manual_seed(1), groups)
    by_template = Counter(parse_prompt(p).template for p in picks)
    assert by_template == {"single": 3, "count": 3, "position": 3}
    singles = [p for p in picks if parse_prompt(p).template == "single"]
    assert sorted(set(singles)) == ["a blue square", "a red circle"]  # both used before either repeats
    positions = [p for p in picks if parse_prompt(p).template == "position"]
    assert len(set(positions)) == 3


def test_remainder_goes_to_random_templates_and_draws_are_reproducible():
    pool = load_prompts("train")
    groups = prompt_groups(pool, "auto")
    a = draw_prompts(pool, 6, torch.Generator().manual_seed(3), groups)
    b = draw_prompts(pool, 6, torch.Generator().manual_seed(3), groups)
    assert a == b
    counts = Counter(parse_prompt(p).template for p in a)
    assert sorted(counts.values()) == [1, 1, 2, 2]


def test_other_prompts_fall_back_to_uniform_or_are_refused():
    pool = ["a photo of a cat", "a red circle"]
    assert prompt_groups(pool, "auto") is None
    assert prompt_groups(load_prompts("train"), "none") is None
    with pytest.raises(ValueError, match="not a prompt of the compositional world"):
        prompt_groups(pool, "template")
    with pytest.raises(ValueError, match="prompt_balance"):
        prompt_groups(pool, "templates")


def test_config_refuses_an_unknown_balance():
    with pytest.raises(ConfigError, match="train.prompt_balance must be auto, template or none"):
        load_config("configs/compose_treegrpo.yaml", ["train.prompt_balance=even"])
