"""pytest-benchmark setup: the GPU in the saved machine info, and Triton's interpreter where there is no GPU."""

import pytest
import torch

from fused_softmax.bench.sweep import interpret_kernels_without_gpu

# Collection imports this before any test can import triton, as the interpreter needs.
interpret_kernels_without_gpu()


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    """Name the GPU, so saved runs from different GPUs are not compared unawares."""
    machine_info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["cuda"] = torch.version.cuda
    machine_info["torch"] = torch.__version__
