"""Pretrained CLIP-based rewards of the paper's tables: ``clipscore``, ``pickscore``, ``hpsv2.1``,
``aesthetic``.

Each takes images [B, 3, H, W] float in [0, 1] (any size; resized in torch, see
``treegrpo.rewards.preprocess``) and B prompts, and returns [B] float32 on the images' device.
The model runs on ``device`` ("auto": cuda if available) in ``dtype``, ``batch_size`` images at a
time. Options come from the config: ``reward.options: {NAME: {key: value}}``; weights resolve as
described in ``treegrpo.rewards.weights`` (a local path, the HF cache, or a download only when
``HF_HUB_OFFLINE`` is off).
"""

from __future__ import annotations

import torch
from torch import nn

from treegrpo.rewards.base import register_reward
from treegrpo.rewards.clip import CLIP_CONFIG_FILES, ClipScorer, build_model_without_init, check_batch
from treegrpo.rewards.preprocess import LongestSidePad
from treegrpo.rewards.weights import RewardWeightsError, check_tokenizer, load_all, load_pretrained, resolve_file

CLIP_L14 = "openai/clip-vit-large-patch14"
CLIP_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE = "yuvalkirstain/PickScore_v1"
HPS_REPO, HPS_V21_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/" + AESTHETIC_FILE


def load_torch_checkpoint(reward: str, path: str) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True (no arbitrary code from pickles); a clear error otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RewardWeightsError(f"reward {reward!r}: cannot read the checkpoint {path!r} as plain tensors "
                                 f"(torch.load weights_only=True): {type(err).__name__}: {err}") from None


@register_reward("clipscore")
class ClipScore:
    """``clipscore``: cosine similarity of CLIP ViT-L/14 image and text embeddings, [B] in [-1, 1].

    Convention: the raw cosine of the L2-normalised projected embeddings (typically 0.2-0.4 for
    matching pairs; the TreeGRPO paper's table reports 0.36-0.40), not the ``2.5 * max(cos, 0)`` of
    the CLIPScore paper nor ``100 * cos``. Model: ``openai/clip-vit-large-patch14`` or ``model``.
    """

    def __init__(self, model: str | None = None, device: str = "auto", dtype: str = "float32", batch_size: int = 32) -> None:
        self.scorer = ClipScorer.from_pretrained("clipscore", model, CLIP_L14, device=device, dtype=dtype,
                                                 batch_size=batch_size)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch("clipscore", images, prompts)
        return self.scorer.cosine(images, prompts).to(images.device)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, D] projected CLIP image embeddings (for diversity metrics)."""
        return self.scorer.image_embeds(images)


@register_reward("pickscore")
class PickScore:
    """``pickscore``: PickScore_v1, ``logit_scale.exp() * cosine`` of image and text embeddings, [B].

    Convention: the scaled cosine the PickScore authors use as the score (logit scale ~100, so
    typical values are ~18-23), before any softmax over candidate images. Model
    ``yuvalkirstain/PickScore_v1`` (``model``) with the tokenizer and image processor of
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (``processor``).
    """

    def __init__(self, model: str | None = None, processor: str | None = None, device: str = "auto",
                 dtype: str = "float32", batch_size: int = 32) -> None:
        self.scorer = ClipScorer.from_pretrained("pickscore", model, PICKSCORE, processor, CLIP_H14, device=device,
                                                 dtype=dtype, batch_size=batch_size)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch("pickscore", images, prompts)
        return (self.scorer.logit_scale * self.scorer.cosine(images, prompts)).to(images.device)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, D] projected CLIP image embeddings (for diversity metrics)."""
        return self.scorer.image_embeds(images)


@register_reward("hpsv2.1")
class HPSv21:
    """``hpsv2.1``: Human Preference Score v2.1, the cosine of open_clip ViT-H-14 image and text
    features (HPSv2's own score: the diagonal of ``image_features @ text_features.T`` with both
    normalised), [B] in [-1, 1]; typically 0.25-0.38 (the paper's table: 0.27 base, 0.37 trained).

    Weights: ``checkpoint`` (default ``xswu/HPSv2`` / ``HPS_v2.1_compressed.pt``, a dict whose
    ``state_dict`` holds open_clip keys) converted into a transformers CLIPModel
    (``treegrpo.rewards.openclip_convert``) whose config and tokenizer come from ``clip_config``
    (default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; only its small config and tokenizer files
    are read, not its weights). Images are preprocessed as the hpsv2 package does
    (`LongestSidePad`: longest side to the config's image size, zero pad, no centre crop), not with
    that repo's CLIP image processor.
    """

    def __init__(self, checkpoint: str | None = None, clip_config: str | None = None, device: str = "auto",
                 dtype: str = "float32", batch_size: int = 32) -> None:
        from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

        from treegrpo.rewards.openclip_convert import openclip_to_transformers

        def config_and_tokenizer():
            what = "the ViT-H-14 config and tokenizer"
            config = load_pretrained("hpsv2.1", CLIPConfig.from_pretrained, clip_config, CLIP_H14, "clip_config",
                                     what, CLIP_CONFIG_FILES)
            tokenizer = load_pretrained("hpsv2.1", CLIPTokenizer.from_pretrained, clip_config, CLIP_H14, "clip_config",
                                        what, CLIP_CONFIG_FILES)
            return config, check_tokenizer("hpsv2.1", tokenizer, clip_config, CLIP_H14,
                                           "vocab.json merges.txt (or tokenizer.json)", "clip_config")

        (config, tokenizer), path = load_all(
            config_and_tokenizer, lambda: resolve_file("hpsv2.1", HPS_REPO, HPS_V21_FILE, checkpoint, "checkpoint"))
        raw = load_torch_checkpoint("hpsv2.1", path)
        state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
        try:
            model = build_model_without_init(lambda: CLIPModel(config), openclip_to_transformers(state))
        except (KeyError, RuntimeError) as err:
            raise RewardWeightsError(f"reward 'hpsv2.1': {path!r} does not fit the CLIP config of "
                                     f"{clip_config or CLIP_H14!r}: {err}") from None
        # Not the CLIP processor's shortest-side resize and centre crop: hpsv2's own longest-side
        # resize and zero pad (on a 640x480 image the two differ by ~0.04 in score).
        transform = LongestSidePad(int(config.vision_config.image_size))
        self.scorer = ClipScorer(model, tokenizer, transform, device, dtype, batch_size, reward="hpsv2.1")

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch("hpsv2.1", images, prompts)
        return self.scorer.cosine(images, prompts).to(images.device)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, D] projected CLIP image embeddings (for diversity metrics)."""
        return self.scorer.image_embeds(images)


class RegressionHead(nn.Module):
    """The linear MLP of the LAION improved aesthetic predictor (and ImageReward): no activations,
    ``Linear(d, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16),
    Linear(16, 1)``; state-dict keys ``layers.{0,2,4,6,7}``. [B, d] -> [B, 1]."""

    def __init__(self, in_features: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_features, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


@register_reward("aesthetic")
class Aesthetic:
    """``aesthetic``: LAION improved aesthetic predictor, [B] on a ~1-10 scale (SD images ~5-7).

    Convention: the CLIP ViT-L/14 image embedding (projected, 768-d), L2-normalised, through the
    ``sac+logos+ava1-l14-linearMSE`` MLP (`RegressionHead`); the MLP's output is the score. The
    prompt is not used. Weights: ``checkpoint`` (a local ``.pth``; not on the Hugging Face hub, see
    `AESTHETIC_URL`) and ``clip_model`` (default ``openai/clip-vit-large-patch14``).
    """

    def __init__(self, checkpoint: str | None = None, clip_model: str | None = None, device: str = "auto",
                 dtype: str = "float32", batch_size: int = 32) -> None:
        def head_file() -> str:
            if not checkpoint:
                raise RewardWeightsError(
                    f"reward 'aesthetic' needs the LAION aesthetic head {AESTHETIC_FILE!r}: download it from "
                    f"{AESTHETIC_URL} and set reward.options.aesthetic.checkpoint to its path")
            return resolve_file("aesthetic", "", "", checkpoint, "checkpoint")

        path, self.scorer = load_all(head_file, lambda: ClipScorer.from_pretrained(
            "aesthetic", clip_model, CLIP_L14, model_option="clip_model", device=device, dtype=dtype, batch_size=batch_size))
        self.head = RegressionHead(int(self.scorer.model.config.projection_dim))
        try:
            self.head.load_state_dict(load_torch_checkpoint("aesthetic", path))
        except RuntimeError as err:
            raise RewardWeightsError(f"reward 'aesthetic': {path!r} is not the aesthetic MLP: {err}") from None
        self.head.to(self.scorer.device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch("aesthetic", images, prompts)
        embeds = torch.nn.functional.normalize(self.scorer.image_embeds(images), dim=-1)
        return self.head(embeds)[:, 0].float().to(images.device)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, D] projected CLIP image embeddings (for diversity metrics)."""
        return self.scorer.image_embeds(images)
