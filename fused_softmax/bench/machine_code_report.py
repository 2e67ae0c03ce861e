"""What ptxas makes of every kernel an H100 is given, as markdown: registers, spills, shared
memory and the width of every global load and store in the SASS.

Compiled offline for sm_90 with Triton's bundled ptxas and read with its cuobjdump and
nvdisasm (``machine_code``), so no GPU is needed. The kernels are those the host
launches for contiguous rows of 1 to 4M elements (every dtype, fused upcast, pass, softmax and
log-softmax, alignment class), for one strided layout, and the attention and row-statistics
kernels at a few row lengths. A summary comes first, then the
kernels that spill, then one row per kernel.

    python -m fused_softmax.bench.machine_code_report
    python -m fused_softmax.bench.machine_code_report --out benchmarks/results/machine_code.md
"""

import argparse
import pathlib
import time
from collections import Counter

from . import machine_code

LEGEND = """\
N range: the row lengths that launch this kernel (those of its ALIGN and N/ALIGN class);
ALIGN: the alignment in elements the host proved and passes; N/ALIGN: the JIT's view of the
n_cols argument: 1 (a constant), %16 (a multiple of 16) or - (neither). regs, spill and
local bytes are per thread; spill st/ld are the bytes of STL/LDL in the SASS (ptxas -v's
spill stores/loads); smem is Triton's scratch plus static shared memory. LDG/STG list SASS
instructions as count x bits per lane.
"""


def _width_summary(records):
    """How many kernels access memory at each width, by the widest element size's alignment."""
    rows = Counter()
    for r in records:
        k = r.kernel
        vector = machine_code.VECTOR_BITS // 8 // max(machine_code.ELEM_BYTES.get(d, 1) for d in k.dtypes)
        if not k.plain or k.layout == machine_code.STRIDED:
            kind = k.layout
        elif k.align == vector:
            kind = "16-byte aligned rows (ALIGN = vector)"
        elif k.align == 1:
            kind = "odd rows (ALIGN 1)"
        else:
            kind = "ALIGN between 1 and a vector"
        rows[kind, "/".join(map(str, sorted(r.loads))), "/".join(map(str, sorted(r.stores)))] += 1
    lines = ["| rows | LDG bits | STG bits | kernels |", "|---|---|---|--:|"]
    lines += [f"| {kind} | {ld} | {st} | {n} |" for (kind, ld, st), n in sorted(rows.items())]
    return "\n".join(lines) + "\n"


def report(workers=None):
    start = time.perf_counter()
    records = machine_code.compile_all(workers=workers)
    seconds = time.perf_counter() - start
    spilled = [r for r in records if r.spills]
    top = max(records, key=lambda r: r.registers)
    smem = max(records, key=lambda r: r.shared_bytes)
    return (
        f"# Compiled softmax kernels for sm_90 (H100)\n\n"
        f"{machine_code.compiler()}: {len(records)} kernels compiled in {seconds:.0f} s,"
        f" {len(spilled)} with spills. Most registers: {top.registers} per thread; most shared memory:"
        f" {smem.shared_bytes} B.\n\n"
        f"## Access widths\n\n{_width_summary(records)}\n"
        f"## Kernels that spill\n\n{machine_code.format_table(spilled) if spilled else 'None.'}\n"
        f"## Every kernel\n\n{LEGEND}\n{machine_code.format_table(records)}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, help="also write the report to this file")
    parser.add_argument("--workers", type=int, help="compile processes (default: one per core)")
    args = parser.parse_args()
    text = report(args.workers)
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
