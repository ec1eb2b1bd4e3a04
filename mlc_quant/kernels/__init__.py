"""CUDA kernels of mlc_quant: W8A8 GEMMs with fused dequantize (CUTLASS sm90, cuBLASLt), the
fp16 GEMM of the q0f16 baseline, W8A8 GEMVs, prefill and decode attention, RoPE, RMSNorm and
SiLU * up, exposed as tvm-ffi functions.

C++ sources live next to this file; :func:`build_kernels` compiles them with nvcc (no GPU
needed) into PIC objects that a CUDA build links into its exported library.

Exported tvm-ffi functions (DPS: the output is the last argument):

- ``mlcq_linear(scheme, backend, x, w, w_kn, x_scale, x_zero, token_scale, scale, w_zero, corr,
  row_sum, bias, out)``: one linear (schemes/backends in :class:`Scheme`/:class:`Backend`,
  absent operands ``None``).
- ``mlcq_last_kernel() -> str``: which kernel the last ``mlcq_linear`` on this thread ran.
- ``mlcq_int8_gemm_i32(x, w, out)``: plain cuBLASLt int8 GEMM (int32 out), the baseline.
- ``mlcq_quantize(x, scale, zero, token_scale, q, row_sum)``: activation quantization alone.
- ``mlcq_lt_probe_int8(M, N, K, out_kind, alpha_vector, device) -> int``: how many cuBLASLt
  algorithms exist for an int8 GEMM writing int8/fp16/bf16 (documents what cuBLASLt can fuse).
- ``mlcq_attn_prefill_ragged(q, q_indptr, k, v, kv_indptr, q_rope_position, k_rope_pos_offset,
  output, lse, causal, rotary_mode, rope_scale, rope_theta, sm_scale)``: tensor-core ragged prefill
  attention with the signature of TVM's TIR ``batch_prefill_ragged_kv`` (attention.cu); the KV
  cache of CUDA fp16 builds calls it (mlc_quant/model/flash_prefill.py).
- ``mlcq_attn_decode_paged(...)``: split-K paged decode attention with the signature of TVM's TIR
  ``batch_decode_paged_kv`` (decode_attention.cu; the KV cache's decode slot, model/fast_decode.py).
- ``mlcq_rope_make(theta, scale, Hq, Hkv, D)`` (the KV cache's split + RoPE of the fused q/k/v),
  ``mlcq_rope``, ``mlcq_kv_transpose_append`` (rope.cu; model/fast_rope.py).
- ``mlcq_rms_norm``, ``mlcq_add_rms_norm``, ``mlcq_silu_mul`` and their W8A8 ``_q`` (static) /
  ``_qt`` (per-token) variants writing int8 (norm_act.cu; passes/offload_norm_act.py,
  passes/fuse_act_quantize.py).

The C++ entry point for generated code is ``mlcq::RunLinear`` (mlcq_api.h); the BYOC wrappers of
:mod:`mlc_quant.cuda_dispatch` call it. Kernel choice per shape is documented in
docs/performance.md.
"""
from enum import IntEnum

from .build import (
    KernelBuildError,
    build_kernels,
    build_shared_library,
    compile_wrapper,
    cublas_paths,
    cutlass_include,
    find_nvcc,
    link_options,
)


class Scheme(IntEnum):
    """Mirrors mlcq::Scheme (mlcq_api.h)."""

    FLOAT = 0
    SYMMETRIC = 1
    ASYMMETRIC = 2
    PER_TOKEN = 3


class Backend(IntEnum):
    """Mirrors mlcq::Backend (mlcq_api.h)."""

    AUTO = 0
    CUTLASS = 1
    CUTLASS0 = 2
    CUTLASS1 = 3
    CUBLASLT = 4
    SIMT = 5
    GEMV = 6
    #: CUTLASS_CFG + n forces CUTLASS tile config n (``cutlass_w8a8_sm90.cu``'s MLCQ_CFG blocks)
    CUTLASS_CFG = 16


__all__ = [
    "Backend",
    "KernelBuildError",
    "Scheme",
    "build_kernels",
    "build_shared_library",
    "compile_wrapper",
    "cublas_paths",
    "cutlass_include",
    "find_nvcc",
    "link_options",
]
