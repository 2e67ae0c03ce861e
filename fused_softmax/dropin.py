"""A global drop-in switch: torch's softmax and cross-entropy entry points routed through fused_softmax.

The mechanism is Python-level wrapping, not an aten override through torch.library: a wrapper
sees ``dtype=`` before torch casts the input, so the fused upcast survives, where an aten
kernel would be handed the already-cast tensor. Each wrapper sends the tensors the kernels
serve (by the backend in force) to fused_softmax and everything else to torch's original.
"""

import contextlib
import functools
import threading

import torch
import torch.nn.functional as F
from torch.overrides import has_torch_function_unary

from . import modules
from ._backend import use_kernels
from ._runtime import unscriptable
from .cross_entropy import CrossEntropyLoss, cross_entropy
from .functional import log_softmax, softmax

_originals = {}
_ABSENT = object()  # Tensor.softmax lives on torch._C.TensorBase, not in Tensor's own __dict__


def _function_form(input, dim, dtype=None):
    """torch.softmax's parameters, less its keyword-only ``out=``."""
    return input, dim, dtype


def _method_form(self, /, dim, dtype=None):
    """Tensor.softmax's: ``self`` is positional only."""
    return self, dim, dtype


def _served(form, args, kwargs):
    """The (input, dim, dtype) of a call the fused path serves, else None.

    It serves ``form``'s parameters (so no ``out=``) with a tensor that has no __torch_function__
    (subclasses and modes keep torch's dispatch), an int dim in range, no dtype or a torch.dtype,
    and only what ``use_kernels`` sends to the kernels.
    """
    try:
        input, dim, dtype = form(*args, **kwargs)
    except TypeError:  # out=, or a call torch rejects
        return None
    if not isinstance(input, torch.Tensor) or has_torch_function_unary(input):
        return None
    bound = max(input.dim(), 1)
    if type(dim) is not int or not -bound <= dim < bound:  # numpy or 0-d tensor dims, or torch's error
        return None
    if dtype is not None and not isinstance(dtype, torch.dtype):  # dtype=float, or torch's error
        return None
    return (input, dim, dtype) if use_kernels(input, input.dtype if dtype is None else dtype) else None


def _dim_first(fused, original, form):
    """A wrapper for torch.softmax (``_function_form``) or Tensor.softmax (``_method_form``) that
    accepts every call the original does and behaves as it does.

    The calls the fused path serves go to ``fused``; every other goes to the original with its
    arguments exactly as given, so torch itself handles ``out=`` (resizing, dtype checks), numpy
    and 0-d tensor dims and subclasses, and raises its own errors for the calls it rejects.
    """

    @unscriptable
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        served = _served(form, args, kwargs)
        if served is None:
            return original(*args, **kwargs)
        input, dim, dtype = served
        return fused(input, dim, dtype=dtype)

    return wrapper


def _replacements():
    """(owner, attribute, replacement) for every entry point the switch reaches."""
    return [
        (F, "softmax", softmax),
        (F, "log_softmax", log_softmax),
        (torch, "softmax", _dim_first(softmax, torch.softmax, _function_form)),
        (torch, "log_softmax", _dim_first(log_softmax, torch.log_softmax, _function_form)),
        (torch.Tensor, "softmax", _dim_first(softmax, torch.Tensor.softmax, _method_form)),
        (torch.Tensor, "log_softmax", _dim_first(log_softmax, torch.Tensor.log_softmax, _method_form)),
        (F, "cross_entropy", cross_entropy),
        *[
            (torch_module, name, getattr(ours, name))
            for torch_module, ours in _MODULES.items()
            for name in ("forward", "__prepare_scriptable__")
        ],
    ]


# The torch modules swap_modules turns into ours.
_SWAPS = {torch.nn.Softmax: modules.Softmax, torch.nn.LogSoftmax: modules.LogSoftmax}
# Each routed torch module and ours. Ours refuse TorchScript in __prepare_scriptable__, before
# it makes a type for the class: a refusal while compiling forward would leave torch's class
# half-defined for TorchScript, and every later script of it would fail ("Can't redefine method").
_MODULES = {**_SWAPS, torch.nn.CrossEntropyLoss: CrossEntropyLoss}


def is_enabled():
    return bool(_originals)


def enable():
    """Route torch.softmax, F.softmax, Tensor.softmax, nn.Softmax and their log_softmax twins, and
    F.cross_entropy and nn.CrossEntropyLoss, through fused_softmax. Calling it again changes nothing."""
    if is_enabled():
        return
    for owner, name, replacement in _replacements():
        _originals[owner, name] = owner.__dict__.get(name, _ABSENT)
        setattr(owner, name, replacement)


def disable():
    """Put every original back, exactly as it was."""
    for (owner, name), original in _originals.items():
        if original is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _originals.clear()


@contextlib.contextmanager
def patch():
    """``enable()`` for the block; when the last open block exits, the state from before the
    first (so blocks nest, in one thread or across threads). The switch is process-wide: while
    any thread is inside a block, every thread's calls are routed."""
    global _open_blocks, _enabled_by_blocks
    with _blocks_lock:
        if _open_blocks == 0:
            _enabled_by_blocks = not is_enabled()
            enable()
        _open_blocks += 1
    try:
        yield
    finally:
        with _blocks_lock:
            _open_blocks -= 1
            if _open_blocks == 0 and _enabled_by_blocks:
                disable()


_blocks_lock = threading.Lock()
_open_blocks = 0  # patch() blocks open, in every thread
_enabled_by_blocks = False  # whether the first of them enabled the switch (so the last disables it)


def swap_modules(model):
    """Turn every nn.Softmax / nn.LogSoftmax in ``model`` (itself included) into fused_softmax's,
    in place: the same objects, with their dim, hooks and state; returns ``model``."""
    for module in model.modules():
        swap = _SWAPS.get(type(module))
        if swap is not None:
            module.__class__ = swap
    return model
