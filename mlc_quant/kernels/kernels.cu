// SPDX-License-Identifier: Apache-2.0
// Memory-bound helper kernels: activation quantization (+ row sums), the unfused dequantize
// epilogue used after cuBLASLt's int8 GEMM, and an any-shape CUDA-core W8A8 GEMM fallback.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "mlcq_internal.h"
#include "mlcq_quant.h"
#include "mlcq_pdl.h"

namespace mlcq {
namespace {

constexpr int kRowThreads = 256;

__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(float v) { return v; }

template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }

__device__ __forceinline__ int block_sum(int v) {
  __shared__ int partial[kRowThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < kRowThreads / 32 ? partial[lane] : 0;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // valid in thread 0
}

// One block per row. kPerToken: s = s_row[m], z = 0, range [-127, 127] (design.md's per-token
// scheme); otherwise a per-tensor scalar s, z, range [-128, 127] (Relax quantize to int8).
// Vectorized by 8 elements when K % 8 == 0 (16-byte fp16 loads, 8-byte int8 stores).
template <class T, bool kPerToken, bool kVec>
__global__ void __launch_bounds__(kRowThreads)
    quantize_rows_kernel(const T* __restrict__ x, int64_t K, const float* __restrict__ s_ptr,
                         const int8_t* __restrict__ z_ptr, int8_t* __restrict__ q,
                         int32_t* __restrict__ rowsum) {
  mlcq::PdlWaitAndRelease();
  const int64_t m = blockIdx.x;
  const float s = kPerToken ? s_ptr[m] : s_ptr[0];
  const float z = (!kPerToken && z_ptr != nullptr) ? static_cast<float>(z_ptr[0]) : 0.f;
  const float lo = kPerToken ? -127.f : -128.f;
  const float r = 1.f / s;
  const T* xr = x + m * K;
  int8_t* qr = q + m * K;
  int acc = 0;
  if constexpr (kVec) {
    // U independent 16-byte loads in flight per thread before any use: a row of 4096 fp16 is
    // only two vectors per thread, so without this the loads serialize on latency.
    constexpr int V = 8, U = 4;
    constexpr int64_t kStep = int64_t(kRowThreads) * V;
    for (int64_t base = int64_t(threadIdx.x) * V; base < K; base += kStep * U) {
      T v[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t k = base + u * kStep;
        if (k < K) {
          if constexpr (sizeof(T) == 2) {
            *reinterpret_cast<uint4*>(v[u]) = *reinterpret_cast<const uint4*>(xr + k);
          } else {
            *reinterpret_cast<float4*>(v[u]) = *reinterpret_cast<const float4*>(xr + k);
            *reinterpret_cast<float4*>(v[u] + 4) = *reinterpret_cast<const float4*>(xr + k + 4);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t k = base + u * kStep;
        if (k < K) {
          int8_t o[V];
#pragma unroll
          for (int i = 0; i < V; ++i) {
            o[i] = static_cast<int8_t>(quantize_one(to_f32(v[u][i]), s, r, z, lo));
            acc += o[i];
          }
          *reinterpret_cast<uint2*>(qr + k) = *reinterpret_cast<const uint2*>(o);
        }
      }
    }
  } else {
    for (int64_t k = threadIdx.x; k < K; k += kRowThreads) {
      int8_t o = static_cast<int8_t>(quantize_one(to_f32(xr[k]), s, r, z, lo));
      qr[k] = o;
      acc += o;
    }
  }
  if (rowsum != nullptr) {
    acc = block_sum(acc);
    if (threadIdx.x == 0) rowsum[m] = acc;
  }
}

__device__ __forceinline__ float block_max(float v) {
  __shared__ float partial[kRowThreads / 32];
  __shared__ float result;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kRowThreads / 32 ? partial[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) result = v;
  }
  __syncthreads();
  return result;  // in every thread
}

// Dynamic per-token quantization, design.md's smq_q8i8f16_3 in one kernel (one block per row):
//   s[m] = max(max_k |x[m, k]| / 127, eps);  q = clamp(rint(x / s[m]), -127, 127)
// The row is read twice; the second pass mostly hits L2.
template <class T, bool kVec>
__global__ void __launch_bounds__(kRowThreads)
    quantize_rows_dynamic_kernel(const T* __restrict__ x, int64_t K, const float* __restrict__ eps,
                                 int8_t* __restrict__ q, float* __restrict__ s_out) {
  mlcq::PdlWaitAndRelease();
  const int64_t m = blockIdx.x;
  const T* xr = x + m * K;
  float amax = 0.f;
  if constexpr (kVec) {
    constexpr int V = 8, U = 4;
    constexpr int64_t kStep = int64_t(kRowThreads) * V;
    for (int64_t base = int64_t(threadIdx.x) * V; base < K; base += kStep * U) {
      T v[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t k = base + u * kStep;
        if (k < K) {
          if constexpr (sizeof(T) == 2) {
            *reinterpret_cast<uint4*>(v[u]) = *reinterpret_cast<const uint4*>(xr + k);
          } else {
            *reinterpret_cast<float4*>(v[u]) = *reinterpret_cast<const float4*>(xr + k);
            *reinterpret_cast<float4*>(v[u] + 4) = *reinterpret_cast<const float4*>(xr + k + 4);
          }
#pragma unroll
          for (int i = 0; i < V; ++i) amax = fmaxf(amax, fabsf(to_f32(v[u][i])));
        }
      }
    }
  } else {
    for (int64_t k = threadIdx.x; k < K; k += kRowThreads) amax = fmaxf(amax, fabsf(to_f32(xr[k])));
  }
  amax = block_max(amax);
  const float s = fmaxf(amax / 127.f, eps[0]);
  if (threadIdx.x == 0) s_out[m] = s;
  const float r = 1.f / s;
  int8_t* qr = q + m * K;
  if constexpr (kVec) {
    constexpr int V = 8;
    for (int64_t k = int64_t(threadIdx.x) * V; k < K; k += int64_t(kRowThreads) * V) {
      T v[V];
      if constexpr (sizeof(T) == 2) {
        *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(xr + k);
      } else {
        *reinterpret_cast<float4*>(v) = *reinterpret_cast<const float4*>(xr + k);
        *reinterpret_cast<float4*>(v + 4) = *reinterpret_cast<const float4*>(xr + k + 4);
      }
      int8_t o[V];
#pragma unroll
      for (int i = 0; i < V; ++i) o[i] = static_cast<int8_t>(quantize_one(to_f32(v[i]), s, r, 0.f, -127.f));
      *reinterpret_cast<uint2*>(qr + k) = *reinterpret_cast<const uint2*>(o);
    }
  } else {
    for (int64_t k = threadIdx.x; k < K; k += kRowThreads) qr[k] = static_cast<int8_t>(quantize_one(to_f32(xr[k]), s, r, 0.f, -127.f));
  }
}

__global__ void __launch_bounds__(kRowThreads)
    rowsum_kernel(const int8_t* __restrict__ q, int64_t K, int32_t* __restrict__ rowsum) {
  mlcq::PdlWaitAndRelease();
  const int8_t* qr = q + int64_t(blockIdx.x) * K;
  int acc = 0;
  for (int64_t k = threadIdx.x; k < K; k += kRowThreads) acc += qr[k];
  acc = block_sum(acc);
  if (threadIdx.x == 0) rowsum[blockIdx.x] = acc;
}

// The dequantize epilogue, same formula as the CUTLASS EVT (cutlass_w8a8_sm90.cu).
struct EpiParams {
  const float* scale_row;
  const float* scale_col;
  float scale_col_value;
  bool scale_col_is_vector;
  const void* bias;
  const int32_t* rowsum;
  const int32_t* zw;
  const int32_t* c;
};

template <class TOut>
__device__ __forceinline__ TOut epilogue_one(int32_t acc, int64_t m, int64_t n, const EpiParams& e) {
  if (e.rowsum != nullptr || e.zw != nullptr || e.c != nullptr) {
    const int32_t rs = e.rowsum ? e.rowsum[m] : 0;
    acc = acc - rs * (e.zw ? e.zw[n] : 0) - (e.c ? e.c[n] : 0);
  }
  const float sr = e.scale_row ? e.scale_row[m] : 1.f;
  const float sc = e.scale_col ? e.scale_col[e.scale_col_is_vector ? n : 0] : e.scale_col_value;
  const float b = e.bias ? to_f32(static_cast<const TOut*>(e.bias)[n]) : 0.f;
  float y = static_cast<float>(acc) * sr * sc + b;
  if constexpr (sizeof(TOut) == 2 && !std::is_same_v<TOut, __nv_bfloat16>) {
    y = y != y ? y : fminf(fmaxf(y, -65504.f), 65504.f);  // Relax dequantize clips to fp16 range
  }
  return from_f32<TOut>(y);
}

template <class TOut>
__global__ void dequant_epilogue_kernel(const int32_t* __restrict__ acc, int64_t M, int64_t N,
                                        TOut* __restrict__ out, EpiParams e) {
  const int64_t total = M * N;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / N, n = i - m * N;
    out[i] = epilogue_one<TOut>(acc[i], m, n, e);
  }
}

// CUDA-core GEMM, 64x64 output tile per 256-thread block, 4x4 outputs per thread.
constexpr int kSimtTile = 64, kSimtK = 32;
template <class TOut>
__global__ void __launch_bounds__(256)
    simt_w8a8_kernel(const int8_t* __restrict__ x, const int8_t* __restrict__ w, int64_t M,
                     int64_t N, int64_t K, TOut* __restrict__ out, EpiParams e) {
  __shared__ int8_t xs[kSimtTile][kSimtK + 4];
  __shared__ int8_t ws[kSimtTile][kSimtK + 4];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t m0 = int64_t(blockIdx.y) * kSimtTile, n0 = int64_t(blockIdx.x) * kSimtTile;
  int32_t acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kSimtK) {
    for (int i = threadIdx.x; i < kSimtTile * kSimtK; i += 256) {
      const int r = i / kSimtK, kk = i % kSimtK;
      const int64_t k = k0 + kk;
      xs[r][kk] = (m0 + r < M && k < K) ? x[(m0 + r) * K + k] : int8_t(0);
      ws[r][kk] = (n0 + r < N && k < K) ? w[(n0 + r) * K + k] : int8_t(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < kSimtK; ++kk) {
      int a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = xs[ty * 4 + i][kk], b[i] = ws[tx * 4 + i][kk];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + ty * 4 + i, n = n0 + tx * 4 + j;
      if (m < M && n < N) out[m * N + n] = epilogue_one<TOut>(acc[i][j], m, n, e);
    }
}

EpiParams MakeEpi(const GemmProblem& p) {
  return EpiParams{p.scale_row, p.scale_col, p.scale_col_value, p.scale_col_is_vector,
                   p.bias,      p.rowsum,    p.zw,              p.c};
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <class T>
void LaunchQuantizeT(const T* x, int64_t M, int64_t K, const float* s, const int8_t* z,
                     int8_t* q, int32_t* rowsum, bool per_token, cudaStream_t stream) {
  const bool vec = K % 8 == 0 && Aligned16(x) && (reinterpret_cast<uintptr_t>(q) & 7) == 0;
  dim3 grid(static_cast<unsigned>(M));
#define MLCQ_Q(PT, VEC) \
  LaunchPdl(kPdlQuant, quantize_rows_kernel<T, PT, VEC>, grid, dim3(kRowThreads), 0, stream, x, K, s, z, q, rowsum)
  if (per_token) {
    if (vec) MLCQ_Q(true, true); else MLCQ_Q(true, false);
  } else {
    if (vec) MLCQ_Q(false, true); else MLCQ_Q(false, false);
  }
#undef MLCQ_Q
  MLCQ_CUDA_CHECK(cudaGetLastError());
}

void LaunchQuantize(const void* x, int x_dtype, int64_t M, int64_t K, const float* s,
                    const int8_t* z, int8_t* q, int32_t* rowsum, bool per_token,
                    cudaStream_t stream) {
  if (M == 0) return;
  if (M > 0x7fffffff) ThrowError("ValueError", "quantize: too many rows");
  switch (x_dtype) {
    case kF16:
      return LaunchQuantizeT(static_cast<const __half*>(x), M, K, s, z, q, rowsum, per_token, stream);
    case kBF16:
      return LaunchQuantizeT(static_cast<const __nv_bfloat16*>(x), M, K, s, z, q, rowsum, per_token,
                             stream);
    case kF32:
      return LaunchQuantizeT(static_cast<const float*>(x), M, K, s, z, q, rowsum, per_token, stream);
  }
  ThrowError("ValueError", "quantize: unsupported activation dtype");
}

template <class T>
void LaunchDynamicT(const T* x, int64_t M, int64_t K, const float* eps, int8_t* q, float* s_out,
                    cudaStream_t stream) {
  const bool vec = K % 8 == 0 && Aligned16(x) && (reinterpret_cast<uintptr_t>(q) & 7) == 0;
  dim3 grid(static_cast<unsigned>(M));
  if (vec) {
    LaunchPdl(kPdlQuant, quantize_rows_dynamic_kernel<T, true>, grid, dim3(kRowThreads), 0, stream, x, K, eps, q, s_out);
  } else {
    LaunchPdl(kPdlQuant, quantize_rows_dynamic_kernel<T, false>, grid, dim3(kRowThreads), 0, stream, x, K, eps, q, s_out);
  }
  MLCQ_CUDA_CHECK(cudaGetLastError());
}

// Zeroes a buffer an epilogue then adds to (kernel, not memset: it keeps the PDL chain).
__global__ void zero_i32_kernel(int32_t* p, int64_t n) {
  PdlWaitAndRelease();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    p[i] = 0;
}

}  // namespace

void LaunchQuantizePerTensor(const void* x, int x_dtype, int64_t M, int64_t K, const float* s,
                             const int8_t* z, int8_t* q, int32_t* rowsum, cudaStream_t stream) {
  LaunchQuantize(x, x_dtype, M, K, s, z, q, rowsum, false, stream);
}

void LaunchQuantizePerToken(const void* x, int x_dtype, int64_t M, int64_t K, const float* s_row,
                            int8_t* q, int32_t* rowsum, cudaStream_t stream) {
  LaunchQuantize(x, x_dtype, M, K, s_row, nullptr, q, rowsum, true, stream);
}

void LaunchQuantizePerTokenDynamic(const void* x, int x_dtype, int64_t M, int64_t K,
                                   const float* eps, int8_t* q, float* s_out, cudaStream_t stream) {
  if (M == 0) return;
  if (M > 0x7fffffff) ThrowError("ValueError", "quantize: too many rows");
  switch (x_dtype) {
    case kF16:
      return LaunchDynamicT(static_cast<const __half*>(x), M, K, eps, q, s_out, stream);
    case kBF16:
      return LaunchDynamicT(static_cast<const __nv_bfloat16*>(x), M, K, eps, q, s_out, stream);
    case kF32:
      return LaunchDynamicT(static_cast<const float*>(x), M, K, eps, q, s_out, stream);
  }
  ThrowError("ValueError", "quantize: unsupported activation dtype");
}

void LaunchZeroI32(int32_t* p, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535);
  LaunchPdl(kPdlQuant, zero_i32_kernel, dim3(static_cast<unsigned>(blocks)), dim3(threads), 0, stream, p, n);
  MLCQ_CUDA_CHECK(cudaGetLastError());
}

void LaunchRowSum(const int8_t* q, int64_t M, int64_t K, int32_t* rowsum, cudaStream_t stream) {
  if (M == 0) return;
  LaunchPdl(kPdlQuant, rowsum_kernel, dim3(static_cast<unsigned>(M)), dim3(kRowThreads), 0, stream, q, K, rowsum);
  MLCQ_CUDA_CHECK(cudaGetLastError());
}

void LaunchDequantEpilogue(const int32_t* acc, const GemmProblem& p, cudaStream_t stream) {
  const int64_t total = p.M * p.N;
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535 * 8);
  EpiParams e = MakeEpi(p);
  switch (p.out_dtype) {
    case kF16:
      dequant_epilogue_kernel<__half><<<blocks, threads, 0, stream>>>(
          acc, p.M, p.N, static_cast<__half*>(p.out), e);
      break;
    case kBF16:
      dequant_epilogue_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(
          acc, p.M, p.N, static_cast<__nv_bfloat16*>(p.out), e);
      break;
    case kF32:
      dequant_epilogue_kernel<float><<<blocks, threads, 0, stream>>>(
          acc, p.M, p.N, static_cast<float*>(p.out), e);
      break;
    default:
      ThrowError("ValueError", "epilogue: unsupported output dtype");
  }
  MLCQ_CUDA_CHECK(cudaGetLastError());
}

void LaunchSimtW8A8(const GemmProblem& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return;
  dim3 grid(static_cast<unsigned>((p.N + kSimtTile - 1) / kSimtTile),
            static_cast<unsigned>((p.M + kSimtTile - 1) / kSimtTile));
  if (grid.y > 65535) ThrowError("ValueError", "simt gemm: M too large");
  EpiParams e = MakeEpi(p);
  const int8_t* x = static_cast<const int8_t*>(p.x);
  const int8_t* w = static_cast<const int8_t*>(p.w);
  switch (p.out_dtype) {
    case kF16:
      simt_w8a8_kernel<__half><<<grid, 256, 0, stream>>>(x, w, p.M, p.N, p.K,
                                                         static_cast<__half*>(p.out), e);
      break;
    case kBF16:
      simt_w8a8_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(
          x, w, p.M, p.N, p.K, static_cast<__nv_bfloat16*>(p.out), e);
      break;
    case kF32:
      simt_w8a8_kernel<float><<<grid, 256, 0, stream>>>(x, w, p.M, p.N, p.K,
                                                        static_cast<float*>(p.out), e);
      break;
    default:
      ThrowError("ValueError", "simt gemm: unsupported output dtype");
  }
  MLCQ_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mlcq
