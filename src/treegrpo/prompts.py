"""Prompt sets: the compositional world's split ("train", "heldout"), the old shapes world's 54
prompts ("shapes"), or a file (.txt one per line, .jsonl with a "prompt" field, .csv with a
"prompt" column)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch


BUILT_IN = ("train", "heldout", "shapes")


def load_prompts(spec: str) -> list[str]:
    """"train" / "heldout": the compositional world's RL training prompts (1,302) / held-out prompts
    (300); "shapes": the 54 shapes-world prompts; otherwise a path to a prompt file."""
    if spec in ("train", "heldout"):
        from treegrpo.worlds.compose import split_prompts

        return [p.text for p in split_prompts()[spec]]
    if spec in ("all", "shapes"):  # "all": the name older configs used for the shapes prompts
        from treegrpo.worlds.shapes import all_prompts

        return [p.text for p in all_prompts()]
    path = Path(spec)
    if path.is_dir():
        raise ValueError(f"prompt file {spec!r} is a directory; pass a .txt, .jsonl or .csv file")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {spec!r} does not exist (or one of the built-in sets: train, heldout, shapes)")
    try:
        return _read_prompts(path, spec)
    except UnicodeDecodeError:
        raise ValueError(f"prompt file {spec!r} is not UTF-8 text") from None


def _read_prompts(path: Path, spec: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{spec}:{n}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{spec}:{n}: each line needs a string field \"prompt\"")
            prompts.append(record["prompt"])
    elif suffix == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "prompt" not in reader.fieldnames:
                raise ValueError(f"{spec}: the CSV needs a header with a 'prompt' column")
            prompts = [row["prompt"] for row in reader]
    else:
        prompts = path.read_text().splitlines()
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError(f"prompt file {spec!r} holds no prompts")
    return prompts


BALANCE = ("auto", "template", "none")


def prompt_groups(prompts: list[str], balance: str) -> list[str] | None:
    """The group of each prompt that training draws evenly from, or None for uniform draws.

    "template": the compositional world's template of each prompt (ValueError if one is not a world
    prompt); "auto": templates when every prompt is a world prompt, else None; "none": None. The
    world's training split is 83% position prompts, while held-out accuracy averages the four
    templates equally: uniform draws would almost never train single-object or counting prompts.
    """
    if balance not in BALANCE:
        raise ValueError(f"train.prompt_balance must be one of {BALANCE}, got {balance!r}")
    if balance == "none":
        return None
    from treegrpo.worlds.compose import parse_prompt

    try:
        return [parse_prompt(p).template for p in prompts]
    except ValueError:
        if balance == "auto":
            return None
        raise


def draw_prompts(pool: list[str], n: int, generator: torch.Generator, groups: list[str] | None = None) -> list[str]:
    """`n` prompts from `pool`, without replacement until the pool (or a group) is used up.

    With `groups` (one label per prompt), every group gets n // G picks and the remainder goes to
    randomly chosen groups, so each group is trained equally often whatever its size. Only
    `generator` (a torch.Generator) is consumed, so a resumed run draws the same prompts.
    """
    def without_replacement(items: list[str], count: int) -> list[str]:
        picks: list[str] = []
        while len(picks) < count:
            order = torch.randperm(len(items), generator=generator).tolist()
            picks.extend(items[i] for i in order[: count - len(picks)])
        return picks

    if not pool:
        raise ValueError("no training prompts")
    if groups is None:
        return without_replacement(pool, n)
    if len(groups) != len(pool):
        raise ValueError(f"{len(groups)} group labels for {len(pool)} prompts")
    names = sorted(set(groups))
    counts = [n // len(names)] * len(names)
    for i in torch.randperm(len(names), generator=generator).tolist()[: n % len(names)]:
        counts[i] += 1
    picks = []
    for name, count in zip(names, counts):
        picks += without_replacement([p for p, g in zip(pool, groups) if g == name], count)
    order = torch.randperm(len(picks), generator=generator).tolist()  # groups mixed across ranks' shards
    return [picks[i] for i in order]
