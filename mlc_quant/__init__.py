"""mlc-quant: SmoothQuant W8A8 (and friends) as TVM Relax passes.

    stats = mlc_quant.calibrate(mod, params, dataset)
    qmod = mlc_quant.quantize(mod, params, dataset, scheme="smq_q8i8f16_1", alpha=0.5, smooth=True)
"""
__version__ = "0.1.0"

from mlc_quant.api import calibrate, quantize  # noqa: E402
from mlc_quant.schemes import SCHEMES, QuantScheme, get_scheme  # noqa: E402

__all__ = ["calibrate", "quantize", "SCHEMES", "QuantScheme", "get_scheme"]
