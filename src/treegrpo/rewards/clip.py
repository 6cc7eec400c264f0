"""`ClipScorer`: a transformers CLIPModel, its tokenizer and image transform on one device, with
batched image / text embeddings. The CLIP-based rewards (clipscore, pickscore, hpsv2.1,
aesthetic) are thin layers over it (``treegrpo.rewards.preference``).

transformers is imported only when a scorer is built, so building the shapes rewards never loads it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from treegrpo.config import ConfigError
from treegrpo.rewards.preprocess import ImageTransform
from treegrpo.rewards.weights import check_tokenizer, load_all, load_pretrained

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda if available, else cpu; anything else as torch understands it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(reward: str, dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ConfigError(f"reward.options.{reward}.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def check_batch(reward: str, images: torch.Tensor, prompts: list[str]) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"reward {reward!r} expects images [B, 3, H, W] in [0, 1], got {shape}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"reward {reward!r} got {images.shape[0]} images but {len(prompts)} prompts")


def chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _pooled(output: Any) -> torch.Tensor:
    """transformers >= 5 returns a model output whose pooler_output holds the projected features."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


# The small files of a CLIP repo that give its config, tokenizer and image processor (no weights).
CLIP_CONFIG_FILES = ("config.json preprocessor_config.json tokenizer.json tokenizer_config.json vocab.json merges.txt "
                     "special_tokens_map.json")


def load_tokenizer_and_transform(reward: str, source: str | None, repo_id: str, option: str,
                                 what: str = "a CLIP tokenizer and image processor",
                                 files: str | None = None) -> tuple[Any, ImageTransform]:
    """A CLIP tokenizer and the `ImageTransform` read from the same folder / repo's processor config."""
    from transformers import CLIPTokenizer

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:  # transformers < 5
        from transformers import CLIPImageProcessor as ImageProcessor

    files = CLIP_CONFIG_FILES if files is None else files
    tokenizer = load_pretrained(reward, CLIPTokenizer.from_pretrained, source, repo_id, option, what, files)
    check_tokenizer(reward, tokenizer, source, repo_id, files or "vocab.json merges.txt (or tokenizer.json)", option)
    processor = load_pretrained(reward, ImageProcessor.from_pretrained, source, repo_id, option, what, files)
    return tokenizer, ImageTransform.from_processor(processor)


class ClipScorer:
    """CLIP image / text embeddings in batches.

    image_embeds(images [B, 3, H, W] in [0, 1]) -> [B, D] float32 projected (not normalised) features;
    text_embeds(prompts: B strings) -> [B, D]; cosine(images, prompts) -> [B] in [-1, 1].
    Texts are padded to the model's context length and truncated to it (77 for CLIP).
    """

    def __init__(self, model, tokenizer, transform: Callable[[torch.Tensor], torch.Tensor], device: str = "auto",
                 dtype: str = "float32", batch_size: int = 32, reward: str = "clip") -> None:
        if batch_size < 1:
            raise ConfigError(f"reward.options.{reward}.batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(reward, dtype)
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.transform = transform
        self.batch_size = batch_size
        self.context_length = int(model.config.text_config.max_position_embeddings)

    @classmethod
    def from_pretrained(cls, reward: str, model: str | None, repo_id: str, processor: str | None = None,
                        processor_repo: str | None = None, model_option: str = "model", **kwargs) -> "ClipScorer":
        """Load a CLIPModel from a folder / repo; tokenizer and processor from `processor` (default: the same)."""
        from transformers import CLIPModel

        def load_model():
            return load_pretrained(reward, CLIPModel.from_pretrained, model, repo_id, model_option, "a CLIP model")

        if processor is None and processor_repo is None:  # one folder holds model, tokenizer and processor
            clip = load_model()
            tokenizer, transform = load_tokenizer_and_transform(reward, model, repo_id, model_option, files="")
        else:
            clip, (tokenizer, transform) = load_all(
                load_model, lambda: load_tokenizer_and_transform(reward, processor, processor_repo or repo_id, "processor"))
        return cls(clip, tokenizer, transform, reward=reward, **kwargs)

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        parts = []
        for s in chunks(images.shape[0], self.batch_size):
            pixels = self.transform(images[s].to(self.device)).to(self.dtype)
            parts.append(_pooled(self.model.get_image_features(pixel_values=pixels)).float())
        return torch.cat(parts)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        parts = []
        for s in chunks(len(prompts), self.batch_size):
            tokens = self.tokenizer(list(prompts[s]), padding="max_length", truncation=True,
                                    max_length=self.context_length, return_tensors="pt").to(self.device)
            parts.append(_pooled(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                              attention_mask=tokens["attention_mask"])).float())
        return torch.cat(parts)

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image = torch.nn.functional.normalize(self.image_embeds(images), dim=-1)
        text = torch.nn.functional.normalize(self.text_embeds(prompts), dim=-1)
        return (image * text).sum(dim=-1)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().float().exp())


def build_model_without_init(factory: Callable[[], torch.nn.Module], state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Construct a model with parameters on the meta device (no random init of ~1B weights), then
    assign `state_dict`, which must cover every parameter (strict)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = factory()
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model
