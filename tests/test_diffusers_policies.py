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
