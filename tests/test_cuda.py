"""Sizes only a GPU can run: huge tensors, long rows and many rows against torch on CUDA."""

import pytest
import torch
import torch.nn.functional as F
from support import assert_close

import fused_softmax
from fused_softmax.testing import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    torch.cuda.empty_cache()


def test_more_than_2_to_the_31_elements(kernels):
    """(262145, 8192) fp16 ones: the last row sits past 2^31 elements and must equal the first."""
    x = torch.ones(262_145, 8192, dtype=torch.float16, device="cuda")
    y = fused_softmax.softmax(x, dim=-1)
    assert torch.equal(y[0], y[-1])
    assert torch.equal(y[-1], torch.full_like(y[-1], 1 / 8192))


@pytest.mark.parametrize("n_cols", [65_535, 65_536, 65_537, 131_073, 1_048_577, 4_194_304])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_long_rows_match_torch(kernels, dtype, n_cols):
    x = (torch.randn(4, n_cols, device="cuda") * 3).to(dtype).requires_grad_()
    dy = torch.randn(4, n_cols, device="cuda").to(dtype)
    y = fused_softmax.softmax(x, dim=-1)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert_close(y, reference.softmax(x))
    (torch_dx,) = torch.autograd.grad(F.softmax(x, dim=-1), x, dy)
    expected = torch.as_tensor(reference.softmax_backward(reference.softmax(x), dy))
    ours, torchs = ((d.double().cpu() - expected).abs().max().item() for d in (dx, torch_dx))
    assert ours <= 2 * torchs + 1e-5


@pytest.mark.parametrize("shape", [(70_000, 1), (200_000, 3), (100_000, 128), (16, 30_576), (33, 2049)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_shapes_match_torch(kernels, dtype, shape):
    x = (torch.randn(shape, device="cuda") * 3).to(dtype)
    y = fused_softmax.softmax(x, dim=-1)
    assert_close(y, reference.softmax(x))
    assert_close(y, F.softmax(x, dim=-1).double())


def test_other_device_index(kernels):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x = torch.randn(8, 1000, device="cuda:1")
    torch.testing.assert_close(fused_softmax.softmax(x, dim=-1), F.softmax(x, dim=-1))
