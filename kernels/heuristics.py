"""Launch configuration: a pure function of (n_cols, dtype, device properties).

Pure so that the configuration an H100 gets can be computed, compiled and inspected on a
machine without a GPU. The rules, for a row of ``n_cols`` elements:

- The on-chip budget is half the register file of one SM, in compute-precision values
  (fp32, or fp64 for fp64 inputs), shared by the tensors a pass keeps live (x for the
  forward; y and dy for the backward). On an H100 that is a 32,768-element fp32 row forward
  and 16,384 backward.
- A row whose power-of-two block fits the budget is kept on chip in one pass. Short rows
  are packed several to a program until a tile holds ``TILE_BYTES`` of input.
- Longer rows stream through ``ONLINE_BLOCK``-element tiles (online softmax).
- Warps are sized so each thread issues about four 16-byte accesses per tile.
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

    def constexprs(self) -> dict:
        """Compile-time arguments of the kernels, plus the warp count."""
        return dict(
            BLOCK_N=self.block_n,
            ROWS=self.rows_per_program,
            ONLINE=self.online,
            COMPUTE_DTYPE=self.compute_dtype,
            num_warps=self.num_warps,
        )

    def grid(self, n_rows: int, device: DeviceProperties) -> int:
        """Persistent grid: enough programs to fill every SM, never more than there is work."""
        resident = max(1, device.max_threads_per_sm // (32 * self.num_warps))
        return max(1, min(triton.cdiv(n_rows, self.rows_per_program), device.sm_count * resident))


def max_on_chip_elements(compute_bytes: int, live_tensors: int, device: DeviceProperties) -> int:
    """Largest power-of-two row kept in registers: half the SM's register file."""
    budget = device.registers_per_sm * 4 // 2 // (compute_bytes * live_tensors)
    return 1 << (budget.bit_length() - 1)


@functools.cache
def launch_config(
    n_cols: int,
    elem_bytes: int,
    device: DeviceProperties,
    *,
    backward: bool = False,
    max_block: int | None = None,
) -> LaunchConfig:
    """Pick the regime, tile and warps for rows of ``n_cols`` elements of ``elem_bytes`` each.

    Math is fp32, or fp64 for 8-byte (fp64) elements.

    ``max_block`` caps the on-chip row (a power of two); tests use it to reach the online
    regime with tiny rows.
    """
    compute_bytes = 8 if elem_bytes == 8 else 4
    on_chip = max_on_chip_elements(compute_bytes, 2 if backward else 1, device)
    if max_block is not None:
        on_chip = min(on_chip, max_block)
    vector = VECTOR_BYTES // elem_bytes
    block_n = triton.next_power_of_2(max(n_cols, 1))
    if block_n <= on_chip:
        rows = max(1, TILE_BYTES // elem_bytes // block_n)
        tile = rows * block_n
        online = False
    else:
        block_n = min(ONLINE_BLOCK, on_chip)
        rows = 1
        tile = block_n
        online = True
    num_warps = min(MAX_WARPS, max(1, tile // (vector * 32 * 4)))
    return LaunchConfig(
        block_n=block_n,
        rows_per_program=rows,
        num_warps=num_warps,
        online=online,
        compute_dtype=tl.float64 if compute_bytes == 8 else tl.float32,
    )
