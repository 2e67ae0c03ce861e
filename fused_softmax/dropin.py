"""A global drop-in switch: torch's softmax entry points routed through fused_softmax.

The mechanism is Python-level wrapping, not an aten override through torch.library: a wrapper
sees ``dtype=`` before torch casts the input, so the fused upcast survives, where an aten
kernel would be handed the already-cast tensor. Each wrapper sends the tensors the kernels
serve (by the backend in force) to fused_softmax and everything else to torch's original.
"""

import contextlib
import functools

import torch
import torch.nn.functional as F

from . import modules
from ._backend import use_kernels
from .functional import log_softmax, softmax

_originals = {}
_ABSENT = object()  # Tensor.softmax lives on torch._C.TensorBase, not in Tensor's own __dict__


def _dim_first(fused, original):
    """A wrapper for torch.softmax / Tensor.softmax: dim required, no implicit-dim warning."""

    @functools.wraps(original)
    def wrapper(input, dim, dtype=None):
        if isinstance(dim, int) and use_kernels(input, input.dtype if dtype is None else dtype):
            return fused(input, dim, dtype=dtype)
        return original(input, dim, dtype=dtype)

    return wrapper


def _replacements():
    """(owner, attribute, replacement) for every entry point the switch reaches."""
    return [
        (F, "softmax", softmax),
        (F, "log_softmax", log_softmax),
        (torch, "softmax", _dim_first(softmax, torch.softmax)),
        (torch, "log_softmax", _dim_first(log_softmax, torch.log_softmax)),
        (torch.Tensor, "softmax", _dim_first(softmax, torch.Tensor.softmax)),
        (torch.Tensor, "log_softmax", _dim_first(log_softmax, torch.Tensor.log_softmax)),
        (torch.nn.Softmax, "forward", modules.Softmax.forward),
        (torch.nn.LogSoftmax, "forward", modules.LogSoftmax.forward),
    ]


def is_enabled():
    return bool(_originals)


def enable():
    """Route torch.softmax, F.softmax, Tensor.softmax, nn.Softmax and their log_softmax twins
    through fused_softmax. Calling it again changes nothing."""
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
    """``enable()`` for the block; on exit, the state from before it (so blocks nest)."""
    was_enabled = is_enabled()
    enable()
    try:
        yield
    finally:
        if not was_enabled:
            disable()


_SWAPS = {torch.nn.Softmax: modules.Softmax, torch.nn.LogSoftmax: modules.LogSoftmax}


def swap_modules(model):
    """Turn every nn.Softmax / nn.LogSoftmax in ``model`` (itself included) into fused_softmax's,
    in place: the same objects, with their dim, hooks and state; returns ``model``."""
    for module in model.modules():
        swap = _SWAPS.get(type(module))
        if swap is not None:
            module.__class__ = swap
    return model
