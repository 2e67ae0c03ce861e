"""Bytes each kernel moves, counted under Triton's interpreter, equal the design exactly.

The counter (``fused_softmax.testing.kernel_traffic``) sees the loads and stores of Triton
kernels lane by lane (a stride-0 tensor counts at its logical size); torch copies around a
launch are invisible to it, so cases with strided inputs also check that the kernel got the
caller's storage. Launches use the H100 configurations the heuristic picks, nothing forced.

Design, in bytes moved / the least possible (every element of every tensor touched once),
for softmax and log_softmax alike:

- forward on chip (multi-row, single-pass): x read once, y written once       -> 1
- forward online: x read twice (statistics, then normalising sweep), y once   -> 3/2
- backward on chip: y and dy read once, dx written once                       -> 1
- backward online: y and dy read twice, dx written once                       -> 5/3

With dtype= fusing an fp16 x into an fp32 y (dx back in fp16), the same sweeps over unequal
elements give 4/3 and 9/5 online.

Row lengths sit at the regime boundaries the design states, for 16-byte-aligned rows and
unaligned ones; every case asserts, from the launch's Plan, the regime it claims.
"""

from fractions import Fraction

import pytest
import torch
from support import ONE_PROGRAM, assert_close, random

import fused_softmax
from fused_softmax import _launch
from fused_softmax._launch import plan
from fused_softmax._runtime import kernels_interpreted
from fused_softmax.kernels import H100
from fused_softmax.kernels.heuristics import TILE_BYTES
from fused_softmax.testing import kernel_traffic, minimum_bytes, planned_for, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DIRECTIONS = ["forward", "backward"]
OPS = ["softmax", "log_softmax"]
REGIMES = ["multi_row", "single_pass", "online"]

# Longest row kept on chip on an H100, (16-byte-aligned, unaligned), by compute bytes (fp32
# math, fp64 for fp64) and direction. fp64 is capped at 8,192 (its exp/log need registers too).
ON_CHIP = {
    (4, "forward"): (32768, 16384),
    (4, "backward"): (16384, 8192),
    (8, "forward"): (8192, 8192),
    (8, "backward"): (8192, 4096),
}

DESIGN_RATIO = {
    ("forward", "multi_row"): Fraction(1),
    ("forward", "single_pass"): Fraction(1),
    ("forward", "online"): Fraction(3, 2),
    ("backward", "multi_row"): Fraction(1),
    ("backward", "single_pass"): Fraction(1),
    ("backward", "online"): Fraction(5, 3),
}
# fp16 x -> fp32 y, fp32 y and dy -> fp16 dx. Online: (2*2 + 4) / (2 + 4) and (2*(4 + 4) + 2) / (4 + 4 + 2).
UPCAST_RATIO = DESIGN_RATIO | {("forward", "online"): Fraction(4, 3), ("backward", "online"): Fraction(9, 5)}


@pytest.fixture(autouse=True, scope="module")
def _interpreted():
    if not kernels_interpreted():
        pytest.skip("traffic is counted only under TRITON_INTERPRET=1 (CPU interpreter)")


def on_chip(dtype, direction):
    """(aligned, unaligned) longest on-chip row."""
    return ON_CHIP[(8 if dtype == torch.float64 else 4, direction)]


def row_lengths(dtype, direction):
    """(n_cols, regime, aligned) at each boundary: multi-row to single-pass, and on chip to
    online at 16-byte alignment and without."""
    multi_row_max = TILE_BYTES // dtype.itemsize // 2  # a tile holds at least two rows
    aligned, unaligned = on_chip(dtype, direction)
    return [
        (3, "multi_row", False),
        (multi_row_max, "multi_row", True),
        (multi_row_max + 1, "single_pass", False),
        (unaligned - 1, "single_pass", False),
        (aligned, "single_pass", True),
        (unaligned + 1, "online", False),
        (aligned + 16, "online", True),
    ]


CASES = [
    (direction, op, dtype, n_cols, regime, aligned)
    for direction in DIRECTIONS
    for op in OPS
    for dtype in DTYPES
    for n_cols, regime, aligned in row_lengths(dtype, direction)
]


def case_id(case):
    direction, op, dtype, n_cols, regime, aligned = case
    return f"{direction}-{op}-{str(dtype).removeprefix('torch.')}-{n_cols}-{regime}"


def is_aligned(p):
    return p.align * max(t.element_size() for t in p.tensors) >= 16


def inputs(op, shape, dtype, dim=-1):
    """Random x, y = op(x) and dy, contiguous."""
    x = random(shape, dtype)
    y = torch.as_tensor(getattr(reference, op)(x, axis=dim)).to(dtype)
    return x, y, random(shape, dtype, scale=1.0, seed=1)


def run(direction, op, x, y, dy, dim):
    """One kernel on x (forward) or y and dy (backward); returns (tensors touched, output, traffic)."""
    log = op == "log_softmax"
    with kernel_traffic() as traffic:
        if direction == "forward":
            out = _launch.softmax_forward(x, dim, x.dtype, log)
        else:
            out = _launch.softmax_backward(y, dy, dim, y.dtype, log)
    touched = (x, out) if direction == "forward" else (y, dy, out)
    return touched, out, traffic


def assert_design_traffic(direction, regime, touched, traffic, design=DESIGN_RATIO):
    """Stores: every output element once. Loads: every input element once per sweep. Ratio exact."""
    *ins, out = touched
    sweeps = 2 if regime == "online" else 1
    assert traffic.stored == minimum_bytes(out), (traffic.stored, minimum_bytes(out))
    assert traffic.loaded == sweeps * minimum_bytes(*ins), (traffic.loaded, sweeps * minimum_bytes(*ins))
    ratio = Fraction(traffic.total, minimum_bytes(*touched))
    assert ratio == design[(direction, regime)], f"{float(ratio):.4f} != {design[(direction, regime)]}"


def assert_did_the_work(direction, op, out, x, y, dy, dim):
    """Outputs are poisoned (NaN) before the kernel runs: all finite means all written; loosely right."""
    assert torch.isfinite(out).all()
    if direction == "forward":
        expected = getattr(reference, op)(x, axis=dim)
    else:
        expected = getattr(reference, f"{op}_backward")(y, dy, axis=dim)
    expected = torch.as_tensor(expected)
    err = (out.double() - expected).abs().max().item()
    assert err <= 2e-2 * expected.abs().max().item() + 1e-6, err


def test_cases_cover_every_kernel_regime_dtype_op_and_alignment():
    covered = {(d, op, dt, r, a) for d, op, dt, _, r, a in CASES}
    assert covered == {
        (d, op, dt, r, a) for d in DIRECTIONS for op in OPS for dt in DTYPES for r in REGIMES for a in (False, True)
    }


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bytes_moved_equal_design(plans, case):
    """Contiguous rows at each boundary; multi-row tiles get a full tile of rows and a partial one."""
    direction, op, dtype, n_cols, regime, aligned = case
    tensors = [torch.empty(1, n_cols, dtype=dtype)] * (2 if direction == "forward" else 3)
    config = plan(tensors, 1, backward=direction == "backward").config
    n_rows = config.rows_per_program + 3 if config.rows_per_program > 1 else 2
    x, y, dy = inputs(op, (n_rows, n_cols), dtype)
    touched, out, traffic = run(direction, op, x, y, dy, 1)

    (p,) = plans()
    assert p.device == H100 and p.config == config
    assert (p.config.regime, is_aligned(p)) == (regime, aligned), p
    assert_design_traffic(direction, regime, touched, traffic)
    assert_did_the_work(direction, op, out, x, y, dy, 1)


def layout(name, n_cols, tensor):
    """``tensor`` [2, n_cols, 8], contiguous or as a view of [2, 8, n_cols] (columns unit-stride),
    or [8, n_cols] as the transpose of a contiguous [n_cols, 8]."""
    if name == "transposed":
        return tensor[0].t()
    if name == "dim1-unit-stride-cols":
        return tensor.transpose(1, 2).contiguous().transpose(1, 2)
    return tensor


def layout_cases(direction):
    """(layout, n_cols, regime) of a softmax over dim 1, fp32. Where rows are unit-stride, a tile
    takes 8 of them (a 32-byte sector) and the columns are strided (unaligned)."""
    sector_limit = on_chip(torch.float32, direction)[1] // 8
    return [
        ("dim1-contiguous", sector_limit, "multi_row"),
        ("dim1-contiguous", sector_limit + 1, "online"),
        ("dim1-unit-stride-cols", 3000, "single_pass"),
        ("transposed", 3000, "online"),
    ]


LAYOUT_CASES = [pytest.param(d, c, id="-".join(map(str, (d, *c)))) for d in DIRECTIONS for c in layout_cases(d)]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("direction, case", LAYOUT_CASES)
def test_strided_layouts_reach_the_kernel_uncopied(plans, direction, case, op):
    """Non-last dims and transposed inputs: the kernel reads the caller's storage, at design traffic."""
    name, n_cols, regime = case
    x, y, dy = (layout(name, n_cols, t) for t in inputs(op, (2, n_cols, 8), torch.float32, dim=1))
    touched, out, traffic = run(direction, op, x, y, dy, 1)

    (p,) = plans()
    for given, seen in zip(touched[:-1], p.tensors[:-1], strict=True):
        assert (seen.data_ptr(), seen.stride()) == (given.data_ptr(), given.stride())
    assert p.config.regime == regime, p
    assert_design_traffic(direction, regime, touched, traffic)
    assert_did_the_work(direction, op, out, x, y, dy, 1)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n_cols, backward_regime", [(8192, "single_pass"), (8193, "online")])
def test_expanded_grad_of_sum(kernels, plans, op, n_cols, backward_regime):
    """y.sum().backward(): dy is stride-0 and reaches the kernel uncopied (so unaligned: half the budget)."""
    x = random((3, n_cols), torch.float32).requires_grad_()
    with kernel_traffic() as forward:
        y = getattr(fused_softmax, op)(x, dim=-1)
    with kernel_traffic() as backward:
        y.sum().backward()

    forward_plan, backward_plan = plans()
    assert forward_plan.config.regime == "single_pass"
    assert backward_plan.strides[1] == (0, 0, 0) and not is_aligned(backward_plan)
    assert backward_plan.config.regime == backward_regime
    dy = torch.ones(()).expand_as(y)
    assert_design_traffic("forward", "single_pass", (x, y), forward)
    assert_design_traffic("backward", backward_regime, (y, dy, x.grad), backward)
    assert_did_the_work("backward", op, x.grad, x, y, dy, 1)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n_cols, regime", [(2048, "multi_row"), (16384, "single_pass"), (32784, "online")])
def test_fused_upcast(kernels, plans, op, n_cols, regime):
    """dtype=float32 on fp16 x: one kernel reads fp16 and writes fp32 (minimum: x's bytes + y's);
    the backward reads fp32 y and dy and writes dx in fp16. Budgets are the widest element's."""
    x = random((3, n_cols), torch.float16).requires_grad_()
    dy = random((3, n_cols), torch.float32, scale=1.0, seed=1)
    with kernel_traffic() as forward:
        y = getattr(fused_softmax, op)(x, dim=-1, dtype=torch.float32)
    with kernel_traffic() as backward:
        y.backward(dy)

    made = plans()
    assert [[t.dtype for t in p.tensors] for p in made] == [
        [torch.float16, torch.float32],
        [torch.float32, torch.float32, torch.float16],
    ]
    assert made[0].tensors[0].data_ptr() == x.data_ptr()
    assert all(p.config.regime == regime and is_aligned(p) for p in made), made
    assert_design_traffic("forward", regime, (x, y), forward, UPCAST_RATIO)
    assert_design_traffic("backward", regime, (y, dy, x.grad), backward, UPCAST_RATIO)
    assert_did_the_work("forward", op, y, x, None, None, 1)
    assert_did_the_work("backward", op, x.grad, x, y, dy, 1)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize(
    "shape, regime", [((67, 100), "multi_row"), ((3, 3000), "single_pass"), ((3, 40000), "online")]
)
def test_persistent_program_moves_each_row_once(plans, direction, shape, regime):
    """One program (H100 configurations otherwise) strides over every tile: still no row twice."""
    x, y, dy = inputs("softmax", shape, torch.float32)
    backward = direction == "backward"
    h100 = plan((y, dy, x) if backward else (x, y), 1, backward=backward).config
    with planned_for(ONE_PROGRAM):
        touched, out, traffic = run(direction, "softmax", x, y, dy, 1)

    (p,) = plans()
    assert p.grid == (1,) and p.config == h100 and h100.regime == regime
    assert shape[0] > h100.rows_per_program  # more than one tile
    assert_design_traffic(direction, regime, touched, traffic)
    assert_did_the_work(direction, "softmax", out, x, y, dy, 1)


MASKED_CASES = {
    "bool [B,1,1,Lk]": (lambda b, q, n: torch.rand(b, 1, 1, n) > 0.2, None),
    "additive [Lq,Lk], causal bottom-right": (lambda b, q, n: random((q, n), torch.float32), "bottom_right"),
    "causal top-left": (lambda b, q, n: None, "top_left"),
}


@pytest.mark.parametrize("case", list(MASKED_CASES))
@pytest.mark.parametrize("n, regime", [(1000, "multi_row"), (20000, "online")], ids=["on_chip", "online"])
def test_masked_softmax_reads_scores_and_mask_once_per_sweep(plans, case, n, regime):
    """Every visible key is read (loads are predicated on the row bounds only, so they stay
    128-bit), with the mask at its broadcast size, once per sweep; y is written once. Online, a
    causal row's sweeps stop at the tile holding its diagonal: top-left rows of 2 queries read
    one tile of 20,000 keys, and the tiles after it are only written (zeros)."""
    make_mask, causal = MASKED_CASES[case]
    b, h, q = (2, 1, 2) if regime == "online" else (2, 2, 3)
    scores, mask = random((b, h, q, n), torch.float32), make_mask(b, q, n)
    with fused_softmax.use_backend("triton"), kernel_traffic() as traffic:
        y = fused_softmax.masked_softmax(scores, mask, scale=0.5, causal=causal or False)
    config = plans()[-1].config
    assert config.online == (regime == "online")
    offset = 0 if causal in (None, "top_left") else n - q
    tile = config.block_n
    read = [min(n, (i + offset) // tile * tile + tile) if causal and config.online else n for i in range(q)]
    sweeps = 2 if config.online else 1
    mask_bytes = 0 if mask is None else mask.element_size()
    assert traffic.stored == minimum_bytes(y)
    assert traffic.loaded == sweeps * b * h * sum(read) * (scores.element_size() + mask_bytes)
    assert_close(y, reference.masked_softmax(scores, mask, 0.5, None if causal is None else offset))


@pytest.mark.parametrize("n, online", [(1000, False), (40000, True)], ids=["on_chip", "online"])
def test_row_statistics_modes_move_one_sweep(plans, n, online):
    """Sharded softmax's kernels: statistics out (x read once, 2 values a row written), normalise
    with the given log-sum-exp (x and the lse read once, y written once, even for rows past the
    on-chip limit), and the backward's row sums out and in, each one sweep."""
    x, y, dy = inputs("softmax", (3, n), torch.float32)
    with kernel_traffic() as stats_traffic:
        stats = _launch.row_statistics(x, 1)
    lse = torch.stack([stats[:, 0], stats[:, 1].log()], 1)  # in two parts: (max, log Σ)
    with kernel_traffic() as forward_traffic:
        out = _launch.normalise_with_lse(x, 1, x.dtype, False, lse)
    with kernel_traffic() as sums_traffic:
        sums = _launch.backward_row_sums(y, dy, 1)
    with kernel_traffic() as backward_traffic:
        dx = _launch.backward_with_row_sums(y, dy, 1, y.dtype, "softmax", sums)
    assert all(p.config.online == online for p in plans())
    assert (stats_traffic.loaded, stats_traffic.stored) == (minimum_bytes(x), minimum_bytes(stats))
    assert (forward_traffic.loaded, forward_traffic.stored) == (minimum_bytes(x, lse), minimum_bytes(out))
    assert (sums_traffic.loaded, sums_traffic.stored) == (minimum_bytes(y, dy), minimum_bytes(sums))
    assert (backward_traffic.loaded, backward_traffic.stored) == (minimum_bytes(y, dy, sums), minimum_bytes(dx))
    assert_did_the_work("forward", "softmax", out, x, y, dy, 1)
    assert_did_the_work("backward", "softmax", dx, x, y, dy, 1)


SOFTCAP_SINKS_CASES = {
    "softcap": (dict(softcap=2.0), False),
    "sinks": (dict(sinks=True), False),
    "softcap and sinks, additive [Lq,Lk]": (dict(softcap=2.0, sinks=True), True),
}


@pytest.mark.parametrize("case", list(SOFTCAP_SINKS_CASES))
@pytest.mark.parametrize("n", [1000, 20000], ids=["on_chip", "online"])
def test_softcap_and_sinks_add_a_value_per_row(plans, case, n):
    """Forward: the scores (and the mask) read once per sweep, y written once, and per row one
    log-sum-exp written and one sink read (a logit per head, not per element). Backward: y and
    dy read once per sweep, dx written once, and per row the log-sum-exp and a sink read and the
    sink's share of its gradient written; under softcapping an additive mask is read again at its
    broadcast size, once, by the sweep that writes dx (the capped scores are log(y) + lse - mask)."""
    options, additive = SOFTCAP_SINKS_CASES[case]
    b, h, q = 2, 2, 3
    rows = b * h * q
    scores = random((b, h, q, n), torch.float32).requires_grad_()
    dy = random((b, h, q, n), torch.float32, seed=1)
    mask = random((q, n), torch.float32, seed=2) if additive else None
    options = dict(options)
    if options.pop("sinks", False):
        options["sinks"] = random((h,), torch.float32, seed=3).requires_grad_()
    wrt = (scores, options["sinks"]) if "sinks" in options else (scores,)
    with fused_softmax.use_backend("triton"):
        with kernel_traffic() as forward:
            y = fused_softmax.masked_softmax(scores, mask, scale=0.5, **options)
        with kernel_traffic() as backward:
            (dx, *_) = torch.autograd.grad(y, wrt, dy)
    forward_plan, backward_plan = plans()
    assert forward_plan.config.online == (n > 1000) and backward_plan.config.online == (n > 1000)
    sweeps = 2 if n > 1000 else 1
    per_row = 4 * rows  # one fp32 value a row: a log-sum-exp, a sink, a share of a sink's gradient
    sinks = "sinks" in options
    mask_bytes = 4 * rows * n if additive else 0
    assert forward.stored == minimum_bytes(y) + per_row
    assert forward.loaded == sweeps * (minimum_bytes(scores) + mask_bytes) + sinks * per_row
    assert backward.stored == minimum_bytes(dx) + sinks * per_row
    assert backward.loaded == sweeps * minimum_bytes(y, dy) + mask_bytes + per_row + sinks * per_row
    expected = reference.masked_softmax(scores, mask, 0.5, None, **options)
    assert_close(y, expected)
    assert_close(dx, reference.masked_softmax_backward(scores, expected, dy, 0.5, **options)[0])


@pytest.mark.parametrize("n", [1000, 20000], ids=["on_chip", "online"])
def test_bias_beside_a_bool_mask_is_read_at_its_broadcast_size(plans, n):
    """T5's case: a bias [1, H, Lq, Lk] beside a padding mask [B, 1, 1, Lk]. Forward: the scores,
    the mask and the bias read once per sweep each, at their broadcast sizes (a row reads its
    own Lk of each), y written once. Backward: softmax's, y and dy read once per sweep, dx
    written once; the bias's gradient is the scores' before the scale, summed over the batch in
    torch."""
    b, h, q = 2, 2, 3
    rows = b * h * q
    scores = random((b, h, q, n), torch.float32).requires_grad_()
    dy = random((b, h, q, n), torch.float32, seed=1)
    padding = torch.rand(b, 1, 1, n, generator=torch.Generator().manual_seed(2)) > 0.2
    bias = random((1, h, q, n), torch.float32, seed=3).requires_grad_()
    with fused_softmax.use_backend("triton"):
        with kernel_traffic() as forward:
            y = fused_softmax.masked_softmax(scores, padding, scale=0.5, bias=bias)
        with kernel_traffic() as backward:
            dx, d_bias = torch.autograd.grad(y, (scores, bias), dy)
    forward_plan, backward_plan = plans()
    sweeps = 2 if forward_plan.config.online else 1
    assert forward_plan.config.online == backward_plan.config.online == (n > 1000)
    assert forward.stored == minimum_bytes(y)
    assert forward.loaded == sweeps * rows * n * (4 + 1 + 4)
    assert backward.stored == minimum_bytes(dx)
    assert backward.loaded == sweeps * minimum_bytes(y, dy)
    expected = reference.masked_softmax(scores, padding, 0.5, None, bias=bias)
    assert_close(y, expected)
    assert_close(d_bias, torch.as_tensor(reference.softmax_backward(expected, dy)).sum_to_size(bias.shape))
