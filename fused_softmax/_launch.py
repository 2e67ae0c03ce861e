"""Host side of the kernels: strided views, outputs, alignment, launch configuration and launch.

A softmax over ``dim`` sees its tensors as [n_outer, n_cols, n_inner]: ``dim`` between two
runs of the other dims, each run one stride. Every layout that has such a view (contiguous,
transposed, most slices, channels_last along C or N, expanded) reaches the kernel as it is;
only the rest is copied first. Triton is imported on first use only, so ``import fused_softmax``
stays cheap and works where Triton is absent.
"""

import contextlib
import contextvars
import dataclasses
import functools
import math

import numpy as np
import torch

from ._backend import constant_under_compile

_max_block = contextvars.ContextVar("fused_softmax_max_block", default=None)


@contextlib.contextmanager
def limit_block(max_block):
    """Cap the row length kept on chip, so tiny rows reach the online regime (for tests)."""
    token = _max_block.set(max_block)
    try:
        yield
    finally:
        _max_block.reset(token)


@functools.cache
def _kernels():
    from . import kernels

    return kernels


@constant_under_compile
def kernels_interpreted():
    """True when the kernels, and Triton's own library of jitted functions (tl.max, tl.cdiv), were
    decorated under TRITON_INTERPRET=1, so they run on CPU tensors."""
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    return all(isinstance(f, InterpretedFunction) for f in (_kernels()._softmax_forward_kernel, standard.cdiv))


@functools.cache
def _cuda_properties(index):
    props = torch.cuda.get_device_properties(index)
    return _kernels().DeviceProperties(
        name=props.name,
        sm_count=props.multi_processor_count,
        registers_per_sm=getattr(props, "regs_per_multiprocessor", 65536),
        max_threads_per_sm=props.max_threads_per_multi_processor,
    )


def device_properties(device):
    """The GPU's properties; under the interpreter, an H100's, so CPU runs use H100 configs."""
    if device.type == "cuda":
        return _cuda_properties(device.index if device.index is not None else torch.cuda.current_device())
    return _kernels().H100


def _collapse(sizes, strides):
    """(size, stride) of dims that form one strided run, or None. Size-1 dims never break a run."""
    size, stride = 1, 0
    for n, s in zip(reversed(sizes), reversed(strides)):
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


def _views(tensors, dim):
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
    strides = [(outer[1], t.stride(dim), inner[1]) for t, (outer, inner) in zip(tensors, splits)]
    return tensors, (n_outer, tensors[0].shape[dim], n_inner), strides


def empty(shape, dtype, device):
    """Allocate an output (contiguous, as torch returns); tests replace this to poison outputs."""
    return torch.empty(shape, dtype=dtype, device=device)


def _alignment(tensors, strides, n_cols):
    """Largest power of two (in elements) dividing n_cols, every row stride and every start, when the
    columns are unit-stride; 1 otherwise. It lets the kernel prove 128-bit accesses.

    ``strides`` holds each tensor's (column stride, *row strides)."""
    if any(s[0] != 1 for s in strides):
        return 1
    align = _kernels().heuristics.VECTOR_BYTES // max(t.element_size() for t in tensors)
    offsets = [n_cols] + [s for st in strides for s in st[1:]]
    offsets += [t.data_ptr() // t.element_size() for t in tensors]
    divisor = math.gcd(*offsets)
    while divisor % align:
        align //= 2
    return align


@dataclasses.dataclass(frozen=True)
class Scores:
    """What masked_softmax adds to a forward launch over [..., Lq, Lk] scores: the scale, the causal
    diagonal's offset (None: no causal mask), and a mask read through its broadcast strides.

    ``mask`` is bool (read as bytes) or additive float; ``mask_strides`` are its (batch, head, query,
    key) strides once expanded to the scores' shape, the leading dims folded into batch × head
    (``n_heads`` being the size of the head run)."""

    scale: float = 1.0
    causal_offset: int | None = None
    mask: torch.Tensor | None = None
    mask_strides: tuple = (0, 0, 0, 0)
    n_queries: int = 1
    n_heads: int = 1

    @property
    def mask_kind(self):
        if self.mask is None:
            return ""
        return "bool" if self.mask.dtype == torch.uint8 else "additive"


def _mask_view(mask, scores):
    """The mask as the kernel reads it: its strides once broadcast to the scores, the dims before
    [Lq, Lk] folded into two runs, (batch, head). Only a mask whose leading dims fold into no two
    runs (rare: three interleaved strides) is copied, at its own size times the missing dims."""
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    expanded = mask.expand(scores.shape)
    lead, lead_strides = scores.shape[:-2], expanded.stride()[:-2]
    for p in range(len(lead) + 1):
        batch = _collapse(lead[:p], lead_strides[:p])
        head = _collapse(lead[p:], lead_strides[p:])
        if batch and head:
            break
    else:
        expanded = expanded.contiguous()
        batch, head = (1, 0), _collapse(lead, expanded.stride()[:-2])
    query = expanded.stride(-2) if scores.dim() >= 2 else 0
    key = expanded.stride(-1) if scores.dim() else 0
    return expanded, (batch[1], head[1], query, key), head[0]


def scores_plan(scores, mask, scale, causal_offset):
    """The ``Scores`` of a masked_softmax launch over ``scores`` [..., Lq, Lk]."""
    n_queries = scores.shape[-2] if scores.dim() >= 2 else 1
    if mask is None:
        return Scores(scale=scale, causal_offset=causal_offset, n_queries=n_queries)
    mask, strides, n_heads = _mask_view(mask, scores)
    return Scores(scale, causal_offset, mask, strides, n_queries, n_heads)


_PLAIN = Scores()  # a softmax that is not attention's


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a kernel will run over ``tensors`` (inputs, then the output): views, sizes, alignment, config."""

    tensors: tuple
    strides: tuple
    sizes: tuple
    align: int
    config: object
    device: object

    @property
    def grid(self):
        n_outer, _, n_inner = self.sizes
        return (self.config.grid(n_outer, n_inner, self.device),)


def plan(tensors, dim, *, backward=None, scores=None):
    """The launch for ``tensors`` along ``dim``: the regime and tile come from the launch heuristic.

    ``backward`` defaults to whether three tensors (y, dy, dx) are given; a mask in ``scores`` must
    share the alignment."""
    device = device_properties(tensors[0].device)
    tensors, sizes, strides = _views(tensors, dim)
    aligned = list(tensors), [(col, outer, inner) for outer, col, inner in strides]
    if scores is not None and scores.mask is not None:
        batch, head, query, key = scores.mask_strides
        aligned[0].append(scores.mask)
        aligned[1].append((key, batch, head, query))
    align = _alignment(*aligned, sizes[1])
    contiguous_rows = sizes[2] if strides[0][2] == 1 and strides[0][1] != 1 else 1
    config = _kernels().launch_config(
        sizes[1],
        max(t.element_size() for t in tensors),
        device,
        backward=len(tensors) == 3 if backward is None else backward,
        attention=scores is not None,
        align=align,
        contiguous_rows=contiguous_rows,
        max_block=_max_block.get(),
    )
    return Plan(tuple(tensors), tuple(strides), sizes, align, config, device)


_FP32_RANGE = (float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max))


def fits_fp32(scale):
    """Whether ``scale`` is 0 or within fp32's normal range, so ``_scale_parts`` carries it to fp64 math."""
    return scale == 0 or _FP32_RANGE[0] <= abs(scale) <= _FP32_RANGE[1]


@functools.lru_cache(maxsize=64)
def _scale_parts(scale):
    """``scale`` as two fp32 numbers whose sum is it to ~2^-48: Triton passes floats as fp32."""
    with np.errstate(over="ignore"):
        high = float(np.float32(scale))
    return high, scale - high if math.isfinite(high) else 0.0


def _launch(kernel, tensors, dim, *, log=False, backward=False, stats=None, row_stats="", scores=None, scale=1.0):
    """Run ``kernel`` over ``tensors`` along ``dim``, all of one shape: (x, y) forward, (y, dy, dx)
    backward, without the output when ``row_stats`` is 'store' (the kernel then writes one
    statistic per row to ``stats`` instead); with 'load' it reads them from ``stats``."""
    p = plan(tensors, dim % max(tensors[0].dim(), 1), backward=backward, scores=scores)
    n_outer, n_cols, n_inner = p.sizes
    strides = [s for s_outer, s_col, s_inner in p.strides for s in (s_outer // p.align, s_col, s_inner // p.align)]
    n_pointers = 3 if backward else 2
    pointers = [*p.tensors, *[None] * (n_pointers - len(p.tensors))]
    strides += [0] * (3 * n_pointers - len(strides))
    sizes = (n_outer, n_cols // p.align, n_inner)
    constexprs = dict(LOG=log, ROW_STATS=row_stats, ALIGN=p.align, **p.config.constexprs())
    if backward:
        args = [*pointers, stats, *sizes, *strides, *_scale_parts(scale)]
    else:
        s = scores or _PLAIN
        batch, head, query, key = s.mask_strides
        mask_args = [batch // p.align, head // p.align, query // p.align, key, s.n_queries, s.n_heads]
        args = [*pointers, stats, s.mask, *sizes, *strides, *mask_args, s.causal_offset or 0, *_scale_parts(s.scale)]
        constexprs.update(ATTENTION=scores is not None, MASK=s.mask_kind, CAUSAL=s.causal_offset is not None)
    with torch.cuda.device(p.tensors[0].device) if p.tensors[0].is_cuda else contextlib.nullcontext():
        kernel[p.grid](*args, **constexprs)


def _stats_dtype(*tensors):
    """Row statistics are kept in the kernel's compute dtype."""
    return torch.float64 if max(t.element_size() for t in tensors) == 8 else torch.float32


def _rows_shape(x, dim):
    """The shape of one statistic per row: x's without ``dim`` (non-negative)."""
    return x.shape[:dim] + x.shape[dim + 1 :]


def softmax_forward(x, dim, out_dtype, log=False, lse=None):
    """softmax (or log_softmax) of ``x`` along ``dim``, contiguous, in ``out_dtype``. Given the rows'
    log-sum-exp ``lse`` (from other shards too), exp(x - lse) (or x - lse): one read, one write."""
    y = empty(x.shape, out_dtype, x.device)
    if y.numel():
        row_stats, lse = ("", None) if lse is None else ("load", lse.contiguous())
        _launch(_kernels()._softmax_forward_kernel, (x, y), dim, log=log, stats=lse, row_stats=row_stats)
    return y


def row_stats(x, dim):
    """Each row's (max, sum of exp(x - max)) along ``dim``: shape x.shape without dim, plus 2."""
    stats = empty((*_rows_shape(x, dim), 2), _stats_dtype(x), x.device)
    if x.shape[dim] == 0:
        stats[..., 0], stats[..., 1] = float("-inf"), 0.0
    elif stats.numel():
        _launch(_kernels()._softmax_forward_kernel, (x,), dim, stats=stats, row_stats="store")
    return stats


def masked_softmax_forward(x, out_dtype, scores):
    """softmax of scale * x + mask over the last dim of [..., Lq, Lk] scores, causal if asked."""
    y = empty(x.shape, out_dtype, x.device)
    if y.numel():
        _launch(_kernels()._softmax_forward_kernel, (x, y), x.dim() - 1, scores=scores)
    return y


def softmax_backward(y, dy, dim, out_dtype, log=False, row_sums=None, scale=1.0):
    """Input gradient from y and dy along ``dim``, times ``scale``, contiguous, in ``out_dtype``.
    ``row_sums`` (sum of dy * y, or of dy for log) are computed in the kernel unless given."""
    dx = empty(y.shape, out_dtype, y.device)
    if dx.numel():
        row_stats, row_sums = ("", None) if row_sums is None else ("load", row_sums.contiguous())
        kernel = _kernels()._softmax_backward_kernel
        _launch(kernel, (y, dy, dx), dim, log=log, backward=True, stats=row_sums, row_stats=row_stats, scale=scale)
    return dx


def backward_row_sums(y, dy, dim, log=False):
    """The backward's row sums along ``dim``: of dy * y (softmax) or of dy (log_softmax)."""
    sums = empty(_rows_shape(y, dim), _stats_dtype(y, dy), y.device)
    if y.shape[dim] == 0:
        sums.zero_()
    elif sums.numel():
        _launch(_kernels()._softmax_backward_kernel, (y, dy), dim, log=log, backward=True, stats=sums, row_stats="store")
    return sums
