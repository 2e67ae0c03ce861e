"""The host path of a small call: a one-launch job is planned once per layout and kept ``Ready``,
and a later call on tensors of that layout launches what planning afresh would have launched.
"""

import dataclasses

import pytest
import torch
from support import assert_close, random

from fused_softmax import _launch
from fused_softmax.kernels import H200
from fused_softmax.testing import limit_block, planned_for, reference


@pytest.fixture
def planned(monkeypatch):
    """Empty plan and Ready caches for the test, and the count of plans made (``planned()``)."""
    monkeypatch.setattr(_launch, "_PLANS", {})
    monkeypatch.setattr(_launch, "_READY", {})
    made = []
    plan = _launch._plan
    monkeypatch.setattr(_launch, "_plan", lambda *args: made.append(args) or plan(*args))
    return lambda: len(made)


def assert_same_launch(kept, fresh):
    """The same kernel, plan (but its tensors) and arguments (but the tensors' pointers)."""
    assert kept.kernel is fresh.kernel
    for field in dataclasses.fields(_launch.Plan):
        if field.name != "tensors":
            assert getattr(kept.plan, field.name) == getattr(fresh.plan, field.name), field.name
    pointers = {name for name, value in fresh.args.items() if isinstance(value, torch.Tensor)}
    assert pointers == {name for name, value in kept.args.items() if isinstance(value, torch.Tensor)}
    assert {k: v for k, v in kept.args.items() if k not in pointers} == {
        k: v for k, v in fresh.args.items() if k not in pointers
    }


def train(op, x, dim, seed):
    """Forward and backward of ``op`` on ``x`` (a leaf), each checked against the reference."""
    x = x.detach().requires_grad_()
    dy = random(x.shape, x.dtype, seed=seed + 100, scale=1.0)
    y = op.fused(x, dim=dim)
    (dx,) = torch.autograd.grad(y, x, dy)
    expected = op.reference(x.detach(), axis=dim)
    assert_close(y, expected)
    assert_close(dx, op.reference_backward(expected, dy, axis=dim))
    return y, dy


def test_a_repeated_call_launches_the_kept_plan_on_its_own_tensors(kernels, launches, planned, op):
    x = random((4, 24))
    train(op, x, 1, seed=0)
    assert planned() == 2  # the forward's and the backward's
    first = launches[:]
    x2 = random((4, 24), seed=1)
    y2, dy2 = train(op, x2, 1, seed=1)
    assert planned() == 2, "a call on a layout already planned planned again"
    for kept, fresh in zip(launches[2:], first, strict=True):
        assert_same_launch(kept, fresh)
    forward, backward = launches[2:]
    assert forward.args["x_ptr"].data_ptr() == x2.data_ptr() and forward.args["y_ptr"] is forward.plan.tensors[1]
    assert backward.args["dy_ptr"] is dy2 and backward.plan.tensors[0].data_ptr() == y2.data_ptr()


def _shifted(x):
    """``x``'s values, starting one element past a 16-byte boundary."""
    storage = torch.empty(x.numel() + 1, dtype=x.dtype)
    out = storage[1:].view(x.shape)
    return out.copy_(x)


# name -> (tensor of the base's values in another layout, dim, block context)
VARIANTS = {
    "same": lambda x: (x.clone(), 1, None),
    "shifted": lambda x: (_shifted(x), 1, None),
    "transposed": lambda x: (x.t().contiguous().t(), 1, None),
    "float64": lambda x: (x.double(), 1, None),
    "other dim": lambda x: (x, 0, None),
    "other shape": lambda x: (x[:, :20].contiguous(), 1, None),
    "limit_block": lambda x: (x.clone(), 1, lambda: limit_block(8)),
    "planned for an H200": lambda x: (x.clone(), 1, lambda: planned_for(H200)),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_call_on_another_layout_launches_what_planning_afresh_launches(kernels, launches, planned, op, variant):
    """A call after one on another layout, dim, dtype or overrides launches what it would have
    launched on empty caches, and is right."""
    x = random((4, 24))
    other, dim, block = VARIANTS[variant](x)
    with block() if block else _launch.overridden():
        train(op, other, dim, seed=2)
    fresh = launches[:]
    _launch._PLANS.clear()
    _launch._READY.clear()
    launches.clear()
    train(op, x, 1, seed=0)
    made = planned()
    with block() if block else _launch.overridden():
        train(op, other, dim, seed=2)
    assert (planned() == made) == (variant == "same"), "a kept plan served another layout, or the same was replanned"
    for kept, afresh in zip(launches[2:], fresh, strict=True):
        assert_same_launch(kept, afresh)


def test_log_and_softmax_keep_their_own_launches(kernels, launches, planned):
    """softmax and log_softmax share a plan but not a launch: each keeps its own LOG."""
    from fused_softmax import functional

    x = random((3, 16))
    for _ in range(2):
        assert_close(functional.softmax(x, dim=1), torch.softmax(x.double(), 1))
        assert_close(functional.log_softmax(x, dim=1), torch.log_softmax(x.double(), 1))
    assert [launch.args["LOG"] for launch in launches] == [False, True, False, True]
    assert planned() == 1


def _masked(scores, options):
    """masked_softmax forward and backward on ``scores`` (a leaf) with ``options`` (its keywords),
    checked against the reference."""
    import fused_softmax

    options = dict(scale=0.5) | options
    scores = scores.detach().requires_grad_()
    y = fused_softmax.masked_softmax(scores, **options)
    dy = random(scores.shape, seed=7, scale=1.0)
    (ds,) = torch.autograd.grad(y, scores, dy)
    causal, scale = options.pop("causal", False), options.pop("scale")
    expected = reference.masked_softmax(scores.detach(), causal_offset=0 if causal else None, scale=scale, **options)
    assert_close(y, expected)
    expected_grad, _ = reference.masked_softmax_backward(
        scores.detach(), expected, dy, scale, options.get("softcap"), options.get("sinks")
    )
    assert_close(ds, expected_grad)


SCORES = (2, 3, 4, 24)
# name -> masked_softmax's keywords for SCORES: the first, "same", is the base the others follow
MASKED = {
    "same": lambda: dict(mask=random((2, 1, 1, 24), seed=3) > 0),
    "other broadcast": lambda: dict(mask=random((1, 3, 4, 24), seed=3) > 0),
    "additive": lambda: dict(mask=random((2, 1, 1, 24), seed=3)),
    "shifted": lambda: dict(mask=_shifted(random((2, 1, 1, 24), seed=3) > 0)),
    "causal": lambda: dict(mask=random((2, 1, 1, 24), seed=3) > 0, causal=True),
    "scale": lambda: dict(mask=random((2, 1, 1, 24), seed=3) > 0, scale=0.25),
    "none": lambda: dict(),
    "softcap": lambda: dict(mask=random((2, 1, 1, 24), seed=3) > 0, softcap=2.0),
    "sinks": lambda: dict(mask=random((2, 1, 1, 24), seed=3) > 0, sinks=random((3,), seed=4)),
    "bias": lambda: dict(mask=random((2, 1, 1, 24), seed=3) > 0, bias=random((1, 3, 1, 24), seed=4)),
}
# Those whose plans are the base's: another causal offset or scale changes the launch, not the plan.
SAME_PLAN = ("same", "causal", "scale")


@pytest.mark.parametrize("variant", MASKED)
def test_a_masked_call_on_another_mask_launches_what_planning_afresh_launches(kernels, launches, planned, variant):
    """Masked plans are cached by the mask's dtype, broadcast strides and alignment too, and a
    masked forward kept Ready by every tensor it reads and the scale, offset and cap."""
    scores = random(SCORES)
    _masked(scores, MASKED[variant]())
    fresh = launches[:]
    _launch._PLANS.clear()
    _launch._READY.clear()
    launches.clear()
    _masked(scores, MASKED["same"]())
    made = planned()
    _masked(random(SCORES, seed=5), MASKED[variant]())
    assert (planned() == made) == (variant in SAME_PLAN), "a plan served another mask, or one was replanned"
    for kept, afresh in zip(launches[len(launches) - len(fresh) :], fresh, strict=True):
        assert_same_launch(kept, afresh)


def test_a_mask_read_as_a_copy_is_copied_at_every_call(kernels, launches, planned):
    """A mask whose leading dims fold into no two runs is read from a copy: a later call on that
    layout copies its own mask again, and launches what planning afresh launches on the copy."""

    def interleaved_mask(seed):  # dims (2, 3, 2) with strides (144, 24, 72)
        return (random((2, 2, 3, 1, 24), seed=seed) > 0).permute(0, 2, 1, 3, 4)

    scores = (2, 3, 2, 4, 24)
    _masked(random(scores), dict(mask=interleaved_mask(3)))
    fresh = launches[:]
    _masked(random(scores, seed=5), dict(mask=interleaved_mask(4)))
    for kept, afresh in zip(launches[len(fresh) :], fresh, strict=True):
        assert_same_launch(kept, afresh)
    (forward,) = [launch for launch in launches[len(fresh) :] if launch.name == "masked_softmax_forward_kernel"]
    assert forward.args["mask_ptr"].is_contiguous()


def test_a_masked_forward_keeps_its_own_cap(kernels, launches):
    """Two caps on tensors of one layout: the second launches what it would on empty caches."""
    mask = MASKED["same"]()["mask"]
    _masked(random(SCORES), dict(mask=mask, softcap=3.0))
    fresh = launches[:]
    _launch._READY.clear()
    launches.clear()
    _masked(random(SCORES), dict(mask=mask, softcap=2.0))
    _masked(random(SCORES, seed=5), dict(mask=mask, softcap=3.0))
    for kept, afresh in zip(launches[len(fresh) :], fresh, strict=True):
        assert_same_launch(kept, afresh)


def _cross_entropy(logits, options):
    """cross_entropy forward and backward on ``logits`` (a leaf) with ``options`` (its keywords;
    ``target``, ``weight``: "index", "probabilities", "weights" make them), checked against the
    reference."""
    import fused_softmax

    rows, classes = logits.shape
    options = dict(options)
    kind = options.pop("target", "index")
    if kind == "index":
        target = torch.randint(classes, (rows,), generator=torch.Generator().manual_seed(rows))
        target[1] = options.get("ignore_index", -100)
    else:
        target = random((rows, classes), seed=8).softmax(1)
    if options.pop("weights", False):
        options["weight"] = random((classes,), seed=9).abs() + 0.5
    logits = logits.detach().requires_grad_()
    loss = fused_softmax.cross_entropy(logits, target, **options)
    dy = random(loss.shape, seed=7, scale=1.0)
    (dx,) = torch.autograd.grad(loss, logits, dy)
    assert_close(loss, reference.cross_entropy(logits.detach(), target, **options))
    assert_close(dx, reference.cross_entropy_backward(logits.detach(), target, dy, **options))


LOGITS = (4, 40)
# name -> cross_entropy's keywords for LOGITS (the first, "same", is the default call)
CROSS_ENTROPY = {
    "same": dict(),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=3.0),
    "ignore_index": dict(ignore_index=3),
    "weights": dict(weights=True),
    "probabilities": dict(target="probabilities"),
    "probabilities, sum": dict(target="probabilities", reduction="sum"),
}


def test_cross_entropys_launches_keep_every_option_apart(kernels, launches, planned):
    """cross_entropy's launches (a mean's gradient factor, the forward, the reduction) are kept
    Ready by every tensor they read and every option they depend on: with every variant's kept,
    each launches what it launches on empty caches."""
    fresh = {}
    for name, options in CROSS_ENTROPY.items():
        _launch._PLANS.clear()
        _launch._READY.clear()
        launches.clear()
        _cross_entropy(random(LOGITS), options)
        fresh[name] = launches[:]
    for options in CROSS_ENTROPY.values():
        _cross_entropy(random(LOGITS), options)
    for name, options in CROSS_ENTROPY.items():
        launches.clear()
        _cross_entropy(random(LOGITS, seed=5), options)
        assert len(launches) == len(fresh[name]), name
        for kept, afresh in zip(launches, fresh[name], strict=True):
            assert_same_launch(kept, afresh)


@pytest.mark.parametrize("transposed", [False, True], ids=["upstream viewed", "upstream copied"])
def test_cross_entropys_kept_backward_reads_each_calls_upstream(kernels, launches, planned, transposed):
    """reduction='none' over [N, C, d1, d2]: the backward's launch reads one upstream value a
    row over (N, d1·d2), a view of a contiguous grad_output and a copy of a transposed one. A
    second call on other values scales by its own upstream, kept Ready or not."""
    import fused_softmax

    for seed in (1, 2):
        logits = random((2, 8, 3, 2), seed=seed).requires_grad_()
        target = torch.randint(8, (2, 3, 2), generator=torch.Generator().manual_seed(seed))
        loss = fused_softmax.cross_entropy(logits, target, reduction="none")
        dy = random((2, 2, 3), seed=seed + 10, scale=1.0).transpose(1, 2) if transposed else random(loss.shape)
        launches.clear()
        (dx,) = torch.autograd.grad(loss, logits, dy)
        assert_close(dx, reference.cross_entropy_backward(logits.detach(), target, dy, reduction="none"))
        (scale,) = [launch for launch in launches if launch.name == "scale_grad_kernel"]
        read = scale.args["upstream_ptr"].data_ptr()
        assert (read != dy.data_ptr()) if transposed else (read == dy.data_ptr())


def test_the_host_time_bench_times_the_other_small_calls(launches):
    """``python -m fused_softmax.bench.host_time``'s second table, with the launches stubbed as
    there: every job times each implementation, and the kernels' path was the one planned."""
    from fused_softmax.bench.host_time import OTHER_CALLS, YARDSTICK, other_host_times

    with _launch.overridden(run=False):
        timed = dict(other_host_times(torch.device("cpu"), blocks=1, block_s=1e-4))
    assert list(timed) == list(OTHER_CALLS)
    for us in timed.values():
        assert set(us) == {"fused_softmax", "torch", YARDSTICK} and all(t > 0 for t in us.values())
    kernels = {"masked_softmax_forward_kernel", "mean_grad_scale_kernel", "cross_entropy_kernel", "reduced_loss_kernel"}
    assert {launch.name for launch in launches} == kernels


def test_the_instruction_count_sums_callgrinds_own_costs(tmp_path):
    """``bench.host_instructions``'s total: every cost line, positions relative or not, but the
    inclusive cost after a ``calls=`` line, which its callee's lines count already."""
    from fused_softmax.bench.host_instructions import total_instructions

    out = tmp_path / "callgrind.out"
    out.write_text("events: Ir\nsummary: 0\nfn=(1) a\n0 100\n+2 50\ncalls=3 0\n0 999\nfn=(2) b\n* 7\n-1\n")
    assert total_instructions(out) == 157


def test_the_instruction_counts_child_runs_its_call_between_the_marks(tmp_path, launches):
    """The measured process of ``bench.host_instructions``, run here without valgrind (its marks
    to go on and to stop already there): it warms up, marks ready, runs the calls, marks done,
    and the kernels' path was the one it ran."""
    from fused_softmax.bench.host_instructions import _child

    (tmp_path / "go").touch()
    (tmp_path / "stop").touch()
    _child("training", "fused_softmax", 3, (2, 8), tmp_path)
    assert (tmp_path / "ready").exists() and (tmp_path / "done").exists()
    assert {launch.name for launch in launches} == {"softmax_forward_kernel", "softmax_backward_kernel"}
