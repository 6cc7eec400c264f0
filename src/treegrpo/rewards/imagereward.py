"""``imagereward``: ImageReward (THUDM) on transformers' BLIP modules.

ImageReward is BLIP's ViT-L image encoder plus BLIP's BERT text encoder, whose layers cross-attend
to all image tokens, and a linear MLP on the text [CLS] feature:

    image_embeds = ViT(pixels)                           # [B, 1 + patches, 1024], final LayerNorm applied
    h = BERT(prompt ids, mask, cross-attention to image_embeds)[:, 0]   # [B, 768]
    reward = (MLP(h) - 0.16717362830052426) / 1.0333394966054072

Prompts are tokenised by BLIP's ``bert-base-uncased`` tokenizer, padded / truncated to 35 tokens;
images get CLIP's preprocessing (shortest side 224 bicubic, center crop, CLIP mean/std). Scores are
standardised over ImageReward's training data, so ~0 is an average image and SD images score ~-1..2
(the TreeGRPO paper's table: 0.89 base SD3.5-M, 1.33 after TreeGRPO).

The checkpoint (``THUDM/ImageReward`` / ``ImageReward.pt``) holds BLIP's own key names
(``blip.visual_encoder.*`` timm-style ViT, ``blip.text_encoder.*`` BERT, ``mlp.layers.*``); they
are renamed onto transformers' ``BlipVisionModel`` and ``BlipTextModel``, whose computations are
the same (checked against a hand-written BLIP forward in tests/test_rewards_imagereward.py). The
architecture sizes are read from the checkpoint's tensor shapes; the attention head width (64 for
both towers, which shapes cannot tell) is the ``head_dim`` option. Written by hand because the
``image-reward`` package needs torchvision, which cannot be imported beside our torch.
"""

from __future__ import annotations

import re

import torch

from treegrpo.config import ConfigError
from treegrpo.rewards.base import register_reward
from treegrpo.rewards.clip import build_model_without_init, check_batch, chunks, resolve_device, resolve_dtype
from treegrpo.rewards.preference import RegressionHead, load_torch_checkpoint
from treegrpo.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageTransform
from treegrpo.rewards.weights import RewardWeightsError, check_tokenizer, load_all, load_pretrained, resolve_file

IMAGEREWARD_REPO, IMAGEREWARD_FILE = "THUDM/ImageReward", "ImageReward.pt"
TOKENIZER_REPO = "bert-base-uncased"  # BLIP's tokenizer (its [DEC] / [ENC] additions are not used for scoring)
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
MAX_TEXT_TOKENS = 35
VISION_LN_EPS, TEXT_LN_EPS = 1e-6, 1e-12  # BLIP's ViT and BERT LayerNorm epsilons

_VISION_RENAMES = {
    "patch_embed.proj": "embeddings.patch_embedding",
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "norm": "post_layernorm",
}
_VISION_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                 "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


def split_imagereward(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """ImageReward keys -> (BlipVisionModel keys, BlipTextModel keys, RegressionHead keys), float32.

    BLIP's projection / matching heads (``blip.vision_proj``, ``blip.text_proj``, ...) and buffers
    are not used by the score and are dropped; an unknown vision key raises KeyError."""
    vision, text, head = {}, {}, {}
    for key, value in state_dict.items():
        value = value.float()
        if key.startswith("blip.visual_encoder."):
            name = key[len("blip.visual_encoder."):]
            stem, _, kind = name.rpartition(".")
            if name in ("cls_token", "pos_embed"):
                vision[_VISION_RENAMES[name]] = value
            elif stem in _VISION_RENAMES:
                vision[f"{_VISION_RENAMES[stem]}.{kind}"] = value
            elif (match := _BLOCK.match(name)) and match.group(2) in _VISION_BLOCK:
                vision[f"encoder.layers.{match.group(1)}.{_VISION_BLOCK[match.group(2)]}.{match.group(3)}"] = value
            else:
                raise KeyError(f"ImageReward key {key!r} has no BlipVisionModel counterpart")
        elif key.startswith("blip.text_encoder."):
            name = key[len("blip.text_encoder."):]
            if not name.endswith("position_ids"):  # a buffer, rebuilt by the model
                text[name] = value  # BLIP's BERT and transformers' BlipTextModel share the names
        elif key.startswith("mlp."):
            head[key[len("mlp."):]] = value
    return vision, text, head


def blip_configs(vision: dict[str, torch.Tensor], text: dict[str, torch.Tensor], head_dim: int):
    """BlipVisionConfig and BlipTextConfig read off the converted tensors' shapes."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    grid = round((vision["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    vision_layers = len({k.split(".")[2] for k in vision if k.startswith("encoder.layers.")})
    text_width = text["embeddings.word_embeddings.weight"].shape[1]
    text_layers = len({k.split(".")[2] for k in text if k.startswith("encoder.layer.")})
    for name, w in (("vision", width), ("text", text_width)):
        if w % head_dim:
            raise ConfigError(f"reward.options.imagereward.head_dim={head_dim} does not divide the {name} width {w}")
    vision_config = BlipVisionConfig(
        hidden_size=width, intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=vision_layers, num_attention_heads=width // head_dim, image_size=grid * patch,
        patch_size=patch, hidden_act="gelu", layer_norm_eps=VISION_LN_EPS)
    text_config = BlipTextConfig(
        vocab_size=text["embeddings.word_embeddings.weight"].shape[0], hidden_size=text_width,
        encoder_hidden_size=text["encoder.layer.0.crossattention.self.key.weight"].shape[1],
        intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0], num_hidden_layers=text_layers,
        num_attention_heads=text_width // head_dim, max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0],
        hidden_act="gelu", layer_norm_eps=TEXT_LN_EPS, is_decoder=True)  # is_decoder: build the cross-attention layers
    return vision_config, text_config


@register_reward("imagereward")
class ImageReward:
    """``imagereward``: ImageReward v1.0, [B] standardised scores (see the module docstring).

    Options: ``checkpoint`` (default ``THUDM/ImageReward`` / ``ImageReward.pt`` from the HF cache),
    ``tokenizer`` (default ``bert-base-uncased``), ``head_dim`` (64), ``device``, ``dtype``, ``batch_size``.
    """

    def __init__(self, checkpoint: str | None = None, tokenizer: str | None = None, head_dim: int = 64,
                 device: str = "auto", dtype: str = "float32", batch_size: int = 32) -> None:
        from transformers import BertTokenizer, BlipTextModel, BlipVisionModel

        def load_tokenizer():
            tok = load_pretrained("imagereward", BertTokenizer.from_pretrained, tokenizer, TOKENIZER_REPO, "tokenizer",
                                  "the BERT tokenizer", "vocab.txt tokenizer_config.json")
            return check_tokenizer("imagereward", tok, tokenizer, TOKENIZER_REPO, "vocab.txt tokenizer_config.json", "tokenizer")

        self.tokenizer, path = load_all(load_tokenizer, lambda: resolve_file(
            "imagereward", IMAGEREWARD_REPO, IMAGEREWARD_FILE, checkpoint, "checkpoint"))
        raw = load_torch_checkpoint("imagereward", path)
        try:
            vision, text, head = split_imagereward(raw.get("state_dict", raw))
            vision_config, text_config = blip_configs(vision, text, head_dim)
            self.vision = build_model_without_init(lambda: BlipVisionModel(vision_config), vision)
            self.text = build_model_without_init(lambda: BlipTextModel(text_config, add_pooling_layer=False), text)
            self.head = RegressionHead(text_config.hidden_size)
            self.head.load_state_dict(head)
        except (KeyError, RuntimeError) as err:
            raise RewardWeightsError(f"reward 'imagereward': {path!r} is not an ImageReward checkpoint: "
                                     f"{type(err).__name__}: {err}") from None
        if batch_size < 1:
            raise ConfigError(f"reward.options.imagereward.batch_size must be >= 1, got {batch_size}")
        self.device, self.dtype, self.batch_size = resolve_device(device), resolve_dtype("imagereward", dtype), batch_size
        for module in (self.vision, self.text, self.head):
            module.to(self.device, self.dtype).eval().requires_grad_(False)
        size = int(vision_config.image_size)
        self.transform = ImageTransform(size, size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch("imagereward", images, prompts)
        parts = []
        for s in chunks(images.shape[0], self.batch_size):
            pixels = self.transform(images[s].to(self.device)).to(self.dtype)
            image_embeds = self.vision(pixel_values=pixels).last_hidden_state
            tokens = self.tokenizer(list(prompts[s]), padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS,
                                    return_tensors="pt").to(self.device)
            image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=self.device)
            hidden = self.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                               encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask).last_hidden_state
            parts.append(self.head(hidden[:, 0])[:, 0].float())
        return ((torch.cat(parts) - REWARD_MEAN) / REWARD_STD).to(images.device)
