"""Row statistics, for a softmax over a dim sharded across processes.

Each shard computes its rows' statistics, the shards combine them (between launches, on the
host), and each shard then writes its own slice from the combined values in one sweep, even
for rows too long to stay on chip:

- forward: ``row_statistics_kernel`` writes each row's (max, sum of exp(x - max));
  ``normalise_with_lse_kernel`` writes y from the rows' log-sum-exp, in two parts;
- backward: ``backward_row_sums_kernel`` writes each row's sum of dy * y (softmax) or of dy
  (log-softmax); ``backward_with_row_sums_kernel`` writes dx from them.
"""

import triton
import triton.language as tl

from .tiles import (
    block_statistics,
    check_product,
    column_block,
    input_grad_sweep,
    load_block,
    online_row_sums,
    online_statistics,
    row_starts,
    store_block,
    summand,
    tile_count,
    tile_rows,
)


@triton.jit
def row_statistics_kernel(
    x_ptr,
    stats_ptr,  # output, [rows, 2]: each row's (max, sum of exp(x - max))
    n_outer,
    n_cols,  # divided by ALIGN, as are the outer and inner strides
    n_inner,
    x_stride_outer,
    x_stride_col,
    x_stride_inner,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ONLINE: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """A row of only -inf gets (-inf, 0), the identity when shards combine; one holding a NaN, a NaN sum."""
    n_cols = n_cols * ALIGN
    for tile in tl.range(tl.program_id(0), tile_count(n_outer, n_inner, ROWS), tl.num_programs(0)):
        outer, inner, row_mask, row = tile_rows(tile, n_inner, ROWS)
        x_rows = row_starts(x_ptr, outer, inner, x_stride_outer, x_stride_inner, ALIGN)
        if ONLINE:
            row_max, row_sum = online_statistics(
                x_rows, x_stride_col, row_mask, 0, n_cols, ROWS, BLOCK_N, COMPUTE_DTYPE
            )
        else:
            col = column_block(0, BLOCK_N)
            x = load_block(x_rows, x_stride_col, col, row_mask & (col < n_cols), float("-inf"), COMPUTE_DTYPE)
            row_max, row_sum = block_statistics(x)
        tl.store(stats_ptr + 2 * row, row_max, mask=row_mask)
        tl.store(stats_ptr + 2 * row + 1, row_sum, mask=row_mask)


@triton.jit
def normalise_with_lse_kernel(
    x_ptr,
    y_ptr,  # output: exp(x - lse), or x - lse for log-softmax
    lse_ptr,  # [rows, 2]: each row's log-sum-exp over every shard, as (max, log Σ exp(x - max))
    n_outer,
    n_cols,
    n_inner,
    x_stride_outer,
    x_stride_col,
    x_stride_inner,
    y_stride_outer,
    y_stride_col,
    y_stride_inner,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    LOG: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    n_cols = n_cols * ALIGN
    for tile in tl.range(tl.program_id(0), tile_count(n_outer, n_inner, ROWS), tl.num_programs(0)):
        outer, inner, row_mask, row = tile_rows(tile, n_inner, ROWS)
        x_rows = row_starts(x_ptr, outer, inner, x_stride_outer, x_stride_inner, ALIGN)
        # In two parts: x - max is exact for the large logits, where x - (max + log Σ) would keep
        # the rounding of max + log Σ (|x|·eps).
        row_max = tl.load(lse_ptr + 2 * row, mask=row_mask).to(COMPUTE_DTYPE)
        log_sum = tl.load(lse_ptr + 2 * row + 1, mask=row_mask).to(COMPUTE_DTYPE)
        y_rows = row_starts(y_ptr, outer, inner, y_stride_outer, y_stride_inner, ALIGN)
        for start in tl.range(0, n_cols, BLOCK_N):
            col = column_block(start, BLOCK_N)
            in_bounds = row_mask & (col < n_cols)
            x = load_block(x_rows, x_stride_col, col, in_bounds, float("-inf"), COMPUTE_DTYPE)
            log_y = (x - row_max) - log_sum
            store_block(y_rows, y_stride_col, col, in_bounds, log_y if LOG else tl.exp(log_y))


@triton.jit
def backward_row_sums_kernel(
    y_ptr,
    dy_ptr,
    row_sums_ptr,  # output, [rows]: the PRODUCT's row sums (tiles.summand)
    n_outer,
    n_cols,
    n_inner,
    y_stride_outer,
    y_stride_col,
    y_stride_inner,
    dy_stride_outer,
    dy_stride_col,
    dy_stride_inner,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ONLINE: tl.constexpr,
    PRODUCT: tl.constexpr,  # see tiles.check_product
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    check_product(PRODUCT)
    n_cols = n_cols * ALIGN
    for tile in tl.range(tl.program_id(0), tile_count(n_outer, n_inner, ROWS), tl.num_programs(0)):
        outer, inner, row_mask, row = tile_rows(tile, n_inner, ROWS)
        y_rows = row_starts(y_ptr, outer, inner, y_stride_outer, y_stride_inner, ALIGN)
        dy_rows = row_starts(dy_ptr, outer, inner, dy_stride_outer, dy_stride_inner, ALIGN)
        if ONLINE:
            row_sum = online_row_sums(
                y_rows, y_stride_col, dy_rows, dy_stride_col, row_mask, 0, n_cols, PRODUCT, ROWS, BLOCK_N, COMPUTE_DTYPE
            )
        else:
            col = column_block(0, BLOCK_N)
            in_bounds = row_mask & (col < n_cols)
            y = load_block(y_rows, y_stride_col, col, in_bounds, 0.0, COMPUTE_DTYPE)
            dy = load_block(dy_rows, dy_stride_col, col, in_bounds, 0.0, COMPUTE_DTYPE)
            row_sum = tl.sum(summand(y, dy, PRODUCT), axis=1, keep_dims=True)
        tl.store(row_sums_ptr + row, row_sum, mask=row_mask)


@triton.jit
def backward_with_row_sums_kernel(
    y_ptr,
    dy_ptr,
    dx_ptr,  # output: the input's gradient
    row_sums_ptr,  # [rows]: each row's sum, over every shard (see backward_row_sums_kernel)
    n_outer,
    n_cols,
    n_inner,
    y_stride_outer,
    y_stride_col,
    y_stride_inner,
    dy_stride_outer,
    dy_stride_col,
    dy_stride_inner,
    dx_stride_outer,
    dx_stride_col,
    dx_stride_inner,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    PRODUCT: tl.constexpr,  # see tiles.check_product
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    check_product(PRODUCT)
    n_cols = n_cols * ALIGN
    for tile in tl.range(tl.program_id(0), tile_count(n_outer, n_inner, ROWS), tl.num_programs(0)):
        outer, inner, row_mask, row = tile_rows(tile, n_inner, ROWS)
        y_rows = row_starts(y_ptr, outer, inner, y_stride_outer, y_stride_inner, ALIGN)
        dy_rows = row_starts(dy_ptr, outer, inner, dy_stride_outer, dy_stride_inner, ALIGN)
        row_sum = tl.load(row_sums_ptr + row, mask=row_mask).to(COMPUTE_DTYPE)
        dx_rows = row_starts(dx_ptr, outer, inner, dx_stride_outer, dx_stride_inner, ALIGN)
        input_grad_sweep(
            y_rows,
            y_stride_col,
            dy_rows,
            dy_stride_col,
            dx_rows,
            dx_stride_col,
            row_mask,
            0,
            n_cols,
            row_sum,
            1.0,
            PRODUCT,
            BLOCK_N,
            COMPUTE_DTYPE,
        )
