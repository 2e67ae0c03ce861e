"""cross_entropy's split-row regime: few rows of many classes, every (row tile, chunk) a work item
of the slice kernels (``vocab_slice_statistics_kernel``, then ``vocab_slice_grad_kernel``).

Each option, layout and dtype it serves against the float64 reference and against the
one-program kernel (``split_threshold(math.inf)``), first derivatives in fp64 by gradcheck, the
retained-graph and in-place backwards, torch.func; the forms it leaves to the one-program kernel;
the bytes each launch moves; and the plan a few long rows get on an H100 and an H200. Tiny
tensors split through ``split_threshold(0)``, a capped block and a GPU of 8 SMs so slow that the
bytes in flight ask nothing of the split: a few chunks of a few blocks each, the last ragged.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from support import DTYPES, TOLERANCES, assert_close, assert_no_less_accurate_than_torch, random

import fused_softmax
from fused_softmax import _launch
from fused_softmax.kernels import H100, H200, DeviceProperties
from fused_softmax.testing import (
    kernel_traffic,
    limit_block,
    minimum_bytes,
    planned_for,
    recorded_launches,
    reference,
    split_threshold,
)

SPLIT_KERNELS = ["vocab_slice_statistics_kernel", "vocab_slice_grad_kernel"]
EIGHT_SLOW_SMS = DeviceProperties(name="8 slow SMs", sm_count=8, memory_bandwidth=1e6)

# (shape, target shape): [N, C] (4 chunks of 3 blocks, the last of 1 class) and [N, C, d], its
# classes strided, its tiles of neighbouring rows (5 chunks of 7 classes, the last of 1).
LAYOUTS = {"[N, C]": ((3, 37), (3,)), "[N, C, d]": ((2, 29, 3), (2, 3))}

# (name, options): each reaches a different part of the kernels and of the host's combine.
OPTIONS = {
    "plain": {},
    "smoothing": dict(label_smoothing=0.1),
    "ignore-a-class": dict(ignore_index=2),
    "z_loss-softcap": dict(z_loss=1e-2, softcap=4.0),
    "all": dict(label_smoothing=0.2, z_loss=1e-3, softcap=5.0),
}


@pytest.fixture
def splitting():
    with split_threshold(0), limit_block(8), planned_for(EIGHT_SLOW_SMS):
        yield


# A mean's gradient factor and the reduction, launched around the loss's own (tested in test_cross_entropy).
REDUCTION_KERNELS = ("mean_grad_scale_kernel", "reduced_loss_kernel")


def _loss_launches(launches):
    return [launch for launch in launches if launch.name not in REDUCTION_KERNELS]


def _names(launches):
    return [launch.name for launch in _loss_launches(launches)]


def targets(shape, classes, ignore_index=-100, seed=2):
    """Random classes, the first row ignored."""
    target = torch.randint(classes, shape, generator=torch.Generator().manual_seed(seed))
    target.view(-1)[0] = ignore_index
    return target


def upstream(reduction, shape, dtype):
    """Per row for 'none', a scalar other than 1 otherwise (so the backward scales)."""
    return random(shape if reduction == "none" else (), dtype, scale=1.0, seed=4)


def loss_and_grad(x, target, reduction, dy, **options):
    x = x.detach().requires_grad_()
    loss = fused_softmax.cross_entropy(x, target, reduction=reduction, **options)
    (dx,) = torch.autograd.grad(loss, x, dy)
    return loss, dx


def one_program(x, target, reduction, dy, **options):
    """The same call on the one-program kernel."""
    with split_threshold(math.inf), recorded_launches() as launches:
        result = loss_and_grad(x, target, reduction, dy, **options)
    assert _names(launches)[0] == "cross_entropy_kernel"
    return result


def assert_matches(x, target, reduction, dy, loss, dx, **options):
    """Against the float64 reference, and the one-program kernel within the dtype's tolerance."""
    assert loss.dtype == dx.dtype == x.dtype
    assert_close(loss, reference.cross_entropy(x, target, reduction=reduction, **options))
    rtol, atol = TOLERANCES[x.dtype]
    expected_dx = torch.as_tensor(reference.cross_entropy_backward(x, target, dy, reduction=reduction, **options))
    torch.testing.assert_close(dx.double(), expected_dx, rtol=rtol, atol=atol * 10)
    their_loss, their_dx = one_program(x, target, reduction, dy, **options)
    torch.testing.assert_close(loss, their_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(dx, their_dx, rtol=rtol, atol=atol)


CASES = [("[N, C]", name, "none") for name in OPTIONS] + [("[N, C, d]", name, "none") for name in ("plain", "all")]
CASES += [("[N, C]", "all", reduction) for reduction in ("mean", "sum")]


@pytest.mark.parametrize("layout, name, reduction", CASES, ids=["-".join(case) for case in CASES])
def test_every_option_matches_the_reference_and_the_one_program_kernel(
    kernels, launches, splitting, layout, name, reduction
):
    shape, target_shape = LAYOUTS[layout]
    options = OPTIONS[name]
    x = random(shape, torch.float64)
    target = targets(target_shape, shape[1], options.get("ignore_index", -100))
    dy = upstream(reduction, target_shape, torch.float64)
    loss, dx = loss_and_grad(x, target, reduction, dy, **options)
    assert _names(launches) == [*SPLIT_KERNELS, "scale_grad_kernel"]
    assert all(launch.plan.config.chunks > 2 for launch in _loss_launches(launches)[:2])
    assert_matches(x, target, reduction, dy, loss, dx, **options)
    if "z_loss" not in options:
        torch.testing.assert_close(loss, F.cross_entropy(x, target, reduction=reduction, **options))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(kernels, launches, splitting, dtype):
    """Narrow logits: math in fp32, the loss and the gradient rounded once."""
    shape, target_shape = LAYOUTS["[N, C]"]
    x = random(shape, dtype)
    target = targets(target_shape, shape[1])
    dy = upstream("mean", target_shape, dtype)
    loss, dx = loss_and_grad(x, target, "mean", dy, label_smoothing=0.1)
    assert _names(launches)[:2] == SPLIT_KERNELS
    assert_matches(x, target, "mean", dy, loss, dx, label_smoothing=0.1)


def test_gradcheck_through_the_split_kernels(kernels, launches, splitting):
    """fp64 first derivatives (and the forward-mode tangent) by the split kernels; second ones
    by torch ops on the saved logits."""
    x = random((2, 21), torch.float64).requires_grad_()
    target = targets((2,), 21, seed=3)

    def loss(t):
        return fused_softmax.cross_entropy(t, target, label_smoothing=0.1, z_loss=1e-2, softcap=4.0)

    assert torch.autograd.gradcheck(loss, (x,), check_forward_ad=True, fast_mode=True)
    assert torch.autograd.gradgradcheck(loss, (x,), fast_mode=True)
    assert set(_names(launches)) >= set(SPLIT_KERNELS)


def test_retained_graph_and_inplace_backwards(kernels, launches, splitting):
    """A second backward through a retained graph recomputes the gradient (both launches again);
    ``inplace_backward`` writes it over the logits."""
    x = random((3, 37), torch.float32).requires_grad_()
    target = targets((3,), 37)
    loss = fused_softmax.cross_entropy(x, target, reduction="none", label_smoothing=0.1)
    dys = [upstream("none", (3,), torch.float32), random((3,), torch.float32, scale=1.0, seed=7)]
    grads = [torch.autograd.grad(loss, x, dy, retain_graph=True)[0] for dy in dys]
    assert _names(launches) == [*SPLIT_KERNELS, "scale_grad_kernel", *SPLIT_KERNELS, "scale_grad_kernel"]
    for dy, dx in zip(dys, grads, strict=True):
        expected = reference.cross_entropy_backward(x.detach(), target, dy, reduction="none", label_smoothing=0.1)
        assert_close(dx, expected)
    buffer = x * 1.0  # a non-leaf holding the logits, as an LM head's output
    fused_softmax.cross_entropy(buffer, target, z_loss=1e-2, inplace_backward=True).backward()
    expected = reference.cross_entropy_backward(x.detach(), target, 1.0, z_loss=1e-2)
    assert_close(x.grad, expected)
    assert_close(buffer.detach(), expected)  # the logits' buffer holds the gradient


def test_vmap_and_per_sample_gradients(kernels, launches, splitting):
    """vmap puts the batch entries as more rows of the same launches, each entry keeping its mean."""
    x = random((2, 3, 37), torch.float32)
    target = torch.stack([targets((3,), 37, seed=s) for s in (5, 6)])

    def loss(logits, t):
        return fused_softmax.cross_entropy(logits, t, label_smoothing=0.1)

    losses = torch.func.vmap(loss)(x, target)
    grads = torch.func.vmap(torch.func.grad(loss))(x, target)
    assert _names(launches) == ["vocab_slice_statistics_kernel", *SPLIT_KERNELS]
    for entry in range(2):
        assert_close(losses[entry], reference.cross_entropy(x[entry], target[entry], label_smoothing=0.1))
        expected = reference.cross_entropy_backward(x[entry], target[entry], 1.0, label_smoothing=0.1)
        assert_close(grads[entry], expected)


def test_a_target_out_of_range_is_nan_and_never_read_out_of_bounds(kernels, splitting):
    """The kernels themselves, without the host's check: NaN loss and gradient for those rows."""
    x = random((3, 37), torch.float32)
    grad = torch.empty_like(x)
    with kernel_traffic() as traffic:
        losses = _launch.cross_entropy_forward(
            x,
            torch.tensor([40, 1, -3]),
            None,
            ignore_index=-100,
            smoothing=0.1,
            z_loss=0.0,
            softcap=None,
            grad=grad,
            grad_scale=torch.ones(1),
        )
    assert losses[[0, 2]].isnan().all() and grad[[0, 2]].isnan().all()
    assert torch.isfinite(losses[1]) and torch.isfinite(grad[1]).all()
    assert traffic.loaded < 3 * minimum_bytes(x)


def test_a_nan_in_a_chunk_of_minus_infinity_makes_its_row_nan(kernels, splitting):
    """A chunk of -inf adds nothing, but one holding a NaN among -inf (which the GPU's max passes
    over) makes its row's loss and gradient NaN, as torch's."""
    x = random((3, 37), torch.float32)
    x[:, 12:24] = float("-inf")
    x[1, 13] = float("nan")
    x[2, 36] = float("nan")  # alone in the last chunk
    target = torch.tensor([0, 1, 2])
    loss, dx = loss_and_grad(x, target, "none", torch.ones(3))
    torch.testing.assert_close(loss, F.cross_entropy(x, target, reduction="none"), equal_nan=True)
    assert not loss[0].isnan() and loss[1:].isnan().all() and dx[1:].isnan().all()


def test_large_logits_keep_the_smoothing_term_precise(kernels, splitting):
    """fp32 logits near 1e4 in every chunk (row 0): the smoothed loss is as accurate as torch's
    (summed raw, its error was 6e-5 on a loss of 3). Near 1e4 in one middle chunk (row 1) and in
    the last chunk, of one class (row 2): each chunk's Σ (x' - its max) moves to the row's max by
    its class count times the step."""
    x = random((3, 37), torch.float32)
    x[0] += 1e4
    x[1, 12:24] += 1e4
    x[2, 36] += 1e4
    target = torch.tensor([0, 13, 36])
    loss = fused_softmax.cross_entropy(x, target, reduction="none", label_smoothing=0.1)
    expected = reference.cross_entropy(x, target, reduction="none", label_smoothing=0.1)
    torch_loss = F.cross_entropy(x, target, reduction="none", label_smoothing=0.1)
    assert_no_less_accurate_than_torch(loss[:1], expected[:1], torch_loss[:1])
    assert_close(loss[1:], expected[1:])


@pytest.mark.parametrize("form", ["class weights", "probability targets"])
def test_forms_left_to_the_one_program_kernel(kernels, launches, splitting, form):
    """Class weights and probability targets take the one-program kernel, split or not."""
    x = random((3, 37), torch.float32)
    if form == "class weights":
        target, options = targets((3,), 37), dict(weight=random((37,), torch.float32, scale=0.1) + 1.0)
        kernel = "cross_entropy_kernel"
    else:
        target, options = random((3, 37), torch.float32, seed=5).softmax(1), {}
        kernel = "cross_entropy_probabilities_kernel"
    loss = fused_softmax.cross_entropy(x, target, **options)
    assert _names(launches) == [kernel]
    assert_close(loss, reference.cross_entropy(x, target, **options))


@pytest.mark.parametrize("store_grad", [True, False], ids=["grad", "loss_only"])
def test_bytes_moved(kernels, launches, splitting, store_grad):
    """The logits read twice and the gradient written once, as the one-program kernel's online
    regime does, now over every chunk; besides, each work item (row, chunk) reads its row's
    target (8 bytes), the statistics launch writes 4 values a chunk, and the gradient's reads
    each row's log-sum-exp in two parts and its scale (every row counted here)."""
    x = random((3, 37), torch.float32)
    target = torch.randint(37, (3,), generator=torch.Generator().manual_seed(2))
    grad = torch.empty_like(x) if store_grad else None
    with kernel_traffic() as traffic:
        losses = _launch.cross_entropy_forward(
            x,
            target,
            None,
            ignore_index=-100,
            smoothing=0.1,
            z_loss=0.0,
            softcap=None,
            grad=grad,
            grad_scale=torch.ones(1) if store_grad else None,
        )
    rows, value = x.shape[0], 4  # bytes of an fp32 statistic
    chunks = [launch.plan.config.chunks for launch in launches]
    assert _names(launches) == SPLIT_KERNELS[: 1 + store_grad] and min(chunks) > 2
    loaded, stored = minimum_bytes(x) + rows * chunks[0] * 8, rows * chunks[0] * 4 * value
    if store_grad:
        loaded += minimum_bytes(x) + rows * chunks[1] * (8 + 3 * value)
        stored += minimum_bytes(grad)
    assert (traffic.loaded, traffic.stored) == (loaded, stored)
    assert_close(losses, reference.cross_entropy(x, target, reduction="none", label_smoothing=0.1), torch.float32)


@pytest.mark.parametrize("device", [H100, H200], ids=lambda d: d.name)
def test_few_long_rows_fill_every_sm(kernels, device):
    """4 rows of a 128k vocabulary in bf16 (1 MiB, the heuristic's threshold): both launches are
    planned onto every SM with the bytes in flight Little's law needs; planned only (no run)."""
    heuristics = fused_softmax.kernels.heuristics
    x = torch.empty(4, 131072, dtype=torch.bfloat16).requires_grad_()
    target = torch.zeros(4, dtype=torch.int64)
    with planned_for(device), recorded_launches(run=False) as launches:
        fused_softmax.cross_entropy(x, target)
    assert _names(launches) == SPLIT_KERNELS
    for launch, backward in zip(_loss_launches(launches), (False, True), strict=True):
        (grid,) = launch.plan.grid
        in_flight = grid * heuristics.tile_load_bytes(launch.plan.config, x.element_size(), backward)
        assert launch.plan.config.chunks > 1 and grid >= device.sm_count, launch.plan.config
        assert in_flight >= min(device.bytes_in_flight_needed, minimum_bytes(x) * (1 + backward))


def test_many_rows_and_small_tensors_stay_on_the_one_program_kernel(kernels):
    many_rows = torch.empty(4096, 32768, dtype=torch.bfloat16)
    small = torch.empty(4, 32768, dtype=torch.bfloat16)  # 256 KiB: its time is the launch
    for x in (many_rows, small):
        with planned_for(H100), recorded_launches(run=False) as launches:
            fused_softmax.cross_entropy(x, torch.zeros(x.shape[0], dtype=torch.int64))
        assert _names(launches) == ["cross_entropy_kernel"]
