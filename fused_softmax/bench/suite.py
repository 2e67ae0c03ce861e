"""The test suite run under a time limit, with its outcomes counted even when the limit cuts it.

pytest writes its summary only at the end, so a run stopped at its limit would leave no
counts. Loaded into that run as a plugin (``-p fused_softmax.bench.suite``), this module
appends each test's outcome to a JSON-lines file as it is known; ``run`` starts pytest,
stops it at the limit and counts what the file holds.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

OUTCOMES_VARIABLE = "FUSED_SOFTMAX_TEST_OUTCOMES"
FAILURES_KEPT = 20
FAILURE_CHARS = 800

_outcomes_file = None


def pytest_configure(config):
    """Record in the process that reports: the controller under xdist, whose workers forward every report."""
    global _outcomes_file
    if os.environ.get(OUTCOMES_VARIABLE) and not hasattr(config, "workerinput"):
        _outcomes_file = open(os.environ[OUTCOMES_VARIABLE], "a")  # noqa: SIM115 (closed in pytest_unconfigure)


def pytest_unconfigure(config):
    if _outcomes_file is not None:
        _outcomes_file.close()


def _write(entry):
    if _outcomes_file is not None:
        _outcomes_file.write(json.dumps(entry) + "\n")
        _outcomes_file.flush()


def pytest_collection_finish(session):
    _write({"collected": len(session.items)})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """Under xdist the workers collect; each collects every test."""
    _write({"collected": len(ids)})


def pytest_runtest_logreport(report):
    if report.passed and report.when != "call":
        return
    if report.skipped:
        outcome = "xfailed" if hasattr(report, "wasxfail") else "skipped"
    elif report.failed:
        outcome = "failed" if report.when == "call" else "error"
    else:
        outcome = "passed"
    entry = {"test": report.nodeid, "outcome": outcome}
    if report.failed:
        entry["detail"] = report.longreprtext[-FAILURE_CHARS:]
    _write(entry)


def count(outcomes_path):
    """Counts by outcome, the number collected, and the first failures with their tracebacks' ends."""
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "xfailed": 0}
    collected, reported, failures = 0, set(), []
    for line in Path(outcomes_path).read_text().splitlines():
        entry = json.loads(line)
        if "collected" in entry:
            collected = max(collected, entry["collected"])
            continue
        counts[entry["outcome"]] += 1  # a test that errs in teardown counts twice, as pytest counts it
        reported.add(entry["test"])
        if "detail" in entry and len(failures) < FAILURES_KEPT:
            failures.append({"test": entry["test"], "detail": entry["detail"]})
    return {
        "counts": counts,
        "collected": collected,
        "not_run": max(0, collected - len(reported)),
        "failures": failures,
    }


def plugin_arguments(workers, per_test_timeout_s):
    """-n for xdist and --timeout for pytest-timeout, each only where that plugin is installed."""
    arguments = []
    if workers > 1 and importlib.util.find_spec("xdist"):
        arguments += ["-n", str(workers)]
    if per_test_timeout_s and importlib.util.find_spec("pytest_timeout"):
        arguments += [f"--timeout={per_test_timeout_s}"]
    return arguments


def run(arguments, limit_s, log, cwd):
    """Run ``python -m pytest arguments`` in ``cwd`` for at most ``limit_s`` seconds, its output
    appended to the open file ``log``; return the counts, the exit status and whether the limit
    cut the run."""
    with tempfile.TemporaryDirectory() as folder:
        outcomes = Path(folder) / "outcomes.jsonl"
        outcomes.touch()
        command = [sys.executable, "-m", "pytest", "-p", __name__, "-p", "no:cacheprovider", *arguments]
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        started = time.perf_counter()
        # A session of its own, so that at the limit pytest and its xdist workers stop together.
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, OUTCOMES_VARIABLE: str(outcomes)},
            start_new_session=True,
        )
        try:
            returncode, cut = process.wait(timeout=limit_s), False
        except subprocess.TimeoutExpired:
            returncode, cut = _stop(process), True
        finally:
            if process.poll() is None:  # interrupted from outside (SIGTERM): leave no tests running
                _stop(process)
        log.write(f"\n[cut at the limit of {limit_s:.0f} s]\n" if cut else f"\n[exit status {returncode}]\n")
        log.flush()
        return count(outcomes) | {
            "returncode": returncode,
            "cut": cut,
            "elapsed_s": round(time.perf_counter() - started, 1),
        }


def _stop(process):
    """SIGTERM to pytest's whole session, then SIGKILL if it lingers; the exit status."""
    for sig, grace_s in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            return process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
    return process.wait()
