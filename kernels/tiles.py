"""The tile steps every kernel is built from.

A tensor is seen as [n_outer, n_cols, n_inner] with a stride per axis: softmax runs along
n_cols for every (outer, inner) pair, a "row". A tile takes ROWS rows with consecutive inner
indices and BLOCK_N columns; Triton reads whichever axis has unit stride coalesced (the columns
for a last-dim softmax, the inner axis for an earlier dim), so transposed, sliced and expanded
layouts need no copy. A last-dim softmax is the case n_outer == 1, its rows along the inner axis.

Triton's JIT proves an integer argument a multiple of 16 or nothing, and a load is only
vectorised when the row starts and the column mask are proven aligned. So where the columns are
unit-stride, n_cols and the outer/inner strides arrive divided by ALIGN (the alignment, in
elements, the host proved) and are multiplied back by the constant: rows of 1000 fp32 elements
then get 128-bit accesses too.

Math is in COMPUTE_DTYPE (fp32, or fp64 for fp64 tensors): loads are cast to it at once, stores
cast to the output's dtype. Programs are persistent: each strides over tiles, so any row count
fits the grid. Offsets are int64 wherever a product of an index and a stride is formed.
"""

import triton
import triton.language as tl


@triton.jit
def tile_count(n_outer, n_inner, ROWS: tl.constexpr):
    """Tiles of ROWS rows, in int64: with few rows per tile, huge tensors have over 2^31 of them."""
    return tl.cast(n_outer, tl.int64) * tl.cdiv(n_inner, ROWS)


@triton.jit
def tile_rows(tile, n_inner, ROWS: tl.constexpr):
    """The tile's rows: one outer index, ROWS consecutive inner indices, which of them exist, and
    their row numbers in row-major order over the dims other than the softmax dim."""
    inner_blocks = tl.cdiv(n_inner, ROWS)
    outer = tl.cast(tile // inner_blocks, tl.int64)
    inner = tl.cast(tile % inner_blocks, tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    return outer, inner, inner < n_inner, outer * n_inner + inner


@triton.jit
def row_starts(ptr, outer, inner, stride_outer, stride_inner, ALIGN: tl.constexpr):
    """Pointers to the first element of each of the tile's rows (strides arrive divided by ALIGN)."""
    return ptr + (outer * stride_outer + inner * stride_inner) * ALIGN


@triton.jit
def column_block(start, BLOCK_N: tl.constexpr):
    """The int64 column indices [start, start + BLOCK_N), as a row vector."""
    return tl.cast(start + tl.arange(0, BLOCK_N)[None, :], tl.int64)


@triton.jit
def load_block(rows, stride_col, col, in_bounds, other, COMPUTE_DTYPE: tl.constexpr):
    """A block of the rows at columns ``col``, in COMPUTE_DTYPE; ``other`` where out of bounds."""
    return tl.load(rows + col * stride_col, mask=in_bounds, other=other).to(COMPUTE_DTYPE)


@triton.jit
def store_block(rows, stride_col, col, in_bounds, value):
    """``value`` stored at columns ``col`` of the rows, cast to the output's dtype. fp64 reaches a
    16-bit output through fp32, as torch's casts do (the interpreter's direct cast is wrong)."""
    out_dtype = rows.dtype.element_ty
    if value.dtype.is_fp64() and out_dtype.primitive_bitwidth == 16:
        tl.store(rows + col * stride_col, value.to(tl.float32).to(out_dtype), mask=in_bounds)
    else:
        tl.store(rows + col * stride_col, value.to(out_dtype), mask=in_bounds)


@triton.jit
def load_row_values(ptrs, row_mask, BLOCK_N: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """One value per row from [ROWS, 1] pointers, loaded by the lanes of column 0 of a full
    [ROWS, BLOCK_N] block and summed across it. That block has the layout of the rows' other
    accesses; a [ROWS, 1] access has its own, and each thread then holds its row from the start
    of the program (the compile report found it spilled)."""
    first = column_block(0, BLOCK_N) == 0
    values = tl.load(ptrs + 0 * first, mask=row_mask & first, other=0.0).to(COMPUTE_DTYPE)
    return tl.sum(values, axis=1, keep_dims=True)


@triton.jit
def store_row_values(ptrs, values, row_mask, BLOCK_N: tl.constexpr):
    """One value per row ([ROWS, 1]) stored at [ROWS, 1] pointers from the lanes of column 0 of a
    full block (see ``load_row_values``). Returns ``values`` (a helper returning nothing fails to
    compile in Triton 3.6)."""
    first = column_block(0, BLOCK_N) == 0
    block = tl.broadcast_to(values, (values.shape[0], BLOCK_N))
    tl.store(ptrs + 0 * first, block.to(ptrs.dtype.element_ty), mask=row_mask & first)
    return values


@triton.jit
def exponent_shift(row_max):
    """What a row's exponents are taken against: its max, or 0 where that is -inf (the row, lane
    or chunk holds only -inf, or nothing). Its sum of exp is then 0, the identity when partial
    statistics combine, instead of exp(-inf - -inf) = NaN; a NaN among the values, which the
    GPU's max (and the interpreter's) passes over, still makes the sum NaN."""
    return tl.where(row_max == float("-inf"), 0.0, row_max)


@triton.jit
def block_statistics(x):
    """Each row's max and sum of exp(x - max) (0 for a row of only -inf, NaN for a row holding a
    NaN), of a block holding whole rows."""
    row_max = tl.max(x, axis=1, keep_dims=True)
    return row_max, tl.sum(tl.exp(x - exponent_shift(row_max)), axis=1, keep_dims=True)


@triton.jit
def online_step(lane_max, lane_sum, x):
    """One block into per-lane running (max, sum of exp(x - max)), online softmax's update.
    A lane that has seen only -inf keeps its sum at 0 (``exponent_shift``)."""
    new_max = tl.maximum(lane_max, x)
    shift = exponent_shift(new_max)
    return new_max, lane_sum * tl.exp(lane_max - shift) + tl.exp(x - shift)


@triton.jit
def combine_lanes(lane_max, lane_sum):
    """Each row's (max, sum of exp(x - max)) from its lanes' running statistics: lanes of only
    -inf add their 0, a lane's NaN stays (``exponent_shift``)."""
    row_max = tl.max(lane_max, axis=1, keep_dims=True)
    return row_max, tl.sum(lane_sum * tl.exp(lane_max - exponent_shift(row_max)), axis=1, keep_dims=True)


@triton.jit
def online_statistics(
    x_rows, x_stride_col, row_mask, start, stop, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, COMPUTE_DTYPE: tl.constexpr
):
    """Each row's (max, sum of exp(x - max)) over columns [start, stop), longer than a block: one
    sweep. (0, n_cols) for whole rows; a split row's chunk otherwise."""
    lane_max = tl.full([ROWS, BLOCK_N], float("-inf"), COMPUTE_DTYPE)
    lane_sum = tl.zeros([ROWS, BLOCK_N], COMPUTE_DTYPE)
    for block_start in tl.range(start, stop, BLOCK_N):
        col = column_block(block_start, BLOCK_N)
        x = load_block(x_rows, x_stride_col, col, row_mask & (col < stop), float("-inf"), COMPUTE_DTYPE)
        lane_max, lane_sum = online_step(lane_max, lane_sum, x)
    return combine_lanes(lane_max, lane_sum)


@triton.jit
def normalise(x, row_max, row_sum, LOG: tl.constexpr):
    """softmax = exp(x - max) / sum, with one reciprocal per row; log-softmax = x - max - log(sum).
    Against the statistics' ``exponent_shift``, so a block's exp(x - shift) is computed once for
    both; a row of only -inf is NaN all the same (0 / 0, or -inf + inf)."""
    shift = exponent_shift(row_max)
    if LOG:
        return (x - shift) - tl.log(row_sum)
    return tl.exp(x - shift) * (1.0 / row_sum)


@triton.jit
def normalising_sweep(
    x_rows,
    x_stride_col,
    y_rows,
    y_stride_col,
    row_mask,
    start,
    stop,
    row_max,
    row_sum,
    LOG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """y over columns [start, stop) of rows longer than a block, given their statistics: a
    second sweep, walking backwards so the blocks the first sweep read last, still in L2, are
    read again first."""
    n_blocks = tl.cdiv(stop - start, BLOCK_N)
    for back in tl.range(0, n_blocks):
        col = column_block(start + (n_blocks - 1 - back) * BLOCK_N, BLOCK_N)
        in_bounds = row_mask & (col < stop)
        x = load_block(x_rows, x_stride_col, col, in_bounds, float("-inf"), COMPUTE_DTYPE)
        store_block(y_rows, y_stride_col, col, in_bounds, normalise(x, row_max, row_sum, LOG))


@triton.jit
def check_product(PRODUCT: tl.constexpr):
    """The products of a vector v with softmax's Jacobian J that the kernels compute from y:
    'softmax' (J is symmetric: the backward's vjp and forward-mode's jvp), 'log_softmax_vjp'
    (the backward, Jᵀv) and 'log_softmax_jvp' (forward mode, Jv)."""
    tl.static_assert(
        PRODUCT == "softmax" or PRODUCT == "log_softmax_vjp" or PRODUCT == "log_softmax_jvp",
        "PRODUCT is 'softmax', 'log_softmax_vjp' or 'log_softmax_jvp'",
    )


@triton.jit
def summand(y, v, PRODUCT: tl.constexpr):
    """The product's row sum is of v * y (softmax), of v (log-softmax's vjp) or of v * exp(y)
    (log-softmax's jvp: y holds log-probabilities)."""
    check_product(PRODUCT)
    if PRODUCT == "softmax":
        return v * y
    elif PRODUCT == "log_softmax_vjp":
        return v
    else:
        return v * tl.exp(y)


@triton.jit
def input_grad(y, v, row_sum, PRODUCT: tl.constexpr):
    """softmax: y * (v - sum(v * y)); log-softmax's vjp: v - exp(y) * sum(v); its jvp:
    v - sum(exp(y) * v)."""
    check_product(PRODUCT)
    if PRODUCT == "softmax":
        return y * (v - row_sum)
    elif PRODUCT == "log_softmax_vjp":
        return v - tl.exp(y) * row_sum
    else:
        return v - row_sum


@triton.jit
def online_row_sums(
    y_rows,
    y_stride_col,
    dy_rows,
    dy_stride_col,
    row_mask,
    start,
    stop,
    PRODUCT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """The product's row sums over columns [start, stop) of rows longer than a block,
    accumulated per lane: one sweep."""
    lane_sum = tl.zeros([ROWS, BLOCK_N], COMPUTE_DTYPE)
    for block_start in tl.range(start, stop, BLOCK_N):
        col = column_block(block_start, BLOCK_N)
        in_bounds = row_mask & (col < stop)
        y = load_block(y_rows, y_stride_col, col, in_bounds, 0.0, COMPUTE_DTYPE)
        lane_sum += summand(y, load_block(dy_rows, dy_stride_col, col, in_bounds, 0.0, COMPUTE_DTYPE), PRODUCT)
    return tl.sum(lane_sum, axis=1, keep_dims=True)


@triton.jit
def input_grad_sweep(
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
    PRODUCT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    """dx over columns [start, stop) of rows longer than a block, given their row sums: a second
    sweep, in reverse (see ``normalising_sweep``)."""
    n_blocks = tl.cdiv(stop - start, BLOCK_N)
    for back in tl.range(0, n_blocks):
        col = column_block(start + (n_blocks - 1 - back) * BLOCK_N, BLOCK_N)
        in_bounds = row_mask & (col < stop)
        y = load_block(y_rows, y_stride_col, col, in_bounds, 0.0, COMPUTE_DTYPE)
        dy = load_block(dy_rows, dy_stride_col, col, in_bounds, 0.0, COMPUTE_DTYPE)
        store_block(dx_rows, dx_stride_col, col, in_bounds, input_grad(y, dy, row_sum, PRODUCT) * scale)


@triton.jit
def fp32_pair(high, low, COMPUTE_DTYPE: tl.constexpr):
    """A float the host split in two: Triton passes Python floats as fp32, fp64 math needs the rest."""
    return tl.cast(high, COMPUTE_DTYPE) + tl.cast(low, COMPUTE_DTYPE)


@triton.jit
def tanh(u, COMPUTE_DTYPE: tl.constexpr):
    """tanh, which Triton's interpreter lacks: (1 - e) / (1 + e) of e = exp(-2|u|), which never
    overflows, with 1 - e kept exact near 0, where it cancels. In fp32 by Kahan's expm1,
    (1 - e)·2|u| / -log(e), whose roundings cancel: one log more, and fewer registers than a
    series beside the quotient (the cross-entropy tiles spilled). In fp64, below 1/8 in magnitude,
    by the Taylor series to u^15 (1e-17 relative): fp64's libdevice log spilled the masked tiles."""
    magnitude = tl.abs(u)
    decay = tl.exp(-2.0 * magnitude)
    if COMPUTE_DTYPE == tl.float64:
        large = (1.0 - decay) / (1.0 + decay)
        u2 = u * u
        series = -929569.0 / 638512875.0
        series = 21844.0 / 6081075.0 + u2 * series
        series = -1382.0 / 155925.0 + u2 * series
        series = 62.0 / 2835.0 + u2 * series
        series = -17.0 / 315.0 + u2 * series
        series = 2.0 / 15.0 + u2 * series
        series = -1.0 / 3.0 + u2 * series
        return tl.where(magnitude < 0.125, u + u * u2 * series, tl.where(u < 0, -large, large))
    else:
        exact = tl.where(decay == 1.0, 2.0 * magnitude, (1.0 - decay) * (2.0 * magnitude) / -tl.log(decay))
        result = tl.where(decay == 0.0, 1.0, exact / (1.0 + decay))
        return tl.where(u < 0, -result, result)
