"""Why a counting prompt's image fails the strict check: objects merged, too few, too many, or a wrong shape.

    .venv/bin/python benchmarks/count_failures.py runs/cc/base runs/cc/kl0 ...

Each argument is a `treegrpo sample` folder (PNGs and index.jsonl); only its counting prompts
("three cyan circles") are read. Each image gets the first verdict that applies, with the
strict reward's detector (`treegrpo.rewards.compose.detect`): "ok" (the strict check passes),
"merged" (an object of the named colour too large to be one shape: touching objects drawn as one
blob), "too few" / "too many" (objects of the named colour, against the number named), "wrong shape"
(the right number of that colour, not all of the named shape), "other objects" (the rest: objects of
another colour). docs/benchmarks.md section 19 uses it to tell what RL fixes (merged blobs) from
what it does not (the number words).
"""

from __future__ import annotations

import collections
import json
import sys

import torch

from treegrpo.evaluation import load_image_folder
from treegrpo.rewards.compose import MAX_AREA, constraints, detect
from treegrpo.worlds.compose import parse_prompt

VERDICTS = ("ok", "merged", "too few", "too many", "wrong shape", "other objects")


def count_verdicts(images: torch.Tensor, prompts: list[str]) -> list[str]:
    """One verdict of VERDICTS per image of a counting prompt (other templates raise ValueError)."""
    out = []
    for prompt, dets in zip(prompts, detect(images)):
        spec = parse_prompt(prompt)
        if spec.template != "count":
            raise ValueError(f"not a counting prompt: {prompt!r}")
        n, obj = len(spec.objects), spec.objects[0]
        same = [d for d in dets if d.colour == obj.colour]
        if all(c == 1.0 for c in constraints(spec, dets)):
            out.append("ok")
        elif any(d.area > MAX_AREA for d in same):
            out.append("merged")
        elif len(same) != n:
            out.append("too few" if len(same) < n else "too many")
        elif any(d.shape != obj.shape for d in same):
            out.append("wrong shape")
        else:
            out.append("other objects")
    return out


def main(folders: list[str]) -> None:
    for folder in folders:
        images, prompts = load_image_folder(folder)
        keep = [i for i, p in enumerate(prompts) if parse_prompt(p).template == "count"]
        if not keep:
            sys.exit(f"{folder}: no counting prompts among its {len(prompts)} images")
        verdicts = count_verdicts(torch.stack([images[i] for i in keep]), [prompts[i] for i in keep])
        tally = collections.Counter(verdicts)
        print(folder, json.dumps({"images": len(keep), **{v: tally[v] for v in VERDICTS}}))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
