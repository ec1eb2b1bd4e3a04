#!/usr/bin/env python3
"""End-to-end GPU benchmark (the same as ``mlc-quant bench``), docs/performance.md.

Here (CPU machine, nvcc):   python scripts/bench.py build --output .gpu/bench
There (GPU, runtime only):  python3 scripts/bench.py run .gpu/bench --json bench.json
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mlc_quant.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
