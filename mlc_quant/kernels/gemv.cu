// SPDX-License-Identifier: Apache-2.0
// Small-M linears (decode: M = 1..8 rows) as bandwidth-bound GEMVs on CUDA cores.
//
// At M <= 8 a linear reads its weight once and does almost no arithmetic per byte, so the only
// thing that matters is streaming the weight at HBM speed. One warp owns kRows output columns
// (weight rows n) at a time and walks K with 16-byte non-caching loads, kUnroll x kRows of them
// in flight per lane; the warp's partial sums are reduced with shuffles and the epilogue is applied
// in registers. CTAs loop over the row groups (one wave of CTAs), so per-CTA setup is paid once.
//
// W8A8 (int8 weight [N, K]): the activation is quantized *inside* the kernel. Each CTA stages
// q(x) [M, K] as int8 in shared memory (per-tensor static scale + zero point, per-token given
// scale, or dynamic per-token: s = max(max|x| / 127, eps) from a block reduction), with the row
// sums the asymmetric correction needs, then multiplies with dp4a (int32 accumulate). Quantization
// is bit-identical to kernels.cu's quantize kernels (same reciprocal + fma division, rint, clamp),
// and the epilogue is kernels.cu's epilogue_one: y = (acc - rs[m] zw[n] - c[n]) s_row[m] s_col[n]
// + bias[n], clamped to the fp16 range. So one launch replaces quantize + GEMM + epilogue.
// At M = 1 with K = 4096..16384 (16-byte aligned x and w) gemv_w8a8_m1_kernel runs instead: the
// CTA splits K, q(x) stays in registers, no staging (see there; same results bit for bit).
// Grids are one wave of resident CTAs, sized with the occupancy calculator.
//
// fp16 (the q0f16 baseline, weight [N, K]): the same loop with fp32 FMAs; x is read through L1.
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "mlcq_quant.h"
#include "mlcq_gemv.h"
#include "mlcq_internal.h"
#include "mlcq_pdl.h"

namespace mlcq {
// Internal linkage for everything (several model libraries may each link a copy).
namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kRows = 2;    // weight rows per warp at a time
// 16-byte chunks per row in flight per lane. 8 at M = 1 was measured slower than 4 on H200
// (fp16 11008 x 4096: 28.7 vs 26.4 us; int8 about the same): 4 everywhere.
template <int MT>
__host__ __device__ constexpr int Unroll() { return 4; }

__device__ __forceinline__ int4 ld_stream(const int4* p) {
  int4 v;
  asm("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}
__device__ __forceinline__ int ld_stream(const int* p) {
  int v;
  asm("ld.global.nc.L1::no_allocate.s32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ int dot(int4 a, int4 b, int acc) {
  acc = __dp4a(a.x, b.x, acc);
  acc = __dp4a(a.y, b.y, acc);
  acc = __dp4a(a.z, b.z, acc);
  return __dp4a(a.w, b.w, acc);
}
__device__ __forceinline__ int dot(int a, int b, int acc) { return __dp4a(a, b, acc); }

// quantize_one / div_rn: mlcq_quant.h (the same arithmetic as the quantize kernels).

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

enum XMode : int { kXInt8 = 0, kXStatic = 1, kXToken = 2, kXDynamic = 3 };

struct W8Params {
  int M, N, K, kpad;  // kpad: smem row stride of the staged int8 x (K rounded up to 16)
  int x_mode;
  const void* x;      // int8 or fp16 [M, K]
  const float* x_scale;
  const int8_t* x_zero;
  const float* scale_row;  // per-token scales [M] (given), or null
  const float* token_eps;  // kXDynamic
  const int8_t* w;
  __half* out;
  const float* scale_col;
  float scale_col_value;
  bool scale_col_is_vector;
  const __half* bias;
  const int32_t* zw;
  const int32_t* c;
  bool asym;
};

// Stage q(x) into smem (rows >= M and the K..kpad tail zeroed); s_row_sm / rowsum_sm for M rows.
template <int MT>
__device__ void stage_x(const W8Params& P, int8_t* xq, float* s_row_sm, int* rowsum_sm) {
  __shared__ float red_f[kWarps][MT];
  __shared__ int red_i[kWarps][MT];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int M = P.M, K = P.K, kp = P.kpad;
  int sums[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) sums[m] = 0;
  const int words_k = K / 4, words_p = kp / 4;  // K % 4 == 0 (checked on the host)

  if (P.x_mode == kXInt8) {
    const int8_t* x = static_cast<const int8_t*>(P.x);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      int* dst = reinterpret_cast<int*>(xq + m * kp);
      const int* src = reinterpret_cast<const int*>(x + int64_t(m) * K);
      for (int i = tid; i < words_p; i += kThreads) {
        int v = 0;
        if (m < M && i < words_k) v = __ldg(src + i);
        dst[i] = v;
        sums[m] = __dp4a(v, 0x01010101, sums[m]);
      }
    }
  } else {
    const __half* x = static_cast<const __half*>(P.x);
    if (P.x_mode == kXDynamic) {
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        float amax = 0.f;
        if (m < M) {
          const __half2* src = reinterpret_cast<const __half2*>(x + int64_t(m) * K);
          for (int i = tid; i < K / 2; i += kThreads) {
            const float2 v = __half22float2(__ldg(src + i));
            amax = fmaxf(amax, fmaxf(fabsf(v.x), fabsf(v.y)));
          }
        }
        amax = warp_max(amax);
        if (lane == 0) red_f[warp][m] = amax;
      }
      __syncthreads();
      if (tid < MT) {
        float amax = 0.f;
        for (int w = 0; w < kWarps; ++w) amax = fmaxf(amax, red_f[w][tid]);
        s_row_sm[tid] = fmaxf(amax / 127.f, P.token_eps[0]);  // as kernels.cu's dynamic kernel
      }
      __syncthreads();
    }
    const float z = (P.x_mode == kXStatic && P.x_zero != nullptr) ? static_cast<float>(P.x_zero[0]) : 0.f;
    const float lo = P.x_mode == kXStatic ? -128.f : -127.f;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float s = 1.f;
      if (m < M) {
        s = P.x_mode == kXStatic ? P.x_scale[0] : P.x_mode == kXToken ? P.scale_row[m] : s_row_sm[m];
      }
      const float r = 1.f / s;
      int* dst = reinterpret_cast<int*>(xq + m * kp);
      const uint2* src = reinterpret_cast<const uint2*>(x + int64_t(m) * K);  // 4 halves
      for (int i = tid; i < words_p; i += kThreads) {
        int v = 0;
        if (m < M && i < words_k) {
          uint2 raw = __ldg(src + i);
          const __half2* h = reinterpret_cast<const __half2*>(&raw);
          const float2 a = __half22float2(h[0]), b = __half22float2(h[1]);
          const int q0 = quantize_one(a.x, s, r, z, lo), q1 = quantize_one(a.y, s, r, z, lo);
          const int q2 = quantize_one(b.x, s, r, z, lo), q3 = quantize_one(b.y, s, r, z, lo);
          v = (q0 & 0xff) | ((q1 & 0xff) << 8) | ((q2 & 0xff) << 16) | (int(unsigned(q3) << 24));
        }
        dst[i] = v;
        sums[m] = __dp4a(v, 0x01010101, sums[m]);
      }
    }
  }
  if (P.asym) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int s = warp_sum(sums[m]);
      if (lane == 0) red_i[warp][m] = s;
    }
    __syncthreads();
    if (tid < MT) {
      int s = 0;
      for (int w = 0; w < kWarps; ++w) s += red_i[w][tid];
      rowsum_sm[tid] = s;
    }
  }
  __syncthreads();
}

template <int MT, int VEC>
__global__ void __launch_bounds__(kThreads) gemv_w8a8_kernel(const W8Params P) {
  mlcq::PdlWaitAndRelease();
  using V = typename std::conditional<VEC == 16, int4, int>::type;
  constexpr int kUnroll = Unroll<MT>();
  extern __shared__ int4 smem_raw[];
  int8_t* xq = reinterpret_cast<int8_t*>(smem_raw);
  __shared__ float s_row_sm[MT];
  __shared__ int rowsum_sm[MT];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int N = P.N, K = P.K, M = P.M;
  const int nchunks = K / VEC;
  const int n_groups = (N + kRows - 1) / kRows;

  const int g_first = blockIdx.x * kWarps + warp;
  const V* wrow[kRows];
  V wv[kUnroll][kRows];
  auto set_rows = [&](int g) {
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      wrow[r] = reinterpret_cast<const V*>(P.w + int64_t(min(g * kRows + r, N - 1)) * K);
  };
  auto load = [&](int c0) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (c0 + u * 32 < nchunks) wv[u][r] = ld_stream(wrow[r] + c0 + u * 32);
  };
  // The first weight loads go out before x is staged: staging (x from L2, quantize, block
  // reductions) then overlaps the first round trip to HBM.
  if (g_first < n_groups) {
    set_rows(g_first);
    load(lane);
  }
  stage_x<MT>(P, xq, s_row_sm, rowsum_sm);

  for (int g = g_first; g < n_groups; g += gridDim.x * kWarps) {
    const int n0 = g * kRows;
    if (g != g_first) {
      set_rows(g);
      load(lane);
    }
    int acc[kRows][MT];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[r][m] = 0;
    for (int c0 = lane; c0 < nchunks; c0 += 32 * kUnroll) {
      if (c0 != lane) load(c0);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = c0 + u * 32;
        if (c < nchunks) {
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            const V xv = *reinterpret_cast<const V*>(xq + m * P.kpad + c * VEC);
#pragma unroll
            for (int r = 0; r < kRows; ++r) acc[r][m] = dot(wv[u][r], xv, acc[r][m]);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[r][m] = warp_sum(acc[r][m]);
    // lane j writes output (n0 + j / MT, j % MT)
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const int n = n0 + r;
        if (lane == r * MT + m && m < M && n < N) {
          int32_t a = acc[r][m];
          if (P.asym) a = a - rowsum_sm[m] * P.zw[n] - P.c[n];
          const float sr = P.x_mode == kXDynamic ? s_row_sm[m] : (P.scale_row ? P.scale_row[m] : 1.f);
          const float sc = P.scale_col ? P.scale_col[P.scale_col_is_vector ? n : 0] : P.scale_col_value;
          const float b = P.bias ? __half2float(P.bias[n]) : 0.f;
          float y = static_cast<float>(a) * sr * sc + b;
          y = y != y ? y : fminf(fmaxf(y, -65504.f), 65504.f);  // as Relax dequantize
          P.out[int64_t(m) * N + n] = __float2half_rn(y);
        }
      }
  }
}

// ---- M = 1 (decode at batch 1): K spread over the whole CTA, q(x) in registers ----
//
// The kernel above gives each warp whole weight rows and stages q(x) in shared memory; at M = 1
// that leaves half of a 4096 x 4096 matrix to a second round trip to HBM, and every CTA pays
// the staging (two passes over x from L2 and three barriers). Here the 256 threads of a CTA split
// K: thread t owns the 16-byte chunks t, t + 256, ... (NC of them), so it quantizes only the
// 16 x values of its own chunks, once, in registers (dynamic per-token: one block max first),
// and reuses them for every row group. A row group is R rows: R x NC 16-byte loads per thread,
// all in flight at once; the loads of the CTA's next group go out before the cross-warp sum
// and the epilogue of this one. Same quantize, same int32 sums (integer adds in any order),
// same epilogue arithmetic as the kernel above: bit-identical outputs.
// Rows per group (R: R x NC 16-byte loads in flight a thread) and CTAs an SM asked of the
// register allocator (__launch_bounds__), for NC = 1..4 chunks a thread. Measured on H200
// (docs/bench/gemv-session4.md); the -D overrides are for such sweeps.
#ifndef MLCQ_GEMV1_R1
#define MLCQ_GEMV1_R1 4
#endif
#ifndef MLCQ_GEMV1_R2
#define MLCQ_GEMV1_R2 2
#endif
#ifndef MLCQ_GEMV1_R3
#define MLCQ_GEMV1_R3 3
#endif
#ifndef MLCQ_GEMV1_R4
#define MLCQ_GEMV1_R4 2
#endif
#ifndef MLCQ_GEMV1_B1
#define MLCQ_GEMV1_B1 4
#endif
#ifndef MLCQ_GEMV1_B2
#define MLCQ_GEMV1_B2 3
#endif
#ifndef MLCQ_GEMV1_B3
#define MLCQ_GEMV1_B3 3
#endif
#ifndef MLCQ_GEMV1_B4
#define MLCQ_GEMV1_B4 3
#endif
#ifndef MLCQ_GEMV1_L2HINT  // ask L2 to fetch 256-byte sectors (each warp reads 512 contiguous bytes)
#define MLCQ_GEMV1_L2HINT 0
#endif
constexpr int kMaxNC1 = 4;  // K <= 4 * 256 * 16 = 16384 (larger K: the kernel above)
constexpr int kRows1[kMaxNC1] = {MLCQ_GEMV1_R1, MLCQ_GEMV1_R2, MLCQ_GEMV1_R3, MLCQ_GEMV1_R4};
constexpr int kMinBlocks1[kMaxNC1] = {MLCQ_GEMV1_B1, MLCQ_GEMV1_B2, MLCQ_GEMV1_B3, MLCQ_GEMV1_B4};

template <int NC>
__host__ __device__ constexpr int Rows1() {
  return kRows1[NC - 1];
}

__device__ __forceinline__ int4 ld_weight(const int4* p) {
#if MLCQ_GEMV1_L2HINT
  int4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.s32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
#else
  return ld_stream(p);
#endif
}

__device__ __forceinline__ int quantize4(uint2 raw, float s, float r, float z, float lo) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
  const float2 a = __half22float2(h[0]), b = __half22float2(h[1]);
  const int q0 = quantize_one(a.x, s, r, z, lo), q1 = quantize_one(a.y, s, r, z, lo);
  const int q2 = quantize_one(b.x, s, r, z, lo), q3 = quantize_one(b.y, s, r, z, lo);
  return (q0 & 0xff) | ((q1 & 0xff) << 8) | ((q2 & 0xff) << 16) | (int(unsigned(q3) << 24));
}

template <int NC>
__global__ void __launch_bounds__(kThreads, kMinBlocks1[NC - 1]) gemv_w8a8_m1_kernel(const W8Params P) {
  mlcq::PdlWaitAndRelease();
  constexpr int R = Rows1<NC>();
  __shared__ float red_f[kWarps];
  __shared__ int red_i[kWarps];
  __shared__ int part[2][R][kWarps];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int N = P.N, K = P.K;
  const int nchunks = K / 16;
  const int n_groups = (N + R - 1) / R;
  bool has[NC];
#pragma unroll
  for (int j = 0; j < NC; ++j) has[j] = tid + j * kThreads < nchunks;

  int4 wv[R][NC];
  auto load = [&](int g) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int4* row = reinterpret_cast<const int4*>(P.w + int64_t(min(g * R + r, N - 1)) * K) + tid;
#pragma unroll
      for (int j = 0; j < NC; ++j)
        if (has[j]) wv[r][j] = ld_weight(row + j * kThreads);
    }
  };
  // Epilogue operands of row g * R + tid (threads tid < R), fetched with the group's weights so
  // that the barrier-bound epilogue does not wait a round trip to L2 for them.
  float e_sc = P.scale_col_value, e_b = 0.f;
  int e_zw = 0, e_c = 0;
  auto load_ep = [&](int g) {
    if (tid < R) {
      const int n = min(g * R + tid, N - 1);
      if (P.scale_col) e_sc = __ldg(P.scale_col + (P.scale_col_is_vector ? n : 0));
      if (P.bias) e_b = __half2float(P.bias[n]);
      if (P.asym) e_zw = __ldg(P.zw + n), e_c = __ldg(P.c + n);
    }
  };
  // The first weight loads go out before anything else: x (L2) and its quantize overlap them.
  int g = blockIdx.x;
  if (g < n_groups) {
    load(g);
    load_ep(g);
  }

  int4 xq[NC];
  float s_dyn = 1.f;
  // Scalars before x: none of them waits behind a barrier for its trip to L2.
  const float eps = P.x_mode == kXDynamic ? __ldg(P.token_eps) : 0.f;
  const float s_x = P.x_mode == kXStatic ? __ldg(P.x_scale) : 1.f;
  const float s_row = P.scale_row ? __ldg(P.scale_row) : 1.f;  // given per-token scale (null if dynamic)
  const float z = (P.x_mode == kXStatic && P.x_zero != nullptr) ? static_cast<float>(P.x_zero[0]) : 0.f;
  if (P.x_mode == kXInt8) {
    const int4* x = static_cast<const int4*>(P.x) + tid;
#pragma unroll
    for (int j = 0; j < NC; ++j) xq[j] = has[j] ? __ldg(x + j * kThreads) : make_int4(0, 0, 0, 0);
  } else {
    const uint4* x = static_cast<const uint4*>(P.x) + 2 * tid;  // 16 halves = 2 x 16 bytes a chunk
    uint4 xr[NC][2];
#pragma unroll
    for (int j = 0; j < NC; ++j) {
      if (has[j]) {
        xr[j][0] = __ldg(x + 2 * j * kThreads);
        xr[j][1] = __ldg(x + 2 * j * kThreads + 1);
      } else {
        xr[j][0] = xr[j][1] = make_uint4(0, 0, 0, 0);
      }
    }
    if (P.x_mode == kXDynamic) {
      float amax = 0.f;
#pragma unroll
      for (int j = 0; j < NC; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const __half2* v = reinterpret_cast<const __half2*>(&xr[j][h]);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float2 f = __half22float2(v[i]);
            amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
          }
        }
      amax = warp_max(amax);
      if (lane == 0) red_f[warp] = amax;
      __syncthreads();
      amax = red_f[0];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) amax = fmaxf(amax, red_f[w]);
      s_dyn = fmaxf(amax / 127.f, eps);  // as kernels.cu's dynamic kernel
    }
    const float lo = P.x_mode == kXStatic ? -128.f : -127.f;
    const float s = P.x_mode == kXStatic ? s_x : P.x_mode == kXToken ? s_row : s_dyn;
    const float rcp = 1.f / s;
#pragma unroll
    for (int j = 0; j < NC; ++j) {
      const uint2* h = reinterpret_cast<const uint2*>(&xr[j][0]);  // 4 x (4 halves)
      xq[j].x = quantize4(h[0], s, rcp, z, lo);
      xq[j].y = quantize4(h[1], s, rcp, z, lo);
      xq[j].z = quantize4(h[2], s, rcp, z, lo);
      xq[j].w = quantize4(h[3], s, rcp, z, lo);
      if (!has[j]) xq[j] = make_int4(0, 0, 0, 0);
    }
  }
  if (P.asym) {  // per-warp row sums of q(x); the first group's barrier publishes them
    int s = 0;
#pragma unroll
    for (int j = 0; j < NC; ++j) s = dot(xq[j], make_int4(0x01010101, 0x01010101, 0x01010101, 0x01010101), s);
    s = warp_sum(s);
    if (lane == 0) red_i[warp] = s;
  }
  const float sr = P.x_mode == kXDynamic ? s_dyn : s_row;

  for (int buf = 0; g < n_groups; g += gridDim.x, buf ^= 1) {
    int acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      acc[r] = 0;
#pragma unroll
      for (int j = 0; j < NC; ++j)
        if (has[j]) acc[r] = dot(wv[r][j], xq[j], acc[r]);
    }
    const int n0 = g * R;
    const float sc = e_sc, b = e_b;
    const int zw = e_zw, cn = e_c;
    if (g + int(gridDim.x) < n_groups) {  // next group's loads go out now
      load(g + gridDim.x);
      load_ep(g + gridDim.x);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      acc[r] = warp_sum(acc[r]);
      if (lane == 0) part[buf][r][warp] = acc[r];
    }
    // One barrier per group: part[buf] is rewritten two groups later, after the next barrier.
    __syncthreads();
    if (tid < R && n0 + tid < N) {
      const int n = n0 + tid;
      int32_t a = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) a += part[buf][tid][w];
      if (P.asym) {
        int rowsum = 0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) rowsum += red_i[w];
        a = a - rowsum * zw - cn;
      }
      float y = static_cast<float>(a) * sr * sc + b;
      y = y != y ? y : fminf(fmaxf(y, -65504.f), 65504.f);  // as Relax dequantize
      P.out[n] = __float2half_rn(y);
    }
  }
}

template <int MT>
__global__ void __launch_bounds__(kThreads)
    gemv_f16_kernel(int M, int N, int K, const __half* __restrict__ x, const __half* __restrict__ w,
                    const __half* __restrict__ bias, __half* __restrict__ out) {
  mlcq::PdlWaitAndRelease();
  constexpr int kUnroll = Unroll<MT>();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nchunks = K / 8;  // 8 halves = 16 bytes
  const int n_groups = (N + kRows - 1) / kRows;
  for (int g = blockIdx.x * kWarps + warp; g < n_groups; g += gridDim.x * kWarps) {
    const int n0 = g * kRows;
    const int4* wrow[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) wrow[r] = reinterpret_cast<const int4*>(w + int64_t(min(n0 + r, N - 1)) * K);
    float acc[kRows][MT];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[r][m] = 0.f;
    for (int c0 = lane; c0 < nchunks; c0 += 32 * kUnroll) {
      int4 wv[kUnroll][kRows];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int r = 0; r < kRows; ++r)
          if (c0 + u * 32 < nchunks) wv[u][r] = ld_stream(wrow[r] + c0 + u * 32);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = c0 + u * 32;
        if (c < nchunks) {
          float2 wf[kRows][4];
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            const __half2* h = reinterpret_cast<const __half2*>(&wv[u][r]);
#pragma unroll
            for (int i = 0; i < 4; ++i) wf[r][i] = __half22float2(h[i]);
          }
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            if (m < M) {
              const int4 raw = __ldg(reinterpret_cast<const int4*>(x + int64_t(m) * K) + c);
              const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
              for (int i = 0; i < 4; ++i) {
                const float2 xf = __half22float2(h[i]);
#pragma unroll
                for (int r = 0; r < kRows; ++r) {
                  acc[r][m] = fmaf(wf[r][i].x, xf.x, acc[r][m]);
                  acc[r][m] = fmaf(wf[r][i].y, xf.y, acc[r][m]);
                }
              }
            }
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[r][m] = warp_sum(acc[r][m]);
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const int n = n0 + r;
        if (lane == r * MT + m && m < M && n < N) {
          const float b = bias ? __half2float(bias[n]) : 0.f;
          out[int64_t(m) * N + n] = __float2half_rn(acc[r][m] + b);
        }
      }
  }
}

struct GemvDevice {
  int sm_count = 0, smem_per_sm = 0, smem_optin = 0;
};

const GemvDevice& GetGemvDevice(int device) {
  static std::mutex mu;
  static GemvDevice infos[64];
  static bool have[64] = {};
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0 || device >= 64) ThrowError("ValueError", "gemv: device id out of range");
  if (!have[device]) {
    GemvDevice& d = infos[device];
    MLCQ_CUDA_CHECK(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device));
    MLCQ_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
    MLCQ_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    have[device] = true;
  }
  return infos[device];
}

int MBucket(int64_t M) { return M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : 8; }
int64_t Round16(int64_t k) { return (k + 15) / 16 * 16; }
bool AlignedTo(const void* p, int bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

// CTAs of `kernel` (kThreads threads, `smem` dynamic shared bytes) one SM holds at once, from the
// occupancy calculator (registers count: 60-107 registers a thread allow 2-4 CTAs, not 8), cached.
int ResidentPerSm(const void* kernel, int smem, int device) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, smem, device);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int n = 0;
  MLCQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, smem));
  n = std::max(1, n);
  cache.emplace(key, n);
  return n;
}

// One wave of CTAs (persistent: they loop over the work), at most `work` CTAs.
int GridFor(int64_t work, int per_sm, const GemvDevice& d) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(work, int64_t(d.sm_count) * per_sm)));
}
int64_t RowGroupCtas(int64_t N) { return ((N + kRows - 1) / kRows + kWarps - 1) / kWarps; }

template <int MT, int VEC>
void LaunchW8(const W8Params& P, int device, cudaStream_t stream) {
  const GemvDevice& d = GetGemvDevice(device);
  const int smem = MT * P.kpad;
  if (smem > 48 * 1024) {
    // Cheap driver call, legal during stream capture; per launch so every device is covered.
    MLCQ_CUDA_CHECK(cudaFuncSetAttribute(gemv_w8a8_kernel<MT, VEC>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  const int per_sm = ResidentPerSm(reinterpret_cast<const void*>(gemv_w8a8_kernel<MT, VEC>), smem, device);
  LaunchPdl(kPdlGemv, gemv_w8a8_kernel<MT, VEC>, dim3(GridFor(RowGroupCtas(P.N), per_sm, d)), dim3(kThreads), smem, stream, P);
  MLCQ_CUDA_CHECK(cudaGetLastError());
}

template <int NC>
void LaunchW8M1(const W8Params& P, int device, cudaStream_t stream) {
  const GemvDevice& d = GetGemvDevice(device);
  const int per_sm = ResidentPerSm(reinterpret_cast<const void*>(gemv_w8a8_m1_kernel<NC>), 0, device);
  const int64_t groups = (int64_t(P.N) + Rows1<NC>() - 1) / Rows1<NC>();
  LaunchPdl(kPdlGemv, gemv_w8a8_m1_kernel<NC>, dim3(GridFor(groups, per_sm, d)), dim3(kThreads), 0, stream, P);
  MLCQ_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

std::string GemvW8A8Unusable(const GemmProblem& p, const GemvInput& in) {
  if (p.M < 1 || p.M > kGemvMaxM) return "gemv: M > 8";
  if (p.out_dtype != kF16) return "gemv: fp16 output only";
  if (p.bias != nullptr && p.bias_dtype != kF16) return "gemv: fp16 bias only";
  if (p.K % 4 != 0) return "gemv: K % 4 != 0";
  if (p.N > 0x7fffffff / 2 || p.K > 0x7fffffff / 16) return "gemv: N or K too large";
  if (in.x_mode != kXInt8 && in.x_dtype != kF16) return "gemv: float x must be fp16";
  if (!AlignedTo(p.w, 4) || !AlignedTo(in.x, in.x_mode == kXInt8 ? 4 : 8)) return "gemv: unaligned x or w";
  const GemvDevice& d = GetGemvDevice(p.device_id);
  if (int64_t(MBucket(p.M)) * Round16(p.K) > d.smem_optin) return "gemv: M * K exceeds shared memory";
  if (p.asym() && (p.zw == nullptr || p.c == nullptr)) return "gemv: asymmetric needs zw and c";
  return "";
}

void LaunchGemvW8A8(const GemmProblem& p, const GemvInput& in, cudaStream_t stream) {
  W8Params P;
  P.M = static_cast<int>(p.M), P.N = static_cast<int>(p.N), P.K = static_cast<int>(p.K);
  P.kpad = static_cast<int>(Round16(p.K));
  P.x_mode = in.x_mode, P.x = in.x, P.x_scale = in.x_scale, P.x_zero = in.x_zero;
  P.scale_row = in.x_mode == kXDynamic ? nullptr : p.scale_row;
  P.token_eps = in.token_eps;
  P.w = static_cast<const int8_t*>(p.w), P.out = static_cast<__half*>(p.out);
  P.scale_col = p.scale_col, P.scale_col_value = p.scale_col_value;
  P.scale_col_is_vector = p.scale_col_is_vector;
  P.bias = static_cast<const __half*>(p.bias), P.zw = p.zw, P.c = p.c, P.asym = p.asym();
  const bool v16 = p.K % 16 == 0 && AlignedTo(p.w, 16);
  // M = 1 with K = 4096..16384: the split-K kernel (every thread busy on the first chunk).
  const int64_t nchunks = p.K / 16;
  if (p.M == 1 && v16 && AlignedTo(in.x, 16) && nchunks >= kThreads && nchunks <= kMaxNC1 * kThreads) {
    switch ((nchunks + kThreads - 1) / kThreads) {
      case 1: return LaunchW8M1<1>(P, p.device_id, stream);
      case 2: return LaunchW8M1<2>(P, p.device_id, stream);
      case 3: return LaunchW8M1<3>(P, p.device_id, stream);
      default: return LaunchW8M1<4>(P, p.device_id, stream);
    }
  }
#define MLCQ_W8(MT) \
  return v16 ? LaunchW8<MT, 16>(P, p.device_id, stream) : LaunchW8<MT, 4>(P, p.device_id, stream)
  switch (MBucket(p.M)) {
    case 1: MLCQ_W8(1);
    case 2: MLCQ_W8(2);
    case 4: MLCQ_W8(4);
    default: MLCQ_W8(8);
  }
#undef MLCQ_W8
}

bool GemvF16Usable(int64_t M, int64_t N, int64_t K, const void* x, const void* w, const void* out) {
  return M >= 1 && M <= kGemvMaxM && K % 8 == 0 && N <= 0x7fffffff / 2 && K <= 0x7fffffff / 16 &&
         AlignedTo(x, 16) && AlignedTo(w, 16) && AlignedTo(out, 2);
}

void LaunchGemvF16(int64_t M, int64_t N, int64_t K, const void* x, const void* w, const void* bias,
                   void* out, int device, cudaStream_t stream) {
  const GemvDevice& d = GetGemvDevice(device);
  int per_sm = 1;
  switch (MBucket(M)) {
    case 1: per_sm = ResidentPerSm(reinterpret_cast<const void*>(gemv_f16_kernel<1>), 0, device); break;
    case 2: per_sm = ResidentPerSm(reinterpret_cast<const void*>(gemv_f16_kernel<2>), 0, device); break;
    case 4: per_sm = ResidentPerSm(reinterpret_cast<const void*>(gemv_f16_kernel<4>), 0, device); break;
    default: per_sm = ResidentPerSm(reinterpret_cast<const void*>(gemv_f16_kernel<8>), 0, device); break;
  }
  const int grid = GridFor(RowGroupCtas(N), per_sm, d);
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  const __half* xh = static_cast<const __half*>(x);
  const __half* wh = static_cast<const __half*>(w);
  const __half* bh = static_cast<const __half*>(bias);
  __half* oh = static_cast<__half*>(out);
  switch (MBucket(M)) {
    case 1: LaunchPdl(kPdlGemv, gemv_f16_kernel<1>, dim3(grid), dim3(kThreads), 0, stream, m, n, k, xh, wh, bh, oh); break;
    case 2: LaunchPdl(kPdlGemv, gemv_f16_kernel<2>, dim3(grid), dim3(kThreads), 0, stream, m, n, k, xh, wh, bh, oh); break;
    case 4: LaunchPdl(kPdlGemv, gemv_f16_kernel<4>, dim3(grid), dim3(kThreads), 0, stream, m, n, k, xh, wh, bh, oh); break;
    default: LaunchPdl(kPdlGemv, gemv_f16_kernel<8>, dim3(grid), dim3(kThreads), 0, stream, m, n, k, xh, wh, bh, oh); break;
  }
  MLCQ_CUDA_CHECK(cudaGetLastError());
}

}  // namespace mlcq
