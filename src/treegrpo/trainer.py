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
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from treegrpo.advantages import tree_advantages
from treegrpo.checkpoint import WEIGHTS, CheckpointWriteError, load_state, load_weights, resume_checkpoint, save_checkpoint
from treegrpo.config import Config, ConfigError, check_resume_config, save_config
from treegrpo.evaluation import evaluate, image_grid, save_image, score_images, side_by_side, decode_chunked
from treegrpo.loss import kl_to_reference, policy_loss
from treegrpo.methods import Method
from treegrpo.policies import Policy, build_policy, load_trainable_state_dict, trainable_state_dict
from treegrpo.policies.lora import BaseModelView
from treegrpo.prompts import load_prompts
from treegrpo.rewards import build_rewards
from treegrpo.rewards.retry import with_retries
from treegrpo.rollout import rollout, transition
from treegrpo.steps import gaussian_log_prob
from treegrpo.stopping import StopSignals, TrainingStopped
from treegrpo.tracking import RunLogger, truncate_metrics
from treegrpo.tree import EdgeBatch, trained_edges
from treegrpo.tree_record import TreeRecord, record_tree


class Trainer:
    """Runs one configured training job into `output_dir` (resuming if it holds a checkpoint)."""

    def __init__(self, config: Config, output_dir: str | Path, policy: Policy | None = None,
                 train_prompts: list[str] | None = None) -> None:
        self.config = config
        self.out = Path(output_dir)
        torch.manual_seed(config.train.seed)
        # Prompt files first: a missing or malformed one fails before the model is loaded.
        self.train_prompts = train_prompts or load_prompts(config.train.prompts)
        self.eval_prompts = load_prompts(config.eval.prompts)
        self.policy = policy or build_policy(config.model)
        self.num_steps = config.model.num_steps
        self.schedule = self.policy.schedule(self.num_steps)
        self.method = Method(config.method, self.num_steps)
        self.eval_seeds = [config.eval.seed_offset + i for i in range(config.eval.num_seeds)]
        names = set(config.reward.weights) | set(config.reward.eval)
        # A reward that raises (e.g. a remote scorer timing out) is retried before the run fails.
        self.rewards = with_retries(build_rewards(names, config.reward.options), config.reward.retries,
                                    config.reward.retry_delay)
        self.params = [p for p in self.policy.trainable_parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("the policy has no trainable parameters")
        o = config.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        warmup = max(o.warmup_iterations * o.minibatches * o.epochs, 0)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda n: min(1.0, (n + 1) / warmup) if warmup else 1.0)
        self.reference = None
        if o.kl_coef > 0:
            # The KL reference is the starting model: with LoRA the same network with adapters off,
            # else a frozen copy taken now (cheap for the embedded model).
            if config.model.lora_rank > 0:
                self.reference = BaseModelView(self.policy)
            else:
                self.reference = copy.deepcopy(self.policy)
                for p in self.reference.trainable_parameters():
                    p.requires_grad_(False)
        self.generator = torch.Generator().manual_seed(config.train.seed)
        self.iteration = 0
        self.elapsed = 0.0
        self.total_calls = 0
        self.base_eval: dict[str, float] | None = None
        self.grid_rows = self._grid_rows()
        self.tree_record: TreeRecord | None = None  # the last iteration's tree of its first prompt, for the report
        self.checkpoint_failures = 0  # checkpoints that could not be written (disk full...); retried at the next one
        self.last_checkpoint: int | None = None  # iteration of the newest checkpoint on disk
        self.signals = StopSignals(lambda: f"finishing iteration {self.iteration + 1}, then checkpointing")

    def _stop_requested(self) -> bool:
        """Whether a SIGINT / SIGTERM asked this run to stop (checked between iterations)."""
        return self.signals.requested

    def _stop(self) -> None:
        """Checkpoint the finished iterations and raise TrainingStopped (exit code and message in it)."""
        assert self.signals.signum is not None
        if self.last_checkpoint != self.iteration:
            self._checkpoint(final=True)
        self.logger.finish()
        raise TrainingStopped(self.signals.signum, self.iteration, str(self.out))

    # ------------------------------------------------------------------ run
    def train(self) -> dict[str, Any]:
        """Run (or resume) to the end; a first SIGINT / SIGTERM stops after the current iteration
        with a checkpoint (raises `TrainingStopped`), a second aborts (raises `Aborted`)."""
        with self.signals:
            return self._train()

    def _train(self) -> dict[str, Any]:
        c = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        resumed = self._maybe_resume()
        save_config(c, self.out / "config.yaml")
        self.logger = RunLogger(self.out, c.log.trackers, c.to_dict())
        if not resumed:
            (self.out / "metrics.jsonl").write_text("")
            self.base_eval = self._evaluate(tag="start")
            self._log({"iteration": 0, "wall_seconds": 0.0, "model_calls/total": 0,
                       **{f"eval/{k}": v for k, v in self.base_eval.items()}})
        # Progress bar on a terminal only (disable=None), quiet in logs and CI.
        budgeted = c.train.max_seconds or c.train.max_model_calls  # then the iteration count is open
        total = None if budgeted else c.train.iterations
        bar = tqdm(total=total, initial=self.iteration, desc="train", disable=None if c.train.progress else True,
                   dynamic_ncols=True)
        last_eval = None
        while self.iteration < c.train.iterations and not self._budget_spent():
            if self._stop_requested():
                bar.close()
                self._stop()
            start = time.perf_counter()
            record = self.step()
            self.elapsed += time.perf_counter() - start
            self.iteration += 1
            record = {"iteration": self.iteration, "wall_seconds": round(self.elapsed, 3), **record}
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
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.logger.finish()
        return summary

    def _budget_spent(self) -> bool:
        t = self.config.train
        return bool((t.max_seconds and self.elapsed >= t.max_seconds) or
                    (t.max_model_calls and self.total_calls >= t.max_model_calls))

    # ------------------------------------------------------------------ one iteration
    def step(self) -> dict[str, float]:
        c, g = self.config, self.generator
        prompts = self._pick_prompts()
        shape = self.method.shape_for(self.iteration, g)
        cond = self.policy.encode_prompts(prompts)
        tree = rollout(self.policy, prompts, shape, num_steps=self.num_steps, sampler=self.method.sampler,
                       generator=g, max_batch=c.train.max_batch, cond=cond)
        # Rewards on the decoded leaves; non-finite scores are masked out of statistics and training.
        images = decode_chunked(self.policy, tree.leaves, c.train.max_batch)
        leaf_prompts = [prompts[int(i)] for i in tree.leaf_prompt]
        scores = score_images(images, leaf_prompts, {n: self.rewards[n] for n in c.reward.weights}, c.train.max_batch)
        finite = torch.stack([torch.isfinite(s) for s in scores.values()]).all(dim=0)
        rule = self.method.advantage_rule
        edge_adv = tree_advantages(tree, scores, weights=c.reward.weights, rule=rule.backup,  # type: ignore[arg-type]
                                   temperature=rule.temperature, per_depth=rule.per_depth, unbiased=rule.unbiased,
                                   global_std=rule.global_std, mask=finite)
        batch = trained_edges(tree, edge_adv)
        self.tree_record = record_tree(tree, edge_adv, images, scores, prompts, self.iteration + 1, c.reward.weights,
                                       thumbnail_size=c.log.tree_thumbnail)
        record: dict[str, float] = {
            "window_start": float(shape.trained_steps[0]) if shape.trained_steps else -1.0,
            "leaves": float(tree.leaves.shape[0]),
            "nonfinite_rewards": float((~finite).sum()),
            "train/advantage_abs_mean": float(batch.advantage.abs().mean()),
        }
        weighted = sum(c.reward.weights[n] * torch.nan_to_num(s) for n, s in scores.items())
        record["train/reward_mean"] = float(weighted[finite].mean()) if finite.any() else float("nan")
        for name, s in scores.items():
            record[f"train/{name}_mean"] = float(s[finite].mean()) if finite.any() else float("nan")
            record[f"train/{name}_std"] = float(s[finite].std(unbiased=False)) if finite.any() else float("nan")
        train_calls = 0
        if finite.any():
            stats, train_calls = self._update(batch, cond)
            record.update(stats)
        record["model_calls/rollout"] = float(tree.num_model_calls)
        record["model_calls/train"] = float(train_calls)
        self.total_calls += tree.num_model_calls + train_calls
        record["model_calls/total"] = float(self.total_calls)
        record["lr"] = float(self.optimizer.param_groups[0]["lr"])
        return record

    def _pick_prompts(self) -> list[str]:
        n = self.config.train.prompts_per_iteration
        pool = self.train_prompts
        if not pool:
            raise ConfigError("no training prompts")
        picks = []
        while len(picks) < n:  # without replacement within a pass over the pool
            order = torch.randperm(len(pool), generator=self.generator).tolist()
            picks.extend(pool[i] for i in order[: n - len(picks)])
        return picks

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

    def _update(self, batch: EdgeBatch, cond: Any) -> tuple[dict[str, float], int]:
        o = self.config.optim
        minibatches = batch.minibatches(o.minibatches, self.generator)
        calls = 0
        if o.recompute_old_log_probs:
            # theta_old = the current parameters, evaluated in exactly the training layout (outputs
            # can depend on batch composition), so the first minibatch's ratio is exactly 1.
            with torch.no_grad():
                for mb in minibatches:
                    mb.old_log_prob = torch.cat([self._edge_log_probs(ch, cond)[0] for ch in self._chunks(mb)])
                    calls += mb.num_nodes
        totals: dict[str, list[float]] = {}
        for _ in range(o.epochs):
            for mb in minibatches:
                self.optimizer.zero_grad(set_to_none=True)
                for chunk in self._chunks(mb):
                    log_prob, kl = self._edge_log_probs(chunk, cond, with_reference=o.kl_coef > 0)
                    out = policy_loss(log_prob, chunk.old_log_prob, chunk.advantage, chunk.edge_node, chunk.num_nodes,
                                      clip_range=o.clip_range, adv_clip=o.adv_clip, kl=kl, kl_coef=o.kl_coef)
                    (out.loss * chunk.num_nodes / mb.num_nodes).backward()
                    calls += chunk.num_nodes
                    for k, v in out.stats.items():
                        totals.setdefault(k, []).append(v)
                    if "first_ratio_dev" not in totals:  # on-policy check: 0 when old log-probs match
                        totals["first_ratio_dev"] = [max(abs(out.stats["ratio_min"] - 1), abs(out.stats["ratio_max"] - 1))]
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, o.grad_clip)
                totals.setdefault("grad_norm", []).append(float(grad_norm))
                if not math.isfinite(float(grad_norm)):
                    raise FloatingPointError("non-finite gradient; lower optim.lr or check the rewards")
                self.optimizer.step()
                self.lr_schedule.step()
        stats = {f"train/{k}": sum(v) / len(v) for k, v in totals.items()}
        if "train/ratio_min" in stats:
            stats["train/ratio_min"] = min(totals["ratio_min"])
            stats["train/ratio_max"] = max(totals["ratio_max"])
        return stats, calls

    # ------------------------------------------------------------------ eval, logs, checkpoints
    def _grid_rows(self) -> list[int]:
        """Indices of the eval prompts shown in the sample grids (a fixed spread)."""
        n = min(self.config.eval.grid_prompts, len(self.eval_prompts))
        order = torch.randperm(len(self.eval_prompts), generator=torch.Generator().manual_seed(0))[:n]
        return sorted(order.tolist())

    def _evaluate(self, tag: str) -> dict[str, float]:
        c = self.config
        eval_rewards = {n: self.rewards[n] for n in c.reward.eval}
        metrics, images = evaluate(self.policy, self.eval_prompts, self.eval_seeds, eval_rewards, self.num_steps,
                                   c.train.max_batch, shapes_accuracy=c.model.family == "shapes")
        # The grid: the same prompts (rows) and held-out seeds (columns) every time, taken from the
        # evaluation's own samples (prompt-major, so each row is one prompt's seeds).
        per_prompt = images.view(len(self.eval_prompts), len(self.eval_seeds), *images.shape[1:])
        images = per_prompt[self.grid_rows].flatten(0, 1)
        grid = image_grid(images, len(self.grid_rows), len(self.eval_seeds))
        save_image(grid, self.out / "samples" / f"{tag}.png")
        self.logger.log_grid(tag, grid, self.iteration, [self.eval_prompts[i] for i in self.grid_rows], self.eval_seeds)
        start = self.out / "samples" / "start.png"
        if tag != "start" and start.is_file():
            from PIL import Image

            save_image(side_by_side(Image.open(start).convert("RGB"), grid), self.out / "samples" / "start_vs_latest.png")
        return metrics

    def _log(self, record: dict[str, Any]) -> None:
        self.logger.log(record)

    def _checkpoint(self, final: bool = False) -> None:
        """Write a checkpoint. A failed write (disk full...) leaves the previous checkpoint valid: the
        run warns and tries again at the next checkpoint, but a failed final checkpoint is an error."""
        state = {"iteration": self.iteration, "wall_seconds": self.elapsed, "model_calls": self.total_calls,
                 "generator": self.generator.get_state().tolist(), "torch_rng": torch.get_rng_state().tolist(),
                 "lr_schedule": self.lr_schedule.state_dict(), "base_eval": self.base_eval,
                 "checkpoint_failures": self.checkpoint_failures}
        try:
            save_checkpoint(self.out, self.iteration, trainable_state_dict(self.policy), self.optimizer.state_dict(),
                            state, keep=self.config.train.keep_checkpoints)
            if self.config.model.lora_rank > 0 and hasattr(self.policy, "save_lora_weights"):
                # The LoRA result in diffusers' format (pipe.load_lora_weights(RUN_DIR/lora)); written
                # atomically by the policy, which holds the unwrapped module.
                self.policy.save_lora_weights(self.out / "lora")
        except (CheckpointWriteError, OSError) as err:
            self.checkpoint_failures += 1
            if final:
                raise CheckpointWriteError(f"the final checkpoint could not be written: {err}. Free space and rerun "
                                           f"the same command to continue from the last valid checkpoint") from err
            print(f"treegrpo: warning: {err}; training goes on and retries at the next checkpoint", file=sys.stderr)
            return
        self.last_checkpoint = self.iteration

    def _maybe_resume(self) -> bool:
        ckpt = resume_checkpoint(self.out)  # verified; a damaged newest checkpoint raises CheckpointError
        if ckpt is None:
            return False
        check_resume_config(self.out / "config.yaml", self.config)
        state, optimizer_state = load_state(ckpt)
        load_trainable_state_dict(self.policy, load_weights(ckpt / WEIGHTS))  # the file: already verified above
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        self.iteration, self.elapsed, self.total_calls = state["iteration"], state["wall_seconds"], state["model_calls"]
        self.base_eval = state.get("base_eval")
        self.checkpoint_failures = state.get("checkpoint_failures", 0)
        self.last_checkpoint = self.iteration
        # Drop metrics written after the checkpoint (and a line cut short by a kill), so the log
        # matches an uninterrupted run.
        truncate_metrics(self.out / "metrics.jsonl", self.iteration)
        print(f"resuming {self.out} from {ckpt.name} (iteration {self.iteration})")
        return True
