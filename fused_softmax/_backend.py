"""Which implementation serves a call: the Triton kernels or eager PyTorch.

The choice is read at call time from ``use_backend`` (innermost wins) or else the
``FUSED_SOFTMAX_BACKEND`` environment variable, so it can change between calls.
"""

import contextlib
import contextvars
import functools
import os

import torch

from ._runtime import constant_under_compile, interpreter_problem, jit_tracing, kernels_interpreted, triton_available

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPE_SET = frozenset(KERNEL_DTYPES)  # membership by hash: a call's host time is the product


def is_kernel_dtype(dtype):
    """Whether the kernels read and write ``dtype`` (one of ``KERNEL_DTYPES``)."""
    return dtype in _KERNEL_DTYPE_SET


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
        name = _parsed(_environ_data.get(_ENVIRON_KEY, _AUTO))
    return name


# os.environ's own store, read without its per-call key encoding and value decoding (os.environ.get
# costs about 1 µs, most of an inference call's budget). os.environ writes through to it.
_environ_data, _ENVIRON_KEY = os.environ._data, os.environ.encodekey("FUSED_SOFTMAX_BACKEND")
_AUTO = os.environ.encodevalue("auto")


@functools.lru_cache(maxsize=8)
def _parsed(value):
    """The backend the environment variable's ``value`` (as os.environ stores it) names, parsed
    once per value."""
    return _check(os.environ.decodevalue(value).strip().lower() or "auto")


def use_kernels(tensor, dtype):
    """True when ``tensor``, computed in ``dtype``, goes to the Triton kernels; raises if 'triton'
    was asked for and cannot run, and under torch.jit.trace, which records torch ops, not
    Triton's launches: its graph would replay the kernels' outputs unwritten.

    'auto' sends CUDA tensors of kernel dtypes to Triton when it is installed and everything
    else to eager PyTorch. 'triton' never falls back: it runs the kernels (CUDA, or CPU under
    Triton's interpreter) or raises.
    """
    backend = selected_backend()
    if backend == "auto":
        if not (tensor.is_cuda and dtype in _KERNEL_DTYPE_SET and triton_available()):
            return False
    elif backend == "torch":
        return False
    elif not triton_available():
        raise RuntimeError("fused_softmax backend 'triton' needs the triton package, which is not installed")
    elif tensor.is_cpu:
        if not kernels_interpreted():
            raise RuntimeError(
                "fused_softmax backend 'triton' runs CPU tensors only under Triton's interpreter: "
                "set TRITON_INTERPRET=1 before triton is first imported"
            )
        problem = interpreter_problem()
        if problem is not None:
            raise RuntimeError(problem)
    elif not tensor.is_cuda:
        raise RuntimeError(
            f"fused_softmax backend 'triton' runs on CUDA tensors (or CPU tensors under Triton's "
            f"interpreter), not on {tensor.device.type}"
        )
    if jit_tracing():
        raise RuntimeError(
            "torch.jit.trace cannot record fused_softmax's Triton kernels (its graph would return their "
            "outputs unwritten): use torch.compile or torch.export, or trace under "
            "fused_softmax.use_backend('torch')"
        )
    return True
