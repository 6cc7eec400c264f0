"""Progress bars: shown with an ETA on a terminal, silent in logs, pipes and with progress off."""

import io
import sys

import pytest

from treegrpo.evaluation import ode_sample
from treegrpo.policies.analytic import GaussianPolicy


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream, progress, shown", [(Terminal, True, True), (io.StringIO, True, False),
                                                      (Terminal, False, False)])
def test_sampling_bar_only_on_a_terminal_and_when_asked(monkeypatch, stream, progress, shown):
    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    ode_sample(GaussianPolicy(latent_shape=(3, 4, 4)), ["a", "b", "c"], [1, 2], num_steps=5, max_batch=4,
               progress=progress, desc="sample")
    text = err.getvalue()
    if shown:
        # Counted in model calls: 3 prompts x 2 seeds x 5 steps, in chunks of 4 rows.
        assert "sample" in text and "0/30" in text and "call/s" in text
    else:
        assert text == ""
