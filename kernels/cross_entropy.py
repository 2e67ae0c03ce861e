"""Cross-entropy over the class dim of logits: each row's loss and, in the same pass, the logits'
gradient, so the backward has nothing left to compute but a scaling by the upstream gradient.

A row is one (sample, position) of [n, C, inner...] logits, the classes along the row (``tiles``'
[n_outer, n_cols, n_inner] view, class dim 1 read through its stride). With x' the logits after
the optional cap (softcap · tanh(x / softcap)), lse = log Σ exp(x') and p = exp(x' - lse):

- class-index targets t (``cross_entropy_kernel``), smoothing ε, class weights w (1 without),
  u the smoothing term's weights (w, or 1 without), U = Σ u, S = Σ u·x':
  loss = (1 - ε)·w_t·(lse - x'_t) + ε/C·(U·lse - S) + z·lse²,
  grad = p·((1 - ε)·w_t + ε/C·U + 2z·lse) - (1 - ε)·w_t·[c = t] - ε/C·u_c;
- class probabilities q (``cross_entropy_probabilities_kernel``), r = (1 - ε)·q + ε/C:
  loss = Σ w·r·(lse - x') + z·lse², grad = p·(Σ w·r + 2z·lse) - w·r.

The weighted sums S = Σ u·x' and Σ w·r·x' are kept as deviations from the row's max m,
D = Σ u·(x' - m) (or Σ w·r·(x' - m)), and U·lse - S as U·log Σ exp(x' - m) - D (U = Σ u, or
Σ w·r): at large logits U·lse and S are both huge, and their difference would keep only the
logits' rounding, where D rounds to their spread (see ``deviation_step``).

The gradient is times the cap's derivative 1 - (x'/softcap)² and the reduction's factor (1/Σ w_t
for a mean). Ignored rows (target == ignore_index) have loss and gradient 0; a target outside
[0, C) gives a NaN loss and gradient, never an out-of-bounds read (the host raises first where it
can check without a device synchronisation). On chip, the logits are read once and the gradient
written once; rows longer than a block keep online statistics in one sweep and write the gradient
in a second, in reverse (see ``tiles.normalising_sweep``). The gradient's scale is read per row:
one factor per batch entry, for vmap.

A mean or sum reduces each batch entry's row losses in one more launch (``reduced_loss_kernel``,
its rows seen as the columns of a tile); a mean over class-index targets takes the entry's
factor 1 / Σ w_t from one launch before the forward (``mean_grad_scale_kernel``), which the
forward's gradient is written with too. The backward only scales the gradient by the upstream
one (``scale_grad_kernel``).

The same steps run on one slice of the classes, whether the other slices live on other ranks
(the vocab-parallel cross-entropy) or come later in a loop (``linear_cross_entropy``'s chunks of
the vocabulary): the slice's fresh statistics (``vocab_slice_statistics_kernel``), which the host
combines over the slices with torch ops on [rows, 4] tensors, and, given each row's log-sum-exp
over every slice, the slice's gradient (``vocab_slice_grad_kernel``). The slice kernels never
read what other slices produced but those per-row values, so one pair serves both callers, and
a third: the split-row regime of ``cross_entropy`` (few rows of many classes), where a launch
cuts its slice into chunks (``split_row.chunk_of``), every (row tile, chunk) a work item, one
chunk a slice of its own; an uncut slice is one chunk.
"""

import triton
import triton.language as tl

from .split_row import chunk_of
from .tiles import (
    block_statistics,
    column_block,
    combine_lanes,
    exponent_shift,
    fp32_pair,
    load_block,
    load_row_values,
    online_step,
    row_starts,
    store_block,
    store_row_values,
    tanh,
    tile_count,
    tile_rows,
)


@triton.jit
def capped(x, in_bounds, softcap, SOFTCAP: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """softcap · tanh(x / softcap) (Gemma 2's logit cap) if SOFTCAP, else x; -inf out of bounds.
    ``tiles.tanh`` keeps the capped logit within ulps of torch's where the cap is far above the
    logits too (1 - exp(-2|u|) alone would leave it softcap · 2^-24 off)."""
    if SOFTCAP:
        x = softcap * tanh(x / softcap, COMPUTE_DTYPE)
    return tl.where(in_bounds, x, float("-inf"))


@triton.jit
def cap_derivative(x_capped, softcap, SOFTCAP: tl.constexpr):
    """d x' / d x = 1 - tanh², from the capped logits (1 without a cap)."""
    if SOFTCAP:
        t = x_capped / softcap
        return 1.0 - t * t
    else:
        return tl.full(x_capped.shape, 1.0, x_capped.dtype)


@triton.jit
def load_capped(x_rows, x_stride_col, col, in_bounds, softcap, SOFTCAP: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """A block of the rows' capped logits, -inf out of bounds."""
    x = load_block(x_rows, x_stride_col, col, in_bounds, float("-inf"), COMPUTE_DTYPE)
    return capped(x, in_bounds, softcap, SOFTCAP, COMPUTE_DTYPE)


@triton.jit
def smoothing_weights(
    weight_ptr, col, col_ok, BLOCK_N: tl.constexpr, SMOOTHING: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DTYPE
):
    """u, each class's weight in the smoothing term, [1, BLOCK_N]: the class weights (read once per
    block, not per row), 1 without them; 0 past the row and without smoothing."""
    if SMOOTHING:
        if HAS_WEIGHT:
            return tl.load(weight_ptr + col, mask=col_ok, other=0.0).to(COMPUTE_DTYPE)
        else:
            return tl.where(col_ok, 1.0, 0.0).to(COMPUTE_DTYPE)
    else:
        return tl.zeros([1, BLOCK_N], COMPUTE_DTYPE)


@triton.jit
def is_target(target, in_range, start, BLOCK_N: tl.constexpr):
    """[ROWS, BLOCK_N]: which column of the block at ``start`` is the row's target. Compared in
    int32 lanes: int64 column indices would take twice the registers of the block."""
    local = tl.where(in_range, target - start, -1).to(tl.int32)
    return tl.arange(0, BLOCK_N)[None, :] == local


@triton.jit
def target_logits(x, hit):
    """A block's part of each row's x'_t: 0 where the block does not hold the target."""
    return tl.sum(tl.where(hit, x, 0.0), axis=1, keep_dims=True)


@triton.jit
def weighted_deviation(x, weights, in_bounds, shift):
    """Σ w·(x' - shift) over a block's columns, 0 out of bounds."""
    return tl.sum(tl.where(in_bounds, weights * (x - shift), 0.0), axis=1, keep_dims=True)


@triton.jit
def deviation_step(reference, deviation, weight_sum, x, weights, in_bounds):
    """One block into each row's running D = Σ w·(x' - shift), shift the ``exponent_shift`` of the
    running max ``reference``, ``weight_sum`` the Σ w of the blocks before: a rising max moves D
    by weight_sum times its rise, so D rounds to the logits' spread, not to their size."""
    new_reference = tl.maximum(reference, tl.max(x, axis=1, keep_dims=True))
    shift = exponent_shift(new_reference)
    deviation += weight_sum * (exponent_shift(reference) - shift)
    return new_reference, deviation + weighted_deviation(x, weights, in_bounds, shift)


@triton.jit
def index_online_statistics(
    x_rows,
    x_stride_col,
    weight_ptr,
    target,
    in_range,
    row_mask,
    n_cols,
    softcap,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SMOOTHING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Rows longer than a block, in one sweep: each row's (max, Σ exp(x' - max), x'_t, D = Σ u·(x' -
    max)) and U = Σ u, D and U 0 without smoothing. x'_t is 0 where ``in_range`` is false (the
    target is not among the columns)."""
    lane_max = tl.full([ROWS, BLOCK_N], float("-inf"), COMPUTE_DTYPE)
    lane_sum = tl.zeros([ROWS, BLOCK_N], COMPUTE_DTYPE)
    target_logit = tl.zeros([ROWS, 1], COMPUTE_DTYPE)
    reference = tl.full([ROWS, 1], float("-inf"), COMPUTE_DTYPE)
    smooth_deviation = tl.zeros([ROWS, 1], COMPUTE_DTYPE)
    smooth_weight = tl.zeros([1, 1], COMPUTE_DTYPE)
    for start in tl.range(0, n_cols, BLOCK_N):
        col = column_block(start, BLOCK_N)
        col_ok = col < n_cols
        in_bounds = row_mask & col_ok
        x = load_capped(x_rows, x_stride_col, col, in_bounds, softcap, SOFTCAP, COMPUTE_DTYPE)
        lane_max, lane_sum = online_step(lane_max, lane_sum, x)
        u = smoothing_weights(weight_ptr, col, col_ok, BLOCK_N, SMOOTHING, HAS_WEIGHT, COMPUTE_DTYPE)
        target_logit += target_logits(x, is_target(target, in_range, start, BLOCK_N))
        if SMOOTHING:
            reference, smooth_deviation = deviation_step(reference, smooth_deviation, smooth_weight, x, u, in_bounds)
        smooth_weight += tl.sum(u, axis=1, keep_dims=True)
    row_max, row_sum = combine_lanes(lane_max, lane_sum)
    return row_max, row_sum, target_logit, smooth_deviation, smooth_weight


@triton.jit
def index_block(
    x_rows,
    x_stride_col,
    weight_ptr,
    target,
    in_range,
    row_mask,
    n_cols,
    softcap,
    BLOCK_N: tl.constexpr,
    SMOOTHING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Rows held whole in one block: the block's x' and u, kept for a gradient written from the
    same registers, and the statistics of ``index_online_statistics``."""
    col = column_block(0, BLOCK_N)
    col_ok = col < n_cols
    in_bounds = row_mask & col_ok
    x = load_capped(x_rows, x_stride_col, col, in_bounds, softcap, SOFTCAP, COMPUTE_DTYPE)
    row_max, row_sum = block_statistics(x)
    u = smoothing_weights(weight_ptr, col, col_ok, BLOCK_N, SMOOTHING, HAS_WEIGHT, COMPUTE_DTYPE)
    if SMOOTHING:
        smooth_deviation = weighted_deviation(x, u, in_bounds, exponent_shift(row_max))
    else:
        smooth_deviation = tl.zeros(row_max.shape, COMPUTE_DTYPE)
    target_logit = target_logits(x, is_target(target, in_range, 0, BLOCK_N))
    return x, u, row_max, row_sum, target_logit, smooth_deviation, tl.sum(u, axis=1, keep_dims=True)


@triton.jit
def softmax_block(x, row_max, log_sum):
    """p = exp(x' - lse), with lse = max + log Σ exp(x' - max) applied in two steps: x' - max is
    exact for the large logits, where rounding lse first would cost p its precision."""
    return tl.exp((x - row_max) - log_sum)


@triton.jit
def index_row_loss(row_max, log_sum, target_logit, target_weight, smooth_deviation, smooth_weight, eps, z_loss, n_cols):
    """(1 - ε)·w_t·(lse - x'_t) + ε/C·(U·lse - S) + z·lse², with lse - x'_t as (max - x'_t) + log Σ
    and U·lse - S as U·log Σ - D, exact for large logits."""
    lse = row_max + log_sum
    loss = (1.0 - eps) * target_weight * ((row_max - target_logit) + log_sum)
    return loss + eps / n_cols * (smooth_weight * log_sum - smooth_deviation) + z_loss * lse * lse


@triton.jit
def row_validity(target, row_mask, ignore_index, n_cols):
    """(the row counts: in the tile and not ignored; its target is a class: in [0, C))."""
    return row_mask & (target != ignore_index), (target >= 0) & (target < n_cols)


@triton.jit
def validated(value, valid, in_range):
    """0 where the row is ignored, NaN where its target is not a class."""
    return tl.where(valid, tl.where(in_range, value, float("nan")), 0.0)


@triton.jit
def index_grad_values(
    x, hit, row_max, log_sum, probability_coef, target_coef, u, smooth_coef, softcap, SOFTCAP: tl.constexpr
):
    """(p·A - (1 - ε)·w_t·[c = t] - ε/C·u)·cap', p = exp(x' - max - log Σ): a block's gradient of
    its rows' losses, for class-index targets."""
    p = softmax_block(x, row_max, log_sum)
    g = p * probability_coef - tl.where(hit, target_coef, 0.0) - smooth_coef * u
    return g * cap_derivative(x, softcap, SOFTCAP)


@triton.jit
def index_grad_block(
    x,
    hit,
    row_max,
    log_sum,
    probability_coef,
    target_coef,
    u,
    smooth_coef,
    scale,
    valid,
    in_range,
    softcap,
    SOFTCAP: tl.constexpr,
):
    """The gradient of a block, 0 on ignored rows (see ``index_grad_values``)."""
    g = index_grad_values(x, hit, row_max, log_sum, probability_coef, target_coef, u, smooth_coef, softcap, SOFTCAP)
    return validated(g * scale, valid, in_range)


@triton.jit
def loss_options(
    smoothing_high,
    smoothing_low,
    z_loss_high,
    z_loss_low,
    softcap_high,
    softcap_low,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Both kernels' options from the host's fp32 pairs: (ε, z, the cap)."""
    eps = fp32_pair(smoothing_high, smoothing_low, COMPUTE_DTYPE)
    z_loss = fp32_pair(z_loss_high, z_loss_low, COMPUTE_DTYPE)
    softcap = fp32_pair(softcap_high, softcap_low, COMPUTE_DTYPE)
    return eps, z_loss, softcap


@triton.jit
def row_grad_scales(
    grad_scale_ptr, row, row_mask, scale_rows, grad_scale_stride, BLOCK_N: tl.constexpr, COMPUTE_DTYPE: tl.constexpr
):
    """Each row's gradient scale, [ROWS, 1]: the reduction's factor of the row's batch entry, an
    entry being ``scale_rows`` consecutive rows. Outside vmap there is one entry and the stride
    is 0. The entry is found in int32 (the host keeps vmapped rows below 2^31): an int64
    division spills the online kernels."""
    entry = (row.to(tl.int32) // scale_rows) * grad_scale_stride
    return load_row_values(grad_scale_ptr + entry, row_mask, BLOCK_N, COMPUTE_DTYPE)


@triton.jit
def cross_entropy_kernel(
    x_ptr,  # logits
    target_ptr,  # [rows] class indices, int64
    weight_ptr,  # [C] class weights (HAS_WEIGHT), else None
    loss_ptr,  # output, [rows] in COMPUTE_DTYPE: each row's loss
    grad_ptr,  # output (STORE_GRAD): the logits' gradient of Σ loss · grad_scale, else None
    grad_scale_ptr,  # [entries] in COMPUTE_DTYPE (STORE_GRAD): each batch entry's reduction factor, else None
    scale_rows,  # rows per batch entry (STORE_GRAD)
    grad_scale_stride,  # 1, or 0 for a single entry (STORE_GRAD)
    n_outer,
    n_cols,  # the number of classes, divided by ALIGN, as are the outer and inner strides
    n_inner,
    x_stride_outer,
    x_stride_col,
    x_stride_inner,
    grad_stride_outer,
    grad_stride_col,
    grad_stride_inner,
    ignore_index,
    smoothing_high,  # ε = smoothing_high + smoothing_low, and likewise z and the cap: fp32 pairs
    smoothing_low,
    z_loss_high,
    z_loss_low,
    softcap_high,
    softcap_low,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ONLINE: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    STORE_GRAD: tl.constexpr,
):
    n_cols = n_cols * ALIGN
    eps, z_loss, softcap = loss_options(
        smoothing_high, smoothing_low, z_loss_high, z_loss_low, softcap_high, softcap_low, COMPUTE_DTYPE
    )
    for tile in tl.range(tl.program_id(0), tile_count(n_outer, n_inner, ROWS), tl.num_programs(0)):
        outer, inner, row_mask, row = tile_rows(tile, n_inner, ROWS)
        target = tl.load(target_ptr + row, mask=row_mask, other=ignore_index)
        valid, in_range = row_validity(target, row_mask, ignore_index, n_cols)
        if HAS_WEIGHT:
            target_weight = tl.load(weight_ptr + target, mask=valid & in_range, other=0.0).to(COMPUTE_DTYPE)
        else:
            target_weight = tl.full(target.shape, 1.0, COMPUTE_DTYPE)
        x_rows = row_starts(x_ptr, outer, inner, x_stride_outer, x_stride_inner, ALIGN)
        if ONLINE:
            row_max, row_sum, target_logit, smooth_deviation, smooth_weight = index_online_statistics(
                x_rows,
                x_stride_col,
                weight_ptr,
                target,
                in_range,
                row_mask,
                n_cols,
                softcap,
                ROWS,
                BLOCK_N,
                SMOOTHING,
                HAS_WEIGHT,
                SOFTCAP,
                COMPUTE_DTYPE,
            )
        else:
            x, u, row_max, row_sum, target_logit, smooth_deviation, smooth_weight = index_block(
                x_rows,
                x_stride_col,
                weight_ptr,
                target,
                in_range,
                row_mask,
                n_cols,
                softcap,
                BLOCK_N,
                SMOOTHING,
                HAS_WEIGHT,
                SOFTCAP,
                COMPUTE_DTYPE,
            )
        log_sum = tl.log(row_sum)
        lse = row_max + log_sum
        loss = index_row_loss(
            row_max, log_sum, target_logit, target_weight, smooth_deviation, smooth_weight, eps, z_loss, n_cols
        )
        tl.store(loss_ptr + row, validated(loss, valid, in_range), mask=row_mask)
        if STORE_GRAD:
            scale = row_grad_scales(
                grad_scale_ptr, row, row_mask, scale_rows, grad_scale_stride, BLOCK_N, COMPUTE_DTYPE
            )
            target_coef = (1.0 - eps) * target_weight
            smooth_coef = eps / n_cols
            probability_coef = target_coef + smooth_coef * smooth_weight + 2.0 * z_loss * lse
            grad_rows = row_starts(grad_ptr, outer, inner, grad_stride_outer, grad_stride_inner, ALIGN)
            if ONLINE:
                n_blocks = tl.cdiv(n_cols, BLOCK_N)
                for back in tl.range(0, n_blocks):
                    start = (n_blocks - 1 - back) * BLOCK_N
                    col = column_block(start, BLOCK_N)
                    col_ok = col < n_cols
                    in_bounds = row_mask & col_ok
                    x = load_capped(x_rows, x_stride_col, col, in_bounds, softcap, SOFTCAP, COMPUTE_DTYPE)
                    u = smoothing_weights(weight_ptr, col, col_ok, BLOCK_N, SMOOTHING, HAS_WEIGHT, COMPUTE_DTYPE)
                    g = index_grad_block(
                        x,
                        is_target(target, in_range, start, BLOCK_N),
                        row_max,
                        log_sum,
                        probability_coef,
                        target_coef,
                        u,
                        smooth_coef,
                        scale,
                        valid,
                        in_range,
                        softcap,
                        SOFTCAP,
                    )
                    store_block(grad_rows, grad_stride_col, col, in_bounds, g)
            else:
                col = column_block(0, BLOCK_N)
                in_bounds = row_mask & (col < n_cols)
                g = index_grad_block(
                    x,
                    is_target(target, in_range, 0, BLOCK_N),
                    row_max,
                    log_sum,
                    probability_coef,
                    target_coef,
                    u,
                    smooth_coef,
                    scale,
                    valid,
                    in_range,
                    softcap,
                    SOFTCAP,
                )
                store_block(grad_rows, grad_stride_col, col, in_bounds, g)


@triton.jit
def class_weights(weight_ptr, col, col_ok, BLOCK_N: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DTYPE):
    """Each class's weight, [1, BLOCK_N] (read once per block, not per row): 1 without weights."""
    if HAS_WEIGHT:
        return tl.load(weight_ptr + col, mask=col_ok, other=0.0).to(COMPUTE_DTYPE)
    else:
        return tl.full([1, BLOCK_N], 1.0, COMPUTE_DTYPE)


@triton.jit
def probability_grad_block(x, wr, row_max, log_sum, probability_coef, scale, row_mask, softcap, SOFTCAP: tl.constexpr):
    """The gradient of a block: (p·(Σ w·r + 2z·lse) - w·r)·cap'·scale."""
    g = softmax_block(x, row_max, log_sum) * probability_coef - wr
    return tl.where(row_mask, g * cap_derivative(x, softcap, SOFTCAP) * scale, 0.0)


@triton.jit
def load_probability_block(
    x_rows,
    x_stride_col,
    target_rows,
    target_stride_col,
    weight_ptr,
    col,
    row_mask,
    n_cols,
    eps,
    softcap,
    BLOCK_N: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """A block's capped logits x' and weighted smoothed probabilities w·r, r = (1 - ε)·q + ε/C;
    w·r is 0 out of bounds."""
    col_ok = col < n_cols
    in_bounds = row_mask & col_ok
    x = load_capped(x_rows, x_stride_col, col, in_bounds, softcap, SOFTCAP, COMPUTE_DTYPE)
    q = load_block(target_rows, target_stride_col, col, in_bounds, 0.0, COMPUTE_DTYPE)
    w = class_weights(weight_ptr, col, col_ok, BLOCK_N, HAS_WEIGHT, COMPUTE_DTYPE)
    return x, tl.where(in_bounds, w * ((1.0 - eps) * q + eps / n_cols), 0.0), in_bounds


@triton.jit
def cross_entropy_probabilities_kernel(
    x_ptr,  # logits
    target_ptr,  # class probabilities, shaped like the logits
    weight_ptr,  # [C] class weights (HAS_WEIGHT), else None
    loss_ptr,  # output, [rows] in COMPUTE_DTYPE: each row's loss
    grad_ptr,  # output (STORE_GRAD): the logits' gradient of Σ loss · grad_scale, else None
    grad_scale_ptr,  # [entries] in COMPUTE_DTYPE (STORE_GRAD): each batch entry's reduction factor, else None
    scale_rows,  # rows per batch entry (STORE_GRAD)
    grad_scale_stride,  # 1, or 0 for a single entry (STORE_GRAD)
    n_outer,
    n_cols,  # the number of classes, divided by ALIGN, as are the outer and inner strides
    n_inner,
    x_stride_outer,
    x_stride_col,
    x_stride_inner,
    target_stride_outer,
    target_stride_col,
    target_stride_inner,
    grad_stride_outer,
    grad_stride_col,
    grad_stride_inner,
    smoothing_high,  # ε, z and the cap as fp32 pairs, as in cross_entropy_kernel
    smoothing_low,
    z_loss_high,
    z_loss_low,
    softcap_high,
    softcap_low,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ONLINE: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    STORE_GRAD: tl.constexpr,
):
    n_cols = n_cols * ALIGN
    eps, z_loss, softcap = loss_options(
        smoothing_high, smoothing_low, z_loss_high, z_loss_low, softcap_high, softcap_low, COMPUTE_DTYPE
    )
    for tile in tl.range(tl.program_id(0), tile_count(n_outer, n_inner, ROWS), tl.num_programs(0)):
        outer, inner, row_mask, row = tile_rows(tile, n_inner, ROWS)
        x_rows = row_starts(x_ptr, outer, inner, x_stride_outer, x_stride_inner, ALIGN)
        target_rows = row_starts(target_ptr, outer, inner, target_stride_outer, target_stride_inner, ALIGN)
        if ONLINE:
            lane_max = tl.full([ROWS, BLOCK_N], float("-inf"), COMPUTE_DTYPE)
            lane_sum = tl.zeros([ROWS, BLOCK_N], COMPUTE_DTYPE)
            weight_sum = tl.zeros([ROWS, 1], COMPUTE_DTYPE)
            reference = tl.full([ROWS, 1], float("-inf"), COMPUTE_DTYPE)
            deviation = tl.zeros([ROWS, 1], COMPUTE_DTYPE)
            for start in tl.range(0, n_cols, BLOCK_N):
                x, wr, in_bounds = load_probability_block(
                    x_rows,
                    x_stride_col,
                    target_rows,
                    target_stride_col,
                    weight_ptr,
                    column_block(start, BLOCK_N),
                    row_mask,
                    n_cols,
                    eps,
                    softcap,
                    BLOCK_N,
                    HAS_WEIGHT,
                    SOFTCAP,
                    COMPUTE_DTYPE,
                )
                lane_max, lane_sum = online_step(lane_max, lane_sum, x)
                reference, deviation = deviation_step(reference, deviation, weight_sum, x, wr, in_bounds)
                weight_sum += tl.sum(wr, axis=1, keep_dims=True)
            row_max, row_sum = combine_lanes(lane_max, lane_sum)
        else:
            col = column_block(0, BLOCK_N)
            x, wr, in_bounds = load_probability_block(
                x_rows,
                x_stride_col,
                target_rows,
                target_stride_col,
                weight_ptr,
                col,
                row_mask,
                n_cols,
                eps,
                softcap,
                BLOCK_N,
                HAS_WEIGHT,
                SOFTCAP,
                COMPUTE_DTYPE,
            )
            row_max, row_sum = block_statistics(x)
            weight_sum = tl.sum(wr, axis=1, keep_dims=True)
            deviation = weighted_deviation(x, wr, in_bounds, exponent_shift(row_max))
        log_sum = tl.log(row_sum)
        lse = row_max + log_sum
        loss = weight_sum * log_sum - deviation + z_loss * lse * lse
        tl.store(loss_ptr + row, loss, mask=row_mask)
        if STORE_GRAD:
            scale = row_grad_scales(
                grad_scale_ptr, row, row_mask, scale_rows, grad_scale_stride, BLOCK_N, COMPUTE_DTYPE
            )
            probability_coef = weight_sum + 2.0 * z_loss * lse
            grad_rows = row_starts(grad_ptr, outer, inner, grad_stride_outer, grad_stride_inner, ALIGN)
            if ONLINE:
                n_blocks = tl.cdiv(n_cols, BLOCK_N)
                for back in tl.range(0, n_blocks):
                    col = column_block((n_blocks - 1 - back) * BLOCK_N, BLOCK_N)
                    x, wr, in_bounds = load_probability_block(
                        x_rows,
                        x_stride_col,
                        target_rows,
                        target_stride_col,
                        weight_ptr,
                        col,
                        row_mask,
                        n_cols,
                        eps,
                        softcap,
                        BLOCK_N,
                        HAS_WEIGHT,
                        SOFTCAP,
                        COMPUTE_DTYPE,
                    )
                    g = probability_grad_block(
                        x, wr, row_max, log_sum, probability_coef, scale, row_mask, softcap, SOFTCAP
                    )
                    store_block(grad_rows, grad_stride_col, col, in_bounds, g)
            else:
                g = probability_grad_block(x, wr, row_max, log_sum, probability_coef, scale, row_mask, softcap, SOFTCAP)
                store_block(grad_rows, grad_stride_col, col, in_bounds, g)


@triton.jit
def counted_weights(target, in_bounds, weight_ptr, ignore_index, n_classes, HAS_WEIGHT: tl.constexpr, COMPUTE_DTYPE):
    """Each target's part of a mean's divisor, as torch's: its class's weight (1 without
    weights), 0 where ignored. A target outside the classes reads the nearest class's weight
    (its loss is NaN anyway), never out of bounds."""
    counted = in_bounds & (target != ignore_index)
    if HAS_WEIGHT:
        nearest = tl.minimum(tl.maximum(target, 0), n_classes - 1).to(tl.int32)
        return tl.load(weight_ptr + nearest, mask=counted, other=0.0).to(COMPUTE_DTYPE)
    else:
        return counted.to(COMPUTE_DTYPE)


@triton.jit
def mean_grad_scale_kernel(
    target_ptr,  # [entries, rows] class indices, int64
    weight_ptr,  # [C] class weights (HAS_WEIGHT), else None
    grad_scale_ptr,  # output, [entries]: 1 / each entry's mean divisor
    n_outer,
    n_cols,  # rows per batch entry, divided by ALIGN, as are the outer and inner strides
    n_inner,
    target_stride_outer,
    target_stride_col,
    target_stride_inner,
    ignore_index,
    n_classes,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
):
    """1 / each batch entry's mean divisor, Σ w_t over its class-index targets not ignored (their
    count without weights), an entry's targets a row of ``n_cols``: the factor a mean's gradient
    is written with, before the forward that writes it, and its loss reduced with after."""
    n_cols = n_cols * ALIGN
    for tile in tl.range(tl.program_id(0), tile_count(n_outer, n_inner, ROWS), tl.num_programs(0)):
        outer, inner, row_mask, row = tile_rows(tile, n_inner, ROWS)
        target_rows = row_starts(target_ptr, outer, inner, target_stride_outer, target_stride_inner, ALIGN)
        total = tl.zeros([ROWS, BLOCK_N], COMPUTE_DTYPE)
        for start in tl.range(0, n_cols, BLOCK_N):
            col = column_block(start, BLOCK_N)
            in_bounds = row_mask & (col < n_cols)
            target = tl.load(target_rows + col * target_stride_col, mask=in_bounds, other=ignore_index)
            total += counted_weights(target, in_bounds, weight_ptr, ignore_index, n_classes, HAS_WEIGHT, COMPUTE_DTYPE)
        store_row_values(grad_scale_ptr + row, 1.0 / tl.sum(total, axis=1, keep_dims=True), row_mask, BLOCK_N)


@triton.jit
def reduced_loss_kernel(
    loss_ptr,  # [entries, rows] each row's loss, in COMPUTE_DTYPE
    scale_ptr,  # (DIVISOR "scale") [entries]: 1 / each entry's mean divisor (mean_grad_scale_kernel's); else None
    out_ptr,  # output, [entries]: each entry's reduced loss
    n_outer,
    n_cols,  # rows per batch entry, divided by ALIGN, as are the outer and inner strides
    n_inner,
    loss_stride_outer,
    loss_stride_col,
    loss_stride_inner,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    DIVISOR: tl.constexpr,  # "" (a sum), "rows" (probability targets' mean), "scale" (as torch's mean)
):
    """Each batch entry's loss: its rows' sum, or their mean, in one launch, in a fixed order
    (deterministic), cast to the output's dtype."""
    n_cols = n_cols * ALIGN
    for tile in tl.range(tl.program_id(0), tile_count(n_outer, n_inner, ROWS), tl.num_programs(0)):
        outer, inner, row_mask, row = tile_rows(tile, n_inner, ROWS)
        loss_rows = row_starts(loss_ptr, outer, inner, loss_stride_outer, loss_stride_inner, ALIGN)
        total = tl.zeros([ROWS, BLOCK_N], COMPUTE_DTYPE)
        for start in tl.range(0, n_cols, BLOCK_N):
            col = column_block(start, BLOCK_N)
            total += load_block(loss_rows, loss_stride_col, col, row_mask & (col < n_cols), 0.0, COMPUTE_DTYPE)
        loss = tl.sum(total, axis=1, keep_dims=True)
        if DIVISOR == "rows":
            loss = loss / n_cols
        elif DIVISOR == "scale":
            loss = loss * load_row_values(scale_ptr + row, row_mask, BLOCK_N, COMPUTE_DTYPE)
        store_row_values(out_ptr + row, loss, row_mask, BLOCK_N)


@triton.jit
def scale_grad_kernel(
    grad_ptr,  # the forward's gradient, scaled in place by the upstream gradient
    upstream_ptr,  # the upstream gradient: one value, or one per row (PER_ROW) read through its strides
    n_outer,
    n_cols,  # divided by ALIGN, as are the gradient's outer and inner strides
    n_inner,
    grad_stride_outer,
    grad_stride_col,
    grad_stride_inner,
    upstream_stride_outer,  # PER_ROW: the upstream gradient's strides over (outer, inner), else None
    upstream_stride_inner,
    target_ptr,  # IGNORES: class-index targets, in the rows' row-major order
    ignore_index,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    PER_ROW: tl.constexpr,
    IGNORES: tl.constexpr,
):
    """The backward of a cross-entropy whose forward wrote the gradient: rows whose factor is
    exactly 1 (every row after ``loss.backward()`` on a mean or sum) are neither read nor
    written, so that backward moves nothing but the factor, and the host never reads it. Nor
    are ignored rows (IGNORES): their gradient stays 0 whatever the factor, NaN or inf too, as
    torch's."""
    n_cols = n_cols * ALIGN
    if not PER_ROW:
        factor = tl.load(upstream_ptr).to(COMPUTE_DTYPE)
    for tile in tl.range(tl.program_id(0), tile_count(n_outer, n_inner, ROWS), tl.num_programs(0)):
        outer, inner, row_mask, row = tile_rows(tile, n_inner, ROWS)
        if PER_ROW:
            upstream_rows = row_starts(upstream_ptr, outer, inner, upstream_stride_outer, upstream_stride_inner, 1)
            row_factor = load_row_values(upstream_rows, row_mask, BLOCK_N, COMPUTE_DTYPE)
        else:
            row_factor = tl.zeros([ROWS, 1], COMPUTE_DTYPE) + factor
        scaled = row_mask & (row_factor != 1.0)
        if IGNORES:
            scaled &= tl.load(target_ptr + row, mask=scaled, other=ignore_index) != ignore_index
        if tl.max(scaled.to(tl.int32)) > 0:
            grad_rows = row_starts(grad_ptr, outer, inner, grad_stride_outer, grad_stride_inner, ALIGN)
            for start in tl.range(0, n_cols, BLOCK_N):
                col = column_block(start, BLOCK_N)
                in_bounds = scaled & (col < n_cols)
                g = load_block(grad_rows, grad_stride_col, col, in_bounds, 0.0, COMPUTE_DTYPE)
                store_block(grad_rows, grad_stride_col, col, in_bounds, g * row_factor)


@triton.jit
def slice_target(target, valid, vocab_start, n_cols):
    """The target's column in this slice of the classes, and whether the slice holds it (on a
    counted row)."""
    local = target - vocab_start
    return local, valid & (local >= 0) & (local < n_cols)


@triton.jit
def work_item(item, n_chunks, n_inner, n_cols, chunk_cols, ROWS: tl.constexpr, SPLIT: tl.constexpr):
    """Work item ``item``'s tile (``tiles.tile_rows``), chunk and columns [first, stop). SPLIT: a
    (row tile, chunk) pair (``split_row.chunk_of``), numbered in int32: a split launch has too few
    rows to fill the GPU, so fewer than 2^31 items, and the int64 division spilled the kernels
    with softcapping (compile report). Else a tile of whole rows, numbered in int64."""
    if SPLIT:
        return chunk_of(tl.cast(item, tl.int32), n_chunks, n_inner, n_cols, chunk_cols, ROWS)
    else:
        outer, inner, row_mask, row = tile_rows(item, n_inner, ROWS)
        return outer, inner, row_mask, row, 0, 0, n_cols


@triton.jit
def chunk_starts(ptr, outer, inner, stride_outer, stride_col, stride_inner, first, ALIGN: tl.constexpr):
    """Pointers to column ``first`` of each of the tile's rows: a chunk of a slice is a slice of
    its own, starting there."""
    return row_starts(ptr, outer, inner, stride_outer, stride_inner, ALIGN) + tl.cast(first, tl.int64) * stride_col


@triton.jit
def vocab_slice_statistics_kernel(
    x_ptr,  # one slice of the logits: classes [vocab_start, vocab_start + n_cols) of each row
    target_ptr,  # [rows] class indices over the whole vocabulary, int64
    stats_ptr,  # output, [rows, n_chunks, 4] in COMPUTE_DTYPE: max, Σ exp(x' - max), x'_t (0 off it), Σ (x' - max)
    n_outer,
    n_cols,  # the slice's classes, divided by ALIGN, as are the outer and inner strides
    n_inner,
    x_stride_outer,
    x_stride_col,
    x_stride_inner,
    vocab_start,  # the slice's first class
    ignore_index,
    softcap_high,  # the cap as an fp32 pair (see tiles.fp32_pair)
    softcap_low,
    chunk_cols,  # each chunk's classes, divided by ALIGN (n_cols for one chunk)
    n_chunks,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ONLINE: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SPLIT: tl.constexpr,  # n_chunks > 1 (see work_item)
):
    """The statistics of each chunk of one slice of the classes (a rank's shard, one of
    linear_cross_entropy's chunks, or a split row's chunk: ``split_row.chunk_of``), from one read of
    its logits, by the steps of ``cross_entropy_kernel``; the host combines them (``_slices``). A
    chunk of only -inf gets a sum of 0, the identity when they combine."""
    n_cols = n_cols * ALIGN
    chunk_cols = chunk_cols * ALIGN
    softcap = fp32_pair(softcap_high, softcap_low, COMPUTE_DTYPE)
    n_items = tile_count(n_outer, n_inner, ROWS) * n_chunks
    for item in tl.range(tl.program_id(0), n_items, tl.num_programs(0)):
        outer, inner, row_mask, row, chunk, first, stop = work_item(
            item, n_chunks, n_inner, n_cols, chunk_cols, ROWS, SPLIT
        )
        n_chunk_cols = stop - first
        target = tl.load(target_ptr + row, mask=row_mask, other=ignore_index)
        local, owned = slice_target(target, row_mask & (target != ignore_index), vocab_start + first, n_chunk_cols)
        x_rows = chunk_starts(x_ptr, outer, inner, x_stride_outer, x_stride_col, x_stride_inner, first, ALIGN)
        if ONLINE:
            row_max, row_sum, target_logit, smooth_deviation, _ = index_online_statistics(
                x_rows,
                x_stride_col,
                None,
                local,
                owned,
                row_mask,
                n_chunk_cols,
                softcap,
                ROWS,
                BLOCK_N,
                SMOOTHING,
                False,
                SOFTCAP,
                COMPUTE_DTYPE,
            )
        else:
            _, _, row_max, row_sum, target_logit, smooth_deviation, _ = index_block(
                x_rows,
                x_stride_col,
                None,
                local,
                owned,
                row_mask,
                n_chunk_cols,
                softcap,
                BLOCK_N,
                SMOOTHING,
                False,
                SOFTCAP,
                COMPUTE_DTYPE,
            )
        at = stats_ptr + 4 * (row * n_chunks + chunk)
        tl.store(at, row_max, mask=row_mask)
        tl.store(at + 1, row_sum, mask=row_mask)
        tl.store(at + 2, target_logit, mask=row_mask)
        tl.store(at + 3, smooth_deviation, mask=row_mask)


@triton.jit
def vocab_slice_grad_kernel(
    x_ptr,  # one slice of the logits, as in vocab_slice_statistics_kernel
    target_ptr,  # [rows] class indices over the whole vocabulary, int64
    lse_ptr,  # [rows, 2] in COMPUTE_DTYPE: each row's log-sum-exp over every slice, as (max, log Σ exp(x' - max))
    scale_ptr,  # [rows]: each row's factor (upstream gradient, reduction), read through its stride
    grad_ptr,  # output, shaped like the slice (x_ptr itself to overwrite it): its logits' gradient
    n_outer,
    n_cols,  # the slice's classes, divided by ALIGN, as are the outer and inner strides
    n_inner,
    x_stride_outer,
    x_stride_col,
    x_stride_inner,
    grad_stride_outer,
    grad_stride_col,
    grad_stride_inner,
    scale_stride,
    vocab_start,  # the slice's first class
    n_classes,  # every slice's classes
    ignore_index,
    smoothing_high,  # ε, z and the cap as fp32 pairs, as in cross_entropy_kernel
    smoothing_low,
    z_loss_high,
    z_loss_low,
    softcap_high,
    softcap_low,
    chunk_cols,  # each chunk's classes, divided by ALIGN (n_cols for one chunk)
    n_chunks,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SPLIT: tl.constexpr,  # n_chunks > 1 (see work_item)
):
    """A slice's gradient from the rows' log-sum-exp over every slice, one sweep whatever the row
    length: (p·(1 + 2z·lse) - (1 - ε)·[c = t] - ε/C)·cap'·scale (``index_grad_block``), 0 on
    ignored rows, NaN on rows whose target is not a class, as ``cross_entropy_kernel``; each
    chunk of the slice a work item of its own, as in ``vocab_slice_statistics_kernel``."""
    n_cols = n_cols * ALIGN
    chunk_cols = chunk_cols * ALIGN
    eps, z_loss, softcap = loss_options(
        smoothing_high, smoothing_low, z_loss_high, z_loss_low, softcap_high, softcap_low, COMPUTE_DTYPE
    )
    n_items = tile_count(n_outer, n_inner, ROWS) * n_chunks
    for item in tl.range(tl.program_id(0), n_items, tl.num_programs(0)):
        outer, inner, row_mask, row, _, first, stop = work_item(
            item, n_chunks, n_inner, n_cols, chunk_cols, ROWS, SPLIT
        )
        n_chunk_cols = stop - first
        target = tl.load(target_ptr + row, mask=row_mask, other=ignore_index)
        valid, in_range = row_validity(target, row_mask, ignore_index, n_classes)
        local, owned = slice_target(target, valid, vocab_start + first, n_chunk_cols)
        # Plain [ROWS, 1] loads: three of load_row_values' block-wide ones spilled the 16-warp fp32
        # configuration of 8192 classes (compile report).
        row_max = tl.load(lse_ptr + 2 * row, mask=row_mask, other=0.0)
        log_sum = tl.load(lse_ptr + 2 * row + 1, mask=row_mask, other=0.0)
        probability_coef = 1.0 + 2.0 * z_loss * (row_max + log_sum)
        scale = tl.load(scale_ptr + row * scale_stride, mask=valid, other=0.0).to(COMPUTE_DTYPE)
        x_rows = chunk_starts(x_ptr, outer, inner, x_stride_outer, x_stride_col, x_stride_inner, first, ALIGN)
        grad_rows = chunk_starts(
            grad_ptr, outer, inner, grad_stride_outer, grad_stride_col, grad_stride_inner, first, ALIGN
        )
        for start in tl.range(0, n_chunk_cols, BLOCK_N):
            col = column_block(start, BLOCK_N)
            col_ok = col < n_chunk_cols
            in_bounds = row_mask & col_ok
            x = load_capped(x_rows, x_stride_col, col, in_bounds, softcap, SOFTCAP, COMPUTE_DTYPE)
            g = index_grad_block(
                x,
                is_target(local, owned, start, BLOCK_N),
                row_max,
                log_sum,
                probability_coef,
                1.0 - eps,
                smoothing_weights(None, col, col_ok, BLOCK_N, SMOOTHING, False, COMPUTE_DTYPE),
                eps / n_classes,
                scale,
                valid,
                in_range,
                softcap,
                SOFTCAP,
            )
            store_block(grad_rows, grad_stride_col, col, in_bounds, g)
