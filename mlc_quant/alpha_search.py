"""Per-group SmoothQuant alpha: a grid search on calibration activations.

SmoothQuant (and its ports) use one migration strength ``alpha`` for every layer. Here each
smoothing group (the linears that read one activation, ``passes/smooth_linear.SmoothGroup``) gets
its own: for every alpha of a grid, the group is smoothed with
``s = max|X|^alpha / max|W|^(1-alpha)`` (the calibration statistics the build uses), its linears
are quantized with the scheme (activations per the scheme's IR, weights round-to-nearest), and the
alpha with the lowest **group output MSE** wins:

    MSE(alpha) = sum over the group's linears of ||Q_a(X / s) deq(Q_w(W s))^T - X W^T||^2
                 / (rows * sum of their output widths)

on a capped sample of calibration rows of X (``mlc_quant.capture``). This is the output of the
linears the smoothing feeds, not the whole decoder block's output: a group's factor changes only
its own linears (the fold into the producer is exact), so their outputs are where its error
shows; the block-level MSE would add the attention/MLP nonlinearity and the other groups' errors
to every evaluation. The global alpha is always in the grid, so on this objective the search is
never worse than it.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from mlc_quant.fakequant import output_error, quantized_weight
from mlc_quant.progress import progress
from mlc_quant.schemes import QuantScheme
from mlc_quant.smoothing import group_key, linear_weight_nk, smoothing_factors

log = logging.getLogger("mlc_quant")

DEFAULT_GRID: Tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def parse_grid(spec) -> Tuple[float, ...]:
    """``"0.3,0.5,0.7"`` (or a sequence) -> sorted unique alphas, each in [0, 1]."""
    values = [float(v) for v in (spec.split(",") if isinstance(spec, str) else spec) if str(v).strip()]
    if not values:
        raise ValueError("the alpha grid is empty")
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"alpha grid values must lie in [0, 1], got {bad}")
    return tuple(sorted(set(round(v, 6) for v in values)))


def group_mse(scheme: QuantScheme, linears: Sequence[str], x: np.ndarray, weights_nk: Mapping[str, np.ndarray],
              stats: Mapping[str, Mapping[str, np.ndarray]], alpha: float) -> float:
    """The group's output MSE under ``scheme`` after smoothing with ``alpha`` (see module doc)."""
    act_absmax = np.max(np.stack([stats[n]["absmax"] for n in linears]), axis=0)
    s = smoothing_factors(act_absmax, [weights_nk[n] for n in linears], alpha)
    inv = 1.0 / s
    err, count = 0.0, 0
    for n in linears:
        w = np.asarray(weights_nk[n], dtype=np.float32)
        act = scheme.act_qparams(stats[n], inv)
        w_s = (w.astype(np.float64) * s[None, :]).astype(np.float32)  # as smooth_params scales it
        e, _ = output_error(scheme, x, w, quantized_weight(scheme, n, w_s, act), inv, act)
        err += e
        count += x.shape[0] * w.shape[0]
    return err / max(count, 1)


def search_group(scheme: QuantScheme, linears: Sequence[str], x: np.ndarray, weights_nk: Mapping[str, np.ndarray],
                 stats: Mapping[str, Mapping[str, np.ndarray]], grid: Sequence[float]) -> Tuple[float, Dict[float, float]]:
    """(alpha of lowest MSE, {alpha: MSE}); ties go to the first alpha of the grid."""
    table = {float(a): group_mse(scheme, linears, x, weights_nk, stats, a) for a in grid}
    alphas = list(table)
    return alphas[int(np.argmin([table[a] for a in alphas]))], table


class AlphaSearch:
    """The pipeline's ``alpha`` callable (``pipeline.quantize_module``): per-group alphas.

    ``capture(mod, params) -> mlc_quant.capture.Captured`` supplies calibration rows of every
    linear input of the (annotated, float) module. After the call, ``report`` holds the grid,
    the chosen alphas' and the global alpha's MSE per group, for mlc-quant-config.json.
    """

    def __init__(self, capture: Callable, grid: Sequence[float] = DEFAULT_GRID, global_alpha: float = 0.5):
        self.capture = capture
        self.global_alpha = float(global_alpha)
        self.grid = parse_grid(list(grid) + [self.global_alpha])
        self.report: Dict = {}

    def __call__(self, mod, groups, observer, params: Mapping[str, np.ndarray], layouts: Mapping[str, bool],
                 scheme: QuantScheme) -> Dict[str, float]:
        t0 = time.time()
        captured = self.capture(mod, params)
        alphas: Dict[str, float] = {}
        per_group: Dict[str, Dict] = {}
        total, total_global = 0.0, 0.0
        todo = [g for g in groups if g.fold != "skip"]
        for g in progress(todo, desc="alpha search", unit="group"):
            key = group_key(g.linears)
            if key not in captured.rows:
                raise ValueError(f"alpha search: no captured activations for smoothing group {key!r}")
            weights = {n: linear_weight_nk(np.asarray(params[n], dtype=np.float32), layouts[n]) for n in g.linears}
            stats = {n: observer.stats(n) for n in g.linears}
            best, table = search_group(scheme, g.linears, captured.rows[key], weights, stats, self.grid)
            alphas[key] = best
            per_group[key] = {"alpha": best, "mse": table[best], "mse_global": table[self.global_alpha]}
            total += table[best]
            total_global += table[self.global_alpha]
        self.report = {
            "objective": "output MSE of each smoothing group's linears under the scheme (calibration rows)",
            "grid": list(self.grid), "global_alpha": self.global_alpha,
            "rows_per_group": int(max((v.shape[0] for v in captured.rows.values()), default=0)),
            "mse_sum": total, "mse_sum_global": total_global, "seconds": round(time.time() - t0, 1),
            "groups": per_group,
        }
        log.info("alpha search: %d groups, summed group MSE %.4g (global alpha %.2f: %.4g) in %.0f s",
                 len(alphas), total, self.global_alpha, total_global, time.time() - t0)
        return alphas


def load_group_alphas(path) -> Dict[str, float]:
    """Per-group alphas from an mlc-quant-config.json (``quantization.group_alphas``) or a JSON
    object ``{group_key: alpha}`` (or ``{"group_alphas": {...}}``)."""
    import json
    import pathlib

    p = pathlib.Path(path)
    if p.is_dir():
        from mlc_quant.artifact import CONFIG_FILE

        p = p / CONFIG_FILE
    if not p.is_file():
        raise FileNotFoundError(f"alpha file {str(path)!r} not found: give a number in [0, 1], 'search', "
                                "or an mlc-quant-config.json with per-group alphas")
    data = json.loads(p.read_text())
    found = data.get("quantization", {}).get("group_alphas") if isinstance(data, dict) else None
    found = found if found is not None else (data.get("group_alphas", data) if isinstance(data, dict) else None)
    if not isinstance(found, dict) or not found or not all(isinstance(v, (int, float)) for v in found.values()):
        raise ValueError(f"{p} holds no per-group alphas (expected quantization.group_alphas, built with --alpha search)")
    return {str(k): float(v) for k, v in found.items()}


def resolve_alpha(spec, capture: Optional[Callable] = None, grid: Sequence[float] = DEFAULT_GRID,
                  global_alpha: float = 0.5):
    """``--alpha``: a float, ``search`` (an :class:`AlphaSearch`), or a config/JSON path of per-group alphas."""
    if isinstance(spec, (int, float)):
        return float(spec)
    text = str(spec).strip()
    try:
        return float(text)
    except ValueError:
        pass
    if text == "search":
        if capture is None:
            raise ValueError("--alpha search needs calibration activations (a capture function)")
        return AlphaSearch(capture, grid, global_alpha)
    return load_group_alphas(text)


__all__ = ["AlphaSearch", "DEFAULT_GRID", "group_mse", "load_group_alphas", "parse_grid", "resolve_alpha",
           "search_group"]
