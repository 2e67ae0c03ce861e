"""The kernels as torch.library custom ops, so torch.compile keeps them in its graph.

``fused_softmax::softmax`` / ``log_softmax`` run the forward kernel, ``softmax_backward`` /
``log_softmax_backward`` the backward kernel. Each has a fake (meta) implementation for
tracing and an autograd formula, the backward ops too, so double backward compiles. The
dispatcher boundary costs tens of microseconds a call, so eager code calls the autograd
Functions directly and only code being compiled goes through these ops.
"""

from typing import Optional

import torch

from . import _launch


def _empty_like(x, dtype):
    return torch.empty(x.shape, dtype=dtype, device=x.device)


def _define(name, log):
    """Register the forward and backward op of softmax (``log=False``) or log_softmax."""

    @torch.library.custom_op(f"fused_softmax::{name}", mutates_args=())
    def forward(x: torch.Tensor, dim: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return _launch.softmax_forward(x, dim, dtype or x.dtype, log)

    @torch.library.custom_op(f"fused_softmax::{name}_backward", mutates_args=())
    def backward(y: torch.Tensor, dy: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
        return _launch.softmax_backward(y, dy, dim, dtype, log)

    @forward.register_fake
    def _(x, dim, dtype=None):
        return _empty_like(x, dtype or x.dtype)

    @backward.register_fake
    def _(y, dy, dim, dtype):
        return _empty_like(y, dtype)

    def setup_forward(ctx, inputs, output):
        x, dim, _ = inputs
        ctx.dim, ctx.input_dtype = dim, x.dtype
        ctx.save_for_backward(output)

    def forward_grad(ctx, dy):
        (y,) = ctx.saved_tensors
        return backward(y, dy, ctx.dim, ctx.input_dtype), None, None

    def setup_backward(ctx, inputs, output):
        y, dy, dim, _ = inputs
        ctx.dim = dim
        ctx.save_for_backward(y, dy)

    def backward_grad(ctx, ddx):
        y, dy = ctx.saved_tensors
        grad_y, grad_dy = second_derivatives(y, dy, ddx.to(y.dtype), ctx.dim, log)
        return grad_y, grad_dy.to(dy.dtype), None, None

    forward.register_autograd(forward_grad, setup_context=setup_forward)
    backward.register_autograd(backward_grad, setup_context=setup_backward)
    return forward, backward


def second_derivatives(y, dy, ddx, dim, log):
    """Gradients of <ddx, dx(y, dy)> for y and dy, in torch ops (differentiable in turn).

    softmax: dx = y * (dy - sum(dy * y)); log-softmax: dx = dy - exp(y) * sum(dy).
    """
    if log:
        e = y.exp()
        return -ddx * e * dy.sum(dim, keepdim=True), ddx - (ddx * e).sum(dim, keepdim=True)
    grad_y = ddx * (dy - (dy * y).sum(dim, keepdim=True)) - dy * (ddx * y).sum(dim, keepdim=True)
    return grad_y, y * (ddx - (ddx * y).sum(dim, keepdim=True))


softmax, softmax_backward = _define("softmax", log=False)
log_softmax, log_softmax_backward = _define("log_softmax", log=True)
