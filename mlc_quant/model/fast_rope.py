"""mlc_quant's CUDA RoPE kernel in the paged KV cache (CUDA fp16 builds).

``PagedAttentionKVCacheObj::AttentionWithFusedQKV`` splits the fused qkv ``[seq, Hq + 2 Hkv, D]``
into rotated q, rotated k and v with the function in the ``f_split_rotary`` slot of
``vm.builtin.paged_attention_kv_cache_create``: TVM's TIR ``fused_rope`` (``tir_split_rotary``,
``llama_rope_with_position_map``), which the default CUDA schedule runs one element per thread,
with a ``powf`` + ``sinf`` + ``cosf`` per element (~1 TB/s on an H200, issue #5). The runtime calls
it as ``f(qkv, position_map, q, k, v, apply_rope)``; theta and scale are baked into the TIR
function, so the slot gets ``mlcq_rope_make(theta, scale, Hq, Hkv, D)`` instead: a call, run once
when the cache is created, that returns the kernel of mlc_quant/kernels/rope.cu as a closure with
that signature (16-byte loads/stores, cos/sin once per token and frequency, the TIR kernel's fp32
formula). The kernels library is linked into the model library with the flash prefill kernel
(:class:`mlc_quant.model.flash_prefill.FlashPrefillKVCache` applies this swap, so it rides on the
flash prefill attention: ``MLC_QUANT_PREFILL_ATTENTION=tir`` also gives TVM's RoPE back).

Supported: CUDA target, float16, head_dim 64 or 128, rotary_dim == head_dim, the default RoPE
(``rope_scaling`` without ``rope_type``; llama3/yarn/longrope/gptj keep the TIR function), MHA.

``MLC_QUANT_ROPE`` picks the kernel when the caller does not: ``auto`` (default: this kernel where
supported), ``tir`` (TVM's), ``cuda`` (this one; an error where unsupported).

The next step of ``AttentionWithFusedQKV``, the append of k/v to the pages (``f_transpose_append``,
TVM's TIR ``tir_kv_cache_transpose_append``, one element per thread), goes with it to
``mlcq_kv_transpose_append`` (rope.cu, same signature: an ``ExternFunc`` in the slot; 16-byte
copies); ``MLC_QUANT_KV_APPEND=tir`` keeps TVM's append alone.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import tvm
from tvm import relax as rx
from tvm.target import Target

from mlc_quant.passes._linear import calls_extern

ROPE_MAKE = "mlcq_rope_make"
KV_APPEND = "mlcq_kv_transpose_append"
SUPPORTED_HEAD_DIMS = (64, 128)
_TIR_SPLIT_ROTARY = "tir_split_rotary"
_TIR_KV_APPEND = ("kv_cache_transpose_append", "tir_kv_cache_transpose_append")
CHOICES = ("auto", "tir", "cuda")


@dataclass(frozen=True)
class RopePlan:
    """What ``mlcq_rope_make`` is called with."""

    theta: float
    scale: float
    num_heads: int
    num_kv_heads: int
    head_dim: int
    kv_append: bool = True  # also swap kv_cache_transpose_append for mlcq_kv_transpose_append


def fast_rope_supported(target: Target, dtype: str, num_heads: int, num_kv_heads: int, head_dim: int,
                        rope_scaling: Optional[Mapping[str, Any]] = None, rotary_dim: Optional[int] = None,
                        attn_kind: Any = "mha") -> Optional[str]:
    """None if the CUDA RoPE kernel takes this configuration, else why not."""
    if target.kind.name != "cuda":
        return f"target {target.kind.name} (CUDA only)"
    if dtype != "float16":
        return f"dtype {dtype} (float16 only)"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} (supported: {SUPPORTED_HEAD_DIMS})"
    if rotary_dim is not None and rotary_dim != head_dim:
        return f"rotary_dim {rotary_dim} != head_dim {head_dim}"
    if num_kv_heads < 1 or num_heads < 1:
        return f"{num_heads} heads / {num_kv_heads} kv heads"
    if rope_scaling and "rope_type" in rope_scaling:
        return f"RoPE scaling {rope_scaling['rope_type']!r} (default RoPE only)"
    kinds = attn_kind if isinstance(attn_kind, (list, tuple)) else [attn_kind]
    if any(k not in ("mha", "mha_sliding") for k in kinds):
        return f"attention kind {attn_kind}"
    return None


def plan_rope(choice: Optional[str] = None, **kv_cache_kwargs) -> Optional[RopePlan]:
    """The swap for a ``TIRPagedKVCache(**kwargs)`` configuration, or None (keep TVM's function).

    ``choice`` None: ``$MLC_QUANT_ROPE`` (default ``auto``)."""
    choice = (choice or os.environ.get("MLC_QUANT_ROPE") or "auto").lower()
    if choice not in CHOICES:
        raise ValueError(f"RoPE kernel {choice!r}: expected one of {CHOICES}")
    if choice == "tir":
        return None
    kw = kv_cache_kwargs
    target = kw["target"] if isinstance(kw["target"], Target) else Target(kw["target"])
    why = fast_rope_supported(target, kw["dtype"], kw["num_attention_heads"], kw["num_key_value_heads"],
                              kw["qk_head_dim"], kw.get("rope_scaling"), kw.get("rotary_dim"), kw.get("attn_kind", "mha"))
    if why is not None:
        if choice == "cuda":
            raise ValueError(f"the CUDA RoPE kernel does not support {why}")
        return None
    append = (os.environ.get("MLC_QUANT_KV_APPEND") or "cuda").lower()
    if append not in ("cuda", "tir"):
        raise ValueError(f"MLC_QUANT_KV_APPEND={append!r}: expected cuda or tir")
    return RopePlan(float(kw["rope_theta"]), float(kw["rope_scale"]), int(kw["num_attention_heads"]),
                    int(kw["num_key_value_heads"]), int(kw["qk_head_dim"]), append == "cuda")


def swap_split_rotary(call: rx.Call, plan: Optional[RopePlan]) -> rx.Call:
    """The ``paged_attention_kv_cache_create`` call with ``tir_split_rotary`` replaced by
    ``mlcq_rope_make(...)`` and (``plan.kv_append``) ``kv_cache_transpose_append`` by
    ``mlcq_kv_transpose_append`` (unchanged if ``plan`` is None)."""
    if plan is None:
        return call
    args, swapped, appends = list(call.args), 0, 0
    for i, a in enumerate(args):
        if isinstance(a, tvm.ir.GlobalVar) and a.name_hint == _TIR_SPLIT_ROTARY:
            args[i] = rx.call_pure_packed(
                ROPE_MAKE, rx.prim_value(plan.theta), rx.prim_value(plan.scale), rx.prim_value(plan.num_heads),
                rx.prim_value(plan.num_kv_heads), rx.prim_value(plan.head_dim), ty_args=rx.AnyType())
            swapped += 1
        elif plan.kv_append and isinstance(a, tvm.ir.GlobalVar) and a.name_hint in _TIR_KV_APPEND:
            args[i] = rx.ExternFunc(KV_APPEND)
            appends += 1
    if swapped != 1 or appends != int(plan.kv_append):
        raise RuntimeError(f"fast RoPE: found {swapped} {_TIR_SPLIT_ROTARY} and {appends} {_TIR_KV_APPEND[0]} "
                           "arguments (TVM's layout changed?)")
    return rx.Call(call.op, args, call.attrs, call.ty_args)


def uses_fast_rope(mod: tvm.IRModule, symbol: str = ROPE_MAKE) -> bool:
    """Whether a Relax module calls ``mlcq_rope_make`` (or ``symbol``, e.g. ``KV_APPEND``): the
    library must link the kernels."""
    return calls_extern(mod, symbol)


__all__ = ["KV_APPEND", "ROPE_MAKE", "RopePlan", "fast_rope_supported", "plan_rope", "swap_split_rotary", "uses_fast_rope"]
