"""How tensors reach the kernels: strided [n_outer, n_cols, n_inner] views, masks through their
broadcast strides, and the alignment the host can prove.

A softmax over ``dim`` sees its tensors as [n_outer, n_cols, n_inner]: ``dim`` between two runs
of the other dims, each run one stride. Every layout that has such a view (contiguous,
transposed, most slices, channels_last along C or N, expanded) reaches the kernel as it is;
only the rest is copied first.
"""

import functools
import math

import torch

from ._runtime import kernels


def _collapse(sizes, strides):
    """(size, stride) of dims that form one strided run, or None. Size-1 dims never break a run."""
    size, stride = 1, 0
    for n, s in zip(reversed(sizes), reversed(strides), strict=True):
        if n == 1:
            continue
        if size == 1:
            size, stride = n, s
        elif s == stride * size:
            size *= n
        else:
            return None
    return size, stride


def _split(t, rest, p):
    """``t``'s dims ``rest`` split at ``p`` into two strided runs, (outer, inner) (size, stride) pairs, or None."""
    outer = _collapse([t.shape[d] for d in rest[:p]], [t.stride(d) for d in rest[:p]])
    inner = _collapse([t.shape[d] for d in rest[p:]], [t.stride(d) for d in rest[p:]])
    return None if outer is None or inner is None else (outer, inner)


def row_views(tensors, dim):
    """The tensors, their common (n_outer, n_cols, n_inner) and each one's (outer, col, inner) strides.

    The dims other than ``dim`` are split, in order, into an outer and an inner run; the first
    split at which every tensor has both runs wins, starting with the dims before and after
    ``dim``. When none exists, the tensors without that natural split are copied. Where the
    inner run is empty (a last-dim softmax), the rows run along the outer dims instead, so
    tiles can pack many rows.
    """
    if tensors[0].dim() == 0:
        return tensors, (1, 1, 1), [(0, 1, 0)] * len(tensors)
    rest = [d for d in range(tensors[0].dim()) if d != dim]
    for p in [dim, *(p for p in range(len(rest) + 1) if p != dim)]:
        splits = [_split(t, rest, p) for t in tensors]
        if all(splits):
            break
    else:
        tensors = [t if _split(t, rest, dim) else t.contiguous() for t in tensors]
        splits = [_split(t, rest, dim) for t in tensors]
    (n_outer, _), (n_inner, _) = splits[0]
    if n_inner == 1:
        n_outer, n_inner = 1, n_outer
        splits = [((1, 0), outer) for outer, _ in splits]
    strides = [(outer[1], t.stride(dim), inner[1]) for t, (outer, inner) in zip(tensors, splits, strict=True)]
    return tensors, (n_outer, tensors[0].shape[dim], n_inner), strides


def alignment(tensors, strides, n_cols):
    """Largest power of two (in elements) dividing n_cols, every row stride and every start, when the
    columns are unit-stride; 1 otherwise. It lets the kernel prove 128-bit accesses.

    ``strides`` holds each tensor's (column stride, *row strides)."""
    if any(s[0] != 1 for s in strides):
        return 1
    align = kernels().heuristics.VECTOR_BYTES // max(t.element_size() for t in tensors)
    offsets = [n_cols] + [s for st in strides for s in st[1:]]
    offsets += [t.data_ptr() // t.element_size() for t in tensors]
    divisor = math.gcd(*offsets)
    while divisor % align:
        align //= 2
    return align


def mask_bytes(mask):
    """A mask as the kernels load it: a bool one as bytes (a view), any other as it is."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def mask_view(mask, scores):
    """The mask as the kernel reads it: (the mask, bool as bytes; its (batch, head, query, key)
    strides broadcast to the scores, the dims before [Lq, Lk] folded into two runs; the head
    run's size). Only a mask whose leading dims fold into no two runs (rare: three interleaved
    strides) is copied, at its own size times the missing dims."""
    mask = mask_bytes(mask)
    folded = _folded_strides(mask.shape, mask.stride(), scores.shape)
    if folded is None:
        mask = mask.expand(scores.shape).contiguous()
        folded = _folded_strides(mask.shape, mask.stride(), scores.shape)
    return mask, *folded


@functools.lru_cache(maxsize=1024)
def _folded_strides(sizes, strides, shape):
    """((batch, head, query, key) strides, the head run's size) of a tensor of ``sizes`` and
    ``strides`` broadcast to ``shape``, or None where its leading dims fold into no two runs.
    Cached by layout: a decoding step asks the same every call."""
    missing = len(shape) - len(sizes)
    # Broadcast strides: 0 along each dim missing or of size 1 (where one index is all there is).
    broadcast = tuple(0 if d < missing or sizes[d - missing] == 1 else strides[d - missing] for d in range(len(shape)))
    lead = shape[:-2]
    for p in range(len(lead) + 1):
        batch = _collapse(lead[:p], broadcast[:p])
        head = _collapse(lead[p:], broadcast[p : len(lead)])
        if batch and head:
            query = broadcast[-2] if len(shape) >= 2 else 0
            key = broadcast[-1] if shape else 0
            return (batch[1], head[1], query, key), head[0]
    return None
