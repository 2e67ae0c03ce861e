"""masked_softmax with softcapping, sinks or a bias as torch.library custom ops, for torch.compile:
``fused_softmax::masked_softmax_with_lse`` and its backward, with fake implementations, autograd
formulas (the backward's too) and vmap rules, as ``ops`` has them for the rest. Apart from ``ops``
because their formulas are ``_softcap_sinks``'s, which builds on the autograd Functions that use
``ops``."""

from typing import Optional

import torch

from . import _launch, _softcap_sinks
from .ops import _empty_like


# masked_softmax with softcapping, sinks or a bias: the forward also returns each row's log-sum-exp, the
# backward op is the kernel alone (the reductions to the mask's and sinks' shapes stay in torch).
@torch.library.custom_op("fused_softmax::masked_softmax_with_lse", mutates_args=())
def masked_softmax_with_lse(
    scores: torch.Tensor,
    mask: Optional[torch.Tensor],
    scale: float,
    causal_offset: Optional[int],
    dtype: Optional[torch.dtype],
    softcap: Optional[float],
    sinks: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    masking = _launch.masking(scores, mask, scale, causal_offset, softcap, sinks, bias)
    return _launch.masked_softmax_forward_with_lse(scores, dtype or scores.dtype, masking)


@masked_softmax_with_lse.register_fake
def _(scores, mask, scale, causal_offset, dtype, softcap, sinks, bias):
    rows = scores.shape[:-1] if softcap is not None or sinks is not None else (0,)
    lse = torch.empty(rows, dtype=_launch.stats_dtype(scores.dtype), device=scores.device)
    return _empty_like(scores, dtype or scores.dtype), lse


@torch.library.custom_op("fused_softmax::masked_softmax_with_lse_backward", mutates_args=())
def masked_softmax_with_lse_backward(
    y: torch.Tensor,
    dy: torch.Tensor,
    lse: torch.Tensor,
    mask: Optional[torch.Tensor],
    sinks: Optional[torch.Tensor],
    scale: float,
    softcap: Optional[float],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    dx, rows = _softcap_sinks.kernel_backward(y, dy, lse, mask, sinks, scale, softcap, dtype)
    return dx, rows if rows is not None else lse.new_empty(0)


@masked_softmax_with_lse_backward.register_fake
def _(y, dy, lse, mask, sinks, scale, softcap, dtype):
    return _empty_like(y, dtype), lse.new_empty(lse.shape if sinks is not None else (0,))


def _softcap_sinks_grad(ctx, dy, lse_grad):
    return _softcap_sinks.softcap_sinks_grads(ctx, dy, lse_grad, masked_softmax_with_lse_backward)


def _setup_softcap_sinks_backward(ctx, inputs, output):
    y, dy, lse, mask, sinks, scale, softcap, _ = inputs
    ctx.scale, ctx.softcap = scale, softcap
    ctx.save_for_backward(y, dy, lse, mask, sinks)


def _softcap_sinks_second_derivatives(ctx, dx_grad, rows_grad):
    y, dy, lse, mask, sinks = ctx.saved_tensors
    rows_grad = rows_grad if sinks is not None else None
    grads = _softcap_sinks.backward_second_derivatives(
        y, dy, lse, mask, sinks, ctx.scale, ctx.softcap, dx_grad, rows_grad
    )
    grad_y, grad_dy, grad_lse, grad_sinks = grads
    return grad_y, grad_dy, grad_lse, None, grad_sinks, None, None, None


def _softcap_sinks_vmap(info, in_dims, *inputs):
    return _softcap_sinks.vmapped_forward(masked_softmax_with_lse, info, in_dims, *inputs)


def _softcap_sinks_backward_vmap(info, in_dims, *inputs):
    return _softcap_sinks.vmapped_backward(masked_softmax_with_lse_backward, info, in_dims, *inputs)


masked_softmax_with_lse.register_autograd(_softcap_sinks_grad, setup_context=_softcap_sinks.save_context)
masked_softmax_with_lse.register_vmap(_softcap_sinks_vmap)
masked_softmax_with_lse_backward.register_autograd(
    _softcap_sinks_second_derivatives, setup_context=_setup_softcap_sinks_backward
)
masked_softmax_with_lse_backward.register_vmap(_softcap_sinks_backward_vmap)
