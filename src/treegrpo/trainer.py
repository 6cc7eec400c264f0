"""The training loop: rollout -> rewards -> advantages -> clipped updates, with eval and checkpoints.

One iteration (readable top to bottom in `Trainer.step`):
1. pick the prompts and the iteration's tree shape (window start, DanceGRPO's trained steps...);
2. grow all trees of all prompts with the batched rollout;
3. decode the leaves and score them with every reward; non-finite rewards are masked out;
4. turn rewards into one advantage per trained edge (leaf normalisation + backup);
5. recompute the old log-probs in the training layout (so the first ratio is exactly 1), then for
   each minibatch of nodes: one model forward per node gives the new means, hence the new
   log-probs of all its child edges; clipped surrogate (+ optional KL); AdamW step with grad clip.

A run directory holds config.yaml, metrics.jsonl, samples/, checkpoints/ and summary.json.

Processes: the trainer always runs through `accelerate.Accelerator` (a world of one unless started
with `accelerate launch`). A shared generator (same seed and draws on every rank) picks the
iteration's prompts, its tree shape and one noise seed per prompt; each rank grows, scores and
trains the trees of its own contiguous slice of the prompts, with per-prompt noise streams and
per-prompt minibatch splits, so N processes compute what one process doing all prompts would (up
to float rounding): DDP averages equal-sized per-rank gradients, metrics are reduced
(`treegrpo.distributed`), and only the main process writes files.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from treegrpo.advantages import backup, leaf_advantages, tree_advantages
from treegrpo.checkpoint import (EMA_WEIGHTS, WEIGHTS, CheckpointError, CheckpointWriteError, load_state, load_weights,
                                 resume_checkpoint, save_checkpoint)
from treegrpo.config import Config, ConfigError, check_resume_config, save_config
from treegrpo.distributed import (accelerate_without_fsdp, all_sum, any_rank, check_divisible, fsdp_requested,
                                  full_model_state, full_optimizer_state, load_full_model_state,
                                  load_full_optimizer_state, max_over_ranks, padded_shard, reduce_metrics, shard_slice)
from treegrpo.diversity import DiversityFeature, group_nearest_neighbour, resolve_features
from treegrpo.ema import EMA
from treegrpo.evaluation import (accuracy_kind, decode_chunked, evaluate_per_image, image_grid, ode_sample, save_image,
                                 score_images, side_by_side,
                                 summarize_eval)
from treegrpo.loss import flow_matching_loss, kl_to_reference, matching_weights, policy_loss, step_weights
from treegrpo.methods import Method
from treegrpo.memory import PeakMemory
from treegrpo.policies import Policy, build_policy, enable_prompt_cache, load_trainable_state_dict, trainable_state_dict
from treegrpo.policies.base import attach_wrapped
from treegrpo.policies.lora import BaseModelView
from treegrpo.prompts import draw_prompts, load_prompts, prompt_groups
from treegrpo.rewards import build_rewards
from treegrpo.rewards.retry import RewardError, with_retries
from treegrpo.rollout import rollout, transition
from treegrpo.steps import gaussian_log_prob
from treegrpo.stopping import StopSignals, TrainingStopped
from treegrpo.tracking import RunLogger, truncate_metrics
from treegrpo.pruning import max_spread_subset, probe_correlation, random_subset
from treegrpo.tree import EdgeBatch, TreeShape, sibling_spread, trained_edges
from treegrpo.tree_record import TreeRecord, record_tree


class Trainer:
    """Runs one configured training job into `output_dir` (resuming if it holds a checkpoint)."""

    def __init__(self, config: Config, output_dir: str | Path, policy: Policy | None = None,
                 train_prompts: list[str] | None = None) -> None:
        from accelerate import Accelerator

        self.config = config
        self.out = Path(output_dir)
        # device_placement=False: the policy is built on its device (one GPU per rank) by us.
        cpu = config.model.device == "cpu"
        # FSDP on CPU processes: accelerate cannot (see accelerate_without_fsdp); torch's fully_shard can.
        cpu_fsdp = cpu and fsdp_requested()
        with accelerate_without_fsdp() if cpu_fsdp else contextlib.nullcontext():
            self.accelerator = Accelerator(cpu=cpu, device_placement=False)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        check_divisible(config.train.prompts_per_iteration, self.world)  # before any work
        torch.manual_seed(config.train.seed)  # the same model (LoRA init included) on every rank
        # Prompt files first: a missing or malformed one fails before the model is loaded.
        self.train_prompts = train_prompts or load_prompts(config.train.prompts)
        try:
            self.prompt_groups = prompt_groups(self.train_prompts, config.train.prompt_balance)
        except ValueError as err:
            raise ConfigError(f"train.prompt_balance={config.train.prompt_balance}: {err}") from None
        self.eval_prompts = load_prompts(config.eval.prompts)
        self.accuracy = accuracy_kind(config.model.family, self.eval_prompts)
        if policy is None:
            model_config = copy.copy(config.model)
            if config.model.device != "cpu" and self.world > 1:
                model_config.device = str(self.accelerator.device)  # each rank on its own GPU
            policy = build_policy(model_config)
        self.policy = policy
        if config.model.offload_text_encoders:  # also for a policy handed in (build_policy already did it)
            if not hasattr(policy, "offload_text_encoders"):
                raise ConfigError(f"model.offload_text_encoders: {type(policy).__name__} has no text encoders to "
                                  "offload (a diffusers family does); remove the key")
            policy.offload_text_encoders()
        self.device = torch.device(getattr(policy, "device", "cpu"))
        self.num_steps = config.model.num_steps
        self.schedule = self.policy.schedule(self.num_steps)
        self.method = Method(config.method, self.num_steps)
        # |c_v| / std per step, for optim.step_weight gain modes (a property of the schedule and sampler).
        self.step_gains = self.method.step_gains(self.schedule) if "gain" in config.optim.step_weight else None
        self.eval_seeds = [config.eval.seed_offset + i for i in range(config.eval.num_seeds)]
        names = set(config.reward.weights) | set(config.reward.eval)
        # A reward that raises (e.g. a remote scorer timing out) is retried before the run fails.
        self.rewards = with_retries(build_rewards(names, config.reward.options), config.reward.retries,
                                    config.reward.retry_delay)
        self.diversity_features, self.gardo_feature = self._diversity_features()
        if not any(p.requires_grad for p in self.policy.trainable_parameters()):
            raise ConfigError("the policy has no trainable parameters")
        o = config.optim
        self.reference = None
        if o.kl_coef > 0:
            # The KL reference is the starting model: with LoRA the same network with adapters off,
            # else a frozen copy taken now (cheap for the embedded model), before any wrapping.
            if config.model.lora_rank > 0:
                self.reference = BaseModelView(self.policy)
            elif hasattr(self.policy, "frozen_copy"):  # diffusers: copy the denoiser, share the rest
                self.reference = self.policy.frozen_copy()
            else:
                self.reference = copy.deepcopy(self.policy)
                for p in self.reference.trainable_parameters():
                    p.requires_grad_(False)
        if config.model.prompt_cache > 0:
            # Each distinct prompt through the text encoders once per run (training and evaluation).
            enable_prompt_cache(self.policy, config.model.prompt_cache)
        # One prepare call for model and optimiser (DeepSpeed needs both; DDP wraps the module).
        self.cpu_fsdp = cpu_fsdp and self.world > 1  # one process has nothing to shard
        if self._sharded():
            self._prepare_sharded()
        module = self.policy.trainable_module()
        if self.cpu_fsdp:
            module = self._fully_shard(module)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=o.lr,
                                      betas=tuple(o.betas), weight_decay=o.weight_decay)
        if self.cpu_fsdp:  # already sharded: accelerate (MULTI_CPU) would wrap it in DDP as well
            self.model, self.optimizer = module, self.accelerator.prepare(optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(module, optimizer)
        attach_wrapped(self.policy, self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # FSDP may replace them
        self.ema: EMA | None = None  # the EMA of the trainable weights: what evaluation and the export use
        if o.ema_decay > 0:
            if self._sharded():
                raise ConfigError("optim.ema_decay > 0 needs the full trainable weights on every process; FSDP / "
                                  "DeepSpeed shard them: set optim.ema_decay=0 or train with DDP")
            live = dict(self.policy.trainable_module().named_parameters())
            self.ema = EMA({name: live[name] for name in trainable_state_dict(self.policy)}, o.ema_decay)
        if self.world > 1:
            torch.manual_seed(config.train.seed + self.rank)  # each rank its own torch stream from here
        warmup = max(o.warmup_iterations * o.minibatches * o.epochs, 0)
        # Not prepared: accelerate's scheduler wrapper steps once per process, and the schedule
        # should not depend on the number of processes.
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda n: min(1.0, (n + 1) / warmup) if warmup else 1.0)
        self.generator = torch.Generator().manual_seed(config.train.seed)  # shared: same draws on every rank
        self.memory = PeakMemory(self.device)
        self.iteration = 0
        self.elapsed = 0.0
        self.total_calls = 0
        self.base_eval: dict[str, float] | None = None
        self.grid_rows = self._grid_rows()
        self.tree_record: TreeRecord | None = None  # the last iteration's tree of its first prompt, for the report
        self.checkpoint_failures = 0  # checkpoints that could not be written (disk full...); retried at the next one
        self.last_checkpoint: int | None = None  # iteration of the newest checkpoint on disk
        self.signals = StopSignals(lambda: f"finishing iteration {self.iteration + 1}, then checkpointing")

    def _diversity_features(self) -> tuple[dict[str, DiversityFeature], DiversityFeature | None]:
        """The evaluation's diversity features and GARDO's (``method.diversity_weight: gardo``): the
        named one, else the first automatic one of the trained rewards, then of all, then the world's."""
        c = self.config
        world = self.accuracy or c.model.family  # "compose" / "shapes" for the embedded worlds, else the family
        try:
            features = resolve_features(c.eval.diversity_features, self.rewards, world)
            if c.method.diversity_weight == "none":
                return features, None
            if c.method.diversity_feature is not None:
                found = resolve_features([c.method.diversity_feature], self.rewards, world,
                                         option="method.diversity_feature")
            else:
                trained = {n: self.rewards[n] for n in c.reward.weights}
                found = {n: f for n, f in resolve_features(None, trained, world).items() if not f.partial} or {
                    n: f for n, f in resolve_features(None, self.rewards, world).items() if not f.partial}
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if any(f.partial for f in found.values()):
            raise ConfigError(f"method.diversity_feature: {c.method.diversity_feature!r} is defined for some prompts only "
                              "(NaN elsewhere), so it cannot weight every leaf's advantage; choose another feature")
        if not found:
            raise ConfigError("method.diversity_weight=gardo needs image features: load a CLIP-based reward (clipscore, "
                              "pickscore, hpsv2.1, aesthetic) or set method.diversity_feature to a registered feature")
        return features, next(iter(found.values()))

    def _stop_requested(self) -> bool:
        """Whether a SIGINT / SIGTERM asked this run to stop (checked between iterations). A request
        seen by any rank stops them all after the same iteration (else they hang in a collective)."""
        return any_rank(self.accelerator, self.signals.requested)

    def _stop(self) -> None:
        """Checkpoint the finished iterations and raise TrainingStopped (exit code and message in it)."""
        # A rank that did not get the signal itself stops because another did (any_rank): say SIGTERM.
        signum = self.signals.signum if self.signals.signum is not None else int(signal.SIGTERM)
        if self.last_checkpoint != self.iteration:
            self._checkpoint(final=True)
        self.logger.finish()
        raise TrainingStopped(signum, self.iteration, str(self.out))

    # ------------------------------------------------------------------ run
    def train(self) -> dict[str, Any]:
        """Run (or resume) to the end; a first SIGINT / SIGTERM stops after the current iteration
        with a checkpoint (raises `TrainingStopped`), a second aborts (raises `Aborted`)."""
        with self.signals:
            return self._train()

    def _train(self) -> dict[str, Any]:
        c = self.config
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        resumed = self._maybe_resume()
        if self.is_main:
            save_config(c, self.out / "config.yaml")
        self.logger = RunLogger(self.out, c.log.trackers, c.to_dict(), is_main_process=self.is_main)
        if not resumed:
            if self.is_main:
                (self.out / "metrics.jsonl").write_text("")
            self.base_eval = self._evaluate(tag="start")
            self._log({"iteration": 0, "wall_seconds": 0.0, "model_calls/total": 0,
                       **{f"eval/{k}": v for k, v in self.base_eval.items()}})
        # Progress bar on a terminal only (disable=None), quiet in logs and CI.
        budgeted = c.train.max_seconds or c.train.max_model_calls  # then the iteration count is open
        total = None if budgeted else c.train.iterations
        bar = tqdm(total=total, initial=self.iteration, desc="train",
                   disable=None if c.train.progress and self.is_main else True, dynamic_ncols=True)
        last_eval = None
        while self.iteration < c.train.iterations and not self._budget_spent():
            if self._stop_requested():
                bar.close()
                self._stop()
            start = time.perf_counter()
            # The random state at the iteration's start, to checkpoint it should a reward fail (one process).
            before = (self._rng_state(), copy.deepcopy(self.method.state_dict())) if self.world == 1 else None
            try:
                record = self.step()
            except RewardError as err:
                bar.close()
                if before is not None:
                    self._save_after_reward_failure(err, *before)
                raise
            # The slowest rank's time, so every rank takes the same budget decision (else they hang).
            self.elapsed += max_over_ranks(self.accelerator, time.perf_counter() - start)
            self.iteration += 1
            record = {"iteration": self.iteration, "wall_seconds": round(self.elapsed, 3), **record}
            # Every stop decision must agree across ranks or they hang in the next collective: the
            # budget uses the slowest rank's time and summed calls; signals go through any_rank.
            final = self.iteration == c.train.iterations or self._budget_spent()
            if final or (c.eval.every and self.iteration % c.eval.every == 0):
                last_eval = self._evaluate(tag=f"iter_{self.iteration:06d}")
                record.update({f"eval/{k}": v for k, v in last_eval.items()})
            self._log(record)
            if self.tree_record is not None and (final or (c.log.tree_every and self.iteration % c.log.tree_every == 0)):
                self.logger.save_tree(self.tree_record)
            if final or (c.train.checkpoint_every and self.iteration % c.train.checkpoint_every == 0):
                self._checkpoint(final=final)
            bar.update(1)
            bar.set_postfix(reward=f"{record.get('train/reward_mean', float('nan')):.3f}")
        bar.close()
        if last_eval is None:
            last_eval = self._evaluate(tag=f"iter_{self.iteration:06d}")
        summary = {"iterations": self.iteration, "wall_seconds": round(self.elapsed, 3),
                   "model_calls": self.total_calls, "checkpoint_failures": self.checkpoint_failures,
                   "base": self.base_eval, "final": last_eval}
        if self.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.logger.finish()
        self.accelerator.wait_for_everyone()
        return summary

    def _save_after_reward_failure(self, err: RewardError, rng: dict[str, Any], window: Any) -> None:
        """A reward kept failing inside an iteration, before any update: put the random state back
        to the iteration's start and checkpoint the finished iterations, so a resume (with the reward
        working again) redoes that iteration exactly and nothing is lost. One process only: with
        several, a rank whose reward worked is already in a collective the failing one cannot join,
        so the run stops at its last periodic checkpoint (and no state is kept for this)."""
        if self.last_checkpoint != self.iteration:
            self.generator.set_state(torch.tensor(rng["generator"], dtype=torch.uint8))
            torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
            if "cuda" in rng:
                torch.cuda.set_rng_state_all([torch.tensor(c, dtype=torch.uint8) for c in rng["cuda"]])
            self.method.load_state_dict(window)
            try:
                self._checkpoint(final=True)
            except CheckpointWriteError as write_err:
                err.args = (f"{err}; and {write_err}",)
                return
        if self.last_checkpoint is not None:
            err.args = (f"{err}. The run is saved at iteration {self.last_checkpoint}; once the reward works again, "
                        f"continue it with: treegrpo train --resume {self.out}",)

    def _budget_spent(self) -> bool:
        t = self.config.train
        return bool((t.max_seconds and self.elapsed >= t.max_seconds) or
                    (t.max_model_calls and self.total_calls >= t.max_model_calls))

    # ------------------------------------------------------------------ one iteration
    def step(self) -> dict[str, float]:
        c, g = self.config, self.generator
        self.memory.reset()
        # Shared draws (identical on every rank): all prompts, the tree shape, one seed per prompt.
        all_prompts = self._pick_prompts()
        shape = self.method.shape_for(self.iteration, g)
        seeds = torch.randint(0, 2**62, (len(all_prompts),), generator=g).tolist()
        own = shard_slice(len(all_prompts), self.rank, self.world)
        prompts = all_prompts[own]
        # Per-prompt streams: a prompt's noise and minibatch split do not depend on which rank grows it.
        streams = [torch.Generator().manual_seed(s) for s in seeds[own]]
        cond = self.policy.encode_prompts(prompts)
        probed: dict[str, Any] = {}  # value-guided pruning: the probe's scores and values
        probe = self._probe(prompts, probed, seeds[own]) if c.method.prune_keep < 1 else None
        tree = rollout(self.policy, prompts, shape, num_steps=self.num_steps, sampler=self.method.sampler,
                       generator=streams, max_batch=c.train.max_batch, cond=cond, probe=probe)
        # Rewards on the decoded leaves; non-finite scores are masked out of statistics and training.
        images = decode_chunked(self.policy, tree.leaves, c.train.max_batch)
        leaf_prompts = [prompts[int(i)] for i in tree.leaf_prompt]
        scores = score_images(images, leaf_prompts, {n: self.rewards[n] for n in c.reward.weights}, c.train.max_batch)
        finite = torch.stack([torch.isfinite(s) for s in scores.values()]).all(dim=0)
        rule = self.method.advantage_rule
        nn_distance = None
        if self.gardo_feature is not None:  # GARDO: each leaf's distance to its nearest neighbour in its group
            nn_distance = group_nearest_neighbour(self.gardo_feature(images, leaf_prompts), tree.leaf_prompt,
                                                  self.gardo_feature.metric, finite)
        edge_adv = tree_advantages(tree, scores, weights=c.reward.weights, rule=rule.backup,  # type: ignore[arg-type]
                                   temperature=rule.temperature, per_depth=rule.per_depth, unbiased=rule.unbiased,
                                   global_std=rule.global_std, std_floor=rule.std_floor,
                                   edge_baseline=rule.edge_baseline, mask=finite,  # type: ignore[arg-type]
                                   sum_over_ranks=lambda t: all_sum(self.accelerator, t),
                                   probe_rewards=probed.get("scores") if c.method.prune_value == "probe" else None,
                                   diversity=nn_distance)
        batch = self.method.select_trained(tree, trained_edges(tree, edge_adv), streams)
        if self.method.spread is not None:  # the adaptive window learns from every iteration
            self._observe_spread(tree, scores, finite)
        if self.is_main:  # the main rank owns the iteration's first prompt
            self.tree_record = record_tree(tree, edge_adv, images, scores, prompts, self.iteration + 1,
                                           c.reward.weights, thumbnail_size=c.log.tree_thumbnail,
                                           probe_rewards=probed.get("scores"))
        n_finite = float(finite.sum())
        record: dict[str, float] = {
            "window_start": float(shape.trained_steps[0]) if shape.trained_steps else -1.0,
            "leaves": float(tree.leaves.shape[0]),
            "nonfinite_rewards": float((~finite).sum()),
            "train/advantage_abs_mean": float(batch.advantage.abs().mean()),
        }
        weights = {"train/advantage_abs_mean": float(batch.num_edges)}  # how ranks' means combine
        if c.method.prune_keep < 1:
            record["pruned_nodes"] = float(tree.num_pruned)
            record["model_calls/saved"] = float(tree.num_pruned * shape.tail_calls())
            value = probed["value"]
            record["train/probe_reward_mean"] = float(value[torch.isfinite(value)].mean())
            weights["train/probe_reward_mean"] = float(torch.isfinite(value).sum())
            corr, n = probe_correlation(value[tree.kept], self._weighted(scores), tree.leaf_prompt)
            record["prune/probe_leaf_corr"], weights["prune/probe_leaf_corr"] = corr, n
        if nn_distance is not None:
            record["train/diversity_nn"] = float(nn_distance[finite].mean()) if finite.any() else float("nan")
            weights["train/diversity_nn"] = n_finite
        weighted = self._weighted(scores)
        record["train/reward_mean"] = float(weighted[finite].mean()) if finite.any() else float("nan")
        weights["train/reward_mean"] = n_finite
        for name, s in scores.items():
            record[f"train/{name}_mean"] = float(s[finite].mean()) if finite.any() else float("nan")
            record[f"train/{name}_std"] = float(s[finite].std(unbiased=False)) if finite.any() else float("nan")
            weights[f"train/{name}_mean"] = weights[f"train/{name}_std"] = n_finite
        train_calls = 0
        # One decision for all ranks: a rank whose leaves are all masked still trains (its
        # advantages are 0), as one process holding all prompts would.
        if any_rank(self.accelerator, bool(finite.any())):
            if c.optim.objective in ("policy_gradient", "both"):
                stats, train_calls = self._update(batch, cond, streams)
                record.update(stats)
            if c.optim.objective in ("flow_matching", "both"):
                # After the policy gradient's steps (objective both) the flow-matching step starts
                # from the updated weights; its loss and gradient norm keep their own names then.
                stats, calls = self._update_matching(tree.leaves, tree.leaf_prompt, scores, finite, cond, streams,
                                                     diversity=nn_distance, shape=shape)
                if c.optim.objective == "both":
                    stats = {("train/matching_grad_norm" if k == "train/grad_norm" else k): v
                             for k, v in stats.items() if k != "train/loss"}
                record.update(stats)
                train_calls += calls
        record["model_calls/rollout"] = float(tree.num_model_calls)
        record["model_calls/train"] = float(train_calls)
        record["lr"] = float(self.optimizer.param_groups[0]["lr"])
        record.update(self.memory.metrics())
        record = reduce_metrics(self.accelerator, record, weights)
        self.total_calls += int(record["model_calls/rollout"] + record["model_calls/train"])
        record["model_calls/total"] = float(self.total_calls)
        return record

    def _weighted(self, scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """[L] the weighted training reward of each image (non-finite scores count as 0)."""
        return sum(self.config.reward.weights[n] * torch.nan_to_num(s) for n, s in scores.items())  # type: ignore[return-value]

    def _probe(self, prompts: list[str], probed: dict[str, Any], seeds: list[int]):
        """The rollout's value probe: decode the clean estimates [N, ...] of the prune level, score
        them with the training rewards, keep each prompt's max-spread share (`treegrpo.pruning`), or
        with `prune_select: random` a random share of the same size (drawn from the prompt's seed)."""
        c = self.config

        def probe(x0: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
            images = decode_chunked(self.policy, x0, c.train.max_batch)
            scores = score_images(images, [prompts[int(i)] for i in prompt_index],
                                  {n: self.rewards[n] for n in c.reward.weights}, c.train.max_batch)
            finite = torch.stack([torch.isfinite(s) for s in scores.values()]).all(dim=0)
            value = torch.where(finite, self._weighted(scores), torch.full_like(finite, math.nan, dtype=torch.float32))
            probed.update(scores=scores, value=value)
            if c.method.prune_select == "random":  # its own stream per prompt, apart from the rollout's noise
                return random_subset(prompt_index.cpu(), c.method.prune_keep, [s ^ 0x5EED for s in seeds])
            return max_spread_subset(value, prompt_index.cpu(), c.method.prune_keep)

        return probe

    def _observe_spread(self, tree: Any, scores: dict[str, torch.Tensor], finite: torch.Tensor) -> None:
        """Adaptive window: per step, how much sibling subtrees' mean rewards differed (summed over
        ranks, so every rank's schedule stays the same)."""
        values = backup(tree, self._weighted(scores), leaf_mask=finite)
        valid = backup(tree, torch.ones(finite.shape), leaf_mask=finite)  # 1 where a subtree has leaves, else 0
        sums = sibling_spread(tree, values, [None if v is None else v > 0.5 for v in valid])
        assert self.method.spread is not None
        self.method.spread.update(all_sum(self.accelerator, sums))

    def _pick_prompts(self) -> list[str]:
        if not self.train_prompts:
            raise ConfigError("no training prompts")
        return draw_prompts(self.train_prompts, self.config.train.prompts_per_iteration, self.generator,
                            self.prompt_groups)

    # ------------------------------------------------------------------ the update
    def _edge_log_probs(self, batch: EdgeBatch, cond: Any, with_reference: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """New log-probs [E] of the batch's edges (one forward per node) and, if asked, the per-node
        KL [N] to the reference policy."""
        step = batch.step
        out = self.policy.predict(batch.x, self.schedule.times[step], cond, batch.prompt)
        mean, std = transition(self.schedule, self.method.sampler, batch.x, out, step, stochastic=True)
        assert std is not None
        log_prob = gaussian_log_prob(batch.child, mean[batch.edge_node], std[batch.edge_node])
        kl = None
        if with_reference and self.reference is not None:
            with torch.no_grad():
                ref_out = self.reference.predict(batch.x, self.schedule.times[step], cond, batch.prompt)
                ref_mean, _ = transition(self.schedule, self.method.sampler, batch.x, ref_out, step, stochastic=True)
            kl = kl_to_reference(mean, ref_mean, std)
        return log_prob, kl

    def _chunks(self, batch: EdgeBatch) -> list[EdgeBatch]:
        size = self.config.train.max_batch
        return [batch.select_nodes(torch.arange(s, min(s + size, batch.num_nodes))) for s in range(0, batch.num_nodes, size)]

    def _update(self, batch: EdgeBatch, cond: Any, streams: list[torch.Generator]) -> tuple[dict[str, float], int]:
        o = self.config.optim
        # Per-prompt splits: every rank's minibatch j holds the same number of nodes, so DDP's mean
        # of the ranks' gradients equals the one-process gradient of the union.
        # Weight per step (optim.step_weight), from the whole iteration's nodes (before the split).
        gains = self.step_gains
        weight_table = step_weights(batch.step, o.step_weight, gains, None if gains is None else float(gains[0]))
        minibatches = batch.minibatches_per_prompt(o.minibatches, streams)
        calls = 0
        if o.recompute_old_log_probs:
            # theta_old = the current parameters, evaluated in exactly the training layout (outputs
            # can depend on batch composition), so the first minibatch's ratio is exactly 1.
            with torch.no_grad():
                for mb in minibatches:
                    mb.old_log_prob = torch.cat([self._edge_log_probs(ch, cond)[0] for ch in self._chunks(mb)])
                    calls += mb.num_nodes
        # (value, weight) per chunk: chunk means weighted by their nodes, so the diagnostics do not
        # depend on how nodes fall into chunks (max_batch, number of processes).
        totals: dict[str, list[tuple[float, float]]] = {}
        for _ in range(o.epochs):
            for mb in minibatches:
                self.optimizer.zero_grad(set_to_none=True)
                chunks = self._chunks(mb)
                for n, chunk in enumerate(chunks):
                    # Gradients are all-reduced once per minibatch: on its last chunk only.
                    sync = n == len(chunks) - 1
                    with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model):
                        log_prob, kl = self._edge_log_probs(chunk, cond, with_reference=o.kl_coef > 0)
                        out = policy_loss(log_prob, chunk.old_log_prob, chunk.advantage, chunk.edge_node,
                                          chunk.num_nodes, clip_range=o.clip_range, adv_clip=o.adv_clip, kl=kl,
                                          kl_coef=o.kl_coef, kl_per_edge=o.kl_per_edge,
                                          node_weight=None if o.step_weight == "none" else weight_table[chunk.step])
                        self.accelerator.backward(out.loss * chunk.num_nodes / mb.num_nodes)
                    calls += chunk.num_nodes
                    for k, v in out.stats.items():
                        totals.setdefault(k, []).append((v, chunk.num_nodes))
                    if "first_ratio_dev" not in totals:  # on-policy check: 0 when old log-probs match
                        totals["first_ratio_dev"] = [(max(abs(out.stats["ratio_min"] - 1), abs(out.stats["ratio_max"] - 1)), 1)]
                self._optimizer_step(totals)
        stats = {f"train/{k}": sum(v * w for v, w in vw) / sum(w for _, w in vw) for k, vw in totals.items()}
        if "train/ratio_min" in stats:
            stats["train/ratio_min"] = min(v for v, _ in totals["ratio_min"])
            stats["train/ratio_max"] = max(v for v, _ in totals["ratio_max"])
        return stats, calls

    def _optimizer_step(self, totals: dict[str, list[tuple[float, float]]]) -> None:
        """Clip the accumulated gradient (its norm goes into `totals`), step, and update the EMA."""
        grad_norm = self.accelerator.clip_grad_norm_(self.params, self.config.optim.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 on CPU: a DTensor (replicated)
            grad_norm = grad_norm.full_tensor()
        totals.setdefault("grad_norm", []).append((float(grad_norm), 1))
        if not math.isfinite(float(grad_norm)):
            raise FloatingPointError("non-finite gradient; lower optim.lr or check the rewards")
        self.optimizer.step()
        self.lr_schedule.step()
        if self.ema is not None:
            self.ema.update()

    def _velocity(self, policy: Any, x: torch.Tensor, times: torch.Tensor, cond: Any, prompt: torch.Tensor) -> torch.Tensor:
        """The velocity the flow-matching objective trains: guided as sampled, or with
        optim.matching_guidance=false the conditional branch alone (guidance scale 1)."""
        owner = policy.policy if isinstance(policy, BaseModelView) else policy  # LoRA's reference: the same policy
        if self.config.optim.matching_guidance or not hasattr(owner, "guidance_scale"):  # no CFG (analytic)
            return policy.predict(x, times, cond, prompt)
        scale, owner.guidance_scale = owner.guidance_scale, 1.0  # u + 1 (c - u) = c, one branch
        try:
            return policy.predict(x, times, cond, prompt)
        finally:
            owner.guidance_scale = scale

    def _update_matching(self, leaves: torch.Tensor, leaf_prompt: torch.Tensor, scores: dict[str, torch.Tensor],
                         finite: torch.Tensor, cond: Any, streams: list[torch.Generator],
                         diversity: torch.Tensor | None = None,
                         shape: TreeShape | None = None) -> tuple[dict[str, float], int]:
        """optim.objective=flow_matching: DiffusionNFT's loss (`flow_matching_loss`) on the leaves.

        Leaf advantages are the policy gradient's leaf advantages (`leaf_advantages`): the rewards
        combined as there, standardised per prompt by the method's leaf rule (unbiased_std,
        global_std, std_floor), or with GARDO (`diversity`: each leaf's nearest-neighbour distance)
        its diversity-weighted ones. Each of
        optim.matching_draws draws picks one schedule step and one noise per prompt, shared by its
        leaves: the noise's part of the gradient then cancels between a prompt's leaves, whose
        weights are centred. Prompts split into optim.minibatches optimiser steps (prompt p in
        minibatch p mod m); v_old is the rollout policy's velocity at the same inputs. With
        optim.matching_steps=stochastic the steps are drawn among `shape`'s stochastic steps only."""
        o, sched = self.config.optim, self.schedule
        steps = torch.arange(len(sched.times))
        if o.matching_steps == "stochastic" and shape is not None and any(shape.stochastic):
            steps = torch.tensor([i for i, s in enumerate(shape.stochastic) if s])
        rule = self.method.advantage_rule  # the method's leaf rule (its edge rule has no part here)
        advantage = leaf_advantages(scores, self.config.reward.weights, leaf_prompt, mask=finite, eps=1e-4,
                                    unbiased=rule.unbiased, global_std=rule.global_std, std_floor=rule.std_floor,
                                    sum_over_ranks=lambda t: all_sum(self.accelerator, t), diversity=diversity)
        r_all = matching_weights(advantage, leaf_prompt, finite)
        rows = finite.nonzero().squeeze(1)
        x0, group, r = leaves[rows].float(), leaf_prompt[rows], r_all[rows]
        xs, times, targets, prompts, weights = [], [], [], [], []
        for _ in range(o.matching_draws):
            step = steps[torch.stack([torch.randint(0, len(steps), (1,), generator=s) for s in streams]).view(-1)]
            eps = torch.stack([torch.randn(leaves.shape[1:], generator=s) for s in streams])
            sigma = sched.sigmas[step[group]].view(-1, *([1] * (x0.ndim - 1))).to(x0)
            noise = eps[group].to(x0)
            xs.append((1 - sigma) * x0 + sigma * noise)
            targets.append(noise - x0)
            times.append(sched.times[step[group]])  # the model's time input (SD3: 1000 sigma)
            prompts.append(group)
            weights.append(r)
        x, t, target, prompt, w = (torch.cat(v) for v in (xs, times, targets, prompts, weights))
        size, calls = self.config.train.max_batch, 0
        minibatches = [(prompt % o.minibatches == j).nonzero().squeeze(1) for j in range(o.minibatches)]
        minibatches = [mb for mb in minibatches if mb.numel()]
        v_old: torch.Tensor | None = None
        if o.minibatches * o.epochs > 1:  # later steps need the rollout policy's velocity, not the current one
            with torch.no_grad():
                v_old = torch.cat([self._velocity(self.policy, x[s:s + size], t[s:s + size], cond, prompt[s:s + size])
                                   for s in range(0, x.shape[0], size)])
            calls += x.shape[0]
        totals: dict[str, list[tuple[float, float]]] = {}
        for _ in range(o.epochs):
            for mb in minibatches:
                self.optimizer.zero_grad(set_to_none=True)
                chunks = [mb[s:s + size] for s in range(0, mb.numel(), size)]
                for n, idx in enumerate(chunks):
                    sync = n == len(chunks) - 1
                    with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model):
                        v = self._velocity(self.policy, x[idx], t[idx], cond, prompt[idx])
                        v_ref = None
                        if o.kl_coef > 0 and self.reference is not None:
                            with torch.no_grad():
                                v_ref = self._velocity(self.reference, x[idx], t[idx], cond, prompt[idx])
                        out = flow_matching_loss(v, v.detach() if v_old is None else v_old[idx].to(v), target[idx].to(v),
                                                 w[idx], o.matching_beta, v_ref=v_ref, kl_coef=o.kl_coef,
                                                 negatives=o.matching_negatives)
                        self.accelerator.backward(out.loss * idx.numel() / mb.numel())
                    calls += idx.numel()
                    for k, val in out.stats.items():
                        totals.setdefault(k, []).append((val, idx.numel()))
                self._optimizer_step(totals)
        stats = {f"train/{k}": sum(v * wt for v, wt in vw) / sum(wt for _, wt in vw) for k, vw in totals.items()}
        return stats, calls

    # ------------------------------------------------------------------ eval, logs, checkpoints
    def _grid_rows(self) -> list[int]:
        """Indices of the eval prompts shown in the sample grids (a fixed spread)."""
        n = min(self.config.eval.grid_prompts, len(self.eval_prompts))
        order = torch.randperm(len(self.eval_prompts), generator=torch.Generator().manual_seed(0))[:n]
        return sorted(order.tolist())

    def _evaluate(self, tag: str) -> dict[str, float]:
        """Held-out evaluation, prompts sharded over ranks (padded to equal shards: sharded models'
        forwards are collective); per-image scores and the grid's images are gathered, so every rank
        returns the same metrics, and the main process writes the grid."""
        c = self.config
        eval_rewards = {n: self.rewards[n] for n in c.reward.eval}
        local, real = padded_shard(self.eval_prompts, self.rank, self.world)
        with self._ema_weights():
            per_image, images = evaluate_per_image(self.policy, local, self.eval_seeds, eval_rewards, self.num_steps,
                                                   c.train.max_batch, accuracy=self.accuracy,
                                                   diversity=self.diversity_features)
        num_seeds = len(self.eval_seeds)
        per_image = {k: v[:real * num_seeds] for k, v in per_image.items()}
        # The grid: the same prompts (rows) and held-out seeds (columns) every time, taken from the
        # evaluation's own samples (prompt-major, so each row is one prompt's seeds).
        first = shard_slice(len(self.eval_prompts), self.rank, self.world).start
        rows = [i - first for i in self.grid_rows if first <= i < first + real]
        grid_images = images.view(len(local), num_seeds, *images.shape[1:])[rows].flatten(0, 1)
        if self.world > 1:
            from accelerate.utils import gather_object

            parts = gather_object([(per_image, grid_images)])  # rank order = prompt order
            per_image = {k: torch.cat([part[0][k] for part in parts]) for k in per_image}
            grid_images = torch.cat([part[1] for part in parts])
        metrics = summarize_eval(per_image)
        if self.is_main:
            grid = image_grid(grid_images, len(self.grid_rows), num_seeds)
            save_image(grid, self.out / "samples" / f"{tag}.png")
            self.logger.log_grid(tag, grid, self.iteration, [self.eval_prompts[i] for i in self.grid_rows],
                                 self.eval_seeds)
            start = self.out / "samples" / "start.png"
            if tag != "start" and start.is_file():
                from PIL import Image

                save_image(side_by_side(Image.open(start).convert("RGB"), grid), self.out / "samples" / "start_vs_latest.png")
        self._diversity_grid(tag)
        return metrics

    def _ema_weights(self) -> contextlib.AbstractContextManager:
        """The model holds the EMA weights inside the block (when optim.ema_decay > 0), the raw ones after."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def _diversity_grid(self, tag: str) -> None:
        """samples/diversity/TAG.png: eval.diversity_grid_prompts of the grid's prompts (rows) x
        eval.diversity_grid_seeds held-out seeds (columns). Every rank samples the same few images
        (sharded models' forwards are collective); the main process writes them."""
        e = self.config.eval
        rows = [self.eval_prompts[i] for i in self.grid_rows[:e.diversity_grid_prompts]]
        if not rows:
            return
        seeds = [e.seed_offset + i for i in range(e.diversity_grid_seeds)]
        with self._ema_weights():
            images = ode_sample(self.policy, rows, seeds, self.num_steps, self.config.train.max_batch)
        if self.is_main:
            folder = self.out / "samples" / "diversity"
            save_image(image_grid(images, len(rows), len(seeds)), folder / f"{tag}.png")
            index = {"prompts": rows, "seeds": seeds, "grids": {tag: self.iteration}}
            if (folder / "index.json").is_file():
                old = json.loads((folder / "index.json").read_text())
                index["grids"] = {**old.get("grids", {}), tag: self.iteration}
            (folder / "index.json").write_text(json.dumps(index, indent=1) + "\n")

    def _log(self, record: dict[str, Any]) -> None:
        self.logger.log(record)

    def _rng_state(self) -> dict[str, Any]:
        """This rank's random state: torch's CPU (and CUDA) generators and the shared generator."""
        state: dict[str, Any] = {"torch": torch.get_rng_state().tolist(), "generator": self.generator.get_state().tolist()}
        if torch.cuda.is_available():
            state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
        return state

    def _sharded(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def _fsdp(self) -> bool:
        """FSDP through accelerate (GPU) or through torch's fully_shard (CPU processes, see `_fully_shard`)."""
        from accelerate.utils import DistributedType

        return self.cpu_fsdp or self.accelerator.distributed_type == DistributedType.FSDP

    def _fully_shard(self, module: torch.nn.Module) -> torch.nn.Module:
        """FSDP on CPU processes (gloo), which accelerate 1.15 does not do: torch's FSDP2 `fully_shard`
        on the whole trainable module, one FSDP unit (parameters, gradients and AdamW state sharded over
        the ranks; the full parameters are gathered for each forward). accelerate's FSDP options
        (version, auto-wrap policy, offload...) do not apply on CPU; say so."""
        from torch.distributed.fsdp import fully_shard

        if self.is_main:
            warnings.warn("FSDP on CPU processes: accelerate does not shard on CPU, so treegrpo applies torch's FSDP2 "
                          "fully_shard to the whole trainable module as one unit; the FSDP_* options of the accelerate "
                          "config (version, auto-wrap policy, offload, state-dict type) are not used on CPU")
        fully_shard(module)  # in place: the parameters become DTensor shards, forward gathers them
        return module

    def _prepare_sharded(self) -> None:
        """accelerate's FSDP / DeepSpeed: untested on GPU here (FSDP is tested on CPU processes through
        `_fully_shard`; no deepspeed in CI); say so, and give DeepSpeed the micro-batch size it insists on
        when there is no dataloader."""
        if self.is_main:
            what = ("the checkpoint holds the full optimiser state (torch.distributed.checkpoint), as tested with "
                    "FSDP2 on CPU" if self._fsdp() else "checkpoints will not hold the sharded optimiser state")
            warnings.warn(f"{self.accelerator.distributed_type.value} on GPU is untested with treegrpo (DDP, and FSDP "
                          f"on CPU processes, are tested); {what}")
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and plugin.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1

    def _checkpoint(self, final: bool = False) -> None:
        """Write a checkpoint: every rank takes part (RNG states are gathered, sharded weights too),
        the main process writes. A failed write (disk full...) leaves the previous checkpoint valid:
        the run warns and tries again at the next checkpoint, but a failed final checkpoint is an error."""
        from accelerate.utils import gather_object

        rng = gather_object([self._rng_state()]) if self.world > 1 else [self._rng_state()]
        weights = trainable_state_dict(self.policy)  # the unwrapped module's trainable entries
        optimizer_state: dict[str, Any] | None
        if self._fsdp():
            # Shards on every rank: gathered (collectively) into full weights and a full optimiser
            # state keyed by parameter names, so a resume re-shards them on any number of processes.
            full = full_model_state(self.model)
            weights = {k: full[k] for k in weights if k in full}
            optimizer_state = full_optimizer_state(self.model, self.optimizer.optimizer)
        elif self._sharded():
            # DeepSpeed ZeRO holds shards: gather full weights; its optimiser shards are not saved.
            full = self.accelerator.get_state_dict(self.model)
            weights = {k: full[k] for k in weights if k in full}
            optimizer_state = None
            if self.is_main:
                warnings.warn("DeepSpeed: the checkpoint holds the full trainable weights but not the sharded "
                              "optimiser state; a resume restarts AdamW's moments (untested path)")
        else:
            optimizer_state = self.optimizer.state_dict()
        state = {"iteration": self.iteration, "wall_seconds": self.elapsed, "model_calls": self.total_calls,
                 "world_size": self.world, "rng": rng, "window_schedule": self.method.state_dict(),
                 "lr_schedule": self.lr_schedule.state_dict(), "base_eval": self.base_eval,
                 "checkpoint_failures": self.checkpoint_failures}
        error: Exception | None = None
        if self.is_main:
            try:
                save_checkpoint(self.out, self.iteration, weights, optimizer_state, state,
                                keep=self.config.train.keep_checkpoints,
                                ema_weights=None if self.ema is None else self.ema.state_dict())
                if self.config.model.lora_rank > 0 and hasattr(self.policy, "save_lora_weights"):
                    # The LoRA result in diffusers' format (pipe.load_lora_weights(RUN_DIR/lora)); written
                    # atomically by the policy, which holds the unwrapped module. The EMA, when kept.
                    with self._ema_weights():
                        self.policy.save_lora_weights(self.out / "lora")
                elif self.config.model.lora_rank == 0 and hasattr(self.policy, "save_denoiser"):
                    # Full fine-tuning: the denoiser in diffusers' format (RUN_DIR/transformer or /unet), so
                    # Pipeline.from_pretrained(base, transformer=Model.from_pretrained(RUN_DIR/transformer)) reads it.
                    with self._ema_weights():
                        self.policy.save_denoiser(self.out / self.policy.denoiser_name)
            except (CheckpointWriteError, OSError) as err:
                error = err
        # Every rank learns the outcome, so all of them go on (or stop) together.
        if any_rank(self.accelerator, error is not None):
            self.checkpoint_failures += 1
            reason = str(error) if error is not None else "the main process could not write the checkpoint"
            if final:
                raise CheckpointWriteError(f"the final checkpoint could not be written: {reason}. Free space and rerun "
                                           f"the same command to continue from the last valid checkpoint") from error
            if self.is_main:
                print(f"treegrpo: warning: {reason}; training goes on and retries at the next checkpoint", file=sys.stderr)
            return
        self.last_checkpoint = self.iteration

    def _resume_point(self) -> Path | None:
        """The verified checkpoint to resume from (a damaged newest one raises CheckpointError). The
        main process verifies and tells the others: hashing a full model's checkpoint on every rank
        would read it once per process."""
        if self.world == 1:
            return resume_checkpoint(self.out)
        from accelerate.utils import broadcast_object_list

        found: list[Any] = [None]
        if self.is_main:
            try:
                ckpt = resume_checkpoint(self.out)
                found = [("ok", None if ckpt is None else str(ckpt))]
            except CheckpointError as err:
                found = [("error", str(err))]
        broadcast_object_list(found, from_process=0)
        kind, value = found[0]
        if kind == "error":
            raise CheckpointError(value)
        return None if value is None else Path(value)

    def _maybe_resume(self) -> bool:
        ckpt = self._resume_point()
        if ckpt is None:
            return False
        check_resume_config(self.out / "config.yaml", self.config)
        state, optimizer_state = load_state(ckpt)
        weights = load_weights(ckpt / WEIGHTS)  # the file: already verified above
        if self._fsdp():  # every rank loads the full state and keeps its shards
            load_full_model_state(self.model, weights)
            if optimizer_state is not None:
                load_full_optimizer_state(self.model, self.optimizer.optimizer, optimizer_state)
        else:
            load_trainable_state_dict(self.policy, weights)
            if optimizer_state is not None:
                self.optimizer.load_state_dict(optimizer_state)
        if self.ema is not None:
            if not (ckpt / EMA_WEIGHTS).is_file():
                raise CheckpointError(f"checkpoint {ckpt} holds no EMA weights ({EMA_WEIGHTS}) but optim.ema_decay > 0")
            self.ema.load_state_dict(load_weights(ckpt / EMA_WEIGHTS))
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.method.load_state_dict(state.get("window_schedule"))
        rng = state.get("rng") or [{"torch": state["torch_rng"], "generator": state["generator"]}]
        # The shared generator is the same on every rank, so any rank's copy serves.
        self.generator.set_state(torch.tensor(rng[0]["generator"], dtype=torch.uint8))
        if len(rng) == self.world:
            own = rng[self.rank]
            torch.set_rng_state(torch.tensor(own["torch"], dtype=torch.uint8))
            if "cuda" in own and torch.cuda.is_available() and len(own["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in own["cuda"]])
        elif self.is_main:
            # Training draws come from the shared generator, so the run continues identically;
            # only the per-process torch generators start fresh.
            warnings.warn(f"checkpoint written by {len(rng)} processes, resumed on {self.world}: per-process torch "
                          "RNG states are not restored (training noise comes from the shared generator)")
        self.iteration, self.elapsed, self.total_calls = state["iteration"], state["wall_seconds"], state["model_calls"]
        self.base_eval = state.get("base_eval")
        self.checkpoint_failures = state.get("checkpoint_failures", 0)
        self.last_checkpoint = self.iteration
        if self.is_main:
            # Drop metrics written after the checkpoint (and a line cut short by a kill), so the log
            # matches an uninterrupted run.
            truncate_metrics(self.out / "metrics.jsonl", self.iteration)
            print(f"resuming {self.out} from {ckpt.name} (iteration {self.iteration})")
        self.accelerator.wait_for_everyone()
        return True
