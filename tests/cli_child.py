"""`treegrpo` in a subprocess for the resume and signal tests, with one test-only reward.

``test_gate`` scores like the ``shapes`` reward. When TREEGRPO_TEST_GATE=N:DIR is set, its N-th call
(iteration N of a fresh run: one reward call per iteration in the tiny config) creates DIR/blocked and
waits until DIR/release exists, so a test can kill or signal the process at a known point.
"""

import os
import sys
import time
from pathlib import Path

import torch

from treegrpo.rewards.base import build_reward, register_reward


class Gate:
    def __init__(self) -> None:
        self.inner = build_reward("shapes")
        self.calls = 0
        call, _, folder = os.environ.get("TREEGRPO_TEST_GATE", "0:").partition(":")
        self.block_at, self.folder = int(call), Path(folder)

    def __call__(self, images, prompts):
        self.calls += 1
        if self.calls == self.block_at:
            (self.folder / "blocked").touch()
            while not (self.folder / "release").exists():
                time.sleep(0.01)
        return self.inner(images, prompts)


register_reward("test_gate")(Gate)

if __name__ == "__main__":
    torch.set_num_threads(1)  # bitwise comparisons across processes
    from treegrpo.cli import main

    sys.exit(main(sys.argv[1:]))
