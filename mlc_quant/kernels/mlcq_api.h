// SPDX-License-Identifier: Apache-2.0
// Public C++ entry point of the mlc_quant CUDA kernels.
//
// One call runs one linear layer the way docs/design.md writes it in Relax: optionally quantize
// the float activations, run the GEMM on an external kernel (CUTLASS sm90 with the dequantize in
// its epilogue, cuBLASLt, or a CUDA-core fallback) and write the float output. The BYOC wrappers
// that mlc_quant.cuda_dispatch generates fill a LinearArgs from their TensorView arguments and call
// RunLinear; the tvm-ffi exports in linear.cu do the same for tests and benchmarks.
//
// Every tensor is a compact (row-major) DLTensor on the same CUDA device; leading dimensions of x
// and out are flattened into M. Errors throw tvm::ffi::Error (ValueError for bad arguments).
#pragma once

#include <dlpack/dlpack.h>

#include <cstdint>

namespace mlcq {

enum class Scheme : int {
  kFloat = 0,     // y = x @ w^T (+ bias), float x and w (the q0f16 baseline)
  kSymmetric = 1, // y = dequant(q(x) @ wq^T, scale)              scale: scalar or [N]
  kAsymmetric = 2,// y = dequant(q(x) @ wq^T - rs*zw - c, scale)  scale: scalar or [N]
  kPerToken = 3,  // y = (q(x) @ wq^T) * s_tok[m] * s_w[n]
};

enum class Backend : int {
  kAuto = 0,      // pick per shape (measured policy, see docs/performance.md): M <= 8 -> kGemv
  kCutlass = 1,   // CUTLASS sm90 with the fused epilogue, tile config by shape
  kCutlass0 = 2,  // force tile config 0 (128x128 ping-pong) / 1 (128x64 stream-K)
  kCutlass1 = 3,
  kCublasLt = 4,  // cuBLASLt int8 -> int32 + separate epilogue kernel (not fused)
  kSimt = 5,      // CUDA cores, any shape
  kGemv = 6,      // M <= 8: one bandwidth-bound GEMV kernel with the quantize and epilogue fused
  kCutlassCfgBase = 16,  // 16 + n: force CUTLASS tile config n (any of cutlass_w8a8_sm90.cu's)
};

struct LinearArgs {
  Scheme scheme = Scheme::kFloat;
  Backend backend = Backend::kAuto;
  // Activations [..., K]: float (quantized here) or int8 (already quantized).
  const DLTensor* x = nullptr;
  // Weight: int8 [N, K], or for kFloat float [N, K] (w_transposed=false) / [K, N] (true).
  const DLTensor* w = nullptr;
  bool w_kn = false;
  // Static activation quantization (float x with kSymmetric / kAsymmetric): scalar scale and
  // optional int8 scalar zero point (null: 0).
  const DLTensor* x_scale = nullptr;
  const DLTensor* x_zero = nullptr;
  // kPerToken: the token scale [..., 1] float32 (quantizes x when x is float, scales rows), or,
  // for float x, token_eps instead: the scale is computed here as max(max|x| / 127, eps).
  const DLTensor* token_scale = nullptr;
  const DLTensor* token_eps = nullptr;
  // Dequantize scale: float32 scalar or [N] (kSymmetric/kAsymmetric), s_w [N] (kPerToken).
  const DLTensor* scale = nullptr;
  // kAsymmetric: int32 [N] weight zero points and precomputed int32 [N] correction c.
  const DLTensor* w_zero = nullptr;
  const DLTensor* corr = nullptr;
  // kAsymmetric with int8 x: int32 row sums [..., 1] if already computed (else computed here).
  const DLTensor* row_sum = nullptr;
  // Optional bias [N] (or [1, ..., N]) of the output dtype.
  const DLTensor* bias = nullptr;
  // Output [..., N]: float16 (all schemes), bfloat16 / float32 (kFloat, or int8 via cuBLASLt).
  const DLTensor* out = nullptr;
  // kSymmetric / kAsymmetric gate/up linear of an MLP with SiLU * up and the down_proj's static
  // activation quantize fused (passes/fuse_silu_gemm.py): the weight's N rows are gate and up
  // interleaved in blocks of 8, and q int8 [..., N / 2] receives
  // clamp(rint(fp16(silu(gate) * up) / act_scale) + act_zero, -128, 127) instead of out (leave out
  // null); act_scale float32 scalar, act_zero int8 scalar (optional), q_rowsum int32 [..., 1]
  // (optional) the row sums of q. Bit-identical to the fp16 output + mlcq_silu_mul_q(s).
  const DLTensor* silu_q = nullptr;
  const DLTensor* act_scale = nullptr;
  const DLTensor* act_zero = nullptr;
  const DLTensor* q_rowsum = nullptr;
};

// Runs the linear on the stream TVMFFIEnvGetStream(kDLCUDA, device) gives.
void RunLinear(const LinearArgs& args);

// Name of the kernel the last RunLinear on this thread used ("cutlass:128x256x128_...",
// "cublaslt+epilogue", "simt", "cublaslt_f16"...): for tests and benchmarks.
const char* LastKernelName();

}  // namespace mlcq
