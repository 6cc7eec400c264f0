"""``imagereward`` on a tiny random checkpoint in ImageReward's own (BLIP) key layout, checked against
a hand-written BLIP forward: timm-style ViT (fused qkv, pre-LN) and BERT with cross-attention (post-LN)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_clip import random_images
from transformers import BertTokenizer

from treegrpo.config import ConfigError
from treegrpo.rewards import build_reward
from treegrpo.rewards.imagereward import REWARD_MEAN, REWARD_STD
from treegrpo.rewards.weights import RewardWeightsError

PROMPTS = ["a cat on a mat", "a dog", "the cat", "a red dog on the mat", "mat"]
WIDTH, TEXT_WIDTH, HEAD_DIM, LAYERS, PATCH, IMAGE, MAX_POS = 32, 24, 8, 2, 8, 32, 40  # 4 vision, 3 text heads
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "on", "the", "mat", "red"]


def tiny_checkpoint() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def linear(prefix, n_out, n_in):
        return {f"{prefix}.weight": rand(n_out, n_in), f"{prefix}.bias": rand(n_out)}

    def ln(prefix, n):
        return {f"{prefix}.weight": 1 + rand(n, scale=0.1), f"{prefix}.bias": rand(n, scale=0.1)}

    v = "blip.visual_encoder"
    sd = {f"{v}.cls_token": rand(1, 1, WIDTH), f"{v}.pos_embed": rand(1, (IMAGE // PATCH) ** 2 + 1, WIDTH),
          f"{v}.patch_embed.proj.weight": rand(WIDTH, 3, PATCH, PATCH), f"{v}.patch_embed.proj.bias": rand(WIDTH)}
    sd |= ln(f"{v}.norm", WIDTH)
    for i in range(LAYERS):
        b = f"{v}.blocks.{i}"
        sd |= ln(f"{b}.norm1", WIDTH) | ln(f"{b}.norm2", WIDTH) | linear(f"{b}.attn.qkv", 3 * WIDTH, WIDTH)
        sd |= linear(f"{b}.attn.proj", WIDTH, WIDTH) | linear(f"{b}.mlp.fc1", 4 * WIDTH, WIDTH) | linear(f"{b}.mlp.fc2", WIDTH, 4 * WIDTH)
    t = "blip.text_encoder"
    sd |= {f"{t}.embeddings.word_embeddings.weight": rand(len(WORDS) + 2, TEXT_WIDTH),
           f"{t}.embeddings.position_embeddings.weight": rand(MAX_POS, TEXT_WIDTH),
           f"{t}.embeddings.position_ids": torch.arange(MAX_POS)[None]}
    sd |= ln(f"{t}.embeddings.LayerNorm", TEXT_WIDTH)
    for i in range(LAYERS):
        b = f"{t}.encoder.layer.{i}"
        for kind, kv_in in (("attention", TEXT_WIDTH), ("crossattention", WIDTH)):
            sd |= linear(f"{b}.{kind}.self.query", TEXT_WIDTH, TEXT_WIDTH)
            sd |= linear(f"{b}.{kind}.self.key", TEXT_WIDTH, kv_in) | linear(f"{b}.{kind}.self.value", TEXT_WIDTH, kv_in)
            sd |= linear(f"{b}.{kind}.output.dense", TEXT_WIDTH, TEXT_WIDTH) | ln(f"{b}.{kind}.output.LayerNorm", TEXT_WIDTH)
        sd |= linear(f"{b}.intermediate.dense", 4 * TEXT_WIDTH, TEXT_WIDTH) | linear(f"{b}.output.dense", TEXT_WIDTH, 4 * TEXT_WIDTH)
        sd |= ln(f"{b}.output.LayerNorm", TEXT_WIDTH)
    sd |= linear("blip.vision_proj", 16, WIDTH) | linear("blip.text_proj", 16, TEXT_WIDTH)  # unused by the score
    for index, (n_in, n_out) in zip([0, 2, 4, 6, 7], [(TEXT_WIDTH, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]):
        sd |= {f"mlp.layers.{index}.weight": rand(n_out, n_in, scale=n_in ** -0.5), f"mlp.layers.{index}.bias": rand(n_out)}
    return sd


def attention(q_in, kv_in, wq, bq, wk, bk, wv, bv, heads, mask=None):
    """Multi-head scaled dot-product attention from explicit weights: q_in [B, Lq, D], kv_in [B, Lk, E]."""
    def split(x):
        return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    q, k, v = split(q_in @ wq.T + bq), split(kv_in @ wk.T + bk), split(kv_in @ wv.T + bv)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def blip_vit(sd, pixels):
    v = "blip.visual_encoder"
    x = F.conv2d(pixels, sd[f"{v}.patch_embed.proj.weight"], sd[f"{v}.patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([sd[f"{v}.cls_token"].expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd[f"{v}.pos_embed"]
    for i in range(LAYERS):
        b = f"{v}.blocks.{i}"
        h = F.layer_norm(x, (WIDTH,), sd[f"{b}.norm1.weight"], sd[f"{b}.norm1.bias"], eps=1e-6)
        wq, wk, wv = sd[f"{b}.attn.qkv.weight"].chunk(3)
        bq, bk, bv = sd[f"{b}.attn.qkv.bias"].chunk(3)
        x = x + attention(h, h, wq, bq, wk, bk, wv, bv, WIDTH // HEAD_DIM) @ sd[f"{b}.attn.proj.weight"].T + sd[f"{b}.attn.proj.bias"]
        h = F.layer_norm(x, (WIDTH,), sd[f"{b}.norm2.weight"], sd[f"{b}.norm2.bias"], eps=1e-6)
        x = x + F.gelu(h @ sd[f"{b}.mlp.fc1.weight"].T + sd[f"{b}.mlp.fc1.bias"]) @ sd[f"{b}.mlp.fc2.weight"].T + sd[f"{b}.mlp.fc2.bias"]
    return F.layer_norm(x, (WIDTH,), sd[f"{v}.norm.weight"], sd[f"{v}.norm.bias"], eps=1e-6)


def blip_text_cls(sd, ids, mask, image_embeds):
    t = "blip.text_encoder"

    def ln(x, p):
        return F.layer_norm(x, (TEXT_WIDTH,), sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-12)

    def lin(x, p):
        return x @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]

    x = sd[f"{t}.embeddings.word_embeddings.weight"][ids] + sd[f"{t}.embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = ln(x, f"{t}.embeddings.LayerNorm")
    pad = (1.0 - mask[:, None, None, :].float()) * -1e9  # padded text tokens are not attended to
    for i in range(LAYERS):
        b = f"{t}.encoder.layer.{i}"
        for kind, kv, m in (("attention", None, pad), ("crossattention", image_embeds, None)):
            p = f"{b}.{kind}.self"
            src = x if kv is None else kv
            a = attention(x, src, sd[f"{p}.query.weight"], sd[f"{p}.query.bias"], sd[f"{p}.key.weight"], sd[f"{p}.key.bias"],
                          sd[f"{p}.value.weight"], sd[f"{p}.value.bias"], TEXT_WIDTH // HEAD_DIM, m)
            x = ln(lin(a, f"{b}.{kind}.output.dense") + x, f"{b}.{kind}.output.LayerNorm")
        x = ln(lin(F.gelu(lin(x, f"{b}.intermediate.dense")), f"{b}.output.dense") + x, f"{b}.output.LayerNorm")
    return x[:, 0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagereward")
    sd = tiny_checkpoint()
    torch.save(sd, folder / "ImageReward.pt")
    BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(folder / "tokenizer")
    return folder, sd


def test_imagereward_matches_a_hand_written_blip_forward(files):
    folder, sd = files
    reward = build_reward("imagereward", checkpoint=str(folder / "ImageReward.pt"), tokenizer=str(folder / "tokenizer"),
                          head_dim=HEAD_DIM, device="cpu", batch_size=2)
    images = random_images(5, 40, 48, seed=6)
    pixels = reward.transform(images)
    assert pixels.shape == (5, 3, IMAGE, IMAGE) and reward.transform.mean == (0.48145466, 0.4578275, 0.40821073)
    tokens = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].shape == (5, 35) and bool((tokens["input_ids"][:, 0] == WORDS.index("[CLS]")).all())
    with torch.no_grad():
        cls = blip_text_cls(sd, tokens["input_ids"], tokens["attention_mask"], blip_vit(sd, pixels))
        x = cls
        for index in [0, 2, 4, 6, 7]:
            x = x @ sd[f"mlp.layers.{index}.weight"].T + sd[f"mlp.layers.{index}.bias"]
    expected = (x[:, 0] - REWARD_MEAN) / REWARD_STD
    scores = reward(images, PROMPTS)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(reward(images, ["a cat"] * 5), reward(images, ["the red dog"] * 5))


def test_imagereward_errors_name_the_fix(files, monkeypatch, tmp_path):
    import huggingface_hub.constants

    folder, sd = files
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(RewardWeightsError, match=r"hf download THUDM/ImageReward ImageReward.pt.*reward\.options\.imagereward\.checkpoint"):
        build_reward("imagereward", tokenizer=str(folder / "tokenizer"))
    with pytest.raises(ConfigError, match="head_dim=7 does not divide"):
        build_reward("imagereward", checkpoint=str(folder / "ImageReward.pt"), tokenizer=str(folder / "tokenizer"), head_dim=7)
    torch.save({k: v for k, v in sd.items() if not k.startswith("mlp.")}, tmp_path / "no_head.pt")
    with pytest.raises(RewardWeightsError, match="is not an ImageReward checkpoint"):
        build_reward("imagereward", checkpoint=str(tmp_path / "no_head.pt"), tokenizer=str(folder / "tokenizer"), head_dim=8)


def test_real_imagereward_shapes_give_blip_vit_large_and_bert_base():
    """The sizes read off ImageReward.pt's tensor shapes (meta tensors: nothing allocated)."""
    from treegrpo.rewards.imagereward import blip_configs, split_imagereward

    def meta(*shape):
        return torch.empty(*shape, device="meta")

    v, t = "blip.visual_encoder", "blip.text_encoder"
    sd = {f"{v}.cls_token": meta(1, 1, 1024), f"{v}.pos_embed": meta(1, 197, 1024), f"{v}.patch_embed.proj.weight": meta(1024, 3, 16, 16),
          f"{t}.embeddings.word_embeddings.weight": meta(30524, 768), f"{t}.embeddings.position_embeddings.weight": meta(512, 768)}
    for i in range(24):
        sd[f"{v}.blocks.{i}.mlp.fc1.weight"] = meta(4096, 1024)
    for i in range(12):
        sd[f"{t}.encoder.layer.{i}.crossattention.self.key.weight"] = meta(768, 1024)
        sd[f"{t}.encoder.layer.{i}.intermediate.dense.weight"] = meta(3072, 768)
    vision, text, _ = split_imagereward(sd)
    vc, tc = blip_configs(vision, text, head_dim=64)
    assert (vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads, vc.patch_size, vc.image_size, vc.intermediate_size,
            vc.layer_norm_eps) == (1024, 24, 16, 16, 224, 4096, 1e-6)
    assert (tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads, tc.encoder_hidden_size, tc.vocab_size,
            tc.intermediate_size, tc.max_position_embeddings, tc.layer_norm_eps) == (768, 12, 12, 1024, 30524, 3072, 512, 1e-12)
