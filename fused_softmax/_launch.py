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
    columns are unit-stride; 1 otherwise. It lets the kernel prove 128-bit accesses."""
    if any(s[1] != 1 for s in strides):
        return 1
    align = _kernels().heuristics.VECTOR_BYTES // max(t.element_size() for t in tensors)
    offsets = [n_cols] + [s for st in strides for s in (st[0], st[2])]
    offsets += [t.data_ptr() // t.element_size() for t in tensors]
    divisor = math.gcd(*offsets)
    while divisor % align:
        align //= 2
    return align


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


def plan(tensors, dim):
    """The launch for ``tensors`` along ``dim``: the regime and tile come from the launch heuristic."""
    device = device_properties(tensors[0].device)
    tensors, sizes, strides = _views(tensors, dim)
    align = _alignment(tensors, strides, sizes[1])
    contiguous_rows = sizes[2] if strides[0][2] == 1 and strides[0][1] != 1 else 1
    config = _kernels().launch_config(
        sizes[1],
        max(t.element_size() for t in tensors),
        device,
        backward=len(tensors) == 3,
        align=align,
        contiguous_rows=contiguous_rows,
        max_block=_max_block.get(),
    )
    return Plan(tuple(tensors), tuple(strides), sizes, align, config, device)


def _launch(kernel, tensors, dim, log):
    """Run ``kernel`` over ``tensors`` (inputs then output) along ``dim``, all of one shape."""
    p = plan(tensors, dim)
    n_outer, n_cols, n_inner = p.sizes
    strides = [s for s_outer, s_col, s_inner in p.strides for s in (s_outer // p.align, s_col, s_inner // p.align)]
    with torch.cuda.device(p.tensors[0].device) if p.tensors[0].is_cuda else contextlib.nullcontext():
        kernel[p.grid](
            *p.tensors,
            n_outer,
            n_cols // p.align,
            n_inner,
            *strides,
            LOG=log,
            ALIGN=p.align,
            **p.config.constexprs(),
        )


def softmax_forward(x, dim, out_dtype, log=False):
    """softmax (or log_softmax) of ``x`` along ``dim``, contiguous, in ``out_dtype``."""
    y = empty(x.shape, out_dtype, x.device)
    if y.numel():
        _launch(_kernels()._softmax_forward_kernel, (x, y), dim % max(x.dim(), 1), log)
    return y


def softmax_backward(y, dy, dim, out_dtype, log=False):
    """Input gradient from y and dy along ``dim``, contiguous, in ``out_dtype``."""
    dx = empty(y.shape, out_dtype, y.device)
    if dx.numel():
        _launch(_kernels()._softmax_backward_kernel, (y, dy, dx), dim % max(y.dim(), 1), log)
    return dx
