"""masked_softmax with logit softcapping, attention sinks or a bias beside a bool mask on the
kernels, as an autograd Function.

Softcapping and sinks change the backward: the cap's derivative needs the capped scores, a sink's
gradient its probability. The forward therefore keeps each row's log-sum-exp besides y, and the
backward, one kernel, recovers the capped scores as log(y) + lse - mask and a sink's probability
as exp(sink - lse): it reads y and dy (and an additive mask under softcapping), not the scores.
A bias (T5's position bias, kept apart from the padding mask so that neither is expanded) only
adds a gradient, the scores' before the scale summed to its shape: alone, it keeps no statistics
(an empty tensor stands for them) and its backward is softmax's kernel.
"""

import torch
from torch.autograd.function import once_differentiable

from . import _launch


def kernel_backward(y, dy, lse, mask, sinks, scale, softcap, out_dtype):
    """(the scores' gradient times ``scale``, each row's share of its sink's gradient or None):
    without softcapping and sinks (a bias alone), softmax's backward kernel."""
    if softcap is None and sinks is None:
        return _launch.softmax_backward(y, dy, y.dim() - 1, out_dtype, scale=scale), None
    masking = _launch.masking(y, mask, scale, None, softcap, sinks)
    return _launch.masked_softmax_backward(y, dy, lse, out_dtype, masking, scale)


def score_mask_and_sink_grads(ctx, y, dy, lse, mask, sinks, bias, backward):
    """The gradients of the scores, of an additive mask and a bias where they need one, and of the
    sinks, through ``backward``, ``kernel_backward`` or its custom op. The mask's and the bias's
    are the scaled scores' gradient summed to their shapes: taken before the scale, once."""
    added = [t if needs else None for t, needs in ((mask, ctx.needs_input_grad[1]), (bias, ctx.needs_input_grad[7]))]
    if any(t is not None for t in added):
        dtype = torch.promote_types(ctx.scores_dtype, next(t for t in added if t is not None).dtype)
        dz, rows = backward(y, dy, lse, mask, sinks, 1.0, ctx.softcap, dtype)
        scores_grad = (dz * ctx.scale).to(ctx.scores_dtype)
        mask_grad, bias_grad = (None if t is None else dz.sum_to_size(t.shape).to(t.dtype) for t in added)
    else:
        scores_grad, rows = backward(y, dy, lse, mask, sinks, ctx.scale, ctx.softcap, ctx.scores_dtype)
        mask_grad = bias_grad = None
    sinks_grad = None if sinks is None else rows.sum(-1).reshape(-1, sinks.numel()).sum(0).to(sinks.dtype)
    return scores_grad, mask_grad, sinks_grad, bias_grad


def save_context(ctx, inputs, output):
    """What ``score_mask_and_sink_grads`` needs, from masked_softmax's inputs and (y, lse)."""
    scores, mask, scale, _, _, softcap, sinks, bias = inputs
    y, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.scale, ctx.softcap, ctx.scores_dtype = scale, softcap, scores.dtype
    ctx.save_for_backward(y, lse, mask, sinks, bias)


class SoftcapSinksFunction(torch.autograd.Function):
    """softmax(softcap(scale * scores) + mask + bias, with sinks) over the last dim: one kernel each
    way, returning (y, each row's log-sum-exp). Saves both. An additive mask and a bias get their
    gradients (not under softcapping, where the caller refuses them), summed over their broadcast
    dims."""

    @staticmethod
    def forward(scores, mask, scale, causal_offset, dtype, softcap, sinks, bias):
        masking = _launch.masking(scores, mask, scale, causal_offset, softcap, sinks, bias)
        return _launch.masked_softmax_forward_with_lse(scores, dtype or scores.dtype, masking)

    setup_context = staticmethod(save_context)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _):
        y, lse, mask, sinks, bias = ctx.saved_tensors
        grads = score_mask_and_sink_grads(ctx, y, dy, lse, mask, sinks, bias, kernel_backward)
        scores_grad, mask_grad, sinks_grad, bias_grad = grads
        return scores_grad, mask_grad, None, None, None, None, sinks_grad, bias_grad
