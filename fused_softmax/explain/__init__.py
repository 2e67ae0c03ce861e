"""What a softmax launch will do, without running it: ``explain(x, dim)``, and
``python -m fused_softmax.explain SHAPE [--dtype D] [--dim K] [--backward] [--device h100|h200|current]
[--cooperative]``.

Pure: the plan is the host's own (``_launch.plan``) for the device's properties, so a laptop
explains an H100's or an H200's launch. The prediction is Little's law: memory runs at its
bandwidth only with bandwidth x latency bytes in flight and every SM issuing loads, so

    predicted bandwidth = peak x min(1, SMs working / SMs, bytes in flight / (peak x latency))

with bytes in flight = programs at once x one tile's loads. Traffic is the design's: the
kernels' bytes over the least possible (every element read or written once), and the share
of it that reaches HBM when a second sweep's reads come back from L2.
"""

import argparse
import dataclasses
import math
import operator

import torch

from .. import _launch
from .._backend import KERNEL_DTYPES
from .._runtime import device_properties, kernels
from ..functional import _wrap_dim

DEVICES = ("h100", "h200", "current")

# Reads of each input per launch, by regime: (forward, backward).
_SWEEPS = {"multi_row": (1, 1), "single_pass": (1, 1), "online": (2, 2), "split": (2, 2), "cooperative": (1, 1)}


@dataclasses.dataclass(frozen=True)
class Explanation:
    """One launch's plan and its Little's-law prediction."""

    shape: tuple
    dtype: torch.dtype
    dim: int
    backward: bool
    device: object  # DeviceProperties
    regime: str
    grid: int
    chunks: int
    block_n: int
    rows_per_program: int
    num_warps: int
    tile_bytes: int  # one program's loads in flight
    bytes_moved: int
    minimum_bytes: int
    hbm_bytes: int  # bytes_moved less the second sweep's reads when the inputs fit in L2

    @property
    def programs_per_sm(self):
        return self.grid / self.device.sm_count

    @property
    def bytes_in_flight(self):
        return self.grid * self.tile_bytes

    @property
    def traffic_ratio(self):
        return self.bytes_moved / self.minimum_bytes

    @property
    def busy_sms(self):
        return min(self.grid, self.device.sm_count)

    @property
    def predicted_fraction(self):
        """The fraction of the memory's bandwidth Little's law predicts for this plan."""
        sms = self.busy_sms / self.device.sm_count
        return min(1.0, sms, self.bytes_in_flight / self.device.bytes_in_flight_needed)

    @property
    def predicted_bandwidth(self):
        return self.predicted_fraction * self.device.memory_bandwidth

    @property
    def predicted_seconds(self):
        """HBM bytes at the predicted bandwidth (launch overhead aside)."""
        return self.hbm_bytes / self.predicted_bandwidth

    def __str__(self):
        d = self.device
        lines = [
            f"{'backward' if self.backward else 'forward'} softmax of {list(self.shape)} {self.dtype}, dim {self.dim}",
            f"device: {d.name}: {d.sm_count} SMs, {d.memory_bandwidth / 1e12:.2f} TB/s, "
            f"{d.memory_latency * 1e9:.0f} ns latency, {d.l2_bytes / 2**20:.0f} MiB L2 "
            f"(needs {d.bytes_in_flight_needed / 2**20:.2f} MiB in flight)",
            f"regime: {self.regime}" + (f" ({self.chunks} chunks a row)" if self.chunks > 1 else ""),
            f"grid: {self.grid} programs ({self.programs_per_sm:.2f} per SM), {self.num_warps} warps, "
            f"tile {self.rows_per_program} x {self.block_n}",
            f"in flight: {self.tile_bytes / 1024:.1f} KiB a program, {self.bytes_in_flight / 2**20:.2f} MiB in all",
            f"traffic: {self.bytes_moved / 2**20:.2f} MiB = {self.traffic_ratio:.3f} x the minimum "
            f"({self.hbm_bytes / self.minimum_bytes:.3f} x from HBM)",
            f"predicted: {self.predicted_fraction:.0%} of bandwidth, {self.predicted_bandwidth / 1e12:.2f} TB/s, "
            f"{self.predicted_seconds * 1e6:.1f} µs",
        ]
        return "\n".join(lines)


def _properties(device):
    heuristics = kernels().heuristics
    if device is None or device == "h100":
        return heuristics.H100
    if device == "h200":
        return heuristics.H200
    if device == "current":
        return device_properties(torch.device("cuda", torch.cuda.current_device()))
    if isinstance(device, heuristics.DeviceProperties):
        return device
    raise ValueError(f"device must be one of {DEVICES} or a DeviceProperties, not {device!r}")


def explain(x, dim=-1, *, backward=False, dtype=None, device=None, cooperative=None):
    """The launch softmax (or, with ``backward``, its backward) makes for ``x`` along ``dim``:
    ``x`` a tensor or a shape (then ``dtype``, default float32). ``device``: 'h100' (default),
    'h200', 'current' (this process's GPU) or a ``DeviceProperties``. ``cooperative``: plan the
    cooperative split-row regime or not (default: as FUSED_SOFTMAX_COOPERATIVE says, off).
    A shape, dtype or dim softmax would refuse raises as softmax does; an empty tensor, which
    launches nothing, raises ValueError."""
    shape, dtype, strides = _described(x, dtype)
    dim = _wrap_dim("softmax", dim, len(shape))
    if not math.prod(shape):
        raise ValueError(f"explain: {list(shape)} is empty, and softmax launches nothing for it")
    properties = _properties(device)
    # Meta tensors stand for the GPU's, of any size: the plan reads only shapes, strides and
    # addresses, and a meta tensor's address is 0, aligned as a fresh allocation is.
    if strides:
        tensor = torch.empty_strided(shape, strides, dtype=dtype, device="meta")
    else:
        tensor = torch.empty(shape, dtype=dtype, device="meta")
    tensors = (tensor, tensor, tensor) if backward else (tensor, tensor)
    choice = {} if cooperative is None else dict(cooperative=cooperative)
    with _launch.overridden(device=properties, **choice):
        p = _launch.plan(tensors, dim, backward=backward, split=True)
    config, heuristics = p.config, kernels().heuristics
    n_rows, n_cols = p.n_rows, p.sizes[1]
    element = tensor.element_size()
    inputs = (2 if backward else 1) * n_rows * n_cols * element
    output = n_rows * n_cols * element
    sweeps = _SWEEPS[config.regime][backward]
    chunk_values = 0
    if config.chunks > 1:  # each chunk's values (2 forward, 1 backward), written once, read by the row's chunks
        # (the cooperative barrier's counter, 4 bytes a tile, is not counted)
        chunk_values = n_rows * config.chunks * (1 if backward else 2) * 4 * (1 + config.chunks)
    moved = sweeps * inputs + output + chunk_values
    rereads_from_l2 = sweeps > 1 and inputs <= properties.l2_bytes // 2
    (grid,) = p.grid
    return Explanation(
        shape=shape,
        dtype=dtype,
        dim=dim,
        backward=backward,
        device=properties,
        regime=config.regime,
        grid=grid,
        chunks=config.chunks,
        block_n=config.block_n,
        rows_per_program=config.rows_per_program,
        num_warps=config.num_warps,
        tile_bytes=heuristics.tile_load_bytes(config, element, backward),
        bytes_moved=moved,
        minimum_bytes=inputs + output,
        hbm_bytes=moved - (sweeps - 1) * inputs if rereads_from_l2 else moved,
    )


def _described(x, dtype):
    """(shape, dtype, strides or None) of ``x``, a tensor or a shape, checked as softmax checks them."""
    if isinstance(x, torch.Tensor):
        shape, dtype, strides = tuple(x.shape), x.dtype, x.stride()
    else:
        try:
            shape = tuple(operator.index(n) for n in x)
        except TypeError:
            raise TypeError(f"explain: x is a tensor or a shape (a sequence of ints), not {x!r}") from None
        dtype, strides = dtype or torch.float32, None
        if any(n < 0 for n in shape):
            raise ValueError(f"explain: a shape has no negative sizes, got {list(shape)}")
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"explain: the kernels take {', '.join(map(str, KERNEL_DTYPES))}, not {dtype!r}")
    return shape, dtype, strides


def _shape(text):
    return tuple(int(s) for s in text.replace("x", ",").split(",") if s)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fused_softmax.explain", description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", type=_shape, help="e.g. 4x131072 or 4,131072")
    parser.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32", "float64"])
    parser.add_argument("--dim", type=int, default=-1)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--device", default="h100", choices=DEVICES)
    parser.add_argument(
        "--cooperative", action="store_true", help="plan the cooperative split-row regime (off by default)"
    )
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    cooperative = True if args.cooperative else None
    try:
        explanation = explain(
            args.shape, args.dim, backward=args.backward, dtype=dtype, device=args.device, cooperative=cooperative
        )
    except (TypeError, ValueError, IndexError) as error:
        parser.error(str(error))
    print(explanation)
