"""The direct launch (off by default) calls a Ready launch's compiled kernel with its arguments in
the kernel's order, past Triton's binder. No machine here has a compiled kernel to call, so
what it decides is checked against Triton's own binder, built for an H100 offline: the order
of the arguments it passes (every one, constexprs too), and that a later call on the Ready's
layout, on other memory, binds to the same specialization, so the kernel compiled for the first
call is the one Triton would pick. The GPU check runs it on a device.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="triton is not installed: no binder to compare with")

CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from fused_softmax import _launch
    from fused_softmax._jacobian import backward_product
    from fused_softmax.testing import limit_block, recorded_launches

    backend = make_backend(GPUTarget("cuda", 90, 32))

    def bind(launch):
        kernel = launch.kernel
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        options = dict(num_warps=launch.plan.config.num_warps, enable_fp_fusion=True, debug=False)
        return binder(**launch.args, **options)

    def alike(a, b):
        return a is b or not torch.is_tensor(a) and not torch.is_tensor(b) and a == b

    def calls(dtype, shape, shift, log):
        '''Two calls of each one-launch job on tensors of one layout, in other memory.'''
        for seed in range(2):
            g = torch.Generator().manual_seed(seed)
            base = torch.randn(shape[0] * shape[1] + shift, generator=g).to(dtype)
            x = base[shift:].view(shape)
            y = torch.softmax(x.double(), 1).to(dtype)
            _launch.softmax_forward(x, 1, dtype, log)
            _launch.jacobian_product(y, torch.randn_like(y), 1, dtype, backward_product(log))

    def masked_calls(dtype, options):
        '''Two masked forwards (with their statistics) on scores of one layout, in other memory.'''
        g = torch.Generator().manual_seed(0)
        mask = torch.rand(2, 1, 1, 24, generator=g) > 0.3
        sinks = torch.randn(3, generator=g) if options.get("sinks") else None
        bias = torch.randn(1, 3, 1, 24, generator=g).to(dtype) if options.get("bias") else None
        for _ in range(2):
            scores = torch.randn(2, 3, 4, 24, generator=g).to(dtype)
            causal = 0 if options.get("causal") else None
            masking = _launch.masking(scores, mask, 0.5, causal, options.get("softcap"), sinks, bias)
            _launch.masked_softmax_forward_with_lse(scores, dtype, masking)

    report = []

    def compare(pairs, case):
        for first, kept in pairs:
            bound, specialization, _ = bind(first)
            _, kept_specialization, _ = bind(kept)
            ours = _launch.positional_arguments(first.kernel, first.args)
            values = list(bound.values())
            report.append(dict(
                case=f"{first.name} {case}",
                order=list(bound) == list(first.kernel.arg_names),
                same=len(ours) == len(values) and all(map(alike, ours, values)),
                specialized_alike=repr(specialization) == repr(kept_specialization),
            ))

    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for shape, block in (((3, 40), None), ((2, 300), None), ((2, 300), 64)):
            for shift in (0, 1):
                for log in (False, True):
                    _launch._READY.clear()
                    with limit_block(block), recorded_launches(run=False) as launches:
                        calls(dtype, shape, shift, log)
                    forward, backward, kept_forward, kept_backward = launches
                    case = f"{dtype} {shape} {block} {shift} {log}"
                    compare(((forward, kept_forward), (backward, kept_backward)), case)
        for options in ({}, {"causal": True}, {"softcap": 2.0}, {"sinks": True}, {"bias": True}):
            _launch._READY.clear()
            with recorded_launches(run=False) as launches:
                masked_calls(dtype, options)
            compare([launches], f"{dtype} {options}")
    json.dump(report, sys.stdout)
    """
)


@pytest.fixture(scope="module")
def report():
    """The child's report: Triton's binder in a Python without TRITON_INTERPRET, where the kernels
    are JIT functions."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    return json.loads(child.stdout)


def test_cases_cover_both_jobs(report):
    names = {record["case"].split()[0] for record in report}
    assert names == {"softmax_forward_kernel", "softmax_backward_kernel", "masked_softmax_forward_kernel"}, names
    assert len(report) == 3 * (3 * 2 * 2 * 2 + 5)


def test_arguments_go_in_the_binders_order(report):
    """The positional arguments are Triton's bound arguments, in order, constexprs included."""
    wrong = [record["case"] for record in report if not (record["order"] and record["same"])]
    assert not wrong, wrong


def test_a_kept_layout_binds_to_the_same_specialization(report):
    """A Ready launch's later call, on other memory of its layout, specializes as its first did:
    the compiled kernel it keeps is the one Triton would choose."""
    wrong = [record["case"] for record in report if not record["specialized_alike"]]
    assert not wrong, wrong
