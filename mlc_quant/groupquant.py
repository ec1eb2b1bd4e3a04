"""Group-wise integer quantization in numpy: the reference quantizer of the W4 schemes and AutoRound.

numpy only (no TVM), so AutoRound's tuning (``mlc_quant.autoround``) runs on a machine that has
torch but only TVM's runtime (scripts/autoround_gpu.py on the GPU box).
``mlc_quant.schemes_w4`` re-exports these functions.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np

_EPS = 1e-8  # the same floor as mlc_quant.schemes._EPS (python/tests/test_autoround.py checks it)
INT8_MAX = 127  # mlc_quant.schemes.INT8_MAX


def group_layout(k: int, group_size: int) -> Tuple[int, int, int]:
    """(g, G, P): group size, number of groups, padded length for ``k`` input channels.

    ``group_size <= 0`` means one group per output channel (per-channel)."""
    g = k if group_size <= 0 else int(group_size)
    groups = math.ceil(k / g)
    return g, groups, groups * g


def pad_groups(w: np.ndarray, group_size: int) -> np.ndarray:
    """``w [N, K]`` -> ``[N, G, g]``, zero-padded (zeros never move a group's min/max: both are
    clamped to include 0)."""
    n, k = w.shape
    g, groups, p = group_layout(k, group_size)
    if p != k:
        w = np.concatenate([w, np.zeros((n, p - k), dtype=w.dtype)], axis=1)
    return w.reshape(n, groups, g)


def quantize_groups_np(w: np.ndarray, qmin: int, qmax: int, group_size: int, sym: bool = False,
                       v: Optional[np.ndarray] = None, min_scale: Optional[np.ndarray] = None,
                       max_scale: Optional[np.ndarray] = None):
    """Reference (numpy) group-wise quantizer, with AutoRound's learnable parameters.

    ``w [N, K]`` float32. ``v [N, G, g]`` is the rounding offset added before rounding,
    ``min_scale`` / ``max_scale [N, G]`` shrink the group's min and max (clipping). With
    ``v = 0`` and scales 1 this is round-to-nearest, identical to the int8 schemes of
    ``mlc_quant.schemes`` for per-channel groups.

    Asymmetric (``sym=False``):  lo = min(w, 0) * min_scale, hi = max(w, 0) * max_scale,
    s = max(hi - lo, eps) / (qmax - qmin)  (float64), zp = clip(round(qmin - lo / s), qmin, qmax),
    q = clip(round(w / s + v) + zp, qmin, qmax).
    Symmetric (``sym=True``, qmin = -qmax):  s = max(max(|lo|, hi), eps) / qmax  (float32),
    zp = 0, q = clip(round(w / s + v), -qmax, qmax).

    Returns ``(q [N, P] int32, scale [N, G] float32, zp [N, G] int32)``; dequantized:
    ``scale * (q - zp)`` per group.
    """
    w = np.asarray(w, dtype=np.float32)
    wg = pad_groups(w, group_size)  # [N, G, g]
    n, groups, g = wg.shape
    mn = np.ones((n, groups), np.float32) if min_scale is None else np.asarray(min_scale, np.float32)
    mx = np.ones((n, groups), np.float32) if max_scale is None else np.asarray(max_scale, np.float32)
    lo = np.minimum(wg.min(axis=2), 0.0).astype(np.float32) * mn
    hi = np.maximum(wg.max(axis=2), 0.0).astype(np.float32) * mx
    if v is not None:
        v = np.asarray(v, np.float32).reshape(n, groups, g)
    if sym:
        amax = np.maximum(np.abs(lo), hi)
        s32 = (np.maximum(amax, np.float32(_EPS)) / np.float32(qmax)).astype(np.float32)
        x = wg / s32[:, :, None] if v is None else wg / s32[:, :, None] + v
        q = np.clip(np.round(x), -qmax, qmax)
        zp = np.zeros((n, groups), np.int32)
    else:
        s64 = np.maximum(hi.astype(np.float64) - lo.astype(np.float64), _EPS) / (qmax - qmin)
        s32 = s64.astype(np.float32)
        zp = np.clip(np.round(qmin - lo.astype(np.float64) / s64), qmin, qmax)
        x = wg / s32[:, :, None] if v is None else wg / s32[:, :, None] + v
        q = np.clip(np.round(x) + zp[:, :, None], qmin, qmax)
        zp = zp.astype(np.int32)
    return q.reshape(n, groups * g).astype(np.int32), s32, zp


def dequantize_groups_np(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, k: int) -> np.ndarray:
    """``scale * (q - zp)`` per group, cut back to ``k`` columns (float32, as the IR computes it)."""
    n, groups = scale.shape
    qg = q.reshape(n, groups, -1).astype(np.float32)
    w = (qg - zp.astype(np.float32)[:, :, None]) * scale[:, :, None]
    return w.reshape(n, -1)[:, :k]
