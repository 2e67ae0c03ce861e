"""Softmax forward and backward kernels over the rows of a [n_rows, n_cols] view.

Softmax is memory bound: a kernel is as fast as the bytes it moves. Each kernel covers
three regimes with compile-time switches, so one body serves them all:

- ``ROWS > 1``: several short rows per program, one [ROWS, BLOCK_N] tile.
- ``ROWS == 1`` and not ``ONLINE``: the whole row sits in registers; one read, one write.
- ``ONLINE``: the row is longer than a tile. The forward keeps a running max and a
  rescaled sum per lane (online softmax), then normalises in a second sweep; the backward
  accumulates sum(dy * y) per lane, then writes dx. The second sweep walks the row
  backwards so the tiles read last, still in L2, are read again first.

Programs are persistent: each strides over blocks of rows, so any row count fits the grid.
Row offsets are int64; column offsets stay int32 unless n_cols itself needs int64.
"""

import triton
import triton.language as tl


@triton.jit
def _softmax_forward_kernel(
    x_ptr,
    y_ptr,
    n_rows,
    n_cols,
    x_row_stride,
    y_row_stride,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ONLINE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_N)[None, :]
    row_in_block = tl.arange(0, ROWS)[:, None].to(tl.int64)
    for row_block in tl.range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        rows = row_in_block + row_block * ROWS
        row_mask = rows < n_rows
        x_rows = x_ptr + rows * x_row_stride
        y_rows = y_ptr + rows * y_row_stride
        if ONLINE:
            lane_max = tl.full([ROWS, BLOCK_N], float("-inf"), COMPUTE_DTYPE)
            lane_sum = tl.zeros([ROWS, BLOCK_N], COMPUTE_DTYPE)
            for start in tl.range(0, n_cols, BLOCK_N):
                mask = row_mask & (start + cols < n_cols)
                x = tl.load(x_rows + start + cols, mask=mask, other=float("-inf")).to(COMPUTE_DTYPE)
                new_max = tl.maximum(lane_max, x)
                # A lane that has seen only -inf keeps its sum at 0 instead of exp(-inf - -inf) = NaN.
                shift = tl.where(new_max == float("-inf"), 0.0, new_max)
                lane_sum = lane_sum * tl.exp(lane_max - shift) + tl.exp(x - shift)
                lane_max = new_max
            row_max = tl.max(lane_max, axis=1, keep_dims=True)
            row_sum = tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=1, keep_dims=True)
            inv_sum = 1.0 / row_sum
            n_tiles = tl.cdiv(n_cols, BLOCK_N)
            for tile in tl.range(0, n_tiles):
                start = (n_tiles - 1 - tile) * BLOCK_N
                mask = row_mask & (start + cols < n_cols)
                x = tl.load(x_rows + start + cols, mask=mask, other=float("-inf")).to(COMPUTE_DTYPE)
                y = tl.exp(x - row_max) * inv_sum
                tl.store(y_rows + start + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            mask = row_mask & (cols < n_cols)
            x = tl.load(x_rows + cols, mask=mask, other=float("-inf")).to(COMPUTE_DTYPE)
            e = tl.exp(x - tl.max(x, axis=1, keep_dims=True))
            y = e * (1.0 / tl.sum(e, axis=1, keep_dims=True))
            tl.store(y_rows + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_backward_kernel(
    y_ptr,
    dy_ptr,
    dx_ptr,
    n_rows,
    n_cols,
    y_row_stride,
    dy_row_stride,
    dx_row_stride,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ONLINE: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_N)[None, :]
    row_in_block = tl.arange(0, ROWS)[:, None].to(tl.int64)
    for row_block in tl.range(tl.program_id(0), tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        rows = row_in_block + row_block * ROWS
        row_mask = rows < n_rows
        y_rows = y_ptr + rows * y_row_stride
        dy_rows = dy_ptr + rows * dy_row_stride
        dx_rows = dx_ptr + rows * dx_row_stride
        if ONLINE:
            lane_dot = tl.zeros([ROWS, BLOCK_N], COMPUTE_DTYPE)
            for start in tl.range(0, n_cols, BLOCK_N):
                mask = row_mask & (start + cols < n_cols)
                y = tl.load(y_rows + start + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
                dy = tl.load(dy_rows + start + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
                lane_dot += y * dy
            row_dot = tl.sum(lane_dot, axis=1, keep_dims=True)
            n_tiles = tl.cdiv(n_cols, BLOCK_N)
            for tile in tl.range(0, n_tiles):
                start = (n_tiles - 1 - tile) * BLOCK_N
                mask = row_mask & (start + cols < n_cols)
                y = tl.load(y_rows + start + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
                dy = tl.load(dy_rows + start + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
                dx = y * (dy - row_dot)
                tl.store(dx_rows + start + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        else:
            mask = row_mask & (cols < n_cols)
            y = tl.load(y_rows + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            dy = tl.load(dy_rows + cols, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            dx = y * (dy - tl.sum(y * dy, axis=1, keep_dims=True))
            tl.store(dx_rows + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
