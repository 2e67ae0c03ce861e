"""The README's performance section is regenerated from a results folder, without a GPU."""

import json
import shutil
from pathlib import Path

from fused_softmax.bench import report as bench_report

ROOT = Path(__file__).resolve().parents[1]


def record(implementation, gbps):
    return dict(
        dtype="bf16",
        direction="forward",
        group="large",
        n_rows=8,
        n_cols=4096,
        implementation=implementation,
        fused_regime="single_pass",
        max_abs_err=1e-3,
        allowed_err=1e-2,
        ok=True,
        ms=0.01,
        gbps=gbps,
        pct_of_copy=gbps / 30,
    )


def test_readme_section_is_regenerated_from_results(tmp_path):
    """Synthetic numbers in a temporary folder: only the rendering is under test."""
    out_dir = tmp_path / "benchmarks" / "results" / "test-device"
    out_dir.mkdir(parents=True)
    metadata = dict(
        device="Test Device",
        driver="1.0",
        cuda="12.x",
        torch="2.x",
        triton="3.x",
        git_commit="0123456789abcdef",
        date="2026-01-01T00:00:00",
    )
    results = dict(
        metadata=metadata,
        copy_gbps=3000.0,
        skipped=[],
        results=[record("fused_softmax", 2700.0), record("torch", 1800.0)],
    )
    (out_dir / "results.json").write_text(json.dumps(results))
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    before = readme.read_text()

    bench_report.main([str(out_dir), str(readme)])

    after = readme.read_text()
    section = after[after.index(bench_report.README_BEGIN) : after.index(bench_report.README_END)]
    assert "Test Device" in section and "3,000 GB/s" in section and "0123456789ab" in section
    assert "2,700 (90%)" in section and "1.50x" in section
    assert "benchmarks/results/test-device/results.md" in section
    assert after.split(bench_report.README_BEGIN)[0] == before.split(bench_report.README_BEGIN)[0]
    assert after.split(bench_report.README_END)[1] == before.split(bench_report.README_END)[1]
    assert (out_dir / "results.md").exists()


def test_readme_section_from_a_gpu_check_has_decoding_small_calls_and_tests(tmp_path):
    """A GPU check's results.json (synthetic here) re-renders its results.md and feeds the README
    its decoding shapes, its small calls and its test counts."""
    out_dir = tmp_path / "benchmarks" / "results" / "test-device"
    out_dir.mkdir(parents=True)
    decode = [
        dict(record(impl, gbps), group="decode", n_rows=4)
        for impl, gbps in (("fused_softmax", 900.0), ("torch", 300.0))
    ]
    results = dict(
        kind="gpu_check",
        metadata=dict(
            device="Test Device",
            driver="1.0",
            cuda="12.x",
            torch="2.x",
            triton="3.x",
            git_commit="0123456789abcdef",
            date="2026-01-01T00:00:00",
            dry_run=False,
        ),
        copy_gbps=3000.0,
        skipped=[],
        steps=[dict(name="sweep", budget_s=120, elapsed_s=100.0, status="cut", note="cut after 3 of 4 measurements")],
        tests=dict(
            cuda=dict(
                selection="pytest tests -m cuda -q",
                elapsed_s=40.0,
                collected=34,
                not_run=0,
                cut=False,
                counts=dict(passed=33, failed=1, error=0, skipped=0, xfailed=0),
                failures=[dict(test="tests/test_cuda.py::test_x", detail="E   AssertionError: planted")],
            )
        ),
        results=[record("fused_softmax", 2700.0), record("torch", 1800.0), *decode],
        host_time=[
            dict(
                n_rows=8,
                n_cols=512,
                dtype="bf16",
                mode="inference",
                us={"fused_softmax": 20.0, "torch": 5.0, "torch.empty_like": 2.0},
                kernel_us={"fused_softmax": 3.0, "torch": 4.0},
            )
        ],
    )
    (out_dir / "results.json").write_text(json.dumps(results))
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)

    bench_report.main([str(out_dir), str(readme)])

    text = readme.read_text()
    section = text[text.index(bench_report.README_BEGIN) : text.index(bench_report.README_END)]
    assert "4x4096" in section and "900 (30%)" in section and "3.00x" in section
    assert "20.0" in section and "4.0x" in section and "10x" in section
    assert "33 passed, 1 failed" in section and "planted" in section and "sweep (cut after 3 of 4" in section
    markdown = (out_dir / "results.md").read_text()
    assert "## Steps" in markdown and "cut after 3 of 4" in markdown and bench_report.DRY_RUN_BANNER not in markdown
