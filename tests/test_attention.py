"""masked_softmax and attention against the float64 reference and torch's SDPA (math backend).

Scores are [B, H, Lq, Lk] = [2, 2, 3, 5] unless a test needs otherwise: 12 rows, one or two
programs under the interpreter. ``ONLINE`` caps the on-chip row so the same rows stream
through the online regime.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from support import TOLERANCES, assert_close, assert_no_less_accurate_than_torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import fused_softmax
from fused_softmax import ops
from fused_softmax.testing import limit_block, reference, split_threshold

SHAPE = (2, 2, 3, 5)
ONLINE = 2  # max_block: 5 keys stream in tiles of 2


def masks(shape, dtype, device):
    """name -> a mask that broadcasts to scores of ``shape``; every row keeps at least one key."""
    b, h, q, k = shape
    padding = torch.ones(b, 1, 1, k, dtype=torch.bool, device=device)
    padding[1, ..., 3:] = False
    pattern = torch.rand(q, k, device=device) > 0.4
    pattern[:, 0] = True
    return {
        "none": None,
        "bool padding [B,1,1,Lk]": padding,
        "bool [Lq,Lk]": pattern,
        "additive [B,1,Lq,Lk]": torch.randn(b, 1, q, k, device=device).to(dtype),
        "additive full": torch.randn(shape, device=device).to(dtype),
    }


MASKS = list(masks(SHAPE, torch.float32, "cpu"))
CAUSAL = {False: None, "top_left": 0, "bottom_right": SHAPE[-1] - SHAPE[-2]}


def plain_torch(scores, mask, scale, causal_offset):
    """What a user would write in torch, in the scores' dtype: the accuracy to match."""
    z = scores * scale
    if causal_offset is not None:
        z = z.masked_fill(~torch.ones(z.shape[-2:], dtype=torch.bool).tril(causal_offset), float("-inf"))
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else z + mask
    return torch.softmax(z, -1)


def reference_cases():
    """fp32: every mask with every causal option on chip, and every mask online. The other dtypes:
    every mask, the causal options and regimes taken in turn (the interpreter is slow)."""
    for i, mask_name in enumerate(MASKS):
        for causal in CAUSAL:
            yield torch.float32, mask_name, causal, None
        yield torch.float32, mask_name, list(CAUSAL)[i % 3], ONLINE
        for j, dtype in enumerate((torch.float16, torch.bfloat16, torch.float64)):
            yield dtype, mask_name, list(CAUSAL)[(i + j) % 3], (None, ONLINE)[(i + j) % 2]


def case_name(case):
    dtype, mask_name, causal, max_block = case
    return f"{str(dtype)[6:]}-{mask_name}-causal={causal}-{'online' if max_block else 'on_chip'}"


@pytest.mark.parametrize("case", list(reference_cases()), ids=case_name)
def test_masked_softmax_matches_reference(case, backend, device):
    """fp32/fp64 within tolerance of the float64 reference; fp16/bf16 no less accurate than torch."""
    dtype, mask_name, causal, max_block = case
    torch.manual_seed(0)
    scores = torch.randn(SHAPE, device=device).to(dtype).requires_grad_()
    mask = masks(SHAPE, dtype, device)[mask_name]
    dy = torch.randn(SHAPE, device=device).to(dtype)
    with limit_block(max_block):
        y = fused_softmax.masked_softmax(scores, mask, scale=0.6, causal=causal)
        (dx,) = torch.autograd.grad(y, scores, dy)
    expected = reference.masked_softmax(scores, mask, 0.6, CAUSAL[causal])
    expected_dx = 0.6 * reference.softmax_backward(expected, dy)
    assert y.dtype == dtype and y.shape == SHAPE
    if dtype in (torch.float32, torch.float64):
        assert_close(y, expected)
        assert_close(dx, expected_dx)
    else:
        torch_y = plain_torch(scores.cpu(), None if mask is None else mask.cpu(), 0.6, CAUSAL[causal])
        (torch_dx,) = torch.autograd.grad(torch_y, scores, dy.cpu())
        assert_no_less_accurate_than_torch(y, expected, torch_y)
        assert_no_less_accurate_than_torch(dx, expected_dx, torch_dx)


def test_mask_is_read_through_broadcast_strides(kernels, launches, device):
    """A [B,1,1,Lk] mask reaches the kernel as itself: zero strides, no [B,H,Lq,Lk] copy."""
    mask = torch.rand(2, 1, 1, 5, device=device) > 0.5
    fused_softmax.masked_softmax(torch.randn(SHAPE, device=device), mask)
    (launch,) = launches
    args = launch.args
    assert launch.plan.align == 1 and args["mask_ptr"].data_ptr() == mask.data_ptr()
    strides = [args[f"mask_stride_{d}"] for d in ("batch", "head", "query", "key")]
    assert strides == [5, 0, 0, 1] and args["n_heads"] == 2 and args["n_queries"] == 3


@pytest.mark.parametrize(
    "layout", ["keys strided (k @ q^T transposed)", "sliced heads", "sliced keys"], ids=["transposed", "heads", "keys"]
)
def test_strided_scores_find_their_mask_rows(layout, kernels, device):
    """Scores the kernel reads in place through another split of their dims: each row still meets
    its own (batch, query) mask row and causal diagonal."""
    base = torch.randn(2, 3, 6, 5, device=device)
    scores = {
        "keys strided (k @ q^T transposed)": base.transpose(-1, -2)[..., :5, :],
        "sliced heads": base[:, 1:],
        "sliced keys": base[..., 1:4],
    }[layout]
    mask = torch.rand(scores.shape[0], 1, scores.shape[2], scores.shape[3], device=device) > 0.3
    y = fused_softmax.masked_softmax(scores, mask, scale=0.8, causal="bottom_right")
    offset = scores.shape[-1] - scores.shape[-2]
    assert_close(y, reference.masked_softmax(scores, mask, 0.8, offset))


@pytest.mark.parametrize("causal", ["top_left", "bottom_right"])
def test_rows_with_every_key_hidden_give_zeros(causal, backend, device):
    """A row hidden by its mask, and the first rows of a bottom-right diagonal with Lq > Lk: zeros,
    and zero gradients, where plain softmax would give NaN."""
    scores = torch.randn(2, 1, 6, 4, device=device, requires_grad=True)
    mask = torch.ones(2, 1, 6, 4, dtype=torch.bool, device=device)
    mask[0, 0, 4] = False
    y = fused_softmax.masked_softmax(scores, mask, causal=causal)
    (dx,) = torch.autograd.grad(y, scores, torch.randn_like(y))
    offset = 0 if causal == "top_left" else 4 - 6
    expected = reference.masked_softmax(scores, mask, 1.0, offset)
    assert_close(y, expected)
    hidden = torch.as_tensor(expected).sum(-1) == 0
    assert hidden[0, 0, 4] and (causal == "top_left" or hidden[:, :, :2].all())
    assert (y[hidden] == 0).all() and (dx[hidden] == 0).all() and not dx.isnan().any()


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 5), (3, 5), (2, 2, 3, 5)], ids=str)
def test_additive_mask_gradient_is_summed_over_broadcast_dims(mask_shape, backend, device):
    scores = torch.randn(SHAPE, device=device, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(mask_shape, device=device, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(SHAPE, device=device, dtype=torch.float64)
    y = fused_softmax.masked_softmax(scores, mask, scale=0.3, causal=True)
    d_scores, d_mask = torch.autograd.grad(y, (scores, mask), dy)
    dz = torch.as_tensor(reference.softmax_backward(y, dy))
    assert d_mask.shape == mask_shape
    assert_close(d_scores, 0.3 * dz)
    assert_close(d_mask, dz.sum_to_size(mask_shape))


def test_gradcheck_and_gradgradcheck_through_the_kernel(kernels, device):
    scores = torch.randn(1, 2, 2, 3, device=device, dtype=torch.float64, requires_grad=True)
    additive = torch.randn(2, 3, device=device, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([True, False, True], device=device)
    assert torch.autograd.gradcheck(
        lambda s, m: fused_softmax.masked_softmax(s, m, scale=0.7, causal=True), (scores, additive)
    )
    assert torch.autograd.gradgradcheck(
        lambda s: fused_softmax.masked_softmax(s, keep, scale=1.3, causal="bottom_right"), (scores,)
    )


def test_fused_upcast(kernels, launches, device):
    """dtype=float32 on fp16 scores: one forward launch, fp32 out; the gradient comes back in fp16."""
    scores = torch.randn(SHAPE, device=device).half().requires_grad_()
    y = fused_softmax.masked_softmax(scores, torch.rand(3, 5, device=device) > 0.3, scale=0.5, dtype=torch.float32)
    assert y.dtype == torch.float32 and len(launches) == 1
    (dx,) = torch.autograd.grad(y, scores, torch.randn_like(y))
    assert dx.dtype == torch.float16


def test_long_rows_stream_online(kernels, launches, device):
    """131,072 keys, past every on-chip budget: the online regime, with the causal diagonal (two
    rows this long would split, tests/test_split_attention.py's regime)."""
    scores = torch.randn(1, 1, 2, 131072, device=device)
    with split_threshold(math.inf):
        y = fused_softmax.masked_softmax(scores, scale=0.9, causal="bottom_right")
    assert [launch.plan.config.regime for launch in launches] == ["online"]
    assert_close(y, reference.masked_softmax(scores, None, 0.9, 131070))


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda s: fused_softmax.masked_softmax(s, causal="diagonal"), ValueError),
        (lambda s: fused_softmax.masked_softmax(s[0, 0, 0], causal=True), ValueError),
        (lambda s: fused_softmax.masked_softmax(s, torch.ones(4, 5, dtype=torch.bool)), RuntimeError),
        (lambda s: fused_softmax.masked_softmax(s, torch.ones(1, 2, 2, 3, 5, dtype=torch.bool)), RuntimeError),
        (lambda s: fused_softmax.masked_softmax(s, torch.ones(3, 5, dtype=torch.int32)), TypeError),
        (lambda s: fused_softmax.masked_softmax(s.long()), TypeError),
        (lambda s: fused_softmax.masked_softmax(s, [[True]]), TypeError),
        # As torch's argument parser: a scale requiring grad would lose it in a float.
        (lambda s: fused_softmax.masked_softmax(s, scale=torch.tensor(0.5, requires_grad=True)), TypeError),
        (lambda s: fused_softmax.masked_softmax(s, scale=torch.tensor([0.5])), TypeError),
        (lambda s: fused_softmax.masked_softmax(s, scale="0.5"), TypeError),
    ],
    ids=[
        "causal-name",
        "causal-1d",
        "mask-shape",
        "mask-more-dims",
        "mask-int",
        "scores-int",
        "mask-list",
        "scale-requiring-grad",
        "scale-1d",
        "scale-str",
    ],
)
def test_bad_input_raises(call, error, backend):
    with pytest.raises(error):
        call(torch.randn(SHAPE))
    if backend == "triton":  # the fixture checks that a kernel ran: run a good call too
        fused_softmax.masked_softmax(torch.randn(SHAPE))


def test_compiles_as_one_op(kernels, device):
    scores = torch.randn(SHAPE, device=device, requires_grad=True)
    mask = torch.rand(2, 1, 1, 5, device=device) > 0.3

    def fn(s):
        return fused_softmax.masked_softmax(s, mask, scale=0.5, causal=True).sin().sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    (expected,) = torch.autograd.grad(fn(scores), scores)
    (actual,) = torch.autograd.grad(compiled(scores), scores)
    assert_close(actual, expected.detach().double())


def test_masked_softmax_op_passes_opcheck(kernels, device):
    scores = torch.randn(SHAPE, device=device, dtype=torch.float64, requires_grad=True)
    additive = torch.randn(3, 5, device=device, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(ops.masked_softmax, (scores, additive, 0.5, 0, None))
    torch.library.opcheck(ops.masked_softmax, (scores, None, 2.0, None, None))


def sdpa_inputs(device, dtype, heads=4, kv_heads=4):
    torch.manual_seed(1)
    q = torch.randn(2, heads, 4, 8, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, kv_heads, 6, 8, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(2, kv_heads, 6, 3, device=device, dtype=dtype, requires_grad=True)
    return q, k, v


def padded(device):
    keep = torch.ones(2, 1, 1, 6, dtype=torch.bool, device=device)
    keep[1, ..., 4:] = False
    return keep


ATTENTION_CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "padded": dict(attn_mask="padded"),
    "additive": dict(attn_mask="additive"),
    "fully masked row": dict(attn_mask="fully masked"),
    "scale": dict(scale=0.3),
    "gqa": dict(kv_heads=2, enable_gqa=True, is_causal=True),
    "gqa padded": dict(kv_heads=1, enable_gqa=True, attn_mask="padded"),
}


def attention_mask(name, device, dtype):
    if name == "padded":
        return padded(device)
    if name == "additive":
        return torch.randn(4, 6, device=device, dtype=dtype)
    keep = torch.rand(2, 4, 4, 6, device=device) > 0.3
    keep[0, 1, 2] = False
    return keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_matches_sdpa_math(case, dtype, backend, device):
    options = dict(ATTENTION_CASES[case])
    q, k, v = sdpa_inputs(device, dtype, kv_heads=options.pop("kv_heads", 4))
    if "attn_mask" in options:
        options["attn_mask"] = attention_mask(options["attn_mask"], device, dtype)
    out = fused_softmax.attention(q, k, v, **options)
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v, **options)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected_grads = torch.autograd.grad(expected, (q, k, v), dout)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out, expected, rtol=10 * rtol, atol=10 * atol)
    for actual, wanted in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=10 * rtol, atol=10 * atol)


def test_attention_dropout_draws_torch_rng(backend, device):
    """Same seed, same dropout mask as SDPA's math path: the outputs agree."""
    q, k, v = sdpa_inputs(device, torch.float64)
    torch.manual_seed(7)
    out = fused_softmax.attention(q, k, v, dropout_p=0.4)
    torch.manual_seed(7)
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    torch.testing.assert_close(out, expected)
    assert not torch.equal(out, fused_softmax.attention(q, k, v))


def test_fp64_scale_beyond_fp32_range(kernels, device):
    """The kernel gets the scale as fp32 parts; a scale past their range is applied before it."""
    scores = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64, device=device) * 1e-39
    assert_close(fused_softmax.masked_softmax(scores, scale=1e39), reference.masked_softmax(scores, None, 1e39))


def test_zero_dim_scores_and_empty_heads(backend, device):
    scores = torch.tensor(1.5, device=device)
    assert fused_softmax.masked_softmax(scores, torch.tensor(True, device=device)).item() == 1.0
    assert fused_softmax.masked_softmax(scores, torch.tensor(-1.0, device=device)).item() == 1.0
    q, k, v = (
        torch.randn(1, 2, 0, device=device),
        torch.randn(1, 3, 0, device=device),
        torch.randn(1, 3, 4, device=device),
    )
    torch.testing.assert_close(fused_softmax.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_attention_errors_like_sdpa(device):
    q, k, v = sdpa_inputs(device, torch.float32, heads=4, kv_heads=3)
    for scale in (torch.tensor(0.5, requires_grad=True), torch.tensor([0.5]), "0.5"):
        with pytest.raises(TypeError) as expected:
            F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], scale=scale, enable_gqa=True)
        with pytest.raises(TypeError, match=re.escape(str(expected.value))):
            fused_softmax.attention(q, k[:, :1], v[:, :1], scale=scale, enable_gqa=True)
    half = torch.tensor(0.5)  # a 0-d tensor needing no gradient is a float to torch
    torch.testing.assert_close(
        fused_softmax.attention(q, k[:, :1], v[:, :1], scale=half, enable_gqa=True),
        F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], scale=half, enable_gqa=True),
    )
    with pytest.raises(RuntimeError):
        fused_softmax.attention(q, k, v, enable_gqa=True)
    with pytest.raises(RuntimeError):
        fused_softmax.attention(q, k[:, :1], v[:, :1], attn_mask=padded(device), is_causal=True)
    with pytest.raises(RuntimeError):
        fused_softmax.attention(q, k[:, :1].double(), v[:, :1], enable_gqa=True)
    for mask in (
        torch.zeros(4, 6, dtype=torch.float64, device=device),
        torch.zeros(4, 6, dtype=torch.long, device=device),
    ):
        with pytest.raises(RuntimeError):
            fused_softmax.attention(q, k[:, :1], v[:, :1], attn_mask=mask, enable_gqa=True)
    with pytest.raises(RuntimeError):
        fused_softmax.attention(q[0, 0, 0], k[0, 0], v[0, 0])


@pytest.mark.parametrize("shape", [(6,), ()], ids=["1-d", "0-d"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32], ids=str)
def test_a_mask_without_its_query_and_key_dims_is_refused_as_sdpa_refuses_it(shape, mask_dtype, backend, device):
    """SDPA takes a mask of at least (L, S) dims: one of fewer raises torch's own error (taken
    from torch here, on this device), on both backends, where torch takes it, ours matches; the
    same values as an [L, S] mask are served."""
    q, k, v = sdpa_inputs(device, torch.float32)
    mask = (torch.rand(shape, device=device) > 0.3).to(mask_dtype)
    try:
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    except Exception as error:  # what torch raises is the contract
        with pytest.raises(type(error), match=re.escape(str(error))):
            fused_softmax.attention(q, k, v, attn_mask=mask)
    else:
        torch.testing.assert_close(fused_softmax.attention(q, k, v, attn_mask=mask), expected)
    square = mask.expand(4, 6)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=square)
    torch.testing.assert_close(fused_softmax.attention(q, k, v, attn_mask=square), expected)
