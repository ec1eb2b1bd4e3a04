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
// This translation unit is compiled once per (tile config, variant) pair: the build passes
// -DMLCQ_CFG=<n> and -DMLCQ_ASYM=<0|1>, so the slow CUTLASS template instantiations compile in
// parallel and are cached separately (see build.py).
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

#ifndef MLCQ_CFG
#define MLCQ_CFG 0
#endif
#ifndef MLCQ_ASYM
#define MLCQ_ASYM 0
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
}  // namespace

// Returns an empty string on success, else why the kernel cannot run (the caller falls back).
const char* MLCQ_ENTRY(const GemmProblem& p, Workspace* ws, cudaStream_t stream) {
  using namespace cutlass_sm90;
  if (p.K % kAlignA != 0 || p.N % kAlignD != 0) return "needs K % 16 == 0 and N % 8 == 0";
#if !MLCQ_ASYM
  if (p.rowsum != nullptr || p.zw != nullptr || p.c != nullptr) return "asymmetric operands given";
#endif
  using StrideA = typename Gemm::GemmKernel::StrideA;
  using StrideB = typename Gemm::GemmKernel::StrideB;
  using StrideD = typename Gemm::GemmKernel::StrideD;
  const int M = static_cast<int>(p.M), N = static_cast<int>(p.N), K = static_cast<int>(p.K);
  StrideA sa = make_stride(int64_t(K), _1{}, int64_t(M) * K);
  StrideB sb = make_stride(int64_t(K), _1{}, int64_t(N) * K);
  StrideD sd = make_stride(int64_t(N), _1{}, int64_t(M) * N);

  typename Gemm::Arguments args;
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {M, N, K, 1};
  args.mainloop = {static_cast<const int8_t*>(p.x), sa, static_cast<const int8_t*>(p.w), sb};
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
  args.hw_info.device_id = p.device_id;
  args.hw_info.sm_count = p.sm_count;

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

const char* MLCQ_PASTE(cutlass_w8a8_sm90_name, MLCQ_CFG, MLCQ_ASYM)() { return MLCQ_CFG_NAME; }

}  // namespace mlcq
