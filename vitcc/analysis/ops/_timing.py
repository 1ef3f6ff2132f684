"""What the latency model times: one op at one shape, built from the op table's `latency` entries."""
from __future__ import annotations

from typing import Any, Callable

import torch


class TimedOp:
    """One timed op: a cache key, a factory that returns a zero-argument function to time, and the same
    node's op at its dense shape (None when the shapes are the same)."""
    __slots__ = ("key", "make", "dense")

    def __init__(self, key: str, make: Callable[[], Callable[[], Any]]):
        self.key, self.make, self.dense = key, make, None


def shape_key(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def rand(shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*[int(d) for d in shape]).to(dtype)


def bind(fn, *args, **kwargs) -> Callable[[], Any]:
    return lambda: fn(*args, **kwargs)
