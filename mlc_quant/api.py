"""The Python API over IRModules: ``calibrate`` and ``quantize`` (documented in docs/api.md)."""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional, Sequence

import numpy as np
from tvm import IRModule

from mlc_quant.calibration import run_calibration
from mlc_quant.passes import CollectStats, module_linears
from mlc_quant.passes.collect_stats import STAT_KINDS
from mlc_quant.pipeline import annotate, bind_params, quantize_module
from mlc_quant.schemes import get_scheme


def _as_numpy(params: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict name -> array, got {type(params).__name__}")
    out = {}
    for k, v in params.items():
        arr = v.numpy() if hasattr(v, "numpy") else np.asarray(v)
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ValueError(f"param {k!r} contains NaN or Inf")
        out[k] = arr
    return out


def _func_names(mod: IRModule, func_names: Optional[Sequence[str]]):
    with_linears = list(module_linears(mod))
    if func_names is None:
        return with_linears
    missing = [f for f in func_names if f not in [g.name_hint for g in mod.get_global_vars()]]
    if missing:
        raise ValueError(f"functions {missing} are not in the module (functions with linears: {with_linears})")
    return list(func_names)


def calibrate(mod: IRModule, params: Mapping[str, np.ndarray], dataset: Iterable,
              func_names: Optional[Sequence[str]] = None, kinds: Sequence[str] = STAT_KINDS,
              target: str = "llvm") -> Dict[str, Dict[str, np.ndarray]]:
    """Running per-channel statistics of every linear's input over ``dataset``.

    Returns ``{linear_name: {"absmax": [K], "min": [K], "max": [K]}}`` (float32). One pass over
    the data; memory is O(channels) whatever the dataset size. Functions that share a weight
    (prefill and decode) merge into one entry.
    """
    params = _as_numpy(params)
    mod = annotate(mod, params)
    funcs = _func_names(mod, func_names)
    observer = run_calibration(CollectStats(kinds)(mod), params, dataset, funcs, target=target)
    return observer.as_dict()


def quantize(mod: IRModule, params: Mapping[str, np.ndarray], dataset: Optional[Iterable],
             scheme: str = "smq_q8i8f16_1", alpha: float = 0.5, smooth: bool = True,
             func_names: Optional[Sequence[str]] = None, bind: bool = True, target: str = "llvm"):
    """Quantize every linear of ``mod`` with ``scheme`` (SmoothQuant when ``smooth``).

    With ``bind=True`` (default) the quantized weights are bound in as constants and the returned
    module's functions take only their activation inputs. With ``bind=False`` it returns
    ``(module, params)`` with the int8 weights and scales as parameters (for big models).
    """
    scheme = get_scheme(scheme)
    params = _as_numpy(params)
    if dataset is None and (smooth or scheme.static_activations) and scheme.quantizes:
        raise ValueError(f"scheme {scheme.name} with smooth={smooth} needs a calibration dataset")

    def calibrator(stats_mod, funcs):
        return run_calibration(stats_mod, params, dataset, _func_names(stats_mod, func_names or funcs),
                               target=target)

    result = quantize_module(mod, params, scheme, calibrator, alpha=alpha, smooth=smooth, func_names=func_names)
    if not bind:
        return result.mod, result.params
    return bind_params(result.mod, result.params)
