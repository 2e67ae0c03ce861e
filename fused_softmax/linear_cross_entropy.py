"""``linear_cross_entropy``: the cross-entropy of ``F.linear(input, weight, bias)`` without ever
holding the [tokens, vocabulary] logits.

The tokens are taken a chunk at a time: the chunk's logits come from a torch matmul (cuBLAS on a
GPU), the cross-entropy kernel turns them into the chunk's losses and, in the same pass and in
the same buffer, their gradient, and the chunk's contributions to the input, weight and bias
gradients are accumulated at once (in fp32 for fp16/bf16 weights). Peak extra memory is one
chunk of logits plus the gradients themselves. For a mean or a sum the forward computes the
gradients and the backward only scales them by the upstream gradient (nothing, for the usual
1); for reduction='none' the upstream gradient is per token, so the backward runs the chunks
again. Eager PyTorch takes the kernel's place where the backend says so, chunked the same way.
"""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _launch
from ._backend import use_kernels
from .cross_entropy import _check_targets, _index_denominator, _is_one, torch_cross_entropy

# The chunk's logits are at most the size of the input's activations [tokens, H], and a chunk
# holds no fewer rows than this, so that its matmuls stay efficient.
MIN_CHUNK_ROWS = 1024


def chunk_rows(n_tokens, hidden, vocab, element_size, device, chunk_size=None):
    """Tokens per chunk: ``chunk_size`` if given; else the logits of a chunk are no larger than
    the input (n_tokens · hidden elements) or MIN_CHUNK_ROWS rows, whichever is more, and on a
    GPU no more than a quarter of its free memory."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, not {chunk_size!r}")
        return min(chunk_size, max(n_tokens, 1))
    rows = max(n_tokens * hidden // max(vocab, 1), MIN_CHUNK_ROWS)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        rows = min(rows, max(1, free // 4 // max(vocab * element_size, 1)))
    return max(1, min(rows, n_tokens))


def _chunk_losses_and_grad(logits, target, options, grad_scale, kernels):
    """The chunk's per-token losses (fp32, fp64 for fp64) and, with ``grad_scale``, the logits'
    gradient of Σ loss · grad_scale, written over the logits (kernels) or in a new buffer."""
    ignore_index, label_smoothing, z_loss, softcap = options
    if kernels:
        losses = _launch.cross_entropy_forward(
            logits,
            target,
            None,
            ignore_index=ignore_index,
            smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            grad=None if grad_scale is None else logits,
            grad_scale=grad_scale,
        )
        return losses, None if grad_scale is None else logits
    wide = logits.detach().to(_launch.stats_dtype(logits.dtype))
    with torch.enable_grad():
        wide.requires_grad_(grad_scale is not None)
        losses = torch_cross_entropy(wide, target, None, ignore_index, "none", label_smoothing, z_loss, softcap)
        if grad_scale is None:
            return losses.detach(), None
        (grad,) = torch.autograd.grad(losses, wide, grad_scale.expand_as(losses))
    return losses.detach(), grad.to(logits.dtype)


def _accumulator(shape, like):
    """A zeroed gradient accumulator: fp32 for fp16/bf16 parameters."""
    return torch.zeros(shape, dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)


def chunked_cross_entropy(input, weight, bias, target, options, rows, grad_scale=None, upstream=None, wanted=()):
    """Per-token losses of ``F.linear(input, weight, bias)`` [N, V] against ``target`` [N], a
    chunk of ``rows`` tokens at a time; and, for ``wanted`` among 'input', 'weight', 'bias', the
    gradients of Σ loss · grad_scale (times ``upstream``, per token, when given)."""
    kernels = use_kernels(input, input.dtype)
    n_tokens = input.shape[0]
    losses = []
    grad_input = torch.empty_like(input) if "input" in wanted else None
    grad_weight = _accumulator(weight.shape, weight) if "weight" in wanted else None
    grad_bias = _accumulator(bias.shape, bias) if "bias" in wanted else None
    for start in range(0, n_tokens, rows):
        chunk = input[start : start + rows]
        logits = F.linear(chunk, weight, bias)
        chunk_losses, grad = _chunk_losses_and_grad(
            logits, target[start : start + rows], options, grad_scale if wanted else None, kernels
        )
        losses.append(chunk_losses)
        if not wanted:
            continue
        if upstream is not None:
            grad.mul_(upstream[start : start + rows, None].to(grad.dtype))
        if grad_input is not None:
            torch.mm(grad, weight, out=grad_input[start : start + rows])
        if grad_weight is not None:
            if grad_weight.dtype == grad.dtype:
                grad_weight.addmm_(grad.t(), chunk)
            else:  # the matmul in the parameters' dtype (fp32 accumulation inside it), chunks summed in fp32
                grad_weight += (grad.t() @ chunk).to(grad_weight.dtype)
        if grad_bias is not None:
            grad_bias += grad.sum(0, dtype=grad_bias.dtype)
        del logits, grad
    losses = torch.cat(losses) if losses else input.new_empty(0, dtype=_launch.stats_dtype(input.dtype))
    return losses, grad_input, grad_weight, grad_bias


def _cast(grad, like):
    return None if grad is None else grad.to(like.dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """The chunked cross-entropy of a linear layer, returning (loss, and for a mean or a sum the
    input, weight and bias gradients of it, None where not ``wanted``). Those gradients are
    outputs, not differentiable (first derivatives only), so that the forward needs no ``ctx``."""

    @staticmethod
    def forward(input, weight, bias, target, options, reduction, rows, wanted):
        ignore_index = options[0]
        counted = _index_denominator(target, None, ignore_index)
        dtype = _launch.stats_dtype(input.dtype)
        scale = 1.0 / counted.to(dtype) if reduction == "mean" else torch.ones((), dtype=dtype, device=input.device)
        precomputed = wanted if reduction != "none" else ()
        losses, grad_input, grad_weight, grad_bias = chunked_cross_entropy(
            input, weight, bias, target, options, rows, scale.reshape(1), wanted=precomputed
        )
        if reduction == "none":
            loss = losses
        else:
            loss = losses.sum() if reduction == "sum" else losses.sum() / counted
        grads = (_cast(grad_input, input), _cast(grad_weight, weight), _cast(grad_bias, bias))
        return (loss.to(input.dtype), *grads)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, target, options, reduction, rows, wanted = inputs
        ctx.mark_non_differentiable(*(g for g in output[1:] if g is not None))
        ctx.options, ctx.reduction, ctx.rows, ctx.wanted = options, reduction, rows, wanted
        if reduction == "none":
            ctx.save_for_backward(input, weight, bias, target)
        else:
            ctx.save_for_backward(*output[1:])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_):
        if ctx.reduction == "none":
            input, weight, bias, target = ctx.saved_tensors
            scale = torch.ones(1, dtype=_launch.stats_dtype(input.dtype), device=input.device)
            _, *grads = chunked_cross_entropy(
                input, weight, bias, target, ctx.options, ctx.rows, scale, upstream=grad_loss, wanted=ctx.wanted
            )
            grads = [_cast(g, like) for g, like in zip(grads, (input, weight, bias), strict=True)]
        else:
            grads = list(ctx.saved_tensors)
            if not _is_one(grad_loss):
                grads = [None if g is None else g * grad_loss for g in grads]
        grad_input, grad_weight, grad_bias = grads
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _torch_composition(input, weight, target, bias, ignore_index, reduction, label_smoothing):
    """``F.cross_entropy(F.linear(input, weight, bias), target)`` over flattened tokens."""
    logits = F.linear(input, weight, bias)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )


def _check_like_torch(input, weight, target, bias, ignore_index, reduction, label_smoothing):
    """torch's own errors: the composition is first run on meta tensors (no data, no work); if
    that, or the class-index targets' dtype and shape, fails, it runs on the real tensors, so
    torch raises its exact error (meta kernels word some differently)."""
    options = (ignore_index, reduction, label_smoothing)
    try:
        meta = [None if t is None else t.to("meta") for t in (input, weight, target, bias)]
        _torch_composition(*meta, *options)
        if target.dtype not in (torch.int64, torch.uint8) or target.shape != input.shape[:-1]:
            raise ValueError(
                f"linear_cross_entropy: expected class-index targets (int64) of shape {list(input.shape[:-1])}, "
                f"got {target.dtype} of shape {list(target.shape)}"
            )
    except (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError) as meta_error:
        _torch_composition(input, weight, target, bias, *options)
        raise meta_error


def linear_cross_entropy(
    input,
    weight,
    target,
    bias=None,
    *,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    chunk_size=None,
):
    """``F.cross_entropy(F.linear(input, weight, bias), target, ...)`` without the full logits.

    ``input`` [..., H], ``weight`` [V, H] as in ``nn.Linear``, ``bias`` [V] or None, ``target``
    [...] class indices. Options as in ``fused_softmax.cross_entropy``. ``chunk_size``: tokens per
    chunk (default: see ``chunk_rows``). The result has the loss's usual shape and input's dtype.
    First derivatives only; under torch.compile it runs eagerly (a graph break).
    """
    if torch.compiler.is_compiling():  # a graph break: the checks and the chunks run eagerly
        options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
        options |= dict(z_loss=z_loss, softcap=softcap, chunk_size=chunk_size)
        return torch.compiler.disable(linear_cross_entropy)(input, weight, target, bias, **options)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, not {softcap}")
    _check_like_torch(input, weight, target, bias, ignore_index, reduction, label_smoothing)
    flat_input = input.reshape(-1, input.shape[-1])
    flat_target = target.reshape(-1).long()
    _check_targets(flat_target, weight.shape[0], ignore_index)
    rows = chunk_rows(
        flat_input.shape[0], weight.shape[1], weight.shape[0], input.element_size(), input.device, chunk_size
    )
    grad_enabled = torch.is_grad_enabled()
    wanted = tuple(
        name
        for name, t in (("input", input), ("weight", weight), ("bias", bias))
        if t is not None and t.requires_grad and grad_enabled
    )
    options = (ignore_index, float(label_smoothing), float(z_loss), None if softcap is None else float(softcap))
    loss = LinearCrossEntropyFunction.apply(flat_input, weight, bias, flat_target, options, reduction, rows, wanted)[0]
    return loss.view(target.shape) if reduction == "none" else loss
