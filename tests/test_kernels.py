"""The Triton kernels against the float64 reference, in every regime, dtype and edge value,
for softmax and log_softmax."""

import math

import pytest
import torch
from support import (
    CASES,
    DTYPES,
    ONE_PROGRAM,
    assert_close,
    assert_no_less_accurate_than_torch,
    case_id,
    random,
    regime,
)

import fused_softmax
from fused_softmax import _launch
from fused_softmax._jacobian import backward_product
from fused_softmax.testing import limit_block, planned_for, reference, split_threshold


def test_cases_reach_every_regime():
    for dtype in DTYPES:
        for backward in (False, True):
            reached = {regime(shape, dtype, backward=backward, max_block=block) for shape, block in CASES}
            assert reached == {"multi_row", "single_pass", "online"}, (dtype, backward, reached)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward(kernels, device, op, dtype, case):
    shape, max_block = case
    x = random(shape, dtype, device)
    with limit_block(max_block):
        y = op.fused(x, dim=-1)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, op.reference(x))
    assert_no_less_accurate_than_torch(y, op.reference(x), op.torch(x, dim=-1))


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward(kernels, device, op, dtype, case):
    shape, max_block = case
    x = random(shape, dtype, device).requires_grad_()
    dy = random(shape, dtype, device, scale=1.0, seed=1)
    with limit_block(max_block):
        (dx,) = torch.autograd.grad(op.fused(x, dim=-1), x, dy)
    (torch_dx,) = torch.autograd.grad(op.torch(x, dim=-1), x, dy)
    assert dx.dtype == dtype
    expected = op.reference_backward(op.reference(x), dy)
    assert_no_less_accurate_than_torch(dx, expected, torch_dx)
    if dtype in (torch.float32, torch.float64):
        assert_close(dx, expected)


@pytest.mark.parametrize("max_block", [None, 16], ids=["on_chip", "online"])
@pytest.mark.parametrize("dim", [0, 1])
def test_persistent_programs_cover_every_tile(kernels, device, op, max_block, dim):
    x = random((41, 24), torch.float32, device).requires_grad_()
    dy = random((41, 24), torch.float32, device, seed=1)
    with planned_for(ONE_PROGRAM), limit_block(max_block):
        y = op.fused(x, dim=dim)
        (dx,) = torch.autograd.grad(y, x, dy)
    assert_close(y, op.reference(x, axis=dim))
    assert_close(dx, op.reference_backward(op.reference(x, axis=dim), dy, axis=dim))


@pytest.mark.parametrize("max_block", [None, 8], ids=["on_chip", "online"])
def test_special_values(kernels, device, op, max_block):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor(
        [
            [-inf] * 12,  # all -inf: NaN, as torch
            [-inf] * 8 + [1.0, 2.0, -inf, 0.5],  # first tile all -inf, then finite: no NaN
            [0.5, -inf, 2.0, -inf] * 3,  # partial -inf: exact zeros there
            [1.0, inf] + [0.0] * 10,  # +inf: NaN row
            [1.0, nan] + [0.0] * 10,  # NaN: NaN row
            [1e4, 1e4 - 1, 0.0, -1e4] * 3,
            [torch.finfo(torch.float32).max] * 6 + [-torch.finfo(torch.float32).max] * 6,
            [-inf] * 9 + [nan, -inf, -inf],  # a NaN among -inf, which the GPU's max passes over: NaN row
        ],
        device=device,
    )
    with limit_block(max_block):
        y = op.fused(x, dim=-1)
    torch.testing.assert_close(y, op.torch(x, dim=-1), equal_nan=True)
    assert torch.isnan(y[[0, 3, 4, 7]]).all()
    assert not torch.isnan(y[[1, 2, 5, 6]]).any()
    masked = 0.0 if op.name == "softmax" else -float("inf")
    assert (y[2, 1::2] == masked).all() and (y[1, :8] == masked).all()


@pytest.mark.parametrize("max_block", [None, 8], ids=["on_chip", "online"])
def test_gradient_of_masked_rows(kernels, device, op, max_block):
    inf = float("inf")
    x = torch.tensor([[-inf] * 12, [0.5, -inf, 2.0, -inf] * 3], device=device, requires_grad=True)
    dy = random((2, 12), torch.float32, device)
    with limit_block(max_block):
        (dx,) = torch.autograd.grad(op.fused(x, dim=-1), x, dy)
    (expected,) = torch.autograd.grad(op.torch(x, dim=-1), x, dy)
    torch.testing.assert_close(dx, expected, equal_nan=True)
    assert torch.isnan(dx[0]).all()
    assert (dx[1, 1::2] == (0 if op.name == "softmax" else dy[1, 1::2])).all()


@pytest.mark.parametrize("max_block", [None, 4], ids=["on_chip", "online"])
@pytest.mark.parametrize("dim", [0, 1])
def test_gradcheck_through_kernels(kernels, device, op, max_block, dim):
    """fp64 first and second derivatives, computed by the kernels themselves: two rows of 5, so
    that a forced block of 4 puts each in two blocks (online)."""
    x = random((2, 5) if dim == 1 else (5, 2), torch.float64, device).requires_grad_()
    for backward in (False, True):
        online = regime(x.shape, x.dtype, backward=backward, max_block=max_block, dim=dim) == "online"
        assert online == (max_block is not None)
    with limit_block(max_block):
        assert torch.autograd.gradcheck(lambda t: op.fused(t, dim=dim), (x,))
        assert torch.autograd.gradgradcheck(lambda t: op.fused(t, dim=dim), (x,))


@pytest.mark.parametrize("threshold", [None, math.inf], ids=["split", "online"])
def test_long_row(kernels, device, op, threshold):
    """No cap on row length: a row of 2^20 + 3 elements is split across programs (the regime of
    few long rows), or, kept whole, streams through one program's online regime."""
    n = 2**20 + 3
    with split_threshold(threshold):
        assert regime((1, n), torch.float32) == ("online" if threshold else "split")
        x = random((1, n), torch.float32, device, scale=5.0).requires_grad_()
        dy = random((1, n), torch.float32, device, seed=1)
        y = op.fused(x, dim=-1)
        (dx,) = torch.autograd.grad(y, x, dy)
    assert_close(y, op.reference(x))
    assert_close(dx, op.reference_backward(op.reference(x), dy))


def test_more_rows_than_grid_limit(kernels, device):
    """65,536+ rows: CUDA's y/z grid limit is 65,535; the persistent grid stays far below any limit."""
    x = random((65_537, 2), torch.float32, device)
    assert_close(fused_softmax.softmax(x, dim=-1), reference.softmax(x))


def test_row_offsets_are_64_bit(kernels, device):
    """Row 2 at a stride of 2^30 elements starts at 2^31: int32 row * stride would wrap."""
    n_cols, stride = 4, 2**30
    storage = torch.empty(2 * stride + n_cols, dtype=torch.float16, device=device)
    x = storage.as_strided((3, n_cols), (stride, 1))
    x.copy_(random((3, n_cols), torch.float16, device))
    y = _launch.softmax_forward(x, 1, torch.float16)
    assert_close(y, reference.softmax(x))


def test_deterministic_and_batch_independent(kernels, device):
    x = random((33, 700), torch.float32, device)
    first, again = fused_softmax.softmax(x, dim=-1), fused_softmax.softmax(x, dim=-1)
    assert torch.equal(first, again)
    assert torch.equal(fused_softmax.softmax(x[17:18], dim=-1), first[17:18])


@pytest.mark.parametrize("max_block", [None, 4], ids=["on_chip", "online"])
def test_row_statistics_and_normalising_with_them(kernels, device, op, max_block):
    """The sharded-softmax modes: each row's (max, sum of exp(x - max)), (-inf, 0) for a row of -inf
    (the identity when shards combine); y from a given log-sum-exp; dx from given row sums."""
    x = random((4, 10), torch.float32, device)
    x[1] = float("-inf")
    x[2, :6] = float("-inf")
    log = op.name == "log_softmax"
    y = torch.as_tensor(op.reference(x)).float().to(device)
    dy = random((4, 10), torch.float32, device, seed=1)
    with limit_block(max_block):
        stats = _launch.row_statistics(x, 1)
        lse = torch.stack([stats[:, 0], stats[:, 1].log()], 1)  # in two parts: (max, log Σ)
        out = _launch.normalise_with_lse(x, 1, x.dtype, log, lse)
        sums = _launch.backward_row_sums(y, dy, 1, backward_product(log))
        dx = _launch.backward_with_row_sums(y, dy, 1, y.dtype, backward_product(log), sums)
    row_max = x.amax(1)
    torch.testing.assert_close(stats[:, 0], row_max)
    expected_sum = (x - row_max.nan_to_num(neginf=0.0)[:, None]).exp().sum(1)
    assert_close(stats[:, 1], expected_sum)
    assert stats[1, 1] == 0
    assert_close(out, op.reference(x))
    assert_close(sums, (dy if log else dy * y).sum(1))
    assert_close(dx, op.reference_backward(y, dy))
