"""Bytes each kernel moves, counted under Triton's interpreter, equal the design exactly.

The counter (``fused_softmax.testing.kernel_traffic``) sees only the loads and stores of
Triton kernels, lane by lane; torch copies around a launch are invisible to it. The kernels
are therefore called through ``_launch.softmax_forward_rows`` / ``softmax_backward_rows``,
which launch exactly one kernel on the given row views, with the configurations the launch
heuristic picks for an H100 (what the interpreter path uses; no forced small blocks).

Design, in bytes moved / the least possible (every tensor touched once):

- forward, multi-row and single-pass: x read once, y written once             -> 1
- forward, online: x read twice (statistics sweep, normalising sweep), y once -> 3/2
- backward, multi-row and single-pass: y and dy read once, dx written once    -> 1
- backward, online: y and dy read twice, dx written once                      -> 5/3

Each case also checks that the launch used the regime its row length is meant to land in,
from the on-chip budgets the design states, so that no case silently tests another regime.
"""

import math
from fractions import Fraction

import pytest
import torch

import fused_softmax
from fused_softmax import _launch, reference
from fused_softmax.kernels import H100
from fused_softmax.kernels.heuristics import ONLINE_BLOCK, TILE_BYTES
from fused_softmax.testing import kernel_traffic, minimum_bytes

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DIRECTIONS = ["forward", "backward"]

# Longest row kept on chip on an H100, by compute bytes (fp32 math, fp64 for fp64) and direction.
ON_CHIP = {
    (4, "forward"): 32768,
    (4, "backward"): 16384,
    (8, "forward"): 16384,
    (8, "backward"): 8192,
}

# Bytes moved / minimum, exactly.
DESIGN_RATIO = {
    ("forward", "multi_row"): Fraction(1),
    ("forward", "single_pass"): Fraction(1),
    ("forward", "online"): Fraction(3, 2),
    ("backward", "multi_row"): Fraction(1),
    ("backward", "single_pass"): Fraction(1),
    ("backward", "online"): Fraction(5, 3),
}

@pytest.fixture(autouse=True, scope="module")
def _interpreted():
    if not _launch.kernels_interpreted():
        pytest.skip("traffic is counted only under TRITON_INTERPRET=1 (CPU interpreter)")


def elem_bytes(dtype):
    return torch.empty((), dtype=dtype).element_size()


def boundaries(dtype, direction):
    """(last multi-row length, last on-chip length) for this dtype and direction, from the design."""
    size = elem_bytes(dtype)
    multi_row_max = TILE_BYTES // size // 2  # a tile of TILE_BYTES holds at least two rows
    on_chip = ON_CHIP[(8 if size == 8 else 4, direction)]
    return multi_row_max, on_chip


def row_lengths(dtype, direction):
    """(n_cols, expected regime): odd lengths, powers of two, and each block boundary +-1."""
    mr, chip = boundaries(dtype, direction)
    ob = ONLINE_BLOCK
    return [
        (1, "multi_row"),
        (3, "multi_row"),
        (100, "multi_row"),
        (mr // 2 + 1, "multi_row"),
        (mr - 1, "multi_row"),
        (mr, "multi_row"),
        (mr + 1, "single_pass"),
        (3 * mr - 5, "single_pass"),
        (chip - 1, "single_pass"),
        (chip, "single_pass"),
        (chip + 1, "online"),
        (chip + ob - 1, "online"),
        (chip + ob, "online"),
        (chip + ob + 1, "online"),
        (2 * chip + 3 * ob // 2 + 7, "online"),
    ]


CASES = [
    (direction, dtype, n_cols, regime)
    for direction in DIRECTIONS
    for dtype in DTYPES
    for n_cols, regime in row_lengths(dtype, direction)
]


def case_id(case):
    direction, dtype, n_cols, regime = case
    return f"{direction}-{str(dtype).removeprefix('torch.')}-{n_cols}-{regime}"


def regime_of(config):
    if config.online:
        return "online"
    return "multi_row" if config.rows_per_program > 1 else "single_pass"


@pytest.fixture
def configs(monkeypatch):
    """Records every launch configuration the host code asks for (and the device it asked for)."""
    kernels = _launch._kernels()
    launch_config = kernels.launch_config
    seen = []

    def recorded(n_cols, elem_bytes, device, **kwargs):
        config = launch_config(n_cols, elem_bytes, device, **kwargs)
        seen.append(dict(n_cols=n_cols, elem_bytes=elem_bytes, device=device, config=config, **kwargs))
        return config

    monkeypatch.setattr(kernels, "launch_config", recorded)
    return seen


def random(shape, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def n_rows_for(config):
    """A full block of rows and a partial one for multi-row tiles; a few rows otherwise."""
    return config.rows_per_program + 3 if config.rows_per_program > 1 else 3


def run(direction, x, y=None, dy=None):
    """Launch one kernel directly on [n_rows, n_cols] views; returns (tensors touched, output, traffic)."""
    with kernel_traffic() as traffic:
        if direction == "forward":
            out = _launch.softmax_forward_rows(x, x.dtype)
        else:
            out = _launch.softmax_backward_rows(y, dy)
    touched = (x, out) if direction == "forward" else (y, dy, out)
    return touched, out, traffic


def inputs(direction, shape, dtype, row_pad=0):
    """Random x, y = softmax(x) and dy, as [n_rows, n_cols] views with row stride n_cols + row_pad."""
    n_rows, n_cols = shape
    x = random((n_rows, n_cols + row_pad), dtype)[:, :n_cols]
    y = torch.as_tensor(reference.softmax(x)).to(dtype)
    y = torch.nn.functional.pad(y, (0, row_pad))[:, :n_cols] if row_pad else y
    dy = random((n_rows, n_cols + row_pad), dtype, scale=1.0, seed=1)[:, :n_cols]
    return x, y, dy


def assert_design_traffic(direction, regime, touched, traffic):
    """Stores: every output element once. Loads: every input element once per sweep. Ratio exact."""
    *ins, out = touched
    sweeps = 2 if regime == "online" else 1
    assert traffic.stored == minimum_bytes(out), (traffic.stored, minimum_bytes(out))
    assert traffic.loaded == sweeps * minimum_bytes(*ins), (traffic.loaded, sweeps * minimum_bytes(*ins))
    ratio = Fraction(traffic.total, minimum_bytes(*touched))
    assert ratio == DESIGN_RATIO[(direction, regime)], f"{float(ratio):.4f} != {DESIGN_RATIO[(direction, regime)]}"


def assert_did_the_work(direction, out, x, y, dy):
    """Outputs are poisoned (NaN) before the kernel runs: all finite means all written; loosely right."""
    assert torch.isfinite(out).all()
    expected = reference.softmax(x) if direction == "forward" else reference.softmax_backward(y, dy)
    expected = torch.as_tensor(expected)
    err = (out.double() - expected).abs().max().item()
    assert err <= 2e-2 * expected.abs().max().item() + 1e-6, err


def test_cases_cover_every_kernel_regime_and_dtype():
    covered = {(d, dt, r) for d, dt, _, r in CASES}
    assert covered == {(d, dt, r) for d in DIRECTIONS for dt in DTYPES for r in ("multi_row", "single_pass", "online")}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bytes_moved_equal_design(configs, launches, case):
    direction, dtype, n_cols, regime = case
    backward = direction == "backward"
    config = _launch._kernels().launch_config(n_cols, elem_bytes(dtype), H100, backward=backward)
    assert regime_of(config) == regime, (config, regime)
    configs.clear()

    x, y, dy = inputs(direction, (n_rows_for(config), n_cols), dtype)
    touched, out, traffic = run(direction, x, y, dy)

    # Exactly one launch, with the H100 configuration of the intended regime, nothing forced.
    assert launches["n"] == 1
    (seen,) = configs
    assert seen["device"] == H100 and seen["max_block"] is None and seen["backward"] == backward
    assert seen["config"] == config
    assert_design_traffic(direction, regime, touched, traffic)
    assert_did_the_work(direction, out, x, y, dy)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("regime", ["multi_row", "single_pass", "online"])
def test_strided_rows_move_only_their_elements(launches, direction, regime):
    """Rows with a row stride wider than the row: the padding between rows is never touched."""
    dtype = torch.float32
    mr, chip = boundaries(dtype, direction)
    n_cols = {"multi_row": 100, "single_pass": mr + 1, "online": chip + 1}[regime]
    config = _launch._kernels().launch_config(n_cols, elem_bytes(dtype), H100, backward=direction == "backward")
    assert regime_of(config) == regime
    x, y, dy = inputs(direction, (n_rows_for(config), n_cols), dtype, row_pad=5)
    assert x.stride(0) == n_cols + 5 and not x.is_contiguous()
    touched, out, traffic = run(direction, x, y, dy)
    assert launches["n"] == 1
    assert_design_traffic(direction, regime, touched, traffic)
    assert_did_the_work(direction, out, x, y, dy)


@pytest.mark.parametrize("regime", ["multi_row", "single_pass", "online"])
def test_public_api_launches_only_the_kernels(kernels, launches, regime):
    """fused_softmax.softmax and its autograd backward run one kernel each, with the design traffic."""
    dtype = torch.float32
    n_cols = {"multi_row": 100, "single_pass": 5000, "online": ON_CHIP[(4, "forward")] + 1}[regime]
    for backward in (False, True):
        assert regime_of(_launch._kernels().launch_config(n_cols, 4, H100, backward=backward)) == regime
    x = random((3, n_cols), dtype).requires_grad_()
    dy = random((3, n_cols), dtype, scale=1.0, seed=1)

    with kernel_traffic() as forward:
        y = fused_softmax.softmax(x, dim=-1)
    assert launches["n"] == 1
    assert Fraction(forward.total, minimum_bytes(x, y)) == DESIGN_RATIO[("forward", regime)]

    with kernel_traffic() as backward:
        (dx,) = torch.autograd.grad(y, x, dy)
    assert launches["n"] == 2
    assert Fraction(backward.total, minimum_bytes(y, dy, dx)) == DESIGN_RATIO[("backward", regime)]


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_persistent_programs_move_each_row_once(launches, direction):
    """More row blocks than the H100 grid holds: programs stride over blocks, and still no row twice."""
    dtype, n_cols = torch.float64, 4096  # single-pass, 16 warps: the smallest H100 grid (528 programs)
    config = _launch._kernels().launch_config(n_cols, 8, H100, backward=direction == "backward")
    assert regime_of(config) == "single_pass"
    n_rows = config.grid(10**9, H100) + 2
    assert config.grid(n_rows, H100) < math.ceil(n_rows / config.rows_per_program)
    x, y, dy = inputs(direction, (n_rows, n_cols), dtype)
    touched, out, traffic = run(direction, x, y, dy)
    assert launches["n"] == 1
    assert_design_traffic(direction, "single_pass", touched, traffic)
    assert_did_the_work(direction, out, x, y, dy)
