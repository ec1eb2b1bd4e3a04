// SPDX-License-Identifier: Apache-2.0
// Memory-bound float16 kernels of a Llama layer that TVM's generated CUDA runs at 1-2 TB/s on an
// H200 (one fp16 element per thread): RMSNorm (with the residual add fused in) and SiLU-gated
// multiply of the merged gate/up output. 16-byte loads and stores, fp32 math, one rounding per
// output. Called from Relax through call_dps_packed (passes/offload_norm_act.py):
//
//   mlcq_rms_norm(x [.., H], w [H], eps, out [.., H])
//       out = fp16(float(x) * rsqrt(mean(float(x)^2) + eps) * float(w))        (TVM's formula)
//   mlcq_add_rms_norm(a [.., H], b [.., H], w [H], eps, sum [.., H], out [.., H])
//       sum = fp16(a + b) (the residual stream, as R.add rounds it); out = rms_norm(sum, w)
//   mlcq_silu_mul(gate_up [.., 2I], out [.., I])
//       out = fp16(silu(float(g)) * float(u)), g = gate_up[.., :I], u = gate_up[.., I:]
//
// Requirements (checked; the Relax pass only rewrites shapes that meet them): float16, compact,
// 16-byte aligned, H % 8 == 0 and H <= 32768, I % 8 == 0.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include <cstdint>

namespace mlcq_norm_act {
namespace {

constexpr int kVec = 8;        // halves per 16-byte access
constexpr int kMaxChunks = 4;  // 16-byte chunks a thread keeps in registers

__device__ __forceinline__ void Unpack(const uint4& v, float* f) {
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ uint4 Pack(const float* f) {
  uint4 v;
  __half2* h = reinterpret_cast<__half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
  return v;
}

__device__ __forceinline__ float BlockSum(float v, float* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) >> 5;
  v = lane < n_warps ? smem[lane] : 0.f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // every thread holds the block's sum
}

// One row per block; the row stays in registers (kMaxChunks 16-byte chunks per thread).
template <bool kAdd>
__global__ void RmsNormKernel(const uint4* __restrict__ a, const uint4* __restrict__ b, const uint4* __restrict__ w,
                              uint4* __restrict__ sum_out, uint4* __restrict__ out, int chunks, float inv_h,
                              float eps) {
  __shared__ float smem[32];
  const int64_t row = blockIdx.x;
  const uint4* ar = a + row * chunks;
  uint4 x[kMaxChunks];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxChunks; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < chunks) {
      x[i] = __ldg(ar + c);
      if (kAdd) {
        // R.add in float16: each sum rounded to fp16 (what the residual stream holds).
        const uint4 bv = __ldg(b + row * chunks + c);
        __half2* xh = reinterpret_cast<__half2*>(&x[i]);
        const __half2* bh = reinterpret_cast<const __half2*>(&bv);
#pragma unroll
        for (int j = 0; j < 4; ++j) xh[j] = __hadd2(xh[j], bh[j]);
        sum_out[row * chunks + c] = x[i];
      }
      float f[kVec];
      Unpack(x[i], f);
#pragma unroll
      for (int j = 0; j < kVec; ++j) ss += f[j] * f[j];
    }
  }
  const float r = rsqrtf(BlockSum(ss, smem) * inv_h + eps);
#pragma unroll
  for (int i = 0; i < kMaxChunks; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < chunks) {
      float f[kVec], g[kVec];
      Unpack(x[i], f);
      Unpack(__ldg(w + c), g);
#pragma unroll
      for (int j = 0; j < kVec; ++j) f[j] = f[j] * r * g[j];
      out[row * chunks + c] = Pack(f);
    }
  }
}

__global__ void SiluMulKernel(const uint4* __restrict__ gu, uint4* __restrict__ out, int64_t rows, int chunks) {
  const int64_t total = rows * chunks;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / chunks, c = i - row * chunks;
    float g[kVec], u[kVec];
    Unpack(__ldg(gu + row * 2 * chunks + c), g);
    Unpack(__ldg(gu + row * 2 * chunks + chunks + c), u);
#pragma unroll
    for (int j = 0; j < kVec; ++j) g[j] = g[j] / (1.f + __expf(-g[j])) * u[j];
    out[i] = Pack(g);
  }
}

// ------------------------------------------------------------------------------------------
// tvm-ffi entry points

using tvm::ffi::TensorView;

const uint4* In(const TensorView& t) {
  return reinterpret_cast<const uint4*>(static_cast<const char*>(t.data_ptr()) + t.byte_offset());
}
uint4* Out(const TensorView& t) {
  return reinterpret_cast<uint4*>(static_cast<char*>(t.data_ptr()) + t.byte_offset());
}

int64_t Rows(const TensorView& t) {
  int64_t n = 1;
  for (int i = 0; i + 1 < t.ndim(); ++i) n *= t.shape()[i];
  return n;
}

void CheckHalf(const TensorView& t, const char* fn, const char* what, int64_t last, int64_t rows) {
  if (t.dtype().code != kDLFloat || t.dtype().bits != 16 || t.dtype().lanes != 1 || t.ndim() < 1) {
    TVM_FFI_THROW(ValueError) << fn << ": " << what << " must be a float16 tensor";
  }
  if (t.device().device_type != kDLCUDA) {
    TVM_FFI_THROW(ValueError) << fn << ": " << what << " must be on a CUDA device";
  }
  if (!t.IsContiguous() || reinterpret_cast<uintptr_t>(In(t)) % 16 != 0) {
    TVM_FFI_THROW(ValueError) << fn << ": " << what << " must be contiguous and 16-byte aligned";
  }
  if (t.shape()[t.ndim() - 1] != last || (rows >= 0 && Rows(t) != rows)) {
    TVM_FFI_THROW(ValueError) << fn << ": " << what << " has shape inconsistent with the input";
  }
}

void Check(cudaError_t err, const char* fn) {
  if (err != cudaSuccess) TVM_FFI_THROW(RuntimeError) << fn << ": launch failed: " << cudaGetErrorString(err);
}

void LaunchRmsNorm(const char* fn, const TensorView& a, const TensorView* b, const TensorView& w, double eps,
                   const TensorView* sum_out, const TensorView& out) {
  const int64_t h = a.shape()[a.ndim() - 1], rows = Rows(a);
  if (h % kVec != 0 || h > 32768) {
    TVM_FFI_THROW(ValueError) << fn << ": hidden size " << h << " must be a multiple of 8 and <= 32768";
  }
  CheckHalf(a, fn, "x", h, -1);
  if (b != nullptr) CheckHalf(*b, fn, "residual", h, rows);
  CheckHalf(w, fn, "weight", h, 1);
  if (sum_out != nullptr) CheckHalf(*sum_out, fn, "sum output", h, rows);
  CheckHalf(out, fn, "output", h, rows);
  if (rows == 0) return;
  if (rows > 0x7fffffff) TVM_FFI_THROW(ValueError) << fn << ": too many rows (" << rows << ")";
  const int chunks = static_cast<int>(h / kVec);
  int threads = 32;
  while (threads * kMaxChunks < chunks) threads *= 2;  // <= 1024 since h <= 32768
  threads = threads < 128 && chunks >= 128 ? 128 : threads;
  cudaStream_t stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, a.device().device_id));
  const float inv_h = 1.f / static_cast<float>(h);
  if (b != nullptr) {
    RmsNormKernel<true><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        In(a), In(*b), In(w), Out(*sum_out), Out(out), chunks, inv_h, static_cast<float>(eps));
  } else {
    RmsNormKernel<false><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        In(a), nullptr, In(w), nullptr, Out(out), chunks, inv_h, static_cast<float>(eps));
  }
  Check(cudaGetLastError(), fn);
}

void RmsNorm(TensorView x, TensorView w, double eps, TensorView out) {
  LaunchRmsNorm("mlcq_rms_norm", x, nullptr, w, eps, nullptr, out);
}

void AddRmsNorm(TensorView a, TensorView b, TensorView w, double eps, TensorView sum_out, TensorView out) {
  LaunchRmsNorm("mlcq_add_rms_norm", a, &b, w, eps, &sum_out, out);
}

void SiluMul(TensorView gate_up, TensorView out) {
  const char* fn = "mlcq_silu_mul";
  const int64_t two_i = gate_up.shape()[gate_up.ndim() - 1], rows = Rows(gate_up);
  if (two_i % (2 * kVec) != 0) {
    TVM_FFI_THROW(ValueError) << fn << ": width " << two_i << " must be a multiple of 16";
  }
  CheckHalf(gate_up, fn, "gate_up", two_i, -1);
  CheckHalf(out, fn, "output", two_i / 2, rows);
  const int chunks = static_cast<int>(two_i / 2 / kVec);
  const int64_t total = rows * chunks;
  if (total == 0) return;
  int dev_sms = 132;
  cudaDeviceGetAttribute(&dev_sms, cudaDevAttrMultiProcessorCount, gate_up.device().device_id);
  const int threads = 256;
  int64_t blocks = (total + threads - 1) / threads;
  if (blocks > static_cast<int64_t>(dev_sms) * 8) blocks = static_cast<int64_t>(dev_sms) * 8;
  cudaStream_t stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, gate_up.device().device_id));
  SiluMulKernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(In(gate_up), Out(out), rows, chunks);
  Check(cudaGetLastError(), fn);
}

}  // namespace
}  // namespace mlcq_norm_act

TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_rms_norm, mlcq_norm_act::RmsNorm);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_add_rms_norm, mlcq_norm_act::AddRmsNorm);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_silu_mul, mlcq_norm_act::SiluMul);
