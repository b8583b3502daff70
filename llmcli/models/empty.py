"""empty_init(): build a module on the meta device without running its random initialization; to_empty() then
allocates it on the real device.

`with torch.device("meta")` alone still runs every nn.init call of the constructors on meta tensors. Those do no
arithmetic, but torch implements some of them (nn.Embedding's normal_) through Python decompositions whose first
call imports torch._dynamo: about 1 s on the `llm run` start-up path, for values that to_empty() throws away.
Inside empty_init(), an nn.init function given a meta tensor returns it untouched; anything else runs as usual.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

# The in-place random fills nn.init ends in (for the nn.init functions that do not dispatch themselves).
_RANDOM_FILLS = frozenset(
    getattr(torch.Tensor, n) for n in ("normal_", "uniform_", "bernoulli_", "exponential_", "log_normal_", "cauchy_")
)


class _SkipMetaInit(TorchFunctionMode):
    """nn.init functions and random fills become no-ops on meta tensors (they return the tensor, as they do)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RANDOM_FILLS or getattr(func, "__module__", None) == "torch.nn.init":
            t = kwargs.get("tensor", args[0] if args else None)  # nn.init dispatches with tensor= as a keyword
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


@contextmanager
def empty_init() -> Iterator[None]:
    """Modules constructed inside live on the meta device, uninitialized (allocate them with to_empty)."""
    with torch.device("meta"), _SkipMetaInit():
        yield


def to_empty(model: nn.Module, device: torch.device) -> nn.Module:
    """model.to_empty(device=device), without torch.empty_like on meta tensors: its Python reference imports sympy
    on first use (~0.35 s of start-up). Same shapes, strides and dtypes; the memory is left uninitialized."""
    return model._apply(lambda t: torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device))
