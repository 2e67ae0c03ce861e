"""torch.compile(fullgraph=True) over fused_softmax: no graph breaks, results as eager; opcheck on every op."""

import pytest
import torch
from support import DTYPES, assert_close

import fused_softmax
from fused_softmax import ops
from fused_softmax.testing import limit_block, reference


def model(x):
    """Both functions, a non-last dim, a fused dtype= upcast, and torch ops around them."""
    a = fused_softmax.softmax(x * 2, dim=-1)
    b = fused_softmax.log_softmax(x, dim=0, dtype=torch.float64)
    return a.sum(0) + b.exp().to(a.dtype).mean(0)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_fullgraph_forward_and_backward_match_eager(device, launches, compiler, name):
    torch._dynamo.reset()
    x = torch.randn(6, 33, device=device, requires_grad=True)
    with fused_softmax.use_backend(name):
        expected = model(x)
        (expected_dx,) = torch.autograd.grad(expected.sum(), x)
        eager_launches = len(launches)
        compiled = torch.compile(model, fullgraph=True, backend=compiler)
        y = compiled(x)
        (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(dx, expected_dx)
    if name == "triton":
        assert len(launches) == 2 * eager_launches, "the compiled graph must run the same kernels"
    else:
        assert len(launches) == 0


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_the_implicit_dim_compiles(device, name):
    """dim=None (torch's deprecated implicit dim), as a function and as the modules, under
    fullgraph: torch's dim, without the warning, which dynamo cannot trace."""
    torch._dynamo.reset()
    x = torch.randn(2, 3, 4, device=device)
    with fused_softmax.use_backend(name):
        for call, expected in (
            (fused_softmax.softmax, torch.softmax(x, 0)),
            (fused_softmax.LogSoftmax(), torch.log_softmax(x, 0)),
        ):
            torch.testing.assert_close(torch.compile(call, fullgraph=True, backend="eager")(x), expected)


REFUSED_CALLS = {
    "dim out of range": (lambda f, x: f(x, 5), lambda x: x),
    "integer input": (lambda f, x: f(x, -1), lambda x: x.long()),
}


@pytest.mark.parametrize("refused", list(REFUSED_CALLS))
@pytest.mark.parametrize("op_name", ["softmax", "log_softmax"])
def test_a_refused_call_raises_torchs_error_under_fullgraph(device, op_name, refused):
    """Under fullgraph, dynamo cannot trace a raise (it would report Unsupported): a call torch
    refuses must fail with torch's own error type and message, as torch's function does there
    (IndexError under torch 2.13; 2.11's dynamo wraps log_softmax's in a TorchRuntimeError)."""
    call, make = REFUSED_CALLS[refused]
    x = make(torch.randn(4, 8, device=device))
    errors = []
    for function in (getattr(torch.nn.functional, op_name), getattr(fused_softmax, op_name)):
        torch._dynamo.reset()
        compiled = torch.compile(lambda t, function=function: call(function, t), fullgraph=True, backend="eager")
        with fused_softmax.use_backend("triton"), pytest.raises(Exception) as caught:
            compiled(x)
        errors.append((type(caught.value), str(caught.value).splitlines()[0]))  # less dynamo's trace of the user code
    assert errors[1] == errors[0]
    assert not issubclass(errors[0][0], torch._dynamo.exc.Unsupported)  # torch's error, not an untraceable raise


def test_compiled_online_regime(kernels, device):
    torch._dynamo.reset()
    x = torch.randn(3, 300, device=device, requires_grad=True)
    with limit_block(64):
        y = torch.compile(lambda t: fused_softmax.log_softmax(t, dim=1), fullgraph=True, backend="aot_eager")(x)
        y.backward(torch.ones_like(y))
    assert_close(y, reference.log_softmax(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op_name", ["softmax", "log_softmax"])
def test_opcheck(kernels, device, op_name, dtype):
    forward, backward = getattr(ops, op_name), getattr(ops, f"{op_name}_backward")
    x = torch.randn(4, 19, device=device, dtype=dtype, requires_grad=True)
    for dim in (0, 1):
        torch.library.opcheck(forward, (x, dim, None))
        y = forward(x.detach(), dim, None).requires_grad_()
        dy = torch.randn_like(y, requires_grad=True)
        torch.library.opcheck(backward, (y, dy, dim, dtype))
    if dtype in (torch.float16, torch.bfloat16):
        torch.library.opcheck(forward, (x, 1, torch.float32))


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_fullgraph_vmap_is_one_launch(device, launches, name):
    """Under torch.compile the ops' vmap rules serve: the batch is one more dim of one launch."""
    torch._dynamo.reset()
    scores = torch.randn(3, 2, 4, 5, device=device, dtype=torch.float64)

    def model(s):
        return fused_softmax.masked_softmax(fused_softmax.log_softmax(s, dim=1), scale=0.5, causal=True)

    with fused_softmax.use_backend(name):
        y = torch.compile(torch.func.vmap(model), fullgraph=True, backend="aot_eager")(scores)
    expected = torch.softmax(
        (torch.log_softmax(scores, 2) * 0.5).masked_fill(~torch.ones(4, 5).tril().bool(), -torch.inf), -1
    )
    torch.testing.assert_close(y, expected)
    assert len(launches) == (2 if name == "triton" else 0)


def test_opcheck_jacobian_product(kernels, device):
    y = torch.softmax(torch.randn(4, 19, device=device), 1)
    for kind in ("softmax", "log_softmax_vjp", "log_softmax_jvp"):
        torch.library.opcheck(ops.jacobian_product, (y, torch.randn_like(y), 1, torch.float32, kind, 0.5))
