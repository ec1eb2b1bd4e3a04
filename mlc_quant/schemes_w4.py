"""Weight-only int4 schemes: group-wise asymmetric, activations stay float.

``q4f16_rtn`` and ``q4f16_autoround`` store every linear weight ``w [N, K]`` as

* ``<w>.q``     uint8 ``[N, ceil(P / 2)]``: two 4-bit values per byte, column ``2j`` in the low
  nibble and ``2j + 1`` in the high nibble, with ``P = G * g`` the input dimension padded with
  zeros to whole groups (``g`` = group size, ``G = ceil(K / g)`` groups);
* ``<w>.scale`` float32 ``[N, G]``;
* ``<w>.zp``    uint8 ``[N, G]`` (0..15),

and the float weight is ``w[n, k] = scale[n, k // g] * (q[n, k] - zp[n, k // g])``. The linear
dequantizes the weight to the activations' float dtype and runs a float matmul (the activation
is never quantized):

    lo  = q & 15 ; hi = q >> 4 ; qs = interleave(lo, hi)           # [N, P] uint8
    w   = (astype(qs, f32)[N, G, g] - astype(zp, f32)[N, G, 1]) * scale[N, G, 1]
    w   = astype(w[N, P][:, :K], F)
    y   = matmul(x, permute_dims(w))

The LM head (``lm_head_weight``, or ``model_embed_tokens_weight`` used as a tied head) is kept
at ``head_bits`` = 8: int8 per-output-channel symmetric (``<w>.q`` int8 ``[N, K]``, ``<w>.scale``
float32 ``[N, 1]``), dequantized the same way. A tied head's float table stays for the embedding
gather anyway, so a 4-bit head would save nothing there and cost the most accuracy of any single
linear (SmolLM2: RTN W4 on the head alone takes perplexity from 22.7 to 26.5); reference AutoRound
leaves the head unquantized by default, llama.cpp's Q4 mixes keep ``output.weight`` at 6 bits.
``head_bits=4`` treats the head like every other linear.

The two schemes emit the same IR and the same params; they differ in how the integer values
are chosen: round-to-nearest (``quantize_weight``, what the plain API does for both) or AutoRound
(``mlc_quant.autoround``, which the build uses when the scheme's ``rounding`` is ``autoround``
or ``--weight-rounding autoround`` is given). The reference quantizer is
:func:`quantize_groups_np` (numpy); AutoRound's torch quantizer is tested against it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from tvm import relax

from mlc_quant.groupquant import dequantize_groups_np, group_layout, pad_groups, quantize_groups_np  # noqa: F401
from mlc_quant.schemes import SCHEMES, ActQParams, QuantScheme

W4_WEIGHT_KIND = "int4_group_asym"
HEAD_WEIGHTS = ("lm_head_weight", "model_embed_tokens_weight")  # IR names of an (un)tied LM head


# --------------------------------------------------------------------------- numpy reference
# (in mlc_quant.groupquant, numpy only; re-exported here)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """``q [N, P]`` values 0..15 -> uint8 ``[N, ceil(P / 2)]``, even columns in the low nibble."""
    q = np.asarray(q).astype(np.uint8)
    if q.size and (q.max() > 15):
        raise ValueError("pack_int4: values must lie in [0, 15]")
    if q.shape[1] % 2:
        q = np.concatenate([q, np.zeros((q.shape[0], 1), np.uint8)], axis=1)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, p: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`: uint8 ``[N, p]``."""
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    out[:, 0::2] = packed & 15
    out[:, 1::2] = packed >> 4
    return out[:, :p]


# --------------------------------------------------------------------------- the scheme
@dataclass(frozen=True)
class WeightOnlyScheme(QuantScheme):
    """Weight-only ``bits``-bit group-wise asymmetric quantization (act stays float)."""

    bits: int = 4
    group_size: int = 128  # <= 0: per output channel
    rounding: str = "rtn"  # "rtn" | "autoround": the weight quantizer a build uses by default
    head_bits: int = 8  # the LM head: symmetric per-channel at this many bits (== bits: like the rest)

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def is_head(self, name: str) -> bool:
        """Whether linear ``name`` is the LM head, quantized per channel at ``head_bits``."""
        return self.head_bits != self.bits and name in HEAD_WEIGHTS

    @property
    def head_qmax(self) -> int:
        return (1 << (self.head_bits - 1)) - 1

    @property
    def static_activations(self) -> bool:
        return False

    @property
    def stat_kinds(self) -> Tuple[str, ...]:
        return ("absmax",)  # only smoothing would ask for stats; W4 builds do not smooth

    def act_qparams(self, stats, inv_smooth=None) -> None:
        return None

    def weight_param_specs(self, name: str, n: int, k: int) -> List[Tuple[str, Tuple[int, ...], str]]:
        if self.is_head(name):
            return [(f"{name}.q", (n, k), "int8"), (f"{name}.scale", (n, 1), "float32")]
        _, groups, p = group_layout(k, self.group_size)
        return [(f"{name}.q", (n, (p + 1) // 2), "uint8"), (f"{name}.scale", (n, groups), "float32"),
                (f"{name}.zp", (n, groups), "uint8")]

    def quantize_groups(self, w: np.ndarray, **learned):
        """(q [N, P], scale [N, G], zp [N, G]) of ``w [N, K]``; ``learned``: AutoRound's
        ``v`` / ``min_scale`` / ``max_scale`` (round-to-nearest without them)."""
        return quantize_groups_np(w, 0, self.qmax, self.group_size, sym=False, **learned)

    def pack(self, name: str, q: np.ndarray, scale: np.ndarray, zp: np.ndarray) -> Dict[str, np.ndarray]:
        """The params of weight ``name`` from integer values, scales and zero points."""
        return {f"{name}.q": pack_int4(q), f"{name}.scale": np.asarray(scale, np.float32),
                f"{name}.zp": np.asarray(zp).astype(np.uint8)}

    def quantize_weight(self, name: str, w: np.ndarray, act: Optional[ActQParams]) -> Dict[str, np.ndarray]:
        """Round-to-nearest (AutoRound replaces this through the pipeline's weight quantizer)."""
        w = np.asarray(w, np.float32)
        if self.is_head(name):
            q, scale, _ = quantize_groups_np(w, -self.head_qmax, self.head_qmax, -1, sym=True)
            return {f"{name}.q": q.astype(np.int8), f"{name}.scale": scale}
        return self.pack(name, *self.quantize_groups(w))

    def emit_linear(self, bb: relax.BlockBuilder, x: relax.Expr, wparams: Dict[str, relax.Expr],
                    name: str, act: Optional[ActQParams]) -> relax.Expr:
        op = relax.op
        dtype = str(x.ty.dtype)
        k = int(x.ty.shape[-1])
        if self.is_head(name):
            w = op.multiply(op.astype(wparams[f"{name}.q"], "float32"), wparams[f"{name}.scale"])
            w = bb.emit(w if dtype == "float32" else op.astype(w, dtype), name_hint=f"{name}_dq".replace(".", "_"))
            return op.matmul(x, op.permute_dims(w))
        g, groups, p = group_layout(k, self.group_size)
        packed = wparams[f"{name}.q"]
        n = int(packed.ty.shape[0])
        kb = int(packed.ty.shape[1])
        lo = op.expand_dims(op.bitwise_and(packed, relax.const(15, "uint8")), -1)
        hi = op.expand_dims(op.right_shift(packed, relax.const(4, "uint8")), -1)
        qs = op.reshape(op.concat([lo, hi], axis=-1), (n, 2 * kb))
        if 2 * kb != p:
            qs = op.strided_slice(qs, axes=[1], begin=[0], end=[p])
        qf = op.reshape(op.astype(qs, "float32"), (n, groups, g))
        zp = op.expand_dims(op.astype(wparams[f"{name}.zp"], "float32"), -1)
        w = op.multiply(op.subtract(qf, zp), op.expand_dims(wparams[f"{name}.scale"], -1))
        w = op.reshape(w, (n, p))
        if p != k:
            w = op.strided_slice(w, axes=[1], begin=[0], end=[k])
        if dtype != "float32":
            w = op.astype(w, dtype)
        w = bb.emit(w, name_hint=f"{name}_dq".replace(".", "_"))
        return op.matmul(x, op.permute_dims(w))


W4_SCHEMES = [
    WeightOnlyScheme("q4f16_rtn", "none", W4_WEIGHT_KIND,
                     "W4 weight-only: int4 group-128 asymmetric weights (LM head int8), round-to-nearest; float activations",
                     bits=4, group_size=128, rounding="rtn"),
    WeightOnlyScheme("q4f16_autoround", "none", W4_WEIGHT_KIND,
                     "W4 weight-only: int4 group-128 asymmetric weights (LM head int8) rounded by AutoRound "
                     "(SignSGD); float activations", bits=4, group_size=128, rounding="autoround"),
    # Per-output-channel twins (one group per row): the honest check on SmolLM2, whose GGUF
    # weights were 4-bit with group 32 once.
    WeightOnlyScheme("q4f16_rtn_pc", "none", W4_WEIGHT_KIND,
                     "W4 weight-only: int4 per-channel asymmetric weights (LM head int8), round-to-nearest; float activations",
                     bits=4, group_size=-1, rounding="rtn"),
    WeightOnlyScheme("q4f16_autoround_pc", "none", W4_WEIGHT_KIND,
                     "W4 weight-only: int4 per-channel asymmetric weights (LM head int8) rounded by AutoRound; "
                     "float activations",
                     bits=4, group_size=-1, rounding="autoround"),
]

for _s in W4_SCHEMES:
    SCHEMES.setdefault(_s.name, _s)
