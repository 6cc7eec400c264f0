"""What the prompt-embedding cache and text-encoder offloading save, on a tiny diffusers pipeline.

    .venv/bin/python benchmarks/prompt_cache.py [--family sd3|flux|sd15] [--iterations 6] [--out FILE.json]

One LoRA `Trainer` run per setting on the tiny random pipelines of tests/tiny_pipelines.py (the same
classes and code paths as SD3 / FLUX / SD1.5, a few thousand parameters), 8 training prompts, 4 per
iteration, a held-out evaluation of 4 prompts after every iteration. Reported per setting:
text-encoder calls (`pipe.encode_prompt`), CPU seconds spent inside them, the run's CPU and wall seconds, the
bytes the cache holds, and the bytes of the text encoders' weights, which `model.offload_text_encoders`
takes off the accelerator (on CUDA also the measured peak allocated memory with and without it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

PROMPTS = ["a red cat", "a blue dog", "a photo of a house", "a painting of the sky", "a green tree",
           "a cat on the house", "a dog in the sky", "a red circle"]


class Brightness:
    """A reward with no model of its own: mean pixel value (the benchmark is about the text encoders)."""

    def __call__(self, images, prompts):
        return images.flatten(1).mean(dim=1)


def _tensor_bytes(obj) -> int:
    if obj is None:
        return 0
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    return sum(_tensor_bytes(v) for v in vars(obj).values())


def run(family: str, iterations: int, cache: int, offload: bool, device: str, workdir: Path) -> dict:
    import tiny_pipelines

    from treegrpo.config import load_config
    from treegrpo.trainer import Trainer

    build = {"sd3": tiny_pipelines.tiny_sd3, "flux": tiny_pipelines.tiny_flux, "sd15": tiny_pipelines.tiny_sd15}[family]
    pipe_dir = workdir / f"pipe_{family}"
    if not pipe_dir.is_dir():
        build().save_pretrained(pipe_dir)
    prompts, eval_prompts = workdir / "train.txt", workdir / "eval.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    eval_prompts.write_text("\n".join(PROMPTS[:4]) + "\n")
    name = f"{family}_cache{cache}_offload{int(offload)}"
    config = load_config(None, [
        "model.family=auto", f"model.pretrained={pipe_dir}", f"model.resolution={tiny_pipelines.RESOLUTION}",
        "model.num_steps=4", "model.lora_rank=2", "model.lora_alpha=2", f"model.device={device}",
        f"model.prompt_cache={cache}", f"model.offload_text_encoders={str(offload).lower()}",
        "method.k=2", "method.window=2", "reward.weights={bench_brightness: 1.0}", "reward.eval=[bench_brightness]",
        f"train.prompts={prompts}", f"eval.prompts={eval_prompts}", "eval.num_seeds=1", "eval.every=1",
        "eval.grid_prompts=2", f"train.iterations={iterations}", "train.prompts_per_iteration=4",
        "train.progress=false", "train.checkpoint_every=0", "log.trackers=[]", "log.tree_every=0"])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(config, workdir / name)
    pipe = trainer.policy.pipe
    stats = {"calls": 0, "seconds": 0.0}
    encode = pipe.encode_prompt

    def timed(*args, **kwargs):
        start = time.process_time()  # CPU time: robust to other jobs sharing the machine (wall time is not)
        try:
            return encode(*args, **kwargs)
        finally:
            stats["calls"] += 1
            stats["seconds"] += time.process_time() - start

    pipe.encode_prompt = timed
    start, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    text_bytes = sum(p.numel() * p.element_size() for n, m in pipe.components.items()
                     if n.startswith("text_encoder") and isinstance(m, torch.nn.Module) for p in m.parameters())
    all_bytes = sum(p.numel() * p.element_size() for m in pipe.components.values()
                    if isinstance(m, torch.nn.Module) for p in m.parameters())
    cache_obj = getattr(trainer.policy, "prompt_cache", None)
    row = {"setting": name, "encode_calls": stats["calls"], "encode_seconds": round(stats["seconds"], 4),
           "run_seconds": round(wall, 2), "run_cpu_seconds": round(cpu, 2), "cached_prompts": len(cache_obj.entries) if cache_obj else 0,
           "cache_bytes": sum(_tensor_bytes(e) for e in cache_obj.entries.values()) if cache_obj else 0,
           "text_encoder_bytes": text_bytes, "pipeline_bytes": all_bytes,
           "text_device": str(trainer.policy.text_device)}
    if device == "cuda":
        row["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 2)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd3", choices=["sd3", "flux", "sd15"])
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from treegrpo.rewards.base import register_reward

    register_reward("bench_brightness")(Brightness)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = [(0, False), (4096, False)] + ([(4096, True)] if device == "cuda" else [])
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(args.family, args.iterations, cache, offload, device, Path(tmp)) for cache, offload in settings]
    print(f"| setting | encode calls | CPU s in encode_prompt | run CPU s | run wall s | cached prompts | cache bytes | text-encoder bytes "
          f"| pipeline bytes |{' peak CUDA MB |' if device == 'cuda' else ''}")
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if device == "cuda" else ""))
    for r in rows:
        print(f"| {r['setting']} | {r['encode_calls']} | {r['encode_seconds']} | {r['run_cpu_seconds']} | {r['run_seconds']} | {r['cached_prompts']} "
              f"| {r['cache_bytes']} | {r['text_encoder_bytes']} | {r['pipeline_bytes']} |"
              + (f" {r['peak_cuda_allocated_mb']} |" if device == "cuda" else ""))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
