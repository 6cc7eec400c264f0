"""Every shipped config parses and validates (no weights are loaded), and the real-model keys are checked."""

from pathlib import Path

import pytest

from treegrpo.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_the_configs_folder_holds_the_real_model_examples():
    names = {p.name for p in CONFIGS}
    assert {"sd35m_hpsv2.yaml", "flux_hpsv2.yaml", "sd15_hpsv2.yaml", "treegrpo.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads(path):
    config = load_config(path)
    assert config.model.num_steps >= 2


def test_the_sd35m_config_is_the_papers_setting():
    c = load_config(Path(__file__).resolve().parent.parent / "configs" / "sd35m_hpsv2.yaml")
    assert (c.model.family, c.model.pretrained) == ("sd3", "stabilityai/stable-diffusion-3.5-medium")
    assert (c.method.name, c.method.k, c.method.window, c.model.num_steps, c.model.guidance_scale) == ("treegrpo", 3, 3, 10, 4.5)
    assert (c.model.resolution, c.optim.lr, c.optim.weight_decay, c.model.mixed_precision) == (512, 1e-5, 0.01, "bf16")
    assert c.model.lora_rank > 0 and c.reward.weights == {"hpsv2.1": 1.0}


@pytest.mark.parametrize("override, message", [
    ("model.family=sdxl", "model.family must be one of"),
    ("model.mixed_precision=fp8", "model.mixed_precision must be no, bf16 or fp16"),
    ("model.resolution=4", "model.resolution must be >= 8"),
    ("method.ddim_eta=0", "method.ddim_eta must be > 0"),
    ("model.true_cfg_scale=2", "model.true_cfg_scale is FLUX's true CFG"),
])
def test_bad_model_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("family", ["flux", "sd15"])
def test_a_real_family_needs_a_pretrained_model(family):
    with pytest.raises(ConfigError, match="needs model.pretrained"):
        load_config(None, [f"model.family={family}"])


def test_sd3_with_the_base_model_is_the_embedded_pipeline():
    config = load_config(None, ["model.family=sd3"])  # "base" for sd3: the compositional world's pipeline
    assert config.model.pretrained == "base"
