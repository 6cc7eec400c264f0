"""The pretrained-model rewards (clipscore, pickscore, aesthetic, hpsv2.1) on tiny random CLIP-style
models: preprocessing, batching, each score convention against an independent computation, the
open_clip -> transformers conversion against a hand-written open_clip forward, and the errors a user
sees when weights are missing. No test needs real weights or the network."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_clip import IMAGE_SIZE, random_images, save_processor, save_tiny_clip, tiny_config, tiny_tokenizer
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from treegrpo.config import ConfigError, load_config
from treegrpo.rewards import build_reward, build_rewards
from treegrpo.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform, LongestSidePad
from treegrpo.rewards.weights import RewardWeightsError

PROMPTS = ["a cat", "a dog", "cat", "a dog on a cat", "dog"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_clip")
    save_tiny_clip(folder, seed=0, logit_scale=math.log(50.0))
    return folder


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


# ------------------------------------------------------------------------------------------------
# preprocessing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(300, 500), (512, 512), (64, 48), (16, 16)])
def test_transform_matches_transformers_clip_image_processor(height, width):
    """Torch resize (bicubic, antialias) + center crop + normalise == CLIPImageProcessor's PIL path,
    up to that path's uint8 rounding (1/255 / std ~ 0.015)."""
    images = (random_images(2, height, width, seed=height) * 255).round() / 255  # exactly representable in uint8
    processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    expected = torch.tensor(np.stack([processor(images=to_pil(im), return_tensors="np")["pixel_values"][0] for im in images]))
    transform = ImageTransform.from_processor(processor)
    assert (transform.size, transform.crop, transform.mean, transform.std) == (224, 224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    ours = transform(images)
    assert ours.shape == expected.shape == (2, 3, 224, 224)
    assert (ours - expected).abs().max() < 2.0 / 255 / min(OPENAI_CLIP_STD)
    assert (ours - expected).abs().mean() < 0.01


def test_transform_crops_the_center_of_the_long_side():
    """A wide image whose left and right thirds differ: the crop keeps only the middle."""
    image = torch.zeros(1, 3, 224, 448)
    image[..., 112:336] = 1.0
    out = ImageTransform(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(image)
    assert out.shape == (1, 3, 224, 224) and torch.allclose(out, torch.ones_like(out))


# HPSv2.1's own preprocessing: longest side to 224 (PIL bicubic), zero pad centred, no crop
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)  # OpenAI CLIP's, typed from the paper's code
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def hpsv2_reference(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Written from hpsv2's transform (open_clip ResizeMaxSize, ToTensor, Normalize) on PIL images:
    scale = size / longest side, new sides round(side * scale), PIL bicubic resize, paste at
    ((size - w) // 2, (size - h) // 2) on a black size x size canvas, / 255, normalise."""
    out = []
    for image in images:
        pil = to_pil(image)
        width, height = pil.size
        scale = size / max(width, height)
        new_w, new_h = round(width * scale), round(height * scale)
        resized = pil.resize((new_w, new_h), Image.BICUBIC)
        canvas = Image.new("RGB", (size, size), (0, 0, 0))
        canvas.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
        pixels = torch.tensor(np.array(canvas), dtype=torch.float32).permute(2, 0, 1) / 255
        out.append((pixels - CLIP_MEAN) / CLIP_STD)
    return torch.stack(out)


@pytest.mark.parametrize("height, width", [(480, 640), (640, 480), (512, 512), (200, 300)])
def test_hps_transform_matches_hpsv2s_longest_side_resize_and_zero_pad(height, width):
    images = random_images(2, height, width, seed=height + width)
    ours = LongestSidePad(224)(images)
    assert ours.shape == (2, 3, 224, 224)
    torch.testing.assert_close(ours, hpsv2_reference(images), atol=1e-6, rtol=0)


@pytest.mark.parametrize("height, width, resized, before", [(480, 640, 168, 28), (200, 300, 149, 37)])
def test_hps_transform_pads_black_centred_with_the_odd_row_below(height, width, resized, before):
    """A white image: `before` pad rows above, the resized image, the rest below (and transposed
    for a tall image); pad pixels are black before normalising, so -mean/std after. No PIL here."""
    for tall in (False, True):
        shape = (1, 3, width, height) if tall else (1, 3, height, width)
        out = LongestSidePad(224, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(torch.ones(shape))[0]
        profile = out.mean(dim=(0, 1)) if tall else out.mean(dim=(0, 2))  # per column / per row
        expected = torch.zeros(224)
        expected[before:before + resized] = 1.0
        assert torch.equal(profile, expected), (tall, profile)
    normalised = LongestSidePad(224)(torch.ones(1, 3, height, width))[0]
    torch.testing.assert_close(normalised[:, 0, 0], (-CLIP_MEAN / CLIP_STD).flatten())
    torch.testing.assert_close(normalised[:, 112, 112], ((1 - CLIP_MEAN) / CLIP_STD).flatten())


def test_hps_transform_differs_from_the_clip_crop_on_non_square_images_only():
    """The bug it fixes: the shortest-side resize + centre crop saw another picture of a 640x480 image."""
    wide, square = random_images(1, 480, 640, seed=3), random_images(1, 512, 512, seed=3)
    assert (LongestSidePad(224)(wide) - ImageTransform()(wide)).abs().mean() > 0.5
    assert (LongestSidePad(224)(square) - ImageTransform()(square)).abs().mean() < 0.01


# ------------------------------------------------------------------------------------------------
# clipscore, pickscore, aesthetic
# ------------------------------------------------------------------------------------------------


def reference_features(folder, images, prompts, pixel_values=None):
    """Image and text features straight from transformers (CLIPModel, CLIPTokenizer, CLIPImageProcessor)."""
    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    if pixel_values is None:
        processor = CLIPImageProcessorPil.from_pretrained(folder)
        pixel_values = torch.tensor(np.stack([processor(images=to_pil(im), return_tensors="np")["pixel_values"][0]
                                              for im in images]))
    tokens = tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixel_values).pooler_output
        text = model.get_text_features(**tokens).pooler_output
    return image, text, model


def cosine(a, b):
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def test_clipscore_is_the_raw_cosine_of_clip_image_and_text_features(clip_dir):
    reward = build_reward("clipscore", model=str(clip_dir), device="cpu")
    images = (random_images(5, 48, 40) * 255).round() / 255
    scores = reward(images, PROMPTS)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    # exact: the same pixels through transformers' own feature functions
    image, text, _ = reference_features(clip_dir, images, PROMPTS, pixel_values=reward.scorer.transform(images))
    torch.testing.assert_close(scores, cosine(image, text), atol=1e-5, rtol=0)
    # independent end to end: the PIL image processor instead of our torch transform
    image, text, _ = reference_features(clip_dir, images, PROMPTS)
    torch.testing.assert_close(scores, cosine(image, text), atol=5e-3, rtol=0)
    # the score depends on the prompt, and prompts are matched to their own image
    assert not torch.allclose(reward(images, ["a cat"] * 5), reward(images, ["a dog"] * 5))
    assert torch.allclose(reward(images[[3, 1]], [PROMPTS[3], PROMPTS[1]]), scores[[3, 1]], atol=1e-5)


def test_clip_rewards_expose_image_features_for_diversity(clip_dir):
    from treegrpo.diversity import resolve_features

    reward = build_reward("clipscore", model=str(clip_dir), device="cpu")
    images = (random_images(4, 40, 40, seed=5) * 255).round() / 255
    image, _, _ = reference_features(clip_dir, images, PROMPTS[:4], pixel_values=reward.scorer.transform(images))
    torch.testing.assert_close(reward.image_features(images), image, atol=1e-5, rtol=0)
    feature = resolve_features(None, {"clipscore": reward}, "sd3")["cosine_clipscore"]
    torch.testing.assert_close(feature(images, PROMPTS[:4]), image, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["clipscore", "pickscore"])
def test_batching_in_chunks_equals_one_batch(clip_dir, name):
    images = random_images(5, 40, 40, seed=3)
    extra = {"processor": str(clip_dir)} if name == "pickscore" else {}
    chunked = build_reward(name, model=str(clip_dir), device="cpu", batch_size=2, **extra)(images, PROMPTS)
    whole = build_reward(name, model=str(clip_dir), device="cpu", batch_size=8, **extra)(images, PROMPTS)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    if name == "clipscore":  # bfloat16 weights and activations: close to float32, still float32 out
        half = build_reward(name, model=str(clip_dir), device="cpu", dtype="bfloat16")(images, PROMPTS)
        assert half.dtype == torch.float32 and (half - whole).abs().max() < 0.02
        with pytest.raises(ConfigError, match="dtype must be one of"):
            build_reward(name, model=str(clip_dir), dtype="half")


def test_pickscore_is_logit_scale_exp_times_cosine_with_the_separate_processor(clip_dir, tmp_path):
    processor_dir = tmp_path / "processor"  # PickScore's tokenizer/processor live in another repo
    save_processor(tiny_tokenizer(), processor_dir)
    reward = build_reward("pickscore", model=str(clip_dir), processor=str(processor_dir), device="cpu")
    assert reward.scorer.transform.mean == (0.5, 0.4, 0.3)  # read from the processor folder
    images = random_images(5, 32, 48, seed=1)
    image, text, _ = reference_features(clip_dir, images, PROMPTS, pixel_values=reward.scorer.transform(images))
    torch.testing.assert_close(reward(images, PROMPTS), 50.0 * cosine(image, text), atol=1e-4, rtol=0)


def test_aesthetic_is_the_mlp_on_the_normalised_image_embedding(clip_dir, tmp_path):
    torch.manual_seed(1)
    sizes = [16, 1024, 128, 64, 16, 1]  # the tiny CLIP's projection is 16-d (768 for ViT-L/14)
    head = {}
    for index, (n_in, n_out) in zip([0, 2, 4, 6, 7], zip(sizes, sizes[1:])):
        head[f"layers.{index}.weight"] = torch.randn(n_out, n_in) / n_in ** 0.5
        head[f"layers.{index}.bias"] = torch.randn(n_out)
    torch.save(head, tmp_path / "head.pth")
    reward = build_reward("aesthetic", checkpoint=str(tmp_path / "head.pth"), clip_model=str(clip_dir), device="cpu")
    images = random_images(5, 40, 40, seed=2)
    image, _, _ = reference_features(clip_dir, images, PROMPTS, pixel_values=reward.scorer.transform(images))
    x = image / image.norm(dim=-1, keepdim=True)
    for index in [0, 2, 4, 6, 7]:  # no activations between the linear layers
        x = x @ head[f"layers.{index}.weight"].T + head[f"layers.{index}.bias"]
    torch.testing.assert_close(reward(images, PROMPTS), x[:, 0], atol=1e-4, rtol=1e-4)
    assert torch.equal(reward(images, PROMPTS), reward(images, ["anything"] * 5))  # the prompt is not used


# ------------------------------------------------------------------------------------------------
# hpsv2.1: open_clip checkpoint -> transformers CLIPModel, checked against an open_clip-style forward
# ------------------------------------------------------------------------------------------------


def random_openclip_state_dict(width=32, layers=2, mlp=64, embed=16, vocab=518, context=16, patch=8, image=IMAGE_SIZE):
    """Random weights in open_clip's CLIP layout (both towers the same width for brevity)."""
    g = torch.Generator().manual_seed(7)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def ln(prefix):
        return {f"{prefix}.weight": 1 + rand(width, scale=0.1), f"{prefix}.bias": rand(width, scale=0.1)}

    def blocks(prefix):
        sd = {}
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}"
            sd |= ln(f"{p}.ln_1") | ln(f"{p}.ln_2")
            sd |= {f"{p}.attn.in_proj_weight": rand(3 * width, width), f"{p}.attn.in_proj_bias": rand(3 * width),
                   f"{p}.attn.out_proj.weight": rand(width, width), f"{p}.attn.out_proj.bias": rand(width),
                   f"{p}.mlp.c_fc.weight": rand(mlp, width), f"{p}.mlp.c_fc.bias": rand(mlp),
                   f"{p}.mlp.c_proj.weight": rand(width, mlp), f"{p}.mlp.c_proj.bias": rand(width)}
        return sd

    grid = image // patch
    sd = {"visual.conv1.weight": rand(width, 3, patch, patch), "visual.class_embedding": rand(width),
          "visual.positional_embedding": rand(grid * grid + 1, width), "visual.proj": rand(width, embed),
          "token_embedding.weight": rand(vocab, width), "positional_embedding": rand(context, width),
          "text_projection": rand(width, embed), "logit_scale": torch.tensor(math.log(1 / 0.07)),
          "attn_mask": torch.full((context, context), float("-inf")).triu(1)}
    sd |= ln("visual.ln_pre") | ln("visual.ln_post") | ln("ln_final")
    sd |= blocks("visual.transformer") | blocks("transformer")
    return sd


def openclip_blocks(x, sd, prefix, heads, mask=None):
    """open_clip's residual attention blocks on x [B, L, D]: pre-LN, nn.MultiheadAttention, GELU MLP."""
    width = x.shape[-1]
    i = 0
    while f"{prefix}.resblocks.{i}.ln_1.weight" in sd:
        p = f"{prefix}.resblocks.{i}"
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict({"in_proj_weight": sd[f"{p}.attn.in_proj_weight"], "in_proj_bias": sd[f"{p}.attn.in_proj_bias"],
                              "out_proj.weight": sd[f"{p}.attn.out_proj.weight"], "out_proj.bias": sd[f"{p}.attn.out_proj.bias"]})
        h = torch.nn.functional.layer_norm(x, (width,), sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"])
        x = x + attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        h = torch.nn.functional.layer_norm(x, (width,), sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"])
        h = torch.nn.functional.gelu(h @ sd[f"{p}.mlp.c_fc.weight"].T + sd[f"{p}.mlp.c_fc.bias"])
        x = x + h @ sd[f"{p}.mlp.c_proj.weight"].T + sd[f"{p}.mlp.c_proj.bias"]
        i += 1
    return x


def openclip_encode_image(sd, pixels, heads=4):
    x = torch.nn.functional.conv2d(pixels, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)  # [B, grid^2, D]
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    width = x.shape[-1]
    x = torch.nn.functional.layer_norm(x, (width,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    x = openclip_blocks(x, sd, "visual.transformer", heads)
    pooled = torch.nn.functional.layer_norm(x[:, 0], (width,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    return pooled @ sd["visual.proj"]


def openclip_encode_text(sd, ids, heads=4):
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    x = openclip_blocks(x, sd, "transformer", heads, mask=causal)
    x = torch.nn.functional.layer_norm(x, (x.shape[-1],), sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]  # pool at the EOT token


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hps")
    tokenizer = tiny_tokenizer()
    tiny_config(tokenizer, hidden_act="gelu").save_pretrained(folder / "clip_config")
    save_processor(tokenizer, folder / "clip_config")
    (folder / "clip_config" / "preprocessor_config.json").unlink()  # hpsv2.1 preprocesses as hpsv2 does: not needed
    sd = random_openclip_state_dict()
    torch.save({"epoch": 1, "state_dict": sd}, folder / "HPS_v2.1_compressed.pt")
    return folder, sd


def test_hpsv21_conversion_matches_an_openclip_style_forward(hps_files):
    folder, sd = hps_files
    reward = build_reward("hpsv2.1", checkpoint=str(folder / "HPS_v2.1_compressed.pt"),
                          clip_config=str(folder / "clip_config"), device="cpu", batch_size=2)
    assert reward.scorer.transform == LongestSidePad(IMAGE_SIZE)  # hpsv2's preprocessing at the model's size
    images = random_images(5, 40, 56, seed=4)  # not square: resized to 23 x 32, padded to 32 x 32
    pixels = hpsv2_reference(images, IMAGE_SIZE)
    ids = reward.scorer.tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        image_ref, text_ref = openclip_encode_image(sd, pixels), openclip_encode_text(sd, ids)
    torch.testing.assert_close(reward.scorer.image_embeds(images), image_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reward.scorer.text_embeds(PROMPTS), text_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reward(images, PROMPTS), cosine(image_ref, text_ref), atol=1e-5, rtol=0)


def test_hpsv21_rejects_a_checkpoint_of_another_architecture(hps_files, tmp_path):
    folder, sd = hps_files
    tiny_config(tiny_tokenizer()).save_pretrained(tmp_path / "config_only")  # no tokenizer files
    with pytest.raises(RewardWeightsError, match="config_only.*has no tokenizer files"):
        build_reward("hpsv2.1", checkpoint=str(folder / "HPS_v2.1_compressed.pt"), clip_config=str(tmp_path / "config_only"))
    torch.save({"state_dict": {**sd, "visual.extra_head.weight": torch.zeros(2)}}, tmp_path / "bad.pt")
    with pytest.raises(RewardWeightsError, match="does not fit the CLIP config"):
        build_reward("hpsv2.1", checkpoint=str(tmp_path / "bad.pt"), clip_config=str(folder / "clip_config"), device="cpu")


# ------------------------------------------------------------------------------------------------
# missing weights, config, registry
# ------------------------------------------------------------------------------------------------


def test_missing_weights_give_one_error_naming_what_to_download(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(RewardWeightsError) as err:
        build_reward("hpsv2.1", clip_config=str(tmp_path / "nowhere"))
    message = str(err.value)
    assert "is not a folder" in message and "reward.options.hpsv2.1.clip_config" in message
    assert "hf download xswu/HPSv2 HPS_v2.1_compressed.pt" in message and "HF_HUB_OFFLINE=1" in message
    with pytest.raises(RewardWeightsError, match=r"hf download someone/not-cached-clip.*reward\.options\.clipscore\.model"):
        build_reward("clipscore", model="someone/not-cached-clip")
    with pytest.raises(RewardWeightsError, match=r"improved-aesthetic-predictor.*reward\.options\.aesthetic\.checkpoint"):
        build_reward("aesthetic")


def test_cli_prints_missing_weights_as_one_line(monkeypatch, tmp_path, capsys):
    from treegrpo.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["eval", "--rewards", "clipscore", "--reward-option", "clipscore:model=someone/not-cached-clip",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("treegrpo: error: reward 'clipscore' needs") and "\n" not in err


def test_reward_options_and_the_papers_multi_reward_weights_come_from_config(clip_dir, hps_files):
    folder, _ = hps_files
    config = load_config(None, [
        "reward.weights={hpsv2.1: 0.8, clipscore: 0.2}",
        f"reward.options={{hpsv2.1: {{checkpoint: {folder / 'HPS_v2.1_compressed.pt'}, clip_config: {folder / 'clip_config'}, "
        f"device: cpu}}, clipscore: {{model: {clip_dir}, device: cpu}}}}"])
    assert config.reward.weights == {"hpsv2.1": 0.8, "clipscore": 0.2}
    rewards = build_rewards(config.reward.weights, config.reward.options)
    images = random_images(6, 32, 32, seed=5)
    prompts = ["a cat"] * 3 + ["a dog"] * 3
    scores = {name: reward(images, prompts) for name, reward in rewards.items()}
    from treegrpo.advantages import combine_rewards

    group = torch.tensor([0, 0, 0, 1, 1, 1])
    combined = combine_rewards(scores, config.reward.weights, group)

    def standardise(x):
        x = x.double().view(2, 3)
        return ((x - x.mean(1, keepdim=True)) / (x.std(1, unbiased=False, keepdim=True) + 1e-8)).flatten()

    expected = standardise(0.8 * standardise(scores["hpsv2.1"]) + 0.2 * standardise(scores["clipscore"]))
    torch.testing.assert_close(combined.double(), expected, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="unknown option 'chekpoint' in reward.options.hpsv2.1"):
        load_config(None, ["reward.options={hpsv2.1: {chekpoint: /x.pt}}"])
    with pytest.raises(ConfigError, match="Did you mean 'hpsv2.1'"):
        load_config(None, ["reward.options={hpsv2: {checkpoint: /x.pt}}"])


def test_building_the_shapes_reward_does_not_import_transformers():
    code = ("import sys; from treegrpo.rewards import build_reward, available_rewards; build_reward('shapes'); "
            "assert {'hpsv2.1', 'pickscore', 'clipscore', 'aesthetic'} <= set(available_rewards()); "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------------
# treegrpo eval over several reward models, with the normalised-score average
# ------------------------------------------------------------------------------------------------


def test_normalized_average_on_the_papers_table():
    """Our definition (mean relative improvement over the base row) on the paper's Table 1."""
    from treegrpo.evaluation import normalized_scores

    names = ["hpsv2.1", "imagereward", "aesthetic", "clipscore"]
    base = dict(zip([f"reward/{n}" for n in names], [0.2725, 0.8870, 5.9519, 0.3996]))
    rows = {"TreeGRPO": [0.3735, 1.3294, 6.5094, 0.3703], "DanceGRPO": [0.3556, 1.3668, 6.3080, 0.3769],
            "MixGRPO": [0.3649, 1.2263, 6.4295, 0.3612], "DDPO": [0.2758, 1.0067, 5.9458, 0.3900]}
    average = {m: normalized_scores(dict(zip(base, v)), base)["normalized/average"] for m, v in rows.items()}
    assert {m: round(100 * a, 1) for m, a in average.items()} == {"TreeGRPO": 22.2, "DanceGRPO": 21.2, "MixGRPO": 17.6, "DDPO": 3.1}
    tree = normalized_scores(dict(zip(base, rows["TreeGRPO"])), base)
    assert tree["normalized/clipscore"] == pytest.approx((0.3703 - 0.3996) / 0.3996)


def test_eval_scores_sampled_images_with_several_rewards_and_a_baseline(clip_dir, tmp_path, capsys):
    from treegrpo.cli import main
    from treegrpo.evaluation import load_image_folder

    prompts = tmp_path / "heldout.txt"
    prompts.write_text("a red circle on a black background\na blue square on a white background\n")
    samples = tmp_path / "samples"
    assert main(["sample", "--checkpoint", "base", "--prompts", str(prompts), "--seeds", "2", "--out", str(samples), "--quiet"]) == 0
    baseline = tmp_path / "base.json"
    baseline.write_text(json.dumps({"reward/clipscore": 0.5, "reward/shapes": -2.0, "reward/other": 1.0}))
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["eval", "--images", str(samples), "--rewards", "clipscore,shapes", "--reward-option", f"clipscore:model={clip_dir}",
                 "--reward-option", "clipscore:batch_size=3", "--reward-option", "clipscore:device=cpu",
                 "--baseline", str(baseline), "--out", str(out), "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    images, image_prompts = load_image_folder(samples)
    assert len(images) == 4 and printed["images"] == 4
    direct = build_reward("clipscore", model=str(clip_dir), device="cpu")(torch.stack(images), image_prompts)
    assert printed["reward/clipscore"] == pytest.approx(float(direct.double().mean()), abs=1e-6)
    assert printed["reward_std/clipscore"] == pytest.approx(float(direct.double().std(unbiased=False)), abs=1e-6)
    assert printed["normalized/clipscore"] == pytest.approx((printed["reward/clipscore"] - 0.5) / 0.5)
    assert printed["normalized/shapes"] == pytest.approx((printed["reward/shapes"] + 2.0) / 2.0)
    assert printed["normalized/average"] == pytest.approx((printed["normalized/clipscore"] + printed["normalized/shapes"]) / 2)
    assert "normalized/other" not in printed


@pytest.mark.parametrize("argv, message", [
    (["--reward-option", "clipscore:modle=x"], "unknown option 'modle' in reward.options.clipscore"),
    (["--reward-option", "clipscore-model=x"], "must look like NAME:KEY=VALUE"),
    (["--baseline", "/no/such/base.json"], "--baseline '/no/such/base.json' does not exist"),
    (["--images", "/no/such/dir"], "has no index.jsonl"),
])
def test_eval_argument_errors_are_one_line(argv, message, capsys):
    from treegrpo.cli import main

    assert main(["eval", "--rewards", "shapes", "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
