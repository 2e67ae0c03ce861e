"""Launch configuration: a pure function of the row shape, dtype and device properties.

Pure so that the configuration an H100 gets can be computed, compiled and inspected on a
machine without a GPU (see ``fused_softmax.bench.machine_code``). The rules:

- A thread keeps at most half the registers it may have at ``MAX_WARPS`` warps for row
  values, split among the tensors a pass keeps live (x forward, and a mask's worth more for
  attention scores; y and dy backward), and half that again when accesses cannot be 128-bit
  (each element then needs its own address). On
  an H100 that is a 32,768-element fp32 row forward and 16,384 backward, at 16-byte alignment.
- A row whose power-of-two block fits is kept on chip in one pass. Short rows are packed
  several to a tile until it holds ``TILE_BYTES`` of input (half that for narrow accesses).
- Where the rows, not the columns, are unit-stride (a softmax over an earlier dim), a tile
  takes at least a 32-byte sector's worth of neighbouring rows.
- Longer rows stream through ``ONLINE_BLOCK``-element tiles (online softmax).
- Warps are sized so each thread issues about four accesses per tile (two for attention
  scores, whose masking needs registers; its online tile is half the size too; with
  softcapping or sinks a quarter, and one access in fp64).
- The grid is persistent: at most as many programs as the SMs hold at once.
"""

import functools
from dataclasses import dataclass

import triton
import triton.language as tl

TILE_BYTES = 16 * 1024
ONLINE_BLOCK = 4096
MAX_WARPS = 16
VECTOR_BYTES = 16
SECTOR_BYTES = 32
# fp64 exp and log (libdevice) need many registers of their own: compiled for sm_90, fp64
# rows up to this length stay on chip without spilling.
FP64_ON_CHIP = 8192


@dataclass(frozen=True)
class DeviceProperties:
    """What the heuristic needs to know about a GPU."""

    name: str
    sm_count: int
    registers_per_sm: int = 65536
    max_threads_per_sm: int = 2048


H100 = DeviceProperties(name="NVIDIA H100 80GB HBM3", sm_count=132)


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int
    rows_per_program: int
    num_warps: int
    online: bool
    compute_dtype: tl.dtype

    @property
    def regime(self) -> str:
        """How a program covers its rows: 'multi_row' (several whole rows per tile), 'single_pass'
        (one whole row on chip) or 'online' (a row streamed through blocks, two sweeps)."""
        if self.online:
            return "online"
        return "multi_row" if self.rows_per_program > 1 else "single_pass"

    def constexprs(self) -> dict:
        """The tile's compile-time arguments, which every kernel takes. ``online`` is passed as
        ONLINE only to the kernels that have both regimes."""
        return dict(BLOCK_N=self.block_n, ROWS=self.rows_per_program, COMPUTE_DTYPE=self.compute_dtype)

    def grid(self, n_outer: int, n_inner: int, device: DeviceProperties) -> int:
        """Persistent grid: enough programs to fill every SM, never more than there are tiles."""
        tiles = n_outer * triton.cdiv(n_inner, self.rows_per_program)
        resident = max(1, device.max_threads_per_sm // (32 * self.num_warps))
        return max(1, min(tiles, device.sm_count * resident))


def max_on_chip_elements(compute_bytes: int, live_tensors: int, wide: bool, device: DeviceProperties) -> int:
    """Longest power-of-two row a program keeps in registers without spilling."""
    registers_per_thread = device.registers_per_sm // (MAX_WARPS * 32)
    values = registers_per_thread // 2 // (compute_bytes // 4) // live_tensors // (1 if wide else 2)
    return MAX_WARPS * 32 * values


@functools.cache
def launch_config(
    n_cols: int,
    elem_bytes: int,
    device: DeviceProperties,
    *,
    backward: bool = False,
    attention: int = 0,
    align: int = 1,
    contiguous_rows: int = 1,
    max_block: int | None = None,
) -> LaunchConfig:
    """Pick the regime, tile and warps for rows of ``n_cols`` elements.

    ``elem_bytes``: the widest element the kernel touches; math is fp64 for 8-byte elements,
    else fp32. ``attention``: 1 for masked_softmax's forward, whose mask and causal comparisons
    take about a tile's registers beside the scores: half the on-chip row, half the online tile
    and twice the warps; 2 with softcapping or sinks (their tanh and statistics, forward and
    backward): a tile's registers more and a quarter of the online tile (the compile report
    found spills at 1, under Triton 3.6), and in fp64 four times the warps. ``align``: the
    proven alignment of rows, in elements (accesses are 128-bit when it reaches 16 bytes).
    ``contiguous_rows``: how many neighbouring rows lie at unit stride (1 when the columns are
    unit-stride). ``max_block`` caps the on-chip row, a power of two; tests use it to reach the
    online regime with tiny rows.
    """
    compute_bytes = 8 if elem_bytes == 8 else 4
    wide = align * elem_bytes >= VECTOR_BYTES
    narrow = 1 if wide else 2  # an element that is its own access needs its own address registers
    on_chip = max_on_chip_elements(compute_bytes, (2 if backward else 1) + attention, wide, device)
    if compute_bytes == 8:
        on_chip = min(on_chip, FP64_ON_CHIP)
    if max_block is not None:
        on_chip = min(on_chip, max_block)
    row_run = triton.next_power_of_2(contiguous_rows)
    min_rows = min(row_run, SECTOR_BYTES // elem_bytes) if contiguous_rows > 1 else 1
    block_n = triton.next_power_of_2(max(n_cols, 1))
    online = block_n * min_rows > on_chip
    if online:
        rows = min_rows
        block_n = max(1, min(ONLINE_BLOCK >> attention, on_chip // narrow) // rows)
    else:
        rows = max(min_rows, TILE_BYTES // narrow // elem_bytes // block_n)
        if contiguous_rows > 1:
            rows = min(rows, row_run)
    vector = align if contiguous_rows == 1 else min(row_run, VECTOR_BYTES // elem_bytes)
    # Softcapping's and sinks' math in fp64 (libdevice exp and log) needs warps of its own too.
    accesses = 4 >> (attention if compute_bytes == 8 else min(attention, 1))
    num_warps = min(MAX_WARPS, max(1, rows * block_n // (vector * 32 * accesses)))
    return LaunchConfig(
        block_n=block_n,
        rows_per_program=rows,
        num_warps=num_warps,
        online=online,
        compute_dtype=tl.float64 if compute_bytes == 8 else tl.float32,
    )
