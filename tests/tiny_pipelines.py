"""Tiny random-weight diffusers pipelines (SD3, FLUX, SD1.5) built from configs, offline.

Same classes, same code paths as the real models, a few thousand parameters each. Tokenizers are
built locally: the byte-level CLIP BPE of tiny_clip.py, and a word-level T5-style tokenizer.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast,
                          T5Config, T5EncoderModel)

from tiny_clip import tiny_tokenizer

RESOLUTION = 16
WORDS = "a an the of on in with red green blue cat dog photo painting circle square sky tree house".split()


def clip_tokenizer():
    tok = tiny_tokenizer()
    tok.model_max_length = 77
    return tok


def clip_text(tokenizer, projection: bool, hidden: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=77, vocab_size=len(tokenizer.get_vocab()), projection_dim=hidden,
                            eos_token_id=eos, bos_token_id=bos, pad_token_id=eos)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def t5_tokenizer():
    """A word-level tokenizer with T5's special tokens (<pad> 0, </s> 1, <unk> 2), appending </s>."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


def t5_encoder(d_model: int, seed: int = 0):
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(WORDS) + 3, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def vae(seed: int = 0, shift: bool = True, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    extra = dict(scaling_factor=1.5, shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False) if shift else \
        dict(scaling_factor=0.18215)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=RESOLUTION, **extra).eval()


def tiny_sd3(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok = clip_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=RESOLUTION // 2, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae(seed + 1),
        text_encoder=clip_text(tok, True, seed=seed + 2), tokenizer=tok,
        text_encoder_2=clip_text(tok, True, seed=seed + 3), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(64, seed=seed + 4), tokenizer_3=t5_tokenizer())


def tiny_flux(seed: int = 0, guidance_embeds: bool = True):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    tok = clip_tokenizer()
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae(seed + 1),
                        text_encoder=clip_text(tok, False, seed=seed + 2), tokenizer=tok,
                        text_encoder_2=t5_encoder(32, seed=seed + 3), tokenizer_2=t5_tokenizer())


def tiny_sd15(seed: int = 0, prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    tok = clip_tokenizer()
    return StableDiffusionPipeline(unet=unet, scheduler=scheduler, vae=vae(seed + 1, shift=False),
                                   text_encoder=clip_text(tok, False, seed=seed + 2), tokenizer=tok,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
