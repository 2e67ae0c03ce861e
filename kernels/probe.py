"""A kernel run once under Triton's interpreter, before the first interpreted launch, to learn
whether this Triton and NumPy can interpret the kernels at all (``fused_softmax._runtime``)."""

import triton
import triton.language as tl


@triton.jit
def persistent_loop_probe_kernel(out_ptr, n_items):
    """Writes item + 1 at each item through the loop every kernel here runs: from the program's
    id to a runtime bound, in steps of the grid. Triton 3.6's interpreter reads those bounds
    with int() of a one-element array, which NumPy 2.4 refuses."""
    for item in tl.range(tl.program_id(0), n_items, tl.num_programs(0)):
        tl.store(out_ptr + item, item + 1)
