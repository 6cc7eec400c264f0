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
    assert isinstance(policy, SD3Policy) and policy.latent_shape == (8, 8, 8)
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


def test_a_trained_runs_transformer_loads_back_into_a_plain_pipeline(tmp_path):
    """One full fine-tuning iteration of TreeGRPO on the shipped pipeline with the `compose` reward
    (configs/compose_treegrpo.yaml, shrunk); RUN_DIR/transformer drops into a plain pipeline and
    gives the trained policy's images."""
    from diffusers import SD3Transformer2DModel

    from treegrpo.config import load_config
    from treegrpo.trainer import Trainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    config = load_config("configs/compose_treegrpo.yaml", [
        "method.k=2", "method.window=2", f"train.prompts={prompts}", f"eval.prompts={prompts}", "eval.num_seeds=1",
        "eval.grid_prompts=2", "train.iterations=1", "train.prompts_per_iteration=2", "train.progress=false",
        "optim.lr=1e-3", "optim.ema_decay=0", "log.trackers=[]"])  # raw weights exported (EMA: tests/test_ema.py)
    trainer = Trainer(config, tmp_path / "run")
    before = {n: p.detach().clone() for n, p in trainer.policy.trainable_module().named_parameters()}
    summary = trainer.train()
    assert summary["iterations"] == 1 and "acc/strict" in summary["final"]
    after = dict(trainer.policy.trainable_module().named_parameters())
    assert any((after[n] - b).abs().max() > 0 for n, b in before.items())
    pipe = plain_pipeline()
    pipe.transformer = SD3Transformer2DModel.from_pretrained(tmp_path / "run" / "transformer")
    noise = torch.randn((1, *trainer.policy.latent_shape), generator=torch.Generator().manual_seed(1))
    chain = TreeShape((1,) * 10, (False,) * 10, (False,) * 10)
    ours = trainer.policy.decode(rollout(trainer.policy, PROMPTS[:1], chain, root_latents=noise).leaves)
    theirs = pipe(PROMPTS[:1], latents=noise.clone(), num_inference_steps=10, guidance_scale=trainer.policy.guidance_scale,
                  max_sequence_length=0, output_type="pt").images.float()
    assert (ours - theirs).abs().max() < 1e-5
    base = plain_pipeline()(PROMPTS[:1], latents=noise.clone(), num_inference_steps=10,
                            guidance_scale=trainer.policy.guidance_scale, max_sequence_length=0, output_type="pt").images
    assert (base.float() - theirs).abs().max() > 0  # the loaded weights are the trained ones, not the base


def test_pretrain_makes_and_continues_a_loadable_pipeline(tmp_path):
    """`pretrain_compose` with tiny budgets: a folder plain diffusers loads, with the latent
    statistics in the autoencoder's config; `init` continues from it and changes only the denoiser."""
    from treegrpo.worlds.compose_pipeline import pretrain_compose

    stats = pretrain_compose(tmp_path / "a", vae_steps=2, steps=2, dataset_size=32, progress=False)
    first = StableDiffusion3Pipeline.from_pretrained(tmp_path / "a", text_encoder_3=None, tokenizer_3=None)
    assert first.vae.config.shift_factor == pytest.approx(stats["latent_mean"])
    assert first.vae.config.scaling_factor == pytest.approx(1 / stats["latent_std"])
    pretrain_compose(tmp_path / "b", steps=1, dataset_size=32, init=tmp_path / "a", progress=False)
    second = StableDiffusion3Pipeline.from_pretrained(tmp_path / "b", text_encoder_3=None, tokenizer_3=None)
    vae_a, vae_b = first.vae.state_dict(), second.vae.state_dict()
    assert all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a)
    tr_a, tr_b = first.transformer.state_dict(), second.transformer.state_dict()
    assert any(not torch.equal(tr_a[k], tr_b[k]) for k in tr_a)
    assert json.loads((tmp_path / "b" / DEFAULTS_FILE).read_text())["max_sequence_length"] == 0


def test_the_default_cli_run_is_the_compositional_world(tmp_path, capsys):
    """`treegrpo train` with no world overrides trains the embedded SD3 pipeline on the rule-based
    reward and logs strict accuracy per template and the world's layout diversity."""
    from treegrpo.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    run = tmp_path / "run"
    assert main(["train", "method.k=2", "method.window=2", f"train.prompts={prompts}", f"eval.prompts={prompts}",
                 "eval.num_seeds=2", "eval.grid_prompts=2", "eval.diversity_grid_prompts=0", "train.iterations=1",
                 "train.prompts_per_iteration=2", "log.trackers=[]", "--output-dir", str(run), "--quiet"]) == 0
    assert "acc/strict/count" in capsys.readouterr().out  # the printed base vs final table
    summary = json.loads((run / "summary.json").read_text())
    for key in ("acc/strict", "acc/strict/single", "acc/strict/count", "reward/compose", "diversity/scene_layout"):
        assert key in summary["base"] and key in summary["final"], key
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["iteration"] == 0 and "eval/acc/strict" in first and "train/compose_mean" not in first
    assert (run / "transformer" / "config.json").is_file()  # full fine-tuning's weights, loadable by diffusers


def test_miscaptioned_scenes_break_exactly_the_compositional_part():
    """A mis-captioned render fails its caption and passes the caption of what it shows: colours
    swapped, one object too few or many, relation reversed; single objects are never mis-captioned.
    The share of mis-captioned scenes in a pretraining batch follows `caption_noise`."""
    import random

    from treegrpo.worlds.compose import parse_prompt, render_scenes, sample_scene
    from treegrpo.worlds.compose_pipeline import miscaptioned, sample_batch

    rng = random.Random(0)
    prompts = ["a red circle and a blue square", "three green triangles", "two cyan squares", "four yellow circles",
               "a magenta triangle above a blue circle", "a red square to the left of a green square"]
    shown = [miscaptioned(parse_prompt(p), rng) for p in prompts]
    assert shown[0].text == "a blue circle and a red square"
    assert [len(s.objects) for s in shown[1:4]] in ([2, 1, 3], [4, 1, 3], [2, 3, 3], [4, 3, 3])
    assert shown[4].relation == "below" and shown[5].relation == "to the right of"
    assert miscaptioned(parse_prompt("a red circle"), rng) == parse_prompt("a red circle")
    images = render_scenes([sample_scene(s, rng) for s in shown])
    _, wrong = verdicts(images, prompts)
    _, right = verdicts(images, [s.text for s in shown])
    assert wrong.sum() == 0 and right.all()

    def clean_share(noise: float) -> float:
        texts, images = sample_batch(200, random.Random(1), caption_noise=noise)
        _, ok = verdicts(images, texts)
        single = torch.tensor([parse_prompt(t).template == "single" for t in texts])
        return float(ok[~single].float().mean())

    assert clean_share(0.0) == 1.0
    assert 0.45 < clean_share(0.4) < 0.75  # 0.6 expected among the other templates



@pytest.mark.parametrize("lora", [False, True])
def test_flow_matching_trains_the_conditional_velocity_when_asked(tmp_path, lora):
    """optim.matching_guidance=false: the objective's velocity is the conditional branch alone (the
    guided one otherwise), for the policy and for its KL reference, with full weights and LoRA."""
    from treegrpo.config import load_config
    from treegrpo.trainer import Trainer

    overrides = ["optim.objective=flow_matching", "optim.kl_coef=0.1", "log.trackers=[]", "train.progress=false"]
    if lora:
        overrides += ["model.lora_rank=2"]
    trainers = {g: Trainer(load_config("configs/compose_treegrpo.yaml", [*overrides, f"optim.matching_guidance={g}"]),
                           tmp_path / f"run_{g}") for g in ("true", "false")}
    policy = trainers["true"].policy
    cond = policy.encode_prompts(PROMPTS)
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    t, prompt = trainers["true"].schedule.times[[2, 5]], torch.tensor([0, 1])
    with torch.no_grad():
        guided = policy.predict(x, t, cond, prompt)
        scale, policy.guidance_scale = policy.guidance_scale, 1.0
        conditional = policy.predict(x, t, cond, prompt)
        policy.guidance_scale = scale
        for g, want in (("true", guided), ("false", conditional)):
            tr = trainers[g]
            torch.testing.assert_close(tr._velocity(tr.policy, x, t, tr.policy.encode_prompts(PROMPTS), prompt), want)
            torch.testing.assert_close(tr._velocity(tr.reference, x, t, tr.policy.encode_prompts(PROMPTS), prompt), want)
    assert (guided - conditional).abs().max() > 1e-3
    assert trainers["false"].policy.guidance_scale == scale  # restored


def test_pretraining_scenes_follow_position_share_and_relation_margin():
    """`position_share` sets the position template's share of a pretraining batch, and every position
    scene keeps `relation_margin` px between the detected centres on its axis (the detector shares no
    code with the placement); out-of-range values are refused before any training."""
    import random

    from treegrpo.rewards.compose import detect, match_objects, relation_margin
    from treegrpo.worlds.compose import parse_prompt
    from treegrpo.worlds.compose_pipeline import pretrain_compose, sample_batch

    texts, images = sample_batch(300, random.Random(2), position_share=0.7, relation_margin=12.0)
    specs = [parse_prompt(t) for t in texts]
    position = [i for i, s in enumerate(specs) if s.template == "position"]
    assert 0.6 < len(position) / len(texts) < 0.8
    dets = detect(images[position])
    margins = []
    for i, d in zip(position, dets):
        (a, _), (b, _) = match_objects(specs[i], d)
        margins.append(relation_margin(a, b, specs[i].relation))
    assert min(margins) > 11.0  # rendered at > 12 px; the detector's centres are within a pixel
    texts_default, _ = sample_batch(300, random.Random(3))
    assert 0.15 < sum(parse_prompt(t).template == "position" for t in texts_default) / 300 < 0.35
    for bad in ({"relation_margin": 2.0}, {"relation_margin": 20.0}, {"position_share": 1.5}):
        with pytest.raises(ValueError):
            pretrain_compose("unused", **bad)
