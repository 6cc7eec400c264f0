"""Does a rollout's tree carry the relation signal, and which objective learns from it?

Four uses (docs/benchmarks.md sections 11 and 18):

    # the position prompts of the training and held-out splits, one per line, for train.prompts and
    # eval.prompts below (OUT/position_train.txt, OUT/position_heldout.txt)
    .venv/bin/python benchmarks/relation_signal.py prompts OUT

    # within-tree vs total variance of the relation verdict on 16 position training prompts, one
    # tree each (k = 3, w = 3, the paper's), branching at the given window starts
    .venv/bin/python benchmarks/relation_signal.py variance 0 4

    # does a pipeline follow the relation words? ODE samples of 64 training position prompts x 8 seeds:
    # the share where both named objects are found, and among those the share where the named
    # relation holds by more than 2 px and where its reverse does (chance: about equal)
    .venv/bin/python benchmarks/relation_signal.py follows src/treegrpo/assets/compose_sd3

    # `treegrpo train ...` with the reward `relation` registered: 1 when a position prompt's two named
    # objects are found and the relation holds by more than 2 px (the strict reward's relation test),
    # 0 when not; every other prompt scores 1. Also `relation_graded`: the margin (px) the named way
    # over 12 px, clipped to [-1, 1] (-1 when an object is missing)
    .venv/bin/python benchmarks/relation_signal.py train configs/compose_treegrpo.yaml \
        "reward.weights={relation: 1.0}" ...
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from treegrpo.config import load_config
from treegrpo.evaluation import decode_chunked
from treegrpo.prompts import load_prompts
from treegrpo.rewards.base import register_reward
from treegrpo.rewards.compose import RELATION_MIN, detect, match_objects, relation_margin
from treegrpo.rollout import rollout
from treegrpo.worlds.compose import parse_prompt


def relation_margins(images: torch.Tensor, prompts: list[str]) -> list[float | None]:
    """Per position prompt's image: how far (px) its first named object lies the named way from the
    second (negative: the reverse way), or None when either is not found; the strict reward's
    matching (`match_objects`) and margin."""
    out: list[float | None] = []
    for prompt, dets in zip(prompts, detect(images)):
        spec = parse_prompt(prompt)
        (a, _), (b, _) = match_objects(spec, dets)
        out.append(None if a is None or b is None else relation_margin(a, b, spec.relation))
    return out


def _score_position_prompts(images: torch.Tensor, prompts: list[str],
                            score: Callable[[float | None], float]) -> torch.Tensor:
    """[N] score(margin) for each position prompt's image (`relation_margins`), 1.0 for the others."""
    position = [i for i, p in enumerate(prompts) if parse_prompt(p).template == "position"]
    out = torch.ones(len(prompts))
    margins = relation_margins(images[position], [prompts[i] for i in position]) if position else []
    for i, m in zip(position, margins):
        out[i] = score(m)
    return out


def relation_holds(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """[N] 1.0 where a position prompt's relation holds between its matched objects (others: 1.0)."""
    return _score_position_prompts(images, prompts, lambda m: float(m is not None and m > RELATION_MIN))


@register_reward("relation")
class Relation:
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return relation_holds(images, prompts)


GRADED_SPAN = 12.0  # px of margin for full credit: the margin at which pretraining taught the words (section 18)


def relation_graded(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """[N] a position prompt's relation margin / GRADED_SPAN clipped to [-1, 1] (-1 when either named
    object is not found); every other prompt scores 1. Rewards a clear layout over a barely held one."""
    return _score_position_prompts(images, prompts,
                                   lambda m: -1.0 if m is None else max(-1.0, min(1.0, m / GRADED_SPAN)))


@register_reward("relation_graded")
class RelationGraded:
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return relation_graded(images, prompts)


def relation_following(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Over position prompts' images: the share with both named objects found ("found"), and among
    those the shares where the named relation holds by more than RELATION_MIN px ("holds") and where
    its reverse does ("reversed")."""
    m = torch.tensor([x for x in relation_margins(images, prompts) if x is not None])
    return {"found": len(m) / len(prompts), "holds": float((m > RELATION_MIN).float().mean()),
            "reversed": float((m < -RELATION_MIN).float().mean())}


def follows(pipeline: str, num_prompts: int = 64, num_seeds: int = 8) -> None:
    from treegrpo.evaluation import ode_sample
    from treegrpo.policies.loading import load_policy

    torch.set_num_threads(1)
    pool = [p for p in load_prompts("train") if parse_prompt(p).template == "position"]
    prompts = [pool[i] for i in torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:num_prompts]]
    images = ode_sample(load_policy(pipeline), prompts, list(range(num_seeds)), 10)
    r = relation_following(images, [p for p in prompts for _ in range(num_seeds)])
    print(f"{pipeline}: both objects found {r['found']:.3f}; relation holds {r['holds']:.3f}, "
          f"reversed {r['reversed']:.3f}")


def variance(starts: list[int], num_prompts: int = 16) -> None:
    from treegrpo.trainer import Trainer

    torch.set_num_threads(1)
    pool = [p for p in load_prompts("train") if parse_prompt(p).template == "position"]
    prompts = [pool[i] for i in torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[:num_prompts]]
    for start in starts:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config("configs/compose_treegrpo.yaml", [
                "log.trackers=[]", "train.progress=false", "log.tree_every=0", "eval.every=0", "method.k=3",
                "method.window_mode=fixed", f"method.window_start={start}"])
            trainer = Trainer(cfg, Path(tmp) / "run")
            shape = trainer.method.shape_for(0, torch.Generator().manual_seed(0))
            streams = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
            tree = rollout(trainer.policy, prompts, shape, num_steps=trainer.num_steps, sampler=trainer.method.sampler,
                           generator=streams, max_batch=512, cond=trainer.policy.encode_prompts(prompts))
            images = decode_chunked(trainer.policy, tree.leaves, 512)
            holds = relation_holds(images, [prompts[int(i)] for i in tree.leaf_prompt])
            groups = [holds[tree.leaf_prompt == i] for i in range(len(prompts))]
            within = torch.stack([g.var(unbiased=False) for g in groups]).mean()
            mixed = sum(0 < float(g.mean()) < 1 for g in groups)
            print(f"window start {start}: relation holds {holds.mean():.3f}, total variance {holds.var(unbiased=False):.3f}, "
                  f"mean within-tree variance {within:.3f}, trees with both verdicts {mixed}/{len(prompts)}", flush=True)


def write_position_prompts(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "heldout"):
        lines = [p for p in load_prompts(split) if parse_prompt(p).template == "position"]
        (out / f"position_{split}.txt").write_text("\n".join(lines) + "\n")
        print(f"{out / f'position_{split}.txt'}: {len(lines)} prompts")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("prompts", "variance", "follows", "train"):
        sys.exit(__doc__)
    if sys.argv[1] == "prompts":
        if len(sys.argv) != 3:
            sys.exit(__doc__)
        write_position_prompts(Path(sys.argv[2]))
    elif sys.argv[1] == "follows":
        if len(sys.argv) != 3:
            sys.exit(__doc__)
        follows(sys.argv[2])
    elif sys.argv[1] == "variance":
        variance([int(s) for s in sys.argv[2:]] or [0, 4])
    else:
        from treegrpo.cli import main

        sys.exit(main(sys.argv[1:]))
