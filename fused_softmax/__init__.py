"""Fused Triton softmax for PyTorch, as fast as the memory system allows.

``softmax``, ``log_softmax`` and ``cross_entropy`` are drop-ins for torch.nn.functional's,
``Softmax``, ``LogSoftmax`` and ``CrossEntropyLoss`` for torch.nn's; ``linear_cross_entropy`` is
the loss of a linear layer that never holds its logits. CUDA tensors run on fused Triton kernels; CPU tensors run
eager PyTorch unless the backend is set to 'triton', which runs the same kernels under
Triton's interpreter. Triton is imported on first use.
"""

from ._backend import use_backend
from .attention import MaskedSoftmaxFunction, attention, masked_softmax
from .cross_entropy import CrossEntropyFunction, CrossEntropyLoss, cross_entropy
from .dropin import disable, enable, patch, swap_modules
from .explain import explain
from .functional import LogSoftmaxFunction, SoftmaxFunction, log_softmax, softmax
from .linear_cross_entropy import LinearCrossEntropyFunction, linear_cross_entropy
from .modules import LogSoftmax, Softmax
from .multihead_attention import MultiheadAttention

__all__ = [
    "attention",
    "CrossEntropyFunction",
    "CrossEntropyLoss",
    "LinearCrossEntropyFunction",
    "LogSoftmax",
    "LogSoftmaxFunction",
    "MaskedSoftmaxFunction",
    "MultiheadAttention",
    "Softmax",
    "SoftmaxFunction",
    "cross_entropy",
    "disable",
    "enable",
    "explain",
    "linear_cross_entropy",
    "log_softmax",
    "masked_softmax",
    "patch",
    "softmax",
    "swap_modules",
    "use_backend",
]
__version__ = "0.1.0"
