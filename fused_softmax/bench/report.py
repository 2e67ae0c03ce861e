"""Reports of the benchmark sweep and the GPU check: markdown tables, plots, and the README's
performance section.

Kept apart from the measuring (``sweep``, ``gpu_check``) so that a committed results.json can
be re-rendered, and the README regenerated from it, without a GPU. A dry run's numbers (the
Triton interpreter on a CPU) are flagged in every report and never reach the README.
"""

import json
import sys
from pathlib import Path


def point_label(record):
    return f"{record['dtype']} {record['direction']} {record['n_rows']}x{record['n_cols']} {record['implementation']}"


def cell(record):
    """'GB/s (% of copy)', with WRONG or the error where the check failed; blank where not measured."""
    if not record:
        return ""
    if "error" in record:
        return "error"
    cell = f"{record['gbps']:,.0f} ({record['pct_of_copy']:.0f}%)"
    return cell if record["ok"] else f"{cell} WRONG"


def fused_passed(records):
    """Every record of fused_softmax (its cooperative regime's too) right."""
    return all(record["ok"] for record in records if record["implementation"].startswith("fused_softmax"))


def failure(record):
    if "error" in record:
        return f"{point_label(record)}: {record['error']}"
    return (
        f"{point_label(record)}: WRONG, max abs err {record['max_abs_err']:.3g} > allowed {record['allowed_err']:.3g}"
    )


def table(headers, rows):
    """An aligned markdown table: readable in a terminal, rendered in a .md file."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells):
        return "| " + " | ".join(str(cell).rjust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (width + 1) + ":" for width in widths) + "|"
    return "\n".join([line(headers), rule, *map(line, rows)])


def by_point(records):
    """{(dtype, direction): {(group, n_rows, n_cols): {implementation: record}}}, in sweep order."""
    points = {}
    for record in records:
        section = points.setdefault((record["dtype"], record["direction"]), {})
        section.setdefault((record["group"], record["n_rows"], record["n_cols"]), {})[record["implementation"]] = record
    return points


def markdown(metadata, copy, records, skipped):
    lines = [f"# fused_softmax benchmark: {metadata['device']}", ""]
    lines += [f"- {key}: {value}" for key, value in metadata.items()]
    return "\n".join(lines + sweep_tables(copy, records, skipped)) + "\n"


def sweep_tables(copy, records, skipped):
    """The sweep's lines: what a cell means, a table per dtype and direction, the failures."""
    impls = list(dict.fromkeys(record["implementation"] for record in records))
    lines = [
        "",
        f"Device-to-device copy: {copy:,.0f} GB/s. Cells: GB/s (% of copy), where GB/s is the bytes a perfect kernel "
        "moves (forward: read x, write y; backward: read y and dy, write dx) over the median time. WRONG: max abs "
        "error against float64 torch above what rounding explains.",
        "",
        *(f"- {note}" for note in skipped),
    ]
    for (dtype, direction), points in by_point(records).items():
        headers = ["set", "M", "N", "fused regime", *impls, "fused max abs err"]
        rows = []
        for (group, n_rows, n_cols), by_impl in points.items():
            fused = by_impl.get("fused_softmax", {})
            rows.append(
                [
                    group,
                    n_rows,
                    n_cols,
                    next(iter(by_impl.values()))["fused_regime"],
                    *(cell(by_impl[impl]) if impl in by_impl else "" for impl in impls),
                    f"{fused['max_abs_err']:.2g}" if "max_abs_err" in fused else "",
                ]
            )
        lines += ["", f"## {dtype} {direction}", "", table(headers, rows)]
    failures = [failure(record) for record in records if not record["ok"]]
    if failures:
        lines += ["", "## Failures", "", *(f"- {failure}" for failure in failures)]
    return lines


def _pyplot():
    """matplotlib.pyplot on a file-only backend, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(out_dir, records, copy, device_name):
    """One PNG per dtype and direction: GB/s against N, a line per implementation; none without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return []
    impls = list(dict.fromkeys(record["implementation"] for record in records))
    paths = []
    for (dtype, direction), points in by_point(records).items():
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for color, impl in enumerate(impls):
            for group, style in (("large", "-"), ("small-M", "--")):
                measured = [
                    by_impl[impl]
                    for (point_group, _, _), by_impl in points.items()
                    if point_group == group and "gbps" in by_impl.get(impl, {})
                ]
                if not measured:
                    continue
                label = impl if group == "large" else f"{impl}, M={measured[0]['n_rows']}"
                ax.plot(
                    [r["n_cols"] for r in measured],
                    [r["gbps"] for r in measured],
                    style,
                    color=f"C{color}",
                    marker="o",
                    markersize=3,
                    label=label,
                )
                wrong = [r for r in measured if not r["ok"]]
                if wrong:
                    ax.plot([r["n_cols"] for r in wrong], [r["gbps"] for r in wrong], "x", color="black", markersize=9)
        ax.axhline(copy, color="gray", linestyle=":", label="device-to-device copy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (softmax length); x: wrong result")
        ax.set_ylabel("GB/s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"softmax {direction}, {dtype}, {device_name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = out_dir / f"{dtype}-{direction}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def comparison_table(records):
    """fused_softmax against torch eager, a row per problem and direction."""
    rows = []
    for (dtype, direction), points in by_point(records).items():
        for (_, n_rows, n_cols), by_impl in points.items():
            fused, eager = by_impl.get("fused_softmax", {}), by_impl.get("torch", {})
            speedup = f"{fused['gbps'] / eager['gbps']:.2f}x" if "gbps" in fused and "gbps" in eager else ""
            error = f"{fused['max_abs_err']:.2g}" if "max_abs_err" in fused else fused.get("error", "")
            rows.append(
                [
                    f"{n_rows}x{n_cols}",
                    dtype,
                    direction,
                    next(iter(by_impl.values()))["fused_regime"],
                    cell(fused),
                    cell(eager),
                    speedup,
                    error,
                    {True: "ok", False: "FAIL"}.get(fused.get("ok"), "not run"),
                ]
            )
    headers = ["shape", "dtype", "direction", "regime", "fused_softmax", "torch", "speedup", "max abs err", "check"]
    return table(headers, rows)


def plot_decode(out_dir, records, copy, device_name):
    """decode.png: GB/s against the row count M of the decoding shapes, a panel per dtype and
    direction, a colour per implementation and a line style per N; None without matplotlib or data."""
    plt = _pyplot()
    decode = [record for record in records if record["group"] == "decode" and "gbps" in record]
    if plt is None or not decode:
        return None
    sections = by_point(decode)
    impls = list(dict.fromkeys(record["implementation"] for record in decode))
    lines = ("-", "--", ":", "-.")
    styles = {n_cols: lines[i % len(lines)] for i, n_cols in enumerate(sorted({r["n_cols"] for r in decode}))}
    fig, axes = plt.subplots(1, len(sections), figsize=(5.5 * len(sections), 5), squeeze=False)
    for ax, ((dtype, direction), points) in zip(axes[0], sections.items(), strict=True):
        for color, impl in enumerate(impls):
            for n_cols, style in styles.items():
                measured = [
                    by_impl[impl] for (_, _, cols), by_impl in points.items() if cols == n_cols and impl in by_impl
                ]
                if measured:
                    ax.plot(
                        [r["n_rows"] for r in measured],
                        [r["gbps"] for r in measured],
                        style,
                        color=f"C{color}",
                        marker="o",
                        markersize=3,
                        label=f"{impl}, N={n_cols:,}",
                    )
        ax.axhline(copy, color="gray", linestyle=":", label="device-to-device copy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (rows)")
        ax.set_ylabel("GB/s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{dtype} {direction}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"softmax over a few long rows (LLM decoding), {device_name}")
    path = out_dir / "decode.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _us(value):
    return "" if value is None else f"{value:,.1f}"


def host_time_table(records):
    """Per-call wall µs of the small shapes, the ratios that matter, and the kernels' own µs."""
    rows = []
    for record in records:
        us, kernel = record["us"], record.get("kernel_us", {})
        rows.append(
            [
                f"{record['n_rows']}x{record['n_cols']}",
                record["dtype"],
                record["mode"] + (", direct launch" if record.get("direct_launch") else ""),
                _us(us["fused_softmax"]),
                _us(us["torch"]),
                _us(us.get("least autograd.Function")),
                _us(us["torch.empty_like"]),
                f"{us['fused_softmax'] / us['torch']:.1f}x",
                f"{us['fused_softmax'] / us['torch.empty_like']:.0f}x",
                _us(kernel.get("fused_softmax")) or record.get("kernel_error", ""),
                _us(kernel.get("torch")),
            ]
        )
    headers = [
        "shape",
        "dtype",
        "mode",
        "fused_softmax us",
        "torch us",
        "least Function us",
        "empty_like us",
        "fused/torch",
        "fused/empty_like",
        "fused kernel us",
        "torch kernel us",
    ]
    return table(headers, rows)


HOST_TIME_NOTE = (
    "Wall time per call, median of blocks of many calls with the device synchronized at both ends of "
    "each block (inference: forward without grad; training: forward and backward through autograd); "
    "kernel us: CUDA events around CUDA-graph replays, the device's time without the host's."
)


def counts_text(run):
    """'34 collected: 30 passed, 4 skipped', with what the limit left unrun."""
    counts = ", ".join(f"{number} {outcome}" for outcome, number in run["counts"].items() if number)
    cut = f"; cut at its limit, {run['not_run']} not run" if run["cut"] else ""
    return f"{run['collected']} collected: {counts or 'none run'}{cut}"


def tests_lines(tests):
    """A line per test run: counts, whether the limit cut it, and its first failures."""
    lines = []
    for name, run in tests.items():
        if "counts" not in run:
            lines.append(f"- {name}: {run.get('note', 'not run')}")
            continue
        lines.append(f"- {name} (`{run['selection']}`), {run['elapsed_s']:.0f} s: {counts_text(run)}")
        for failed in run["failures"]:
            last = (failed["detail"].strip().splitlines() or [""])[-1]
            lines.append(f"  - {failed['test']}: {last}")
    return lines


def steps_table(steps):
    rows = [[s["name"], f"{s['budget_s']:.0f}", f"{s['elapsed_s']:.1f}", s["status"], s.get("note", "")] for s in steps]
    return table(["step", "budget s", "elapsed s", "status", "note"], rows)


DRY_RUN_BANNER = (
    "**DRY RUN on a CPU: every time below is the Triton interpreter's or the CPU's, by the host's clock. "
    "These are not GPU figures: they only show that the check runs.**"
)


def check_markdown(results):
    """The GPU check's report: provenance, each step's budget and outcome, tests, sweep, small calls."""
    info = results["metadata"]
    lines = [f"# fused_softmax GPU check: {info['device']}", ""]
    if info.get("dry_run"):
        lines += [DRY_RUN_BANNER, ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += ["", "## Steps", "", steps_table(results["steps"]), "", f"Plots: {results.get('plots', 'not drawn')}"]
    lines += ["", "## Tests", "", *tests_lines(results["tests"])]
    if results["results"]:
        lines += ["", "## Sweep", *sweep_tables(results["copy_gbps"], results["results"], results["skipped"])]
    if results["host_time"]:
        lines += ["", "## Small calls", "", HOST_TIME_NOTE, "", host_time_table(results["host_time"])]
    return "\n".join(lines) + "\n"


def write_check(out_dir, results):
    """results.json and results.md of a GPU check."""
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(check_markdown(results))


def plot_check(out_dir, results):
    """The sweep's plots and decode.png; [] without matplotlib."""
    records, copy, name = results["results"], results["copy_gbps"], results["metadata"]["device"]
    decode = plot_decode(out_dir, records, copy, name)
    return plot(out_dir, records, copy, name) + ([decode] if decode else [])


README_BEGIN = "<!-- performance: generated by python -m fused_softmax.bench.report -->"
README_END = "<!-- performance: end -->"


def readme_section(results, out_dir, readme_dir):
    """The README's performance section: where the figures came from, summary tables, the plots.

    A dry run's numbers come from the interpreter on a CPU: they are refused here, so they can
    never be read as a GPU's.
    """
    info, copy, records = results["metadata"], results["copy_gbps"], results["results"]
    if info.get("dry_run"):
        raise ValueError("a dry run's figures are the Triton interpreter's on a CPU and never go in the README")
    lines = [
        README_BEGIN,
        f"Measured on **{info['device']}** (driver {info['driver']}, CUDA {info['cuda']}, torch {info['torch']}, "
        f"triton {info['triton']}, commit `{(info['git_commit'] or 'unknown')[:12]}`, {info['date']}). "
        f"Device-to-device copy in the same run: {copy:,.0f} GB/s. Cells: GB/s (% of that copy), median of "
        f"`triton.testing.do_bench`; full tables in [{out_dir.name}/results.md]"
        f"({(out_dir / 'results.md').relative_to(readme_dir).as_posix()}).",
        "",
        comparison_table(
            [r for r in records if r["group"] == "large" and r["implementation"] in ("fused_softmax", "torch")]
        ),
        "",
    ]
    decode = [r for r in records if r["group"] == "decode" and r["implementation"] in ("fused_softmax", "torch")]
    if decode:
        lines += ["A few long rows, as in LLM decoding:", "", comparison_table(decode), ""]
    if results.get("host_time"):
        lines += ["Small calls, where the host sets the pace. " + HOST_TIME_NOTE, ""]
        lines += [host_time_table(results["host_time"]), ""]
    if results.get("tests"):
        lines += ["Tests on this device:", "", *tests_lines(results["tests"]), ""]
    cut = [f"{step['name']} ({step['note']})" for step in results.get("steps", []) if step["status"] != "done"]
    if cut:
        lines += [f"Not run to the end in that check: {'; '.join(cut)}.", ""]
    for png in sorted(out_dir.glob("*.png")):
        lines.append(f"![{png.stem}]({png.relative_to(readme_dir).as_posix()})")
    lines.append(README_END)
    return "\n".join(lines)


def update_readme(readme, section):
    """Replace the generated performance section of ``readme`` (between its markers) with ``section``."""
    text = readme.read_text()
    begin, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    readme.write_text(text[:begin] + section + text[end:])


def main(argv=None):
    """``python -m fused_softmax.bench.report RESULTS_DIR [README]``: redraw plots, results.md and
    the README section."""
    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(argv[0])
    readme = Path(argv[1]) if len(argv) > 1 else Path("README.md")
    results = json.loads((out_dir / "results.json").read_text())
    if "steps" in results:  # a GPU check's
        write_check(out_dir, results)
        plot_check(out_dir, results)
    else:
        records, copy = results["results"], results["copy_gbps"]
        (out_dir / "results.md").write_text(markdown(results["metadata"], copy, records, results["skipped"]))
        plot(out_dir, records, copy, results["metadata"]["device"])
    update_readme(readme, readme_section(results, out_dir.resolve(), readme.resolve().parent))
    print(f"Updated {readme} from {out_dir}")


if __name__ == "__main__":
    main()
