"""Experiment: an advantage-weighted flow-matching loss on the tree's leaves, against the policy gradient.

Not a shipped training option: a measurement of whether a lower-variance objective than the
per-edge log-prob ratio gives the compositional world a usable gradient (docs/benchmarks.md, section 9).

The loss is DiffusionNFT's (arXiv 2509.16117) on TreeGRPO's leaves: each leaf's advantage (its reward
normalised within its prompt's leaves) is clipped to [-1, 1] and centred again per prompt, giving
r = 0.5 + 0.5 a; with v_old the rollout policy's velocity, v+ = (1 - beta) v_old + beta v and
v- = (1 + beta) v_old - beta v at a forward-noised x_t = (1 - t) x0 + t eps of the leaf x0, the loss is
r |v+ - (eps - x0)|^2 + (1 - r) |v- - (eps - x0)|^2. At v = v_old its gradient is
2 beta sum_i a_i (v_old - eps + x0_i) dv/dtheta; drawing one (t, eps) per prompt, shared by the
prompt's leaves (common random numbers), cancels the eps term exactly because the a_i are centred.

    .venv/bin/python benchmarks/matching_signal.py signal --rollouts 12             # cosine, as gradient_signal.py
    .venv/bin/python benchmarks/matching_signal.py learn --iterations 40 --lr 1e-4  # held-out strict before/after
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gradient_signal import jackknife, permuted_within_groups  # noqa: E402  (also registers `brightness`)

from treegrpo.advantages import normalize_by_group  # noqa: E402
from treegrpo.config import load_config  # noqa: E402
from treegrpo.loss import flow_matching_loss, matching_weights  # noqa: E402
from treegrpo.evaluation import decode_chunked, evaluate_per_image, score_images, summarize_eval  # noqa: E402
from treegrpo.prompts import draw_prompts, load_prompts, prompt_groups  # noqa: E402
from treegrpo.rollout import rollout  # noqa: E402
from treegrpo.trainer import Trainer  # noqa: E402


class MatchingExperiment:
    def __init__(self, config: str, overrides: list[str], beta: float, t_samples: int, shared_noise: bool,
                 conditional: bool = False) -> None:
        self.tmp = tempfile.TemporaryDirectory()  # the trainer's run directory; removed with the experiment
        self.cfg = load_config(config, ["log.trackers=[]", "train.progress=false", "log.tree_every=0", "optim.kl_coef=0",
                                        f"optim.matching_guidance={not conditional}", *overrides])
        self.trainer = Trainer(self.cfg, Path(self.tmp.name) / "run")
        self.policy, self.sigmas, self.times = self.trainer.policy, self.trainer.schedule.sigmas, self.trainer.schedule.times
        self.beta, self.t_samples, self.shared_noise = beta, t_samples, shared_noise
        self.generator = torch.Generator().manual_seed(1)
        self.conditional = conditional

    def leaves(self):
        """One TreeGRPO rollout: leaf latents [L, ...], their prompt index [L], cond, advantages [L], rewards [L]."""
        tr, cfg = self.trainer, self.cfg
        prompts = tr._pick_prompts()
        shape = tr.method.shape_for(tr.iteration, tr.generator)
        seeds = torch.randint(0, 2**62, (len(prompts),), generator=tr.generator).tolist()
        cond = self.policy.encode_prompts(prompts)
        with torch.no_grad():
            tree = rollout(self.policy, prompts, shape, num_steps=tr.num_steps, sampler=tr.method.sampler,
                           generator=[torch.Generator().manual_seed(s) for s in seeds], max_batch=cfg.train.max_batch,
                           cond=cond)
        images = decode_chunked(self.policy, tree.leaves, cfg.train.max_batch)
        scores = score_images(images, [prompts[int(i)] for i in tree.leaf_prompt],
                              {n: tr.rewards[n] for n in cfg.reward.weights}, cfg.train.max_batch)
        reward = tr._weighted(scores)
        return tree.leaves, tree.leaf_prompt, cond, normalize_by_group(reward, tree.leaf_prompt, eps=1e-4), reward

    def backward(self, x0: torch.Tensor, prompt: torch.Tensor, cond, adv: torch.Tensor) -> float:
        """Accumulate the loss's gradient (t_samples draws of (t, eps)); returns the loss. The loss and
        its weights are the trainer's (`treegrpo.loss`); only the (t, eps) sharing is chosen here."""
        r = matching_weights(adv, prompt)
        n = int(prompt.max()) + 1 if self.shared_noise else x0.shape[0]
        pick = prompt if self.shared_noise else torch.arange(x0.shape[0])
        total = 0.0
        for _ in range(self.t_samples):
            step = torch.randint(0, len(self.times), (n,), generator=self.generator)[pick]
            eps = torch.randn((n, *x0.shape[1:]), generator=self.generator)[pick]
            tb = self.sigmas[step].view(-1, *([1] * (x0.ndim - 1)))
            xt, target = (1 - tb) * x0 + tb * eps, eps - x0
            # the model's time input is the schedule's time of that step (SD3: 1000 sigma), not sigma
            v = self.velocity(xt, self.times[step], cond, prompt)
            loss = flow_matching_loss(v, v.detach(), target, r, self.beta).loss / self.t_samples
            loss.backward()
            total += float(loss.detach())
        return total

    def velocity(self, x, times, cond, prompt):
        """The guided velocity (as sampled), or with `conditional` the trainer's conditional branch."""
        if not self.conditional:
            return self.policy.predict(x, times, cond, prompt)
        return self.trainer._velocity(self.policy, x, times, cond, prompt)  # built with matching_guidance=false

    def flat_grad(self) -> torch.Tensor:
        return torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.detach().flatten().clone()
                          for p in self.trainer.params])

    def evaluate(self) -> dict[str, float]:
        tr = self.trainer
        per_image, _ = evaluate_per_image(self.policy, tr.eval_prompts, tr.eval_seeds,
                                          {n: tr.rewards[n] for n in self.cfg.reward.eval}, tr.num_steps,
                                          self.cfg.train.max_batch, accuracy=tr.accuracy,
                                          diversity=tr.diversity_features)
        return {k: round(v, 4) for k, v in summarize_eval(per_image).items() if "acc/strict" in k or "lgmd" in k}


def signal(args) -> dict:
    pool = load_prompts("train")
    fixed = draw_prompts(pool, 8, torch.Generator().manual_seed(0), prompt_groups(pool, "template"))
    prompt_dir = tempfile.TemporaryDirectory()
    prompt_file = Path(prompt_dir.name) / "prompts.txt"
    prompt_file.write_text("\n".join(fixed) + "\n")
    exp = MatchingExperiment(args.config, [f"train.prompts={prompt_file}", f"eval.prompts={prompt_file}",
                                           "train.prompt_balance=none", "train.prompts_per_iteration=8", *args.overrides],
                             args.beta, args.t_samples, not args.independent_noise, args.conditional)
    grads, control = [], []
    for k in range(args.rollouts):
        x0, prompt, cond, adv, reward = exp.leaves()
        shuffled = permuted_within_groups(adv, prompt, exp.generator)
        for a, out in ((adv, grads), (shuffled, control)):
            for p in exp.trainer.params:
                p.grad = None
            exp.backward(x0, prompt, cond, a)
            out.append(exp.flat_grad())
        print(f"  rollout {k + 1}/{args.rollouts}: reward {float(reward.mean()):.3f}", file=sys.stderr, flush=True)
    s, s_ci = jackknife(torch.stack(grads))
    c, c_ci = jackknife(torch.stack(control))
    print(f"cosine {s:.4f} +- {s_ci:.4f}, shuffled control {c:.4f} +- {c_ci:.4f}")
    return {"cosine": s, "cosine_ci95": s_ci, "control_cosine": c, "control_ci95": c_ci}


def learn(args) -> dict:
    exp = MatchingExperiment(args.config, [f"optim.lr={args.lr}", *args.overrides], args.beta, args.t_samples,
                             not args.independent_noise, args.conditional)
    evals = [{"iteration": 0, **exp.evaluate()}]
    print(json.dumps(evals[-1]), flush=True)
    for it in range(1, args.iterations + 1):
        start = time.time()
        x0, prompt, cond, adv, reward = exp.leaves()
        exp.trainer.optimizer.zero_grad(set_to_none=True)
        exp.backward(x0, prompt, cond, adv)
        grad_norm = torch.nn.utils.clip_grad_norm_(exp.trainer.params, exp.cfg.optim.grad_clip)
        exp.trainer.optimizer.step()
        exp.trainer.lr_schedule.step()  # honours optim.warmup_iterations
        print(f"  iteration {it}: reward {float(reward.mean()):.3f}, grad norm {float(grad_norm):.3f} "
              f"({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
        if it % args.eval_every == 0 or it == args.iterations:
            evals.append({"iteration": it, **exp.evaluate()})
            print(json.dumps(evals[-1]), flush=True)
    return {"evals": evals}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["signal", "learn"])
    ap.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    ap.add_argument("--config", default="configs/compose_treegrpo.yaml")
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--t-samples", type=int, default=4, help="(t, eps) draws per leaf per step")
    ap.add_argument("--independent-noise", action="store_true", help="a (t, eps) per leaf, not one per prompt")
    ap.add_argument("--conditional", action="store_true", help="train the conditional velocity, not the guided one")
    ap.add_argument("--rollouts", type=int, default=12)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if args.mode == "signal" and args.rollouts < 3:
        ap.error("--rollouts must be >= 3 (the interval is a jackknife over rollouts)")
    torch.set_num_threads(args.threads)
    result = signal(args) if args.mode == "signal" else learn(args)
    result.update(mode=args.mode, overrides=args.overrides, beta=args.beta, t_samples=args.t_samples,
                  shared_noise=not args.independent_noise)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
