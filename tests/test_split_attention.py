"""The split-row regime for masked_softmax's scores: few long rows (a decoding step's
[B, H, 1, Lk]) cut into chunks across programs, each chunk masked as the one-program kernels mask.

Values against the float64 reference for every mask kind (scale, bool, additive, causal both
ways, softcapping, sinks, a bias beside a bool mask) in fp64, fp32 and bf16, forward and
backward, with rows whose every key is hidden and chunks past a causal row's last key; a
strided scores tensor; gradcheck through the split kernels; the same lse and zeros as the
one-program kernels for hidden rows; the plan an H100 and an H200 get for decoding shapes; and
the bytes each launch moves. Tiny scores reach the regime through ``split_threshold(0)`` and a
capped block, on a GPU of 4 SMs (a few chunks a row, not one a column).
"""

import math
from fractions import Fraction

import pytest
import torch
from support import assert_close, random

import fused_softmax
from fused_softmax import _launch
from fused_softmax.kernels import H100, H200, DeviceProperties
from fused_softmax.testing import kernel_traffic, limit_block, minimum_bytes, planned_for, reference, split_threshold

FORWARD = ["masked_chunk_statistics_kernel", "masked_chunk_normalise_kernel"]
# Without softcapping and sinks masked_softmax's backward is softmax's, split by split_row.
BACKWARD = {
    False: ["chunk_row_sums_kernel", "chunk_product_kernel"],
    True: ["chunk_row_sums_kernel", "masked_chunk_grad_kernel"],
}

SHAPE = (1, 2, 2, 24)  # [B, H, Lq, Lk]: 4 rows, 3 chunks of 8 keys
FOUR_SMS = DeviceProperties(name="4 SMs", sm_count=4)
# Few bytes wanted in flight: 2 rows cut into 2 chunks of several blocks each.
SHORT_LATENCY = DeviceProperties(name="4 SMs, short latency", sm_count=4, memory_latency=1e-11)


@pytest.fixture
def splitting():
    with split_threshold(0), limit_block(8), planned_for(FOUR_SMS):
        yield


def _masks(dtype):
    """name -> (mask, causal, softcap, sinks?, bias): every mask kind. The padding hides the last
    chunk whole; the [Lq,Lk] pattern hides every key of query 0; a causal top-left row reads its
    first chunk only and writes the others as zeros."""
    b, h, q, k = SHAPE
    padding = torch.ones(b, 1, 1, k, dtype=torch.bool)
    padding[..., 16:] = False
    pattern = torch.rand(q, k, generator=torch.Generator().manual_seed(5)) > 0.4
    pattern[0] = False
    additive = random((b, 1, q, k), dtype, seed=6)
    return {
        "scale alone": (None, False, None, False, None),
        "bool padding [B,1,1,Lk], causal top-left": (padding, "top_left", None, False, None),
        "bool [Lq,Lk], causal bottom-right": (pattern, "bottom_right", None, False, None),
        "additive [B,1,Lq,Lk]": (additive, False, None, False, None),
        "softcap": (None, False, 2.0, False, None),
        "sinks, bool [Lq,Lk], causal top-left": (pattern, "top_left", None, True, None),
        "softcap and sinks, additive [B,1,Lq,Lk]": (additive, False, 2.0, True, None),
        "bias [1,H,Lq,Lk] beside bool padding": (padding, False, None, False, random((1, h, q, k), dtype, seed=7)),
    }


# Each mask kind in one dtype, the dtypes in turn (the interpreter is slow). bf16 takes cases
# without softcapping and sinks, whose backward reads the bf16-rounded y back through the lse.
DTYPES = [torch.bfloat16, torch.float64, torch.float32, torch.bfloat16, torch.float64, torch.float32, torch.float64]
CASES = list(zip(_masks(torch.float32), [*DTYPES, torch.bfloat16], strict=True))


def _offset(causal):
    return {False: None, "top_left": 0, "bottom_right": SHAPE[-1] - SHAPE[-2]}[causal]


@pytest.mark.parametrize("name, dtype", CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_matches_the_reference(kernels, launches, splitting, name, dtype):
    mask, causal, softcap, with_sinks, bias = _masks(dtype)[name]
    scores = random(SHAPE, dtype).requires_grad_()
    sinks = random((SHAPE[1],), dtype, seed=2).requires_grad_() if with_sinks else None
    options = dict(scale=0.6, causal=causal, softcap=softcap, sinks=sinks, bias=bias)
    y = fused_softmax.masked_softmax(scores, mask, **options)
    dy = random(SHAPE, dtype, seed=1)
    wrt = [t for t in (scores, sinks) if t is not None]
    grads = torch.autograd.grad(y, wrt, dy)
    keeps_statistics = softcap is not None or with_sinks
    assert [launch.name for launch in launches] == FORWARD + BACKWARD[keeps_statistics]
    assert all(launch.plan.config.chunks > 2 for launch in launches)

    expected = reference.masked_softmax(scores, mask, 0.6, _offset(causal), softcap, sinks, bias)
    assert_close(y, expected)
    hidden = torch.as_tensor(expected).sum(-1) == 0
    assert hidden.any() == (mask is not None and mask.dtype == torch.bool and mask.shape[-2] > 1)
    # The backward judged on the y it was given (the interpreter truncates bf16 casts).
    expected_dx, expected_sinks_grad = reference.masked_softmax_backward(scores, y.detach(), dy, 0.6, softcap, sinks)
    assert_close(grads[0], expected_dx)
    assert (grads[0][hidden] == 0).all()
    if with_sinks:
        assert_close(grads[1], expected_sinks_grad)


def test_strided_scores_split_in_place(kernels, launches, splitting):
    """Scores whose keys are not unit-stride (k @ qᵀ, transposed) and that start mid-storage: the
    chunks read them in place, each row meeting its own mask row and causal diagonal."""
    base = random((1, 2, 26, 2), torch.float32)
    scores = base.transpose(-1, -2)[..., 1:24].requires_grad_()
    mask = torch.rand(1, 1, 2, 23, generator=torch.Generator().manual_seed(3)) > 0.3
    y = fused_softmax.masked_softmax(scores, mask, scale=0.8, causal="bottom_right")
    dy = random(y.shape, torch.float32, seed=1)
    (dx,) = torch.autograd.grad(y, scores, dy)
    assert not scores.is_contiguous() and launches[0].plan.config.chunks > 1
    assert [launch.name for launch in launches] == FORWARD + BACKWARD[False]
    assert launches[0].plan.config.rows_per_program > 1  # the rows, not the keys, are unit-stride
    expected = reference.masked_softmax(scores, mask, 0.8, 23 - 2)
    assert_close(y, expected)
    assert_close(dx, 0.8 * reference.softmax_backward(y.detach(), dy))


def test_chunks_of_several_blocks_past_the_diagonal(kernels, launches):
    """[1, 1, 2, 64] on a GPU that wants little in flight: two chunks of several blocks a row;
    under a top-left diagonal the first chunk reads one block and writes the rest as zeros, the
    second reads nothing: each phase reads one block of scores a row, besides a row's chunk
    statistics and sink."""
    scores = random((1, 1, 2, 64), torch.float64).requires_grad_()
    sinks = random((1,), torch.float64, seed=2).requires_grad_()
    with split_threshold(0), limit_block(8), planned_for(SHORT_LATENCY):
        with kernel_traffic() as forward:
            y = fused_softmax.masked_softmax(scores, scale=0.6, causal=True, softcap=3.0, sinks=sinks)
        dy = random(y.shape, torch.float64, seed=1)
        dx, d_sinks = torch.autograd.grad(y, (scores, sinks), dy)
    config = launches[0].plan.config
    assert config.chunks == 2 and config.chunk_cols >= 4 * config.block_n
    rows, chunks, value = 2, 2, 8
    items_values = rows * chunks * (2 * chunks + 1) * value  # each item: its row's maxes and sums, the sink
    assert forward.loaded == 2 * rows * config.block_n * value + items_values
    expected = reference.masked_softmax(scores, None, 0.6, 0, 3.0, sinks)
    assert_close(y, expected)
    expected_dx, expected_sinks_grad = reference.masked_softmax_backward(scores, y.detach(), dy, 0.6, 3.0, sinks)
    assert_close(dx, expected_dx)
    assert_close(d_sinks, expected_sinks_grad)


@pytest.mark.parametrize("sinks", [False, True], ids=["softcap", "softcap and sinks"])
def test_hidden_rows_give_what_the_one_program_kernels_give(kernels, sinks):
    """y, the log-sum-exp the backward reads and the gradients, split or not, for rows with
    every key hidden and chunks with every key hidden."""
    scores = random((1, 1, 3, 32), torch.float32)
    mask = torch.ones(3, 32, dtype=torch.bool)
    mask[1] = False
    mask[2, 8:16] = False  # a whole chunk of a row hidden
    sink_logits = random((1,), torch.float32, seed=2) if sinks else None
    dy = random(scores.shape, torch.float32, seed=1)
    results = []
    for split in (False, True):
        with split_threshold(0 if split else math.inf), limit_block(8), planned_for(FOUR_SMS):
            masking = _launch.masking(scores, mask, 0.6, None, 2.0, sink_logits)
            y, lse = _launch.masked_softmax_forward_with_lse(scores, scores.dtype, masking)
            backward = _launch.masking(y, None, 0.6, None, 2.0, sink_logits)
            dx, sink_shares = _launch.masked_softmax_backward(y, dy, lse, y.dtype, backward, 0.6)
            plan = _launch.plan((scores, y), 3, backward=False, masking=masking, split=True)
        assert (plan.config.chunks > 1) == split
        results.append((y, lse, dx, sink_shares))
    for one_program, split in zip(*results, strict=True):
        torch.testing.assert_close(split, one_program, equal_nan=True)
    y, lse, dx, _ = results[1]
    assert (y[:, :, 1] == 0).all() and (dx[:, :, 1] == 0).all() and not dx.isnan().any()
    assert sinks or (lse[:, :, 1] == float("-inf")).all()  # as the one-program kernels: -inf + log(0)


@pytest.mark.parametrize("split", [False, True], ids=["one program", "split"])
@pytest.mark.parametrize("sinks", [False, True], ids=["", "sinks"])
def test_a_nan_among_hidden_keys_makes_its_row_nan(kernels, split, sinks):
    """A NaN score at a visible key, every other key of its row (or of its chunk) hidden: the GPU's
    max passes over the NaN, but the row is NaN, as torch's masked_fill and softmax make it;
    rows with every key hidden stay zeros."""
    scores = random((1, 1, 4, 32), torch.float32)
    mask = torch.ones(4, 32, dtype=torch.bool)
    mask[0], mask[1, :16] = False, False
    mask[0, 3] = mask[1, 9] = True
    scores[0, 0, 0, 3] = scores[0, 0, 1, 9] = float("nan")
    mask[2] = False  # every key hidden
    sink_logits = random((1,), torch.float32, seed=2) if sinks else None
    with split_threshold(0 if split else math.inf), limit_block(8), planned_for(FOUR_SMS):
        y = fused_softmax.masked_softmax(scores, mask, sinks=sink_logits)
        plan = _launch.plan(
            (scores, y), 3, backward=False, masking=_launch.masking(scores, mask, 1.0, None), split=True
        )
    assert (plan.config.chunks > 1) == split
    assert y[0, 0, :2].isnan().all() and (y[0, 0, 2] == 0).all() and not y[0, 0, 3].isnan().any()


def test_gradcheck_through_the_split_kernels(kernels, launches, splitting):
    """fp64, fast mode (a random projection of the Jacobian: a few launches, not one per element):
    an additive mask's gradient through the plain split pair; the softcap and sink gradients
    through masked_chunk_grad_kernel. (Forward mode takes the plain pair too: test_split_row.)"""
    scores = random((1, 2, 2, 16), torch.float64).requires_grad_()
    additive = random((2, 16), torch.float64, seed=1).requires_grad_()
    sinks = random((2,), torch.float64, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s, m: fused_softmax.masked_softmax(s, m, scale=0.7, causal="bottom_right"),
        (scores, additive),
        fast_mode=True,
    )
    assert torch.autograd.gradcheck(
        lambda s, k: fused_softmax.masked_softmax(s, additive.detach(), scale=0.7, softcap=1.5, sinks=k),
        (scores, sinks),
        fast_mode=True,
    )
    assert {launch.name for launch in launches} >= set(FORWARD + BACKWARD[False] + BACKWARD[True])
    assert all(launch.plan.config.chunks > 1 for launch in launches)


DECODING = [(b, h, n) for b, h in ((1, 8), (1, 32), (4, 32)) for n in (32768, 131072)]


@pytest.mark.parametrize("device", [H100, H200], ids=lambda d: d.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("options", [{}, {"softcap": 30.0}], ids=["masked", "softcapped"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_decoding_scores_fill_every_sm_with_enough_in_flight(device, dtype, options, backward):
    """A decoding step's scores [B, H, 1, Lk] of at least 1 MiB are planned onto every SM with the
    bytes in flight Little's law needs, as plain softmax's rows are; so is the backward under
    softcapping (without it masked_softmax's backward is softmax's, tested in test_split_row)."""
    heuristics = fused_softmax.kernels.heuristics
    for b, h, n in DECODING:
        scores = torch.empty(b, h, 1, n, dtype=dtype)
        if scores.numel() * scores.element_size() < heuristics.SPLIT_MIN_BYTES:
            continue
        masking = _launch.masking(scores, torch.ones(b, 1, 1, n, dtype=torch.bool), 0.1, n - 1, **options)
        tensors = (scores,) * (3 if backward else 2)
        with planned_for(device):
            p = _launch.plan(tensors, 3, backward=backward, masking=masking, split=True)
        (grid,) = p.grid
        in_flight = grid * heuristics.tile_load_bytes(p.config, scores.element_size(), backward)
        reads = scores.numel() * scores.element_size() * (2 if backward else 1)
        assert p.config.chunks > 1 and grid >= device.sm_count, (b, h, n, p.config)
        assert in_flight >= min(device.bytes_in_flight_needed, reads), (b, h, n, p.config, in_flight)


def test_prefill_scores_do_not_split():
    """Many rows fill the GPU alone: [1, 32, 4096, 4096] keeps one program per row; so does the
    same masking without ``split``."""
    scores = torch.empty(1, 32, 4096, 4096, dtype=torch.bfloat16)
    masking = _launch.masking(scores, None, 0.1, 0)
    assert _launch.plan((scores, scores), 3, backward=False, masking=masking, split=True).config.chunks == 1
    decoding = torch.empty(1, 8, 1, 131072)
    masking = _launch.masking(decoding, None, 0.1, None)
    assert _launch.plan((decoding, decoding), 3, backward=False, masking=masking, split=True).config.chunks > 1
    assert _launch.plan((decoding, decoding), 3, backward=False, masking=masking).config.chunks == 1


def test_bytes_moved_equal_the_design(kernels, splitting):
    """Forward: the scores and a [B,1,1,Lk] mask (a row reads its own Lk of it) read twice, y
    written once: 3/2 of the scores' minimum; plus 2 values a chunk written and read by every
    chunk of its row, the row's sink read by each chunk and its lse written once. Backward under
    softcapping and sinks: y and dy read twice, dx written once: 5/3; plus a value a chunk out
    and in, the lse read by each chunk, the sink read and its share written once a row."""
    b, h, q, k = 2, 2, 1, 32
    rows = b * h * q
    scores = random((b, h, q, k), torch.float32)
    padding = torch.rand(b, 1, 1, k, generator=torch.Generator().manual_seed(2)) > 0.2
    sinks = random((h,), torch.float32, seed=3)
    dy = random(scores.shape, torch.float32, seed=1)
    masking = _launch.masking(scores, padding, 0.5, None, 2.0, sinks)
    with kernel_traffic() as forward:
        y, lse = _launch.masked_softmax_forward_with_lse(scores, scores.dtype, masking)
    with kernel_traffic() as backward:
        dx, _ = _launch.masked_softmax_backward(
            y, dy, lse, y.dtype, _launch.masking(y, None, 0.5, None, 2.0, sinks), 0.5
        )
    chunks = _launch.plan((scores, y), 3, backward=False, masking=masking, split=True).config.chunks
    backward_masking = _launch.masking(y, None, 0.5, None, 2.0, sinks)
    assert _launch.plan((y, dy, dx), 3, backward=True, masking=backward_masking, split=True).config.chunks == chunks
    assert chunks > 2
    value = 4  # fp32 statistics
    mask_bytes = rows * k * padding.element_size()
    forward_values = 2 * rows * chunks * value * (1 + chunks) + rows * chunks * value + rows * value
    assert forward.stored == minimum_bytes(y) + 2 * rows * chunks * value + rows * value
    assert (
        forward.loaded
        == 2 * (minimum_bytes(scores) + mask_bytes) + 2 * rows * chunks * chunks * value + rows * chunks * value
    )
    assert Fraction(forward.total - forward_values - 2 * mask_bytes, minimum_bytes(scores, y)) == Fraction(3, 2)
    backward_values = rows * chunks * value * (1 + chunks) + rows * chunks * value + 2 * rows * value
    assert backward.stored == minimum_bytes(dx) + rows * chunks * value + rows * value
    assert (
        backward.loaded
        == 2 * minimum_bytes(y, dy) + rows * chunks * chunks * value + rows * chunks * value + rows * value
    )
    assert Fraction(backward.total - backward_values, minimum_bytes(y, dy, dx)) == Fraction(5, 3)
    expected = reference.masked_softmax(scores, padding, 0.5, None, 2.0, sinks)
    assert_close(y, expected)
    assert_close(dx, reference.masked_softmax_backward(scores, y, dy, 0.5, 2.0, sinks)[0])
