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
  softcapping or sinks a quarter, and one access in fp64). Some of attention scores' split
  chunks take other tiles (``SPLIT_SCORE_TILES``): what compiles without spilling under both
  Triton 3.6 (ptxas 12.8, the GPU image's) and 3.9 (ptxas 13.4).
- The grid is persistent: at most as many programs as the SMs hold at once.
- Rows too few to fill the GPU are split (``kernels.split_row``; attention scores
  ``kernels.split_attention``). By Little's law, memory runs
  at its bandwidth only with bandwidth x latency bytes in flight, and only when every SM is
  working: where the tiles would leave SMs idle or keep less than that in flight, a row is cut
  into chunks of online tiles until (rows x chunks) programs do both. Tensors under
  ``SPLIT_MIN_BYTES`` are not split: their time is the launch, and a split takes two.
- With ``cooperative`` (off by default, see ``fused_softmax._launch``), a split row whose
  chunks all fit on chip at once takes the cooperative regime instead (``kernels.cooperative``):
  one program a chunk, each chunk one block in registers, read once. Its barrier needs every
  program resident, so it is planned only where the rows x chunks programs fit the SMs at the
  on-chip budget's registers (an SM holds ``MAX_WARPS`` warps of them).
"""

import functools
import math
from dataclasses import dataclass, replace

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
SPLIT_MIN_BYTES = 1 << 20
# Programs in flight wanted beyond the bare Little's-law need, for the tail of a wave.
IN_FLIGHT_MARGIN = 1.25
# Attention scores' split chunks where they differ from the online rule's tile and accesses a
# thread: (tile, accesses, fewest warps) by (element bytes, attention, backward), ``attention``
# as in ``launch_config``. Under ptxas 12.8 (Triton 3.6) the online rule's warps spilled 4 to
# 88 bytes: fp32 under softcapping or sinks at 4 warps, fp64 at 8 or 16 (values kept across
# the subroutine calls of the 64-bit index divisions; fp64's backward at 128 registers, its
# cap at 16 warps), and the masked forward's normalising phase 8 bytes in fp16/bf16 at 4 warps
# and 160-232 in fp64 at 2,048-element tiles (255 registers). These compile spill-free under
# ptxas 12.8 and 13.4 (Triton 3.9), found by compiling the neighbouring tiles and warps of
# every audited shape under both.
SPLIT_SCORE_TILES = {
    (2, 1, False): (ONLINE_BLOCK >> 1, 1, 4),
    (4, 2, False): (ONLINE_BLOCK >> 2, 1, 4),
    (8, 1, False): (ONLINE_BLOCK >> 2, 4, 4),
    (8, 2, False): (ONLINE_BLOCK >> 3, 1, 4),
    (8, 2, True): (ONLINE_BLOCK >> 3, 2, 4),
}


@dataclass(frozen=True)
class DeviceProperties:
    """What the heuristic needs to know about a GPU. Bandwidth (bytes/s, the datasheet's) and
    latency (s, a DRAM load's under load) give the bytes that must be in flight."""

    name: str
    sm_count: int
    registers_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    memory_bandwidth: float = 3.35e12
    memory_latency: float = 800e-9
    l2_bytes: int = 50 * 2**20

    @property
    def bytes_in_flight_needed(self) -> float:
        return self.memory_bandwidth * self.memory_latency


H100 = DeviceProperties(name="NVIDIA H100 80GB HBM3", sm_count=132)
H200 = DeviceProperties(name="NVIDIA H200", sm_count=132, memory_bandwidth=4.8e12, l2_bytes=60 * 2**20)


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int
    rows_per_program: int
    num_warps: int
    online: bool
    compute_dtype: tl.dtype
    chunks: int = 1  # > 1: the split-row regime, each row cut into this many chunks
    chunk_cols: int = 0  # the split-row regime's chunk length, a multiple of block_n
    cooperative: bool = False  # a split row's chunks held on chip across a barrier, one launch
    max_registers: int | None = None  # ptxas's cap a thread (Triton's maxnreg), where residency needs it

    @property
    def chunk_slots(self) -> int:
        """A split row's chunks, rounded up to a power of two: the block the second phase loads
        its row's per-chunk values into (the CHUNKS constexpr)."""
        return triton.next_power_of_2(self.chunks)

    @property
    def regime(self) -> str:
        """How a program covers its rows: 'multi_row' (several whole rows per tile), 'single_pass'
        (one whole row on chip), 'online' (a row streamed through blocks, two sweeps) or 'split'
        (a chunk of a row, several programs per row, two launches) or 'cooperative' (a chunk of
        a row on chip, its programs meeting at a barrier, one launch)."""
        if self.cooperative:
            return "cooperative"
        if self.chunks > 1:
            return "split"
        if self.online:
            return "online"
        return "multi_row" if self.rows_per_program > 1 else "single_pass"

    def constexprs(self) -> dict:
        """The tile's compile-time arguments, which every kernel takes. ``online`` is passed as
        ONLINE only to the kernels that have both regimes."""
        return dict(BLOCK_N=self.block_n, ROWS=self.rows_per_program, COMPUTE_DTYPE=self.compute_dtype)

    def resident_programs(self, device: DeviceProperties) -> int:
        """Programs the GPU holds at once (the warps being the limit)."""
        return device.sm_count * max(1, device.max_threads_per_sm // (32 * self.num_warps))

    def grid(self, n_outer: int, n_inner: int, device: DeviceProperties) -> int:
        """Persistent grid: enough programs to fill every SM, never more than there are work
        items (tiles, times the chunks of a split row). Cooperative: one program an item, all
        resident (the heuristic plans no more)."""
        items = n_outer * -(-n_inner // self.rows_per_program) * self.chunks
        if self.cooperative:
            return items
        return max(1, min(items, self.resident_programs(device)))


def max_on_chip_elements(compute_bytes: int, live_tensors: int, wide: bool, device: DeviceProperties) -> int:
    """Longest power-of-two row a program keeps in registers without spilling."""
    registers_per_thread = device.registers_per_sm // (MAX_WARPS * 32)
    values = registers_per_thread // 2 // (compute_bytes // 4) // live_tensors // (1 if wide else 2)
    return MAX_WARPS * 32 * values


def tile_load_bytes(config: LaunchConfig, elem_bytes: int, backward: bool) -> int:
    """The bytes one program has in flight: one tile of each tensor it reads (x; y and dy)."""
    return config.rows_per_program * config.block_n * elem_bytes * (2 if backward else 1)


def _split(config, n_rows, n_cols, elem_bytes, device, backward, align, vector, min_split_bytes, attention=0):
    """``config`` with its rows cut into chunks where its tiles would leave SMs idle or keep too
    little in flight (bandwidth x latency, or the whole input if that is less); unchanged where
    the rows fill the GPU or the tensor is small. Attention scores' chunks take their online
    tile and accesses, or those of ``SPLIT_SCORE_TILES`` (``attention`` as in ``launch_config``)."""
    if n_rows is None or n_rows * n_cols * elem_bytes < min_split_bytes:
        return config
    tiles = triton.cdiv(n_rows, config.rows_per_program)
    reads = n_rows * n_cols * elem_bytes * (2 if backward else 1)
    needed = min(IN_FLIGHT_MARGIN * device.bytes_in_flight_needed, reads)
    if tiles >= config.resident_programs(device):
        return config  # the rows alone fill every program the GPU holds: a split adds none
    if tiles >= device.sm_count and tiles * tile_load_bytes(config, elem_bytes, backward) >= needed:
        return config
    compute_bytes = 8 if config.compute_dtype == tl.float64 else 4
    online_rule = (ONLINE_BLOCK >> attention, _accesses(attention, compute_bytes), 4)
    tile, accesses, least_warps = SPLIT_SCORE_TILES.get((elem_bytes, attention, backward), online_rule)
    tiled = replace(config, block_n=min(tile, config.block_n), online=True)
    wanted = max(device.sm_count, math.ceil(needed / tile_load_bytes(tiled, elem_bytes, backward)))
    chunks = triton.cdiv(wanted, tiles)
    # Chunks of whole blocks, at least ``chunks`` of them: a block of the largest power of two
    # that fits a chunk, and chunks of as many blocks as fit.
    per_chunk = max(1, n_cols // chunks)
    block = max(align, min(tiled.block_n, 1 << (per_chunk.bit_length() - 1)))
    chunk_cols = max(block, per_chunk // block * block)
    if triton.cdiv(n_cols, chunk_cols) < 2:
        return config
    # At least 4 warps (with 2, ptxas spilled a few bytes of the backward's second phase), but
    # where SPLIT_SCORE_TILES says fewer.
    warps = max(least_warps, _warps(config.rows_per_program, block, vector, accesses))
    tiled = replace(tiled, block_n=block, num_warps=warps)
    return replace(tiled, chunks=triton.cdiv(n_cols, chunk_cols), chunk_cols=chunk_cols)


def _registers_per_thread(device):
    """The registers a thread has when an SM holds MAX_WARPS warps, the on-chip budget's premise."""
    return device.registers_per_sm // (MAX_WARPS * 32)


def _cooperative(split, n_rows, n_cols, on_chip, device, align, vector):
    """The cooperative form of the split config ``split``, or None where its rows do not fit on
    chip at once.

    With p programs an SM, each of at most MAX_WARPS / p warps, a thread has the registers of
    the on-chip budget (``max_on_chip_elements``, at MAX_WARPS warps an SM), so a program holds
    a chunk of on_chip / p elements. Chunks are cut so that the programs cover every SM (never
    smaller than one access of a warp), and p is the fewest programs an SM that then holds every
    chunk: at most 4 (programs of at least 4 warps, see ``_split``). ptxas is held to those
    registers (``max_registers``): a chunk of fp32 kept across the barrier took more (146 at
    8 warps and 64 values a thread), and so fewer programs an SM than planned."""
    rows = split.rows_per_program
    tiles = triton.cdiv(n_rows, rows)
    per_row = max(1, n_cols // triton.cdiv(device.sm_count, tiles))  # columns a program, to cover every SM
    for per_sm in (1, 2, 4):
        capacity = on_chip // per_sm // rows
        block = min(capacity, max(1 << (per_row.bit_length() - 1), 32 * vector // rows))
        if block < align:  # chunks start aligned, as the strides are divided by the alignment
            break
        chunks = triton.cdiv(n_cols, block)
        if chunks >= 2 and tiles * chunks <= per_sm * device.sm_count:
            warps = min(MAX_WARPS // per_sm, max(4, _warps(rows, block, vector)))
            cut = dict(block_n=block, num_warps=warps, chunks=chunks, chunk_cols=block)
            return replace(split, **cut, cooperative=True, max_registers=_registers_per_thread(device))
    return None


@functools.lru_cache(maxsize=4096)
def launch_config(
    n_cols: int,
    elem_bytes: int,
    device: DeviceProperties,
    *,
    backward: bool = False,
    attention: int = 0,
    cross_entropy: bool = False,
    align: int = 1,
    contiguous_rows: int = 1,
    max_block: int | None = None,
    n_rows: int | None = None,
    min_split_bytes: float = SPLIT_MIN_BYTES,
    cooperative: bool = False,
) -> LaunchConfig:
    """Pick the regime, tile and warps for rows of ``n_cols`` elements.

    ``elem_bytes``: the widest element the kernel touches; math is fp64 for 8-byte elements,
    else fp32. ``attention``: 1 for masked_softmax's forward, whose mask and causal comparisons
    take about a tile's registers beside the scores: half the on-chip row, half the online tile
    and twice the warps; 2 with softcapping or sinks (their tanh and statistics, forward and
    backward): a tile's registers more and a quarter of the online tile (the compile report
    found spills at 1, under Triton 3.6), and in fp64 four times the warps. ``cross_entropy``:
    its forward, which keeps the target's and the smoothing's sums beside the softmax's and
    writes the gradient from the block it reduced (with the smoothing's weights beside it): two
    tiles' registers more, half the online tile and the multi-row tile, and a quarter of fp64's
    on-chip row. ``align``: the proven alignment of rows, in elements (accesses are 128-bit when
    it reaches 16 bytes). ``contiguous_rows``: how many neighbouring rows lie at unit stride (1
    when the columns are unit-stride). ``max_block`` caps the on-chip row, a power of two; tests
    use it to reach the online regime with tiny rows. ``n_rows``: how many rows the launch has,
    given by the jobs that have a split-row regime (softmax and its products, attention scores,
    cross-entropy's slice kernels): it decides that regime, unless the tensor is under
    ``min_split_bytes``.
    ``cooperative``: a split row of softmax or its products whose chunks fit on chip at once
    takes the cooperative regime (``_cooperative``; attention scores stay phased).
    """
    compute_bytes = 8 if elem_bytes == 8 else 4
    wide = align * elem_bytes >= VECTOR_BYTES
    narrow = 1 if wide else 2  # an element that is its own access needs its own address registers
    on_chip = max_on_chip_elements(compute_bytes, (2 if backward else 1) + attention + 2 * cross_entropy, wide, device)
    if compute_bytes == 8:
        on_chip = min(on_chip, FP64_ON_CHIP >> 2 * cross_entropy)
    if max_block is not None:
        on_chip = min(on_chip, max_block)
    row_run = triton.next_power_of_2(contiguous_rows)
    min_rows = min(row_run, SECTOR_BYTES // elem_bytes) if contiguous_rows > 1 else 1
    block_n = triton.next_power_of_2(max(n_cols, 1))
    online = block_n * min_rows > on_chip
    if online:
        rows = min_rows
        block_n = max(1, min(ONLINE_BLOCK >> (attention or cross_entropy), on_chip // narrow) // rows)
    else:
        rows = max(min_rows, (TILE_BYTES >> cross_entropy) // narrow // elem_bytes // block_n)
        if contiguous_rows > 1:
            rows = min(rows, row_run)
    vector = align if contiguous_rows == 1 else min(row_run, VECTOR_BYTES // elem_bytes)
    config = LaunchConfig(
        block_n=block_n,
        rows_per_program=rows,
        num_warps=_warps(rows, block_n, vector, _accesses(attention, compute_bytes)),
        online=online,
        compute_dtype=tl.float64 if compute_bytes == 8 else tl.float32,
    )
    split = _split(config, n_rows, n_cols, elem_bytes, device, backward, align, vector, min_split_bytes, attention)
    if cooperative and split.chunks > 1 and not attention:
        return _cooperative(split, n_rows, n_cols, on_chip, device, align, vector) or split
    return split


def _accesses(attention=0, compute_bytes=4):
    """About four accesses a thread a tile; fewer under attention's masking, whose registers it
    needs, and in fp64 under softcapping or sinks, whose libdevice exp and log need warps too."""
    return 4 >> (attention if compute_bytes == 8 else min(attention, 1))


def _warps(rows, block_n, vector, accesses=4):
    """The warps that give each thread ``accesses`` accesses of a tile."""
    return min(MAX_WARPS, max(1, rows * block_n // (vector * 32 * accesses)))
