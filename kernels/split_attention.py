"""The split-row regime for attention scores: a decoding step's [batch, heads, 1, Lk] scores are
few rows of up to 128k keys and more, where one program per row leaves the GPU idle.

The work items are ``split_row``'s (row, chunk) pairs, and each chunk's scores are loaded,
scaled, capped and masked as the online kernels of ``attention`` load them (``load_scores``,
through the same sweeps over a column range). Two launches each way, their combination exact:

- forward: ``masked_chunk_statistics_kernel`` writes each chunk's (max, sum of exp(z - max));
  ``masked_chunk_normalise_kernel`` combines its row's chunks, adds the row's sink as one more
  element (``with_sinks``), and writes its chunk of y; the chunk at column 0 writes the row's
  log-sum-exp. Under a causal mask a chunk reads only up to its tile's last visible key, and
  a chunk past it is only written, as zeros.
- backward under softcapping or sinks (without them masked_softmax's backward is softmax's,
  split by ``split_row``): ``split_row.chunk_row_sums_kernel`` writes each chunk's part of
  sum(dy * y); ``masked_chunk_grad_kernel`` adds its row's parts and writes its chunk of the
  scores' gradient; the chunk at column 0 writes the row's share of its sink's gradient.

Traffic, as ``split_row``'s: the scores (and a mask) read twice forward, y and dy twice
backward, the outputs written once.
"""

import triton
import triton.language as tl

from .attention import (
    bias_row_starts,
    load_row_values,
    masked_grad_sweep,
    masked_normalising_sweep,
    masked_online_statistics,
    store_log_sum_exp,
    store_sink_grad,
    visible_keys,
    with_sinks,
)
from .split_row import chunk_of, combined_row_sum, combined_statistics, store_chunk_statistics
from .tiles import fp32_pair, row_starts, tile_count


@triton.jit
def chunk_read_stop(start, stop, n_read):
    """The end of the columns of chunk [start, stop) that a sweep reads: those up to the tile's
    last visible key (``visible_keys``); none for a chunk past it."""
    return tl.maximum(start, tl.minimum(stop, n_read))


@triton.jit
def in_first_chunk(row_mask, chunk):
    """``row_mask`` in a row's chunk at column 0, which writes the row's one value (its
    log-sum-exp, its share of a sink's gradient), else none of it. The chunk index is broadcast
    first: the interpreter turns a scalar bool and a bool tensor into an int32 mask."""
    return row_mask & (tl.zeros(row_mask.shape, tl.int32) + chunk == 0)


@triton.jit
def masked_chunk_statistics_kernel(
    x_ptr,  # scores [..., Lq, Lk]
    maxes_ptr,  # output, [rows, n_chunks]: each chunk's max of the masked scores
    sums_ptr,  # output, [rows, n_chunks]: each chunk's sum of exp(z - its max), 0 where the max is -inf
    mask_ptr,  # as in attention.masked_softmax_forward_kernel, as are the arguments down to scale_low
    bias_ptr,
    n_outer,
    n_cols,  # divided by ALIGN, as are chunk_cols, the outer and inner strides and the masks' row strides
    n_inner,
    x_stride_outer,
    x_stride_col,
    x_stride_inner,
    mask_stride_batch,
    mask_stride_head,
    mask_stride_query,
    mask_stride_key,
    n_queries,
    n_heads,
    causal_offset,
    softcap,
    bias_stride_batch,
    bias_stride_head,
    bias_stride_query,
    bias_stride_key,
    bias_n_heads,
    scale_high,
    scale_low,
    chunk_cols,
    n_chunks,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    MASK: tl.constexpr,  # '', 'bool' or 'additive'
    CAUSAL: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BIAS: tl.constexpr,
):
    tl.static_assert(MASK == "" or MASK == "bool" or MASK == "additive", "MASK is '', 'bool' or 'additive'")
    n_cols = n_cols * ALIGN
    chunk_cols = chunk_cols * ALIGN
    scale = fp32_pair(scale_high, scale_low, COMPUTE_DTYPE)
    n_items = tile_count(n_outer, n_inner, ROWS) * n_chunks
    for item in tl.range(tl.program_id(0), n_items, tl.num_programs(0)):
        outer, inner, row_mask, row, chunk, start, stop = chunk_of(item, n_chunks, n_inner, n_cols, chunk_cols, ROWS)
        x_rows = row_starts(x_ptr, outer, inner, x_stride_outer, x_stride_inner, ALIGN)
        batch, query = row // n_queries, row % n_queries
        last_key, n_read = visible_keys(query, causal_offset, n_cols, CAUSAL)
        bias_rows = bias_row_starts(
            bias_ptr, batch, query, bias_n_heads, bias_stride_batch, bias_stride_head, bias_stride_query, ALIGN, BIAS
        )
        chunk_max, chunk_sum = masked_online_statistics(
            x_rows,
            x_stride_col,
            row_mask,
            start,
            chunk_read_stop(start, stop, n_read),
            stop,
            scale,
            last_key,
            batch,
            query,
            mask_ptr,
            mask_stride_batch,
            mask_stride_head,
            mask_stride_query,
            mask_stride_key,
            n_heads,
            softcap,
            bias_rows,
            bias_stride_key,
            ROWS,
            BLOCK_N,
            ALIGN,
            MASK,
            CAUSAL,
            SOFTCAP,
            BIAS,
            COMPUTE_DTYPE,
        )
        store_chunk_statistics(maxes_ptr, sums_ptr, row, chunk, n_chunks, row_mask, chunk_max, chunk_sum)


@triton.jit
def masked_chunk_normalise_kernel(
    x_ptr,  # scores [..., Lq, Lk]
    y_ptr,  # output: their softmax
    maxes_ptr,  # [rows, n_chunks], from masked_chunk_statistics_kernel
    sums_ptr,
    mask_ptr,  # as in attention.masked_softmax_forward_kernel, as are the arguments down to scale_low
    sinks_ptr,
    bias_ptr,
    lse_ptr,
    n_outer,
    n_cols,  # divided by ALIGN, as are chunk_cols, the outer and inner strides and the masks' row strides
    n_inner,
    x_stride_outer,
    x_stride_col,
    x_stride_inner,
    y_stride_outer,
    y_stride_col,
    y_stride_inner,
    mask_stride_batch,
    mask_stride_head,
    mask_stride_query,
    mask_stride_key,
    n_queries,
    n_heads,
    causal_offset,
    n_sink_heads,
    softcap,
    bias_stride_batch,
    bias_stride_head,
    bias_stride_query,
    bias_stride_key,
    bias_n_heads,
    scale_high,
    scale_low,
    chunk_cols,
    n_chunks,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    CHUNKS: tl.constexpr,  # n_chunks, rounded up to a power of two
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    MASK: tl.constexpr,  # '', 'bool' or 'additive'
    CAUSAL: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SINKS: tl.constexpr,
    BIAS: tl.constexpr,
):
    tl.static_assert(MASK == "" or MASK == "bool" or MASK == "additive", "MASK is '', 'bool' or 'additive'")
    n_cols = n_cols * ALIGN
    chunk_cols = chunk_cols * ALIGN
    scale = fp32_pair(scale_high, scale_low, COMPUTE_DTYPE)
    n_items = tile_count(n_outer, n_inner, ROWS) * n_chunks
    for item in tl.range(tl.program_id(0), n_items, tl.num_programs(0)):
        outer, inner, row_mask, row, chunk, start, stop = chunk_of(item, n_chunks, n_inner, n_cols, chunk_cols, ROWS)
        batch, query = row // n_queries, row % n_queries
        row_max, row_sum = combined_statistics(maxes_ptr, sums_ptr, row, n_chunks, row_mask, CHUNKS, COMPUTE_DTYPE)
        row_max, row_sum = with_sinks(
            row_max, row_sum, batch, row_mask, sinks_ptr, n_sink_heads, BLOCK_N, SINKS, COMPUTE_DTYPE
        )
        store_log_sum_exp(lse_ptr, row, in_first_chunk(row_mask, chunk), row_max, row_sum, BLOCK_N, SOFTCAP, SINKS)
        last_key, n_read = visible_keys(query, causal_offset, n_cols, CAUSAL)
        bias_rows = bias_row_starts(
            bias_ptr, batch, query, bias_n_heads, bias_stride_batch, bias_stride_head, bias_stride_query, ALIGN, BIAS
        )
        x_rows = row_starts(x_ptr, outer, inner, x_stride_outer, x_stride_inner, ALIGN)
        y_rows = row_starts(y_ptr, outer, inner, y_stride_outer, y_stride_inner, ALIGN)
        masked_normalising_sweep(
            x_rows,
            x_stride_col,
            y_rows,
            y_stride_col,
            row_mask,
            start,
            chunk_read_stop(start, stop, n_read),
            stop,
            row_max,
            row_sum,
            scale,
            last_key,
            batch,
            query,
            mask_ptr,
            mask_stride_batch,
            mask_stride_head,
            mask_stride_query,
            mask_stride_key,
            n_heads,
            softcap,
            bias_rows,
            bias_stride_key,
            ROWS,
            BLOCK_N,
            ALIGN,
            MASK,
            CAUSAL,
            SOFTCAP,
            BIAS,
            COMPUTE_DTYPE,
        )


@triton.jit
def masked_chunk_grad_kernel(
    y_ptr,  # the forward's output
    dy_ptr,  # its gradient
    dx_ptr,  # output: the scores' gradient
    sums_ptr,  # [rows, n_chunks]: each chunk's part of sum(dy * y), from split_row.chunk_row_sums_kernel
    lse_ptr,  # as in attention.masked_softmax_backward_kernel, as are the arguments down to scale_low
    mask_ptr,
    sinks_ptr,
    sinks_grad_ptr,
    n_outer,
    n_cols,  # divided by ALIGN, as are chunk_cols, the outer and inner strides and the mask's row strides
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
    mask_stride_batch,
    mask_stride_head,
    mask_stride_query,
    mask_stride_key,
    n_queries,
    n_heads,
    n_sink_heads,
    softcap,
    scale_high,
    scale_low,
    chunk_cols,
    n_chunks,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    CHUNKS: tl.constexpr,  # n_chunks, rounded up to a power of two
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    MASK: tl.constexpr,  # '' or 'additive'
    SOFTCAP: tl.constexpr,
    SINKS: tl.constexpr,
):
    tl.static_assert(MASK == "" or MASK == "additive", "MASK is '' or 'additive'")
    n_cols = n_cols * ALIGN
    chunk_cols = chunk_cols * ALIGN
    scale = fp32_pair(scale_high, scale_low, COMPUTE_DTYPE)
    n_items = tile_count(n_outer, n_inner, ROWS) * n_chunks
    for item in tl.range(tl.program_id(0), n_items, tl.num_programs(0)):
        outer, inner, row_mask, row, chunk, start, stop = chunk_of(item, n_chunks, n_inner, n_cols, chunk_cols, ROWS)
        batch, query = row // n_queries, row % n_queries
        row_sum = combined_row_sum(sums_ptr, row, n_chunks, row_mask, CHUNKS, COMPUTE_DTYPE)
        lse = load_row_values(lse_ptr + row, row_mask, BLOCK_N, COMPUTE_DTYPE)
        y_rows = row_starts(y_ptr, outer, inner, y_stride_outer, y_stride_inner, ALIGN)
        dy_rows = row_starts(dy_ptr, outer, inner, dy_stride_outer, dy_stride_inner, ALIGN)
        dx_rows = row_starts(dx_ptr, outer, inner, dx_stride_outer, dx_stride_inner, ALIGN)
        masked_grad_sweep(
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
            lse,
            batch,
            query,
            mask_ptr,
            mask_stride_batch,
            mask_stride_head,
            mask_stride_query,
            mask_stride_key,
            n_heads,
            softcap,
            scale,
            BLOCK_N,
            ALIGN,
            MASK,
            SOFTCAP,
            COMPUTE_DTYPE,
        )
        if SINKS:
            store_sink_grad(
                sinks_ptr,
                sinks_grad_ptr,
                row,
                n_queries,
                n_sink_heads,
                lse,
                row_sum,
                in_first_chunk(row_mask, chunk),
                BLOCK_N,
                COMPUTE_DTYPE,
            )
