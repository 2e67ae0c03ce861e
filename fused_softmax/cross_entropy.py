"""``cross_entropy``, a drop-in for torch.nn.functional's, and ``CrossEntropyLoss``, for nn's.

Read top to bottom: the eager PyTorch path, the kernels' path (the checks that give torch's
errors, the reduction's factor), the custom op torch.compile sees, the autograd Function, the
public function and module.

The forward kernel computes each row's loss and, when the logits need a gradient, writes it in
the same pass: the gradient of the reduced loss, so a backward whose upstream gradient is the
scalar 1 (``loss.backward()`` after a mean or sum) returns it as it is, and any other upstream
gradient only scales it. The Function keeps the caller's logits (a reference, not a copy) for a
double backward, whose second derivatives come from torch ops; ``inplace_backward=True`` writes
the gradient over the logits instead and keeps nothing but it (no double backward then).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn import _reduction
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _launch
from ._backend import KERNEL_DTYPES, selected_backend, use_kernels

# Captured at import, before any patch() can replace it: the eager path.
_TORCH_CROSS_ENTROPY = F.cross_entropy
REDUCTIONS = ("none", "mean", "sum")


def _class_dim(input):
    return 1 if input.dim() >= 2 else 0


def _capped(input, softcap):
    return input if softcap is None else softcap * torch.tanh(input / softcap)


def _index_denominator(target, weight, ignore_index):
    """A mean's divisor for class-index targets, as torch's: Σ w_t over the targets not ignored
    (their count without weights). No device synchronisation (no boolean indexing), and no
    out-of-bounds read for a target outside the classes (its loss is NaN anyway)."""
    counted = target != ignore_index
    if weight is None:
        return counted.sum()
    target_weight = weight[target.long().clamp(0, weight.numel() - 1)]
    return torch.where(counted, target_weight, 0.0).sum()


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


def _unserved_reason(input, target, weight, ignore_index, reduction, label_smoothing):
    """Why the kernels do not serve this call (None when they do): torch rejects it, or it is a
    form torch accepts that the kernels leave to torch (another target or weight dtype)."""
    if input.dtype not in KERNEL_DTYPES or input.dim() == 0:
        return f"input of dtype {input.dtype} and {input.dim()} dims"
    if reduction not in REDUCTIONS or not 0.0 <= label_smoothing <= 1.0:
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


def _mean_divisor(x, target, weight, ignore_index, probabilities):
    """A mean's divisor, in the compute dtype: the rows for probability targets, else as torch's
    (``_index_denominator``)."""
    dtype = _launch.stats_dtype(x.dtype)
    if probabilities:
        return torch.full((), float(target.numel() // x.shape[1]), dtype=dtype, device=x.device)
    return _index_denominator(target, weight, ignore_index).to(dtype)


def kernel_cross_entropy(
    input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, store_grad, inplace
):
    """(loss reduced as ``reduction`` says, in input's dtype; the logits' gradient of that loss, or
    None without ``store_grad``) on the kernels. ``input`` has its classes along dim 1 (a [C]
    input is one row), ``target`` is checked (see ``_unserved_reason``)."""
    probabilities = target.is_floating_point()
    x = input if input.dim() >= 2 else input.unsqueeze(0)
    if probabilities:
        target = target.view(x.shape)
    else:
        target = target.reshape(-1).long()
        _check_targets(target, x.shape[1], ignore_index)
    divisor = _mean_divisor(x, target, weight, ignore_index, probabilities) if reduction == "mean" else None
    grad = grad_scale = None
    if store_grad:
        grad = x if inplace else _launch.empty(x.shape, x.dtype, x.device)
        if divisor is None:
            grad_scale = torch.ones(1, dtype=_launch.stats_dtype(x.dtype), device=x.device)
        else:
            grad_scale = divisor.reciprocal().reshape(1)
    losses = _launch.cross_entropy_forward(
        x,
        target,
        weight,
        ignore_index=ignore_index,
        smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        grad=grad,
        grad_scale=grad_scale,
        probabilities=probabilities,
    )
    if reduction == "none":
        loss = losses.reshape(input.shape[:1] + input.shape[2:] if input.dim() >= 2 else ())
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses.sum() / divisor
    return loss.to(input.dtype), None if grad is None else grad.view(input.shape)


def _is_one(grad_loss):
    """Whether the upstream gradient is the scalar 1, or 1 broadcast (``loss.sum().backward()``).
    Reading it synchronises with a GPU once per backward; scaling the gradient would read and
    write all of it."""
    broadcast = grad_loss.numel() > 0 and all(s == 0 for s in grad_loss.stride())
    return broadcast and bool(grad_loss[(0,) * grad_loss.dim()] == 1)


def scaled_grad(grad, grad_loss, input_dim, reduction, inplace):
    """The logits' gradient for the upstream ``grad_loss``: the forward's ``grad`` times it,
    broadcast along the class dim for reduction='none'."""
    if _is_one(grad_loss):
        return grad
    if reduction == "none" and input_dim >= 2:
        grad_loss = grad_loss.unsqueeze(1)
    return grad.mul_(grad_loss) if inplace else grad * grad_loss


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, the logits' gradient of it, empty without ``store_grad``): the kernel under
    torch.compile, which cannot alias the logits (``inplace_backward`` is not offered there)."""
    loss, grad = kernel_cross_entropy(
        input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, store_grad, False
    )
    return loss, grad if grad is not None else input.new_empty(0)


@cross_entropy_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, store_grad):
    rows = input.shape[:1] + input.shape[2:] if input.dim() >= 2 else ()
    loss = input.new_empty(rows if reduction == "none" else ())
    return loss, input.new_empty(input.shape if store_grad else (0,))


def _setup_op(ctx, inputs, output):
    input, *_, reduction, _, _, _, _ = inputs
    ctx.input_dim, ctx.reduction = input.dim(), reduction
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _op_grad(ctx, grad_loss, _):
    (grad,) = ctx.saved_tensors
    if ctx.reduction == "none" and ctx.input_dim >= 2:
        grad_loss = grad_loss.unsqueeze(1)
    return grad * grad_loss, None, None, None, None, None, None, None, None


cross_entropy_op.register_autograd(_op_grad, setup_context=_setup_op)


class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy on the kernels, returning (loss, the logits' gradient of it or None); the
    gradient is an output, not differentiable, so that the forward stays free of ``ctx``.

    ``store_grad``: write the gradient (when the logits need one); ``inplace``: write it over the
    logits. The backward scales it by the upstream gradient. Second derivatives, and the gradient
    of probability targets, come from torch ops on the saved logits."""

    @staticmethod
    def forward(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, store_grad, inplace):
        return kernel_cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, store_grad, inplace
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, _, inplace = inputs
        loss, grad = output
        if grad is not None:
            ctx.mark_non_differentiable(grad)
        ctx.options = (ignore_index, reduction, label_smoothing, z_loss, softcap)
        ctx.input_dim, ctx.inplace = input.dim(), inplace
        ctx.save_for_backward(grad, None if inplace else input, target, weight)

    @staticmethod
    def backward(ctx, grad_loss, _):
        grad, input, target, weight = ctx.saved_tensors
        reduction = ctx.options[1]
        need_input, need_target = ctx.needs_input_grad[:2]
        grad_input = grad_target = None
        if need_input:
            grad_input = scaled_grad(grad, grad_loss, ctx.input_dim, reduction, ctx.inplace)
        if need_target or (need_input and torch.is_grad_enabled()):
            if input is None:
                raise RuntimeError(
                    "cross_entropy(inplace_backward=True) wrote its gradient over the logits: it has no "
                    "double backward, nor a gradient for probability targets"
                )
            create_graph = torch.is_grad_enabled()
            wrt = [t for t, need in ((input, need_input), (target, need_target)) if need]
            with torch.enable_grad():
                loss = torch_cross_entropy(input, target, weight, *ctx.options)
                grads = list(torch.autograd.grad(loss, wrt, grad_loss, create_graph=create_graph))
            if need_input:
                torch_grad = grads.pop(0)
                if create_graph:  # the kernel's value, torch's derivative: a double backward differentiates this
                    grad_input = torch_grad + (grad_input - torch_grad).detach()
            if need_target:
                grad_target = grads.pop(0)
        return grad_input, grad_target, None, None, None, None, None, None, None, None


def _served_or_torch(reason, call):
    """A call the kernels do not serve: torch's own result or error, except that backend 'triton'
    never falls back silently."""
    result = call()  # torch raises its own error for the calls it rejects
    if selected_backend() == "triton":
        raise NotImplementedError(f"fused_softmax.cross_entropy's kernels do not serve {reason}; use backend 'torch'")
    return result


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
    options = (ignore_index, reduction, label_smoothing, float(z_loss), None if softcap is None else float(softcap))
    if not use_kernels(input, input.dtype):
        return torch_cross_entropy(input, target, weight, *options)
    reason = _unserved_reason(input, target, weight, ignore_index, reduction, label_smoothing)
    if reason is not None:
        return _served_or_torch(reason, lambda: torch_cross_entropy(input, target, weight, *options))
    store_grad = input.requires_grad and torch.is_grad_enabled()
    if torch.compiler.is_compiling():
        return cross_entropy_op(input, target, weight, *options, store_grad)[0]
    inplace = inplace_backward and input.is_contiguous()
    if inplace and store_grad:
        torch.autograd.graph.increment_version(input)  # any other saved use of the logits now raises
    return CrossEntropyFunction.apply(input, target, weight, *options, store_grad, inplace)[0]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
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
