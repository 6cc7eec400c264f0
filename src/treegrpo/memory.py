"""Peak memory of one training iteration, for the metrics (``memory/*``).

- ``memory/peak_rss_mb``: the process's peak resident set size since the last reset, from Linux's
  ``VmHWM`` in /proc/self/status; the reset writes "5" to /proc/self/clear_refs (the kernel's way
  to reset the high-water mark). Where that file cannot be written the peak is since process start
  (``memory/peak_rss_reset`` = 0 says so). Not available off Linux (then the key is absent).
- ``memory/peak_rss_growth_mb``: that peak minus the resident size at the reset: what the iteration
  itself added (memory the allocator kept from earlier work counts as already there).
- ``memory/peak_cuda_allocated_mb``: ``torch.cuda.max_memory_allocated`` since
  ``torch.cuda.reset_peak_memory_stats`` (tensors only, not the allocator's cache), on CUDA only.

Written by hand: psutil has no peak-RSS reset, and resource.getrusage's ru_maxrss never resets.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmHWM = peak resident, VmRSS = current), or None."""
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB", STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """Call `reset()` at the start of an iteration and `metrics()` at its end."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
        self.reset_works = False
        self.start_kb: int | None = None

    def reset(self) -> None:
        try:
            CLEAR_REFS.write_text("5")
            self.reset_works = True
        except OSError:
            self.reset_works = False
        self.start_kb = _status_kb("VmRSS")
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        kb = _status_kb("VmHWM")
        rss = _status_kb("VmRSS")
        if kb is not None and rss is not None:
            kb = max(kb, rss)  # the kernel updates VmHWM lazily (at unmaps); the current size is a sure lower bound
        if kb is not None:
            out["memory/peak_rss_mb"] = round(kb / 1024, 1)
            if self.reset_works and self.start_kb is not None:
                out["memory/peak_rss_growth_mb"] = round(max(kb - self.start_kb, 0) / 1024, 1)
            out["memory/peak_rss_reset"] = float(self.reset_works)
        if self.cuda:
            out["memory/peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out
