"""pytest-benchmark of linear_cross_entropy (forward and backward of an LM head's loss), chunked
over tokens and also over the vocabulary, against F.cross_entropy(F.linear(...)) in eager torch
and under torch.compile: time, and the peak memory of one step in ``extra_info["peak_bytes"]``.

    pytest benchmarks/test_linear_cross_entropy_benchmarks.py --benchmark-only   # on a CUDA GPU: an LM head
    pytest benchmarks/ --benchmark-disable -q                         # anywhere: a smoke test

On CUDA the peak is ``torch.cuda.max_memory_allocated`` over one step, beyond what was allocated
before it; elsewhere it is ``testing.allocation_peak`` (every storage torch ops allocate, alive
at once), as the tests measure it. Without a GPU the shape is small and fused_softmax runs its
eager chunks (the same chunking, torch doing each chunk's loss). Each case first checks its loss
against eager torch (and compiles, before anything is measured).
"""

import pytest
import torch
import torch.nn.functional as F

import fused_softmax
from fused_softmax.testing import allocation_peak

pytest.importorskip("pytest_benchmark")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (tokens, hidden, vocabulary, dtype): a Llama-3-sized head on CUDA (full logits 2 GiB in bf16).
SHAPE = (8192, 4096, 128_256, torch.bfloat16) if CUDA else (512, 64, 4096, torch.float32)


def _torch_loss(x, w, target):
    return F.cross_entropy(F.linear(x, w).float(), target)


# Parts of the vocabulary: 8 of them.
VOCAB_CHUNK = SHAPE[2] // 8

IMPLEMENTATIONS = {
    "fused_softmax": lambda x, w, target: fused_softmax.linear_cross_entropy(x, w, target),
    "fused_softmax vocab chunks": lambda x, w, target: fused_softmax.linear_cross_entropy(
        x, w, target, vocab_chunk_size=VOCAB_CHUNK
    ),
    "torch": _torch_loss,
    "torch.compile": torch.compile(_torch_loss),
}


def _step(loss_fn, x, w, target):
    loss = loss_fn(x, w, target)
    grads = torch.autograd.grad(loss, (x, w))
    if CUDA:
        torch.cuda.synchronize()
    return loss, grads


def _peak_bytes(loss_fn, x, w, target):
    """The extra memory of one forward and backward step."""
    if not CUDA:
        with allocation_peak() as allocations:
            _step(loss_fn, x, w, target)
        return allocations.peak
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _step(loss_fn, x, w, target)
    return torch.cuda.max_memory_allocated() - before


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_linear_cross_entropy(benchmark, name):
    tokens, hidden, vocab, dtype = SHAPE
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(tokens, hidden, generator=g) * 0.5).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).to(DEVICE, dtype).requires_grad_()
    target = torch.randint(vocab, (tokens,), generator=g).to(DEVICE)
    loss_fn = IMPLEMENTATIONS[name]
    loss, _ = _step(loss_fn, x, w, target)  # also compiles, before anything is measured
    expected = _torch_loss(x.detach(), w.detach(), target)
    torch.testing.assert_close(loss.float(), expected, rtol=2e-2, atol=1e-3)
    benchmark.group = f"linear_cross_entropy {tokens}x{hidden} -> {vocab} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info["peak_bytes"] = _peak_bytes(loss_fn, x, w, target)
    benchmark.extra_info["full_logits_bytes"] = tokens * vocab * x.element_size()
    benchmark(lambda: _step(loss_fn, x, w, target))
