"""Every kernel an H100 is given, compiled offline for sm_90: no register spills, and global
accesses as wide as the host's proven alignment allows, under whichever Triton is installed
(CI's 3.9). Under the GPU image's 3.6, whose ptxas 12.8 spills where 3.9's 13.4 does not
(values kept across the subroutine calls of 64-bit index divisions), 11 of 2,075 kernels
spilled 4-16 bytes when the masked split tiles were last set (2026-12-04): 16 bytes in fp16/bf16 online
masked forwards with softcap, sinks, a bool mask and causal at 16,384; 8 in an fp64 streamed
tangent; 4 in an fp64 masked softcap tile, fp32 row statistics at 131,072, bf16 and fp32
cross-entropy online tiles at 16,384, three vocabulary-slice tiles and an fp64 cooperative
chunk: the audit tolerates those, at most 16 bytes, under ptxas 12.8 only. Under 3.9 one masked
kernel spills (``_known_division_spill``).

The kernels are the ones the host launches (``fused_softmax.machine_code.shipped_kernels``): for
contiguous rows of every length from 1 to 4M, each dtype (and fused upcast), forward and
backward, softmax and log-softmax, plus one layout with unit-stride rows. Uses Triton's
bundled ptxas and cuobjdump, so it needs no GPU and skips only where that toolchain is
missing. Compiling is the cost (about 1,350 kernels, 0.3 s of CPU each), so it is split by pass
and LOG and each part compiles in processes of its own.
"""

import dataclasses
import os
import random
import re

import pytest

pytest.importorskip("triton", reason="triton is not installed: no compiler to inspect")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fused_softmax.bench import machine_code  # noqa: E402
from fused_softmax.kernels import LaunchConfig  # noqa: E402

try:
    machine_code.toolchain()
except machine_code.ToolchainMissing as e:
    pytest.skip(str(e), allow_module_level=True)

KERNELS = machine_code.shipped_kernels()
# One compile process per core in every test, under pytest -n too: while one xdist worker
# finishes its last test, that test's processes take the cores the others left.
WORKERS = os.cpu_count() or 1


def expected_bits(kernel, dtype):
    """The width of every global access of ``kernel`` to its ``dtype`` tensors.

    A lane moves as many consecutive elements as Triton can prove aligned and uniformly
    masked, up to a 16-byte vector. For last-dim rows that run is ALIGN elements (the host
    passes n_cols and the row stride divided by ALIGN), 16 times that when the JIT also sees
    N / ALIGN as a multiple of 16, and never more than BLOCK_N. So rows aligned to a full
    vector (ALIGN = 16 / the widest element size) get 128-bit accesses; odd rows (ALIGN 1)
    element-wide ones; ALIGN 2 or 4 of fp16 that many elements; and the fp16 side of an
    upcast, aligned only to the fp32 side's 4 elements, 64 bits unless N / 4 is a multiple of
    16. In the strided layout the rows, not the columns, are unit-stride: a tile's ROWS
    consecutive rows (at least a 32-byte sector) start at a multiple of ROWS elements.
    """
    elem_bytes = machine_code.ELEM_BYTES[dtype]
    if kernel.layout == machine_code.STRIDED:
        run = kernel.config.rows_per_program
    else:
        run = min(kernel.config.block_n, kernel.align * (16 if kernel.cols == "%16" else 1))
    return 8 * elem_bytes * min(machine_code.VECTOR_BITS // 8 // elem_bytes, run)


def _row_lengths():
    """Lengths around every power of two, and others the enumeration does not try."""
    lengths = {n for k in range(23) for n in (2**k - 1, 2**k, 2**k + 1, 3 * 2**k, 5 * 2**k + 8)}
    lengths |= {1000, 1536, 4000, 11008, 32000, 50257, 100_000, 128_256, 1_000_000}
    lengths |= set(random.Random(0).sample(range(1, machine_code.MAX_COLS + 1), 64))
    return sorted(n for n in lengths if 1 <= n <= machine_code.MAX_COLS)


def test_every_row_length_launches_a_listed_kernel():
    """Each launch, by the host's own route, is one of KERNELS, with its length in its range."""
    shipped = {k: k for k in KERNELS}
    for backward, dtypes in machine_code.VARIANTS:
        for log in (False, True):
            for n in _row_lengths():
                kernel = machine_code.kernel_for(backward, dtypes, log, n)
                assert kernel in shipped, (backward, dtypes, log, n, kernel)
                lo, hi = shipped[kernel].n_range
                assert lo <= n <= hi, (backward, dtypes, log, n, shipped[kernel])


def test_every_variant_and_class_is_listed():
    """The list holds each dtype variant, softmax and log-softmax, each alignment a contiguous
    row can have, and the strided layout."""
    found = {(k.backward, k.dtypes, k.log, k.layout) for k in KERNELS}
    for backward, dtypes in machine_code.VARIANTS:
        for log in (False, True):
            for layout in ("last dim", machine_code.STRIDED):
                assert (backward, dtypes, log, layout) in found
            vector = machine_code.VECTOR_BITS // 8 // max(machine_code.ELEM_BYTES[d] for d in dtypes)
            aligns = {
                (k.align, k.cols)
                for k in KERNELS
                if (k.backward, k.dtypes, k.log, k.layout) == (backward, dtypes, log, "last dim")
            }
            assert {(a, "-") for a in range(1, vector + 1) if vector % a == 0} | {(vector, "%16")} <= aligns, aligns


def test_aligned_rows_are_expected_at_128_bits_and_odd_rows_element_wide():
    """What the width check demands, in the terms of the host: rows of a length divisible by 16,
    or by a 16-byte vector, get ALIGN = a vector and 128-bit accesses to their widest tensors;
    odd rows get ALIGN 1 and accesses one element wide."""
    for backward, dtypes in machine_code.VARIANTS:
        widest = max(dtypes, key=machine_code.ELEM_BYTES.get)
        vector = machine_code.VECTOR_BITS // 8 // machine_code.ELEM_BYTES[widest]
        for n in (16, 48, 1024, 4000, 65536, vector, 3 * vector, 1000 * vector):
            kernel = machine_code.kernel_for(backward, dtypes, False, n)
            assert kernel.align == vector and expected_bits(kernel, widest) == 128, (dtypes, n, kernel)
        for n in (1, 3, 1001, 65537):
            kernel = machine_code.kernel_for(backward, dtypes, False, n)
            assert kernel.align == 1, (dtypes, n, kernel)
            assert all(expected_bits(kernel, d) == 8 * machine_code.ELEM_BYTES[d] for d in dtypes), (n, kernel)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_no_spills_and_widest_accesses(backward, log):
    records = machine_code.compile_all(
        [k for k in KERNELS if k.plain and (k.backward, k.log) == (backward, log)], WORKERS
    )
    spilled = [r for r in records if r.spills and not _known_division_spill(r)]
    narrow = [
        r
        for r in records
        if set(r.loads) != {expected_bits(r.kernel, r.kernel.dtypes[0])}
        or set(r.stores) != {expected_bits(r.kernel, r.kernel.dtypes[-1])}
    ]
    assert not spilled and not narrow, (
        f"\n{machine_code.compiler()}\nKernels that spill:\n{machine_code.format_table(spilled) if spilled else 'none'}"
        f"\nKernels whose global accesses are not all of the expected width:\n"
        f"{machine_code.format_table(narrow) if narrow else 'none'}"
    )


# ptxas 12.8 (Triton 3.6's) keeps a few values in local memory across the subroutine calls of
# 64-bit index divisions where 13.4 keeps them in registers: up to this many bytes a thread are
# tolerated under it (the kernels the module's docstring lists), and any more fails.
PTXAS_12_8_CALL_SPILL_BYTES = 16


def _known_division_spill(record):
    """A spill across a 64-bit index division's subroutine call that the audit accepts: under
    ptxas 13.4 only the fp64 online masked forward with softcap, sinks, a bool mask and the causal
    diagonal, at most 16 bytes of loop-invariant values, a few L1 loads per row of 16,384 scores
    (the division is per tile, outside the column sweeps); under ptxas 12.8 any such spill of at
    most ``PTXAS_12_8_CALL_SPILL_BYTES``."""
    kernel = record.kernel
    if machine_code.compiler().endswith("ptxas 12.8"):
        return record.local_bytes <= PTXAS_12_8_CALL_SPILL_BYTES
    return (
        kernel.name == "masked_softmax_forward_kernel"
        and kernel.dtypes[0] == "fp64"
        and "softcap and sinks" in kernel.layout
        and kernel.config.online
        and record.local_bytes <= 16
    )


def test_attention_and_row_statistics_kernels():
    """No spills, and 128-bit loads (its rows are 16-byte aligned) and stores of the output; the
    row-statistics kernels without an output, and the cross-entropy kernel writing only the loss,
    store one value per row. The cross-entropy kernels are among them (``mode_kernels``)."""
    records = machine_code.compile_all([k for k in KERNELS if not k.plain and not k.config.cooperative], WORKERS)
    assert len(records) > 100
    spilled = [r for r in records if r.spills and not _known_division_spill(r)]
    narrow = [r for r in records if max(r.loads) != 128 or (r.kernel.layout.endswith("out") != (max(r.stores) < 128))]
    assert not spilled and not narrow, (
        f"\n{machine_code.compiler()}\nKernels that spill:\n{machine_code.format_table(spilled) if spilled else 'none'}"
        f"\nKernels with narrow accesses:\n{machine_code.format_table(narrow) if narrow else 'none'}"
    )


# The barrier as the PTX must have it: a CTA barrier, one thread's acq_rel add at GPU scope, a
# loop of acquire polls with a CTA barrier around each (Triton lowers an acquire add of 0 to an
# acquire load), and a CTA barrier after it.
BARRIER_PTX = (
    ("bar.sync", False),
    ("atom.global.gpu.acq_rel.add.u32", False),
    ("bar.sync", False),
    ("bar.sync", True),
    ("ld.global.gpu.acquire.b32", True),
    ("bar.sync", True),
    ("bar.sync", False),
)


def test_cooperative_kernels_barrier_residency_and_accesses():
    """The cooperative kernels (off by default, planned for the decoding shapes): no spills; at
    most the registers their plan counts on for every program to be resident at once (the
    register cap ptxas is given); 128-bit loads and stores of the rows; and the barrier's memory
    ordering in the PTX, exactly. No other kernel has an ordered access."""
    cooperative = [k for k in KERNELS if k.config.cooperative]
    assert {k.name for k in cooperative} == {"cooperative_softmax_kernel", "cooperative_product_kernel"}
    others = [next(k for k in KERNELS if k.layout == layout) for layout in ("chunks out", "chunks in", "last dim")]
    records = machine_code.compile_all(cooperative + others, WORKERS)
    wrong = []
    for r in records[: len(cooperative)]:
        ordered = [op for op, _ in r.ordering if not op.startswith("bar")]
        at = next(i for i, entry in enumerate(r.ordering) if entry[0].startswith("atom"))
        barrier = r.ordering[at - 1 : at + len(BARRIER_PTX) - 1]
        if (
            (r.spills and not _known_division_spill(r))
            or r.registers > r.kernel.config.max_registers
            or max(r.loads) != 128
            or max(r.stores) != 128
            or ordered != [BARRIER_PTX[1][0], BARRIER_PTX[4][0]]
            or barrier != BARRIER_PTX
        ):
            wrong.append(r)
    assert not wrong, "\n".join(
        [machine_code.compiler(), machine_code.format_table(wrong)] + [str(r.ordering) for r in wrong]
    )
    assert len(records) == len(cooperative) + 3
    for r in records[len(cooperative) :]:
        assert not [op for op, _ in r.ordering if not op.startswith("bar")], (r.kernel.name, r.ordering)


def test_the_compiler_is_named():
    """The audit says what compiled it: spills are ptxas's, and Triton 3.6 and 3.9 bundle different ones."""
    assert re.fullmatch(r"Triton \d+\.\d+\.\d+\S*, ptxas \d+\.\d+", machine_code.compiler()), machine_code.compiler()
    assert triton.__version__ in machine_code.compiler()


def test_a_spilling_kernel_is_caught():
    """The check above is only as good as its reading of the cubin: 256 fp32 values a thread must spill."""
    kernel = machine_code.kernel_for(False, ("fp32", "fp32"), False, 32768)
    config = LaunchConfig(block_n=32768, rows_per_program=1, num_warps=4, online=False, compute_dtype=tl.float32)
    record = machine_code.compile_kernel(dataclasses.replace(kernel, config=config))
    assert record.spills and record.spill_store_bytes > 0 and record.spill_load_bytes > 0, record
    assert record.registers == 255 and record.loads == {128: 64}, record


def test_an_invalid_switch_fails_to_compile():
    """The masked-softmax kernel's MASK is '', 'bool' or 'additive'; anything else is a compile error."""
    kernel = next(k for k in KERNELS if k.name == "masked_softmax_forward_kernel")
    switches = tuple((name, "causal" if name == "MASK" else value) for name, value in kernel.switches)
    with pytest.raises(Exception, match="MASK is '', 'bool' or 'additive'"):
        machine_code.compile_kernel(dataclasses.replace(kernel, switches=switches))


def test_an_invalid_product_fails_to_compile():
    """The backward kernel's PRODUCT is one of the three of ``_jacobian``; anything else is a compile error."""
    kernel = machine_code.kernel_for(True, ("fp32", "fp32", "fp32"), False, 1000)
    switches = tuple((name, "log_softmax" if name == "PRODUCT" else value) for name, value in kernel.switches)
    with pytest.raises(Exception, match="PRODUCT is 'softmax', 'log_softmax_vjp' or 'log_softmax_jvp'"):
        machine_code.compile_kernel(dataclasses.replace(kernel, switches=switches))
