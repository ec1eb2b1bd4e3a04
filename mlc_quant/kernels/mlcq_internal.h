// SPDX-License-Identifier: Apache-2.0
// Internal interfaces shared by the kernel translation units (no tvm-ffi, no cuBLAS here, so the
// CUTLASS units compile against CUDA + CUTLASS headers alone).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>

namespace mlcq {

// Where the SiLU * up + quantize epilogue writes (cutlass_w8a8_sm90.cu with MLCQ_EPI=1, and the
// unfused fallback in linear.cu): the GEMM's N columns are gate and up interleaved in blocks of
// 8, q [M, N / 2] = the int8 static quantize of fp16(silu(gate) * up), as norm_act.cu computes it.
struct SiluQuantOut {
  int8_t* q = nullptr;
  const float* s = nullptr;     // device scalar: the next linear's activation scale
  const int8_t* z = nullptr;    // device scalar zero point, or null (0)
  int32_t* rowsum = nullptr;    // [M] sum_j q[m, j] (the asymmetric down_proj), or null
};

// One int8 x int8 GEMM with its dequantize epilogue (see cutlass_w8a8_sm90.cu for the formula).
struct GemmProblem {
  int64_t M = 0, N = 0, K = 0;
  const void* x = nullptr;  // int8 [M, K] row-major
  const void* w = nullptr;  // int8 [N, K] row-major
  void* out = nullptr;      // [M, N] row-major, out_dtype
  int out_dtype = 0;        // kF16 / kBF16 / kF32
  const float* scale_row = nullptr;  // [M] or null (1)
  const float* scale_col = nullptr;  // [N] (scale_col_is_vector) or a device scalar, or null
  float scale_col_value = 1.f;       // used when scale_col is null
  bool scale_col_is_vector = false;
  const void* bias = nullptr;  // [N] of bias_dtype or null
  int bias_dtype = 0;
  const int32_t* rowsum = nullptr;  // [M] sum_k x[m, k] (asymmetric only)
  const int32_t* zw = nullptr;      // [N]
  const int32_t* c = nullptr;       // [N]
  int device_id = 0;
  int sm_count = 0;
  const SiluQuantOut* silu = nullptr;  // SiLU * up + quantize after the dequantize (out: fp16 scratch)
  bool asym() const { return rowsum != nullptr || zw != nullptr || c != nullptr; }
};

enum DType : int { kF16 = 0, kBF16 = 1, kF32 = 2 };

// Per-device scratch memory that grows on demand. Slots never alias, so one call can use
// several at once. Not safe to grow inside CUDA graph capture: warm up before capturing.
class Workspace {
 public:
  enum Slot { kQuantX = 0, kRowVec = 1, kAcc32 = 2, kCutlass = 3, kLt = 4, kTokenScale = 5, kSiluOut = 6, kNumSlots = 7 };
  void* get(size_t bytes, Slot slot);
  static Workspace* ForDevice(int device_id);

 private:
  void* ptr_[kNumSlots] = {};
  size_t size_[kNumSlots] = {};
  std::mutex mu_;
};

[[noreturn]] void ThrowError(const std::string& kind, const std::string& msg);

#define MLCQ_CUDA_CHECK(expr)                                                          \
  do {                                                                                 \
    cudaError_t _e = (expr);                                                           \
    if (_e != cudaSuccess) {                                                           \
      std::ostringstream _os;                                                          \
      _os << #expr << " failed: " << cudaGetErrorString(_e) << " (" << __FILE__ << ":" \
          << __LINE__ << ")";                                                          \
      ::mlcq::ThrowError("RuntimeError", _os.str());                                   \
    }                                                                                  \
  } while (0)

// ---- kernels (kernels.cu) ----
// Quantize x [M, K] (fp16/bf16/fp32) to int8. Per-tensor: q = clamp(rint(x / s) + z, -128, 127)
// with s, z device scalars (z may be null = 0). Per-token: q = clamp(rint(x / s[m]), -127, 127).
// If rowsum is not null it receives sum_k q[m, k] (for the asymmetric correction).
void LaunchQuantizePerTensor(const void* x, int x_dtype, int64_t M, int64_t K, const float* s,
                             const int8_t* z, int8_t* q, int32_t* rowsum, cudaStream_t stream);
void LaunchQuantizePerToken(const void* x, int x_dtype, int64_t M, int64_t K, const float* s_row,
                            int8_t* q, int32_t* rowsum, cudaStream_t stream);
// Dynamic per-token: s_out[m] = max(max_k |x[m, k]| / 127, eps[0]), then q as per-token above.
void LaunchQuantizePerTokenDynamic(const void* x, int x_dtype, int64_t M, int64_t K,
                                   const float* eps, int8_t* q, float* s_out, cudaStream_t stream);
void LaunchRowSum(const int8_t* q, int64_t M, int64_t K, int32_t* rowsum, cudaStream_t stream);
// Epilogue over an int32 accumulator (the unfused fallback after cuBLASLt's int8 GEMM).
void LaunchDequantEpilogue(const int32_t* acc, const GemmProblem& p, cudaStream_t stream);
// Any-shape int8 GEMM + epilogue on CUDA cores: correctness fallback for odd K / N.
void LaunchSimtW8A8(const GemmProblem& p, cudaStream_t stream);

// ---- CUTLASS sm90 (cutlass_w8a8_sm90.cu, one object per config x variant) ----
// Return "" on success, else the reason the config cannot run this problem.
#define MLCQ_DECLARE_CUTLASS(cfg)                                                      \
  const char* cutlass_w8a8_sm90_cfg##cfg##_asym0(const GemmProblem&, Workspace*, cudaStream_t); \
  const char* cutlass_w8a8_sm90_cfg##cfg##_asym1(const GemmProblem&, Workspace*, cudaStream_t); \
  const char* cutlass_w8a8_sm90_name_cfg##cfg##_asym0();                              \
  const char* cutlass_w8a8_sm90_name_cfg##cfg##_asym1();
MLCQ_DECLARE_CUTLASS(0)
MLCQ_DECLARE_CUTLASS(1)
MLCQ_DECLARE_CUTLASS(2)
MLCQ_DECLARE_CUTLASS(3)
#undef MLCQ_DECLARE_CUTLASS
constexpr int kNumCutlassConfigs = 4;
// The SiLU * up + quantize epilogue (MLCQ_EPI=1): the ping-pong configs 0, 2 and 3;
// o.rowsum, if given, must be zeroed first (the epilogue adds to it).
const char* cutlass_w8a8_silu_q_sm90_cfg0_asym1(const GemmProblem&, const SiluQuantOut&, Workspace*, cudaStream_t);
const char* cutlass_w8a8_silu_q_sm90_cfg2_asym1(const GemmProblem&, const SiluQuantOut&, Workspace*, cudaStream_t);
const char* cutlass_w8a8_silu_q_sm90_cfg3_asym1(const GemmProblem&, const SiluQuantOut&, Workspace*, cudaStream_t);
// The SiLU * up quantize of an fp16 gate/up tensor [M, 2I] interleaved like above (norm_act.cu):
// the unfused fallback for shapes the CUTLASS epilogue does not take (decode GEMV, small M).
void LaunchSiluMulQInterleaved(const void* gu, int64_t M, int64_t I, const float* s, const int8_t* z, int8_t* q,
                               int32_t* rowsum, cudaStream_t stream);
// Zeroes n int32 (a PDL-chained kernel: a memset node would end the chain).
void LaunchZeroI32(int32_t* p, int64_t n, cudaStream_t stream);

}  // namespace mlcq
