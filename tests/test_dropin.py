"""The global switch reaches every torch entry point, restores them exactly, and swaps modules."""

import functools
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import assert_close

import fused_softmax
from fused_softmax.testing import reference

ENTRY_POINTS = {
    "torch.softmax": lambda x: torch.softmax(x, 1),
    "torch.log_softmax": lambda x: torch.log_softmax(x, 1),
    "F.softmax": lambda x: F.softmax(x, dim=1),
    "F.log_softmax": lambda x: F.log_softmax(x, dim=1),
    "Tensor.softmax": lambda x: x.softmax(1),
    "Tensor.log_softmax": lambda x: x.log_softmax(dim=1),
    "nn.Softmax": lambda x: torch.nn.Softmax(dim=1)(x),
    "nn.LogSoftmax": lambda x: torch.nn.LogSoftmax(dim=1)(x),
}


def originals():
    return (
        torch.softmax,
        torch.log_softmax,
        F.softmax,
        F.log_softmax,
        torch.Tensor.softmax,
        torch.Tensor.log_softmax,
        torch.nn.Softmax.forward,
        torch.nn.LogSoftmax.forward,
        "softmax" in torch.Tensor.__dict__,
    )


@pytest.fixture(autouse=True)
def _restored():
    before = originals()
    yield
    fused_softmax.disable()
    assert originals() == before


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_patch_reaches_every_entry_point(device, launches, entry):
    x = torch.randn(5, 7, device=device)
    call = ENTRY_POINTS[entry]
    expected = call(x)
    with fused_softmax.use_backend("triton"), fused_softmax.patch():
        y = call(x)
    assert len(launches) == 1, f"{entry} did not reach the kernels"
    assert_close(y, reference.log_softmax(x) if "log" in entry.lower() else reference.softmax(x))
    torch.testing.assert_close(y, expected)


def test_patch_leaves_what_the_kernels_do_not_serve_to_torch(device, launches):
    ints = torch.arange(6, device=device).view(2, 3)
    with fused_softmax.use_backend("torch"), fused_softmax.patch():
        y = F.softmax(torch.randn(3, 4, device=device), dim=1)
        with pytest.raises(RuntimeError):
            torch.softmax(ints, 1)
        torch.testing.assert_close(torch.softmax(ints, 1, dtype=torch.float32), torch.softmax(ints.float(), 1))
    assert len(launches) == 0 and y.shape == (3, 4)


# Call forms of torch.<name>, Tensor.<name> and F.<name> (name: softmax or log_softmax), on x.
def _torch(name):
    return getattr(torch, name)


def _method(name):
    return getattr(torch.Tensor, name)


def _functional(name):
    return getattr(F, name)


F64 = torch.float64


class Subclass(torch.Tensor):
    pass


# The forms the kernels serve: the 'triton' backend must launch for each.
FUSED_FORMS = {
    "torch(x, 1)": lambda name, x: _torch(name)(x, 1),
    "torch(x, 1, f64)": lambda name, x: _torch(name)(x, 1, F64),
    "torch(x, 1, None)": lambda name, x: _torch(name)(x, 1, None),
    "torch(x, dim=1)": lambda name, x: _torch(name)(x, dim=1),
    "torch(x, -1, dtype=f64)": lambda name, x: _torch(name)(x, -1, dtype=F64),
    "torch(input=x, dim=1)": lambda name, x: _torch(name)(input=x, dim=1),
    "torch(input=x, dim=0, dtype=f64)": lambda name, x: _torch(name)(dtype=F64, dim=0, input=x),
    "torch(parameter, 1)": lambda name, x: _torch(name)(torch.nn.Parameter(x), 1),
    "x.m(1)": lambda name, x: getattr(x, name)(1),
    "x.m(dim=1)": lambda name, x: getattr(x, name)(dim=1),
    "x.m(1, f64)": lambda name, x: getattr(x, name)(1, F64),
    "x.m(dim=-1, dtype=f64)": lambda name, x: getattr(x, name)(dim=-1, dtype=F64),
    "Tensor.m(x, dim=1)": lambda name, x: _method(name)(x, dim=1),
    "F(x, 1, 3, f64)": lambda name, x: _functional(name)(x, 1, 3, F64),
    "F(input=x, dim=1, dtype=f64)": lambda name, x: _functional(name)(input=x, dim=1, dtype=F64),
    "F(x, np.int64(1))": lambda name, x: _functional(name)(x, np.int64(1)),
    # torch dispatches to the subclass, whose __torch_function__ calls the patched method.
    "subclass.m(1)": lambda name, x: getattr(x.as_subclass(Subclass), name)(1),
}


@pytest.mark.parametrize("form", list(FUSED_FORMS))
def test_patch_serves_every_positional_and_keyword_form(device, op, backend, form):
    x = torch.randn(5, 7, device=device)
    call = FUSED_FORMS[form]
    expected = call(op.name, x)
    with fused_softmax.patch():
        y = call(op.name, x)
    assert type(y) is type(expected)
    torch.testing.assert_close(y, expected)


# Forms that torch accepts and the wrappers hand to torch's original as they are.
TORCH_FORMS = {
    "torch(x, 1, out=None)": lambda name, x: _torch(name)(x, 1, out=None),
    "torch(x, np.int64(1))": lambda name, x: _torch(name)(x, np.int64(1)),
    "torch(x, tensor(1))": lambda name, x: _torch(name)(x, torch.tensor(1)),
    "torch(x, 1, dtype=float)": lambda name, x: _torch(name)(x, 1, dtype=float),
    "torch(subclass, 1)": lambda name, x: _torch(name)(x.as_subclass(Subclass), 1),
    "x.m(np.int64(-1))": lambda name, x: getattr(x, name)(np.int64(-1)),
    "x.m(tensor(0), dtype=f64)": lambda name, x: getattr(x, name)(torch.tensor(0), dtype=F64),
    "x.m(1, float)": lambda name, x: getattr(x, name)(1, float),
}


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.parametrize("form", list(TORCH_FORMS))
def test_patch_hands_other_accepted_forms_to_torch(device, launches, op, name, form):
    x = torch.randn(5, 7, device=device)
    call = TORCH_FORMS[form]
    expected = call(op.name, x)
    with fused_softmax.use_backend(name), fused_softmax.patch():
        y = call(op.name, x)
    assert len(launches) == 0
    assert type(y) is type(expected) and torch.equal(y, expected)


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(5, 7), (0,)], ids=["sized", "resized"])
def test_out_writes_and_returns_the_buffer_as_torch_does(device, launches, op, name, shape):
    x = torch.randn(5, 7, device=device)
    calls = [
        lambda out: _torch(op.name)(x, 1, out=out),
        lambda out: _torch(op.name)(input=x, dim=-1, dtype=torch.float32, out=out),
    ]
    for call in calls:
        expected = torch.empty(shape, device=device)
        assert call(expected) is expected
        with fused_softmax.use_backend(name), fused_softmax.patch():
            out = torch.empty(shape, device=device)
            assert call(out) is out
        assert out.shape == expected.shape == x.shape and torch.equal(out, expected)
    assert len(launches) == 0


# Forms torch rejects; the patched entry points must raise what torch raises.
BAD_FORMS = {
    "torch(x)": lambda name, x: _torch(name)(x),
    "torch()": lambda name, x: _torch(name)(),
    "torch(self=x, dim=1)": lambda name, x: _torch(name)(self=x, dim=1),
    "torch(x, None)": lambda name, x: _torch(name)(x, None),
    "torch(x, 1.0)": lambda name, x: _torch(name)(x, 1.0),
    "torch(x, True)": lambda name, x: _torch(name)(x, True),
    "torch(x, named dim)": lambda name, x: _torch(name)(x, "C"),
    "torch(x, (1,))": lambda name, x: _torch(name)(x, (1,)),
    "torch(x, np.array(1))": lambda name, x: _torch(name)(x, np.array(1)),
    "torch(x, tensor(True))": lambda name, x: _torch(name)(x, torch.tensor(True)),
    "torch(x, 2)": lambda name, x: _torch(name)(x, 2),
    "torch(x, -3)": lambda name, x: _torch(name)(x, -3),
    "torch(x, 2**70)": lambda name, x: _torch(name)(x, 2**70),
    "torch(x, 1, 'float')": lambda name, x: _torch(name)(x, 1, "float"),
    "torch(x, 1, np.float32)": lambda name, x: _torch(name)(x, 1, np.float32),
    "torch(x, 1, dtype=int64)": lambda name, x: _torch(name)(x, 1, dtype=torch.int64),
    "torch(ints, 1)": lambda name, x: _torch(name)(x.long(), 1),
    "torch([1.0], 0)": lambda name, x: _torch(name)([1.0], 0),
    "torch(x, 1, None, out)": lambda name, x: _torch(name)(x, 1, None, torch.empty_like(x)),
    "torch(x, 1, None, None, 3)": lambda name, x: _torch(name)(x, 1, None, None, 3),
    "torch(x, 1, foo=1)": lambda name, x: _torch(name)(x, 1, foo=1),
    "torch(x, 1, _stacklevel=3)": lambda name, x: _torch(name)(x, 1, _stacklevel=3),
    "torch(x, 1, dtype=f64, out=f32)": lambda name, x: _torch(name)(x, 1, dtype=F64, out=torch.empty_like(x)),
    "torch(x, 1, out=f64)": lambda name, x: _torch(name)(x, 1, out=torch.empty_like(x, dtype=F64)),
    "torch(x, 1, out=3)": lambda name, x: _torch(name)(x, 1, out=3),
    "x.m()": lambda name, x: getattr(x, name)(),
    "x.m(1, out=out)": lambda name, x: getattr(x, name)(1, out=torch.empty_like(x)),
    "x.m(1, _stacklevel=3)": lambda name, x: getattr(x, name)(1, _stacklevel=3),
    "x.m(None)": lambda name, x: getattr(x, name)(None),
    "x.m(False)": lambda name, x: getattr(x, name)(False),
    "x.m(named dim)": lambda name, x: getattr(x, name)(dim="C"),
    "x.m(-2**70)": lambda name, x: getattr(x, name)(-(2**70)),
    "x.m(1, None, 3)": lambda name, x: getattr(x, name)(1, None, 3),
    "x.m(input=x, dim=1)": lambda name, x: getattr(x, name)(input=x, dim=1),
    "Tensor.m()": lambda name, x: _method(name)(),
    "Tensor.m(input=x, dim=1)": lambda name, x: _method(name)(input=x, dim=1),
    "Tensor.m(self=x, dim=1)": lambda name, x: _method(name)(self=x, dim=1),
    "Tensor.m(3, 1)": lambda name, x: _method(name)(3, 1),
    "F(x, named dim)": lambda name, x: _functional(name)(x, "C"),
    "F(x, 1.0)": lambda name, x: _functional(name)(x, 1.0),
    "F(x, True)": lambda name, x: _functional(name)(x, True),
    "F(x, 2)": lambda name, x: _functional(name)(x, 2),
    "F(x, 1, out=out)": lambda name, x: _functional(name)(x, 1, out=torch.empty_like(x)),
    "F(x, 1, dtype='float')": lambda name, x: _functional(name)(x, 1, dtype="float"),
}


def _raised(call):
    with pytest.raises(Exception) as info:
        call()
    return info.value


@pytest.mark.parametrize("name", ["torch", "triton"])
@pytest.mark.parametrize("form", list(BAD_FORMS))
def test_patch_rejects_what_torch_rejects_with_its_errors(device, op, name, form):
    x = torch.randn(2, 3, device=device)
    call = functools.partial(BAD_FORMS[form], op.name, x)
    expected = _raised(call)
    with fused_softmax.use_backend(name), fused_softmax.patch():
        error = _raised(call)
    assert type(error) is type(expected)
    if isinstance(expected, TypeError):
        assert str(error) == str(expected), "a TypeError must be torch's own"


def test_enable_disable_nesting_and_exceptions_restore_exactly():
    before = originals()
    fused_softmax.enable()
    fused_softmax.enable()
    assert originals() != before and F.softmax is fused_softmax.softmax
    fused_softmax.disable()
    assert originals() == before
    with fused_softmax.patch():
        with fused_softmax.patch():
            pass
        assert F.softmax is fused_softmax.softmax, "an inner block must not undo the outer one"
    assert originals() == before
    with pytest.raises(ZeroDivisionError):
        with fused_softmax.patch():
            raise ZeroDivisionError
    assert originals() == before


def test_patch_blocks_overlapping_across_threads_restore_when_the_last_exits():
    """The switch is process-wide: a thread leaving its block must not unpatch another thread
    still inside one; the last block out restores the state from before the first."""
    before = originals()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with fused_softmax.patch():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with fused_softmax.patch():
            second_in.set()
            first_out.wait(10)
            seen["inside after the first left"] = F.softmax is fused_softmax.softmax

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen == {"inside after the first left": True}
    assert originals() == before


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 16)
        self.attend = torch.nn.Softmax(dim=-1)
        self.inner = torch.nn.Sequential(torch.nn.Linear(16, 10), torch.nn.LogSoftmax(dim=1))

    def forward(self, x):
        return self.inner(self.attend(self.linear(x)) + x.softmax(-1) + F.softmax(x, dim=0))


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_small_model_is_unchanged_by_the_patch(device, name):
    torch.manual_seed(0)
    model = Block().to(device)
    x = torch.randn(4, 16, device=device)
    expected = model(x)
    with fused_softmax.use_backend(name), fused_softmax.patch():
        y = model(x)
    if name == "torch":
        assert torch.equal(y, expected), "on the fallback the patch must be bit-identical"
    else:
        torch.testing.assert_close(y, expected)


def _scripted_torch_calls():
    """Fresh functions each time: TorchScript keeps what it compiled per function object."""

    def f_softmax(x):
        return F.softmax(x, 1)

    def f_log_softmax(x):
        return F.log_softmax(x, dim=1)

    def torch_softmax(x):
        return torch.softmax(x, 1)

    def torch_log_softmax(x):
        return torch.log_softmax(x, 1)

    def f_cross_entropy(x):
        return F.cross_entropy(x, x.argmax(1))

    return {
        "F.softmax": f_softmax,
        "F.log_softmax": f_log_softmax,
        "torch.softmax": torch_softmax,
        "torch.log_softmax": torch_log_softmax,
        "F.cross_entropy": f_cross_entropy,
        "nn.Softmax": torch.nn.Softmax(1),
        "nn.LogSoftmax": torch.nn.LogSoftmax(1),
        "nn.CrossEntropyLoss": _CrossEntropyOfArgmax(),
    }


class _CrossEntropyOfArgmax(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.loss = torch.nn.CrossEntropyLoss()

    def forward(self, x):
        return self.loss(x, x.argmax(1))


@pytest.mark.parametrize("entry", list(_scripted_torch_calls()))
def test_torchscript_refuses_the_routed_entry_points_while_patched(entry):
    """While patched, scripting code that calls a routed torch entry point refuses it clearly at
    script time (it would compile the Python that launches the kernels); outside the patch the
    same code scripts and runs torch's own."""
    with fused_softmax.patch(), pytest.raises(RuntimeError, match="torch.jit.script cannot compile fused_softmax"):
        torch.jit.script(_scripted_torch_calls()[entry])
    eager = _scripted_torch_calls()[entry]
    x = torch.randn(3, 5, dtype=torch.float64)
    assert_close(torch.jit.script(_scripted_torch_calls()[entry])(x), eager(x), torch.float64)


def test_a_scripted_tensor_method_stays_torchs_while_patched():
    """TorchScript resolves Tensor methods itself, never through Python's torch.Tensor, so the
    switch cannot reach a scripted ``x.softmax``: it scripts and runs torch's, as the README says."""

    def method(x):
        return x.softmax(1) + x.log_softmax(1)

    x = torch.randn(3, 5, dtype=torch.float64)
    with fused_softmax.patch():
        scripted = torch.jit.script(method)
    assert "aten::softmax" in str(scripted.graph)
    assert_close(scripted(x), torch.softmax(x, 1) + torch.log_softmax(x, 1), torch.float64)


def test_swap_modules_in_nested_models(device, launches):
    model = Block().to(device)
    attend = model.attend
    assert fused_softmax.swap_modules(model) is model
    assert type(model.attend) is fused_softmax.Softmax and model.attend is attend and model.attend.dim == -1
    assert type(model.inner[1]) is fused_softmax.LogSoftmax and model.inner[1].dim == 1
    root = fused_softmax.swap_modules(torch.nn.Softmax(dim=0))
    assert type(root) is fused_softmax.Softmax
    with fused_softmax.use_backend("triton"):
        model(torch.randn(4, 16, device=device))
    assert len(launches) == 2, "both swapped modules run the kernels"
