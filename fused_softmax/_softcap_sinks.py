"""masked_softmax with logit softcapping or attention sinks on the kernels, as an autograd Function.

Both change the backward: the cap's derivative needs the capped scores, a sink's gradient its
probability. The forward therefore keeps each row's log-sum-exp besides y, and the backward, one
kernel, recovers the capped scores as log(y) + lse - mask and a sink's probability as
exp(sink - lse): it reads y and dy (and an additive mask under softcapping), not the scores.
"""

import torch
from torch.autograd.function import once_differentiable

from . import _launch


def kernel_backward(y, dy, lse, mask, sinks, scale, softcap, out_dtype):
    """(the scores' gradient times ``scale``, each row's share of its sink's gradient or None)."""
    masking = _launch.masking(y, mask, scale, None, softcap, sinks)
    return _launch.masked_softmax_backward(y, dy, lse, out_dtype, masking, scale)


def score_mask_and_sink_grads(ctx, y, dy, lse, mask, sinks, backward):
    """The gradients of the scores, of an additive mask where it needs one, and of the sinks,
    through ``backward``, ``kernel_backward`` or its custom op."""
    if ctx.needs_input_grad[1]:  # the mask's gradient is the scaled scores': taken before the scale, once
        dtype = torch.promote_types(ctx.scores_dtype, mask.dtype)
        dz, rows = backward(y, dy, lse, mask, sinks, 1.0, ctx.softcap, dtype)
        scores_grad, mask_grad = (dz * ctx.scale).to(ctx.scores_dtype), dz.sum_to_size(mask.shape).to(mask.dtype)
    else:
        scores_grad, rows = backward(y, dy, lse, mask, sinks, ctx.scale, ctx.softcap, ctx.scores_dtype)
        mask_grad = None
    sinks_grad = None if sinks is None else rows.sum(-1).reshape(-1, sinks.numel()).sum(0).to(sinks.dtype)
    return scores_grad, mask_grad, sinks_grad


def save_context(ctx, inputs, output):
    """What ``score_mask_and_sink_grads`` needs, from masked_softmax's inputs and (y, lse)."""
    scores, mask, scale, _, _, softcap, sinks = inputs
    y, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.scale, ctx.softcap, ctx.scores_dtype = scale, softcap, scores.dtype
    ctx.save_for_backward(y, lse, mask, sinks)


class SoftcapSinksFunction(torch.autograd.Function):
    """softmax(softcap(scale * scores) + mask, with sinks) over the last dim: one kernel each way,
    returning (y, each row's log-sum-exp). Saves both. An additive mask gets its gradient (with
    sinks alone: under softcapping the caller refuses one that requires it), summed over its
    broadcast dims."""

    @staticmethod
    def forward(scores, mask, scale, causal_offset, dtype, softcap, sinks):
        masking = _launch.masking(scores, mask, scale, causal_offset, softcap, sinks)
        return _launch.masked_softmax_forward_with_lse(scores, dtype or scores.dtype, masking)

    setup_context = staticmethod(save_context)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _):
        y, lse, mask, sinks = ctx.saved_tensors
        scores_grad, mask_grad, sinks_grad = score_mask_and_sink_grads(ctx, y, dy, lse, mask, sinks, kernel_backward)
        return scores_grad, mask_grad, None, None, None, None, sinks_grad
