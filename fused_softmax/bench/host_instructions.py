"""Instructions per call of the small calls ``host_time`` times, counted by valgrind's callgrind.

Wall time on a shared CPU moves by 2x between runs minutes apart, and a change of a few hundred
nanoseconds to the host path is lost in it. Callgrind counts the instructions a call executes,
the same count each run: each call runs in a process of its own under callgrind with counting
off, and counting is switched on (``callgrind_control -i on``) only around a loop of ``calls``
calls, after a warm-up, with Python's garbage collector off: a full collection, which any
allocation may set off, walks the whole heap (some 70 million instructions here, 37k more a
call over 2,000 training calls) and would land in one count and not the next. Counts are
host-path instructions with the launch stubbed, against ``torch.empty_like``'s in the same
way; they rank changes to the host path, the GPU's wall time per call (``host_time`` on a
GPU) is the figure users see.

    python -m fused_softmax.bench.host_instructions [--calls 2000] [--shape 8,512]
"""

import argparse
import concurrent.futures
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .host_time import LEAST_FUNCTION, MODES, OTHER_CALLS, YARDSTICK

CALLS = ("fused_softmax", "torch", LEAST_FUNCTION, YARDSTICK)  # a mode's; an OTHER_CALLS job's are these but the least
_POLL_S = 0.05


def _wait_for(path, process, errors):
    while not path.exists():
        if process.poll() is not None:
            tail = errors.read_text()[-2000:]
            raise RuntimeError(f"the measured process ended early (exit status {process.returncode}):\n{tail}")
        time.sleep(_POLL_S)


def count(mode, name, calls, shape):
    """Instructions per call of ``name`` (one of CALLS) in ``mode`` (one of MODES, on a float32
    tensor of ``shape``, or a job of ``host_time.OTHER_CALLS``, on its own tensors)."""
    with tempfile.TemporaryDirectory() as folder:
        marks, out, errors = Path(folder), Path(folder) / "callgrind.out", Path(folder) / "stderr"
        child = [
            sys.executable,
            "-m",
            "fused_softmax.bench.host_instructions",
            "--child",
            mode,
            name,
            str(calls),
            ",".join(map(str, shape)),
            folder,
        ]
        command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *child]
        env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONSAFEPATH": "1"}
        with errors.open("w") as stderr:  # a file, not a pipe, which a chatty child could fill
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            _wait_for(marks / "ready", process, errors)
            subprocess.run(["callgrind_control", "-i", "on", str(process.pid)], check=True, capture_output=True)
            (marks / "go").touch()
            _wait_for(marks / "done", process, errors)
            subprocess.run(["callgrind_control", "-i", "off", str(process.pid)], check=True, capture_output=True)
            (marks / "stop").touch()
            process.wait(timeout=600)
        finally:
            if process.poll() is None:
                process.kill()
        if process.returncode:
            raise RuntimeError(f"callgrind of {name} ({mode}) failed:\n{errors.read_text()[-2000:]}")
        return total_instructions(out) / calls


def total_instructions(path):
    """The instructions a callgrind output file counts: the sum of its cost lines, less the
    inclusive costs it gives after each ``calls=`` line (those are counted where they ran)."""
    total, after_call = 0, False
    for line in Path(path).read_text().splitlines():
        if line.startswith("calls="):
            after_call = True
            continue
        if line[:1].isdigit() or line[:1] in "+-*":  # a position, then its cost (none: 0)
            fields = line.split()
            if not after_call and len(fields) > 1:
                total += int(fields[1])
            after_call = False
    return total


def _child(mode, name, calls, shape, folder):
    """The measured process: warm ``name`` up, then run it ``calls`` times between the marks."""
    import torch

    from .._backend import use_backend
    from .._launch import overridden
    from .host_time import _calls

    if mode in OTHER_CALLS:
        call = OTHER_CALLS[mode](torch.device("cpu"))[name]
    else:
        x = torch.randn(*shape)
        call = _calls(x, torch.randn_like(x), mode)[name]
    marks = Path(folder)
    with overridden(run=False), use_backend("triton"):
        for _ in range(200):
            call()
        gc.collect()  # before counting starts: it walks the whole heap
        gc.disable()  # see the module's docstring
        try:
            (marks / "ready").touch()
            while not (marks / "go").exists():
                time.sleep(_POLL_S)
            for _ in range(calls):
                call()
        finally:
            gc.enable()
        (marks / "done").touch()
        while not (marks / "stop").exists():
            time.sleep(_POLL_S)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--shape", default="8,512")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child:
        import torch

        torch.set_num_threads(1)  # as host_time's CPU run: torch's own small calls wait on no pool
        mode, name, calls, shape, folder = options.child
        return _child(mode, name, int(calls), tuple(map(int, shape.split(","))), folder)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind (callgrind and callgrind_control)")
    shape = tuple(map(int, options.shape.split(",")))
    jobs = [
        (mode, name)
        for mode in (*MODES, *OTHER_CALLS)
        for name in CALLS
        if mode == "training" or name != LEAST_FUNCTION
    ]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        counts = dict(zip(jobs, pool.map(lambda job: count(*job, options.calls, shape), jobs), strict=True))
    print(
        f"Instructions per call, launch stubbed (callgrind, {options.calls} calls); the modes on float32 "
        f"{list(shape)}, the other jobs on their own tensors\n"
    )
    print(f"| mode or job | call | instructions | / {YARDSTICK} |")
    print("|---|---|---|---|")
    for (mode, name), instructions in counts.items():
        print(f"| {mode} | {name} | {instructions:,.0f} | {instructions / counts[mode, YARDSTICK]:.1f}x |")


if __name__ == "__main__":
    main()
