"""How far HPSv2.1's input pixels move under other preprocessing than hpsv2's own.

    .venv/bin/python benchmarks/hps_preprocess.py

For smooth random images (upsampled noise) and white noise at a few sizes, the mean and max
absolute difference, in normalised pixel units (pixel / CLIP std, ~3.7 per unit of [0, 1]), between
`LongestSidePad` (hpsv2: 8-bit PIL bicubic resize of the longest side, zero pad) and
- torch: the same geometry with ``F.interpolate(bicubic, antialias=True)`` on the float image;
- crop: the CLIP processor's shortest-side resize + centre crop (what hpsv2.1 used here before).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from treegrpo.rewards.preprocess import ImageTransform, LongestSidePad


def torch_resize_pad(images: torch.Tensor, transform: LongestSidePad) -> torch.Tensor:
    h, w, top, left = transform.geometry(*images.shape[2:])
    resized = F.interpolate(images, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    out = torch.zeros(images.shape[0], 3, transform.size, transform.size)
    out[:, :, top:top + h, left:left + w] = resized
    mean, std = torch.tensor(transform.mean).view(1, 3, 1, 1), torch.tensor(transform.std).view(1, 3, 1, 1)
    return (out - mean) / std


def main() -> None:
    hps = LongestSidePad(224)
    print(f"{'H x W':>10} {'images':>7} {'torch mean':>11} {'torch max':>10} {'crop mean':>10}")
    for height, width in [(480, 640), (640, 480), (512, 512), (768, 1024)]:
        g = torch.Generator().manual_seed(0)
        smooth = F.interpolate(torch.rand(8, 3, height // 6, width // 6, generator=g), size=(height, width),
                               mode="bilinear", align_corners=False)
        for kind, images in (("smooth", smooth), ("noise", torch.rand(8, 3, height, width, generator=g))):
            ours = hps(images)
            diff = (ours - torch_resize_pad(images, hps)).abs()
            crop = (ours - ImageTransform()(images)).abs().mean()
            print(f"{height:>4} x {width:<4} {kind:>7} {diff.mean():>11.4f} {diff.max():>10.4f} {crop:>10.3f}")


if __name__ == "__main__":
    main()
