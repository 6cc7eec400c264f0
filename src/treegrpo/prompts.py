"""Prompt sets: the compositional world's split ("train", "heldout"), the old shapes world's 54
prompts ("shapes"), or a file (.txt one per line, .jsonl with a "prompt" field, .csv with a
"prompt" column)."""

from __future__ import annotations

import csv
import json
from pathlib import Path


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
