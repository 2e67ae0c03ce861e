"""masked_softmax's and attention's logit softcapping (Gemma 2) and attention sinks (gpt-oss)
against the float64 reference, on both backends, on chip and online, with their gradients.

Scores are [B, H, Lq, Lk] = [2, 2, 3, 5], as in test_attention; ``ONLINE`` caps the on-chip row so
the same rows stream through the online regime.
"""

import pytest
import torch
from support import INTERPRETED, assert_close, assert_no_less_accurate_than_torch

import fused_softmax
from fused_softmax import _softcap_sinks_ops as ops
from fused_softmax.testing import limit_block, reference

SHAPE = (2, 2, 3, 5)
ONLINE = 2
SCALE = 0.6
OPTIONS = {"softcap": dict(softcap=2.0), "sinks": dict(sinks=True), "both": dict(softcap=2.0, sinks=True)}


def masks(dtype):
    padding = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    padding[1, ..., 2:] = False
    hidden_row = torch.ones(3, 5, dtype=torch.bool)
    hidden_row[1] = False  # every key hidden: zeros with sinks as without
    return {
        "none": None,
        "bool padding [B,1,1,Lk]": padding,
        "bool with a hidden row [Lq,Lk]": hidden_row,
        "additive [B,1,Lq,Lk]": torch.randn(2, 1, 3, 5, generator=torch.Generator().manual_seed(3)).to(dtype),
    }


def cases():
    """fp32 and fp64: every option with every mask, on chip and online in turn, causal in turn;
    fp16 and bf16: each option once."""
    for i, option in enumerate(OPTIONS):
        for j, mask_name in enumerate(masks(torch.float32)):
            dtype = (torch.float32, torch.float64)[(i + j) % 2]
            yield dtype, option, mask_name, (i + j) % 3 == 0, (None, ONLINE)[j % 2]
        yield (torch.float16, torch.bfloat16, torch.float16)[i], option, "bool padding [B,1,1,Lk]", True, None


def case_name(case):
    dtype, option, mask_name, causal, max_block = case
    return f"{str(dtype)[6:]}-{option}-{mask_name}-causal={causal}-{'online' if max_block else 'on_chip'}"


def inputs(dtype, option):
    generator = torch.Generator().manual_seed(0)
    # Scores of 4 standard deviations: the cap of 2 bends most of them.
    scores = (4 * torch.randn(SHAPE, generator=generator)).to(dtype).requires_grad_()
    dy = torch.randn(SHAPE, generator=generator).to(dtype)
    options = dict(OPTIONS[option])
    if options.pop("sinks", False):
        sinks = torch.randn(SHAPE[1], generator=generator)
        sinks[0] = float("-inf")  # a head without a sink: its hidden row is zeros too, not NaN
        options["sinks"] = sinks.to(dtype).requires_grad_()
    return scores, dy, options


@pytest.mark.parametrize("case", list(cases()), ids=case_name)
def test_matches_reference(case, backend):
    """fp32/fp64 within tolerance of the float64 reference; fp16/bf16 no less accurate than
    eager torch in the same dtype (the capped scores, the sink column concatenated)."""
    dtype, option, mask_name, causal, max_block = case
    scores, dy, options = inputs(dtype, option)
    mask = masks(dtype)[mask_name]
    with limit_block(max_block):
        y = fused_softmax.masked_softmax(scores, mask, scale=SCALE, causal=causal, **options)
        wrt = (scores, options["sinks"]) if "sinks" in options else (scores,)
        grads = torch.autograd.grad(y, wrt, dy)
    offset = 0 if causal else None
    expected = reference.masked_softmax(scores, mask, SCALE, offset, **options)
    expected_grads = reference.masked_softmax_backward(scores, expected, dy, SCALE, **options)[: len(wrt)]
    if dtype in (torch.float32, torch.float64):
        assert_close(y, expected)
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            assert_close(grad, expected_grad)
    else:
        with fused_softmax.use_backend("torch"):
            torch_y = fused_softmax.masked_softmax(scores, mask, scale=SCALE, causal=causal, **options)
            torch_grads = torch.autograd.grad(torch_y, wrt, dy)
        assert_no_less_accurate_than_torch(y, expected, torch_y)
        for grad, expected_grad, torch_grad in zip(grads[1:], expected_grads[1:], torch_grads[1:], strict=True):
            assert_no_less_accurate_than_torch(grad, expected_grad, torch_grad)
        assert_cap_gradient_accuracy(grads[0], expected_grads[0], torch_grads[0], expected, dy, options)
    if mask_name.startswith("bool with a hidden row"):
        assert (y[..., 1, :] == 0).all() and (grads[0][..., 1, :] == 0).all()


def assert_cap_gradient_accuracy(grad, expected_grad, torch_grad, expected_y, dy, options):
    """The scores' gradient in fp16/bf16: as accurate as torch's, except that under softcapping the
    kernel recovers the capped scores from y rounded to its dtype, log(y) + lse: an error of up to
    eps in them, eps / softcap in tanh, 2 eps / softcap in the cap's derivative, times |dz|. The
    interpreter's bf16 casts truncate: two ulps more there, as in assert_no_less_accurate_than_torch."""
    softcap = options.get("softcap")
    dz = torch.as_tensor(reference.softmax_backward(expected_y, dy))
    recovery = 0.0 if softcap is None else 2 * torch.finfo(grad.dtype).eps * SCALE * dz.abs().max().item() / softcap
    expected_grad = torch.as_tensor(expected_grad)
    if INTERPRETED and grad.dtype == torch.bfloat16:
        recovery += 2 * 2**-7 * expected_grad.abs().max().item()
    ours = (grad.double() - expected_grad).abs().max().item()
    torchs = (torch_grad.double() - expected_grad).abs().max().item()
    assert ours <= 2 * torchs + 1e-5 + recovery, (ours, torchs, recovery)


def test_gradcheck_through_the_kernel(kernels):
    scores = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(2, dtype=torch.float64, requires_grad=True)
    additive = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    assert torch.autograd.gradcheck(
        lambda s, k: fused_softmax.masked_softmax(s, additive.detach(), scale=0.7, causal=True, softcap=1.5, sinks=k),
        (scores, sinks),
    )
    # With sinks alone an additive mask gets its gradient too, summed over its broadcast dims.
    assert torch.autograd.gradcheck(
        lambda s, m, k: fused_softmax.masked_softmax(s, m, scale=0.7, sinks=k), (scores, additive, sinks)
    )


def test_mask_gradient_under_softcapping_is_refused_on_the_kernels(kernels):
    scores = torch.randn(SHAPE)
    mask = torch.randn(3, 5, requires_grad=True)
    with pytest.raises(NotImplementedError, match="additive mask under softcapping"):
        fused_softmax.masked_softmax(scores, mask, softcap=2.0)
    with torch.no_grad():
        fused_softmax.masked_softmax(scores, mask, softcap=2.0)


@pytest.mark.parametrize(
    "options, error",
    [
        (dict(softcap=0.0), ValueError),
        (dict(softcap=float("inf")), ValueError),
        (dict(sinks=torch.zeros(3)), RuntimeError),
        (dict(sinks=torch.zeros(2, 1)), RuntimeError),
        (dict(sinks=torch.zeros(2, dtype=torch.long)), TypeError),
    ],
    ids=["softcap-zero", "softcap-inf", "sinks-heads", "sinks-2d", "sinks-int"],
)
def test_bad_options_raise(options, error):
    with pytest.raises(error):
        fused_softmax.masked_softmax(torch.randn(SHAPE), **options)


def test_attention_with_softcap_and_sinks_matches_torch(backend):
    """GQA (4 query heads on 2 key heads): a sink per query head; against the same math in torch."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 3, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    k, v = (torch.randn(2, 2, 5, 8, dtype=torch.float64, generator=generator, requires_grad=True) for _ in "kv")
    sinks = torch.randn(4, dtype=torch.float64, generator=generator, requires_grad=True)
    out = fused_softmax.attention(q, k, v, is_causal=True, enable_gqa=True, softcap=1.5, sinks=sinks)
    z = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 8**-0.5
    z = (1.5 * torch.tanh(z / 1.5)).masked_fill(~torch.ones(3, 5, dtype=torch.bool).tril(), float("-inf"))
    z = torch.cat([z, sinks[:, None, None].expand(2, 4, 3, 1)], -1)
    expected = torch.softmax(z, -1)[..., :-1] @ v.repeat_interleave(2, 1)
    dout = torch.randn(out.shape, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out, (q, k, v, sinks), dout)
    torch.testing.assert_close(grads, torch.autograd.grad(expected, (q, k, v, sinks), dout))


@pytest.mark.parametrize("option", [*OPTIONS, "bias"])
def test_compiles_fullgraph(kernels, launches, option):
    scores, dy, options = inputs(torch.float32, "sinks" if option == "bias" else option)
    if option == "bias":
        options = dict(bias=torch.randn(1, 2, 3, 5, requires_grad=True))
    mask = masks(torch.float32)["bool padding [B,1,1,Lk]"]

    def fn(s, **o):
        return fused_softmax.masked_softmax(s, mask, scale=SCALE, causal=True, **o)

    wrt = (scores, *(options[k] for k in ("sinks", "bias") if k in options))
    expected = fn(scores, **options)
    expected_grads = torch.autograd.grad(expected, wrt, dy)
    eager_launches = len(launches)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    y = compiled(scores, **options)
    grads = torch.autograd.grad(y, wrt, dy)
    assert len(launches) == 2 * eager_launches, "the compiled graph runs the same kernels"
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(grads, expected_grads)


def test_ops_pass_opcheck(kernels):
    scores = torch.randn(SHAPE, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(2, dtype=torch.float64, requires_grad=True)
    additive = torch.randn(3, 5, dtype=torch.float64)
    bias = torch.randn(2, 1, 5, dtype=torch.float64, requires_grad=True)
    padding = torch.rand(2, 1, 1, 5) > 0.3
    torch.library.opcheck(ops.masked_softmax_with_lse, (scores, additive, 0.5, 0, None, 2.0, sinks, None))
    torch.library.opcheck(ops.masked_softmax_with_lse, (scores, None, 2.0, None, None, None, sinks, None))
    torch.library.opcheck(ops.masked_softmax_with_lse, (scores, padding, 0.5, 0, None, None, None, bias))
    y, lse = ops.masked_softmax_with_lse(scores.detach(), additive, 0.5, 0, None, 2.0, sinks.detach(), None)
    dy = torch.randn_like(y)
    torch.library.opcheck(
        ops.masked_softmax_with_lse_backward, (y, dy, lse, additive, sinks.detach(), 0.5, 2.0, y.dtype)
    )
    # Differentiable (double backward under compile): its autograd formula.
    differentiated = [t.detach().requires_grad_() for t in (y, dy, lse, sinks)]
    y, dy, lse, sinks = differentiated
    torch.library.opcheck(ops.masked_softmax_with_lse_backward, (y, dy, lse, additive, sinks, 0.5, 2.0, y.dtype))


@pytest.mark.parametrize("op", ["forward", "backward"])
def test_ops_vmap_is_one_launch(kernels, launches, op):
    """The ops' vmap rules (a compiled vmap keeps them): one launch for the batch, against a loop."""
    scores = torch.randn(3, *SHAPE, dtype=torch.float64)
    sinks = torch.randn(2, dtype=torch.float64)
    additive = torch.randn(3, 5, dtype=torch.float64)
    if op == "forward":
        function = lambda s: ops.masked_softmax_with_lse(s, additive, 0.5, 0, None, 2.0, sinks, None)  # noqa: E731
        args = (scores,)
    else:
        y, lse = ops.masked_softmax_with_lse(scores[0], additive, 0.5, 0, None, 2.0, sinks, None)
        function = lambda dy: ops.masked_softmax_with_lse_backward(y, dy, lse, additive, sinks, 0.5, 2.0, y.dtype)  # noqa: E731
        args = (torch.randn_like(scores),)
        launches.clear()
    batched = torch.func.vmap(function)(*args)
    assert len(launches) == 1
    for out, expected in zip(batched, zip(*(function(a) for a in args[0]), strict=True), strict=True):
        torch.testing.assert_close(out, torch.stack(expected))


def test_strided_sinks(backend):
    """Sinks that are a strided view are read through a contiguous copy: the kernels index them as sinks_ptr + head."""
    scores = torch.randn(SHAPE, dtype=torch.float64)
    sinks = torch.randn(4, dtype=torch.float64)[::2]
    expected = reference.masked_softmax(scores, None, SCALE, sinks=sinks.contiguous())
    assert_close(fused_softmax.masked_softmax(scores, scale=SCALE, sinks=sinks), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("max_block", [None, ONLINE], ids=["on_chip", "online"])
def test_bias_beside_a_bool_mask(dtype, max_block, backend, launches):
    """T5's case: a learned bias [1, H, Lq, Lk] beside a padding mask [B, 1, 1, Lk] and the causal
    diagonal, both read where they lie; the bias's gradient summed over the batch."""
    scores, dy, _ = inputs(dtype, "softcap")
    bias = torch.randn(1, 2, 3, 5, dtype=dtype, generator=torch.Generator().manual_seed(4)).requires_grad_()
    padding = masks(dtype)["bool padding [B,1,1,Lk]"]
    with limit_block(max_block):
        y = fused_softmax.masked_softmax(scores, padding, scale=SCALE, causal=True, bias=bias)
        d_scores, d_bias = torch.autograd.grad(y, (scores, bias), dy)
    expected = reference.masked_softmax(scores, padding, SCALE, 0, bias=bias)
    dz = torch.as_tensor(reference.softmax_backward(expected, dy))
    assert_close(y, expected)
    assert_close(d_scores, SCALE * dz)
    assert d_bias.shape == bias.shape
    assert_close(d_bias, dz.sum_to_size(bias.shape))
    if backend == "triton":
        forward = launches[0].args
        assert forward["bias_ptr"].data_ptr() == bias.data_ptr() and forward["bias_stride_batch"] == 0
        assert forward["mask_ptr"].data_ptr() == padding.data_ptr()


def test_bias_with_an_additive_mask_or_softcapping_is_added_to_it(backend):
    """Where the kernels read no bias beside the mask, the two are added first (as torch
    broadcasts them); the result is the same."""
    scores, dy, _ = inputs(torch.float64, "softcap")
    bias = torch.randn(1, 2, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    additive = masks(torch.float64)["additive [B,1,Lq,Lk]"]
    y = fused_softmax.masked_softmax(scores, additive, scale=SCALE, bias=bias)
    assert_close(y, reference.masked_softmax(scores, additive, SCALE, bias=bias))
    padding = masks(torch.float64)["bool padding [B,1,1,Lk]"]
    y = fused_softmax.masked_softmax(scores, padding, scale=SCALE, softcap=2.0, bias=bias)
    assert_close(y, reference.masked_softmax(scores, padding, SCALE, softcap=2.0, bias=bias))
