// SPDX-License-Identifier: Apache-2.0
// Small-M GEMV kernels (gemv.cu), kept out of mlcq_internal.h so the slow CUTLASS objects do not
// depend on them.
#pragma once

#include <string>

#include "mlcq_internal.h"

namespace mlcq {

// ---- small-M GEMV (gemv.cu): decode linears, M = 1..kGemvMaxM ----
constexpr int64_t kGemvMaxM = 8;  // what the kernels take (backend kGemv)
// What the auto policy gives them, measured on H200 (scripts/bench_gemv.py, docs/performance.md):
// the W8A8 GEMV beats quantize + cuBLASLt int8 + epilogue 1.2-1.8x at M = 1-2 but loses from
// M = 4 (the per-CTA quantize of M x K rows is not hidden any more); the fp16 GEMV at best ties
// cuBLASLt at M = 1 (0.93-1.07x over two runs) and loses above, so the q0f16 baseline keeps
// cuBLASLt (its best path); the fp16 GEMV runs only when forced (backend kGemv).
constexpr int64_t kGemvAutoMaxM = 2;
constexpr int64_t kGemvF16AutoMaxM = 0;
// How x reaches the W8A8 GEMV, which quantizes it itself (one launch for the whole linear).
struct GemvInput {
  int x_mode = 0;   // 0 int8 x; fp16 x with 1 static per-tensor (x_scale, x_zero), 2 per-token
                    // scale (GemmProblem::scale_row), 3 dynamic per-token (token_eps)
  int x_dtype = 0;  // kF16 for modes 1-3
  const void* x = nullptr;
  const float* x_scale = nullptr;
  const int8_t* x_zero = nullptr;
  const float* token_eps = nullptr;
};
// "" if LaunchGemvW8A8 can run the problem (p.x is ignored: in.x is used), else why not.
std::string GemvW8A8Unusable(const GemmProblem& p, const GemvInput& in);
// The whole W8A8 linear (quantize + GEMM + epilogue of p); rowsums computed inside.
void LaunchGemvW8A8(const GemmProblem& p, const GemvInput& in, cudaStream_t stream);
// fp16 x [M, K] times fp16 w [N, K]^T (+ fp16 bias) -> fp16 out, fp32 accumulation.
bool GemvF16Usable(int64_t M, int64_t N, int64_t K, const void* x, const void* w, const void* out);
void LaunchGemvF16(int64_t M, int64_t N, int64_t K, const void* x, const void* w, const void* bias,
                   void* out, int device, cudaStream_t stream);

}  // namespace mlcq
