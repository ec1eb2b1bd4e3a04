// SPDX-License-Identifier: Apache-2.0
// Split of the fused q/k/v with RoPE, the function TIRPagedKVCache's runtime calls in
// AttentionWithFusedQKV (TVM's TIR `fused_rope`, tvm/relax/frontend/nn/llm/position_embedding.py
// ::llama_rope_with_position_map, default rope_scaling, rotary_dim == head_dim):
//
//   f(qkv [S, Hq + 2 Hkv, D] f16, position_map [S] i32, q [S, Hq, D], k [S, Hkv, D], v [S, Hkv, D],
//     apply_rope)
//
// The runtime calls it with exactly these six arguments, so theta and scale (baked into the TIR
// function) live in a closure: `mlcq_rope_make(theta, scale, Hq, Hkv, D)` returns the function
// (mlc_quant/model/fast_rope.py puts that call in the KV cache's create call). `mlcq_rope(...,
// apply_rope, theta, scale)` is the same kernel with theta/scale as arguments (tests, benchmarks).
// `mlcq_kv_transpose_append(pages, k, v, position_map)` is the KV cache's append of k/v to the pages
// (TVM's TIR `tir_kv_cache_transpose_append`, same signature), the step after this one.
//
// Semantics, with the TIR kernel's fp32 math (p = position_map[s], j < D/2):
//   freq_j = (float(p) * scale) / powf(theta, float(2 j) / float(D))
//   q/k[s, h, j]       = half(cosf(freq_j) * x[s, h, j] + sinf(freq_j) * -x[s, h, j + D/2])
//   q/k[s, h, j + D/2] = half(cosf(freq_j) * x[s, h, j + D/2] + sinf(freq_j) * x[s, h, j])
//   v[s, h] = qkv[s, Hq + Hkv + h];  apply_rope == 0: q and k are plain copies.
//
// Vector path (all pointers 16-byte aligned, D = 64 or 128): a thread owns one 16-byte chunk of
// the first half of G q/k heads of one token and the matching chunks of the second half (16-byte
// loads/stores), and computes the chunk's 8 frequencies once for the G heads; v is copied in
// 16-byte chunks. Otherwise (misaligned views, other D): one thread per element pair.
//
// The math is the TIR kernel's as TVM compiles it: TVM's nvcc call (tvm/support/nvcc.py) passes
// --use_fast_math, and so does this unit (mlc_quant/kernels/build.py): cosf/sinf/powf are the
// fast intrinsics, the division is approximate, and the results match TVM's kernel bit for bit
// (or to 1 fp16 ulp where the compiler contracts the multiply-adds differently).
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <type_traits>
#include "mlcq_pdl.h"

namespace mlcq_rope {
namespace {

struct Params {
  const half* qkv;
  const int32_t* pos;
  half* q;
  half* k;
  half* v;
  int64_t seq_len;
  int hq, hkv, d;
  float theta, scale;
  int apply;
};

// The TIR kernel's frequency: `(p * scale) / pow(theta, (2 j % D) / D)` in fp32, j < D/2.
__device__ __forceinline__ float Freq(int32_t p, int j, int d, float theta, float scale) {
  const float e = static_cast<float>((j * 2) % d) / static_cast<float>(d);
  return (static_cast<float>(p) * scale) / powf(theta, e);
}

// Written as the TIR kernel's expression: cos * x + sin * y, rounded once to half.
__device__ __forceinline__ half Rot(float c, float s, half x, half y) {
  return __float2half_rn((c * __half2float(x)) + (s * __half2float(y)));
}

constexpr int kThreads = 256;

__device__ __forceinline__ uint4 Load16(const half* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ void Store16(half* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

// One thread per (token, 16-byte chunk c of the first half of a head, group g of G q/k heads):
// heads g, g + NG, ..., g + (G-1) NG (NG = ceil((Hq + Hkv) / G), so a warp's loads cover whole
// heads), all 2G loads issued before the 8 frequencies are computed. The items after the rotated
// ones copy v, 4 chunks each (chunks i, i + NV, i + 2 NV, i + 3 NV).
template <int D, int G>
__global__ void __launch_bounds__(kThreads) RopeVecKernel(Params p, int rot_items, int v_items) {
  mlcq::PdlWaitAndRelease();
  constexpr int kHalfD = D / 2;
  constexpr int kChunks = kHalfD / 8;
  const int rot_heads = p.hq + p.hkv;
  const int per_token = rot_items + v_items;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t s = tid / per_token;
  if (s >= p.seq_len) return;
  const int item = static_cast<int>(tid - s * per_token);
  const half* row = p.qkv + s * (rot_heads + p.hkv) * D;
  if (item >= rot_items) {
    const int i = item - rot_items;
    const half* src = row + rot_heads * D;
    half* dst = p.v + s * p.hkv * D;
    uint4 t[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) t[j] = Load16(src + (i + j * v_items) * 8);
#pragma unroll
    for (int j = 0; j < 4; ++j) Store16(dst + (i + j * v_items) * 8, t[j]);
    return;
  }
  const int c = item % kChunks;
  const int g = item / kChunks;
  const int groups = rot_items / kChunks;
  uint4 lo[G], hi[G];
#pragma unroll
  for (int i = 0; i < G; ++i) {
    const int h = g + i * groups;
    if (h < rot_heads) {
      lo[i] = Load16(row + h * D + c * 8);
      hi[i] = Load16(row + h * D + kHalfD + c * 8);
    }
  }
  if (p.apply) {
    float cs[8], sn[8];
    const int32_t pos = p.pos[s];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float f = Freq(pos, c * 8 + j, D, p.theta, p.scale);
      cs[j] = cosf(f);
      sn[j] = sinf(f);
    }
#pragma unroll
    for (int i = 0; i < G; ++i) {
      const half* xl = reinterpret_cast<const half*>(&lo[i]);
      const half* xh = reinterpret_cast<const half*>(&hi[i]);
      uint4 ol, oh;
      half* yl = reinterpret_cast<half*>(&ol);
      half* yh = reinterpret_cast<half*>(&oh);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        yl[j] = Rot(cs[j], sn[j], xl[j], __hneg(xh[j]));
        yh[j] = Rot(cs[j], sn[j], xh[j], xl[j]);
      }
      lo[i] = ol;
      hi[i] = oh;
    }
  }
#pragma unroll
  for (int i = 0; i < G; ++i) {
    const int h = g + i * groups;
    if (h < rot_heads) {
      half* dst = h < p.hq ? p.q + (s * p.hq + h) * D : p.k + (s * p.hkv + (h - p.hq)) * D;
      Store16(dst + c * 8, lo[i]);
      Store16(dst + kHalfD + c * 8, hi[i]);
    }
  }
}

int SmCount(int device) {
  static int counts[64] = {};
  if (device < 0 || device >= 64) return 132;
  if (counts[device] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) n = 132;
    counts[device] = n;
  }
  return counts[device];
}

template <int D, int G>
void LaunchVec(const Params& p, cudaStream_t stream) {
  constexpr int kChunks = D / 16;
  const int rot_heads = p.hq + p.hkv;
  const int rot_items = (rot_heads + G - 1) / G * kChunks;
  const int v_items = p.hkv * D / 32;  // 4 chunks of 8 halves each
  const int64_t threads = p.seq_len * (rot_items + v_items);
  mlcq::LaunchPdl(mlcq::kPdlRope, RopeVecKernel<D, G>, dim3(static_cast<unsigned>((threads + kThreads - 1) / kThreads)),
                  dim3(kThreads), 0, stream, p, rot_items, v_items);
}

// Heads per thread: as many as keep about a full GPU of threads busy (more heads per thread
// means more loads in flight per thread and the frequencies computed once for more heads).
template <int D>
void LaunchVecAuto(const Params& p, int device, cudaStream_t stream) {
  const int64_t items = p.seq_len * (p.hq + p.hkv) * (D / 16);
  const int64_t full = static_cast<int64_t>(SmCount(device)) * 1024;
  if (items >= 4 * full) {
    LaunchVec<D, 4>(p, stream);
  } else if (items >= 2 * full) {
    LaunchVec<D, 2>(p, stream);
  } else {
    LaunchVec<D, 1>(p, stream);
  }
}

// Any alignment, any even D: one thread per (token, head, j < D/2) pair.
__global__ void RopeScalarKernel(Params p) {
  mlcq::PdlWaitAndRelease();
  const int heads = p.hq + 2 * p.hkv;
  const int half_d = p.d / 2;
  const int64_t total = p.seq_len * heads * half_d;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(i % half_d);
    const int h = static_cast<int>((i / half_d) % heads);
    const int64_t s = i / (static_cast<int64_t>(half_d) * heads);
    const half* x = p.qkv + (s * heads + h) * p.d;
    half* dst;
    if (h < p.hq) {
      dst = p.q + (s * p.hq + h) * p.d;
    } else if (h < p.hq + p.hkv) {
      dst = p.k + (s * p.hkv + (h - p.hq)) * p.d;
    } else {
      dst = p.v + (s * p.hkv + (h - p.hq - p.hkv)) * p.d;
      dst[j] = x[j];
      dst[j + half_d] = x[j + half_d];
      continue;
    }
    if (p.apply) {
      const float f = Freq(p.pos[s], j, p.d, p.theta, p.scale);
      const float c = cosf(f), sn = sinf(f);
      dst[j] = Rot(c, sn, x[j], __hneg(x[j + half_d]));
      dst[j + half_d] = Rot(c, sn, x[j + half_d], x[j]);
    } else {
      dst[j] = x[j];
      dst[j + half_d] = x[j + half_d];
    }
  }
}

// k/v append to the pages (TVM's TIR `tir_kv_cache_transpose_append`, _page_kernels.py):
//   for t, h, f: if position_map[t] != -1, p = position_map[t]:
//     pages[p / page_size, 0, h, p % page_size, f] = k[t, h, f]; pages[..., 1, ...] = v[t, h, f]
// One thread per (k or v, token, head, chunk of VEC halves): 16-byte copies when aligned.
template <int VEC>
__global__ void KvAppendKernel(half* __restrict__ pages, const half* __restrict__ k, const half* __restrict__ v,
                               const int32_t* __restrict__ pos, int64_t ntok, int hkv, int d, int page_size) {
  mlcq::PdlWaitAndRelease();
  using T = typename std::conditional<VEC == 8, uint4, half>::type;
  const int chunks = d / VEC;
  const int64_t per = ntok * hkv * chunks;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= 2 * per) return;
  const int which = i >= per;
  const int64_t r = i - which * per;
  const int c = static_cast<int>(r % chunks);
  const int h = static_cast<int>((r / chunks) % hkv);
  const int64_t t = r / (static_cast<int64_t>(chunks) * hkv);
  const int32_t p = pos[t];
  if (p == -1) return;
  const half* src = (which ? v : k) + (t * hkv + h) * d + c * VEC;
  half* dst = pages + (((static_cast<int64_t>(p / page_size) * 2 + which) * hkv + h) * page_size + p % page_size) * d +
              c * VEC;
  *reinterpret_cast<T*>(dst) = *reinterpret_cast<const T*>(src);
}

// ------------------------------------------------------------------------------------------------
// tvm-ffi entry points

using tvm::ffi::TensorView;

template <typename T>
T* Ptr(const TensorView& t) {
  return reinterpret_cast<T*>(static_cast<char*>(t.data_ptr()) + t.byte_offset());
}

void CheckHalf3(const TensorView& t, const char* what, int64_t s, int64_t h, int64_t d) {
  if (t.ndim() != 3 || t.dtype().code != kDLFloat || t.dtype().bits != 16 || t.dtype().lanes != 1) {
    TVM_FFI_THROW(ValueError) << "mlcq_rope: " << what << " must be a 3-d float16 tensor";
  }
  if (t.shape()[0] != s || t.shape()[1] != h || t.shape()[2] != d || !t.IsContiguous()) {
    TVM_FFI_THROW(ValueError) << "mlcq_rope: " << what << " must be a contiguous [" << s << ", " << h << ", " << d
                              << "] tensor, got [" << t.shape()[0] << ", " << t.shape()[1] << ", "
                              << t.shape()[2] << "]";
  }
  if (t.device().device_type != kDLCUDA) {
    TVM_FFI_THROW(ValueError) << "mlcq_rope: " << what << " must be on a CUDA device";
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void Rope(TensorView qkv, TensorView position_map, TensorView q, TensorView k, TensorView v, int64_t apply_rope,
          double theta, double scale, int64_t hq, int64_t hkv, int64_t d) {
  if (qkv.ndim() != 3) TVM_FFI_THROW(ValueError) << "mlcq_rope: qkv must be [seq_len, heads, head_dim]";
  if (d <= 0 || d % 2 != 0 || d > 1024) TVM_FFI_THROW(ValueError) << "mlcq_rope: head_dim " << d << " (must be even)";
  if (hq < 1 || hkv < 1) TVM_FFI_THROW(ValueError) << "mlcq_rope: " << hq << " q heads / " << hkv << " kv heads";
  const int64_t seq_len = qkv.shape()[0];
  CheckHalf3(qkv, "qkv", seq_len, hq + 2 * hkv, d);
  CheckHalf3(q, "q", seq_len, hq, d);
  CheckHalf3(k, "k", seq_len, hkv, d);
  CheckHalf3(v, "v", seq_len, hkv, d);
  if (position_map.ndim() != 1 || position_map.dtype().code != kDLInt || position_map.dtype().bits != 32 ||
      position_map.shape()[0] != seq_len || position_map.device().device_type != kDLCUDA ||
      !position_map.IsContiguous()) {
    TVM_FFI_THROW(ValueError) << "mlcq_rope: position_map must be a contiguous int32 device vector of length "
                              << seq_len;
  }
  if (seq_len == 0) return;
  Params p;
  p.qkv = Ptr<const half>(qkv);
  p.pos = Ptr<const int32_t>(position_map);
  p.q = Ptr<half>(q);
  p.k = Ptr<half>(k);
  p.v = Ptr<half>(v);
  p.seq_len = seq_len;
  p.hq = static_cast<int>(hq);
  p.hkv = static_cast<int>(hkv);
  p.d = static_cast<int>(d);
  p.theta = static_cast<float>(theta);
  p.scale = static_cast<float>(scale);
  p.apply = apply_rope > 0;
  const int device = qkv.device().device_id;
  cudaStream_t stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  const bool vec = (d == 64 || d == 128) && Aligned16(p.qkv) && Aligned16(p.q) && Aligned16(p.k) && Aligned16(p.v);
  if (vec && d == 64) {
    LaunchVecAuto<64>(p, device, stream);
  } else if (vec) {
    LaunchVecAuto<128>(p, device, stream);
  } else {
    const int64_t pairs = seq_len * (hq + 2 * hkv) * (d / 2);
    const int64_t blocks = (pairs + kThreads - 1) / kThreads;
    mlcq::LaunchPdl(mlcq::kPdlRope, RopeScalarKernel, dim3(static_cast<unsigned>(blocks < 1 << 20 ? blocks : 1 << 20)),
                    dim3(kThreads), 0, stream, p);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) TVM_FFI_THROW(RuntimeError) << "mlcq_rope: launch failed: " << cudaGetErrorString(err);
}

// mlcq_rope(qkv, position_map, q, k, v, apply_rope, theta, scale): heads and head_dim from the shapes.
void RopeDirect(TensorView qkv, TensorView position_map, TensorView q, TensorView k, TensorView v, int64_t apply_rope,
                double theta, double scale) {
  if (q.ndim() != 3 || k.ndim() != 3) TVM_FFI_THROW(ValueError) << "mlcq_rope: q and k must be 3-d";
  Rope(qkv, position_map, q, k, v, apply_rope, theta, scale, q.shape()[1], k.shape()[1], q.shape()[2]);
}

// mlcq_rope_make(theta, scale, hq, hkv, head_dim) -> f(qkv, position_map, q, k, v, apply_rope):
// the TIR function's signature, as PagedAttentionKVCacheObj::AttentionWithFusedQKV calls it.
tvm::ffi::Function Make(double theta, double scale, int64_t hq, int64_t hkv, int64_t d) {
  if (!(theta > 0)) TVM_FFI_THROW(ValueError) << "mlcq_rope_make: theta " << theta << " must be > 0";
  if (hq < 1 || hkv < 1 || d <= 0 || d % 2 != 0) {
    TVM_FFI_THROW(ValueError) << "mlcq_rope_make: bad configuration (" << hq << " q heads, " << hkv
                              << " kv heads, head_dim " << d << ")";
  }
  return tvm::ffi::Function::FromTyped(
      [=](TensorView qkv, TensorView position_map, TensorView q, TensorView k, TensorView v, int64_t apply_rope) {
        Rope(qkv, position_map, q, k, v, apply_rope, theta, scale, hq, hkv, d);
      });
}

// mlcq_kv_transpose_append(pages [N, 2, Hkv, page_size, D], k [S, Hkv, D], v [S, Hkv, D], position_map [S]):
// the TIR function's signature, as the runtime calls f_transpose_append_mha.
void KvTransposeAppend(TensorView pages, TensorView k, TensorView v, TensorView position_map) {
  if (k.ndim() != 3) TVM_FFI_THROW(ValueError) << "mlcq_kv_transpose_append: k must be [tokens, kv_heads, head_dim]";
  const int64_t ntok = k.shape()[0], hkv = k.shape()[1], d = k.shape()[2];
  if (pages.ndim() != 5 || pages.dtype().code != kDLFloat || pages.dtype().bits != 16 || pages.shape()[1] != 2 ||
      pages.shape()[2] != hkv || pages.shape()[4] != d || !pages.IsContiguous() ||
      pages.device().device_type != kDLCUDA) {
    TVM_FFI_THROW(ValueError) << "mlcq_kv_transpose_append: pages must be a contiguous float16 CUDA tensor [pages, 2, "
                              << hkv << ", page_size, " << d << "]";
  }
  CheckHalf3(k, "k", ntok, hkv, d);
  CheckHalf3(v, "v", ntok, hkv, d);
  if (position_map.ndim() != 1 || position_map.dtype().code != kDLInt || position_map.dtype().bits != 32 ||
      position_map.shape()[0] != ntok || position_map.device().device_type != kDLCUDA ||
      !position_map.IsContiguous()) {
    TVM_FFI_THROW(ValueError) << "mlcq_kv_transpose_append: position_map must be a contiguous int32 device vector "
                                 "of length "
                              << ntok;
  }
  if (ntok == 0 || hkv == 0 || d == 0) return;
  half* pg = Ptr<half>(pages);
  const half* kp = Ptr<const half>(k);
  const half* vp = Ptr<const half>(v);
  const int32_t* pp = Ptr<const int32_t>(position_map);
  const int page_size = static_cast<int>(pages.shape()[3]);
  cudaStream_t stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, k.device().device_id));
  const bool vec = d % 8 == 0 && Aligned16(pg) && Aligned16(kp) && Aligned16(vp);
  const int64_t items = 2 * ntok * hkv * (vec ? d / 8 : d);
  const unsigned blocks = static_cast<unsigned>((items + kThreads - 1) / kThreads);
  if (vec) {
    mlcq::LaunchPdl(mlcq::kPdlRope, KvAppendKernel<8>, dim3(blocks), dim3(kThreads), 0, stream, pg, kp, vp, pp, ntok,
                    static_cast<int>(hkv), static_cast<int>(d), page_size);
  } else {
    mlcq::LaunchPdl(mlcq::kPdlRope, KvAppendKernel<1>, dim3(blocks), dim3(kThreads), 0, stream, pg, kp, vp, pp, ntok,
                    static_cast<int>(hkv), static_cast<int>(d), page_size);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    TVM_FFI_THROW(RuntimeError) << "mlcq_kv_transpose_append: launch failed: " << cudaGetErrorString(err);
  }
}

}  // namespace
}  // namespace mlcq_rope

TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_rope, mlcq_rope::RopeDirect);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_rope_make, mlcq_rope::Make);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_kv_transpose_append, mlcq_rope::KvTransposeAppend);
