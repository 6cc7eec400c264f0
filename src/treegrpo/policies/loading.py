"""`load_policy`: the right `Policy` for a diffusers pipeline object, a local folder, a cached
Hugging Face model id, "base" (the embedded model: the compositional world's SD3 pipeline, loaded
by the same code as SD3.5; with family "shapes" the old 16x16 shapes model, which fast tests use),
"compose" (that SD3 pipeline) or "shapes" (the shapes model).

The family is read from the pipeline class (or `_class_name` in model_index.json); offline
(HF_HUB_OFFLINE=1) a model id loads from the local cache only, and a missing one is one error that
names the download command and the config key.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from treegrpo.policies.base import Policy

PIPELINE_FAMILIES = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "StableDiffusionPipeline": "sd15",
}
FAMILIES = ("shapes", "sd3", "flux", "sd15", "analytic")
_PIPELINES = {family: name for name, family in PIPELINE_FAMILIES.items()}


def family_of(pipe_or_class_name: Any) -> str:
    """The family of a pipeline object or pipeline class name."""
    name = pipe_or_class_name if isinstance(pipe_or_class_name, str) else type(pipe_or_class_name).__name__
    if name not in PIPELINE_FAMILIES:
        raise ValueError(f"unsupported pipeline {name!r}: treegrpo supports {', '.join(PIPELINE_FAMILIES)} "
                         f"(set model.family to one of sd3, flux, sd15 to force a family)")
    return PIPELINE_FAMILIES[name]


def _class_name_of_folder(folder: Path) -> str:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{str(folder)!r} is not a diffusers pipeline folder: it has no model_index.json "
                         "(save one with pipe.save_pretrained(folder), or give a Hugging Face model id)")
    return json.loads(index.read_text()).get("_class_name", "")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _snapshot(model_id: str) -> Path:
    """The local folder of a Hugging Face model id (the cache only when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id, local_files_only=_offline(),
                                      allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors"]))
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        raise FileNotFoundError(
            f"model {model_id!r} is not in the local Hugging Face cache (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}). "
            f"Download it with `hf download {model_id}` (gated models need `hf auth login` first), or set "
            f"model.pretrained to a local folder holding the pipeline ({type(err).__name__})") from None


def load_pipeline(source: str | Path, family: str | None = None, dtype: Any = None) -> Any:
    """A diffusers pipeline from a local folder or a model id; `family` picks the class when the
    folder's model_index.json names another (or none)."""
    import diffusers

    path = Path(source)
    folder = path if path.is_dir() else _snapshot(str(source))
    class_name = _class_name_of_folder(folder)
    if family in (None, "auto"):
        family = family_of(class_name)
    cls = getattr(diffusers, _PIPELINES[family])
    kwargs: dict[str, Any] = {"local_files_only": True}
    if family == "sd3":  # SD3 without T5 (as the embedded model): diffusers needs the absence said explicitly
        index = json.loads((folder / "model_index.json").read_text())
        for name in ("text_encoder_3", "tokenizer_3"):
            if index.get(name, [None])[0] is None:
                kwargs[name] = None
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if family == "sd15":
        kwargs.update(safety_checker=None, requires_safety_checker=False)  # RL scores images; no NSFW filter here
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones know only torch_dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
        return cls.from_pretrained(folder, **kwargs)


def embedded_pipeline_path() -> Path:
    """The shipped pipeline folder of the compositional world's base model."""
    from treegrpo.worlds.compose_pipeline import DEFAULT_PIPELINE

    return DEFAULT_PIPELINE


def load_policy(source: Any = "base", family: str | None = None, **options: Any) -> Policy:
    """A `Policy` for `source`: a diffusers pipeline object, a local pipeline folder, a Hugging Face
    model id (cached), "base" (the embedded model: the compositional world's SD3 pipeline, or
    with family "shapes" the old 16x16 shapes model, kept for fast tests), "compose" (the SD3
    pipeline), "shapes" (the shapes model) or a saved shapes-model folder. A pipeline folder may hold `treegrpo.json` with default options
    (the embedded model stores max_sequence_length 0, its guidance scale and resolution there);
    options given here, if not None, win.

    family: shapes, sd3, flux, sd15, or None / "auto" to infer it. options: resolution,
    guidance_scale, negative_prompt, mixed_precision (no|bf16|fp16), gradient_checkpointing, device,
    decode_batch, max_sequence_length, offload_text_encoders (text encoders kept on the CPU), and
    for FLUX true_cfg_scale (see the family classes).
    """
    if family not in (None, "auto", *FAMILIES):
        raise ValueError(f"unknown model family {family!r}; available: {', '.join(FAMILIES)} or auto")
    if family == "analytic":  # the closed-form Gaussian policy of engine tests and benchmarks
        from treegrpo.policies.analytic import GaussianPolicy

        return GaussianPolicy(**{k: v for k, v in options.items() if k in ("data_std", "latent_shape")})
    if isinstance(source, str) and (source == "compose" or (source in ("base", "") and family != "shapes")):
        if family not in (None, "auto", "sd3"):
            raise ValueError(f"model.pretrained={source!r} is the embedded SD3 pipeline; family {family!r} needs a "
                             "model id or a pipeline folder")
        source = embedded_pipeline_path()
    if isinstance(source, str) and source in ("shapes", "base", ""):  # "base" is here only with family shapes
        family = "shapes" if family in (None, "auto") else family
        if family != "shapes":
            raise ValueError(f"model.pretrained={source!r} is the embedded shapes model; family {family!r} needs a "
                             "model id or a pipeline folder")
    if family == "shapes" or (family in (None, "auto") and isinstance(source, (str, Path))
                              and (Path(source) / "policy_config.json").is_file()):
        from treegrpo.worlds.shapes_model import ShapesPolicy

        path = None if source in ("base", "shapes", "", None) else str(source)
        device = options.pop("device", "cpu")
        allowed = {"guidance_scale"}
        extra = set(options) - allowed
        if extra:
            raise ValueError(f"the shapes model takes no option(s) {sorted(extra)}")
        return ShapesPolicy.from_pretrained(path, guidance_scale=options.get("guidance_scale")).to(device)
    pipe = source
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        from treegrpo.worlds.compose_pipeline import read_defaults

        for key, value in read_defaults(source).items():
            if options.get(key) is None:
                options[key] = value
    if isinstance(source, (str, Path)):
        from treegrpo.policies.diffusers_common import resolve_dtype

        # Load straight into the compute dtype: an fp32 copy of SD3.5's T5-XXL alone is ~19 GB.
        pipe = load_pipeline(source, family, dtype=resolve_dtype(options.get("mixed_precision", "no")))
    if family in (None, "auto"):
        family = family_of(pipe)
    from treegrpo.policies.flux import FluxPolicy
    from treegrpo.policies.sd3 import SD3Policy
    from treegrpo.policies.sd15 import SD15Policy

    cls = {"sd3": SD3Policy, "flux": FluxPolicy, "sd15": SD15Policy}[family]
    if family != "flux" and options.pop("true_cfg_scale", 1.0) != 1.0:
        raise ValueError(f"true_cfg_scale is FLUX's true CFG; a {family} model takes guidance_scale")
    return cls(pipe, **options)
