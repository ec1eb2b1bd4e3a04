// SPDX-License-Identifier: Apache-2.0
// Programmatic dependent launch (PDL, sm_90+): a kernel launched with LaunchPdl may start (be
// scheduled, set up) while the kernel before it in the stream is still finishing, instead of
// after a full drain and relaunch: ~1-3 us of GPU idle per kernel boundary, which a 7B prefill
// pays ~350 times.
//
// The contract, for every kernel launched through LaunchPdl:
//   * its first statement is PdlWaitAndRelease(): nothing may read or write global memory
//     before griddepcontrol.wait returns, which is when the previous kernel has completed and
//     its writes are visible (the same guarantee as ordinary stream order);
//   * after the wait it lets the next kernel begin launching (launch_dependents). The next one
//     waits for this one's completion in turn, so at most one kernel runs ahead, and only to
//     spin at its own wait.
// Kernels launched the ordinary way (TVM's, cuBLAS's) are unaffected: a PDL kernel after one of
// them simply starts when it completes. MLC_QUANT_PDL=0 turns PDL off (ordinary launches).
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace mlcq {

__device__ __forceinline__ void PdlWaitAndRelease() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Kernel families, for MLC_QUANT_PDL as a bit mask (measurements: which launches gain or lose).
// Bit 0 is no family, so that MLC_QUANT_PDL=1 can keep meaning "on".
enum PdlKind : int {
  kPdlGemm = 2,    // CUTLASS W8A8 GEMM (ping-pong configs 0 and 2)
  kPdlNorm = 4,    // norm_act.cu: RMSNorm (+ add), SiLU * up, with or without the quantize
  kPdlRope = 8,    // rope.cu: split + RoPE, KV append
  kPdlAttn = 16,   // prefill and decode attention
  kPdlQuant = 32,  // kernels.cu: activation quantize, row sums
  kPdlGemv = 64,   // gemv.cu: small-M GEMVs
  kPdlAll = 126,
};

// PDL needs sm_90+; MLC_QUANT_PDL: unset, 1 or on: every family; 0, off or false: none; else a
// decimal mask of PdlKind bits, e.g. 2 = the GEMM alone (read once).
inline bool PdlEnabled(int device, int kind = kPdlAll) {
  static const int mask = [] {
    const char* v = std::getenv("MLC_QUANT_PDL");
    if (v == nullptr || *v == 0 || !std::strcmp(v, "on") || !std::strcmp(v, "1")) return int(kPdlAll);
    if (!std::strcmp(v, "0") || !std::strcmp(v, "off") || !std::strcmp(v, "false")) return 0;
    char* end = nullptr;
    const long m = std::strtol(v, &end, 10);
    if (*end == 0 && m > 0 && (m & ~long(kPdlAll)) == 0) return int(m);
    // Not a silent change of behaviour: say what was ignored (launch paths cannot throw here).
    std::fprintf(stderr, "mlc_quant: MLC_QUANT_PDL=%s is not 0|1|on|off or a family mask (even, 2-126); "
                 "using the default (on)\n", v);
    return int(kPdlAll);
  }();
  if ((mask & kind) == 0) return false;
  constexpr int kMaxDevices = 64;
  static int major[kMaxDevices] = {0};  // 0: not queried yet (benign race: same value)
  if (device < 0 || device >= kMaxDevices) return false;
  if (major[device] == 0) {
    int m = -1;
    if (cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
      cudaGetLastError();
      m = -1;
    }
    major[device] = m;
  }
  return major[device] >= 9;
}

inline bool PdlEnabledCurrent(int kind) {
  int device = -1;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return PdlEnabled(device, kind);
}

// kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute where enabled. The
// kernel must start with PdlWaitAndRelease(). Returns the launch status (check it as for <<<>>>).
template <typename... KArgs, typename... Args>
cudaError_t LaunchPdl(PdlKind kind, void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                      cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = PdlEnabledCurrent(kind) ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(std::forward<Args>(args))...);
}

}  // namespace mlcq
