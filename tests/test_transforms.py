"""torch.func and forward-mode AD through every differentiable function of the package, on both
backends, in float64 against torch's own functions: vmap, grad, vjp, jacrev, jacfwd, jvp,
hessian, dual tensors, batched gradients, gradcheck and gradgradcheck with every batched and
forward-mode check. A vmapped call is one launch per kernel; double backward in half precision
is as accurate as torch's; a bf16 input with float64 output gets the GPU's gradients."""

import dataclasses
import math
import re
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from support import TOLERANCES, assert_no_less_accurate_than_torch, random

import fused_softmax
from fused_softmax.cross_entropy import torch_cross_entropy
from fused_softmax.linear_cross_entropy import NO_DOUBLE_BACKWARD
from fused_softmax.testing import limit_block

SCALE = 0.7


def _causal_bool(n_queries, n_keys):
    return torch.ones(n_queries, n_keys, dtype=torch.bool).tril()


def _torch_masked(scores, mask=None, causal=False, scale=1.0, softcap=None, sinks=None, bias=None):
    z = scores * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if causal:
        z = z.masked_fill(~_causal_bool(*z.shape[-2:]), float("-inf"))
    if mask is not None and mask.dtype == torch.bool:
        z = z.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        z = z + mask
    if bias is not None:
        z = z + bias
    if sinks is None:
        return torch.softmax(z, -1)
    return torch.softmax(torch.cat([z, sinks[:, None, None].expand(*z.shape[:-1], 1)], -1), -1)[..., :-1]


def _keep_mask(shape):
    """A bool mask that hides about a third of the keys, never a whole row."""
    keep = random(shape, seed=5) > -0.4
    keep[..., 0] = True
    return keep


@dataclasses.dataclass(frozen=True)
class Case:
    """A differentiable function of the package, its torch twin, and the shapes of its inputs,
    batched along dim 0 (B = 3) where ``in_dims`` says 0, for vmap."""

    name: str
    fused: Callable
    torch: Callable
    shapes: tuple
    max_block: int | None = None
    in_dims: tuple = (0, 0, 0)

    def __str__(self):
        return self.name

    def inputs(self):
        return tuple(random(shape, torch.float64, seed=i) for i, shape in enumerate(self.shapes))

    def batch_dims(self, args):
        return self.in_dims[: len(args)]

    def first(self, args):
        """The inputs of the batch's first entry."""
        return tuple(a[0] if d == 0 else a for a, d in zip(args, self.batch_dims(args), strict=True))


KEEP = _keep_mask((4, 5))
# Cross-entropy's targets and weights are functions of the logits' shape, so that the same case
# runs on the whole batch (grad, jacrev, ...) and on each entry (vmap): [3, 4, 5] logits are 3
# rows of 4 classes at 5 positions, and 3 entries of 4 rows of 5 classes.
WEIGHTS = random((16,), torch.float64, seed=8).abs() + 0.5
CE_OPTIONS = dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0)


def _targets_weight(x):
    """Class indices for the rows of logits ``x`` (one ignored), and weights for its classes."""
    dim = 1 if x.dim() >= 2 else 0
    classes, rows = x.shape[dim], x.shape[:dim] + x.shape[dim + 1 :]
    target = (torch.arange(math.prod(rows)) * 3 + 1) % classes
    target[1:2] = -100
    return target.reshape(rows), WEIGHTS[:classes]


def _cross_entropy_pair(reduction, **options):
    """(fused, torch) cross-entropy of logits; torch's twin is the eager path (z-loss, softcap)."""
    options = CE_OPTIONS | options

    def fused(x):
        return fused_softmax.cross_entropy(x, *_targets_weight(x), reduction=reduction, **options)

    def torch_twin(x):
        smoothing, z_loss, softcap = options["label_smoothing"], options["z_loss"], options["softcap"]
        return torch_cross_entropy(x, *_targets_weight(x), -100, reduction, smoothing, z_loss, softcap)

    return fused, torch_twin


SOFTCAP = 1.5
# A constant additive mask under softcapping: the backward recovers the capped scores past it.
ADDITIVE = random((1, 5), torch.float64, seed=11, scale=1.0)
CASES = [
    Case("softmax", lambda x: fused_softmax.softmax(x, dim=-1), lambda x: F.softmax(x, dim=-1), ((3, 2, 5),)),
    Case("log_softmax", lambda x: fused_softmax.log_softmax(x, 1), lambda x: F.log_softmax(x, 1), ((3, 4, 2),)),
    # Rows longer than the (capped) block: the online regime of every kernel.
    Case("softmax_online", lambda x: fused_softmax.softmax(x, -1), lambda x: F.softmax(x, -1), ((3, 7),), 4),
    Case(
        "log_softmax_online", lambda x: fused_softmax.log_softmax(x, -1), lambda x: F.log_softmax(x, -1), ((3, 9),), 4
    ),
    Case(
        "masked_causal",
        lambda s: fused_softmax.masked_softmax(s, scale=SCALE, causal=True),
        lambda s: _torch_masked(s, causal=True, scale=SCALE),
        ((3, 4, 5),),
    ),
    Case(
        "masked_bool",
        lambda s: fused_softmax.masked_softmax(s, KEEP, scale=SCALE),
        lambda s: _torch_masked(s, KEEP, scale=SCALE),
        ((3, 4, 5),),
    ),
    # An additive mask that is differentiated too (a learned bias), broadcast over the batch.
    Case(
        "masked_additive",
        lambda s, m: fused_softmax.masked_softmax(s, m, scale=SCALE),
        lambda s, m: _torch_masked(s, m, scale=SCALE),
        ((3, 4, 5), (4, 5)),
        in_dims=(0, None),
    ),
    # Softcapping (Gemma 2) and sinks (gpt-oss), one per head of [B, H, Lq, Lk] scores, each
    # differentiated; the batch is B for vmap, the sinks shared by the batch.
    Case(
        "softcap_sinks_causal",
        lambda s, k: fused_softmax.masked_softmax(s, scale=SCALE, causal=True, softcap=SOFTCAP, sinks=k),
        lambda s, k: _torch_masked(s, causal=True, scale=SCALE, softcap=SOFTCAP, sinks=k),
        ((3, 2, 2, 3), (2,)),
        in_dims=(0, None),
    ),
    Case(
        "softcap_additive_online",
        lambda s: fused_softmax.masked_softmax(s, ADDITIVE, scale=SCALE, softcap=SOFTCAP),
        lambda s: _torch_masked(s, ADDITIVE, scale=SCALE, softcap=SOFTCAP),
        ((3, 1, 5),),
        max_block=4,
    ),
    # A learned bias beside a bool mask, with sinks (statistics kept) and alone (softmax's backward).
    Case(
        "bias_sinks",
        lambda s, b, k: fused_softmax.masked_softmax(s, KEEP[:1], scale=SCALE, sinks=k, bias=b),
        lambda s, b, k: _torch_masked(s, KEEP[:1], scale=SCALE, sinks=k, bias=b),
        ((3, 2, 1, 5), (1, 5), (2,)),
        in_dims=(0, None, None),
    ),
    Case(
        "bias",
        lambda s, b: fused_softmax.masked_softmax(s, KEEP[:2], scale=SCALE, causal=True, bias=b),
        lambda s, b: _torch_masked(s, KEEP[:2], causal=True, scale=SCALE, bias=b),
        ((3, 2, 5), (2, 5)),
        in_dims=(0, None),
    ),
    Case(
        "attention",
        lambda q, k, v: fused_softmax.attention(q, k, v, is_causal=True),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        ((3, 4, 2), (3, 4, 2), (3, 4, 2)),
    ),
    # A mean per batch entry under vmap; per-row losses with rows longer than the block.
    Case("cross_entropy_mean", *_cross_entropy_pair("mean"), ((3, 4, 5),)),
    Case("cross_entropy_none_online", *_cross_entropy_pair("none", softcap=None), ((3, 4, 9),), 4),
    # Probability targets, differentiated too.
    Case(
        "cross_entropy_probabilities",
        lambda x, q: fused_softmax.cross_entropy(x, q, _targets_weight(x)[1], reduction="sum", label_smoothing=0.2),
        lambda x, q: F.cross_entropy(x, q, _targets_weight(x)[1], reduction="sum", label_smoothing=0.2),
        ((3, 4, 5), (3, 4, 5)),
    ),
]
CROSS_ENTROPY = [case for case in CASES if case.name.startswith("cross_entropy")]


def _scalar(f):
    """A scalar function of the inputs with a non-trivial Hessian."""
    return lambda *args: f(*args).sin().sum()


ARGNUMS = {
    "masked_additive": (0, 1),
    "softcap_sinks_causal": (0, 1),
    "bias_sinks": (0, 1, 2),
    "bias": (0, 1),
    "attention": (0, 1, 2),
    "cross_entropy_probabilities": (0, 1),
}

TRANSFORMS = {
    "vmap": lambda f, args, case: torch.func.vmap(f, in_dims=case.batch_dims(args))(*args),
    # The batch along dim 1 of the first input.
    "vmap_in_dims": lambda f, args, case: torch.func.vmap(f, in_dims=(1, *case.batch_dims(args)[1:]))(
        args[0].movedim(0, 1).contiguous(), *args[1:]
    ),
    "grad": lambda f, args, case: torch.func.grad(_scalar(f), argnums=ARGNUMS.get(case.name, 0))(*args),
    "vjp": lambda f, args, case: torch.func.vjp(f, *args)[1](random(f(*args).shape, torch.float64, seed=9)),
    "jacrev": lambda f, args, case: torch.func.jacrev(f, argnums=ARGNUMS.get(case.name, 0))(*args),
    "jacfwd": lambda f, args, case: torch.func.jacfwd(f, argnums=ARGNUMS.get(case.name, 0))(*args),
    "jvp": lambda f, args, case: torch.func.jvp(f, args, tuple(a.cos() for a in args)),
    "hessian": lambda f, args, case: torch.func.hessian(_scalar(f))(*args),
    "per_sample_grad": lambda f, args, case: torch.func.vmap(torch.func.grad(_scalar(f)), case.batch_dims(args))(*args),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_transform_matches_torch(backend, case, transform):
    args = case.inputs()
    with limit_block(case.max_block):
        actual = TRANSFORMS[transform](case.fused, args, case)
    expected = TRANSFORMS[transform](case.torch, args, case)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_mode_dual_tensors(backend, case):
    args = case.inputs()
    tangents = tuple(a.cos() for a in args)
    with torch.autograd.forward_ad.dual_level():
        duals = [torch.autograd.forward_ad.make_dual(a, t) for a, t in zip(args, tangents, strict=True)]
        with limit_block(case.max_block):
            actual = torch.autograd.forward_ad.unpack_dual(case.fused(*duals))
    _, expected = torch.func.jvp(case.torch, args, tangents)
    torch.testing.assert_close(actual.tangent, expected, rtol=1e-9, atol=1e-10)


def _batched_gradients(function, args, grads):
    """The per-sample vector-Jacobian products of torch.autograd.grad(is_grads_batched=True),
    built with create_graph, and their own gradient (the older vmap drops the graph of a Function
    applied in a backward: the products' backwards take torch ops there)."""
    first = torch.autograd.grad(function(*args), args, grads, is_grads_batched=True, create_graph=True)
    return first, torch.autograd.grad(sum(g.sin().sum() for g in first), args, allow_unused=True)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_batched_gradients(backend, case):
    args = [a.requires_grad_() for a in case.inputs()]
    grads = random((2, *case.torch(*args).shape), torch.float64, seed=7)
    with limit_block(case.max_block):
        actual = _batched_gradients(case.fused, args, grads)
    expected = _batched_gradients(case.torch, args, grads)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)


def first_derivatives_check(function, args):
    """gradcheck in every first-order mode (reverse, forward, each batched), on fast-mode
    projections: the interpreted launches stay few."""
    return torch.autograd.gradcheck(
        function, args, check_batched_grad=True, check_forward_ad=True, check_batched_forward_grad=True, fast_mode=True
    )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradcheck_with_batched_and_forward_checks(kernels, case):
    """The batched, forward-mode and second-order checks, on Jacobians projected on random
    vectors (fast mode, which any wrong entry still changes): their full numerical forms took
    a minute and a half of the suite's interpreted launches, and each kernel's full first
    Jacobian is checked where it is tested (test_kernels, test_attention, test_softcap_sinks,
    test_cross_entropy)."""
    args = [a.requires_grad_() for a in case.first(case.inputs())]
    with limit_block(case.max_block):
        assert first_derivatives_check(case.fused, args)
        assert torch.autograd.gradgradcheck(
            case.fused, args, check_batched_grad=True, check_fwd_over_rev=True, check_rev_over_rev=True, fast_mode=True
        )


@pytest.mark.parametrize("case", [c for c in CASES if c.name != "attention" and c not in CROSS_ENTROPY], ids=str)
def test_vmap_is_one_launch_per_kernel(kernels, launches, case):
    """A vmapped call launches what one unbatched call does, whatever the batch size; so do
    per-sample gradients (a forward and a backward) and jacrev's batch of basis vectors."""
    args = case.inputs()
    with limit_block(case.max_block):
        case.fused(*case.first(args))
        assert len(launches) == 1
        torch.func.vmap(case.fused, case.batch_dims(args))(*args)
        assert len(launches) == 2
        torch.func.vmap(torch.func.grad(_scalar(case.fused)), case.batch_dims(args))(*args)
        assert len(launches) == 4
        torch.func.jacrev(case.fused)(*args)
        assert len(launches) == 6


def test_vmap_over_a_mask_that_is_batched_alone(backend):
    """Per-example masks over shared scores: the scores are expanded (a view), the mask gets
    unit dims after the batch so it still broadcasts over the heads."""
    scores = random((2, 4, 5), torch.float64)
    masks = torch.stack([_keep_mask((4, 5)), _keep_mask((4, 5)).flip(-1)])  # [B, Lq, Lk] of [H, Lq, Lk] scores
    masks[..., -1] = True
    actual = torch.func.vmap(lambda m: fused_softmax.masked_softmax(scores, m[None], scale=SCALE))(masks)
    expected = torch.stack([_torch_masked(scores, m, scale=SCALE) for m in masks])
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)


def test_vmap_over_0d_inputs(backend):
    x = random((4,), torch.float64)
    torch.testing.assert_close(torch.func.vmap(lambda t: fused_softmax.log_softmax(t, 0))(x), torch.zeros(4).double())
    jac = torch.func.vmap(torch.func.jacrev(lambda t: fused_softmax.softmax(t, -1)))(x)
    torch.testing.assert_close(jac, torch.zeros(4).double())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_half_precision_double_backward_is_as_accurate_as_torch(kernels, name, dtype):
    """The second derivatives' row sums are in fp32: error against float64 within 2x torch's."""
    x, dy, ddx = (random((4, 64), torch.float64, seed=s, scale=1.0) for s in range(3))

    def second_derivatives(function, dtype):
        inputs = [x.to(dtype).requires_grad_(), dy.to(dtype).requires_grad_()]
        (dx,) = torch.autograd.grad(function(inputs[0], 1), inputs[0], inputs[1], create_graph=True)
        return torch.autograd.grad(dx, inputs, ddx.to(dtype))

    expected = second_derivatives(getattr(F, name), torch.float64)
    ours = second_derivatives(getattr(fused_softmax, name), dtype)
    with fused_softmax.use_backend("torch"):
        torchs = second_derivatives(getattr(F, name), dtype)
    for actual, reference, twin in zip(ours, expected, torchs, strict=True):
        assert actual.dtype == dtype
        assert_no_less_accurate_than_torch(actual, reference, twin)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_bf16_input_with_float64_output_gets_its_gradient(kernels, name):
    """The backward computes in fp64 and writes bf16 through fp32, as torch's cast does: not the
    zeros or NaN of a direct fp64 -> bf16 conversion under the interpreter."""
    x = random((3, 40), torch.bfloat16).requires_grad_()
    dy = random((3, 40), torch.float64, seed=1)
    (dx,) = torch.autograd.grad(getattr(fused_softmax, name)(x, 1, dtype=torch.float64), x, dy)
    x64 = x.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(getattr(F, name)(x64, 1), x64, dy)
    assert dx.dtype == torch.bfloat16 and dx.abs().sum() > 0
    rtol, atol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(dx, expected.to(torch.bfloat16), rtol=rtol, atol=atol)


@pytest.mark.parametrize("case", CROSS_ENTROPY, ids=str)
def test_cross_entropy_vmap_is_one_launch(kernels, launches, case):
    """A vmapped cross-entropy is one forward launch, whatever the batch size, beside its
    reduction's (a mean's gradient factor, the reduced loss: one each); per-sample gradients and
    jacrev too (their backward under vmap scales the forward's gradient in torch ops, the kernel
    having written it)."""
    args = case.inputs()
    forwards = {"cross_entropy_kernel", "cross_entropy_probabilities_kernel"}
    calls = (
        torch.func.vmap(case.fused, case.batch_dims(args)),
        torch.func.vmap(torch.func.grad(_scalar(case.fused)), case.batch_dims(args)),
        torch.func.jacrev(case.fused),
    )
    with limit_block(case.max_block):
        for call in calls:
            launches.clear()
            call(*args)
            names = [launch.name for launch in launches]
            assert len(forwards.intersection(names)) == 1 and len(set(names)) == len(names), names
            assert set(names) <= forwards | {"mean_grad_scale_kernel", "reduced_loss_kernel"}, names


def test_cross_entropy_vmap_keeps_each_entrys_mean(backend):
    """Batched targets, ignored a different number of times in each entry: each entry's mean
    divides by its own count of targets, and its gradient by the same."""
    logits = random((3, 4, 5), torch.float64)
    targets = torch.tensor([[1, 2, 3, 4], [0, -100, 2, -100], [-100, -100, -100, 3]])

    def loss(x, t):
        return fused_softmax.cross_entropy(x, t, label_smoothing=0.1)

    losses = torch.func.vmap(loss)(logits, targets)
    grads = torch.func.vmap(torch.func.grad(loss))(logits, targets)
    for x, t, actual, grad in zip(logits, targets, losses, grads, strict=True):
        expected = fused_softmax.testing.reference.cross_entropy(x, t, label_smoothing=0.1)
        torch.testing.assert_close(actual, torch.as_tensor(expected))
        expected = fused_softmax.testing.reference.cross_entropy_backward(x, t, 1.0, label_smoothing=0.1)
        torch.testing.assert_close(grad, torch.as_tensor(expected))


def test_cross_entropy_vmap_over_weights_is_refused(launches):
    """One launch reads one weight vector: vmap over the weights raises, and says so."""
    x, weights = random((4, 5), torch.float64), random((3, 5), torch.float64).abs()
    with (
        fused_softmax.use_backend("triton"),
        pytest.raises(NotImplementedError, match="class weights must be the same"),
    ):
        torch.func.vmap(lambda w: fused_softmax.cross_entropy(x, _targets_weight(x)[0], w))(weights)


def test_vmap_over_per_example_sinks(backend, launches):
    """Sinks batched with the scores (a sink per example and head, as in per-sample gradients of
    gpt-oss's s_aux): one logit per (batch entry, head) in one call; their per-sample gradients."""
    scores, sinks = random((3, 2, 2, 3), torch.float64), random((3, 2), torch.float64, seed=1)

    def fused(s, k):
        return fused_softmax.masked_softmax(s, scale=SCALE, softcap=SOFTCAP, sinks=k)

    def twin(s, k):
        return _torch_masked(s, scale=SCALE, softcap=SOFTCAP, sinks=k)

    torch.testing.assert_close(torch.func.vmap(fused)(scores, sinks), torch.func.vmap(twin)(scores, sinks))
    assert len(launches) == (backend == "triton")
    shared = torch.func.vmap(fused, (None, 0))(scores[0], sinks)
    torch.testing.assert_close(shared, torch.stack([twin(scores[0], k) for k in sinks]))
    per_sample = torch.func.vmap(torch.func.grad(_scalar(fused), argnums=(0, 1)))(scores, sinks)
    torch.testing.assert_close(
        per_sample, torch.func.vmap(torch.func.grad(_scalar(twin), argnums=(0, 1)))(scores, sinks)
    )


def test_forward_over_forward_mode_is_refused_under_softcapping_and_sinks(kernels):
    """torch runs a Function's jvp with forward-mode AD off: a jvp of the jvp would silently drop
    the torch ops' tangents, so it raises; reverse over forward and forward over reverse work."""
    scores, sinks = random((1, 2, 2, 3), torch.float64), random((2,), torch.float64, seed=1)

    def f(s):
        return fused_softmax.masked_softmax(s, softcap=SOFTCAP, sinks=sinks).sin().sum()

    with pytest.raises(NotImplementedError, match=r"forward-mode AD over forward-mode AD .*torch.func.hessian"):
        torch.func.jacfwd(torch.func.jacfwd(f))(scores)
    with fused_softmax.use_backend("torch"):
        expected = torch.func.jacfwd(torch.func.jacfwd(f))(scores)
    torch.testing.assert_close(torch.func.jacrev(torch.func.jacfwd(f))(scores), expected)
    torch.testing.assert_close(torch.func.hessian(f)(scores), expected)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_third_forward_mode_level_is_refused(kernels, name):
    """jacfwd of jacfwd runs through the kernels and matches torch; a third forward-mode level
    would reach the Jacobian product's y-tangent in torch ops, which drop it: it raises."""
    x = random((2, 4), torch.float64)

    def f(x):
        return getattr(fused_softmax, name)(x, -1).sin().sum()

    jacfwd = torch.func.jacfwd
    with fused_softmax.use_backend("torch"):
        expected = jacfwd(jacfwd(f))(x)
    torch.testing.assert_close(jacfwd(jacfwd(f))(x), expected)
    with pytest.raises(NotImplementedError, match="a third forward-mode level"):
        jacfwd(jacfwd(jacfwd(f)))(x)


# linear_cross_entropy: [3, 4, 3] inputs are 3 entries of 4 tokens of 3 features, 6 classes;
# chunks of 3 tokens (vmap's 12 tokens: 4 chunks, the entries' boundaries inside them), with
# vocab_chunk 4 classes (2 parts, the last partial) each part's statistics, then its gradient.
LINEAR_SHAPES = ((3, 4, 3), (6, 3), (6,))
LINEAR_ARGNUMS = (0, 1, 2)


def _linear_pair(reduction, vocab_chunk=None, chunk_size=3, **options):
    """(fused, torch) linear_cross_entropy of (input, weight, bias), targets a function of the
    input's shape (one ignored); torch's twin is the eager cross-entropy of F.linear's logits."""
    options = CE_OPTIONS | options

    def targets(x):
        target = (torch.arange(math.prod(x.shape[:-1])) * 3 + 1) % LINEAR_SHAPES[1][0]
        target[1:2] = -100
        return target.reshape(x.shape[:-1])

    def fused(x, w, b):
        chunks = dict(chunk_size=chunk_size, vocab_chunk_size=vocab_chunk)
        return fused_softmax.linear_cross_entropy(x, w, targets(x), b, reduction=reduction, **chunks, **options)

    def torch_twin(x, w, b):
        logits, target = F.linear(x, w, b).reshape(-1, w.shape[0]), targets(x).reshape(-1)
        smoothing, z_loss, softcap = options["label_smoothing"], options["z_loss"], options["softcap"]
        loss = torch_cross_entropy(logits, target, None, -100, reduction, smoothing, z_loss, softcap)
        return loss.reshape(x.shape[:-1]) if reduction == "none" else loss

    return fused, torch_twin


LINEAR_CASES = [
    Case("linear_mean", *_linear_pair("mean"), LINEAR_SHAPES, in_dims=(0, None, None)),
    # 2 tokens an entry, chunks of 4 (the batch's 6 tokens: 2 chunks, the last partial): jacfwd runs
    # the chunks again for each basis vector of the input (in one call) and of the bias (one each).
    Case(
        "linear_none_vocab_chunks",
        *_linear_pair("none", 4, chunk_size=4, softcap=None),
        ((3, 2, 3), *LINEAR_SHAPES[1:]),
        in_dims=(0, None, None),
    ),
]
LINEAR_TRANSFORMS = {
    name: TRANSFORMS[name] for name in ("vmap", "vmap_in_dims", "grad", "vjp", "jacrev", "jacfwd", "jvp")
} | {
    # per-example gradients of the input, weight and bias (a weight gradient per entry)
    "per_sample_grad": lambda f, args, case: torch.func.vmap(
        torch.func.grad(_scalar(f), argnums=LINEAR_ARGNUMS), case.batch_dims(args)
    )(*args),
    # the batch's losses summed, differentiated through vmap
    "grad_of_vmap": lambda f, args, case: torch.func.grad(
        lambda *a: _scalar(torch.func.vmap(f, case.batch_dims(a)))(*a), argnums=LINEAR_ARGNUMS
    )(*args),
}
# With vocab chunks, jacfwd w.r.t. the weight too would be a call per basis vector of it: 18 more.
ARGNUMS.update(linear_mean=LINEAR_ARGNUMS, linear_none_vocab_chunks=(0, 2))


@pytest.mark.parametrize("transform", list(LINEAR_TRANSFORMS))
@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
def test_linear_cross_entropy_transform_matches_torch(backend, case, transform):
    """Every first-derivative transform, w.r.t. the input, weight and bias (jacrev and jacfwd too)."""
    args = case.inputs()
    actual = LINEAR_TRANSFORMS[transform](case.fused, args, case)
    expected = LINEAR_TRANSFORMS[transform](case.torch, args, case)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
def test_linear_cross_entropy_gradcheck_with_batched_and_forward_checks(kernels, case):
    """Fast mode (random projections) keeps the interpreted launches few."""
    args = [a.requires_grad_() for a in case.first(case.inputs())]
    assert first_derivatives_check(case.fused, args)


def test_linear_cross_entropy_vmap_is_more_tokens_of_the_same_chunks(kernels, launches):
    """3 entries of 4 tokens, chunks of 3: the vmapped call's 12 tokens are 4 chunks, one launch
    each, the entries' boundaries inside them (a call per entry would be 6); each entry's mean
    divides by its own count of targets (ignored 0, 1 and 3 times), and so does its input
    gradient. Per-example weight gradients are a call per entry (an accumulator each): 6."""
    x, w = random((3, 4, 3), torch.float64), random((6, 3), torch.float64, seed=1)
    targets = torch.tensor([[1, 2, 3, 4], [0, -100, 2, 5], [-100, -100, -100, 3]])

    def loss(x, t, w=w):
        return fused_softmax.linear_cross_entropy(x, w, t, label_smoothing=0.1, chunk_size=3)

    def twin(x, t, w=w):
        return F.cross_entropy(F.linear(x, w), t, label_smoothing=0.1)

    torch.testing.assert_close(torch.func.vmap(loss)(x, targets), torch.func.vmap(twin)(x, targets))
    assert len(launches) == 4
    per_sample = torch.func.vmap(torch.func.grad(loss))(x, targets)
    torch.testing.assert_close(per_sample, torch.func.vmap(torch.func.grad(twin))(x, targets))
    assert len(launches) == 8
    per_example_weights = torch.func.vmap(torch.func.grad(loss, argnums=2), (0, 0, None))(x, targets, w)
    expected = torch.func.vmap(torch.func.grad(twin, argnums=2), (0, 0, None))(x, targets, w)
    torch.testing.assert_close(per_example_weights, expected)
    assert len(launches) == 14


def test_linear_cross_entropy_vmap_over_weights_is_refused(launches):
    """Per-example weights (a batched weight or bias): the chunks share one matmul weight. Raised
    before any launch."""
    x, w, b = LINEAR_CASES[0].first(LINEAR_CASES[0].inputs())
    with (
        fused_softmax.use_backend("triton"),
        pytest.raises(NotImplementedError, match="weight and bias must be the same for every batch entry"),
    ):
        torch.func.vmap(LINEAR_CASES[0].fused, (None, 0, None))(x, w.expand(2, *w.shape), b)
    assert not launches


SECOND_DERIVATIVES = {
    "hessian": lambda f, args: torch.func.hessian(f)(*args),
    "jacrev_jacrev": lambda f, args: torch.func.jacrev(torch.func.jacrev(f))(*args),
    "jacfwd_jacfwd": lambda f, args: torch.func.jacfwd(torch.func.jacfwd(f))(*args),
    "jacrev_jacfwd": lambda f, args: torch.func.jacrev(torch.func.jacfwd(f, argnums=1))(*args),
}


@pytest.mark.parametrize("transform", list(SECOND_DERIVATIVES))
@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
def test_linear_cross_entropy_second_derivatives_are_refused(kernels, case, transform):
    """Every second derivative raises, saying why, rather than treating the gradients or
    tangents as constants."""
    with pytest.raises(RuntimeError, match=re.escape(NO_DOUBLE_BACKWARD)):
        SECOND_DERIVATIVES[transform](_scalar(case.fused), case.first(case.inputs()))
