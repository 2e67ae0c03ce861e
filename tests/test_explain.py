"""``explain``: the plan of a launch and its Little's-law prediction, for an H100 or an H200,
without a GPU. Every shape of at least 4 MiB is predicted at 85 % of the bandwidth or more, and
the traffic explain states is the traffic the kernels make, counted under the interpreter."""

import re

import pytest
import torch
from support import random

import fused_softmax
from fused_softmax import _launch
from fused_softmax.explain import main
from fused_softmax.testing import kernel_traffic, limit_block, split_threshold

# M = 1 to 65,536 rows of N = 128 to 4M, the sweep's range, powers of two and odd lengths.
SHAPES = [(2**i, n) for i in range(17) for k in range(7, 23) for n in (2**k, 2**k * 3 // 2 + 1)]


@pytest.mark.parametrize("cooperative", [False, True], ids=["phased", "cooperative"])
@pytest.mark.parametrize("device", ["h100", "h200"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("dim", [-1, 0], ids=["last dim", "earlier dim"])
def test_every_large_shape_is_predicted_memory_bound(device, dtype, backward, cooperative, dim):
    """M rows of N, as [M, N] over the last dim or [N, M] over the first (the rows then lie side
    by side in memory). With the cooperative regime on too, where it then serves, its traffic is
    one read of each input and one write before the chunks' values, which each chunk reads all
    of its row's: under 10 % more over the last dim. Over the first, a tile spans every row
    side by side and few columns, so a row has many chunks and their values reach 50 % more
    (re-read from L2, counted here as from HBM): still predicted memory-bound."""
    short, taken = [], 0
    for n_rows, n_cols in SHAPES:
        size = n_rows * n_cols * dtype.itemsize
        if not 4 * 2**20 <= size <= 2**32:
            continue
        shape = (n_rows, n_cols) if dim == -1 else (n_cols, n_rows)
        e = fused_softmax.explain(shape, dim, dtype=dtype, backward=backward, device=device, cooperative=cooperative)
        if e.predicted_fraction < 0.85:
            short.append((shape, e.regime, e.grid, round(e.predicted_fraction, 2)))
        if e.regime == "cooperative":
            taken += 1
            values = n_rows * e.chunks * (1 if backward else 2) * 4 * (1 + e.chunks)
            assert e.bytes_moved - values == e.minimum_bytes, (shape, e.bytes_moved, e.minimum_bytes)
            assert dim != -1 or e.traffic_ratio < 1.1, (shape, e.traffic_ratio)
    assert not short, short
    assert (taken > 0) == cooperative


# (shape, dim, max_block, split threshold): on chip, online, split; last dim and an earlier one.
CASES = [
    ((4, 300), -1, None, None),
    ((3, 300), -1, 64, float("inf")),
    ((3, 300), -1, 64, 0),
    ((2, 50, 8), 1, 16, 0),
]


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_explained_traffic_is_the_kernels(kernels, case, backward):
    shape, dim, max_block, threshold = case
    x = random(shape)
    y, dy = torch.softmax(x, dim), random(shape, seed=1)
    with limit_block(max_block), split_threshold(threshold):
        e = fused_softmax.explain(x, dim, backward=backward)
        with kernel_traffic() as traffic:
            if backward:
                _launch.softmax_backward(y, dy, dim, y.dtype)
            else:
                _launch.softmax_forward(x, dim, x.dtype)
    assert traffic.total == e.bytes_moved, (e.regime, traffic.total, e.bytes_moved)
    assert e.regime == ("split" if threshold == 0 else "online" if max_block else "multi_row")


def test_a_transposed_tensor_is_explained_through_its_strides():
    e = fused_softmax.explain(torch.empty(64, 4096).t(), dim=0)
    assert e.shape == (4096, 64) and e.minimum_bytes == 2 * 4096 * 64 * 4


def test_command_line(capsys):
    main(["4x131072", "--dtype", "bfloat16", "--device", "h200"])
    out = capsys.readouterr().out
    assert "regime: split" in out and "NVIDIA H200" in out and "predicted:" in out


def test_a_shape_too_large_for_this_machine_is_explained():
    """64 GiB of fp16 (4 x 2^33): the stand-in tensors are meta tensors, never allocated."""
    e = fused_softmax.explain((4, 2**33), dtype=torch.float16)
    assert e.minimum_bytes == 2 * 4 * 2**33 * 2 and e.predicted_fraction > 0.85


@pytest.mark.parametrize(
    "args, error, message",
    [
        (((4, 8), 2), IndexError, None),
        (((4, 8), 1.0), TypeError, None),
        (((0, 8),), ValueError, "is empty, and softmax launches nothing"),
        (((4, -8),), ValueError, "no negative sizes"),
        ((8,), TypeError, "x is a tensor or a shape"),
    ],
    ids=["dim-out-of-range", "dim-float", "empty", "negative-size", "not-a-shape"],
)
def test_what_softmax_refuses_explain_refuses(args, error, message):
    """A shape explain cannot plan is refused; a dim with softmax's own error (None: the installed
    torch's words, which change between releases)."""
    if message is None:
        with pytest.raises(error) as expected:
            torch.nn.functional.softmax(torch.empty(args[0]), args[1])
        message = re.escape(str(expected.value))
    with pytest.raises(error, match=message):
        fused_softmax.explain(*args)
    with pytest.raises(TypeError, match="the kernels take"):
        fused_softmax.explain((4, 8), dtype=torch.int32)


def test_the_command_line_reports_bad_input_as_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["4x8", "--dim", "7"])
    assert exit_.value.code == 2 and "Dimension out of range" in capsys.readouterr().err
