"""Device code: Triton kernels and their launch heuristics (installed as fused_softmax.kernels)."""

from .heuristics import H100, DeviceProperties, LaunchConfig, launch_config
from .softmax import _softmax_backward_kernel, _softmax_forward_kernel

__all__ = [
    "H100",
    "DeviceProperties",
    "LaunchConfig",
    "launch_config",
    "_softmax_backward_kernel",
    "_softmax_forward_kernel",
]
