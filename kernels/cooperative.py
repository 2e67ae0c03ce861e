"""The cooperative split-row regime: a split row read from HBM once.

Each program holds one chunk of its rows in registers (one block, ``chunk_cols == BLOCK_N``),
writes the chunk's statistics (forward: max and sum of exp(x - max); backward: its part of the
product's row sum) to a small workspace, waits at a barrier among its tile's programs, combines
every chunk's values exactly (the phased kernels' steps, ``split_row``) and writes its chunk of
the output from the registers: x (y and dy) read once, the output written once, 1.00x the
minimum traffic plus the per-chunk values.

The barrier (``arrive_and_wait``) is a per-tile arrival counter in a zeroed int32 buffer the
host allocates for each call (one memset, ordered before the kernel by the stream; nothing to
reset afterwards, and no state shared between calls, streams or CUDA graph replays).

Why it cannot deadlock. A program waits only for the programs of its own tile, and each of them
arrives exactly once, before it waits, whatever the values: the grid is exactly one program per
(tile, chunk) work item, so every awaited program exists. They all run at once: the host
launches with ``launch_cooperative_grid=True``, for which the driver either makes every program
of the grid resident together or refuses the launch with an error (never a partial start), and
the heuristic plans at most as many programs as the SMs hold at the on-chip budget's registers
(``heuristics._cooperative``; the offline compile report checks those registers for sm_90).
As a last guard the wait gives up after ``max_spins`` polls; a tile whose count never completed
then writes NaN, never a value from partial statistics, and never hangs.

Why the statistics are visible. Every thread's stores of its chunk's values precede a CTA
barrier (``tl.debug_barrier``, bar.sync: it synchronises the CTA's threads in PTX's memory
model); then one thread arrives with an ``acq_rel`` atomic add at GPU scope. A waiting program
polls with ``acquire`` atomics (an add of 0) until the count reaches the tile's chunks; the value
it reads was written by the last of a chain of read-modify-writes on the counter, which carries
every earlier arrival's release (a release sequence), so each arrival's stores happen before the
poll that saw the full count; the last arrival's own add, being an acquire too, sees the others'
stores without polling. A second CTA barrier orders the poll before every thread's loads of the
workspace. That is the structure of CUDA cooperative groups' grid.sync (bar.sync; one thread's
release and acquire at GPU scope; bar.sync).

Under Triton's interpreter programs run one after another, so a real wait never ends: the host
refuses this regime there, and the tests run these kernels with the barrier's count given.
"""

import triton
import triton.language as tl

from .split_row import chunk_of, combined_row_sum, combined_statistics, store_chunk_statistics
from .tiles import (
    block_statistics,
    check_product,
    column_block,
    fp32_pair,
    input_grad,
    load_block,
    normalise,
    row_starts,
    store_block,
    summand,
)


@triton.jit
def arrive_and_wait(arrivals_ptr, tile, n_chunks, max_spins):
    """Count this program into its tile's arrivals, then wait until all ``n_chunks`` have arrived
    (or ``max_spins`` polls have passed): True when they all have. See the module's docstring
    for why this is a barrier, and why it ends."""
    tl.debug_barrier()  # every thread's workspace stores precede the arrival
    arrived = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel", scope="gpu") + 1
    spins = 0
    while (arrived < n_chunks) & (spins < max_spins):
        arrived = tl.atomic_add(arrivals_ptr + tile, 0, sem="acquire", scope="gpu")
        spins += 1
    tl.debug_barrier()  # the poll that saw every arrival precedes every thread's workspace loads
    return arrived >= n_chunks


@triton.jit
def cooperative_softmax_kernel(
    x_ptr,
    y_ptr,  # output: softmax (or log-softmax) of x
    maxes_ptr,  # workspace, [rows, n_chunks]: each chunk's max
    sums_ptr,  # workspace, [rows, n_chunks]: each chunk's sum of exp(x - its max)
    arrivals_ptr,  # [tiles] int32, zero: the barrier's counters
    n_outer,
    n_cols,  # divided by ALIGN, as are chunk_cols and the outer and inner strides
    n_inner,
    x_stride_outer,
    x_stride_col,
    x_stride_inner,
    y_stride_outer,
    y_stride_col,
    y_stride_inner,
    chunk_cols,
    n_chunks,
    max_spins,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    CHUNKS: tl.constexpr,  # n_chunks, rounded up to a power of two
    LOG: tl.constexpr,
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    n_cols = n_cols * ALIGN
    item = tl.program_id(0)  # one work item a program: the grid is every (tile, chunk), all resident
    outer, inner, row_mask, row, chunk, start, stop = chunk_of(
        item, n_chunks, n_inner, n_cols, chunk_cols * ALIGN, ROWS
    )
    col = column_block(start, BLOCK_N)
    in_bounds = row_mask & (col < stop)
    x_rows = row_starts(x_ptr, outer, inner, x_stride_outer, x_stride_inner, ALIGN)
    x = load_block(x_rows, x_stride_col, col, in_bounds, float("-inf"), COMPUTE_DTYPE)
    chunk_max, chunk_sum = block_statistics(x)
    store_chunk_statistics(maxes_ptr, sums_ptr, row, chunk, n_chunks, row_mask, chunk_max, chunk_sum)
    complete = arrive_and_wait(arrivals_ptr, item // n_chunks, n_chunks, max_spins)
    row_max, row_sum = combined_statistics(maxes_ptr, sums_ptr, row, n_chunks, row_mask, CHUNKS, COMPUTE_DTYPE)
    row_sum = tl.where(complete, row_sum, float("nan"))
    y_rows = row_starts(y_ptr, outer, inner, y_stride_outer, y_stride_inner, ALIGN)
    store_block(y_rows, y_stride_col, col, in_bounds, normalise(x, row_max, row_sum, LOG))


@triton.jit
def cooperative_product_kernel(
    y_ptr,
    dy_ptr,
    dx_ptr,  # output: scale times the PRODUCT of dy with the Jacobian at y
    sums_ptr,  # workspace, [rows, n_chunks]: each chunk's part of the PRODUCT's row sum
    arrivals_ptr,  # [tiles] int32, zero: the barrier's counters
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
    max_spins,
    scale_high,  # scale = scale_high + scale_low (see tiles.fp32_pair)
    scale_low,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    CHUNKS: tl.constexpr,
    PRODUCT: tl.constexpr,  # see tiles.check_product
    ALIGN: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    check_product(PRODUCT)
    n_cols = n_cols * ALIGN
    scale = fp32_pair(scale_high, scale_low, COMPUTE_DTYPE)
    item = tl.program_id(0)
    outer, inner, row_mask, row, chunk, start, stop = chunk_of(
        item, n_chunks, n_inner, n_cols, chunk_cols * ALIGN, ROWS
    )
    col = column_block(start, BLOCK_N)
    in_bounds = row_mask & (col < stop)
    y_rows = row_starts(y_ptr, outer, inner, y_stride_outer, y_stride_inner, ALIGN)
    dy_rows = row_starts(dy_ptr, outer, inner, dy_stride_outer, dy_stride_inner, ALIGN)
    y = load_block(y_rows, y_stride_col, col, in_bounds, 0.0, COMPUTE_DTYPE)
    dy = load_block(dy_rows, dy_stride_col, col, in_bounds, 0.0, COMPUTE_DTYPE)
    chunk_sum = tl.sum(summand(y, dy, PRODUCT), axis=1, keep_dims=True)
    tl.store(sums_ptr + row * n_chunks + chunk, chunk_sum, mask=row_mask)
    complete = arrive_and_wait(arrivals_ptr, item // n_chunks, n_chunks, max_spins)
    row_sum = combined_row_sum(sums_ptr, row, n_chunks, row_mask, CHUNKS, COMPUTE_DTYPE)
    row_sum = tl.where(complete, row_sum, float("nan"))
    dx_rows = row_starts(dx_ptr, outer, inner, dx_stride_outer, dx_stride_inner, ALIGN)
    store_block(dx_rows, dx_stride_col, col, in_bounds, input_grad(y, dy, row_sum, PRODUCT) * scale)
