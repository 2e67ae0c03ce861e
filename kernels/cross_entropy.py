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

The gradient is times the cap's derivative 1 - (x'/softcap)² and the reduction's factor (1/Σ w_t
for a mean). Ignored rows (target == ignore_index) have loss and gradient 0; a target outside
[0, C) gives a NaN loss and gradient, never an out-of-bounds read (the host raises first where it
can check without a device synchronisation). On chip, the logits are read once and the gradient
written once; rows longer than a block keep online statistics in one sweep and write the gradient
in a second, in reverse (see ``tiles.normalising_sweep``).
"""

import triton
import triton.language as tl

from .tiles import (
    block_statistics,
    column_block,
    combine_lanes,
    fp32_pair,
    load_block,
    online_step,
    row_starts,
    store_block,
    tile_count,
    tile_rows,
)


@triton.jit
def capped(x, in_bounds, softcap, SOFTCAP: tl.constexpr):
    """softcap · tanh(x / softcap) (Gemma 2's logit cap) if SOFTCAP, else x; -inf out of bounds.
    tanh from one exp of -2|u|, which never overflows (Triton has no tanh of its own outside
    libdevice, which the interpreter lacks); 1 - exp(-2|u|) makes the capped logit's error about
    softcap · 2^-23 absolute in fp32, where torch's tanh is within an ulp of the result."""
    if SOFTCAP:
        u = x / softcap
        e = tl.exp(-2.0 * tl.abs(u))
        magnitude = (1.0 - e) / (1.0 + e)
        x = softcap * tl.where(u < 0, -magnitude, magnitude)
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
    return capped(x, in_bounds, softcap, SOFTCAP)


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
def index_block_sums(x, hit, in_bounds, u, SMOOTHING: tl.constexpr):
    """A block's part of each row's x'_t and of S = Σ u·x' (0 without smoothing: u·x' would be NaN
    at a -inf logit)."""
    target_logit = tl.sum(tl.where(hit, x, 0.0), axis=1, keep_dims=True)
    if SMOOTHING:
        smooth_sum = tl.sum(tl.where(in_bounds, u * x, 0.0), axis=1, keep_dims=True)
    else:
        smooth_sum = tl.zeros(target_logit.shape, x.dtype)
    return target_logit, smooth_sum


@triton.jit
def softmax_block(x, row_max, log_sum):
    """p = exp(x' - lse), with lse = max + log Σ exp(x' - max) applied in two steps: x' - max is
    exact for the large logits, where rounding lse first would cost p its precision."""
    return tl.exp((x - row_max) - log_sum)


@triton.jit
def index_row_loss(row_max, log_sum, target_logit, target_weight, smooth_sum, smooth_weight, eps, z_loss, n_cols):
    """(1 - ε)·w_t·(lse - x'_t) + ε/C·(U·lse - S) + z·lse², with lse - x'_t as (max - x'_t) + log Σ,
    exact for large logits."""
    lse = row_max + log_sum
    loss = (1.0 - eps) * target_weight * ((row_max - target_logit) + log_sum)
    return loss + eps / n_cols * (smooth_weight * lse - smooth_sum) + z_loss * lse * lse


@triton.jit
def row_validity(target, row_mask, ignore_index, n_cols):
    """(the row counts: in the tile and not ignored; its target is a class: in [0, C))."""
    return row_mask & (target != ignore_index), (target >= 0) & (target < n_cols)


@triton.jit
def validated(value, valid, in_range):
    """0 where the row is ignored, NaN where its target is not a class."""
    return tl.where(valid, tl.where(in_range, value, float("nan")), 0.0)


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
    """The gradient of a block: (p·A - (1 - ε)·w_t·[c = t] - ε/C·u)·cap'·scale, 0 on ignored rows."""
    p = softmax_block(x, row_max, log_sum)
    g = p * probability_coef - tl.where(hit, target_coef, 0.0) - smooth_coef * u
    return validated(g * cap_derivative(x, softcap, SOFTCAP) * scale, valid, in_range)


@triton.jit
def loss_options(
    smoothing_high,
    smoothing_low,
    z_loss_high,
    z_loss_low,
    softcap_high,
    softcap_low,
    grad_scale_ptr,
    STORE_GRAD: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Both kernels' options from the host's fp32 pairs: (ε, z, the cap, the gradient's scale)."""
    eps = fp32_pair(smoothing_high, smoothing_low, COMPUTE_DTYPE)
    z_loss = fp32_pair(z_loss_high, z_loss_low, COMPUTE_DTYPE)
    softcap = fp32_pair(softcap_high, softcap_low, COMPUTE_DTYPE)
    if STORE_GRAD:
        scale = tl.load(grad_scale_ptr)
    else:
        scale = 1.0
    return eps, z_loss, softcap, scale


@triton.jit
def cross_entropy_kernel(
    x_ptr,  # logits
    target_ptr,  # [rows] class indices, int64
    weight_ptr,  # [C] class weights (HAS_WEIGHT), else None
    loss_ptr,  # output, [rows] in COMPUTE_DTYPE: each row's loss
    grad_ptr,  # output (STORE_GRAD): the logits' gradient of Σ loss · grad_scale, else None
    grad_scale_ptr,  # [1] in COMPUTE_DTYPE (STORE_GRAD): the reduction's factor, else None
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
    eps, z_loss, softcap, scale = loss_options(
        smoothing_high,
        smoothing_low,
        z_loss_high,
        z_loss_low,
        softcap_high,
        softcap_low,
        grad_scale_ptr,
        STORE_GRAD,
        COMPUTE_DTYPE,
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
            lane_max = tl.full([ROWS, BLOCK_N], float("-inf"), COMPUTE_DTYPE)
            lane_sum = tl.zeros([ROWS, BLOCK_N], COMPUTE_DTYPE)
            target_logit = tl.zeros([ROWS, 1], COMPUTE_DTYPE)
            smooth_sum = tl.zeros([ROWS, 1], COMPUTE_DTYPE)
            smooth_weight = tl.zeros([1, 1], COMPUTE_DTYPE)
            for start in tl.range(0, n_cols, BLOCK_N):
                col = column_block(start, BLOCK_N)
                col_ok = col < n_cols
                in_bounds = row_mask & col_ok
                x = load_capped(x_rows, x_stride_col, col, in_bounds, softcap, SOFTCAP, COMPUTE_DTYPE)
                lane_max, lane_sum = online_step(lane_max, lane_sum, x)
                u = smoothing_weights(weight_ptr, col, col_ok, BLOCK_N, SMOOTHING, HAS_WEIGHT, COMPUTE_DTYPE)
                hit = is_target(target, in_range, start, BLOCK_N)
                block_target, block_smooth = index_block_sums(x, hit, in_bounds, u, SMOOTHING)
                target_logit += block_target
                smooth_sum += block_smooth
                smooth_weight += tl.sum(u, axis=1, keep_dims=True)
            row_max, row_sum = combine_lanes(lane_max, lane_sum)
        else:
            col = column_block(0, BLOCK_N)
            col_ok = col < n_cols
            in_bounds = row_mask & col_ok
            x = load_capped(x_rows, x_stride_col, col, in_bounds, softcap, SOFTCAP, COMPUTE_DTYPE)
            row_max, row_sum = block_statistics(x)
            u = smoothing_weights(weight_ptr, col, col_ok, BLOCK_N, SMOOTHING, HAS_WEIGHT, COMPUTE_DTYPE)
            hit = is_target(target, in_range, 0, BLOCK_N)
            target_logit, smooth_sum = index_block_sums(x, hit, in_bounds, u, SMOOTHING)
            smooth_weight = tl.sum(u, axis=1, keep_dims=True)
        log_sum = tl.log(row_sum)
        lse = row_max + log_sum
        loss = index_row_loss(
            row_max, log_sum, target_logit, target_weight, smooth_sum, smooth_weight, eps, z_loss, n_cols
        )
        tl.store(loss_ptr + row, validated(loss, valid, in_range), mask=row_mask)
        if STORE_GRAD:
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
                g = index_grad_block(
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
def probability_lane_terms(x, q, w, in_bounds, eps, n_cols):
    """Per lane: w·r and w·r·x', with r = (1 - ε)·q + ε/C the smoothed probability; 0 out of bounds."""
    wr = tl.where(in_bounds, w * ((1.0 - eps) * q + eps / n_cols), 0.0)
    return wr, tl.where(in_bounds, wr * x, 0.0)


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
    """A block's capped logits x' and weighted smoothed probabilities w·r, and its w·r·x'."""
    col_ok = col < n_cols
    in_bounds = row_mask & col_ok
    x = load_capped(x_rows, x_stride_col, col, in_bounds, softcap, SOFTCAP, COMPUTE_DTYPE)
    q = load_block(target_rows, target_stride_col, col, in_bounds, 0.0, COMPUTE_DTYPE)
    w = class_weights(weight_ptr, col, col_ok, BLOCK_N, HAS_WEIGHT, COMPUTE_DTYPE)
    wr, wrx = probability_lane_terms(x, q, w, in_bounds, eps, n_cols)
    return x, wr, wrx, in_bounds


@triton.jit
def cross_entropy_probabilities_kernel(
    x_ptr,  # logits
    target_ptr,  # class probabilities, shaped like the logits
    weight_ptr,  # [C] class weights (HAS_WEIGHT), else None
    loss_ptr,  # output, [rows] in COMPUTE_DTYPE: each row's loss
    grad_ptr,  # output (STORE_GRAD): the logits' gradient of Σ loss · grad_scale, else None
    grad_scale_ptr,  # [1] in COMPUTE_DTYPE (STORE_GRAD): the reduction's factor, else None
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
    eps, z_loss, softcap, scale = loss_options(
        smoothing_high,
        smoothing_low,
        z_loss_high,
        z_loss_low,
        softcap_high,
        softcap_low,
        grad_scale_ptr,
        STORE_GRAD,
        COMPUTE_DTYPE,
    )
    for tile in tl.range(tl.program_id(0), tile_count(n_outer, n_inner, ROWS), tl.num_programs(0)):
        outer, inner, row_mask, row = tile_rows(tile, n_inner, ROWS)
        x_rows = row_starts(x_ptr, outer, inner, x_stride_outer, x_stride_inner, ALIGN)
        target_rows = row_starts(target_ptr, outer, inner, target_stride_outer, target_stride_inner, ALIGN)
        if ONLINE:
            lane_max = tl.full([ROWS, BLOCK_N], float("-inf"), COMPUTE_DTYPE)
            lane_sum = tl.zeros([ROWS, BLOCK_N], COMPUTE_DTYPE)
            weight_sum = tl.zeros([ROWS, 1], COMPUTE_DTYPE)
            weighted_logits = tl.zeros([ROWS, 1], COMPUTE_DTYPE)
            for start in tl.range(0, n_cols, BLOCK_N):
                x, wr, wrx, in_bounds = load_probability_block(
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
                weight_sum += tl.sum(wr, axis=1, keep_dims=True)
                weighted_logits += tl.sum(wrx, axis=1, keep_dims=True)
            row_max, row_sum = combine_lanes(lane_max, lane_sum)
        else:
            col = column_block(0, BLOCK_N)
            x, wr, wrx, in_bounds = load_probability_block(
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
            weighted_logits = tl.sum(wrx, axis=1, keep_dims=True)
        log_sum = tl.log(row_sum)
        lse = row_max + log_sum
        loss = weight_sum * log_sum + (weight_sum * row_max - weighted_logits) + z_loss * lse * lse
        tl.store(loss_ptr + row, loss, mask=row_mask)
        if STORE_GRAD:
            probability_coef = weight_sum + 2.0 * z_loss * lse
            grad_rows = row_starts(grad_ptr, outer, inner, grad_stride_outer, grad_stride_inner, ALIGN)
            if ONLINE:
                n_blocks = tl.cdiv(n_cols, BLOCK_N)
                for back in tl.range(0, n_blocks):
                    col = column_block((n_blocks - 1 - back) * BLOCK_N, BLOCK_N)
                    x, wr, wrx, in_bounds = load_probability_block(
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
