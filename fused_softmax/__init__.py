"""Fused Triton softmax for PyTorch, as fast as the memory system allows.

``softmax`` is a drop-in for ``torch.nn.functional.softmax``. CUDA tensors run on fused
Triton kernels; CPU tensors run eager PyTorch unless the backend is set to 'triton', which
runs the same kernels under Triton's interpreter. Triton is imported on first use.
"""

from . import reference
from ._backend import use_backend
from .functional import SoftmaxFunction, softmax

__all__ = ["SoftmaxFunction", "reference", "softmax", "use_backend"]
__version__ = "0.1.0"
