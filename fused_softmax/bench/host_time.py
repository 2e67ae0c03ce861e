"""Time per call of small softmaxes, where the host, not the memory system, sets the pace.

A decoding step or a small model calls softmax on a few KiB: the kernel runs for a few µs and
the host path (planning, autograd, Triton's launch) decides what a caller waits. Each call is
timed in blocks of many calls with the device synchronized at both ends of a block, so the
figure is wall time per call; ``torch.empty_like``, the cheapest call that makes a tensor, is
the yardstick the host path is held to. The kernel's own time, from CUDA events around CUDA
graph replays (no host in the loop), is kept apart.
"""

import functools
import statistics
import time

import torch

from .. import functional
from .._backend import use_backend

TINY_SHAPES = ((1, 128), (8, 512), (4, 4096))
MODES = ("inference", "training")
YARDSTICK = "torch.empty_like"
LEAST_FUNCTION = "least autograd.Function"  # training's floor: a Function that only allocates


class _LeastFunction(torch.autograd.Function):
    """The least an autograd Function costs a training step: a forward and a backward that only
    allocate their outputs, through the same ``autograd.grad``."""

    @staticmethod
    def forward(ctx, x):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        return torch.empty_like(dy)


def interleaved_median_us(*calls, blocks=31, block_s=2e-3, sync=None):
    """Median per-call microseconds of each call, timed in alternating blocks so drift hits all alike.

    Each call repeats enough times to fill ``block_s``; ``sync`` (torch.cuda.synchronize on a GPU)
    runs before a block's clock starts and before it stops, so queued device work is counted.
    """
    sync = sync or (lambda: None)
    numbers = []
    for call in calls:
        call()
        sync()
        start = time.perf_counter()
        for _ in range(3):
            call()
        sync()
        numbers.append(max(1, round(3 * block_s / max(time.perf_counter() - start, 1e-7))))
    samples = [[] for _ in calls]
    for _ in range(blocks):
        for call, number, times in zip(calls, numbers, samples, strict=True):
            sync()
            start = time.perf_counter()
            for _ in range(number):
                call()
            sync()
            times.append((time.perf_counter() - start) / number)
    return [statistics.median(times) * 1e6 for times in samples]


def _calls(x, dy, mode):
    """name -> call: fused_softmax and torch.softmax over the last dim, and the yardstick.

    Inference is a forward on a tensor that needs no gradient; training a forward and a backward
    through autograd, beside the floor any autograd Function sets (``LEAST_FUNCTION``).
    """
    fused = functools.partial(functional.softmax, dim=-1)
    eager = functools.partial(torch.softmax, dim=-1)
    if mode == "inference":
        calls = {"fused_softmax": functools.partial(fused, x), "torch": functools.partial(eager, x)}
    else:
        leaf = x.detach().requires_grad_()
        calls = {
            name: functools.partial(_train, softmax, leaf, dy)
            for name, softmax in (("fused_softmax", fused), ("torch", eager), (LEAST_FUNCTION, _LeastFunction.apply))
        }
    return calls | {YARDSTICK: functools.partial(torch.empty_like, x)}


def _train(softmax, x, dy):
    return torch.autograd.grad(softmax(x), x, dy)


def kernel_us(call):
    """Median µs of ``call`` replayed from a CUDA graph: the device's time without the host's."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(call, rep=20, return_mode="median") * 1e3


def host_times(dtypes, device, shapes=TINY_SHAPES, blocks=21, block_s=5e-3):
    """Yield a record per shape, dtype (``dtypes``: name -> dtype) and mode: wall µs per call of
    each implementation and, on a GPU for inference, each kernel's µs; fused_softmax runs on its
    kernels."""
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    for n_rows, n_cols in shapes:
        for name, dtype in dtypes.items():
            x = torch.randn(n_rows, n_cols, dtype=dtype, device=device)
            dy = torch.randn_like(x)
            for mode in MODES:
                calls = _calls(x, dy, mode)
                with use_backend("triton"):
                    wall = interleaved_median_us(*calls.values(), blocks=blocks, block_s=block_s, sync=sync)
                    record = dict(
                        n_rows=n_rows, n_cols=n_cols, dtype=name, mode=mode, us=dict(zip(calls, wall, strict=True))
                    )
                    if device.type == "cuda" and mode == "inference":
                        record.update(_kernel_times(calls))
                yield record


def _kernel_times(calls):
    """{'kernel_us': {name: µs}} for fused_softmax and torch, or the error that stopped the graph's capture."""
    try:
        return {"kernel_us": {name: kernel_us(calls[name]) for name in ("fused_softmax", "torch")}}
    except Exception as error:  # a capture that fails is reported beside the wall times, not fatal
        return {"kernel_error": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"}


def _masked_calls(device):
    """A decoding step's masked_softmax (scores [1, 8, 1, 128], a bool key mask) and the eager
    masked_fill + softmax it replaces, beside the yardstick."""
    from .. import masked_softmax

    scores = torch.randn(1, 8, 1, 128, device=device)
    keep = torch.rand(1, 1, 1, 128, device=device) > 0.2
    return {
        "fused_softmax": functools.partial(masked_softmax, scores, keep),
        "torch": lambda: torch.softmax(scores.masked_fill(~keep, float("-inf")), -1),
        YARDSTICK: functools.partial(torch.empty_like, scores),
    }


def _cross_entropy_calls(device):
    """A small classifier's loss (logits [8, 1000], class targets, the mean), beside the yardstick."""
    from .. import cross_entropy

    logits = torch.randn(8, 1000, device=device)
    target = torch.randint(0, 1000, (8,), device=device)
    return {
        "fused_softmax": functools.partial(cross_entropy, logits, target),
        "torch": functools.partial(torch.nn.functional.cross_entropy, logits, target),
        YARDSTICK: functools.partial(torch.empty_like, logits),
    }


OTHER_CALLS = {
    "masked_softmax [1, 8, 1, 128], bool mask": _masked_calls,
    "cross_entropy [8, 1000]": _cross_entropy_calls,
}


def other_host_times(device, blocks=21, block_s=5e-3):
    """(job, wall µs per call of each implementation) of the other small calls, inference."""
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    for job, make in OTHER_CALLS.items():
        calls = make(device)
        with use_backend("triton"):
            wall = interleaved_median_us(*calls.values(), blocks=blocks, block_s=block_s, sync=sync)
        yield job, dict(zip(calls, wall, strict=True))


def stubbed_host_times(shapes=TINY_SHAPES, blocks=21, block_s=5e-3):
    """``host_times`` on CPU tensors with every kernel launch planned but not run:
    the host path alone, against ``torch.empty_like`` in the same run. Needs the interpreter
    (TRITON_INTERPRET=1 before triton is imported) so the CPU tensors reach the kernels' path."""
    from .._launch import overridden

    with overridden(run=False):  # no observer either: a recorder's host time is not the product's
        yield from host_times({"float32": torch.float32}, torch.device("cpu"), shapes, blocks, block_s)


def main():
    """Prints the host path's µs per call and its multiple of ``torch.empty_like``'s."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        raise SystemExit("run with TRITON_INTERPRET=1 (no GPU: the launches are stubbed on CPU)")
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # torch's CPU softmax of a few KiB, on a shared machine, waits on its thread pool
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    records = host_times({"float32": torch.float32}, device) if device.type == "cuda" else stubbed_host_times()
    print(
        f"| shape | mode | fused_softmax µs | torch µs | {LEAST_FUNCTION} µs | {YARDSTICK} µs | fused / {YARDSTICK} |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in records:
        us = r["us"]
        ratio = us["fused_softmax"] / us[YARDSTICK]
        least = f"{us[LEAST_FUNCTION]:.1f}" if LEAST_FUNCTION in us else ""
        print(
            f"| [{r['n_rows']}, {r['n_cols']}] | {r['mode']} | {us['fused_softmax']:.1f} | {us['torch']:.1f} "
            f"| {least} | {us[YARDSTICK]:.2f} | {ratio:.0f}x |"
        )
    print(f"\n| inference | fused_softmax µs | torch µs | {YARDSTICK} µs | fused / {YARDSTICK} |")
    print("|---|---|---|---|---|")
    from .._launch import overridden

    with overridden(run=device.type == "cuda"):
        for job, us in other_host_times(device):
            ratio = us["fused_softmax"] / us[YARDSTICK]
            print(f"| {job} | {us['fused_softmax']:.1f} | {us['torch']:.1f} | {us[YARDSTICK]:.2f} | {ratio:.0f}x |")


if __name__ == "__main__":
    main()
