"""masked_softmax with logit softcapping, attention sinks or a bias beside a bool mask on the
kernels, as an autograd Function.

Softcapping and sinks change the backward: the cap's derivative needs the capped scores, a sink's
gradient its probability. The forward therefore keeps each row's log-sum-exp besides y, and the
backward, one kernel, recovers the capped scores as log(y) + lse - mask and a sink's probability
as exp(sink - lse): it reads y and dy (and an additive mask under softcapping), not the scores.
A bias (T5's position bias, kept apart from the padding mask so that neither is expanded) only
adds a gradient, the scores' before the scale summed to its shape: alone, it keeps no statistics
(an empty tensor stands for them) and its backward is softmax's kernel.

Every torch.func transform works. With z = scale * scores capped, plus mask and bias, a row's
lse = log(sum(exp(z)) + exp(sink)) and y = exp(z - lse), so along a tangent dz (and a sink's)

    dlse = sum(y * dz) + p * dsink,    dy = y * (dz - dlse),    p = exp(sink - lse),

and dz = scale * (1 - tanh^2) * dscores + dmask + dbias: the forward-mode tangent is softmax's
Jacobian product (the backward kernel) of dz, less y * p * dsink. The log-sum-exp is a
differentiable output too, because the backward reads it: the backward is a Function of y, dy,
lse and the sinks (``SoftcapSinksBackwardFunction``), on the kernel, whose own derivatives are
torch ops in fp32 at least, as ``_jacobian``'s are for softmax. A vmapped call is one launch:
the batch is one more leading dim of the scores; vmapped sinks become one logit per (batch
entry, head).
"""

import torch

from . import _launch, functional
from ._jacobian import widened
from ._transforms import (
    batch_first,
    batched_scores,
    broadcast_batched,
    legacy_batched,
    per_head_batched,
    refuse_nested_forward_mode,
)

_NAME = "masked_softmax with softcap, sinks or a bias"


def kernel_backward(y, dy, lse, mask, sinks, scale, softcap, out_dtype):
    """(the scores' gradient times ``scale``, each row's share of its sink's gradient or None):
    without softcapping and sinks (a bias alone), softmax's backward kernel."""
    if softcap is None and sinks is None:
        return _launch.softmax_backward(y, dy, y.dim() - 1, out_dtype, scale=scale), None
    masking = _launch.masking(y, mask, scale, None, softcap, sinks)
    return _launch.masked_softmax_backward(y, dy, lse, out_dtype, masking, scale)


def differentiable_backward(y, dy, lse, mask, sinks, scale, softcap, out_dtype):
    """``kernel_backward`` as differentiable Functions: ``SoftcapSinksBackwardFunction``, or for a
    bias alone softmax's Jacobian product. In torch ops (``torch_backward``) where the older vmap
    of ``is_grads_batched`` builds a graph: it drops the graph of a Function applied in a backward."""
    if torch.is_grad_enabled() and legacy_batched(y, dy):
        return torch_backward(y, dy, lse, mask, sinks, scale, softcap, out_dtype)
    if softcap is None and sinks is None:
        return functional.JacobianProductFunction.apply(y, dy, -1, out_dtype, "softmax", scale), None
    dx, rows = SoftcapSinksBackwardFunction.apply(y, dy, lse, mask, sinks, scale, softcap, out_dtype)
    return dx, rows if sinks is not None else None


def torch_backward(y, dy, lse, mask, sinks, scale, softcap, out_dtype):
    """``kernel_backward`` in torch ops, differentiable, in fp32 at least: with r = sum(dy * y)
    and t the cap's tanh, dx = scale * (1 - t^2) * y * (dy - r) and rows = -p * r."""
    wide_y, wide_dy, wide_lse = widened(y, dy, lse)
    r = (wide_dy * wide_y).sum(-1, keepdim=True)
    dx = scale * _cap_slope(_cap_tanh(wide_y, wide_lse, mask, softcap)) * wide_y * (wide_dy - r)
    if sinks is None:
        return dx.to(out_dtype), None
    rows = -_sink_probability(wide_lse, sinks.to(wide_lse.dtype)) * r.squeeze(-1)
    return dx.to(out_dtype), rows.to(lse.dtype)


def _cap_tanh(y, lse, mask, softcap):
    """tanh(scale * scores / softcap), the capped score over softcap, recovered as (log(y) + lse -
    mask) / softcap; 0 where y is 0 (a hidden key, where no gradient flows); None without softcap."""
    if softcap is None:
        return None
    visible = y > 0
    capped = torch.where(visible, y, 1.0).log() + lse.unsqueeze(-1)
    if mask is not None and mask.dtype != torch.bool:
        capped = capped - torch.where(visible, mask, 0.0)
    return torch.where(visible, capped / softcap, 0.0)


def _rows_by_head(rows, n_heads):
    """Per-row values [..., Lq] as [runs, heads, Lq]: the kernels give row i the sink (i // Lq) % n_heads."""
    return rows.reshape(-1, n_heads, rows.shape[-1])


def _sink_probability(lse, sinks):
    """Each row's sink probability exp(sink - lse), shaped like lse; 0 where lse is -inf."""
    rows = _rows_by_head(lse, sinks.numel())
    finite = rows > float("-inf")
    p = torch.where(finite, torch.exp(sinks.reshape(-1, 1) - torch.where(finite, rows, 0.0)), 0.0)
    return p.reshape(lse.shape)


def _per_head(rows, sinks):
    """Per-row values summed over each head's rows, shaped like the sinks."""
    return _rows_by_head(rows, sinks.numel()).sum((0, 2)).reshape(sinks.shape)


def _each_row(per_head, lse):
    """One value per head [H] (or flattened per batch entry and head) spread to lse's rows."""
    return _rows_by_head(torch.zeros_like(lse), per_head.numel()).add(per_head.reshape(-1, 1)).reshape(lse.shape)


def _cap_slope(t):
    """The cap's derivative 1 - tanh^2 (1 without softcap)."""
    return 1.0 if t is None else 1.0 - t * t


def backward_second_derivatives(y, dy, lse, mask, sinks, scale, softcap, dx_grad, rows_grad):
    """The gradients of <dx_grad, dx> + <rows_grad, rows>, (dx, rows) = ``kernel_backward``, for
    y, dy, lse and the sinks (None where they have none), in torch ops in fp32 at least. With
    r = sum(dy * y) and t the cap's tanh: dx = scale * (1 - t^2) * y * (dy - r), rows = -p * r,
    and t's derivative is (dy / y + dlse) / softcap."""
    wide_y, wide_dy, wide_lse, wide_dx_grad = widened(y, dy, lse, dx_grad)
    t = _cap_tanh(wide_y, wide_lse, mask, softcap)
    r = (wide_dy * wide_y).sum(-1, keepdim=True)
    w = scale * wide_dx_grad * _cap_slope(t)
    wy = (w * wide_y).sum(-1, keepdim=True)
    grad_dy, grad_y = wide_y * (w - wy), w * (wide_dy - r) - wide_dy * wy
    grad_lse = torch.zeros_like(wide_lse)
    if t is not None:
        cap = (-2.0 * scale / softcap) * wide_dx_grad * t * (wide_dy - r)
        grad_y, grad_lse = grad_y + cap, (cap * wide_y).sum(-1)
    grad_sinks = None
    if sinks is not None and rows_grad is not None:
        weighted = _sink_probability(wide_lse, sinks.to(wide_lse.dtype)) * rows_grad.to(wide_lse.dtype)
        grad_dy, grad_y = grad_dy - weighted.unsqueeze(-1) * wide_y, grad_y - weighted.unsqueeze(-1) * wide_dy
        grad_lse = grad_lse + weighted * r.squeeze(-1)
        grad_sinks = _per_head(-weighted * r.squeeze(-1), sinks).to(sinks.dtype)
    return grad_y.to(y.dtype), grad_dy.to(dy.dtype), grad_lse.to(lse.dtype), grad_sinks


def backward_tangent(y, dy, lse, mask, sinks, scale, softcap, y_tangent, lse_tangent, sinks_tangent):
    """The tangents of (dx, rows) = ``kernel_backward`` along y, lse and the sinks, dy held fixed
    (it enters linearly: its tangent is the kernel's), in torch ops in fp32 at least."""
    wide_y, wide_dy, wide_lse = widened(y, dy, lse)
    t = _cap_tanh(wide_y, wide_lse, mask, softcap)
    r = (wide_dy * wide_y).sum(-1, keepdim=True)
    dx_tangent = torch.zeros_like(wide_y)
    rows_tangent = torch.zeros_like(wide_lse)
    p = None if sinks is None else _sink_probability(wide_lse, sinks.to(wide_lse.dtype))
    if y_tangent is not None:
        y_tangent = y_tangent.to(wide_y.dtype)
        r_tangent = (wide_dy * y_tangent).sum(-1, keepdim=True)
        dx_tangent = scale * _cap_slope(t) * (y_tangent * (wide_dy - r) - wide_y * r_tangent)
        if p is not None:
            rows_tangent = -p * r_tangent.squeeze(-1)
    if t is not None and (y_tangent is not None or lse_tangent is not None):
        moved = y_tangent if y_tangent is not None else torch.zeros_like(wide_y)
        if lse_tangent is not None:
            moved = moved + wide_y * lse_tangent.to(wide_y.dtype).unsqueeze(-1)
        dx_tangent = dx_tangent + (-2.0 * scale / softcap) * t * (wide_dy - r) * moved
    if p is not None and (sinks_tangent is not None or lse_tangent is not None):
        logit_tangent = torch.zeros_like(wide_lse)
        if sinks_tangent is not None:
            logit_tangent = _each_row(sinks_tangent.to(wide_lse.dtype), wide_lse)
        if lse_tangent is not None:
            logit_tangent = logit_tangent - lse_tangent.to(wide_lse.dtype)
        rows_tangent = rows_tangent - p * logit_tangent * r.squeeze(-1)
    return dx_tangent, rows_tangent


def lse_grads(y, lse, lse_grad, mask, sinks, scale, softcap):
    """What a gradient of lse adds to (``kernel_backward``'s dx, rows): dlse/dz = y and
    dlse/dsink = p, so scale * (1 - t^2) * y * lse_grad and p * lse_grad, in torch ops."""
    wide_y, wide_lse, wide_grad = widened(y, lse, lse_grad)
    t = _cap_tanh(wide_y, wide_lse, mask, softcap)
    dx = scale * _cap_slope(t) * wide_y * wide_grad.unsqueeze(-1)
    rows = None if sinks is None else _sink_probability(wide_lse, sinks.to(wide_lse.dtype)) * wide_grad
    return dx, rows


def score_mask_and_sink_grads(ctx, y, dy, lse, lse_grad, mask, sinks, bias, backward):
    """The gradients of the scores, of an additive mask and a bias where they need one, and of the
    sinks, through ``backward`` (``differentiable_backward`` or its custom op), with what a
    gradient of lse adds (None: none). The mask's and the bias's are the scaled scores' gradient
    summed to their shapes: taken before the scale, once."""
    added = [t if needs else None for t, needs in ((mask, ctx.needs_input_grad[1]), (bias, ctx.needs_input_grad[7]))]
    adding = any(t is not None for t in added)
    scale = 1.0 if adding else ctx.scale
    dtype = ctx.scores_dtype
    if adding:
        dtype = torch.promote_types(dtype, next(t for t in added if t is not None).dtype)
    dz, rows = backward(y, dy, lse, mask, sinks, scale, ctx.softcap, dtype)
    if lse_grad is not None:
        lse_dz, lse_rows = lse_grads(y, lse, lse_grad, mask, sinks, scale, ctx.softcap)
        dz = (dz + lse_dz).to(dtype)
        rows = None if sinks is None else rows + lse_rows
    scores_grad = (dz * ctx.scale).to(ctx.scores_dtype) if adding else dz
    mask_grad, bias_grad = (None if t is None else dz.sum_to_size(t.shape).to(t.dtype) for t in added)
    sinks_grad = None if sinks is None else _per_head(rows, sinks).to(sinks.dtype)
    return scores_grad, mask_grad, sinks_grad, bias_grad


def save_context(ctx, inputs, output):
    """What ``score_mask_and_sink_grads`` needs, from masked_softmax's inputs and (y, lse). The
    log-sum-exp is differentiable where it holds statistics; a gradient it does not get is None."""
    scores, mask, scale, _, _, softcap, sinks, bias = inputs
    y, lse = output
    if softcap is None and sinks is None:
        ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.scale, ctx.softcap, ctx.scores_dtype = scale, softcap, scores.dtype
    ctx.save_for_backward(y, lse, mask, sinks, bias)


def softcap_sinks_grads(ctx, dy, lse_grad, backward):
    """The Function's (and its op's) backward, through ``backward``."""
    y, lse, mask, sinks, bias = ctx.saved_tensors
    dy = torch.zeros_like(y) if dy is None else dy
    grads = score_mask_and_sink_grads(ctx, y, dy, lse, lse_grad, mask, sinks, bias, backward)
    scores_grad, mask_grad, sinks_grad, bias_grad = grads
    return scores_grad, mask_grad, None, None, None, None, sinks_grad, bias_grad


def vmapped_forward(apply, info, in_dims, scores, mask, scale, causal_offset, dtype, softcap, sinks, bias):
    """A vmap rule's ((y, lse), out_dims) for the forward ``apply``: the batch is one more leading
    dim of the scores and of a vmapped mask or bias (see ``broadcast_batched``); vmapped sinks
    become one per (batch entry, head). One call."""
    (scores,), point = batched_scores(info, in_dims[:1], scores)
    mask, bias = (broadcast_batched(t, in_dims[i], scores.dim() - 1) for t, i in ((mask, 1), (bias, 7)))
    sinks = per_head_batched(sinks, in_dims[6], scores.shape[:-2])
    y, lse = apply(scores, mask, scale, causal_offset, dtype, softcap, sinks, bias)
    keeps_statistics = softcap is not None or sinks is not None
    return (y.squeeze(1) if point else y, lse), (0, 0 if keeps_statistics else None)


def vmapped_backward(apply, info, in_dims, y, dy, lse, mask, sinks, scale, softcap, dtype):
    """A vmap rule's ((dx, rows), out_dims) for the backward ``apply``, batched as the forward. One call."""
    (y, dy), point = batched_scores(info, in_dims[:2], y, dy)
    (lse,) = batch_first(info, in_dims[2:3], lse)
    mask = broadcast_batched(mask, in_dims[3], y.dim() - 1)
    sinks = per_head_batched(sinks, in_dims[4], y.shape[:-2])
    dx, rows = apply(y, dy, lse, mask, sinks, scale, softcap, dtype)
    return (dx.squeeze(1) if point else dx, rows), (0, 0 if sinks is not None else None)


class SoftcapSinksFunction(torch.autograd.Function):
    """softmax(softcap(scale * scores) + mask + bias, with sinks) over the last dim: one kernel each
    way, returning (y, each row's log-sum-exp). Saves both. An additive mask and a bias get their
    gradients (not under softcapping, where the caller refuses them), summed over their broadcast
    dims. Works under every torch.func transform; a vmapped call is one launch."""

    @staticmethod
    def forward(scores, mask, scale, causal_offset, dtype, softcap, sinks, bias):
        masking = _launch.masking(scores, mask, scale, causal_offset, softcap, sinks, bias)
        return _launch.masked_softmax_forward_with_lse(scores, dtype or scores.dtype, masking)

    @staticmethod
    def setup_context(ctx, inputs, output):
        save_context(ctx, inputs, output)
        ctx.save_for_forward(*output, inputs[1], inputs[6])

    @staticmethod
    def backward(ctx, dy, lse_grad):
        return softcap_sinks_grads(ctx, dy, lse_grad, differentiable_backward)

    @staticmethod
    def jvp(ctx, scores_tangent, mask_tangent, _scale, _offset, _dtype, _softcap, sinks_tangent, bias_tangent):
        """(y * (dz - dlse), dlse), dlse = sum(y * dz) + p * dsink: softmax's Jacobian product of dz
        on the kernel, less y * p * dsink; dz = scale * (1 - t^2) * dscores + dmask + dbias."""
        refuse_nested_forward_mode(_NAME)
        y, lse, mask, sinks = ctx.saved_tensors
        (wide_y,) = widened(y)
        wide_lse = lse.to(wide_y.dtype)
        dz = torch.zeros_like(wide_y)
        if scores_tangent is not None:
            dz = ctx.scale * _cap_slope(_cap_tanh(wide_y, wide_lse, mask, ctx.softcap)) * scores_tangent
        for tangent in (mask_tangent, bias_tangent):
            if tangent is not None:
                dz = dz + tangent
        sinking = sinks_tangent is not None and sinks is not None
        out_dtype = wide_y.dtype if sinking else y.dtype
        y_tangent = functional.JacobianProductFunction.apply(y, dz.to(wide_y.dtype), -1, out_dtype, "softmax")
        if ctx.softcap is None and sinks is None:
            return y_tangent, None
        lse_tangent = (wide_y * dz).sum(-1)
        if sinking:
            sink_term = _sink_probability(wide_lse, sinks.to(wide_lse.dtype)) * _each_row(sinks_tangent, wide_lse)
            lse_tangent = lse_tangent + sink_term
            y_tangent = (y_tangent - wide_y * sink_term.unsqueeze(-1)).to(y.dtype)
        return y_tangent, lse_tangent.to(lse.dtype)

    @staticmethod
    def vmap(info, in_dims, *inputs):
        return vmapped_forward(SoftcapSinksFunction.apply, info, in_dims, *inputs)


class SoftcapSinksBackwardFunction(torch.autograd.Function):
    """``kernel_backward`` with softcapping or sinks, (dx, each row's share of its sink's gradient,
    empty without sinks), differentiable in y, dy, lse and the sinks, in both modes: for double
    backward, hessians and the like. Under ``is_grads_batched`` the kernel runs as its custom op."""

    @staticmethod
    def forward(y, dy, lse, mask, sinks, scale, softcap, out_dtype):
        if legacy_batched(y, dy):
            return torch.ops.fused_softmax.masked_softmax_with_lse_backward(
                y, dy, lse, mask, sinks, scale, softcap, out_dtype
            )
        dx, rows = kernel_backward(y, dy, lse, mask, sinks, scale, softcap, out_dtype)
        return dx, rows if rows is not None else lse.new_empty(0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, dy, lse, mask, sinks, scale, softcap, _ = inputs
        if sinks is None:
            ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        ctx.scale, ctx.softcap, ctx.out_dtype = scale, softcap, output[0].dtype
        ctx.save_for_backward(y, dy, lse, mask, sinks)
        ctx.save_for_forward(y, dy, lse, mask, sinks)

    @staticmethod
    def backward(ctx, dx_grad, rows_grad):
        y, dy, lse, mask, sinks = ctx.saved_tensors
        dx_grad = torch.zeros_like(y) if dx_grad is None else dx_grad
        grads = backward_second_derivatives(y, dy, lse, mask, sinks, ctx.scale, ctx.softcap, dx_grad, rows_grad)
        grad_y, grad_dy, grad_lse, grad_sinks = grads
        return grad_y, grad_dy, grad_lse, None, grad_sinks, None, None, None

    @staticmethod
    def jvp(ctx, y_tangent, dy_tangent, lse_tangent, _mask, sinks_tangent, *_):
        refuse_nested_forward_mode(_NAME)
        y, dy, lse, mask, sinks = ctx.saved_tensors
        dx_tangent, rows_tangent = backward_tangent(
            y, dy, lse, mask, sinks, ctx.scale, ctx.softcap, y_tangent, lse_tangent, sinks_tangent
        )
        if dy_tangent is not None:  # linear in dy: the backward itself
            dx_linear, rows_linear = SoftcapSinksBackwardFunction.apply(
                y, dy_tangent, lse, mask, sinks, ctx.scale, ctx.softcap, dx_tangent.dtype
            )
            dx_tangent = dx_tangent + dx_linear
            rows_tangent = rows_tangent + rows_linear if sinks is not None else rows_tangent
        return dx_tangent.to(ctx.out_dtype), rows_tangent.to(lse.dtype) if sinks is not None else None

    @staticmethod
    def vmap(info, in_dims, *inputs):
        return vmapped_backward(SoftcapSinksBackwardFunction.apply, info, in_dims, *inputs)
