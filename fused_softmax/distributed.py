"""Softmax, log_softmax and cross entropy over a dim sharded across processes (torch.distributed).

Each rank holds a contiguous shard of the dim, of any size (empty included). A row's softmax
needs from the other shards only their (max, Σ exp(x − max)): one all_gather of those packed
statistics gives every rank the row's log-sum-exp, exactly, and each rank then writes its own
slice. The backward needs one row sum, one all_reduce. Nothing as long as the sharded dim
crosses the wire, and each rank keeps only its shard. torch.distributed communicates (gloo,
NCCL, any backend); the local work runs on the fused kernels, or on eager PyTorch where the
backend says so (see ``use_backend``).

A submodule, imported explicitly: ``import fused_softmax.distributed``. Every function is a
collective, its backward too: call them on every rank of ``group``, in the same order.
"""

import dataclasses

import torch
import torch.distributed as dist

from . import _jacobian, _launch
from ._backend import use_kernels
from ._jacobian import backward_product, forward_product
from ._slices import combined_statistics, exponent_shift, log_sum_exp_parts, losses_from_statistics, probabilities
from ._transforms import DerivativesRefused, batch_first, legacy_batched, vmapped
from .cross_entropy import applied_smoothing
from .functional import _wrap_dim, product_tangent


def _row_stats(x, dim, kernels):
    """[..., 2]: each row's max and Σ exp(x − max) over this shard, 0 where the shard holds only
    −inf (or nothing): see ``_slices.log_sum_exp_parts``."""
    if kernels:
        return _launch.row_statistics(x, dim)
    x = x.to(_launch.stats_dtype(x.dtype))
    if x.shape[dim] == 0:
        rows = x.shape[:dim] + x.shape[dim + 1 :]
        return torch.stack([x.new_full(rows, float("-inf")), x.new_zeros(rows)], -1)
    row_max = x.amax(dim, keepdim=True)
    return torch.stack([row_max.squeeze(dim), torch.exp(x - exponent_shift(row_max)).sum(dim)], -1)


def _all_gather(t, group):
    """[world, *t.shape]: every rank's ``t``, in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def _batched_alike(info, group, like):
    """Under vmap the batch is more rows of every collective, so every rank must batch alike:
    the batch sizes are compared (one small all_gather) and every rank raises together where they
    differ (jacrev or jacfwd over uneven shards vmap over each rank's own elements), instead of
    collectives of mismatched sizes hanging or mixing rows."""
    sizes = _all_gather(torch.tensor([info.batch_size], device=like.device), group).flatten().tolist()
    if len(set(sizes)) > 1:
        raise RuntimeError(
            f"fused_softmax.distributed under vmap: the ranks batch {sizes} times; every rank must vmap "
            "alike (jacrev/jacfwd vmap over each rank's own elements: use shards of one size, or vjp/jvp)"
        )


def _normalise(x, dim, lse, log, out_dtype, kernels):
    """exp(x − lse), or x − lse for log, along ``dim``, in ``out_dtype``, from each row's
    log-sum-exp in two parts ``lse`` [..., 2] (``_slices.log_sum_exp_parts``): (x − M) − log Σ."""
    if kernels:
        return _launch.normalise_with_lse(x, dim, out_dtype, log, lse)
    row_max, log_sum = (part.unsqueeze(dim) for part in lse.unbind(-1))
    shifted = (x.to(lse.dtype) - row_max) - log_sum
    return (shifted if log else torch.exp(shifted)).to(out_dtype)


def _all_reduced(t, group):
    """A copy of ``t`` summed over the ranks. The older vmap of ``is_grads_batched`` and of
    gradcheck's batched checks has no rule for a collective: it raises, saying so, on every rank."""
    if legacy_batched(t):
        raise NotImplementedError(
            "fused_softmax.distributed: the older vmap of torch.autograd.grad(is_grads_batched=True) and of "
            "gradcheck's batched checks cannot batch a collective (a tangent's or a second derivative's); "
            "use torch.func.vmap"
        )
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


class _AllReduced(torch.autograd.Function):
    """The sum over the ranks of ``group``, every rank receiving it: linear, so its derivative in
    either mode is the same sum (every rank differentiates in step)."""

    @staticmethod
    def forward(t, group):
        return _all_reduced(t, group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return _AllReduced.apply(grad, ctx.group), None

    @staticmethod
    def jvp(ctx, tangent, _):
        return _AllReduced.apply(tangent, ctx.group)

    @staticmethod
    def vmap(info, in_dims, t, group):
        _batched_alike(info, group, t)
        (t,) = batch_first(info, in_dims[:1], t)
        return _AllReduced.apply(t, group), 0


def _global_sum(dim, group):
    """Row sums along a sharded ``dim``, over every shard, differentiable: the row sum of
    ``_jacobian``'s formulas for ``ShardedJacobianProductFunction``."""
    local = _jacobian.local_sum(dim)
    return lambda t: _AllReduced.apply(local(t), group)


def _sharded_product(y, v, dim, group, kind, kernels):
    """The product ``kind`` of v with softmax's Jacobian at y along a sharded ``dim``: this shard's
    row sums, one all_reduce, then this shard's slice."""
    if kernels:
        row_sums = _launch.backward_row_sums(y, v, dim, kind)
        dist.all_reduce(row_sums, group=group)
        return _launch.backward_with_row_sums(y, v, dim, y.dtype, kind, row_sums)
    return _jacobian.product(y, v, dim, kind, _global_sum(dim, group)).to(y.dtype)


class ShardedJacobianProductFunction(torch.autograd.Function):
    """The product ``kind`` (see ``_jacobian``) of v with softmax's Jacobian at y, along a dim
    sharded across ``group``, this rank's slice: the backward (v = dy) and forward-mode tangent
    (v = the input's) of ``ShardedSoftmaxFunction``, one all_reduce of the row sums. Its own
    derivatives are ``_jacobian``'s torch ops, their row sums all_reduced: double backward,
    hessians and the like, every rank in step."""

    @staticmethod
    def forward(y, v, dim, group, kind, kernels):
        return _sharded_product(y, v, dim, group, kind, kernels)

    @staticmethod
    def setup_context(ctx, inputs, output):
        y, v, dim, group, kind, kernels = inputs
        ctx.dim, ctx.group, ctx.kind, ctx.kernels = dim, group, kind, kernels
        ctx.save_for_backward(y, v)
        ctx.save_for_forward(y, v)

    @staticmethod
    def backward(ctx, grad):
        y, v = ctx.saved_tensors
        row_sum = _global_sum(ctx.dim, ctx.group)
        grad_y, grad_v = _jacobian.second_derivatives(y, v, grad, ctx.dim, ctx.kind, row_sum)
        return grad_y, grad_v, None, None, None, None

    @staticmethod
    def jvp(ctx, y_tangent, v_tangent, *_):
        y, v = ctx.saved_tensors

        def product(t):
            return ShardedJacobianProductFunction.apply(y, t, ctx.dim, ctx.group, ctx.kind, ctx.kernels)

        row_sum = _global_sum(ctx.dim, ctx.group)
        return product_tangent(product, y, v, y_tangent, v_tangent, ctx.dim, ctx.kind, row_sum=row_sum).to(y.dtype)

    @staticmethod
    def vmap(info, in_dims, y, v, dim, group, kind, kernels):
        _batched_alike(info, group, y)
        return vmapped(ShardedJacobianProductFunction.apply, info, in_dims, (y, v), dim, group, kind, kernels)


class ShardedSoftmaxFunction(torch.autograd.Function):
    """Softmax (or log-softmax, ``log``) of a dim sharded across ``group``, this rank's slice.

    Forward: one all_gather of the packed row stats; backward and forward-mode tangent: one
    all_reduce of the row sums (``ShardedJacobianProductFunction``, itself differentiable).
    Saves only y. The kernels or eager PyTorch are chosen once, in the forward. Under vmap the
    batch is more rows of the same collectives: every rank must vmap alike."""

    @staticmethod
    def forward(x, dim, group, log):
        kernels = use_kernels(x, x.dtype)
        stats = _all_gather(_row_stats(x, dim, kernels), group)
        return _normalise(x, dim, log_sum_exp_parts(stats[..., 0], stats[..., 1]), log, x.dtype, kernels)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, dim, group, log = inputs
        ctx.dim, ctx.group, ctx.log, ctx.kernels = dim, group, log, use_kernels(x, x.dtype)
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        kind = backward_product(ctx.log)
        return ShardedJacobianProductFunction.apply(y, dy, ctx.dim, ctx.group, kind, ctx.kernels), None, None, None

    @staticmethod
    def jvp(ctx, tangent, *_):
        (y,) = ctx.saved_tensors
        kind = forward_product(ctx.log)
        return ShardedJacobianProductFunction.apply(y, tangent, ctx.dim, ctx.group, kind, ctx.kernels)

    @staticmethod
    def vmap(info, in_dims, x, dim, group, log):
        _batched_alike(info, group, x)
        return vmapped(ShardedSoftmaxFunction.apply, info, in_dims, (x,), dim, group, log)


def softmax(x_local, dim=-1, group=None):
    """This rank's slice of the softmax over ``dim``, whose elements are sharded across ``group``.

    ``x_local`` is this rank's contiguous shard of ``dim`` (ranks in order; sizes may differ, and
    be 0); the other dims must match across ranks. ``group=None`` is the default group. The result
    has ``x_local``'s shape and dtype, and is differentiable in both modes, to any order.
    """
    return ShardedSoftmaxFunction.apply(x_local, _sharded_dim("softmax", x_local, dim), group, False)


def log_softmax(x_local, dim=-1, group=None):
    """This rank's slice of the log-softmax over a sharded ``dim``; see ``softmax``."""
    return ShardedSoftmaxFunction.apply(x_local, _sharded_dim("log_softmax", x_local, dim), group, True)


def _sharded_dim(name, x_local, dim):
    """``dim``, checked as torch checks it and made non-negative, for a floating-point shard with a
    dim to shard; torch's NotImplementedError for other dtypes (cast back, they would be zeros)."""
    if not x_local.is_floating_point():
        raise NotImplementedError(f'"{name}" not implemented for {x_local.dtype}')
    if x_local.dim() == 0:
        raise ValueError(f"fused_softmax.distributed.{name}: a 0-d tensor has no dim to shard")
    return _wrap_dim(name, dim, x_local.dim())


def _local_targets(target, vocab_start, width, ignore_index):
    """The rows whose target class lives in this shard, and those targets' indices in it."""
    local = target - vocab_start
    owned = (local >= 0) & (local < width) & (target != ignore_index)
    return owned, local[owned]


def _shard_statistics(logits, target, vocab_start, ignore_index, label_smoothing, kernels):
    """[N, 4] in the stats' dtype: each row's (max, Σ exp(x − max), the target's logit if this
    shard holds it else 0, Σ (x − max) with smoothing else 0) over this shard. On the kernels, one read of
    the logits (``vocab_slice_statistics_kernel``, on the cross-entropy kernel's steps)."""
    if kernels:
        options = dict(vocab_start=vocab_start, ignore_index=ignore_index, smoothing=label_smoothing)
        return _launch.vocab_slice_statistics(logits, target, **options)
    stats = _row_stats(logits, 1, kernels)
    owned, local_target = _local_targets(target, vocab_start, logits.shape[1], ignore_index)
    target_logit = stats.new_zeros(len(target))
    target_logit[owned] = logits[owned, local_target].to(stats.dtype)
    if label_smoothing:
        smooth_deviation = (logits.to(stats.dtype) - exponent_shift(stats[:, :1])).sum(1)
    else:
        smooth_deviation = torch.zeros_like(target_logit)
    return torch.cat([stats, target_logit[:, None], smooth_deviation[:, None]], 1)


def _shard_grad(logits, target, lse, grad_loss, ctx):
    """dlogits = (softmax − (1 − ε)·onehot − ε/V)·grad_row on this shard alone, 0 on ignored rows,
    ``lse`` [N, 2] in two parts (``_slices.log_sum_exp_parts``): on the kernels one read of the
    logits and one write of the gradient (``vocab_slice_grad_kernel``)."""
    if ctx.kernels:
        options = dict(vocab_start=ctx.vocab_start, n_classes=ctx.classes, ignore_index=ctx.ignore_index)
        return _launch.vocab_slice_grad(logits, target, lse, grad_loss, smoothing=ctx.label_smoothing, **options)
    grad_row = torch.where(target != ctx.ignore_index, grad_loss, 0.0)
    grad = probabilities(logits, lse)
    grad.mul_(grad_row[:, None]).sub_(ctx.label_smoothing / ctx.classes * grad_row[:, None])
    owned, local_target = _local_targets(target, ctx.vocab_start, logits.shape[1], ctx.ignore_index)
    grad[owned, local_target] -= (1 - ctx.label_smoothing) * grad_row[owned]
    return grad.to(logits.dtype)


def _class_count(layout):
    """The number of classes, from every rank's (start, width); raises unless the shards tile the
    classes in rank order. Every rank sees the same layout, so all raise together."""
    starts, widths = layout[:, 0].long(), layout[:, 1].long()
    if not torch.equal(starts, widths.cumsum(0) - widths):
        raise ValueError(
            f"cross_entropy: the shards must tile the classes in rank order, but the ranks start at "
            f"{starts.tolist()} with widths {widths.tolist()}; shards of different widths need vocab_start"
        )
    return int(widths.sum())


@dataclasses.dataclass(frozen=True)
class _VocabShard:
    """What this shard's gradient needs beside its logits, target and the rows' log-sum-exp
    (``_shard_grad``'s ``ctx``): known once the forward has gathered every shard's width."""

    kernels: bool
    vocab_start: int
    classes: int
    ignore_index: int
    label_smoothing: float


NO_THIRD_DERIVATIVE = (
    "fused_softmax.distributed.cross_entropy has first and second derivatives (double backward, hessian): "
    "a third raises"
)


class _ReplicatedSum(torch.autograd.Function):
    """The sum over the ranks of ``group`` of per-rank parts of a value every rank then holds alike
    (a loss's tangent): each rank's cotangent is that of the one value, so its backward is the
    identity; its tangent is the same sum."""

    @staticmethod
    def forward(t, group):
        return _all_reduced(t, group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return grad, None

    @staticmethod
    def jvp(ctx, tangent, _):
        return _ReplicatedSum.apply(tangent, ctx.group)

    @staticmethod
    def vmap(info, in_dims, t, group):
        _batched_alike(info, group, t)
        (t,) = batch_first(info, in_dims[:1], t)
        return _ReplicatedSum.apply(t, group), 0


def _rows_batched(apply, info, in_dims, group, rows, *rest):
    """A vmap rule's (outputs, out_dims) for ``apply(*rows, *rest)``, whose tensors ``rows`` are
    per row of the logits [N, V_local] (or are them): the batch is more rows of one call, every
    rank batching alike; outputs not per row (the shard's description) are not batched."""
    _batched_alike(info, group, rows[0])
    rows = batch_first(info, in_dims[: len(rows)], *rows)
    batch = rows[0].shape[:2]
    outputs = apply(*(t.flatten(0, 1) for t in rows), *rest)
    batched = [isinstance(o, torch.Tensor) for o in outputs]
    return (
        tuple(o.unflatten(0, batch) if b else o for o, b in zip(outputs, batched, strict=True)),
        tuple(0 if b else None for b in batched),
    )


def _probabilities_and_grad(logits, target, lse, shard):
    """This shard's softmax p (from the rows' global log-sum-exp) and the logits' gradient of the
    loss for a unit upstream gradient, p − (1 − ε)·onehot − ε/V (0 on ignored rows), and which
    rows are not ignored: in torch ops (vmap-able, no data-dependent indexing), in the stats'
    dtype, for the gradient's own derivatives."""
    p = probabilities(logits, lse)
    valid = target != shard.ignore_index
    classes = torch.arange(logits.shape[1], device=logits.device) + shard.vocab_start
    onehot = (classes == target[:, None]).to(p.dtype)
    grad = (p - (1 - shard.label_smoothing) * onehot - shard.label_smoothing / shard.classes) * valid[:, None]
    return p, grad, valid


class VocabParallelGradFunction(torch.autograd.Function):
    """The logits' gradient of ``VocabParallelCrossEntropyFunction``'s per-row losses for the
    upstream ``grad_loss`` (every rank's alike), this shard's slice: one pass of the kernels
    (``_shard_grad``), no communication. Differentiable once more, in either mode, in torch ops on
    the local logits with the global log-sum-exp: along v (the logits' cotangent or tangent),
    g·(p⊙v − p·Σ_c p_c·v_c) and the upstream's Σ_c v_c·(p_c − (1 − ε)·onehot_c − ε/V), the sums
    over every shard's classes: one all_reduce of per-row partial sums. A third derivative
    raises (``NO_THIRD_DERIVATIVE``)."""

    @staticmethod
    def forward(logits, target, lse, grad_loss, group, shard):
        if legacy_batched(grad_loss):  # is_grads_batched: its older vmap runs torch ops, not kernels
            _, unit_grad, valid = _probabilities_and_grad(logits, target, lse, shard)
            return (unit_grad * torch.where(valid, grad_loss.to(unit_grad.dtype), 0.0)[:, None]).to(logits.dtype)
        return _shard_grad(logits, target, lse, grad_loss, shard)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, lse, grad_loss, group, shard = inputs
        ctx.group, ctx.shard = group, shard
        ctx.save_for_backward(logits, target, lse, grad_loss)
        ctx.save_for_forward(logits, target, lse, grad_loss)

    @staticmethod
    def _along(ctx, v, grad_loss_v):
        """(the gradient's derivative along the logits' ``v`` and the upstream's ``grad_loss_v``,
        either None; Σ over every shard's classes of v·(the unit gradient), None without v),
        refused beyond."""
        logits, target, lse, grad_loss = ctx.saved_tensors
        p, unit_grad, valid = _probabilities_and_grad(logits, target, lse, ctx.shard)
        along_logits = along_upstream = 0
        if grad_loss_v is not None:  # linear in the upstream gradient
            along_logits = grad_loss_v.to(p.dtype)[:, None] * unit_grad
        if v is not None:
            v = v.to(p.dtype)
            sums = _AllReduced.apply(torch.stack([(p * v).sum(1), (unit_grad * v).sum(1)], 1), ctx.group)
            upstream = torch.where(valid, grad_loss.to(p.dtype), 0.0)
            along_logits = along_logits + upstream[:, None] * (p * v - p * sums[:, :1])
            along_upstream = sums[:, 1].to(grad_loss.dtype)
        along = (along_logits.to(logits.dtype), None if v is None else along_upstream)
        return DerivativesRefused.apply(NO_THIRD_DERIVATIVE, logits, grad_loss, v, grad_loss_v, *along)[4:]

    @staticmethod
    def backward(ctx, grad):
        grad_logits, grad_upstream = VocabParallelGradFunction._along(ctx, grad, None)
        return grad_logits, None, None, grad_upstream, None, None

    @staticmethod
    def jvp(ctx, logits_tangent, _target, _lse, grad_loss_tangent, *_):
        return VocabParallelGradFunction._along(ctx, logits_tangent, grad_loss_tangent)[0]

    @staticmethod
    def vmap(info, in_dims, logits, target, lse, grad_loss, group, shard):
        apply = VocabParallelGradFunction.apply
        (grad,), (out_dim,) = _rows_batched(
            lambda *a: (apply(*a),), info, in_dims, group, (logits, target, lse, grad_loss), group, shard
        )
        return grad, out_dim


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """Per-row cross entropy (0 where ignored) of logits sharded over the classes, in the stats'
    dtype (float32, float64 for float64 logits); returns (losses, the rows' log-sum-exp, this
    shard's ``_VocabShard``), the last two for the derivatives.

    Forward: one read of the local logits for the per-row stats, one all_gather of them;
    backward: one pass writing the local gradient, no communication (``VocabParallelGradFunction``,
    itself differentiable: double backward and hessians, one all_reduce). The forward-mode tangent
    of each row's loss is Σ_c grad_c·t_c over every shard: one all_reduce of per-row partial dots.
    vmap: the batch is more rows, every rank batching alike. Saves the local logits and the
    per-row log-sum-exp only: never the gathered logits, nor the probabilities.
    """

    @staticmethod
    def forward(logits, target, group, ignore_index, label_smoothing, vocab_start):
        kernels = use_kernels(logits, logits.dtype)
        rows = _shard_statistics(logits, target, vocab_start, ignore_index, label_smoothing, kernels)
        # A last row carries the shard's (start, width): every rank learns the class count and can
        # check the tiling, in the same collective. Exact in float32 below 2^24 classes.
        layout = rows.new_zeros(1, rows.shape[1])
        layout[0, :2] = layout.new_tensor([vocab_start, logits.shape[1]])
        gathered = _all_gather(torch.cat([rows, layout]), group)
        classes = _class_count(gathered[:, -1])
        valid = target != ignore_index
        out_of_range = valid & ((target < 0) | (target >= classes))
        if out_of_range.any():
            raise IndexError(f"Target {target[out_of_range][0].item()} is out of bounds.")
        widths = gathered[:, -1, 1]
        gathered = gathered[:, :-1]
        # The target logit is non-zero on the one rank holding it: the sum over ranks is that logit.
        lse, target_logit, smooth_deviation = combined_statistics(gathered, widths)
        options = (ignore_index, label_smoothing, 0.0, None)
        loss = losses_from_statistics(lse, target_logit, smooth_deviation, target, classes, options)
        shard = _VocabShard(kernels, vocab_start, classes, ignore_index, label_smoothing)
        return loss, lse, shard

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, target, group, *_ = inputs
        _, lse, ctx.shard = output
        ctx.mark_non_differentiable(lse)
        ctx.group = group
        ctx.save_for_backward(logits, target, lse)
        ctx.save_for_forward(logits, target, lse)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        logits, target, lse = ctx.saved_tensors
        grad = VocabParallelGradFunction.apply(logits, target, lse, grad_loss, ctx.group, ctx.shard)
        return grad, None, None, None, None, None

    @staticmethod
    def jvp(ctx, logits_tangent, *_):
        logits, target, lse = ctx.saved_tensors
        unit = lse.new_ones(lse.shape[:-1])  # a unit upstream gradient per row (lse is in two parts)
        grad = VocabParallelGradFunction.apply(logits, target, lse, unit, ctx.group, ctx.shard)
        parts = (grad.to(lse.dtype) * logits_tangent.to(lse.dtype)).sum(1)
        return _ReplicatedSum.apply(parts, ctx.group), None, None

    @staticmethod
    def vmap(info, in_dims, logits, target, group, ignore_index, label_smoothing, vocab_start):
        apply = VocabParallelCrossEntropyFunction.apply
        options = (group, ignore_index, label_smoothing, vocab_start)
        return _rows_batched(apply, info, in_dims, group, (logits, target), *options)


def cross_entropy(
    logits_local, target, group=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *, vocab_start=None
):
    """``F.cross_entropy`` of logits whose classes are sharded across ``group``: vocab-parallel.

    ``logits_local`` is [N, V_local], this rank's contiguous shard of the classes (the only
    shape supported: flatten batch dims first); ``target`` is [N] global class indices (int64),
    the same on every rank. Shards are in rank order and of equal width unless ``vocab_start``
    gives this rank's first class. Same result, on every rank, as ``F.cross_entropy`` on the
    gathered logits, with ``ignore_index``, ``reduction`` and ``label_smoothing`` as torch's.
    Memory stays proportional to the shard: the logits are never gathered. Differentiable twice,
    in either mode, and under torch.func, every rank transforming alike (see
    ``VocabParallelCrossEntropyFunction``).
    """
    if logits_local.dim() != 2 or target.shape != logits_local.shape[:1]:
        raise ValueError(
            f"cross_entropy: expected logits [N, V_local] and target [N], got {list(logits_local.shape)} "
            f"and {list(target.shape)}"
        )
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte (class indices), but got {target.dtype}")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    label_smoothing = applied_smoothing(label_smoothing)
    if vocab_start is None:
        vocab_start = dist.get_rank(group) * logits_local.shape[1]
    losses = VocabParallelCrossEntropyFunction.apply(
        logits_local, target.long(), group, ignore_index, label_smoothing, vocab_start
    )[0]
    if reduction == "sum":
        losses = losses.sum()
    elif reduction == "mean":
        losses = losses.sum() / (target != ignore_index).sum()
    return losses.to(logits_local.dtype)
