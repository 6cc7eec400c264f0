"""LoRA: only adapter weights train and are saved; the KL reference is the base model, no copy."""

import torch
from safetensors.torch import load_file

from treegrpo.cli import main
from treegrpo.config import load_config
from treegrpo.policies import build_policy, load_policy
from treegrpo.policies.lora import BaseModelView
from treegrpo.worlds.shapes import SHAPES_WORLD


def _inputs(policy):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *policy.latent_shape, generator=g)
    cond = policy.encode_prompts(["a red circle on a black background"])
    return x, torch.tensor([0.9, 0.5, 0.2]), cond, torch.zeros(3, dtype=torch.long)


def test_adapters_off_is_the_base_model_and_on_differs_after_a_change():
    config = load_config(None, [*SHAPES_WORLD, "model.lora_rank=2"])
    policy, base = build_policy(config.model), load_policy("shapes")
    args = _inputs(policy)
    trainable = [p for p in policy.trainable_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n, p in policy.trainable_module().named_parameters() if p.requires_grad)
    with torch.no_grad():
        for p in trainable:
            p.add_(0.05)
    with torch.no_grad():
        torch.testing.assert_close(BaseModelView(policy).predict(*args), base.predict(*args))
        assert not torch.allclose(policy.predict(*args), base.predict(*args))


def test_a_lora_run_saves_only_adapters_and_reloads_them(tmp_path, capsys):
    out = tmp_path / "lora"
    argv = ["train", *SHAPES_WORLD, "model.lora_rank=2", "optim.kl_coef=0.5", "train.iterations=1", "train.prompts_per_iteration=2",
            "eval.num_seeds=1", "eval.grid_prompts=2", "method.k=2", "method.window=2", "optim.lr=1e-2",
            "--output-dir", str(out), "--quiet"]
    assert main(argv) == 0
    weights = load_file(str(out / "checkpoints" / "iter_000001" / "trainable.safetensors"))
    assert weights and all("lora" in name for name in weights)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--seeds", "1", "--rewards", "shape", "--quiet",
                 "--prompts", str(_prompt_file(tmp_path))]) == 0
    assert "acc/shape" in capsys.readouterr().out
    # One checkpoint of the run (not the run directory) also gets the run's adapters.
    assert main(["eval", "--checkpoint", str(out / "checkpoints" / "iter_000001"), "--seeds", "1", "--rewards",
                 "shape", "--quiet", "--prompts", str(_prompt_file(tmp_path))]) == 0
    assert "acc/shape" in capsys.readouterr().out


def _prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle on a black background\n")
    return path
