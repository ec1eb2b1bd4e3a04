"""A scheme's quantized linear, simulated in numpy (for per-layer errors and the alpha search).

``y_q = Q_a(x * inv_s) @ deq(W_q)^T`` with ``Q_a`` the scheme's activation quantize-dequantize
(as the IR of docs/design.md computes it) and ``W_q`` the scheme's weight params (from
``scheme.quantize_weight``, or the build's own, e.g. AutoRound's), against ``y = x @ W^T`` of the
float linear. Biases are left out of both (they cancel in ``y_q - y``).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import numpy as np

from mlc_quant.schemes import _EPS, INT8_MAX, INT8_MIN, ActQParams, QuantScheme


def quantize_act(scheme: QuantScheme, x: np.ndarray, act: Optional[ActQParams]) -> np.ndarray:
    """Quantize-dequantize activations ``x [M, K]`` (float32) as the scheme's IR does."""
    x = np.asarray(x, dtype=np.float32)
    if scheme.act == "none":
        return x
    if scheme.act == "per_token_sym":
        qmax = np.float32(scheme.a_qmax)
        s = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / qmax, np.float32(_EPS))
        return np.clip(np.round(x / s), -qmax, qmax) * s
    if act is None:
        raise ValueError(f"scheme {scheme.name} needs static activation qparams")
    scale = np.float32(act.scale)
    zp = act.zero_point if scheme.act == "per_tensor_asym" else 0
    q = np.clip(np.round(x / scale) + zp, INT8_MIN, INT8_MAX)
    return (q - zp).astype(np.float32) * scale


def dequantize_weight(scheme: QuantScheme, name: str, params: Mapping[str, np.ndarray], k: int,
                      act: Optional[ActQParams] = None) -> np.ndarray:
    """The float weight ``[N, K]`` that the scheme's params of linear ``name`` stand for.

    Static schemes fold the activation scale into ``<name>.scale`` (s_x * s_w); ``act`` undoes it.
    """
    q = np.asarray(params[f"{name}.q"])
    scale = np.asarray(params[f"{name}.scale"], dtype=np.float64)
    sx = act.scale if (act is not None and scheme.static_activations) else 1.0
    if scheme.weight == "per_tensor_sym":
        return (q.astype(np.float64) * (float(scale) / sx)).astype(np.float32)
    if scheme.weight == "per_channel_sym":
        return (q.astype(np.float64) * (scale.reshape(-1, 1) / sx)).astype(np.float32)
    if scheme.weight == "per_channel_asym":
        zp = np.asarray(params[f"{name}.zp"], dtype=np.float64).reshape(-1, 1)
        return ((q.astype(np.float64) - zp) * (scale.reshape(-1, 1) / sx)).astype(np.float32)
    from mlc_quant.schemes_w4 import W4_WEIGHT_KIND, dequantize_groups_np, group_layout, unpack_int4

    if scheme.weight == W4_WEIGHT_KIND:
        if q.dtype == np.int8:  # the 8-bit LM head: per-channel symmetric, scale [N, 1]
            return (q.astype(np.float32) * scale.reshape(-1, 1).astype(np.float32))
        _, _, p = group_layout(k, scheme.group_size)
        return dequantize_groups_np(unpack_int4(q, p), scale.astype(np.float32),
                                    np.asarray(params[f"{name}.zp"]).astype(np.int32), k)
    raise ValueError(f"scheme {scheme.name}: weight kind {scheme.weight!r} has no numpy dequantizer")


def quantized_weight(scheme: QuantScheme, name: str, w_nk: np.ndarray, act: Optional[ActQParams]) -> np.ndarray:
    """Round-to-nearest quantize-dequantize of ``w [N, K]`` with the scheme's own quantizer."""
    return dequantize_weight(scheme, name, scheme.quantize_weight(name, w_nk, act), w_nk.shape[1], act)


def output_error(scheme: QuantScheme, x: np.ndarray, w_nk: np.ndarray, w_deq: np.ndarray,
                 inv_s: Optional[np.ndarray], act: Optional[ActQParams],
                 out_scale: Optional[np.ndarray] = None) -> Tuple[float, float]:
    """``(||y_q - y||^2, ||y||^2)`` of one linear on rows ``x [M, K]`` (float64 sums).

    ``w_deq`` is the dequantized weight of the *smoothed* linear (``W * s`` quantized), ``inv_s``
    the smoothing's ``1/s`` (None: not smoothed). ``out_scale``: where a later group's ``1/s`` is
    folded into this linear's output rows (SwiGLU's up_proj before down_proj), the reference is
    the smoothed float linear, ``y * out_scale``.
    """
    x = np.asarray(x, dtype=np.float32)
    y = x @ np.asarray(w_nk, dtype=np.float32).T
    if out_scale is not None:
        y = y * np.asarray(out_scale, dtype=np.float32)[None, :]
    xs = x if inv_s is None else x * np.asarray(inv_s, dtype=np.float32)
    yq = quantize_act(scheme, xs, act) @ np.asarray(w_deq, dtype=np.float32).T
    d = (yq - y).astype(np.float64)
    return float(np.sum(d * d)), float(np.sum(y.astype(np.float64) ** 2))


def relative_error(err_ref: Tuple[float, float]) -> float:
    """``||y_q - y|| / ||y||`` from :func:`output_error`'s sums (0 for an all-zero output)."""
    err, ref = err_ref
    return float(np.sqrt(err / ref)) if ref > 0 else float(np.sqrt(err))


def layer_errors(scheme: QuantScheme, captured, float_params: Mapping[str, np.ndarray],
                 layouts: Mapping[str, bool], qparams: Mapping[str, np.ndarray],
                 inv_scales: Mapping[str, np.ndarray], act_qparams: Mapping[str, ActQParams],
                 out_scales: Optional[Mapping[str, np.ndarray]] = None) -> Dict[str, float]:
    """Relative output error of every quantized linear on the captured rows (``mlc_quant.capture``).

    ``out_scales``: per linear, the ``1/s`` folded into its output rows (:func:`fold_out_scales`).
    """
    from mlc_quant.smoothing import linear_weight_nk

    out = {}
    for key, x in captured.rows.items():
        for name in key.split(","):
            if f"{name}.q" not in qparams or name not in float_params:
                continue
            w = linear_weight_nk(np.asarray(float_params[name], dtype=np.float32), layouts.get(name, True))
            act = act_qparams.get(name)
            w_deq = dequantize_weight(scheme, name, qparams, w.shape[1], act)
            out[name] = relative_error(output_error(scheme, x, w, w_deq, inv_scales.get(name), act,
                                                    (out_scales or {}).get(name)))
    return out


def fold_out_scales(groups, inv_scales: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """``{producer linear: 1/s}`` for every smoothing group whose ``1/s`` is folded into the rows of
    the linear that produces its input (``fold == "linear"``)."""
    out = {}
    for g in groups:
        if g.fold == "linear" and g.linears[0] in inv_scales:
            out[g.fold_params[0]] = np.asarray(inv_scales[g.linears[0]])
    return out
