#!/usr/bin/env python3
"""Build a quantized LLM: ``python scripts/build.py --model=smollm2 --quantization=smq_q8i8f16_2
--max-seq-len=2048 --dataset=dummy`` (the same as ``mlc-quant build``)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mlc_quant.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]]))
