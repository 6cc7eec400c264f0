"""Prompt embeddings cached by prompt text: each distinct prompt goes through the text encoders once
per run, not once per iteration (training prompts recur across iterations, evaluation prompts at
every evaluation).

A prompt is encoded alone (a batch of one), so its embedding never depends on which prompts shared
its batch or on when it was first seen: a resumed run, an evicted-then-re-encoded prompt and an
uninterrupted run get the same bits. Entries live in host memory (a large prompt pool should not
hold accelerator memory) and the rows a call needs are concatenated and moved to the policy's
device once per call. The cache is least-recently-used with a capacity in prompts.

A policy's conditioning type needs ``cat(conds) -> cond`` (rows stacked in order) and
``to(device)``; a policy whose `encode_prompts` returns None (no text conditioning) works as is.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch


def _text(prompt: Any) -> str:
    return prompt.text if hasattr(prompt, "text") else str(prompt)  # the shapes world's ShapePrompt has .text


class PromptCache:
    """Cached stand-in for a policy's `encode_prompts`. encode: the uncached `encode_prompts`;
    capacity: distinct prompts kept (>= 1); device: where the returned conditioning goes (a callable
    is asked at every call, so a policy moved to another device is followed)."""

    def __init__(self, encode: Callable[[list[Any]], Any], capacity: int,
                 device: torch.device | str | Callable[[], Any] = "cpu") -> None:
        if capacity < 1:
            raise ValueError(f"prompt cache capacity must be >= 1 prompt, got {capacity}")
        self.encode = encode
        self.capacity = capacity
        self.device = device
        self.entries: OrderedDict[str, Any] = OrderedDict()
        self.encoded = 0  # prompts sent through the text encoders (one per encoder call)
        self.hits = 0  # prompts served from the cache

    def __call__(self, prompts: Sequence[Any]) -> Any:
        """Conditioning for `prompts` (rows in order, duplicates allowed), as `encode(prompts)` returns."""
        rows = []
        for prompt in prompts:
            key = _text(prompt)
            if key in self.entries:
                self.entries.move_to_end(key)
                self.hits += 1
            else:
                entry = self.encode([prompt])
                self.entries[key] = None if entry is None else entry.to("cpu")
                self.encoded += 1
                if len(self.entries) > self.capacity:
                    self.entries.popitem(last=False)
            rows.append(self.entries[key])
        if not rows or rows[0] is None:
            return None
        cat = getattr(type(rows[0]), "cat", None)
        if cat is None:
            raise TypeError(f"{type(rows[0]).__name__} has no cat(conds) method, so its prompts cannot be cached; "
                            "set model.prompt_cache=0")
        return cat(rows).to(self.device() if callable(self.device) else self.device)


def enable_prompt_cache(policy: Any, capacity: int) -> PromptCache:
    """Route `policy.encode_prompts` through a `PromptCache` of `capacity` prompts (kept as
    `policy.prompt_cache`); returns the cache. Calling it again replaces the cache."""
    original = getattr(policy, "_uncached_encode_prompts", None) or policy.encode_prompts
    cache = PromptCache(original, capacity, lambda: getattr(policy, "device", "cpu"))
    policy._uncached_encode_prompts = original
    policy.encode_prompts = cache  # an instance attribute: shadows the class's method for this policy only
    policy.prompt_cache = cache
    return cache
