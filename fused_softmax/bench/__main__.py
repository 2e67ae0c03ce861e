"""``python -m fused_softmax.bench``: the benchmark sweep."""

from .sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
