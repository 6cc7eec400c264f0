"""LoRA through peft: adapters on a policy's trainable module, and the base model as KL reference.

With adapters, the KL reference is the same network with its adapters switched off, so no second
copy of the model is held in memory.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from treegrpo.policies.base import Policy


def add_lora(module: torch.nn.Module, rank: int, alpha: float, target_modules: list[str]) -> int:
    """Freeze `module` and inject LoRA adapters (rank, alpha) into `target_modules` (names of its
    Linear / Conv2d layers, e.g. to_q, to_k, to_v, to_out.0). Returns the number of trainable
    parameters. Uses diffusers' `add_adapter` where the module has it (UNets, transformers), else
    peft's `inject_adapter_in_model`."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules)
    module.requires_grad_(False)
    try:
        if hasattr(module, "add_adapter"):
            module.add_adapter(config)
        else:
            inject_adapter_in_model(config, module)
    except ValueError as err:  # peft names the missing modules
        raise ValueError(f"LoRA target modules {target_modules} do not match the model: {err}") from None
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@contextmanager
def adapters_disabled(module: torch.nn.Module) -> Iterator[None]:
    """Run the base model: LoRA adapters off inside the block, back on after."""
    module.disable_adapters()
    try:
        yield
    finally:
        module.enable_adapters()


class BaseModelView:
    """The policy with its adapters switched off: a KL reference that shares the policy's weights."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def predict(self, x: torch.Tensor, times: torch.Tensor, cond: Any, prompt_index: torch.Tensor) -> torch.Tensor:
        with adapters_disabled(self.policy.trainable_module()):
            return self.policy.predict(x, times, cond, prompt_index)
