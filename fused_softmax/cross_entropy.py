"""``cross_entropy``, a drop-in for torch.nn.functional's, and ``CrossEntropyLoss``, for nn's.

Read top to bottom: the eager PyTorch path, the kernels' path (the checks that give torch's
errors, the reduction's factor), the custom op torch.compile sees, the autograd Function, the
public function and module.

The forward kernel computes each row's loss and, when the logits need a gradient, writes it in
the same pass: the gradient of the reduced loss. The backward scales it in place on the device
by the upstream gradient, leaving the rows whose factor is exactly 1 untouched (all of them after
``loss.backward()`` on a mean or sum), without reading anything back to the host. The Function
keeps the caller's logits (a reference, not a copy) for a double backward, whose second
derivatives come from torch ops, and for a second backward through a retained graph, which
recomputes the gradient; ``inplace_backward=True`` writes the gradient over the logits instead
and keeps nothing but it (neither then). Under torch.func, vmap is one launch whose batch entries
keep their own reductions, and the forward-mode tangent is the gradient's dot with the logits'.
"""

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch._C import _functorch
from torch.nn import _reduction
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _launch
from ._backend import is_kernel_dtype, selected_backend, use_kernels
from ._runtime import Unscriptable, unscriptable
from ._transforms import batch_first, bound_quickly, needs_autograd

# Captured at import, before any patch() can replace it: the eager path.
_TORCH_CROSS_ENTROPY = F.cross_entropy
REDUCTIONS = ("none", "mean", "sum")


def _class_dim(input, batch_dims=0):
    """The class dim of ``input``, whose first ``batch_dims`` dims are vmap's batch (see
    ``kernel_cross_entropy``)."""
    return batch_dims + (1 if input.dim() - batch_dims >= 2 else 0)


def _capped(input, softcap):
    return input if softcap is None else softcap * torch.tanh(input / softcap)


def _index_denominator(target, weight, ignore_index, dim=None):
    """A mean's divisor for class-index targets, as torch's: Σ w_t over the targets not ignored
    (their count without weights), summed over ``dim`` (all dims by default). No device
    synchronisation (no boolean indexing), and no out-of-bounds read for a target outside the
    classes (its loss is NaN anyway)."""
    counted = target != ignore_index
    if weight is None:
        return counted.sum(dim)
    target_weight = weight[target.long().clamp(0, weight.numel() - 1)]
    return torch.where(counted, target_weight, 0.0).sum(dim)


def torch_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
    """Eager PyTorch, differentiable: ``F.cross_entropy`` itself (bit-identical to torch) on the
    capped logits, plus z·lse² per row (ignored rows excepted), reduced as torch reduces."""
    input = _capped(input, softcap)
    if not z_loss:
        return _TORCH_CROSS_ENTROPY(
            input, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
        )
    losses = _TORCH_CROSS_ENTROPY(
        input, target, weight, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    z = z_loss * torch.logsumexp(input, _class_dim(input)) ** 2
    probabilities = target.is_floating_point()
    losses = losses + (z if probabilities else torch.where(target != ignore_index, z, 0.0))
    if reduction == "none":
        return losses
    if reduction == "sum" or probabilities:
        return losses.sum() if reduction == "sum" else losses.mean()
    return losses.sum() / _index_denominator(target, weight, ignore_index)


def applied_smoothing(label_smoothing):
    """The label smoothing torch applies: ``label_smoothing`` where it is above 0, else none (a
    negative or NaN one smooths nothing, as torch's); one above 1 is kept, for torch's error."""
    return float(label_smoothing) if label_smoothing > 0 else 0.0


def _unserved_reason(input, target, weight, ignore_index, reduction, label_smoothing):
    """Why the kernels do not serve this call (None when they do): torch rejects it, or it is a
    form torch accepts that the kernels leave to torch (another target or weight dtype, class
    weights to differentiate: torch's gradient for probability targets, its error for indices)."""
    if not is_kernel_dtype(input.dtype) or input.dim() == 0:
        return f"input of dtype {input.dtype} and {input.dim()} dims"
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        return "class weights that require a gradient"
    if reduction not in REDUCTIONS or label_smoothing > 1.0:  # a negative one is 0 by now (applied_smoothing)
        return f"reduction={reduction!r}, label_smoothing={label_smoothing}"
    classes = input.shape[_class_dim(input)]
    if classes == 0 or target.device != input.device:
        return f"{classes} classes, target on {target.device}"
    if weight is not None and (
        weight.shape != (classes,) or weight.dtype != input.dtype or weight.device != input.device
    ):
        return f"weight of shape {tuple(weight.shape)} and dtype {weight.dtype}"
    if target.is_floating_point():
        if target.shape != input.shape or target.dtype != input.dtype or ignore_index >= 0:
            return f"probability targets of shape {tuple(target.shape)}, dtype {target.dtype}"
        return None
    rows = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else ()
    if target.dtype not in (torch.int64, torch.uint8) or target.shape != rows:
        return f"class-index targets of shape {tuple(target.shape)}, dtype {target.dtype}"
    return None


def _check_targets(target, classes, ignore_index):
    """A class index outside [0, C) raises IndexError, as torch's. Only where the check needs no
    device synchronisation (CPU, under the interpreter); on CUDA the kernel makes that row's loss
    and gradient NaN instead, and never reads out of bounds."""
    if target.device.type != "cpu":
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bad.any():
        raise IndexError(f"Target {target[bad][0].item()} is out of bounds.")


def _fixed_grad_scales(input, target, reduction, entries, classes):
    """The factor each batch entry's gradient is written with where no kernel computes it, [entries]
    (or one for all) in the compute dtype: 1 / its rows for probability targets' mean, else 1."""
    dtype = _launch.stats_dtype(input.dtype)
    if reduction != "mean":
        return torch.ones(1, dtype=dtype, device=input.device)
    rows = target.numel() // max(entries * classes, 1)
    return torch.full((entries,), 1.0 / rows if rows else math.inf, dtype=dtype, device=input.device)


def kernel_cross_entropy(
    input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, store_grad, inplace, batch_dims=0
):
    """(loss reduced as ``reduction`` says, in input's dtype; the logits' gradient of that loss, or
    None without ``store_grad``) on the kernels. ``target`` is checked (see ``_unserved_reason``).

    The first ``batch_dims`` dims of ``input`` and ``target`` are a batch of independent calls
    (vmap's): each entry keeps its own reduction and mean divisor, and the kernel sees them all as
    rows of one launch, the classes along ``_class_dim``. A mean or sum is one more launch, and a
    mean over class-index targets one before the forward, for its factor 1 / Σ w_t."""
    dim = _class_dim(input, batch_dims)
    batch = input.shape[:batch_dims]
    entries = math.prod(batch)
    classes = input.shape[dim]
    probabilities = target.is_floating_point()
    if not probabilities:
        target = (target if target.dim() == 1 else target.reshape(-1)).long()
        _check_targets(target, classes, ignore_index)
    mean_scales = None  # 1 / each entry's mean divisor, for the loss and the gradient
    if reduction == "mean" and not probabilities:
        dtype = _launch.stats_dtype(input.dtype)
        mean_scales = _launch.mean_grad_scales(target, weight, entries, ignore_index, classes, dtype)
    grad = grad_scale = None
    if store_grad:
        grad = input if inplace else _launch.empty(input.shape, input.dtype, input.device)
        grad_scale = mean_scales
        if grad_scale is None:
            grad_scale = _fixed_grad_scales(input, target, reduction, entries, classes)
    losses = _launch.cross_entropy_forward(
        input,
        target,
        weight,
        ignore_index=ignore_index,
        smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        grad=grad,
        grad_scale=grad_scale,
        probabilities=probabilities,
        dim=dim,
    )
    if reduction == "none":
        return losses.to(input.dtype), grad
    divisor = "" if reduction == "sum" else "rows" if probabilities else "scale"
    return _launch.reduced_losses(losses, batch, divisor, input.dtype, mean_scales), grad


def _is_one(grad_loss):
    """Whether the upstream gradient is the scalar 1, or 1 broadcast (``loss.sum().backward()``).
    Reading it synchronises with a GPU (``CrossEntropyFunction`` leaves that decision to the
    device: ``_launch.scale_cross_entropy_grad``)."""
    broadcast = grad_loss.numel() > 0 and all(s == 0 for s in grad_loss.stride())
    return broadcast and bool(grad_loss[(0,) * grad_loss.dim()] == 1)


def _row_factors(grad_loss, reduction, rows_dims, batch_dims):
    """The upstream gradient with one dim per row dim (of ``rows_dims``): per row for
    reduction='none', else one value per batch entry, broadcast over its rows."""
    if reduction == "none":
        return grad_loss
    return grad_loss.reshape(grad_loss.shape + (1,) * (rows_dims - batch_dims))


def _times_upstream(grad, grad_loss, reduction, batch_dims, target, ignore_index):
    """The logits' gradient ``grad`` of the loss times its upstream gradient, in torch ops; 0 on
    rows whose class-index target is ignored, whatever the upstream (NaN, inf), as torch's."""
    dim = _class_dim(grad, batch_dims)
    scaled = grad * _row_factors(grad_loss, reduction, grad.dim() - 1, batch_dims).unsqueeze(dim)
    if target.is_floating_point():
        return scaled
    return torch.where((target == ignore_index).unsqueeze(dim), 0.0, scaled)


def _device_scalable(*tensors):
    """Whether the kernels can scale a gradient by these tensors: plain tensors, not ones that
    torch.func or ``is_grads_batched`` wrap."""
    for t in tensors:  # a loop, not any() over a generator: a small call's host time is the product
        if _functorch.is_functorch_wrapped_tensor(t) or _functorch.is_legacy_batchedtensor(t):
            return False
    return True


def _batched(apply, info, in_dims, input, target, weight, *options, batch_dims):
    """A vmap rule's (output, out_dims) for ``apply`` (the Function's or the op's): the batch
    becomes one more leading batch dim of the logits and targets, so a vmapped call is one launch
    whose entries keep their own reductions. An unbatched input or target is expanded, a view."""
    if in_dims[2] is not None:
        raise NotImplementedError(
            "cross_entropy under vmap: the class weights must be the same for every batch entry (one launch "
            "reads one weight vector); vmap over the logits and targets only"
        )
    input, target = batch_first(info, in_dims[:2], input, target)
    loss, grad = apply(input, target, weight, *options, batch_dims + 1)
    return (loss, grad), (0, None if grad is None or grad.shape != input.shape else 0)


@torch.library.custom_op("fused_softmax::cross_entropy", mutates_args=())
def cross_entropy_op(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    store_grad: bool,
    batch_dims: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, the logits' gradient of it, empty without ``store_grad``): the kernel under
    torch.compile, which cannot alias the logits (``inplace_backward`` is not offered there).
    ``batch_dims``: leading dims of vmap's batch (see ``kernel_cross_entropy``)."""
    loss, grad = kernel_cross_entropy(
        input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, store_grad, False, batch_dims
    )
    return loss, grad if grad is not None else input.new_empty(0)


@cross_entropy_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, store_grad, batch_dims=0):
    dim = _class_dim(input, batch_dims)
    rows = input.shape[:dim] + input.shape[dim + 1 :]
    loss = input.new_empty(rows if reduction == "none" else input.shape[:batch_dims])
    return loss, input.new_empty(input.shape if store_grad else (0,))


def _setup_op(ctx, inputs, output):
    """Saves the forward's gradient and the targets, and the logits only where the targets need
    a gradient: a compiled loss keeps no more than its gradient, as it kept before (a double
    backward then raises, naming the eager call that has one)."""
    input, target, weight, *options = inputs
    ctx.options, ctx.batch_dims = tuple(options[:5]), options[6] if len(options) > 6 else 0
    ctx.logits_gone = _COMPILED_KEEPS_NO_LOGITS
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], input if ctx.needs_input_grad[1] else None, target, weight)


_COMPILED_KEEPS_NO_LOGITS = (
    "cross_entropy under torch.compile keeps no logits, only its gradient, unless probability targets need "
    "a gradient: it has no double backward; call it eagerly (outside the compiled region) for one"
)
_INPLACE_KEEPS_NO_LOGITS = (
    "cross_entropy(inplace_backward=True) wrote its gradient over the logits: it has no "
    "double backward, nor a gradient for probability targets"
)


def _op_grad(ctx, grad_loss, _):
    grad, input, target, weight = ctx.saved_tensors
    ignore_index, reduction = ctx.options[:2]

    def input_grad():
        return _times_upstream(grad, grad_loss, reduction, ctx.batch_dims, target, ignore_index)

    return *_backward_grads(ctx, input, target, weight, grad_loss, input_grad), *(None,) * 8


def _op_vmap(info, in_dims, input, target, weight, *options):
    """``_batched`` for the op. Under torch.compile the caller sees only the batched logits'
    requires_grad, so the gradient is also stored where the logits, seen here unwrapped, require
    one (else the backward would get an empty gradient)."""
    *options, store_grad, batch_dims = options if len(options) == 7 else (*options, 0)
    store_grad = store_grad or (input.requires_grad and torch.is_grad_enabled())
    return _batched(cross_entropy_op, info, in_dims, input, target, weight, *options, store_grad, batch_dims=batch_dims)


cross_entropy_op.register_autograd(_op_grad, setup_context=_setup_op)
cross_entropy_op.register_vmap(_op_vmap)


def _probability_tangent(input, target_tangent, weight, label_smoothing, softcap, class_dim, dims, divisor):
    """The loss's tangent along probability targets' tangent: Σ -(1 - ε)·w·log softmax(x')·t,
    the loss being linear in the targets."""
    terms = torch.log_softmax(_capped(input, softcap), class_dim) * target_tangent * -(1.0 - label_smoothing)
    if weight is not None:
        terms = terms * weight.reshape((-1,) + (1,) * (input.dim() - 1 - class_dim))
    return terms.sum(dims) / divisor


@bound_quickly
class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy on the kernels, returning (loss, the logits' gradient of it or None); the
    gradient is an output, not differentiable, so that the forward stays free of ``ctx``.

    ``store_grad``: write the gradient (when the logits need one); ``inplace``: write it over the
    logits; ``batch_dims``: vmap's leading batch dims. The first backward scales the gradient by
    the upstream gradient in place on the device, touching no row whose factor is 1 and reading
    nothing back on the host; a later one (``retain_graph=True``) recomputes it from the saved
    logits first. Second derivatives, and the gradient of probability targets, come from torch
    ops on the saved logits; the forward-mode tangent is the gradient's dot with the logits'
    tangent; vmap is one launch (see ``_batched``)."""

    @staticmethod
    def forward(
        input,
        target,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        store_grad,
        inplace,
        batch_dims=0,
    ):
        return kernel_cross_entropy(
            input,
            target,
            weight,
            ignore_index,
            reduction,
            label_smoothing,
            z_loss,
            softcap,
            store_grad,
            inplace,
            batch_dims,
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, _, inplace, *batch = inputs
        loss, grad = output
        if grad is not None:
            ctx.mark_non_differentiable(grad)
        ctx.options = (ignore_index, reduction, label_smoothing, z_loss, softcap)
        ctx.batch_dims = batch[0] if batch else 0
        ctx.inplace, ctx.grad_scaled, ctx.logits_gone = inplace, False, _INPLACE_KEEPS_NO_LOGITS
        saved = (grad, None if inplace else input, target, weight)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def backward(ctx, grad_loss, _):
        grad, input, target, weight = ctx.saved_tensors

        def input_grad():
            return CrossEntropyFunction._input_grad(ctx, grad, input, target, weight, grad_loss)

        return *_backward_grads(ctx, input, target, weight, grad_loss, input_grad), *(None,) * 9

    @staticmethod
    def _input_grad(ctx, grad, input, target, weight, grad_loss):
        """The saved gradient times ``grad_loss``: scaled in place on the device the first time
        (the buffer is this Function's, or the logits the caller gave up), out of place in torch
        ops under torch.func or ``is_grads_batched``. After the first time the buffer holds that
        backward's result (autograd may have made it a leaf's .grad): recompute it first."""
        reduction, batch_dims = ctx.options[1], ctx.batch_dims
        if ctx.grad_scaled:
            if input is None:
                raise RuntimeError(
                    "cross_entropy(inplace_backward=True) wrote its gradient over the logits and scaled it in "
                    "the first backward: a second backward through the graph has nothing to start from"
                )
            grad = kernel_cross_entropy(input, target, weight, *ctx.options, True, False, batch_dims)[1]
        ignore_index = ctx.options[0]
        if not _device_scalable(grad, grad_loss):
            return _times_upstream(grad, grad_loss, reduction, batch_dims, target, ignore_index)
        ctx.grad_scaled = True
        dim = _class_dim(grad, batch_dims)
        factors = grad_loss
        if grad_loss.dim():  # one value per row
            factors = _row_factors(grad_loss, reduction, grad.dim() - 1, batch_dims)
            factors = factors.expand(grad.shape[:dim] + grad.shape[dim + 1 :])
        indices = None if target.is_floating_point() else target
        return _launch.scale_cross_entropy_grad(grad, factors, dim, indices, ignore_index)

    @staticmethod
    def jvp(ctx, input_tangent, target_tangent, *_):
        grad, input, target, weight = ctx.saved_tensors
        _, reduction, label_smoothing, _, softcap = ctx.options
        dim = _class_dim(grad, ctx.batch_dims)
        dims = (dim,) if reduction == "none" else tuple(range(ctx.batch_dims, grad.dim()))
        tangent = 0
        if input_tangent is not None:
            tangent = (grad * input_tangent).sum(dims)
        if target_tangent is not None:
            if input is None:
                raise RuntimeError("cross_entropy(inplace_backward=True) keeps no logits for a targets' tangent")
            divisor = target.numel() // max(grad.shape[dim] * math.prod(target.shape[: ctx.batch_dims]), 1)
            divisor = divisor if reduction == "mean" else 1
            tangent = tangent + _probability_tangent(
                input, target_tangent, weight, label_smoothing, softcap, dim, dims, divisor
            )
        return tangent, None

    @staticmethod
    def vmap(info, in_dims, input, target, weight, *options):
        *options, store_grad, inplace, batch_dims = options if len(options) == 8 else (*options, 0)
        apply = functools.partial(_apply_not_inplace, store_grad=store_grad)
        return _batched(apply, info, in_dims, input, target, weight, *options, batch_dims=batch_dims)


def _apply_not_inplace(input, target, weight, *options, store_grad):
    """CrossEntropyFunction.apply without ``inplace``: a vmapped batch's logits may be an
    expanded view."""
    *options, batch_dims = options
    return CrossEntropyFunction.apply(input, target, weight, *options, store_grad, False, batch_dims)


def _backward_grads(ctx, input, target, weight, grad_loss, input_grad):
    """(the logits' gradient, the probability targets' or None) of the Function's and the op's
    backward: the kernel's for the logits (``input_grad()``), torch ops on the saved logits
    (``_torch_grads``) for the targets and under a double backward, which differentiates the
    kernel's value through torch's derivative."""
    need_input, need_target = ctx.needs_input_grad[:2]
    grad_input = input_grad() if need_input else None
    grad_target = None
    if need_target or (need_input and torch.is_grad_enabled()):
        if input is None:
            raise RuntimeError(ctx.logits_gone)
        torch_grad, grad_target = _torch_grads(ctx, input, target, weight, grad_loss, need_target)
        if need_input and torch.is_grad_enabled():
            # The older vmap of is_grads_batched cannot batch detach: torch's value there.
            legacy = _functorch.is_legacy_batchedtensor(grad_loss)
            grad_input = torch_grad if legacy else torch_grad + (grad_input - torch_grad).detach()
    return grad_input, grad_target


def _torch_grads(ctx, input, target, weight, grad_loss, need_target):
    """(the logits' gradient, the probability targets' gradient or None) in torch ops, by
    torch.func's vjp: differentiable by every outer transform and by autograd, whether or not
    the saved tensors require grad at this level."""

    def loss(x, *t):
        return _batched_torch_cross_entropy(x, t[0] if t else target, weight, ctx.options, ctx.batch_dims)

    _, vjp = torch.func.vjp(loss, input, *((target,) if need_target else ()))
    grads = vjp(grad_loss)
    return grads[0], grads[1] if need_target else None


def _batched_torch_cross_entropy(input, target, weight, options, batch_dims):
    """``torch_cross_entropy`` of each batch entry (the first ``batch_dims`` dims): torch's vmap."""

    def loss(x, t):
        return torch_cross_entropy(x, t, weight, *options)

    for _ in range(batch_dims):
        loss = torch.func.vmap(loss)
    return loss(input, target)


def _wants_gradient(input):
    """Whether the forward should write the logits' gradient: reverse mode will ask for it, a
    forward-mode level is open (the tangent is its dot with the logits'), or a torch.func grad
    transform wraps the logits. vmap alone does not."""
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    while _functorch.is_functorch_wrapped_tensor(input):
        if not _functorch.is_batchedtensor(input):
            return True  # a grad or jvp level (or functionalize, which is left to decide below it)
        input = _functorch.get_unwrapped(input)
    return input.requires_grad and torch.is_grad_enabled()


def _served_or_torch(reason, call):
    """A call the kernels do not serve: torch's own result or error, except that backend 'triton'
    never falls back silently."""
    result = call()  # torch raises its own error for the calls it rejects
    if selected_backend() == "triton":
        raise NotImplementedError(f"fused_softmax.cross_entropy's kernels do not serve {reason}; use backend 'torch'")
    return result


@unscriptable
def cross_entropy(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    label_smoothing=0.0,
    *,
    z_loss=0.0,
    softcap=None,
    inplace_backward=False,
):
    """Drop-in for ``torch.nn.functional.cross_entropy``: same signature, results and errors, for
    class-index and class-probability targets, [C], [N, C] and [N, C, d1, ...] inputs (classes
    read through their stride, no transpose copy), weights, ignore_index, every reduction, label
    smoothing and the legacy size_average / reduce.

    Extras, off by default: ``z_loss`` adds z_loss · lse² to each row's loss (PaLM's auxiliary
    loss; ignored rows excepted), reduced with the rest; ``softcap`` replaces the logits by
    softcap · tanh(logits / softcap) first (Gemma 2). ``inplace_backward=True`` lets the kernels
    write the gradient over the logits (contiguous ones), for callers that no longer need them.
    """
    if has_torch_function_variadic(input, target, weight):
        return handle_torch_function(
            cross_entropy,
            (input, target, weight),
            input,
            target,
            weight=weight,
            size_average=size_average,
            ignore_index=ignore_index,
            reduce=reduce,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            inplace_backward=inplace_backward,
        )
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, not {softcap}")
    label_smoothing = applied_smoothing(label_smoothing)
    options = (ignore_index, reduction, label_smoothing, float(z_loss), None if softcap is None else float(softcap))
    if not use_kernels(input, input.dtype):
        return torch_cross_entropy(input, target, weight, *options)
    reason = _unserved_reason(input, target, weight, ignore_index, reduction, label_smoothing)
    if reason is not None:
        return _served_or_torch(reason, lambda: torch_cross_entropy(input, target, weight, *options))
    if torch.compiler.is_compiling():
        store_grad = input.requires_grad and torch.is_grad_enabled()
        return cross_entropy_op(input, target, weight, *options, store_grad)[0]
    if not needs_autograd(input, target, weight):
        return kernel_cross_entropy(input, target, weight, *options, False, False)[0]
    store_grad = _wants_gradient(input)
    inplace = inplace_backward and input.is_contiguous() and _device_scalable(input)
    if inplace and store_grad:
        torch.autograd.graph.increment_version(input)  # any other saved use of the logits now raises
    return CrossEntropyFunction.apply(input, target, weight, *options, store_grad, inplace, 0)[0]


class CrossEntropyLoss(Unscriptable, torch.nn.CrossEntropyLoss):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` running ``fused_softmax.cross_entropy`` (a
    subclass: isinstance, repr and state dicts carry over). ``z_loss``, ``softcap`` and
    ``inplace_backward`` as in ``cross_entropy``."""

    def __init__(self, *args, z_loss=0.0, softcap=None, inplace_backward=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.z_loss, self.softcap, self.inplace_backward = z_loss, softcap, inplace_backward

    def forward(self, input, target):
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=getattr(self, "z_loss", 0.0),
            softcap=getattr(self, "softcap", None),
            inplace_backward=getattr(self, "inplace_backward", False),
        )
