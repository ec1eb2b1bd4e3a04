"""mlc-quant: SmoothQuant W8A8 (and friends) as TVM Relax passes.

    stats = mlc_quant.calibrate(mod, params, dataset)
    qmod = mlc_quant.quantize(mod, params, dataset, scheme="smq_q8i8f16_1", alpha=0.5, smooth=True)
"""
__version__ = "0.1.0"

__all__ = ["calibrate", "quantize", "SCHEMES", "QuantScheme", "get_scheme"]

# Imported on first use: the runtime side (mlc_quant.runtime, .runner, .cuda_runtime, .artifact)
# must import on a GPU machine that has only TVM's runtime, where tvm.relax does not exist.
_LAZY = {"calibrate": "mlc_quant.api", "quantize": "mlc_quant.api", "SCHEMES": "mlc_quant.schemes",
         "QuantScheme": "mlc_quant.schemes", "get_scheme": "mlc_quant.schemes"}


def __getattr__(name):
    if name in _LAZY:
        import importlib  # pylint: disable=import-outside-toplevel

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mlc_quant' has no attribute {name!r}")
