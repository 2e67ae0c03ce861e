"""Attention's softmax: softmax(scale * scores + mask) over the last dim of [..., Lq, Lk] scores.

A row is one (batch, head, query) of the scores. The mask is read through its broadcast
strides, the causal diagonal is an index comparison; the math of ``softmax`` otherwise, in
its two regimes. Rows with every key hidden give zeros, as torch's SDPA does. Under a causal
mask the online sweeps stop at the tile's last visible key; the columns after it are only
written, as zeros.

Two options change the math. ``SOFTCAP`` caps the scaled scores, softcap * tanh(scale * x /
softcap), before the mask (Gemma 2). ``SINKS`` adds one logit per head to each row's
normalisation, with no output column (gpt-oss): it is folded into the row statistics as one
more element. Either makes the forward store each row's log-sum-exp, from which their backward
(``masked_softmax_backward_kernel``) recovers the capped scores, log(y) + lse - mask, and each
sink's probability, exp(sink - lse), reading neither the scores nor an expanded tensor.
"""

import triton
import triton.language as tl

from .tiles import (
    block_statistics,
    column_block,
    combine_lanes,
    fp32_pair,
    input_grad,
    load_block,
    load_row_values,
    normalise,
    online_row_sums,
    online_step,
    row_starts,
    store_block,
    store_row_values,
    summand,
    tanh,
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
def bias_row_starts(
    bias_ptr, batch, query, n_heads, stride_batch, stride_head, stride_query, ALIGN: tl.constexpr, BIAS: tl.constexpr
):
    """Pointers to the bias row under each score row (BIAS), formed once a tile: the sweeps then
    add only the column (a 64-bit division per sweep and tensor, under Triton 3.6, spilled)."""
    if BIAS:
        offset = (batch // n_heads) * stride_batch + (batch % n_heads) * stride_head + query * stride_query
        rows = bias_ptr + offset * ALIGN
    else:
        rows = bias_ptr
    return rows


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
    softcap,
    bias_rows,
    bias_stride_key,
    ALIGN: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BIAS: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """scale * x (softcapped) + mask (+ bias) at columns ``col``, hidden keys at -inf. Loads are predicated
    on the bounds alone: a data-dependent predicate would split every 128-bit access into single
    elements."""
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
    if SOFTCAP:
        x = softcap * tanh(x / softcap, COMPUTE_DTYPE)
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
    if BIAS:
        x += load_block(bias_rows, bias_stride_key, col, in_bounds, 0.0, COMPUTE_DTYPE)
    return tl.where(keep, x, float("-inf"))


@triton.jit
def with_sinks(
    row_max,
    row_sum,
    batch,
    row_mask,
    sinks_ptr,
    n_sink_heads,
    BLOCK_N: tl.constexpr,
    SINKS: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """The row statistics with the row's head's sink logit as one more element (none without SINKS).
    A row with every key hidden comes with (-inf, 0), and then holds the sink alone."""
    if SINKS:
        sink = load_row_values(sinks_ptr + batch % n_sink_heads, row_mask, BLOCK_N, COMPUTE_DTYPE)
        row_max, row_sum = online_step(row_max, row_sum, sink)
    return row_max, row_sum


@triton.jit
def store_log_sum_exp(
    lse_ptr, row, row_mask, row_max, row_sum, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr
):
    """Each row's log-sum-exp, which the backward of SOFTCAP and SINKS needs; -inf for a row with
    every key hidden. Returns the row max (a helper returning nothing fails to compile in Triton 3.6)."""
    if SOFTCAP or SINKS:
        store_row_values(lse_ptr + row, row_max + tl.log(row_sum), row_mask, BLOCK_N)
    return row_max


@triton.jit
def attention_probabilities(x, row_max, row_sum):
    """softmax, with zeros where a row has every key hidden (its sum of exp is 0, where a row
    holding a NaN has a NaN sum, and a NaN softmax, as torch's)."""
    return tl.where(row_sum == 0.0, 0.0, normalise(x, row_max, row_sum, False))


@triton.jit
def masked_online_statistics(
    x_rows,
    x_stride_col,
    row_mask,
    start,
    read_stop,
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
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ALIGN: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BIAS: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Each row's (max, sum of exp(z - max)) of the masked scores z over columns [start, stop),
    reading only [start, read_stop) (the rest is past every visible key): one sweep, loads
    predicated on ``stop``, a whole row's n_cols or a split row's chunk end (both aligned)."""
    lane_max = tl.full([ROWS, BLOCK_N], float("-inf"), COMPUTE_DTYPE)
    lane_sum = tl.zeros([ROWS, BLOCK_N], COMPUTE_DTYPE)
    for block_start in tl.range(start, read_stop, BLOCK_N):
        col = column_block(block_start, BLOCK_N)
        x = load_scores(
            x_rows,
            x_stride_col,
            col,
            row_mask & (col < stop),
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
            ALIGN,
            MASK,
            CAUSAL,
            SOFTCAP,
            BIAS,
            COMPUTE_DTYPE,
        )
        lane_max, lane_sum = online_step(lane_max, lane_sum, x)
    return combine_lanes(lane_max, lane_sum)


@triton.jit
def masked_normalising_sweep(
    x_rows,
    x_stride_col,
    y_rows,
    y_stride_col,
    row_mask,
    start,
    read_stop,
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
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ALIGN: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BIAS: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """y over columns [start, stop) given the rows' statistics: the blocks of [start, read_stop)
    read again in reverse (see ``tiles.normalising_sweep``), the blocks after them, past every
    visible key, only written, as zeros. Returns the row max (a helper must return something)."""
    n_blocks = tl.cdiv(read_stop - start, BLOCK_N)
    for back in tl.range(0, n_blocks):
        col = column_block(start + (n_blocks - 1 - back) * BLOCK_N, BLOCK_N)
        in_bounds = row_mask & (col < stop)
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
            softcap,
            bias_rows,
            bias_stride_key,
            ALIGN,
            MASK,
            CAUSAL,
            SOFTCAP,
            BIAS,
            COMPUTE_DTYPE,
        )
        store_block(y_rows, y_stride_col, col, in_bounds, attention_probabilities(x, row_max, row_sum))
    if CAUSAL:
        for block_start in tl.range(start + n_blocks * BLOCK_N, stop, BLOCK_N):
            col = column_block(block_start, BLOCK_N)
            store_block(y_rows, y_stride_col, col, row_mask & (col < stop), tl.zeros([ROWS, BLOCK_N], COMPUTE_DTYPE))
    return row_max


@triton.jit
def masked_softmax_forward_kernel(
    x_ptr,  # scores [..., Lq, Lk]
    y_ptr,  # output: their softmax
    mask_ptr,  # bool (read as bytes) or additive mask; None without one
    sinks_ptr,  # one logit per head; None without SINKS
    bias_ptr,  # an additive bias beside a bool mask, read as the mask is; None without BIAS
    lse_ptr,  # output: each row's log-sum-exp, with SOFTCAP or SINKS (None otherwise)
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
    n_sink_heads,  # the head of a row is its run of Lq rows' index modulo this; None without SINKS
    softcap,  # None without SOFTCAP
    bias_stride_batch,  # the bias's strides and head run, as the mask's; None without BIAS
    bias_stride_head,
    bias_stride_query,
    bias_stride_key,
    bias_n_heads,
    scale_high,  # scale = scale_high + scale_low
    scale_low,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ONLINE: tl.constexpr,
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
    scale = fp32_pair(scale_high, scale_low, COMPUTE_DTYPE)
    for tile in tl.range(tl.program_id(0), tile_count(n_outer, n_inner, ROWS), tl.num_programs(0)):
        outer, inner, row_mask, row = tile_rows(tile, n_inner, ROWS)
        x_rows = row_starts(x_ptr, outer, inner, x_stride_outer, x_stride_inner, ALIGN)
        batch, query = row // n_queries, row % n_queries
        last_key, n_read = visible_keys(query, causal_offset, n_cols, CAUSAL)
        bias_rows = bias_row_starts(
            bias_ptr, batch, query, bias_n_heads, bias_stride_batch, bias_stride_head, bias_stride_query, ALIGN, BIAS
        )
        if ONLINE:
            row_max, row_sum = masked_online_statistics(
                x_rows,
                x_stride_col,
                row_mask,
                0,
                n_read,
                n_cols,
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
            row_max, row_sum = with_sinks(
                row_max, row_sum, batch, row_mask, sinks_ptr, n_sink_heads, BLOCK_N, SINKS, COMPUTE_DTYPE
            )
            store_log_sum_exp(lse_ptr, row, row_mask, row_max, row_sum, BLOCK_N, SOFTCAP, SINKS)
            y_rows = row_starts(y_ptr, outer, inner, y_stride_outer, y_stride_inner, ALIGN)
            masked_normalising_sweep(
                x_rows,
                x_stride_col,
                y_rows,
                y_stride_col,
                row_mask,
                0,
                n_read,
                n_cols,
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
                softcap,
                bias_rows,
                bias_stride_key,
                ALIGN,
                MASK,
                CAUSAL,
                SOFTCAP,
                BIAS,
                COMPUTE_DTYPE,
            )
            row_max, row_sum = block_statistics(x)
            row_max, row_sum = with_sinks(
                row_max, row_sum, batch, row_mask, sinks_ptr, n_sink_heads, BLOCK_N, SINKS, COMPUTE_DTYPE
            )
            store_log_sum_exp(lse_ptr, row, row_mask, row_max, row_sum, BLOCK_N, SOFTCAP, SINKS)
            y_rows = row_starts(y_ptr, outer, inner, y_stride_outer, y_stride_inner, ALIGN)
            store_block(y_rows, y_stride_col, col, in_bounds, attention_probabilities(x, row_max, row_sum))


@triton.jit
def score_bias(
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
    ALIGN: tl.constexpr,
    MASK: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """The additive mask at columns ``col`` (MASK 'additive'), else 0."""
    if MASK == "additive":
        bias = load_mask(
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
            0.0,
            ALIGN,
        ).to(COMPUTE_DTYPE)
    else:
        bias = tl.zeros(col.shape, COMPUTE_DTYPE)
    return bias


@triton.jit
def score_grad(y, dy, row_sum, lse, bias, softcap, scale, SOFTCAP: tl.constexpr):
    """The scores' gradient: the softmax's, through the cap, times the scale. The capped score is
    log(y) + lse - bias; where y is 0 the softmax's gradient is 0 and the cap's is not needed."""
    dz = input_grad(y, dy, row_sum, "softmax")
    if SOFTCAP:
        capped = (tl.log(tl.where(y > 0, y, 1.0)) + lse - bias) / softcap
        dz = tl.where(y > 0, dz * (1.0 - capped * capped), 0.0)
    return dz * scale


@triton.jit
def masked_grad_sweep(
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
    BLOCK_N: tl.constexpr,
    ALIGN: tl.constexpr,
    MASK: tl.constexpr,
    SOFTCAP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """The scores' gradient over columns [start, stop) given the rows' sums of dy * y: a second
    sweep, in reverse (see ``tiles.normalising_sweep``). Returns the row sums (a helper must
    return something)."""
    n_blocks = tl.cdiv(stop - start, BLOCK_N)
    for back in tl.range(0, n_blocks):
        col = column_block(start + (n_blocks - 1 - back) * BLOCK_N, BLOCK_N)
        in_bounds = row_mask & (col < stop)
        y = load_block(y_rows, y_stride_col, col, in_bounds, 0.0, COMPUTE_DTYPE)
        dy = load_block(dy_rows, dy_stride_col, col, in_bounds, 0.0, COMPUTE_DTYPE)
        bias = score_bias(
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
            ALIGN,
            MASK,
            COMPUTE_DTYPE,
        )
        store_block(
            dx_rows, dx_stride_col, col, in_bounds, score_grad(y, dy, row_sum, lse, bias, softcap, scale, SOFTCAP)
        )
    return row_sum


@triton.jit
def store_sink_grad(
    sinks_ptr,
    sinks_grad_ptr,
    row,
    n_queries,
    n_sink_heads,
    lse,
    row_sum,
    row_mask,
    BLOCK_N: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """Each row's share of its sink's gradient, -exp(sink - lse) * sum(dy * y); 0 for a row with
    every key hidden. The head from the row here, not from a batch index formed before the
    sweeps: held across them (and a 64-bit division's call) it spilled. Returns the shares."""
    head = (row // n_queries) % n_sink_heads
    sink = load_row_values(sinks_ptr + head, row_mask, BLOCK_N, COMPUTE_DTYPE)
    sink_grad = tl.where(lse == float("-inf"), 0.0, -tl.exp(sink - lse) * row_sum)
    return store_row_values(sinks_grad_ptr + row, sink_grad, row_mask, BLOCK_N)


@triton.jit
def masked_softmax_backward_kernel(
    y_ptr,  # the forward's output
    dy_ptr,  # its gradient
    dx_ptr,  # output: the scores' gradient
    lse_ptr,  # each row's log-sum-exp, from the forward
    mask_ptr,  # the additive mask, read under SOFTCAP (MASK 'additive'); None otherwise
    sinks_ptr,  # one logit per head; None without SINKS
    sinks_grad_ptr,  # output: each row's share of its sink's gradient; None without SINKS
    n_outer,
    n_cols,  # Lk, divided by ALIGN, as are the outer and inner strides and the mask's row strides
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
    mask_stride_batch,  # as in the forward; None without a mask to read
    mask_stride_head,
    mask_stride_query,
    mask_stride_key,
    n_queries,  # Lq
    n_heads,  # the mask's head run; None without a mask to read
    n_sink_heads,  # None without SINKS
    softcap,  # None without SOFTCAP
    scale_high,  # scale = scale_high + scale_low
    scale_low,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ONLINE: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    MASK: tl.constexpr,  # '' or 'additive'
    SOFTCAP: tl.constexpr,
    SINKS: tl.constexpr,
):
    """masked_softmax's backward under softcapping or sinks: dx = scale * cap' * y * (dy - sum(dy * y)),
    and a sink's gradient -exp(sink - lse) * sum(dy * y) per row. One read of y and dy, one write."""
    tl.static_assert(MASK == "" or MASK == "additive", "MASK is '' or 'additive'")
    n_cols = n_cols * ALIGN
    scale = fp32_pair(scale_high, scale_low, COMPUTE_DTYPE)
    for tile in tl.range(tl.program_id(0), tile_count(n_outer, n_inner, ROWS), tl.num_programs(0)):
        outer, inner, row_mask, row = tile_rows(tile, n_inner, ROWS)
        batch, query = row // n_queries, row % n_queries
        y_rows = row_starts(y_ptr, outer, inner, y_stride_outer, y_stride_inner, ALIGN)
        dy_rows = row_starts(dy_ptr, outer, inner, dy_stride_outer, dy_stride_inner, ALIGN)
        lse = load_row_values(lse_ptr + row, row_mask, BLOCK_N, COMPUTE_DTYPE)
        if ONLINE:
            row_sum = online_row_sums(
                y_rows,
                y_stride_col,
                dy_rows,
                dy_stride_col,
                row_mask,
                0,
                n_cols,
                "softmax",
                ROWS,
                BLOCK_N,
                COMPUTE_DTYPE,
            )
            dx_rows = row_starts(dx_ptr, outer, inner, dx_stride_outer, dx_stride_inner, ALIGN)
            masked_grad_sweep(
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
        else:
            col = column_block(0, BLOCK_N)
            in_bounds = row_mask & (col < n_cols)
            y = load_block(y_rows, y_stride_col, col, in_bounds, 0.0, COMPUTE_DTYPE)
            dy = load_block(dy_rows, dy_stride_col, col, in_bounds, 0.0, COMPUTE_DTYPE)
            row_sum = tl.sum(summand(y, dy, "softmax"), axis=1, keep_dims=True)
            bias = score_bias(
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
                ALIGN,
                MASK,
                COMPUTE_DTYPE,
            )
            dx_rows = row_starts(dx_ptr, outer, inner, dx_stride_outer, dx_stride_inner, ALIGN)
            store_block(
                dx_rows, dx_stride_col, col, in_bounds, score_grad(y, dy, row_sum, lse, bias, softcap, scale, SOFTCAP)
            )
        if SINKS:
            store_sink_grad(
                sinks_ptr, sinks_grad_ptr, row, n_queries, n_sink_heads, lse, row_sum, row_mask, BLOCK_N, COMPUTE_DTYPE
            )
