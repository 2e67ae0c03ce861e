"""Runs a function on several processes in a gloo process group over loopback, for the
distributed tests: every wait bounded, every failing rank's traceback brought back.

Init and collectives are bounded by the process group's timeout, the children by a deadline
after which they are killed; ``destroy_process_group`` runs whatever happens.
"""

import contextlib
import datetime
import multiprocessing
import socket
import time
import traceback

import torch
import torch.distributed as dist

PROCESS_GROUP_TIMEOUT = datetime.timedelta(seconds=60)
DEADLINE_S = 300


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def reported(report_dir, rank):
    """Writes a failure's traceback to ``report_dir``, stamped with the time, for the parent."""
    try:
        yield
    except BaseException:
        (report_dir / f"rank {rank}").write_text(f"{time.time()}\n{traceback.format_exc()}")
        raise


def run_child(fn, rank, world_size, port, report_dir):
    """A child: fn(rank, world_size) in a gloo process group. A failure is reported before the
    group goes, since its peers fail then too."""
    torch.set_num_threads(1)  # up to 4 ranks share the cores: spare them idle intra-op threads
    with reported(report_dir, rank):
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=PROCESS_GROUP_TIMEOUT,
        )
    try:
        with reported(report_dir, rank):
            fn(rank, world_size)
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size, report_dir):
    """Runs fn(rank, world_size) on ``world_size`` processes and fails with every failed rank's
    traceback, earliest first: the rest usually follow from it (a peer gone). Children still
    running at the deadline are killed."""
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [
        context.Process(target=run_child, args=(fn, rank, world_size, port, report_dir)) for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + DEADLINE_S
    try:
        for process in processes:
            process.join(max(deadline - time.monotonic(), 0.0))
    finally:
        hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join()
    reports = []
    for path in report_dir.iterdir():
        stamp, trace = path.read_text().split("\n", 1)
        reports.append((float(stamp), path.name, trace))
    failures = "".join(f"\n--- {rank}:\n{trace}" for _, rank, trace in sorted(reports))
    assert not hung, f"ranks {hung} still running after {DEADLINE_S} s, killed{failures}"
    assert not failures, failures
    assert all(process.exitcode == 0 for process in processes), [process.exitcode for process in processes]
