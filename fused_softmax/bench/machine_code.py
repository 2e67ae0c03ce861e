"""What ptxas makes of every kernel an H100 is given, computed offline: an audit of the generated
machine code.

A register spill or a narrow global access costs bandwidth without failing any numerical
test, and both are decided at compile time. So every shipped kernel is compiled for sm_90
with ``triton.compile`` (no GPU needed) and its cubin is read with Triton's bundled tools:
registers and stack from ``cuobjdump -res-usage``, spills and access widths from the SASS
(``nvdisasm``).

A kernel is what Triton's JIT compiles for one launch: the constexprs the host passes, and the
JIT's specialisation of every other argument: a tensor becomes a pointer to its dtype, marked
``tt.divisibility=16`` when 16-byte aligned; an integer equal to 1, or None, becomes a constant;
a multiple of 16 is marked ``tt.divisibility=16``. Nothing here re-derives the host's logic:
the host's own job functions (``_launch.softmax_forward`` and the rest) plan each launch on real
(CPU, unwritten) tensors under ``testing.recorded_launches(run=False)``, and Triton's own
``native_specialize_impl`` (the JIT's, in Triton 3.6 and 3.9 alike) specialises the arguments.

The launches: contiguous [3, N] tensors, softmax over the last dim, for every row length N
from 1 to ``MAX_COLS``, in each kernel dtype (fp16/bf16/fp32/fp64) and the fused upcasts
fp16/bf16 -> fp32 (forward x fp16/bf16 -> y fp32; backward y, dy fp32 -> dx fp16/bf16; the
rarer upcasts to fp64 are left out), forward and backward, softmax and log-softmax. For such
rows the config depends on N through its next power of two and the host's alignment, and the
alignment and the JIT's view of the N / ALIGN it is passed depend on the largest power of two
dividing N (see ``_brackets``): a few lengths per power-of-two bracket reach every kernel. 3
rows, odd, leave n_inner unspecialised, the least the compiler may assume. Plus a layout whose
rows, not columns, are unit-stride: a softmax over dim 1 of a contiguous [4, N, 64] tensor, for
one on-chip and one online row length; and the masked-softmax, row-statistics and
cross-entropy kernels at a few row lengths (``mode_kernels``).

Compiling is the cost: about 0.3 s of CPU per kernel, so ``compile_all`` spreads it over
processes (Triton's compiler holds the GIL, threads do not overlap).
"""

import bisect
import concurrent.futures
import dataclasses
import inspect
import itertools
import math
import multiprocessing
import os
import pickle
import re
import struct
import subprocess
import sys
import tempfile
from collections import Counter

import torch
import triton
import triton.language as tl
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from .. import _launch, _softcap_sinks, kernels
from ..kernels import LaunchConfig
from ..testing import cooperative, recorded_launches, split_threshold

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
ELEM_BYTES = {name: dtype.itemsize for name, dtype in TORCH_DTYPES.items()}
# Tensor dtypes of a launch: forward (x, y), backward (y, dy, dx) with dx in x's dtype.
FORWARD_DTYPES = (
    ("fp16", "fp16"),
    ("bf16", "bf16"),
    ("fp32", "fp32"),
    ("fp64", "fp64"),
    ("fp16", "fp32"),
    ("bf16", "fp32"),
)
VARIANTS = [(False, d) for d in FORWARD_DTYPES] + [(True, (y, y, x)) for x, y in FORWARD_DTYPES]
PLAIN_KERNELS = ("softmax_forward_kernel", "softmax_backward_kernel")
MAX_COLS = 1 << 22
ROWS = 3
STRIDED = "dim 1 of [4, N, 64]"
STRIDED_LENGTHS = (1000, 100_000)
VECTOR_BITS = 128
TARGET = GPUTarget("cuda", 90, 32)
_DIVISIBLE_BY_16 = [["tt.divisibility", 16]]
# The constexprs a LaunchConfig sets; a kernel's others (LOG, PRODUCT, ALIGN, ONLINE, MASK, CAUSAL) are its switches.
_CONFIG_CONSTEXPRS = ("BLOCK_N", "ROWS", "COMPUTE_DTYPE")


class ToolchainMissing(RuntimeError):
    """ptxas, cuobjdump or nvdisasm cannot be found, so nothing can be compiled or read here."""


def toolchain():
    """The ptxas Triton uses for sm_90, and its cuobjdump and nvdisasm, as (path, version) tools."""
    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(TARGET.arch), knobs.nvidia.cuobjdump, knobs.nvidia.nvdisasm
    except (ImportError, RuntimeError) as e:
        raise ToolchainMissing(f"no CUDA toolchain for Triton: {e}") from None


def compiler():
    """The Triton and ptxas the audit compiles with, as 'Triton 3.6.0, ptxas 12.8': spills and
    registers are theirs (Triton 3.6 bundles ptxas 12.8, 3.9 ptxas 13.4, and the two differ)."""
    ptxas, _, _ = toolchain()
    return f"Triton {triton.__version__}, ptxas {ptxas.version}"


def _spec_class(spec):
    """An integer argument as the JIT sees it: '1' (a constant), '%16' (divisible by 16) or '-'."""
    kind, attr = spec
    return "1" if kind == "constexpr" else "%16" if attr == "D" else "-"


def _constexpr_names(function):
    """The kernel's parameters annotated ``tl.constexpr`` (the interpreter's functions too)."""
    return [name for name, p in inspect.signature(function.fn).parameters.items() if p.annotation is tl.constexpr]


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One compiled variant, as the JIT would build it for a launch.

    ``name`` is the kernel's in ``fused_softmax.kernels``; ``switches`` its constexprs other than
    the config's, as (name, value) pairs; ``spec`` the JIT's specialisation of each runtime
    argument, as (name, (type, attribute)): ("x_ptr", ("*fp16", "D")), ("n_cols", ("i32", "")),
    ("mask_ptr", ("constexpr", None)). ``layout`` and ``n_range`` (the row lengths that launch
    this kernel: all of them between the bounds that share ``cols``' class and alignment)
    describe, and take no part in equality.
    """

    name: str
    config: LaunchConfig
    switches: tuple
    spec: tuple
    layout: str = dataclasses.field(default="last dim", compare=False)
    n_range: tuple = dataclasses.field(default=(0, 0), compare=False)

    @property
    def function(self):
        return getattr(kernels, self.name)

    @property
    def plain(self):
        """A softmax / log-softmax kernel, not a masked-softmax or row-statistics one."""
        return self.name in PLAIN_KERNELS

    @property
    def backward(self):
        return "backward" in self.name

    @property
    def log(self):
        switches = dict(self.switches)
        return switches.get("LOG", False) or switches.get("PRODUCT", "softmax") != "softmax"

    @property
    def align(self):
        return dict(self.switches)["ALIGN"]

    @property
    def dtypes(self):
        """The tensors' dtypes, in argument order."""
        return tuple(kind[1:] for _, (kind, _) in self.spec if kind.startswith("*"))

    @property
    def cols(self):
        """The JIT's view of the n_cols argument (N / ALIGN): '1', '%16' or '-'."""
        return _spec_class(dict(self.spec)["n_cols"])

    def constexprs(self):
        """The compile-time keyword arguments the host passes: the config's and the switches."""
        return self.config.constexprs() | dict(self.switches)

    def source(self):
        """The ASTSource the JIT would build for this launch."""
        constexprs, spec = self.constexprs(), dict(self.spec)
        signature, attrs = {}, {}
        for i, name in enumerate(self.function.arg_names):
            if name in constexprs:
                signature[name] = "constexpr"
                continue
            kind, attr = spec[name]
            signature[name] = kind
            if kind == "constexpr":
                constexprs[name] = attr
            elif attr == "D":
                attrs[(i,)] = _DIVISIBLE_BY_16
            elif attr:
                raise ValueError(f"unknown specialisation {attr!r} of {name}")
        return ASTSource(fn=self.function, signature=signature, constexprs=constexprs, attrs=attrs)


def _kernel_of(launch, layout, n):
    """The Kernel of a recorded ``_launch.Launch``, checked against the kernel's own signature."""
    constexpr_names = _constexpr_names(launch.kernel)
    if set(launch.args) != set(launch.kernel.arg_names):
        raise RuntimeError(f"{launch.name} takes {launch.kernel.arg_names}, the host passes {sorted(launch.args)}")
    config = launch.plan.config
    if any(launch.args[k] != v for k, v in config.constexprs().items()):
        raise RuntimeError(f"{launch.name}: the host's constexprs differ from its plan's config")
    switches = tuple((k, launch.args[k]) for k in constexpr_names if k not in _CONFIG_CONSTEXPRS)
    spec = tuple(
        (k, tuple(native_specialize_impl(BaseBackend, launch.args[k], False, True, True)[:2]))
        for k in launch.kernel.arg_names
        if k not in constexpr_names
    )
    return Kernel(launch.name, config, switches, spec, layout, (n, n))


def launched_all(job, *tensors, layout="last dim", n=None):
    """The Kernels that ``job(*tensors)``, one of the host's job functions, launches, in order."""
    with recorded_launches(run=False) as launches:
        job(*tensors)
    return [_kernel_of(launch, layout, n) for launch in launches]


def launched(job, *tensors, layout="last dim", n=None):
    """The one Kernel that ``job(*tensors)`` launches. Rows are never split here: the
    split-row regime's kernels are enumerated on their own (``split_kernels``)."""
    with split_threshold(math.inf):
        (kernel,) = launched_all(job, *tensors, layout=layout, n=n)
    return kernel


def _empty(shape, dtype):
    return torch.empty(shape, dtype=TORCH_DTYPES[dtype])


def plain_kernel(backward, dtypes, log, shape, dim=None, layout="last dim"):
    """The kernel the host launches for softmax (or log-softmax, ``log``) of tensors of ``shape``
    and ``dtypes`` (x, y forward; y, dy, dx backward) along ``dim`` (default the last)."""
    dim = len(shape) - 1 if dim is None else dim
    if backward:
        y, dy, dx = dtypes
        tensors = (_empty(shape, y), _empty(shape, dy))
        return launched(
            lambda y, dy: _launch.softmax_backward(y, dy, dim, TORCH_DTYPES[dx], log),
            *tensors,
            layout=layout,
            n=shape[dim],
        )
    x, y = dtypes
    return launched(
        lambda x: _launch.softmax_forward(x, dim, TORCH_DTYPES[y], log), _empty(shape, x), layout=layout, n=shape[dim]
    )


def _brackets():
    """(lo, hi, lengths) per power-of-two bracket (lo, hi] of row lengths: hi and hi - 2**j.

    For contiguous rows the host's ALIGN is the largest power of two dividing N, capped at
    a 16-byte vector (at most 8 elements), and the JIT sees N / ALIGN as 1, a multiple of 16
    or neither: both depend on N only through that power of two, up to 16 x 8 = 128. hi - 2**j
    is divisible by exactly 2**j, and hi by itself, so these lengths reach every kernel of
    the bracket (and the test checks many others against them).
    """
    for k in range(MAX_COLS.bit_length()):
        hi = 1 << k
        lo = hi // 2 + 1
        yield lo, hi, sorted({hi} | {hi - (1 << j) for j in range(8) if hi - (1 << j) >= lo})


def shipped_kernels():
    """Every kernel an H100 is given for contiguous rows of 1 to ``MAX_COLS`` elements, and
    for the strided layout ``STRIDED``: deduplicated, with the row lengths that launch each.
    Then the masked-softmax and row-statistics kernels (``mode_kernels``)."""
    ranges = {}
    for backward, dtypes in VARIANTS:
        for log in (False, True):
            for lo, hi, lengths in _brackets():
                for n in lengths:
                    kernel = plain_kernel(backward, dtypes, log, (ROWS, n))
                    # A constant N / ALIGN is launched for exactly one length.
                    lo_hi = (n, n) if kernel.cols == "1" else (lo, hi)
                    old = ranges.get(kernel, lo_hi)
                    ranges[kernel] = (min(old[0], lo_hi[0]), max(old[1], lo_hi[1]))
            for n in STRIDED_LENGTHS:
                kernel = plain_kernel(backward, dtypes, log, (4, n, 64), 1, STRIDED)
                ranges.setdefault(kernel, (n, n))
    return [dataclasses.replace(k, n_range=r) for k, r in ranges.items()] + mode_kernels()


MODE_LENGTHS = (64, 1000, 4096, 16384, 32768, 131072)
MODE_DTYPES = ("fp16", "bf16", "fp32", "fp64")


def _mode_launches(n):
    """(job, tensors, description) of the masked-softmax, forward-mode and row-statistics
    launches for rows of ``n``: masked_softmax with each mask kind, with softcapping and sinks
    (forward and backward), log-softmax's tangent (the backward kernel's third PRODUCT) and each
    statistics kernel."""
    for d in MODE_DTYPES:
        x, dtype = _empty((ROWS, n), d), TORCH_DTYPES[d]
        stats = torch.empty(ROWS, dtype=_launch.stats_dtype(dtype))
        for mask, causal, name in (
            (None, 0, "masked softmax, causal"),
            (torch.ones(1, n, dtype=torch.bool), None, "masked softmax, bool mask"),
            (torch.empty(ROWS, n, dtype=dtype), 0, "masked softmax, additive mask, causal"),
        ):
            masking = _launch.masking(x, mask, 0.125, causal)
            yield lambda x, masking=masking: _launch.masked_softmax_forward(x, x.dtype, masking), (x,), name
        yield lambda y, v: _launch.jacobian_product(y, v, 1, y.dtype, "log_softmax_jvp"), (x, x), "log-softmax jvp"
        yield from _softcap_sinks_launches(n, d)
        yield lambda x: _launch.row_statistics(x, 1), (x,), "row stats out"
        yield lambda x, lse=stats: _launch.normalise_with_lse(x, 1, x.dtype, False, lse), (x,), "row lse in"
        yield lambda y, dy: _launch.backward_row_sums(y, dy, 1), (x, x), "row sums out"
        yield (
            lambda y, dy, sums=stats: _launch.backward_with_row_sums(y, dy, 1, y.dtype, "softmax", sums),
            (x, x),
            "row sums in",
        )


CROSS_ENTROPY_LENGTHS = (1000, 4096, 8192, 16384, 131072)
CROSS_ENTROPY_DTYPES = ("bf16", "fp32", "fp64")  # fp16 compiles as bf16 does


def _cross_entropy_launches(n):
    """(job, tensors, description) of the cross-entropy launches for rows of ``n`` classes: with the
    gradient, plain and with every option (weights, smoothing, z-loss, softcap); the loss alone;
    probability targets; a mean's or sum's reduction of ``n`` rows' losses, and a mean's gradient
    factor (weighted); the backward's scaling (one factor, one per row)."""
    for d in CROSS_ENTROPY_DTYPES:
        x, dtype = _empty((ROWS, n), d), TORCH_DTYPES[d]
        index, probabilities = torch.zeros(ROWS, dtype=torch.int64), torch.empty(ROWS, n, dtype=dtype)
        weight, scale = torch.empty(n, dtype=dtype), torch.empty(1, dtype=_launch.stats_dtype(dtype))
        for target, options, name in (
            (index, dict(weight=None, smoothing=0.0, z_loss=0.0, softcap=None), "cross entropy, gradient"),
            (index, dict(weight=weight, smoothing=0.1, z_loss=1e-4, softcap=30.0), "cross entropy, all options"),
            (probabilities, dict(weight=None, smoothing=0.1, z_loss=0.0, softcap=None), "cross entropy, probabilities"),
        ):

            def job(x, target=target, options=options, scale=scale):
                grad = torch.empty_like(x)
                probability = target.is_floating_point()
                _launch.cross_entropy_forward(
                    x, target, ignore_index=-100, grad=grad, grad_scale=scale, probabilities=probability, **options
                )

            yield job, (x,), name

        def loss_only(x, target=index):
            _launch.cross_entropy_forward(x, target, None, ignore_index=-100, smoothing=0.1, z_loss=0.0, softcap=None)

        yield loss_only, (x,), "cross entropy, loss out"
        losses, targets = torch.empty(n, dtype=_launch.stats_dtype(dtype)), torch.zeros(n, dtype=torch.int64)
        for divisor, name in (("", "sum"), ("rows", "mean of rows"), ("scale", "mean")):

            def reduction(losses, divisor=divisor, dtype=dtype, scale=scale):
                _launch.reduced_losses(losses, (1,), divisor, dtype, scale)

            yield reduction, (losses,), f"cross entropy {name} of {n} rows, one value out"
        yield (
            lambda targets, weight=weight, dtype=scale.dtype: _launch.mean_grad_scales(
                targets, weight, 1, -100, n, dtype
            ),
            (targets,),
            f"cross entropy mean factor of {n} rows, one value out",
        )
        for upstream, name in (
            (torch.empty((), dtype=dtype), "one factor"),
            (torch.empty(ROWS, dtype=dtype), "per row"),
        ):
            yield (
                lambda x, upstream=upstream: _launch.scale_cross_entropy_grad(x, upstream, 1),
                (x,),
                f"cross entropy backward, {name}",
            )


def _vocab_slice_launches(n):
    """(job, tensors, description) of the kernels on one slice of ``n`` classes (a vocab-parallel
    shard, a chunk of linear_cross_entropy's vocabulary): the statistics and the gradient, plain
    and with label smoothing, z-loss and softcapping."""
    for d in CROSS_ENTROPY_DTYPES:
        x, dtype = _empty((ROWS, n), d), TORCH_DTYPES[d]
        stats_dtype = _launch.stats_dtype(dtype)
        target, lse = torch.zeros(ROWS, dtype=torch.int64), torch.empty(ROWS, 2, dtype=stats_dtype)
        scale = torch.empty(ROWS, dtype=stats_dtype)
        for options, name in (
            (dict(smoothing=0.0), "vocabulary slice"),
            (dict(smoothing=0.1, z_loss=1e-4, softcap=30.0), "vocabulary slice, all options"),
        ):
            options |= dict(vocab_start=n, ignore_index=-100)
            statistics_options = {k: v for k, v in options.items() if k != "z_loss"}

            def statistics(x, target=target, options=statistics_options):
                _launch.vocab_slice_statistics(x, target, **options)

            def grad(x, target=target, lse=lse, scale=scale, options=options):
                _launch.vocab_slice_grad(x, target, lse, scale, n_classes=2 * n, grad=x, **options)

            yield statistics, (x,), f"{name}, statistics out"
            yield grad, (x,), f"{name}, gradient"


def _softcap_sinks_launches(n, d):
    """masked_softmax with softcapping, sinks or a bias beside a bool mask, forward and backward,
    over [1, ROWS, 1, n] scores (a sink per head of ROWS), in dtype ``d``."""
    scores, dtype = _empty((1, ROWS, 1, n), d), TORCH_DTYPES[d]
    lse = torch.empty(1, ROWS, 1, dtype=_launch.stats_dtype(dtype))
    sinks = torch.empty(ROWS, dtype=dtype)
    padding, additive, bias = (
        torch.ones(1, n, dtype=torch.bool),
        torch.empty(1, n, dtype=dtype),
        torch.empty(n, dtype=dtype),
    )
    for mask, causal, softcap, options, name in (
        (padding, 0, 30.0, dict(sinks=sinks), "masked softmax, softcap and sinks, bool mask, causal"),
        (additive, None, 30.0, {}, "masked softmax, softcap, additive mask"),
        (padding, 0, None, dict(bias=bias), "masked softmax, bool mask and bias, causal"),
    ):
        masking = _launch.masking(scores, mask, 0.125, causal, softcap, **options)
        yield (
            lambda x, masking=masking: _launch.masked_softmax_forward_with_lse(x, x.dtype, masking),
            (scores,),
            name,
        )
        if softcap is None:  # a bias alone: softmax's backward kernel, listed with the plain kernels
            continue
        backward_options = dict(lse=lse, mask=mask, sinks=options.get("sinks"), scale=0.125, softcap=softcap)
        yield (
            lambda y, dy, o=backward_options: _softcap_sinks.kernel_backward(y, dy, out_dtype=y.dtype, **o),
            (scores, scores),
            f"{name}, backward",
        )


def mode_kernels():
    """The masked-softmax and row-statistics kernels at ``MODE_LENGTHS``, the cross-entropy and
    vocabulary-slice kernels at ``CROSS_ENTROPY_LENGTHS`` and the split-row kernels
    (``split_kernels``, ``masked_split_kernels``, ``split_cross_entropy_kernels``,
    ``cooperative_kernels``), deduplicated."""
    found = {}
    launches = [(n, _mode_launches(n)) for n in MODE_LENGTHS]
    launches += [(n, _cross_entropy_launches(n)) for n in CROSS_ENTROPY_LENGTHS]
    launches += [(n, _vocab_slice_launches(n)) for n in CROSS_ENTROPY_LENGTHS]
    for n, jobs in launches:
        for job, tensors, name in jobs:
            kernel = launched(job, *tensors, layout=name, n=n)
            found.setdefault(kernel, kernel)
    split = split_kernels() + masked_split_kernels() + split_cross_entropy_kernels()
    return list(found.values()) + split + cooperative_kernels()


# Decoding-sized tensors, the split-row regime's: (rows, row length).
SPLIT_SHAPES = [(1, 262144), (4, 131072), (32, 32768), (128, 32768)]
SPLIT_PRODUCTS = ("softmax", "log_softmax_vjp", "log_softmax_jvp")


def split_kernels():
    """The split-row kernels the heuristic gives ``SPLIT_SHAPES`` in each dtype, forward
    (softmax, log-softmax) and backward (each product), deduplicated; the first phase's kernels
    (per-chunk values out) named "chunks out", the second's "chunks in"."""
    found = {}
    for (m, n), d in itertools.product(SPLIT_SHAPES, MODE_DTYPES):
        x = _empty((m, n), d)
        jobs = [lambda x, log=log: _launch.softmax_forward(x, 1, x.dtype, log) for log in (False, True)]
        jobs += [lambda x, kind=kind: _launch.jacobian_product(x, x, 1, x.dtype, kind) for kind in SPLIT_PRODUCTS]
        _split_phases([(job, (x,)) for job in jobs], n, found)
    return list(found.values())


def _split_phases(jobs, n, found, phases=("chunks out", "chunks in")):
    """The two launches of each split job into ``found``, named by ``phases`` (as ``split_kernels``
    names them by default); jobs whose rows do not split (one launch) add nothing."""
    for job, tensors in jobs:
        kernels = launched_all(job, *tensors, n=n)
        if len(kernels) == 2:
            for kernel, phase in zip(kernels, phases, strict=True):
                kernel = dataclasses.replace(kernel, layout=phase)
                found.setdefault(kernel, kernel)


def masked_split_kernels():
    """The masked-softmax split-row kernels the heuristic gives decoding scores [1, H, 1, Lk],
    (H, Lk) from ``SPLIT_SHAPES``, in each dtype: forward under a bool mask and the causal
    diagonal, under softcapping, sinks and an additive mask, and with a bias beside a bool mask;
    backward under softcapping and sinks (without them it is softmax's, in ``split_kernels``)."""
    found = {}
    for (h, n), d in itertools.product(SPLIT_SHAPES, MODE_DTYPES):
        scores, dtype = _empty((1, h, 1, n), d), TORCH_DTYPES[d]
        lse = torch.empty(1, h, 1, dtype=_launch.stats_dtype(dtype))
        sinks, padding = torch.empty(h, dtype=dtype), torch.ones(1, n, dtype=torch.bool)
        additive, bias = torch.empty(1, n, dtype=dtype), torch.empty(n, dtype=dtype)
        jobs = []
        for mask, causal, options in (
            (padding, n - 1, {}),
            (additive, None, dict(softcap=30.0, sinks=sinks)),
            (padding, None, dict(bias=bias)),
        ):
            masking = _launch.masking(scores, mask, 0.125, causal, **options)
            jobs.append((lambda x, m=masking: _launch.masked_softmax_forward_with_lse(x, x.dtype, m), (scores,)))
        backward = dict(lse=lse, mask=additive, sinks=sinks, scale=0.125, softcap=30.0)
        jobs.append(
            (lambda y, dy, o=backward: _softcap_sinks.kernel_backward(y, dy, out_dtype=y.dtype, **o), (scores, scores))
        )
        _split_phases(jobs, n, found)
    return list(found.values())


def split_cross_entropy_kernels():
    """The slice kernels of cross_entropy's split-row regime the heuristic gives ``SPLIT_SHAPES``
    in each dtype, with the gradient, plain and with smoothing, z-loss and softcapping,
    deduplicated: the statistics named "cross entropy, chunks out", the gradient "cross entropy,
    split gradient"."""
    found = {}
    for (m, n), d in itertools.product(SPLIT_SHAPES, CROSS_ENTROPY_DTYPES):
        x, scale = _empty((m, n), d), torch.empty(1, dtype=_launch.stats_dtype(TORCH_DTYPES[d]))
        target = torch.zeros(m, dtype=torch.int64)
        jobs = []
        for options in (dict(smoothing=0.0, z_loss=0.0, softcap=None), dict(smoothing=0.1, z_loss=1e-4, softcap=30.0)):

            def job(x, target=target, scale=scale, options=options):
                grad = torch.empty_like(x)
                _launch.cross_entropy_forward(
                    x, target, None, ignore_index=-100, grad=grad, grad_scale=scale, **options
                )

            jobs.append((job, (x,)))
        _split_phases(jobs, n, found, ("cross entropy, chunks out", "cross entropy, split gradient"))
    return list(found.values())


def cooperative_kernels():
    """The cooperative split-row kernels (off by default; ``testing.cooperative``) the heuristic
    gives ``SPLIT_SHAPES`` in each dtype, forward (softmax, log-softmax) and backward (each
    product), deduplicated, named "cooperative"."""
    found = {}
    for (m, n), d in itertools.product(SPLIT_SHAPES, MODE_DTYPES):
        x = _empty((m, n), d)
        jobs = [lambda x, log=log: _launch.softmax_forward(x, 1, x.dtype, log) for log in (False, True)]
        jobs += [lambda x, kind=kind: _launch.jacobian_product(x, x, 1, x.dtype, kind) for kind in SPLIT_PRODUCTS]
        for job in jobs:
            with cooperative():
                kernels = launched_all(job, x, n=n)
            for kernel in kernels:
                if kernel.config.cooperative:
                    kernel = dataclasses.replace(kernel, layout="cooperative")
                    found.setdefault(kernel, kernel)
    return list(found.values())


def kernel_for(backward, dtypes, log, n):
    """The shipped kernel that rows of ``n`` elements launch, by the same route."""
    return plain_kernel(backward, dtypes, log, (ROWS, n))


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What the cubin of one kernel uses, per thread where it is per thread.

    ``local_bytes`` is the local memory (stack frame, where spills land, plus any other);
    ``loads`` / ``stores`` map a global access width in bits to its count of SASS instructions.
    ``ordering``: the PTX's CTA barriers and memory-ordered global accesses and fences, in
    order, each as (instruction, whether it lies in a loop), from ``memory_ordering``.
    """

    kernel: Kernel
    registers: int
    local_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int
    loads: dict
    stores: dict
    ordering: tuple = ()

    @property
    def spills(self):
        return self.local_bytes > 0 or self.spill_store_bytes > 0 or self.spill_load_bytes > 0


_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_SASS_OP = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T0-9]+\s+)?(LDG|STG|LDL|STL)((?:\.\w+)*)", re.M)
_WIDTHS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


def _width(modifiers):
    """Bits one lane moves: the size modifier of LDG/STG/LDL/STL, 32 when there is none."""
    return next((_WIDTHS[m] for m in modifiers.split(".") if m in _WIDTHS), 32)


_ORDERED = re.compile(
    r"^\s*(?:@!?%p\d+\s+)?((?:atom|red|ld|st)\.global\.\S*(?:acquire|release|acq_rel)\S*|fence\.\S+|membar\.\S+|bar\.sync)\b",
    re.M,
)
_LABEL = re.compile(r"^(\$L__BB\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\w+);")


def memory_ordering(ptx):
    """(instruction, in a loop) for each CTA barrier (bar.sync) and each acquire / release / acq_rel
    global access or fence of ``ptx``, in order. A loop is the lines from a label to a later
    branch back to it."""
    lines = ptx.splitlines()
    labels, loops = {}, []
    for i, line in enumerate(lines):
        if label := _LABEL.match(line):
            labels[label.group(1)] = i
        if (branch := _BRANCH.search(line)) and branch.group(1) in labels:
            loops.append((labels[branch.group(1)], i))
    found = []
    for i, line in enumerate(lines):
        if ordered := _ORDERED.match(line):
            found.append((ordered.group(1), any(start < i < end for start, end in loops)))
    return tuple(found)


def _build(kernel):
    """Compile ``kernel``; return its cubin, Triton's shared-memory request, -res-usage's counts
    and the PTX's ``memory_ordering``."""
    _, cuobjdump, _ = toolchain()
    options = {"num_warps": kernel.config.num_warps, "enable_fp_fusion": True}  # as the host launches
    if kernel.config.cooperative:
        options |= dict(launch_cooperative_grid=True, maxnreg=kernel.config.max_registers)
    binary = triton.compile(kernel.source(), target=TARGET, options=options)
    cubin = binary.asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump.path, "-res-usage", f.name], check=True, capture_output=True, text=True)
    usage = tuple(map(int, _RES_USAGE.search(usage.stdout).groups()))
    return cubin, binary.metadata.shared, usage, memory_ordering(binary.asm["ptx"])


def _machine_code(cubin):
    """The kernel's instructions: the .text.<kernel> section of the cubin, an ELF64 file."""
    (table,) = struct.unpack_from("<Q", cubin, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", cubin, 0x3A)
    # Section header: name offset, (type), flags, address, file offset, size.
    sections = [struct.unpack_from("<I4xQQQQ", cubin, table + i * entry_size) for i in range(count)]
    names = sections[names_index][3]
    for name, _, _, offset, size in sections:
        start = names + name
        if cubin[start : cubin.index(b"\0", start)].startswith(b".text."):
            return cubin[offset : offset + size]
    raise ValueError("cubin without a .text section")


def _global_and_local_accesses(cubins):
    """Per cubin, {LDG/STG/LDL/STL: Counter(width in bits)} from its SASS.

    nvdisasm and cuobjdump -sass take half a second to start, longer than most compiles, so
    all the machine code is disassembled in one nvdisasm call as one raw SM90a binary and
    each instruction is assigned back by its address.
    """
    _, _, nvdisasm = toolchain()
    codes = [_machine_code(c) for c in cubins]
    ends = list(itertools.accumulate(map(len, codes)))
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(b"".join(codes))
        f.flush()
        sass = subprocess.run([nvdisasm.path, "-b", "SM90a", f.name], check=True, capture_output=True, text=True)
    accesses = [{op: Counter() for op in ("LDG", "STG", "LDL", "STL")} for _ in codes]
    for address, op, modifiers in _SASS_OP.findall(sass.stdout):
        accesses[bisect.bisect_right(ends, int(address, 16))][op][_width(modifiers)] += 1
    return accesses


def _interpreted():
    """Under TRITON_INTERPRET=1 (CPU test runs) @triton.jit, Triton's own helpers included, only interprets."""
    return not isinstance(kernels.softmax_forward_kernel, JITFunction)


_CHILD = """
import pickle, sys
from fused_softmax.bench.machine_code import compile_all
with open(sys.argv[1], "rb") as f:
    kernels, workers = pickle.load(f)
with open(sys.argv[2], "wb") as f:
    pickle.dump(compile_all(kernels, workers), f)
"""


def _compile_in_child(kernels, workers):
    """Compile in a fresh Python without TRITON_INTERPRET, where the kernels are JIT functions again."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        args, results = os.path.join(tmp, "kernels.pkl"), os.path.join(tmp, "compiled.pkl")
        with open(args, "wb") as f:
            pickle.dump((kernels, workers), f)
        child = subprocess.run([sys.executable, "-c", _CHILD, args, results], env=env, capture_output=True, text=True)
        if child.returncode:
            raise RuntimeError(f"compiling in a child process failed:\n{child.stderr}")
        with open(results, "rb") as f:
            return pickle.load(f)


def compile_all(kernels=None, workers=None):
    """Compile ``kernels`` (default: every shipped one) for sm_90 and read what each uses.

    Registers and stack come from cuobjdump -res-usage. Spills land in the stack frame
    (STACK, not LOCAL), and the bytes of the SASS's STL/LDL add up to ptxas -v's "spill
    stores" / "spill loads". Compiles run in ``workers`` processes (default: one per core;
    1: in this one): Triton's compiler holds the GIL, so threads would not overlap.
    """
    kernels = shipped_kernels() if kernels is None else list(kernels)
    toolchain()
    if _interpreted():
        return _compile_in_child(kernels, workers)
    workers = max(1, min(workers or os.cpu_count() or 1, len(kernels)))
    if workers == 1:
        built = [_build(k) for k in kernels]
    else:
        # Forked workers start at once; nothing has compiled (or started threads) before here.
        start = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(start)) as pool:
            built = list(pool.map(_build, kernels))
    accesses = _global_and_local_accesses([cubin for cubin, *_ in built])
    records = []
    for kernel, (_, shared, (registers, stack, static_shared, local), ordering), bits in zip(
        kernels, built, accesses, strict=True
    ):
        records.append(
            Compiled(
                kernel=kernel,
                registers=registers,
                local_bytes=stack + local,
                spill_store_bytes=sum(w * n for w, n in bits["STL"].items()) // 8,
                spill_load_bytes=sum(w * n for w, n in bits["LDL"].items()) // 8,
                shared_bytes=shared + static_shared,
                loads=dict(bits["LDG"]),
                stores=dict(bits["STG"]),
                ordering=ordering,
            )
        )
    return records


def compile_kernel(kernel):
    """``compile_all`` for one kernel, in this process."""
    return compile_all([kernel], workers=1)[0]


def _widths(counts):
    return " ".join(f"{n}x{w}" for w, n in sorted(counts.items(), reverse=True)) or "-"


def format_table(records):
    """A markdown table, one row per compiled kernel."""
    lines = [
        "| pass | dtypes | LOG | layout | N range | ALIGN | N/ALIGN | BLOCK_N | ROWS | online | warps | regs"
        " | spill st/ld B | local B | smem B | LDG (count x bits) | STG (count x bits) |",
        "|---|---|---|---|---|--:|---|--:|--:|---|--:|--:|--:|--:|--:|---|---|",
    ]
    for r in records:
        k, c = r.kernel, r.kernel.config
        lo, hi = k.n_range
        lines.append(
            f"| {'bwd' if k.backward else 'fwd'} | {'/'.join(k.dtypes)} | {'yes' if k.log else 'no'} | {k.layout}"
            f" | {lo if lo == hi else f'{lo}..{hi}'} | {k.align} | {k.cols} | {c.block_n} | {c.rows_per_program}"
            f" | {'yes' if c.online else 'no'} | {c.num_warps} | {r.registers}"
            f" | {r.spill_store_bytes}/{r.spill_load_bytes} | {r.local_bytes} | {r.shared_bytes}"
            f" | {_widths(r.loads)} | {_widths(r.stores)} |"
        )
    return "\n".join(lines) + "\n"
