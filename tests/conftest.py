"""Test set-up: the kernels run on CUDA when present, else on CPU under Triton's interpreter.

Every test runs with poisoned outputs (NaN-filled before a kernel writes them), and the
``backend`` fixture proves which implementation served the test: the kernels must have
launched on 'triton' and must not have on 'torch'.
"""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before fused_softmax's kernels are first imported: the decorator decides.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from support import OPS  # noqa: E402

import fused_softmax  # noqa: E402
from fused_softmax.testing import poisoned_outputs, recorded_launches  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=OPS, ids=str)
def op(request):
    """softmax and log_softmax: every test taking ``op`` runs for both."""
    return request.param


@pytest.fixture(autouse=True)
def _poison_outputs():
    with poisoned_outputs():
        yield


@pytest.fixture
def launches():
    """Every kernel launch of the test, in order (``_launch.Launch``: kernel, arguments, plan),
    so a test can prove the kernels ran and inspect how."""
    with recorded_launches() as recorded:
        yield recorded


@pytest.fixture
def plans(launches):
    """``plans()``: the Plan of every launch of the test so far, in order."""
    return lambda: [launch.plan for launch in launches]


@pytest.fixture(params=["torch", "triton"])
def backend(request, launches):
    """Runs the test on the eager fallback and on the kernels; checks which one actually ran."""
    with fused_softmax.use_backend(request.param):
        yield request.param
    if request.param == "triton":
        assert launches, "the triton backend served this test without launching a kernel"
    else:
        assert not launches, "the torch backend launched a kernel"


@pytest.fixture
def kernels(launches):
    """The Triton backend alone; fails the test if no kernel launched."""
    with fused_softmax.use_backend("triton"):
        yield
    assert launches, "no kernel launched"
