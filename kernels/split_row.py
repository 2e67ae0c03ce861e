"""The split-row regime: a row cut into chunks that several programs work on, for rows too few
to fill the GPU (a decoding batch over a vocabulary: 1 to 128 rows of 32k to 256k).

One program per row leaves SMs idle and keeps one tile in flight per row; here every (row,
chunk) pair is a work item. Each softmax runs in two launches, and their combination is exact:

- forward: ``chunk_statistics_kernel`` writes each chunk's (max, sum of exp(x - max));
  ``chunk_normalise_kernel`` combines its row's chunks, as online softmax combines lanes, and
  writes its chunk of y;
- backward (and forward-mode tangents): ``chunk_row_sums_kernel`` writes each chunk's part of
  the product's row sum (``tiles.summand``); ``chunk_product_kernel`` adds its row's parts and
  writes its chunk of the product.

The second launch reads the chunk again: 3/2 of the minimum traffic forward, 5/3 backward, the
second read coming back from L2 when the tensor fits there, as the few rows of this regime
mostly do. Chunks are whole blocks (``chunk_cols`` is a multiple of BLOCK_N, divided by ALIGN
as the strides are), so every chunk starts aligned.
"""

import triton
import triton.language as tl

from .tiles import (
    check_product,
    combine_lanes,
    fp32_pair,
    input_grad_sweep,
    normalising_sweep,
    online_row_sums,
    online_statistics,
    row_starts,
    tile_count,
    tile_rows,
)


@triton.jit
def chunk_of(item, n_chunks, n_inner, n_cols, chunk_cols, ROWS: tl.constexpr):
    """Work item ``item``'s tile (see ``tiles.tile_rows``), its chunk index and columns [start, stop),
    in int32: a row's columns are fewer than 2^31."""
    tile = item // n_chunks
    chunk = tl.cast(item % n_chunks, tl.int32)
    outer, inner, row_mask, row = tile_rows(tile, n_inner, ROWS)
    start = chunk * chunk_cols
    return outer, inner, row_mask, row, chunk, start, tl.minimum(start + chunk_cols, n_cols)


@triton.jit
def row_chunks(ptr, row, n_chunks, row_mask, CHUNKS: tl.constexpr):
    """Pointers to the per-chunk values of the tile's rows, [ROWS, CHUNKS], and which exist."""
    chunk = tl.arange(0, CHUNKS)[None, :]
    return ptr + row * n_chunks + chunk, row_mask & (chunk < n_chunks)


@triton.jit
def store_chunk_statistics(maxes_ptr, sums_ptr, row, chunk, n_chunks, row_mask, chunk_max, chunk_sum):
    """A chunk's (max, sum of exp(x - max)) into its rows' slots: a chunk of only -inf has a sum
    of 0 and adds nothing when the row's chunks combine; one holding a NaN, a NaN sum."""
    at = row * n_chunks + chunk
    tl.store(maxes_ptr + at, chunk_max, mask=row_mask)
    tl.store(sums_ptr + at, chunk_sum, mask=row_mask)
    return chunk_max


@triton.jit
def combined_statistics(
    maxes_ptr, sums_ptr, row, n_chunks, row_mask, CHUNKS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr
):
    """Each row's (max, sum of exp(x - max)) from its chunks', combined exactly (as online
    softmax combines lanes)."""
    maxes, known = row_chunks(maxes_ptr, row, n_chunks, row_mask, CHUNKS)
    sums, _ = row_chunks(sums_ptr, row, n_chunks, row_mask, CHUNKS)
    return combine_lanes(
        tl.load(maxes, mask=known, other=float("-inf")).to(COMPUTE_DTYPE),
        tl.load(sums, mask=known, other=0.0).to(COMPUTE_DTYPE),
    )


@triton.jit
def combined_row_sum(sums_ptr, row, n_chunks, row_mask, CHUNKS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """Each row's sum of its chunks' parts of the product's row sum."""
    parts, known = row_chunks(sums_ptr, row, n_chunks, row_mask, CHUNKS)
    return tl.sum(tl.load(parts, mask=known, other=0.0).to(COMPUTE_DTYPE), axis=1, keep_dims=True)


@triton.jit
def chunk_statistics_kernel(
    x_ptr,
    maxes_ptr,  # output, [rows, n_chunks]: each chunk's max
    sums_ptr,  # output, [rows, n_chunks]: each chunk's sum of exp(x - its max), 0 where the max is -inf
    n_outer,
    n_cols,  # divided by ALIGN, as are chunk_cols and the outer and inner strides
    n_inner,
    x_stride_outer,
    x_stride_col,
    x_stride_inner,
    chunk_cols,
    n_chunks,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    n_cols = n_cols * ALIGN
    chunk_cols = chunk_cols * ALIGN
    n_items = tile_count(n_outer, n_inner, ROWS) * n_chunks
    for item in tl.range(tl.program_id(0), n_items, tl.num_programs(0)):
        outer, inner, row_mask, row, chunk, start, stop = chunk_of(item, n_chunks, n_inner, n_cols, chunk_cols, ROWS)
        x_rows = row_starts(x_ptr, outer, inner, x_stride_outer, x_stride_inner, ALIGN)
        chunk_max, chunk_sum = online_statistics(
            x_rows, x_stride_col, row_mask, start, stop, ROWS, BLOCK_N, COMPUTE_DTYPE
        )
        store_chunk_statistics(maxes_ptr, sums_ptr, row, chunk, n_chunks, row_mask, chunk_max, chunk_sum)


@triton.jit
def chunk_normalise_kernel(
    x_ptr,
    y_ptr,  # output: softmax (or log-softmax) of x
    maxes_ptr,  # [rows, n_chunks], from chunk_statistics_kernel
    sums_ptr,
    n_outer,
    n_cols,
    n_inner,
    x_stride_outer,
    x_stride_col,
    x_stride_inner,
    y_stride_outer,
    y_stride_col,
    y_stride_inner,
    chunk_cols,
    n_chunks,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    CHUNKS: tl.constexpr,  # n_chunks, rounded up to a power of two
    LOG: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    n_cols = n_cols * ALIGN
    chunk_cols = chunk_cols * ALIGN
    n_items = tile_count(n_outer, n_inner, ROWS) * n_chunks
    for item in tl.range(tl.program_id(0), n_items, tl.num_programs(0)):
        outer, inner, row_mask, row, _, start, stop = chunk_of(item, n_chunks, n_inner, n_cols, chunk_cols, ROWS)
        row_max, row_sum = combined_statistics(maxes_ptr, sums_ptr, row, n_chunks, row_mask, CHUNKS, COMPUTE_DTYPE)
        x_rows = row_starts(x_ptr, outer, inner, x_stride_outer, x_stride_inner, ALIGN)
        y_rows = row_starts(y_ptr, outer, inner, y_stride_outer, y_stride_inner, ALIGN)
        normalising_sweep(
            x_rows,
            x_stride_col,
            y_rows,
            y_stride_col,
            row_mask,
            start,
            stop,
            row_max,
            row_sum,
            LOG,
            BLOCK_N,
            COMPUTE_DTYPE,
        )


@triton.jit
def chunk_row_sums_kernel(
    y_ptr,
    dy_ptr,
    sums_ptr,  # output, [rows, n_chunks]: each chunk's part of the PRODUCT's row sum
    n_outer,
    n_cols,
    n_inner,
    y_stride_outer,
    y_stride_col,
    y_stride_inner,
    dy_stride_outer,
    dy_stride_col,
    dy_stride_inner,
    chunk_cols,
    n_chunks,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    PRODUCT: tl.constexpr,  # see tiles.check_product
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    check_product(PRODUCT)
    n_cols = n_cols * ALIGN
    chunk_cols = chunk_cols * ALIGN
    n_items = tile_count(n_outer, n_inner, ROWS) * n_chunks
    for item in tl.range(tl.program_id(0), n_items, tl.num_programs(0)):
        outer, inner, row_mask, row, chunk, start, stop = chunk_of(item, n_chunks, n_inner, n_cols, chunk_cols, ROWS)
        y_rows = row_starts(y_ptr, outer, inner, y_stride_outer, y_stride_inner, ALIGN)
        dy_rows = row_starts(dy_ptr, outer, inner, dy_stride_outer, dy_stride_inner, ALIGN)
        chunk_sum = online_row_sums(
            y_rows, y_stride_col, dy_rows, dy_stride_col, row_mask, start, stop, PRODUCT, ROWS, BLOCK_N, COMPUTE_DTYPE
        )
        tl.store(sums_ptr + row * n_chunks + chunk, chunk_sum, mask=row_mask)


@triton.jit
def chunk_product_kernel(
    y_ptr,
    dy_ptr,
    dx_ptr,  # output: scale times the PRODUCT of dy with the Jacobian at y
    sums_ptr,  # [rows, n_chunks], from chunk_row_sums_kernel
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
    chunk_cols,
    n_chunks,
    scale_high,  # scale = scale_high + scale_low (see tiles.fp32_pair)
    scale_low,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    CHUNKS: tl.constexpr,
    PRODUCT: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    check_product(PRODUCT)
    n_cols = n_cols * ALIGN
    chunk_cols = chunk_cols * ALIGN
    scale = fp32_pair(scale_high, scale_low, COMPUTE_DTYPE)
    n_items = tile_count(n_outer, n_inner, ROWS) * n_chunks
    for item in tl.range(tl.program_id(0), n_items, tl.num_programs(0)):
        outer, inner, row_mask, row, _, start, stop = chunk_of(item, n_chunks, n_inner, n_cols, chunk_cols, ROWS)
        row_sum = combined_row_sum(sums_ptr, row, n_chunks, row_mask, CHUNKS, COMPUTE_DTYPE)
        y_rows = row_starts(y_ptr, outer, inner, y_stride_outer, y_stride_inner, ALIGN)
        dy_rows = row_starts(dy_ptr, outer, inner, dy_stride_outer, dy_stride_inner, ALIGN)
        dx_rows = row_starts(dx_ptr, outer, inner, dx_stride_outer, dx_stride_inner, ALIGN)
        input_grad_sweep(
            y_rows,
            y_stride_col,
            dy_rows,
            dy_stride_col,
            dx_rows,
            dx_stride_col,
            row_mask,
            start,
            stop,
            row_sum,
            scale,
            PRODUCT,
            BLOCK_N,
            COMPUTE_DTYPE,
        )
