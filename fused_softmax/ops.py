"""The kernels as torch.library custom ops, so torch.compile keeps them in its graph.

``fused_softmax::softmax`` / ``log_softmax`` run the forward kernel, ``softmax_backward`` /
``log_softmax_backward`` the backward kernel, ``masked_softmax`` the attention forward (its
backward is ``softmax_backward`` with the scale); masked_softmax's with softcapping, sinks or a
bias are ``_softcap_sinks_ops``'s. Each has a fake (meta) implementation for
tracing, an autograd formula (the backward ops too, so double backward compiles) and a vmap
rule that makes a vmapped call one launch. The dispatcher boundary costs tens of microseconds
a call, so eager code calls the autograd Functions directly and only code being compiled goes
through these ops. torch's custom ops have no forward-mode formula and no support for
torch.func's grad transforms (pytorch#179652): the Functions, used outside compiled code,
have both.
"""

from typing import Optional

import torch

from . import _jacobian, _launch
from ._transforms import vmapped, vmapped_masked_softmax


def _empty_like(x, dtype):
    return torch.empty(x.shape, dtype=dtype, device=x.device)


def _define(name, log):
    """Register the forward and backward op of softmax (``log=False``) or log_softmax."""

    @torch.library.custom_op(f"fused_softmax::{name}", mutates_args=())
    def forward(x: torch.Tensor, dim: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return _launch.softmax_forward(x, dim, dtype or x.dtype, log)

    @torch.library.custom_op(f"fused_softmax::{name}_backward", mutates_args=())
    def backward(y: torch.Tensor, dy: torch.Tensor, dim: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
        return _launch.softmax_backward(y, dy, dim, dtype, log, scale=scale)

    @forward.register_fake
    def _(x, dim, dtype=None):
        return _empty_like(x, dtype or x.dtype)

    @backward.register_fake
    def _(y, dy, dim, dtype, scale=1.0):
        return _empty_like(y, dtype)

    def setup_forward(ctx, inputs, output):
        x, dim, _ = inputs
        ctx.dim, ctx.input_dtype = dim, x.dtype
        ctx.save_for_backward(output)

    def forward_grad(ctx, dy):
        (y,) = ctx.saved_tensors
        return backward(y, dy, ctx.dim, ctx.input_dtype), None, None

    def setup_backward(ctx, inputs, output):
        y, dy, dim, _, scale = inputs
        ctx.dim, ctx.scale = dim, scale
        ctx.save_for_backward(y, dy)

    def backward_grad(ctx, ddx):
        y, dy = ctx.saved_tensors
        kind = _jacobian.backward_product(log)
        return (*_jacobian.second_derivatives(y, dy, ddx * ctx.scale, ctx.dim, kind), None, None, None)

    def forward_vmap(info, in_dims, x, dim, dtype=None):
        return vmapped(forward, info, in_dims, (x,), dim, dtype)

    def backward_vmap(info, in_dims, y, dy, dim, dtype, scale=1.0):
        return vmapped(backward, info, in_dims, (y, dy), dim, dtype, scale)

    forward.register_autograd(forward_grad, setup_context=setup_forward)
    backward.register_autograd(backward_grad, setup_context=setup_backward)
    forward.register_vmap(forward_vmap)
    backward.register_vmap(backward_vmap)
    return forward, backward


def masked_softmax_grads(ctx, y, dy, softmax_backward):
    """(d scores, d mask) from y and dy, through ``softmax_backward(y, dy, dtype, scale)``."""
    if not ctx.needs_input_grad[1]:
        return softmax_backward(y, dy, ctx.scores_dtype, ctx.scale), None
    dz = softmax_backward(y, dy, torch.promote_types(ctx.scores_dtype, ctx.mask_dtype), 1.0)
    return (dz * ctx.scale).to(ctx.scores_dtype), dz.sum_to_size(ctx.mask_shape).to(ctx.mask_dtype)


@torch.library.custom_op("fused_softmax::jacobian_product", mutates_args=())
def jacobian_product(
    y: torch.Tensor, v: torch.Tensor, dim: int, dtype: torch.dtype, kind: str, scale: float
) -> torch.Tensor:
    """The backward kernel's product ``kind`` (see ``_jacobian``) as an op, for
    ``JacobianProductFunction`` under ``is_grads_batched`` (see ``_transforms``); no autograd of its own."""
    return _launch.jacobian_product(y, v, dim, dtype, kind, scale)


@jacobian_product.register_fake
def _(y, v, dim, dtype, kind, scale):
    return _empty_like(y, dtype)


softmax, softmax_backward = _define("softmax", log=False)
log_softmax, log_softmax_backward = _define("log_softmax", log=True)


@torch.library.custom_op("fused_softmax::masked_softmax", mutates_args=())
def masked_softmax(
    scores: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    causal_offset: Optional[int],
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    return _launch.masked_softmax(scores, mask, scale, causal_offset, dtype or scores.dtype)


@masked_softmax.register_fake
def _(scores, mask, scale, causal_offset, dtype=None):
    return _empty_like(scores, dtype or scores.dtype)


def save_masked_softmax_context(ctx, scores, mask, scale, y):
    """What ``masked_softmax_grads`` needs: y, the scale, and the dtypes and mask shape to return."""
    ctx.scale, ctx.scores_dtype = scale, scores.dtype
    ctx.mask_shape, ctx.mask_dtype = (mask.shape, mask.dtype) if mask is not None else (None, None)
    ctx.save_for_backward(y)


def _setup_masked(ctx, inputs, output):
    scores, mask, scale, _, _ = inputs
    save_masked_softmax_context(ctx, scores, mask, scale, output)


def _masked_grad(ctx, dy):
    (y,) = ctx.saved_tensors
    return (*masked_softmax_grads(ctx, y, dy, _last_dim_backward), None, None, None)


def _last_dim_backward(y, dy, dtype, scale):
    return softmax_backward(y, dy, -1, dtype, scale)


def _masked_vmap(info, in_dims, scores, mask, scale, causal_offset, dtype=None):
    return vmapped_masked_softmax(masked_softmax, info, in_dims, scores, mask, scale, causal_offset, dtype)


masked_softmax.register_autograd(_masked_grad, setup_context=_setup_masked)
masked_softmax.register_vmap(_masked_vmap)
