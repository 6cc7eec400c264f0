import pytest

from treegrpo.config import ConfigError, load_config
from treegrpo.methods import Method


def test_defaults_are_the_paper_tree():
    c = load_config()
    assert (c.method.name, c.method.k, c.method.window, c.method.window_r, c.model.num_steps) == ("treegrpo", 3, 3, 0.5, 10)
    assert (c.model.family, c.model.pretrained) == ("auto", "base")  # the embedded SD3 pipeline
    assert c.reward.weights == {"compose": 1.0} and c.reward.eval == ["compose", "compose_strict"]
    assert (c.train.prompts, c.eval.prompts) == ("train", "heldout")  # RL never sees the held-out prompts


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.001\nmethod:\n  k: 2\n")
    c = load_config(path, ["method.k=4", "reward.weights={shape: 0.8, color: 0.2}", "optim.clip_range=1e-3"])
    assert c.optim.lr == 0.001 and c.method.k == 4 and c.optim.clip_range == 1e-3
    assert c.reward.weights == {"shape": 0.8, "color": 0.2}


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "Did you mean optim.lr"),
    ("metod.k=3", "unknown config key 'metod'"),
    ("method.k=three", "expected an integer"),
    ("method.k=0", "method.k must be >= 1"),
    ("method.window=10", "does not fit"),
    ("optim.clip_range=0", "clip_range must be > 0"),
    ("method.name=ppo", "method.name must be one of"),
    ("train.progress=maybe", "expected true or false"),
    ("iterations=3", "must be section.key"),
    ("optim.objective=nft", "optim.objective must be policy_gradient, flow_matching or both"),
    ("optim.matching_draws=0", "optim.matching_draws must be >= 1"),
])
def test_bad_keys_and_values_fail_with_a_clear_message(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_flow_matching_refuses_the_policy_gradients_step_weights():
    with pytest.raises(ConfigError, match="step_weight weighs the policy-gradient objective"):
        load_config(None, ["optim.objective=flow_matching", "optim.step_weight=gain"])
    for edge_option in ("method.per_depth=true", "method.edge_baseline=parent", "method.backup=softmax"):
        with pytest.raises(ConfigError, match="optim.objective=flow_matching trains on leaf advantages only"):
            load_config(None, ["optim.objective=flow_matching", edge_option])
        load_config(None, ["optim.objective=both", edge_option])  # the policy-gradient part uses them


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("name", ["treegrpo", "flow_grpo", "dance_grpo", "mix_grpo", "branch_grpo"])
def test_every_method_builds_a_shape(name):
    import torch

    c = load_config(None, [f"method.name={name}", "method.window=3"])
    shape = Method(c.method, c.model.num_steps).shape_for(0, torch.Generator().manual_seed(0))
    assert shape.num_steps == 10 and shape.num_trained_edges > 0


@pytest.mark.parametrize("name", ["treegrpo", "flow_grpo", "dance_grpo", "mix_grpo", "branch_grpo"])
def test_shipped_method_configs_load_and_build_their_shape(name):
    from pathlib import Path

    import torch

    c = load_config(Path(__file__).parent.parent / "configs" / f"{name}.yaml")
    assert c.method.name == name
    shape = Method(c.method, c.model.num_steps).shape_for(0, torch.Generator().manual_seed(0))
    assert shape.num_trained_edges > 0


def test_train_seeds_is_refused_but_an_old_runs_stored_config_still_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"train.train_seeds was removed: it was never read.*Delete it"):
        load_config(None, ["train.train_seeds=random"])
    old = tmp_path / "config.yaml"  # what save_config wrote before the key was removed
    old.write_text("train:\n  train_seeds: random\n  iterations: 7\n")
    with pytest.raises(ConfigError, match="train.train_seeds was removed"):
        load_config(old)
    assert load_config(old, stored=True).train.iterations == 7


@pytest.mark.parametrize("overrides, message", [
    (["model.family=shapes", "model.resolution=64"], r"model.resolution=64 does nothing for model.family='shapes'"),
    (["model.family=shapes", "model.negative_prompt=blurry"], r"model.negative_prompt='blurry' does nothing for model.family='shapes'"),
    (["model.family=shapes", "model.mixed_precision=bf16"], r"model.mixed_precision='bf16' does nothing for model.family='shapes'"),
    (["model.family=shapes", "model.gradient_checkpointing=true"], r"model.gradient_checkpointing=True does nothing for model.family='shapes'"),
    (["model.family=shapes", "model.offload_text_encoders=true"], r"model.offload_text_encoders=True does nothing for model.family='shapes'"),
    (["model.family=shapes", "model.true_cfg_scale=2"], r"model.true_cfg_scale is FLUX's true CFG: it does nothing for model.family='shapes'"),
    (["model.family=sd3", "model.pretrained=x", "model.true_cfg_scale=2"], r"true_cfg_scale.*nothing for model.family='sd3'"),
    (["model.true_cfg_scale=2"], r"true_cfg_scale.*nothing for model.family='sd3'"),  # the default: the embedded SD3 pipeline
    (["model.family=sd15", "model.pretrained=x", "model.true_cfg_scale=2"], r"true_cfg_scale.*nothing for model.family='sd15'"),
    (["model.lora_alpha=16"], r"model.lora_alpha=16.0 does nothing without LoRA"),
    (["model.lora_targets=[to_q]"], r"model.lora_targets=\['to_q'\] does nothing without LoRA"),
    (["model.family=flux", "model.pretrained=x", "model.negative_prompt=blurry"], r"unless model.true_cfg_scale > 1"),
    (["model.family=sd3", "model.pretrained=x", "model.guidance_scale=1", "model.negative_prompt=blurry"],
     r"negative_prompt does nothing with model.guidance_scale=1.0"),
    (["model.family=analytic", "model.guidance_scale=3"], r"model.guidance_scale=3.0 does nothing for model.family='analytic'"),
    (["model.family=analytic", "model.pretrained=/some/folder"], r"model.pretrained='/some/folder' does nothing"),
])
def test_model_keys_the_family_ignores_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_model_keys_the_family_reads_are_accepted():
    load_config(None, ["model.lora_rank=4", "model.lora_alpha=16", "model.lora_targets=[to_q]", "model.guidance_scale=2"])
    load_config(None, ["model.family=flux", "model.pretrained=x", "model.true_cfg_scale=2", "model.negative_prompt=blurry",
                       "model.resolution=64", "model.mixed_precision=bf16", "model.gradient_checkpointing=true",
                       "model.offload_text_encoders=true"])
    load_config(None, ["model.family=sd3", "model.pretrained=x", "model.negative_prompt=blurry"])  # family CFG default 4.5
    load_config(None, ["model.family=auto", "model.pretrained=x", "model.true_cfg_scale=2"])  # checked once loaded
