"""The diffusers adapters against diffusers itself, on tiny random pipelines (no downloads).

The proof the adapters are right: a tree with one root, no branching and no noise, grown by our
engine, gives the image (and the final latents) the diffusers pipeline returns for the same
initial latents, prompt, steps and guidance scale.
"""

import pytest
import torch

import treegrpo
from tiny_pipelines import RESOLUTION, tiny_flux, tiny_sd3, tiny_sd15
from treegrpo.rollout import SamplerConfig, rollout
from treegrpo.tree import TreeShape

T = 4
PROMPT = "a red cat on the tree"
SEQ = 16  # T5 sequence length (kept short; the pipelines take it as max_sequence_length)


def _chain(stochastic: bool) -> TreeShape:
    return TreeShape((1,) * T, (stochastic,) * T, (False,) * T)


def _pipe_call(pipe, family, latents, guidance, **extra):
    kwargs = dict(latents=latents, height=RESOLUTION, width=RESOLUTION, num_inference_steps=T, guidance_scale=guidance)
    if family != "sd15":
        kwargs["max_sequence_length"] = SEQ
    if family == "sd15":
        kwargs["eta"] = 0.0
    kwargs.update(extra)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, output_type="pt", **kwargs).images
    latent = pipe(PROMPT, output_type="latent", **kwargs).images
    return image.float(), latent.float()


def _options(family, guidance):
    options = dict(resolution=RESOLUTION, guidance_scale=guidance)
    if family != "sd15":
        options["max_sequence_length"] = SEQ
    return options


CASES = [("sd3", tiny_sd3, 4.5), ("sd3", tiny_sd3, 1.0), ("flux", tiny_flux, 3.5), ("sd15", tiny_sd15, 7.5)]


@pytest.mark.parametrize("family,build,guidance", CASES, ids=[f"{c[0]}-w{c[2]}" for c in CASES])
@pytest.mark.parametrize("stochastic", [False, True], ids=["ode", "sde-noise0"])
def test_a_noiseless_chain_reproduces_the_diffusers_pipeline(family, build, guidance, stochastic):
    pipe = build()
    policy = treegrpo.load_policy(pipe, **_options(family, guidance))
    assert policy.family == family
    noise = torch.randn((1, *policy.latent_shape), generator=torch.Generator().manual_seed(3))
    # noise level 0: the Flow-GRPO SDE step's mean is the Euler step; DDIM with eta 0 is plain DDIM
    sampler = SamplerConfig(noise_level=0.0, ddim_eta=0.0)
    tree = rollout(policy, [PROMPT], _chain(stochastic), sampler=sampler, root_latents=noise)
    ours = policy.decode(tree.leaves)
    ref_image, ref_latent = _pipe_call(pipe, family, noise.clone(), guidance)
    assert ours.shape == ref_image.shape == (1, 3, RESOLUTION, RESOLUTION)
    latent_diff = (tree.leaves - ref_latent).abs().max().item()
    image_diff = (ours - ref_image).abs().max().item()
    print(f"{family} w={guidance} {'sde0' if stochastic else 'ode'}: latent {latent_diff:.2e} image {image_diff:.2e}")
    assert latent_diff < 1e-5 and image_diff < 1e-5
    assert tree.num_model_calls == T
    # The comparison can fail: another guidance scale gives other latents.
    _, other = _pipe_call(pipe, family, noise.clone(), guidance + 2.0)
    assert (tree.leaves - other).abs().max().item() > 1e-3


def test_flux_true_cfg_with_a_negative_prompt_matches_the_pipeline():
    pipe = tiny_flux()
    policy = treegrpo.load_policy(pipe, resolution=RESOLUTION, guidance_scale=3.5, true_cfg_scale=2.0,
                                  negative_prompt="a blue dog", max_sequence_length=SEQ)
    noise = torch.randn((1, *policy.latent_shape), generator=torch.Generator().manual_seed(4))
    tree = rollout(policy, [PROMPT], _chain(False), root_latents=noise)
    _, ref_latent = _pipe_call(pipe, "flux", noise.clone(), 3.5, true_cfg_scale=2.0, negative_prompt="a blue dog")
    assert (tree.leaves - ref_latent).abs().max().item() < 1e-5


def test_sd15_v_prediction_is_converted_to_epsilon():
    pipe = tiny_sd15(prediction_type="v_prediction")
    policy = treegrpo.load_policy(pipe, resolution=RESOLUTION, guidance_scale=5.0)
    noise = torch.randn((1, *policy.latent_shape), generator=torch.Generator().manual_seed(5))
    tree = rollout(policy, [PROMPT], _chain(False), root_latents=noise)
    _, ref_latent = _pipe_call(pipe, "sd15", noise.clone(), 5.0)
    assert (tree.leaves - ref_latent).abs().max().item() < 1e-5


# ---------------------------------------------------------------- LoRA, training, precision


def _perturb_lora(policy, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("family,build,guidance", [("sd3", tiny_sd3, 4.5), ("flux", tiny_flux, 3.5), ("sd15", tiny_sd15, 7.5)])
def test_saved_lora_loads_into_a_plain_pipeline_and_gives_the_same_images(tmp_path, family, build, guidance):
    policy = treegrpo.load_policy(build(), **_options(family, guidance))
    n = policy.add_lora(rank=4, alpha=2.0)  # alpha != rank: the saved adapter config must carry the scale
    assert n > 0 and all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    _perturb_lora(policy)
    policy.save_lora_weights(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    noise = torch.randn((1, *policy.latent_shape), generator=torch.Generator().manual_seed(6))
    ours = rollout(policy, [PROMPT], _chain(False), root_latents=noise).leaves
    fresh = build()
    _, base_latent = _pipe_call(fresh, family, noise.clone(), guidance)
    fresh.load_lora_weights(tmp_path / "lora")
    _, lora_latent = _pipe_call(fresh, family, noise.clone(), guidance)
    assert (ours - base_latent).abs().max().item() > 1e-3  # the adapters change the result
    assert (ours - lora_latent).abs().max().item() < 1e-5


def test_adapters_off_is_the_base_model():
    from treegrpo.policies.lora import BaseModelView

    pipe = tiny_sd3()
    policy = treegrpo.load_policy(pipe, **_options("sd3", 4.5))
    x = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(7))
    times, index = policy.schedule(T).times[:2], torch.zeros(2, dtype=torch.long)
    cond = policy.encode_prompts([PROMPT])
    with torch.no_grad():
        base = policy.predict(x, times, cond, index)
        policy.add_lora(rank=2, alpha=2.0)
        _perturb_lora(policy)
        assert (policy.predict(x, times, cond, index) - base).abs().max() > 1e-4
        torch.testing.assert_close(BaseModelView(policy).predict(x, times, cond, index), base, rtol=0, atol=1e-6)


def test_full_fine_tuning_reference_copies_only_the_denoiser():
    """The KL reference of full fine-tuning: a frozen denoiser copy behind the same text encoders and
    VAE; it predicts what the policy did before training and stays put when the policy moves."""
    policy = treegrpo.load_policy(tiny_sd3(), **_options("sd3", 4.5))
    x = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(7))
    times, index = policy.schedule(T).times[:2], torch.zeros(2, dtype=torch.long)
    cond = policy.encode_prompts([PROMPT])
    reference = policy.frozen_copy()
    assert reference.denoiser is not policy.denoiser and reference.pipe.text_encoder is policy.pipe.text_encoder
    assert not any(p.requires_grad for p in reference.denoiser.parameters())
    assert all(p.requires_grad for p in policy.denoiser.parameters())
    with torch.no_grad():
        base = policy.predict(x, times, cond, index)
        torch.testing.assert_close(reference.predict(x, times, cond, index), base, rtol=0, atol=0)
        for p in policy.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
        assert (policy.predict(x, times, cond, index) - base).abs().max() > 1e-4
        torch.testing.assert_close(reference.predict(x, times, cond, index), base, rtol=0, atol=0)


def test_full_fine_tuning_trains_with_the_shared_pipeline_reference(tmp_path):
    from tiny_clip import save_tiny_clip
    from treegrpo.config import load_config
    from treegrpo.trainer import Trainer

    save_tiny_clip(tmp_path / "clip")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    # The policy is handed to the Trainer; model.pretrained only has to pass validation.
    config = load_config(None, [
        "model.family=sd3", "model.pretrained=unused", f"model.resolution={RESOLUTION}", f"model.num_steps={T}",
        "method.k=2", "method.window=2", "reward.weights={clipscore: 1.0}", "reward.eval=[clipscore]",
        f"reward.options={{clipscore: {{model: {tmp_path / 'clip'}}}}}", f"train.prompts={prompts}",
        f"eval.prompts={prompts}", "eval.num_seeds=1", "train.iterations=1", "train.prompts_per_iteration=2",
        "train.progress=false", "optim.kl_coef=0.1", "optim.clip_range=0.2", "log.trackers=[]"])
    policy = treegrpo.load_policy(tiny_sd3(), resolution=RESOLUTION)
    trainer = Trainer(config, tmp_path / "run", policy=policy)
    assert trainer.reference.pipe is policy.pipe and trainer.reference.denoiser is not policy.denoiser
    before = {n: p.detach().clone() for n, p in policy.denoiser.named_parameters()}
    trainer.train()
    after = dict(policy.denoiser.named_parameters())
    assert any((after[n] - b).abs().max() > 0 for n, b in before.items())
    assert all(torch.equal(p, before[n]) for n, p in trainer.reference.denoiser.named_parameters())


def _grads(policy, x, times, cond, index):
    policy.trainable_module().zero_grad()
    out = policy.predict(x, times, cond, index)
    (out.square().mean()).backward()
    return [p.grad.clone() for p in policy.trainable_parameters()]


def test_gradient_checkpointing_gives_the_same_gradients():
    policies = []
    for checkpointing in (False, True):
        policy = treegrpo.load_policy(tiny_sd3(), gradient_checkpointing=checkpointing, **_options("sd3", 4.5))
        policy.add_lora(rank=2, alpha=2.0)
        _perturb_lora(policy)
        policy.trainable_module().train()
        policies.append(policy)
    assert policies[1].trainable_module().is_gradient_checkpointing
    x = torch.randn((2, *policies[0].latent_shape), generator=torch.Generator().manual_seed(8))
    args = (x, policies[0].schedule(T).times[1:3], None, torch.tensor([0, 1]))
    grads = []
    for policy in policies:
        cond = policy.encode_prompts([PROMPT, "a blue dog"])
        grads.append(_grads(policy, args[0], args[1], cond, args[3]))
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(g.abs().max() > 0 for g in grads[0])


def test_bf16_mixed_precision_keeps_lora_and_outputs_in_float32():
    policy = treegrpo.load_policy(tiny_flux(), mixed_precision="bf16", **_options("flux", 3.5))
    policy.add_lora(rank=2, alpha=2.0)
    assert policy.pipe.vae.dtype == torch.bfloat16 and policy.pipe.text_encoder_2.dtype == torch.bfloat16
    frozen = [p for p in policy.trainable_module().parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    noise = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(9))
    tree = rollout(policy, [PROMPT], TreeShape((1, 2, 1, 1), (False, True, False, False), (False, True, False, False)),
                   root_latents=noise[:1], generator=torch.Generator().manual_seed(0))
    images = policy.decode(tree.leaves)
    assert tree.leaves.dtype == torch.float32 and images.dtype == torch.float32
    assert tree.log_prob[2] is not None and torch.isfinite(tree.log_prob[2]).all()
    assert images.shape == (2, 3, RESOLUTION, RESOLUTION) and 0 <= images.min() and images.max() <= 1
    x = tree.leaves.detach()
    grads = _grads(policy, x, policy.schedule(T).times[1:3], policy.encode_prompts([PROMPT]), torch.zeros(2, dtype=torch.long))
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in grads)


# ---------------------------------------------------------------- loading, config, the trainer


def test_a_saved_pipeline_folder_loads_with_its_family_inferred(tmp_path):
    tiny_sd15().save_pretrained(tmp_path / "sd15")
    policy = treegrpo.load_policy(str(tmp_path / "sd15"), resolution=RESOLUTION)
    assert policy.family == "sd15" and policy.schedule(T).kind == "ddim"
    from treegrpo.policies.sd3 import SD3Policy
    from treegrpo.worlds.shapes_model import ShapesPolicy

    # "base" is the embedded SD3 pipeline, with family auto or sd3; the old shapes model is one name away
    assert isinstance(treegrpo.load_policy("base"), SD3Policy)
    assert isinstance(treegrpo.load_policy("base", family="auto"), SD3Policy)
    assert isinstance(treegrpo.load_policy("base", family="shapes"), ShapesPolicy)
    assert isinstance(treegrpo.load_policy("shapes"), ShapesPolicy)


def test_bad_sources_give_one_clear_error(tmp_path, monkeypatch):
    from treegrpo.policies import load_policy

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model_index.json"):
        load_policy(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown model family 'sdxl'"):
        load_policy(tiny_sd15(), family="sdxl")
    with pytest.raises(ValueError, match="true_cfg_scale is FLUX's"):
        load_policy(tiny_sd15(), true_cfg_scale=3.0)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as err:
        load_policy("stabilityai/stable-diffusion-3.5-medium")
    message = str(err.value)
    assert "hf download stabilityai/stable-diffusion-3.5-medium" in message and "model.pretrained" in message


@pytest.mark.parametrize("family,build,guidance", [("sd3", tiny_sd3, 4.5), ("flux", tiny_flux, 3.5), ("sd15", tiny_sd15, 7.5)])
def test_one_lora_training_iteration_through_the_trainer(tmp_path, family, build, guidance):
    from safetensors.torch import load_file

    from tiny_clip import save_tiny_clip
    from treegrpo.config import load_config
    from treegrpo.trainer import Trainer

    build().save_pretrained(tmp_path / "pipe")
    save_tiny_clip(tmp_path / "clip")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    config = load_config(None, [
        "model.family=auto", f"model.pretrained={tmp_path / 'pipe'}", f"model.resolution={RESOLUTION}", f"model.num_steps={T}",
        f"model.guidance_scale={guidance}", "model.lora_rank=2", "model.lora_alpha=2", "method.k=2", "method.window=2",
        "reward.weights={clipscore: 1.0}", "reward.eval=[clipscore]", f"reward.options={{clipscore: {{model: {tmp_path / 'clip'}}}}}",
        f"train.prompts={prompts}", f"eval.prompts={prompts}", "eval.num_seeds=1", "eval.grid_prompts=2",
        "train.iterations=1", "train.prompts_per_iteration=2", "train.progress=false", "optim.lr=1e-2",
        "optim.kl_coef=0.1", "optim.clip_range=0.2", "log.trackers=[]"])
    trainer = Trainer(config, tmp_path / "run")
    assert trainer.policy.family == family and set(trainer.train_prompts) == {"a red cat", "a blue dog"}
    before = {n: p.detach().clone() for n, p in trainer.policy.trainable_module().named_parameters() if p.requires_grad}
    summary = trainer.train()
    assert summary["iterations"] == 1 and summary["model_calls"] > 0
    import json

    record = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["train/first_ratio_dev"] < 1e-5 and record["train/grad_norm"] > 0  # on-policy start, a real step
    after = dict(trainer.policy.trainable_module().named_parameters())
    assert all("lora" in n for n in before) and any((after[n] - b).abs().max() > 0 for n, b in before.items())
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "iter_000001" / "trainable.safetensors"))
    assert weights and all("lora" in n for n in weights)
    # The run's LoRA drops back into a plain pipeline.
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    pipe.load_lora_weights(tmp_path / "run" / "lora")
    noise = torch.randn((1, *trainer.policy.latent_shape), generator=torch.Generator().manual_seed(1))
    ours = rollout(trainer.policy, [PROMPT], _chain(False), root_latents=noise).leaves
    extra = {"max_sequence_length": 512 if family == "flux" else 256} if family != "sd15" else {}  # encode_prompt defaults
    _, theirs = _pipe_call(pipe, family, noise.clone(), guidance, **extra)
    assert (ours - theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("family,build,guidance", [("sd3", tiny_sd3, 4.5), ("flux", tiny_flux, 3.5), ("sd15", tiny_sd15, 7.5)])
def test_bf16_rollout_is_as_close_to_float32_as_the_pipelines_own_bf16_run(family, build, guidance):
    """Mixed precision loses no more than diffusers does in bf16 (our step math stays float32);
    measured on the tiny pipelines: sd3 0.035 vs 0.034, flux 0.063 vs 0.062, sd15 0.18 vs 0.21."""
    policy = treegrpo.load_policy(build(), mixed_precision="bf16", **_options(family, guidance))
    noise = torch.randn((1, *policy.latent_shape), generator=torch.Generator().manual_seed(3))
    ours = rollout(policy, [PROMPT], _chain(False), root_latents=noise).leaves
    _, exact = _pipe_call(build(), family, noise.clone(), guidance)
    _, theirs = _pipe_call(build().to(torch.bfloat16), family, noise.clone().bfloat16(), guidance)
    ours_err, their_err = (ours - exact).abs().max().item(), (theirs - exact).abs().max().item()
    assert 0 < ours_err <= 1.25 * their_err + 1e-3
