"""Image preprocessing of the reward models, on batches of tensors.

`ImageTransform` (CLIP, PickScore, the LAION aesthetic head, ImageReward's BLIP): these were
trained on the same recipe: resize the shortest side to S with bicubic interpolation, center-crop
S x S, normalise with a per-channel mean and std. It runs in torch, keeping the batch on the
reward's device; bicubic with ``antialias=True`` follows PIL's kernel, so results match
transformers' ``CLIPImageProcessor`` (the PIL path) up to the uint8 rounding that path does
(checked in tests/test_rewards_pretrained.py).

`LongestSidePad` (HPSv2.1): the ``hpsv2`` package's own preprocessing, which differs: it resizes
the *longest* side and pads, on 8-bit PIL images (see the class).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

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


@dataclass(frozen=True)
class LongestSidePad:
    """HPSv2's preprocessing, as the ``hpsv2`` package does it (its open_clip ``image_transform``
    with ``resize_longest_max=True``, i.e. ``ResizeMaxSize`` then ``ToTensor`` and ``Normalize``):

    1. the image as 8-bit RGB, ``round(255 x)`` (hpsv2 reads PIL images / files: these are the
       pixels of the PNG ``treegrpo sample`` writes, so a score here equals hpsv2's on that file);
    2. the longest side resized to `size` with PIL's bicubic, the other to
       ``round(side * size / longest)`` (Python's round, as hpsv2); PIL clips to 0..255, no other clamp;
    3. zero-padded to ``size x size``, centred: ``(size - h) // 2`` rows above, the rest below, and
       likewise ``(size - w) // 2`` columns on the left (the zeros are black pixels, so after
       normalising they are ``-mean / std``); no centre crop;
    4. divided by 255 and normalised with `mean` / `std` (OpenAI CLIP's).

    One deliberate difference: an image whose longest side is already `size` but is not square is
    padded here; hpsv2 skips both resize and pad then and hands the ViT a non-square input.

    ``__call__``: images [B, 3, H, W] float in [0, 1] (any device) -> [B, 3, size, size] float32 on
    the same device. Runs on the CPU (PIL), one image at a time; not differentiable.
    """

    size: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def geometry(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(h, w, top, left): the resized image's size and where it sits in the padded square."""
        scale = self.size / float(max(height, width))
        h, w = (round(height * scale), round(width * scale)) if scale != 1.0 else (height, width)
        return h, w, (self.size - h) // 2, (self.size - w) // 2

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        height, width = images.shape[2:]
        h, w, top, left = self.geometry(height, width)
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out = torch.zeros(images.shape[0], 3, self.size, self.size)
        for i, array in enumerate(pixels):
            image = Image.fromarray(np.ascontiguousarray(array))
            if (h, w) != (height, width):
                image = image.resize((w, h), Image.Resampling.BICUBIC)
            out[i, :, top:top + h, left:left + w] = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((out - mean) / std).to(images.device)
