"""The global switch reaches every torch entry point, restores them exactly, and swaps modules."""

import pytest
import torch
import torch.nn.functional as F
from support import assert_close

import fused_softmax
from fused_softmax import reference

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
    return (torch.softmax, torch.log_softmax, F.softmax, F.log_softmax, torch.Tensor.softmax,
            torch.Tensor.log_softmax, torch.nn.Softmax.forward, torch.nn.LogSoftmax.forward,
            "softmax" in torch.Tensor.__dict__)


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
    assert launches["n"] == 1, f"{entry} did not reach the kernels"
    assert_close(y, reference.log_softmax(x) if "log" in entry.lower() else reference.softmax(x))
    torch.testing.assert_close(y, expected)


def test_patch_leaves_what_the_kernels_do_not_serve_to_torch(device, launches):
    ints = torch.arange(6, device=device).view(2, 3)
    with fused_softmax.use_backend("torch"), fused_softmax.patch():
        y = F.softmax(torch.randn(3, 4, device=device), dim=1)
        with pytest.raises(RuntimeError):
            torch.softmax(ints, 1)
        torch.testing.assert_close(torch.softmax(ints, 1, dtype=torch.float32), torch.softmax(ints.float(), 1))
    assert launches["n"] == 0 and y.shape == (3, 4)


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
            1 / 0
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
    assert launches["n"] == 2, "both swapped modules run the kernels"
