"""CLIP-style image preprocessing in torch, on batches of tensors (no PIL round trip).

The reward models here (CLIP, PickScore, HPSv2.1, the LAION aesthetic head, ImageReward's BLIP)
were all trained on the same recipe: resize the shortest side to S with bicubic interpolation,
center-crop S x S, normalise with a per-channel mean and std. Doing it in torch keeps the whole
batch on the reward's device and keeps it differentiable. Bicubic with ``antialias=True`` follows
PIL's kernel, so results match transformers' ``CLIPImageProcessor`` (the PIL path) up to the
uint8 rounding that path does (checked in tests/test_rewards_pretrained.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageTransform:
    """Resize shortest side to `size` (bicubic, antialiased), center-crop `crop`, normalise.

    ``__call__``: images [B, 3, H, W] float in [0, 1] -> [B, 3, crop, crop] float32.
    """

    size: int = 224
    crop: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_processor(cls, processor) -> "ImageTransform":
        """Read size, crop and mean/std from a transformers image processor (CLIP or BLIP style)."""
        size = processor.size
        if "shortest_edge" in size:
            short = int(size["shortest_edge"])
        else:  # {"height", "width"}: a square resize (BLIP processors); we resize the short side
            short = int(min(size["height"], size["width"]))
        crop_size = getattr(processor, "crop_size", None) or {"height": short, "width": short}
        if getattr(processor, "do_center_crop", True) is False:
            crop_size = {"height": short, "width": short}
        crop = int(min(crop_size["height"], crop_size["width"]))
        return cls(short, crop, tuple(float(m) for m in processor.image_mean), tuple(float(s) for s in processor.image_std))

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """Output (h, w) of the shortest-side resize; the long side is truncated like transformers does."""
        if height <= width:
            return self.size, int(self.size * width / height)
        return int(self.size * height / width), self.size

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        x = images.float()
        h, w = self.resized_shape(x.shape[2], x.shape[3])
        if (h, w) != tuple(x.shape[2:]):
            x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0, 1)  # bicubic overshoots; the PIL path clips to [0, 255]
        top, left = (h - self.crop) // 2, (w - self.crop) // 2
        x = x[:, :, top:top + self.crop, left:left + self.crop]
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std
