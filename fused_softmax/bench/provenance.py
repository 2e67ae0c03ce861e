"""Where a set of figures came from: the device, the software, and the source it ran.

A result without its device, versions and commit cannot be compared with another, so every
results.json carries this. The device machine gets a copy of the working tree without .git:
there the caller passes the commit (``FUSED_SOFTMAX_COMMIT``), and a hash of the source files
(``source_sha256``) tells whether that tree was the commit's, since the same hash can be
recomputed from a checkout (``python -m fused_softmax.bench.provenance``).

    python -m fused_softmax.bench.provenance    # the source hash of this checkout
"""

import datetime
import hashlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

from .. import __version__

ROOT = Path(__file__).resolve().parents[2]
# The code a result depends on; results, caches and build outputs are left out.
SOURCE_DIRS = ("fused_softmax", "kernels", "tests", "benchmarks", "ci")
SOURCE_SUFFIXES = (".py", ".sh", ".toml")
COMMIT_VARIABLE = "FUSED_SOFTMAX_COMMIT"
PEER_DISTRIBUTIONS = ("liger-kernel", "quack-kernels", "flag_gems", "matplotlib", "pytest-xdist", "pytest-timeout")
NVIDIA_SMI_FIELDS = (
    "driver_version",
    "clocks.sm",
    "clocks.mem",
    "clocks.max.sm",
    "clocks.max.mem",
    "power.limit",
    "temperature.gpu",
    "pstate",
)


def command_output(*command):
    """A command's stdout, or None where it is missing or fails."""
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def distribution_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def source_sha256(root=ROOT):
    """SHA-256 over the path and bytes of every source file under ``SOURCE_DIRS`` and pyproject.toml."""
    files = [root / "pyproject.toml"]
    for folder in SOURCE_DIRS:
        files += [
            path
            for path in (root / folder).rglob("*")
            if path.suffix in SOURCE_SUFFIXES and "results" not in path.relative_to(root).parts
        ]
    digest = hashlib.sha256()
    for path in sorted(path for path in files if path.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def source_revision(commit=None):
    """The commit: given, else from ``FUSED_SOFTMAX_COMMIT``, else from git; with where it came from."""
    commit = commit or os.environ.get(COMMIT_VARIABLE)
    if commit:
        return {"git_commit": commit, "git_dirty": None, "commit_source": "given by the caller"}
    commit = command_output("git", "-C", str(ROOT), "rev-parse", "HEAD")
    if commit:
        dirty = bool(command_output("git", "-C", str(ROOT), "status", "--porcelain"))
        return {"git_commit": commit, "git_dirty": dirty, "commit_source": "git"}
    return {"git_commit": None, "git_dirty": None, "commit_source": f"unknown: no .git and no {COMMIT_VARIABLE}"}


def _nvidia_smi():
    """nvidia-smi's reading of the first GPU (clocks now and at most, power limit), or {} without it."""
    output = command_output("nvidia-smi", f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}", "--format=csv,noheader,nounits")
    if not output:
        return {}
    values = [value.strip() for value in output.splitlines()[0].split(",")]
    fields = [field.replace(".", "_") for field in NVIDIA_SMI_FIELDS]
    return dict(zip(fields, values, strict=False))


def device_info(device):
    """The GPU as torch and nvidia-smi see it; on a CPU, the processor."""
    if device.type != "cuda":
        return {"device": f"CPU ({platform.processor() or platform.machine()})", "cpu_count": os.cpu_count()}
    props = torch.cuda.get_device_properties(device)
    smi = _nvidia_smi()
    return {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "l2_cache_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
        "driver": smi.pop("driver_version", None),
        **{f"nvidia_smi_{key}": value for key, value in smi.items()},
    }


def versions():
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": distribution_version("triton"),
        "numpy": distribution_version("numpy"),
        "fused_softmax": __version__,
        **{name: distribution_version(name) for name in PEER_DISTRIBUTIONS},
    }


def metadata(device, commit=None):
    """One flat record of device, versions, source and date: what report.py prints beside every figure."""
    return {
        **device_info(device),
        **versions(),
        **source_revision(commit),
        "source_sha256": source_sha256(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


if __name__ == "__main__":
    print(source_sha256())
