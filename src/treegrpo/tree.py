"""Tree shapes, window schedules, and the `Tree` container a rollout fills.

Every method is a tree shape plus an advantage rule (DESIGN.md). A `TreeShape` says, per denoising
step, how many children each node gets, whether the step is stochastic (SDE) or deterministic (ODE),
and whether its edges are trained. A Flow-GRPO group is a forest of chains, DanceGRPO a root that
branches G ways at step 0, MixGRPO a root that branches at its window start, and TreeGRPO a root
that branches k ways at every step of a short window.

The `Tree` stores a forest level by level (level i = the states before step i, level T = leaves) as
a struct of arrays: no Python object per node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch


@dataclass(frozen=True)
class TreeShape:
    """Per-step structure of the trees grown for one prompt.

    branching: [T] children per node at step i (1 = a single link).
    stochastic: [T] whether step i is an SDE step (else an ODE step; ODE steps cannot branch).
    trained: [T] whether the edges of step i are trained (only stochastic edges have log-probs).
    roots_per_prompt: independent trees per prompt (Flow-GRPO's G, or TreeGRPO's "two trees").
    Accounting properties are per tree (one root).
    """

    branching: tuple[int, ...]
    stochastic: tuple[bool, ...]
    trained: tuple[bool, ...]
    roots_per_prompt: int = 1

    def __post_init__(self) -> None:
        n = len(self.branching)
        if n == 0 or len(self.stochastic) != n or len(self.trained) != n:
            raise ValueError("branching, stochastic and trained need one entry per step (and at least one step)")
        if self.roots_per_prompt < 1:
            raise ValueError(f"roots_per_prompt must be >= 1, got {self.roots_per_prompt}")
        for i, (b, s, t) in enumerate(zip(self.branching, self.stochastic, self.trained)):
            if b < 1:
                raise ValueError(f"step {i}: branching must be >= 1, got {b}")
            if b > 1 and not s:
                raise ValueError(f"step {i}: an ODE step is deterministic, so it cannot branch (branching {b})")
            if t and not s:
                raise ValueError(f"step {i}: only stochastic (SDE) steps have log-probs to train")

    @property
    def num_steps(self) -> int:
        return len(self.branching)

    def nodes_at(self, level: int) -> int:
        """Nodes per tree at level `level` (0 = root, T = leaves)."""
        return math.prod(self.branching[:level])

    @property
    def num_leaves(self) -> int:
        return self.nodes_at(self.num_steps)

    @property
    def num_trained_nodes(self) -> int:
        return sum(self.nodes_at(i) for i in range(self.num_steps) if self.trained[i])

    @property
    def num_trained_edges(self) -> int:
        return sum(self.nodes_at(i) * self.branching[i] for i in range(self.num_steps) if self.trained[i])

    @property
    def num_model_calls(self) -> int:
        """Model evaluations per tree without CFG (twice that with CFG): one per node per step."""
        return sum(self.nodes_at(i) for i in range(self.num_steps))

    @property
    def trained_steps(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.trained) if t)

    @property
    def prune_level(self) -> int | None:
        """The level where value-guided pruning acts: the children of the last trained step (for
        TreeGRPO the window's last level, before the ODE tails). Every step from it on is untrained,
        so pruning there removes leaves, never trained nodes. None if no step is trained."""
        steps = self.trained_steps
        return steps[-1] + 1 if steps else None

    def tail_calls(self) -> int:
        """Model calls per prune-level node that pruning can save: its tail minus the first call,
        which the value probe uses (its prediction gives the clean estimate)."""
        level = self.prune_level
        return 0 if level is None else max(self.num_steps - level - 1, 0)

    # ----- presets, one per method (SPEC.md section 6) -----

    @classmethod
    def treegrpo(cls, num_steps: int = 10, k: int = 3, w: int = 3, start: int = 0,
                 trees_per_prompt: int = 1) -> TreeShape:
        """TreeGRPO: ODE outside the window [start, start + w); k SDE children per node inside it."""
        _check_window(num_steps, w, start)
        inside = [start <= i < start + w for i in range(num_steps)]
        return cls(tuple(k if s else 1 for s in inside), tuple(inside), tuple(inside), trees_per_prompt)

    @classmethod
    def flow_grpo(cls, num_steps: int = 10, group_size: int = 24) -> TreeShape:
        """Flow-GRPO: G independent SDE chains per prompt; every step but the last is trained."""
        return cls((1,) * num_steps, (True,) * num_steps,
                   tuple(i < num_steps - 1 for i in range(num_steps)), group_size)

    @classmethod
    def dance_grpo(cls, num_steps: int = 10, group_size: int = 12,
                   trained_steps: tuple[int, ...] | None = None) -> TreeShape:
        """DanceGRPO: one shared noise branching G ways at step 0, SDE everywhere.

        trained_steps: which steps to train (DanceGRPO draws a random 60% of the first T-1 each
        iteration, see `dance_trained_steps`); default all but the last.
        """
        if trained_steps is None:
            trained_steps = tuple(range(num_steps - 1))
        if num_steps - 1 in trained_steps:
            raise ValueError(f"trained steps {tuple(trained_steps)} include the last step {num_steps - 1}, which is "
                             "never trained (sigma near 0: a tiny std, log-probs overflow)")
        _check_steps(num_steps - 1, trained_steps)
        branching = (group_size,) + (1,) * (num_steps - 1)
        return cls(branching, (True,) * num_steps, tuple(i in trained_steps for i in range(num_steps)), 1)

    @classmethod
    def mix_grpo(cls, num_steps: int = 10, group_size: int = 12, window: int = 4, start: int = 0) -> TreeShape:
        """MixGRPO: ODE except an SDE window; the root branches G ways at the window start."""
        _check_window(num_steps, window, start)
        inside = [start <= i < start + window for i in range(num_steps)]
        branching = tuple(group_size if i == start else 1 for i in range(num_steps))
        return cls(branching, tuple(inside), tuple(inside), 1)

    @classmethod
    def branch_grpo(cls, num_steps: int = 10, split_steps: tuple[int, ...] = (0, 2, 4, 6),
                    k: int = 2) -> TreeShape:
        """BranchGRPO: SDE everywhere, k-way splits at `split_steps`, every step but the last trained."""
        _check_steps(num_steps - 1, split_steps)
        branching = tuple(k if i in split_steps else 1 for i in range(num_steps))
        return cls(branching, (True,) * num_steps, tuple(i < num_steps - 1 for i in range(num_steps)), 1)


def _check_window(num_steps: int, width: int, start: int) -> None:
    if width < 1:
        raise ValueError(f"window width must be >= 1, got {width}")
    if width > num_steps - 1:
        raise ValueError(f"a window of {width} steps does not fit in {num_steps} steps (the last step never branches)")
    if not 0 <= start <= num_steps - 1 - width:
        raise ValueError(f"window start {start} out of range 0..{num_steps - 1 - width} for {num_steps} steps, width {width}")


def _check_steps(num_steps: int, steps: tuple[int, ...]) -> None:
    bad = [s for s in steps if not 0 <= s < num_steps]
    if bad:
        raise ValueError(f"steps {bad} out of range 0..{num_steps - 1}")


# ----- schedules that pick the window per iteration -----


@dataclass(frozen=True)
class WindowSchedule:
    """Picks the window start for each iteration.

    mode "random": truncated geometric ``P[i] = (1 - r) r^i / (1 - r^n)`` over ``i = 0 .. n - 1``
    with ``n = num_starts`` (= T - w for TreeGRPO, so the last step never branches);
    "shift": start at 0 and move one step later every `every` iterations, then stay at the end;
    "cycle": as shift, but back to 0 after the last start (MixGRPO's roll-back); "fixed": always `start`;
    "adaptive": ``P = explore * geometric + (1 - explore) * score / sum(score)``, where score[i] is
    the mean over the window's `width` steps of each step's recent sibling spread (`StepSpread`):
    windows whose branch decisions made the most difference get drawn most. Steps not measured yet
    take the largest measured spread (optimism, so every window gets tried).
    """

    num_starts: int
    mode: Literal["random", "shift", "cycle", "fixed", "adaptive"] = "random"
    r: float = 0.5
    every: int = 50
    start: int = 0
    width: int = 1
    explore: float = 0.25

    def __post_init__(self) -> None:
        if self.num_starts < 1:
            raise ValueError(f"num_starts must be >= 1, got {self.num_starts}")
        if self.mode not in ("random", "shift", "cycle", "fixed", "adaptive"):
            raise ValueError(f"window mode must be 'random', 'shift', 'cycle', 'fixed' or 'adaptive', got {self.mode!r}")
        if self.width < 1 or not 0 <= self.explore <= 1:
            raise ValueError(f"window width must be >= 1 and explore in [0, 1], got {self.width}, {self.explore}")
        if not 0 < self.r < 1:
            raise ValueError(f"window r must be in (0, 1), got {self.r}")
        if self.every < 1:
            raise ValueError(f"window shift interval must be >= 1, got {self.every}")
        if not 0 <= self.start < self.num_starts:
            raise ValueError(f"fixed window start {self.start} out of range 0..{self.num_starts - 1}")

    def probabilities(self, spread: list[float | None] | None = None) -> torch.Tensor:
        """[num_starts] float64: the truncated geometric law (random mode), or in adaptive mode its
        mix with the law learnt from `spread` (per step, None = not measured; see `StepSpread`)."""
        i = torch.arange(self.num_starts, dtype=torch.float64)
        geometric = (1 - self.r) * self.r**i / (1 - self.r**self.num_starts)
        seen = [v for v in (spread or []) if v is not None]
        if self.mode != "adaptive" or not seen or max(seen) <= 0:
            return geometric
        assert spread is not None
        filled = torch.tensor([max(seen) if v is None else v for v in spread], dtype=torch.float64)
        score = torch.stack([filled[s:s + self.width].mean() for s in range(self.num_starts)])
        return self.explore * geometric + (1 - self.explore) * score / score.sum()

    def pick(self, iteration: int, generator: torch.Generator | None = None,
             spread: list[float | None] | None = None) -> int:
        if self.mode == "fixed":
            return self.start
        if self.mode == "shift":
            return min(iteration // self.every, self.num_starts - 1)
        if self.mode == "cycle":
            return (iteration // self.every) % self.num_starts
        return int(torch.multinomial(self.probabilities(spread).float(), 1, generator=generator))


@dataclass
class StepSpread:
    """Per-step EMA of how much sibling decisions differed: the adaptive window's memory.

    values[j]: EMA over iterations of the mean, over the nodes branching at step j, of the
    (population) std of their children's values (subtree-mean rewards, in reward units), or None
    while step j has not branched. It is state: checkpoints store it (`state_dict`).
    """

    num_steps: int
    decay: float = 0.9
    values: list[float | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 <= self.decay < 1:
            raise ValueError(f"spread decay must be in [0, 1), got {self.decay}")
        if not self.values:
            self.values = [None] * self.num_steps

    def update(self, sums: torch.Tensor) -> None:
        """sums: [T, 2] float64 (sum of per-node sibling std, number of nodes) per step, e.g. from
        `sibling_spread` summed over processes; steps without nodes keep their value."""
        for j in range(self.num_steps):
            total, count = float(sums[j, 0]), float(sums[j, 1])
            if count > 0:
                mean = total / count
                old = self.values[j]
                self.values[j] = mean if old is None else self.decay * old + (1 - self.decay) * mean

    def state_dict(self) -> dict:
        return {"decay": self.decay, "values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        values = state["values"]
        if len(values) != self.num_steps:
            raise ValueError(f"saved spread has {len(values)} steps, this run {self.num_steps}")
        self.values = [None if v is None else float(v) for v in values]


def sibling_spread(tree: Tree, values: list[torch.Tensor | None], valid: list[torch.Tensor | None]) -> torch.Tensor:
    """[T, 2] float64 per step: (sum over branching nodes of the population std of their valid
    children's values, number of such nodes with at least two valid children). values[i], valid[i]:
    [N_i] per node of level i (e.g. subtree-mean rewards from a backup, and where they exist)."""
    out = torch.zeros(tree.num_steps, 2, dtype=torch.float64)
    for i in range(tree.num_steps):
        v, ok = values[i + 1], valid[i + 1]
        if tree.shape.branching[i] < 2 or v is None or ok is None:
            continue
        parent, n = tree.parent[i + 1], tree.prompt[i].shape[0]
        w = ok.double()
        count = torch.zeros(n, dtype=torch.float64).index_add_(0, parent, w)
        mean = torch.zeros(n, dtype=torch.float64).index_add_(0, parent, w * v.double()) / count.clamp(min=1)
        var = torch.zeros(n, dtype=torch.float64).index_add_(0, parent, w * (v.double() - mean[parent]) ** 2)
        use = count >= 2
        out[i, 0] = torch.sqrt(var[use] / count[use]).sum()
        out[i, 1] = float(use.sum())
    return out


def dance_trained_steps(num_steps: int, fraction: float, generator: torch.Generator | None = None) -> tuple[int, ...]:
    """DanceGRPO's timestep selection: a random `fraction` of the first T - 1 steps (at least one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"trained-step fraction must be in (0, 1], got {fraction}")
    count = max(1, round(fraction * (num_steps - 1)))
    chosen = torch.randperm(num_steps - 1, generator=generator)[:count]
    return tuple(sorted(int(i) for i in chosen))


# ----- the container a rollout fills -----


@dataclass
class Tree:
    """A forest for a batch of prompts, level by level; level i holds the states before step i.

    With P prompts and R roots per prompt, level 0 has P * R roots and level i + 1 has
    ``N_i * branching[i]`` nodes, children of one parent contiguous.
    latents[i]: [N_i, *latent_shape] float32, or None where the rollout did not keep that level.
    parent[i]: [N_i] long index into level i - 1 (empty for level 0).
    prompt[i]: [N_i] long prompt index of each node; root[i]: [N_i] long tree index.
    log_prob[i]: [N_i] float32 rollout log-prob of the edge into each node (stochastic step i - 1),
        None for level 0 and after ODE steps.
    prune_level / kept: set by value-guided pruning (`prune`): kept is [N_prune_level] bool, the nodes
        of that level that were completed; the others have no descendants (levels after it hold only
        the kept nodes' subtrees, so there are fewer leaves than `shape.num_leaves`).
    """

    shape: TreeShape
    num_prompts: int
    latents: list[torch.Tensor | None]
    parent: list[torch.Tensor]
    prompt: list[torch.Tensor]
    root: list[torch.Tensor]
    log_prob: list[torch.Tensor | None]
    num_model_calls: int = 0
    extras: dict = field(default_factory=dict)
    prune_level: int | None = None
    kept: torch.Tensor | None = None

    @property
    def pruned(self) -> torch.Tensor | None:
        """[N_prune_level] bool, the pruned nodes (None when nothing was pruned)."""
        return None if self.kept is None else ~self.kept

    @property
    def num_pruned(self) -> int:
        return 0 if self.kept is None else int((~self.kept).sum())

    def prune(self, kept: torch.Tensor) -> None:
        """Mark the current frontier's nodes: only `kept` ([N] bool) get children from here on."""
        level = len(self.prompt) - 1
        if self.kept is not None:
            raise ValueError(f"the tree was already pruned at level {self.prune_level}")
        if kept.dtype != torch.bool or kept.shape != self.prompt[level].shape:
            raise ValueError(f"kept must be a bool mask of the {self.prompt[level].shape[0]} frontier nodes, "
                             f"got {kept.dtype} {tuple(kept.shape)}")
        self.prune_level, self.kept = level, kept.cpu()

    @property
    def num_steps(self) -> int:
        return self.shape.num_steps

    @property
    def leaves(self) -> torch.Tensor:
        """[L, *latent_shape] final states."""
        leaves = self.latents[-1]
        assert leaves is not None
        return leaves

    @property
    def leaf_prompt(self) -> torch.Tensor:
        """[L] prompt index of each leaf."""
        return self.prompt[-1]

    @classmethod
    def roots_for(cls, shape: TreeShape, num_prompts: int, root_latents: torch.Tensor) -> Tree:
        """A tree holding only its roots: [P * R, *latent_shape], prompt-major."""
        n = num_prompts * shape.roots_per_prompt
        if root_latents.shape[0] != n:
            raise ValueError(f"expected {n} root latents, got {root_latents.shape[0]}")
        idx = torch.arange(n)
        return cls(shape, num_prompts, [root_latents], [torch.empty(0, dtype=torch.long)],
                   [idx // shape.roots_per_prompt], [idx], [None])

    def add_level(self, latents: torch.Tensor, log_prob: torch.Tensor | None, keep_latents: bool = True) -> None:
        """Append the children of the current frontier (each parent's children contiguous)."""
        step = len(self.prompt) - 1
        branching = self.shape.branching[step]
        alive = torch.arange(self.prompt[-1].shape[0])
        if step == self.prune_level:
            assert self.kept is not None
            alive = alive[self.kept]  # pruned nodes get no children
        parents = alive.repeat_interleave(branching)
        if latents.shape[0] != parents.shape[0]:
            raise ValueError(f"level {step + 1}: expected {parents.shape[0]} children, got {latents.shape[0]}")
        self.parent.append(parents)
        self.prompt.append(self.prompt[-1][parents])
        self.root.append(self.root[-1][parents])
        self.log_prob.append(log_prob)
        self.latents.append(latents if keep_latents else None)


@dataclass
class EdgeBatch:
    """Trained nodes with their outgoing edges, flattened across levels.

    x: [Nn, *latent] node states; step: [Nn] long step index; prompt: [Nn] long prompt index;
    edge_node: [Ne] long row of x each edge leaves; child: [Ne, *latent] the stored child states;
    old_log_prob: [Ne] rollout log-probs; advantage: [Ne] per-edge advantages.
    """

    x: torch.Tensor
    step: torch.Tensor
    prompt: torch.Tensor
    edge_node: torch.Tensor
    child: torch.Tensor
    old_log_prob: torch.Tensor
    advantage: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.edge_node.shape[0])

    def select_nodes(self, nodes: torch.Tensor) -> EdgeBatch:
        """The sub-batch of the given node rows with all their edges (node order kept as given,
        edges sorted by node)."""
        remap = torch.full((self.num_nodes,), -1, dtype=torch.long)
        remap[nodes] = torch.arange(nodes.shape[0])
        edges = torch.nonzero(remap[self.edge_node] >= 0).squeeze(1)
        # Edges ordered by their new node row: contiguous node chunks then hold contiguous edges.
        edges = edges[torch.sort(remap[self.edge_node[edges]], stable=True).indices]
        return EdgeBatch(self.x[nodes], self.step[nodes], self.prompt[nodes], remap[self.edge_node[edges]],
                         self.child[edges], self.old_log_prob[edges], self.advantage[edges])

    def minibatches(self, num_minibatches: int, generator: torch.Generator | None = None) -> list[EdgeBatch]:
        """Shuffle nodes and split them into `num_minibatches` parts, each node with all its edges."""
        order = torch.randperm(self.num_nodes, generator=generator)
        return [self.select_nodes(part) for part in order.chunk(num_minibatches) if part.numel() > 0]

    def minibatches_per_prompt(self, num_minibatches: int, generators: list[torch.Generator]) -> list[EdgeBatch]:
        """Split each prompt's nodes on its own (shuffled by `generators[p]`) into `num_minibatches`
        parts; minibatch j joins part j of every prompt. A prompt's split then does not depend on
        the other prompts, so ranks owning different prompts build the same minibatches one
        process would (and equal-sized ones: every prompt has the same tree shape)."""
        parts: list[list[torch.Tensor]] = []
        for p, g in enumerate(generators):
            nodes = torch.nonzero(self.prompt == p).squeeze(1)
            chunks = [c for c in nodes[torch.randperm(nodes.shape[0], generator=g)].chunk(num_minibatches) if c.numel()]
            parts.append(chunks)
        count = min((len(c) for c in parts), default=0)
        if any(len(c) != count for c in parts):
            raise ValueError("prompts have different numbers of trained nodes; per-prompt minibatches need equal trees")
        return [self.select_nodes(torch.cat([c[j] for c in parts])) for j in range(count)]


def trained_edges(tree: Tree, edge_advantages: list[torch.Tensor | None]) -> EdgeBatch:
    """Gather every trained node and its child edges; edge_advantages[i]: [N_i] for the edge into
    each node of level i (from `treegrpo.advantages.backup`)."""
    xs, steps, prompts, edge_nodes, children, old_lps, advs = [], [], [], [], [], [], []
    offset = 0
    for i in tree.shape.trained_steps:
        nodes, kids, lp, adv = tree.latents[i], tree.latents[i + 1], tree.log_prob[i + 1], edge_advantages[i + 1]
        if nodes is None or kids is None or lp is None or adv is None:
            raise ValueError(f"step {i} is trained but the tree lacks its latents, log-probs or advantages")
        xs.append(nodes)
        steps.append(torch.full((nodes.shape[0],), i, dtype=torch.long))
        prompts.append(tree.prompt[i])
        edge_nodes.append(tree.parent[i + 1] + offset)
        children.append(kids)
        old_lps.append(lp)
        advs.append(adv)
        offset += nodes.shape[0]
    if not xs:
        raise ValueError("the tree shape trains no step")
    return EdgeBatch(torch.cat(xs), torch.cat(steps), torch.cat(prompts), torch.cat(edge_nodes),
                     torch.cat(children), torch.cat(old_lps), torch.cat(advs))
