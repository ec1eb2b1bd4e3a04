// SPDX-License-Identifier: Apache-2.0
// Paged decode attention (one query token per sequence) with the calling convention of TVM's TIR
// `batch_decode_paged_kv` (tvm/relax/frontend/nn/llm/_decode_kernels.py::_attention_decode), so
// that TIRPagedKVCache's runtime (TIRPagedDecodeFunc::MHA in src/runtime/vm/attn_backend.h) calls
// it in place of the TIR kernel:
//
//   mlcq_attn_decode_paged(q [B, Hq, D], pages [num_pages, 2, Hkv, page_size, D],
//                          page_indptr [B+1] i32, page_values [nnz_pages] i32,
//                          length_info [B] i32 (tokens in the last page of each sequence),
//                          k_rope_pos_offset [B], q_rope_position [B],
//                          output [B, Hq, D], lse [B, Hq] f32,
//                          rotary_mode, rope_scale, rope_theta, sm_scale)
//
// Semantics (as the TIR kernel): sequence b owns pages page_values[page_indptr[b]:page_indptr[b+1]]
// and kv_len = (num_pages - 1) * page_size + length_info[b] (0 without pages); token t lives in
// page page_values[page_indptr[b] + t / page_size], row t % page_size; pages[p, 0] is K, pages[p, 1]
// is V. Query head h reads kv head h / (Hq / Hkv) (GQA).
// lse = log2(sum_t exp(sm_scale * q.k_t)) (base 2, what the runtime's merge-state kernel reads).
// A sequence without keys gets output 0 and lse -5e4 (the TIR kernel's values).
// rotary_mode must be 0: K in the cache and q are already rotated (RopeMode.NORMAL), so the RoPE
// arguments are unused. The sliding-window variant ([3, B] length_info) is not handled.
//
// Work split: one CTA of 128 threads per (split, kv head, sequence). The context of a sequence is
// cut into at most `splits` chunks of >= kMinChunk tokens, decided on the device from kv_len (the
// launch shape does not depend on the lengths, so the kernel can be captured in a CUDA graph).
// Inside a CTA, D/8 lanes own one token (16-byte loads of K and V, 8 halves per lane) and the
// 128/(D/8) row groups stride over the chunk with an fp32 online softmax for all Hq/Hkv query heads
// of the kv head (K/V read once per group); the row groups merge in shared memory. With several
// chunks, each CTA writes its unnormalised partial (o, m, d) to a static device workspace and the
// last CTA of a (sequence, kv head) to finish (atomic counter, reset by it) merges them: one
// launch, no allocation, no host-side knowledge of the lengths.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include <cmath>
#include <cstdint>
#include "mlcq_pdl.h"

namespace mlcq_decode {
// Internal linkage: every model library links its own copy (own workspace, own counters).
namespace {

constexpr int kThreads = 128;
constexpr int kMinChunk = 32;    // fewest tokens a split gets
constexpr int kMaxSplits = 32;
constexpr int kWsRows = 8192;    // partial rows (sequence, q head, split) in the workspace
constexpr int kMaxCounters = 16384;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kEmptyLse = -5e4f;

__device__ float g_ws_o[kWsRows * 128];
__device__ float2 g_ws_md[kWsRows];
__device__ int g_counters[kMaxCounters];

struct Params {
  const half* q;
  const half* pages;
  const int32_t* page_indptr;
  const int32_t* page_values;
  const int32_t* last_len;
  half* out;
  float* lse;
  int hq, hkv, page_size, splits;
  int64_t page_stride;  // elements between pages (2 * Hkv * page_size * D)
  int64_t kv_stride;    // K -> V (Hkv * page_size * D)
  float scale_log2;
};

__device__ __forceinline__ void Unpack(const uint4& u, float (&f)[8]) {
  const half2* h = reinterpret_cast<const half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

template <int D, int G>
__global__ void __launch_bounds__(kThreads) DecodeKernel(Params p) {
  mlcq::PdlWaitAndRelease();
  constexpr int L = D / 8;             // lanes per token
  constexpr int RG = kThreads / L;     // row groups (tokens in flight per step)
  constexpr int U = G <= 2 ? 4 : 2;    // tokens per row group per step
  __shared__ float s_o[RG][G][D];
  __shared__ float s_m[RG][G];
  __shared__ float s_d[RG][G];
  __shared__ int s_last;

  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, rg = tid / L, lane = tid % L;
  const int begin = p.page_indptr[b], end = p.page_indptr[b + 1];
  const int len = begin != end ? (end - begin - 1) * p.page_size + p.last_len[b] : 0;
  int chunk = (len + p.splits - 1) / p.splits;
  chunk = chunk < kMinChunk ? kMinChunk : chunk;
  int active = (len + chunk - 1) / chunk;
  active = active < 1 ? 1 : active;
  if (split >= active) return;
  const int t0 = split * chunk, t1 = min(len, t0 + chunk);

  // q (scaled to log2 units) for the G query heads of this kv head: 8 dims per lane
  float q[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const uint4 u = *reinterpret_cast<const uint4*>(p.q + ((int64_t)b * p.hq + kvh * G + g) * D + lane * 8);
    Unpack(u, q[g]);
#pragma unroll
    for (int i = 0; i < 8; ++i) q[g][i] *= p.scale_log2;
  }
  float m[G], d[G], o[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    d[g] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) o[g][i] = 0.f;
  }

  const half* kbase = p.pages + (int64_t)kvh * p.page_size * D + lane * 8;
  // The trip count is uniform over the CTA (the shuffles below need every lane of a warp).
  for (int base = t0; base < t1; base += RG * U) {
    const int t = base + rg * U;
    uint4 kr[U], vr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int tok = t + u;
      if (tok < t1) {
        const int page = __ldg(p.page_values + begin + tok / p.page_size);
        const half* ptr = kbase + (int64_t)page * p.page_stride + (int64_t)(tok % p.page_size) * D;
        kr[u] = __ldg(reinterpret_cast<const uint4*>(ptr));
        vr[u] = __ldg(reinterpret_cast<const uint4*>(ptr + p.kv_stride));
      } else {
        kr[u] = make_uint4(0, 0, 0, 0);
        vr[u] = make_uint4(0, 0, 0, 0);
      }
    }
    float s[U][G];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[8];
      Unpack(kr[u], kf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc = fmaf(q[g][i], kf[i], acc);
#pragma unroll
        for (int off = L / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        s[u][g] = t + u < t1 ? acc : -INFINITY;
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mn = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u) mn = fmaxf(mn, s[u][g]);
      mn = mn == -INFINITY ? 0.f : mn;  // nothing seen yet: f = 0, p = 0 (no inf - inf)
      const float f = exp2f(m[g] - mn);
      d[g] *= f;
#pragma unroll
      for (int i = 0; i < 8; ++i) o[g][i] *= f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float pr = exp2f(s[u][g] - mn);
        d[g] += pr;
        float vf[8];
        Unpack(vr[u], vf);
#pragma unroll
        for (int i = 0; i < 8; ++i) o[g][i] = fmaf(pr, vf[i], o[g][i]);
      }
      m[g] = d[g] > 0.f ? mn : -INFINITY;
    }
  }

  // merge the row groups
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int i = 0; i < 8; ++i) s_o[rg][g][lane * 8 + i] = o[g][i];
    if (lane == 0) {
      s_m[rg][g] = m[g];
      s_d[rg][g] = d[g];
    }
  }
  __syncthreads();
  const int64_t row0 = (int64_t)b * p.hq + kvh * G;  // first q head row of this CTA
  for (int idx = tid; idx < G * D; idx += kThreads) {
    const int g = idx / D, c = idx % D;
    float mx = -INFINITY;
#pragma unroll 4
    for (int r = 0; r < RG; ++r) mx = fmaxf(mx, s_m[r][g]);
    float den = 0.f, acc = 0.f;
    if (mx != -INFINITY) {
#pragma unroll 4
      for (int r = 0; r < RG; ++r) {
        const float f = exp2f(s_m[r][g] - mx);
        den += s_d[r][g] * f;
        acc += s_o[r][g][c] * f;
      }
    }
    if (active == 1) {
      p.out[(row0 + g) * D + c] = __float2half_rn(den > 0.f ? acc / den : 0.f);
      if (c == 0) p.lse[row0 + g] = den > 0.f ? mx + log2f(den) : kEmptyLse;
    } else {
      const int64_t w = (row0 + g) * p.splits + split;
      g_ws_o[w * D + c] = acc;
      if (c == 0) g_ws_md[w] = make_float2(mx, den);
    }
  }
  if (active == 1) return;

  // last CTA of this (sequence, kv head) merges the splits
  __threadfence();
  __syncthreads();
  int* counter = &g_counters[b * p.hkv + kvh];
  if (tid == 0) {
    const int prev = atomicAdd(counter, 1);
    s_last = prev == active - 1;
    if (s_last) *counter = 0;  // every split has arrived: ready for the next launch
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  for (int idx = tid; idx < G * D; idx += kThreads) {
    const int g = idx / D, c = idx % D;
    const int64_t w0 = (row0 + g) * p.splits;
    float mx = -INFINITY;
    for (int sp = 0; sp < active; ++sp) mx = fmaxf(mx, __ldcg(&g_ws_md[w0 + sp]).x);
    float den = 0.f, acc = 0.f;
    for (int sp = 0; sp < active; ++sp) {
      const float2 md = __ldcg(&g_ws_md[w0 + sp]);
      const float f = md.x == -INFINITY ? 0.f : exp2f(md.x - mx);
      den += md.y * f;
      acc += __ldcg(&g_ws_o[(w0 + sp) * D + c]) * f;
    }
    p.out[(row0 + g) * D + c] = __float2half_rn(den > 0.f ? acc / den : 0.f);
    if (c == 0) p.lse[row0 + g] = den > 0.f ? mx + log2f(den) : kEmptyLse;
  }
}

// ------------------------------------------------------------------------------------------------
// tvm-ffi entry point

using tvm::ffi::TensorView;

constexpr int kMaxDevices = 64;

template <typename T>
T* Ptr(const TensorView& t) {
  return reinterpret_cast<T*>(static_cast<char*>(t.data_ptr()) + t.byte_offset());
}

void CheckCuda(const TensorView& t, const char* what) {
  if (t.device().device_type != kDLCUDA) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_decode_paged: " << what << " must be on a CUDA device";
  }
  if (!t.IsContiguous()) TVM_FFI_THROW(ValueError) << "mlcq_attn_decode_paged: " << what << " must be contiguous";
}

void CheckHalf(const TensorView& t, const char* what) {
  if (t.dtype().code != kDLFloat || t.dtype().bits != 16 || t.dtype().lanes != 1) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_decode_paged: " << what << " must be float16";
  }
  CheckCuda(t, what);
  if (reinterpret_cast<uintptr_t>(Ptr<half>(t)) % 16 != 0) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_decode_paged: " << what << " must be 16-byte aligned";
  }
}

void CheckInt(const TensorView& t, const char* what, int64_t n) {
  if (t.ndim() != 1 || t.dtype().code != kDLInt || t.dtype().bits != 32 || (n >= 0 && t.shape()[0] != n)) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_decode_paged: " << what << " must be an int32 vector"
                              << (n >= 0 ? " of the batch's length" : "");
  }
  CheckCuda(t, what);
}

int NumSMs(int device) {
  static int cached[kMaxDevices] = {};
  if (device >= 0 && device < kMaxDevices && cached[device] > 0) return cached[device];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) n = 132;
  if (device >= 0 && device < kMaxDevices) cached[device] = n;
  return n;
}

template <int D, int G>
void LaunchG(const Params& p, int batch, cudaStream_t stream) {
  dim3 grid(p.splits, p.hkv, batch);
  mlcq::LaunchPdl(mlcq::kPdlAttn, DecodeKernel<D, G>, grid, dim3(kThreads), 0, stream, p);
}

template <int D>
void LaunchD(const Params& p, int group, int batch, cudaStream_t stream) {
  switch (group) {
    case 1: return LaunchG<D, 1>(p, batch, stream);
    case 2: return LaunchG<D, 2>(p, batch, stream);
    case 3: return LaunchG<D, 3>(p, batch, stream);
    case 4: return LaunchG<D, 4>(p, batch, stream);
    case 5: return LaunchG<D, 5>(p, batch, stream);
    case 6: return LaunchG<D, 6>(p, batch, stream);
    case 7: return LaunchG<D, 7>(p, batch, stream);
    case 8: return LaunchG<D, 8>(p, batch, stream);
    default: TVM_FFI_THROW(ValueError) << "mlcq_attn_decode_paged: group size " << group << " (supported: 1..8)";
  }
}

void DecodePaged(TensorView q, TensorView pages, TensorView page_indptr, TensorView page_values,
                 TensorView length_info, TensorView k_rope_pos_offset, TensorView q_rope_position,
                 TensorView output, TensorView lse, int64_t rotary_mode, double rope_scale, double rope_theta,
                 double sm_scale) {
  (void)k_rope_pos_offset;
  (void)q_rope_position;
  (void)rope_scale;
  (void)rope_theta;
  if (rotary_mode != 0) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_decode_paged: inline RoPE (rotary_mode 1) is not supported; "
                                 "use RopeMode.NORMAL";
  }
  if (q.ndim() != 3) TVM_FFI_THROW(ValueError) << "mlcq_attn_decode_paged: q must be [batch, heads, head_dim]";
  const int64_t batch = q.shape()[0], hq = q.shape()[1], d = q.shape()[2];
  if (d != 64 && d != 128) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_decode_paged: head_dim " << d << " (supported: 64, 128)";
  }
  if (pages.ndim() != 5 || pages.shape()[1] != 2 || pages.shape()[4] != d) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_decode_paged: pages must be [num_pages, 2, kv_heads, page_size, "
                              << d << "]";
  }
  const int64_t hkv = pages.shape()[2], page_size = pages.shape()[3];
  if (hkv < 1 || hq % hkv != 0) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_decode_paged: " << hq << " heads / " << hkv << " kv heads";
  }
  if (output.ndim() != 3 || output.shape()[0] != batch || output.shape()[1] != hq || output.shape()[2] != d) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_decode_paged: output must be [batch, heads, head_dim] like q";
  }
  if (lse.ndim() != 2 || lse.dtype().code != kDLFloat || lse.dtype().bits != 32 || lse.shape()[0] != batch ||
      lse.shape()[1] != hq) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_decode_paged: lse must be float32 [batch, heads]";
  }
  if (length_info.ndim() != 1) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_decode_paged: length_info must be [batch] (the sliding-window "
                                 "[3, batch] form is not supported)";
  }
  CheckHalf(q, "q");
  CheckHalf(pages, "pages");
  CheckHalf(output, "output");
  CheckCuda(lse, "lse");
  CheckInt(page_indptr, "page_indptr", batch + 1);
  CheckInt(page_values, "page_values", -1);
  CheckInt(length_info, "length_info", batch);
  if (batch == 0 || hq == 0) return;
  if (batch > 65535 || hkv > 65535) TVM_FFI_THROW(ValueError) << "mlcq_attn_decode_paged: batch/heads too large";

  Params p;
  p.q = Ptr<const half>(q);
  p.pages = Ptr<const half>(pages);
  p.page_indptr = Ptr<const int32_t>(page_indptr);
  p.page_values = Ptr<const int32_t>(page_values);
  p.last_len = Ptr<const int32_t>(length_info);
  p.out = Ptr<half>(output);
  p.lse = Ptr<float>(lse);
  p.hq = static_cast<int>(hq);
  p.hkv = static_cast<int>(hkv);
  p.page_size = static_cast<int>(page_size);
  p.kv_stride = hkv * page_size * d;
  p.page_stride = 2 * p.kv_stride;
  p.scale_log2 = static_cast<float>(sm_scale) * kLog2e;
  // Splits: about two CTAs per SM over all (sequence, kv head) pairs; each split is cut on the
  // device to >= kMinChunk tokens, so short contexts use fewer.
  const int device = q.device().device_id;
  int64_t splits = (2 * NumSMs(device) + batch * hkv - 1) / (batch * hkv);
  splits = splits < 1 ? 1 : (splits > kMaxSplits ? kMaxSplits : splits);
  if (batch * hq * splits > kWsRows) splits = kWsRows / (batch * hq);
  if (splits < 1 || batch * hkv > kMaxCounters) splits = 1;
  p.splits = static_cast<int>(splits);
  cudaStream_t stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  const int group = static_cast<int>(hq / hkv);
  if (d == 64) {
    LaunchD<64>(p, group, static_cast<int>(batch), stream);
  } else {
    LaunchD<128>(p, group, static_cast<int>(batch), stream);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    TVM_FFI_THROW(RuntimeError) << "mlcq_attn_decode_paged: launch failed: " << cudaGetErrorString(err);
  }
}

}  // namespace
}  // namespace mlcq_decode

TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_attn_decode_paged, mlcq_decode::DecodePaged);
