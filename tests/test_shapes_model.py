"""The embedded shapes base model: tokenizer, schedule, CFG, gradients, save/load, pretraining, quality."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from treegrpo.policies.base import Policy  # noqa: E402
from treegrpo.worlds.pretrain import pretrain_shapes  # noqa: E402
from treegrpo.worlds.shapes import all_prompts  # noqa: E402
from treegrpo.worlds.shapes_model import (  # noqa: E402
    MAX_LENGTH,
    ShapesPolicy,
    build_tokenizer,
    initial_noise,
    sample_ode,
    world_words,
)

PROMPTS = ["a red circle on a black background", "a blue square on a white background",
           "a cyan triangle on a gray background"]


@pytest.fixture(scope="module")
def policy() -> ShapesPolicy:
    return ShapesPolicy.from_pretrained()


def _inputs(batch: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 16, 16, generator=g)
    t = torch.rand(batch, generator=g)
    idx = torch.arange(batch) % len(PROMPTS)
    return x, t, idx


def test_shipped_model_loads_offline_and_samples(policy: ShapesPolicy) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert isinstance(policy, Policy)
    assert policy.latent_shape == (3, 16, 16)
    images = sample_ode(policy, PROMPTS, seeds=[0, 1, 2], num_steps=10)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0.1  # not a blank image
    again = sample_ode(policy, PROMPTS, seeds=[0, 1, 2], num_steps=10)
    assert torch.equal(images, again)


def test_missing_checkpoint_names_the_fix(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        ShapesPolicy.from_pretrained(tmp_path / "nope")


def test_cfg_scale_one_is_the_conditional_prediction(policy: ShapesPolicy) -> None:
    cond = policy.encode_prompts(PROMPTS)
    assert cond.cond.shape == (3, MAX_LENGTH, 64) and cond.uncond.shape == (1, MAX_LENGTH, 64)
    x, t, idx = _inputs()
    with torch.no_grad():
        v1 = policy.predict(x, t, cond, idx, guidance_scale=1.0)
        v_c = policy.velocity(x, t, cond.cond[idx])
        v_u = policy.velocity(x, t, cond.uncond.expand(len(idx), -1, -1))
        v3 = policy.predict(x, t, cond, idx, guidance_scale=3.0)
    torch.testing.assert_close(v1, v_c, rtol=0, atol=1e-6)
    # The batched cond+uncond call equals the formula applied to separate calls.
    torch.testing.assert_close(v3, v_u + 3.0 * (v_c - v_u), rtol=1e-4, atol=1e-4)
    assert (v3 - v1).abs().max() > 1e-2  # guidance changes something
    assert v3.dtype == torch.float32 and v3.shape == x.shape


def test_predict_is_differentiable_wrt_unet_only(policy: ShapesPolicy) -> None:
    cond = policy.encode_prompts(PROMPTS)
    x, t, idx = _inputs()
    policy.unet.zero_grad(set_to_none=True)
    v = policy.predict(x, t, cond, idx)
    v.square().mean().backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    assert all(p.grad is None and not p.requires_grad for p in policy.text_encoder.parameters())
    policy.unet.zero_grad(set_to_none=True)


def test_tokenizer_round_trips_world_words_and_maps_unknowns() -> None:
    tok = build_tokenizer()
    for word in world_words():
        ids = tok(word)["input_ids"]
        assert tok.convert_ids_to_tokens(ids) == ["<bos>", word, "<eos>"]
    text = all_prompts()[7].text
    ids = tok(text, padding="max_length", max_length=MAX_LENGTH)["input_ids"]
    assert len(ids) == MAX_LENGTH
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok(text.upper())["input_ids"] == tok(text)["input_ids"]
    unk = tok.convert_tokens_to_ids("<unk>")
    ids = tok("a purple blob")["input_ids"]
    assert ids[1] == tok.convert_tokens_to_ids("a") and ids[2] == unk and ids[3] == unk
    assert unk not in tok(text)["input_ids"]
    # The tokenizer is deterministic: same vocabulary every time it is built.
    assert build_tokenizer().get_vocab() == tok.get_vocab()


def test_schedule_runs_from_one_to_zero(policy: ShapesPolicy) -> None:
    sched = policy.schedule(10)
    assert sched.kind == "flow" and sched.num_steps == 10
    assert sched.sigmas.shape == (11,) and sched.sigmas.dtype == torch.float32
    assert sched.sigmas[0].item() == 1.0 and sched.sigmas[-1].item() == 0.0
    assert torch.equal(sched.times, sched.sigmas[:-1])
    assert (sched.sigmas[1:] < sched.sigmas[:-1]).all()
    # shift 3 reproduces the SD3 reference values of SPEC.md section 2
    expected = torch.tensor([1.0, 0.96013, 0.91335, 0.85769, 0.79037, 0.70728, 0.60215, 0.46488, 0.27805, 0.00893])
    torch.testing.assert_close(sched.times, expected, rtol=0, atol=2e-5)
    assert policy.schedule(1).sigmas.tolist() == [1.0, 0.0]


def test_decode_maps_to_unit_range(policy: ShapesPolicy) -> None:
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0]).view(1, 5, 1, 1).expand(1, 5, 1, 1)
    assert policy.decode(x).flatten().tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_save_load_round_trip(policy: ShapesPolicy, tmp_path) -> None:
    policy.save_pretrained(tmp_path / "copy")
    loaded = ShapesPolicy.from_pretrained(tmp_path / "copy")
    assert loaded.guidance_scale == policy.guidance_scale and loaded.shift == policy.shift
    x, t, idx = _inputs(seed=3)
    with torch.no_grad():
        a = policy.predict(x, t, policy.encode_prompts(PROMPTS), idx)
        b = loaded.predict(x, t, loaded.encode_prompts(PROMPTS), idx)
    assert torch.equal(a, b)
    assert ShapesPolicy.from_pretrained(tmp_path / "copy", guidance_scale=1.5).guidance_scale == 1.5


def test_short_pretrain_writes_loadable_weights(tmp_path) -> None:
    before = torch.random.get_rng_state()
    info = pretrain_shapes(tmp_path / "run", steps=5, batch_size=8, seed=1, progress=False)
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    assert info["steps"] == 5 and torch.isfinite(torch.tensor(info["final_loss"]))
    assert (tmp_path / "run" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "run" / "text_encoder" / "model.safetensors").is_file()
    loaded = ShapesPolicy.from_pretrained(tmp_path / "run")
    x, t, idx = _inputs(seed=4)
    trained = info["policy"]
    with torch.no_grad():
        a = trained.predict(x, t, trained.encode_prompts(PROMPTS), idx)
        b = loaded.predict(x, t, loaded.encode_prompts(PROMPTS), idx)
    assert torch.equal(a, b)
    # Same seed, same weights.
    again = pretrain_shapes(None, steps=5, batch_size=8, seed=1, progress=False)["policy"]
    assert all(torch.equal(p, q) for p, q in zip(trained.unet.parameters(), again.unet.parameters()))


def test_bad_pretrain_arguments_fail_clearly(tmp_path) -> None:
    with pytest.raises(ValueError, match="sigma law"):
        pretrain_shapes(None, steps=1, batch_size=2, sigma_law="gamma", progress=False)
    with pytest.raises(ValueError, match="steps"):
        pretrain_shapes(None, steps=0, progress=False)


def test_initial_noise_per_seed_is_batch_independent() -> None:
    a = initial_noise(3, seeds=[5, 6, 7])
    b = initial_noise(1, seeds=[6])
    assert torch.equal(a[1], b[0])
    with pytest.raises(ValueError, match="seeds"):
        initial_noise(2, seeds=[1])


def test_base_model_is_good_but_imperfect(policy: ShapesPolicy) -> None:
    """Colour and background right, shape clearly imperfect: RL has something to fix."""
    from treegrpo.rewards.shapes import shapes_accuracy

    prompts = [p.text for p in all_prompts()] * 2
    images = sample_ode(policy, prompts, seeds=[500 + i for i in range(len(prompts))], num_steps=10)
    acc = {k: v.float().mean().item() for k, v in shapes_accuracy(images, prompts).items()}
    assert acc["color"] >= 0.9 and acc["background"] >= 0.9, acc
    assert 0.3 <= acc["shape"] <= 0.95, acc


def test_trainable_module_and_deepcopy(policy: ShapesPolicy) -> None:
    import copy

    from treegrpo.policies.base import trainable_state_dict

    assert policy.trainable_module() is policy.unet
    names = set(trainable_state_dict(policy))
    assert names == {n for n, _ in policy.unet.named_parameters()}
    clone = copy.deepcopy(policy)  # the trainer's KL reference is a deep copy
    x, t, idx = _inputs(seed=5)
    with torch.no_grad():
        a = policy.predict(x, t, policy.encode_prompts(PROMPTS), idx)
        b = clone.predict(x, t, clone.encode_prompts(PROMPTS), idx)
    assert torch.equal(a, b)
    assert clone.unet is not policy.unet
