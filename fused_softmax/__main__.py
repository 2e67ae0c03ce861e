"""``python -m fused_softmax``: a short correctness-and-timing table of fused_softmax against torch on this machine."""

from .bench.sweep import interpret_kernels_without_gpu, summary

if __name__ == "__main__":
    interpret_kernels_without_gpu()
    raise SystemExit(summary())
