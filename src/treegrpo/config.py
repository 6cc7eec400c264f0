"""Typed configuration: one dataclass per section, YAML files, ``key=value`` overrides.

Every hyper-parameter is named, documented and typed here; unknown keys and wrong types fail before
any work with a message naming the closest valid keys. The resolved config is written into every run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODEL_FAMILIES = ("shapes", "sd3", "flux", "sd15", "auto", "analytic")  # analytic: the closed-form test policy
METHODS = ("treegrpo", "flow_grpo", "dance_grpo", "mix_grpo", "branch_grpo")


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message says what to change."""


@dataclass
class ModelConfig:
    family: str = "auto"  # auto (from the pipeline's class), sd3, flux, sd15, or shapes (the old 16x16 model of fast tests)
    # "base": the embedded model (the compositional world's tiny SD3 pipeline, also "compose"; with
    # family shapes the old 16x16 model), a local pipeline folder, or a Hugging Face model id (cached)
    pretrained: str = "base"
    num_steps: int = 10  # denoising steps T (NFE without CFG)
    guidance_scale: float | None = None  # CFG scale (FLUX: the distilled guidance embedding); None = the family's default
    resolution: int | None = None  # image side in pixels (diffusers families); None = the model's default
    negative_prompt: str = ""  # the unconditional prompt of CFG (diffusers families)
    true_cfg_scale: float = 1.0  # FLUX only: true CFG with negative_prompt when > 1 (guidance_scale is the distilled embedding)
    mixed_precision: str = "no"  # no, bf16 or fp16: dtype of the frozen weights; LoRA weights and step math stay fp32
    gradient_checkpointing: bool = False  # recompute the denoiser's activations in backward (less memory, ~30% slower)
    device: str = "cpu"
    lora_rank: int = 0  # 0 = full fine-tuning of the trainable module; > 0 = LoRA adapters (peft)
    lora_alpha: float = 8.0
    lora_targets: list[str] | None = None  # module names for LoRA; None = the family's default (attention projections)
    # Prompt embeddings: each distinct prompt is encoded once (alone, so its embedding does not depend
    # on the other prompts of a batch) and kept in host memory, up to this many prompts (least
    # recently used dropped first); 0 = encode every call's prompts afresh. SD3.5 in bf16 keeps ~5.4 MB
    # per prompt (333 tokens x 4096, and the negative prompt's rows for CFG), the shapes model 5 kB.
    prompt_cache: int = 4096
    # diffusers families: keep the text encoders on the CPU (prompts are encoded there, on demand,
    # and their embeddings moved to model.device), freeing their accelerator memory (T5-XXL: ~9.5 GB
    # in bf16). CPU encoding is slow for T5-XXL: pair it with the cache, which encodes each prompt once.
    offload_text_encoders: bool = False


@dataclass
class MethodConfig:
    name: str = "treegrpo"  # one of METHODS: a tree shape plus an advantage rule
    # TreeGRPO / MixGRPO window
    k: int = 3  # children per node inside the window (TreeGRPO)
    window: int = 3  # window width w (TreeGRPO's depth d; MixGRPO uses 4)
    window_mode: str = "random"  # random (truncated geometric), shift, cycle (shift, back to 0 after the last start: MixGRPO's roll-back) or fixed
    window_r: float = 0.5  # ratio of the truncated geometric law of the window start
    window_max_start: int = -1  # latest window start the schedule may pick (-1 = T - w - 1, the paper's law); the law is truncated there
    window_every: int = 50  # shift mode: iterations per one-step move
    window_start: int = 0  # fixed mode: the start step
    window_explore: float = 0.25  # adaptive mode: share of the paper's truncated geometric law mixed into the learnt law
    window_decay: float = 0.9  # adaptive mode: EMA decay of each step's sibling-advantage spread
    # value-guided pruning (treegrpo.pruning): share of each prompt's prune-level nodes that get their
    # ODE tails (1 = off); pruned nodes are dropped from the backup or valued by their probe
    prune_keep: float = 1.0
    prune_value: str = "drop"  # drop (completed leaves only) or probe (pruned nodes keep their probe reward)
    prune_select: str = "spread"  # spread (the probe's max-spread subset) or random (same budget, blind: a control)
    trees_per_prompt: int = 1  # independent trees per prompt (TreeGRPO), roots for the others
    # group methods
    group_size: int = 12  # G: chains (Flow-GRPO) or branches (DanceGRPO, MixGRPO)
    train_fraction: float = 0.6  # DanceGRPO: share of the first T-1 steps trained
    train_steps_per: str = "trajectory"  # DanceGRPO: draw the trained steps per trajectory (its code) or per iteration (one set for all)
    split_steps: list[int] = field(default_factory=lambda: [0, 2, 4, 6])  # BranchGRPO split steps
    # sampler
    sde_kind: str = "flow_grpo"  # flow_grpo, dance (constant coefficient) or cps
    noise_level: float = 0.7  # a of flow_grpo / cps, or DanceGRPO's eta
    ddim_eta: float = 1.0  # stochasticity of DDIM steps inside the SDE window (epsilon-prediction models: sd15)
    # advantages
    backup: str = "mean"  # mean or softmax over sibling edges
    softmax_temperature: float = 1.0  # softmax backup: temperature on per-element-mean log-probs
    per_depth: bool = False  # BranchGRPO: standardise every depth within its prompt group
    unbiased_std: bool = False  # divide by n - 1 (DanceGRPO) instead of n
    global_std: bool = False  # one std over every reward of the batch (all prompts), mean still per prompt (Flow-GRPO's shipped configs)
    std_floor: float = 0.0  # leaf advantage = (r - mean) / max(std, std_floor), reward units: near-identical leaves get small advantages, not unit ones
    edge_baseline: str = "none"  # none: edge u->c trained with V(c) (the paper); parent: V(c) - V(u) at branching steps (sibling-centred, SPEC.md 8)
    # diversity guard: "gardo" weights positive leaf advantages by the leaf's nearest-neighbour distance
    # in its prompt group over the group's mean (no std division; SPEC.md section 8); "none" = off
    diversity_weight: str = "none"
    diversity_feature: str | None = None  # its feature (see eval.diversity_features); None = the first automatic one


@dataclass
class RewardConfig:
    # reward name -> weight; several rewards are standardised per prompt group, weighted, standardised
    # again (the paper's HPS-v2.1 : CLIPScore 4:1 is `weights: {hpsv2.1: 0.8, clipscore: 0.2}`)
    weights: dict[str, float] = field(default_factory=lambda: {"compose": 1.0})
    eval: list[str] = field(default_factory=lambda: ["compose", "compose_strict"])
    # reward name -> its constructor options, e.g. {hpsv2.1: {checkpoint: /path/HPS_v2.1_compressed.pt,
    # device: cuda}}; see each reward's docstring (treegrpo.rewards.preference) for its keys
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    retries: int = 2  # a reward call that raises is tried again this many times before the run fails
    retry_delay: float = 1.0  # seconds before the first retry; doubles each retry


@dataclass
class OptimConfig:
    # lr 1e-4 and KL 0.1: on the compositional world (full fine-tuning of the embedded SD3 transformer)
    # lr 5e-4, or 2e-4 without clipping and KL, collapsed the images within 3-10 iterations
    # (docs/benchmarks.md section 7); the old shapes world used 2e-4 and 0.5
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    minibatches: int = 2  # optimiser steps per iteration (per epoch)
    epochs: int = 1  # passes over the iteration's trained edges
    clip_range: float = 1e-4  # PPO ratio clip eps
    adv_clip: float = 5.0  # advantages clipped to [-adv_clip, adv_clip]
    kl_coef: float = 0.1  # beta of the KL to the base model (0 = off); keeps untouched details (backgrounds) from drifting
    kl_per_edge: bool = False  # count a node's KL once per outgoing edge (k at a k-way node), as the policy term sums its k edges
    step_weight: str = "none"  # weight of each trained step's loss: none, level (each step the same total weight), gain (1 / (|c_v| / std), the step's gradient gain, relative to step 0), level_gain (both)
    recompute_old_log_probs: bool = True  # old log-probs in the training layout, so ratio == 1 exactly
    warmup_iterations: int = 0  # linear learning-rate warm-up
    # EMA of the trainable weights (0 = off): after every optimiser step ema = d * ema + (1 - d) * theta,
    # starting from the initial weights (no bias correction, so it lags ~1 / (1 - d) steps). Held-out
    # evaluation, the LoRA export RUN_DIR/lora and `sample` / `eval --checkpoint` use it; training
    # goes on with the raw weights. Kept in fp32 beside them (one more copy of the trainable weights).
    ema_decay: float = 0.0
    # What the rollout's rewards train: "policy_gradient" (the clipped per-edge surrogate of SPEC.md
    # section 5, every method's own) or "flow_matching" (DiffusionNFT's advantage-weighted
    # flow-matching loss on the leaves, `treegrpo.loss.flow_matching_loss`: no log-probs, so
    # clip_range, adv_clip, step_weight, kl_per_edge and recompute_old_log_probs do not enter;
    # kl_coef then weighs mean |v - v_base|^2, the velocity's drift from the base model), or
    # "both": the policy gradient's optimiser steps on the trained edges, then the flow-matching
    # step on the leaves (same rollout, same lr; kl_coef enters both as above).
    objective: str = "policy_gradient"
    matching_beta: float = 1.0  # DiffusionNFT's beta: how far v+ / v- lie from v_old along v - v_old
    matching_draws: int = 4  # (step, noise) draws per prompt per iteration, shared by its leaves
    matching_guidance: bool = True  # train the guided velocity as sampled; false: the conditional branch alone
    matching_negatives: bool = True  # false: pull towards the above-mean leaves only (no push from the others)
    # Which schedule steps the draws pick: "all" (uniform, DiffusionNFT's) or "stochastic": the steps
    # where this iteration's rollout branched or drew noise (TreeGRPO's window), the noise levels at
    # which its leaves came to differ, so a leaf's advantage is credited where it was decided.
    matching_steps: str = "all"


@dataclass
class TrainConfig:
    iterations: int = 60
    prompts_per_iteration: int = 16
    prompts: str = "train"  # training prompts: "train" (the compositional world's 1,302 RL prompts), "shapes" (the old world's 54), or a prompt file (.txt, .jsonl, .csv)
    prompt_balance: str = "auto"  # "auto": draw the compositional world's four templates equally often; "template": same, world prompts required; "none": uniform over the prompts
    seed: int = 0
    max_batch: int = 512  # rows per model call (rollout and training chunks)
    checkpoint_every: int = 20  # iterations between checkpoints (0 = only the final one)
    keep_checkpoints: int = 2  # the last N kept
    progress: bool = True
    max_seconds: float = 0.0  # stop once training wall-clock passes this (0 = no limit; benchmarks' equal budget)
    max_model_calls: int = 0  # stop once model calls pass this (0 = no limit)


@dataclass
class EvalConfig:
    every: int = 20  # iterations between held-out evaluations (0 = start and end only)
    prompts: str = "heldout"  # "heldout" (the compositional world's 300 held-out prompts, never trained on), "shapes" (the old world's 54), or a prompt file path
    num_seeds: int = 4  # held-out seeds per prompt
    seed_offset: int = 1_000_000  # held-out seeds start here (training never uses them)
    grid_prompts: int = 18  # prompts shown in the sample grids
    # diversity across seeds (eval/diversity/...): lgmd and pixel always; plus these image features:
    # reward names with image features (CLIP-based) or registered world features (treegrpo.diversity);
    # None = every loaded CLIP-based reward and the model family's world feature; [] = none
    diversity_features: list[str] | None = None
    diversity_grid_prompts: int = 4  # prompts of the diversity grid (samples/diversity/), 0 = no grid
    diversity_grid_seeds: int = 8  # held-out seeds per prompt in that grid


@dataclass
class LogConfig:
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # accelerate trackers by name ([] = metrics.jsonl only; wandb when installed)
    tree_every: int = 20  # iterations between saved tree records (trees/iter_NNNNNN.*) for the report; 0 = the last only
    tree_thumbnail: int = 48  # largest side in pixels of the leaf thumbnails kept in a tree record


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping like {{name: value}}, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], [v.split(".")[-1] for v in valid], n=3, cutoff=0.5)
    close_full = [v for v in valid if v.split(".")[-1] in close]
    hint = f" Did you mean {', '.join(close_full)}?" if close_full else ""
    return ConfigError(f"unknown config key {key!r}.{hint}")


# Keys that once existed but did nothing: refused with the reason, except in a run's stored
# config.yaml (every key was written out there), where they are dropped so old runs still resume.
REMOVED_KEYS = {
    "train.train_seeds": "it was never read: training noise is always fresh each iteration (from train.seed) and "
                         "evaluation always uses the held-out seeds from eval.seed_offset",
}


def _apply(config: Config, data: dict[str, Any], prefix: str = "", stored: bool = False) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for section_name, values in data.items():
        if section_name not in sections:
            raise _unknown_key(f"{prefix}{section_name}", list(sections))
        if not isinstance(values, dict):
            raise ConfigError(f"{section_name}: expected a mapping of keys, got {values!r}")
        section = getattr(config, section_name)
        types_ = _field_types(type(section))
        for key, value in values.items():
            full = f"{section_name}.{key}"
            if full in REMOVED_KEYS:
                if stored:
                    continue
                raise ConfigError(f"{full} was removed: {REMOVED_KEYS[full]}. Delete it from the config")
            if key not in types_:
                raise _unknown_key(full, [f"{section_name}.{k}" for k in types_] +
                                   [f"{s}.{k}" for s in sections for k in _field_types(type(getattr(config, s)))])
            setattr(section, key, _coerce(value, types_[key], full))


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` -> (dotted key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        raise ConfigError(f"override key {key!r} must be section.key (e.g. train.iterations)")
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                stored: bool = False) -> Config:
    """Defaults, then the YAML file, then ``section.key=value`` overrides; validated. stored: `path`
    is a run's own config.yaml (written by an older version, it may hold REMOVED_KEYS: dropped)."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
        _apply(config, data, stored=stored)
    for text in overrides:
        key, value = parse_override(text)
        section, name = key.split(".")
        _apply(config, {section: {name: value}})
    validate(config)
    return config


def validate(config: Config) -> None:
    """Range checks that need more than a type; raise ConfigError with the fix."""
    m, o, t, e = config.method, config.optim, config.train, config.eval
    for section in dataclasses.fields(config):  # NaN slips through every `x > 0` check below as False, inf as True
        for key, value in dataclasses.asdict(getattr(config, section.name)).items():
            values = value.values() if isinstance(value, dict) and key != "options" else value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise ConfigError(f"{section.name}.{key} must be a finite number, got {value!r}")
    num_steps = config.model.num_steps
    checks = [
        (m.name in METHODS, f"method.name must be one of {METHODS}, got {m.name!r}"),
        (config.model.num_steps >= 2, f"model.num_steps must be >= 2, got {config.model.num_steps}"),
        (m.k >= 1, f"method.k must be >= 1, got {m.k}"),
        (m.window >= 1, f"method.window must be >= 1, got {m.window}"),
        (m.window_mode in ("random", "shift", "cycle", "fixed", "adaptive"),
         f"method.window_mode must be random, shift, cycle, fixed or adaptive, got {m.window_mode!r}"),
        (m.window_max_start >= -1, f"method.window_max_start must be >= 0, or -1 for no cap, got {m.window_max_start}"),
        (m.train_steps_per in ("trajectory", "iteration"), f"method.train_steps_per must be trajectory or iteration, got {m.train_steps_per!r}"),
        (m.std_floor >= 0, f"method.std_floor must be >= 0 (0 = no floor), got {m.std_floor}"),
        (m.edge_baseline in ("none", "parent"), f"method.edge_baseline must be none or parent, got {m.edge_baseline!r}"),
        (o.step_weight in ("none", "level", "gain", "level_gain"), f"optim.step_weight must be none, level, gain or level_gain, got {o.step_weight!r}"),
        (o.objective in ("policy_gradient", "flow_matching", "both"),
         f"optim.objective must be policy_gradient, flow_matching or both, got {o.objective!r}"),
        (o.objective != "flow_matching" or o.step_weight == "none",
         "optim.step_weight weighs the policy-gradient objective's steps; with optim.objective=flow_matching set it to none"),
        (o.objective != "flow_matching" or (m.backup == "mean" and not m.per_depth and m.edge_baseline == "none"
                                            and m.prune_value == "drop"),
         "method.backup, method.per_depth, method.edge_baseline and method.prune_value=probe shape the policy "
         "gradient's edge advantages; optim.objective=flow_matching trains on leaf advantages only (per prompt, with "
         "method.unbiased_std, global_std and std_floor): leave them at their defaults, or use optim.objective=both"),
        (o.matching_beta > 0, f"optim.matching_beta must be > 0, got {o.matching_beta}"),
        (o.matching_draws >= 1, f"optim.matching_draws must be >= 1, got {o.matching_draws}"),
        (o.matching_steps in ("all", "stochastic"),
         f"optim.matching_steps must be all or stochastic, got {o.matching_steps!r}"),
        (0 <= m.window_explore <= 1, f"method.window_explore must be in [0, 1], got {m.window_explore}"),
        (0 <= m.window_decay < 1, f"method.window_decay must be in [0, 1), got {m.window_decay}"),
        (0 < m.prune_keep <= 1, f"method.prune_keep must be in (0, 1] (1 = no pruning), got {m.prune_keep}"),
        (m.prune_value in ("drop", "probe"), f"method.prune_value must be drop or probe, got {m.prune_value!r}"),
        (m.prune_value == "drop" or m.prune_keep < 1,
         "method.prune_value=probe values pruned nodes, but nothing is pruned: set method.prune_keep < 1 as well"),
        (m.prune_select in ("spread", "random"), f"method.prune_select must be spread or random, got {m.prune_select!r}"),
        (m.prune_select == "spread" or m.prune_keep < 1,
         "method.prune_select=random chooses which nodes to prune, but nothing is pruned: set method.prune_keep < 1 as well"),
        (not (m.prune_value == "probe" and m.edge_baseline == "parent"),
         "method.edge_baseline=parent centres on the leaves below a node and cannot use probe values: set "
         "method.prune_value=drop or method.edge_baseline=none"),
        (0 < m.window_r < 1, f"method.window_r must be in (0, 1), got {m.window_r}"),
        (m.window_every >= 1, f"method.window_every must be >= 1, got {m.window_every}"),
        (m.window_start >= 0, f"method.window_start must be >= 0, got {m.window_start}"),
        (m.name != "branch_grpo" or all(0 <= s < num_steps - 1 for s in m.split_steps),
         f"method.split_steps must lie in 0..{num_steps - 2} (the last step never branches), got {m.split_steps}"),
        (m.trees_per_prompt >= 1, f"method.trees_per_prompt must be >= 1, got {m.trees_per_prompt}"),
        (m.group_size >= 2, f"method.group_size must be >= 2, got {m.group_size}"),
        (0 < m.train_fraction <= 1, f"method.train_fraction must be in (0, 1], got {m.train_fraction}"),
        (m.sde_kind in ("flow_grpo", "dance", "cps"), f"method.sde_kind must be flow_grpo, dance or cps, got {m.sde_kind!r}"),
        (m.noise_level > 0, f"method.noise_level must be > 0 (0 makes every step deterministic: nothing to train), got {m.noise_level}"),
        (m.ddim_eta > 0, f"method.ddim_eta must be > 0 (SDE steps need noise), got {m.ddim_eta}"),
        (m.backup in ("mean", "softmax"), f"method.backup must be mean or softmax, got {m.backup!r}"),
        (m.softmax_temperature > 0, f"method.softmax_temperature must be > 0, got {m.softmax_temperature}"),
        (m.diversity_weight in ("none", "gardo"), f"method.diversity_weight must be none or gardo, got {m.diversity_weight!r}"),
        (e.diversity_grid_prompts >= 0, f"eval.diversity_grid_prompts must be >= 0, got {e.diversity_grid_prompts}"),
        (e.diversity_grid_seeds >= 2, f"eval.diversity_grid_seeds must be >= 2, got {e.diversity_grid_seeds}"),
        (bool(config.reward.weights), "reward.weights must name at least one reward"),
        (any(w != 0 for w in config.reward.weights.values()), "reward.weights must not all be 0"),
        (config.reward.retries >= 0, f"reward.retries must be >= 0, got {config.reward.retries}"),
        (config.reward.retry_delay >= 0, f"reward.retry_delay must be >= 0 seconds, got {config.reward.retry_delay}"),
        (config.model.lora_rank >= 0, f"model.lora_rank must be >= 0, got {config.model.lora_rank}"),
        (config.model.lora_alpha > 0, f"model.lora_alpha must be > 0, got {config.model.lora_alpha}"),
        (config.model.guidance_scale is None or config.model.guidance_scale >= 0,
         f"model.guidance_scale must be >= 0, got {config.model.guidance_scale}"),
        (config.model.family in MODEL_FAMILIES, f"model.family must be one of {', '.join(MODEL_FAMILIES)}, got {config.model.family!r}"),
        (config.model.mixed_precision in ("no", "bf16", "fp16"), f"model.mixed_precision must be no, bf16 or fp16, got {config.model.mixed_precision!r}"),
        (config.model.resolution is None or config.model.resolution >= 8, f"model.resolution must be >= 8 pixels (or null), got {config.model.resolution}"),
        (config.model.family in ("shapes", "auto", "analytic", "sd3") or config.model.pretrained not in ("base", ""),
         f"model.family={config.model.family!r} needs model.pretrained: a Hugging Face model id or a local pipeline folder"),
        (config.model.lora_targets is None or len(config.model.lora_targets) > 0, "model.lora_targets must name modules, or be null for the family's default"),
        (config.model.prompt_cache >= 0, f"model.prompt_cache must be >= 0 prompts (0 = off), got {config.model.prompt_cache}"),
        (o.lr > 0, f"optim.lr must be > 0, got {o.lr}"),
        (o.clip_range > 0, f"optim.clip_range must be > 0, got {o.clip_range}"),
        (o.adv_clip > 0, f"optim.adv_clip must be > 0, got {o.adv_clip}"),
        (o.grad_clip > 0, f"optim.grad_clip must be > 0, got {o.grad_clip}"),
        (o.minibatches >= 1 and o.epochs >= 1, "optim.minibatches and optim.epochs must be >= 1"),
        (o.kl_coef >= 0, f"optim.kl_coef must be >= 0, got {o.kl_coef}"),
        (len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas must be two numbers in [0, 1), got {o.betas}"),
        (o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}"),
        (o.warmup_iterations >= 0, f"optim.warmup_iterations must be >= 0, got {o.warmup_iterations}"),
        (0 <= o.ema_decay < 1, f"optim.ema_decay must be in [0, 1) (0 = no EMA; e.g. 0.9), got {o.ema_decay}"),
        (t.iterations >= 0, f"train.iterations must be >= 0, got {t.iterations}"),
        (t.prompts_per_iteration >= 1, f"train.prompts_per_iteration must be >= 1, got {t.prompts_per_iteration}"),
        (t.prompt_balance in ("auto", "template", "none"),
         f"train.prompt_balance must be auto, template or none, got {t.prompt_balance!r}"),
        (t.max_batch >= 1, f"train.max_batch must be >= 1, got {t.max_batch}"),
        (t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}"),
        (t.max_seconds >= 0 and t.max_model_calls >= 0, "train.max_seconds and train.max_model_calls must be >= 0 (0 = no limit)"),
        (e.grid_prompts >= 1, f"eval.grid_prompts must be >= 1, got {e.grid_prompts}"),
        (e.seed_offset >= 0, f"eval.seed_offset must be >= 0, got {e.seed_offset}"),
        (e.num_seeds >= 1, f"eval.num_seeds must be >= 1, got {e.num_seeds}"),
        (e.every >= 0 and t.checkpoint_every >= 0, "eval.every and train.checkpoint_every must be >= 0"),
        (config.log.tree_every >= 0, f"log.tree_every must be >= 0, got {config.log.tree_every}"),
        (config.log.tree_thumbnail >= 4, f"log.tree_thumbnail must be >= 4 pixels, got {config.log.tree_thumbnail}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    check_model_keys(config.model)
    from treegrpo.rewards import available_rewards

    known = available_rewards()
    for name in [*config.reward.weights, *config.reward.eval]:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"unknown reward {name!r} in reward.weights / reward.eval.{hint} Available: {', '.join(known)}")
    validate_reward_options(config.reward.options, known)
    from treegrpo.tracking import check_trackers

    check_trackers(config.log.trackers)
    if m.name in ("treegrpo", "mix_grpo") and m.window > config.model.num_steps - 1:
        raise ConfigError(f"method.window={m.window} does not fit in model.num_steps={config.model.num_steps} "
                          f"(the last step never branches): use at most {config.model.num_steps - 1}")
    if m.name in ("treegrpo", "mix_grpo") and m.window_mode == "fixed" and not 0 <= m.window_start <= config.model.num_steps - 1 - m.window:
        raise ConfigError(f"method.window_start must be in 0..{config.model.num_steps - 1 - m.window}")
    if m.name in ("treegrpo", "mix_grpo") and m.window_max_start > config.model.num_steps - 1 - m.window:
        raise ConfigError(f"method.window_max_start={m.window_max_start} is past the last window start "
                          f"{config.model.num_steps - 1 - m.window}: use at most that, or -1")


# Model keys a family never reads (grep of policies/ and build_policy): setting one is refused, as
# it would do nothing. "auto" is checked once the family is known (load_policy refuses true_cfg_scale).
DIFFUSERS_ONLY = ("resolution", "negative_prompt", "true_cfg_scale", "mixed_precision", "gradient_checkpointing",
                  "offload_text_encoders")
FAMILY_IGNORES = {
    "shapes": DIFFUSERS_ONLY,  # 16x16 fp32 pixels, CFG against the empty prompt, a small UNet
    "analytic": (*DIFFUSERS_ONLY, "pretrained", "guidance_scale", "device", "lora_rank"),
    "sd3": ("true_cfg_scale",),
    "sd15": ("true_cfg_scale",),
}


def check_model_keys(model: ModelConfig) -> None:
    """Refuse model keys set (to a non-default value) that the chosen family, or the rest of the
    model config, leaves unread; the message names the key and why."""
    default = ModelConfig()
    changed = {k for k in dataclasses.asdict(model) if getattr(model, k) != getattr(default, k)}
    family = model.family
    if family == "auto" and model.pretrained in ("base", "", "compose"):  # the embedded SD3 pipeline
        family = "sd3"
    for key in FAMILY_IGNORES.get(family, ()):
        if key not in changed:
            continue
        if key == "true_cfg_scale":
            raise ConfigError(f"model.true_cfg_scale is FLUX's true CFG: it does nothing for model.family={family!r}; "
                              "set model.guidance_scale instead")
        why = ("the embedded shapes model does not read it (16x16 fp32 pixels, CFG against the empty prompt); it "
               "applies to the diffusers families sd3, flux and sd15" if family == "shapes" else
               "the closed-form analytic test policy does not read it")
        raise ConfigError(f"model.{key}={getattr(model, key)!r} does nothing for model.family={family!r}: {why}. "
                          "Remove it")
    if model.lora_rank == 0:
        for key in ("lora_alpha", "lora_targets"):
            if key in changed:
                raise ConfigError(f"model.{key}={getattr(model, key)!r} does nothing without LoRA (model.lora_rank=0 is "
                                  f"full fine-tuning): set model.lora_rank > 0 or remove it")
    if "negative_prompt" in changed and family != "auto":
        if family == "flux" and model.true_cfg_scale <= 1:
            raise ConfigError("model.negative_prompt does nothing for FLUX unless model.true_cfg_scale > 1 (FLUX's "
                              "guidance_scale is a distilled embedding, not CFG): set model.true_cfg_scale or remove it")
        if family in ("sd3", "sd15") and model.guidance_scale is not None and model.guidance_scale <= 1:
            raise ConfigError(f"model.negative_prompt does nothing with model.guidance_scale={model.guidance_scale} "
                              "(CFG runs only above 1): raise model.guidance_scale or remove model.negative_prompt")


def validate_reward_options(options: dict[str, Any], known: list[str] | None = None) -> None:
    """``reward.options``: every name a registered reward, every key one of its constructor options."""
    from treegrpo.rewards import available_rewards, reward_options

    known = known if known is not None else available_rewards()
    for name, opts in options.items():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"unknown reward {name!r} in reward.options.{hint} Available: {', '.join(known)}")
        if not isinstance(opts, dict):
            raise ConfigError(f"reward.options.{name} must be a mapping of option: value, got {opts!r}")
        valid = reward_options(name)
        for key in opts:
            if key not in valid:
                raise ConfigError(f"unknown option {key!r} in reward.options.{name}; reward {name!r} takes: "
                                  f"{', '.join(valid) if valid else 'no options'}")


# Keys a resumed run may change: how long it runs, what it logs and where it runs (a run moved to
# another machine), never what it computes per iteration.
RESUME_MAY_CHANGE = ("model.device", "train.iterations", "train.max_seconds", "train.max_model_calls", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.progress", "eval.every", "log.trackers", "log.tree_every",
                     "reward.retries", "reward.retry_delay")
# Reward options that say where a reward runs, not what it computes (a reward server restarted on
# another port or machine): they may change too.
RESUME_MAY_CHANGE_OPTIONS = {"remote": ("url", "timeout")}


def _without_location_options(section: dict[str, Any]) -> dict[str, Any]:
    """The reward section with RESUME_MAY_CHANGE_OPTIONS removed from reward.options."""
    options = {name: {k: v for k, v in opts.items() if k not in RESUME_MAY_CHANGE_OPTIONS.get(name, ())}
               for name, opts in section.get("options", {}).items()}
    return {**section, "options": options}


def check_resume_config(stored: str | Path, config: Config) -> None:
    """Raise ConfigError if `config` differs from a run's stored config.yaml in a key that changes the
    training itself (see RESUME_MAY_CHANGE): continuing would silently mix two different runs."""
    stored = Path(stored)
    if not stored.is_file():
        return
    try:
        old = load_config(stored, stored=True).to_dict()
    except ConfigError as err:
        raise ConfigError(f"the run's stored config is invalid ({err}); start a new run in another directory") from None
    new = config.to_dict()
    old["reward"], new["reward"] = _without_location_options(old["reward"]), _without_location_options(new["reward"])
    diffs = [f"{s}.{k}: {old[s][k]!r} in the run, {new[s][k]!r} now" for s in new for k in new[s]
             if f"{s}.{k}" not in RESUME_MAY_CHANGE and old[s][k] != new[s][k]]
    if diffs:
        raise ConfigError(f"{stored.parent} holds a run with a different config ({'; '.join(diffs)}). Continue it "
                          f"with `treegrpo train --resume {stored.parent}` (only {', '.join(RESUME_MAY_CHANGE)} may "
                          f"change, and reward.options.remote.url / timeout), or pass a new --output-dir")


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
