"""The `treegrpo` command: train, sample, eval, pretrain.

    treegrpo train [CONFIG.yaml] [section.key=value ...] [--output-dir DIR]
    treegrpo sample --checkpoint {base|shapes|RUN_DIR|PATH} [--prompts heldout|train|shapes|FILE] [--seeds N] --out DIR
    treegrpo eval --checkpoint {base|shapes|RUN_DIR|PATH} [--rewards a,b] [--prompts heldout|train|shapes|FILE] [--seeds N]
                  [--reward-option NAME:KEY=VALUE ...] [--images DIR] [--baseline BASE.json] [--out FILE.json]
    treegrpo pretrain {compose|shapes|classifier} [--out PATH] [--steps N] [--seed S] [--caption-noise Q]
                      [--position-share P] [--relation-margin PX]
    treegrpo bench [--methods a,b] [--seeds 0 1 2] [--variant NAME:key=value,...] [--lr-sweep 1e-4,2e-4 [--lr-pick final|area]]
                   [--eval-every N] [--reach interpolate|first] [--quick] [--out DIR]
    treegrpo report {RUN_DIR|BENCH_DIR} [--out FILE]
    treegrpo serve-reward NAME [--host 127.0.0.1] [--port N] [--reward-option KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched at run time unless a user asks
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _resolve_policy(spec: str, guidance_scale: float | None = None):
    """`base`, a run directory, a checkpoint directory / .safetensors file, or a saved model folder."""
    from treegrpo.checkpoint import CheckpointError, latest_checkpoint, load_weights
    from treegrpo.config import load_config
    from treegrpo.policies import build_policy, load_policy, load_trainable_state_dict

    if spec in ("base", "compose"):  # the default model: the compositional world's embedded SD3 pipeline
        return load_policy("compose", guidance_scale=guidance_scale), {"family": "sd3", "num_steps": 10}
    if spec == "shapes":  # the old 16x16 shapes model
        return load_policy("shapes", "shapes", guidance_scale=guidance_scale), {"family": "shapes", "num_steps": 10}
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {spec!r} does not exist (use 'base', a run directory, a checkpoint path "
                                "or a diffusers pipeline folder)")
    run_dir, ckpt = (path, latest_checkpoint(path)) if (path / "config.yaml").is_file() else (None, path)
    if run_dir is None and path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        run_dir = path.parent.parent  # one checkpoint of a run: the run's model config applies
    if run_dir is not None:  # the run's base model (with its LoRA adapters, if any) plus the checkpoint
        config = load_config(run_dir / "config.yaml", stored=True)
        if guidance_scale is not None:
            config.model.guidance_scale = guidance_scale
        policy = build_policy(config.model)
        if ckpt is None:
            raise CheckpointError(f"run directory {spec!r} has no checkpoint yet")
        load_trainable_state_dict(policy, load_weights(ckpt, prefer_ema=True))  # the EMA when the run kept one
        return policy, {"family": config.model.family, "num_steps": config.model.num_steps, "checkpoint": str(ckpt)}
    if (path / "policy_config.json").is_file():  # a saved shapes model (e.g. from `pretrain shapes`)
        return load_policy(str(path), "shapes", guidance_scale=guidance_scale), {"family": "shapes", "num_steps": 10}
    if (path / "model_index.json").is_file():  # a diffusers pipeline folder (e.g. from `pretrain compose`)
        policy = load_policy(str(path), guidance_scale=guidance_scale)
        return policy, {"family": getattr(policy, "family", "auto"), "num_steps": 10}
    policy = load_policy("base", guidance_scale=guidance_scale)  # a bare checkpoint of the embedded SD3 transformer
    load_trainable_state_dict(policy, load_weights(path, prefer_ema=True))
    return policy, {"family": "sd3", "num_steps": 10, "checkpoint": str(path)}


def cmd_train(args: argparse.Namespace) -> int:
    from treegrpo.checkpoint import CheckpointError, latest_checkpoint
    from treegrpo.config import ConfigError, load_config
    from treegrpo.stopping import Aborted, TrainingStopped
    from treegrpo.trainer import Trainer

    config_path = args.config
    overrides = list(args.overrides)
    if config_path is not None and "=" in config_path and not Path(config_path).exists():
        overrides.insert(0, config_path)  # `treegrpo train key=value` without a config file
        config_path = None
    if args.resume:
        # The run's stored config, plus overrides; the Trainer refuses overrides that would change the
        # training itself (config.RESUME_MAY_CHANGE lists what may change, e.g. train.iterations).
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"--resume {args.resume!r}: no config.yaml there, so it is not a run directory")
        if args.output_dir and Path(args.output_dir).resolve() != run_dir.resolve():
            raise ConfigError("--resume RUN_DIR continues RUN_DIR; drop --output-dir (or make it the same directory)")
        if latest_checkpoint(run_dir) is None:
            raise CheckpointError(f"--resume {args.resume!r}: the run has no checkpoint yet, so there is nothing to "
                                  f"resume; start it again with --output-dir {args.resume}")
        config = load_config(config_path if config_path is not None else run_dir / "config.yaml", overrides,
                             stored=config_path is None)
        output = run_dir
    else:
        config = load_config(config_path, overrides)
        output = Path(args.output_dir) if args.output_dir else Path("runs") / f"{config.method.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.quiet:
        config.train.progress = False
    trainer = Trainer(config, output)
    try:
        summary = trainer.train()
    except TrainingStopped as stop:
        print(f"treegrpo: {stop}", file=sys.stderr)
        return stop.exit_code
    except Aborted as abort:
        last = latest_checkpoint(output)
        hint = f"resume from {last.name} with: treegrpo train --resume {output}" if last else "no checkpoint was written"
        print(f"treegrpo: {abort}; the iteration in progress was not saved; {hint}", file=sys.stderr)
        return abort.exit_code
    if trainer.is_main:  # one summary, not one per process
        print_summary(summary, output)
    return 0


def print_summary(summary: dict, output: Path) -> None:
    base, final = summary.get("base") or {}, summary.get("final") or {}
    print(f"\nheld-out evaluation ({summary['iterations']} iterations, {summary['wall_seconds']:.0f} s of training):")
    print(f"  {'metric':<22}{'base':>10}{'final':>10}")
    for key in sorted(set(base) | set(final)):
        print(f"  {key:<22}{base.get(key, float('nan')):>10.4f}{final.get(key, float('nan')):>10.4f}")
    print(f"run directory: {output}")
    print(f"samples (start vs latest): {output / 'samples' / 'start_vs_latest.png'}")
    print(f"HTML report (curves, samples, the tree): treegrpo report {output}")


def cmd_sample(args: argparse.Namespace) -> int:
    from treegrpo.evaluation import ode_sample
    from treegrpo.prompts import load_prompts

    policy, info = _resolve_policy(args.checkpoint, args.guidance_scale)
    prompts = load_prompts(args.prompts)
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    images = ode_sample(policy, prompts, seeds, args.steps or info["num_steps"], progress=not args.quiet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    with (out / "index.jsonl").open("w") as index:
        for i, img in enumerate(images):
            prompt, seed = prompts[i // len(seeds)], seeds[i % len(seeds)]
            name = f"{i // len(seeds):04d}_{seed}.png"
            array = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            Image.fromarray(array).save(out / name)
            index.write(json.dumps({"file": name, "prompt": prompt, "seed": seed}) + "\n")
    print(f"wrote {len(images)} images and index.jsonl to {out}")
    return 0


def parse_reward_options(config_path: str | None, flags: list[str]) -> dict[str, dict]:
    """reward.options from a config file, then ``NAME:KEY=VALUE`` flags (YAML values); validated."""
    import yaml

    from treegrpo.config import ConfigError, load_config, validate_reward_options

    options: dict[str, dict] = {}
    if config_path:
        options = {name: dict(opts) for name, opts in load_config(config_path).reward.options.items()}
    for flag in flags:
        name, sep, rest = flag.partition(":")
        key, eq, raw = rest.partition("=")
        if not (sep and eq and name and key):
            raise ConfigError(f"--reward-option {flag!r} must look like NAME:KEY=VALUE (e.g. hpsv2.1:checkpoint=/path.pt)")
        options.setdefault(name.strip(), {})[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    validate_reward_options(options)
    return options


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from treegrpo.evaluation import (accuracy_kind, evaluate, load_image_folder, normalized_scores, reward_statistics,
                                     score_image_list, summarize_eval, world_accuracy)
    from treegrpo.config import RewardConfig, load_config
    from treegrpo.prompts import load_prompts
    from treegrpo.rewards import build_rewards
    from treegrpo.rewards.retry import with_retries

    names = [n.strip() for n in args.rewards.split(",") if n.strip()]
    baseline = None
    if args.baseline:
        path = Path(args.baseline)
        if not path.is_file():
            raise FileNotFoundError(f"--baseline {args.baseline!r} does not exist (write one with `treegrpo eval --out FILE`)")
        try:
            baseline = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"--baseline {args.baseline!r} is not valid JSON: {err}") from None
        if not isinstance(baseline, dict):
            raise ValueError(f"--baseline {args.baseline!r} must hold a JSON object like {{\"reward/NAME\": mean}}")
    # Rewards first: a missing reward model should fail before minutes of sampling. A reward that
    # raises (a remote scorer timing out) is retried as in training (reward.retries, retry_delay).
    retry = load_config(args.config).reward if args.config else RewardConfig()
    rewards = with_retries(build_rewards(names, parse_reward_options(args.config, args.reward_option)),
                           retry.retries, retry.retry_delay)
    if args.images:
        images, prompts = load_image_folder(args.images)
        metrics = reward_statistics(score_image_list(images, prompts, rewards))
        kind = accuracy_kind("", prompts)
        if kind is not None and len({tuple(i.shape) for i in images}) == 1:
            metrics.update(summarize_eval(world_accuracy(torch.stack(images), prompts, kind)))
        metrics["images"] = float(len(images))
    else:
        policy, info = _resolve_policy(args.checkpoint, args.guidance_scale)
        prompts = load_prompts(args.prompts)
        seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
        metrics, _ = evaluate(policy, prompts, seeds, rewards, args.steps or info["num_steps"],
                              accuracy=accuracy_kind(info["family"], prompts), progress=not args.quiet, spread=True)
        metrics["images"] = float(len(prompts) * len(seeds))
    if baseline is not None:
        normalized = normalized_scores(metrics, baseline)
        if not normalized:
            raise ValueError(f"--baseline {args.baseline!r} shares no reward/NAME entry with this evaluation")
        metrics.update(normalized)
    text = json.dumps(metrics, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def cmd_serve_reward(args: argparse.Namespace) -> int:
    from treegrpo.config import ConfigError
    from treegrpo.rewards import available_rewards
    from treegrpo.rewards.remote import serve_reward

    if args.name not in available_rewards():
        import difflib

        close = difflib.get_close_matches(args.name, available_rewards(), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"unknown reward {args.name!r}.{hint} Available: {', '.join(available_rewards())}")
    if args.name == "remote":
        raise ConfigError("serve-reward serves a reward computed here; 'remote' would only forward to another server")
    bad = [flag for flag in args.reward_option if "=" not in flag or not flag.partition("=")[0].strip()]
    if bad:
        raise ConfigError(f"--reward-option {bad[0]!r} must look like KEY=VALUE (e.g. checkpoint=/path.pt)")
    options = parse_reward_options(None, [f"{args.name}:{flag}" for flag in args.reward_option])

    def ready(server) -> None:
        # One line on stdout, flushed: scripts (and the tests) read the address from it.
        print(f"serving reward {args.name!r} at {server.url} (POST /score, GET /health); Ctrl-C stops", flush=True)

    try:
        serve_reward(args.name, options.get(args.name, {}), args.host, args.port, ready)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    if args.what == "compose":
        from treegrpo.worlds.compose_pipeline import pretrain_compose

        given = {"steps": args.steps, "lr": args.lr, "caption_noise": args.caption_noise,
                 "position_share": args.position_share, "relation_margin": args.relation_margin}
        result = pretrain_compose(args.out, seed=args.seed, init=args.init, progress=not args.quiet,
                                  **{k: v for k, v in given.items() if v is not None})
    elif args.what == "shapes":
        from treegrpo.worlds.pretrain import pretrain_shapes

        kwargs = {"steps": args.steps} if args.steps else {}
        result = pretrain_shapes(args.out, seed=args.seed, progress=not args.quiet, **kwargs)
    else:
        from treegrpo.worlds.classifier import train_shape_classifier

        kwargs = {"steps": args.steps} if args.steps else {}
        result = train_shape_classifier(args.out, seed=args.seed, progress=not args.quiet, **kwargs)
    result.pop("policy", None)  # the trained object itself; its weights are in --out
    print(json.dumps(result, indent=2, default=str))
    return 0


BENCH_BUDGET = ["train.iterations=1000000", "train.max_seconds=120", "eval.every=10", "train.checkpoint_every=0"]
BENCH_QUICK = ["train.iterations=1000000", "train.max_seconds=40", "eval.every=8", "train.checkpoint_every=0"]


def cmd_bench(args: argparse.Namespace) -> int:
    from treegrpo.bench import DEFAULT_METHODS, run_bench
    from treegrpo.config import ConfigError

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else (
        ["treegrpo", "dance_grpo"] if args.quick else list(DEFAULT_METHODS))
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    common = [*(BENCH_QUICK if args.quick else BENCH_BUDGET), *args.overrides]
    if args.eval_every is not None:
        if args.eval_every < 1:
            raise ConfigError(f"--eval-every must be >= 1 iteration, got {args.eval_every}")
        common.append(f"eval.every={args.eval_every}")
    lr_sweep = [lr for lr in args.lr_sweep.split(",") if lr.strip()] if args.lr_sweep else None
    out = Path(args.out or ("runs/bench_quick" if args.quick else "runs/bench"))
    run_bench(out, methods, seeds, args.variant, common, progress=not args.quiet, lr_sweep=lr_sweep,
              interpolate=args.reach == "interpolate", lr_pick=args.lr_pick)
    from treegrpo.report import write_bench_report

    print((out / "results.md").read_text())
    print(f"bench directory: {out} (results.json, results.md, plots)")
    print(f"report: {write_bench_report(out)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from treegrpo.report import write_report

    path = write_report(args.directory, args.out)
    print(f"report: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="treegrpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="RL-train a model (default: TreeGRPO on the embedded SD3 pipeline)")
    train.add_argument("config", nargs="?", help="YAML config (optional)")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=1e-4")
    train.add_argument("--output-dir", help="run directory (default runs/METHOD-TIMESTAMP); an existing one resumes")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint, with its stored "
                       "config (overrides may change only run length and logging, e.g. train.iterations)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=cmd_train)

    for name, func, helptext in (("sample", cmd_sample, "write ODE samples as PNGs with an index.jsonl"),
                                 ("eval", cmd_eval, "mean rewards on held-out prompts and seeds (and the world's accuracies) as JSON")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--checkpoint", default="base", help="base (the compositional world's embedded SD3 "
                       "pipeline, also 'compose'), shapes (the old 16x16 model), a run directory, a checkpoint path, "
                       "or a diffusers pipeline folder")
        p.add_argument("--prompts", default="heldout", help="heldout (the compositional world's 300 held-out "
                       "prompts), train (its 1,302 RL prompts), shapes (the old world's 54) or a prompt file (.txt, .jsonl, .csv)")
        p.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
        p.add_argument("--seed-offset", type=int, default=1_000_000, help="first seed (held-out seeds by default)")
        p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the run's)")
        p.add_argument("--guidance-scale", type=float, default=None)
        p.add_argument("--quiet", action="store_true")
        if name == "sample":
            p.add_argument("--out", required=True, help="output directory")
        else:
            p.add_argument("--rewards", default="compose,compose_strict",
                           help="comma-separated reward names, e.g. hpsv2.1,imagereward,aesthetic,clipscore")
            p.add_argument("--reward-option", action="append", default=[], metavar="NAME:KEY=VALUE",
                           help="a reward option (repeatable), e.g. hpsv2.1:checkpoint=/path/HPS_v2.1_compressed.pt")
            p.add_argument("--config", help="a YAML config whose reward.options apply (flags override it)")
            p.add_argument("--images", metavar="DIR", help="score the images of `treegrpo sample --out DIR` instead of sampling")
            p.add_argument("--baseline", metavar="JSON", help="an earlier `eval --out` (e.g. the base model): adds "
                           "normalized/NAME = relative improvement over it, and normalized/average")
            p.add_argument("--out", metavar="JSON", help="also write the results to this file")
        p.set_defaults(func=func)

    bench = sub.add_parser("bench", help="compare methods under an equal budget on held-out evaluation")
    bench.add_argument("overrides", nargs="*", help="section.key=value for every run, e.g. train.max_seconds=300")
    bench.add_argument("--methods", help="comma-separated method configs from configs/ (default: all five)")
    bench.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1 2; quick: 0)")
    bench.add_argument("--variant", action="append", default=[], metavar="NAME[@METHOD]:key=value,...",
                       help="an extra line, e.g. k2:method.k=2 or softmax:method.backup=softmax (repeatable)")
    bench.add_argument("--quick", action="store_true", help="TreeGRPO vs DanceGRPO, one seed, 40 s each")
    bench.add_argument("--lr-sweep", metavar="LR,LR,...",
                       help="run every method at each learning rate and report each at its best (see --lr-pick)")
    bench.add_argument("--lr-pick", choices=["final", "area"], default="final",
                       help="with --lr-sweep, a line's best lr: the highest mean final held-out reward (default) "
                            "or the highest mean area under the held-out curve")
    bench.add_argument("--eval-every", type=int, metavar="N", help="held-out evaluation every N iterations in every run")
    bench.add_argument("--reach", choices=["interpolate", "first"], default="interpolate",
                       help="time to reach a reward: interpolated between evaluations (default) or the first evaluation at or above it")
    bench.add_argument("--out", help="bench directory (finished runs in it are reused)")
    bench.add_argument("--quiet", action="store_true")
    bench.set_defaults(func=cmd_bench)

    report = sub.add_parser("report", help="write one self-contained HTML page for a run or a benchmark")
    report.add_argument("directory", help="a run directory (train's --output-dir) or a bench directory (bench's --out)")
    report.add_argument("--out", help="the HTML file to write (default DIRECTORY/report.html)")
    report.set_defaults(func=cmd_report)

    serve = sub.add_parser("serve-reward", help="serve a registered reward over HTTP (for reward=remote elsewhere)")
    serve.add_argument("name", help="the reward to serve, e.g. hpsv2.1, imagereward, shapes")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (no authentication: keep it private)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (printed)")
    serve.add_argument("--reward-option", action="append", default=[], metavar="KEY=VALUE",
                       help="an option of the served reward (repeatable), e.g. checkpoint=/path/HPS_v2.1_compressed.pt")
    serve.set_defaults(func=cmd_serve_reward)

    pre = sub.add_parser("pretrain", help="re-create a shipped model: the embedded SD3 pipeline (compose), the old "
                         "shapes model or its reward classifier")
    pre.add_argument("what", choices=["compose", "shapes", "classifier"])
    pre.add_argument("--out", required=True, help="output folder (compose, shapes) or .safetensors file (classifier)")
    pre.add_argument("--steps", type=int, default=None, help="training steps (compose: of the denoiser; "
                     "default 8000, the clean-caption base's)")
    pre.add_argument("--init", metavar="PIPELINE_DIR", help="compose: continue the denoiser's training from this "
                     "pipeline folder (e.g. src/treegrpo/assets/compose_sd3), its autoencoder kept")
    pre.add_argument("--lr", type=float, default=None, help="compose: the denoiser's peak learning rate "
                     "(default 1e-3)")
    pre.add_argument("--caption-noise", type=float, default=None, metavar="Q",
                     help="compose: the share of training scenes whose caption is wrong about the composition "
                     "(colours swapped, one object too few or many, relation reversed), as web captions are "
                     "(default 0; the shipped weights end with a continuation at 0.4)")
    pre.add_argument("--position-share", type=float, default=None, metavar="P",
                     help="compose: the position template's share of the training scenes (default 0.25, as "
                     "every template)")
    pre.add_argument("--relation-margin", type=float, default=None, metavar="PX",
                     help="compose: px between a position scene's two centres on the relation's axis (default 6)")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--quiet", action="store_true")
    pre.set_defaults(func=cmd_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):  # also the libraries' own bars ("Loading pipeline components...")
        import diffusers.utils.logging
        import transformers.utils.logging

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()  # e.g. "CLIPImageProcessor requires torchvision" (never installed here)
    from treegrpo.checkpoint import CheckpointError, CheckpointWriteError
    from treegrpo.config import ConfigError
    from treegrpo.rewards.retry import RewardError
    from treegrpo.stopping import Aborted

    # Exit codes: 2 = bad input (config, files, checkpoints: fix and rerun), 1 = the run failed
    # (a reward kept raising, a write failed), 130 / 143 = stopped by a signal.
    try:
        return args.func(args)
    except (RewardError, CheckpointWriteError) as err:
        if os.environ.get("TREEGRPO_DEBUG"):
            raise
        print(f"treegrpo: error: {err}", file=sys.stderr)
        return 1
    except (ConfigError, CheckpointError, FileNotFoundError, KeyError, ValueError) as err:
        if os.environ.get("TREEGRPO_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"treegrpo: error: {message}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. disk full while writing metrics or samples; the last checkpoint stays valid
        if os.environ.get("TREEGRPO_DEBUG"):
            raise
        print(f"treegrpo: error: {err}", file=sys.stderr)
        return 1
    except Aborted as err:
        print(f"treegrpo: {err}; the iteration in progress was not saved", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("treegrpo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
