"""mlc_quant's paged decode attention kernel in the KV cache (CUDA fp16 builds).

TVM's ``TIRPagedKVCache`` hands ``vm.builtin.paged_attention_kv_cache_create`` a list of attention
functions; the decode one (``tir_attention_decode``, the TIR ``batch_decode_paged_kv`` of
``tvm/relax/frontend/nn/llm/_decode_kernels.py``) runs one CTA per (sequence, kv head) over the
whole context: ~10 us per layer of a Llama-2-7B decode step at a 130-200 token context on an H200
(issue #5), latency-bound. The runtime (``TIRPagedDecodeFunc::MHA``) calls the slot's function as
``f(q, pages, page_indptr, page_values, length_info, k_rope_pos_offset, q_rope_position, output,
lse, rotary_mode, rope_scale, rope_theta, sm_scale)``. :func:`with_fast_decode` gives a cache class
that puts ``("tirx", ExternFunc("mlcq_attn_decode_paged"))`` in that slot:
mlc_quant/kernels/decode_attention.cu (split-K over the context, 16-byte loads, fp32 online
softmax, the splits merged by the last CTA in the same launch; CUDA-graph safe), linked into the
model library with the other kernels.

Supported: CUDA target, float16, MHA with head_dim 64 or 128, 1 to 8 query heads per kv head,
RopeMode.NORMAL or NONE (q and the cached K already rotated: the RoPE arguments are unused).
The sliding-window decode slot, MLA and everything else keep TVM's functions.

The swap rides on :class:`mlc_quant.model.flash_prefill.FlashPrefillKVCache` (like the RoPE swap):
the kernels library is attached to the model library when the module calls the flash prefill
kernel, so ``MLC_QUANT_PREFILL_ATTENTION=tir`` also gives TVM's decode back.

``MLC_QUANT_DECODE_ATTENTION`` picks the kernel when the caller does not: ``auto`` (default: this
kernel where supported), ``tir`` (TVM's), ``fast`` (this one; an error where unsupported).
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import tvm
from tvm import relax as rx
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode
from tvm.target import Target

from mlc_quant.model.flash_prefill import swap_tir_slot
from mlc_quant.passes._linear import calls_extern

DECODE_KERNEL = "mlcq_attn_decode_paged"
SUPPORTED_HEAD_DIMS = (64, 128)
MAX_GROUP = 8
_TIR_DECODE = "tir_attention_decode"
CHOICES = ("auto", "tir", "fast")


def fast_decode_supported(target, dtype: str, num_heads: int, num_kv_heads: int, head_dim: int,
                          rope_mode: int = RopeMode.NORMAL, attn_kind="mha") -> Optional[str]:
    """None if the kernel takes this configuration, else why not."""
    target = target if isinstance(target, Target) else Target(target)
    if target.kind.name != "cuda":
        return f"target {target.kind.name} (CUDA only)"
    if dtype != "float16":
        return f"dtype {dtype} (float16 only)"
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {head_dim} (supported: {SUPPORTED_HEAD_DIMS})"
    if num_kv_heads < 1 or num_heads % num_kv_heads or num_heads // num_kv_heads > MAX_GROUP:
        return f"{num_heads} heads / {num_kv_heads} kv heads (1..{MAX_GROUP} query heads per kv head)"
    if int(rope_mode) == int(RopeMode.INLINE):
        return "inline RoPE"
    kinds = attn_kind if isinstance(attn_kind, (list, tuple)) else [attn_kind]
    if any(k != "mha" for k in kinds):
        return f"attention kind {attn_kind}"
    return None


def plan_decode(choice: Optional[str] = None, **kw) -> bool:
    """Whether a ``TIRPagedKVCache(**kw)`` configuration gets the CUDA decode kernel.

    ``choice`` None: ``$MLC_QUANT_DECODE_ATTENTION`` (default ``auto``)."""
    choice = (choice or os.environ.get("MLC_QUANT_DECODE_ATTENTION") or "auto").lower()
    if choice not in CHOICES:
        raise ValueError(f"decode attention {choice!r}: expected one of {CHOICES}")
    if choice == "tir":
        return False
    if kw.get("qk_head_dim") != kw.get("v_head_dim"):
        why = "qk_head_dim != v_head_dim"
    else:
        why = fast_decode_supported(kw["target"], kw["dtype"], kw["num_attention_heads"], kw["num_key_value_heads"],
                                    kw["qk_head_dim"], kw.get("rope_mode", RopeMode.NORMAL), kw.get("attn_kind", "mha"))
    if why is not None:
        if choice == "fast":
            raise ValueError(f"the CUDA decode attention kernel does not support {why}")
        return False
    return True


def swap_decode(call: rx.Call) -> rx.Call:
    """The ``paged_attention_kv_cache_create`` call with the (non-sliding) decode slot replaced."""
    return swap_tir_slot(call, _TIR_DECODE, DECODE_KERNEL, "fast decode")


class _SwapDecode(PagedKVCache):  # pylint: disable=too-few-public-methods
    """Sits right before PagedKVCache in the MRO: receives the create call before nn.Object
    emits it."""

    def __init__(self, *, _expr: rx.Expr, _name: str) -> None:  # pylint: disable=invalid-name
        if getattr(self, "_fast_decode", False):
            _expr = swap_decode(_expr)
        super().__init__(_expr=_expr, _name=_name)


_CLASSES: Dict[type, type] = {}


def with_fast_decode(cache_cls: type) -> type:
    """A subclass of a ``TIRPagedKVCache`` class whose decode slot is ``mlcq_attn_decode_paged``
    where :func:`plan_decode` says so (``$MLC_QUANT_DECODE_ATTENTION`` at construction time)."""
    if cache_cls not in _CLASSES:
        def __init__(self, **kwargs):
            self._fast_decode = plan_decode(**kwargs)
            cache_cls.__init__(self, **kwargs)

        _CLASSES[cache_cls] = type(f"FastDecode{cache_cls.__name__}", (cache_cls, _SwapDecode),
                                   {"__init__": __init__, "__doc__": with_fast_decode.__doc__})
    return _CLASSES[cache_cls]


def uses_fast_decode(mod: tvm.IRModule) -> bool:
    """Whether a Relax module's KV cache calls ``mlcq_attn_decode_paged``."""
    return calls_extern(mod, DECODE_KERNEL)


__all__ = ["DECODE_KERNEL", "fast_decode_supported", "plan_decode", "swap_decode", "uses_fast_decode",
           "with_fast_decode"]
