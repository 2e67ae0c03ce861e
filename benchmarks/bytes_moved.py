#!/usr/bin/env python
"""Bytes each softmax kernel moves per launch, against the least possible, as a markdown table.

Counts the global-memory loads and stores of the active lanes of every kernel memory op,
running the kernels on CPU under Triton's interpreter with the launch configurations the
heuristic picks for an H100 (``fused_softmax.testing.kernel_traffic``). The count is
exact, not a hardware measurement: it is what the kernel asks for, before caches.

Minimum = every tensor touched once (x, y forward; y, dy, dx backward). Design ratios:
1 on chip (multi-row and single-pass), 3/2 online forward (x read twice), 5/3 online
backward (y and dy read twice).

    python benchmarks/bytes_moved.py                     # representative lengths, all dtypes
    python benchmarks/bytes_moved.py --n 3000 70000 --dtype float32 --kernel forward
    python benchmarks/bytes_moved.py --check --out benchmarks/results/bytes_moved.md
"""

import os

# The interpreter is chosen when the kernels are decorated, so before they are imported.
os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from fractions import Fraction  # noqa: E402

import torch  # noqa: E402

from fused_softmax import _launch  # noqa: E402
from fused_softmax.kernels import H100, launch_config  # noqa: E402
from fused_softmax.testing import kernel_traffic, minimum_bytes, poisoned_outputs  # noqa: E402

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
KERNELS = ("forward", "backward")
DESIGN = {
    ("forward", False): Fraction(1),
    ("forward", True): Fraction(3, 2),
    ("backward", False): Fraction(1),
    ("backward", True): Fraction(5, 3),
}


def regime(config):
    if config.online:
        return "online"
    return "multi-row" if config.rows_per_program > 1 else "single-pass"


def on_chip_limit(elem_bytes, backward):
    """Longest row the H100 configuration keeps on chip (the last length before online)."""
    n = 1
    while not launch_config(2 * n, elem_bytes, H100, backward=backward).online:
        n *= 2
    return n


def representative_lengths(elem_bytes, backward):
    """Two lengths per regime: short rows, on-chip rows up to the limit, rows past it."""
    limit = on_chip_limit(elem_bytes, backward)
    return [128, 1000, 5000, limit, limit + 1, 100_000]


def measure(kernel, dtype, n_cols, n_rows=None, seed=0):
    elem_bytes = torch.empty((), dtype=dtype).element_size()
    backward = kernel == "backward"
    config = launch_config(n_cols, elem_bytes, H100, backward=backward)
    if n_rows is None:
        # Multi-row: one full block of rows and a partial one. Else a few rows.
        n_rows = config.rows_per_program + 3 if config.rows_per_program > 1 else 4
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn((n_rows, n_cols), generator=g, dtype=torch.float64) * 3).to(dtype)
    with poisoned_outputs(), warnings.catch_warnings():
        # Padding rows of a multi-row tile are all -inf; -inf - -inf = NaN there, never stored.
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        if backward:
            y = torch.softmax(x.double(), dim=-1).to(dtype)
            dy = torch.randn((n_rows, n_cols), generator=g, dtype=torch.float64).to(dtype)
            with kernel_traffic() as traffic:
                out = _launch.softmax_backward_rows(y, dy)
            touched = (y, dy, out)
        else:
            with kernel_traffic() as traffic:
                out = _launch.softmax_forward_rows(x, dtype)
            touched = (x, out)
    if not torch.isfinite(out).all():
        raise AssertionError(f"{kernel} {dtype} N={n_cols}: output not fully written (NaN poison left)")
    minimum = minimum_bytes(*touched)
    return dict(
        kernel=kernel,
        dtype=str(dtype).removeprefix("torch."),
        n_cols=n_cols,
        n_rows=n_rows,
        regime=regime(config),
        config=config,
        moved=traffic.total,
        loaded=traffic.loaded,
        stored=traffic.stored,
        minimum=minimum,
        ratio=Fraction(traffic.total, minimum),
        design=DESIGN[(kernel, config.online)],
    )


def markdown(rows):
    header = ["kernel", "dtype", "N", "rows", "regime", "config (BLOCK_N, ROWS, num_warps)",
              "bytes moved", "minimum", "ratio", "design"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        c = r["config"]
        mark = "" if r["ratio"] == r["design"] else " **≠**"
        lines.append("| " + " | ".join([
            r["kernel"], r["dtype"], f"{r['n_cols']:,}", str(r["n_rows"]), r["regime"],
            f"{c.block_n}, {c.rows_per_program}, {c.num_warps}",
            f"{r['moved']:,}", f"{r['minimum']:,}", f"{float(r['ratio']):.4f}{mark}", str(r["design"]),
        ]) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--n", nargs="+", type=int, help="row lengths (default: two per regime)")
    parser.add_argument("--rows", type=int, help="rows per tensor (default: a block and a bit for multi-row, else 4)")
    parser.add_argument("--check", action="store_true", help="exit 1 if any ratio differs from the design")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)

    if not _launch.kernels_interpreted():
        sys.exit("kernels are not running under Triton's interpreter; cannot count traffic")

    start = time.perf_counter()
    rows = []
    for kernel in args.kernel:
        for name in args.dtype:
            dtype = DTYPES[name]
            elem_bytes = torch.empty((), dtype=dtype).element_size()
            lengths = args.n or representative_lengths(elem_bytes, kernel == "backward")
            for n_cols in lengths:
                rows.append(measure(kernel, dtype, n_cols, args.rows))
    table = markdown(rows)
    print(f"Bytes moved per launch, {H100.name} launch configurations, counted under TRITON_INTERPRET=1.\n")
    print(table)
    mismatches = [r for r in rows if r["ratio"] != r["design"]]
    print(f"\n{len(rows)} launches in {time.perf_counter() - start:.1f} s; "
          f"{len(mismatches)} differ from the design ratio.")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    if args.check and mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
