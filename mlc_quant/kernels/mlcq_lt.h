// SPDX-License-Identifier: Apache-2.0
// cuBLASLt wrappers (cublaslt.cu). Plans (descriptors + heuristic algo, 64 MiB workspace) are
// cached per device and problem.
#pragma once

#include "mlcq_internal.h"

namespace mlcq {

struct LtGemm {
  int64_t M = 0, N = 0, K = 0;
  const void* x = nullptr;   // [M, K] row-major
  const void* w = nullptr;   // [N, K] row-major, or [K, N] if w_kn
  bool w_kn = false;
  void* out = nullptr;       // [M, N] row-major (int32 for the int8 GEMM)
  const void* bias = nullptr;  // [N] of out_dtype (float GEMM only)
  int in_dtype = kF16, out_dtype = kF16;
  int device_id = 0;
};

// Return false when cuBLASLt has no algorithm for the problem (e.g. int8 with K % 4 != 0).
bool LtInt8Gemm(const LtGemm& g, cudaStream_t stream);   // int8 x int8 -> int32
bool LtFloatGemm(const LtGemm& g, cudaStream_t stream);  // fp16/bf16/fp32, fp32 accumulation
// Number of heuristic algos for int8 x int8 -> out_kind (1 int8, 2 fp16, 3 bf16) with an fp32
// scale (optionally a per-row alpha vector); negative: -cublasStatus_t.
int LtProbeInt8(int64_t M, int64_t N, int64_t K, int out_kind, bool alpha_vector, int device_id);

}  // namespace mlcq
