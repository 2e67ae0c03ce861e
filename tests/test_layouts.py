"""Any dim and layout reach the kernels without a copy; dtype= is fused; torch's own test shapes.

Regressions of peers' bugs live here: strides ignored on transposed input (FlagGems PR 5723),
a stride-0 gradient read out of bounds (FlagGems PR 6087), misaligned grad_output (pytorch
#56325).
"""

import pytest
import torch
from support import assert_close, random

import fused_softmax


def same_memory(a, b):
    """``a`` is ``b`` as the kernel sees it: same first element and strides, so no copy was made."""
    return a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.dtype == b.dtype


def layouts(device):
    """name -> (tensor, the dims whose softmax needs a copy: more than two strided runs besides ``dim``)."""
    base = random((6, 9, 10, 8), device=device, scale=1.0)
    flat = random((9 * 31 + 1,), device=device, scale=1.0)
    return {
        "contiguous": (base, set()),
        "transposed": (base[0, 0].t(), set()),
        "sliced": (base[0, 1:8:2, 2:7], set()),
        "sliced_every_other_column": (base[..., ::2], set()),
        "misaligned": (flat[1:].view(9, 31), set()),
        "expanded": (base[0, 0, 0].expand(5, 8), set()),
        "expanded_rows": (base[0, :, 0, :1].expand(9, 7), set()),
        "channels_last": (base.contiguous(memory_format=torch.channels_last), {2, 3}),
        "permuted": (base.permute(0, 2, 3, 1), {1, 2}),
        "sliced_4d": (base[:, 1:8:2, 1:9, 2:7], {0, 1, 2, 3}),
    }


@pytest.mark.parametrize("layout", list(layouts("cpu")))
def test_layouts_reach_the_kernel_uncopied(kernels, device, launches, plans, op, layout):
    x, copied = layouts(device)[layout]
    x.requires_grad_()
    for dim in range(x.dim()):
        launches.clear()
        dy = random(x.shape, device=device, seed=dim + 1, scale=1.0)
        y = op.fused(x, dim=dim)
        (dx,) = torch.autograd.grad(y, x, dy)
        assert_close(y, op.reference(x, axis=dim))
        assert_close(dx, op.reference_backward(op.reference(x, axis=dim), dy, axis=dim))
        forward, backward = plans()
        assert same_memory(forward.tensors[0], x) == (dim not in copied), f"dim {dim}"
        assert same_memory(backward.tensors[0], y) and same_memory(backward.tensors[1], dy)


@pytest.mark.parametrize("kind", ["sum", "expand", "transposed", "misaligned"])
def test_grad_outputs_reach_the_kernel_uncopied(kernels, device, plans, op, kind):
    x = random((7, 12), torch.float64, device=device, scale=1.0).requires_grad_()
    y = op.fused(x, dim=1)
    if kind == "sum":
        y.sum().backward()
        dy = torch.ones_like(y)
    else:
        dy = {
            "expand": random((1, 12), torch.float64, device=device, scale=1.0).expand(7, 12),
            "transposed": random((12, 7), torch.float64, device=device, scale=1.0).t(),
            "misaligned": random((85,), torch.float64, device=device, scale=1.0)[1:].view(7, 12),
        }[kind]
        y.backward(dy)
    assert_close(x.grad, op.reference_backward(op.reference(x), dy))
    _, backward = plans()
    received = backward.tensors[1]
    assert received.dtype == torch.float64
    if kind in ("sum", "expand"):
        assert 0 in received.stride(), "a stride-0 gradient was materialised"
    else:
        assert same_memory(received, dy)


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dtype_upcast_is_fused(kernels, device, plans, op, in_dtype):
    """fp16/bf16 in, fp32 out, in one kernel reading the half-precision input; the gradient in fp16/bf16."""
    x = random((6, 50), in_dtype, device=device, scale=1.0).requires_grad_()
    y = op.fused(x, dim=1, dtype=torch.float32)
    (dx,) = torch.autograd.grad(y, x, random((6, 50), device=device, scale=1.0))
    forward, backward = plans()
    assert same_memory(forward.tensors[0], x) and forward.tensors[1].dtype == torch.float32
    assert backward.tensors[2].dtype == in_dtype and dx.dtype == in_dtype
    assert_close(y, op.reference(x))


@pytest.mark.parametrize("shift", [0, 1], ids=["aligned", "shifted"])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize(
    "shape", [(0, 10), (10, 0), (32, 20), (31, 20), (32, 21), (31, 23), (32, 1536), (31, 2048), (33, 2049), (16, 30576)]
)
def test_torch_test_nn_shapes(device, op, shape, dim, shift):
    """The shapes PyTorch's test_nn runs, on both backends, with a view that starts one element in."""
    storage = random((shape[0] * shape[1] + shift,), device=device, seed=sum(shape), scale=1.0)
    x = storage[shift:].view(shape).requires_grad_()
    dy = random(shape, device=device, seed=1, scale=1.0)
    for name in ("torch", "triton"):
        with fused_softmax.use_backend(name):
            y = op.fused(x, dim=dim)
            (dx,) = torch.autograd.grad(y, x, dy)
        assert_close(y, op.reference(x, axis=dim))
        assert_close(dx, op.reference_backward(op.reference(x, axis=dim), dy, axis=dim))


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_modules_are_drop_ins(device, op, name):
    ours, theirs = {
        "softmax": (fused_softmax.Softmax(dim=1), torch.nn.Softmax(dim=1)),
        "log_softmax": (fused_softmax.LogSoftmax(dim=1), torch.nn.LogSoftmax(dim=1)),
    }[op.name]
    assert isinstance(ours, type(theirs)) and repr(ours) == repr(theirs)
    assert ours.state_dict() == theirs.state_dict()
    x = random((4, 6, 5), device=device, scale=1.0)
    with fused_softmax.use_backend(name):
        assert_close(ours(x), op.reference(x, axis=1))
