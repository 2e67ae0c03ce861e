"""fused_softmax.linear_cross_entropy against float64 references and F.cross_entropy(F.linear(...)):
values and input, weight and bias gradients over chunks of tokens and of the vocabulary (partial
ones included), both backends, torch's errors, torch.compile (fullgraph; a compiled vmap too) and
opcheck, first derivatives only, and its peak memory, measured, against the full logits'."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import TOLERANCES, assert_close, assert_no_less_accurate_than_torch, random

import fused_softmax
from fused_softmax import _launch
from fused_softmax.linear_cross_entropy import (
    MIN_CHUNK_CLASSES,
    MIN_CHUNK_ROWS,
    NO_DOUBLE_BACKWARD,
    chunk_shape,
    linear_cross_entropy_backward_op,
    linear_cross_entropy_op,
    linear_cross_entropy_tangent_op,
)
from fused_softmax.testing import allocation_peak, limit_block, reference

TOKENS, HIDDEN, VOCAB = 12, 8, 40


def layer(dtype, device, batch=(TOKENS,), bias=True):
    """(input [*batch, H], weight [V, H], bias [V] or None, target [*batch]), all that take
    gradients requiring them; two targets ignored."""
    x = random((*batch, HIDDEN), dtype, device, scale=1.0).requires_grad_()
    w = random((VOCAB, HIDDEN), dtype, device, scale=0.5, seed=1).requires_grad_()
    b = random((VOCAB,), dtype, device, scale=0.5, seed=2).requires_grad_() if bias else None
    target = torch.randint(VOCAB, batch, generator=torch.Generator().manual_seed(3)).to(device)
    target.view(-1)[[1, 7]] = -100
    return x, w, b, target


def expected(x, w, b, target, upstream, reduction, **options):
    """Loss and (input, weight, bias) gradients in float64: the reference cross-entropy of the
    float64 logits, its logits' gradient G, then G·W, Gᵀ·X and Σ G."""
    x64, w64 = x.detach().double().reshape(-1, HIDDEN).numpy(), w.detach().double().numpy()
    logits = x64 @ w64.T + (0 if b is None else b.detach().double().numpy())
    flat = target.reshape(-1)
    grad_up = upstream.reshape(-1) if reduction == "none" else upstream
    loss = reference.cross_entropy(logits, flat, reduction=reduction, **options)
    g = reference.cross_entropy_backward(logits, flat, grad_up, reduction=reduction, **options)
    return (
        np.reshape(loss, target.shape if reduction == "none" else ()),
        (g @ w64).reshape(x.shape),
        g.T @ x64,
        g.sum(0),
    )


CASES = [
    ("mean", {}),
    ("sum", dict(label_smoothing=0.1)),
    ("none", dict(z_loss=1e-2, softcap=2.0)),
    ("mean", dict(label_smoothing=0.2, z_loss=1e-3, softcap=5.0)),
]


def expected_launches(reduction, vocab_parts):
    """The kernels of 3 chunks of tokens: one cross-entropy kernel each, or with ``vocab_parts``
    each part's statistics, then each part's gradient; for 'none' the backward runs them again."""
    if not vocab_parts:
        return ["cross_entropy_kernel"] * (3 if reduction != "none" else 6)
    statistics, grads = ["vocab_slice_statistics_kernel"] * vocab_parts, ["vocab_slice_grad_kernel"] * vocab_parts
    return (statistics * 3 if reduction == "none" else []) + (statistics + grads) * 3


@pytest.mark.parametrize("vocab_chunk", [None, 16], ids=["whole-vocabulary", "vocab-chunks"])
@pytest.mark.parametrize("reduction, options", CASES, ids=[f"{r}-{'-'.join(o) or 'plain'}" for r, o in CASES])
def test_matches_reference(backend, launches, device, reduction, options, vocab_chunk):
    """Chunks of 5 tokens (12: the last partial); with vocab_chunk, of 16 classes (40: the last
    partial), each part read by the kernels in blocks of 8 (several blocks a part)."""
    x, w, b, target = layer(torch.float64, device, batch=(3, 4))
    with limit_block(8):
        loss = fused_softmax.linear_cross_entropy(
            x, w, target, b, reduction=reduction, chunk_size=5, vocab_chunk_size=vocab_chunk, **options
        )
        upstream = random(loss.shape, torch.float64, device, scale=1.0, seed=4)
        grads = torch.autograd.grad(loss, (x, w, b), upstream)
    if backend == "triton":
        assert [launch.name for launch in launches] == expected_launches(reduction, 3 if vocab_chunk else 0)
    want_loss, *want_grads = expected(x, w, b, target, upstream, reduction, **options)
    assert loss.shape == torch.Size(np.shape(want_loss))
    assert_close(loss, want_loss)
    for grad, want in zip(grads, want_grads, strict=True):
        assert_close(grad, want)
    if not options.get("z_loss"):
        torch_loss = F.cross_entropy(
            F.linear(x, w, b).flatten(0, 1), target.flatten(), reduction=reduction, **options
        ).reshape(loss.shape)
        torch.testing.assert_close(loss, torch_loss)


@pytest.mark.parametrize("vocab_chunk", [None, 16], ids=["whole-vocabulary", "vocab-chunks"])
def test_strided_targets(kernels, device, vocab_chunk):
    """Targets that are a slice of a larger tensor (a stride of 2) are read as torch reads them."""
    x, w, b, target = layer(torch.float64, device)
    strided = torch.stack([target, target.flip(0)], 1)[:, 0]
    assert strided.stride() == (2,)
    with limit_block(8):
        loss = fused_softmax.linear_cross_entropy(x, w, strided, b, chunk_size=5, vocab_chunk_size=vocab_chunk)
        grads = torch.autograd.grad(loss, (x, w, b))
    want_loss, *want_grads = expected(x, w, b, target, torch.tensor(1.0, dtype=torch.float64), "mean")
    assert_close(loss, want_loss)
    for grad, want in zip(grads, want_grads, strict=True):
        assert_close(grad, want)


@pytest.mark.parametrize("vocab_chunk", [None, 16], ids=["whole-vocabulary", "vocab-chunks"])
@pytest.mark.parametrize("case", ["uint8 targets", "negative smoothing", "NaN smoothing"])
def test_what_torch_takes_and_how(kernels, device, vocab_chunk, case):
    """uint8 targets (which torch's meta kernel refuses but its real one takes), and a negative
    or NaN label_smoothing, which torch takes as none: torch's loss and gradients."""
    x, w, b, target = layer(torch.float64, device)
    options = {"negative smoothing": dict(label_smoothing=-0.1), "NaN smoothing": dict(label_smoothing=math.nan)}
    options = options.get(case, {})
    if case == "uint8 targets":
        target = target.clamp(min=0).to(torch.uint8)  # no ignore_index (-100) in uint8
    with limit_block(8):
        loss = fused_softmax.linear_cross_entropy(
            x, w, target, b, chunk_size=5, vocab_chunk_size=vocab_chunk, **options
        )
        grads = torch.autograd.grad(loss, (x, w, b))
    want_loss = F.cross_entropy(F.linear(x, w, b), target, **options)
    torch.testing.assert_close(loss, want_loss)
    for grad, want in zip(grads, torch.autograd.grad(want_loss, (x, w, b)), strict=True):
        torch.testing.assert_close(grad, want)


@pytest.mark.parametrize("offset", ["every class", "the last part"])
def test_large_logits_keep_the_smoothing_term_precise(backend, device, offset):
    """fp32 logits near 1e4, exact whatever the matmul's order (small integers times halves, plus
    a bias). With the bias of 1e4 on every class the smoothed losses are as accurate as torch's
    (summed raw, their error was 6e-5 on losses of 4); with it on the last vocabulary part, of
    8 classes, each part's Σ (x' - its max) moves to the row's max by its class count times the
    step."""
    generator = torch.Generator().manual_seed(6)
    x = torch.randint(-2, 3, (TOKENS, HIDDEN), generator=generator).float().to(device)
    w = (torch.randint(-2, 3, (VOCAB, HIDDEN), generator=generator) / 2).to(device)
    b = random((VOCAB,), torch.float32, device, scale=0.5, seed=2)
    b[slice(None) if offset == "every class" else slice(32, None)] += 1e4
    target = torch.randint(VOCAB, (TOKENS,), generator=generator).to(device)
    with limit_block(8):
        loss = fused_softmax.linear_cross_entropy(
            x, w, target, b, reduction="none", label_smoothing=0.1, chunk_size=5, vocab_chunk_size=16
        )
    logits = F.linear(x, w, b)
    torch_loss = F.cross_entropy(logits, target, reduction="none", label_smoothing=0.1)
    want = reference.cross_entropy(logits, target, reduction="none", label_smoothing=0.1)
    if offset == "every class":
        assert_no_less_accurate_than_torch(loss, want, torch_loss)
    else:
        assert_close(loss, want)


# (path, reduction): a mean and a sum scale the same precomputed gradients, on either path.
UPSTREAM_PATHS = [("function", "none"), ("function", "mean"), ("op", "sum")]


@pytest.mark.parametrize("path, reduction", UPSTREAM_PATHS, ids=["-".join(case) for case in UPSTREAM_PATHS])
@pytest.mark.parametrize("vocab_chunk", [None, 16], ids=["whole-vocabulary", "vocab-chunks"])
def test_ignored_tokens_have_zero_gradient_whatever_the_upstream(kernels, device, vocab_chunk, reduction, path):
    """A NaN upstream gradient (on every token for 'none'): an ignored token's input gradient is
    0, as torch's; the others' NaN. Through the autograd Function and through the custom op
    (what torch.compile runs), whose mean and sum scale precomputed gradients."""
    x, w, b, target = layer(torch.float64, device)
    ignored = target == -100
    with limit_block(8):
        if path == "function":
            loss = fused_softmax.linear_cross_entropy(
                x, w, target, b, reduction=reduction, chunk_size=5, vocab_chunk_size=vocab_chunk
            )
        else:
            options = (-100, reduction, 0.0, 0.0, None, 5, vocab_chunk, True, True, True)
            loss = linear_cross_entropy_op(x, w, b, target, *options)[0]
        (dx,) = torch.autograd.grad(loss, x, torch.full_like(loss, float("nan")))
    assert ignored.any() and (dx[ignored] == 0).all() and dx[~ignored].isnan().all()


@pytest.mark.parametrize("options", [{}, CASES[-1][1]], ids=["plain", "every-option"])
@pytest.mark.parametrize("vocab_chunk", [None, 16], ids=["whole-vocabulary", "vocab-chunks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_low_precision_weights_accumulate_in_fp32(kernels, device, dtype, vocab_chunk, options):
    """Many chunks of one token: the weight gradient is the sum of 12 rank-one terms, summed in
    fp32; with vocab_chunk, the input gradient is the sum of 3 parts, summed in fp32 too."""
    x, w, b, target = layer(dtype, device)
    loss = fused_softmax.linear_cross_entropy(x, w, target, b, chunk_size=1, vocab_chunk_size=vocab_chunk, **options)
    grads = torch.autograd.grad(loss, (x, w, b))
    want_loss, *want_grads = expected(x, w, b, target, torch.tensor(1.0, dtype=torch.float64), "mean", **options)
    rtol, atol = TOLERANCES[dtype]
    assert loss.dtype == dtype and all(g.dtype == dtype for g in grads)
    # The logits themselves are rounded to the dtype first (as F.linear's): a few ulps of slack.
    torch.testing.assert_close(loss.double(), torch.as_tensor(want_loss), rtol=4 * rtol, atol=atol)
    for grad, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(grad.double(), torch.as_tensor(want), rtol=4 * rtol, atol=4 * rtol * 0.1)


@pytest.mark.parametrize("vocab_chunk", [None, 4], ids=["whole-vocabulary", "vocab-chunks"])
def test_gradcheck_through_kernels(kernels, device, vocab_chunk):
    """fp64, 3 chunks of tokens (the last partial), with vocab_chunk 2 of classes, of a layer
    small enough for the numerical Jacobian."""
    x = random((5, 3), torch.float64, device, scale=1.0).requires_grad_()
    w = random((6, 3), torch.float64, device, seed=1).requires_grad_()
    b = random((6,), torch.float64, device, seed=2).requires_grad_()
    target = torch.tensor([0, 5, -100, 2, 3], device=device)
    for reduction in ("mean", "none"):

        def loss(x, w, b, reduction=reduction):
            options = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-2, softcap=3.0, chunk_size=2)
            options["vocab_chunk_size"] = vocab_chunk
            return fused_softmax.linear_cross_entropy(x, w, target, b, **options)

        assert torch.autograd.gradcheck(loss, (x, w, b), fast_mode=True)


def test_only_the_gradients_asked_for(kernels, device):
    x, w, _, target = layer(torch.float32, device, bias=False)
    w.requires_grad_(False)
    (grad,) = torch.autograd.grad(fused_softmax.linear_cross_entropy(x, w, target, chunk_size=5), x)
    _, want, _, _ = expected(x, w, None, target, torch.tensor(1.0, dtype=torch.float64), "mean")
    assert_close(grad, want)
    with torch.no_grad():
        loss = fused_softmax.linear_cross_entropy(x, w, target)
    assert not loss.requires_grad


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_peak_memory_is_a_small_fraction_of_the_logits(device, name):
    """Every storage allocated during forward and backward, alive at once, counted: one chunk of
    8 tokens' logits plus the gradients, against the 256 tokens' logits torch holds several of.
    Launches are counted by name only: the ``launches`` fixture would keep every chunk alive."""
    tokens, hidden, vocab, chunk = 256, 8, 512, 8
    x = random((tokens, hidden), torch.float32, device).requires_grad_()
    w = random((vocab, hidden), torch.float32, device, scale=0.3, seed=1).requires_grad_()
    target = torch.randint(vocab, (tokens,), generator=torch.Generator().manual_seed(2)).to(device)
    logits_bytes, chunk_bytes = tokens * vocab * 4, chunk * vocab * 4
    launched = []
    with fused_softmax.use_backend(name), _launch.overridden(observe=lambda launch: launched.append(launch.name)):
        with allocation_peak() as ours:
            loss = fused_softmax.linear_cross_entropy(x, w, target, chunk_size=chunk)
            grads = torch.autograd.grad(loss, (x, w))
    assert launched == (["cross_entropy_kernel"] * (tokens // chunk) if name == "triton" else [])
    with allocation_peak() as theirs:
        torch_loss = F.cross_entropy(F.linear(x, w), target)
        torch_grads = torch.autograd.grad(torch_loss, (x, w))
    torch.testing.assert_close(loss, torch_loss)
    torch.testing.assert_close(grads, torch_grads)
    assert theirs.peak >= 2 * logits_bytes, theirs  # the tracker sees the full logits and their softmax
    assert chunk_bytes <= ours.peak <= logits_bytes / 4, (ours, logits_bytes)


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_vocab_chunks_never_hold_a_chunk_of_tokens_logits(device, name):
    """Chunks of 64 tokens and 64 classes: beside the gradients, the kernels' path holds one
    [64, 64] part (its gradient written over it) and the rows' statistics, torch's eager chunks
    a few parts; either less than half of one chunk of tokens' logits over the whole vocabulary
    (64 × 512), and a quarter of the full logits with the gradients."""
    tokens, hidden, vocab, chunk, vocab_chunk = 256, 8, 512, 64, 64
    x = random((tokens, hidden), torch.float32, device).requires_grad_()
    w = random((vocab, hidden), torch.float32, device, scale=0.3, seed=1).requires_grad_()
    target = torch.randint(vocab, (tokens,), generator=torch.Generator().manual_seed(2)).to(device)
    logits_bytes, part_bytes = tokens * vocab * 4, chunk * vocab_chunk * 4
    launched = []
    with fused_softmax.use_backend(name), _launch.overridden(observe=lambda launch: launched.append(launch.name)):
        with allocation_peak() as ours:
            loss = fused_softmax.linear_cross_entropy(x, w, target, chunk_size=chunk, vocab_chunk_size=vocab_chunk)
            grads = torch.autograd.grad(loss, (x, w))
    parts = (tokens // chunk) * (vocab // vocab_chunk)
    want = ["vocab_slice_statistics_kernel"] * parts + ["vocab_slice_grad_kernel"] * parts
    assert sorted(launched) == (sorted(want) if name == "triton" else [])
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(x, w), target))
    torch.testing.assert_close(grads, torch.autograd.grad(F.cross_entropy(F.linear(x, w), target), (x, w)))
    extra = ours.peak - (tokens + vocab) * hidden * 4  # beyond the input and weight gradients
    # Under the interpreter a launch also copies its tensors while it runs: up to 3 parts.
    assert part_bytes <= extra <= (3 if name == "triton" else 4) * part_bytes, ours
    assert extra <= chunk * vocab * 4 / 2 and ours.peak <= logits_bytes / 4, (ours, logits_bytes)


def test_default_chunks():
    cpu = torch.device("cpu")
    assert chunk_shape(100, 4096, 128_256, 2, cpu) == (100, 128_256)
    assert chunk_shape(16384, 4096, 128_256, 2, cpu) == (MIN_CHUNK_ROWS, 128_256)
    assert chunk_shape(32768, 4096, 4096, 2, cpu) == (32768, 4096)  # logits no larger than the input
    assert chunk_shape(32768, 4096, 128_256, 2, cpu, chunk_size=100) == (100, 128_256)
    assert chunk_shape(16384, 4096, 128_256, 2, cpu, vocab_chunk_size=10_000) == (MIN_CHUNK_ROWS, 10_000)
    for name in ("chunk_size", "vocab_chunk_size"):
        with pytest.raises(ValueError, match=name):
            chunk_shape(10, 4, 4, 4, cpu, **{name: 0})


def test_default_chunks_on_a_gpu_follow_its_free_memory(monkeypatch):
    """A quarter of the free memory: fewer tokens a chunk, down to MIN_CHUNK_ROWS; below that,
    the vocabulary is cut too, into parts of at least MIN_CHUNK_CLASSES."""
    cuda = torch.device("cuda")
    free = 16 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 80 * 2**30))
    assert chunk_shape(16384, 4096, 128_256, 2, cuda) == (MIN_CHUNK_ROWS, 128_256)
    assert chunk_shape(8192, 4096, 4096, 2, cuda) == (8192, 4096)
    free = 2**30  # 256 MiB a chunk: 1024 tokens of bf16 logits over 256k classes are 512 MiB
    assert chunk_shape(16384, 4096, 262_144, 2, cuda) == (MIN_CHUNK_ROWS, 131_072)
    free = 2**20
    assert chunk_shape(16384, 4096, 262_144, 2, cuda) == (MIN_CHUNK_ROWS, MIN_CHUNK_CLASSES)
    assert chunk_shape(16384, 4096, 262_144, 2, cuda, vocab_chunk_size=512) == (MIN_CHUNK_ROWS, 512)


def torch_error(call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 - any of torch's errors is the expectation
        return e
    raise AssertionError("torch accepted the call")


BAD = {
    "hidden size": lambda x, w, t: (x[:, :5], w, t),
    "target batch size": lambda x, w, t: (x, w, t[:5]),
    "int32 target": lambda x, w, t: (x, w, t.int()),
    "target out of range": lambda x, w, t: (x, w, t.clone().fill_(VOCAB)),
    "weight dtype": lambda x, w, t: (x, w.double(), t),
    "integer input and weight": lambda x, w, t: ((x * 4).long(), (w * 4).long(), t),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_torchs_error(launches, case):
    """The error type and message of torch's composition, raised on the host: nothing launches."""
    x, w, _, target = layer(torch.float32, "cpu")
    x, w, target = BAD[case](x.detach(), w.detach(), target)
    error = torch_error(lambda: F.cross_entropy(F.linear(x, w), target))
    with fused_softmax.use_backend("triton"), pytest.raises(type(error), match=re.escape(str(error))):
        fused_softmax.linear_cross_entropy(x, w, target)
    assert not launches


COMPILED = [("mean", None, "aot_eager"), ("none", 16, "aot_eager"), ("sum", 16, "inductor")]


@pytest.mark.parametrize("reduction, vocab_chunk, compiler", COMPILED, ids=["-".join(map(str, c)) for c in COMPILED])
def test_compiles_without_a_graph_break(kernels, device, reduction, vocab_chunk, compiler):
    """fullgraph=True, forward and backward through the custom ops: eager's loss and gradients."""
    torch._dynamo.reset()
    x, w, b, target = layer(torch.float32, device)
    options = dict(reduction=reduction, chunk_size=5, vocab_chunk_size=vocab_chunk, label_smoothing=0.1, softcap=3.0)

    def model(x, w, b):
        return fused_softmax.linear_cross_entropy(x * 2, w, target, b, **options) + x.mean()

    loss = torch.compile(model, fullgraph=True, backend=compiler)(x, w, b)
    upstream = random(loss.shape, torch.float32, device, scale=1.0, seed=4)
    grads = torch.autograd.grad(loss, (x, w, b), upstream)
    want = model(x, w, b)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grads, torch.autograd.grad(want, (x, w, b), upstream))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(kernels, device, reduction):
    x, w, b, target = layer(torch.float64, device)
    options = (-100, reduction, 0.1, 1e-2, 3.0, 5, 16, True, True, True)
    torch.library.opcheck(linear_cross_entropy_op, (x, w, b, target, *options))
    upstream = random((TOKENS,), torch.float64, device, scale=1.0, seed=4)
    backward_options = (-100, 0.1, 1e-2, 3.0, 5, 16, True, True, True)
    tensors = [t.detach() for t in (x, w, b)]  # not itself differentiable: first derivatives only
    torch.library.opcheck(linear_cross_entropy_backward_op, (*tensors, target, upstream, *backward_options))
    tangents = [t.cos() for t in tensors]
    torch.library.opcheck(linear_cross_entropy_tangent_op, (*tensors, target, *tangents, *backward_options[:-3]))


def test_first_derivatives_only(kernels, device):
    """A double backward raises a clear error; a backward with create_graph=True that is not
    differentiated again (torch.func.grad's) gives the gradients. torch.func's first-derivative
    transforms, and the other refusals: tests/test_transforms.py."""
    x, w, _, target = layer(torch.float64, device, bias=False)

    def loss(x):
        return fused_softmax.linear_cross_entropy(x, w, target, chunk_size=5)

    (grad,) = torch.autograd.grad(loss(x), x, create_graph=True)
    torch.testing.assert_close(torch.func.grad(loss)(x), grad)
    with pytest.raises(RuntimeError, match=re.escape(NO_DOUBLE_BACKWARD)):
        torch.autograd.grad(grad.sum(), x)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_vmap_is_more_tokens_of_the_same_chunks(kernels, launches, device, reduction):
    """The op's vmap rule: 3 entries of 4 tokens in chunks of 3 are 4 launches (a call per entry
    would be 6), each entry reduced alone; and its gradients."""
    torch._dynamo.reset()
    x, w, b, _ = layer(torch.float64, device, batch=(3, 4))
    targets = torch.tensor([[0, 5, -100, 2], [1, 2, 3, 4], [0, 0, -100, -100]], device=device)

    def loss(x, t):
        return fused_softmax.linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_size=3, label_smoothing=0.1)

    def twin(x, t):
        return F.cross_entropy(F.linear(x, w, b), t, reduction=reduction, label_smoothing=0.1)

    compiled = torch.compile(torch.func.vmap(loss), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        actual = compiled(x, targets)
    assert len(launches) == 4
    torch.testing.assert_close(actual, torch.func.vmap(twin)(x, targets))
    # Differentiated: the batched input's gradient too, which under torch.compile only the op's
    # vmap rule sees wanted; the weight's and bias's, a call per entry for a mean.
    grads = torch.autograd.grad(compiled(x, targets).sin().sum(), (x, w, b))
    torch.testing.assert_close(grads, torch.autograd.grad(torch.func.vmap(twin)(x, targets).sin().sum(), (x, w, b)))


def test_memory_table_script_runs():
    """``python -m fused_softmax.bench.memory`` (the README's table) on a tiny case: the chunked
    loss's peak is below torch's, and the vocabulary chunks' below the token chunks'."""
    from fused_softmax.bench import memory

    cases = [(64, 8, 512, 16, None, "torch"), (64, 8, 512, 16, 64, "torch")]
    token_chunks, vocab_chunks = memory.records(cases)
    assert token_chunks["fused"] < token_chunks["torch"]
    assert vocab_chunks["fused"] < token_chunks["fused"]
