"""SmoothQuant factors and the params transform that goes with the SmoothLinear pass."""
from __future__ import annotations

from typing import Dict, List, Mapping, Tuple, Union

import numpy as np

from mlc_quant.passes.smooth_linear import SmoothGroup

# Factors are clipped so a degenerate channel can never blow a weight up or down by more than this.
_S_MIN, _S_MAX = 1e-5, 1e5


def linear_weight_nk(w: np.ndarray, transposed: bool) -> np.ndarray:
    """A linear's weight in the [N, K] (nn.Linear) layout."""
    return w if transposed else w.T


def smoothing_factors(act_absmax: np.ndarray, weights_nk: List[np.ndarray], alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), max over every weight of the group.

    A channel whose activation or weight column is all zero gets s = 1: it carries nothing, and
    any other value would be 0/0 or x/0.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = np.asarray(act_absmax, dtype=np.float64)
    w = np.max(np.stack([np.max(np.abs(np.asarray(x, dtype=np.float64)), axis=0) for x in weights_nk]), axis=0)
    if w.shape != a.shape:
        raise ValueError(f"smoothing: activation has {a.shape[0]} channels but the weights have {w.shape[0]}")
    ok = (a > 0) & (w > 0)
    s = np.ones_like(a)
    s[ok] = np.power(a[ok], alpha) / np.power(w[ok], 1.0 - alpha)
    return np.clip(s, _S_MIN, _S_MAX)


def group_key(linears: Tuple[str, ...]) -> str:
    """A smoothing group's name in ``mlc-quant-config.json``: its linears, sorted, comma-joined."""
    return ",".join(sorted(linears))


def group_alpha(alpha: Union[float, Mapping[str, float]], linears: Tuple[str, ...]) -> float:
    """The alpha of one group: a global float, or a per-group mapping keyed by :func:`group_key`."""
    if isinstance(alpha, Mapping):
        key = group_key(linears)
        if key not in alpha:
            raise ValueError(f"per-group alphas lack smoothing group {key!r} (a config of another model or "
                             f"rotation?); it has {len(alpha)} groups")
        return float(alpha[key])
    return float(alpha)


def plan_smoothing(groups: List[SmoothGroup], stats: Mapping[str, Dict[str, np.ndarray]],
                   params: Mapping[str, np.ndarray], layouts: Mapping[str, bool],
                   alpha: Union[float, Mapping[str, float]]) -> Dict[Tuple[str, ...], np.ndarray]:
    """Smoothing factor of every group that can be smoothed (``skip`` groups are left out).

    ``alpha``: one migration strength for every group, or one per group (``{group_key: alpha}``,
    e.g. from :mod:`mlc_quant.alpha_search`).
    """
    factors = {}
    for g in groups:
        if g.fold == "skip":
            continue
        act = np.max(np.stack([stats[n]["absmax"] for n in g.linears]), axis=0)
        factors[g.linears] = smoothing_factors(act, [linear_weight_nk(params[n], layouts[n]) for n in g.linears],
                                               group_alpha(alpha, g.linears))
    return factors


def smooth_params(params: Dict[str, np.ndarray], groups: List[SmoothGroup], factors, layouts) -> Dict[str, np.ndarray]:
    """Apply the factors to the weights: W[:, j] *= s_j, and 1/s_j into the fold target.

    Returns a new dict (the caller's arrays are not modified); dtypes are kept.
    """
    out = dict(params)

    def scale(name, vec, axis):
        arr = out[name]
        shape = [1] * arr.ndim
        shape[axis] = -1
        out[name] = (arr.astype(np.float64) * vec.reshape(shape)).astype(arr.dtype)

    for g in groups:
        s = factors.get(g.linears)
        if s is None:
            continue
        for n in g.linears:  # input channels: last axis of [N, K], first of [K, N]
            scale(n, s, 1 if layouts[n] else 0)
        inv = 1.0 / s
        if g.fold == "norm":
            for p in g.fold_params:
                scale(p, inv, 0)
        elif g.fold == "linear":
            w_prev, *bias = g.fold_params  # output channels: rows of [N, K], columns of [K, N]
            scale(w_prev, inv, 0 if g.fold_transposed else 1)
            for b in bias:
                scale(b, inv, 0)
    return out
