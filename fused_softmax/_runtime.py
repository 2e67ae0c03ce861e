"""Where the kernels can run: Triton's presence, the kernels module, the interpreter, the GPU.

Nothing here imports Triton until it is asked a question, so ``import fused_softmax`` stays
cheap and works where Triton is absent.
"""

import functools

import torch


def constant_under_compile(fn):
    """torch.compile calls ``fn`` once per graph and keeps the result, as with
    torch.compiler.assume_constant_result, which sets this same marker but imports torch._dynamo
    (and with it triton) when called: too slow for import time."""
    fn._dynamo_marked_constant = True
    return fn


@constant_under_compile
def triton_available():
    """Whether Triton can be imported, asked once (``_importable``). torch.compile takes this
    marked function's answer as a constant; a marked cache, dynamo traced through, warning."""
    return _importable()


@functools.cache
def _importable():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@constant_under_compile
def jit_tracing():
    """Whether torch.jit.trace is recording the call. torch.compile, which dynamo cannot trace
    this query for, keeps the answer (False) as a constant."""
    return torch._C._is_tracing()


@functools.cache
def kernels():
    """The device code, ``fused_softmax.kernels``, imported (with Triton) on first use."""
    from . import kernels

    return kernels


@constant_under_compile
def kernels_interpreted():
    """True when the kernels, and Triton's own library of jitted functions (tl.max, tl.cdiv), were
    decorated under TRITON_INTERPRET=1, so they run on CPU tensors. Fixed when they are imported,
    so asked once (``_interpreted``); torch.compile keeps the answer without tracing the cache."""
    return _interpreted()


@functools.cache
def _interpreted():
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    return all(isinstance(f, InterpretedFunction) for f in (kernels().softmax_forward_kernel, standard.cdiv))


@constant_under_compile
def interpreter_problem():
    """Why Triton's interpreter cannot run the kernels here, or None: asked once
    (``_interpreter_problem``), when the kernels are interpreted."""
    return _interpreter_problem()


@functools.cache
def _interpreter_problem():
    import numpy
    import triton
    from triton.runtime.errors import InterpreterError

    items = torch.zeros(3, dtype=torch.int64)
    try:
        kernels().persistent_loop_probe_kernel[(2,)](items, 3)
    except InterpreterError as error:
        found = repr(error.__cause__ or error)
    else:
        if items.tolist() == [1, 2, 3]:
            return None
        found = f"it wrote {items.tolist()} where [1, 2, 3] was due"
    return (
        f"Triton {triton.__version__}'s interpreter cannot run fused_softmax's kernels with NumPy "
        f"{numpy.__version__}: {found}. Known cause: Triton 3.6's interpreter reads loop bounds with "
        f"int() of a one-element array, which NumPy 2.4 refuses (triton-lang/triton#9171): install "
        f"numpy<2.4, or a Triton whose interpreter takes them (3.9's does)"
    )


@functools.cache
def _cuda_properties(index):
    props = torch.cuda.get_device_properties(index)
    return kernels().DeviceProperties(
        name=props.name,
        sm_count=props.multi_processor_count,
        registers_per_sm=getattr(props, "regs_per_multiprocessor", 65536),
        max_threads_per_sm=props.max_threads_per_multi_processor,
    )


def device_properties(device):
    """The GPU's properties; under the interpreter, an H100's, so CPU runs use H100 configs."""
    if device.type == "cuda":
        return _cuda_properties(device.index if device.index is not None else torch.cuda.current_device())
    return kernels().H100


def _unscriptable_message(name):
    return (
        f"torch.jit.script cannot compile fused_softmax.{name}, which runs Triton kernels from "
        "Python: use torch.compile or torch.export. While fused_softmax.patch() is on, torch's "
        "softmax, log_softmax and cross-entropy reach fused_softmax too: script them outside it"
    )


def unscriptable(function):
    """Marks a public function that TorchScript refuses clearly, before it tries to compile the
    Python that launches the kernels (torch.jit.script's own hook, which torch.amp's autocast
    decorator sets too). TorchScript resolves Tensor methods itself: a scripted ``x.softmax``
    stays torch's, patched or not."""
    function.__script_unsupported = _unscriptable_message(function.__name__)
    return function


class Unscriptable:
    """A module base for fused_softmax's nn.Modules: scripting one refuses it as ``unscriptable``
    refuses the functions its forward calls."""

    def __prepare_scriptable__(self):
        raise RuntimeError(_unscriptable_message(type(self).__name__))
