"""Softmax and log-softmax, forward and backward, over one dim of a strided tensor.

Softmax is memory bound: a kernel is as fast as the bytes it moves. Each kernel serves two
regimes, chosen at compile time by the launch heuristic:

- ``ONLINE`` off: the whole row of every row in the tile sits in registers; one read, one
  write. Many short rows share a tile when ROWS > 1.
- ``ONLINE`` on: the row is longer than a block. The forward keeps a running max and a rescaled
  sum per lane (online softmax), then normalises in a second sweep; the backward accumulates
  its row sum per lane, then writes dx. The second sweep walks the row backwards, so the
  blocks read last, still in L2, are read again first.

``LOG`` gives log-softmax from the same statistics. The backward kernel's ``PRODUCT`` also
serves forward-mode AD: a tangent times the Jacobian has the same row-sum structure. See
``tiles`` for the layout, the alignment (ALIGN) and the math dtype.
"""

import triton
import triton.language as tl

from .tiles import (
    block_statistics,
    check_product,
    column_block,
    fp32_pair,
    input_grad,
    input_grad_sweep,
    load_block,
    normalise,
    normalising_sweep,
    online_row_sums,
    online_statistics,
    row_starts,
    store_block,
    summand,
    tile_count,
    tile_rows,
)


@triton.jit
def softmax_forward_kernel(
    x_ptr,  # input
    y_ptr,  # output, softmax (or log-softmax) of x
    n_outer,
    n_cols,  # the softmax dim's length, divided by ALIGN
    n_inner,
    x_stride_outer,  # divided by ALIGN, as is every outer and inner stride
    x_stride_col,
    x_stride_inner,
    y_stride_outer,
    y_stride_col,
    y_stride_inner,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ONLINE: tl.constexpr,
    LOG: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    n_cols = n_cols * ALIGN
    for tile in tl.range(tl.program_id(0), tile_count(n_outer, n_inner, ROWS), tl.num_programs(0)):
        outer, inner, row_mask, _ = tile_rows(tile, n_inner, ROWS)
        x_rows = row_starts(x_ptr, outer, inner, x_stride_outer, x_stride_inner, ALIGN)
        # Output addresses are formed after the statistics, so they are not held across the reductions.
        if ONLINE:
            row_max, row_sum = online_statistics(
                x_rows, x_stride_col, row_mask, 0, n_cols, ROWS, BLOCK_N, COMPUTE_DTYPE
            )
            y_rows = row_starts(y_ptr, outer, inner, y_stride_outer, y_stride_inner, ALIGN)
            normalising_sweep(
                x_rows,
                x_stride_col,
                y_rows,
                y_stride_col,
                row_mask,
                0,
                n_cols,
                row_max,
                row_sum,
                LOG,
                BLOCK_N,
                COMPUTE_DTYPE,
            )
        else:
            col = column_block(0, BLOCK_N)
            in_bounds = row_mask & (col < n_cols)
            x = load_block(x_rows, x_stride_col, col, in_bounds, float("-inf"), COMPUTE_DTYPE)
            row_max, row_sum = block_statistics(x)
            y_rows = row_starts(y_ptr, outer, inner, y_stride_outer, y_stride_inner, ALIGN)
            store_block(y_rows, y_stride_col, col, in_bounds, normalise(x, row_max, row_sum, LOG))


@triton.jit
def softmax_backward_kernel(
    y_ptr,  # the forward's output
    dy_ptr,  # its gradient
    dx_ptr,  # output: the input's gradient, times scale
    n_outer,
    n_cols,  # divided by ALIGN, as are the outer and inner strides
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
    scale_high,  # scale = scale_high + scale_low: masked_softmax's, for the gradient of the scores
    scale_low,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ONLINE: tl.constexpr,
    PRODUCT: tl.constexpr,  # see tiles.check_product
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """dx = scale * the PRODUCT of dy with the Jacobian at y. softmax: y * (dy - sum(dy * y));
    log-softmax's vjp (the backward): dy - exp(y) * sum(dy); its jvp (dy a tangent of the input,
    dx the output's): dy - sum(exp(y) * dy)."""
    check_product(PRODUCT)
    n_cols = n_cols * ALIGN
    scale = fp32_pair(scale_high, scale_low, COMPUTE_DTYPE)
    for tile in tl.range(tl.program_id(0), tile_count(n_outer, n_inner, ROWS), tl.num_programs(0)):
        outer, inner, row_mask, _ = tile_rows(tile, n_inner, ROWS)
        y_rows = row_starts(y_ptr, outer, inner, y_stride_outer, y_stride_inner, ALIGN)
        dy_rows = row_starts(dy_ptr, outer, inner, dy_stride_outer, dy_stride_inner, ALIGN)
        if ONLINE:
            row_sum = online_row_sums(
                y_rows, y_stride_col, dy_rows, dy_stride_col, row_mask, 0, n_cols, PRODUCT, ROWS, BLOCK_N, COMPUTE_DTYPE
            )
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
                scale,
                PRODUCT,
                BLOCK_N,
                COMPUTE_DTYPE,
            )
        else:
            col = column_block(0, BLOCK_N)
            in_bounds = row_mask & (col < n_cols)
            y = load_block(y_rows, y_stride_col, col, in_bounds, 0.0, COMPUTE_DTYPE)
            dy = load_block(dy_rows, dy_stride_col, col, in_bounds, 0.0, COMPUTE_DTYPE)
            row_sum = tl.sum(summand(y, dy, PRODUCT), axis=1, keep_dims=True)
            dx_rows = row_starts(dx_ptr, outer, inner, dx_stride_outer, dx_stride_inner, ALIGN)
            store_block(dx_rows, dx_stride_col, col, in_bounds, input_grad(y, dy, row_sum, PRODUCT) * scale)
