"""Prompt embeddings cached by prompt text (`model.prompt_cache`): each distinct prompt goes through
the text encoder once per run, whatever the iterations and evaluations, and the run is the same as
without the cache. Text encoders offloaded to the CPU (`model.offload_text_encoders`) still encode."""

import json

import pytest
import torch

import treegrpo
from tiny_pipelines import RESOLUTION, tiny_flux, tiny_sd3, tiny_sd15
from treegrpo.config import load_config
from treegrpo.policies.prompt_cache import PromptCache, enable_prompt_cache
from treegrpo.trainer import Trainer
from treegrpo.worlds.shapes import SHAPES_WORLD

PROMPTS = ["a red cat", "a blue dog on the tree", "a photo of a house", "a red cat", "the sky"]


def _tensors(cond) -> dict[str, torch.Tensor]:
    if hasattr(cond, "cond") and isinstance(cond.cond, dict):
        parts = {f"cond.{k}": v for k, v in cond.cond.items()}
        parts.update({f"uncond.{k}": v for k, v in (cond.uncond or {}).items()})
        parts.update({f"shared.{k}": v for k, v in (cond.shared or {}).items()})
        return parts
    return {"cond": cond.cond, "uncond": cond.uncond}


@pytest.mark.parametrize("build,options", [
    (tiny_sd3, dict(guidance_scale=4.5, max_sequence_length=16)),
    (tiny_flux, dict(guidance_scale=3.5, true_cfg_scale=2.0, negative_prompt="a dog", max_sequence_length=16)),
    (tiny_sd15, dict(guidance_scale=7.5, negative_prompt="a dog")),
], ids=["sd3", "flux", "sd15"])
def test_cached_embeddings_equal_uncached_ones_and_each_prompt_is_encoded_once(build, options):
    policy = treegrpo.load_policy(build(), resolution=RESOLUTION, **options)
    batched = _tensors(policy.encode_prompts(PROMPTS))
    alone = [_tensors(policy.encode_prompts([p])) for p in PROMPTS]
    calls = []
    policy.pipe.encode_prompt = (lambda f: lambda *a, **k: calls.append(1) or f(*a, **k))(policy.pipe.encode_prompt)
    cache = enable_prompt_cache(policy, capacity=16)
    first, second = _tensors(policy.encode_prompts(PROMPTS)), _tensors(policy.encode_prompts(PROMPTS[::-1]))
    assert cache.encoded == 4 and cache.hits == 6  # "a red cat" twice in the first call, then all from the cache
    assert len(calls) == 4 * (2 if build is tiny_flux else 1)  # FLUX encodes its negative prompt in a second call
    for key, value in first.items():
        if key.startswith("shared."):
            assert torch.equal(value, alone[0][key])
            continue
        # bitwise what encoding each prompt alone gives (the cache's guarantee) ...
        assert torch.equal(value, torch.cat([a[key] for a in alone])), key
        assert torch.equal(second[key], torch.cat([a[key] for a in alone[::-1]])), key
        # ... and what the batched, uncached call gives, up to the encoders' batch-size rounding
        torch.testing.assert_close(value, batched[key], rtol=0, atol=2e-6)


def test_the_cache_drops_the_least_recently_used_prompt():
    encoded = []

    class Cond:
        def __init__(self, rows):
            self.rows = rows

        def to(self, device):
            return self

        @staticmethod
        def cat(parts):
            return Cond([r for p in parts for r in p.rows])

    cache = PromptCache(lambda ps: encoded.extend(ps) or Cond(list(ps)), capacity=2)
    assert cache(["a", "b"]).rows == ["a", "b"]
    assert cache(["a", "c"]).rows == ["a", "c"]  # "b" was least recently used: dropped
    assert cache(["c", "a"]).rows == ["c", "a"] and encoded == ["a", "b", "c"]  # both kept: no encoding
    assert cache(["b"]).rows == ["b"]  # encoded again; drops "c", now the least recently used
    assert cache(["a"]).rows == ["a"] and encoded == ["a", "b", "c", "b"]
    assert cache(["c"]).rows == ["c"] and encoded == ["a", "b", "c", "b", "c"]
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        PromptCache(lambda ps: None, capacity=0)


def _shapes_run(tmp_path, name: str, cache: int) -> tuple[list[int], list[dict]]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a black background\na blue square on a white background\n"
                       "a green triangle on a gray background\n")
    config = load_config(None, [*SHAPES_WORLD,
        "train.iterations=3", "train.prompts_per_iteration=2", "method.k=2", "method.window=2", "eval.num_seeds=1",
        "eval.every=1", "eval.grid_prompts=2", f"eval.prompts={prompts}", f"train.prompts={prompts}",
        "train.checkpoint_every=0", "log.trackers=[]", "log.tree_every=0", "train.progress=false",
        f"model.prompt_cache={cache}"])
    trainer = Trainer(config, tmp_path / name)
    batches: list[int] = []  # rows of every text-encoder call
    trainer.policy.text_encoder.register_forward_hook(lambda m, args, kw, out: batches.append(kw["input_ids"].shape[0]),
                                                      with_kwargs=True)
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return batches, [{k: v for k, v in r.items() if k != "wall_seconds" and not k.startswith("memory/")} for r in records]


def test_a_training_run_encodes_each_distinct_prompt_once_and_matches_the_uncached_run(tmp_path):
    cached_calls, cached = _shapes_run(tmp_path, "cached", cache=64)
    plain_calls, plain = _shapes_run(tmp_path, "plain", cache=0)
    assert cached_calls == [2, 2, 2]  # 3 distinct prompts, each once with the empty prompt (its CFG uncond)
    # without it: one call per iteration, per evaluation (start + 3) and per diversity grid (one each evaluation)
    assert len(plain_calls) == 3 + 4 + 4
    assert cached == plain  # the shapes text encoder gives the same bits alone as in a batch


def test_offloaded_text_encoders_stay_on_the_cpu_and_still_encode():
    policy = treegrpo.load_policy(tiny_sd3(), resolution=RESOLUTION, guidance_scale=4.5, max_sequence_length=16,
                                  offload_text_encoders=True, device="cpu")
    assert policy.text_encoders_offloaded and policy.text_device == torch.device("cpu")
    assert {n for n in policy.pipe.components if n.startswith("text_encoder")} == {"text_encoder", "text_encoder_2",
                                                                                   "text_encoder_3"}
    reference = treegrpo.load_policy(tiny_sd3(), resolution=RESOLUTION, guidance_scale=4.5, max_sequence_length=16)
    a, b = _tensors(policy.encode_prompts(PROMPTS[:2])), _tensors(reference.encode_prompts(PROMPTS[:2]))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_offloading_a_policy_without_text_encoders_is_refused(tmp_path):
    from treegrpo.config import ConfigError
    from treegrpo.policies.analytic import GaussianPolicy

    config = load_config(None, ["model.family=sd3", "model.pretrained=x", "model.offload_text_encoders=true",
                                "log.trackers=[]"])
    with pytest.raises(ConfigError, match="has no text encoders to offload"):
        Trainer(config, tmp_path / "run", policy=GaussianPolicy(), train_prompts=["p"])
