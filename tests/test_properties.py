"""Random shapes, dims, dtypes, layouts and dtype= casts on the kernels, against the float64 reference."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import DTYPES, assert_close

import fused_softmax
from fused_softmax.testing import limit_block, reference

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def inputs(draw):
    shape = draw(st.lists(st.integers(1, 24), min_size=1, max_size=3))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 4
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    if layout == "transposed":
        x = x.mT if x.dim() >= 2 else x
    elif layout == "sliced":
        x = x[..., ::2]
    dim = draw(st.integers(-x.dim(), x.dim() - 1))
    out_dtype = draw(st.sampled_from([None, *DTYPES]))
    max_block = draw(st.sampled_from([None, 2, 8]))
    return x.to(dtype), dim, out_dtype, max_block


@SETTINGS
@given(case=inputs())
def test_random_inputs_match_reference(kernels, device, op, case):
    x, dim, out_dtype, max_block = case
    x = x.to(device)
    with limit_block(max_block):
        y = op.fused(x, dim=dim, dtype=out_dtype)
    assert y.dtype == (out_dtype or x.dtype) and y.is_contiguous()
    assert_close(y, op.reference(x.to(y.dtype), axis=dim))


@SETTINGS
@given(case=inputs(), shift=st.sampled_from([-1e4, 7.5, 1e4, 1e7]))
def test_rows_sum_to_one_under_large_shifts(kernels, device, case, shift):
    """softmax rows sum to one and match the reference however far the inputs are shifted."""
    x, dim, _, max_block = case
    shifted = x.to(device=device, dtype=torch.float32) + shift
    with limit_block(max_block):
        y = fused_softmax.softmax(shifted, dim=dim)
    torch.testing.assert_close(y.sum(dim), torch.ones_like(y.sum(dim)))
    assert_close(y, reference.softmax(shifted, axis=dim))
