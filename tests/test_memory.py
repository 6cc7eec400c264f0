"""The per-iteration peak memory metric resets between iterations and sees what an iteration allocates."""

import pytest

from treegrpo.memory import CLEAR_REFS, PeakMemory


def _touch(megabytes: int) -> bytearray:
    block = bytearray(megabytes * 2**20)
    block[::4096] = b"\x01" * len(block[::4096])  # touch every page so it becomes resident
    return block


def test_peak_rss_sees_an_allocation_and_forgets_it_after_a_reset():
    memory = PeakMemory("cpu")
    memory.reset()
    if not memory.reset_works:
        pytest.skip(f"{CLEAR_REFS} is not writable here: the peak cannot be reset")
    quiet = memory.metrics()
    block = _touch(200)
    busy = memory.metrics()
    del block
    memory.reset()
    after = memory.metrics()
    assert busy["memory/peak_rss_mb"] - quiet["memory/peak_rss_mb"] > 190
    assert busy["memory/peak_rss_growth_mb"] > 190 > quiet["memory/peak_rss_growth_mb"]
    assert after["memory/peak_rss_mb"] < busy["memory/peak_rss_mb"] - 150
    assert "memory/peak_cuda_allocated_mb" not in busy
