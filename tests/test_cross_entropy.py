"""fused_softmax.cross_entropy against the float64 reference and F.cross_entropy: every option,
both target kinds, the layouts, both regimes, torch's errors, and the traffic of the kernel.

The kernels run with poisoned outputs (conftest); ``backend`` runs a test on the eager path and
on the kernels and checks which one ran. Rows are few and the forced blocks tiny, so the
interpreter reaches the online regime (``ONLINE``: a block of 8 classes) in milliseconds.
"""

import functools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from support import DTYPES, ONE_PROGRAM, TOLERANCES, assert_close, assert_no_less_accurate_than_torch, random

import fused_softmax
from fused_softmax import _launch
from fused_softmax.cross_entropy import cross_entropy_op
from fused_softmax.testing import kernel_traffic, limit_block, planned_for, reference

REGIMES = {"on_chip": None, "online": 8}
REDUCTIONS = ["mean", "sum", "none"]


def index_targets(n, classes, device, ignored=(), ignore_index=-100, seed=2):
    """Random classes, ``ignore_index`` at the rows ``ignored``."""
    target = torch.randint(classes, (n,), generator=torch.Generator().manual_seed(seed)).to(device)
    target[list(ignored)] = ignore_index
    return target


def class_weights(classes, dtype, device):
    return (torch.rand(classes, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5).to(
        device, dtype
    )


def upstream(reduction, shape, dtype, device):
    """A random upstream gradient: per row for 'none', a scalar other than 1 otherwise."""
    return random(shape if reduction == "none" else (), dtype, device, scale=1.0, seed=4)


def loss_and_grad(function, x, target, reduction, dy, **options):
    x = x.detach().requires_grad_()
    loss = function(x, target, reduction=reduction, **options)
    (dx,) = torch.autograd.grad(loss, x, dy)
    return loss, dx


def assert_matches_reference(x, target, reduction, dy, loss, dx, **options):
    expected = reference.cross_entropy(x, target, reduction=reduction, **options)
    assert loss.dtype == x.dtype and loss.shape == torch.Size(expected.shape)
    assert_close(loss, expected)
    rtol, atol = TOLERANCES[x.dtype]
    expected_dx = torch.as_tensor(reference.cross_entropy_backward(x, target, dy, reduction=reduction, **options))
    torch.testing.assert_close(dx.double().cpu(), expected_dx, rtol=rtol, atol=atol * 10, equal_nan=True)


# (name, options): each reaches a different part of the kernel.
OPTIONS = [
    ("plain", {}),
    ("weight-ignore", dict(weight=True, ignore_index=-100)),
    ("smoothing", dict(label_smoothing=0.1)),
    ("weight-smoothing", dict(weight=True, label_smoothing=0.25)),
    ("ignore-a-class", dict(ignore_index=2)),
    ("z_loss-softcap", dict(z_loss=1e-2, softcap=4.0)),
    ("all", dict(weight=True, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)),
]


def resolved(options, classes, dtype, device):
    options = dict(options)
    if options.pop("weight", False):
        options["weight"] = class_weights(classes, dtype, device)
    return options


# The kernel sees a reduction only through its gradient's factor: every reduction on chip, and
# 'none' (per-row upstream gradients) online.
REGIME_REDUCTIONS = [("on_chip", r) for r in REDUCTIONS] + [("online", "none")]


@pytest.mark.parametrize("regime, reduction", REGIME_REDUCTIONS, ids=["-".join(c) for c in REGIME_REDUCTIONS])
@pytest.mark.parametrize("name, options", OPTIONS, ids=[name for name, _ in OPTIONS])
def test_index_targets_match_reference(backend, device, name, options, regime, reduction):
    n, classes = 6, 19
    x = random((n, classes), torch.float64, device)
    target = index_targets(n, classes, device, ignored=(1, 4), ignore_index=options.get("ignore_index", -100))
    options = resolved(options, classes, torch.float64, device)
    dy = upstream(reduction, (n,), torch.float64, device)
    with limit_block(REGIMES[regime]):
        loss, dx = loss_and_grad(fused_softmax.cross_entropy, x, target, reduction, dy, **options)
    assert_matches_reference(x, target, reduction, dy, loss, dx, **options)
    if "z_loss" not in options and "softcap" not in options:
        torch_loss, torch_dx = loss_and_grad(F.cross_entropy, x, target, reduction, dy, **options)
        torch.testing.assert_close(loss, torch_loss)
        torch.testing.assert_close(dx, torch_dx)


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(kernels, device, dtype, regime):
    """fp16/bf16 logits: math in fp32, the loss and gradient rounded once; fp32 and fp64 as is."""
    n, classes = 5, 37
    x = random((n, classes), dtype, device)
    target = index_targets(n, classes, device, ignored=(3,))
    options = dict(weight=class_weights(classes, dtype, device), label_smoothing=0.1)
    for reduction in ("mean", "none"):
        dy = upstream(reduction, (n,), dtype, device)
        with limit_block(REGIMES[regime]):
            loss, dx = loss_and_grad(fused_softmax.cross_entropy, x, target, reduction, dy, **options)
        assert loss.dtype == dx.dtype == dtype
        assert_close(loss, reference.cross_entropy(x, target, reduction=reduction, **options))
        expected = reference.cross_entropy_backward(x, target, dy, reduction=reduction, **options)
        assert_close(dx, expected)


def test_multi_row_tiles_and_persistent_programs(kernels, device):
    """Many short rows share a tile; a single program strides over every tile."""
    n, classes = 70, 5
    x = random((n, classes), torch.float32, device)
    target = index_targets(n, classes, device, ignored=(0, 69))
    dy = upstream("none", (n,), torch.float32, device)
    with planned_for(ONE_PROGRAM):
        loss, dx = loss_and_grad(fused_softmax.cross_entropy, x, target, "none", dy, label_smoothing=0.2)
    assert_matches_reference(x, target, "none", dy, loss, dx, label_smoothing=0.2)


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("layout", ["[C]", "[N, C, d1, d2]", "[N, C] transposed", "[N, C, d] channels last"])
def test_layouts_read_through_strides(kernels, device, plans, layout, regime):
    """The class dim is read where it lies: no copy of the logits reaches the kernel."""
    if layout == "[C]":
        x, target = random((11,), torch.float64, device), torch.tensor(4, device=device)
    elif layout == "[N, C, d1, d2]":
        x = random((2, 11, 3, 2), torch.float64, device)
        target = index_targets(12, 11, device, ignored=(5,)).view(2, 3, 2)
    elif layout == "[N, C] transposed":
        x = random((11, 6), torch.float64, device).t()
        target = index_targets(6, 11, device, ignored=(2,))
    else:
        x = random((3, 4, 11), torch.float64, device).transpose(1, 2)
        target = index_targets(12, 11, device, ignored=(7,)).view(3, 4)
    dy = upstream("none", target.shape, torch.float64, device)
    options = dict(weight=class_weights(11, torch.float64, device), label_smoothing=0.1)
    with limit_block(REGIMES[regime]):
        loss, dx = loss_and_grad(fused_softmax.cross_entropy, x, target, "none", dy, **options)
    assert_matches_reference(x, target, "none", dy, loss, dx, **options)
    p, _ = plans()  # the forward's, and the backward's scaling of the gradient
    assert p.tensors[0].data_ptr() == x.data_ptr() and p.config.online == (regime == "online")
    assert dx.shape == x.shape


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("options", [{}, dict(weight=True, label_smoothing=0.2, z_loss=1e-2, softcap=3.0)])
def test_probability_targets_match_reference(backend, device, options, regime, reduction):
    x = random((2, 13, 3), torch.float64, device)
    q = torch.rand(2, 13, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64).softmax(1).to(device)
    options = resolved(options, 13, torch.float64, device)
    dy = upstream(reduction, (2, 3), torch.float64, device)
    with limit_block(REGIMES[regime]):
        loss, dx = loss_and_grad(fused_softmax.cross_entropy, x, q, reduction, dy, **options)
    assert_matches_reference(x, q, reduction, dy, loss, dx, **options)


@pytest.mark.parametrize("regime", REGIMES)
def test_gradcheck_through_kernels(kernels, device, regime):
    """fp64 first derivatives by the kernel (second ones by torch ops on the saved logits), index
    and probability targets, the latter differentiable too. Fast mode: the Jacobians projected on
    random vectors, which any wrong entry still changes."""
    x = random((3, 7), torch.float64, device).requires_grad_()
    target = torch.tensor([1, -100, 6], device=device)
    q = torch.rand(3, 7, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(device)
    q.requires_grad_()
    weight = class_weights(7, torch.float64, device)
    with limit_block(REGIMES[regime]):
        for reduction in ("mean", "none"):  # a sum differs from the mean by its factor alone
            options = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2, softcap=3.0)

            def index_loss(t, options=options):
                return fused_softmax.cross_entropy(t, target, weight, **options)

            def probability_loss(t, targets, options=options):
                return fused_softmax.cross_entropy(t, targets, weight, **options)

            assert torch.autograd.gradcheck(index_loss, (x,), fast_mode=True)
            assert torch.autograd.gradcheck(probability_loss, (x, q), fast_mode=True)
            if reduction == "none":  # random upstream gradients per row
                assert torch.autograd.gradgradcheck(index_loss, (x,), fast_mode=True)
                assert torch.autograd.gradgradcheck(probability_loss, (x, q), fast_mode=True)


def test_byte_targets_and_a_single_row_of_probabilities(backend, device):
    """uint8 class indices, which torch accepts too; a [C] input with [C] probabilities."""
    x = random((5, 7), torch.float64, device)
    target = index_targets(5, 7, device)
    loss, dx = loss_and_grad(fused_softmax.cross_entropy, x, target.to(torch.uint8), "sum", torch.tensor(0.5))
    assert_matches_reference(x, target, "sum", torch.tensor(0.5), loss, dx)
    q = torch.rand(7, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(device)
    loss, dx = loss_and_grad(fused_softmax.cross_entropy, x[0], q, "mean", torch.tensor(2.0), label_smoothing=0.1)
    assert_matches_reference(x[0], q, "mean", torch.tensor(2.0), loss, dx, label_smoothing=0.1)


def test_special_values(backend, device):
    """Rows with some -inf logits are finite; a row of -inf is NaN, and one of a NaN among -inf
    (which the GPU's max passes over); all targets ignored: a NaN mean with zero gradients; an
    empty batch: NaN mean, 0 sum; as torch."""
    inf, nan = float("inf"), float("nan")
    rows = [[0.5, -inf, 2.0, -inf], [-inf, -inf, -inf, -inf], [1e4, 1e4 - 1, 0.0, -1e4], [-inf, nan, -inf, -inf]]
    x = torch.tensor(rows, device=device)
    target = torch.tensor([0, 1, 1, 0], device=device)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(
            fused_softmax.cross_entropy(x, target, reduction=reduction),
            F.cross_entropy(x, target, reduction=reduction),
            equal_nan=True,
        )
    ignored = torch.full((3,), -100, device=device)
    loss, dx = loss_and_grad(fused_softmax.cross_entropy, x[[0, 2]], ignored[:2], "mean", torch.tensor(1.0))
    assert loss.isnan() and torch.equal(dx, torch.zeros_like(dx))
    empty = torch.empty(0, 4, device=device)
    none = torch.empty(0, dtype=torch.long, device=device)
    assert fused_softmax.cross_entropy(empty, none).isnan()
    assert fused_softmax.cross_entropy(empty, none, reduction="sum") == 0


@pytest.mark.parametrize("regime", REGIMES)
def test_large_logits_keep_the_smoothing_terms_precise(backend, device, regime):
    """fp32 logits near 1e4, and a row of fp32's largest: the smoothing and probability-target
    terms are as accurate as torch's. Summed raw, U·lse - Σ u·x' cancels to the logits' rounding
    (errors of 1e-4 to 1e-3 at 1e4) and overflows to NaN or 2e31 at the largest."""
    n, classes = 4, 19
    x = random((n, classes), torch.float32, device)
    x[:2] += 1e4
    x[2] = torch.finfo(torch.float32).max
    weight = class_weights(classes, torch.float32, device)
    q = torch.rand(n, classes, generator=torch.Generator().manual_seed(5)).softmax(1).to(device)
    rows = [0, 1, 3]  # the float64 reference rounds the largest logits' lse - x to 0: torch's is the truth there
    cases = [(index_targets(n, classes, device), dict(label_smoothing=0.1)), (q, {})]
    cases += [(target, dict(weight=weight, label_smoothing=0.2)) for target, _ in cases]
    with limit_block(REGIMES[regime]):
        for target, options in cases:
            loss = fused_softmax.cross_entropy(x, target, reduction="none", **options)
            torch_loss = F.cross_entropy(x, target, reduction="none", **options)
            expected = reference.cross_entropy(x, target, reduction="none", **options)
            assert_no_less_accurate_than_torch(loss[rows], expected[rows], torch_loss[rows])
            torch.testing.assert_close(loss[2], torch_loss[2])


@pytest.mark.parametrize("regime", REGIMES)
def test_a_cap_far_above_the_logits_keeps_them(backend, device, regime):
    """softcap 1e3 and 1e6 over logits of a few units: the capped logits stay within ulps of
    torch's (``tiles.tanh``'s small-argument series), where 1 - exp(-2|u|) alone left them
    softcap · 2^-24 off: 5e-3 in the loss at 1e6."""
    x = random((3, 9), torch.float32, device)
    target = index_targets(3, 9, device)
    dy = upstream("none", (3,), torch.float32, device)
    with limit_block(REGIMES[regime]):
        for softcap in (1e3, 1e6):
            loss, dx = loss_and_grad(fused_softmax.cross_entropy, x, target, "none", dy, softcap=softcap)
            assert_matches_reference(x, target, "none", dy, loss, dx, softcap=softcap)


@pytest.mark.parametrize("label_smoothing", [-0.1, float("nan")], ids=["negative", "NaN"])
def test_a_smoothing_torch_takes_as_none(backend, device, label_smoothing):
    """torch smooths only above 0: a negative or NaN label_smoothing gives the plain loss and
    gradient, for class-index and probability targets alike."""
    x = random((4, 6), torch.float64, device)
    for target in (index_targets(4, 6, device), random((4, 6), torch.float64, device, seed=3).softmax(1)):
        loss, dx = loss_and_grad(
            fused_softmax.cross_entropy, x, target, "mean", torch.tensor(1.0), label_smoothing=label_smoothing
        )
        want, want_dx = loss_and_grad(
            F.cross_entropy, x, target, "mean", torch.tensor(1.0), label_smoothing=label_smoothing
        )
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(dx, want_dx)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignored_rows_have_zero_gradient_whatever_the_upstream(backend, device, reduction):
    """A NaN or inf upstream gradient: NaN or inf gradients on counted rows, and 0 on ignored ones, as
    torch's nll backward leaves them; through the in-place scaling and through torch ops (vmap)."""
    x = random((4, 6), torch.float64, device)
    target = index_targets(4, 6, device)
    target[1] = -100
    for bad in (float("nan"), float("inf")):
        upstream = torch.full((4,) if reduction == "none" else (), bad, dtype=torch.float64, device=device)
        loss, dx = loss_and_grad(fused_softmax.cross_entropy, x, target, reduction, upstream)
        want_loss, want_dx = loss_and_grad(F.cross_entropy, x, target, reduction, upstream)
        if math.isnan(bad):  # an inf one makes torch's target column NaN (-inf + inf), ours -inf
            torch.testing.assert_close(dx, want_dx, equal_nan=True)
        assert (dx[1] == 0).all() and not dx[[0, 2, 3]].isfinite().any()
    leaf = x.detach().requires_grad_()
    loss = fused_softmax.cross_entropy(leaf, target, reduction=reduction)
    upstreams = torch.stack([torch.full_like(loss, float("nan")), torch.ones_like(loss)])
    (dx,) = torch.autograd.grad(loss, leaf, upstreams, is_grads_batched=True)
    assert (dx[:, 1] == 0).all() and dx[0, [0, 2, 3]].isnan().all() and not dx[1].isnan().any()


def test_class_weights_that_require_a_gradient_are_torchs(device):
    """Probability targets get torch's weight gradient, class indices torch's error; the
    'triton' backend, which never falls back, refuses them."""
    x = random((4, 6), torch.float64, device)
    weight = (random((6,), torch.float64, device, seed=5).abs() + 0.5).requires_grad_()
    probabilities = random((4, 6), torch.float64, device, seed=3).softmax(1)
    (got,) = torch.autograd.grad(fused_softmax.cross_entropy(x, probabilities, weight), weight)
    (want,) = torch.autograd.grad(F.cross_entropy(x, probabilities, weight), weight)
    torch.testing.assert_close(got, want)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        fused_softmax.cross_entropy(x, index_targets(4, 6, device), weight)
    with fused_softmax.use_backend("triton"), pytest.raises(NotImplementedError, match="require a gradient"):
        fused_softmax.cross_entropy(x, probabilities, weight)


def test_legacy_size_average_and_reduce(backend, device):
    x = random((4, 6), torch.float32, device)
    target = index_targets(4, 6, device)
    for size_average, reduce in ((False, None), (None, False), (True, True)):
        with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
            loss = fused_softmax.cross_entropy(x, target, size_average=size_average, reduce=reduce)
        with pytest.warns(UserWarning):
            expected = F.cross_entropy(x, target, size_average=size_average, reduce=reduce)
        torch.testing.assert_close(loss, expected)


def torch_error(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 - any of torch's errors is the expectation
        return e
    raise AssertionError("torch accepted the call")


BAD_CALLS = {
    "target out of range": lambda x: (x, torch.tensor([0, 1, 6, 2])),
    "negative target": lambda x: (x, torch.tensor([0, -3, 1, 2])),
    "target batch size": lambda x: (x, torch.tensor([0, 1, 2])),
    "2-D target": lambda x: (x, torch.zeros(4, 2, dtype=torch.long)),
    "int32 target": lambda x: (x, torch.zeros(4, dtype=torch.int32)),
    "nd target size": lambda x: (torch.randn(2, 6, 3), torch.zeros(2, 4, dtype=torch.long)),
    "weight size": lambda x: (x, torch.zeros(4, dtype=torch.long), dict(weight=torch.ones(5))),
    "weight dtype": lambda x: (x, torch.zeros(4, dtype=torch.long), dict(weight=torch.ones(6, dtype=torch.float64))),
    "probability shape": lambda x: (x, torch.rand(4, 5)),
    "probability ignore_index": lambda x: (x, torch.rand(4, 6), dict(ignore_index=1)),
    "integer logits": lambda x: (x.long(), torch.zeros(4, dtype=torch.long)),
    "reduction": lambda x: (x, torch.zeros(4, dtype=torch.long), dict(reduction="avg")),
    "label_smoothing": lambda x: (x, torch.zeros(4, dtype=torch.long), dict(label_smoothing=1.5)),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_bad_input_raises_torchs_error(launches, name, case):
    """The same error type and message as torch, raised on the host: no kernel launches."""
    x, target, *options = BAD_CALLS[case](torch.randn(4, 6))
    options = options[0] if options else {}
    expected = torch_error(lambda: F.cross_entropy(x, target, **options))
    with fused_softmax.use_backend(name), pytest.raises(type(expected), match=re.escape(str(expected))):
        fused_softmax.cross_entropy(x, target, **options)
    assert not launches


def test_softcap_must_be_positive():
    with pytest.raises(ValueError, match="softcap"):
        fused_softmax.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), softcap=0.0)


def test_unserved_forms_raise_on_triton_and_run_torch_on_auto(device):
    """Probability targets of another dtype than the logits: torch promotes them, the kernels do not."""
    x, q = random((3, 4), torch.float32, device), torch.rand(3, 4, dtype=torch.float64, device=device)
    with fused_softmax.use_backend("triton"), pytest.raises(NotImplementedError, match="probability targets"):
        fused_softmax.cross_entropy(x, q)
    torch.testing.assert_close(fused_softmax.cross_entropy(x, q), F.cross_entropy(x, q))


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_strided_targets_and_weights_are_read_as_torch_reads_them(kernels, device, reduction, regime):
    """Class indices and class weights that are slices of larger tensors (a stride of 2): the
    kernels read them by index, from contiguous copies, never through the caller's storage as if
    it were contiguous (which gave wrong losses)."""
    x = random((5, 11), torch.float64, device)
    target = index_targets(10, 11, device, ignored=(2,))[::2]
    weight = class_weights(22, torch.float64, device)[::2]
    dy = upstream(reduction, (5,), torch.float64, device)
    with limit_block(REGIMES[regime]):
        loss, dx = loss_and_grad(
            fused_softmax.cross_entropy, x, target, reduction, dy, weight=weight, label_smoothing=0.1
        )
    assert_matches_reference(x, target, reduction, dy, loss, dx, weight=weight, label_smoothing=0.1)


def test_the_callers_logits_are_not_written(kernels, device):
    x = random((4, 9), torch.float32, device).requires_grad_()
    before = x.detach().clone()
    loss = fused_softmax.cross_entropy(x, index_targets(4, 9, device), label_smoothing=0.1)
    loss.backward()
    assert torch.equal(x.detach(), before)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward_writes_the_gradient_over_the_logits(kernels, device, reduction):
    logits = random((5, 9), torch.float32, device)
    target = index_targets(5, 9, device, ignored=(2,))
    dy = upstream(reduction, (5,), torch.float32, device)
    expected = reference.cross_entropy_backward(logits, target, dy, reduction=reduction, z_loss=1e-2)
    x = logits.clone().requires_grad_()
    buffer = x * 1.0  # a non-leaf holding the logits, as an LM head's output
    loss = fused_softmax.cross_entropy(buffer, target, reduction=reduction, z_loss=1e-2, inplace_backward=True)
    assert_close(loss, reference.cross_entropy(logits, target, reduction=reduction, z_loss=1e-2))
    loss.backward(dy)
    assert_close(x.grad, expected)
    assert_close(buffer.detach(), expected)  # the logits' buffer holds the gradient
    with pytest.raises(RuntimeError, match="no double backward"):
        loss = fused_softmax.cross_entropy(x * 1.0, target, inplace_backward=True)
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_retained_graph_backwards_get_their_own_upstream_gradients(kernels, device, reduction):
    """The first backward scales the forward's gradient in place; later ones through the retained
    graph recompute it from the logits first. Through .backward() the first result becomes
    x.grad itself (autograd steals the buffer), which the second then accumulates into."""
    x = random((5, 9), torch.float64, device).requires_grad_()
    target = index_targets(5, 9, device, ignored=(2,))
    options = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2)
    loss = fused_softmax.cross_entropy(x, target, **options)
    upstreams = [random(loss.shape, torch.float64, device, scale=1.0, seed=seed) for seed in (4, 5, 6)]
    for dy in upstreams:
        (dx,) = torch.autograd.grad(loss, x, dy, retain_graph=True)
        assert_close(dx, reference.cross_entropy_backward(x, target, dy, **options))
    loss = fused_softmax.cross_entropy(x, target, **options)
    loss.backward(upstreams[0], retain_graph=True)
    loss.backward(upstreams[1])
    expected = sum(reference.cross_entropy_backward(x, target, dy, **options) for dy in upstreams[:2])
    assert_close(x.grad, expected)


def test_inplace_backward_refuses_a_second_backward(kernels, device):
    x = random((3, 6), torch.float32, device).requires_grad_()
    loss = fused_softmax.cross_entropy(x * 1.0, index_targets(3, 6, device), inplace_backward=True)
    torch.autograd.grad(loss, x, torch.tensor(2.0), retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        torch.autograd.grad(loss, x, torch.tensor(3.0))


def scaling_traffic(loss, x, upstream, launches):
    """(traffic, the scaling launch) of the backward of ``loss`` for ``upstream``."""
    forward = len(launches)
    with kernel_traffic() as traffic:
        (dx,) = torch.autograd.grad(loss, x, upstream)
    (launch,) = launches[forward:]
    assert launch.name == "scale_grad_kernel"
    return traffic, launch, dx


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_after_a_mean_or_sum_moves_nothing(kernels, device, launches, reduction):
    """loss.backward(): each program reads the factor, 1, and neither reads nor writes the
    gradient the forward wrote; the host reads nothing back."""
    x = random((6, 40), torch.float32, device).requires_grad_()
    target = index_targets(6, 40, device, ignored=(1,))
    loss = fused_softmax.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1)
    traffic, launch, dx = scaling_traffic(loss, x, torch.ones((), device=device), launches)
    assert (traffic.loaded, traffic.stored) == (launch.plan.grid[0] * 4, 0)
    assert_close(dx, reference.cross_entropy_backward(x, target, 1.0, reduction=reduction, label_smoothing=0.1))


def test_backward_scales_only_the_rows_whose_factor_is_not_one(kernels, device, launches):
    """reduction='none': one factor read per row; the rows whose factor is 1 are not touched, the
    others' targets read, and those not ignored read and written once. A 1 broadcast
    (``loss.sum().backward()``) touches no row."""
    rows, classes = 6, 40
    x = random((rows, classes), torch.float32, device).requires_grad_()
    target = index_targets(rows, classes, device, ignored=(1,))
    dy = random((rows,), torch.float32, device, scale=1.0, seed=4)
    dy[[0, 3]] = 1.0
    loss = fused_softmax.cross_entropy(x, target, reduction="none")
    traffic, _, dx = scaling_traffic(loss, x, dy, launches)
    row_bytes, scaled = classes * 4, rows - 3  # factors of 1 on rows 0 and 3, row 1 ignored
    assert (traffic.loaded, traffic.stored) == (rows * 4 + (rows - 2) * 8 + scaled * row_bytes, scaled * row_bytes)
    assert_close(dx, reference.cross_entropy_backward(x, target, dy, reduction="none"))
    loss = fused_softmax.cross_entropy(x, target, reduction="none")
    traffic, _, dx = scaling_traffic(loss, x, torch.ones(()).expand(rows), launches)
    assert (traffic.loaded, traffic.stored) == (rows * 4, 0)
    assert_close(dx, reference.cross_entropy_backward(x, target, torch.ones(rows), reduction="none"))


def test_out_of_range_target_never_reads_out_of_bounds(kernels, device):
    """The kernel itself, without the host's check: a NaN loss and gradient for those rows alone,
    and no lane loads the weight of a class that does not exist (the interpreter would read
    such an address silently: the traffic counter sees every active lane)."""
    x = random((3, 5), torch.float32, device)
    grad = torch.empty_like(x)
    weight = class_weights(5, torch.float32, device)
    with kernel_traffic() as traffic:
        losses = _launch.cross_entropy_forward(
            x,
            torch.tensor([7, 1, -3]),
            weight,
            ignore_index=-100,
            smoothing=0.0,
            z_loss=0.0,
            softcap=None,
            grad=grad,
            grad_scale=torch.ones(1),
        )
    assert losses[[0, 2]].isnan().all() and grad[[0, 2]].isnan().all()
    assert torch.isfinite(losses[1]) and torch.isfinite(grad[1]).all()
    logits, targets, scale = x.numel() * 4, 3 * 8, 3 * 4
    assert traffic.loaded == logits + targets + 1 * 4 + scale  # one target weight: row 1's


def test_cross_entropy_loss_module(backend, device):
    weight = class_weights(6, torch.float32, device)
    ours = fused_softmax.CrossEntropyLoss(weight=weight, ignore_index=1, label_smoothing=0.1, reduction="sum")
    theirs = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=1, label_smoothing=0.1, reduction="sum")
    assert isinstance(ours, torch.nn.CrossEntropyLoss) and repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x, target = random((5, 6), torch.float32, device), index_targets(5, 6, device)
    torch.testing.assert_close(ours(x, target), theirs(x, target))
    capped = fused_softmax.CrossEntropyLoss(z_loss=1e-2, softcap=2.0)
    expected = reference.cross_entropy(x, target, z_loss=1e-2, softcap=2.0)
    assert_close(capped(x, target), expected)


def test_patch_routes_cross_entropy(backend, device):
    x, target = random((4, 6), torch.float32, device), index_targets(4, 6, device)
    expected = F.cross_entropy(x, target, label_smoothing=0.1)
    with fused_softmax.patch():
        assert F.cross_entropy is fused_softmax.cross_entropy
        routed = F.cross_entropy(x, target, label_smoothing=0.1)
        module = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(x, target)
    assert F.cross_entropy is not fused_softmax.cross_entropy
    torch.testing.assert_close(routed, expected)
    torch.testing.assert_close(module, expected)


# ---- torch.compile


def compiled_model(x, target, weight):
    return fused_softmax.cross_entropy(x * 2, target, weight, label_smoothing=0.1, z_loss=1e-3) + x.mean()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_fullgraph_forward_and_backward(kernels, device, launches, compiler):
    torch._dynamo.reset()
    x = random((5, 9), torch.float32, device).requires_grad_()
    target, weight = index_targets(5, 9, device, ignored=(1,)), class_weights(9, torch.float32, device)
    expected = compiled_model(x, target, weight)
    (expected_dx,) = torch.autograd.grad(expected, x)
    eager = len(launches)
    loss = torch.compile(compiled_model, fullgraph=True, backend=compiler)(x, target, weight)
    (dx,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(dx, expected_dx)
    forward = ["mean_grad_scale_kernel", "cross_entropy_kernel", "reduced_loss_kernel"]
    assert [launch.name for launch in launches[:eager]] == [*forward, "scale_grad_kernel"]
    # The compiled graph runs the same forward; its backward scales the gradient in torch ops
    # (the op is functional: an in-place scaling of its saved output is not offered there).
    assert [launch.name for launch in launches[eager:]] == forward


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_targets_gradient_and_refused_double_backward(kernels, device, reduction):
    """Under torch.compile (the custom op's autograd): probability targets get their gradient,
    alone or beside the logits'. The op keeps no logits otherwise, only the gradient, so a double
    backward raises, also through a per-row weight that requires grad, where it would silently
    lose the logits' second derivative; eagerly both are torch's."""
    x = random((4, 7), torch.float64, device).requires_grad_()
    q = torch.rand(4, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device)
    q.requires_grad_()
    row_weight = (torch.rand(4, generator=torch.Generator().manual_seed(6), dtype=torch.float64) + 0.5).to(device)
    row_weight.requires_grad_()
    target = index_targets(4, 7, device, ignored=(2,))

    def probability_loss(x, q):
        return fused_softmax.cross_entropy(x, q, reduction=reduction, label_smoothing=0.1)

    def weighted_loss(x, w):
        return (fused_softmax.cross_entropy(x, target, reduction="none") * w).sum()

    torch._dynamo.reset()
    compiled = torch.compile(probability_loss, fullgraph=True, backend="eager")
    upstream = torch.ones(()) if reduction == "mean" else random((4,), torch.float64, device, scale=1.0, seed=4)
    for wrt in ((x, q), (q,)):
        grads = torch.autograd.grad(compiled(x, q), wrt, upstream)
        expected = torch.autograd.grad(F.cross_entropy(x, q, reduction=reduction, label_smoothing=0.1), wrt, upstream)
        torch.testing.assert_close(grads, expected)
    torch._dynamo.reset()
    compiled = torch.compile(weighted_loss, fullgraph=True, backend="eager")
    with pytest.raises(RuntimeError, match="under torch.compile keeps no logits"):
        torch.autograd.grad(compiled(x, row_weight), x, create_graph=True)
    seconds = []
    for loss in (weighted_loss, lambda x, w: (F.cross_entropy(x, target, reduction="none") * w).sum()):
        (dx,) = torch.autograd.grad(loss(x, row_weight), x, create_graph=True)
        seconds.append(torch.autograd.grad((dx**2).sum(), (x, row_weight)))
    torch.testing.assert_close(*seconds)


@pytest.mark.parametrize("probabilities", [False, True], ids=["index", "probabilities"])
def test_opcheck(kernels, device, probabilities):
    x = random((4, 7), torch.float32, device).requires_grad_()
    target = torch.rand(4, 7, device=device) if probabilities else torch.tensor([0, 6, -100, 3], device=device)
    weight = class_weights(7, torch.float32, device)
    for reduction in REDUCTIONS:
        args = (x, target, weight, -100 if not probabilities else -1, reduction, 0.1, 1e-3, 3.0, True)
        torch.library.opcheck(cross_entropy_op, args)
    # vmap's form: a leading batch dim of two entries, each with its own reduction.
    batched = (x.detach().view(2, 2, 7).requires_grad_(), target.view(2, 2, 7) if probabilities else target.view(2, 2))
    for reduction in REDUCTIONS:
        options = (-100 if not probabilities else -1, reduction, 0.1, 1e-3, 3.0, True, 1)
        torch.library.opcheck(cross_entropy_op, (*batched, weight, *options))


def test_compiled_vmap_is_one_launch(kernels, launches):
    """Under torch.compile the op's vmap rule makes a vmapped cross-entropy one launch too,
    between its mean's factor and its reduction, each entry keeping its own mean."""
    torch._dynamo.reset()
    x = random((3, 4, 7), torch.float32)
    target = torch.tensor([[0, 6, -100, 3], [1, 1, 2, -100], [5, 4, 3, 2]])

    def losses(x, target):
        return torch.func.vmap(lambda x, t: fused_softmax.cross_entropy(x, t, label_smoothing=0.1))(x, target)

    actual = torch.compile(losses, fullgraph=True, backend="aot_eager")(x, target)
    assert [launch.name for launch in launches] == [
        "mean_grad_scale_kernel",
        "cross_entropy_kernel",
        "reduced_loss_kernel",
    ]
    expected = torch.stack([F.cross_entropy(a, t, label_smoothing=0.1) for a, t in zip(x, target, strict=True)])
    torch.testing.assert_close(actual, expected)


def test_compiled_vmap_is_differentiable(kernels):
    """A compiled vmap differentiated by autograd: the op's vmap rule stores the gradient the
    batched logits need (the compiled caller sees only their requires_grad), so the backward
    gets it rather than an empty one."""
    torch._dynamo.reset()
    x = random((3, 4, 7), torch.float64).requires_grad_()
    target = torch.tensor([[0, 6, -100, 3], [1, 1, 2, -100], [5, 4, 3, 2]])

    def losses(loss, x, target):
        return torch.func.vmap(lambda x, t: loss(x, t, label_smoothing=0.1))(x, target)

    compiled = torch.compile(
        functools.partial(losses, fused_softmax.cross_entropy), fullgraph=True, backend="aot_eager"
    )
    (actual,) = torch.autograd.grad(compiled(x, target).sin().sum(), x)
    (expected,) = torch.autograd.grad(losses(F.cross_entropy, x, target).sin().sum(), x)
    torch.testing.assert_close(actual, expected)


# ---- traffic


def traffic_case(probabilities, weighted_smoothing, store_grad, regime, dtype):
    """(x, target, weight, launch kwargs) for a [rows, C] launch of the kernel."""
    rows, classes = (3, 40) if regime == "online" else (5, 1000)
    x = random((rows, classes), dtype)
    weight = class_weights(classes, dtype, "cpu") if weighted_smoothing else None
    if probabilities:
        target = torch.rand(rows, classes, dtype=torch.float64).softmax(1).to(dtype)
    else:
        target = index_targets(rows, classes, "cpu", ignored=(1,))
    return x, target, weight


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("store_grad", [True, False], ids=["grad", "loss_only"])
@pytest.mark.parametrize("target_kind", ["index", "index-weighted-smoothing", "probabilities"])
def test_bytes_moved(plans, target_kind, store_grad, regime, dtype):
    """Logits (and probability targets) read once on chip, twice online when the gradient is
    written; the gradient written once; per row the target index (8 bytes) or its weight, the
    loss and the gradient's scale (its batch entry's, under vmap); the weight row once per tile
    and sweep."""
    probabilities, weighted = target_kind == "probabilities", target_kind.endswith("smoothing")
    x, target, weight = traffic_case(probabilities, weighted, store_grad, regime, dtype)
    rows = x.shape[0]
    stats_bytes = 4
    grad = torch.empty_like(x) if store_grad else None
    with limit_block(16 if regime == "online" else None), kernel_traffic() as traffic:
        losses = _launch.cross_entropy_forward(
            x,
            target,
            weight,
            ignore_index=-100,
            smoothing=0.1,
            z_loss=0.0,
            softcap=None,
            grad=grad,
            grad_scale=torch.ones(1) if store_grad else None,
            probabilities=probabilities,
        )
    (p,) = plans()
    assert p.config.online == (regime == "online")
    sweeps = 2 if store_grad and p.config.online else 1
    tiles = -(-rows // p.config.rows_per_program)
    logits = x.numel() * x.element_size()
    expected_loads = sweeps * logits
    if probabilities:
        expected_loads += sweeps * target.numel() * target.element_size()
    else:
        expected_loads += rows * 8  # every row's target
        if weighted:
            expected_loads += (rows - 1) * weight.element_size()  # w_t of the counted rows
            expected_loads += sweeps * tiles * weight.numel() * weight.element_size()
    expected_loads += rows * stats_bytes if store_grad else 0  # each row's gradient scale
    expected_stores = rows * stats_bytes + (logits if store_grad else 0)
    assert (traffic.loaded, traffic.stored) == (expected_loads, expected_stores)
    assert torch.isfinite(losses).all() and (grad is None or torch.isfinite(grad).all())
    expected = reference.cross_entropy(x, target, weight, reduction="none", label_smoothing=0.1)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(losses.double(), torch.as_tensor(expected), rtol=rtol, atol=atol * 100)


REDUCED = {"sum": "", "mean of rows": "rows", "mean": "scale"}


@pytest.mark.parametrize("entries", [1, 3])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("form", REDUCED)
def test_the_reduction_reads_each_loss_once(plans, form, out_dtype, entries):
    """A mean or sum is one launch over each batch entry's rows (tiny blocks here, several a row),
    reading each row's loss and, for torch's mean, the entry's factor, and writing one value an
    entry."""
    divisor, rows = REDUCED[form], 13
    losses = random((entries * rows,), torch.float32, scale=1.0) + 3.0
    scales = random((entries,), torch.float32, scale=1.0, seed=5)
    with limit_block(8), kernel_traffic() as traffic:
        out = _launch.reduced_losses(losses, (entries,), divisor, out_dtype, scales)
    (p,) = plans()
    assert p.config.block_n < rows  # several blocks an entry
    sums = losses.double().view(entries, rows).sum(1)
    expected = {"": sums, "rows": sums / rows, "scale": sums * scales.double()}[divisor]
    torch.testing.assert_close(out, expected.to(out_dtype))
    reads = losses.numel() * 4 + (entries * 4 if divisor == "scale" else 0)
    assert (traffic.loaded, traffic.stored) == (reads, entries * out.element_size())


@pytest.mark.parametrize("weighted", [False, True], ids=["counted", "weighted"])
@pytest.mark.parametrize("entries", [1, 3])
def test_a_means_factor_reads_each_target_once(plans, weighted, entries):
    """1 / each batch entry's Σ w_t over its targets not ignored (their count without weights),
    one launch reading each target and the weight of each counted one."""
    rows, classes = 13, 9
    target = index_targets(entries * rows, classes, "cpu", ignored=(0, 4, entries * rows - 2))
    weight = class_weights(classes, torch.float32, "cpu") if weighted else None
    counted = target != -100
    w = torch.where(counted, weight[target.clamp(0)] if weighted else 1.0, 0.0).double().view(entries, rows)
    with limit_block(8), kernel_traffic() as traffic:
        scales = _launch.mean_grad_scales(target, weight, entries, -100, classes, torch.float32)
    (p,) = plans()
    assert p.config.block_n < rows  # several blocks an entry
    torch.testing.assert_close(scales, (1 / w.sum(1)).float())
    weights = int(counted.sum()) * 4 if weighted else 0
    assert (traffic.loaded, traffic.stored) == (target.numel() * 8 + weights, entries * 4)
