"""An exponential moving average (EMA) of the trainable weights.

After every optimiser step ``ema = d * ema + (1 - d) * theta`` (fp32, in place), starting from the
weights at the start of training; no bias correction, so with decay d the average lags the raw
weights by about 1 / (1 - d) optimiser steps. Evaluation and export swap the average into the model
(`EMA.applied`) and put the raw weights back bit for bit afterwards, so training continues on them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class EMA:
    """EMA of named parameters. params: name -> the live parameter (any float dtype); the average is
    kept in float32 on the parameter's device."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.params = dict(params)
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step from the current parameters (call after each optimiser step)."""
        for name, p in self.params.items():
            s = self.shadow[name]
            s.mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """name -> fp32 average (the tensors themselves; the checkpoint copies them to the CPU)."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, value in state.items():
            if value.shape != self.shadow[name].shape:
                raise ValueError(f"EMA tensor {name!r} has shape {tuple(value.shape)}, model has "
                                 f"{tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(value)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the parameters hold the average (cast to their dtype); after it, exactly
        the raw weights they held before."""
        raw = {name: p.detach().clone() for name, p in self.params.items()}
        try:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(self.shadow[name])
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(raw[name])
