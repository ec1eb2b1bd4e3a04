// SPDX-License-Identifier: Apache-2.0
// cuBLASLt GEMMs: float (fp16/bf16/fp32, optional fused bias) and int8 -> int32.
//
// cuBLASLt's int8 IMMA path can only write int32 (scale type int32) or int8 (scale type fp32,
// with a per-row alpha vector); it has no int8 -> fp16 mode with per-token x per-channel scales,
// so the W8A8 dequantize after it is a separate epilogue kernel (kernels.cu). That is the
// fallback; the fused path is CUTLASS (cutlass_w8a8_sm90.cu).
//
// Row-major C[M, N] = X[M, K] * W[N, K]^T is computed as the column-major problem
// C^T[N, M] = W^T * X^T, i.e. A = W (transposed), B = X (not transposed), as in lt_bench.cu.
#include <cublasLt.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "mlcq_lt.h"

namespace mlcq {
namespace {

constexpr size_t kLtWorkspaceBytes = size_t(64) << 20;  // 64 MiB measured best (field notes)

#define MLCQ_LT_CHECK(expr)                                                                  \
  do {                                                                                       \
    cublasStatus_t _s = (expr);                                                              \
    if (_s != CUBLAS_STATUS_SUCCESS) {                                                       \
      std::ostringstream _os;                                                                \
      _os << #expr << " failed: status " << static_cast<int>(_s) << " (" << __FILE__ << ":" \
          << __LINE__ << ")";                                                                \
      ::mlcq::ThrowError("RuntimeError", _os.str());                                         \
    }                                                                                        \
  } while (0)

int AlignmentOf(const void* p) {
  uintptr_t a = reinterpret_cast<uintptr_t>(p);
  int align = 256;
  while (align > 1 && (a % align) != 0) align >>= 1;
  return align;
}

cudaDataType_t LtType(int dt) {
  switch (dt) {
    case kF16: return CUDA_R_16F;
    case kBF16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

// A cached plan: descriptors + the heuristic's algorithm for one problem.
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool ok = false;
  ~Plan() {
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

// (int8?, M, N, K, w_kn, in dtype, out dtype, has bias, alignments of A, B, C, bias)
using PlanKey = std::tuple<bool, int64_t, int64_t, int64_t, bool, int, int, bool, int, int, int, int>;

struct DeviceState {
  cublasLtHandle_t handle = nullptr;
  std::mutex mu;
  std::map<PlanKey, std::unique_ptr<Plan>> plans;
};

DeviceState* State(int device) {
  static std::mutex mu;
  static std::map<int, std::unique_ptr<DeviceState>> states;
  std::lock_guard<std::mutex> lock(mu);
  auto& st = states[device];
  if (!st) {
    st.reset(new DeviceState());
    MLCQ_LT_CHECK(cublasLtCreate(&st->handle));
  }
  return st.get();
}

Plan* GetPlan(DeviceState* st, const PlanKey& key, const void* bias) {
  auto it = st->plans.find(key);
  if (it != st->plans.end()) return it->second.get();
  const auto& [i8, M, N, K, w_kn, in_dt, out_dt, has_bias, al_a, al_b, al_c, al_bias] = key;
  std::unique_ptr<Plan> plan(new Plan());
  const cudaDataType_t ab = i8 ? CUDA_R_8I : LtType(in_dt);
  const cudaDataType_t cd = i8 ? CUDA_R_32I : LtType(out_dt);
  // fp32 stays full fp32 (no TF32): the Relax matmul it replaces is exact fp32.
  const cublasComputeType_t ct = i8 ? CUBLAS_COMPUTE_32I : CUBLAS_COMPUTE_32F;
  const cudaDataType_t st_t = i8 ? CUDA_R_32I : CUDA_R_32F;
  MLCQ_LT_CHECK(cublasLtMatmulDescCreate(&plan->desc, ct, st_t));
  // W row-major [N, K] is column-major [K, N] -> op T; W row-major [K, N] is col-major [N, K].
  const cublasOperation_t ta = w_kn ? CUBLAS_OP_N : CUBLAS_OP_T, tb = CUBLAS_OP_N;
  MLCQ_LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  MLCQ_LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  if (has_bias) {
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    const cudaDataType_t bt = LtType(out_dt);
    MLCQ_LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
    MLCQ_LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof(bt)));
    // The heuristic needs a bias pointer to pick an algo; the real one is set per call.
    MLCQ_LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  }
  if (w_kn) {
    MLCQ_LT_CHECK(cublasLtMatrixLayoutCreate(&plan->la, ab, N, K, N));
  } else {
    MLCQ_LT_CHECK(cublasLtMatrixLayoutCreate(&plan->la, ab, K, N, K));
  }
  MLCQ_LT_CHECK(cublasLtMatrixLayoutCreate(&plan->lb, ab, K, M, K));
  MLCQ_LT_CHECK(cublasLtMatrixLayoutCreate(&plan->lc, cd, N, M, N));
  cublasLtMatmulPreference_t pref;
  MLCQ_LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  size_t ws = kLtWorkspaceBytes;
  uint32_t a_al = al_a, b_al = al_b, c_al = al_c;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &a_al, sizeof(a_al));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &b_al, sizeof(b_al));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &c_al, sizeof(c_al));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &c_al, sizeof(c_al));
  cublasLtMatmulHeuristicResult_t res{};
  int n_res = 0;
  cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(st->handle, plan->desc, plan->la, plan->lb,
                                                    plan->lc, plan->lc, pref, 1, &res, &n_res);
  cublasLtMatmulPreferenceDestroy(pref);
  plan->ok = s == CUBLAS_STATUS_SUCCESS && n_res > 0;
  if (plan->ok) plan->algo = res.algo;
  Plan* raw = plan.get();
  st->plans.emplace(key, std::move(plan));
  return raw;
}

bool Run(bool i8, const LtGemm& g, cudaStream_t stream) {
  DeviceState* st = State(g.device_id);
  std::lock_guard<std::mutex> lock(st->mu);
  PlanKey key{i8,
              g.M,
              g.N,
              g.K,
              g.w_kn,
              g.in_dtype,
              g.out_dtype,
              g.bias != nullptr,
              AlignmentOf(g.w),
              AlignmentOf(g.x),
              AlignmentOf(g.out),
              g.bias ? AlignmentOf(g.bias) : 0};
  Plan* plan = GetPlan(st, key, g.bias);
  if (!plan->ok) return false;
  if (g.bias != nullptr) {
    MLCQ_LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                                 &g.bias, sizeof(g.bias)));
  }
  void* ws = Workspace::ForDevice(g.device_id)->get(kLtWorkspaceBytes, Workspace::kLt);
  const int32_t ione = 1, izero = 0;
  const float fone = 1.f, fzero = 0.f;
  const void* alpha = i8 ? static_cast<const void*>(&ione) : static_cast<const void*>(&fone);
  const void* beta = i8 ? static_cast<const void*>(&izero) : static_cast<const void*>(&fzero);
  MLCQ_LT_CHECK(cublasLtMatmul(st->handle, plan->desc, alpha, g.w, plan->la, g.x, plan->lb, beta,
                               g.out, plan->lc, g.out, plan->lc, &plan->algo, ws,
                               kLtWorkspaceBytes, stream));
  return true;
}

}  // namespace

bool LtInt8Gemm(const LtGemm& g, cudaStream_t stream) { return Run(true, g, stream); }

int LtProbeInt8(int64_t M, int64_t N, int64_t K, int out_kind, bool alpha_vector, int device_id) {
  // Asks the heuristic whether int8 x int8 with an fp32 scale can write out_kind
  // (1: int8, 2: fp16, 3: bf16) with a per-row alpha vector: documents what cuBLASLt can fuse.
  DeviceState* st = State(device_id);
  std::lock_guard<std::mutex> lock(st->mu);
  cudaDataType_t cd = out_kind == 1 ? CUDA_R_8I : out_kind == 2 ? CUDA_R_16F : CUDA_R_16BF;
  cublasLtMatmulDesc_t desc;
  if (cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32I, CUDA_R_32F) != CUBLAS_STATUS_SUCCESS) return -1;
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta));
  cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb));
  if (alpha_vector) {
    const cublasLtPointerMode_t pm = CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_ZERO;
    cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_POINTER_MODE, &pm, sizeof(pm));
  }
  cublasLtMatrixLayout_t la, lb, lc;
  cublasLtMatrixLayoutCreate(&la, CUDA_R_8I, K, N, K);
  cublasLtMatrixLayoutCreate(&lb, CUDA_R_8I, K, M, K);
  cublasLtMatrixLayoutCreate(&lc, cd, N, M, N);
  cublasLtMatmulPreference_t pref;
  cublasLtMatmulPreferenceCreate(&pref);
  size_t ws = kLtWorkspaceBytes;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  cublasLtMatmulHeuristicResult_t res[4];
  int n = 0;
  cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(st->handle, desc, la, lb, lc, lc, pref, 4, res, &n);
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatmulDescDestroy(desc);
  return s == CUBLAS_STATUS_SUCCESS ? n : -static_cast<int>(s);
}
bool LtFloatGemm(const LtGemm& g, cudaStream_t stream) { return Run(false, g, stream); }

}  // namespace mlcq
