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
//   mlcq_silu_mul2(gate [.., I], up [.., I], out [.., I])   the same from two tensors (unmerged)
//
// W8A8 variants write the int8 input of the next linear instead of the fp16 output (the quantize
// that would read it back is fused; passes/fuse_act_quantize.py), bit-identical to
// quantizing the fp16 output with kernels.cu's quantize kernels:
//   *_q  (static per-tensor, Relax quantize): q = clamp(rint(y / s) + z, -128, 127)
//        mlcq_rms_norm_q(x, w, eps, s, z, q), mlcq_add_rms_norm_q(a, b, w, eps, s, z, sum, q),
//        mlcq_silu_mul_q(gate_up, s, z, q), mlcq_silu_mul2_q(gate, up, s, z, q)  (s: float32 [], z: int8 [])
//   *_qt (dynamic per-token, smq_q8i8f16_3): s_row = max(max|y| / 127, eps), q = clamp(rint(y / s_row))
//        mlcq_rms_norm_qt(x, w, eps, tok_eps, q, s_row), mlcq_add_rms_norm_qt(a, b, w, eps, tok_eps,
//        sum, q, s_row), mlcq_silu_mul_qt(gate_up, tok_eps, q, s_row), mlcq_silu_mul2_qt(gate, up, tok_eps,
//        q, s_row)  (s_row: float32 [.., 1])
//   *_qs (static, plus the row sums sum_k q[.., k] an asymmetric-weight linear needs: int32 [.., 1]):
//        mlcq_rms_norm_qs(x, w, eps, s, z, q, rowsum), mlcq_add_rms_norm_qs(a, b, w, eps, s, z, sum, q,
//        rowsum), mlcq_silu_mul_qs(gate_up, s, z, q, rowsum), mlcq_silu_mul2_qs(gate, up, s, z, q, rowsum)
//        (I <= 16384 for the SiLU ones: one row per block)
// where y is the fp16-rounded norm / SiLU * up output.
//
// Requirements (checked; the Relax pass only rewrites shapes that meet them): float16, compact,
// 16-byte aligned, H % 8 == 0 and H <= 32768, I % 8 == 0 (I <= 16384 for mlcq_silu_mul_qt).
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cstdint>

#include "mlcq_quant.h"
#include "mlcq_pdl.h"

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

// Block-wide reduction (every thread gets the result); Op is a sum or a max of floats.
template <class Op>
__device__ __forceinline__ float BlockReduce(float v, float* smem, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int n_warps = (blockDim.x + 31) >> 5;
  v = lane < n_warps ? smem[lane] : 0.f;  // 0 is the identity of both (the max is of |y|)
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Stores 8 int8 values; returns their sum (the asymmetric linear's row sum, when asked for).
__device__ __forceinline__ int StoreQ8(int8_t* dst, const uint4& h, float s, float r, float z, float lo) {
  float f[kVec];
  Unpack(h, f);
  int8_t o[kVec];
  int sum = 0;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const int v = mlcq::quantize_one(f[j], s, r, z, lo);
    o[j] = static_cast<int8_t>(v);
    sum += v;
  }
  *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(o);
  return sum;
}

__device__ __forceinline__ float AbsMax8(const uint4& h, float m) {
  float f[kVec];
  Unpack(h, f);
#pragma unroll
  for (int j = 0; j < kVec; ++j) m = fmaxf(m, fabsf(f[j]));
  return m;
}

// Where a W8A8 kernel writes: int8 q [rows, H] and, per token, s_row [rows].
struct QuantOut {
  int8_t* q = nullptr;
  const float* s = nullptr;    // static: the scale (device scalar)
  const int8_t* z = nullptr;   // static: the zero point (device scalar)
  const float* eps = nullptr;  // per token: the scale floor (device scalar)
  float* s_row = nullptr;      // per token: the scales written
  int32_t* rowsum = nullptr;   // static, optional: sum_k q[row, k] for the asymmetric linear
};

constexpr int kFp16Out = 0, kStatic = 1, kPerToken = 2;

// The last step of a row kernel: y[i] (fp16-rounded outputs, kMaxC chunks per thread) to fp16 or
// int8 (static, or per token with the block max).
template <int kQuant, int kMaxC>
__device__ __forceinline__ void WriteRow(const uint4 (&y)[kMaxC], int64_t row, int chunks, uint4* out,
                                         const QuantOut& qo, float* smem) {
  if constexpr (kQuant == kFp16Out) {
#pragma unroll
    for (int i = 0; i < kMaxC; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      if (c < chunks) out[row * chunks + c] = y[i];
    }
    return;
  }
  float s, z = 0.f, lo = -127.f;
  if constexpr (kQuant == kStatic) {
    s = qo.s[0];
    z = static_cast<float>(qo.z[0]);
    lo = -128.f;
  } else {
    float m = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxC; ++i) {
      const int c = threadIdx.x + i * blockDim.x;
      if (c < chunks) m = AbsMax8(y[i], m);
    }
    s = fmaxf(BlockReduce(m, smem, MaxOp()) / 127.f, qo.eps[0]);
    if (threadIdx.x == 0) qo.s_row[row] = s;
  }
  const float r = 1.f / s;
  int8_t* qr = qo.q + row * static_cast<int64_t>(chunks) * kVec;
  int sum = 0;
#pragma unroll
  for (int i = 0; i < kMaxC; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < chunks) sum += StoreQ8(qr + c * kVec, y[i], s, r, z, lo);
  }
  if constexpr (kQuant == kStatic) {
    // |sum| <= 32768 * 128 < 2^24: exact in the float reduction (smem is free on this path).
    if (qo.rowsum != nullptr) {
      const float t = BlockReduce(static_cast<float>(sum), smem, SumOp());
      if (threadIdx.x == 0) qo.rowsum[row] = static_cast<int32_t>(t);
    }
  }
}

// One row per block; the row stays in registers (kMaxChunks 16-byte chunks per thread).
template <bool kAdd, int kQuant>
__global__ void RmsNormKernel(const uint4* __restrict__ a, const uint4* __restrict__ b, const uint4* __restrict__ w,
                              uint4* __restrict__ sum_out, uint4* __restrict__ out, int chunks, float inv_h,
                              float eps, QuantOut qo) {
  mlcq::PdlWaitAndRelease();
  __shared__ float smem[32];
  __shared__ float smem_max[32];
  const int64_t row = blockIdx.x;
  const uint4* ar = a + row * chunks;
  uint4 x[kMaxChunks], wv[kMaxChunks];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxChunks; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < chunks) {
      x[i] = __ldg(ar + c);
      wv[i] = __ldg(w + c);  // issued now, so the weight is in registers when the sum is known
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
  const float r = rsqrtf(BlockReduce(ss, smem, SumOp()) * inv_h + eps);
#pragma unroll
  for (int i = 0; i < kMaxChunks; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < chunks) {
      float f[kVec], g[kVec];
      Unpack(x[i], f);
      Unpack(wv[i], g);
#pragma unroll
      for (int j = 0; j < kVec; ++j) f[j] = f[j] * r * g[j];
      x[i] = Pack(f);  // the fp16 output (rounded once)
    }
  }
  WriteRow<kQuant, kMaxChunks>(x, row, chunks, out, qo, smem_max);
}

__device__ __forceinline__ uint4 SiluMul8(const uint4& gv, const uint4& uv) {
  float g[kVec], u[kVec];
  Unpack(gv, g);
  Unpack(uv, u);
#pragma unroll
  // mlcq_quant.h's formula, shared with the GEMM's SiLU epilogue (not an IEEE division: that is
  // a subroutine, and it made the W8A8 variant instruction-bound)
  for (int j = 0; j < kVec; ++j) g[j] = mlcq::silu_mul(g[j], u[j]);
  return Pack(g);
}

// Element-wise (fp16 out or static int8): a grid-stride loop over 16-byte chunks. cstep: 1, or 2
// for gate/up interleaved in blocks of 8 (g = the row's first gate chunk, u = g + 1).
template <int kQuant>
__global__ void SiluMulKernel(const uint4* __restrict__ g, const uint4* __restrict__ u, int64_t stride, int cstep,
                              uint4* __restrict__ out, int64_t rows, int chunks, QuantOut qo) {
  mlcq::PdlWaitAndRelease();
  const int64_t total = rows * chunks;
  float s = 1.f, z = 0.f;
  if constexpr (kQuant == kStatic) {
    s = qo.s[0];
    z = static_cast<float>(qo.z[0]);
  }
  const float r = 1.f / s;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / chunks, c = i - row * chunks;
    const uint4 y = SiluMul8(__ldg(g + row * stride + c * cstep), __ldg(u + row * stride + c * cstep));
    if constexpr (kQuant == kFp16Out) {
      out[i] = y;
    } else {
      StoreQ8(qo.q + i * kVec, y, s, r, z, -128.f);
    }
  }
}

// Per-token int8, or static int8 with the row sums: one row per block (the row max / sum needs
// the whole row), kMaxSiluChunks per thread.
constexpr int kSiluThreads = 256, kMaxSiluChunks = 8;

template <int kQuant>
__global__ void SiluMulRowKernel(const uint4* __restrict__ g, const uint4* __restrict__ u, int64_t stride, int cstep,
                                 int chunks, QuantOut qo) {
  mlcq::PdlWaitAndRelease();
  __shared__ float smem_max[32];
  const int64_t row = blockIdx.x;
  uint4 y[kMaxSiluChunks];
#pragma unroll
  for (int i = 0; i < kMaxSiluChunks; ++i) {
    const int c = threadIdx.x + i * blockDim.x;
    if (c < chunks) y[i] = SiluMul8(__ldg(g + row * stride + c * cstep), __ldg(u + row * stride + c * cstep));
  }
  WriteRow<kQuant, kMaxSiluChunks>(y, row, chunks, nullptr, qo, smem_max);
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
template <typename T>
T* Ptr(const TensorView& t) {
  return reinterpret_cast<T*>(static_cast<char*>(t.data_ptr()) + t.byte_offset());
}

int64_t Rows(const TensorView& t) {
  int64_t n = 1;
  for (int i = 0; i + 1 < t.ndim(); ++i) n *= t.shape()[i];
  return n;
}

void CheckTensor(const TensorView& t, const char* fn, const char* what, DLDataTypeCode code, int bits,
                 const char* dtype_name, int64_t last, int64_t rows, int align = 16) {
  if (t.dtype().code != code || t.dtype().bits != bits || t.dtype().lanes != 1) {
    TVM_FFI_THROW(ValueError) << fn << ": " << what << " must be a " << dtype_name << " tensor";
  }
  if (t.device().device_type != kDLCUDA) {
    TVM_FFI_THROW(ValueError) << fn << ": " << what << " must be on a CUDA device";
  }
  if (!t.IsContiguous() || reinterpret_cast<uintptr_t>(In(t)) % align != 0) {
    TVM_FFI_THROW(ValueError) << fn << ": " << what << " must be contiguous and " << align << "-byte aligned";
  }
  int64_t n = 1;
  for (int i = 0; i < t.ndim(); ++i) n *= t.shape()[i];
  const bool bad_last = last >= 0 && (t.ndim() < 1 || t.shape()[t.ndim() - 1] != last);
  const bool bad_rows = rows >= 0 && (last >= 0 ? Rows(t) != rows : n != rows);
  if (bad_last || bad_rows) {
    TVM_FFI_THROW(ValueError) << fn << ": " << what << " has a shape inconsistent with the input";
  }
}

void CheckHalf(const TensorView& t, const char* fn, const char* what, int64_t last, int64_t rows) {
  CheckTensor(t, fn, what, kDLFloat, 16, "float16", last, rows);
}

// The int8 output and its scalars / per-row scales of a W8A8 variant.
QuantOut MakeQuantOut(const char* fn, int quant, const TensorView& q, const TensorView* s, const TensorView* z,
                      const TensorView* eps, const TensorView* s_row, int64_t h, int64_t rows,
                      const TensorView* rowsum = nullptr) {
  QuantOut qo;
  if (quant == kFp16Out) return qo;
  CheckTensor(q, fn, "int8 output", kDLInt, 8, "int8", h, rows, 8);
  qo.q = Ptr<int8_t>(q);
  if (quant == kStatic) {
    CheckTensor(*s, fn, "scale", kDLFloat, 32, "float32", -1, 1, 4);
    CheckTensor(*z, fn, "zero point", kDLInt, 8, "int8", -1, 1, 1);
    qo.s = Ptr<const float>(*s);
    qo.z = Ptr<const int8_t>(*z);
    if (rowsum != nullptr) {
      CheckTensor(*rowsum, fn, "row sum output", kDLInt, 32, "int32", -1, rows, 4);
      qo.rowsum = Ptr<int32_t>(*rowsum);
    }
  } else {
    CheckTensor(*eps, fn, "token eps", kDLFloat, 32, "float32", -1, 1, 4);
    CheckTensor(*s_row, fn, "token scale output", kDLFloat, 32, "float32", -1, rows, 4);
    qo.eps = Ptr<const float>(*eps);
    qo.s_row = Ptr<float>(*s_row);
  }
  return qo;
}

void Check(cudaError_t err, const char* fn) {
  if (err != cudaSuccess) TVM_FFI_THROW(RuntimeError) << fn << ": launch failed: " << cudaGetErrorString(err);
}

cudaStream_t StreamOf(const TensorView& t) {
  return static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, t.device().device_id));
}

template <bool kAdd, int kQuant>
void LaunchRmsNormT(int64_t rows, int threads, cudaStream_t stream, const TensorView& a, const TensorView* b,
                    const TensorView& w, float inv_h, double eps, const TensorView* sum_out,
                    const TensorView* out, const QuantOut& qo, int chunks) {
  mlcq::LaunchPdl(mlcq::kPdlNorm, RmsNormKernel<kAdd, kQuant>, dim3(static_cast<unsigned>(rows)), dim3(threads), 0, stream,
                  In(a), b ? In(*b) : nullptr, In(w), sum_out ? Out(*sum_out) : nullptr,
                  out ? Out(*out) : nullptr, chunks, inv_h, static_cast<float>(eps), qo);
}

// quant: kFp16Out (out given), kStatic (q, s, z given), kPerToken (q, tok_eps, s_row given).
void LaunchRmsNorm(const char* fn, int quant, const TensorView& a, const TensorView* b, const TensorView& w,
                   double eps, const TensorView* sum_out, const TensorView* out, const TensorView* q,
                   const TensorView* s, const TensorView* z, const TensorView* tok_eps, const TensorView* s_row,
                   const TensorView* rowsum = nullptr) {
  const int64_t h = a.ndim() >= 1 ? a.shape()[a.ndim() - 1] : 0, rows = Rows(a);
  if (h % kVec != 0 || h > 32768 || h == 0) {
    TVM_FFI_THROW(ValueError) << fn << ": hidden size " << h << " must be a positive multiple of 8, <= 32768";
  }
  CheckHalf(a, fn, "x", h, -1);
  if (b != nullptr) CheckHalf(*b, fn, "residual", h, rows);
  CheckHalf(w, fn, "weight", h, 1);
  if (sum_out != nullptr) CheckHalf(*sum_out, fn, "sum output", h, rows);
  if (out != nullptr) CheckHalf(*out, fn, "output", h, rows);
  const QuantOut qo = MakeQuantOut(fn, quant, q ? *q : a, s, z, tok_eps, s_row, h, rows, rowsum);
  if (rows == 0) return;
  if (rows > 0x7fffffff) TVM_FFI_THROW(ValueError) << fn << ": too many rows (" << rows << ")";
  const int chunks = static_cast<int>(h / kVec);
  // Enough threads that each holds <= 2 chunks where the row allows (more warps to hide the
  // two reductions' latency), at most kMaxChunks (h <= 32768 keeps it <= 1024 threads).
  int threads = 32;
  while (threads * 2 < chunks && threads < 1024) threads *= 2;
  while (threads * kMaxChunks < chunks) threads *= 2;
  cudaStream_t stream = StreamOf(a);
  const float inv_h = 1.f / static_cast<float>(h);
#define MLCQ_RMS(ADD, Q) LaunchRmsNormT<ADD, Q>(rows, threads, stream, a, b, w, inv_h, eps, sum_out, out, qo, chunks)
  if (b != nullptr) {
    if (quant == kFp16Out) MLCQ_RMS(true, kFp16Out);
    else if (quant == kStatic) MLCQ_RMS(true, kStatic);
    else MLCQ_RMS(true, kPerToken);
  } else {
    if (quant == kFp16Out) MLCQ_RMS(false, kFp16Out);
    else if (quant == kStatic) MLCQ_RMS(false, kStatic);
    else MLCQ_RMS(false, kPerToken);
  }
#undef MLCQ_RMS
  Check(cudaGetLastError(), fn);
}

void RmsNorm(TensorView x, TensorView w, double eps, TensorView out) {
  LaunchRmsNorm("mlcq_rms_norm", kFp16Out, x, nullptr, w, eps, nullptr, &out, nullptr, nullptr, nullptr, nullptr,
                nullptr);
}
void AddRmsNorm(TensorView a, TensorView b, TensorView w, double eps, TensorView sum_out, TensorView out) {
  LaunchRmsNorm("mlcq_add_rms_norm", kFp16Out, a, &b, w, eps, &sum_out, &out, nullptr, nullptr, nullptr, nullptr,
                nullptr);
}
void RmsNormQ(TensorView x, TensorView w, double eps, TensorView s, TensorView z, TensorView q) {
  LaunchRmsNorm("mlcq_rms_norm_q", kStatic, x, nullptr, w, eps, nullptr, nullptr, &q, &s, &z, nullptr, nullptr);
}
void AddRmsNormQ(TensorView a, TensorView b, TensorView w, double eps, TensorView s, TensorView z,
                 TensorView sum_out, TensorView q) {
  LaunchRmsNorm("mlcq_add_rms_norm_q", kStatic, a, &b, w, eps, &sum_out, nullptr, &q, &s, &z, nullptr, nullptr);
}
void RmsNormQs(TensorView x, TensorView w, double eps, TensorView s, TensorView z, TensorView q, TensorView rowsum) {
  LaunchRmsNorm("mlcq_rms_norm_qs", kStatic, x, nullptr, w, eps, nullptr, nullptr, &q, &s, &z, nullptr, nullptr,
                &rowsum);
}
void AddRmsNormQs(TensorView a, TensorView b, TensorView w, double eps, TensorView s, TensorView z,
                  TensorView sum_out, TensorView q, TensorView rowsum) {
  LaunchRmsNorm("mlcq_add_rms_norm_qs", kStatic, a, &b, w, eps, &sum_out, nullptr, &q, &s, &z, nullptr, nullptr,
                &rowsum);
}
void RmsNormQt(TensorView x, TensorView w, double eps, TensorView tok_eps, TensorView q, TensorView s_row) {
  LaunchRmsNorm("mlcq_rms_norm_qt", kPerToken, x, nullptr, w, eps, nullptr, nullptr, &q, nullptr, nullptr, &tok_eps,
                &s_row);
}
void AddRmsNormQt(TensorView a, TensorView b, TensorView w, double eps, TensorView tok_eps, TensorView sum_out,
                  TensorView q, TensorView s_row) {
  LaunchRmsNorm("mlcq_add_rms_norm_qt", kPerToken, a, &b, w, eps, &sum_out, nullptr, &q, nullptr, nullptr, &tok_eps,
                &s_row);
}

int SmCount(int device) {
  static int cached[64] = {0};
  if (device < 0 || device >= 64) return 132;
  if (cached[device] == 0) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    cached[device] = n > 0 ? n : 132;
  }
  return cached[device];
}

// gate_up [.., 2I] (merged; up == nullptr) or gate [.., I] and up [.., I] (two tensors).
void LaunchSiluMul(const char* fn, int quant, const TensorView& gate_up, const TensorView* up, const TensorView* out,
                   const TensorView* q, const TensorView* s, const TensorView* z, const TensorView* tok_eps,
                   const TensorView* s_row, const TensorView* rowsum = nullptr) {
  const int64_t width = gate_up.ndim() >= 1 ? gate_up.shape()[gate_up.ndim() - 1] : 0, rows = Rows(gate_up);
  const int64_t inter = up == nullptr ? width / 2 : width;
  if (inter % kVec != 0 || inter == 0 || (up == nullptr && width % 2 != 0)) {
    TVM_FFI_THROW(ValueError) << fn << ": width " << width << " must be a positive multiple of "
                              << (up == nullptr ? 16 : 8);
  }
  const int chunks = static_cast<int>(inter / kVec);
  const bool by_row = quant == kPerToken || rowsum != nullptr;  // needs the whole row in one block
  if (by_row && chunks > kSiluThreads * kMaxSiluChunks) {
    TVM_FFI_THROW(ValueError) << fn << ": intermediate size " << inter << " above "
                              << kSiluThreads * kMaxSiluChunks * kVec;
  }
  CheckHalf(gate_up, fn, up == nullptr ? "gate_up" : "gate", width, -1);
  if (up != nullptr) CheckHalf(*up, fn, "up", inter, rows);
  if (out != nullptr) CheckHalf(*out, fn, "output", inter, rows);
  const QuantOut qo = MakeQuantOut(fn, quant, q ? *q : gate_up, s, z, tok_eps, s_row, inter, rows, rowsum);
  const int64_t total = rows * chunks;
  if (total == 0) return;
  const uint4* g = In(gate_up);
  const uint4* u = up == nullptr ? g + chunks : In(*up);
  const int64_t stride = up == nullptr ? 2 * static_cast<int64_t>(chunks) : chunks;
  cudaStream_t stream = StreamOf(gate_up);
  if (by_row) {
    if (rows > 0x7fffffff) TVM_FFI_THROW(ValueError) << fn << ": too many rows (" << rows << ")";
    const dim3 grid(static_cast<unsigned>(rows)), block(kSiluThreads);
    if (quant == kPerToken) {
      mlcq::LaunchPdl(mlcq::kPdlNorm, SiluMulRowKernel<kPerToken>, grid, block, 0, stream, g, u, stride, 1, chunks, qo);
    } else {
      mlcq::LaunchPdl(mlcq::kPdlNorm, SiluMulRowKernel<kStatic>, grid, block, 0, stream, g, u, stride, 1, chunks, qo);
    }
  } else {
    // One chunk per thread up to 64 waves of the GPU (a grid-stride loop beyond): every load of
    // a prefill in flight at once.
    const int threads = 256;
    int64_t blocks = (total + threads - 1) / threads;
    const int64_t cap = static_cast<int64_t>(SmCount(gate_up.device().device_id)) * 8 * 64;
    if (blocks > cap) blocks = cap;
    uint4* o = out ? Out(*out) : nullptr;
    if (quant == kFp16Out) {
      mlcq::LaunchPdl(mlcq::kPdlNorm, SiluMulKernel<kFp16Out>, dim3(static_cast<unsigned>(blocks)), dim3(threads), 0, stream, g, u,
                      stride, 1, o, rows, chunks, qo);
    } else {
      mlcq::LaunchPdl(mlcq::kPdlNorm, SiluMulKernel<kStatic>, dim3(static_cast<unsigned>(blocks)), dim3(threads), 0, stream, g, u,
                      stride, 1, o, rows, chunks, qo);
    }
  }
  Check(cudaGetLastError(), fn);
}

void SiluMul(TensorView gate_up, TensorView out) {
  LaunchSiluMul("mlcq_silu_mul", kFp16Out, gate_up, nullptr, &out, nullptr, nullptr, nullptr, nullptr, nullptr);
}
void SiluMulQ(TensorView gate_up, TensorView s, TensorView z, TensorView q) {
  LaunchSiluMul("mlcq_silu_mul_q", kStatic, gate_up, nullptr, nullptr, &q, &s, &z, nullptr, nullptr);
}
void SiluMulQs(TensorView gate_up, TensorView s, TensorView z, TensorView q, TensorView rowsum) {
  LaunchSiluMul("mlcq_silu_mul_qs", kStatic, gate_up, nullptr, nullptr, &q, &s, &z, nullptr, nullptr, &rowsum);
}
void SiluMulQt(TensorView gate_up, TensorView tok_eps, TensorView q, TensorView s_row) {
  LaunchSiluMul("mlcq_silu_mul_qt", kPerToken, gate_up, nullptr, nullptr, &q, nullptr, nullptr, &tok_eps, &s_row);
}
// Two tensors (gate and up not merged: e.g. tensor-parallel shards): the same arithmetic.
void SiluMul2(TensorView gate, TensorView up, TensorView out) {
  LaunchSiluMul("mlcq_silu_mul2", kFp16Out, gate, &up, &out, nullptr, nullptr, nullptr, nullptr, nullptr);
}
void SiluMul2Q(TensorView gate, TensorView up, TensorView s, TensorView z, TensorView q) {
  LaunchSiluMul("mlcq_silu_mul2_q", kStatic, gate, &up, nullptr, &q, &s, &z, nullptr, nullptr);
}
void SiluMul2Qs(TensorView gate, TensorView up, TensorView s, TensorView z, TensorView q, TensorView rowsum) {
  LaunchSiluMul("mlcq_silu_mul2_qs", kStatic, gate, &up, nullptr, &q, &s, &z, nullptr, nullptr, &rowsum);
}
void SiluMul2Qt(TensorView gate, TensorView up, TensorView tok_eps, TensorView q, TensorView s_row) {
  LaunchSiluMul("mlcq_silu_mul2_qt", kPerToken, gate, &up, nullptr, &q, nullptr, nullptr, &tok_eps, &s_row);
}

}  // namespace
}  // namespace mlcq_norm_act

namespace mlcq {
// linear.cu's fallback for the SiLU-epilogue GEMM (mlcq_internal.h): gu [M, 2I] fp16, gate and up
// interleaved in blocks of 8; the same kernels and arithmetic as mlcq_silu_mul_q(s).
void LaunchSiluMulQInterleaved(const void* gu, int64_t M, int64_t I, const float* s, const int8_t* z, int8_t* q,
                               int32_t* rowsum, cudaStream_t stream) {
  using namespace mlcq_norm_act;
  const int chunks = static_cast<int>(I / kVec);
  if (M == 0 || chunks == 0) return;
  QuantOut qo;
  qo.q = q, qo.s = s, qo.z = z, qo.rowsum = rowsum;
  const uint4* g = static_cast<const uint4*>(gu);
  const int64_t stride = 2 * static_cast<int64_t>(chunks);
  cudaError_t err;
  if (rowsum != nullptr) {
    err = LaunchPdl(kPdlNorm, SiluMulRowKernel<kStatic>, dim3(static_cast<unsigned>(M)), dim3(kSiluThreads), 0, stream, g,
                    g + 1, stride, 2, chunks, qo);
  } else {
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((M * chunks + threads - 1) / threads, 65535 * 8);
    err = LaunchPdl(kPdlNorm, SiluMulKernel<kStatic>, dim3(static_cast<unsigned>(blocks)), dim3(threads), 0, stream, g,
                    g + 1, stride, 2, static_cast<uint4*>(nullptr), M, chunks, qo);
  }
  if (err != cudaSuccess) TVM_FFI_THROW(RuntimeError) << "mlc_quant: SiLU * up quantize launch failed: " << cudaGetErrorString(err);
}
}  // namespace mlcq

TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_rms_norm, mlcq_norm_act::RmsNorm);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_add_rms_norm, mlcq_norm_act::AddRmsNorm);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_silu_mul, mlcq_norm_act::SiluMul);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_rms_norm_q, mlcq_norm_act::RmsNormQ);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_add_rms_norm_q, mlcq_norm_act::AddRmsNormQ);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_silu_mul_q, mlcq_norm_act::SiluMulQ);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_rms_norm_qt, mlcq_norm_act::RmsNormQt);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_add_rms_norm_qt, mlcq_norm_act::AddRmsNormQt);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_silu_mul_qt, mlcq_norm_act::SiluMulQt);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_silu_mul2, mlcq_norm_act::SiluMul2);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_silu_mul2_q, mlcq_norm_act::SiluMul2Q);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_silu_mul2_qt, mlcq_norm_act::SiluMul2Qt);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_rms_norm_qs, mlcq_norm_act::RmsNormQs);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_add_rms_norm_qs, mlcq_norm_act::AddRmsNormQs);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_silu_mul_qs, mlcq_norm_act::SiluMulQs);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_silu_mul2_qs, mlcq_norm_act::SiluMul2Qs);
