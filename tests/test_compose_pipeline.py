"""The shipped base model of the compositional world: a plain diffusers StableDiffusion3Pipeline.

It loads with diffusers alone, its ODE samples equal the engine's k = 1 rollout through the same
SD3 adapter that serves SD3.5, its autoencoder reconstructs renders well enough for the verifiable
reward, and the weights a training run writes load back into a plain pipeline.
"""

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

import treegrpo
from treegrpo.policies.loading import embedded_pipeline_path
from treegrpo.policies.sd3 import SD3Policy
from treegrpo.prompts import load_prompts
from treegrpo.rewards.compose import verdicts
from treegrpo.rollout import rollout
from treegrpo.tree import TreeShape
from treegrpo.worlds.compose import render_prompts
from treegrpo.worlds.compose_pipeline import DEFAULTS_FILE

FOLDER = embedded_pipeline_path()
PROMPTS = ["a red circle", "a blue square to the left of a green triangle"]


def plain_pipeline():
    # SD3 without T5, the diffusers way: the absent encoder and tokenizer are said explicitly
    pipe = StableDiffusion3Pipeline.from_pretrained(FOLDER, text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_shipped_folder_is_a_small_sd3_pipeline():
    index = json.loads((FOLDER / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    size = sum(f.stat().st_size for f in FOLDER.rglob("*") if f.is_file())
    assert size < 20e6
    defaults = json.loads((FOLDER / DEFAULTS_FILE).read_text())
    assert defaults["max_sequence_length"] == 0 and defaults["resolution"] == 32
    policy = treegrpo.load_policy("compose")
    assert isinstance(policy, SD3Policy) and policy.latent_shape == (4, 16, 16)
    assert policy.guidance_scale == defaults["guidance_scale"] and policy.max_sequence_length == 0


@pytest.mark.parametrize("guidance", [1.0, "default"])
def test_ode_samples_equal_the_engines_chain(guidance):
    pipe = plain_pipeline()
    policy = treegrpo.load_policy(pipe, **json.loads((FOLDER / DEFAULTS_FILE).read_text()))
    if guidance != "default":
        policy.guidance_scale = guidance
    noise = torch.randn((len(PROMPTS), *policy.latent_shape), generator=torch.Generator().manual_seed(0))
    T = 10
    chain = TreeShape((1,) * T, (False,) * T, (False,) * T)
    tree = rollout(policy, PROMPTS, chain, root_latents=noise)
    ours = policy.decode(tree.leaves)
    ref = pipe(PROMPTS, latents=noise.clone(), num_inference_steps=T, guidance_scale=policy.guidance_scale,
               max_sequence_length=0, output_type="pt").images.float()
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    assert (ours - ref).abs().max() < 1e-5
    # and the comparison can fail: another guidance scale moves the images
    other = pipe(PROMPTS, latents=noise.clone(), num_inference_steps=T, guidance_scale=policy.guidance_scale + 2,
                 max_sequence_length=0, output_type="pt").images.float()
    assert (other - ref).abs().max() > 1e-3


def test_the_autoencoder_keeps_what_the_reward_checks():
    """Clean renders of the 300 held-out prompts, through encode and decode: the strict verdict of
    the reconstructions stays at least 0.98 (the renders themselves score 1)."""
    pipe = plain_pipeline()
    prompts = load_prompts("heldout")
    images, _ = render_prompts(prompts, seed=11)
    with torch.no_grad():
        z = pipe.vae.encode(images * 2 - 1).latent_dist.mean
        recon = (pipe.vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    assert verdicts(images, prompts)[1].mean() == 1.0
    assert verdicts(recon, prompts)[1].mean() >= 0.98
