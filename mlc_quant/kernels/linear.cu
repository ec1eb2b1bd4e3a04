// SPDX-License-Identifier: Apache-2.0
// RunLinear: argument checking, activation quantization and the per-shape choice of GEMM kernel,
// plus the tvm-ffi exports used by tests and benchmarks.
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>

#include "mlcq_ffi.h"
#include "mlcq_gemv.h"
#include "mlcq_internal.h"
#include "mlcq_lt.h"

namespace mlcq {

// ---------------------------------------------------------------------------------------------
// errors and workspace

void ThrowError(const std::string& kind, const std::string& msg) {
  if (kind == "ValueError") TVM_FFI_THROW(ValueError) << msg;
  TVM_FFI_THROW(RuntimeError) << msg;
  TVM_FFI_UNREACHABLE();
}

namespace {

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    MLCQ_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) MLCQ_CUDA_CHECK(cudaSetDevice(device));
    changed_ = prev_ != device;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(prev_);
  }

 private:
  int prev_ = 0;
  bool changed_ = false;
};

}  // namespace

void* Workspace::get(size_t bytes, Slot slot) {
  std::lock_guard<std::mutex> lock(mu_);
  if (size_[slot] < bytes) {
    // Growing is rare (first call at a new maximum shape); make sure no queued kernel still
    // reads the old buffer before freeing it.
    if (ptr_[slot] != nullptr) {
      MLCQ_CUDA_CHECK(cudaDeviceSynchronize());
      MLCQ_CUDA_CHECK(cudaFree(ptr_[slot]));
      ptr_[slot] = nullptr;
      size_[slot] = 0;
    }
    size_t want = std::max(bytes, size_t(2) << 20);
    want = (want + (size_t(2) << 20) - 1) & ~((size_t(2) << 20) - 1);
    MLCQ_CUDA_CHECK(cudaMalloc(&ptr_[slot], want));
    size_[slot] = want;
  }
  return ptr_[slot];
}

Workspace* Workspace::ForDevice(int device_id) {
  static std::mutex mu;
  static std::map<int, std::unique_ptr<Workspace>> spaces;
  std::lock_guard<std::mutex> lock(mu);
  auto& ws = spaces[device_id];
  if (!ws) ws.reset(new Workspace());
  return ws.get();
}

// ---------------------------------------------------------------------------------------------
// argument checking

namespace {

thread_local const char* g_last_kernel = "";

struct DeviceInfo {
  int sm_count = 0;
  int major = 0, minor = 0;
};

const DeviceInfo& GetDeviceInfo(int device) {
  static std::mutex mu;
  static std::map<int, DeviceInfo> infos;
  std::lock_guard<std::mutex> lock(mu);
  auto it = infos.find(device);
  if (it != infos.end()) return it->second;
  DeviceInfo info;
  MLCQ_CUDA_CHECK(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device));
  MLCQ_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device));
  MLCQ_CUDA_CHECK(cudaDeviceGetAttribute(&info.minor, cudaDevAttrComputeCapabilityMinor, device));
  return infos.emplace(device, info).first->second;
}

std::string DTypeStr(DLDataType t) {
  std::string base = t.code == kDLInt ? "int" : t.code == kDLUInt ? "uint"
                   : t.code == kDLFloat ? "float" : t.code == kDLBfloat ? "bfloat" : "?";
  return base + std::to_string(t.bits) + (t.lanes != 1 ? "x" + std::to_string(t.lanes) : "");
}

bool Is(DLDataType t, uint8_t code, uint8_t bits) {
  return t.code == code && t.bits == bits && t.lanes == 1;
}

// kF16 / kBF16 / kF32 or -1
int FloatKind(DLDataType t) {
  if (Is(t, kDLFloat, 16)) return kF16;
  if (Is(t, kDLBfloat, 16)) return kBF16;
  if (Is(t, kDLFloat, 32)) return kF32;
  return -1;
}

int64_t Numel(const DLTensor* t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
  return n;
}

void* Data(const DLTensor* t) {
  return t ? static_cast<char*>(t->data) + t->byte_offset : nullptr;
}

class Checker {
 public:
  explicit Checker(const LinearArgs& a) : a_(a) {}

  [[noreturn]] void Fail(const std::string& msg) const {
    ThrowError("ValueError", "mlc_quant linear: " + msg);
  }

  void Device(const DLTensor* t, const char* name) {
    if (t == nullptr) return;
    if (t->device.device_type != kDLCUDA) Fail(std::string(name) + " is not on a CUDA device");
    if (device_ < 0) device_ = t->device.device_id;
    if (t->device.device_id != device_)
      Fail(std::string(name) + " is on cuda:" + std::to_string(t->device.device_id) +
           ", expected cuda:" + std::to_string(device_));
  }

  void DType(const DLTensor* t, const char* name, uint8_t code, uint8_t bits) const {
    if (!Is(t->dtype, code, bits))
      Fail(std::string(name) + " has dtype " + DTypeStr(t->dtype) + ", expected " +
           DTypeStr(DLDataType{code, bits, 1}));
  }

  void Required(const DLTensor* t, const char* name) const {
    if (t == nullptr) Fail(std::string(name) + " is required for this scheme");
  }

  // A static (per-tensor) quantization: the scale a float32 scalar (required), the zero point
  // an int8 scalar (optional).
  void StaticQuant(const DLTensor* s, const char* s_name, const DLTensor* z, const char* z_name) const {
    Required(s, s_name);
    DType(s, s_name, kDLFloat, 32);
    if (Numel(s) != 1) Fail(std::string(s_name) + " must be a scalar (per-tensor quantization)");
    if (z == nullptr) return;
    DType(z, z_name, kDLInt, 8);
    if (Numel(z) != 1) Fail(std::string(z_name) + " must be a scalar");
  }

  int device() const { return device_; }

 private:
  const LinearArgs& a_;
  int device_ = -1;
};

bool Aligned(const void* p, int bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

// An on/off switch from the environment, on unless set to 0, off or false (read once).
bool EnvFlagOn(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr || !(!std::strcmp(v, "0") || !std::strcmp(v, "off") || !std::strcmp(v, "false"));
}

Backend EnvBackend(Backend requested) {
  if (requested != Backend::kAuto) return requested;
  static const Backend env = [] {
    const char* v = std::getenv("MLC_QUANT_INT8_BACKEND");
    if (v == nullptr || *v == 0 || !std::strcmp(v, "auto")) return Backend::kAuto;
    if (!std::strcmp(v, "cutlass")) return Backend::kCutlass;
    if (!std::strcmp(v, "cutlass0")) return Backend::kCutlass0;
    if (!std::strcmp(v, "cutlass1")) return Backend::kCutlass1;
    if (!std::strcmp(v, "cublaslt")) return Backend::kCublasLt;
    if (!std::strcmp(v, "simt")) return Backend::kSimt;
    if (!std::strcmp(v, "gemv")) return Backend::kGemv;
    if (!std::strncmp(v, "cutlass", 7) && v[7] >= '0' && v[7] <= '9' && v[8] == 0 &&
        v[7] - '0' < kNumCutlassConfigs)
      return static_cast<Backend>(static_cast<int>(Backend::kCutlassCfgBase) + (v[7] - '0'));
    ThrowError("ValueError", std::string("MLC_QUANT_INT8_BACKEND=") + v +
                                 ": expected auto|cutlass|cutlass0.." +
                                 std::to_string(kNumCutlassConfigs - 1) + "|cublaslt|simt|gemv");
  }();
  return env;
}

// MLC_QUANT_GEMV=0 keeps small-M linears (int8 and fp16) off the GEMV kernels in the auto
// policy: the pre-GEMV behaviour, for before/after measurements.
bool GemvEnabled() {
  static const bool on = EnvFlagOn("MLC_QUANT_GEMV");
  return on;
}

using CutlassFn = const char* (*)(const GemmProblem&, Workspace*, cudaStream_t);
using CutlassNameFn = const char* (*)();
// The asym-capable EVT covers every scheme (null operands = neutral), so one object per config.
const CutlassFn kCutlassFns[kNumCutlassConfigs] = {
    cutlass_w8a8_sm90_cfg0_asym1, cutlass_w8a8_sm90_cfg1_asym1, cutlass_w8a8_sm90_cfg2_asym1,
    cutlass_w8a8_sm90_cfg3_asym1};
const CutlassNameFn kCutlassNames[kNumCutlassConfigs] = {
    cutlass_w8a8_sm90_name_cfg0_asym1, cutlass_w8a8_sm90_name_cfg1_asym1, cutlass_w8a8_sm90_name_cfg2_asym1,
    cutlass_w8a8_sm90_name_cfg3_asym1};
// The SiLU * up + quantize epilogue's objects (no stream-K variant: null).
using CutlassSiluFn = const char* (*)(const GemmProblem&, const SiluQuantOut&, Workspace*, cudaStream_t);
const CutlassSiluFn kCutlassSiluFns[kNumCutlassConfigs] = {
    cutlass_w8a8_silu_q_sm90_cfg0_asym1, nullptr, cutlass_w8a8_silu_q_sm90_cfg2_asym1,
    cutlass_w8a8_silu_q_sm90_cfg3_asym1};

// The measured policy (scripts/bench_gemm.py --sweep, docs/performance.md):
//  * M <= 64 (decode, short prompts): cuBLASLt's split-K int8 GEMM + the separate epilogue
//    kernel beats both CUTLASS configs (the GEMM reads wq; CUTLASS's stream-K fixup costs more
//    than the ~2 us epilogue launch);
//  * M <= 128 (one 128-row tile): CUTLASS 64x128 ping-pong (config 2): twice the CTAs of a
//    128-row tile; on the H100 it ran Llama-2-7B's M = 128 layer GEMMs in 98 us against 111 us
//    with configs 0 / 1 (o_proj 10.5 against 15.8 us, down_proj 22.2 against 26.9);
//  * too few 128x128 tiles for half the SMs: CUTLASS stream-K (config 1);
//  * two or four 128-row tiles: 128x128 ping-pong in 2x1 clusters (config 3, weight tiles
//    multicast); H100, Llama-2-7B's merged layer at M = 512: 169.5 against 177.5 us at full
//    clock, and 127.5 against 135.4 mJ under the 700 W cap;
//  * otherwise CUTLASS 128x128 ping-pong (config 0), at or above cuBLASLt int8 from M = 512.
constexpr int64_t kSmallM = 64;

// MLC_QUANT_CLUSTER_2X1=off keeps config 3 out of the auto policy (config 0 instead): the
// policy before it, for before/after measurements of one build.
bool Cluster2x1Enabled() {
  static const bool on = EnvFlagOn("MLC_QUANT_CLUSTER_2X1");
  return on;
}

// The ping-pong config for M rows (2, 3 or 0), what both the plain and the SiLU epilogue run.
int PingpongConfigForRows(int64_t M) {
  if (M <= 128) return 2;
  const int64_t row_tiles = (M + 127) / 128;
  return (row_tiles == 2 || row_tiles == 4) && Cluster2x1Enabled() ? 3 : 0;
}

int PickCutlassConfig(const GemmProblem& p, const DeviceInfo& info) {
  if (p.M > 128 && 2 * ((p.M + 127) / 128) * ((p.N + 127) / 128) <= info.sm_count) return 1;
  return PingpongConfigForRows(p.M);
}

// The tile config a backend value forces, or -1 (auto policy / not CUTLASS).
int ForcedCutlassConfig(Backend b) {
  if (b == Backend::kCutlass0) return 0;
  if (b == Backend::kCutlass1) return 1;
  const int n = static_cast<int>(b) - static_cast<int>(Backend::kCutlassCfgBase);
  return n >= 0 && n < kNumCutlassConfigs ? n : -1;
}

std::string CutlassUnusable(const GemmProblem& p, const DeviceInfo& info) {
  if (!(info.major == 9 && info.minor == 0)) return "CUTLASS kernels are built for sm_90a only";
  if (p.out_dtype != kF16) return "CUTLASS epilogue writes float16 only";
  if (p.bias != nullptr && p.bias_dtype != kF16) return "CUTLASS bias must be float16";
  if (p.K % 16 != 0 || p.N % 8 != 0) return "CUTLASS needs K % 16 == 0 and N % 8 == 0";
  if (!Aligned(p.x, 16) || !Aligned(p.w, 16) || !Aligned(p.out, 16))
    return "CUTLASS needs 16-byte aligned x, w and out";
  if (p.silu != nullptr && !Aligned(p.silu->q, 16)) return "CUTLASS SiLU epilogue needs a 16-byte aligned q";
  return "";
}

thread_local std::string g_last_kernel_buf;

void SetLast(const std::string& name) {
  g_last_kernel_buf = name;
  g_last_kernel = g_last_kernel_buf.c_str();
}

// Returns "" when it ran, else why not.
std::string TryCutlass(const GemmProblem& p, Backend backend, const DeviceInfo& info,
                       Workspace* ws, cudaStream_t stream) {
  std::string why = CutlassUnusable(p, info);
  if (!why.empty()) return why;
  int cfg = ForcedCutlassConfig(backend);
  if (cfg < 0) cfg = PickCutlassConfig(p, info);
  const char* err = kCutlassFns[cfg](p, ws, stream);
  if (*err != 0) return err;
  MLCQ_CUDA_CHECK(cudaGetLastError());
  SetLast(std::string("cutlass:") + kCutlassNames[cfg]());
  return "";
}

bool TryCublasLt(const GemmProblem& p, Workspace* ws, cudaStream_t stream) {
  int32_t* acc = static_cast<int32_t*>(
      ws->get(static_cast<size_t>(p.M) * p.N * sizeof(int32_t), Workspace::kAcc32));
  LtGemm g;
  g.M = p.M, g.N = p.N, g.K = p.K, g.x = p.x, g.w = p.w, g.out = acc, g.device_id = p.device_id;
  if (!LtInt8Gemm(g, stream)) return false;
  LaunchDequantEpilogue(acc, p, stream);
  SetLast("cublaslt_i8+epilogue");
  return true;
}

// MLC_QUANT_SILU_EPILOGUE=off runs the fused op unfused (fp16 GEMM + the SiLU * up quantize
// kernel, the same values): for before/after measurements of one build.
bool SiluEpilogueEnabled() {
  static const bool on = EnvFlagOn("MLC_QUANT_SILU_EPILOGUE");
  return on;
}

// The SiLU * up + quantize epilogue (the ping-pong configs): true when it ran. Taken where the
// auto policy would run CUTLASS (M > kSmallM) or CUTLASS is forced, on PingpongConfigForRows.
// H100, Llama-2-7B gate/up, fused against the GEMM + the SiLU kernel (docs/performance.md,
// session 8): symmetric 42.9 / 46.3 us at M = 128, 85.2 / 93.7 at 512,
// 269.1 / 301.8 at 2048; asymmetric 42.5 / 51.2 at M = 128 but 100.9 / 95.5 at 512 and
// 313.7 / 307.6 at 2048 (its zero points, corrections and row-sum atomics tip the epilogue over
// the other consumer's mainloop), so asymmetric weights are fused up to M = 128 only.
constexpr int64_t kSiluAsymMaxM = 128;
bool TrySiluCutlass(const GemmProblem& p, Backend backend, const DeviceInfo& info, Workspace* ws,
                    cudaStream_t stream) {
  int cfg = ForcedCutlassConfig(backend);
  const bool forced = backend == Backend::kCutlass || cfg >= 0;
  if (!forced && (backend != Backend::kAuto || p.M <= kSmallM || (p.asym() && p.M > kSiluAsymMaxM) ||
                  !SiluEpilogueEnabled()))
    return false;
  if (cfg < 0) cfg = PingpongConfigForRows(p.M);
  std::string why = CutlassUnusable(p, info);
  if (why.empty() && kCutlassSiluFns[cfg] == nullptr) why = "the SiLU epilogue has no stream-K config";
  if (why.empty()) {
    if (p.silu->rowsum != nullptr) LaunchZeroI32(p.silu->rowsum, p.M, stream);
    why = kCutlassSiluFns[cfg](p, *p.silu, ws, stream);
  }
  if (!why.empty()) {
    if (forced) ThrowError("ValueError", "mlc_quant: CUTLASS backend forced but the SiLU epilogue is unusable: " + why);
    return false;
  }
  MLCQ_CUDA_CHECK(cudaGetLastError());
  SetLast(std::string("cutlass_silu_q:") + kCutlassNames[cfg]());
  return true;
}

// The unfused SiLU * up + quantize after a GEMM or GEMV wrote the fp16 gate/up to p.out.
void RunSiluAfter(const GemmProblem& p, cudaStream_t stream) {
  LaunchSiluMulQInterleaved(p.out, p.M, p.N / 2, p.silu->s, p.silu->z, p.silu->q, p.silu->rowsum, stream);
  SetLast(std::string(g_last_kernel) + "+silu_mul_q");
}

// p.out for the unfused SiLU path: fp16 scratch [M, N].
void SiluScratch(GemmProblem& p, Workspace* ws) {
  if (p.silu != nullptr && p.out == nullptr)
    p.out = ws->get(static_cast<size_t>(p.M) * p.N * 2, Workspace::kSiluOut);
}

void RunInt8Gemm(GemmProblem& p, Backend backend, cudaStream_t stream) {
  const DeviceInfo& info = GetDeviceInfo(p.device_id);
  p.sm_count = info.sm_count;
  Workspace* ws = Workspace::ForDevice(p.device_id);
  if (p.silu != nullptr) {
    if (TrySiluCutlass(p, backend, info, ws, stream)) return;
    SiluScratch(p, ws);
    GemmProblem plain = p;
    plain.silu = nullptr;
    RunInt8Gemm(plain, backend, stream);
    RunSiluAfter(p, stream);
    return;
  }
  if (backend == Backend::kCutlass || ForcedCutlassConfig(backend) >= 0) {  // forced: no fallback
    std::string why = TryCutlass(p, backend, info, ws, stream);
    if (!why.empty()) ThrowError("ValueError", "mlc_quant: CUTLASS backend forced but unusable: " + why);
    return;
  }
  switch (backend) {
    case Backend::kCublasLt:
      if (!TryCublasLt(p, ws, stream))
        ThrowError("ValueError", "mlc_quant: cuBLASLt has no int8 algorithm for M=" +
                                     std::to_string(p.M) + " N=" + std::to_string(p.N) +
                                     " K=" + std::to_string(p.K) + " (int8 needs K % 4 == 0)");
      return;
    case Backend::kSimt:
      LaunchSimtW8A8(p, stream);
      SetLast("simt");
      return;
    default:  // kAuto; kGemv is handled in RunLinear (it needs the unquantized x)
      break;
  }
  if (p.M <= kSmallM && TryCublasLt(p, ws, stream)) return;
  if (TryCutlass(p, Backend::kAuto, info, ws, stream).empty()) return;
  if (p.M > kSmallM && TryCublasLt(p, ws, stream)) return;
  LaunchSimtW8A8(p, stream);  // odd K (cuBLASLt's int8 GEMM wants K % 4 == 0)
  SetLast("simt");
}

}  // namespace

const char* LastKernelName() { return g_last_kernel; }

void RunLinear(const LinearArgs& a) {
  Checker ck(a);
  const bool silu = a.silu_q != nullptr;
  if (a.x == nullptr || a.w == nullptr || (a.out == nullptr && !silu)) ck.Fail("x, w and out are required");
  if (silu && a.out != nullptr) ck.Fail("give out or silu_q, not both");
  for (auto [t, name] : {std::pair{a.x, "x"}, {a.w, "w"}, {a.out, "out"}, {a.x_scale, "x_scale"},
                         {a.x_zero, "x_zero"}, {a.token_scale, "token_scale"},
                         {a.token_eps, "token_eps"}, {a.scale, "scale"},
                         {a.w_zero, "w_zero"}, {a.corr, "corr"}, {a.row_sum, "row_sum"},
                         {a.bias, "bias"}, {a.silu_q, "silu_q"}, {a.act_scale, "act_scale"},
                         {a.act_zero, "act_zero"}, {a.q_rowsum, "q_rowsum"}})
    ck.Device(t, name);
  const int device = ck.device();
  if (a.x->ndim < 1 || a.w->ndim != 2 || (!silu && a.out->ndim < 1))
    ck.Fail("expected x [..., K], a 2-D weight and out [..., N]");
  const int64_t K = a.x->shape[a.x->ndim - 1];
  const int64_t M = K == 0 ? 0 : Numel(a.x) / K;
  const bool kn = a.scheme == Scheme::kFloat && a.w_kn;
  const int64_t N = kn ? a.w->shape[1] : a.w->shape[0];
  const int64_t wK = kn ? a.w->shape[0] : a.w->shape[1];
  if (wK != K)
    ck.Fail("x has K=" + std::to_string(K) + " but the weight has K=" + std::to_string(wK));
  SiluQuantOut silu_out;
  if (silu) {
    if (a.scheme != Scheme::kSymmetric && a.scheme != Scheme::kAsymmetric)
      ck.Fail("silu_q needs the symmetric or asymmetric scheme (static int8 out)");
    if (N % 16 != 0) ck.Fail("silu_q needs N % 16 == 0 (gate/up interleaved in blocks of 8), got N=" + std::to_string(N));
    if (a.bias != nullptr) ck.Fail("silu_q takes no bias");
    ck.DType(a.silu_q, "silu_q", kDLInt, 8);
    if (a.silu_q->ndim < 1 || a.silu_q->shape[a.silu_q->ndim - 1] != N / 2 || Numel(a.silu_q) != M * (N / 2))
      ck.Fail("silu_q must be [..., " + std::to_string(N / 2) + "] with " + std::to_string(M) + " rows");
    ck.StaticQuant(a.act_scale, "act_scale", a.act_zero, "act_zero");
    if (a.q_rowsum != nullptr) {
      ck.DType(a.q_rowsum, "q_rowsum", kDLInt, 32);
      if (Numel(a.q_rowsum) != M) ck.Fail("q_rowsum must have one value per row of x");
    }
    silu_out.q = static_cast<int8_t*>(Data(a.silu_q));
    silu_out.s = static_cast<const float*>(Data(a.act_scale));
    silu_out.z = static_cast<const int8_t*>(Data(a.act_zero));
    silu_out.rowsum = static_cast<int32_t*>(Data(a.q_rowsum));
  } else if (a.out->shape[a.out->ndim - 1] != N || Numel(a.out) != M * N) {
    ck.Fail("out must be [..., " + std::to_string(N) + "] with " + std::to_string(M) + " rows");
  }
  const int out_kind = silu ? static_cast<int>(kF16) : FloatKind(a.out->dtype);
  if (out_kind < 0) ck.Fail("out dtype " + DTypeStr(a.out->dtype) + " is not a float type");
  if (a.bias != nullptr) {
    if (Numel(a.bias) != N || a.bias->shape[a.bias->ndim - 1] != N)
      ck.Fail("bias must have N=" + std::to_string(N) + " elements");
    if (!Is(a.bias->dtype, a.out->dtype.code, a.out->dtype.bits))
      ck.Fail("bias dtype " + DTypeStr(a.bias->dtype) + " differs from out dtype " +
              DTypeStr(a.out->dtype));
  }

  DeviceGuard guard(device);
  cudaStream_t stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  if (M == 0 || N == 0) return;

  if (a.scheme == Scheme::kFloat) {
    const int xk = FloatKind(a.x->dtype);
    if (xk < 0 || !Is(a.w->dtype, a.x->dtype.code, a.x->dtype.bits))
      ck.Fail("float linear needs x and w of the same float dtype, got " + DTypeStr(a.x->dtype) +
              " and " + DTypeStr(a.w->dtype));
    if (out_kind != xk) ck.Fail("float linear: out dtype must match x");
    // Decode-sized M: one bandwidth-bound GEMV beats cuBLASLt (docs/performance.md).
    // (backend kCublasLt keeps cuBLASLt, kGemv forces the GEMV where it applies)
    const bool gemv_ok = a.backend == Backend::kGemv || (a.backend == Backend::kAuto && GemvEnabled());
    const int64_t gemv_max_m = a.backend == Backend::kGemv ? kGemvMaxM : kGemvF16AutoMaxM;
    if (xk == kF16 && !kn && M <= gemv_max_m && gemv_ok &&
        GemvF16Usable(M, N, K, Data(a.x), Data(a.w), Data(a.out))) {
      LaunchGemvF16(M, N, K, Data(a.x), Data(a.w), Data(a.bias), Data(a.out), device, stream);
      SetLast("gemv_f16");
      return;
    }
    LtGemm g;
    g.M = M, g.N = N, g.K = K, g.x = Data(a.x), g.w = Data(a.w), g.w_kn = kn, g.out = Data(a.out);
    g.bias = Data(a.bias), g.in_dtype = xk, g.out_dtype = out_kind, g.device_id = device;
    if (!LtFloatGemm(g, stream))
      ThrowError("RuntimeError", "mlc_quant: cuBLASLt found no algorithm for the float GEMM M=" +
                                     std::to_string(M) + " N=" + std::to_string(N) +
                                     " K=" + std::to_string(K));
    SetLast("cublaslt_float");
    return;
  }

  // ---- W8A8 schemes ----
  ck.DType(a.w, "w", kDLInt, 8);
  const bool x_is_int8 = Is(a.x->dtype, kDLInt, 8);
  const int x_kind = FloatKind(a.x->dtype);
  if (!x_is_int8 && x_kind < 0) ck.Fail("x must be int8 or float, got " + DTypeStr(a.x->dtype));
  ck.Required(a.scale, "scale");
  ck.DType(a.scale, "scale", kDLFloat, 32);
  const bool asym = a.scheme == Scheme::kAsymmetric;
  const bool per_token = a.scheme == Scheme::kPerToken;

  GemmProblem p;
  p.M = M, p.N = N, p.K = K, p.w = Data(a.w), p.out = Data(a.out), p.out_dtype = out_kind;
  p.bias = Data(a.bias), p.bias_dtype = out_kind, p.device_id = device;
  if (silu) p.silu = &silu_out;
  Workspace* ws = Workspace::ForDevice(device);
  const Backend backend = EnvBackend(a.backend);
  // M <= 8 (decode): one GEMV kernel quantizes x, multiplies and applies the epilogue. Decided
  // here, before any workspace is touched (nothing to grow inside a CUDA graph capture).
  GemvInput gin;
  gin.x = Data(a.x);
  gin.x_dtype = x_is_int8 ? -1 : x_kind;
  bool try_gemv = (backend == Backend::kGemv && M <= kGemvMaxM) ||
                  (backend == Backend::kAuto && GemvEnabled() && M <= kGemvAutoMaxM);

  float* dynamic_scale = nullptr;  // per-token scales computed here (token_eps given)
  if (per_token) {
    if (a.token_scale != nullptr) {
      ck.DType(a.token_scale, "token_scale", kDLFloat, 32);
      if (Numel(a.token_scale) != M) ck.Fail("token_scale must have one value per row of x");
      p.scale_row = static_cast<const float*>(Data(a.token_scale));
    } else {
      if (a.token_eps == nullptr || x_is_int8)
        ck.Fail("per-token scheme needs token_scale, or float x and token_eps");
      ck.DType(a.token_eps, "token_eps", kDLFloat, 32);
      if (Numel(a.token_eps) != 1) ck.Fail("token_eps must be a scalar");
      gin.token_eps = static_cast<const float*>(Data(a.token_eps));
      if (!try_gemv) {
        dynamic_scale = static_cast<float*>(ws->get(static_cast<size_t>(M) * 4, Workspace::kTokenScale));
        p.scale_row = dynamic_scale;
      }
    }
    if (Numel(a.scale) != N) ck.Fail("per-token scheme needs a weight scale of N elements");
    p.scale_col = static_cast<const float*>(Data(a.scale));
    p.scale_col_is_vector = true;
  } else {
    const int64_t ns = Numel(a.scale);
    if (ns != 1 && ns != N) ck.Fail("scale must be a scalar or have N elements");
    p.scale_col = static_cast<const float*>(Data(a.scale));
    p.scale_col_is_vector = ns == N && N != 1;
  }

  int32_t* rowsum = nullptr;
  if (asym) {
    ck.Required(a.w_zero, "w_zero");
    ck.Required(a.corr, "corr");
    ck.DType(a.w_zero, "w_zero", kDLInt, 32);
    ck.DType(a.corr, "corr", kDLInt, 32);
    if (Numel(a.w_zero) != N || Numel(a.corr) != N) ck.Fail("w_zero and corr must have N elements");
    p.zw = static_cast<const int32_t*>(Data(a.w_zero));
    p.c = static_cast<const int32_t*>(Data(a.corr));
    if (a.row_sum != nullptr) {
      ck.DType(a.row_sum, "row_sum", kDLInt, 32);
      if (Numel(a.row_sum) != M) ck.Fail("row_sum must have one value per row of x");
      p.rowsum = static_cast<const int32_t*>(Data(a.row_sum));
    } else if (!try_gemv) {
      rowsum = static_cast<int32_t*>(ws->get(static_cast<size_t>(M) * 4, Workspace::kRowVec));
      p.rowsum = rowsum;
    }
  }

  if (!x_is_int8 && !per_token) ck.StaticQuant(a.x_scale, "x_scale", a.x_zero, "x_zero");
  if (try_gemv) {
    gin.x_mode = x_is_int8 ? 0 : per_token ? (gin.token_eps != nullptr ? 3 : 2) : 1;
    gin.x_scale = static_cast<const float*>(Data(a.x_scale));
    gin.x_zero = static_cast<const int8_t*>(Data(a.x_zero));
    // the GEMV computes the row sums itself (the same sums of the same int8 x)
    if (p.silu != nullptr) SiluScratch(p, ws);
    std::string why = GemvW8A8Unusable(p, gin);
    if (why.empty()) {
      LaunchGemvW8A8(p, gin, stream);
      SetLast("gemv_w8a8");
      if (p.silu != nullptr) RunSiluAfter(p, stream);
      return;
    }
    if (backend == Backend::kGemv) ThrowError("ValueError", "mlc_quant: GEMV backend forced but unusable: " + why);
    // fall back: the workspace buffers skipped above
    if (dynamic_scale == nullptr && per_token && a.token_scale == nullptr) {
      dynamic_scale = static_cast<float*>(ws->get(static_cast<size_t>(M) * 4, Workspace::kTokenScale));
      p.scale_row = dynamic_scale;
    }
    if (asym && p.rowsum == nullptr) {
      rowsum = static_cast<int32_t*>(ws->get(static_cast<size_t>(M) * 4, Workspace::kRowVec));
      p.rowsum = rowsum;
    }
  }

  if (x_is_int8) {
    p.x = Data(a.x);
    if (rowsum != nullptr) LaunchRowSum(static_cast<const int8_t*>(p.x), M, K, rowsum, stream);
  } else {
    int8_t* q = static_cast<int8_t*>(ws->get(static_cast<size_t>(M) * K, Workspace::kQuantX));
    if (dynamic_scale != nullptr) {
      LaunchQuantizePerTokenDynamic(Data(a.x), x_kind, M, K,
                                    static_cast<const float*>(Data(a.token_eps)), q,
                                    dynamic_scale, stream);
    } else if (per_token) {
      LaunchQuantizePerToken(Data(a.x), x_kind, M, K, p.scale_row, q, rowsum, stream);
    } else {  // x_scale / x_zero checked above
      LaunchQuantizePerTensor(Data(a.x), x_kind, M, K, static_cast<const float*>(Data(a.x_scale)),
                              static_cast<const int8_t*>(Data(a.x_zero)), q, rowsum, stream);
    }
    p.x = q;
  }
  RunInt8Gemm(p, backend == Backend::kGemv ? Backend::kAuto : backend, stream);
}

}  // namespace mlcq

// ---------------------------------------------------------------------------------------------
// tvm-ffi exports (tests, benchmarks, call_dps_packed users). Argument order is DPS: out last.

namespace {

using tvm::ffi::Optional;
using tvm::ffi::TensorView;
using OptT = Optional<TensorView>;

// A backend value the entry points take: mlcq::Backend's named values, or 16 + a tile config.
bool ValidBackend(int64_t backend) {
  const int64_t cfg0 = static_cast<int64_t>(mlcq::Backend::kCutlassCfgBase);
  return (backend >= 0 && backend <= 6) || (backend >= cfg0 && backend < cfg0 + mlcq::kNumCutlassConfigs);
}

void Linear(int64_t scheme, int64_t backend, TensorView x, TensorView w, bool w_kn, OptT x_scale,
            OptT x_zero, OptT token_scale, OptT token_eps, OptT scale, OptT w_zero, OptT corr,
            OptT row_sum, OptT bias, TensorView out) {
  using mlcq::DLView;
  if (scheme < 0 || scheme > 3) TVM_FFI_THROW(ValueError) << "mlcq_linear: bad scheme " << scheme;
  if (!ValidBackend(backend)) TVM_FFI_THROW(ValueError) << "mlcq_linear: bad backend " << backend;
  DLView vx(x, "x"), vw(w, "w"), vxs(x_scale, "x_scale"), vxz(x_zero, "x_zero"),
      vts(token_scale, "token_scale"), vte(token_eps, "token_eps"), vs(scale, "scale"),
      vwz(w_zero, "w_zero"),
      vc(corr, "corr"), vrs(row_sum, "row_sum"), vb(bias, "bias"), vo(out, "out");
  mlcq::LinearArgs a;
  a.scheme = static_cast<mlcq::Scheme>(scheme);
  a.backend = static_cast<mlcq::Backend>(backend);
  a.x = vx.get(), a.w = vw.get(), a.w_kn = w_kn, a.x_scale = vxs.get(), a.x_zero = vxz.get();
  a.token_scale = vts.get(), a.token_eps = vte.get(), a.scale = vs.get(), a.w_zero = vwz.get();
  a.corr = vc.get();
  a.row_sum = vrs.get(), a.bias = vb.get(), a.out = vo.get();
  mlcq::RunLinear(a);
}

// The gate/up linear with SiLU * up + quantize fused (LinearArgs::silu_q): any backend, for tests.
void LinearSiluQ(int64_t scheme, int64_t backend, TensorView x, TensorView w, OptT x_scale, OptT x_zero, TensorView scale,
                 OptT w_zero, OptT corr, OptT row_sum, TensorView act_scale, OptT act_zero, TensorView q,
                 OptT q_rowsum) {
  using mlcq::DLView;
  if (scheme != static_cast<int64_t>(mlcq::Scheme::kSymmetric) && scheme != static_cast<int64_t>(mlcq::Scheme::kAsymmetric))
    TVM_FFI_THROW(ValueError) << "mlcq_linear_silu_q: scheme must be 1 (symmetric) or 2 (asymmetric), got " << scheme;
  if (!ValidBackend(backend)) TVM_FFI_THROW(ValueError) << "mlcq_linear_silu_q: bad backend " << backend;
  DLView vx(x, "x"), vw(w, "w"), vxs(x_scale, "x_scale"), vxz(x_zero, "x_zero"), vs(scale, "scale"),
      vwz(w_zero, "w_zero"), vc(corr, "corr"), vrs(row_sum, "row_sum"), vas(act_scale, "act_scale"),
      vaz(act_zero, "act_zero"), vq(q, "q"), vqr(q_rowsum, "q_rowsum");
  mlcq::LinearArgs a;
  a.scheme = static_cast<mlcq::Scheme>(scheme);
  a.backend = static_cast<mlcq::Backend>(backend);
  a.x = vx.get(), a.w = vw.get(), a.x_scale = vxs.get(), a.x_zero = vxz.get(), a.scale = vs.get();
  a.w_zero = vwz.get(), a.corr = vc.get(), a.row_sum = vrs.get();
  a.silu_q = vq.get(), a.act_scale = vas.get(), a.act_zero = vaz.get(), a.q_rowsum = vqr.get();
  mlcq::RunLinear(a);
}

// call_dps_packed targets of passes/fuse_silu_gemm.py (int8 x; outputs last).
void W8A8SiluQ(TensorView x, TensorView w, TensorView scale, TensorView act_scale, TensorView act_zero, TensorView q) {
  LinearSiluQ(1, 0, x, w, OptT(), OptT(), scale, OptT(), OptT(), OptT(), act_scale, act_zero, q, OptT());
}
void W8A8SiluQs(TensorView x, TensorView w, TensorView scale, TensorView act_scale, TensorView act_zero, TensorView q,
                TensorView q_rowsum) {
  LinearSiluQ(1, 0, x, w, OptT(), OptT(), scale, OptT(), OptT(), OptT(), act_scale, act_zero, q, q_rowsum);
}
void W8A8AsymSiluQ(TensorView x, TensorView w, TensorView scale, TensorView row_sum, TensorView w_zero, TensorView corr,
                   TensorView act_scale, TensorView act_zero, TensorView q) {
  LinearSiluQ(2, 0, x, w, OptT(), OptT(), scale, w_zero, corr, row_sum, act_scale, act_zero, q, OptT());
}
void W8A8AsymSiluQs(TensorView x, TensorView w, TensorView scale, TensorView row_sum, TensorView w_zero, TensorView corr,
                    TensorView act_scale, TensorView act_zero, TensorView q, TensorView q_rowsum) {
  LinearSiluQ(2, 0, x, w, OptT(), OptT(), scale, w_zero, corr, row_sum, act_scale, act_zero, q, q_rowsum);
}

tvm::ffi::String LastKernel() { return tvm::ffi::String(mlcq::LastKernelName()); }

// Plain cuBLASLt int8 GEMM with int32 output: the baseline the fused kernels are measured against.
void Int8GemmI32(TensorView x, TensorView w, TensorView out) {
  mlcq::DLView vx(x, "x"), vw(w, "w"), vo(out, "out");
  if (x.dtype().code != kDLInt || x.dtype().bits != 8 || w.dtype().code != kDLInt ||
      w.dtype().bits != 8 || out.dtype().code != kDLInt || out.dtype().bits != 32)
    TVM_FFI_THROW(ValueError) << "mlcq_int8_gemm_i32: expected int8 x, int8 w, int32 out";
  const int64_t K = x.size(-1), M = x.numel() / K, N = w.size(0);
  if (w.size(1) != K || out.numel() != M * N)
    TVM_FFI_THROW(ValueError) << "mlcq_int8_gemm_i32: shape mismatch";
  const int device = x.device().device_id;
  mlcq::LtGemm g;
  g.M = M, g.N = N, g.K = K, g.x = x.data_ptr(), g.w = w.data_ptr(), g.out = out.data_ptr();
  g.device_id = device;
  cudaStream_t stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device));
  if (!mlcq::LtInt8Gemm(g, stream))
    TVM_FFI_THROW(ValueError) << "mlcq_int8_gemm_i32: cuBLASLt has no algorithm for this shape";
}

// Activation quantization alone (tests): per-tensor (token_scale absent) or per-token.
void Quantize(TensorView x, OptT scale, OptT zero, OptT token_scale, TensorView q, OptT row_sum) {
  const int64_t K = x.size(-1), M = x.numel() / K;
  mlcq::DLView vx(x, "x");
  const int kind = x.dtype().code == kDLFloat && x.dtype().bits == 16   ? mlcq::kF16
                   : x.dtype().code == kDLBfloat && x.dtype().bits == 16 ? mlcq::kBF16
                   : x.dtype().code == kDLFloat && x.dtype().bits == 32  ? mlcq::kF32
                                                                          : -1;
  if (kind < 0 || q.dtype().code != kDLInt || q.dtype().bits != 8 || q.numel() != M * K)
    TVM_FFI_THROW(ValueError) << "mlcq_quantize: expected float x and int8 q of the same size";
  int32_t* rs = row_sum.has_value() ? static_cast<int32_t*>((*row_sum).data_ptr()) : nullptr;
  cudaStream_t stream =
      static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, x.device().device_id));
  if (token_scale.has_value()) {
    mlcq::LaunchQuantizePerToken(x.data_ptr(), kind, M, K,
                                 static_cast<const float*>((*token_scale).data_ptr()),
                                 static_cast<int8_t*>(q.data_ptr()), rs, stream);
  } else {
    if (!scale.has_value()) TVM_FFI_THROW(ValueError) << "mlcq_quantize: scale required";
    mlcq::LaunchQuantizePerTensor(
        x.data_ptr(), kind, M, K, static_cast<const float*>((*scale).data_ptr()),
        zero.has_value() ? static_cast<const int8_t*>((*zero).data_ptr()) : nullptr,
        static_cast<int8_t*>(q.data_ptr()), rs, stream);
  }
}

// Dynamic per-token quantization alone (tests): q and the computed scales s_out [M].
void QuantizeDynamic(TensorView x, TensorView eps, TensorView q, TensorView s_out) {
  const int64_t K = x.size(-1), M = x.numel() / K;
  const int kind = x.dtype().code == kDLFloat && x.dtype().bits == 16   ? mlcq::kF16
                   : x.dtype().code == kDLBfloat && x.dtype().bits == 16 ? mlcq::kBF16
                   : x.dtype().code == kDLFloat && x.dtype().bits == 32  ? mlcq::kF32
                                                                          : -1;
  if (kind < 0 || q.numel() != M * K || s_out.numel() != M)
    TVM_FFI_THROW(ValueError) << "mlcq_quantize_dynamic: expected float x, int8 q like x, s_out [M]";
  cudaStream_t stream =
      static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, x.device().device_id));
  mlcq::LaunchQuantizePerTokenDynamic(x.data_ptr(), kind, M, K,
                                      static_cast<const float*>(eps.data_ptr()),
                                      static_cast<int8_t*>(q.data_ptr()),
                                      static_cast<float*>(s_out.data_ptr()), stream);
}

int64_t LtProbe(int64_t M, int64_t N, int64_t K, int64_t out_kind, bool alpha_vector, int64_t device) {
  return mlcq::LtProbeInt8(M, N, K, static_cast<int>(out_kind), alpha_vector, static_cast<int>(device));
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_linear, Linear);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_linear_silu_q, LinearSiluQ);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_w8a8_silu_q, W8A8SiluQ);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_w8a8_silu_qs, W8A8SiluQs);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_w8a8_asym_silu_q, W8A8AsymSiluQ);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_w8a8_asym_silu_qs, W8A8AsymSiluQs);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_lt_probe_int8, LtProbe);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_last_kernel, LastKernel);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_int8_gemm_i32, Int8GemmI32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_quantize, Quantize);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(mlcq_quantize_dynamic, QuantizeDynamic);
