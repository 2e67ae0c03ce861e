"""Bytes each softmax kernel moves per launch, against the least possible, as a markdown table.

Counts the global-memory loads and stores of the active lanes of every kernel memory op,
running the kernels on CPU under Triton's interpreter with the launch configurations the
heuristic picks for an H100 (``fused_softmax.testing.kernel_traffic``). The count is
exact, not a hardware measurement: it is what the kernel asks for, before caches.

Minimum = every tensor touched once (x, y forward; y, dy, dx backward). Design = x read once
per sweep and y written once (forward), y and dy read once per sweep and dx written once
(backward), one sweep on chip and two online: 1 on chip, 3/2 online forward, 5/3 online
backward; with dtype= fusing fp16 x into fp32 y (dx back in fp16), 4/3 and 9/5 online.
Alignment is the proven alignment of the rows; unaligned rows keep half as much on chip.

    python -m fused_softmax.bench.traffic                # boundary lengths, all dtypes, both ops
    python -m fused_softmax.bench.traffic --n 3000 70000 --dtype float32 --kernel forward --op log_softmax
    python -m fused_softmax.bench.traffic --check --out benchmarks/results/bytes_moved.md
"""

import argparse
import os
import sys
import time
import warnings
from fractions import Fraction

import torch

from .. import _launch
from .._runtime import kernels, kernels_interpreted
from ..testing import kernel_traffic, minimum_bytes, poisoned_outputs, recorded_launches

# name: (input dtype, output dtype of the forward); the backward reads y and dy in the
# output dtype and writes dx in the input dtype.
DTYPES = {
    "float32": (torch.float32, torch.float32),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "float16": (torch.float16, torch.float16),
    "float64": (torch.float64, torch.float64),
    "float16->float32": (torch.float16, torch.float32),
}
KERNELS = ("forward", "backward")
OPS = ("softmax", "log_softmax")


def on_chip_limit(elem_bytes, backward, align):
    """Longest power-of-two row the H100 configuration keeps on chip at this alignment (elements)."""
    n = 1
    while not kernels().launch_config(2 * n, elem_bytes, kernels().H100, backward=backward, align=align).online:
        n *= 2
    return n


def boundary_lengths(elem_bytes, backward):
    """Multi-row, single-pass and online rows, at the on-chip limits of aligned and unaligned rows."""
    aligned = on_chip_limit(elem_bytes, backward, 16 // elem_bytes)
    unaligned = on_chip_limit(elem_bytes, backward, 1)
    return sorted([1000, 5001, unaligned - 1, aligned, unaligned + 1, aligned + 16, 100_000])


def measure(kernel, op, dtypes, n_cols, n_rows=None, seed=0):
    in_dtype, out_dtype = dtypes
    backward, log = kernel == "backward", op == "log_softmax"
    if n_rows is None:
        # Multi-row: one full tile of rows and a partial one. Else a few rows.
        probe = [torch.empty(1, n_cols, dtype=d) for d in ((out_dtype,) * 2 + (in_dtype,) if backward else dtypes)]
        rows = _launch.plan(probe, 1, backward=backward).config.rows_per_program
        n_rows = rows + 3 if rows > 1 else 4
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((n_rows, n_cols), generator=g, dtype=torch.float64) * 3).to(in_dtype)
    with poisoned_outputs(), recorded_launches() as launches, warnings.catch_warnings():
        # Padding rows of a multi-row tile are all -inf; -inf - -inf = NaN there, never stored.
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        if backward:
            y = (torch.log_softmax if log else torch.softmax)(x.double(), dim=-1).to(out_dtype)
            dy = torch.randn((n_rows, n_cols), generator=g, dtype=torch.float64).to(out_dtype)
            with kernel_traffic() as traffic:
                out = _launch.softmax_backward(y, dy, 1, in_dtype, log)
            ins = (y, dy)
        else:
            with kernel_traffic() as traffic:
                out = _launch.softmax_forward(x, 1, out_dtype, log)
            ins = (x,)
    if not torch.isfinite(out).all():
        raise AssertionError(f"{kernel} {op} {dtypes} N={n_cols}: output not fully written (NaN poison left)")
    (launch,) = launches
    plan = launch.plan
    elem_bytes = max(t.element_size() for t in plan.tensors)
    sweeps = 2 if plan.config.online else 1
    minimum = minimum_bytes(*ins, out)
    return dict(
        kernel=kernel,
        op=op,
        dtype=str(in_dtype).removeprefix("torch.") + ("" if in_dtype == out_dtype else "->" + str(out_dtype)[6:]),
        n_cols=n_cols,
        n_rows=n_rows,
        align=plan.align * elem_bytes,
        regime=plan.config.regime,
        config=plan.config,
        moved=traffic.total,
        minimum=minimum,
        ratio=Fraction(traffic.total, minimum),
        design=Fraction(sweeps * minimum_bytes(*ins) + minimum_bytes(out), minimum),
    )


def markdown(rows):
    header = [
        "kernel",
        "op",
        "dtype",
        "N",
        "rows",
        "align",
        "regime",
        "config (BLOCK_N, ROWS, num_warps)",
        "bytes moved",
        "minimum",
        "ratio",
        "design",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        c = r["config"]
        mark = "" if r["ratio"] == r["design"] else " **≠**"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["kernel"],
                    r["op"],
                    r["dtype"],
                    f"{r['n_cols']:,}",
                    str(r["n_rows"]),
                    f"{r['align']} B",
                    r["regime"],
                    f"{c.block_n}, {c.rows_per_program}, {c.num_warps}",
                    f"{r['moved']:,}",
                    f"{r['minimum']:,}",
                    f"{float(r['ratio']):.4f}{mark}",
                    str(r["design"]),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--op", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--n", nargs="+", type=int, help="row lengths (default: each regime, at its boundaries)")
    parser.add_argument("--rows", type=int, help="rows per tensor (default: a tile and a bit for multi-row, else 4)")
    parser.add_argument("--check", action="store_true", help="exit 1 if any ratio differs from the design")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)

    # The interpreter is chosen when the kernels are decorated: before they are first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if not kernels_interpreted():
        sys.exit("kernels are not running under Triton's interpreter; cannot count traffic")

    start = time.perf_counter()
    rows = []
    for kernel in args.kernel:
        for op in args.op:
            for name in args.dtype:
                elem_bytes = max(d.itemsize for d in DTYPES[name])
                for n_cols in args.n or boundary_lengths(elem_bytes, kernel == "backward"):
                    rows.append(measure(kernel, op, DTYPES[name], n_cols, args.rows))
    table = markdown(rows)
    print(f"Bytes moved per launch, {kernels().H100.name} launch configurations, counted under TRITON_INTERPRET=1.\n")
    print(table)
    mismatches = [r for r in rows if r["ratio"] != r["design"]]
    print(
        f"\n{len(rows)} launches in {time.perf_counter() - start:.1f} s; "
        f"{len(mismatches)} differ from the design ratio."
    )
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    if args.check and mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
