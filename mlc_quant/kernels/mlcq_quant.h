// SPDX-License-Identifier: Apache-2.0
// The activation quantize arithmetic every kernel that quantizes shares (kernels.cu's quantize
// kernels, gemv.cu's fused W8A8 GEMV, norm_act.cu's fused norm / SiLU variants): one copy, so
// their int8 values stay bit-identical.
#pragma once

#include <cuda_runtime.h>

namespace mlcq {

// x / s correctly rounded, as IEEE division, in 3 instructions: with r = RN(1 / s), y = x * r
// is within an ulp and one Newton step on the exact residual (fma) rounds it correctly for
// operands in the normal range (Markstein). The full div.rn.f32 routine made the quantize kernel
// compute-bound (~40 % of the GEMM time at K = 11008 on H200).
// An infinite x (an fp16 SiLU * up that overflowed) gives y = inf and a NaN residual: return y,
// so it quantizes to the clamp of its sign as Relax's round(x / s) does (not to -128 via NaN).
__device__ __forceinline__ float div_rn(float x, float s, float r) {
  const float y = x * r;
  const float d = fmaf(fmaf(-y, s, x), r, y);
  return isinf(y) ? y : d;
}

// Relax quantize: clip(round(x / s) + z, lo, 127). Relax's round lowers to nearbyint (ties to
// even) on llvm; rintf is the same function (CUDA TIR uses roundf, ties away: differs only on
// exact .5). lo = -128 (static per-tensor) or -127 (per token).
__device__ __forceinline__ int quantize_one(float x, float s, float r, float z, float lo) {
  float q = rintf(div_rn(x, s, r)) + z;
  q = fminf(fmaxf(q, lo), 127.f);
  return static_cast<int>(q);
}

}  // namespace mlcq
