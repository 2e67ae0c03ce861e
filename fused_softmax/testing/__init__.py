"""The testing seam: helpers for tests and for the tools that inspect the kernels.

Each helper is a context manager over ``_launch.overridden``, for the calls inside its block:

- ``poisoned_outputs()``: every kernel output NaN-filled before the kernel writes it;
- ``limit_block(n)``: rows longer than ``n`` take the online regime (tiny rows reach it);
- ``planned_for(device)``: launches planned for another device's properties;
- ``cooperative(enabled=True)``: the cooperative split-row regime planned (or not);
- ``direct_launch(enabled=True)``: kept launches call their compiled kernels (or not);
- ``recorded_launches(run=True)``: the list of every ``Launch`` (kernel, keyword arguments,
  plan), in order; with ``run=False`` the kernels are planned and recorded, not run;
- ``kernel_traffic()``: bytes loaded and stored by kernels run under Triton's interpreter;
- ``allocation_peak()``: the most bytes of tensor storage allocated inside the block and alive at
  once, on any device (CPU included, where torch keeps no allocator statistics).

``reference`` holds the NumPy float64 references, the tests' truth.
"""

import contextlib
import dataclasses

import numpy as np
import torch

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
def cooperative(enabled=True):
    """Plan the cooperative split-row regime (or, with ``enabled=False``, not), whatever
    FUSED_SOFTMAX_COOPERATIVE says. Its kernels run only on a GPU: under the interpreter their
    launch raises."""
    with _launch.overridden(cooperative=enabled):
        yield


@contextlib.contextmanager
def direct_launch(enabled=True):
    """Let Ready launches call their compiled kernels directly (or, with ``enabled=False``, not),
    whatever FUSED_SOFTMAX_DIRECT_LAUNCH says. There are compiled kernels only on a GPU: under the
    interpreter every launch goes through Triton's."""
    with _launch.overridden(direct_launch=enabled):
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


@dataclasses.dataclass
class Allocations:
    """Bytes of the storages allocated inside an ``allocation_peak`` block: alive now, and at most."""

    live: int = 0
    peak: int = 0


def _storage(value):
    """The storage of a tensor (or a storage itself), None for anything else."""
    if isinstance(value, torch.Tensor):
        return value.untyped_storage()
    return value if isinstance(value, torch.UntypedStorage) else None


@contextlib.contextmanager
def allocation_peak():
    """Track every storage that torch ops allocate inside the block (each op's outputs, seen by a
    TorchDispatchMode) until the storage is freed (a finalizer on its preserved Python object):
    the peak of their sum is the block's extra memory, whatever the device."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    allocations = Allocations()
    seen = set()

    def freed(key, nbytes):
        seen.discard(key)
        allocations.live -= nbytes

    class Tracker(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            given = {id(_storage(a)) for a in torch.utils._pytree.tree_leaves((args, kwargs)) if _storage(a)}
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    storage = t.untyped_storage()
                    key = id(storage)
                    if key not in seen and key not in given:  # views, in-place and out= ops allocate nothing
                        seen.add(key)
                        allocations.live += storage.nbytes()
                        allocations.peak = max(allocations.peak, allocations.live)
                        weakref.finalize(storage, freed, key, storage.nbytes())
            return out

    with Tracker():
        yield allocations


def minimum_bytes(*tensors):
    """The least traffic possible: every element of every tensor moved once."""
    return sum(t.numel() * t.element_size() for t in tensors)


__all__ = [
    "Allocations",
    "Traffic",
    "allocation_peak",
    "cooperative",
    "kernel_traffic",
    "limit_block",
    "minimum_bytes",
    "planned_for",
    "poisoned_outputs",
    "recorded_launches",
    "split_threshold",
    "reference",
]
