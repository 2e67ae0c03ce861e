"""The cooperative split-row regime: a split row read once, its programs meeting at a barrier.

It is off by default, and its kernels never run a real wait under the interpreter (programs run
one after another there: the host refuses the launch). So the tests run the host's own planned
launch directly with the barrier's count given: every arrival already counted, and the
workspace holding each chunk's values (the forward's in an equal but shifted form, so that the
kernel's own writes show). And with the count not given and a short bound on the polls, the
interpreter's order shows the barrier's logic: the last chunk of each tile finds every arrival
and every chunk's values and is right; the others give up and write NaN, and nothing hangs.
The plans are checked against the SMs they must fit, on an H100 and an H200.
"""

import contextlib
import math

import numpy as np
import pytest
import torch
from support import DTYPES, assert_close, random

import fused_softmax
from fused_softmax import _launch
from fused_softmax.kernels import H100, H200, DeviceProperties, heuristics
from fused_softmax.testing import (
    cooperative,
    kernel_traffic,
    limit_block,
    minimum_bytes,
    planned_for,
    recorded_launches,
    split_threshold,
)

# (shape, dim, on-chip cap): last dim with a ragged last chunk (a row a tile), an earlier dim
# (unit-stride rows, four a tile).
LAYOUTS = [((2, 37), -1, 32), ((3, 29, 4), 1, 128)]
EIGHT_SMS = DeviceProperties(name="8 SMs", sm_count=8)


@contextlib.contextmanager
def cooperating(max_block=32):
    """Tiny tensors take the cooperative regime, in a few chunks."""
    with split_threshold(0), limit_block(max_block), planned_for(EIGHT_SMS), cooperative():
        yield


def _planned(job):
    """The one launch ``job`` plans (cooperative), not run, and what it returns."""
    with recorded_launches(run=False) as launches:
        out = job()
    (launch,) = launches
    assert launch.plan.config.regime == "cooperative", launch.plan.config
    return launch, out


def _run(launch, **changes):
    """The planned launch, run here with ``changes`` to its arguments."""
    launch.kernel[launch.plan.grid](**(launch.args | changes), num_warps=launch.plan.config.num_warps)


def _chunks(t, dim, launch):
    """``t``'s rows, as the kernels number them, cut into the launch's chunks: [rows, chunks, cols], float64."""
    rows = t.detach().double().movedim(dim, -1).reshape(-1, t.shape[dim])
    config = launch.plan.config
    padded = torch.full((rows.shape[0], config.chunks * config.chunk_cols), float("nan"), dtype=torch.float64)
    padded[:, : rows.shape[1]] = rows
    return padded.reshape(rows.shape[0], config.chunks, config.chunk_cols)


def _chunk_statistics(x, dim, launch):
    """Each chunk's (max, sum of exp(x - max)), in float64."""
    chunks = _chunks(x, dim, launch)
    maxes = chunks.nan_to_num(nan=-math.inf).amax(-1)
    return maxes, torch.exp(chunks - maxes[..., None]).nansum(-1)


def _row_sum_parts(y, dy, dim, launch, log):
    """Each chunk's part of the backward's row sum: of dy * y (softmax) or of dy (log-softmax)."""
    parts = _chunks(dy, dim, launch) * (1.0 if log else _chunks(y, dim, launch))
    return parts.nansum(-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_forward_and_backward_match_the_reference_with_the_barrier_given(op, dtype, layout):
    shape, dim, max_block = layout
    log = op.name == "log_softmax"
    x = random(shape, dtype)
    with cooperating(max_block):
        launch, y = _planned(lambda: _launch.softmax_forward(x, dim, dtype, log))
    config = launch.plan.config
    assert config.chunks >= 2 and launch.plan.grid == (launch.args["arrivals_ptr"].numel() * config.chunks,)
    maxes, sums = _chunk_statistics(x, dim, launch)
    launch.args["maxes_ptr"].copy_(maxes + 1.0)  # the same statistics, shifted
    launch.args["sums_ptr"].copy_(sums * math.exp(-1.0))
    launch.args["arrivals_ptr"].fill_(config.chunks)
    _run(launch)
    assert_close(y, op.reference(x, axis=dim))
    # Each program wrote its own chunk's statistics over the shifted ones.
    torch.testing.assert_close(launch.args["maxes_ptr"].double(), maxes)
    torch.testing.assert_close(launch.args["sums_ptr"].double(), sums, rtol=1e-5, atol=1e-6)

    dy = random(shape, dtype, seed=1)
    with cooperating(max_block):
        launch, dx = _planned(lambda: _launch.softmax_backward(y, dy, dim, dtype, log))
    parts = _row_sum_parts(y, dy, dim, launch, log)
    launch.args["sums_ptr"].copy_(parts)
    launch.args["arrivals_ptr"].fill_(launch.plan.config.chunks)
    _run(launch)
    assert_close(dx, op.reference_backward(y, dy, axis=dim))  # judged on the y it was given
    torch.testing.assert_close(launch.args["sums_ptr"].double(), parts, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_a_barrier_never_completed_gives_nan_and_ends(op, direction):
    """Programs in order, none waiting for long: the last chunk of each row finds every arrival and
    every other chunk's values (written by the kernel itself) and is right; the others give up."""
    shape, dim = (2, 37), 1
    log = op.name == "log_softmax"
    x, dy = random(shape), random(shape, seed=1)
    y = torch.as_tensor(op.reference(x, axis=dim)).float()
    with cooperating():
        if direction == "forward":
            launch, out = _planned(lambda: _launch.softmax_forward(x, dim, x.dtype, log))
            expected = op.reference(x, axis=dim)
        else:
            launch, out = _planned(lambda: _launch.softmax_backward(y, dy, dim, y.dtype, log))
            expected = op.reference_backward(y, dy, axis=dim)
    _run(launch, max_spins=2)
    config = launch.plan.config
    last = (config.chunks - 1) * config.chunk_cols
    assert config.chunks >= 2 and launch.args["arrivals_ptr"].tolist() == [config.chunks] * shape[0]
    assert out[:, :last].isnan().all()
    assert_close(out[:, last:], np.asarray(expected)[:, last:])


def test_the_interpreter_refuses_it_and_the_default_is_phased(kernels, launches, op):
    x = random((2, 37))
    with split_threshold(0), limit_block(32), planned_for(EIGHT_SMS):
        with cooperative(), pytest.raises(RuntimeError, match="interpreter"):
            op.fused(x, dim=1)
        assert [launch.name for launch in launches] == ["cooperative_softmax_kernel"]
        y = op.fused(x, dim=1)  # off by default (FUSED_SOFTMAX_COOPERATIVE is not set in the tests)
    assert not _launch.COOPERATIVE
    assert [launch.name for launch in launches[1:]] == ["chunk_statistics_kernel", "chunk_normalise_kernel"]
    assert_close(y, op.reference(x, axis=1))


def test_bytes_moved_are_one_read_and_one_write(op):
    """x read once and y written once (1.00x), plus each chunk's two values written once and read
    by every chunk of its row; as explain states it."""
    x = random((3, 64))
    log = op.name == "log_softmax"
    with cooperating():
        launch, y = _planned(lambda: _launch.softmax_forward(x, 1, x.dtype, log))
    maxes, sums = _chunk_statistics(x, 1, launch)
    launch.args["maxes_ptr"].copy_(maxes)
    launch.args["sums_ptr"].copy_(sums)
    launch.args["arrivals_ptr"].fill_(launch.plan.config.chunks)
    with kernel_traffic() as traffic:
        _run(launch)
    chunks = launch.plan.config.chunks
    assert traffic.loaded == minimum_bytes(x) + 3 * chunks * 2 * 4 * chunks
    assert traffic.stored == minimum_bytes(y) + 3 * chunks * 2 * 4
    with cooperating():
        assert fused_softmax.explain(x, 1).bytes_moved == traffic.total
    assert torch.isfinite(y).all()


DECODING = [(m, n) for m in (1, 4, 8, 32, 128) for n in (32768, 131072, 262144, 1 << 20)]


@pytest.mark.parametrize("device", [H100, H200], ids=lambda d: d.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_plans_fit_the_sms_and_take_every_split_that_fits_on_chip(device, dtype, backward):
    """Every cooperative plan is one program a chunk, all resident at once: at the register cap
    it compiles to (the compile report checks it), the warps of an SM's programs at most
    MAX_WARPS, each chunk within its program's share of the on-chip budget. And every split
    decoding shape whose rows fit that budget on every SM together takes it, at 1.00x traffic
    before the chunks' values."""
    on_chip = heuristics.max_on_chip_elements(4, 2 if backward else 1, True, device)
    taken = 0
    for m, n in DECODING:
        x = torch.empty(m, n, dtype=dtype)
        tensors = (x, x, x) if backward else (x, x)
        with planned_for(device):
            phased = _launch.plan(tensors, 1, backward=backward, split=True).config
            with cooperative():
                p = _launch.plan(tensors, 1, backward=backward, split=True)
        config, (grid,) = p.config, p.grid
        if phased.regime != "split":
            assert config == phased, (m, n)
            continue
        assert config.regime == ("cooperative" if m * n <= device.sm_count * on_chip else "split"), (m, n, config)
        if config.regime == "split":
            continue
        taken += 1
        per_sm = -(-grid // device.sm_count)
        assert grid == m * config.chunks and config.chunk_cols == config.block_n, (m, n, config)
        assert per_sm * config.num_warps <= heuristics.MAX_WARPS, (m, n, config, grid)
        assert per_sm * config.num_warps * 32 * config.max_registers <= device.registers_per_sm
        assert per_sm * config.block_n <= on_chip and grid >= device.sm_count, (m, n, config, grid)
        e = fused_softmax.explain((m, n), dtype=dtype, backward=backward, device=device, cooperative=True)
        values = m * config.chunks * (1 if backward else 2) * 4 * (1 + config.chunks)
        assert e.regime == "cooperative" and e.bytes_moved - values == e.minimum_bytes
        # As explain's tests hold every shape of 4 MiB or more (a smaller one has less to keep in flight).
        assert e.predicted_fraction >= 0.85 or x.numel() * x.element_size() < 4 * 2**20, (m, n, e.predicted_fraction)
    assert taken >= 6
