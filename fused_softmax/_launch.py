"""Host side of the kernels: row views, outputs, launch configuration and the launch itself.

Triton is imported on first use only, so ``import fused_softmax`` stays cheap and works
where Triton is absent.
"""

import contextlib
import contextvars
import functools

import torch

_max_block = contextvars.ContextVar("fused_softmax_max_block", default=None)


@contextlib.contextmanager
def limit_block(max_block):
    """Cap the row length kept on chip, so tiny rows reach the online regime (for tests)."""
    token = _max_block.set(max_block)
    try:
        yield
    finally:
        _max_block.reset(token)


@functools.cache
def _kernels():
    from . import kernels

    return kernels


def kernels_interpreted():
    """True when the kernels, and Triton's own library of jitted functions (tl.max, tl.cdiv), were
    decorated under TRITON_INTERPRET=1, so they run on CPU tensors."""
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    return all(isinstance(f, InterpretedFunction) for f in (_kernels()._softmax_forward_kernel, standard.cdiv))


@functools.cache
def _cuda_properties(index):
    props = torch.cuda.get_device_properties(index)
    return _kernels().DeviceProperties(
        name=props.name,
        sm_count=props.multi_processor_count,
        registers_per_sm=getattr(props, "regs_per_multiprocessor", 65536),
        max_threads_per_sm=props.max_threads_per_multi_processor,
    )


def device_properties(device):
    """The GPU's properties; under the interpreter, an H100's, so CPU runs use H100 configs."""
    if device.type == "cuda":
        return _cuda_properties(device.index if device.index is not None else torch.cuda.current_device())
    return _kernels().H100


def as_rows(t):
    """A [n_rows, n_cols] view of ``t`` (softmax dim last) with unit column stride; copies only when none exists."""
    n_cols = t.shape[-1] if t.dim() else 1
    if t.dim() and t.stride(-1) != 1 and n_cols > 1:
        t = t.contiguous()
    try:
        return t.view(-1, n_cols)
    except RuntimeError:
        return t.contiguous().view(-1, n_cols)


def empty_rows(n_rows, n_cols, dtype, device):
    """Allocate an output; tests replace this to poison outputs before a kernel writes them."""
    return torch.empty((n_rows, n_cols), dtype=dtype, device=device)


def _launch(kernel, tensors, n_rows, n_cols, elem_bytes, backward):
    kernels = _kernels()
    device = device_properties(tensors[0].device)
    config = kernels.launch_config(n_cols, elem_bytes, device, backward=backward, max_block=_max_block.get())
    strides = [t.stride(0) for t in tensors]
    kernel[(config.grid(n_rows, device),)](*tensors, n_rows, n_cols, *strides, **config.constexprs())


def softmax_forward_rows(x, out_dtype):
    """y = softmax(x) along dim 1 of a [n_rows, n_cols] view, in ``out_dtype``."""
    n_rows, n_cols = x.shape
    y = empty_rows(n_rows, n_cols, out_dtype, x.device)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _launch(_kernels()._softmax_forward_kernel, (x, y), n_rows, n_cols, x.element_size(), backward=False)
    return y


def softmax_backward_rows(y, dy):
    """dx = y * (dy - sum(dy * y)) along dim 1 of [n_rows, n_cols] views, in y's dtype."""
    n_rows, n_cols = y.shape
    dx = empty_rows(n_rows, n_cols, y.dtype, y.device)
    with torch.cuda.device(y.device) if y.is_cuda else contextlib.nullcontext():
        _launch(_kernels()._softmax_backward_kernel, (y, dy, dx), n_rows, n_cols, y.element_size(), backward=True)
    return dx
