// SPDX-License-Identifier: Apache-2.0
// W8A8 GEMM for Hopper (sm_90a) with the dequantize fused into the CUTLASS epilogue:
//
//   out[m, n] = f16_sat( (corr(acc)[m, n] * s_row[m]) * s_col[n] + bias[n] )
//   corr(acc) = acc - rowsum_x[m] * zw[n] - c[n]          (asymmetric variant only, exact int32)
//
// x [M, K] int8 row-major (A, K-major), wq [N, K] int8 row-major (B, K-major), out [M, N] fp16.
// Every vector operand is optional (null pointer -> neutral default), and s_col may also be a
// single scalar: one kernel covers per-tensor, per-channel, per-token x per-channel and the
// asymmetric scheme. The epilogue is an EVT (epilogue visitor tree), so the scales are applied in
// registers before the single TMA store of fp16 - no int32 round trip through memory.
//
// With -DMLCQ_EPI=1 the epilogue is instead SiLU * up + the static int8 quantize of the next
// linear (the gate/up GEMM of a W8A8 MLP, weight rows of gate and up interleaved in blocks of 8):
//
//   q[m, j] = clamp(rint(fp16(silu(g) * u) / s) + z, -128, 127),  g / u = fp16(out) of the gate /
//   up column of j,  q [M, N / 2] int8,  optionally rowsum[m] += sum_j q[m, j]
//
// the same arithmetic as the fp16 store + norm_act.cu's SiLU * up quantize kernel, so q is the
// same bit for bit, but the GEMM writes a quarter of the bytes and the SiLU kernel is gone.
//
// This translation unit is compiled once per (tile config, variant, epilogue): the build passes
// -DMLCQ_CFG=<n>, -DMLCQ_ASYM=<0|1> and -DMLCQ_EPI=<0|1>, so the slow CUTLASS template
// instantiations compile in parallel and are cached separately (see build.py).
#include <atomic>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "mlcq_internal.h"
#include "mlcq_pdl.h"
#include "mlcq_quant.h"

#ifndef MLCQ_CFG
#define MLCQ_CFG 0
#endif
#ifndef MLCQ_ASYM
#define MLCQ_ASYM 0
#endif
#ifndef MLCQ_EPI
#define MLCQ_EPI 0
#endif

namespace mlcq {
namespace cutlass_sm90 {

using namespace cute;

// ---- epilogue functors (ComputeFn<Array<T, N>> as Sm90Compute wants them) ----

// Exact int32 zero-point correction: acc - rs * zw - c (wraps like the Relax reference).
template <class T>
struct ZeroPointCorrection {
  CUTLASS_HOST_DEVICE T operator()(T acc, T rs, T zw, T c) const { return acc - rs * zw - c; }
};
template <int N>
struct ZeroPointCorrection<cutlass::Array<int32_t, N>> {
  using A = cutlass::Array<int32_t, N>;
  CUTLASS_HOST_DEVICE A operator()(A const& acc, A const& rs, A const& zw, A const& c) const {
    A r;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) r[i] = acc[i] - rs[i] * zw[i] - c[i];
    return r;
  }
};

// (a * s_row) * s_col + bias, saturated to the fp16 range like Relax's dequantize (clip to
// +-65504 before the cast); NaN passes through.
__host__ __device__ __forceinline__ float affine_sat(float a, float sr, float sc, float b) {
  float y = a * sr * sc + b;
  return y != y ? y : fminf(fmaxf(y, -65504.f), 65504.f);
}
template <class T>
struct AffineSat {
  CUTLASS_HOST_DEVICE T operator()(T a, T sr, T sc, T b) const { return affine_sat(a, sr, sc, b); }
};
template <int N>
struct AffineSat<cutlass::Array<float, N>> {
  using A = cutlass::Array<float, N>;
  CUTLASS_HOST_DEVICE A operator()(A const& a, A const& sr, A const& sc, A const& b) const {
    A r;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) r[i] = affine_sat(a[i], sr[i], sc[i], b[i]);
    return r;
  }
};

// ---- tile configurations (chosen per shape by linear.cu from measurements) ----
// Measured on H200 (docs/performance.md): 128x128 ping-pong matches or beats cuBLASLt's int8
// GEMM from M=512 up; a 128x256 cooperative config (2-CTA clusters) was never faster than it
// and was dropped; stream-K wins where there are too few 128x128 tiles to fill the SMs. Four
// more candidates for M = 128-2048 (2x2 and 4x1 clusters, cooperative 128x128 with 2x2
// clusters, 64x256 ping-pong) lost to these two at every merged Llama-2-7B layer shape but
// two, by at most 3 % there (scripts/bench_gemm.py --tiles, docs/bench/gemm-tiles-s5-*), and
// were dropped again: each costs minutes of compile time.
#if MLCQ_CFG == 0
// Prefill: 128x128 tiles, ping-pong consumers hide the epilogue behind the next tile's MMA,
// 2-CTA clusters share the activation tile through TMA multicast.
using TileShape = Shape<_128, _128, _128>;
using ClusterShape = Shape<_1, _2, _1>;
using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;
using TileScheduler = cutlass::gemm::PersistentScheduler;
#define MLCQ_CFG_NAME "128x128x128_c1x2_pingpong"
#elif MLCQ_CFG == 1
// Few output tiles (e.g. M <= 256 with N = 4096): narrow 64-column tiles and stream-K, so that
// the K loop spreads over all SMs. The rows past M are zero-filled by TMA and cost no memory
// traffic. Cooperative (needed by stream-K) wants 128 rows per tile.
using TileShape = Shape<_128, _64, _128>;
using ClusterShape = Shape<_1, _1, _1>;
using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
using TileScheduler = cutlass::gemm::StreamKScheduler;
#define MLCQ_CFG_NAME "128x64x128_c1x1_coop_streamk"
#elif MLCQ_CFG == 2
// M <= 128 (linear.cu's policy): 64-row tiles give twice the CTAs of a 128-row tile, each with
// the full K loop. Ping-pong without a workspace, so it chains with PDL like config 0.
using TileShape = Shape<_64, _128, _128>;
using ClusterShape = Shape<_1, _1, _1>;
using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;
using TileScheduler = cutlass::gemm::PersistentScheduler;
#define MLCQ_CFG_NAME "64x128x128_c1x1_pingpong"
#elif MLCQ_CFG == 3
// Two or four 128-row tiles (M = 129-256, 385-512; linear.cu's policy): config 0's tiles and
// schedule in 2x1 clusters. The two CTAs of a cluster compute the same columns of adjacent row
// tiles and share each weight tile through TMA multicast, where config 0's 1x2 clusters share
// the activation tile. H100, Llama-2-7B's merged layer at M = 512: 4.7 % less time at full
// clock, 5.8 % less energy per GEMM under the 700 W cap (docs/performance.md, session 9). With
// an odd number of row tiles a cluster half idles (M = 384: 98 against 57 us for gate/up), and
// from eight row tiles on config 0 is as fast or faster.
using TileShape = Shape<_128, _128, _128>;
using ClusterShape = Shape<_2, _1, _1>;
using MainloopSchedule = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecialized;
using TileScheduler = cutlass::gemm::PersistentScheduler;
#define MLCQ_CFG_NAME "128x128x128_c2x1_pingpong"
#else
#error "unknown MLCQ_CFG"
#endif

using ElementA = int8_t;
using ElementB = int8_t;
using ElementD = cutlass::half_t;
using ElementAcc = int32_t;
using ElementCompute = float;
using LayoutA = cutlass::layout::RowMajor;     // x [M, K]
using LayoutB = cutlass::layout::ColumnMajor;  // wq [N, K] row-major == B [K, N] column-major
using LayoutD = cutlass::layout::RowMajor;     // out [M, N]
constexpr int kAlignA = 16;                    // TMA: 16-byte rows -> K % 16 == 0
constexpr int kAlignB = 16;
constexpr int kAlignD = 8;                     // N % 8 == 0 for the fp16 TMA store

#if MLCQ_EPI == 0
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
namespace fus = cutlass::epilogue::fusion;
// Column-of-output broadcasts are indexed by n (Row broadcast in CUTLASS terms), row ones by m.
// s_col's N stride is a run-time bool: a per-tensor scale is the same kernel with stride 0.
using ScaleColBcast = fus::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, bool, _0>>;
using ScaleRowBcast = fus::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, _0>>;
using BiasBcast = fus::Sm90RowBroadcast<0, TileShape, cutlass::half_t, float, Stride<_0, _1, _0>>;
using RowSumBcast = fus::Sm90ColBroadcast<0, TileShape, int32_t, int32_t, Stride<_1, _0, _0>>;
using IntColBcast = fus::Sm90RowBroadcast<0, TileShape, int32_t, int32_t, Stride<_0, _1, _0>>;

#if MLCQ_ASYM
using AccTree = fus::Sm90EVT<fus::Sm90Compute<ZeroPointCorrection, int32_t, int32_t, kRound>,
                             fus::Sm90AccFetch, RowSumBcast, IntColBcast, IntColBcast>;
#else
using AccTree = fus::Sm90AccFetch;
#endif
using EpilogueTree = fus::Sm90EVT<fus::Sm90Compute<AffineSat, ElementD, ElementCompute, kRound>,
                                  AccTree, ScaleRowBcast, ScaleColBcast, BiasBcast>;

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute,
    void, LayoutD, kAlignD,  // no C operand
    ElementD, LayoutD, kAlignD, EpilogueSchedule, EpilogueTree>::CollectiveOp;
#else
// SiLU * up + quantize from the accumulator registers. An SM90 GMMA accumulator fragment is
// ((2 columns, 2 rows 8 apart, N/8 chunks of 8 columns), MMA_M, MMA_N): with gate and up rows
// interleaved in blocks of 8, chunk 2k holds gate columns and chunk 2k+1 the up columns of the
// same output columns, in the same thread. The TMA store cannot drop half the columns, so this
// is an operator-style epilogue (no shared memory) that stores 2 int8 per (row, chunk pair).
class SiluQuantEpilogue {
 public:
  using EpilogueSchedule = cutlass::gemm::EpilogueDefault;
  using DispatchPolicy = EpilogueSchedule;
  using ElementC = int8_t;
  using ElementD = int8_t;
  using ElementOutput = int8_t;
  using ElementAccumulator = int32_t;
  using ElementCompute = float;
  using ElementScalar = float;
  using StrideC = Stride<int64_t, _1, int64_t>;
  using StrideD = StrideC;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  struct ThreadEpilogueOp {};  // GemmUniversalAdapter names it; nothing reads it
  static constexpr int kTileN = size<1>(TileShape{});
  // The tile's column operands, staged by the epilogue's 128 threads (one column each). The two
  // consumer warp groups' epilogues run one after the other (ping-pong order barrier), so one
  // copy serves both.
  struct SharedStorage {
    float scale[kTileN];
    int32_t zw[kTileN];
    int32_t c[kTileN];
  };
  using TensorStorage = SharedStorage;
  struct Arguments {
    const float* scale_row = nullptr;  // [M] or null (1)
    const float* scale_col = nullptr;  // [N] or a device scalar, or null (scale_col_value)
    float scale_col_value = 1.f;
    bool scale_col_is_vector = false;
    const int32_t* rowsum = nullptr;   // asymmetric weights: rowsum [M], zw [N], c [N]
    const int32_t* zw = nullptr;
    const int32_t* c = nullptr;
    const float* act_scale = nullptr;  // the next linear's static activation scale (scalar)
    const int8_t* act_zero = nullptr;  // and zero point (scalar), null = 0
    int8_t* q = nullptr;               // [M, N / 2]
    int32_t* q_rowsum = nullptr;       // [M], zeroed before the launch, or null
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    return get<1>(problem_shape) % 16 == 0 && args.q != nullptr && args.act_scale != nullptr;
  }

  CUTLASS_HOST_DEVICE
  SiluQuantEpilogue(Params const& params, SharedStorage const& = SharedStorage()) : params_(params) {}

  CUTLASS_DEVICE bool is_source_needed() { return false; }

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine,
            class FrgLayout, class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_MNK,
                                 BlockCoordMNKL blk_coord_mnkl, Tensor<FrgEngine, FrgLayout> const& acc,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char* smem) {
    static_assert(is_static<FrgLayout>::value, "accumulator layout must be static");
    static_assert(rank<0>(FrgLayout{}) == 3 && size<0, 0>(FrgLayout{}) == 2 && size<0, 1>(FrgLayout{}) == 2,
                  "expected the SM90 GMMA accumulator fragment ((2, 2, N / 8), MMA_M, MMA_N)");
    static_assert(size<0, 2>(FrgLayout{}) % 2 == 0, "an MMA atom must hold whole 16-column gate/up blocks");
    const int M = static_cast<int>(get<0>(problem_shape_mnkl));
    const int N = static_cast<int>(get<1>(problem_shape_mnkl));
    const int m0 = static_cast<int>(get<0>(blk_coord_mnkl)) * size<0>(blk_shape_MNK);
    const int n0 = static_cast<int>(get<1>(blk_coord_mnkl)) * size<1>(blk_shape_MNK);
    // (m, n) inside the tile of every accumulator element of this thread
    Tensor tC = tiled_mma.get_thread_slice(thread_idx).partition_C(make_identity_tensor(take<0, 2>(blk_shape_MNK)));
    // one specialization per operand kind: no per-element selects
    if (params_.zw != nullptr) {
      params_.scale_col_is_vector ? Tile<true, true>(acc, tC, M, N, m0, n0, thread_idx, smem)
                                  : Tile<true, false>(acc, tC, M, N, m0, n0, thread_idx, smem);
    } else {
      params_.scale_col_is_vector ? Tile<false, true>(acc, tC, M, N, m0, n0, thread_idx, smem)
                                  : Tile<false, false>(acc, tC, M, N, m0, n0, thread_idx, smem);
    }
  }

 private:
  // One tile's epilogue. It runs while the other consumer warp group computes its next tile, and
  // it must be done before that one is: its loads are issued together (column operands staged
  // in shared memory) and all values are computed before any store (a store could alias an
  // operand and pin the loads behind it).
  template <bool kAsym, bool kVecScale, class Acc, class Coords>
  CUTLASS_DEVICE void Tile(Acc const& acc, Coords const& tC, int M, int N, int m0, int n0, int thread_idx,
                           char* smem) const {
    constexpr int kChunks = size<0, 2>(typename Acc::layout_type{});
    constexpr int kMmaM = size<1>(typename Acc::layout_type{}), kMmaN = size<2>(typename Acc::layout_type{});
    constexpr int kPairs = kMmaN * kChunks / 2;  // gate/up chunk pairs per row
    const Params& p = params_;
    const float s = __ldg(p.act_scale);
    const float r = 1.f / s;  // as norm_act.cu's SiLU kernels: IEEE division, then div_rn
    const float z = p.act_zero != nullptr ? static_cast<float>(__ldg(p.act_zero)) : 0.f;
    const float sc_scalar = p.scale_col == nullptr ? p.scale_col_value : kVecScale ? 0.f : __ldg(p.scale_col);
    // the rows of this thread: 2 per MMA atom row (the fragment's rows 8 apart)
    int m[kMmaM][2];
    float sr[kMmaM][2];
    int32_t rs[kMmaM][2];
    CUTLASS_PRAGMA_UNROLL
    for (int mi = 0; mi < kMmaM; ++mi) {
      CUTLASS_PRAGMA_UNROLL
      for (int v1 = 0; v1 < 2; ++v1) {
        m[mi][v1] = m0 + static_cast<int>(get<0>(tC(make_coord(0, v1, 0), mi, 0)));
        const bool ok = m[mi][v1] < M;
        sr[mi][v1] = p.scale_row != nullptr && ok ? __ldg(p.scale_row + m[mi][v1]) : 1.f;
        rs[mi][v1] = kAsym && ok ? __ldg(p.rowsum + m[mi][v1]) : 0;
      }
    }
    // The column operands: each of the 128 threads loads one column of the tile into shared
    // memory, then every thread reads the columns it needs from there. (Loaded by each thread
    // for its own columns, ptxas sank the loads next to their uses for want of registers -- the
    // accumulators hold 128 -- and the epilogue waited for one L2 round trip per column pair:
    // 7 us of a 13 us tile at M = 512, measured.)
    static_assert(kTileN == 128, "one column of the tile per epilogue thread");
    SharedStorage& sm = *reinterpret_cast<SharedStorage*>(smem);
    {
      const int n = n0 + thread_idx;
      const bool ok = n < N;
      if constexpr (kVecScale) sm.scale[thread_idx] = ok ? __ldg(p.scale_col + n) : 0.f;
      if constexpr (kAsym) {
        sm.zw[thread_idx] = ok ? __ldg(p.zw + n) : 0;
        sm.c[thread_idx] = ok ? __ldg(p.c + n) : 0;
      }
    }
    if constexpr (kVecScale || kAsym) cutlass::arch::NamedBarrier::sync(128, cutlass::arch::ReservedNamedBarriers::EpilogueBarrier);
    int col[kPairs], nl[kPairs];  // output column, tile-local gate column
    CUTLASS_PRAGMA_UNROLL
    for (int ni = 0; ni < kMmaN; ++ni) {
      CUTLASS_PRAGMA_UNROLL
      for (int k = 0; k < kChunks; k += 2) {
        const int j = ni * (kChunks / 2) + k / 2;
        nl[j] = static_cast<int>(get<1>(tC(make_coord(0, 0, k), 0, ni)));  // gate column (even)
        const int n = n0 + nl[j];
        col[j] = n < N ? (n >> 4) * 8 + (n & 7) : -1;  // N % 16 == 0: up column n + 8 is in range too
      }
    }
    uint16_t out[kMmaM][2][kPairs];  // 2 int8 per (row, chunk pair)
    int sum[kMmaM][2] = {};
    CUTLASS_PRAGMA_UNROLL
    for (int ni = 0; ni < kMmaN; ++ni) {
      CUTLASS_PRAGMA_UNROLL
      for (int k = 0; k < kChunks; k += 2) {
        const int j = ni * (kChunks / 2) + k / 2;
        CUTLASS_PRAGMA_UNROLL
        for (int mi = 0; mi < kMmaM; ++mi) {
          CUTLASS_PRAGMA_UNROLL
          for (int v1 = 0; v1 < 2; ++v1) {
            float h[2];
            CUTLASS_PRAGMA_UNROLL
            for (int v0 = 0; v0 < 2; ++v0) {
              int32_t ag = acc(make_coord(v0, v1, k), mi, ni), au = acc(make_coord(v0, v1, k + 1), mi, ni);
              const int cg = nl[j] + v0, cu = cg + 8;  // gate / up column in the tile
              if constexpr (kAsym) {  // exact int32, wrapping like the Relax reference
                ag = ag - rs[mi][v1] * sm.zw[cg] - sm.c[cg];
                au = au - rs[mi][v1] * sm.zw[cu] - sm.c[cu];
              }
              const float scg_v = kVecScale ? sm.scale[cg] : sc_scalar, scu_v = kVecScale ? sm.scale[cu] : sc_scalar;
              // the fp16 GEMM output (gate and up rounded by one packed conversion), then
              // SiLU * up as norm_act.cu's SiluMul8 computes it
              const float2 gu = __half22float2(__floats2half2_rn(
                  affine_sat(static_cast<float>(ag), sr[mi][v1], scg_v, 0.f),
                  affine_sat(static_cast<float>(au), sr[mi][v1], scu_v, 0.f)));
              h[v0] = mlcq::silu_mul(gu.x, gu.y);
            }
            const float2 hr = __half22float2(__floats2half2_rn(h[0], h[1]));  // SiluMul8's fp16 output
            const int q0 = mlcq::quantize_one(hr.x, s, r, z, -128.f), q1 = mlcq::quantize_one(hr.y, s, r, z, -128.f);
            if (col[j] >= 0) sum[mi][v1] += q0 + q1;
            out[mi][v1][j] = static_cast<uint16_t>(static_cast<uint8_t>(q0) | (static_cast<uint8_t>(q1) << 8));
          }
        }
      }
    }
    const int64_t ldq = N / 2;
    CUTLASS_PRAGMA_UNROLL
    for (int mi = 0; mi < kMmaM; ++mi) {
      CUTLASS_PRAGMA_UNROLL
      for (int v1 = 0; v1 < 2; ++v1) {
        CUTLASS_PRAGMA_UNROLL
        for (int j = 0; j < kPairs; ++j) {
          if (m[mi][v1] < M && col[j] >= 0) *reinterpret_cast<uint16_t*>(p.q + m[mi][v1] * ldq + col[j]) = out[mi][v1][j];
        }
        if (p.q_rowsum != nullptr) {
          // the 4 threads of a quad hold the same rows: sum there, one atomic per quad and row
          int t = sum[mi][v1];
          t += __shfl_xor_sync(0xffffffffu, t, 1);
          t += __shfl_xor_sync(0xffffffffu, t, 2);
          if (m[mi][v1] < M && (thread_idx & 3) == 0) atomicAdd(p.q_rowsum + m[mi][v1], t);
        }
      }
    }
  }

  Params params_;
};
using CollectiveEpilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<SiluQuantEpilogue>;
#endif

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA, kAlignA, ElementB,
    LayoutB, kAlignB, ElementAcc, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
        sizeof(typename CollectiveEpilogue::SharedStorage))>,
    MainloopSchedule>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                        CollectiveEpilogue, TileScheduler>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

}  // namespace cutlass_sm90

#define MLCQ_PASTE2(a, b, c) a##_cfg##b##_asym##c
#define MLCQ_PASTE(a, b, c) MLCQ_PASTE2(a, b, c)
#define MLCQ_ENTRY MLCQ_PASTE(cutlass_w8a8_sm90, MLCQ_CFG, MLCQ_ASYM)

namespace {
// The dynamic shared memory opt-in of this configuration's kernel, once per device (internal
// linkage: each model library that links this object has its own flags, and its own function).
bool SmemAttributeSet(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> done[kMaxDevices];  // 0: not yet, 1: set, -1: failed
  const int smem = cutlass_sm90::GemmKernel::SharedStorageSize;
  if (smem < (48 << 10)) return true;
  if (device < 0 || device >= kMaxDevices) {
    return cudaFuncSetAttribute(cutlass::device_kernel<cutlass_sm90::GemmKernel>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, smem) == cudaSuccess;
  }
  int state = done[device].load(std::memory_order_acquire);
  if (state == 0) {
    const bool ok = cudaFuncSetAttribute(cutlass::device_kernel<cutlass_sm90::GemmKernel>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem) == cudaSuccess;
    state = ok ? 1 : -1;
    if (!ok) cudaGetLastError();  // clear it; the caller falls back
    done[device].store(state, std::memory_order_release);
  }
  return state == 1;
}

// The mainloop arguments of p (shared by both epilogues): "" or why CUTLASS cannot take it.
const char* MainloopArguments(const GemmProblem& p, cutlass_sm90::Gemm::Arguments& args) {
  using namespace cutlass_sm90;
  if (p.K % kAlignA != 0 || p.N % kAlignD != 0) return "needs K % 16 == 0 and N % 8 == 0";
#if !MLCQ_ASYM
  if (p.rowsum != nullptr || p.zw != nullptr || p.c != nullptr) return "asymmetric operands given";
#endif
  using StrideA = typename Gemm::GemmKernel::StrideA;
  using StrideB = typename Gemm::GemmKernel::StrideB;
  const int M = static_cast<int>(p.M), N = static_cast<int>(p.N), K = static_cast<int>(p.K);
  StrideA sa = make_stride(int64_t(K), _1{}, int64_t(M) * K);
  StrideB sb = make_stride(int64_t(K), _1{}, int64_t(N) * K);

  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {M, N, K, 1};
  args.mainloop = {static_cast<const int8_t*>(p.x), sa, static_cast<const int8_t*>(p.w), sb};
  args.hw_info.device_id = p.device_id;
  args.hw_info.sm_count = p.sm_count;
  return "";
}

// Launches the GEMM of args; "" or why it could not.
const char* Launch(typename cutlass_sm90::Gemm::Arguments& args, const GemmProblem& p, Workspace* ws,
                   cudaStream_t stream) {
  using namespace cutlass_sm90;
  if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return "CUTLASS can_implement failed";
  size_t ws_bytes = Gemm::get_workspace_size(args);
  void* ws_ptr = ws_bytes ? ws->get(ws_bytes, Workspace::kCutlass) : nullptr;
  // Gemm::initialize would also call cudaFuncSetAttribute (the > 48 KB shared memory opt-in) on
  // every call: ~6 us of host time per linear, measured on the H200 (0.8 ms of a 7B prefill's
  // host time). The attribute is per function and device: set it once per device instead.
  if (!SmemAttributeSet(p.device_id)) return "CUTLASS: cudaFuncSetAttribute failed";
  if (GemmKernel::initialize_workspace(args, ws_ptr, stream) != cutlass::Status::kSuccess)
    return "CUTLASS initialize_workspace failed";
  typename GemmKernel::Params params = GemmKernel::to_underlying_arguments(args, ws_ptr);
  // Programmatic dependent launch (mlcq_pdl.h) where the build defines
  // CUTLASS_ENABLE_GDC_FOR_SM90 (configs 0 and 2): the producer warps wait for the previous kernel
  // before their first load, and the kernel releases the next one after its last tile's
  // mainloop. Never with a workspace: initialize_workspace's memset must land first.
#ifdef CUTLASS_ENABLE_GDC_FOR_SM90
  const bool pdl = ws_bytes == 0 && PdlEnabled(p.device_id, kPdlGemm);
#else
  const bool pdl = false;
#endif
  // The launch GemmUniversalAdapter::run makes, minus its ClusterLauncher::init: that sets
  // cudaFuncAttributeNonPortableClusterSizeAllowed on every launch (~3 us of host time per linear
  // in the host API profile, 0.4 ms per 7B prefill), which clusters of at most 8 CTAs (ours: 1x2,
  // 1x1) do not need.
  static_assert(size(ClusterShape{}) <= 8, "a non-portable cluster size needs the attribute set");
  const dim3 grid = GemmKernel::get_grid_shape(params);
  const dim3 block = GemmKernel::get_block_shape();
  cudaLaunchAttribute attrs[2];
  unsigned n_attrs = 0;
  attrs[n_attrs].id = cudaLaunchAttributeClusterDimension;
  attrs[n_attrs].val.clusterDim.x = size<0>(ClusterShape{});
  attrs[n_attrs].val.clusterDim.y = size<1>(ClusterShape{});
  attrs[n_attrs].val.clusterDim.z = size<2>(ClusterShape{});
  ++n_attrs;
  if (pdl) {
    attrs[n_attrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n_attrs].val.programmaticStreamSerializationAllowed = 1;
    ++n_attrs;
  }
  cudaLaunchConfig_t launch = {};
  launch.gridDim = grid;
  launch.blockDim = block;
  launch.dynamicSmemBytes = GemmKernel::SharedStorageSize;
  launch.stream = stream;
  launch.attrs = attrs;
  launch.numAttrs = n_attrs;
  void* kernel_args[] = {&params};
  if (cudaLaunchKernelExC(&launch, reinterpret_cast<const void*>(&cutlass::device_kernel<GemmKernel>), kernel_args) !=
      cudaSuccess) {
    cudaGetLastError();  // clear it; the caller falls back
    return "CUTLASS launch failed";
  }
  return "";
}

}  // namespace

#if MLCQ_EPI == 0
// Returns an empty string on success, else why the kernel cannot run (the caller falls back).
const char* MLCQ_ENTRY(const GemmProblem& p, Workspace* ws, cudaStream_t stream) {
  using namespace cutlass_sm90;
  typename Gemm::Arguments args;
  const char* why = MainloopArguments(p, args);
  if (*why != 0) return why;
  using StrideD = typename Gemm::GemmKernel::StrideD;
  StrideD sd = make_stride(int64_t(p.N), _1{}, int64_t(p.M) * p.N);
  auto& f = args.epilogue.thread;
  // Tree arguments are nested like the tree: {children..., node}.
#if MLCQ_ASYM
  f = {
      {{},
       {p.rowsum, 0, {}},
       {p.zw, 0, {}},
       {p.c, 0, {}},
       {}},
      {p.scale_row, 1.f, {}},
      {p.scale_col, p.scale_col_value, {_0{}, p.scale_col_is_vector, _0{}}},
      {reinterpret_cast<const cutlass::half_t*>(p.bias), cutlass::half_t(0.f), {}},
      {}};
#else
  f = {{},
       {p.scale_row, 1.f, {}},
       {p.scale_col, p.scale_col_value, {_0{}, p.scale_col_is_vector, _0{}}},
       {reinterpret_cast<const cutlass::half_t*>(p.bias), cutlass::half_t(0.f), {}},
       {}};
#endif
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = sd;
  args.epilogue.ptr_D = reinterpret_cast<cutlass::half_t*>(p.out);
  args.epilogue.dD = sd;
  return Launch(args, p, ws, stream);
}
#else
// SiLU * up + quantize epilogue (see the top of this file); p.out is unused, o.q gets the output.
const char* MLCQ_PASTE(cutlass_w8a8_silu_q_sm90, MLCQ_CFG, MLCQ_ASYM)(const GemmProblem& p, const SiluQuantOut& o,
                                                                   Workspace* ws, cudaStream_t stream) {
  using namespace cutlass_sm90;
  if (p.N % 16 != 0) return "needs N % 16 == 0 (whole gate/up blocks of 8)";
  if (p.bias != nullptr) return "no bias in the SiLU epilogue";
  typename Gemm::Arguments args;
  const char* why = MainloopArguments(p, args);
  if (*why != 0) return why;
  auto& e = args.epilogue;
  e.scale_row = p.scale_row;
  e.scale_col = p.scale_col;
  e.scale_col_value = p.scale_col_value;
  e.scale_col_is_vector = p.scale_col_is_vector;
  e.rowsum = p.rowsum;
  e.zw = p.zw;
  e.c = p.c;
  e.act_scale = o.s;
  e.act_zero = o.z;
  e.q = o.q;
  e.q_rowsum = o.rowsum;
  return Launch(args, p, ws, stream);
}
#endif

#if MLCQ_EPI == 0
const char* MLCQ_PASTE(cutlass_w8a8_sm90_name, MLCQ_CFG, MLCQ_ASYM)() { return MLCQ_CFG_NAME; }
#endif

}  // namespace mlcq
