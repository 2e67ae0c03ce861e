"""Attention's softmax: ``masked_softmax`` (scale, mask and causal diagonal fused into the softmax
kernel) and ``attention``, scaled_dot_product_attention's math path around it.

The scores of a batch are [..., Lq, Lk]. A mask is read where it lies, through broadcast
strides, so a [B, 1, 1, Lk] padding mask or an [Lq, Lk] mask is never expanded in memory; a
causal mask is not a tensor at all, the kernel compares key and query indices. Rows with
every key hidden give zeros (and zero gradients), as torch's SDPA does, not NaN.
"""

import math
import numbers

import torch
import torch.nn.functional as F

from . import _launch, _softcap_sinks_ops, ops
from ._backend import is_kernel_dtype, use_kernels
from ._runtime import unscriptable
from ._softcap_sinks import SoftcapSinksFunction
from ._transforms import bound_quickly, needs_autograd, vmapped_masked_softmax
from .functional import JacobianProductFunction, _fusable, jacobian_product

CAUSAL = ("top_left", "bottom_right")


def _causal_offset(causal, scores):
    """The last key query i sees is i + offset: 0 for 'top_left' (SDPA's is_causal), Lk - Lq for
    'bottom_right' (a KV cache: the last query sees every key). None: no causal mask."""
    if causal is False or causal is None:
        return None
    if causal is True:
        causal = "top_left"
    if causal not in CAUSAL:
        raise ValueError(f"causal must be a bool or one of {CAUSAL}, not {causal!r}")
    if scores.dim() < 2:
        raise ValueError(f"a causal mask needs scores of at least 2 dims [..., Lq, Lk], got {tuple(scores.shape)}")
    return 0 if causal == "top_left" else scores.shape[-1] - scores.shape[-2]


def _broadcasts_to(shape, target):
    """Whether ``shape`` broadcasts to ``target`` as it is (``torch.broadcast_shapes``, written in
    Python over symbolic-shape guards, costs a small call tens of µs; a loop over indices is
    cheaper than a generator over zip)."""
    if len(shape) > len(target):
        return False
    for i in range(1, len(shape) + 1):
        if shape[-i] != 1 and shape[-i] != target[-i]:
            return False
    return True


def _check_mask(mask, scores):
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor or None, not {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"mask must be bool (True = attend) or floating point (added), not {mask.dtype}")
    if mask.device != scores.device:
        raise RuntimeError(f"mask is on {mask.device} but scores are on {scores.device}")
    if not _broadcasts_to(mask.shape, scores.shape):
        raise RuntimeError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to scores of shape {tuple(scores.shape)}"
        )
    return mask


def _check_softcap(softcap):
    if softcap is None:
        return None
    softcap = float(softcap)
    if not softcap > 0 or not math.isfinite(softcap):
        raise ValueError(f"softcap must be a positive finite number or None, not {softcap}")
    return softcap


def _check_sinks(sinks, scores):
    """Sinks are one logit per head, the dim before [Lq, Lk]."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor) or not sinks.dtype.is_floating_point:
        raise TypeError(f"sinks must be a floating point tensor or None, not {getattr(sinks, 'dtype', type(sinks))}")
    if sinks.device != scores.device:
        raise RuntimeError(f"sinks are on {sinks.device} but scores are on {scores.device}")
    if scores.dim() < 3 or sinks.shape != (scores.shape[-3],):
        raise RuntimeError(
            f"sinks must hold one logit per head, shape [H] for scores [..., H, Lq, Lk]; got sinks of shape "
            f"{tuple(sinks.shape)} for scores of shape {tuple(scores.shape)}"
        )
    return sinks


def _check_bias(bias, scores):
    if bias is None:
        return None
    if isinstance(bias, torch.Tensor) and not bias.dtype.is_floating_point:
        raise TypeError(f"bias must be floating point (added after scaling), not {bias.dtype}")
    return _check_mask(bias, scores)


def _merge_bias(mask, bias):
    """One additive mask of ``mask`` and ``bias``, as torch broadcasts them: for the cases the
    kernels do not read a bias beside (an additive mask, or softcapping)."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, float("-inf"))
    return mask + bias


@bound_quickly
class MaskedSoftmaxFunction(torch.autograd.Function):
    """softmax(scale * scores + mask) over the last dim on the Triton kernels, one read and one
    write each way. Saves only y. The gradient of an additive mask that requires one is the
    scores' gradient before scaling, summed over the dims the mask was broadcast along. Works
    under every torch.func transform; a vmapped call is one launch."""

    @staticmethod
    def forward(scores, mask, scale, causal_offset, dtype):
        return _masked_softmax_kernels(scores, mask, scale, causal_offset, dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        scores, mask, scale, _, _ = inputs
        ops.save_masked_softmax_context(ctx, scores, mask, scale, output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return (*ops.masked_softmax_grads(ctx, y, dy, _softmax_backward), None, None, None)

    @staticmethod
    def jvp(ctx, scores_tangent, mask_tangent, *_):
        """y * (t - sum(t * y)) with t = scale * the scores' tangent + the mask's (broadcast)."""
        (y,) = ctx.saved_tensors
        if mask_tangent is None:
            return JacobianProductFunction.apply(y, scores_tangent, -1, y.dtype, "softmax", ctx.scale)
        tangent = mask_tangent.expand(y.shape)
        if scores_tangent is not None:
            tangent = scores_tangent * ctx.scale + tangent
        return JacobianProductFunction.apply(y, tangent, -1, y.dtype, "softmax")

    @staticmethod
    def vmap(info, in_dims, scores, mask, scale, causal_offset, dtype):
        return vmapped_masked_softmax(
            MaskedSoftmaxFunction.apply, info, in_dims, scores, mask, scale, causal_offset, dtype
        )


def _masked_softmax_kernels(scores, mask, scale, causal_offset, dtype):
    return _launch.masked_softmax(scores, mask, scale, causal_offset, dtype or scores.dtype)


def _softmax_backward(y, dy, dtype, scale):
    return jacobian_product(y, dy, -1, dtype, "softmax", scale)


def _masked_softmax_torch(scores, mask, scale, causal_offset, dtype, softcap=None, sinks=None, bias=None):
    """The eager fallback, in torch ops; rows with every key hidden give zeros, as in the kernels.
    Like the kernels it computes in fp32 at least: half-precision scale * x + mask would round twice.
    Sinks join each row as one more column, dropped from the output."""
    out_dtype = dtype or scores.dtype
    z = scores.to(out_dtype).to(torch.promote_types(out_dtype, torch.float32)) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    keep = None
    if causal_offset is not None:
        n_queries, n_keys = z.shape[-2:]
        keep = torch.ones(n_queries, n_keys, dtype=torch.bool, device=z.device).tril(causal_offset)
    if mask is not None and mask.dtype == torch.bool:
        keep = mask if keep is None else keep & mask
    elif mask is not None:
        z = z + mask
    if bias is not None:
        z = z + bias
    if keep is not None:
        z = z.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        z = torch.cat([z, sinks.to(z.dtype)[:, None, None].expand(*z.shape[:-1], 1)], -1)
    hidden = (z == float("-inf")).all(-1, keepdim=True)  # with sinks, only where a sink is -inf too
    y = torch.softmax(z.masked_fill(hidden, 0.0), -1).masked_fill(hidden, 0.0)
    return (y if sinks is None else y[..., :-1]).to(out_dtype)


def _float_argument(function, name, value):
    """``value`` as a float, taken as torch's argument parser takes one: a real number, or a 0-d
    tensor that needs no gradient (one that does would lose it in the float); else its TypeError."""
    if type(value) is float:  # the common case, before the isinstance checks (numbers.Real's is slow)
        return value
    if isinstance(value, torch.Tensor) and not value.dim() and not value.requires_grad:
        return value.item()
    if isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        return float(value)
    raise TypeError(f"{function}(): argument '{name}' must be float, not {type(value).__name__}")


@unscriptable
def masked_softmax(scores, mask=None, *, scale=1.0, causal=False, softcap=None, sinks=None, bias=None, dtype=None):
    """softmax(scale * scores + mask) over the last dim of ``scores`` [..., Lq, Lk], in one kernel.

    ``mask``: bool (True = attend, as in SDPA) or floating point (added after scaling), of any
    shape that broadcasts to the scores; it is read through its strides, never expanded.
    ``causal``: False; True or 'top_left' (query i sees keys <= i, SDPA's ``is_causal``); or
    'bottom_right' (query i sees keys <= i + Lk - Lq: the queries are the last Lq positions,
    as when decoding with a KV cache). Rows with every key hidden give zeros, not NaN.
    ``softcap``: logit softcapping, the scaled scores become softcap * tanh(scale * scores /
    softcap) before the mask (Gemma 2). ``sinks``: one logit per head [H], for scores
    [..., H, Lq, Lk], that takes part in each row's normalisation with no output column
    (gpt-oss); a row with every key hidden then gives zeros too. Both have their gradients.
    ``bias``: floating point, added after scaling, beside a bool ``mask``: a learned position
    bias (T5's, ALiBi) kept apart from the padding so that neither is expanded; read through its
    strides, its gradient summed over its broadcast dims.
    ``dtype``: the output dtype; a widening cast is fused into the kernel.
    """
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a tensor, not {type(scores).__name__}")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"masked_softmax needs floating point scores, got {scores.dtype}")
    mask = _check_mask(mask, scores)
    causal_offset = _causal_offset(causal, scores)
    scale = _float_argument("masked_softmax", "scale", scale)
    softcap, sinks, bias = _check_softcap(softcap), _check_sinks(sinks, scores), _check_bias(bias, scores)
    if not use_kernels(scores, scores.dtype if dtype is None else dtype):
        return _masked_softmax_torch(scores, mask, scale, causal_offset, dtype, softcap, sinks, bias)
    if bias is not None and (softcap is not None or (mask is not None and mask.dtype != torch.bool)):
        mask, bias = _merge_bias(mask, bias), None
    if dtype is not None and not _fusable(scores.dtype, dtype):
        scores, dtype = scores.to(dtype), None
    if not is_kernel_dtype(scores.dtype):
        raise NotImplementedError(f'"masked_softmax" not implemented for {scores.dtype}')
    if not _launch.fits_fp32(scale):
        # The kernel receives the scale as fp32 parts: one past their range is applied first.
        scores, scale = scores * scale, 1.0
    if softcap is not None or sinks is not None or bias is not None:
        return _softcap_sinks(scores, mask, scale, causal_offset, dtype, softcap, sinks, bias)
    if torch.compiler.is_compiling():
        return ops.masked_softmax(scores, mask, scale, causal_offset, dtype)
    if not needs_autograd(scores, mask):
        return _masked_softmax_kernels(scores, mask, scale, causal_offset, dtype)
    return MaskedSoftmaxFunction.apply(scores, mask, scale, causal_offset, dtype)


def _softcap_sinks(scores, mask, scale, causal_offset, dtype, softcap, sinks, bias):
    """masked_softmax with softcapping, sinks or a bias beside a bool mask, on the kernels."""
    if softcap is not None and mask is not None and mask.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            "masked_softmax on the kernels does not give the gradient of an additive mask under softcapping: "
            "detach the mask, or use the 'torch' backend"
        )
    if torch.compiler.is_compiling():
        return _softcap_sinks_ops.masked_softmax_with_lse(
            scores, mask, scale, causal_offset, dtype, softcap, sinks, bias
        )[0]
    return SoftcapSinksFunction.apply(scores, mask, scale, causal_offset, dtype, softcap, sinks, bias)[0]


@unscriptable
def attention(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    softcap=None,
    sinks=None,
    bias=None,
):
    """``torch.nn.functional.scaled_dot_product_attention``'s math path with the softmax fused:
    softmax(q kᵀ · scale + mask) v, torch matmuls around ``masked_softmax``, dropout from torch's
    RNG. Grouped-query attention (``enable_gqa``) shares each key/value head among
    Hq / Hkv query heads without repeating keys and values in memory. ``softcap``, ``sinks``
    (one logit per query head) and ``bias`` (beside ``attn_mask``, also under ``is_causal``) are
    ``masked_softmax``'s."""
    if is_causal and attn_mask is not None:
        raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set when is_causal=True")
    if not query.dtype == key.dtype == value.dtype:
        raise RuntimeError(
            f"Expected query, key, and value to have the same dtype, but got query.dtype: {query.dtype} "
            f"key.dtype: {key.dtype} and value.dtype: {value.dtype} instead."
        )
    if min(query.dim(), key.dim(), value.dim()) < 2:
        raise RuntimeError(
            f"scaled_dot_product_attention: expected query, key and value to be at least 2 dimensional, "
            f"got {query.dim()}-D, {key.dim()}-D and {value.dim()}-D"
        )
    if attn_mask is not None and attn_mask.dim() < 2:  # SDPA reads its (L, S) dims before broadcasting it
        if not attn_mask.dim():
            raise IndexError("Dimension specified as -2 but tensor has no dimensions")
        raise IndexError("Dimension out of range (expected to be in range of [-1, 0], but got -2)")
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, query.dtype):
        raise RuntimeError(
            f"Expected attn_mask dtype to be bool or float or to match query dtype, but got attn_mask.dtype: "
            f"{attn_mask.dtype} and query.dtype: {query.dtype} instead."
        )
    if scale is None:
        # Empty heads give all-zero scores, whatever the scale: SDPA's 1/sqrt(0) would make 0 * inf.
        scale = 1.0 / math.sqrt(query.size(-1)) if query.size(-1) else 1.0
    scale = _float_argument("scaled_dot_product_attention", "scale", scale)
    groups = 1
    if enable_gqa and query.dim() >= 3 and query.size(-3) != key.size(-3):
        heads, kv_heads = query.size(-3), key.size(-3)
        if kv_heads == 0 or heads % kv_heads or value.size(-3) != kv_heads:
            raise RuntimeError(
                f"enable_gqa needs the query heads ({heads}) to be a multiple of the key/value heads "
                f"({kv_heads}, {value.size(-3)})"
            )
        groups = heads // kv_heads
    # Query heads sharing a key head are stacked along the query dim: one batched matmul, no repeat.
    q = query.unflatten(-3, (-1, groups)).flatten(-3, -2) if groups > 1 else query
    scores = q @ key.transpose(-2, -1)
    if groups > 1:
        scores = scores.unflatten(-2, (groups, -1)).flatten(-4, -3)
    p = masked_softmax(scores, attn_mask, scale=scale, causal=is_causal, softcap=softcap, sinks=sinks, bias=bias)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    if groups == 1:
        return p @ value
    out = p.unflatten(-3, (-1, groups)).flatten(-3, -2) @ value
    return out.unflatten(-2, (groups, -1)).flatten(-4, -3)
