"""Graceful stop on SIGINT / SIGTERM: finish the current iteration, checkpoint, exit with a message.

The first signal only sets a flag (the trainer polls it between iterations through
`Trainer._stop_requested`, the one place a multi-process run makes the decision agreed across ranks);
a second signal aborts at once by raising `Aborted`. Exit codes follow the shell's 128 + signal number
convention: 130 for SIGINT (Ctrl-C), 143 for SIGTERM (what schedulers such as SLURM and Kubernetes send).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    return 128 + int(signum)


class TrainingStopped(Exception):
    """Training stopped cleanly on a signal after checkpointing iteration `iteration`."""

    def __init__(self, signum: int, iteration: int, run_dir: str) -> None:
        self.signum, self.iteration, self.run_dir = int(signum), iteration, run_dir
        self.exit_code = exit_code(signum)
        super().__init__(f"stopped by {signal.Signals(signum).name} at iteration {iteration}; "
                         f"resume with: treegrpo train --resume {run_dir}")


class Aborted(BaseException):
    """A second signal: stop immediately, without a checkpoint of the iteration in progress.

    A BaseException (like KeyboardInterrupt) so that `except Exception` blocks do not swallow it.
    """

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.exit_code = exit_code(signum)
        super().__init__(f"aborted by a second {signal.Signals(signum).name}")


class StopSignals:
    """Context manager that turns SIGINT / SIGTERM into a stop request while it is active.

    Outside the main thread (where Python cannot install handlers) it does nothing and never requests.
    """

    def __init__(self, describe: Any = None) -> None:
        self.signum: int | None = None
        self._describe = describe  # () -> str: what will happen, for the first signal's message
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise Aborted(signum)
        self.signum = signum
        what = self._describe() if self._describe else "finishing the current iteration, then checkpointing"
        print(f"\ntreegrpo: {signal.Signals(signum).name} received; {what} "
              f"(send it again to abort at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
