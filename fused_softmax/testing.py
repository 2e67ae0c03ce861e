"""Helpers for tests and reports: poisoned outputs and memory traffic counted under the interpreter."""

import contextlib
import dataclasses

import numpy as np

from . import _launch


@contextlib.contextmanager
def poisoned_outputs():
    """Fill every kernel output with NaN before the kernel writes it, so a missed element shows."""
    allocate = _launch.empty

    def poisoned(shape, dtype, device):
        return allocate(shape, dtype, device).fill_(float("nan"))

    _launch.empty = poisoned
    try:
        yield
    finally:
        _launch.empty = allocate


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


__all__ = ["Traffic", "kernel_traffic", "minimum_bytes", "poisoned_outputs"]
