"""``softmax``, the drop-in for torch.nn.functional.softmax, and its autograd Functions."""

import operator
import warnings

import torch
import torch.nn.functional as F
from torch.overrides import handle_torch_function, has_torch_function_unary

from . import _launch
from ._backend import KERNEL_DTYPES, use_kernels


def _implicit_dim(name, ndim, stacklevel):
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. "
        "Change the call to include dim=X as an argument.",
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


def _rows(x, dim):
    """[n_rows, n_cols] view of ``x`` with ``dim`` last (a copy where the layout needs one)."""
    return _launch.as_rows(x.movedim(dim, -1) if x.dim() else x)


def _unrows(rows, like, dim):
    """Back from a [n_rows, n_cols] result to ``like``'s shape, contiguous, as torch returns it."""
    if like.dim() == 0:
        return rows.view(())
    moved_shape = like.movedim(dim, -1).shape
    return rows.view(moved_shape).movedim(-1, dim).contiguous()


class SoftmaxFunction(torch.autograd.Function):
    """Softmax along ``dim`` on the Triton kernels. Saves only y; backward is one kernel."""

    @staticmethod
    def forward(ctx, x, dim):
        if x.numel():
            y = _unrows(_launch.softmax_forward_rows(_rows(x, dim), x.dtype), x, dim)
        else:
            y = torch.empty_like(x, memory_format=torch.contiguous_format)
        ctx.dim = dim
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return SoftmaxBackwardFunction.apply(y, dy, ctx.dim), None


class SoftmaxBackwardFunction(torch.autograd.Function):
    """dx = y * (dy - sum(dy * y)), on the backward kernel; itself differentiable for double backward."""

    @staticmethod
    def forward(ctx, y, dy, dim):
        ctx.dim = dim
        ctx.save_for_backward(y, dy)
        if not y.numel():
            return torch.empty_like(y)
        return _unrows(_launch.softmax_backward_rows(_rows(y, dim), _rows(dy, dim)), y, dim)

    @staticmethod
    def backward(ctx, ddx):
        y, dy = ctx.saved_tensors
        dim = ctx.dim
        # dx is linear in dy with the softmax Jacobian, so its dy-gradient is the same kernel.
        grad_dy = SoftmaxBackwardFunction.apply(y, ddx, dim) if ctx.needs_input_grad[1] else None
        grad_y = None
        if ctx.needs_input_grad[0]:
            grad_y = ddx * (dy - (dy * y).sum(dim, keepdim=True)) - dy * (ddx * y).sum(dim, keepdim=True)
        return grad_y, grad_dy, None


def softmax(input, dim=None, _stacklevel=3, dtype=None):
    """Drop-in for ``torch.nn.functional.softmax``: same signature, results, warnings and errors.

    CUDA tensors run on the fused Triton kernels; the rest runs eager PyTorch unless the
    backend says otherwise (see ``use_backend``).
    """
    if has_torch_function_unary(input):
        return handle_torch_function(softmax, (input,), input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)
    if dim is None:
        dim = _implicit_dim("softmax", input.dim(), _stacklevel)
    if not use_kernels(input, input.dtype if dtype is None else dtype):
        return F.softmax(input, dim, dtype=dtype)
    dim = _wrap_dim("softmax", dim, input.dim())
    x = input if dtype is None else input.to(dtype)
    if x.dtype not in KERNEL_DTYPES:
        raise NotImplementedError(f'"softmax" not implemented for {x.dtype}')
    return SoftmaxFunction.apply(x, dim)
