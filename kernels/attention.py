"""Attention's softmax: softmax(scale * scores + mask) over the last dim of [..., Lq, Lk] scores.

A row is one (batch, head, query) of the scores. The mask is read through its broadcast
strides, the causal diagonal is an index comparison; the math of ``softmax`` otherwise, in
its two regimes. Rows with every key hidden give zeros, as torch's SDPA does. Under a causal
mask the online sweeps stop at the tile's last visible key; the columns after it are only
written, as zeros.
"""

import triton
import triton.language as tl

from .tiles import (
    block_statistics,
    column_block,
    combine_lanes,
    fp32_pair,
    load_block,
    normalise,
    online_step,
    row_starts,
    store_block,
    tile_count,
    tile_rows,
)


@triton.jit
def visible_keys(query, causal_offset, n_cols, CAUSAL: tl.constexpr):
    """(the last key each row sees, the columns a sweep reads). Under a causal mask query i sees
    keys up to i + causal_offset, and a tile's sweeps stop after its last visible key; otherwise
    a row sees every key."""
    if CAUSAL:
        last_key = query + causal_offset
        n_read = tl.minimum(n_cols, tl.maximum(tl.max(last_key) + 1, 0))
    else:
        last_key, n_read = n_cols - 1, n_cols
    return last_key, n_read


@triton.jit
def load_mask(
    mask_ptr,
    batch,
    query,
    n_heads,
    stride_batch,
    stride_head,
    stride_query,
    stride_key,
    col,
    in_bounds,
    other,
    ALIGN: tl.constexpr,
):
    """The mask under score rows (batch, query) at columns ``col``, read through its broadcast
    strides; the dims before [Lq, Lk] arrive folded into two runs, batch x head."""
    offset = (batch // n_heads) * stride_batch + (batch % n_heads) * stride_head + query * stride_query
    return tl.load(mask_ptr + offset * ALIGN + col * stride_key, mask=in_bounds, other=other)


@triton.jit
def load_scores(
    x_rows,
    x_stride_col,
    col,
    in_bounds,
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
    ALIGN: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """scale * x + mask at columns ``col``, hidden keys at -inf. Loads are predicated on the bounds
    alone: a data-dependent predicate would split every 128-bit access into single elements."""
    x = load_block(x_rows, x_stride_col, col, in_bounds, float("-inf"), COMPUTE_DTYPE)
    keep = in_bounds
    if CAUSAL:
        keep = keep & (col <= last_key)
    if MASK == "bool":
        attend = load_mask(
            mask_ptr,
            batch,
            query,
            n_heads,
            mask_stride_batch,
            mask_stride_head,
            mask_stride_query,
            mask_stride_key,
            col,
            in_bounds,
            0,
            ALIGN,
        )
        keep = keep & (attend != 0)
    x = x * scale
    if MASK == "additive":
        bias = load_mask(
            mask_ptr,
            batch,
            query,
            n_heads,
            mask_stride_batch,
            mask_stride_head,
            mask_stride_query,
            mask_stride_key,
            col,
            in_bounds,
            0.0,
            ALIGN,
        )
        x += bias.to(COMPUTE_DTYPE)
    return tl.where(keep, x, float("-inf"))


@triton.jit
def attention_probabilities(x, row_max, row_sum):
    """softmax, with zeros where a row has every key hidden (its max is -inf)."""
    return tl.where(row_max == float("-inf"), 0.0, normalise(x, row_max, row_sum, False))


@triton.jit
def masked_softmax_forward_kernel(
    x_ptr,  # scores [..., Lq, Lk]
    y_ptr,  # output: their softmax
    mask_ptr,  # bool (read as bytes) or additive mask; None without one
    n_outer,
    n_cols,  # Lk, divided by ALIGN, as are the outer and inner strides and the mask's row strides
    n_inner,
    x_stride_outer,
    x_stride_col,
    x_stride_inner,
    y_stride_outer,
    y_stride_col,
    y_stride_inner,
    mask_stride_batch,  # the mask's strides once broadcast to the scores; None without a mask
    mask_stride_head,
    mask_stride_query,
    mask_stride_key,
    n_queries,  # Lq
    n_heads,  # size of the head run of the dims before [Lq, Lk]; None without a mask
    causal_offset,  # query i sees keys <= i + causal_offset; None without a causal mask
    scale_high,  # scale = scale_high + scale_low
    scale_low,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ONLINE: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    MASK: tl.constexpr,  # '', 'bool' or 'additive'
    CAUSAL: tl.constexpr,
):
    tl.static_assert(MASK == "" or MASK == "bool" or MASK == "additive", "MASK is '', 'bool' or 'additive'")
    n_cols = n_cols * ALIGN
    scale = fp32_pair(scale_high, scale_low, COMPUTE_DTYPE)
    for tile in tl.range(tl.program_id(0), tile_count(n_outer, n_inner, ROWS), tl.num_programs(0)):
        outer, inner, row_mask, row = tile_rows(tile, n_inner, ROWS)
        x_rows = row_starts(x_ptr, outer, inner, x_stride_outer, x_stride_inner, ALIGN)
        batch, query = row // n_queries, row % n_queries
        last_key, n_read = visible_keys(query, causal_offset, n_cols, CAUSAL)
        if ONLINE:
            lane_max = tl.full([ROWS, BLOCK_N], float("-inf"), COMPUTE_DTYPE)
            lane_sum = tl.zeros([ROWS, BLOCK_N], COMPUTE_DTYPE)
            for start in tl.range(0, n_read, BLOCK_N):
                col = column_block(start, BLOCK_N)
                x = load_scores(
                    x_rows,
                    x_stride_col,
                    col,
                    row_mask & (col < n_cols),
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
                    ALIGN,
                    MASK,
                    CAUSAL,
                    COMPUTE_DTYPE,
                )
                lane_max, lane_sum = online_step(lane_max, lane_sum, x)
            row_max, row_sum = combine_lanes(lane_max, lane_sum)
            y_rows = row_starts(y_ptr, outer, inner, y_stride_outer, y_stride_inner, ALIGN)
            n_blocks = tl.cdiv(n_read, BLOCK_N)
            for back in tl.range(0, n_blocks):
                col = column_block((n_blocks - 1 - back) * BLOCK_N, BLOCK_N)
                in_bounds = row_mask & (col < n_cols)
                x = load_scores(
                    x_rows,
                    x_stride_col,
                    col,
                    in_bounds,
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
                    ALIGN,
                    MASK,
                    CAUSAL,
                    COMPUTE_DTYPE,
                )
                store_block(y_rows, y_stride_col, col, in_bounds, attention_probabilities(x, row_max, row_sum))
            if CAUSAL:
                for start in tl.range(n_blocks * BLOCK_N, n_cols, BLOCK_N):
                    col = column_block(start, BLOCK_N)
                    store_block(
                        y_rows, y_stride_col, col, row_mask & (col < n_cols), tl.zeros([ROWS, BLOCK_N], COMPUTE_DTYPE)
                    )
        else:
            col = column_block(0, BLOCK_N)
            in_bounds = row_mask & (col < n_cols)
            x = load_scores(
                x_rows,
                x_stride_col,
                col,
                in_bounds,
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
                ALIGN,
                MASK,
                CAUSAL,
                COMPUTE_DTYPE,
            )
            row_max, row_sum = block_statistics(x)
            y_rows = row_starts(y_ptr, outer, inner, y_stride_outer, y_stride_inner, ALIGN)
            store_block(y_rows, y_stride_col, col, in_bounds, attention_probabilities(x, row_max, row_sum))
