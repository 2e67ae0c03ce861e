"""Device code (installed as fused_softmax.kernels): Triton kernels built from the tile steps of
``tiles``, one kernel per job, and their launch heuristic.

- softmax / log-softmax forward and backward (masked_softmax's backward too): ``softmax``;
- masked_softmax forward (scale, mask, causal diagonal, softcapping, sinks), and its backward
  under softcapping or sinks: ``attention``;
- the sharded softmax's row statistics, y from the log-sum-exp, the backward's row sums and dx
  from them: ``row_stats``.
"""

from .attention import masked_softmax_backward_kernel, masked_softmax_forward_kernel
from .heuristics import H100, DeviceProperties, LaunchConfig, launch_config
from .row_stats import (
    backward_row_sums_kernel,
    backward_with_row_sums_kernel,
    normalise_with_lse_kernel,
    row_statistics_kernel,
)
from .softmax import softmax_backward_kernel, softmax_forward_kernel

__all__ = [
    "H100",
    "DeviceProperties",
    "LaunchConfig",
    "backward_row_sums_kernel",
    "backward_with_row_sums_kernel",
    "launch_config",
    "masked_softmax_backward_kernel",
    "masked_softmax_forward_kernel",
    "normalise_with_lse_kernel",
    "row_statistics_kernel",
    "softmax_backward_kernel",
    "softmax_forward_kernel",
]
