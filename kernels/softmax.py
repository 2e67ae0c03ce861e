"""Softmax and log-softmax, forward and backward, over one dim of a strided tensor.

The tensor is seen as [n_outer, n_cols, n_inner] with a stride per axis: softmax runs along
n_cols for every (outer, inner) pair, a "row". A tile takes ROWS rows with consecutive inner
indices and BLOCK_N columns, and Triton reads whichever axis has unit stride coalesced (the
columns for a last-dim softmax, the inner axis for an earlier dim), so transposed, sliced and
expanded layouts need no copy. A last-dim softmax is the case n_outer == 1, its rows along
the inner axis.

Softmax is memory bound: a kernel is as fast as the bytes it moves. One body serves every
regime through compile-time switches:

- ``ONLINE`` off: the whole row of every row in the tile sits in registers; one read, one
  write. Many short rows share a tile when ROWS > 1.
- ``ONLINE`` on: the row is longer than a tile. The forward keeps a running max and a rescaled
  sum per lane (online softmax), then normalises in a second sweep; the backward accumulates
  its row sum per lane, then writes dx. The second sweep walks the row backwards, so the tiles
  read last, still in L2, are read again first.
- ``LOG``: log-softmax instead of softmax, from the same statistics.
- ``ATTENTION`` (forward): the row is attention scores [..., Lq, Lk], softmax'd as scale * x +
  mask, with a ``MASK`` ('bool' or 'additive') read through broadcast strides and a ``CAUSAL``
  diagonal from the row's query index; rows with every key hidden give zeros. Under a causal
  mask the online sweeps stop at the tile's last visible key; the rest is written as zeros.
- ``ROW_STATS``: 'store' writes each row's statistics instead of an output (forward: max and
  sum of exp; backward: the row sum), 'load' takes them as given and writes the output in one
  sweep. A softmax over a dim sharded across processes combines the shards' statistics between.

Triton's JIT proves an integer argument a multiple of 16 or nothing, and a load is only
vectorised when the row starts and the column mask are proven aligned. So where the columns
are unit-stride, n_cols and the outer/inner strides arrive divided by ALIGN (the alignment,
in elements, the host proved) and are multiplied back here by the constant: rows of 1000
fp32 elements then get 128-bit accesses too.

The math is in COMPUTE_DTYPE (fp32, or fp64 for fp64 tensors); loads are cast to it at once,
stores are cast to the output's dtype, so an fp16 input can give an fp32 output in one pass.
Programs are persistent: each strides over tiles, so any row count fits the grid. Offsets are
int64 wherever a product of an index and a stride is formed.
"""

import triton
import triton.language as tl


@triton.jit
def _tile_count(n_outer, n_inner, ROWS: tl.constexpr):
    """Tiles of ROWS rows, in int64: with few rows per tile, huge tensors have over 2^31 of them."""
    return tl.cast(n_outer, tl.int64) * tl.cdiv(n_inner, ROWS)


@triton.jit
def _tile_rows(tile, n_inner, ROWS: tl.constexpr):
    """The tile's rows: one outer index, ROWS consecutive inner indices, which of them exist, and
    their row numbers in row-major order over the dims other than the softmax dim."""
    inner_blocks = tl.cdiv(n_inner, ROWS)
    outer = tl.cast(tile // inner_blocks, tl.int64)
    inner = tl.cast(tile % inner_blocks, tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    return outer, inner, inner < n_inner, outer * n_inner + inner


@triton.jit
def _load_scores(x_rows, x_stride_col, col, in_bounds, mask_rows, mask_stride_key, last_key, scale,
                 ATTENTION: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """x, or with ATTENTION scale * x + mask with hidden keys at -inf. Loads are predicated on the
    bounds alone: a data-dependent predicate would split every 128-bit access into single elements."""
    x = tl.load(x_rows + col * x_stride_col, mask=in_bounds, other=float("-inf")).to(COMPUTE_DTYPE)
    if ATTENTION:
        keep = in_bounds
        if CAUSAL:
            keep = keep & (col <= last_key)
        if MASK == "bool":
            keep = keep & (tl.load(mask_rows + col * mask_stride_key, mask=in_bounds, other=0) != 0)
        x = x * scale
        if MASK == "additive":
            x += tl.load(mask_rows + col * mask_stride_key, mask=in_bounds, other=0.0).to(COMPUTE_DTYPE)
        x = tl.where(keep, x, float("-inf"))
    return x


@triton.jit
def _softmax_forward_kernel(
    x_ptr,
    y_ptr,
    stats_ptr,
    mask_ptr,
    n_outer,
    n_cols,
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
    scale_hi,
    scale_lo,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ONLINE: tl.constexpr,
    LOG: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    ATTENTION: tl.constexpr,
    MASK: tl.constexpr,
    CAUSAL: tl.constexpr,
    ROW_STATS: tl.constexpr,
):
    n_cols = n_cols * ALIGN
    cols = tl.arange(0, BLOCK_N)[None, :]
    # A Python float arrives as fp32: fp64 math gets the scale back from a two-part split.
    scale = tl.cast(scale_hi, COMPUTE_DTYPE) + tl.cast(scale_lo, COMPUTE_DTYPE)
    for tile in tl.range(tl.program_id(0), _tile_count(n_outer, n_inner, ROWS), tl.num_programs(0)):
        outer, inner, row_mask, row = _tile_rows(tile, n_inner, ROWS)
        x_rows = x_ptr + (outer * x_stride_outer + inner * x_stride_inner) * ALIGN
        mask_rows, last_key = mask_ptr, row
        if ATTENTION:
            # Rows are (batch, head, query) of [..., Lq, Lk] scores; the mask is read through its
            # broadcast strides, the causal diagonal is an index comparison.
            query = row % n_queries
            last_key = query + causal_offset
            if MASK != "":
                batch = row // n_queries
                offset = (batch // n_heads) * mask_stride_batch + (batch % n_heads) * mask_stride_head
                mask_rows = mask_ptr + (offset + query * mask_stride_query) * ALIGN
        # The columns a sweep reads: under a causal mask, up to the tile's last visible key.
        n_read = n_cols
        if CAUSAL:
            n_read = tl.minimum(n_cols, tl.maximum(tl.max(last_key) + 1, 0))
        if ROW_STATS == "load":
            row_max = tl.load(stats_ptr + row, mask=row_mask).to(COMPUTE_DTYPE)
            row_sum = tl.full([ROWS, 1], 1.0, COMPUTE_DTYPE)
        elif ONLINE:
            lane_max = tl.full([ROWS, BLOCK_N], float("-inf"), COMPUTE_DTYPE)
            lane_sum = tl.zeros([ROWS, BLOCK_N], COMPUTE_DTYPE)
            for start in tl.range(0, n_read, BLOCK_N):
                col = tl.cast(start + cols, tl.int64)
                x = _load_scores(x_rows, x_stride_col, col, row_mask & (col < n_cols), mask_rows, mask_stride_key,
                                 last_key, scale, ATTENTION, MASK, CAUSAL, COMPUTE_DTYPE)
                new_max = tl.maximum(lane_max, x)
                shift = _finite(new_max)
                lane_sum = lane_sum * tl.exp(lane_max - shift) + tl.exp(x - shift)
                lane_max = new_max
            row_max = tl.max(lane_max, axis=1, keep_dims=True)
            row_sum = tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=1, keep_dims=True)
        else:
            col = tl.cast(cols, tl.int64)
            x = _load_scores(x_rows, x_stride_col, col, row_mask & (col < n_cols), mask_rows, mask_stride_key,
                             last_key, scale, ATTENTION, MASK, CAUSAL, COMPUTE_DTYPE)
            row_max = tl.max(x, axis=1, keep_dims=True)
            row_sum = tl.sum(tl.exp(x - row_max), axis=1, keep_dims=True)
        if ROW_STATS == "store":
            # A row of only -inf sums to 0, not exp(-inf - -inf) = NaN: (-inf, 0) is the identity
            # when shards combine their statistics.
            tl.store(stats_ptr + 2 * row, row_max, mask=row_mask)
            tl.store(stats_ptr + 2 * row + 1, tl.where(row_max == float("-inf"), 0.0, row_sum), mask=row_mask)
        else:
            y_rows = y_ptr + (outer * y_stride_outer + inner * y_stride_inner) * ALIGN
            if ONLINE or ROW_STATS == "load":
                n_tiles = tl.cdiv(n_read, BLOCK_N)
                for back in tl.range(0, n_tiles):
                    col = tl.cast((n_tiles - 1 - back) * BLOCK_N + cols, tl.int64)
                    in_bounds = row_mask & (col < n_cols)
                    x = _load_scores(x_rows, x_stride_col, col, in_bounds, mask_rows, mask_stride_key,
                                     last_key, scale, ATTENTION, MASK, CAUSAL, COMPUTE_DTYPE)
                    y = _normalise(x, row_max, row_sum, LOG, ATTENTION)
                    tl.store(y_rows + col * y_stride_col, y.to(y_ptr.dtype.element_ty), mask=in_bounds)
                if CAUSAL:
                    # Tiles past every row's diagonal hold only zeros: written, never read.
                    for start in tl.range(n_tiles * BLOCK_N, n_cols, BLOCK_N):
                        col = tl.cast(start + cols, tl.int64)
                        zeros = tl.zeros([ROWS, BLOCK_N], y_ptr.dtype.element_ty)
                        tl.store(y_rows + col * y_stride_col, zeros, mask=row_mask & (col < n_cols))
            else:
                y = _normalise(x, row_max, row_sum, LOG, ATTENTION)
                tl.store(y_rows + col * y_stride_col, y.to(y_ptr.dtype.element_ty), mask=row_mask & (col < n_cols))


@triton.jit
def _finite(lane_max):
    """The shift of exp(x - shift): a lane that has seen only -inf keeps its sum at 0 instead of
    exp(-inf - -inf) = NaN."""
    return tl.where(lane_max == float("-inf"), 0.0, lane_max)


@triton.jit
def _normalise(x, row_max, row_sum, LOG: tl.constexpr, ATTENTION: tl.constexpr):
    """softmax = exp(x - max) / sum, with one reciprocal per row; log-softmax = x - max - log(sum).
    Attention rows with every key hidden (max -inf) give zeros, as torch's SDPA does."""
    if LOG:
        return (x - row_max) - tl.log(row_sum)
    y = tl.exp(x - row_max) * (1.0 / row_sum)
    if ATTENTION:
        y = tl.where(row_max == float("-inf"), 0.0, y)
    return y


@triton.jit
def _softmax_backward_kernel(
    y_ptr,
    dy_ptr,
    dx_ptr,
    stats_ptr,
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
    scale_hi,
    scale_lo,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    ONLINE: tl.constexpr,
    LOG: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    ROW_STATS: tl.constexpr,
):
    """softmax: dx = scale * y * (dy - sum(dy * y)); log-softmax: dx = scale * (dy - exp(y) * sum(dy))."""
    n_cols = n_cols * ALIGN
    cols = tl.arange(0, BLOCK_N)[None, :]
    scale = tl.cast(scale_hi, COMPUTE_DTYPE) + tl.cast(scale_lo, COMPUTE_DTYPE)
    for tile in tl.range(tl.program_id(0), _tile_count(n_outer, n_inner, ROWS), tl.num_programs(0)):
        outer, inner, row_mask, row = _tile_rows(tile, n_inner, ROWS)
        y_rows = y_ptr + (outer * y_stride_outer + inner * y_stride_inner) * ALIGN
        dy_rows = dy_ptr + (outer * dy_stride_outer + inner * dy_stride_inner) * ALIGN
        if ROW_STATS == "load":
            row_sum = tl.load(stats_ptr + row, mask=row_mask).to(COMPUTE_DTYPE)
        elif ONLINE:
            lane_sum = tl.zeros([ROWS, BLOCK_N], COMPUTE_DTYPE)
            for start in tl.range(0, n_cols, BLOCK_N):
                col = tl.cast(start + cols, tl.int64)
                mask = row_mask & (col < n_cols)
                y = tl.load(y_rows + col * y_stride_col, mask=mask, other=0.0).to(COMPUTE_DTYPE)
                dy = tl.load(dy_rows + col * dy_stride_col, mask=mask, other=0.0).to(COMPUTE_DTYPE)
                lane_sum += _summand(y, dy, LOG)
            row_sum = tl.sum(lane_sum, axis=1, keep_dims=True)
        else:
            col = tl.cast(cols, tl.int64)
            mask = row_mask & (col < n_cols)
            y = tl.load(y_rows + col * y_stride_col, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            dy = tl.load(dy_rows + col * dy_stride_col, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            row_sum = tl.sum(_summand(y, dy, LOG), axis=1, keep_dims=True)
        if ROW_STATS == "store":
            tl.store(stats_ptr + row, row_sum, mask=row_mask)
        else:
            dx_rows = dx_ptr + (outer * dx_stride_outer + inner * dx_stride_inner) * ALIGN
            if ONLINE or ROW_STATS == "load":
                n_tiles = tl.cdiv(n_cols, BLOCK_N)
                for back in tl.range(0, n_tiles):
                    col = tl.cast((n_tiles - 1 - back) * BLOCK_N + cols, tl.int64)
                    mask = row_mask & (col < n_cols)
                    y = tl.load(y_rows + col * y_stride_col, mask=mask, other=0.0).to(COMPUTE_DTYPE)
                    dy = tl.load(dy_rows + col * dy_stride_col, mask=mask, other=0.0).to(COMPUTE_DTYPE)
                    dx = _input_grad(y, dy, row_sum, LOG) * scale
                    tl.store(dx_rows + col * dx_stride_col, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            else:
                dx = _input_grad(y, dy, row_sum, LOG) * scale
                tl.store(dx_rows + col * dx_stride_col, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _summand(y, dy, LOG: tl.constexpr):
    """The backward's row sum is of dy * y (softmax) or of dy (log-softmax)."""
    if LOG:
        return dy
    return dy * y


@triton.jit
def _input_grad(y, dy, row_sum, LOG: tl.constexpr):
    if LOG:
        return dy - tl.exp(y) * row_sum
    return y * (dy - row_sum)
