"""Launching the kernels: one function per job, the plan of each launch, and the one place
where a launch is made.

A plan is the strided view of the tensors (``_layout``), the alignment proven for them and
the launch heuristic's configuration. Every launch passes its arguments by keyword, exactly
those its kernel takes. The testing seam (``overridden``, wrapped by ``fused_softmax.testing``)
lets tests poison outputs, cap the on-chip row, plan for another device and observe (or only
record) each launch.
"""

import contextlib
import dataclasses
import functools
import math
import os

import numpy as np
import torch

from ._jacobian import backward_product
from ._layout import alignment, mask_bytes, mask_view, row_views
from ._runtime import device_properties, kernels, kernels_interpreted
from ._slices import combined_statistics, losses_from_statistics

# The cooperative split-row regime (``kernels.cooperative``: a split row read once, its programs
# meeting at a barrier) is off until a GPU run has checked it: FUSED_SOFTMAX_COOPERATIVE=1 turns
# it on, read once, when fused_softmax is imported (``testing.cooperative`` inside a block).
COOPERATIVE = os.environ.get("FUSED_SOFTMAX_COOPERATIVE", "0").strip() == "1"
# A Ready launch calling its compiled kernel without Triton's binder (``DirectLaunch``) is off
# until a GPU run has checked it too: FUSED_SOFTMAX_DIRECT_LAUNCH=1, read at import, turns it on
# (``testing.direct_launch`` inside a block).
DIRECT_LAUNCH = os.environ.get("FUSED_SOFTMAX_DIRECT_LAUNCH", "0").strip() == "1"
# The barrier's polls before a program gives up and writes NaN (it never should: its partners
# are resident and arrive within microseconds; 2^24 polls take seconds).
MAX_SPINS = 1 << 24


@dataclasses.dataclass(frozen=True)
class Overrides:
    """What ``fused_softmax.testing`` changes for the calls inside a block."""

    poison: bool = False  # outputs NaN-filled before a kernel writes them
    max_block: int | None = None  # cap on the on-chip row, so tiny rows reach the online regime
    device: object = None  # the DeviceProperties to plan for, instead of the tensors' device's
    observers: tuple = ()  # callables given each Launch before it runs
    run: bool = True  # False: plan and observe launches, run none (the offline machine-code audit)
    min_split_bytes: float | None = None  # the split-row regime's threshold, instead of the heuristic's
    cooperative: bool | None = None  # the cooperative regime on or off, instead of COOPERATIVE
    direct_launch: bool | None = None  # Ready launches call their compiled kernels, instead of DIRECT_LAUNCH

    @functools.cached_property
    def plan_key(self):
        """What of these overrides decides a plan (part of the plan cache's key)."""
        return (self.device, self.max_block, self.min_split_bytes, self.cooperative)

    @functools.cached_property
    def launches_directly(self):
        """Whether Ready launches call their compiled kernels (``DirectLaunch``)."""
        return DIRECT_LAUNCH if self.direct_launch is None else self.direct_launch

    @functools.cached_property
    def ready_key(self):
        """What of these overrides decides a Ready launch: its plan, and whether it launches directly."""
        return (*self.plan_key, self.launches_directly)


_overrides = Overrides()


@contextlib.contextmanager
def overridden(*, observe=None, **changes):
    """Apply ``changes`` to the Overrides (and add the observer ``observe``) inside the block.

    A module global, not a context variable: the autograd engine runs CUDA backwards on threads
    of its own, and they must see the same overrides."""
    global _overrides
    previous = _overrides
    observers = previous.observers + ((observe,) if observe else ())
    _overrides = dataclasses.replace(previous, observers=observers, **changes)
    try:
        yield
    finally:
        _overrides = previous


def empty(shape, dtype, device):
    """An output, contiguous as torch returns them (NaN-filled under ``poison``)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if _overrides.poison else out


def empty_like(x, dtype):
    """An output shaped like ``x``, contiguous, in ``dtype`` (NaN-filled under ``poison``):
    ``torch.empty_like`` parses its arguments faster than ``torch.empty`` with a shape."""
    out = torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)
    return out.fill_(float("nan")) if _overrides.poison else out


def stats_dtype(*dtypes):
    """Row statistics are kept in the kernels' compute dtype: float64 for float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def indexed(t):
    """``t`` as the kernels read class-index targets and class weights: at ``ptr + i``, so
    contiguous (a copy of a strided one); None stays None."""
    return t if t is None else t.contiguous()


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a kernel runs over ``tensors`` (inputs, then the output): their (outer, col, inner)
    strides, the common (n_outer, n_cols, n_inner), the proven alignment, the configuration."""

    tensors: tuple
    strides: tuple
    sizes: tuple
    align: int
    config: object
    device: object
    grid: tuple  # the launch grid, (programs,)
    torch_device: torch.device  # where the tensors are (a Ready plan keeps no tensors)

    @property
    def n_rows(self):
        return self.sizes[0] * self.sizes[2]

    def of_inputs(self, count):
        """The plan of a launch that takes only the first ``count`` tensors (a split row's first phase)."""
        return Plan(
            self.tensors[:count],
            self.strides[:count],
            self.sizes,
            self.align,
            self.config,
            self.device,
            self.grid,
            self.torch_device,
        )

    def chunk_arguments(self):
        """A split row's chunking, for the split-row kernels (chunk_cols divided by ALIGN)."""
        return dict(chunk_cols=self.config.chunk_cols // self.align, n_chunks=self.config.chunks)

    def slice_chunk_arguments(self):
        """The vocabulary-slice kernels' chunking: ``chunk_arguments`` and SPLIT, or one chunk of
        the whole row where the plan does not split it."""
        if self.config.chunks > 1:
            return self.chunk_arguments() | dict(SPLIT=True)
        return dict(chunk_cols=self.sizes[1] // self.align, n_chunks=1, SPLIT=False)

    def places(self, tensors):
        """Where each of the plan's tensors is among ``tensors``; None for one that is not there
        (a copy in a layout the kernels read)."""
        return tuple(next((i for i, t in enumerate(tensors) if t is view), None) for view in self.tensors)

    def with_tensors(self, tensors):
        """This plan over other tensors of the same layout: a cached plan's copy for one call,
        sharing the arguments it has built (cheaper than dataclasses.replace)."""
        self.__dict__.setdefault("_arguments", {})
        copy = object.__new__(Plan)
        copy.__dict__.update(self.__dict__)
        copy.__dict__["tensors"] = tensors
        return copy

    def arguments(self, *names):
        """The kernel's keyword arguments for the tensors, called ``names`` there: pointers, sizes
        and strides (n_cols and the row strides divided by ALIGN), ALIGN and the tile's constexprs.
        All but the pointers are built once per plan and names."""
        built = self.__dict__.setdefault("_arguments", {})
        layout = built.get(names)
        if layout is None:
            layout = built[names] = self._layout_arguments(names)
        args = layout.copy()
        for name, tensor in zip(names, self.tensors, strict=True):
            args[name + "_ptr"] = tensor
        return args

    def _layout_arguments(self, names):
        n_outer, n_cols, n_inner = self.sizes
        args = dict(n_outer=n_outer, n_cols=n_cols // self.align, n_inner=n_inner, ALIGN=self.align)
        for name, (outer, col, inner) in zip(names, self.strides, strict=True):
            args[f"{name}_stride_outer"] = outer // self.align
            args[f"{name}_stride_col"] = col
            args[f"{name}_stride_inner"] = inner // self.align
        return args | self.config.constexprs()


_PLANS = {}
_KEPT_MAX = 4096  # plans (and Ready launches) kept at most


def plan(tensors, dim, *, backward, masking=None, cross_entropy=False, split=False):
    """The launch over ``tensors`` along ``dim``: views, alignment (shared with a mask in
    ``masking``) and the heuristic's configuration for the forward or ``backward`` kernel (or
    the ``cross_entropy`` one); with ``split``, for jobs that have a split-row regime, one that
    may cut the rows into chunks.

    Plans are cached by what decides them (shapes, strides, dtypes, device, each start's offset
    in a 16-byte vector, a mask's too, the overrides): a small call's host time is mostly
    planning. Plans that copy an input into a layout the kernels read are made afresh."""
    key = _layouts(
        tensors,
        (
            dim,
            backward,
            _masks_layout(masking),
            cross_entropy,
            split,
            _overrides.plan_key,  # COOPERATIVE, the default, is fixed at import
        ),
    )
    cached = _PLANS.get(key)
    if cached is not None:
        return cached.with_tensors(tuple(tensors))
    p = _plan(tensors, dim, backward, masking, cross_entropy, split)
    if None not in p.places(tensors):
        _keep(_PLANS, key, p.with_tensors(()))  # the plan, not the caller's tensors
    return p


def _layouts(tensors, key):
    """``key`` followed by what of each tensor decides a plan: shape, strides, dtype, device, its
    start in a 16-byte vector; in one flat tuple, the cheapest key to build and hash."""
    for t in tensors:
        key += (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16)
    return key


def _masks_layout(masking):
    """What of ``masking`` decides a plan: whether it keeps statistics, and each mask's dtype,
    broadcast strides and start in a 16-byte vector (the alignment is shared with the scores)."""
    if masking is None:
        return None
    key = (masking.keeps_statistics,)
    for mask, strides in masking.read_masks():
        key += (mask.dtype, strides, mask.data_ptr() % 16)
    return key


def _keep(cache, key, value):
    """``cache[key] = value``, the cache emptied first when full: layouts seen long ago go."""
    if len(cache) >= _KEPT_MAX:
        cache.clear()
    cache[key] = value


def _plan(tensors, dim, backward, masking, cross_entropy, split):
    device = _overrides.device or device_properties(tensors[0].device)
    tensors, sizes, strides = row_views(tensors, dim % max(tensors[0].dim(), 1))
    aligned = list(tensors), [(col, outer, inner) for outer, col, inner in strides]
    for mask, (batch, head, query, key) in masking.read_masks() if masking is not None else ():
        aligned[0].append(mask)
        aligned[1].append((key, batch, head, query))
    align = alignment(*aligned, sizes[1])
    contiguous_rows = sizes[2] if strides[0][2] == 1 and strides[0][1] != 1 else 1
    heuristics = kernels().heuristics
    splitting = {}
    if split:
        cooperative = COOPERATIVE if _overrides.cooperative is None else _overrides.cooperative
        splitting = dict(
            n_rows=sizes[0] * sizes[2], min_split_bytes=heuristics.SPLIT_MIN_BYTES, cooperative=cooperative
        )
        if _overrides.min_split_bytes is not None:
            splitting["min_split_bytes"] = _overrides.min_split_bytes
    config = heuristics.launch_config(
        sizes[1],
        max(t.element_size() for t in tensors),
        device,
        backward=backward,
        attention=0 if masking is None else 1 + masking.keeps_statistics,
        cross_entropy=cross_entropy,
        align=align,
        contiguous_rows=contiguous_rows,
        max_block=_overrides.max_block,
        **splitting,
    )
    grid = (config.grid(sizes[0], sizes[2], device),)
    return Plan(tuple(tensors), tuple(strides), sizes, align, config, device, grid, tensors[0].device)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One launch as it is made: the kernel, every argument by name, and the plan behind them."""

    kernel: object
    args: dict
    plan: Plan

    @property
    def name(self):
        return self.kernel.__name__


def _run(kernel, p, args):
    """Launch ``kernel`` on ``p``'s grid with the keyword arguments ``args``. FP fusion is passed
    explicitly: Triton 3.9 warns on every first launch that leaves it to a default. A cooperative
    plan is launched cooperatively (``_cooperative_launch``). Returns what Triton's launch
    returns: on a GPU the compiled kernel, under the interpreter None (and None if not run)."""
    if _overrides.observers:
        launch = Launch(kernel, args, p)
        for observe in _overrides.observers:
            observe(launch)
    if not _overrides.run:
        return None
    options = _cooperative_launch(p.config) if p.config.cooperative else {}
    device = p.torch_device
    elsewhere = device.type == "cuda" and device.index != torch.cuda.current_device()
    with torch.cuda.device(device) if elsewhere else contextlib.nullcontext():  # Triton launches on the current device
        return kernel[p.grid](**args, num_warps=p.config.num_warps, enable_fp_fusion=True, **options)


@dataclasses.dataclass(frozen=True)
class Ready:
    """A one-launch job planned for a layout and kept with every argument but the tensors: a
    small call on tensors of that layout, whose host path is its cost, goes straight to ``_run``,
    or with ``direct`` (a GPU's compiled kernel, where the direct launch is on) past it."""

    kernel: object
    plan: Plan  # without tensors
    args: dict  # every argument but the tensors' pointers
    pointers: tuple  # the tensors' pointer arguments, in the call's order
    planned: tuple  # where the plan's tensors are among the call's
    direct: "DirectLaunch | None" = None

    def launch(self, tensors):
        if self.direct is not None and self.direct.serves():
            self.direct.launch(tensors)
            return
        args = self.args.copy()
        # A loop, cheaper than update(); no strict=, whose keyword alone costs 1.5k instructions a call:
        # the key this Ready was found by holds one layout for each of its tensors.
        for name, tensor in zip(self.pointers, tensors):  # noqa: B905
            args[name] = tensor
        observed = _overrides.observers and self.plan.with_tensors(tuple(tensors[i] for i in self.planned))
        _run(self.kernel, observed or self.plan, args)


def positional_arguments(kernel, args):
    """``args`` (every argument by name) in the order of ``kernel``'s parameters, constexprs too:
    the order Triton's binder gives its launcher."""
    return [args[name] for name in kernel.arg_names]


@dataclasses.dataclass(frozen=True)
class DirectLaunch:
    """A Ready launch's compiled kernel, called as ``CompiledKernel[grid](*args)``, without
    ``JITFunction.run``: its binder, which re-derives the specialization from every argument,
    and its cache lookup (about 10 µs of Python a launch). The Ready's key holds all that the
    specialization reads (dtypes, each pointer's 16-byte alignment, the integers, the
    constexprs), so it picks the kernel this one is. Made only where the direct launch is on (a
    part of the Ready's key); serves only on the device it was compiled for, with no observer or
    stubbed run in force."""

    runner: object  # CompiledKernel[grid]
    arguments: tuple  # every argument in the kernel's order, the tensors' places None
    places: tuple  # the tensors' places in ``arguments``, in the plan's order
    device_index: int

    def serves(self):
        return _overrides.run and not _overrides.observers and torch.cuda.current_device() == self.device_index

    def launch(self, tensors):
        arguments = list(self.arguments)
        for place, tensor in zip(self.places, tensors):  # noqa: B905 (as in Ready.launch)
            arguments[place] = tensor
        self.runner(*arguments)


def _direct_launch(kernel, compiled, p, args, pointers):
    """The ``DirectLaunch`` of ``compiled`` (Triton's compiled kernel, from the launch just made
    with ``args``) where the direct launch is on; None where it is off or there is no compiled
    kernel (the interpreter; a stubbed run)."""
    if not _overrides.launches_directly or compiled is None or p.torch_device.type != "cuda":
        return None
    arguments = positional_arguments(kernel, args)
    places = tuple(kernel.arg_names.index(name) for name in pointers)
    for place in places:
        arguments[place] = None
    runner = compiled[(p.grid[0], 1, 1)]
    return DirectLaunch(runner, tuple(arguments), places, p.torch_device.index)


_READY = {}


def _ready_key(job, inputs, out):
    """``job`` (its name and every value it depends on besides the tensors) on ``inputs``' layouts,
    writing ``out``: a new contiguous tensor on the inputs' device, whose shape the inputs' decide
    (``empty_like`` of the first, or one value a batch entry), so its dtype and alignment are all
    it adds."""
    return _layouts(inputs, (job, _overrides.ready_key, out.dtype, out.data_ptr() % 16))


def _launched_ready(job, inputs, out):
    """Launch ``job`` from the ``Ready`` launch kept for these layouts; False if none was kept."""
    ready = _READY.get(_ready_key(job, inputs, out))
    if ready is None:
        return False
    ready.launch((*inputs, out))
    return True


def _present(named, out):
    """(the tensors of ``named``, (name, tensor or None) pairs, that are there; their names and
    then ``out``'s): a Ready job's inputs and pointer names, for a launch whose optional tensors
    the kernel takes as None."""
    present = [(name, tensor) for name, tensor in named if tensor is not None]
    return tuple(tensor for _, tensor in present), (*[name for name, _ in present], out)


def _run_ready(job, inputs, out, kernel, p, args, names):
    """``_run`` a one-launch job, and keep it ``Ready`` for the next call of ``job`` on tensors of
    these layouts (``names``: theirs in ``args``, less ``_ptr``) when the plan's tensors are among
    them, not copies in a layout the kernel reads."""
    compiled = _run(kernel, p, args)
    planned = p.places((*inputs, out))
    if None not in planned:
        pointers = tuple(f"{name}_ptr" for name in names)
        others = {name: value for name, value in args.items() if name not in pointers}
        direct = _direct_launch(kernel, compiled, p, args, pointers)
        ready = Ready(kernel, p.with_tensors(()), others, pointers, planned, direct)
        _keep(_READY, _ready_key(job, inputs, out), ready)


def _cooperative_launch(config):
    """The launch option that makes every program of the grid resident at once, or the driver
    refuse the launch: the cooperative kernels' barrier is correct only so; and the register cap
    a thread under which the planned programs fit an SM together. Raises where it
    cannot be had: under the interpreter, which runs programs one after another (the barrier
    would never open), and with a Triton whose launcher lacks the option (before 3.3), which
    would ignore it."""
    if kernels_interpreted():
        raise RuntimeError(
            "the cooperative split-row regime cannot run under Triton's interpreter, which runs programs "
            "one after another (its barrier would never open): unset FUSED_SOFTMAX_COOPERATIVE"
        )
    from triton.backends.nvidia.compiler import CUDAOptions

    if "launch_cooperative_grid" not in CUDAOptions.__dataclass_fields__:
        raise RuntimeError(
            "the cooperative split-row regime needs Triton's launch_cooperative_grid (Triton 3.3 or later): "
            "unset FUSED_SOFTMAX_COOPERATIVE"
        )
    return dict(launch_cooperative_grid=True, maxnreg=config.max_registers)


@functools.lru_cache(maxsize=64)
def fp32_pair(value):
    """``value`` as two fp32 numbers whose sum is it to ~2^-48: Triton passes floats as fp32."""
    with np.errstate(over="ignore"):
        high = float(np.float32(value))
    return high, value - high if math.isfinite(high) else 0.0


_FP32_RANGE = (float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max))


def fits_fp32(scale):
    """Whether ``scale`` is 0 or within fp32's normal range, so ``fp32_pair`` carries it to fp64 math."""
    return scale == 0 or _FP32_RANGE[0] <= abs(scale) <= _FP32_RANGE[1]


def _rows_shape(x, dim):
    """The shape of one statistic per row: x's without ``dim`` (non-negative)."""
    return x.shape[:dim] + x.shape[dim + 1 :]


def softmax_forward(x, dim, out_dtype, log=False):
    """softmax (or log_softmax) of ``x`` along ``dim``, contiguous, in ``out_dtype``."""
    y = empty_like(x, out_dtype)
    job = ("softmax_forward", dim, log)
    if y.numel() and not _launched_ready(job, (x,), y):
        p = plan((x, y), dim, backward=False, split=True)
        if p.config.cooperative:
            _cooperative_forward(p, log)
        elif p.config.chunks > 1:
            _split_forward(p, log)
        else:
            args = p.arguments("x", "y") | dict(ONLINE=p.config.online, LOG=log)
            _run_ready(job, (x,), y, kernels().softmax_forward_kernel, p, args, ("x", "y"))
    return y


def _chunk_values(p, x):
    return empty((p.n_rows, p.config.chunks), stats_dtype(x.dtype), x.device)


def _split_forward(p, log):
    """The split-row forward: each chunk's statistics, then each chunk of y from its row's."""
    maxes, sums = _chunk_values(p, p.tensors[0]), _chunk_values(p, p.tensors[0])
    first = p.of_inputs(1)
    _run(
        kernels().chunk_statistics_kernel,
        first,
        first.arguments("x") | p.chunk_arguments() | dict(maxes_ptr=maxes, sums_ptr=sums),
    )
    args = p.arguments("x", "y") | p.chunk_arguments() | dict(maxes_ptr=maxes, sums_ptr=sums, LOG=log)
    _run(kernels().chunk_normalise_kernel, p, args | dict(CHUNKS=p.config.chunk_slots))


def _barrier(p):
    """The cooperative kernels' barrier: an arrival counter per tile, zeroed for this call (one
    memset, ordered before the kernel by the stream), and the polls before giving up."""
    (grid,) = p.grid
    arrivals = torch.zeros(grid // p.config.chunks, dtype=torch.int32, device=p.tensors[0].device)
    return dict(arrivals_ptr=arrivals, max_spins=MAX_SPINS)


def _cooperative_forward(p, log):
    """The cooperative forward: each chunk read once, its statistics shared across a barrier."""
    maxes, sums = _chunk_values(p, p.tensors[0]), _chunk_values(p, p.tensors[0])
    args = p.arguments("x", "y") | p.chunk_arguments() | _barrier(p)
    args |= dict(maxes_ptr=maxes, sums_ptr=sums, LOG=log, CHUNKS=p.config.chunk_slots)
    _run(kernels().cooperative_softmax_kernel, p, args)


def jacobian_product(y, v, dim, out_dtype, kind, scale=1.0):
    """``scale`` times the product ``kind`` (see ``_jacobian``) of v with softmax's Jacobian at y,
    along ``dim``, contiguous, in ``out_dtype``: the backward kernel, the split-row pair or the
    cooperative kernel."""
    out = empty_like(y, out_dtype)
    job = ("jacobian_product", dim, kind, scale)
    if out.numel() and not _launched_ready(job, (y, v), out):
        p = plan((y, v, out), dim, backward=True, split=True)
        high, low = fp32_pair(scale)
        args = p.arguments("y", "dy", "dx") | dict(scale_high=high, scale_low=low, PRODUCT=kind)
        if p.config.cooperative:
            chunks = dict(sums_ptr=_chunk_values(p, y), CHUNKS=p.config.chunk_slots)
            _run(kernels().cooperative_product_kernel, p, args | p.chunk_arguments() | _barrier(p) | chunks)
        elif p.config.chunks > 1:
            chunks = dict(sums_ptr=_chunk_row_sums(p, kind), CHUNKS=p.config.chunk_slots)
            _run(kernels().chunk_product_kernel, p, args | p.chunk_arguments() | chunks)
        else:
            args |= dict(ONLINE=p.config.online)
            _run_ready(job, (y, v), out, kernels().softmax_backward_kernel, p, args, ("y", "dy", "dx"))
    return out


def _chunk_row_sums(p, kind):
    """A split row's first backward phase: each chunk's part of the product ``kind``'s row sum."""
    sums = _chunk_values(p, p.tensors[0])
    first = p.of_inputs(2)
    args = first.arguments("y", "dy") | p.chunk_arguments() | dict(sums_ptr=sums, PRODUCT=kind)
    _run(kernels().chunk_row_sums_kernel, first, args)
    return sums


def softmax_backward(y, dy, dim, out_dtype, log=False, scale=1.0):
    """Input gradient from y and dy along ``dim``, times ``scale``, contiguous, in ``out_dtype``."""
    return jacobian_product(y, dy, dim, out_dtype, backward_product(log), scale)


@dataclasses.dataclass(frozen=True)
class Masking:
    """What masked_softmax applies to [..., Lq, Lk] scores before the softmax: the scale, the
    causal diagonal's offset (None: no causal mask) and a mask (None: none) read through its
    broadcast (batch, head, query, key) strides, the leading dims folded into batch x head,
    ``n_heads`` being the size of the head run; the logit softcap, the sinks (one logit per
    head of the dim before Lq) and an additive bias beside a bool mask, read as the mask is,
    None without them."""

    scale: float = 1.0
    causal_offset: int | None = None
    n_queries: int = 1
    mask: torch.Tensor | None = None
    mask_strides: tuple = (None, None, None, None)
    n_heads: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    bias_strides: tuple = (None, None, None, None)
    bias_n_heads: int | None = None

    @property
    def keeps_statistics(self):
        """Softcapping and sinks need each row's log-sum-exp in the backward."""
        return self.softcap is not None or self.sinks is not None

    def read_tensors(self):
        """(name, tensor) of each tensor the forward reads besides the scores: the mask, the bias,
        the sinks. With the scores' shape, their layouts decide every other value of the launch
        but the scale, the causal offset and the cap."""
        named = (("mask", self.mask), ("bias", self.bias), ("sinks", self.sinks))
        return [(name, tensor) for name, tensor in named if tensor is not None]

    def read_masks(self):
        """(tensor, (batch, head, query, key) strides) of each mask the forward reads."""
        pairs = ((self.mask, self.mask_strides), (self.bias, self.bias_strides))
        return [(mask, strides) for mask, strides in pairs if mask is not None]

    def extra_arguments(self, align):
        """The forward kernel's keyword arguments for softcapping, sinks and a bias (its row
        strides divided by ``align``)."""
        batch, head, query, key = self.bias_strides
        if self.bias is not None:
            batch, head, query = batch // align, head // align, query // align
        return dict(
            sinks_ptr=self.sinks,
            n_sink_heads=None if self.sinks is None else self.sinks.numel(),
            softcap=self.softcap,
            bias_ptr=self.bias,
            bias_stride_batch=batch,
            bias_stride_head=head,
            bias_stride_query=query,
            bias_stride_key=key,
            bias_n_heads=self.bias_n_heads,
            SOFTCAP=self.softcap is not None,
            SINKS=self.sinks is not None,
            BIAS=self.bias is not None,
        )

    def backward_arguments(self, align, scale):
        """masked_softmax_backward_kernel's own keyword arguments: the additive mask only where the
        cap's derivative needs it (masked_softmax never pairs a bias with the cap), softcapping
        and sinks, and ``scale`` (the scores' gradient's)."""
        reads_mask = self.softcap is not None and self.mask_kind == "additive"
        args = self.arguments(align) if reads_mask else Masking(n_queries=self.n_queries).arguments(align)
        extras = self.extra_arguments(align)
        for name in ("causal_offset", "CAUSAL", "bias_ptr", "BIAS", "bias_n_heads", *_BIAS_STRIDES):
            (args if name in args else extras).pop(name)
        high, low = fp32_pair(scale)
        return args | extras | dict(scale_high=high, scale_low=low)

    @property
    def mask_kind(self):
        if self.mask is None:
            return ""
        return "bool" if self.mask.dtype == torch.uint8 else "additive"

    def arguments(self, align):
        """The masked_softmax kernel's own keyword arguments (mask row strides divided by ``align``)."""
        batch, head, query, key = self.mask_strides
        if self.mask is not None:  # row strides divided by the alignment; the key stride as it is
            batch, head, query = batch // align, head // align, query // align
        high, low = fp32_pair(self.scale)
        return dict(
            mask_ptr=self.mask,
            mask_stride_batch=batch,
            mask_stride_head=head,
            mask_stride_query=query,
            mask_stride_key=key,
            n_queries=self.n_queries,
            n_heads=self.n_heads,
            causal_offset=self.causal_offset,
            scale_high=high,
            scale_low=low,
            MASK=self.mask_kind,
            CAUSAL=self.causal_offset is not None,
        )


_BIAS_STRIDES = ("bias_stride_batch", "bias_stride_head", "bias_stride_query", "bias_stride_key")


def masking(scores, mask, scale, causal_offset, softcap=None, sinks=None, bias=None):
    """The ``Masking`` of a masked_softmax over ``scores`` [..., Lq, Lk]."""
    n_queries = scores.shape[-2] if scores.dim() >= 2 else 1
    views = {}
    if mask is not None:
        views["mask"], views["mask_strides"], views["n_heads"] = mask_view(mask, scores)
    if bias is not None:
        views["bias"], views["bias_strides"], views["bias_n_heads"] = mask_view(bias, scores)
    if sinks is not None:  # read as sinks_ptr + head
        sinks = sinks.contiguous()
    return Masking(scale, causal_offset, n_queries, softcap=softcap, sinks=sinks, **views)


def masked_softmax_forward(x, out_dtype, masking):
    """softmax of scale * x + mask over the last dim of [..., Lq, Lk] scores, causal if asked."""
    return _masked_softmax_forward(x, empty_like(x, out_dtype), masking, None)


def masked_softmax(x, mask, scale, causal_offset, out_dtype):
    """``masked_softmax_forward`` of a mask (or None), a scale and a causal offset alone: on a
    layout launched before, the Ready launch goes before the ``Masking`` is built."""
    y = empty_like(x, out_dtype)
    if not y.numel():
        return y
    inputs = (x,) if mask is None else (x, mask_bytes(mask))
    read = [("mask", inputs[1])] if mask is not None else []
    if not _launched_ready(_masked_job(read, scale, causal_offset, None), inputs, y):
        _planned_masked_forward(x, y, masking(x, mask, scale, causal_offset), None)
    return y


def masked_softmax_forward_with_lse(x, out_dtype, masking):
    """(y, each row's log-sum-exp) of masked_softmax, the statistics kept where softcapping or
    sinks need them in the backward (else an empty tensor)."""
    lse = empty(x.shape[:-1], stats_dtype(x.dtype), x.device) if masking.keeps_statistics else None
    y = _masked_softmax_forward(x, empty_like(x, out_dtype), masking, lse)
    return y, lse if lse is not None else torch.empty(0, dtype=stats_dtype(x.dtype), device=x.device)


def _masked_job(read, scale, causal_offset, softcap):
    """The Ready job of a masked_softmax forward reading the scores x and ``read`` ((name, tensor)
    pairs), writing y: it names the tensors, in the kernel's terms, and the values besides their
    layouts that decide the launch."""
    return ("masked_softmax_forward", ("x", *[name for name, _ in read], "y"), scale, causal_offset, softcap)


def _masked_job_on(masking, lse):
    """(the Ready job, its input tensors) of a masked_softmax forward of ``masking``, keeping ``lse`` or not."""
    read = masking.read_tensors() + ([("lse", lse)] if lse is not None else [])
    return _masked_job(read, masking.scale, masking.causal_offset, masking.softcap), [tensor for _, tensor in read]


def _masked_softmax_forward(x, y, masking, lse):
    """masked_softmax into ``y``, and each row's log-sum-exp into ``lse`` (None: not kept)."""
    if y.numel():
        job, read = _masked_job_on(masking, lse)
        if not _launched_ready(job, (x, *read), y):
            _planned_masked_forward(x, y, masking, lse)
    elif lse is not None:
        lse.fill_(float("-inf"))
    return y


def _planned_masked_forward(x, y, masking, lse):
    """``_masked_softmax_forward`` of a non-empty y without a kept launch: planned, launched and
    kept Ready when it is one launch."""
    p = plan((x, y), x.dim() - 1, backward=False, masking=masking, split=True)
    if p.config.chunks > 1:
        _split_masked_forward(p, masking, lse)
    else:
        job, read = _masked_job_on(masking, lse)
        args = p.arguments("x", "y") | masking.arguments(p.align) | masking.extra_arguments(p.align)
        args |= dict(lse_ptr=lse, ONLINE=p.config.online)
        _run_ready(job, (x, *read), y, kernels().masked_softmax_forward_kernel, p, args, job[1])


def masked_softmax_backward(y, dy, lse, out_dtype, masking, scale):
    """The scores' gradient, times ``scale``, of a masked_softmax with softcapping or sinks, and
    each row's share of its sink's gradient (None without sinks)."""
    dx = empty_like(y, out_dtype)
    sinks_grad = None if masking.sinks is None else empty(y.shape[:-1], stats_dtype(y.dtype), y.device)
    if dx.numel():
        p = plan((y, dy, dx), y.dim() - 1, backward=True, masking=masking, split=True)
        args = p.arguments("y", "dy", "dx") | masking.backward_arguments(p.align, scale)
        args |= dict(lse_ptr=lse.contiguous(), sinks_grad_ptr=sinks_grad)
        if p.config.chunks > 1:
            chunks = dict(sums_ptr=_chunk_row_sums(p, "softmax"), CHUNKS=p.config.chunk_slots)
            _run(kernels().masked_chunk_grad_kernel, p, args | p.chunk_arguments() | chunks)
        else:
            _run(kernels().masked_softmax_backward_kernel, p, args | dict(ONLINE=p.config.online))
    elif sinks_grad is not None:
        sinks_grad.zero_()
    return dx, sinks_grad


_SINK_ARGUMENTS = ("sinks_ptr", "n_sink_heads", "SINKS")


def _split_masked_forward(p, masking, lse):
    """The split-row masked forward: each chunk's masked statistics (the sinks join their
    combine, not the chunks), then each chunk of y, and each row's log-sum-exp into ``lse``
    (None where not kept), from its row's."""
    maxes, sums = _chunk_values(p, p.tensors[0]), _chunk_values(p, p.tensors[0])
    chunks = p.chunk_arguments() | dict(maxes_ptr=maxes, sums_ptr=sums)
    options = masking.arguments(p.align) | masking.extra_arguments(p.align)
    first = p.of_inputs(1)
    first_options = {name: value for name, value in options.items() if name not in _SINK_ARGUMENTS}
    _run(kernels().masked_chunk_statistics_kernel, first, first.arguments("x") | first_options | chunks)
    args = p.arguments("x", "y") | options | chunks | dict(lse_ptr=lse, CHUNKS=p.config.chunk_slots)
    _run(kernels().masked_chunk_normalise_kernel, p, args)


def row_statistics(x, dim):
    """Each row's (max, sum of exp(x - max)) along ``dim``: shape x.shape without dim, plus 2."""
    stats = empty((*_rows_shape(x, dim), 2), stats_dtype(x.dtype), x.device)
    if x.shape[dim] == 0:
        stats[..., 0], stats[..., 1] = float("-inf"), 0.0
    elif stats.numel():
        p = plan((x,), dim, backward=False)
        args = p.arguments("x") | dict(stats_ptr=stats, ONLINE=p.config.online)
        _run(kernels().row_statistics_kernel, p, args)
    return stats


def normalise_with_lse(x, dim, out_dtype, log, lse):
    """exp(x - lse) (or x - lse) along ``dim``, given each row's log-sum-exp (over other shards
    too) in two parts, ``lse`` [..., 2] (``_slices.log_sum_exp_parts``), contiguous, in
    ``out_dtype``: one read, one write, whatever the row length."""
    y = empty_like(x, out_dtype)
    if y.numel():
        p = plan((x, y), dim, backward=False)
        args = p.arguments("x", "y") | dict(lse_ptr=lse.contiguous(), LOG=log)
        _run(kernels().normalise_with_lse_kernel, p, args)
    return y


def backward_row_sums(y, v, dim, kind="softmax"):
    """The row sums along ``dim`` of the product ``kind`` (see ``_jacobian``): of v * y (softmax),
    of v (log-softmax's vjp) or of exp(y) * v (its jvp)."""
    sums = empty(_rows_shape(y, dim), stats_dtype(y.dtype, v.dtype), y.device)
    if y.shape[dim] == 0:
        sums.zero_()
    elif sums.numel():
        p = plan((y, v), dim, backward=True)
        args = p.arguments("y", "dy") | dict(row_sums_ptr=sums, ONLINE=p.config.online, PRODUCT=kind)
        _run(kernels().backward_row_sums_kernel, p, args)
    return sums


def backward_with_row_sums(y, v, dim, out_dtype, kind, row_sums):
    """The product ``kind`` of v with softmax's Jacobian at y along ``dim``, given each row's sum
    (over other shards too)."""
    dx = empty_like(y, out_dtype)
    if dx.numel():
        p = plan((y, v, dx), dim, backward=True)
        args = p.arguments("y", "dy", "dx") | dict(row_sums_ptr=row_sums.contiguous(), PRODUCT=kind)
        _run(kernels().backward_with_row_sums_kernel, p, args)
    return dx


def cross_entropy_forward(
    x,
    target,
    weight,
    *,
    ignore_index,
    smoothing,
    z_loss,
    softcap,
    grad=None,
    grad_scale=None,
    probabilities=False,
    dim=1,
):
    """Each row's cross-entropy of logits ``x`` with the classes along ``dim``, in the kernels'
    compute dtype, shaped like x without ``dim``. ``target``: class indices in the rows'
    row-major order, or class probabilities shaped like x (``probabilities``). With ``grad`` (a
    tensor shaped like x; x itself to overwrite the logits) the same pass writes into it the
    logits' gradient of Σ loss · ``grad_scale``: a tensor in the compute dtype holding one factor
    per batch entry, the entries splitting the rows, in order, into equal runs (one entry: a
    1-element tensor)."""
    losses = empty(_rows_shape(x, dim), stats_dtype(x.dtype), x.device)
    target, weight = target if probabilities else indexed(target), indexed(weight)
    named = (("x", x), ("target", target), ("weight", weight), ("grad", grad), ("grad_scale", grad_scale))
    inputs, pointers = _present(named, "loss")
    job = ("cross_entropy_forward", pointers, dim, ignore_index, smoothing, z_loss, softcap, probabilities)
    if not losses.numel() or _launched_ready(job, inputs, losses):
        return losses
    if not probabilities and weight is None and _splits_cross_entropy(x, dim):
        options = dict(ignore_index=ignore_index, smoothing=smoothing, z_loss=z_loss, softcap=softcap)
        return _split_cross_entropy(x, target, grad, grad_scale, dim, **options)
    names = ("x", "target") if probabilities else ("x",)
    tensors = (x, target) if probabilities else (x,)
    if grad is not None:
        names, tensors = (*names, "grad"), (*tensors, grad)
    p = plan(tensors, dim, backward=probabilities, cross_entropy=True)
    args = p.arguments(*names) | dict(loss_ptr=losses, weight_ptr=weight, grad_scale_ptr=grad_scale)
    if grad is None:
        args |= dict(grad_ptr=None, grad_stride_outer=None, grad_stride_col=None, grad_stride_inner=None)
    args |= _grad_scale_arguments(p.n_rows, None if grad is None else grad_scale.numel())
    for name, value in (("smoothing", smoothing), ("z_loss", z_loss), ("softcap", softcap or 0.0)):
        args[f"{name}_high"], args[f"{name}_low"] = fp32_pair(float(value))
    args |= dict(
        ONLINE=p.config.online, HAS_WEIGHT=weight is not None, SOFTCAP=softcap is not None, STORE_GRAD=grad is not None
    )
    if probabilities:
        kernel = kernels().cross_entropy_probabilities_kernel
    else:
        kernel = kernels().cross_entropy_kernel
        args |= dict(target_ptr=target, ignore_index=ignore_index, SMOOTHING=smoothing > 0)
    _run_ready(job, inputs, losses, kernel, p, args, pointers)
    return losses


def mean_grad_scales(target, weight, entries, ignore_index, n_classes, dtype):
    """[entries] in ``dtype``: 1 / each batch entry's mean divisor, Σ w_t over its class-index
    targets not ignored (their count without ``weight``), as torch's. ``target``: the entries'
    rows in order."""
    scales = empty((entries,), dtype, target.device)
    targets, weight = indexed(target).view(entries, -1) if entries else None, indexed(weight)
    inputs, pointers = _present((("target", targets), ("weight", weight)), "grad_scale")
    job = ("mean_grad_scales", ignore_index, n_classes)
    if entries and not targets.shape[1]:
        scales.fill_(float("inf"))
    elif entries and not _launched_ready(job, inputs, scales):
        p = plan((targets,), 1, backward=False)
        args = p.arguments("target") | dict(weight_ptr=weight, grad_scale_ptr=scales)
        args |= dict(ignore_index=ignore_index, n_classes=n_classes, HAS_WEIGHT=weight is not None)
        _run_ready(job, inputs, scales, kernels().mean_grad_scale_kernel, p, args, pointers)
    return scales


def reduced_losses(losses, batch, divisor, out_dtype, scales=None):
    """Shaped ``batch``, in ``out_dtype``: the sum of each batch entry's row losses (``losses``,
    contiguous, the entries' rows in order), or their mean: ``divisor`` "rows" divides by the
    entry's rows, "scale" multiplies by the entry's factor in ``scales`` (``mean_grad_scales``'s,
    torch's mean)."""
    out = empty(batch, out_dtype, losses.device)
    entries = out.numel()
    rows = losses.view(entries, -1) if entries else None
    inputs, pointers = _present((("loss", rows), ("scale", scales if divisor == "scale" else None)), "out")
    job = ("reduced_losses", pointers, divisor)
    if entries and not rows.shape[1]:
        out.fill_(float("nan") if divisor else 0.0)
    elif entries and not _launched_ready(job, inputs, out):
        p = plan((rows,), 1, backward=False)
        args = p.arguments("loss") | dict(scale_ptr=scales if divisor == "scale" else None, out_ptr=out)
        _run_ready(job, inputs, out, kernels().reduced_loss_kernel, p, args | dict(DIVISOR=divisor), pointers)
    return out


def _splits_cross_entropy(x, dim):
    """Whether the split-row regime serves a cross-entropy of ``x``: the plan of its statistics
    launch cuts the rows into chunks (rows too few to fill the GPU)."""
    return plan((x,), dim, backward=False, cross_entropy=True, split=True).config.chunks > 1


def _split_cross_entropy(x, target, grad, grad_scale, dim, *, ignore_index, smoothing, z_loss, softcap):
    """``cross_entropy_forward``'s split-row regime, for class-index targets without class
    weights: the whole row is one slice of the classes, cut into chunks. Each chunk's statistics
    (``vocab_slice_statistics_kernel``, every chunk of every row in one launch), the rows' losses
    combined from them with torch ops on [rows, chunks, 4] (``_slices``), then, with ``grad``,
    each chunk's gradient (``vocab_slice_grad_kernel``), scaled by its row's batch entry's
    factor: the logits read twice and the gradient written once, as the one-program kernel's
    online regime does."""
    classes = x.shape[dim]
    options = dict(ignore_index=ignore_index, smoothing=smoothing, softcap=softcap)
    stats = vocab_slice_statistics(x, target, vocab_start=0, dim=dim, split=True, **options)
    chunk_cols = plan((x,), dim, backward=False, cross_entropy=True, split=True).config.chunk_cols
    widths = (classes - chunk_cols * torch.arange(stats.shape[1], device=x.device)).clamp(max=chunk_cols)
    lse, target_logit, smooth_deviation = combined_statistics(stats.transpose(0, 1), widths)
    loss_options = (ignore_index, smoothing, z_loss, softcap)
    losses = losses_from_statistics(lse, target_logit, smooth_deviation, target, classes, loss_options)
    if grad is not None:
        rows, entries = len(target), grad_scale.numel()
        scale = grad_scale.expand(rows) if entries == 1 else grad_scale.repeat_interleave(rows // entries)
        options |= dict(n_classes=classes, z_loss=z_loss, grad=grad, dim=dim, split=True)
        vocab_slice_grad(x, target, lse, scale, vocab_start=0, **options)
    return losses.reshape(_rows_shape(x, dim))


def _grad_scale_arguments(rows, entries):
    """How the cross-entropy kernels find a row's gradient scale: ``entries`` equal runs of rows
    (None: no gradient). The kernels divide in int32."""
    if entries is None:
        return dict(scale_rows=None, grad_scale_stride=None)
    if entries == 1:
        return dict(scale_rows=1, grad_scale_stride=0)
    if rows >= 2**31:
        raise NotImplementedError(f"cross_entropy under vmap: {rows} rows in one launch; at most 2^31 - 1")
    return dict(scale_rows=rows // entries, grad_scale_stride=1)


def scale_cross_entropy_grad(grad, upstream, dim, target=None, ignore_index=-100):
    """``grad`` (the forward's gradient, classes along ``dim``) times the upstream gradient, in
    place: ``upstream`` is one value (0-d) or one per row, shaped like grad without ``dim``.
    Rows whose factor is exactly 1 are not touched, nor, with class-index ``target`` (the rows'
    row-major order), ignored ones, and the host reads nothing. Kept Ready as a launch that
    reads and writes ``grad`` (an input and the output), where the kernel reads ``upstream``
    itself, not a copy."""
    target = indexed(target)
    named = (("grad", grad), ("upstream", upstream), ("target", target))
    inputs, pointers = _present(named, "grad")
    job = ("scale_cross_entropy_grad", dim, ignore_index)
    if not grad.numel() or _launched_ready(job, inputs, grad):
        return grad
    p = plan((grad,), dim, backward=True, cross_entropy=True)
    if p.tensors[0] is not grad:
        raise ValueError("scale_cross_entropy_grad scales a gradient in place: its rows must have a common stride")
    args = p.arguments("grad") | dict(upstream_ptr=upstream, PER_ROW=upstream.dim() > 0)
    args |= dict(target_ptr=target, ignore_index=ignore_index, IGNORES=target is not None)
    if upstream.dim():
        rows = upstream.reshape(p.sizes[0], p.sizes[2])  # a view, unless a copy of one value a row is needed
        args |= dict(upstream_ptr=rows, upstream_stride_outer=rows.stride(0), upstream_stride_inner=rows.stride(1))
        if rows.data_ptr() != upstream.data_ptr():  # a copy: the next call makes its own
            _run(kernels().scale_grad_kernel, p, args)
            return grad
    else:
        args |= dict(upstream_stride_outer=None, upstream_stride_inner=None)
    _run_ready(job, inputs, grad, kernels().scale_grad_kernel, p, args, pointers)
    return grad


def vocab_slice_statistics(x, target, *, vocab_start, ignore_index, smoothing, softcap=None, dim=1, split=False):
    """[rows, 4] in the compute dtype: each row's (max, Σ exp(x' − max), the target's x' if this
    slice of the classes holds it else 0, Σ (x' − max) with smoothing else 0), from logits ``x`` with
    the slice's classes along ``dim`` (``vocab_start`` on; x' capped by ``softcap``) and global
    class indices in the rows' row-major order. With ``split`` the launch may cut the rows into
    chunks (the split-row regime) and the statistics are each chunk's, [rows, chunks, 4]. The
    host combines them (``_slices.combined_statistics``)."""
    rows, target = math.prod(_rows_shape(x, dim % x.dim())), indexed(target)
    p = plan((x,), dim, backward=False, cross_entropy=True, split=split) if x.shape[dim] and rows else None
    stats = empty((rows, p.config.chunks if p else 1, 4), stats_dtype(x.dtype), x.device)
    if x.shape[dim] == 0:
        stats.zero_()[..., 0] = float("-inf")
    elif p is not None:
        args = p.arguments("x") | p.slice_chunk_arguments()
        args |= dict(
            target_ptr=target,
            stats_ptr=stats,
            vocab_start=vocab_start,
            ignore_index=ignore_index,
            ONLINE=p.config.online,
            SMOOTHING=smoothing > 0,
            SOFTCAP=softcap is not None,
        )
        args["softcap_high"], args["softcap_low"] = fp32_pair(float(softcap or 0.0))
        _run(kernels().vocab_slice_statistics_kernel, p, args)
    return stats if split else stats[:, 0]


def vocab_slice_grad(
    x,
    target,
    lse,
    scale,
    *,
    vocab_start,
    n_classes,
    ignore_index,
    smoothing,
    z_loss=0.0,
    softcap=None,
    grad=None,
    dim=1,
    split=False,
):
    """The gradient of Σ loss · ``scale`` (one factor per row, any stride) over logits ``x``, a
    slice of ``n_classes`` classes starting at ``vocab_start`` along ``dim``, given each row's
    log-sum-exp over every slice as [rows, 2] (max, log Σ exp(x' − max)); written into ``grad``
    (x itself to overwrite the logits), or a new tensor. With ``split`` the launch may cut the
    rows into chunks (the split-row regime), each a work item."""
    grad, target = empty_like(x, x.dtype) if grad is None else grad, indexed(target)
    if grad.numel():
        p = plan((x, grad), dim, backward=True, cross_entropy=True, split=split)
        args = p.arguments("x", "grad") | p.slice_chunk_arguments()
        args |= dict(
            target_ptr=target,
            lse_ptr=lse.contiguous(),
            scale_ptr=scale,
            scale_stride=scale.stride(0),
            vocab_start=vocab_start,
            n_classes=n_classes,
            ignore_index=ignore_index,
            SMOOTHING=smoothing > 0,
            SOFTCAP=softcap is not None,
        )
        for name, value in (("smoothing", smoothing), ("z_loss", z_loss), ("softcap", softcap or 0.0)):
            args[f"{name}_high"], args[f"{name}_low"] = fp32_pair(float(value))
        _run(kernels().vocab_slice_grad_kernel, p, args)
    return grad
