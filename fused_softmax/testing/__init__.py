"""The testing seam: helpers for tests and for the tools that inspect the kernels.

Each helper is a context manager over ``_launch.overridden``, for the calls inside its block:

- ``poisoned_outputs()``: every kernel output NaN-filled before the kernel writes it;
- ``limit_block(n)``: rows longer than ``n`` take the online regime (tiny rows reach it);
- ``planned_for(device)``: launches planned for another device's properties;
- ``recorded_launches(run=True)``: the list of every ``Launch`` (kernel, keyword arguments,
  plan), in order; with ``run=False`` the kernels are planned and recorded, not run;
- ``kernel_traffic()``: bytes loaded and stored by kernels run under Triton's interpreter.

``reference`` holds the NumPy float64 references, the tests' truth.
"""

import contextlib
import dataclasses

import numpy as np

from .. import _launch
from . import reference


@contextlib.contextmanager
def poisoned_outputs():
    """Fill every kernel output with NaN before the kernel writes it, so a missed element shows."""
    with _launch.overridden(poison=True):
        yield


@contextlib.contextmanager
def limit_block(max_block):
    """Cap the row length kept on chip (a power of two, or None for no cap)."""
    with _launch.overridden(max_block=max_block):
        yield


@contextlib.contextmanager
def split_threshold(min_bytes):
    """Tensors of at least ``min_bytes`` whose rows do not fill the GPU take the split-row regime
    (the heuristic's threshold is 1 MiB): 0 makes tiny test tensors split, ``math.inf`` none."""
    with _launch.overridden(min_split_bytes=min_bytes):
        yield


@contextlib.contextmanager
def planned_for(device):
    """Plan every launch for ``device`` (a ``kernels.DeviceProperties``): its grid and configuration."""
    with _launch.overridden(device=device):
        yield


@contextlib.contextmanager
def recorded_launches(run=True):
    """The ``_launch.Launch`` of every launch inside the block, appended as they are made."""
    launches = []
    # run=True leaves an enclosing run=False block in force: recording never starts kernels.
    with _launch.overridden(observe=launches.append, **({} if run else {"run": False})):
        yield launches


@dataclasses.dataclass
class Traffic:
    """Bytes of global memory loaded and stored by the active lanes of kernel loads and stores."""

    loaded: int = 0
    stored: int = 0

    @property
    def total(self):
        return self.loaded + self.stored


def _lane_bytes(ptrs, mask):
    return int(np.count_nonzero(mask.data)) * (ptrs.get_element_ty().primitive_bitwidth // 8)


@contextlib.contextmanager
def kernel_traffic():
    """Count what kernels run under TRITON_INTERPRET=1 move, by wrapping the interpreter's memory ops.

    Every load and store of the interpreter goes through ``create_masked_load`` /
    ``create_masked_store``; masked-off lanes move nothing, as on the GPU.
    """
    from triton.runtime.interpreter import InterpreterBuilder

    traffic = Traffic()
    load, store = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store

    def counted_load(self, ptrs, mask, *args):
        traffic.loaded += _lane_bytes(ptrs, mask)
        return load(self, ptrs, mask, *args)

    def counted_store(self, ptrs, value, mask, *args):
        traffic.stored += _lane_bytes(ptrs, mask)
        return store(self, ptrs, value, mask, *args)

    InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = counted_load, counted_store
    try:
        yield traffic
    finally:
        InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = load, store


def minimum_bytes(*tensors):
    """The least traffic possible: every element of every tensor moved once."""
    return sum(t.numel() * t.element_size() for t in tensors)


__all__ = [
    "Traffic",
    "kernel_traffic",
    "limit_block",
    "minimum_bytes",
    "planned_for",
    "poisoned_outputs",
    "recorded_launches",
    "split_threshold",
    "reference",
]
