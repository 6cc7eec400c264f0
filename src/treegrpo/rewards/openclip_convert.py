"""Convert an open_clip CLIP state dict (e.g. HPSv2.1's ViT-H-14) into transformers' CLIPModel layout.

open_clip and transformers compute the same network; only parameter names and two layouts differ:

- attention: open_clip keeps one fused ``attn.in_proj_weight`` [3D, D] / ``in_proj_bias`` [3D]
  (rows q, k, v in that order); transformers has separate ``q_proj``, ``k_proj``, ``v_proj``.
- projections: open_clip multiplies ``features @ proj`` with ``proj`` [width, embed_dim];
  transformers' ``visual_projection`` / ``text_projection`` are ``nn.Linear`` whose weight is
  [embed_dim, width], i.e. the transpose.

Everything else is a rename (table in `_RENAMES` and `_BLOCK_RENAMES`). The text tower of
open_clip pools the token with the largest id (the end-of-text token); transformers does the same
when the config's ``eos_token_id`` is 2 (the legacy value in laion's configs) or equals that id.
Written by hand: open_clip needs torchvision, which cannot be imported beside our torch.
"""

from __future__ import annotations

import re

import torch

_RENAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
# "attn.in_proj_weight" has no dot before weight/bias, so the separator is "." or "_".
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)$")
# Parts of open_clip checkpoints that transformers' CLIPModel has no use for.
_IGNORED = ("attn_mask", "logit_bias")


def openclip_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip keys -> transformers CLIPModel keys (float32 tensors). Unknown keys raise KeyError,
    so a checkpoint of another architecture fails loudly instead of loading half its weights."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}  # saved from DistributedDataParallel
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        value = value.float()
        if key in _RENAMES:
            out[_RENAMES[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif key.endswith(_IGNORED):
            continue
        elif (match := _BLOCK.match(key)) is not None:
            tower = "vision_model" if match.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{match.group(2)}"
            name, kind = match.group(3), match.group(4)
            if name == "attn.in_proj":
                q, k, v = value.chunk(3, dim=0)
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), (q, k, v)):
                    out[f"{prefix}.self_attn.{proj}.{kind}"] = part.contiguous()
            elif name in _BLOCK_RENAMES:
                out[f"{prefix}.{_BLOCK_RENAMES[name]}.{kind}"] = value
            else:
                raise KeyError(f"open_clip key {key!r} has no transformers CLIPModel counterpart")
        else:
            raise KeyError(f"open_clip key {key!r} has no transformers CLIPModel counterpart")
    return out
