"""``softmax`` and ``log_softmax``, drop-ins for torch.nn.functional's, and their autograd Functions."""

import operator
import warnings

import torch
import torch.nn.functional as F
from torch.overrides import handle_torch_function, has_torch_function_unary

from . import _launch, ops
from ._backend import KERNEL_DTYPES, use_kernels


def _implicit_dim(name, ndim, stacklevel):
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. Change the call to include dim=X as an argument.",
        stacklevel=stacklevel,
    )
    return 0 if ndim in (0, 1, 3) else 1


def _wrap_dim(name, dim, ndim):
    """Check ``dim`` the way torch does (TypeError, IndexError) and make it non-negative."""
    try:
        if isinstance(dim, bool):
            raise TypeError
        dim = operator.index(dim)
    except TypeError:
        raise TypeError(f"{name}(): argument 'dim' must be int, not {type(dim).__name__}") from None
    bound = max(ndim, 1)
    if not -bound <= dim < bound:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-bound}, {bound - 1}], but got {dim})")
    return dim % bound


def _forward(ctx, x, dim, dtype, log):
    y = _launch.softmax_forward(x, dim, dtype or x.dtype, log)
    ctx.dim, ctx.log, ctx.input_dtype = dim, log, x.dtype
    ctx.save_for_backward(y)
    return y


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return SoftmaxBackwardFunction.apply(y, dy, ctx.dim, ctx.input_dtype, ctx.log), None, None


class SoftmaxFunction(torch.autograd.Function):
    """Softmax along ``dim`` on the Triton kernels, output in ``dtype`` (default: x's), read and
    written in one pass. Saves only y; the backward is one kernel and returns x's dtype."""

    @staticmethod
    def forward(ctx, x, dim, dtype=None):
        return _forward(ctx, x, dim, dtype, log=False)

    @staticmethod
    def backward(ctx, dy):
        return _backward(ctx, dy)


class LogSoftmaxFunction(torch.autograd.Function):
    """Log-softmax along ``dim`` on the same kernels as ``SoftmaxFunction``."""

    @staticmethod
    def forward(ctx, x, dim, dtype=None):
        return _forward(ctx, x, dim, dtype, log=True)

    @staticmethod
    def backward(ctx, dy):
        return _backward(ctx, dy)


class SoftmaxBackwardFunction(torch.autograd.Function):
    """dx from (y, dy) on the backward kernel, in ``dtype``; differentiable, for double backward.

    softmax: dx = scale * y * (dy - sum(dy * y)); log-softmax: dx = scale * (dy - exp(y) * sum(dy)).
    ``scale`` is masked_softmax's, the derivative of the scaled scores.
    """

    @staticmethod
    def forward(ctx, y, dy, dim, dtype, log, scale=1.0):
        ctx.dim, ctx.log, ctx.scale = dim, log, scale
        ctx.save_for_backward(y, dy)
        return _launch.softmax_backward(y, dy, dim, dtype, log, scale=scale)

    @staticmethod
    def backward(ctx, ddx):
        y, dy = ctx.saved_tensors
        grad_y, grad_dy = ops.second_derivatives(y, dy, ddx.to(y.dtype) * ctx.scale, ctx.dim, ctx.log)
        return grad_y, grad_dy.to(dy.dtype), None, None, None, None


def _fusable(input_dtype, dtype):
    """dtype= is fused into the kernel when it widens: reading the narrower input and casting it
    in registers equals torch's cast-first. A narrowing cast must round the input first."""
    return input_dtype in KERNEL_DTYPES and torch.promote_types(input_dtype, dtype) == dtype


# Captured at import, before any patch() can replace them: the eager fallback.
_TORCH = {"softmax": F.softmax, "log_softmax": F.log_softmax}


def _dispatch(name, input, dim, stacklevel, dtype):
    if dim is None:
        dim = _implicit_dim(name, input.dim(), stacklevel + 1)
    if not use_kernels(input, input.dtype if dtype is None else dtype):
        return _TORCH[name](input, dim, dtype=dtype)
    dim = _wrap_dim(name, dim, input.dim())
    if dtype is not None and not _fusable(input.dtype, dtype):
        input, dtype = input.to(dtype), None
    if input.dtype not in KERNEL_DTYPES:
        raise NotImplementedError(f'"{name}" not implemented for {input.dtype}')
    if torch.compiler.is_compiling():
        return getattr(ops, name)(input, dim, dtype)
    return _FUNCTIONS[name].apply(input, dim, dtype)


_FUNCTIONS = {"softmax": SoftmaxFunction, "log_softmax": LogSoftmaxFunction}


def softmax(input, dim=None, _stacklevel=3, dtype=None):
    """Drop-in for ``torch.nn.functional.softmax``: same signature, results, warnings and errors.

    CUDA tensors run on the fused Triton kernels; the rest runs eager PyTorch unless the
    backend says otherwise (see ``use_backend``). Under torch.compile it is one custom op.
    """
    if has_torch_function_unary(input):
        return handle_torch_function(softmax, (input,), input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)
    return _dispatch("softmax", input, dim, _stacklevel, dtype)


def log_softmax(input, dim=None, _stacklevel=3, dtype=None):
    """Drop-in for ``torch.nn.functional.log_softmax``, on the same kernels as ``softmax``."""
    if has_torch_function_unary(input):
        return handle_torch_function(log_softmax, (input,), input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)
    return _dispatch("log_softmax", input, dim, _stacklevel, dtype)
