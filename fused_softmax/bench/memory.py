"""Peak extra memory of one forward and backward of an LM head's loss: ``linear_cross_entropy``
(chunked over tokens, and over the vocabulary) against ``F.cross_entropy(F.linear(...))``.

    python -m fused_softmax.bench.memory                      # eager chunks (CPU's default backend)
    TRITON_INTERPRET=1 python -m fused_softmax.bench.memory   # also the kernels, under the interpreter

Measured with ``testing.allocation_peak`` (every storage torch ops allocate in the step, alive at
once), on any device; float32, mean loss. It prints the README's table.
"""

import os

import torch
import torch.nn.functional as F

from .. import linear_cross_entropy, use_backend
from ..testing import allocation_peak

MIB = 2**20
# (tokens, hidden, vocabulary, chunk_size, vocab_chunk_size, backend)
CASES = [
    (4096, 256, 32000, 256, None, "torch"),
    (4096, 256, 32000, 256, 4000, "torch"),
    (1024, 64, 8192, 128, None, "triton"),
    (1024, 64, 8192, 128, 1024, "triton"),
]
PATHS = {"torch": "eager chunks (backend `auto` on CPU)", "triton": "the kernels, under the interpreter"}


def peak_bytes(loss_fn, x, w, target):
    """The peak extra memory of ``loss_fn``'s forward and its backward to x and w."""
    with allocation_peak() as allocations:
        torch.autograd.grad(loss_fn(x, w, target), (x, w))
    return allocations.peak


def records(cases=CASES):
    """A dict per case: shape, chunks, path and both peaks in bytes, with the full logits' size."""
    for tokens, hidden, vocab, rows, cols, backend in cases:
        if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        g = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, hidden, generator=g).requires_grad_()
        w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).requires_grad_()
        target = torch.randint(vocab, (tokens,), generator=g)

        def fused(x, w, t, rows=rows, cols=cols):
            return linear_cross_entropy(x, w, t, chunk_size=rows, vocab_chunk_size=cols)

        with use_backend(backend):
            fused_peak = peak_bytes(fused, x, w, target)
        eager = peak_bytes(lambda x, w, t: F.cross_entropy(F.linear(x, w), t), x, w, target)
        yield dict(
            shape=(tokens, hidden, vocab), chunk=(rows, cols), path=PATHS[backend], fused=fused_peak, torch=eager
        )


def main():
    header = ("tokens × hidden → vocabulary", "path", "chunk (tokens, classes)", "peak, linear_cross_entropy")
    print("| " + " | ".join(header) + " | peak, torch | full logits |")
    print("|---|---|--:|--:|--:|--:|")
    for r in records():
        tokens, hidden, vocab = r["shape"]
        rows, cols = r["chunk"]
        logits = tokens * vocab * 4
        print(
            f"| {tokens:,} × {hidden} → {vocab:,} | {r['path']} | {rows:,}, {'all' if cols is None else f'{cols:,}'} "
            f"| {r['fused'] / MIB:,.1f} MiB | {r['torch'] / MIB:,.1f} MiB | {logits / MIB:,.1f} MiB |"
        )


if __name__ == "__main__":
    main()
