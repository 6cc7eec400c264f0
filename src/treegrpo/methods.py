"""Methods as data: each is a tree shape (per iteration) plus a sampler and an advantage rule.

| method | shape | notes |
|---|---|---|
| treegrpo | k-ary tree inside a window of w steps, window start per iteration | random (truncated geometric), shift or fixed |
| flow_grpo | `group_size` independent SDE chains | every step but the last trained |
| dance_grpo | one root branching `group_size` ways at step 0, SDE everywhere | a random `train_fraction` of steps trained, drawn per trajectory (its code) or per iteration |
| mix_grpo | one root branching `group_size` ways at the window start, SDE in the window | window slides (shift mode; cycle rolls back to 0) |
| branch_grpo | k-way splits at `split_steps`, SDE everywhere | pair with `per_depth: true` |
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch

from treegrpo.config import MethodConfig
from treegrpo.policies.base import Schedule
from treegrpo.rollout import SamplerConfig, transition
from treegrpo.tree import EdgeBatch, StepSpread, Tree, TreeShape, WindowSchedule, dance_trained_steps


@dataclass(frozen=True)
class AdvantageRule:
    """How leaf rewards become edge advantages (see `treegrpo.advantages.tree_advantages`)."""

    backup: str = "mean"
    temperature: float = 1.0
    per_depth: bool = False
    unbiased: bool = False
    global_std: bool = False
    std_floor: float = 0.0
    edge_baseline: str = "none"


class Method:
    """Builds the tree shape of each iteration for one configured method."""

    def __init__(self, config: MethodConfig, num_steps: int) -> None:
        self.config = config
        self.num_steps = num_steps
        self.sampler = SamplerConfig(sde_kind=config.sde_kind, noise_level=config.noise_level,
                                     ddim_eta=config.ddim_eta)  # type: ignore[arg-type]
        self.advantage_rule = AdvantageRule(config.backup, config.softmax_temperature, config.per_depth,
                                            config.unbiased_std, config.global_std, config.std_floor,
                                            config.edge_baseline)
        self.window: WindowSchedule | None = None
        self.last_start: int | None = None  # the window start of the latest iteration
        self.spread: StepSpread | None = None  # the adaptive window's per-step memory
        if config.name in ("treegrpo", "mix_grpo"):
            num_starts = num_steps - config.window
            if config.window_max_start >= 0:  # the law (or the slide) truncated at the cap
                num_starts = min(num_starts, config.window_max_start + 1)
            self.window = WindowSchedule(num_starts=num_starts, mode=config.window_mode,  # type: ignore[arg-type]
                                         r=config.window_r, every=config.window_every, start=config.window_start,
                                         # MixGRPO branches at its start only: score that step alone
                                         width=config.window if config.name == "treegrpo" else 1,
                                         explore=config.window_explore)
            if config.window_mode == "adaptive":
                self.spread = StepSpread(num_steps, config.window_decay)
        self.shape_for(0, torch.Generator().manual_seed(0))  # fail now, not mid-run, on a bad combination
        self.last_start = None

    def state_dict(self) -> dict | None:
        """The window schedule's state for checkpoints: its settings and the latest start. The
        schedule itself is a function of the iteration and the shared generator (both saved)."""
        if self.window is None:
            return None
        state = {"schedule": dataclasses.asdict(self.window), "last_start": self.last_start}
        if self.spread is not None:
            state["spread"] = self.spread.state_dict()
        return state

    def load_state_dict(self, state: dict | None) -> None:
        """Restore `state_dict()`; a changed schedule is allowed (a deliberate config change) but warned about."""
        if self.window is None or not state:
            return
        saved = state.get("schedule")
        current = dataclasses.asdict(self.window)
        # Keys a checkpoint predates (width, explore) count as unchanged.
        if saved is not None and any(saved.get(k, v) != v for k, v in current.items()):
            warnings.warn(f"the window schedule changed since the checkpoint: {saved} -> {dataclasses.asdict(self.window)}")
        self.last_start = state.get("last_start")
        if self.spread is not None and state.get("spread") is not None:
            self.spread.load_state_dict(state["spread"])

    def shape_for(self, iteration: int, generator: torch.Generator) -> TreeShape:
        """The tree shape of `iteration`; draws from `generator` where the method is random."""
        c, steps = self.config, self.num_steps
        if c.name == "treegrpo":
            assert self.window is not None
            self.last_start = self.window.pick(iteration, generator, self.spread.values if self.spread else None)
            return TreeShape.treegrpo(steps, c.k, c.window, self.last_start, c.trees_per_prompt)
        if c.name == "mix_grpo":
            assert self.window is not None
            self.last_start = self.window.pick(iteration, generator, self.spread.values if self.spread else None)
            return TreeShape.mix_grpo(steps, c.group_size, c.window, self.last_start)
        if c.name == "flow_grpo":
            return TreeShape.flow_grpo(steps, c.group_size)
        if c.name == "dance_grpo":
            if c.train_steps_per == "trajectory":  # every step may be trained; `select_trained` picks per trajectory
                return TreeShape.dance_grpo(steps, c.group_size)
            return TreeShape.dance_grpo(steps, c.group_size, dance_trained_steps(steps, c.train_fraction, generator))
        if c.name == "branch_grpo":
            return TreeShape.branch_grpo(steps, tuple(c.split_steps), c.k)
        raise ValueError(f"unknown method {c.name!r}")

    def select_trained(self, tree: Tree, batch: EdgeBatch, generators: list[torch.Generator]) -> EdgeBatch:
        """The edges this iteration trains. DanceGRPO with ``train_steps_per: trajectory`` draws, for
        every trajectory (chain) on its prompt's generator, its own random `train_fraction` of the
        first T - 1 steps (as its code does with one permutation per sample) and keeps only those
        edges; nodes left without edges are dropped. Every other method trains `batch` as it is."""
        c = self.config
        if c.name != "dance_grpo" or c.train_steps_per != "trajectory":
            return batch
        steps = self.num_steps
        count = max(1, round(c.train_fraction * (steps - 1)))
        chains = tree.prompt[1]  # [P * G] prompt of each trajectory, prompt-major
        chosen = torch.zeros(chains.shape[0], steps, dtype=torch.bool)
        for p, g in enumerate(generators):
            for j in torch.nonzero(chains == p).squeeze(1).tolist():
                chosen[j, torch.randperm(steps - 1, generator=g)[:count]] = True
        # Edges of step i lead into level i + 1; on DanceGRPO's shape node j of every level >= 1 is
        # trajectory j. `trained_edges` lists the trained steps' edges in this order.
        keep = torch.cat([chosen[:, i] for i in tree.shape.trained_steps])
        return drop_edges(batch, keep)

    def step_gains(self, schedule: Schedule) -> torch.Tensor:
        """[T] gradient gain |c_v| / std of each step's log-prob (c_v: the coefficient of the model
        output in the transition mean, exact because every sampler's mean is linear in it); inf
        where the std is 0 (a last step that is never trained)."""
        steps = self.num_steps
        x = torch.zeros(steps, 1)
        index = torch.arange(steps)
        ones, _ = transition(schedule, self.sampler, x, torch.ones(steps, 1), index, stochastic=True)
        zeros, std = transition(schedule, self.sampler, x, torch.zeros(steps, 1), index, stochastic=True)
        assert std is not None
        c_v, std = (ones - zeros).view(steps).abs(), std.reshape(steps).expand(steps)
        return torch.where(std > 0, c_v / std.clamp(min=1e-30), torch.full_like(std, torch.inf))


def drop_edges(batch: EdgeBatch, keep: torch.Tensor) -> EdgeBatch:
    """The sub-batch of the edges with ``keep`` [Ne] true; nodes left without edges are removed."""
    if keep.shape != (batch.num_edges,):
        raise ValueError(f"keep must be [{batch.num_edges}], got {tuple(keep.shape)}")
    edges = torch.nonzero(keep).squeeze(1)
    used = torch.zeros(batch.num_nodes, dtype=torch.bool)
    used[batch.edge_node[edges]] = True
    remap = torch.cumsum(used.long(), 0) - 1
    nodes = torch.nonzero(used).squeeze(1)
    return EdgeBatch(batch.x[nodes], batch.step[nodes], batch.prompt[nodes], remap[batch.edge_node[edges]],
                     batch.child[edges], batch.old_log_prob[edges], batch.advantage[edges])
