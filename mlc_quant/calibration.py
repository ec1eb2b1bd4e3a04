"""Calibration: run the stat-collecting module over a dataset and merge statistics in one pass."""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import tvm
from tvm import relax

from mlc_quant.observers import ChannelStatsObserver
from mlc_quant.passes import STATS_ATTR
from mlc_quant.progress import progress


def stat_names(func: relax.Function) -> List[str]:
    return [str(n) for n in func.attrs[STATS_ATTR]]


def split_params(func: relax.Function, params: Mapping[str, Any]):
    """(activation params, weight params) of ``func``: weights are those named in ``params``."""
    acts = [p for p in func.params if p.name not in params]
    weights = [p for p in func.params if p.name in params]
    return acts, weights


def _check_input(fname: str, var: relax.Var, value: Any, index: int) -> np.ndarray:
    arr = np.asarray(value)
    where = f"calibration item {index}, function {fname!r}, input {var.name!r}"
    ty = var.ty
    if not isinstance(ty, relax.TensorType):
        raise TypeError(f"{where}: the parameter is not a tensor ({ty}); only tensor inputs can be fed")
    if str(arr.dtype) != ty.dtype:
        raise TypeError(f"{where}: dtype {arr.dtype}, expected {ty.dtype} (convert with .astype({ty.dtype!r}))")
    if ty.shape is not None:
        expected = list(ty.shape)
        if arr.ndim != len(expected):
            raise ValueError(f"{where}: shape {arr.shape}, expected {len(expected)} dims {tuple(expected)}")
        for got, want in zip(arr.shape, expected):
            if isinstance(want, tvm.tirx.IntImm) and int(want) != got:
                raise ValueError(f"{where}: shape {arr.shape}, expected {tuple(expected)}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: contains NaN or Inf; calibration data must be finite")
    return arr


def _inputs_for(fname: str, acts: Sequence[relax.Var], item: Any, index: int) -> List[np.ndarray]:
    if isinstance(item, Mapping) and fname in item and not any(a.name == fname for a in acts):
        item = item[fname]
    if isinstance(item, Mapping):
        missing = [a.name for a in acts if a.name not in item]
        extra = sorted(set(item) - {a.name for a in acts})
        if missing or extra:
            raise ValueError(f"calibration item {index}, function {fname!r}: expected inputs "
                             f"{[a.name for a in acts]}, missing {missing}, unexpected {extra}")
        values = [item[a.name] for a in acts]
    else:
        values = list(item) if isinstance(item, (tuple, list)) else [item]
        if len(values) != len(acts):
            raise ValueError(f"calibration item {index}, function {fname!r}: got {len(values)} inputs, "
                             f"expected {len(acts)} ({[a.name for a in acts]})")
    return [_check_input(fname, a, v, index) for a, v in zip(acts, values)]


def run_calibration(stats_mod: tvm.IRModule, params: Mapping[str, np.ndarray], dataset: Iterable,
                    func_names: Sequence[str], observer: Optional[ChannelStatsObserver] = None,
                    target: str = "llvm") -> ChannelStatsObserver:
    """Run every function of ``func_names`` on every dataset item; merge their stats.

    The weights are passed as arguments (never bound), so a model is compiled once and its
    params live once in memory; only one call's outputs and the running vectors are held.
    """
    observer = observer or ChannelStatsObserver()
    from mlc_quant.pipeline import build  # the scheduled CPU build

    exe = build(stats_mod, target)
    vm = relax.VirtualMachine(exe, tvm.cpu())
    dev_params = {k: tvm.runtime.tensor(np.ascontiguousarray(v)) for k, v in params.items()}
    plan = {}
    for fname in func_names:
        func = stats_mod[fname]
        acts, weights = split_params(func, params)
        plan[fname] = (acts, [dev_params[w.name] for w in weights], func.params, stat_names(func))
    count = 0
    for index, item in enumerate(progress(dataset, desc="calibrating", unit="batch")):
        for fname, (acts, wvals, order, names) in plan.items():
            inputs = dict(zip([a.name for a in acts], _inputs_for(fname, acts, item, index)))
            wmap = dict(zip([p.name for p in order if p.name in params], wvals))
            args = [tvm.runtime.tensor(inputs[p.name]) if p.name in inputs else wmap[p.name] for p in order]
            out = vm[fname](*args)
            observer.update_from_outputs(names, [t.numpy() for t in out[1]])
        count += 1
    if count == 0:
        raise ValueError("the calibration dataset is empty: give at least one input batch")
    return observer
