"""The autograd Functions under autograd and torch.func, cheaply.

vmap: the vmapped dim becomes one more outer dim of the same launch, so a vmapped call
(per-sample gradients, jacrev, jacfwd) costs one kernel launch, not a loop.

``torch.autograd.grad(..., is_grads_batched=True)`` batches with torch's older vmap instead,
whose tensors reach a backward without storage and without the rules above; it runs a custom
op once per batch entry, so there the backward goes through one (``legacy_batched``).
"""

import inspect

import torch


def batch_first(info, in_dims, *tensors):
    """Each tensor with its vmapped dim moved to the front; one that is not vmapped (in_dim None)
    is expanded along a new front dim, a view. None stays None."""
    return [
        t if t is None else t.movedim(d, 0) if d is not None else t.expand(info.batch_size, *t.shape)
        for t, d in zip(tensors, in_dims, strict=False)
    ]


def vmapped(apply, info, in_dims, tensors, dim, *rest):
    """A vmap rule's (output, out_dims) for ``apply(*tensors, dim, *rest)``, whose tensors share
    one shape and ``dim`` is a dim of them (negative too): one call over the whole batch."""
    tensors = batch_first(info, in_dims, *tensors)
    ndim = tensors[0].dim() - 1
    if ndim == 0:  # a 0-d tensor's softmax is over itself alone: rows of one element
        return apply(*(t.unsqueeze(1) for t in tensors), 1, *rest).squeeze(1), 0
    return apply(*tensors, dim % ndim + 1, *rest), 0


def batched_scores(info, in_dims, *tensors):
    """(``tensors``, shaped like the scores, batch first, with at least one dim after the batch;
    whether they were 0-d, each a softmax over one key, now a row of one)."""
    tensors = batch_first(info, in_dims, *tensors)
    point = tensors[0].dim() == 1
    return [t.unsqueeze(1) for t in tensors] if point else tensors, point


def broadcast_batched(t, in_dim, ndim):
    """An operand that broadcasts to (each example's) scores of ``ndim`` dims, such as a mask:
    vmapped, its batch first with unit dims after it, so that it still broadcasts to the batched
    scores; unbatched (in_dim None), as it is."""
    if t is None or in_dim is None:
        return t
    t = t.movedim(in_dim, 0)
    return t.reshape(t.shape[:1] + (1,) * (ndim + 1 - t.dim()) + t.shape[1:])


def per_head_batched(sinks, in_dim, heads):
    """Sinks, one logit per head [H], for batched scores whose dims before [Lq, Lk] are ``heads``
    [B, ..., H]: vmapped, one per (batch entry, ..., head), flattened, since the kernels give row
    i the sink (i // Lq) % sinks.numel(); unbatched, as they are."""
    if in_dim is None:
        return sinks
    sinks = sinks.movedim(in_dim, 0)
    return sinks.reshape(sinks.shape[:1] + (1,) * (len(heads) - 2) + sinks.shape[1:]).expand(heads).reshape(-1)


def vmapped_masked_softmax(apply, info, in_dims, scores, mask, scale, causal_offset, dtype):
    """A vmap rule's (output, out_dims) for masked_softmax's ``apply``: the batch is one more
    leading dim of the scores and of a vmapped mask (see ``broadcast_batched``). One call."""
    (scores,), point = batched_scores(info, in_dims[:1], scores)
    y = apply(scores, broadcast_batched(mask, in_dims[1], scores.dim() - 1), scale, causal_offset, dtype)
    return y.squeeze(1) if point else y, 0


def refuse_nested_forward_mode(name, nesting="forward-mode AD over forward-mode AD (jacfwd(jacfwd(f)), jvp of jvp)"):
    """Raise, called from a jvp that computes in torch ops, when more forward-mode levels than
    the one being computed are open: torch runs a jvp with forward AD off, so those ops would
    drop the outer levels' tangents and the result would be silently wrong. ``nesting`` says
    what the caller was asked (a Function whose jvp is itself a Function's sees one level fewer)."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    levels = [i.key() for i in retrieve_all_functorch_interpreters()]
    if levels.count(torch._C._functorch.TransformType.Jvp) > 1:
        raise NotImplementedError(
            f"{name} on the kernels does not support {nesting}: use reverse mode for one of them, e.g. "
            "torch.func.hessian (jacfwd(jacrev(f))), or the 'torch' backend"
        )


class DerivativesRefused(torch.autograd.Function):
    """``DerivativesRefused.apply(message, *tensors)``: views of ``tensors``, whose derivatives, in
    either mode, raise RuntimeError(message) instead of finding them constant: for gradients or
    tangents computed without a graph (by kernels, or past a last supported order). Pass the
    tensors they depend on too, so that the refusal is in their graph."""

    generate_vmap_rule = True

    @staticmethod
    def forward(message, *tensors):
        return tuple(None if t is None else t.view_as(t) for t in tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)

    @staticmethod
    def jvp(ctx, *_):
        raise RuntimeError(ctx.message)


# torch's C queries, bound once: a small call's host time is the product, and each attribute
# lookup through torch._C._functorch costs it.
_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_transforms_active = torch._C._are_functorch_transforms_active
_forward_ad = torch.autograd.forward_ad  # its _current_level changes: read at each call


def legacy_batched(*tensors):
    """Whether any tensor is batched by the older vmap of ``is_grads_batched``."""
    for t in tensors:  # a loop, not any(map()): cheaper for the one or two tensors of a call
        if _is_legacy_batched(t):
            return True
    return False


def needs_autograd(*tensors):
    """Whether a call on ``tensors`` must go through its autograd Function: a gradient will be
    asked for, a forward-mode level is open, or torch.func is transforming them. Otherwise the
    kernels run directly, without the Function's host time."""
    if _forward_ad._current_level >= 0:
        return True
    grad = torch.is_grad_enabled()
    for t in tensors:  # a loop, not any(): a small call's host time is the product here
        if t is not None and ((grad and t.requires_grad) or _is_functorch_wrapped(t)):
            return True
    return False


def save_for_jvp(ctx, *tensors):
    """``ctx.save_for_forward(*tensors)`` where a jvp can follow this forward: a forward-mode
    level is open or torch.func is transforming. Elsewhere no jvp runs, and saving costs torch's
    apply a few µs a call."""
    if _forward_ad._current_level >= 0 or _transforms_active():
        ctx.save_for_forward(*tensors)


def bound_quickly(function):
    """``function`` (an autograd Function) applied without torch's per-call argument binding.

    torch's ``apply`` binds a setup_context Function's arguments through ``inspect.signature``
    at every call, and unwraps tensors that outlived a torch.func transform: tens of µs on a
    small call. When every argument is given, no transform is active and no argument is such a
    tensor, neither does anything, so the C apply it ends in is called directly. Otherwise (and
    under torch.compile) torch's apply runs, with the forward's signature computed once.
    ``function.apply_eagerly`` is the same for a caller that has checked it is not being
    compiled and passes every argument positionally (a small call's dispatch)."""
    forward = function.forward
    forward.__signature__ = inspect.signature(forward)
    arity = len(forward.__signature__.parameters)
    torch_apply = function.apply
    c_apply = super(torch.autograd.Function, function).apply

    def apply_eagerly(*args):
        if _transforms_active():
            return torch_apply(*args)
        for a in args:
            if isinstance(a, torch.Tensor) and _is_functorch_wrapped(a):
                return torch_apply(*args)
        return c_apply(*args)

    def apply(*args, **kwargs):
        if kwargs or len(args) != arity or torch.compiler.is_compiling():  # dynamo traces torch's apply
            return torch_apply(*args, **kwargs)
        return apply_eagerly(*args)

    function.apply, function.apply_eagerly = apply, apply_eagerly
    return function
