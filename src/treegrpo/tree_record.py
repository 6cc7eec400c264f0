"""What the report's tree picture needs from one prompt's trees at one iteration, kept small.

A rollout's `Tree` holds every prompt of the batch and the latents training needs; the picture needs
only the structure of one prompt's trees (parent of every node, level by level), which steps were
stochastic / trained, the advantage of every edge after the backup, and each leaf's rewards and a
thumbnail. A record of a k = 3, w = 3, T = 10 tree with 16 x 16 leaves is a few kilobytes.

On disk: RUN_DIR/trees/iter_NNNNNN.safetensors (tensors) + iter_NNNNNN.json (the rest).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from treegrpo.tree import Tree


@dataclass
class TreeRecord:
    """One prompt's forest (all its roots) at one iteration. Levels 0..T as in `Tree`.

    parent[i]: [N_i] long index into level i - 1 (level 0: empty).
    advantage[i]: [N_i] float32 advantage of the edge into each node (level 0: empty).
    rewards: {name: [L] float32} per leaf (NaN where a reward was not finite).
    thumbnails: [L, 3, h, w] uint8 leaf images, largest side at most the configured thumbnail size.
    branching / stochastic / trained: per step, from the iteration's `TreeShape`.
    prune_level / kept / probe_rewards: value-guided pruning (else None / empty): kept [N_prune_level]
    bool over this prompt's nodes of that level, probe_rewards {name: [N_prune_level]} the probe's
    scores of every node there (pruned ones have no leaf: their probe is all they have).
    """

    iteration: int
    prompt: str
    branching: list[int]
    stochastic: list[bool]
    trained: list[bool]
    parent: list[torch.Tensor]
    advantage: list[torch.Tensor]
    rewards: dict[str, torch.Tensor]
    thumbnails: torch.Tensor
    weights: dict[str, float] = field(default_factory=dict)
    prune_level: int | None = None
    kept: torch.Tensor | None = None
    probe_rewards: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        """Rows of the picture: one per leaf, plus one per pruned node (it ends where it was pruned)."""
        return self.num_leaves + self.num_pruned

    @property
    def num_pruned(self) -> int:
        return 0 if self.kept is None else int((~self.kept).sum())

    def probe_reward(self) -> torch.Tensor | None:
        """[N_prune_level] the weighted training reward of each probe, or None without pruning."""
        if not self.probe_rewards:
            return None
        names = [n for n in self.weights if n in self.probe_rewards] or list(self.probe_rewards)
        weights = self.weights or {n: 1.0 for n in names}
        return sum(weights[n] * self.probe_rewards[n] for n in names)  # type: ignore[return-value]

    @property
    def num_steps(self) -> int:
        return len(self.branching)

    @property
    def num_leaves(self) -> int:
        return int(self.parent[-1].shape[0])

    @property
    def num_edges(self) -> int:
        """Every parent-child link, ODE links included: sum of N_i over levels 1..T."""
        return sum(int(p.shape[0]) for p in self.parent[1:])

    def leaf_reward(self) -> torch.Tensor:
        """[L] the weighted training reward of each leaf (the single reward if there is one)."""
        names = [n for n in self.weights if n in self.rewards] or list(self.rewards)
        weights = self.weights or {n: 1.0 for n in names}
        return sum(weights[n] * self.rewards[n] for n in names)  # type: ignore[return-value]

    # ------------------------------------------------------------------ files
    def save(self, directory: str | Path) -> Path:
        """Write iter_NNNNNN.safetensors and .json into `directory`; returns the .json path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        stem = directory / f"iter_{self.iteration:06d}"
        tensors = {"thumbnails": self.thumbnails.contiguous()}
        for i in range(1, self.num_steps + 1):
            tensors[f"parent_{i}"] = self.parent[i].contiguous()
            tensors[f"advantage_{i}"] = self.advantage[i].float().contiguous()
        for name, values in self.rewards.items():
            tensors[f"reward_{name}"] = values.float().contiguous()
        if self.kept is not None:
            tensors["kept"] = self.kept.to(torch.uint8).contiguous()
        for name, values in self.probe_rewards.items():
            tensors[f"probe_{name}"] = values.float().contiguous()
        save_file(tensors, str(stem) + ".safetensors")
        meta = {"iteration": self.iteration, "prompt": self.prompt, "branching": self.branching,
                "stochastic": self.stochastic, "trained": self.trained, "rewards": list(self.rewards),
                "weights": self.weights, "num_leaves": self.num_leaves, "num_edges": self.num_edges,
                "prune_level": self.prune_level, "probe_rewards": list(self.probe_rewards)}
        path = Path(str(stem) + ".json")
        path.write_text(json.dumps(meta) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> TreeRecord:
        """Read a record from its .json (or .safetensors) path."""
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        tensors = load_file(str(path.with_suffix(".safetensors")))
        steps = len(meta["branching"])
        empty = torch.empty(0)
        return cls(meta["iteration"], meta["prompt"], meta["branching"], meta["stochastic"], meta["trained"],
                   [empty.long()] + [tensors[f"parent_{i}"] for i in range(1, steps + 1)],
                   [empty.float()] + [tensors[f"advantage_{i}"] for i in range(1, steps + 1)],
                   {n: tensors[f"reward_{n}"] for n in meta["rewards"]}, tensors["thumbnails"], meta["weights"],
                   meta.get("prune_level"), tensors["kept"].bool() if "kept" in tensors else None,
                   {n: tensors[f"probe_{n}"] for n in meta.get("probe_rewards", [])})


def list_records(run_dir: str | Path) -> list[Path]:
    """The .json paths of a run's tree records, by iteration."""
    return sorted((Path(run_dir) / "trees").glob("iter_*.json"))


def thumbnails(images: torch.Tensor, size: int) -> torch.Tensor:
    """[L, 3, H, W] floats in [0, 1] -> [L, 3, h, w] uint8, shrunk (area average) so max(h, w) <= size.
    Small images are kept as they are: the page scales them up without blurring."""
    h, w = images.shape[-2:]
    if max(h, w) > size:
        scale = size / max(h, w)
        images = F.interpolate(images.float(), size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def record_tree(tree: Tree, edge_advantages: list[torch.Tensor | None], images: torch.Tensor,
                rewards: Mapping[str, torch.Tensor], prompts: list[str], iteration: int,
                weights: Mapping[str, float] | None = None, prompt_index: int = 0,
                thumbnail_size: int = 48, probe_rewards: Mapping[str, torch.Tensor] | None = None) -> TreeRecord:
    """Cut prompt `prompt_index`'s trees out of a rollout.

    edge_advantages: per level [N_i] (from `treegrpo.advantages.tree_advantages`; None entries,
    e.g. level 0, become NaN); images: [N_T, 3, H, W] decoded leaves of the whole batch;
    rewards: {name: [N_T]}; probe_rewards: {name: [N_prune_level]} the probe scores of a pruned tree.
    """
    if not 0 <= prompt_index < tree.num_prompts:
        raise ValueError(f"prompt_index {prompt_index} out of range: the rollout has {tree.num_prompts} prompts")
    parents: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)]
    advantages: list[torch.Tensor] = [torch.empty(0)]
    keep_prev = torch.nonzero(tree.prompt[0] == prompt_index).squeeze(1)
    for level in range(1, tree.num_steps + 1):
        keep = torch.nonzero(tree.prompt[level] == prompt_index).squeeze(1)
        # Renumber parents inside the kept subset of the previous level.
        renumber = torch.full((tree.prompt[level - 1].shape[0],), -1, dtype=torch.long)
        renumber[keep_prev] = torch.arange(keep_prev.shape[0])
        parents.append(renumber[tree.parent[level][keep]])
        adv = edge_advantages[level]
        advantages.append(torch.full((keep.shape[0],), float("nan")) if adv is None else adv[keep].float().cpu())
        keep_prev = keep
    leaves = keep_prev
    shape = tree.shape
    kept, probes = None, {}
    if tree.kept is not None and tree.prune_level is not None:
        rows = torch.nonzero(tree.prompt[tree.prune_level] == prompt_index).squeeze(1)
        kept = tree.kept[rows].clone()
        probes = {n: r[rows].float().cpu() for n, r in (probe_rewards or {}).items()}
    return TreeRecord(iteration, prompts[prompt_index], list(shape.branching), list(shape.stochastic),
                      list(shape.trained), parents, advantages,
                      {n: r[leaves].float().cpu() for n, r in rewards.items()},
                      thumbnails(images[leaves].cpu(), thumbnail_size), dict(weights or {}),
                      tree.prune_level, kept, probes)
