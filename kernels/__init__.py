"""Device code (installed as fused_softmax.kernels): Triton kernels built from the tile steps of
``tiles``, one kernel per job, and their launch heuristic.

- softmax / log-softmax forward and backward (masked_softmax's backward too): ``softmax``;
- masked_softmax forward (scale, mask, causal diagonal, softcapping, sinks), and its backward
  under softcapping or sinks: ``attention``;
- cross-entropy, with class-index or class-probability targets, its gradient in the same pass,
  a mean's or sum's reduction (and a mean's gradient factor), the backward's scaling of the
  gradient, and its work on one slice of the classes (a vocab-parallel
  shard, or a chunk of linear_cross_entropy's vocabulary), statistics then gradient:
  ``cross_entropy``;
- the sharded softmax's row statistics, y from the log-sum-exp, the backward's row sums and dx
  from them: ``row_stats``;
- the split-row regime, rows too few to fill the GPU cut into chunks: ``split_row``; its
  cooperative form, each chunk read once and held on chip across a barrier: ``cooperative``;
  for masked_softmax's scores (a decoding step's few long rows): ``split_attention``;
- the interpreter's probe, run once before its first launch: ``probe``.
"""

if __name__ == "kernels":
    raise ImportError(
        "this is fused_softmax's device code (fused_softmax.kernels) imported as the top-level package 'kernels': "
        "a fused_softmax checkout's root is on sys.path (python -m from the checkout), where its kernels/ folder "
        "shadows PyPI's 'kernels', which transformers imports. Run Python with PYTHONSAFEPATH=1 (or -P), or "
        "from another directory"
    )

from .attention import masked_softmax_backward_kernel, masked_softmax_forward_kernel
from .cooperative import cooperative_product_kernel, cooperative_softmax_kernel
from .cross_entropy import (
    cross_entropy_kernel,
    cross_entropy_probabilities_kernel,
    mean_grad_scale_kernel,
    reduced_loss_kernel,
    scale_grad_kernel,
    vocab_slice_grad_kernel,
    vocab_slice_statistics_kernel,
)
from .heuristics import H100, H200, DeviceProperties, LaunchConfig, launch_config
from .probe import persistent_loop_probe_kernel
from .row_stats import (
    backward_row_sums_kernel,
    backward_with_row_sums_kernel,
    normalise_with_lse_kernel,
    row_statistics_kernel,
)
from .softmax import softmax_backward_kernel, softmax_forward_kernel
from .split_attention import masked_chunk_grad_kernel, masked_chunk_normalise_kernel, masked_chunk_statistics_kernel
from .split_row import chunk_normalise_kernel, chunk_product_kernel, chunk_row_sums_kernel, chunk_statistics_kernel

__all__ = [
    "H100",
    "H200",
    "DeviceProperties",
    "LaunchConfig",
    "backward_row_sums_kernel",
    "backward_with_row_sums_kernel",
    "chunk_normalise_kernel",
    "chunk_product_kernel",
    "chunk_row_sums_kernel",
    "chunk_statistics_kernel",
    "cooperative_product_kernel",
    "cooperative_softmax_kernel",
    "cross_entropy_kernel",
    "cross_entropy_probabilities_kernel",
    "launch_config",
    "masked_chunk_grad_kernel",
    "masked_chunk_normalise_kernel",
    "masked_chunk_statistics_kernel",
    "masked_softmax_backward_kernel",
    "masked_softmax_forward_kernel",
    "mean_grad_scale_kernel",
    "normalise_with_lse_kernel",
    "persistent_loop_probe_kernel",
    "reduced_loss_kernel",
    "row_statistics_kernel",
    "scale_grad_kernel",
    "softmax_backward_kernel",
    "softmax_forward_kernel",
    "vocab_slice_grad_kernel",
    "vocab_slice_statistics_kernel",
]
