"""fused_softmax.distributed on 2 and 4 gloo processes over loopback, against single-process
torch on the concatenated tensor: uneven shards with an empty one, rows of −inf, fp32 and
bf16, the eager fallback and the kernels, softmax, log_softmax and cross entropy, forward and
backward, and an fp64 gradcheck of the distributed derivative through the kernels.

A spawn costs seconds (each child imports torch), so one spawn per world size runs every case.
Each child runs them all, keeping the collectives in step, and raises every failed case with
its traceback; the parent re-raises that. Every wait is bounded: init and collectives by the
process group's timeout, the children by a deadline after which they are killed.
"""

import functools
import itertools
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # The children import this module afresh: the kernels are interpreted only if this is set
    # before triton is imported (support imports it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from process_group import DEADLINE_S, spawn  # noqa: E402
from support import assert_close, assert_no_less_accurate_than_torch, random  # noqa: E402

import fused_softmax  # noqa: E402
from fused_softmax import _launch, distributed  # noqa: E402
from fused_softmax.testing import kernel_traffic, limit_block, poisoned_outputs, recorded_launches  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Shard widths along the sharded dim, one tuple per layout: uneven with an empty shard (the first
# of each world size), and even (the default vocab_start of cross_entropy).
WIDTHS = {2: [(7, 0), (4, 4)], 4: [(3, 0, 5, 2)]}


def shard(full, dim, widths, rank):
    return full.narrow(dim, sum(widths[:rank]), widths[rank])


def assert_matches(actual, expected, torch_actual):
    """NaN where the float64 result has NaN; elsewhere within the dtype's tolerance, or for bf16
    gradients (from a rounded y) no less accurate than torch in bf16, as in test_kernels."""
    numbers = ~expected.isnan()
    assert torch.equal(actual.isnan(), ~numbers)
    if actual.dtype == torch.bfloat16 and numbers.any():
        assert_no_less_accurate_than_torch(actual[numbers], expected[numbers], torch_actual[numbers])
    else:
        assert_close(actual, expected)


def check_softmax(rank, log, dtype, widths, layout):
    """Forward and backward on this rank's shard against torch on the whole tensor. Row 0 is −inf
    everywhere (NaN, as torch); row 1 is −inf on the first shard only (it adds nothing); row 2
    the same but for a NaN there, which the GPU's max passes over (NaN, as torch). In fp32 and
    fp64, rows 3 and 4 are near 1e4, on every shard and on the first: x − max stays exact."""
    base = random((6, sum(widths)), dtype, DEVICE, seed=0)
    base[0] = float("-inf")
    base[1:3, : widths[0]] = float("-inf")
    base[2, 1] = float("nan")
    if dtype.itemsize >= 4:
        base[3] += 1e4
        base[4, : widths[0]] += 1e4
    # 'middle': the sharded dim between two others, strided (a transposed view).
    x, dim = (base, -1) if layout == "last" else (base.reshape(2, 3, -1).transpose(1, 2), 1)
    dy = random(x.shape, dtype, DEVICE, seed=1, scale=1.0)
    name = "log_softmax" if log else "softmax"

    x_local = shard(x, dim, widths, rank).detach().requires_grad_()
    y = getattr(distributed, name)(x_local, dim=dim)
    (dx,) = torch.autograd.grad(y, x_local, shard(dy, dim, widths, rank))

    x64 = x.double().requires_grad_()
    y64 = getattr(F, name)(x64, dim)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    x_same = x.detach().requires_grad_()
    (dx_same,) = torch.autograd.grad(getattr(F, name)(x_same, dim), x_same, dy)

    assert y.dtype == dx.dtype == dtype and y.shape == dx.shape == x_local.shape
    assert_close(y, shard(y64, dim, widths, rank))
    assert_matches(dx, shard(dx64, dim, widths, rank), shard(dx_same, dim, widths, rank))
    return x_local.numel()


def check_cross_entropy(rank, dtype, widths, reduction, label_smoothing, ignore_index):
    """Loss (the same on every rank) and logit gradients against F.cross_entropy on the whole logits."""
    n, classes = 6, sum(widths)
    logits = random((n, classes), dtype, DEVICE, seed=2)
    target = torch.randint(classes, (n,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    target[1] = ignore_index
    columns = torch.arange(classes, device=DEVICE)
    if not label_smoothing:  # masked classes: −inf logits on the first shard, off the target (smoothing makes it inf)
        logits[2, (columns < widths[0]) & (columns != target[2])] = float("-inf")
    if (
        dtype.itemsize >= 4
    ):  # large logits, on every shard and on the first: lse − x_t and the smoothing term kept exact
        logits[3] += 1e4
        logits[4, columns < widths[0]] += 1e4
    grad = random((n,) if reduction == "none" else (), dtype, DEVICE, seed=4, scale=1.0)
    options = {"ignore_index": ignore_index, "reduction": reduction, "label_smoothing": label_smoothing}

    local = shard(logits, 1, widths, rank).detach().requires_grad_()
    vocab_start = None if len(set(widths)) == 1 else sum(widths[:rank])
    loss = distributed.cross_entropy(local, target, vocab_start=vocab_start, **options)
    (dlogits,) = torch.autograd.grad(loss, local, grad)

    logits64 = logits.double().requires_grad_()
    loss64 = F.cross_entropy(logits64, target, **options)
    (dlogits64,) = torch.autograd.grad(loss64, logits64, grad.double())

    assert loss.dtype == dlogits.dtype == dtype and loss.shape == loss64.shape
    assert_close(loss, loss64)
    assert_close(dlogits, shard(dlogits64, 1, widths, rank))
    return local.numel()


def check_errors(rank, widths):
    """Clear errors, raised on every rank alike (so none is left waiting in a collective)."""
    classes = sum(widths)
    logits = shard(random((3, classes), torch.float32, DEVICE, seed=5), 1, widths, rank)
    start = sum(widths[:rank])
    with pytest.raises(IndexError, match=f"Target {classes} is out of bounds"):
        distributed.cross_entropy(logits, torch.tensor([0, classes, 1], device=DEVICE), vocab_start=start)
    with pytest.raises(IndexError, match="Target -1 is out of bounds"):
        distributed.cross_entropy(logits, torch.tensor([0, -1, 1], device=DEVICE), vocab_start=start)
    with pytest.raises(ValueError, match=r"expected logits \[N, V_local\]"):
        distributed.cross_entropy(logits[None], torch.tensor([[0, 1, 1]], device=DEVICE))
    with pytest.raises(ValueError, match="shards of different widths need vocab_start"):
        distributed.cross_entropy(logits, torch.tensor([0, 1, 1], device=DEVICE))
    for name in ("softmax", "log_softmax"):  # raised before any collective, on every rank alike
        with pytest.raises(NotImplementedError, match="not implemented for torch.int64"):
            getattr(distributed, name)(logits.long())  # cast back, its result would be zeros
        with pytest.raises(ValueError, match="a 0-d tensor has no dim to shard"):
            getattr(distributed, name)(logits.new_zeros(()))
    return logits.numel()


class Replicated(torch.autograd.Function):
    """Identity forward, all_reduce backward: each rank's gradient, nonzero on its shard only,
    summed into the full one. Differentiable in both modes."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return Summed.apply(grad)

    @staticmethod
    def jvp(ctx, tangent):
        return tangent.clone()


class Summed(torch.autograd.Function):
    """all_reduce forward, identity backward: the ranks' zero-padded slices summed into the full output.
    The two are each other's adjoints, so double backward sees the same function on every rank."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return Replicated.apply(grad)

    @staticmethod
    def jvp(ctx, tangent):
        return Summed.apply(tangent)


def full_softmax(full, op, widths, rank):
    """``op`` (sharded) of this rank's shard of ``full``, as a function of the full input and
    output: the same on every rank, so the ranks' evaluations stay in step."""
    classes, start = sum(widths), sum(widths[:rank])
    local = Replicated.apply(full).narrow(1, start, widths[rank])
    return Summed.apply(F.pad(op(local), (start, classes - start - widths[rank])))


def check_gradcheck(rank, widths):
    """gradcheck, in float64, of the whole sharded computation as a function of the full input.
    Fast mode (a random projection of the Jacobian) keeps the interpreter's launches few; the
    same seed on every rank draws the same projection."""
    classes, start = sum(widths), sum(widths[:rank])
    x = random((2, classes), torch.float64, DEVICE, seed=6).requires_grad_()
    target = torch.tensor([classes - 1, -100], device=DEVICE)

    def cross_entropy(full):
        local = Replicated.apply(full).narrow(1, start, widths[rank])
        return distributed.cross_entropy(local, target, reduction="none", label_smoothing=0.1, vocab_start=start)

    for fn in (
        functools.partial(full_softmax, op=distributed.softmax, widths=widths, rank=rank),
        functools.partial(full_softmax, op=distributed.log_softmax, widths=widths, rank=rank),
        cross_entropy,
    ):
        torch.manual_seed(7)
        assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
    return widths[rank]


def check_higher_derivatives(rank, widths, log):
    """Forward mode and double backward of the sharded softmax through the kernels: gradcheck
    with forward AD and gradgradcheck with forward over reverse, in float64, fast mode; and the
    torch.func transforms every rank runs alike (vmap, jvp, per-sample gradients) against torch
    on the whole tensor."""
    op = distributed.log_softmax if log else distributed.softmax
    reference = F.log_softmax if log else F.softmax
    classes = sum(widths)
    x = random((2, classes), torch.float64, DEVICE, seed=8).requires_grad_()
    fn = functools.partial(full_softmax, op=op, widths=widths, rank=rank)
    torch.manual_seed(9)
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=True, check_forward_ad=True)
    torch.manual_seed(9)
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True, check_fwd_over_rev=True)

    batch = random((3, 2, classes), torch.float64, DEVICE, seed=10)
    tangent = random(batch.shape, torch.float64, DEVICE, seed=11)
    local, local_tangent = (shard(t, -1, widths, rank) for t in (batch, tangent))
    torch.testing.assert_close(torch.func.vmap(op)(local), shard(reference(batch, -1), -1, widths, rank))
    _, actual = torch.func.jvp(op, (local,), (local_tangent,))
    _, expected = torch.func.jvp(lambda t: reference(t, -1), (batch,), (tangent,))
    torch.testing.assert_close(actual, shard(expected, -1, widths, rank))
    per_sample = torch.func.vmap(torch.func.grad(lambda t: op(t).sin().sum()))(local)
    expected = torch.func.vmap(torch.func.grad(lambda t: reference(t, -1).sin().sum()))(batch)
    torch.testing.assert_close(per_sample, shard(expected, -1, widths, rank))

    # A third forward-mode level (jvp of jvp of jvp, no vmap: every rank alike) raises, as the local softmax's.
    def tangent(f):
        return lambda t: torch.func.jvp(f, (t,), (local_tangent,))[1]

    with pytest.raises(NotImplementedError, match="a third forward-mode level"):
        tangent(tangent(tangent(op)))(local)
    if len(set(widths)) > 1:  # jacrev vmaps over each rank's own outputs: every rank raises, none hangs
        with pytest.raises(RuntimeError, match="every rank must vmap alike"):
            torch.func.jacrev(op)(local[0])
    return widths[rank]


def check_cross_entropy_transforms(rank, widths):
    """The vocab-parallel cross-entropy through the kernels in forward mode and double backward:
    gradcheck with forward AD and gradgradcheck with forward over reverse, in float64, fast mode,
    as a function of the full logits (batched tangents, whose older vmap cannot batch a
    collective, refused); batched gradients (is_grads_batched) of the local logits; then the
    torch.func transforms every rank runs alike against torch on the gathered logits: vmap over
    logits and targets (each entry its own mean), jvp, per-sample gradients, jacrev of the mean;
    with shards of one size, the hessian of the local logits (every rank's basis tangents at
    once) and a third derivative refused, on every rank."""
    classes, start = sum(widths), sum(widths[:rank])
    x = random((2, classes), torch.float64, DEVICE, seed=12).requires_grad_()
    target = torch.tensor([classes - 1, -100], device=DEVICE)

    def full_losses(full):
        local = Replicated.apply(full).narrow(1, start, widths[rank])
        return distributed.cross_entropy(local, target, reduction="none", label_smoothing=0.1, vocab_start=start)

    torch.manual_seed(13)
    assert torch.autograd.gradcheck(full_losses, (x,), fast_mode=True, check_forward_ad=True)
    with pytest.raises(RuntimeError, match="cannot batch a collective"):
        torch.autograd.gradcheck(
            full_losses, (x,), fast_mode=True, check_forward_ad=True, check_batched_forward_grad=True
        )
    torch.manual_seed(13)
    assert torch.autograd.gradgradcheck(full_losses, (x,), fast_mode=True, check_fwd_over_rev=True)

    logits = random((3, 4, classes), torch.float64, DEVICE, seed=14)
    tangent = random(logits.shape, torch.float64, DEVICE, seed=15)
    targets = torch.tensor([[0, 1, 2, 3], [3, -100, 1, 0], [-100, -100, 2, -100]], device=DEVICE) % classes
    local, local_tangent = (shard(t, -1, widths, rank) for t in (logits, tangent))

    def ours(logits, target, reduction="mean"):
        options = dict(reduction=reduction, label_smoothing=0.1, vocab_start=start)
        return distributed.cross_entropy(logits, target, **options)

    def theirs(logits, target, reduction="mean"):
        return F.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1)

    leaf, full = local[1].clone().requires_grad_(), logits[1].clone().requires_grad_()
    upstream = random((2, 4), torch.float64, DEVICE, seed=16)
    batched = torch.autograd.grad(ours(leaf, targets[1], "none"), leaf, upstream, is_grads_batched=True)[0]
    expected = torch.autograd.grad(theirs(full, targets[1], "none"), full, upstream, is_grads_batched=True)[0]
    torch.testing.assert_close(batched, shard(expected, -1, widths, rank))
    vmap, grad = torch.func.vmap, torch.func.grad
    torch.testing.assert_close(vmap(ours)(local, targets), vmap(theirs)(logits, targets))
    _, actual = torch.func.jvp(lambda t: ours(t, targets[1], "none"), (local[1],), (local_tangent[1],))
    _, expected = torch.func.jvp(lambda t: theirs(t, targets[1], "none"), (logits[1],), (tangent[1],))
    torch.testing.assert_close(actual, expected)
    per_sample = vmap(grad(lambda t, y: ours(t, y).sin()))(local, targets)
    expected = vmap(grad(lambda t, y: theirs(t, y).sin()))(logits, targets)
    torch.testing.assert_close(per_sample, shard(expected, -1, widths, rank))
    jacobian = torch.func.jacrev(ours)(local[1], targets[1])
    torch.testing.assert_close(jacobian, shard(torch.func.jacrev(theirs)(logits[1], targets[1]), -1, widths, rank))
    if len(set(widths)) > 1:  # jacfwd, hessian's outer transform, vmaps over each rank's own elements
        return widths[rank]

    def scalar(f):
        return lambda t: f(t, targets[1], "none").sin().sum()

    # Every rank's k-th basis tangent is one tangent of the full logits, 1 at the k-th element of
    # every shard: the hessian's columns sum the full one's over the shards.
    n, width = local.shape[1:]
    columns = torch.func.hessian(scalar(theirs))(logits[1]).reshape(n, classes, n, len(widths), width).sum(3)
    torch.testing.assert_close(torch.func.hessian(scalar(ours))(local[1]), columns[:, start : start + width])
    (first,) = torch.autograd.grad(scalar(ours)(leaf), leaf, create_graph=True)
    (second,) = torch.autograd.grad(first.square().sum(), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="a third raises"):
        torch.autograd.grad(second.sum(), leaf)
    return widths[rank]


def cases(world_size):
    """(name, backend, check) for everything a spawn of ``world_size`` processes runs; check(rank)
    returns how many elements the rank's shard holds (none: no kernel to launch)."""
    dtypes = (torch.float32, torch.bfloat16)
    for backend, widths in itertools.product(("torch", "triton"), WIDTHS[world_size]):
        for log, dtype, layout in itertools.product((False, True), dtypes, ("last", "middle")):
            name = f"{backend}-{widths}-{'log_softmax' if log else 'softmax'}-{dtype}-{layout}"
            yield name, backend, functools.partial(check_softmax, log=log, dtype=dtype, widths=widths, layout=layout)
        # Each reduction, with and without smoothing; ignore_index 2 is a class, ignored all the same.
        options = (("none", 0.0, -100), ("mean", 0.1, -100), ("sum", 0.1, 2), ("mean", 0.0, 2))
        for dtype, (reduction, smoothing, ignore) in itertools.product(dtypes, options):
            name = f"{backend}-{widths}-cross_entropy-{dtype}-{reduction}-smoothing{smoothing}-ignore{ignore}"
            yield (
                name,
                backend,
                functools.partial(
                    check_cross_entropy,
                    dtype=dtype,
                    widths=widths,
                    reduction=reduction,
                    label_smoothing=smoothing,
                    ignore_index=ignore,
                ),
            )
    uneven = WIDTHS[world_size][0]
    yield "errors", "torch", functools.partial(check_errors, widths=uneven)
    yield "gradcheck", "triton", functools.partial(check_gradcheck, widths=uneven)
    for log in (False, True):
        name = f"higher_derivatives-{'log_softmax' if log else 'softmax'}"
        yield name, "triton", functools.partial(check_higher_derivatives, widths=uneven, log=log)
    for widths in WIDTHS[world_size]:
        yield (
            f"cross_entropy_transforms-{widths}",
            "triton",
            functools.partial(check_cross_entropy_transforms, widths=widths),
        )


def run_cases(rank, world_size):
    """Every case, each failure recorded with its traceback so that the collectives stay in step."""
    failures = []
    for name, backend, check in cases(world_size):
        try:
            with poisoned_outputs(), fused_softmax.use_backend(backend), recorded_launches() as launches:
                local_elements = check(rank)
            launched = len(launches)
            assert launched > 0 if backend == "triton" and local_elements else launched == 0, (backend, launched)
        except (AssertionError, pytest.fail.Exception):
            failures.append(f"--- {name}\n{traceback.format_exc()}")
    assert not failures, f"{len(failures)} cases failed\n" + "\n".join(failures)


@pytest.mark.parametrize("world_size", [2, 4])
def test_matches_torch_on_the_gathered_tensor(world_size, tmp_path):
    spawn(run_cases, world_size, tmp_path)


def test_imported_only_on_request_and_without_triton():
    """A submodule for the code that shards: ``import fused_softmax`` leaves it out, and importing it
    imports no Triton."""
    code = (
        "import sys, fused_softmax; assert 'fused_softmax.distributed' not in sys.modules, 'eager'; "
        "import fused_softmax.distributed; assert 'triton' not in sys.modules, 'imported triton'"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=DEADLINE_S)
    assert run.returncode == 0, run.stderr


def test_example_runs():
    """The example spawns its own 2 processes; a new session, so a timeout kills them all."""
    example = Path(__file__).parents[1] / "examples" / "vocab_parallel_lm_head.py"
    process = subprocess.Popen(
        [sys.executable, example], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    assert process.returncode == 0 and "gradients match" in output, output


@pytest.mark.parametrize("regime", ["on_chip", "online"])
def test_shard_kernels_read_the_logits_once(regime):
    """The vocab-parallel cross-entropy's local work, in this process: the forward reads the
    shard's logits once for the statistics the ranks gather; the backward reads them once and
    writes their gradient once; per row the target, and backward its log-sum-exp (two parts) and
    upstream gradient. Values against torch on the shard: the statistics, and the gradient for a
    given log-sum-exp."""
    rows, width, start, classes = 4, 40, 40, 120
    x = random((rows, width), torch.float32)
    target = torch.tensor([45, 3, -100, 79])  # in this shard, in another, ignored, in this shard
    options = dict(vocab_start=start, ignore_index=-100, smoothing=0.1)
    row_max = x.amax(1)
    # As if the other shards added to the row's sum: (max, log Σ exp(x - max) + 1).
    lse = torch.stack([row_max, torch.log(torch.exp(x - row_max[:, None]).sum(1)) + 1.0], 1)
    with poisoned_outputs(), fused_softmax.use_backend("triton"), limit_block(16 if regime == "online" else None):
        with kernel_traffic() as forward:
            stats = _launch.vocab_slice_statistics(x, target, **options)
        dloss = random((rows,), torch.float32, seed=1, scale=1.0)
        with kernel_traffic() as backward:
            grad = _launch.vocab_slice_grad(x, target, lse, dloss, n_classes=classes, **options)
    logits, per_row = x.numel() * 4, rows * 4
    assert (forward.loaded, forward.stored) == (logits + rows * 8, 4 * per_row)
    assert (backward.loaded, backward.stored) == (logits + rows * 8 + 2 * per_row + 3 * 4, logits)
    deviation = (x - row_max[:, None]).sum(1)  # Σ (x - max): exact to the logits' spread, not their size
    expected = [row_max, torch.exp(x - row_max[:, None]).sum(1), torch.tensor([x[0, 5], 0, 0, x[3, 39]]), deviation]
    torch.testing.assert_close(stats, torch.stack(expected, 1))
    onehot = torch.zeros_like(x)
    onehot[0, 5] = onehot[3, 39] = 1
    expected_grad = (torch.exp(x - lse.sum(1)[:, None]) - 0.9 * onehot - 0.1 / classes) * dloss[:, None]
    expected_grad[2] = 0
    torch.testing.assert_close(grad, expected_grad)
