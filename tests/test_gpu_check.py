"""The GPU check runs dry on a CPU, so the one command a lent GPU gets cannot rot unseen.

The dry run is the same script and steps with tiny shapes under Triton's interpreter; its
figures must say so everywhere and be refused for the README.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fused_softmax.bench import report, suite
from fused_softmax.bench.host_time import LEAST_FUNCTION

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["provenance", "cuda tests", "sweep", "cooperative", "small calls", "direct launch", "other tests", "peers"]


def _dry_run(out_dir):
    """``bash benchmarks/gpu_check.sh --dry-run OUT_DIR``, as CI's Python runs it."""
    env = {key: value for key, value in os.environ.items() if key != "OUT"}
    env["PYTHON"] = sys.executable
    script = ROOT / "benchmarks" / "gpu_check.sh"
    return subprocess.run(
        ["bash", str(script), "--dry-run", str(out_dir)], capture_output=True, text=True, env=env, timeout=240
    )


def _interpreter_problem_of_a_cpu_child():
    """``_runtime.interpreter_problem()`` in a Python as the dry run starts it (no GPU visible,
    the kernels interpreted): on a GPU machine this process's kernels are compiled, not
    interpreted, and its image may pair a Triton and a NumPy whose interpreter cannot run them."""
    code = "from fused_softmax import _runtime; print(_runtime.interpreter_problem() or '')"
    env = os.environ | {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONSAFEPATH": "1"}
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert child.returncode == 0, child.stderr
    return child.stdout.strip()


def test_dry_run_writes_every_step_labelled_as_the_interpreters(tmp_path):
    """One run (it takes seconds), then what it wrote: provenance, every step, each shape group,
    direction and small call measured and checked, and the dry run named everywhere. Skipped
    only on a GPU machine whose interpreter cannot run the kernels (its reason says why); on a
    CPU machine that interpreter fails the whole suite instead."""
    if torch.cuda.is_available() and (problem := _interpreter_problem_of_a_cpu_child()):
        pytest.skip(problem)
    done = _dry_run(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "results.json").read_text())

    info = results["metadata"]
    assert info["dry_run"] is True and "not GPU figures" in info["timing"] and "DRY RUN" in info["device"]
    for key in ("python", "torch", "triton", "git_commit", "commit_source", "source_sha256", "date", "elapsed_s"):
        assert key in info, key
    assert [step["name"] for step in results["steps"]] == STEPS
    assert all(step["status"] == "done" for step in results["steps"]), results["steps"]
    assert results["tests"]["cuda"]["collected"] > 0 and results["tests"]["cuda"]["counts"]["failed"] == 0

    records = results["results"]
    assert results["copy_gbps"] > 0 and {r["group"] for r in records} == {"large", "decode"}
    assert {(r["implementation"], r["direction"]) for r in records} == {
        (impl, direction) for impl in ("fused_softmax", "torch") for direction in ("forward", "backward")
    }
    for record in records:
        assert record["ok"], record
        for key in ("ms", "bytes_moved", "gbps", "pct_of_copy", "fused_regime", "max_abs_err"):
            assert key in record, key
    assert {r["mode"] for r in results["host_time"]} == {"inference", "training"}
    assert {r.get("direct_launch", False) for r in results["host_time"]} == {False, True}
    assert results["direct_launch"] and all(r["ok"] and r["direct_launches"] == 0 for r in results["direct_launch"])
    for record in results["host_time"]:
        least = {LEAST_FUNCTION} if record["mode"] == "training" else set()
        assert set(record["us"]) == {"fused_softmax", "torch", "torch.empty_like"} | least

    assert report.DRY_RUN_BANNER in (tmp_path / "results.md").read_text()
    assert "(DRY RUN)" in done.stdout
    with pytest.raises(ValueError, match="dry run"):
        report.readme_section(results, tmp_path, tmp_path.parent)


def test_a_run_cut_at_its_limit_keeps_the_outcomes_so_far(tmp_path):
    """The limit stops pytest mid-run; what finished is counted, what did not is 'not run'."""
    (tmp_path / "test_sample.py").write_text(
        textwrap.dedent(
            """
            import time

            def test_passes():
                pass

            def test_fails():
                assert False, "planted"

            def test_never_ends():
                time.sleep(600)
            """
        )
    )
    with (tmp_path / "log").open("w") as log:
        run = suite.run(["-q", "test_sample.py"], 10, log, tmp_path)
    assert run["cut"] and run["elapsed_s"] < 60
    assert run["counts"]["passed"] == 1 and run["counts"]["failed"] == 1
    assert run["collected"] == 3 and run["not_run"] == 1
    assert "planted" in run["failures"][0]["detail"]
