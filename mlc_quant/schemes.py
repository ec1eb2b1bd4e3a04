"""Quantization schemes: one registry maps a scheme name to a small config dataclass.

Each scheme knows (a) how to turn calibration statistics into activation quantization
parameters, (b) how to quantize a weight in numpy (the params transform), and (c) how to emit
the quantized linear in Relax (used by the QuantizeLinear pass). The emitted IR is the contract
that the CUDA dispatch patterns match (docs/design.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from tvm import relax

# Smallest scale we ever emit: an all-zero channel or tensor must give a finite, harmless scale.
_EPS = 1e-8
INT8_MIN, INT8_MAX = -128, 127

ACT_KINDS = ("none", "per_tensor_sym", "per_tensor_asym", "per_token_sym")
WEIGHT_KINDS = ("none", "per_tensor_sym", "per_channel_sym", "per_channel_asym")
# How a weight's quantization range is chosen: ``absmax`` = the full range (max |w|, or min/max
# for asym); ``mse`` = the range shrunk by the clip ratio that minimizes the weight's squared
# reconstruction error, per output channel (per tensor for per_tensor_sym): the grid search of
# GPTQ's ``find_params(mse=True)`` / QuaRot's ``--w_clip``.
WEIGHT_CLIPS = ("absmax", "mse")
# Clip ratios the ``mse`` search tries: 1.00, 0.99, ..., 0.50 (1.00 first: absmax wins ties).
CLIP_GRID: Tuple[float, ...] = tuple(round(1.0 - 0.01 * i, 2) for i in range(51))


def check_weight_clip(clip: str) -> str:
    if clip not in WEIGHT_CLIPS:
        raise ValueError(f"unknown weight clip {clip!r}; valid: {', '.join(WEIGHT_CLIPS)}")
    return clip


def _fake_quant_rows(w: np.ndarray, lo: np.ndarray, hi: np.ndarray, sym: bool, qmax: int) -> np.ndarray:
    """Quantize-dequantize the rows of ``w [N, K]`` (float32) with ranges ``[lo, hi]`` per row, as
    ``QuantScheme.quantize_weight`` rounds them (sym: ``+-qmax``; asym: int8 with a zero point)."""
    if sym:  # the float32 arithmetic of per_channel_sym (per_tensor_sym agrees to an ulp of s)
        s = (np.maximum(hi.astype(np.float32), np.float32(_EPS)) / np.float32(qmax))[:, None]
        return np.clip(np.round(w / s), -qmax, qmax) * s
    s64 = np.maximum(hi - lo, _EPS) / (INT8_MAX - INT8_MIN)
    z = np.clip(np.round(INT8_MIN - lo / s64), INT8_MIN, INT8_MAX)[:, None].astype(np.float32)
    s = s64.astype(np.float32)[:, None]
    return (np.clip(np.round(w / s) + z, INT8_MIN, INT8_MAX) - z) * s


def mse_clip_ratios(w: np.ndarray, sym: bool = True, qmax: int = INT8_MAX, per_channel: bool = True,
                    grid: Tuple[float, ...] = CLIP_GRID, block: int = 4096) -> np.ndarray:
    """Per output channel (or one for the tensor), the clip ratio ``r`` in ``grid`` whose range
    (``r * max|w|``; asym: ``r * min``, ``r * max``) gives the smallest ``||Q(w) - w||^2``.

    ``w [N, K]``; returns ``[N]`` ratios (``[1]`` when not per channel). The first grid value wins
    ties, so with 1.0 first the result is never worse than absmax. Rows in blocks of ``block``
    (a 49152-row head stays small). All-zero rows get ratio 1 (their scale stays finite).
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"mse_clip_ratios: expected a [N, K] weight, got shape {w.shape}")
    if not grid or any(not 0.0 < r <= 1.0 for r in grid):
        raise ValueError(f"mse_clip_ratios: clip ratios must be in (0, 1], got {grid}")
    rows = [w] if not per_channel else [w[i:i + block] for i in range(0, w.shape[0], block)]
    out = []
    for wb in rows:
        flat = wb.reshape(1, -1) if not per_channel else wb
        lo = np.minimum(flat.min(axis=1), 0.0).astype(np.float64)
        hi = np.maximum(flat.max(axis=1), 0.0).astype(np.float64)
        if sym:
            hi = np.abs(flat).max(axis=1).astype(np.float64)
        best = np.full(flat.shape[0], np.inf)
        ratio = np.ones(flat.shape[0])
        for r in grid:
            d = _fake_quant_rows(flat, lo * r, hi * r, sym, qmax) - flat
            err = np.einsum("nk,nk->n", d, d, dtype=np.float64)
            better = err < best
            best[better], ratio[better] = err[better], r
        out.append(ratio)
    return np.concatenate(out)


@dataclass(frozen=True)
class ActQParams:
    """Static activation quantization parameters of one linear (per-tensor)."""

    scale: float
    zero_point: int = 0


@dataclass(frozen=True)
class QuantScheme:
    """A W8A8 (or float) scheme: how activations and weights are quantized."""

    name: str
    act: str
    weight: str
    description: str
    # Symmetric integer ranges +-(2^(bits-1) - 1): weights (per_tensor_sym / per_channel_sym) and
    # per-token activations; 4-bit values live in int8 containers (exact int8 GEMM, int32 accumulate).
    w_bits: int = 8
    a_bits: int = 8

    # ---- properties -------------------------------------------------------------------------
    @property
    def quantizes(self) -> bool:
        return self.weight != "none"

    @property
    def w_qmax(self) -> int:
        return 2 ** (self.w_bits - 1) - 1

    @property
    def a_qmax(self) -> int:
        return 2 ** (self.a_bits - 1) - 1

    @property
    def static_activations(self) -> bool:
        return self.act in ("per_tensor_sym", "per_tensor_asym")

    @property
    def stat_kinds(self) -> Tuple[str, ...]:
        """Statistics calibration must collect (smoothing always needs absmax)."""
        return ("absmax", "min", "max") if self.act == "per_tensor_asym" else ("absmax",)

    # ---- activations ------------------------------------------------------------------------
    def act_qparams(self, stats: Dict[str, np.ndarray], inv_smooth: Optional[np.ndarray] = None) -> Optional[ActQParams]:
        """Per-tensor activation scale (and zero point) from per-channel stats of one linear.

        ``inv_smooth`` is 1/s of the smoothing applied to this input (x' = x / s), so the stats
        of the smoothed activation follow without a second calibration pass.
        """
        if not self.static_activations:
            return None
        f = np.ones_like(stats["absmax"]) if inv_smooth is None else inv_smooth.astype(np.float64)
        if self.act == "per_tensor_sym":
            amax = float(np.max(stats["absmax"].astype(np.float64) * f))
            return ActQParams(max(amax, _EPS) / INT8_MAX)
        lo = min(float(np.min(stats["min"].astype(np.float64) * f)), 0.0)
        hi = max(float(np.max(stats["max"].astype(np.float64) * f)), 0.0)
        scale = max(hi - lo, _EPS) / (INT8_MAX - INT8_MIN)
        zp = int(np.clip(np.round(INT8_MIN - lo / scale), INT8_MIN, INT8_MAX))
        return ActQParams(scale, zp)

    # ---- weights ----------------------------------------------------------------------------
    def weight_param_specs(self, name: str, n: int, k: int) -> List[Tuple[str, Tuple[int, ...], str]]:
        """Names, shapes and dtypes of the params that replace weight ``name`` ([n, k])."""
        if self.weight == "per_tensor_sym":
            return [(f"{name}.q", (n, k), "int8"), (f"{name}.scale", (), "float32")]
        specs = [(f"{name}.q", (n, k), "int8"), (f"{name}.scale", (n,), "float32")]
        if self.weight == "per_channel_asym":
            # zero point and the precomputed int32 correction c = z_x*colsum(wq) - K*z_x*z_w
            specs += [(f"{name}.zp", (n,), "int32"), (f"{name}.corr", (n,), "int32")]
        return specs

    def quantize_weight(self, name: str, w: np.ndarray, act: Optional[ActQParams],
                        clip: str = "absmax") -> Dict[str, np.ndarray]:
        """Quantize one weight ``w`` ([n, k], nn.Linear layout) into the params of its specs.

        The dequantize scale folds the activation scale in (s_x * s_w) for static schemes, so the
        int32 accumulator needs one multiply. ``clip``: ``absmax`` (the full range) or ``mse``
        (the range shrunk by :func:`mse_clip_ratios`; values beyond it saturate).
        """
        check_weight_clip(clip)
        w = np.asarray(w, dtype=np.float32)
        sx = act.scale if act is not None else 1.0
        qmax = self.w_qmax
        if self.weight == "per_tensor_sym":
            sw = max(float(np.max(np.abs(w))), _EPS) / qmax
            if clip == "mse":  # in the search's float32 arithmetic
                r = float(mse_clip_ratios(w.reshape(1, -1) if w.ndim != 2 else w, True, qmax, per_channel=False)[0])
                amax = np.float32(float(np.max(np.abs(w))) * r)
                sw = float(np.maximum(amax, np.float32(_EPS)) / np.float32(qmax))
            wq = np.clip(np.round(w / np.float32(sw)), -qmax, qmax).astype(np.int8)
            return {f"{name}.q": wq, f"{name}.scale": np.array(sw * sx, dtype=np.float32)}
        r = mse_clip_ratios(w, self.weight == "per_channel_sym", qmax) if clip == "mse" else None
        if self.weight == "per_channel_sym":
            amax = np.max(np.abs(w), axis=1)
            if r is not None:
                amax = (amax.astype(np.float64) * r).astype(np.float32)
            sw = np.maximum(amax, _EPS) / qmax
            wq = np.clip(np.round(w / sw[:, None].astype(np.float32)), -qmax, qmax).astype(np.int8)
            return {f"{name}.q": wq, f"{name}.scale": (sw * sx).astype(np.float32)}
        assert self.weight == "per_channel_asym", self.weight
        lo = np.minimum(w.min(axis=1), 0.0).astype(np.float64) * (1.0 if r is None else r)
        hi = np.maximum(w.max(axis=1), 0.0).astype(np.float64) * (1.0 if r is None else r)
        sw = np.maximum(hi - lo, _EPS) / (INT8_MAX - INT8_MIN)
        zw = np.clip(np.round(INT8_MIN - lo / sw), INT8_MIN, INT8_MAX).astype(np.int64)
        wq = np.clip(np.round(w / sw[:, None].astype(np.float32)) + zw[:, None], INT8_MIN, INT8_MAX).astype(np.int8)
        zx = act.zero_point if act is not None else 0
        k = w.shape[1]
        corr = zx * wq.astype(np.int64).sum(axis=1) - k * zx * zw
        return {
            f"{name}.q": wq,
            f"{name}.scale": (sw * sx).astype(np.float32),
            f"{name}.zp": zw.astype(np.int32),
            f"{name}.corr": corr.astype(np.int32),
        }

    # ---- IR ---------------------------------------------------------------------------------
    def emit_token_amax(self, bb: relax.BlockBuilder, xf: relax.Expr, name: str) -> relax.Expr:
        """Per-token max |x| of a per-token scheme's input (sharding reduces it across shards)."""
        return bb.emit(relax.op.max(relax.op.abs(xf), axis=[-1], keepdims=True))

    def emit_linear(self, bb: relax.BlockBuilder, x: relax.Expr, wparams: Dict[str, relax.Expr],
                    name: str, act: Optional[ActQParams]) -> relax.Expr:
        """The quantized replacement of ``matmul(x, W^T)`` (see docs/design.md).

        Intermediate values are emitted into ``bb``; the final expression is returned unbound so
        the caller can bind it to the original var (keeping names and dataflow scoping).
        """
        op = relax.op
        dtype = str(x.ty.dtype)
        wq_t = bb.emit(op.permute_dims(wparams[f"{name}.q"]))
        if self.act == "per_token_sym":
            xf = x if dtype == "float32" else bb.emit(op.astype(x, "float32"))
            amax = self.emit_token_amax(bb, xf, name)
            s = bb.emit(op.maximum(op.divide(amax, relax.const(float(self.a_qmax), "float32")),
                                   relax.const(_EPS, "float32")))
            xq = bb.emit(op.astype(op.clip(op.round(op.divide(xf, s)), -self.a_qmax, self.a_qmax), "int8"))
            acc = bb.emit(op.matmul(xq, wq_t, out_dtype="int32"))
            y = op.multiply(op.multiply(op.astype(acc, "float32"), s), wparams[f"{name}.scale"])
            return y if dtype == "float32" else op.astype(bb.emit(y), dtype)
        zx = act.zero_point if self.act == "per_tensor_asym" else 0
        xq = bb.emit(op.quantize(x, relax.const(act.scale, "float32"), relax.const(zx, "int8"),
                                 axis=-1, out_dtype="int8"))
        acc = bb.emit(op.matmul(xq, wq_t, out_dtype="int32"))
        if self.weight == "per_channel_asym":
            rs = bb.emit(op.sum(op.astype(xq, "int32"), axis=[-1], keepdims=True))
            acc = bb.emit(op.subtract(op.subtract(acc, op.multiply(rs, wparams[f"{name}.zp"])),
                                      wparams[f"{name}.corr"]))
        return op.dequantize(acc, wparams[f"{name}.scale"], relax.const(0, "int32"),
                             axis=-1, out_dtype=dtype)


SCHEMES: Dict[str, QuantScheme] = {
    s.name: s
    for s in [
        QuantScheme("q0f32", "none", "none", "no quantization (float32 baseline)"),
        QuantScheme("q0f16", "none", "none", "no quantization (float16 baseline on CUDA)"),
        QuantScheme("smq_q8i8f16_0", "per_tensor_sym", "per_tensor_sym",
                    "W8A8: int8 per-tensor symmetric static activations, int8 per-tensor symmetric weights"),
        QuantScheme("smq_q8i8f16_1", "per_tensor_sym", "per_channel_sym",
                    "W8A8: int8 per-tensor symmetric static activations, int8 per-channel symmetric weights"),
        QuantScheme("smq_q8i8f16_2", "per_tensor_asym", "per_channel_asym",
                    "W8A8: int8 per-tensor asymmetric static activations, int8 per-channel asymmetric weights"),
        QuantScheme("smq_q8i8f16_3", "per_token_sym", "per_channel_sym",
                    "W8A8: int8 per-token dynamic symmetric activations, int8 per-channel symmetric weights"),
        # W4A8 / W4A4 (for rotated models, docs/rotation.md): int4 values in int8 containers, so the
        # int8 GEMM is exact; on CPU this is fake-quant in effect (no int4 arithmetic or packing).
        QuantScheme("q4i8f16_pt", "per_token_sym", "per_channel_sym",
                    "W4A8: int8 per-token dynamic symmetric activations, int4 per-channel symmetric RTN weights",
                    w_bits=4),
        QuantScheme("q4i4f16_pt", "per_token_sym", "per_channel_sym",
                    "W4A4: int4 per-token dynamic symmetric activations, int4 per-channel symmetric RTN weights",
                    w_bits=4, a_bits=4),
    ]
}


def get_scheme(name: str) -> QuantScheme:
    """The scheme registered as ``name``; a clear error listing the valid names otherwise."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown quantization scheme {name!r}; valid schemes: {', '.join(SCHEMES)}") from None
from mlc_quant import schemes_w4  # noqa: E402,F401  (registers q4f16_*)
