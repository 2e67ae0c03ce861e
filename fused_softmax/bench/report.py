"""Reports of the benchmark sweep: markdown tables, plots, and the README's performance section.

Kept apart from the measuring (``sweep``) so that a committed results.json can be
re-rendered, and the README regenerated from it, without a GPU.
"""

import json
import sys
from pathlib import Path


def point_label(record):
    return f"{record['dtype']} {record['direction']} {record['n_rows']}x{record['n_cols']} {record['implementation']}"


def cell(record):
    """'GB/s (% of copy)', with WRONG or the error where the check failed."""
    if "error" in record:
        return "error"
    cell = f"{record['gbps']:,.0f} ({record['pct_of_copy']:.0f}%)"
    return cell if record["ok"] else f"{cell} WRONG"


def fused_passed(records):
    return all(record["ok"] for record in records if record["implementation"] == "fused_softmax")


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
    impls = list(dict.fromkeys(record["implementation"] for record in records))
    lines = [f"# fused_softmax benchmark: {metadata['device']}", ""]
    lines += [f"- {key}: {value}" for key, value in metadata.items()]
    lines += [
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
    return "\n".join(lines) + "\n"


def plot(out_dir, records, copy, device_name):
    """One PNG per dtype and direction: GB/s against N, a line per implementation; none without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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
    for points in by_point(records).values():
        for (_, n_rows, n_cols), by_impl in points.items():
            fused, eager = by_impl["fused_softmax"], by_impl["torch"]
            speedup = f"{fused['gbps'] / eager['gbps']:.2f}x" if "gbps" in fused and "gbps" in eager else ""
            error = f"{fused['max_abs_err']:.2g}" if "max_abs_err" in fused else fused.get("error", "")
            rows.append(
                [
                    f"{n_rows}x{n_cols}",
                    fused["dtype"],
                    fused["direction"],
                    fused["fused_regime"],
                    cell(fused),
                    cell(eager),
                    speedup,
                    error,
                    "ok" if fused["ok"] else "FAIL",
                ]
            )
    headers = ["shape", "dtype", "direction", "regime", "fused_softmax", "torch", "speedup", "max abs err", "check"]
    return table(headers, rows)


README_BEGIN = "<!-- performance: generated by python -m fused_softmax.bench.report -->"
README_END = "<!-- performance: end -->"


def readme_section(results, out_dir, readme_dir):
    """The README's performance section: where the figures came from, a summary table, the plots."""
    info, copy, records = results["metadata"], results["copy_gbps"], results["results"]
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
    records, copy = results["results"], results["copy_gbps"]
    (out_dir / "results.md").write_text(markdown(results["metadata"], copy, records, results["skipped"]))
    plot(out_dir, records, copy, results["metadata"]["device"])
    update_readme(readme, readme_section(results, out_dir.resolve(), readme.resolve().parent))
    print(f"Updated {readme} from {out_dir}")


if __name__ == "__main__":
    main()
