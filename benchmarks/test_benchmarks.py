"""pytest-benchmark of fused_softmax against torch eager and torch.compile: forward, backward, and both.

    pytest benchmarks/ --benchmark-only          # on a CUDA GPU
    pytest benchmarks/ --benchmark-disable -q    # anywhere: a smoke test that runs each case once

On CUDA each timed call ends in a synchronize, so it times the GPU's work, and extra_info
records the bytes a perfect kernel moves and the GB/s that makes. Without a GPU the shape is
tiny, fused_softmax runs its eager fallback, and one case runs the real kernels under Triton's
interpreter. Every case first checks its results against float64 torch. ``test_masked_softmax``
times attention's masked softmax (padding mask and causal diagonal) against the torch code it
replaces, eager and compiled.
"""

import pytest
import torch

import fused_softmax
from fused_softmax import use_backend
from fused_softmax._runtime import kernels_interpreted, triton_available
from fused_softmax.bench.sweep import DTYPE_NAMES, Problem, check, expected_results, implementations
from fused_softmax.testing import reference

pytest.importorskip("pytest_benchmark")

CUDA = torch.cuda.is_available()
DIRECTIONS = ("forward", "backward", "forward+backward")
IMPLEMENTATIONS, _ = implementations(peers=False)

# 256 MiB inputs, past the L2 cache: many short rows; a row on chip (bf16, fp32); online rows; fewer rows than SMs.
CUDA_PROBLEMS = [
    Problem(262144, 512, torch.bfloat16, "cuda"),
    Problem(16384, 8192, torch.bfloat16, "cuda"),
    Problem(8192, 8192, torch.float32, "cuda"),
    Problem(2048, 65536, torch.bfloat16, "cuda"),
    Problem(64, 1048576, torch.float32, "cuda"),
]
CPU_PROBLEM = Problem(64, 128, torch.float32, "cpu")
INTERPRETER_PROBLEM = Problem(4, 256, torch.float32, "interpreter")


def _cases():
    """(implementation, backend, problem): CUDA runs the kernels; CPU the fallback, and once the interpreter."""
    if CUDA:
        return [(name, "triton", problem) for problem in CUDA_PROBLEMS for name in IMPLEMENTATIONS]
    interpreted = ("fused_softmax", "triton", INTERPRETER_PROBLEM)
    return [(name, "torch", CPU_PROBLEM) for name in IMPLEMENTATIONS] + [interpreted]


def _id(case):
    name, backend, problem = case
    interpreted = "-interpreted" if backend == "triton" and not CUDA else ""
    return f"{name}{interpreted}-{problem.n_rows}x{problem.n_cols}-{DTYPE_NAMES[problem.dtype]}"


CASES = _cases()


def _timed_call(softmax, x, y, dy, direction):
    """The work a direction repeats; on CUDA it waits for the GPU, so the timer sees the kernels' time."""
    calls = {
        "forward": lambda: softmax(x),
        "backward": lambda: torch.autograd.grad(y, x, dy, retain_graph=True),
        "forward+backward": lambda: torch.autograd.grad(softmax(x), x, dy),
    }
    call = calls[direction]
    if not CUDA:
        return call

    def synchronized():
        call()
        torch.cuda.synchronize()

    return synchronized


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name, backend, problem", CASES, ids=[_id(case) for case in CASES])
def test_softmax(benchmark, name, backend, problem, direction):
    if backend == "triton" and not CUDA and not (triton_available() and kernels_interpreted()):
        pytest.skip("the kernels run on CPU only under TRITON_INTERPRET=1, set before triton is imported")
    device = "cuda" if CUDA else "cpu"
    x = torch.randn(problem.n_rows, problem.n_cols, dtype=problem.dtype, device=device, requires_grad=True)
    dy = torch.randn_like(x)
    expected = expected_results(x.detach(), dy, ("forward", "backward"))
    softmax = IMPLEMENTATIONS[name]()
    with use_backend(backend):
        y = softmax(x)
        dx = torch.autograd.grad(y, x, dy, retain_graph=True)[0]
        for out, direction_checked in ((y, "forward"), (dx, "backward")):
            error, allowed = check(out.detach(), expected[direction_checked])
            assert error <= allowed, f"{direction_checked}: max abs error {error:.3g} above {allowed:.3g}"
        benchmark.group = f"{direction} {problem.n_rows}x{problem.n_cols} {DTYPE_NAMES[problem.dtype]}"
        benchmark.extra_info["bytes_moved"] = problem.bytes_moved(direction)
        benchmark(_timed_call(softmax, x, y, dy, direction))
    if CUDA and benchmark.stats:
        benchmark.extra_info["GB/s"] = problem.bytes_moved(direction) / benchmark.stats.stats.median / 1e9


def _torch_masked_softmax(scores, keep, scale):
    """What attention code writes without the fused kernel: scale, mask, causal diagonal, softmax."""
    causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    return torch.softmax((scores * scale).masked_fill(~(keep & causal), float("-inf")), -1)


MASKED_IMPLEMENTATIONS = {
    "fused_softmax": lambda scores, keep, scale: fused_softmax.masked_softmax(scores, keep, scale=scale, causal=True),
    "torch": _torch_masked_softmax,
    "torch.compile": torch.compile(_torch_masked_softmax),
}
# bf16 scores [B, H, L, L] with a [B, 1, 1, L] right-padding mask and the causal diagonal; 128 MiB on CUDA.
MASKED_SHAPE = (4, 16, 1024, 1024) if CUDA else (2, 2, 4, 16)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name", list(MASKED_IMPLEMENTATIONS) if CUDA else ["fused_softmax", "torch"])
def test_masked_softmax(benchmark, name, direction):
    backend = "triton" if CUDA or kernels_interpreted() else "torch"
    device = "cuda" if CUDA else "cpu"
    b, _, _, n_keys = MASKED_SHAPE
    scores = torch.randn(MASKED_SHAPE, dtype=torch.bfloat16, device=device, requires_grad=True)
    # Right padding, sequences from full length down to half: every query sees key 0, so plain
    # torch, which gives NaN for a row with no visible key, is comparable.
    lengths = torch.linspace(n_keys, n_keys // 2, b, device=device).long()
    keep = (torch.arange(n_keys, device=device) < lengths[:, None]).view(b, 1, 1, n_keys)
    dy = torch.randn_like(scores)
    masked_softmax = MASKED_IMPLEMENTATIONS[name]

    def call(x):
        return masked_softmax(x, keep, 0.125)

    with use_backend(backend):
        y = call(scores)
        expected = reference.masked_softmax(scores, keep, 0.125, 0)
        error, allowed = check(y.detach(), torch.as_tensor(expected, device=device))
        assert error <= allowed, f"max abs error {error:.3g} above {allowed:.3g}"
        minimum = (
            scores.numel() * scores.element_size() * {"forward": 2, "backward": 3, "forward+backward": 5}[direction]
        )
        benchmark.group = f"masked_softmax {direction} {'x'.join(map(str, MASKED_SHAPE))} bf16"
        benchmark.extra_info["bytes_moved"] = minimum
        benchmark(_timed_call(call, scores, y, dy, direction))
    if CUDA and benchmark.stats:
        benchmark.extra_info["GB/s"] = minimum / benchmark.stats.stats.median / 1e9


def _small_calls():
    """name -> call of host_time's small calls ([8, 512] softmax inference and training, a
    decoding step's masked_softmax, a classifier's cross_entropy) and torch.empty_like, the
    yardstick, each with its torch counterpart."""
    from fused_softmax.bench.host_time import OTHER_CALLS, YARDSTICK, _calls

    device = torch.device("cuda" if CUDA else "cpu")
    x = torch.randn(8, 512, device=device)
    calls = {YARDSTICK: _calls(x, x, "inference")[YARDSTICK]}
    for mode in ("inference", "training"):
        for impl, call in _calls(x, torch.randn_like(x), mode).items():
            if impl != YARDSTICK:
                calls[f"softmax [8, 512] {mode}: {impl}"] = call
    for job, make in OTHER_CALLS.items():
        for impl, call in make(device).items():
            if impl != YARDSTICK:
                calls[f"{job}: {impl}"] = call
    return calls


SMALL_CALLS = _small_calls() if CUDA or kernels_interpreted() else {}


@pytest.mark.parametrize("name", list(SMALL_CALLS))
def test_small_call_host_path(benchmark, name):
    """Time per call of a small call, where the host sets the pace: on a GPU the wall time of
    calls queued without waiting (the host path, Triton's launch included), on CPU the host path
    alone, every launch planned and stubbed (the interpreter's kernels would time NumPy), while
    torch's counterparts run their CPU kernels. Compare each with torch.empty_like's in the
    same group."""
    from fused_softmax._launch import overridden

    benchmark.group = "small calls: host path per call"
    with use_backend("triton"), overridden(run=CUDA):
        benchmark(SMALL_CALLS[name])
