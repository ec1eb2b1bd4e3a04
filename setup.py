"""mlc-quant: SmoothQuant W8A8 (and friends) as TVM Relax passes."""
from setuptools import setup

setup(
    name="mlc-quant",
    version="0.1.0",
    description="Quantization passes (SmoothQuant W8A8, AutoRound, SpinQuant) over TVM Relax IRModules",
    packages=["mlc_quant", "mlc_quant.passes", "mlc_quant.model", "mlc_quant.kernels"],
    package_dir={"mlc_quant": "mlc_quant", "mlc_quant.passes": "passes"},
    package_data={"mlc_quant.kernels": ["*.cu", "*.cc", "*.h"]},
    python_requires=">=3.10",
    install_requires=[
        "apache-tvm==0.27.0.post1",
        # 0.1.15.post2 segfaults in Schedule.tensorize (see docs/notes): pin the one that works.
        "apache-tvm-ffi==0.1.14.post0",
        "numpy>=1.26",
        "tqdm>=4.60",
    ],
    extras_require={
        "llm": ["transformers>=4.45", "tokenizers>=0.20", "gguf>=0.10", "safetensors>=0.4", "datasets>=2.20",
                "matplotlib>=3.7"],  # matplotlib: the figures of mlc-quant eval (Agg backend, no display)
        "test": ["pytest>=8"],
        # Headers (and libcublasLt) the CUDA kernels compile against (the Makefile installs them
        # with --no-deps); without them, mlc_quant.kernels fetches the same pinned wheels'
        # headers into ~/.cache on first use.
        "cuda": ["nvidia-cublas==13.1.0.3", "nvidia-cutlass==4.2.0.0"],
    },
    entry_points={"console_scripts": ["mlc-quant=mlc_quant.cli:main"]},
)
