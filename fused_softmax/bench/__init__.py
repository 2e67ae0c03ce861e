"""Developer tooling, kept out of the API's namespace: commands, each a module, and their helpers.

- ``python -m fused_softmax.bench``: the benchmark sweep (``sweep``), GB/s and % of a device
  copy on a GPU;
- ``python -m fused_softmax.bench.gpu_check [OUT_DIR] [--dry-run]`` (through
  ``bash benchmarks/gpu_check.sh``): the one-call check of a lent GPU: CUDA tests, sweep,
  small calls (``host_time``), the other tests (``suite``) and peers, time-boxed;
- ``python -m fused_softmax.bench.report RESULTS_DIR [README]``: a sweep's or a GPU check's
  results and the README's performance section, re-rendered (``report``);
- ``python -m fused_softmax.bench.provenance``: the source hash a result records beside its
  commit (``provenance``);
- ``python -m fused_softmax.bench.traffic``: bytes each kernel moves, counted under Triton's
  interpreter (``traffic``);
- ``python -m fused_softmax.bench.machine_code_report``: registers, spills and access widths of
  every shipped kernel, compiled offline for sm_90 (``machine_code``);
- ``python -m fused_softmax.bench.host_time``: wall time per small call against
  ``torch.empty_like`` (on CPU under TRITON_INTERPRET=1, the launch stubbed);
  ``python -m fused_softmax.bench.host_instructions``: the same calls' instructions per call,
  counted by valgrind's callgrind, the same count each run (``host_instructions``).
"""
