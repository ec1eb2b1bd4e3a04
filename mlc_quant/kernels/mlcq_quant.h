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

// SiLU(g) * u in fp32, as every kernel computes it (norm_act.cu's SiLU * up kernels and the
// SiLU epilogue of cutlass_w8a8_sm90.cu: one formula, so their fp16 / int8 outputs are the same
// bits). silu(g) = g / (1 + e^-g) with the approximate division (rcp.approx, 2 ulp): a correctly
// rounded reciprocal (__frcp_rn) branches to a slow path per element, which serializes the
// GEMM epilogue. A very negative g gives 1 + e^-g = inf, rcp 0 and silu -0, as a division would.
__device__ __forceinline__ float silu_mul(float g, float u) { return __fdividef(g, 1.f + __expf(-g)) * u; }

// Relax quantize: clip(round(x / s) + z, lo, 127). Relax's round lowers to nearbyint (ties to
// even) on llvm; rintf is the same function (CUDA TIR uses roundf, ties away: differs only on
// exact .5). lo = -128 (static per-tensor) or -127 (per token).
// rint(x / s) + z, clamped, without the conversion unit (a quarter-rate pipe that the GEMM
// epilogues share): the quotient is clamped to +-256 first (|z| <= 128, so the final clamp
// decides the same), then rounded to the nearest even integer by adding 1.5 * 2^23, whose low
// mantissa bits are then that integer. fmaxf takes a NaN to -256, so it still gives lo.
__device__ __forceinline__ int quantize_one(float x, float s, float r, float z, float lo) {
  const float d = fminf(fmaxf(div_rn(x, s, r), -256.f), 256.f);
  const int i = __float_as_int(d + 12582912.f) - 0x4B400000;
  return min(max(i + static_cast<int>(z), static_cast<int>(lo)), 127);
}

}  // namespace mlcq
