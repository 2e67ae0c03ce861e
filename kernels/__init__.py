"""Device code (installed as fused_softmax.kernels): Triton kernels built from the tile steps of
``tiles``, one kernel per job, and their launch heuristic.

| job | kernel |
|---|---|
| softmax / log-softmax forward | ``softmax.softmax_forward_kernel`` |
| softmax / log-softmax backward (masked_softmax's too) | ``softmax.softmax_backward_kernel`` |
| masked_softmax forward (scale, mask, causal) | ``attention.masked_softmax_forward_kernel`` |
| sharded softmax: row statistics, then y from the log-sum-exp | ``row_stats.row_statistics_kernel``, ``row_stats.normalise_with_lse_kernel`` |
| sharded backward: row sums, then dx from them | ``row_stats.backward_row_sums_kernel``, ``row_stats.backward_with_row_sums_kernel`` |
"""

from .attention import masked_softmax_forward_kernel
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
    "masked_softmax_forward_kernel",
    "normalise_with_lse_kernel",
    "row_statistics_kernel",
    "softmax_backward_kernel",
    "softmax_forward_kernel",
]
