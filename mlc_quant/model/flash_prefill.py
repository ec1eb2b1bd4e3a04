"""TIRPagedKVCache with mlc_quant's tensor-core ragged prefill attention (CUDA builds).

TVM's ``TIRPagedKVCache`` hands ``vm.builtin.paged_attention_kv_cache_create`` a list of attention
functions; the ragged prefill one (self-attention of the new tokens: for a prefill from an empty
cache, all of the attention) is the TIR ``batch_prefill_ragged_kv``, which computes QK^T and PV
with CUDA-core FMAs (~6 TFLOP/s on an H100, 73 % of Llama-2-7B's 2048-token prefill).
:class:`FlashPrefillKVCache` builds the same cache but puts ``("tirx", ExternFunc(
"mlcq_attn_prefill_ragged"))`` in that slot: the runtime (``TIRRaggedPrefillFunc``) calls it with
the TIR kernel's arguments, and it runs mlc_quant/kernels/attention.cu (FlashAttention-2 style,
mma.sync), linked into the exported library with the GEMM kernels
(:func:`mlc_quant.cuda_dispatch.dispatch_gemms` attaches them when the module references it).
The RoPE split (``tir_split_rotary``) and the k/v append to the pages (``kv_cache_transpose_append``)
become mlc_quant's CUDA kernels too where supported (:mod:`mlc_quant.model.fast_rope`,
``MLC_QUANT_ROPE``, ``MLC_QUANT_KV_APPEND``). Every other function (paged prefill, decode, merge,
copies) stays TVM's unless another module swaps it.

Supported: CUDA target, float16, MHA with head_dim 64 or 128, RopeMode.NORMAL (RoPE applied
before attention), any GQA ratio, causal or not. Anything else keeps the TIR kernel.

``MLC_QUANT_PREFILL_ATTENTION`` picks the kernel when the caller does not: ``auto`` (default:
this kernel where supported), ``tir`` (TVM's), ``flash`` (this one; an error where unsupported).
"""
from __future__ import annotations

import os
from typing import Optional

import tvm
from tvm import relax as rx
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from mlc_quant.passes._linear import calls_extern

from .fast_rope import plan_rope, swap_split_rotary

PREFILL_KERNEL = "mlcq_attn_prefill_ragged"
SUPPORTED_HEAD_DIMS = (64, 128)
_TIR_RAGGED = "tir_attention_prefill_ragged"
CHOICES = ("auto", "tir", "flash")


def flash_prefill_supported(target: Target, dtype: str, num_heads: int, num_kv_heads: int, head_dim: int,
                            rope_mode: int = RopeMode.NORMAL) -> Optional[str]:
    """None if the kernel takes this configuration, else why not."""
    if target.kind.name != "cuda":
        return f"target {target.kind.name} (CUDA only)"
    if dtype != "float16":
        return f"dtype {dtype} (float16 only)"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} (supported: {SUPPORTED_HEAD_DIMS})"
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        return f"{num_heads} heads / {num_kv_heads} kv heads"
    if int(rope_mode) == int(RopeMode.INLINE):
        return "inline RoPE"
    return None


def resolve_prefill_attention(choice: Optional[str], target: Target, dtype: str, num_heads: int,
                              num_kv_heads: int, head_dim: int) -> str:
    """``"flash"`` or ``"tir"`` for a model configuration (``choice`` None: the environment's)."""
    choice = (choice or os.environ.get("MLC_QUANT_PREFILL_ATTENTION") or "auto").lower()
    if choice not in CHOICES:
        raise ValueError(f"prefill attention {choice!r}: expected one of {CHOICES}")
    why = flash_prefill_supported(target, dtype, num_heads, num_kv_heads, head_dim)
    if choice == "tir" or (choice == "auto" and why is not None):
        return "tir"
    if why is not None:
        raise ValueError(f"the flash prefill attention kernel does not support {why}")
    return "flash"


def swap_tir_slot(call: rx.Call, tir_name: str, kernel: str, who: str) -> rx.Call:
    """The ``paged_attention_kv_cache_create`` call with its ``("tirx", <tir_name>)`` slot replaced
    by ``("tirx", ExternFunc(kernel))`` (exactly one such slot, else TVM's layout changed)."""
    args, swapped = list(call.args), 0
    for i, a in enumerate(args):
        if (isinstance(a, rx.Tuple) and len(a.fields) == 2 and isinstance(a.fields[1], tvm.ir.GlobalVar)
                and a.fields[1].name_hint == tir_name):
            args[i] = rx.Tuple([tvm.ir.StringImm("tirx"), rx.ExternFunc(kernel)])
            swapped += 1
    if swapped != 1:
        raise RuntimeError(f"{who}: found {swapped} {tir_name} slots (TVM's layout changed?)")
    return rx.Call(call.op, args, call.attrs, call.ty_args)


def _swap_ragged_prefill(call: rx.Call) -> rx.Call:
    """The ``paged_attention_kv_cache_create`` call with the ragged prefill slot replaced."""
    return swap_tir_slot(call, _TIR_RAGGED, PREFILL_KERNEL, "FlashPrefillKVCache")


class _SwapRaggedPrefill(PagedKVCache):  # pylint: disable=too-few-public-methods
    """Sits between TIRPagedKVCache and PagedKVCache in the MRO: receives the create call before
    nn.Object emits it."""

    def __init__(self, *, _expr: rx.Expr, _name: str) -> None:  # pylint: disable=invalid-name
        super().__init__(_expr=swap_split_rotary(_swap_ragged_prefill(_expr), getattr(self, "_rope_plan", None)),
                         _name=_name)


class FlashPrefillKVCache(TIRPagedKVCache, _SwapRaggedPrefill):  # pylint: disable=too-few-public-methods
    """``TIRPagedKVCache`` whose ragged prefill function is ``mlcq_attn_prefill_ragged``."""

    def __init__(self, **kwargs) -> None:
        why = flash_prefill_supported(kwargs["target"], kwargs["dtype"], kwargs["num_attention_heads"],
                                      kwargs["num_key_value_heads"], kwargs["qk_head_dim"], kwargs["rope_mode"])
        if why is None and (kwargs["attn_kind"] != "mha" or kwargs["qk_head_dim"] != kwargs["v_head_dim"]):
            why = "attention kind other than MHA"
        if why is not None:
            raise ValueError(f"FlashPrefillKVCache: unsupported configuration: {why}")
        self._rope_plan = plan_rope(**kwargs)  # the CUDA RoPE kernel too, where supported (fast_rope.py)
        super().__init__(**kwargs)


def uses_flash_prefill(mod: tvm.IRModule) -> bool:
    """Whether a Relax module's KV cache calls ``mlcq_attn_prefill_ragged`` (the library must link it)."""
    return calls_extern(mod, PREFILL_KERNEL)


__all__ = [
    "FlashPrefillKVCache",
    "PREFILL_KERNEL",
    "flash_prefill_supported",
    "resolve_prefill_attention",
    "uses_flash_prefill",
]
