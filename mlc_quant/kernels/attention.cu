// SPDX-License-Identifier: Apache-2.0
// Tensor-core ragged prefill attention (FlashAttention-2 style, mma.sync m16n8k16, fp16 in, fp32
// accumulate) with the calling convention of TVM's TIR `batch_prefill_ragged_kv`
// (tvm/relax/frontend/nn/llm/_prefill_kernels.py::_attention_prefill_ragged), so that
// TIRPagedKVCache's runtime (TIRRaggedPrefillFunc::MHA) calls it in place of the TIR kernel:
//
//   mlcq_attn_prefill_ragged(q [Lq, Hq, D], q_indptr [B+1] i32, k [Lk, Hkv, D], v [Lk, Hkv, D],
//                            kv_indptr [B+1] i32, q_rope_position, k_rope_pos_offset,
//                            output [Lq, Hq, D], lse [Lq, Hq] f32,
//                            causal, rotary_mode, rope_scale, rope_theta, sm_scale)
//
// Semantics (as the TIR kernel): for sequence b, rows q[q_indptr[b]:q_indptr[b+1]] attend to
// k/v[kv_indptr[b]:kv_indptr[b+1]]; causal masks column c of row r unless
// c < kv_len - q_len + r + 1; query head h reads kv head h / (Hq / Hkv) (GQA);
// lse = log2(sum_c exp(sm_scale * q.k_c)) (base 2, what the runtime's merge-state kernel reads).
// A row that sees no key gets output 0 and lse -5e4 (the TIR kernel's value for kv_len == 0).
// rotary_mode must be 0: RoPE is applied before attention (RopeMode.NORMAL).
//
// Tiling: a CTA of 4 warps owns 64 query rows of one head (16 rows per warp, Q fragments kept in
// registers); K/V tiles of 64 keys are double-buffered in shared memory with cp.async; S and P
// stay in registers (the m16n8 accumulator layout of S is the A-operand layout of P @ V).
// D = 64 or 128, fp16 only.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include "mlcq_pdl.h"

namespace mlcq_attn {
// Internal linkage throughout: every model library links its own copy of this file, and a
// template's function-local static with external linkage would be one (GNU unique) object shared
// by all loaded libraries, so a second library would skip its own cudaFuncSetAttribute.
namespace {

constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kEmptyLse = -5e4f;

template <int D>
struct Cfg {
  static constexpr int kStride = D + 8;  // halves per smem row: +16 B keeps ldmatrix conflict-free
  static constexpr int kTileElems = kBlockN * kStride;
  static constexpr int kSmemBytes = (kBlockM * kStride + 4 * kTileElems) * 2;  // Q, K[2], V[2]
};

struct Params {
  const half* q;
  const half* k;
  const half* v;
  half* out;
  float* lse;
  const int32_t* q_indptr;
  const int32_t* kv_indptr;
  int64_t q_row_stride, q_head_stride;
  int64_t k_row_stride, k_head_stride;
  int64_t v_row_stride, v_head_stride;
  int64_t o_row_stride, o_head_stride;
  int64_t lse_row_stride, lse_head_stride;
  int batch;
  int sms;     // SMs of the device, 0: plain heaviest-first order (see CtaRank)
  int per_sm;  // CTAs of this kernel resident per SM
  int group;  // Hq / Hkv
  int causal;
  float scale_log2;  // sm_scale * log2(e)
};

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool pred) {
  const int n = pred ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void Ldsm4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void Ldsm4T(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t PackHalf2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Copy rows [row0, row0 + rows) (relative to `base`, `n_valid` of them exist) of D halves into
// smem rows of kStride halves; missing rows are zero-filled.
template <int D>
__device__ __forceinline__ void LoadTile(half* smem, const half* base, int64_t row_stride, int row0, int rows,
                                         int n_valid, int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int i = tid; i < rows * kChunks; i += kThreads) {
    const int r = i / kChunks, c = i % kChunks;
    const bool ok = row0 + r < n_valid;
    const half* src = ok ? base + (int64_t)(row0 + r) * row_stride + c * 8 : base;
    CpAsync16(SmemAddr(smem + r * Cfg<D>::kStride + c * 8), src, ok);
  }
}

// Work rank of this CTA (0 = the most keys). CTAs are numbered heaviest first, so that under the
// causal mask the longest ones start first. When the whole grid is resident at once (e.g. 512
// tokens x 32 heads: 256 CTAs, 2 per SM on 132 SMs), the block scheduler places CTA i on SM
// i mod SMs, so in plain order SM 0 would get ranks 0 and 132: the heaviest block and one of
// the heavier half. Every second round of SMs is numbered in reverse instead (a snake), so the
// heaviest CTA shares its SM with the lightest and every SM gets about the same number of tiles.
__device__ __forceinline__ int CtaRank(const Params& p) {
  const int n = gridDim.x * gridDim.y;
  const int i = blockIdx.y * gridDim.x + blockIdx.x;
  if (p.sms <= 0 || n > p.sms * p.per_sm) return i;
  const int round = i / p.sms, lo = round * p.sms, hi = min(n, lo + p.sms);
  return (round & 1) ? hi - 1 - (i - lo) : i;
}

template <int D>
__global__ void __launch_bounds__(kThreads) PrefillRaggedKernel(Params p) {
  mlcq::PdlWaitAndRelease();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  half* q_s = reinterpret_cast<half*>(smem_raw);
  half* k_s = q_s + kBlockM * Cfg<D>::kStride;  // 2 buffers
  half* v_s = k_s + 2 * Cfg<D>::kTileElems;     // 2 buffers

  const int rank = CtaRank(p);
  const int head = rank % gridDim.x;
  const int kv_head = head / p.group;
  // Find (sequence, query block) of this CTA; blocks of a sequence run last-first (the causal
  // ones with the most keys start first).
  int t = rank / gridDim.x, seq = -1, q_begin = 0, q_len = 0, mblk = 0;
  for (int b = 0; b < p.batch; ++b) {
    const int lo = p.q_indptr[b], hi = p.q_indptr[b + 1];
    const int nblk = (hi - lo + kBlockM - 1) / kBlockM;
    if (t < nblk) {
      seq = b;
      q_begin = lo;
      q_len = hi - lo;
      mblk = nblk - 1 - t;
      break;
    }
    t -= nblk;
  }
  if (seq < 0) return;
  const int kv_begin = p.kv_indptr[seq];
  const int kv_len = p.kv_indptr[seq + 1] - kv_begin;
  const int m0 = mblk * kBlockM;  // first query row of the block, within the sequence
  const int off = kv_len - q_len;  // causal: row r sees columns c <= r + off
  int n_cols = kv_len;
  if (p.causal) n_cols = min(n_cols, min(m0 + kBlockM, q_len) - 1 + off + 1);
  const int n_tiles = n_cols > 0 ? (n_cols + kBlockN - 1) / kBlockN : 0;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;

  const half* q_base = p.q + (int64_t)q_begin * p.q_row_stride + (int64_t)head * p.q_head_stride;
  const half* k_base = p.k + (int64_t)kv_begin * p.k_row_stride + (int64_t)kv_head * p.k_head_stride;
  const half* v_base = p.v + (int64_t)kv_begin * p.v_row_stride + (int64_t)kv_head * p.v_head_stride;

  LoadTile<D>(q_s, q_base, p.q_row_stride, m0, kBlockM, q_len, tid);
  CpAsyncCommit();
  if (n_tiles > 0) {
    LoadTile<D>(k_s, k_base, p.k_row_stride, 0, kBlockN, kv_len, tid);
    LoadTile<D>(v_s, v_base, p.v_row_stride, 0, kBlockN, kv_len, tid);
  }
  CpAsyncCommit();

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};
  uint32_t qf[D / 16][4];
  // Query rows (within the sequence) of this thread's accumulator rows.
  const int row_a = m0 + warp * 16 + g, row_b = row_a + 8;

  for (int j = 0; j < n_tiles; ++j) {
    if (j + 1 < n_tiles) {
      const int nb = (j + 1) & 1;
      LoadTile<D>(k_s + nb * Cfg<D>::kTileElems, k_base, p.k_row_stride, (j + 1) * kBlockN, kBlockN, kv_len, tid);
      LoadTile<D>(v_s + nb * Cfg<D>::kTileElems, v_base, p.v_row_stride, (j + 1) * kBlockN, kBlockN, kv_len, tid);
      CpAsyncCommit();
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const half* a = q_s + (warp * 16 + (lane % 16)) * Cfg<D>::kStride + kk * 16 + (lane / 16) * 8;
        Ldsm4(qf[kk], SmemAddr(a));
      }
    }
    const half* kt = k_s + (j & 1) * Cfg<D>::kTileElems;
    const half* vt = v_s + (j & 1) * Cfg<D>::kTileElems;

    // S = Q K^T (16 x 64 per warp)
    float s[kBlockN / 8][4];
#pragma unroll
    for (int i = 0; i < kBlockN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < kBlockN / 16; ++np) {
        uint32_t b[4];
        const int mi = lane / 8;
        const half* addr = kt + (np * 16 + (mi / 2) * 8 + (lane % 8)) * Cfg<D>::kStride + kk * 16 + (mi % 2) * 8;
        Ldsm4(b, SmemAddr(addr));
        Mma(s[2 * np], qf[kk], b[0], b[1]);
        Mma(s[2 * np + 1], qf[kk], b[2], b[3]);
      }
    }

    // scale, mask, online softmax (base 2)
    const int c0 = j * kBlockN;
    const bool need_mask = (c0 + kBlockN > kv_len) || (p.causal && c0 + kBlockN - 1 > m0 + off);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * p.scale_log2;
        if (need_mask) {
          const int col = c0 + nt * 8 + 2 * t4 + (e & 1);
          const int row = e < 2 ? row_a : row_b;
          if (col >= kv_len || (p.causal && col > row + off)) x = -INFINITY;
        }
        s[nt][e] = x;
        mx[e / 2] = fmaxf(mx[e / 2], x);
      }
    }
    float alpha[2], m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffff, mx[r], 2));
      const float m_new = fmaxf(m_run[r], mx[r]);
      m_use[r] = m_new == -INFINITY ? 0.f : m_new;
      alpha[r] = exp2f(m_run[r] - m_use[r]);  // 0 while m_run is -inf
      m_run[r] = m_new;
    }
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = exp2f(s[nt][e] - m_use[e / 2]);
        s[nt][e] = pe;
        rs[e / 2] += pe;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * alpha[r] + rs[r];  // per-thread partial sums
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }

    // O += P V
#pragma unroll
    for (int kc = 0; kc < kBlockN / 16; ++kc) {
      uint32_t a[4];
      a[0] = PackHalf2(s[2 * kc][0], s[2 * kc][1]);
      a[1] = PackHalf2(s[2 * kc][2], s[2 * kc][3]);
      a[2] = PackHalf2(s[2 * kc + 1][0], s[2 * kc + 1][1]);
      a[3] = PackHalf2(s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        const int mi = lane / 8;
        const half* addr = vt + (kc * 16 + (mi % 2) * 8 + (lane % 8)) * Cfg<D>::kStride + dp * 16 + (mi / 2) * 8;
        Ldsm4T(b, SmemAddr(addr));
        Mma(o[2 * dp], a, b[0], b[1]);
        Mma(o[2 * dp + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // the buffer just read is refilled in the next iteration
  }
  CpAsyncWait<0>();

  // epilogue: O / l, lse = m + log2(l)
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] += __shfl_xor_sync(0xffffffff, l_run[r], 1);
    l_run[r] += __shfl_xor_sync(0xffffffff, l_run[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r == 0 ? row_a : row_b;
    if (row >= q_len) continue;
    const bool empty = !(l_run[r] > 0.f);
    const float inv = empty ? 0.f : 1.f / l_run[r];
    half* orow = p.out + (int64_t)(q_begin + row) * p.o_row_stride + (int64_t)head * p.o_head_stride;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<__half2*>(orow + dt * 8 + 2 * t4) =
          __floats2half2_rn(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    }
    if (t4 == 0) {
      p.lse[(int64_t)(q_begin + row) * p.lse_row_stride + (int64_t)head * p.lse_head_stride] =
          empty ? kEmptyLse : m_run[r] + log2f(l_run[r]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// tvm-ffi entry point

using tvm::ffi::TensorView;

template <typename T>
T* Ptr(const TensorView& t) {
  return reinterpret_cast<T*>(static_cast<char*>(t.data_ptr()) + t.byte_offset());
}

void CheckHalf3(const TensorView& t, const char* what, int64_t d) {
  if (t.ndim() != 3 || t.dtype().code != kDLFloat || t.dtype().bits != 16 || t.dtype().lanes != 1) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_prefill_ragged: " << what << " must be a 3-d float16 tensor";
  }
  if (t.device().device_type != kDLCUDA) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_prefill_ragged: " << what << " must be on a CUDA device";
  }
  if (t.shape()[2] != d || !t.IsContiguous() || reinterpret_cast<uintptr_t>(Ptr<half>(t)) % 16 != 0) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_prefill_ragged: " << what
                              << " must be contiguous, head_dim " << d << ", 16-byte aligned";
  }
}

void CheckIndptr(const TensorView& t, const char* what) {
  if (t.ndim() != 1 || t.dtype().code != kDLInt || t.dtype().bits != 32 || t.shape()[0] < 1 ||
      t.device().device_type != kDLCUDA || !t.IsContiguous()) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_prefill_ragged: " << what << " must be a contiguous int32 device vector";
  }
}

constexpr int kMaxDevices = 64;

// MLC_QUANT_ATTN_ORDER=plain keeps the heaviest-first order without the snake (CtaRank), for
// before/after measurements.
bool BalancedOrder() {
  static const bool on = [] {
    const char* v = std::getenv("MLC_QUANT_ATTN_ORDER");
    return v == nullptr || std::strcmp(v, "plain") != 0;
  }();
  return on;
}

template <int D>
void Launch(const Params& p, int heads, int64_t max_blocks, int device, cudaStream_t stream) {
  // > 48 KB of dynamic shared memory must be allowed once per kernel and device.
  // With it, the SM count and CTAs per SM for CtaRank.
  static bool configured[kMaxDevices] = {};
  static int sms[kMaxDevices] = {}, per_sm[kMaxDevices] = {};
  const bool cached = device >= 0 && device < kMaxDevices;
  if (!cached || !configured[device]) {
    cudaError_t err = cudaFuncSetAttribute(PrefillRaggedKernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           Cfg<D>::kSmemBytes);
    if (err != cudaSuccess) {
      TVM_FFI_THROW(RuntimeError) << "mlcq_attn_prefill_ragged: cudaFuncSetAttribute failed: "
                                  << cudaGetErrorString(err);
    }
    int n_sms = 0, n_per_sm = 0;
    if (cudaDeviceGetAttribute(&n_sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n_per_sm, PrefillRaggedKernel<D>, kThreads,
                                                      Cfg<D>::kSmemBytes) != cudaSuccess) {
      cudaGetLastError();
      n_sms = n_per_sm = 0;  // plain order
    }
    if (cached) {
      sms[device] = n_sms;
      per_sm[device] = n_per_sm;
      configured[device] = true;
    }
  }
  Params q = p;
  q.sms = cached && BalancedOrder() ? sms[device] : 0;
  q.per_sm = cached ? per_sm[device] : 0;
  dim3 grid(heads, static_cast<unsigned>(max_blocks));
  mlcq::LaunchPdl(mlcq::kPdlAttn, PrefillRaggedKernel<D>, grid, dim3(kThreads), Cfg<D>::kSmemBytes, stream, q);
}

void PrefillRagged(TensorView q, TensorView q_indptr, TensorView k, TensorView v, TensorView kv_indptr,
                   TensorView q_rope_position, TensorView k_rope_pos_offset, TensorView output, TensorView lse,
                   int64_t causal, int64_t rotary_mode, double rope_scale, double rope_theta, double sm_scale) {
  (void)q_rope_position;
  (void)k_rope_pos_offset;
  (void)rope_scale;
  (void)rope_theta;
  if (rotary_mode != 0) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_prefill_ragged: inline RoPE (rotary_mode 1) is not supported; "
                                 "use RopeMode.NORMAL";
  }
  if (q.ndim() != 3) TVM_FFI_THROW(ValueError) << "mlcq_attn_prefill_ragged: q must be [len, heads, head_dim]";
  const int64_t d = q.shape()[2];
  if (d != 64 && d != 128) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_prefill_ragged: head_dim " << d << " (supported: 64, 128)";
  }
  CheckHalf3(q, "q", d);
  CheckHalf3(k, "k", d);
  CheckHalf3(v, "v", d);
  CheckHalf3(output, "output", d);
  CheckIndptr(q_indptr, "q_indptr");
  CheckIndptr(kv_indptr, "kv_indptr");
  const int64_t len_q = q.shape()[0], hq = q.shape()[1], hkv = k.shape()[1];
  if (hkv < 1 || hq % hkv != 0 || v.shape()[1] != hkv || v.shape()[0] != k.shape()[0] ||
      output.shape()[0] != len_q || output.shape()[1] != hq) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_prefill_ragged: inconsistent shapes (q heads " << hq << ", kv heads "
                              << hkv << ")";
  }
  if (lse.ndim() != 2 || lse.dtype().code != kDLFloat || lse.dtype().bits != 32 || lse.shape()[0] != len_q ||
      lse.shape()[1] != hq || !lse.IsContiguous()) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_prefill_ragged: lse must be float32 [len, heads]";
  }
  if (kv_indptr.shape()[0] != q_indptr.shape()[0]) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_prefill_ragged: q_indptr and kv_indptr differ in length";
  }
  Params p;
  p.q = Ptr<const half>(q);
  p.k = Ptr<const half>(k);
  p.v = Ptr<const half>(v);
  p.out = Ptr<half>(output);
  p.lse = Ptr<float>(lse);
  p.q_indptr = Ptr<const int32_t>(q_indptr);
  p.kv_indptr = Ptr<const int32_t>(kv_indptr);
  // Compact row-major tensors (checked above): [len, heads, d].
  p.q_row_stride = hq * d;
  p.q_head_stride = d;
  p.k_row_stride = hkv * d;
  p.k_head_stride = d;
  p.v_row_stride = hkv * d;
  p.v_head_stride = d;
  p.o_row_stride = hq * d;
  p.o_head_stride = d;
  p.lse_row_stride = hq;
  p.lse_head_stride = 1;
  p.batch = static_cast<int>(q_indptr.shape()[0] - 1);
  p.group = static_cast<int>(hq / hkv);
  p.causal = causal != 0;
  p.scale_log2 = static_cast<float>(sm_scale) * kLog2e;
  // Upper bound of the query blocks of all sequences: sum ceil(len_b / M) <= (Lq + B (M - 1)) / M.
  const int64_t max_blocks = (len_q + static_cast<int64_t>(p.batch) * (kBlockM - 1)) / kBlockM;
  if (max_blocks == 0 || p.batch == 0 || hq == 0) return;
  if (max_blocks > 65535) {
    TVM_FFI_THROW(ValueError) << "mlcq_attn_prefill_ragged: too many query blocks (" << max_blocks << ")";
  }
  cudaStream_t stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, q.device().device_id));
  if (d == 64) {
    Launch<64>(p, static_cast<int>(hq), max_blocks, q.device().device_id, stream);
  } else {
    Launch<128>(p, static_cast<int>(hq), max_blocks, q.device().device_id, stream);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    TVM_FFI_THROW(RuntimeError) << "mlcq_attn_prefill_ragged: launch failed: " << cudaGetErrorString(err);
  }
}

}  // namespace
}  // namespace mlcq_attn

TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_attn_prefill_ragged, mlcq_attn::PrefillRagged);
