"""The split-row regime: rows too few to fill the GPU, cut into chunks across programs.

Values against the float64 reference in every dtype and layout the plan serves, forward,
backward and forward-mode, with ragged last chunks, chunks of only -inf and whole rows of -inf;
the plan the heuristic makes for decoding-sized shapes on an H100 and an H200; and the bytes
each launch moves, counted under the interpreter, equal the design. Tiny tensors reach the
regime through ``split_threshold(0)`` and a capped block (``limit_block``).
"""

import math
from fractions import Fraction

import pytest
import torch
from support import DTYPES, assert_close, random

import fused_softmax
from fused_softmax import _launch
from fused_softmax.kernels import H100, H200, DeviceProperties
from fused_softmax.testing import kernel_traffic, limit_block, minimum_bytes, planned_for, reference, split_threshold

SPLIT_KERNELS = {
    "forward": ["chunk_statistics_kernel", "chunk_normalise_kernel"],
    "backward": ["chunk_row_sums_kernel", "chunk_product_kernel"],
}

# (shape, dim): last dim with a ragged last chunk, an earlier dim (unit-stride rows), one row.
LAYOUTS = [((2, 37), -1), ((3, 29, 4), 1), ((1, 64), -1)]


# A GPU of 4 SMs: tiny tensors split into a few chunks, not one a column (the interpreter runs
# programs one after another).
FOUR_SMS = DeviceProperties(name="4 SMs", sm_count=4)


@pytest.fixture
def splitting():
    """Tiny tensors split, into chunks of at most 8 columns."""
    with split_threshold(0), limit_block(8), planned_for(FOUR_SMS):
        yield


def _names(launches):
    return [launch.name for launch in launches]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_forward_and_backward_match_the_reference(kernels, launches, splitting, op, dtype, layout):
    shape, dim = layout
    x = random(shape, dtype).requires_grad_()
    y = op.fused(x, dim=dim)
    dy = random(shape, dtype, seed=1)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert _names(launches) == SPLIT_KERNELS["forward"] + SPLIT_KERNELS["backward"]
    assert all(launch.plan.config.regime == "split" for launch in launches)
    expected = op.reference(x.detach(), axis=dim)
    assert_close(y, expected)
    # The backward judged on the y it was given (the interpreter truncates bf16 casts).
    assert_close(dx, op.reference_backward(y.detach(), dy, axis=dim))


def test_chunks_of_only_minus_infinity_and_rows_of_it(kernels, splitting, op):
    """A chunk of -inf adds nothing (its sum is 0, not NaN); a row of -inf is NaN, as torch's; and
    a NaN in a chunk otherwise of -inf, which the GPU's max passes over, makes its row NaN."""
    x = random((5, 40), torch.float32)
    x[0, 8:24] = float("-inf")  # whole chunks
    x[1, :] = float("-inf")
    x[2, 30:] = float("-inf")  # the ragged last chunk and part of the one before
    x[3, 8:16] = float("-inf")
    x[3, 9] = float("nan")
    x[4, :] = float("-inf")
    x[4, 37] = float("nan")
    actual = op.fused(x, dim=1)
    expected = op.torch(x, dim=1)
    torch.testing.assert_close(actual, expected, equal_nan=True)
    assert actual[3:].isnan().all() and not actual[[0, 2]].isnan().any()


def test_forward_mode_and_double_backward_through_the_split_kernels(kernels, launches, splitting, op):
    x = random((2, 21), torch.float64).requires_grad_()
    # fast_mode: a random projection of the Jacobian, a few launches instead of one per element
    assert torch.autograd.gradcheck(lambda t: op.fused(t, dim=1), (x,), check_forward_ad=True, fast_mode=True)
    assert torch.autograd.gradgradcheck(lambda t: op.fused(t, dim=1), (x,), fast_mode=True)
    assert set(_names(launches)) >= set(SPLIT_KERNELS["forward"] + SPLIT_KERNELS["backward"])


def test_masked_softmax_scale_reaches_the_split_backward(kernels, launches, splitting):
    scores = random((2, 3, 30), torch.float32).requires_grad_()
    y = fused_softmax.masked_softmax(scores, scale=0.3, causal="bottom_right")
    dy = random(y.shape, torch.float32, seed=1)
    (dz,) = torch.autograd.grad(y, scores, dy)
    assert launches[-1].name == "chunk_product_kernel"
    assert_close(dz, 0.3 * reference.softmax_backward(y.detach(), dy))


DECODING = [(m, n) for m in (1, 4, 8, 32, 128) for n in (32768, 131072, 262144)]


@pytest.mark.parametrize("device", [H100, H200], ids=lambda d: d.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_decoding_shapes_fill_every_sm_with_enough_in_flight(device, dtype, backward):
    """Every decoding-sized tensor of at least 1 MiB is planned onto every SM with the bytes in
    flight Little's law needs (bandwidth x latency; a smaller tensor, whole), whatever its row
    count."""
    heuristics = fused_softmax.kernels.heuristics
    for m, n in DECODING:
        x = torch.empty(m, n, dtype=dtype)
        if x.numel() * x.element_size() < heuristics.SPLIT_MIN_BYTES:
            continue
        with planned_for(device):
            p = _launch.plan((x, x, x) if backward else (x, x), 1, backward=backward, split=True)
        (grid,) = p.grid
        in_flight = grid * heuristics.tile_load_bytes(p.config, x.element_size(), backward)
        assert grid >= device.sm_count, (m, n, p.config)
        reads = x.numel() * x.element_size() * (2 if backward else 1)
        assert in_flight >= min(device.bytes_in_flight_needed, reads), (m, n, p.config, in_flight)


def test_what_does_not_split():
    """Many rows, small tensors, and the jobs without a split regime (attention scores have one:
    tests/test_split_attention.py)."""
    many_rows = torch.empty(4096, 8192)
    assert _launch.plan((many_rows, many_rows), 1, backward=False, split=True).config.chunks == 1
    small = torch.empty(4, 32768, dtype=torch.bfloat16)  # 256 KiB: its time is the launch
    assert _launch.plan((small, small), 1, backward=False, split=True).config.chunks == 1
    one_row = torch.empty(1, 1 << 20)
    assert _launch.plan((one_row, one_row), 1, backward=False, split=True).config.chunks > 1
    assert _launch.plan((one_row, one_row), 1, backward=False).config.chunks == 1


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_bytes_moved_equal_the_design(kernels, splitting, op, direction):
    """Forward: x read twice (statistics, then normalising), y written once: 3/2; backward: y and
    dy twice, dx once: 5/3. Plus the chunk values: 2 per chunk forward, 1 backward, each written
    once and read by every chunk of its row."""
    x = random((3, 64), torch.float32)
    y = torch.as_tensor(op.reference(x, axis=1)).float()
    dy = random((3, 64), torch.float32, seed=1)
    log = op.name == "log_softmax"
    with kernel_traffic() as traffic:
        if direction == "forward":
            out = _launch.softmax_forward(x, 1, x.dtype, log)
        else:
            out = _launch.softmax_backward(y, dy, 1, y.dtype, log)
    touched = (x, out) if direction == "forward" else (y, dy, out)
    p = _launch.plan(touched, 1, backward=direction == "backward", split=True)
    chunks, values = p.config.chunks, 2 if direction == "forward" else 1
    chunk_values = 3 * chunks * values * 4 * (1 + chunks)
    assert chunks > 1
    *ins, _ = touched
    assert traffic.stored == minimum_bytes(out) + 3 * chunks * values * 4
    assert traffic.loaded == 2 * minimum_bytes(*ins) + 3 * chunks * values * 4 * chunks
    design = Fraction(3, 2) if direction == "forward" else Fraction(5, 3)
    assert Fraction(traffic.total - chunk_values, minimum_bytes(*touched)) == design
    assert math.isfinite(out.sum())
