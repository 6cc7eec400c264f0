"""Tiny random CLIP-style models saved like Hugging Face repos, for reward tests (no real weights).

`save_tiny_clip` writes a folder with config.json + weights (CLIPModel.save_pretrained), a CLIP
BPE tokenizer built from a local byte-level vocabulary, and a CLIP image processor config, so a
reward loads it through the same `from_pretrained` path a user's local copy takes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

IMAGE_SIZE = 32


def byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE (GPT-2, CLIP) uses for bytes: printable bytes map to
    themselves, the others to code points from 256 upwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = [], 0
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single bytes (each also with the ``</w>`` word-end marker) plus a
    few merges; ``<|startoftext|>`` and ``<|endoftext|>`` come last, so EOT has the largest id
    (open_clip pools the text tower at argmax of the token ids)."""
    chars = byte_symbols()
    tokens = chars + [c + "</w>" for c in chars]
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    tokens += ["ca", "cat</w>", "do", "dog</w>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges)


def tiny_config(tokenizer: CLIPTokenizer, hidden_act: str = "gelu", projection_dim: int = 16) -> CLIPConfig:
    n = len(tokenizer.get_vocab())
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=n,
                max_position_embeddings=16, hidden_act=hidden_act, eos_token_id=eos, bos_token_id=bos, pad_token_id=eos)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  image_size=IMAGE_SIZE, patch_size=8, hidden_act=hidden_act)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def save_processor(tokenizer: CLIPTokenizer, folder: Path) -> None:
    tokenizer.model_max_length = 16
    tokenizer.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                          image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)


def save_tiny_clip(folder: Path, seed: int = 0, logit_scale: float | None = None, **config_kwargs) -> CLIPModel:
    """Write a tiny random CLIPModel + tokenizer + image processor into `folder`; returns the model."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    model = CLIPModel(tiny_config(tokenizer, **config_kwargs)).eval()
    if logit_scale is not None:
        model.logit_scale.data.fill_(logit_scale)
    model.save_pretrained(folder)
    save_processor(tokenizer, folder)
    return model


def random_images(n: int, height: int = 48, width: int = 40, seed: int = 0) -> torch.Tensor:
    """[n, 3, height, width] smooth random images in [0, 1] (upsampled noise, so resizing matters)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, height // 6, width // 6, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
