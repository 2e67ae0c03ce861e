"""Which implementation serves a call: the Triton kernels or eager PyTorch.

The choice is read at call time from ``use_backend`` (innermost wins) or else the
``FUSED_SOFTMAX_BACKEND`` environment variable, so it can change between calls.
"""

import contextlib
import contextvars
import functools
import os

import torch

from ._runtime import constant_under_compile, kernels_interpreted, triton_available

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_selected = contextvars.ContextVar("fused_softmax_backend", default=None)


def _check(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown fused_softmax backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name):
    """Run the enclosed calls on backend ``name``: 'auto', 'triton' or 'torch'."""
    token = _selected.set(_check(name))
    try:
        yield
    finally:
        _selected.reset(token)


@constant_under_compile
def selected_backend():
    """The backend in force. torch.compile reads it once, when it compiles a graph."""
    name = _selected.get()
    if name is None:
        name = _parsed(os.environ.get("FUSED_SOFTMAX_BACKEND", "auto"))
    return name


@functools.lru_cache(maxsize=8)
def _parsed(value):
    """The backend the environment variable's ``value`` names, parsed once per value."""
    return _check(value.strip().lower() or "auto")


def use_kernels(tensor, dtype):
    """True when ``tensor``, computed in ``dtype``, goes to the Triton kernels; raises if 'triton'
    was asked for and cannot run.

    'auto' sends CUDA tensors of kernel dtypes to Triton when it is installed and everything
    else to eager PyTorch. 'triton' never falls back: it runs the kernels (CUDA, or CPU under
    Triton's interpreter) or raises.
    """
    backend = selected_backend()
    if backend == "torch":
        return False
    if backend == "auto":
        return tensor.is_cuda and dtype in KERNEL_DTYPES and triton_available()
    if not triton_available():
        raise RuntimeError("fused_softmax backend 'triton' needs the triton package, which is not installed")
    if tensor.device.type == "cpu":
        if not kernels_interpreted():
            raise RuntimeError(
                "fused_softmax backend 'triton' runs CPU tensors only under Triton's interpreter: "
                "set TRITON_INTERPRET=1 before triton is first imported"
            )
    elif not tensor.is_cuda:
        raise RuntimeError(
            f"fused_softmax backend 'triton' runs on CUDA tensors (or CPU tensors under Triton's "
            f"interpreter), not on {tensor.device.type}"
        )
    return True
