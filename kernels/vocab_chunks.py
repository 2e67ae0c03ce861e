"""Cross-entropy over a vocabulary taken a chunk of classes at a time (``linear_cross_entropy``
when even one chunk of tokens' logits over the whole vocabulary is too large to hold).

A row is one token's logits over one chunk of the classes, [vocab_start, vocab_start + n_cols).
Its loss needs the whole row's log-sum-exp, and each chunk's gradient needs that lse, so:

- ``vocab_chunk_statistics_kernel`` merges the chunk into each row's running statistics,
  (max, Σ exp(x' - max), the target's logit x'_t, Σ x'), in one sweep;
- once every chunk is merged, ``vocab_chunk_grad_kernel`` writes a chunk's gradient from them,
  over its logits if asked: (p·(1 + 2z·lse) - (1 - ε)·[c = t] - ε/C)·cap'·scale, one sweep.

The math is ``cross_entropy``'s (class weights aside), from its steps: the capped logits x', the
target's column, the block sums and the gradient's block.
"""

import triton
import triton.language as tl

from .cross_entropy import index_block_sums, index_grad_block, is_target, load_capped, row_validity, smoothing_weights
from .tiles import column_block, fp32_pair, row_starts, store_block, tile_count, tile_rows

# The statistics of a row: (max, Σ exp(x' - max), x'_t, Σ x'), in COMPUTE_DTYPE.
STATISTICS = tl.constexpr(4)


@triton.jit
def merged_statistics(max_a, sum_a, max_b, sum_b):
    """The (max, Σ exp(x - max)) of two parts of a row from theirs; a part that saw only -inf adds nothing."""
    row_max = tl.maximum(max_a, max_b)
    shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    return row_max, sum_a * tl.exp(max_a - shift) + sum_b * tl.exp(max_b - shift)


@triton.jit
def merged_block(row_max, row_sum, x):
    """The rows' (max, Σ exp(x - max)) with a block of x merged in, reduced at once: two [ROWS, 1]
    running values instead of online lanes the size of the block, which beside x, the target's and
    the smoothing's sums would spill."""
    block_max = tl.max(x, axis=1, keep_dims=True)
    shift = tl.where(block_max == float("-inf"), 0.0, block_max)
    return merged_statistics(row_max, row_sum, block_max, tl.sum(tl.exp(x - shift), axis=1, keep_dims=True))


@triton.jit
def vocab_chunk_statistics_kernel(
    x_ptr,  # one chunk of the logits: classes [vocab_start, vocab_start + n_cols) of each row
    target_ptr,  # [rows] class indices, int64, over the whole vocabulary
    stats_ptr,  # [rows, STATISTICS] in COMPUTE_DTYPE, read and written: the chunks merged so far
    n_outer,
    n_cols,  # the chunk's classes, divided by ALIGN, as are the outer and inner strides
    n_inner,
    x_stride_outer,
    x_stride_col,
    x_stride_inner,
    vocab_start,
    softcap_high,  # the cap as an fp32 pair (see tiles.fp32_pair)
    softcap_low,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    SMOOTHING: tl.constexpr,  # keep Σ x' (label smoothing)
    SOFTCAP: tl.constexpr,
):
    n_cols = n_cols * ALIGN
    softcap = fp32_pair(softcap_high, softcap_low, COMPUTE_DTYPE)
    for tile in tl.range(tl.program_id(0), tile_count(n_outer, n_inner, ROWS), tl.num_programs(0)):
        outer, inner, row_mask, row = tile_rows(tile, n_inner, ROWS)
        local_target = tl.load(target_ptr + row, mask=row_mask, other=-1) - vocab_start
        in_chunk = (local_target >= 0) & (local_target < n_cols)
        x_rows = row_starts(x_ptr, outer, inner, x_stride_outer, x_stride_inner, ALIGN)
        chunk_max = tl.full([ROWS, 1], float("-inf"), COMPUTE_DTYPE)
        chunk_sum = tl.zeros([ROWS, 1], COMPUTE_DTYPE)
        target_logit = tl.zeros([ROWS, 1], COMPUTE_DTYPE)
        smooth_sum = tl.zeros([ROWS, 1], COMPUTE_DTYPE)
        for start in tl.range(0, n_cols, BLOCK_N):
            col = column_block(start, BLOCK_N)
            col_ok = col < n_cols
            in_bounds = row_mask & col_ok
            x = load_capped(x_rows, x_stride_col, col, in_bounds, softcap, SOFTCAP, COMPUTE_DTYPE)
            chunk_max, chunk_sum = merged_block(chunk_max, chunk_sum, x)
            u = smoothing_weights(None, col, col_ok, BLOCK_N, SMOOTHING, False, COMPUTE_DTYPE)
            hit = is_target(local_target, in_chunk, start, BLOCK_N)
            block_target, block_smooth = index_block_sums(x, hit, in_bounds, u, SMOOTHING)
            target_logit += block_target
            smooth_sum += block_smooth
        stats = stats_ptr + STATISTICS * row
        row_max, row_sum = merged_statistics(
            tl.load(stats, mask=row_mask), tl.load(stats + 1, mask=row_mask), chunk_max, chunk_sum
        )
        tl.store(stats, row_max, mask=row_mask)
        tl.store(stats + 1, row_sum, mask=row_mask)
        tl.store(stats + 2, tl.load(stats + 2, mask=row_mask) + target_logit, mask=row_mask)
        tl.store(stats + 3, tl.load(stats + 3, mask=row_mask) + smooth_sum, mask=row_mask)


@triton.jit
def vocab_chunk_grad_kernel(
    x_ptr,  # one chunk of the logits, as in vocab_chunk_statistics_kernel
    grad_ptr,  # output, shaped like the chunk (x_ptr itself to overwrite it): its logits' gradient
    target_ptr,  # [rows] class indices, int64, over the whole vocabulary
    stats_ptr,  # [rows, STATISTICS]: every chunk merged (vocab_chunk_statistics_kernel)
    scale_ptr,  # [rows] in COMPUTE_DTYPE: each row's factor (the reduction's, the upstream gradient's)
    n_outer,
    n_cols,  # the chunk's classes, divided by ALIGN, as are the outer and inner strides
    n_inner,
    x_stride_outer,
    x_stride_col,
    x_stride_inner,
    grad_stride_outer,
    grad_stride_col,
    grad_stride_inner,
    vocab_start,
    n_classes,  # the whole vocabulary
    ignore_index,
    smoothing_high,  # ε, z and the cap as fp32 pairs (see tiles.fp32_pair)
    smoothing_low,
    z_loss_high,
    z_loss_low,
    softcap_high,
    softcap_low,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    SMOOTHING: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """0 on ignored rows, NaN on rows whose target is not a class, as ``cross_entropy_kernel``."""
    n_cols = n_cols * ALIGN
    eps = fp32_pair(smoothing_high, smoothing_low, COMPUTE_DTYPE)
    z_loss = fp32_pair(z_loss_high, z_loss_low, COMPUTE_DTYPE)
    softcap = fp32_pair(softcap_high, softcap_low, COMPUTE_DTYPE)
    target_coef = 1.0 - eps
    smooth_coef = eps / n_classes
    for tile in tl.range(tl.program_id(0), tile_count(n_outer, n_inner, ROWS), tl.num_programs(0)):
        outer, inner, row_mask, row = tile_rows(tile, n_inner, ROWS)
        target = tl.load(target_ptr + row, mask=row_mask, other=ignore_index)
        valid, in_range = row_validity(target, row_mask, ignore_index, n_classes)
        local_target = target - vocab_start
        in_chunk = (local_target >= 0) & (local_target < n_cols)
        stats = stats_ptr + STATISTICS * row
        row_max = tl.load(stats, mask=row_mask, other=0.0)
        log_sum = tl.log(tl.load(stats + 1, mask=row_mask, other=1.0))
        probability_coef = 1.0 + 2.0 * z_loss * (row_max + log_sum)
        scale = tl.load(scale_ptr + row, mask=row_mask, other=0.0)
        x_rows = row_starts(x_ptr, outer, inner, x_stride_outer, x_stride_inner, ALIGN)
        grad_rows = row_starts(grad_ptr, outer, inner, grad_stride_outer, grad_stride_inner, ALIGN)
        for start in tl.range(0, n_cols, BLOCK_N):
            col = column_block(start, BLOCK_N)
            col_ok = col < n_cols
            in_bounds = row_mask & col_ok
            x = load_capped(x_rows, x_stride_col, col, in_bounds, softcap, SOFTCAP, COMPUTE_DTYPE)
            g = index_grad_block(
                x,
                is_target(local_target, in_chunk, start, BLOCK_N),
                row_max,
                log_sum,
                probability_coef,
                target_coef,
                smoothing_weights(None, col, col_ok, BLOCK_N, SMOOTHING, False, COMPUTE_DTYPE),
                smooth_coef,
                scale,
                valid,
                in_range,
                softcap,
                SOFTCAP,
            )
            store_block(grad_rows, grad_stride_col, col, in_bounds, g)
