"""The GPU check: one command that tests and measures fused_softmax on a fresh GPU machine.

A lent GPU comes for minutes, so the check is prepared in advance and runs in one call:
``bash benchmarks/gpu_check.sh`` installs the checkout and runs this. Steps, most important
first, each cut at its own limit and all inside ``--budget-s``:

1. provenance: device, clocks, versions, commit;
2. the CUDA tests (``pytest -m cuda``);
3. the sweep of fused_softmax and torch: the quick shapes, and the few-rows shapes of LLM
   decoding, against a device-to-device copy timed in the same run;
4. the cooperative split-row regime (off by default): over the decoding shapes, its outputs
   against the phased path's and torch's, then its bandwidth in the sweep;
5. small calls: wall time per call against torch and ``torch.empty_like``, and kernel time;
   then the direct launch (off by default): kept launches calling their compiled kernels past
   Triton's binder, their outputs against Triton's own launch's, and the same wall times;
6. the rest of the test suite, on the GPU;
7. the peers (torch.compile, Liger, QuACK, FlagGems, where installed) over the sweep's shapes.

results.json and results.md are rewritten after every step, so a run stopped anywhere leaves
what it had; the plots come last. ``--dry-run`` runs the same steps on a CPU under Triton's
interpreter with tiny shapes, so CI keeps the check working; its figures are flagged as the
interpreter's in every file and report.py refuses them for the README.

    python -m fused_softmax.bench.gpu_check [OUT_DIR] [--dry-run] [--budget-s S] [--commit HASH]

Exit status 1 when a test or a fused_softmax result failed, or a step broke; a step cut at
its limit is reported, not failed.
"""

import argparse
import dataclasses
import datetime
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from .. import _launch, functional, masked_softmax, testing
from .._backend import use_backend
from . import suite
from .host_time import MODES, TINY_SHAPES, host_times
from .provenance import ROOT, metadata
from .report import cell, counts_text, fused_passed, plot_check, point_label, steps_table, tests_lines, write_check
from .sweep import (
    DIRECTIONS,
    DTYPE_NAMES,
    DTYPES,
    FREE_MEMORY_SHARE,
    QUICK_INPUT_BYTES,
    Problem,
    check,
    copy_gbps,
    decode_problems,
    default_out_dir,
    do_bench_timer,
    expected_results,
    implementations,
    sweep,
    sweep_problems,
    wall_clock_timer,
)

CHECK_DTYPES = {name: DTYPES[name] for name in ("bf16", "fp32")}
CORE = ("fused_softmax", "torch")
BUDGET_S = 450
# Time kept back from the steps for the last write and the plots.
REPORT_RESERVE_S = 15
# Each step's own limit, in seconds; the peers take what is left.
STEP_LIMITS_S = {
    "provenance": 20,
    "cuda tests": 90,
    "sweep": 120,
    "cooperative": 40,
    "small calls": 25,
    "direct launch": 25,
    "other tests": 120,
    "peers": None,
}
COOPERATIVE = "fused_softmax (cooperative)"
TIMING = {
    False: "GPU: medians of triton.testing.do_bench (CUDA events, L2 flushed); small calls by the host's clock",
    True: "DRY RUN: the Triton interpreter and torch on a CPU, by the host's clock; not GPU figures",
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each step runs: the GPU's sizes, or the dry run's tiny ones."""

    problems: tuple
    timer: object
    copy_bytes: int
    host_shapes: tuple
    host_dtypes: dict
    host_blocks: int
    host_block_s: float
    cuda_tests: tuple
    other_tests: tuple | None


def gpu_sizes(device):
    free = torch.cuda.mem_get_info(device)[0]
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    input_bytes = min(QUICK_INPUT_BYTES, free // FREE_MEMORY_SHARE)
    workers = min(8, os.cpu_count() or 1)
    # A dtype's shapes together, so a sweep cut at its limit loses the last dtype, not the decoding shapes.
    problems = [
        problem
        for dtype in CHECK_DTYPES.values()
        for problem in (*sweep_problems([dtype], True, sm_count, input_bytes), *decode_problems([dtype]))
    ]
    return Sizes(
        problems=tuple(problems),
        timer=do_bench_timer(10, 40),
        copy_bytes=2**30,
        host_shapes=TINY_SHAPES,
        host_dtypes=CHECK_DTYPES,
        host_blocks=21,
        host_block_s=5e-3,
        cuda_tests=("tests", "-m", "cuda", "-q", "--tb=short", *suite.plugin_arguments(min(4, workers), 120)),
        other_tests=("tests", "-m", "not cuda", "-q", "--tb=short", *suite.plugin_arguments(workers, 120)),
    )


def dry_run_sizes():
    """Tiny shapes, a few interpreted calls each: the whole check in seconds. The CUDA tests' file
    is still collected (every test skips without a GPU), so the counting is exercised."""
    dtypes = list(CHECK_DTYPES.values())
    large = [Problem(64, 128, dtype, "large") for dtype in dtypes]
    return Sizes(
        problems=(*large, *decode_problems(dtypes, rows=(1, 4), cols=(1024,))),
        timer=wall_clock_timer(3),
        copy_bytes=2**20,
        host_shapes=TINY_SHAPES[:1],
        host_dtypes={"fp32": torch.float32},
        host_blocks=3,
        host_block_s=1e-3,
        cuda_tests=("tests/test_cuda.py", "-m", "cuda", "-q"),
        other_tests=None,
    )


@dataclasses.dataclass
class Outcome:
    """How a step ended: ``cut`` at its limit or not, and a line for the report."""

    cut: bool = False
    note: str = ""


class Stopped(BaseException):
    """SIGTERM from the shell's hard limit: not an Exception, so no step's own handler swallows it."""


def _stop(signum, frame):
    raise Stopped


class GpuCheck:
    """The steps, their limits, and the results they add to, written out after each."""

    def __init__(self, out_dir, dry_run, budget_s, commit, started):
        self.device = torch.device("cpu") if dry_run else torch.device("cuda", torch.cuda.current_device())
        self.dry_run, self.commit, self.out_dir = dry_run, commit, out_dir
        self.deadline = started + budget_s
        self.sizes = dry_run_sizes() if dry_run else gpu_sizes(self.device)
        self.log = (out_dir / "gpu_check.log").open("a")
        self.results = {
            "kind": "gpu_check",
            "metadata": {
                "device": str(self.device),
                "dry_run": dry_run,
                "timing": TIMING[dry_run],
                "budget_s": budget_s,
                "install": os.environ.get("GPU_CHECK_INSTALL", "as found: not through gpu_check.sh"),
            },
            "copy_gbps": None,
            "skipped": [],
            "steps": [],
            "tests": {},
            "results": [],
            "host_time": [],
            "cooperative": [],
            "direct_launch": [],
        }
        self.started = started

    def say(self, message):
        print(message, flush=True)
        self.log.write(message + "\n")
        self.log.flush()

    def write(self):
        self.results["metadata"]["elapsed_s"] = round(time.time() - self.started, 1)
        write_check(self.out_dir, self.results)

    def run(self):
        steps = {
            "provenance": self.provenance,
            "cuda tests": self.cuda_tests,
            "sweep": self.sweep,
            "cooperative": self.cooperative,
            "small calls": self.small_calls,
            "direct launch": self.direct_launch,
            "other tests": self.other_tests,
            "peers": self.peers,
        }
        try:
            for name, action in steps.items():
                self._step(name, action)
            plots = [path.name for path in plot_check(self.out_dir, self.results)]
            self.results["plots"] = plots or "none: matplotlib is not installed"
            self.say(f"plots: {self.results['plots']}")
        finally:
            self.write()
            self.log.close()
        return self.exit_status()

    def _step(self, name, action):
        left = self.deadline - time.time() - REPORT_RESERVE_S
        limit = left if STEP_LIMITS_S[name] is None else min(STEP_LIMITS_S[name], left)
        entry = {"name": name, "budget_s": max(0.0, round(limit, 1)), "elapsed_s": 0.0}
        self.results["steps"].append(entry)
        if limit <= 0:
            entry.update(status="skipped", note="no time left in the budget")
            self.say(f"== {name}: skipped, no time left")
            return
        self.say(f"== {name} (limit {limit:.0f} s)")
        started = time.perf_counter()
        try:
            outcome = action(started + limit)
            entry.update(status="cut" if outcome.cut else "done", note=outcome.note)
        except Stopped:
            entry.update(status="cut", note="stopped by SIGTERM: the shell's hard limit")
            raise
        except Exception as error:  # a broken step is reported; the later steps still run
            self.log.write(traceback.format_exc())
            entry.update(status="failed", note=f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}")
        finally:
            entry["elapsed_s"] = round(time.perf_counter() - started, 1)
            self.say(f"   {entry['status']} in {entry['elapsed_s']:.0f} s. {entry.get('note', '')}")
            self.write()

    def provenance(self, deadline):
        info = metadata(self.device, self.commit)
        if self.dry_run:
            info["device"] = f"DRY RUN, not GPU figures: Triton interpreter on {info['device']}"
        own = self.results["metadata"]
        self.results["metadata"] = info | {key: own[key] for key in ("dry_run", "timing", "budget_s", "install")}
        return Outcome(note=f"{info['device']}, commit {info['git_commit']} ({info['commit_source']})")

    def _tests(self, key, arguments, deadline):
        selection = f"pytest {' '.join(arguments)}"
        run = suite.run(arguments, deadline - time.perf_counter(), self.log, ROOT)
        self.results["tests"][key] = {"selection": selection, **run}
        return Outcome(run["cut"], counts_text(run))

    def cuda_tests(self, deadline):
        return self._tests("cuda", self.sizes.cuda_tests, deadline)

    def other_tests(self, deadline):
        """The tests not marked cuda, which run the kernels on the GPU when one is present."""
        if self.sizes.other_tests is None:
            self.results["tests"]["other"] = {"note": "not run in the dry run: on a CPU they are CI's own run"}
            return Outcome(note="dry run: on a CPU these are CI's own run")
        return self._tests("other", self.sizes.other_tests, deadline)

    def _sweep(self, impls, deadline, problems=None):
        """Measure ``impls`` over the problems (default: every one) until ``deadline``; how far it got."""
        problems = self.sizes.problems if problems is None else problems
        total = len(problems) * len(impls) * len(DIRECTIONS)
        done = 0
        if total:
            for record in sweep(problems, impls, DIRECTIONS, self.sizes.timer, self._copy(), self.device):
                self.results["results"].append(record)
                done += 1
                self.log.write(f"{point_label(record)}: {cell(record)} {record.get('error', '')}\n")
                if not record["ok"]:
                    self.say(f"   FAILED {point_label(record)}: {record.get('error', 'wrong result')}")
                if time.perf_counter() > deadline and done < total:
                    return Outcome(True, f"cut after {done} of {total} measurements")
        return Outcome(note=f"{done} measurements")

    def _copy(self):
        if self.results["copy_gbps"] is None:
            self.results["copy_gbps"] = copy_gbps(self.sizes.timer, self.device, self.sizes.copy_bytes)
            self.say(f"   device-to-device copy: {self.results['copy_gbps']:,.0f} GB/s")
        return self.results["copy_gbps"]

    def sweep(self, deadline):
        every, _ = implementations(peers=False)
        return self._sweep({name: every[name] for name in CORE}, deadline)

    def cooperative(self, deadline):
        """The cooperative regime over the decoding shapes: each direction's output against the
        phased path's and torch's (and the cooperative kernel proven to have run), then its
        bandwidth through the sweep, as implementation COOPERATIVE. The dry run checks instead
        that the interpreter refuses it."""
        problems = [problem for problem in self.sizes.problems if problem.group == "decode"]
        if self.dry_run:
            return Outcome(note=refused_under_the_interpreter(problems[0], self.device))
        for problem in problems:
            record = agreement(problem, self.device)
            self.results["cooperative"].append(record)
            self.log.write(f"cooperative agreement: {record}\n")
            if not record["ok"]:
                self.say(f"   FAILED cooperative {record}")
            if time.perf_counter() > deadline:
                return Outcome(True, f"cut after the agreement of {len(self.results['cooperative'])} shapes")
        every, _ = implementations(peers=False)
        with testing.cooperative():
            outcome = self._sweep({COOPERATIVE: every["fused_softmax"]}, deadline, problems)
        agreed = sum(record["ok"] for record in self.results["cooperative"])
        return dataclasses.replace(outcome, note=f"{agreed} of {len(problems)} shapes agree; {outcome.note}")

    def peers(self, deadline):
        impls, skipped = implementations()
        if self.dry_run:
            del impls["torch.compile"]
            skipped.append("torch.compile skipped in the dry run: compiling on a CPU outlasts its budget")
        self.results["skipped"] = skipped
        for note in skipped:
            self.say(f"   {note}")
        return self._sweep({name: make for name, make in impls.items() if name not in CORE}, deadline)

    def small_calls(self, deadline, **tags):
        sizes = self.sizes
        records = host_times(sizes.host_dtypes, self.device, sizes.host_shapes, sizes.host_blocks, sizes.host_block_s)
        total = len(sizes.host_shapes) * len(sizes.host_dtypes) * len(MODES)
        for done, record in enumerate(records, 1):
            self.results["host_time"].append(record | tags)
            if time.perf_counter() > deadline and done < total:
                return Outcome(True, f"cut after {done} of {total} cases")
        return Outcome(note=f"{total} cases")

    def direct_launch(self, deadline):
        """The direct launch over the small calls' shapes: each direction's output from the kept
        compiled kernel against Triton's own launch of it (the same kernel on the same inputs:
        equal to the bit), and the launches proven direct on a GPU (none can be under the
        interpreter); then the small calls' wall times with it on."""
        with testing.direct_launch():
            for n_rows, n_cols in self.sizes.host_shapes:
                for dtype in self.sizes.host_dtypes.values():
                    record = direct_agreement(n_rows, n_cols, dtype, self.device, expect_direct=not self.dry_run)
                    self.results["direct_launch"].append(record)
                    self.log.write(f"direct launch agreement: {record}\n")
                    if not record["ok"]:
                        self.say(f"   FAILED direct launch {record}")
            outcome = self.small_calls(deadline, direct_launch=True)
        agreed = sum(record["ok"] for record in self.results["direct_launch"])
        note = f"{agreed} of {len(self.results['direct_launch'])} cases agree; small calls: {outcome.note}"
        return dataclasses.replace(outcome, note=note)

    def exit_status(self):
        tests = self.results["tests"].values()
        failed = any(run["counts"]["failed"] + run["counts"]["error"] for run in tests if "counts" in run)
        broken = any(step["status"] == "failed" for step in self.results["steps"])
        checked = self.results["cooperative"] + self.results["direct_launch"]
        disagreed = not all(record["ok"] for record in checked)
        return int(failed or broken or disagreed or not fused_passed(self.results["results"]))


def _directions(x, dy):
    """softmax of x over its last dim and the gradient for dy, on the plan in force."""
    x = x.detach().requires_grad_()
    y = functional.softmax(x, dim=-1)
    return {"forward": y.detach(), "backward": torch.autograd.grad(y, x, dy)[0]}


def agreement(problem, device):
    """The cooperative regime's forward and backward on ``problem`` against the phased path's and
    float64 torch's: the largest differences, what the dtype's rounding allows, and which kernels
    ran (the cooperative ones, or the check proves nothing)."""
    x = torch.randn(problem.n_rows, problem.n_cols, dtype=problem.dtype, device=device)
    dy = torch.randn_like(x)
    expected = expected_results(x, dy, DIRECTIONS)
    with use_backend("triton"):
        with testing.cooperative(), testing.recorded_launches() as launches:
            ours = _directions(x, dy)
        phased = _directions(x, dy)
    record = dict(dtype=DTYPE_NAMES[problem.dtype], n_rows=problem.n_rows, n_cols=problem.n_cols)
    record["kernels"] = sorted({launch.name for launch in launches})
    ok = record["kernels"] == ["cooperative_product_kernel", "cooperative_softmax_kernel"]
    for direction in DIRECTIONS:
        error, allowed = check(ours[direction], expected[direction])
        from_phased = (ours[direction].double() - phased[direction].double()).abs().max().item()
        record[direction] = dict(max_abs_err=error, from_phased=from_phased, allowed_err=allowed)
        ok = ok and error <= allowed and from_phased <= allowed
    record["ok"] = ok
    return record


def direct_agreement(n_rows, n_cols, dtype, device, expect_direct):
    """Softmax's forward and backward on [n_rows, n_cols], and a masked_softmax of those scores
    under a bool mask, twice under the direct launch: the first call launches through Triton and
    keeps its compiled kernels, the second calls them directly (``expect_direct``: on a GPU;
    under the interpreter there are none to call). The second's outputs must equal the first's
    and be within the dtype's rounding of float64 torch's."""
    x = torch.randn(n_rows, n_cols, dtype=dtype, device=device)
    dy = torch.randn_like(x)
    keep = torch.rand(n_cols, device=device) > 0.25
    expected = expected_results(x, dy, DIRECTIONS)
    expected["masked"] = torch.softmax(x.double().masked_fill(~keep, float("-inf")), -1)
    _launch._READY.clear()  # so that the launches kept are this case's
    with use_backend("triton"):
        through_triton, direct = [_directions(x, dy) | {"masked": masked_softmax(x, keep)} for _ in range(2)]
    kept = [ready for ready in _launch._READY.values() if ready.direct is not None]
    record = dict(dtype=DTYPE_NAMES[dtype], n_rows=n_rows, n_cols=n_cols, direct_launches=len(kept))
    ok = len(kept) == (3 if expect_direct else 0)
    for output in expected:
        error, allowed = check(direct[output], expected[output])
        equal = torch.equal(direct[output], through_triton[output])
        record[output] = dict(max_abs_err=error, allowed_err=allowed, equal_to_triton_launch=equal)
        ok = ok and error <= allowed and equal
    record["ok"] = ok
    return record


def refused_under_the_interpreter(problem, device):
    """The interpreter must refuse the cooperative regime (its barrier would never open there); the
    dry run's tiny shape is split, as a GPU's decoding shapes are."""
    x = torch.randn(problem.n_rows, problem.n_cols, dtype=problem.dtype, device=device)
    try:
        with use_backend("triton"), testing.split_threshold(0), testing.cooperative():
            functional.softmax(x, dim=-1)
    except RuntimeError as error:
        if "interpreter" in str(error):
            return "dry run: the interpreter refuses the cooperative regime, as it must"
        raise
    raise AssertionError("the interpreter ran the cooperative regime")


def out_dir_for(requested, dry_run):
    """OUT_DIR if given, else $OUT (the device machine's folder that comes back), else
    benchmarks/results/<device>-<date>; a dry run never defaults into benchmarks/results."""
    if requested:
        return Path(requested)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    if dry_run:
        return Path(tempfile.mkdtemp(prefix="gpu-check-dry-run-"))
    return ROOT / default_out_dir(torch.cuda.get_device_name())


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m fused_softmax.bench.gpu_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "out_dir", nargs="?", help="results folder; default $OUT, else benchmarks/results/<device>-<date>"
    )
    parser.add_argument("--dry-run", action="store_true", help="on a CPU, under Triton's interpreter, tiny shapes")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"the whole check's time; default {BUDGET_S}")
    parser.add_argument("--commit", help="the commit of the tree, where .git is absent (or FUSED_SOFTMAX_COMMIT)")
    parser.add_argument("--started", type=float, help="when the check began (epoch s), so an install counts")
    args = parser.parse_args(argv)
    if args.dry_run:
        from .._runtime import kernels_interpreted, triton_available

        if torch.cuda.is_available() or not (triton_available() and kernels_interpreted()):
            parser.error(
                "--dry-run needs no visible GPU and TRITON_INTERPRET=1 set before start (gpu_check.sh sets both)"
            )
    elif not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible; --dry-run runs the check on a CPU under the interpreter")
    if args.dry_run:  # NumPy's warnings on masked-off lanes under the interpreter, as in pyproject.toml
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
    out_dir = out_dir_for(args.out_dir, args.dry_run)
    out_dir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _stop)
    check = GpuCheck(out_dir, args.dry_run, args.budget_s, args.commit, args.started or time.time())
    check.say(
        f"GPU check{' (DRY RUN)' if args.dry_run else ''}: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}, "
        f"budget {args.budget_s:.0f} s, results in {out_dir}"
    )
    try:
        status = check.run()
    except Stopped:
        status = 124
    print(f"\n{steps_table(check.results['steps'])}\n")
    print("\n".join(tests_lines(check.results["tests"])))
    print(f"\nWrote results.json, results.md and gpu_check.log to {out_dir} (exit status {status})")
    return status


if __name__ == "__main__":
    sys.exit(main())
