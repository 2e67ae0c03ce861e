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

When even one chunk of tokens' logits over the whole vocabulary is too large (``chunk_shape``),
the vocabulary is cut into parts too: each part's logits give the rows' statistics over it
(``kernels.cross_entropy``'s slice kernels, as the vocab-parallel cross-entropy's shards), which
the host combines (``_slices``); then, the log-sum-exp known, each part's logits are formed again and
its gradient written over them; one part of logits is held at a time, for one more matmul.
Under torch.compile the same code runs as the custom ops ``fused_softmax::linear_cross_entropy``
and ``::linear_cross_entropy_backward`` (reduction='none''s backward).

Under torch.func a batch (vmap) is more tokens of the same chunks; a mean's forward-mode tangent
is the precomputed gradients' dot with the tangents, reduction='none''s each chunk's gradient
dotted with its logits' tangent. First derivatives only: a second would need every chunk's
logits kept in the graph, or a chunked second-order pass of its own (see
``LinearCrossEntropyFunction``).
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _launch
from ._backend import use_kernels
from ._runtime import unscriptable
from ._slices import combined_statistics, exponent_shift, losses_from_statistics
from ._transforms import DerivativesRefused, batch_first, legacy_batched
from .cross_entropy import (
    _capped,
    _check_targets,
    _device_scalable,
    _index_denominator,
    _is_one,
    _wants_gradient,
    applied_smoothing,
    torch_cross_entropy,
)

# The chunk's logits are at most the size of the input's activations [tokens, H], and a chunk
# holds no fewer rows than this, so that its matmuls stay efficient.
MIN_CHUNK_ROWS = 1024
NO_DOUBLE_BACKWARD = (
    "linear_cross_entropy has first derivatives only: its gradients and tangents cannot be differentiated "
    "(double backward, hessian, jacfwd or jacrev of jacrev or jacfwd)"
)
PER_EXAMPLE_WEIGHTS = (
    "linear_cross_entropy under vmap: the weight and bias must be the same for every batch entry (the "
    "chunks of every entry share one matmul weight); vmap over the input and target only"
)
# A chunk of the vocabulary, when one is taken, holds no fewer classes than this (or the whole).
MIN_CHUNK_CLASSES = 4096


def _positive_or_none(name, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, not {value!r}")
    return value


def chunk_shape(n_tokens, hidden, vocab, element_size, device, chunk_size=None, vocab_chunk_size=None):
    """(tokens, classes) of a chunk of logits. Tokens: ``chunk_size`` if given; else the chunk's
    logits are no larger than the input (n_tokens · hidden elements) or MIN_CHUNK_ROWS rows,
    whichever is more, and on a GPU within a quarter of its free memory down to MIN_CHUNK_ROWS.
    Classes: ``vocab_chunk_size`` if given; else the whole vocabulary, unless on a GPU even that
    many tokens' logits exceed the quarter: then as many classes as fit (MIN_CHUNK_CLASSES at least)."""
    rows = _positive_or_none("chunk_size", chunk_size)
    cols = _positive_or_none("vocab_chunk_size", vocab_chunk_size)
    budget = torch.cuda.mem_get_info(device)[0] // 4 if device.type == "cuda" else None
    if rows is None:
        rows = max(n_tokens * hidden // max(vocab, 1), MIN_CHUNK_ROWS)
        if budget is not None:
            rows = min(rows, max(MIN_CHUNK_ROWS, budget // max(vocab * element_size, 1)))
    rows = max(1, min(rows, n_tokens))
    if cols is None:
        cols = vocab
        if budget is not None and rows * vocab * element_size > budget:
            cols = max(MIN_CHUNK_CLASSES, budget // (rows * element_size))
    return rows, max(1, min(cols, vocab))


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


def _vocab_chunk_statistics(logits, target, vocab_start, options, kernels):
    """[rows, 4]: the chunk of classes [vocab_start, vocab_start + n)'s (max, Σ exp(x' - max),
    x'_t if the chunk holds the target else 0, Σ (x' - max) with smoothing else 0), for the host
    to combine over the chunks."""
    ignore_index, label_smoothing, _, softcap = options
    if kernels:
        return _launch.vocab_slice_statistics(
            logits,
            target,
            vocab_start=vocab_start,
            ignore_index=ignore_index,
            smoothing=label_smoothing,
            softcap=softcap,
        )
    x = _capped(logits.to(_launch.stats_dtype(logits.dtype)), softcap)
    local, in_chunk = _local_targets(target, vocab_start, x.shape[1])
    row_max = x.amax(1)
    shift = exponent_shift(row_max)[:, None]
    row_sum = torch.exp(x - shift).sum(1)
    target_logit = torch.where(in_chunk, x.gather(1, local[:, None]).squeeze(1), 0.0)
    smooth_deviation = (x - shift).sum(1) if label_smoothing else torch.zeros_like(row_sum)
    return torch.stack([row_max, row_sum, target_logit, smooth_deviation], 1)


def _combined_statistics(parts, chunk_statistics):
    """``_slices.combined_statistics`` of the chunks' [rows, 4] statistics, the chunks being the
    ``parts`` (slices) of the classes; theirs are not kept."""
    stats = torch.stack(chunk_statistics)
    return combined_statistics(stats, stats.new_tensor([part.stop - part.start for part in parts]))


def _local_targets(target, vocab_start, width):
    """Each row's target as a column of the chunk of classes at ``vocab_start`` (0 where it is
    not in the chunk), and whether it is."""
    local = target - vocab_start
    in_chunk = (local >= 0) & (local < width)
    return torch.where(in_chunk, local, 0), in_chunk


def _vocab_chunk_grad(logits, target, lse, row_scale, vocab_start, n_classes, options, kernels):
    """The gradient of Σ loss · ``row_scale`` over the chunk of classes at ``vocab_start``, from
    the rows' log-sum-exp over every class in two parts ``lse`` [rows, 2]: written over the
    logits (kernels) or in a new buffer."""
    ignore_index, label_smoothing, z_loss, softcap = options
    if kernels:
        return _launch.vocab_slice_grad(
            logits,
            target,
            lse,
            row_scale,
            vocab_start=vocab_start,
            n_classes=n_classes,
            ignore_index=ignore_index,
            smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            grad=logits,
        )
    x = _capped(logits.to(lse.dtype), softcap)
    row_max, log_sum = lse[:, :1], lse[:, 1:]
    grad = torch.exp((x - row_max) - log_sum) * (1 + 2 * z_loss * (row_max + log_sum)) - label_smoothing / n_classes
    local, in_chunk = _local_targets(target, vocab_start, x.shape[1])
    grad[in_chunk, local[in_chunk]] -= 1 - label_smoothing
    if softcap is not None:
        grad *= 1 - (x / softcap) ** 2
    grad *= torch.where(target == ignore_index, 0.0, row_scale)[:, None]
    return grad.to(logits.dtype)


def _accumulator(shape, like):
    """A zeroed gradient accumulator: fp32 for fp16/bf16 parameters."""
    return torch.zeros(shape, dtype=torch.promote_types(like.dtype, torch.float32), device=like.device)


class _Gradients:
    """The input, weight and bias gradients being accumulated over chunks, None where not wanted."""

    def __init__(self, input, weight, bias, wanted):
        self.input = torch.empty_like(input) if "input" in wanted else None
        self.weight = _accumulator(weight.shape, weight) if "weight" in wanted else None
        self.bias = _accumulator(bias.shape, bias) if "bias" in wanted else None

    def add(self, grad, chunk, weight, tokens, classes, input_part=None):
        """Add the logits' gradient ``grad`` of the chunk of ``tokens`` × ``classes`` (slices):
        its weight and bias parts, and its input part, returned, to be summed over a chunk's
        classes (``input_part``: the sum so far) or written as it is for the whole vocabulary."""
        if self.weight is not None:
            grad_weight = self.weight[classes]
            if grad_weight.dtype == grad.dtype:
                grad_weight.addmm_(grad.t(), chunk)
            else:  # the matmul in the parameters' dtype (fp32 accumulation inside it), chunks summed in fp32
                grad_weight += (grad.t() @ chunk).to(grad_weight.dtype)
        if self.bias is not None:
            self.bias[classes] += grad.sum(0, dtype=self.bias.dtype)
        if self.input is None:
            return None
        if input_part is None and classes.stop >= weight.shape[0] and classes.start == 0:
            return torch.mm(grad, weight[classes], out=self.input[tokens])
        part = (grad @ weight[classes]).to(torch.promote_types(grad.dtype, torch.float32))
        return part if input_part is None else input_part.add_(part)


def chunked_cross_entropy(
    input, weight, bias, target, options, rows, cols, grad_scale=None, upstream=None, wanted=(), grads=None
):
    """Per-token losses of ``F.linear(input, weight, bias)`` [N, V] against ``target`` [N], a
    chunk of ``rows`` tokens and ``cols`` classes at a time; and, for ``wanted`` among 'input',
    'weight', 'bias', the gradients of Σ loss · grad_scale (times ``upstream``, per token, when
    given; 0 on ignored tokens, whose gradient is 0 whatever their upstream, NaN or inf too, as
    torch's). ``grads``: what takes each chunk's logits' gradient instead (``_Gradients``' add,
    its 'input' per token, e.g. ``_TokenTangents``), ``wanted`` then non-empty.

    With the whole vocabulary in a chunk, the cross-entropy kernel writes the chunk's losses and
    gradient in one pass. Otherwise the chunk's classes are swept twice: each part's logits
    taken into statistics the host combines, then (when gradients are wanted) each part's logits again,
    its gradient formed from the rows' final log-sum-exp; one part of logits is held at a time."""
    kernels = use_kernels(input, input.dtype)
    n_tokens, vocab = input.shape[0], weight.shape[0]
    if upstream is not None:
        upstream = torch.where(target == options[0], 0.0, upstream)
    losses = []
    grads = _Gradients(input, weight, bias, wanted) if grads is None else grads
    for start in range(0, n_tokens, rows):
        tokens = slice(start, start + rows)
        chunk, chunk_target = input[tokens], target[tokens]
        if cols >= vocab:
            logits = F.linear(chunk, weight, bias)
            chunk_losses, grad = _chunk_losses_and_grad(
                logits, chunk_target, options, grad_scale if wanted else None, kernels
            )
            losses.append(chunk_losses)
            if wanted:
                if upstream is not None:
                    grad.mul_(upstream[tokens, None].to(grad.dtype))
                grads.add(grad, chunk, weight, tokens, slice(0, vocab))
            del logits, grad
            continue
        parts = [slice(v, min(v + cols, vocab)) for v in range(0, vocab, cols)]
        lse, target_logit, smooth_deviation = _combined_statistics(
            parts,
            [
                _vocab_chunk_statistics(
                    F.linear(chunk, weight[classes], None if bias is None else bias[classes]),
                    chunk_target,
                    classes.start,
                    options,
                    kernels,
                )
                for classes in parts
            ],
        )
        losses.append(losses_from_statistics(lse, target_logit, smooth_deviation, chunk_target, vocab, options))
        if not wanted:
            continue
        row_scale = grad_scale.to(lse.dtype).expand(chunk.shape[0])
        if upstream is not None:
            row_scale = row_scale * upstream[tokens].to(lse.dtype)
        input_part = None
        for classes in parts:
            part_bias = None if bias is None else bias[classes]
            logits = F.linear(chunk, weight[classes], part_bias)
            grad = _vocab_chunk_grad(logits, chunk_target, lse, row_scale, classes.start, vocab, options, kernels)
            input_part = grads.add(grad, chunk, weight, tokens, classes, input_part)
            del logits, grad
        if input_part is not None:
            grads.input[tokens] = input_part
    losses = torch.cat(losses) if losses else input.new_empty(0, dtype=_launch.stats_dtype(input.dtype))
    return losses, grads.input, grads.weight, grads.bias


def _cast(grad, like):
    return None if grad is None else grad.to(like.dtype)


def forward_and_grads(input, weight, bias, target, options, reduction, rows, cols, wanted):
    """(loss in input's dtype, and for a mean or a sum the input, weight and bias gradients of it,
    None where not ``wanted`` and for reduction='none'), over [*E, N, H] input and [*E, N] targets.
    E, when there, is vmap's batch of independent calls: more tokens of the same chunks, each
    entry reduced with its own mean divisor (per token, as ``upstream``); a weight or bias
    gradient, summed over every token, is then not asked for (see ``_batched``). A target
    outside the classes raises here (``_check_targets``): in the op under torch.compile, whose
    graph it would otherwise break."""
    flat_target = target.reshape(-1)
    _check_targets(flat_target, weight.shape[0], options[0])
    counted = _index_denominator(target, None, options[0], dim=-1)
    dtype = _launch.stats_dtype(input.dtype)
    ones = torch.ones(1, dtype=dtype, device=input.device)
    scale = 1.0 / counted.to(dtype) if reduction == "mean" else ones[0]
    if scale.dim():  # a batch of means
        grad_scale, upstream = ones, scale[..., None].expand(target.shape).reshape(-1)
    else:
        grad_scale, upstream = scale.reshape(1), None
    precomputed = wanted if reduction != "none" else ()
    losses, grad_input, grad_weight, grad_bias = chunked_cross_entropy(
        input.reshape(-1, input.shape[-1]),
        weight,
        bias,
        flat_target,
        options,
        rows,
        cols,
        grad_scale,
        upstream,
        precomputed,
    )
    losses = losses.view(target.shape)
    if reduction == "none":
        loss = losses
    else:
        loss = losses.sum(-1) if reduction == "sum" else losses.sum(-1) / counted
    grad_input = None if grad_input is None else grad_input.view(input.shape)
    return loss.to(input.dtype), _cast(grad_input, input), _cast(grad_weight, weight), _cast(grad_bias, bias)


def per_token_grads(input, weight, bias, target, grad_loss, options, rows, cols, wanted):
    """The input, weight and bias gradients of reduction='none''s losses for the upstream
    ``grad_loss`` (None where not ``wanted``), input [*E, N, H], target and grad_loss [*E, N]
    (E as in ``forward_and_grads``): the chunks run again."""
    scale = torch.ones(1, dtype=_launch.stats_dtype(input.dtype), device=input.device)
    flat = input.reshape(-1, input.shape[-1]), weight, bias, target.reshape(-1)
    _, *grads = chunked_cross_entropy(*flat, options, rows, cols, scale, upstream=grad_loss.reshape(-1), wanted=wanted)
    if grads[0] is not None:
        grads[0] = grads[0].view(input.shape)
    return [_cast(g, like) for g, like in zip(grads, (input, weight, bias), strict=True)]


class _TokenTangents:
    """``chunked_cross_entropy``'s accumulator for reduction='none''s forward-mode tangent: each
    token's Σ_c G_c · Ż_c, G the chunk's logits' gradient and Ż = ẋ·Wᵀ + x·Ẇᵀ + ḃ its logits'
    tangent, formed a chunk (of tokens and classes) at a time beside it."""

    def __init__(self, input, tangents, dtype):
        self.tangents, self.dtype = tangents, dtype
        self.input = input.new_empty(input.shape[0], dtype=dtype)
        self.weight = self.bias = None

    def add(self, grad, chunk, weight, tokens, classes, input_part=None):
        """The chunk's dots (see ``_Gradients.add``): written for the whole vocabulary, else
        returned, summed over the chunk's classes."""
        input_tangent, weight_tangent, bias_tangent = self.tangents
        logits_tangent = 0
        if input_tangent is not None:
            logits_tangent = F.linear(input_tangent[tokens], weight[classes])
        if weight_tangent is not None:
            logits_tangent = logits_tangent + F.linear(chunk, weight_tangent[classes])
        if bias_tangent is not None:
            logits_tangent = logits_tangent + bias_tangent[classes]
        part = (grad.to(self.dtype) * logits_tangent).sum(1, dtype=self.dtype)
        if input_part is None and classes.stop >= weight.shape[0] and classes.start == 0:
            self.input[tokens] = part
            return None
        return part if input_part is None else input_part.add_(part)


def token_tangents(input, weight, bias, target, tangents, options, rows, cols):
    """reduction='none''s per-token loss tangents [*E, N] along the input, weight and bias
    ``tangents`` (None where absent): the chunks run again, each chunk's gradient dotted with its
    logits' tangent, one chunk of each held at a time."""
    dtype = _launch.stats_dtype(input.dtype)
    flat = input.reshape(-1, input.shape[-1])
    flat_tangents = (None if tangents[0] is None else tangents[0].reshape(flat.shape), *tangents[1:])
    dots = _TokenTangents(flat, flat_tangents, dtype)
    scale = torch.ones(1, dtype=dtype, device=input.device)
    chunked_cross_entropy(flat, weight, bias, target.reshape(-1), options, rows, cols, scale, None, ("input",), dots)
    return dots.input.view(target.shape)


def _scaled_by_upstream(grads, grad_loss, target, ignore_index):
    """The precomputed (input, weight, bias) gradients of a mean or sum (None where not wanted)
    times its upstream gradient, one value per batch entry (the gradients' leading dims). An
    ignored token's input gradient stays 0 whatever the upstream gradient, NaN or inf too, as
    torch's."""
    scaled = [
        None if g is None else g * grad_loss.reshape(grad_loss.shape + (1,) * (g.dim() - grad_loss.dim()))
        for g in grads
    ]
    if scaled[0] is not None:
        scaled[0] = torch.where((target == ignore_index)[..., None], 0.0, scaled[0])
    return scaled


def _parameter_grads(wanted):
    """Whether a weight or bias gradient is wanted: summed over every token, a batch of them
    needs a call per entry (see ``_batched``)."""
    return "weight" in wanted or "bias" in wanted


def _batched(apply, info, in_dims, args, per_entry, parameter_tangents=()):
    """A vmap rule's (output, out_dims) for ``apply`` (a Function's or an op's) of ``args``:
    input, weight, bias, target, then the rest, tensors among them (an upstream gradient, an
    input tangent) batched like the target, except those at ``parameter_tangents`` (the weight
    and bias tangents). The batch is one more leading dim of the input and targets, merged with
    any there: more tokens of the same chunks, one call. ``per_entry``: a call per batch entry
    instead, stacked, for the weight and bias gradients, which every entry has its own of
    (per-example gradients); so too for a batched weight or bias tangent, which every entry's
    tokens have their own of. A batched weight or bias (per-example weights) is refused."""
    if in_dims[1] is not None or in_dims[2] is not None:
        raise NotImplementedError(PER_EXAMPLE_WEIGHTS)
    tokens = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i not in (1, 2, *parameter_tangents)]
    moved = batch_first(info, [in_dims[i] for i in tokens], *(args[i] for i in tokens))
    batch = moved[tokens.index(3)].shape[:-1]
    args = list(args)
    for i, t in zip(tokens, moved, strict=True):
        args[i] = t.flatten(0, len(batch) - 1)
    batched = list(tokens)
    for i in parameter_tangents:
        if in_dims[i] is not None:  # one per entry of the batch's first dim, the same for any after it
            t = args[i].movedim(in_dims[i], 0)
            t = t.reshape(t.shape[:1] + (1,) * (len(batch) - 1) + t.shape[1:]).expand(batch + t.shape[1:])
            args[i], per_entry = t.flatten(0, len(batch) - 1), True
            batched.append(i)
    if per_entry:
        calls = [apply(*(a[e] if i in batched else a for i, a in enumerate(args))) for e in range(math.prod(batch))]
        outputs = [None if parts[0] is None else torch.stack(parts) for parts in zip(*calls, strict=True)]
    else:
        outputs = apply(*args)
    outputs = tuple(None if o is None else o.reshape(batch + o.shape[1:]) for o in outputs)
    return outputs, tuple(None if o is None else 0 for o in outputs)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """The chunked cross-entropy of a linear layer, returning ``forward_and_grads``' (loss, input,
    weight and bias gradients); those gradients are outputs, not differentiable, so that the
    forward needs no ``ctx``.

    First derivatives, in either mode: the backward scales the precomputed gradients (or runs
    the chunks again, ``PerTokenGradsFunction``); the tangent of a mean or sum is the precomputed
    gradients' dot with the tangents, that of reduction='none' each chunk's gradient dotted with
    its logits' tangent (``token_tangents``). vmap is more tokens of the same chunks
    (``_batched``). A second derivative raises (``DerivativesRefused``): through torch ops it
    would keep every chunk's logits in the graph, the memory this function exists to save."""

    @staticmethod
    def forward(input, weight, bias, target, options, reduction, rows, cols, wanted):
        return forward_and_grads(input, weight, bias, target, options, reduction, rows, cols, wanted)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, target, options, reduction, rows, cols, wanted = inputs
        ctx.mark_non_differentiable(*(g for g in output[1:] if g is not None))
        ctx.options, ctx.reduction, ctx.chunks, ctx.wanted = options, reduction, (rows, cols), wanted
        saved = (input, weight, bias, target, *(output[1:] if reduction != "none" else ()))
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        input, weight, bias, target, *grads = ctx.saved_tensors
        arguments = (input, weight, bias, target, grad_loss, ctx.options, *ctx.chunks, ctx.wanted)
        with torch.no_grad():
            if ctx.reduction == "none":
                grads = _per_token_backward(*arguments)
            elif not (_device_scalable(grad_loss) and _is_one(grad_loss)):
                grads = _scaled_by_upstream(grads, grad_loss, target, ctx.options[0])
        if torch.is_grad_enabled():  # create_graph=True: gradients that raise if differentiated
            grads = DerivativesRefused.apply(NO_DOUBLE_BACKWARD, input, weight, bias, *grads)[3:]
        grad_input, grad_weight, grad_bias = grads
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, input_tangent, weight_tangent, bias_tangent, *_):
        input, weight, bias, target, *grads = ctx.saved_tensors
        tangents = (input_tangent, weight_tangent, bias_tangent)
        if ctx.reduction == "none":
            arguments = (input, weight, bias, target, *tangents, ctx.options, *ctx.chunks)
            (tangent,) = TokenTangentsFunction.apply(*arguments)
        else:
            tangent = sum(
                (g * t).sum((-2, -1)) if name == "input" else (g * t).sum()
                for name, g, t in zip(_GRADIENT_NAMES, grads, tangents, strict=True)
                if t is not None
            )
            tangent = DerivativesRefused.apply(NO_DOUBLE_BACKWARD, input, weight, bias, tangent)[3]
        return tangent.to(input.dtype), None, None, None

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, target, options, reduction, rows, cols, wanted):
        args = (input, weight, bias, target, options, reduction, rows, cols, wanted)
        per_entry = reduction != "none" and _parameter_grads(wanted)
        return _batched(LinearCrossEntropyFunction.apply, info, in_dims, args, per_entry)


class _UnderivableFunction(torch.autograd.Function):
    """A Function whose own derivatives, reverse and forward, raise ``NO_DOUBLE_BACKWARD``."""

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(NO_DOUBLE_BACKWARD)

    @staticmethod
    def jvp(ctx, *_):
        raise RuntimeError(NO_DOUBLE_BACKWARD)


class PerTokenGradsFunction(_UnderivableFunction):
    """reduction='none''s backward, ``per_token_grads``: a Function so that torch.func can batch
    it (jacrev, per-sample gradients: more tokens of the same chunks, see ``_batched``). Its
    gradients are not differentiable (``DerivativesRefused``)."""

    @staticmethod
    def forward(input, weight, bias, target, grad_loss, options, rows, cols, wanted):
        return tuple(per_token_grads(input, weight, bias, target, grad_loss, options, rows, cols, wanted))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*(g for g in output if g is not None))

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, target, grad_loss, options, rows, cols, wanted):
        args = (input, weight, bias, target, grad_loss, options, rows, cols, wanted)
        return _batched(PerTokenGradsFunction.apply, info, in_dims, args, _parameter_grads(wanted))


def _per_token_backward(input, weight, bias, target, grad_loss, options, rows, cols, wanted):
    """``PerTokenGradsFunction``, or under ``is_grads_batched``, whose older vmap reaches a
    backward without the Functions' vmap rules, the backward op, which it runs once per entry."""
    if not legacy_batched(grad_loss):
        return PerTokenGradsFunction.apply(input, weight, bias, target, grad_loss, options, rows, cols, wanted)
    wants = [name in wanted for name in _GRADIENT_NAMES]
    grads = linear_cross_entropy_backward_op(input, weight, bias, target, grad_loss, *options, rows, cols, *wants)
    return [g if want else None for g, want in zip(grads, wants, strict=True)]


class TokenTangentsFunction(_UnderivableFunction):
    """reduction='none''s forward-mode tangent, ``token_tangents``, returned alone in a tuple: a
    Function so that the kernels see plain tensors and torch.func can batch it (jacfwd vmaps the
    tangents, see ``_batched``). Its own derivatives raise."""

    @staticmethod
    def forward(input, weight, bias, target, input_tangent, weight_tangent, bias_tangent, options, rows, cols):
        tangents = (input_tangent, weight_tangent, bias_tangent)
        if legacy_batched(*(t for t in tangents if t is not None)):  # batched forward grads: once per entry
            return (linear_cross_entropy_tangent_op(input, weight, bias, target, *tangents, *options, rows, cols),)
        return (token_tangents(input, weight, bias, target, tangents, options, rows, cols),)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def vmap(info, in_dims, *args):
        return _batched(TokenTangentsFunction.apply, info, in_dims, args, False, parameter_tangents=(5, 6))


_GRADIENT_NAMES = ("input", "weight", "bias")


def _wanted(want_input, want_weight, want_bias):
    return tuple(name for name, want in zip(_GRADIENT_NAMES, (want_input, want_weight, want_bias), strict=True) if want)


def _or_empty(grads, like):
    return tuple(like.new_empty(0) if g is None else g for g in grads)


def _op_chunks(input, weight, chunk_size, vocab_chunk_size):
    vocab, hidden = weight.shape
    tokens = math.prod(input.shape[:-1])
    return chunk_shape(tokens, hidden, vocab, input.element_size(), input.device, chunk_size, vocab_chunk_size)


@torch.library.custom_op("fused_softmax::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    rows: Optional[int],
    cols: Optional[int],
    want_input: bool,
    want_weight: bool,
    want_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``forward_and_grads`` under torch.compile: (loss, input, weight and bias gradients, each
    empty where not wanted). ``rows`` and ``cols`` are chunk_size and vocab_chunk_size: the op
    sizes its chunks when it runs (``chunk_shape``), from the free memory then, not at tracing."""
    rows, cols = _op_chunks(input, weight, rows, cols)
    options = (ignore_index, label_smoothing, z_loss, softcap)
    wanted = _wanted(want_input, want_weight, want_bias)
    loss, *grads = forward_and_grads(input, weight, bias, target, options, reduction, rows, cols, wanted)
    return loss, *_or_empty(grads, input)


def _fake_grads(input, weight, bias, wants):
    return tuple(t.new_empty(t.shape if want else (0,)) for t, want in zip((input, weight, bias), wants, strict=True))


@linear_cross_entropy_op.register_fake
def _(input, weight, bias, target, ignore_index, reduction, label_smoothing, z_loss, softcap, rows, cols, *wants):
    loss = input.new_empty(target.shape if reduction == "none" else target.shape[:-1])
    precomputed = wants if reduction != "none" else (False,) * 3
    return loss, *_fake_grads(input, weight, input if bias is None else bias, precomputed)


@torch.library.custom_op("fused_softmax::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    grad_loss: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    rows: Optional[int],
    cols: Optional[int],
    want_input: bool,
    want_weight: bool,
    want_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``per_token_grads`` under torch.compile, each gradient empty where not wanted; chunks as
    the forward op's."""
    rows, cols = _op_chunks(input, weight, rows, cols)
    options = (ignore_index, label_smoothing, z_loss, softcap)
    wanted = _wanted(want_input, want_weight, want_bias)
    return _or_empty(per_token_grads(input, weight, bias, target, grad_loss, options, rows, cols, wanted), input)


@linear_cross_entropy_backward_op.register_fake
def _(input, weight, bias, target, grad_loss, ignore_index, label_smoothing, z_loss, softcap, rows, cols, *wants):
    return _fake_grads(input, weight, input if bias is None else bias, wants)


@torch.library.custom_op("fused_softmax::linear_cross_entropy_tangent", mutates_args=())
def linear_cross_entropy_tangent_op(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    target: torch.Tensor,
    input_tangent: Optional[torch.Tensor],
    weight_tangent: Optional[torch.Tensor],
    bias_tangent: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    rows: Optional[int],
    cols: Optional[int],
) -> torch.Tensor:
    """``token_tangents``, reduction='none''s forward-mode tangent, as an op: what the older vmap
    of ``gradcheck(check_batched_forward_grad=True)`` runs once per batch entry. Chunks as the
    forward op's."""
    rows, cols = _op_chunks(input, weight, rows, cols)
    options = (ignore_index, label_smoothing, z_loss, softcap)
    tangents = (input_tangent, weight_tangent, bias_tangent)
    return token_tangents(input, weight, bias, target, tangents, options, rows, cols)


@linear_cross_entropy_tangent_op.register_fake
def _(input, weight, bias, target, *_):
    return input.new_empty(target.shape, dtype=_launch.stats_dtype(input.dtype))


def _setup_op(ctx, inputs, output):
    input, weight, bias, target, ignore_index, reduction, label_smoothing, z_loss, softcap, rows, cols, *wants = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.reduction, ctx.wants = reduction, wants
    ctx.arguments = (ignore_index, label_smoothing, z_loss, softcap, rows, cols, *wants)
    if reduction == "none":
        ctx.save_for_backward(input, weight, bias, target)
    else:
        ctx.save_for_backward(target, *output[1:])


def _op_grad(ctx, grad_loss, *_):
    if ctx.reduction == "none":
        input, weight, bias, target = ctx.saved_tensors
        grads = linear_cross_entropy_backward_op(input, weight, bias, target, grad_loss, *ctx.arguments)
    else:
        target, *grads = ctx.saved_tensors
    grads = [g if want else None for g, want in zip(grads, ctx.wants, strict=True)]
    if ctx.reduction != "none":
        grads = _scaled_by_upstream(grads, grad_loss, target, ctx.arguments[0])
    return *grads, *(None,) * 11


def _op_vmap(info, in_dims, *args):
    """``_batched`` for the op, whose gradients not computed are empty rather than None: a call per
    batch entry when a weight or bias gradient is among them. The gradients wanted are those the
    caller saw wanted, or, seen here unwrapped, that the batched tensors require (the caller,
    under torch.compile, sees only the batched tensors' requires_grad)."""
    input, weight, bias, *_, reduction = args[:6]
    wants = [
        want or (t is not None and t.requires_grad) for t, want in zip((input, weight, bias), args[-3:], strict=True)
    ]
    args = (*args[:-3], *(want and torch.is_grad_enabled() for want in wants))
    present = (True, *(want and reduction != "none" for want in args[-3:]))

    def apply(*arguments):
        return tuple(o if keep else None for o, keep in zip(linear_cross_entropy_op(*arguments), present, strict=True))

    outputs, out_dims = _batched(apply, info, in_dims, args, any(present[-2:]))
    return tuple(args[0].new_empty(0) if o is None else o for o in outputs), out_dims


linear_cross_entropy_op.register_autograd(_op_grad, setup_context=_setup_op)
linear_cross_entropy_op.register_vmap(_op_vmap)


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
        if not (input.is_floating_point() and weight.is_floating_point()):  # meta kernels take integers
            raise TypeError(
                f"linear_cross_entropy: expected floating-point input and weight, got {input.dtype} and {weight.dtype}"
            )
        if target.dtype not in (torch.int64, torch.uint8) or target.shape != input.shape[:-1]:
            raise ValueError(
                f"linear_cross_entropy: expected class-index targets (int64) of shape {list(input.shape[:-1])}, "
                f"got {target.dtype} of shape {list(target.shape)}"
            )
    except (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError) as meta_error:
        _torch_composition(input, weight, target, bias, *options)
        if target.dtype != torch.uint8:  # torch's meta kernel refuses uint8 targets its real one takes
            raise meta_error


@unscriptable
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
    vocab_chunk_size=None,
):
    """``F.cross_entropy(F.linear(input, weight, bias), target, ...)`` without the full logits.

    ``input`` [..., H], ``weight`` [V, H] as in ``nn.Linear``, ``bias`` [V] or None, ``target``
    [...] class indices. Options as in ``fused_softmax.cross_entropy``. ``chunk_size``: tokens
    per chunk, ``vocab_chunk_size``: classes per chunk (defaults: see ``chunk_shape``). The
    result has the loss's usual shape and input's dtype. First derivatives, in either mode and
    under every torch.func transform (per-example weights excepted); a second derivative raises
    (see ``LinearCrossEntropyFunction``). Under torch.compile it is the custom op
    ``fused_softmax::linear_cross_entropy``.
    """
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, not {softcap}")
    _check_like_torch(input, weight, target, bias, ignore_index, reduction, label_smoothing)
    flat_input = input.reshape(-1, input.shape[-1])
    flat_target = target.reshape(-1).long()
    options = (
        ignore_index,
        applied_smoothing(label_smoothing),
        float(z_loss),
        None if softcap is None else float(softcap),
    )
    if torch.compiler.is_compiling():  # the op sizes its chunks when it runs
        wants = [t is not None and t.requires_grad and torch.is_grad_enabled() for t in (input, weight, bias)]
        chunks = _positive_or_none("chunk_size", chunk_size), _positive_or_none("vocab_chunk_size", vocab_chunk_size)
        loss = linear_cross_entropy_op(
            flat_input, weight, bias, flat_target, *options[:1], reduction, *options[1:], *chunks, *wants
        )[0]
    else:  # gradients for reverse mode, and for forward mode: a mean's tangent is their dot
        rows, cols = _op_chunks(flat_input, weight, chunk_size, vocab_chunk_size)
        wanted = _wanted(*(t is not None and _wants_gradient(t) for t in (input, weight, bias)))
        loss = LinearCrossEntropyFunction.apply(
            flat_input, weight, bias, flat_target, options, reduction, rows, cols, wanted
        )[0]
    return loss.view(target.shape) if reduction == "none" else loss
