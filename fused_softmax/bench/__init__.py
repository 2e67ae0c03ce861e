"""Developer tooling, kept out of the API's namespace: each module is a command.

- ``python -m fused_softmax.bench``: the benchmark sweep (``sweep``), GB/s and % of a device
  copy on a GPU;
- ``python -m fused_softmax.bench.report RESULTS_DIR [README]``: a sweep's results and the
  README's performance section, re-rendered (``report``);
- ``python -m fused_softmax.bench.traffic``: bytes each kernel moves, counted under Triton's
  interpreter (``traffic``);
- ``python -m fused_softmax.bench.machine_code_report``: registers, spills and access widths of
  every shipped kernel, compiled offline for sm_90 (``machine_code``).
"""
