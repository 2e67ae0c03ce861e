"""Benchmarks of fused_softmax against torch eager, torch.compile and, where installed, Liger-Kernel,
QuACK and FlagGems.

Softmax is memory bound, so on a CUDA GPU each point reports bandwidth: the bytes a perfect
kernel moves over the median time of ``triton.testing.do_bench``, and that as a share of a
device-to-device copy timed in the same run, the ceiling any softmax can approach. Every
output is checked against float64 torch, so a fast wrong result shows as WRONG. The shapes:
many rows over N from 128 to 4M, a few rows (a quarter of the SMs) of long N, and the
few-rows shapes of LLM decoding (M = 1 to 128 over a vocabulary of 32k to 256k).

A CPU has no bandwidth worth comparing with a GPU's: there the run times the eager
fallback's per-call overhead and checks the real kernels under Triton's interpreter.

    python -m fused_softmax.bench [--quick] [--dtypes bf16,fp32] [--directions forward] [--out DIR]
"""

import argparse
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import re
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import __version__, functional
from .._backend import use_backend
from .._launch import plan
from .._runtime import kernels_interpreted, triton_available
from ..testing import limit_block, reference
from .host_time import interleaved_median_us
from .provenance import metadata
from .report import (
    comparison_table,
    failure,
    fused_passed,
    markdown,
    plot,
    plot_decode,
    point_label,
    readme_section,
    table,
    update_readme,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
DIRECTIONS = ("forward", "backward")
TENSORS_MOVED = {"forward": 2, "backward": 3, "forward+backward": 5}

# Largest error allowed, relative to the largest reference value: four roundings to the dtype
# (unit roundoff 2**-8 for bf16, 2**-11 for fp16); for fp32, sums over rows of millions.
TOLERANCE = {torch.bfloat16: 2**-6, torch.float16: 2**-9, torch.float32: 1e-5}

SWEEP_COLS = sorted([2**k for k in range(7, 23)] + [1000, 5000, 50257])
SMALL_M_COLS = [4**k for k in range(6, 12)]
QUICK_COLS = [128, 1000, 4096, 50257, 262144, 4194304]
QUICK_SMALL_M_COLS = [65536, 4194304]
SUMMARY_SHAPES = ((65536, 512), (8192, 8192), (1024, 65536), (32, 1048576))
# LLM decoding: softmax over a vocabulary for a batch of a few rows.
DECODE_ROWS = (1, 4, 8, 32, 128)
DECODE_COLS = (32768, 131072, 262144)

# Inputs far larger than the L2 cache, so the sweep measures HBM. At most 1/32 of free memory:
# the float64 references and their temporaries take up to ~20x the input.
INPUT_BYTES = 512 * 2**20
QUICK_INPUT_BYTES = 128 * 2**20
FREE_MEMORY_SHARE = 32
COPY_BYTES = 2**30

CPU_OVERHEAD_SHAPES = ((1, 128), (8, 512), (64, 1024))
# (rows, cols, on-chip cap): many short rows per program with the last block part-masked;
# one whole row on chip; rows longer than the capped tile, so the online loop runs.
INTERPRETER_CASES = ((37, 100, None), (3, 5000, None), (3, 300, 64))


@dataclass(frozen=True)
class Problem:
    """Softmax over the last dim of an [n_rows, n_cols] tensor; ``group`` names the sweep it belongs to."""

    n_rows: int
    n_cols: int
    dtype: torch.dtype
    group: str

    def bytes_moved(self, direction):
        """What a perfect kernel moves: forward reads x, writes y; backward reads y and dy, writes dx."""
        return TENSORS_MOVED[direction] * self.n_rows * self.n_cols * self.dtype.itemsize


def interpret_kernels_without_gpu():
    """Without a CUDA GPU the kernels run only under Triton's interpreter; it must be on before triton is imported."""
    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"


def _fused(x):
    return functional.softmax(x, dim=-1)


def _eager(x):
    return F.softmax(x, dim=-1)


def _compiled():
    """A fresh static-shape compile; the reset keeps a point from passing dynamo's recompile limit and running eager."""
    torch._dynamo.reset()
    return torch.compile(_eager, dynamic=False)


def _describe(error):
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def implementations(peers=True):
    """name -> factory of a last-dim softmax, called once per problem; and a note for each peer that is missing."""
    impls = {"fused_softmax": lambda: _fused, "torch": lambda: _eager, "torch.compile": _compiled}
    skipped = []
    if not peers:
        return impls, skipped
    try:
        from liger_kernel.ops.softmax import LigerSoftmaxFunction
    except Exception as error:  # an installed peer can also fail to import for reasons of its own
        skipped.append(f"Liger-Kernel skipped: liger_kernel.ops.softmax is not importable ({_describe(error)})")
    else:
        impls["liger"] = lambda: LigerSoftmaxFunction.apply
    try:
        from quack.softmax import softmax as quack_softmax
    except Exception as error:
        skipped.append(f"QuACK skipped: quack.softmax is not importable ({_describe(error)})")
    else:
        impls["quack"] = lambda: quack_softmax
    try:
        from flag_gems import use_gems
    except Exception as error:
        skipped.append(f"FlagGems skipped: flag_gems.use_gems is not importable ({_describe(error)})")
    else:
        impls["flaggems"] = lambda: lambda x: FlagGemsSoftmax.apply(x, use_gems)
    return impls, skipped


class FlagGemsSoftmax(torch.autograd.Function):
    """FlagGems' softmax, forward and backward: it replaces aten's ops only inside ``use_gems()``,
    and autograd runs the backward outside any context the caller holds."""

    @staticmethod
    def forward(ctx, x, use_gems):
        with use_gems():
            y = torch._softmax(x, -1, False)
        ctx.save_for_backward(y)
        ctx.use_gems = use_gems
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        with ctx.use_gems():
            return torch._softmax_backward_data(dy, y, -1, y.dtype), None


def regime(x, direction, max_block=None):
    """The regime of the fused kernel's launch over the rows of ``x`` (with its rows per tile when
    it packs several); the plan sees the real row count, which a regime may depend on."""
    backward = direction == "backward"
    with limit_block(max_block):
        config = plan([x] * (3 if backward else 2), -1, backward=backward).config
    return f"{config.regime} x{config.rows_per_program}" if config.regime == "multi_row" else config.regime


def _run(softmax, x, dy, direction):
    """The direction's output, to check, and a call that repeats the direction's work, to time.

    x requires grad in both directions, so torch.compile builds one training graph per problem.
    """
    x = x.detach().requires_grad_()
    y = softmax(x)
    if direction == "forward":
        return y, lambda: softmax(x)

    def backward():
        return torch.autograd.grad(y, x, dy, retain_graph=True)[0]

    return backward(), backward


def check(out, expected):
    """(max abs error, the most the dtype's rounding explains); NaN fails the comparison."""
    error = out.double().sub_(expected).abs_().max().item()
    return error, TOLERANCE[out.dtype] * expected.abs().max().item()


def expected_results(x, dy, directions):
    """float64 torch results, the truth every implementation is checked against."""
    y = torch.softmax(x.double(), dim=-1)
    expected = {"forward": y}
    if "backward" in directions:
        dy = dy.double()
        expected["backward"] = y * (dy - (dy * y).sum(-1, keepdim=True))
    return expected


def _measure(problem, direction, name, softmax, x, dy, expected, timer, copy_gbps):
    record = dict(
        dtype=DTYPE_NAMES[problem.dtype],
        direction=direction,
        group=problem.group,
        n_rows=problem.n_rows,
        n_cols=problem.n_cols,
        implementation=name,
        fused_regime=regime(x, direction),
        bytes_moved=problem.bytes_moved(direction),
    )
    try:
        with use_backend("triton"):
            out, call = _run(softmax, x, dy, direction)
            record["max_abs_err"], record["allowed_err"] = check(out, expected)
            del out
            ms = timer(call)
    except Exception as error:  # a failing implementation is reported, not fatal to the sweep
        record.update(ok=False, error=_describe(error))
        return record
    gbps = record["bytes_moved"] / ms / 1e6
    record.update(
        ok=record["max_abs_err"] <= record["allowed_err"], ms=ms, gbps=gbps, pct_of_copy=100 * gbps / copy_gbps
    )
    return record


def sweep(problems, impls, directions, timer, copy_gbps, device):
    """Yield a record per problem, implementation and direction; fused_softmax runs on its kernels, never a fallback."""
    for problem in problems:
        x = torch.randn(problem.n_rows, problem.n_cols, dtype=problem.dtype, device=device)
        dy = torch.randn_like(x)
        expected = expected_results(x, dy, directions)
        for name, make in impls.items():
            softmax = make()
            for direction in directions:
                yield _measure(problem, direction, name, softmax, x, dy, expected[direction], timer, copy_gbps)
        del x, dy, expected
        if device.type == "cuda":
            torch.cuda.empty_cache()


def do_bench_timer(warmup=25, rep=100):
    """Median milliseconds of a call, by triton's do_bench (L2 flushed before each run)."""
    from triton.testing import do_bench

    return lambda call: do_bench(call, warmup=warmup, rep=rep, return_mode="median")


def wall_clock_timer(calls=3):
    """Median milliseconds of a call by the host's clock, for the CPU dry run, where no CUDA events exist."""

    def timer(call):
        call()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    return timer


def copy_gbps(timer, device, nbytes=COPY_BYTES):
    """Bandwidth of dst.copy_(src): read and write nbytes each, the ceiling for a kernel that streams."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timer(lambda: dst.copy_(src)) / 1e6


def sweep_problems(dtypes, quick, sm_count, input_bytes):
    """Large problems over N, then a few rows (a quarter of the SMs' worth) for the long rows."""
    cols, small_m_cols = (QUICK_COLS, QUICK_SMALL_M_COLS) if quick else (SWEEP_COLS, SMALL_M_COLS)
    for dtype in dtypes:
        for n_cols in cols:
            yield Problem(max(1, input_bytes // (n_cols * dtype.itemsize)), n_cols, dtype, "large")
        for n_cols in small_m_cols:
            yield Problem(max(1, sm_count // 4), n_cols, dtype, "small-M")


def decode_problems(dtypes, rows=DECODE_ROWS, cols=DECODE_COLS):
    """The few-rows shapes of LLM decoding: a batch of ``rows`` over a vocabulary of ``cols``."""
    for dtype in dtypes:
        for n_cols in cols:
            for n_rows in rows:
                yield Problem(n_rows, n_cols, dtype, "decode")


class Progress:
    """tqdm where installed, else one printed line per step."""

    def __init__(self, total):
        try:
            from tqdm import tqdm
        except ImportError:
            self._bar = None
        else:
            self._bar = tqdm(total=total, unit="run", dynamic_ncols=True)
        self._total, self._done = total, 0

    def step(self, label):
        self._done += 1
        if self._bar is None:
            print(f"[{self._done}/{self._total}] {label}", flush=True)
        else:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update()

    def note(self, message):
        (print if self._bar is None else self._bar.write)(message)

    def close(self):
        if self._bar is not None:
            self._bar.close()


def default_out_dir(device_name):
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return Path("benchmarks") / "results" / f"{slug}-{datetime.date.today().isoformat()}"


def cuda_sweep(dtypes, directions, quick, out_dir, readme=None):
    """The full (or --quick) sweep; writes results.json, results.md and plots. Exit status 1 if fused_softmax failed."""
    device = torch.device("cuda", torch.cuda.current_device())
    started = time.perf_counter()
    info = metadata(device)
    impls, skipped = implementations()
    for note in skipped:
        print(note)
    timer = do_bench_timer(*((10, 40) if quick else (25, 100)))
    input_bytes = min(
        QUICK_INPUT_BYTES if quick else INPUT_BYTES, torch.cuda.mem_get_info(device)[0] // FREE_MEMORY_SHARE
    )
    copy = copy_gbps(timer, device)
    print(f"{info['device']}: device-to-device copy {copy:,.0f} GB/s")
    problems = [*sweep_problems(dtypes, quick, info["sm_count"], input_bytes), *decode_problems(dtypes)]
    progress = Progress(len(problems) * len(impls) * len(directions))
    records = []
    for record in sweep(problems, impls, directions, timer, copy, device):
        records.append(record)
        progress.step(point_label(record))
        if not record["ok"]:
            progress.note(failure(record))
    progress.close()
    info["elapsed_s"] = round(time.perf_counter() - started, 1)
    info["quick"] = quick
    out_dir = out_dir or default_out_dir(info["device"])
    out_dir.mkdir(parents=True, exist_ok=True)
    report = markdown(info, copy, records, skipped)
    results = {"metadata": info, "copy_gbps": copy, "skipped": skipped, "results": records}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(report)
    decode = plot_decode(out_dir, records, copy, info["device"])
    plots = plot(out_dir, records, copy, info["device"]) + ([decode] if decode else [])
    print(report)
    print(f"Wrote results.json, results.md and {len(plots)} plots to {out_dir} in {info['elapsed_s']:.0f} s")
    if not plots:
        print("No plots: matplotlib is not installed")
    if readme is not None:
        update_readme(readme, readme_section(results, out_dir.resolve(), readme.resolve().parent))
        print(f"Updated the performance section of {readme}")
    return int(not fused_passed(records))


def cpu_overhead(dtypes):
    """Table of per-call time, in microseconds, of F.softmax and of fused_softmax's eager fallback."""
    rows, threads = [], torch.get_num_threads()
    # One thread, as torch.utils.benchmark does: thread-pool wake-ups would drown a microsecond of overhead.
    torch.set_num_threads(1)
    try:
        with use_backend("torch"):
            for n_rows, n_cols in CPU_OVERHEAD_SHAPES:
                for dtype in dtypes:
                    x = torch.randn(n_rows, n_cols, dtype=dtype)
                    eager_us, fused_us = interleaved_median_us(
                        functools.partial(_eager, x), functools.partial(_fused, x)
                    )
                    rows.append(
                        [
                            f"{n_rows}x{n_cols}",
                            DTYPE_NAMES[dtype],
                            f"{eager_us:.1f}",
                            f"{fused_us:.1f}",
                            f"{fused_us - eager_us:+.1f}",
                        ]
                    )
    finally:
        torch.set_num_threads(threads)
    return table(["shape", "dtype", "F.softmax us", "fused (torch backend) us", "overhead us"], rows)


def interpreter_checks(dtypes, directions):
    """(table of the kernels' max abs error against the NumPy reference under Triton's interpreter, all passed)."""
    if not triton_available() or not kernels_interpreted():
        return "Skipped: the interpreter needs triton, and TRITON_INTERPRET=1 set before triton is imported.", True
    rows, passed = [], True
    with use_backend("triton"), warnings.catch_warnings():
        # Masked-off lanes compute -inf - -inf; NumPy warns where a GPU stays silent.
        warnings.simplefilter("ignore", RuntimeWarning)
        for n_rows, n_cols, max_block in INTERPRETER_CASES:
            for dtype in dtypes:
                x, dy = torch.randn(n_rows, n_cols, dtype=dtype), torch.randn(n_rows, n_cols, dtype=dtype)
                y = reference.softmax(x)
                expected = {"forward": y, "backward": reference.softmax_backward(y, dy)}
                for direction in directions:
                    label = regime(x, direction, max_block)
                    if max_block:
                        label += f" (limit_block({max_block}))"
                    with limit_block(max_block):
                        try:
                            out, _ = _run(_fused, x, dy, direction)
                            error, allowed = check(out, torch.from_numpy(expected[direction]))
                            verdict = "ok" if error <= allowed else "WRONG"
                            error = f"{error:.2g}"
                        except Exception as failure:  # shown in the table, as a wrong result would be
                            error, verdict = _describe(failure), "error"
                    passed &= verdict == "ok"
                    rows.append([f"{n_rows}x{n_cols}", DTYPE_NAMES[dtype], direction, label, error, verdict])
    return table(["shape", "dtype", "direction", "regime", "max abs err", "check"], rows), passed


def cpu_report(dtypes, directions):
    """The fallback's overhead, and the kernels' correctness under the interpreter. Exit status 1 on a failure."""
    print("No CUDA GPU: CPU timings of the eager fallback, and correctness of the kernels under Triton's interpreter.")
    print("\nPer-call time of forward softmax, one thread, median; the fallback's backward is torch's own autograd.\n")
    print(cpu_overhead(dtypes))
    checks, passed = interpreter_checks(dtypes, directions)
    print("\nTriton kernels under the interpreter against the float64 NumPy reference:\n")
    print(checks)
    return int(not passed)


def cuda_summary():
    """A handful of shapes, fused_softmax against torch, forward and backward. Exit status 1 on a failure."""
    device = torch.device("cuda", torch.cuda.current_device())
    timer = do_bench_timer(warmup=10, rep=40)
    copy = copy_gbps(timer, device)
    impls = {name: make for name, make in implementations(peers=False)[0].items() if name != "torch.compile"}
    problems = [
        Problem(n_rows, n_cols, dtype, "summary")
        for dtype in (torch.bfloat16, torch.float32)
        for n_rows, n_cols in SUMMARY_SHAPES
    ]
    print(
        f"{torch.cuda.get_device_name(device)}: device-to-device copy {copy:,.0f} GB/s. "
        "Cells: GB/s (% of copy), from the median time of triton.testing.do_bench.\n"
    )
    records = list(sweep(problems, impls, DIRECTIONS, timer, copy, device))
    print(comparison_table(records))
    return int(not fused_passed(records))


def summary():
    """The short correctness-and-timing table of ``python -m fused_softmax``, on whatever device is present."""
    triton = importlib.metadata.version("triton") if triton_available() else "not installed"
    python = platform.python_version()
    print(f"fused_softmax {__version__}, torch {torch.__version__}, triton {triton}, Python {python}")
    if torch.cuda.is_available():
        return cuda_summary()
    return cpu_report((torch.float32, torch.bfloat16), DIRECTIONS)


def _choices(allowed):
    def parse(text):
        chosen = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in chosen if item not in allowed]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (comma-separated), not {text!r}")
        return chosen

    return parse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fused_softmax.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and shorter timings")
    parser.add_argument("--dtypes", type=_choices(list(DTYPES)), default=list(DTYPES), help="default: bf16,fp16,fp32")
    parser.add_argument(
        "--directions", type=_choices(DIRECTIONS), default=list(DIRECTIONS), help="default: forward,backward"
    )
    parser.add_argument(
        "--out", type=Path, help="results folder (CUDA only); default ./benchmarks/results/<device>-<date>/"
    )
    parser.add_argument("--readme", type=Path, help="regenerate this README's performance section from the results")
    args = parser.parse_args(argv)
    interpret_kernels_without_gpu()
    dtypes = [DTYPES[name] for name in args.dtypes]
    if torch.cuda.is_available():
        return cuda_sweep(dtypes, args.directions, args.quick, args.out, args.readme)
    return cpu_report(dtypes, args.directions)
