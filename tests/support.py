"""Shared test data: tolerances, regime cases and the comparison against the float64 reference."""

import dataclasses
import os
from typing import Callable

import torch
import torch.nn.functional as F

import fused_softmax
from fused_softmax._launch import plan
from fused_softmax.kernels import DeviceProperties
from fused_softmax.testing import limit_block, reference

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# torch.testing's defaults (rtol, atol). The interpreter truncates fp32 -> bf16 casts
# instead of rounding: one more bf16 ulp there.
TOLERANCES = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2 + (2**-7 if INTERPRETED else 0.0), 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}
DTYPES = list(TOLERANCES)

# A grid of one program, so it strides over every block of rows: the persistent loop.
ONE_PROGRAM = DeviceProperties(name="one program", sm_count=1, max_threads_per_sm=32)


def assert_close(actual, expected, dtype=None):
    """Per-dtype tolerance against a float64 expectation cast to the tested dtype."""
    dtype = dtype or actual.dtype
    rtol, atol = TOLERANCES[dtype]
    expected = torch.as_tensor(expected).to(dtype)
    torch.testing.assert_close(actual.cpu(), expected, rtol=rtol, atol=atol, equal_nan=True)


def assert_no_less_accurate_than_torch(actual, expected, torch_actual):
    """Error against float64 within 2x torch's own in the same dtype, plus atol, plus under the
    interpreter two bf16 ulps (it truncates each cast)."""
    expected = torch.as_tensor(expected)
    ours = (actual.double().cpu() - expected).abs().nan_to_num().max().item()
    torchs = (torch_actual.double().cpu() - expected).abs().nan_to_num().max().item()
    truncation = 2 * 2**-7 * expected.abs().max().item() if INTERPRETED and actual.dtype == torch.bfloat16 else 0
    assert ours <= 2 * torchs + TOLERANCES[actual.dtype][1] + truncation, (ours, torchs)


def regime(shape, dtype, *, backward=False, max_block=None, dim=-1):
    """The regime softmax's launch for a contiguous ``shape`` takes: 'multi_row', 'single_pass',
    'online' or 'split'."""
    tensors = [torch.empty(shape, dtype=dtype) for _ in range(3 if backward else 2)]
    with limit_block(max_block):
        return plan(tensors, dim % len(shape), backward=backward, split=True).config.regime


def random(shape, dtype=torch.float32, device="cpu", scale=3.0, seed=0):
    """Normal random numbers times ``scale``, drawn in float64 from a seeded generator, then cast:
    the same values on every device and for every dtype, up to rounding."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


# (shape, max_block). max_block forces a short on-chip row so that tiny rows reach the online
# regime under the interpreter; the regime each case reaches depends on dtype and direction,
# and test_cases_reach_every_regime checks that together they reach all three for each.
CASES = [
    ((37, 1), None),
    ((37, 2), None),
    ((19, 17), None),
    ((9, 100), None),
    ((4, 1000), None),
    ((3, 5000), None),
    ((2, 8193), None),
    ((1, 16385), None),
    ((2, 1023), 1024),
    ((2, 1024), 1024),
    ((2, 1025), 1024),
    ((3, 300), 64),
    ((2, 63), 32),
]


def case_id(case):
    shape, max_block = case
    return "x".join(map(str, shape)) + (f"-block{max_block}" if max_block else "")


@dataclasses.dataclass(frozen=True)
class Op:
    """A function of the package with its torch twin and its float64 references."""

    name: str
    fused: Callable
    torch: Callable
    reference: Callable
    reference_backward: Callable

    def __str__(self):
        return self.name


OPS = [
    Op("softmax", fused_softmax.softmax, F.softmax, reference.softmax, reference.softmax_backward),
    Op("log_softmax", fused_softmax.log_softmax, F.log_softmax, reference.log_softmax, reference.log_softmax_backward),
]
