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
