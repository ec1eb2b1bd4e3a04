/*
 * NCCL collectives for TVM Disco, as a plugin library (libmlcq_disco_nccl.so).
 *
 * Why: the apache-tvm 0.27 wheel reports USE_NCCL=ON (tvm.support.libinfo()) but none of its
 * libraries registers `runtime.disco.nccl.*`: Disco sessions exist (libtvm_runtime_extra.so) but
 * `Session.init_ccl("nccl", ...)` finds no `runtime.disco.nccl.init_ccl`, and a module compiled
 * with `relax.op.ccl.allreduce` (lowered to `runtime.disco.allreduce`, which dispatches to
 * `runtime.disco.<worker ccl>.allreduce`) cannot run. This file is TVM's own
 * src/runtime/disco/nccl/nccl.cc (Apache-2.0, shipped as source in the wheel under
 * tvm/src/runtime/extra/disco/nccl/), cut to what a tensor-parallel LLM needs (init, allreduce,
 * allgather, broadcast from worker 0, sync) and with NCCL resolved at run time with dlopen/dlsym,
 * so it builds without NCCL's headers or library (the GPU machine has libnccl.so.2 from the
 * nvidia-nccl-cu13 package that PyTorch installs).
 *
 * Build: mlc_quant.disco.build_nccl_plugin(); load: mlc_quant.disco.load_nccl_plugin() (after
 * libtvm_runtime_extra.so, libtvm_runtime_cuda.so and libnccl.so.2 are loaded RTLD_GLOBAL).
 */
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/extra/cuda/base.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

// The leading members of TVM 0.27's tvm::runtime::DiscoWorker (include/tvm/runtime/disco/
// disco_worker.h; the wheel's C++ headers are incomplete: tvm/runtime/tensor.h includes
// tvm/support/io.h, which it does not ship). Only these members are read or written here, and
// InitCCLPerWorker checks the layout against the runtime's own accessors
// (runtime.disco.worker_rank / world_size / device).
namespace tvm {
namespace runtime {
class DiscoWorker {
 public:
  static DiscoWorker* ThreadLocal();  // defined in libtvm_runtime_extra.so
  int worker_id;
  int local_worker_id;
  int num_workers;
  int num_groups;
  DLDevice default_device;
  ffi::String ccl;
  // (worker_zero_data, channel, register_file follow; not used here)
};
}  // namespace runtime
}  // namespace tvm

// ---------------------------------------------------------------------------------------------
// The part of NCCL's public C API (nccl.h, NCCL 2.18+) used here. Values are NCCL's ABI.
extern "C" {
typedef struct ncclComm* ncclComm_t;
#define NCCL_UNIQUE_ID_BYTES 128
typedef struct {
  char internal[NCCL_UNIQUE_ID_BYTES];
} ncclUniqueId;
typedef enum { ncclSuccess = 0 } ncclResult_t;
typedef enum {
  ncclInt8 = 0,
  ncclUint8 = 1,
  ncclInt32 = 2,
  ncclUint32 = 3,
  ncclInt64 = 4,
  ncclUint64 = 5,
  ncclFloat16 = 6,
  ncclFloat32 = 7,
  ncclFloat64 = 8,
  ncclBfloat16 = 9
} ncclDataType_t;
typedef enum { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4 } ncclRedOp_t;
}

namespace mlcq {
namespace disco_nccl {

using tvm::runtime::DiscoWorker;
namespace ffi = tvm::ffi;
using Tensor = ffi::Tensor;

// tvm::runtime::ReduceKind (include/tvm/runtime/disco/builtin.h)
enum class ReduceKind : int32_t { kSum = 0, kProd = 1, kMin = 2, kMax = 3, kAvg = 4 };

struct NcclApi {
  int (*GetVersion)(int*) = nullptr;
  ncclResult_t (*GetUniqueId)(ncclUniqueId*) = nullptr;
  ncclResult_t (*CommInitRank)(ncclComm_t*, int, ncclUniqueId, int) = nullptr;
  ncclResult_t (*CommDestroy)(ncclComm_t) = nullptr;
  ncclResult_t (*AllReduce)(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t,
                            cudaStream_t) = nullptr;
  ncclResult_t (*AllGather)(const void*, void*, size_t, ncclDataType_t, ncclComm_t,
                            cudaStream_t) = nullptr;
  ncclResult_t (*Broadcast)(const void*, void*, size_t, ncclDataType_t, int, ncclComm_t,
                            cudaStream_t) = nullptr;
  const char* (*GetErrorString)(ncclResult_t) = nullptr;
  std::string library;
};

// libnccl.so.2: the copy already loaded in the process (RTLD_NOLOAD), else the dynamic loader's
// search path, else $MLC_QUANT_NCCL_LIBRARY.
const NcclApi& Api() {
  static NcclApi api;
  static std::once_flag once;
  std::call_once(once, [] {
    const char* env = std::getenv("MLC_QUANT_NCCL_LIBRARY");
    void* h = nullptr;
    if (env && *env) {
      h = dlopen(env, RTLD_NOW | RTLD_GLOBAL);
      api.library = env;
    }
    if (!h) {
      h = dlopen("libnccl.so.2", RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
      if (!h) h = dlopen("libnccl.so.2", RTLD_NOW | RTLD_GLOBAL);
      api.library = "libnccl.so.2";
    }
    TVM_FFI_CHECK(h != nullptr, RuntimeError)
        << "mlc_quant disco: cannot load NCCL (libnccl.so.2): " << dlerror()
        << "; preload it (mlc_quant.disco.load_nccl) or set MLC_QUANT_NCCL_LIBRARY";
    auto sym = [&](const char* name) {
      void* p = dlsym(h, name);
      TVM_FFI_CHECK(p != nullptr, RuntimeError) << "mlc_quant disco: NCCL lacks " << name;
      return p;
    };
    api.GetVersion = reinterpret_cast<int (*)(int*)>(sym("ncclGetVersion"));
    api.GetUniqueId = reinterpret_cast<decltype(api.GetUniqueId)>(sym("ncclGetUniqueId"));
    api.CommInitRank = reinterpret_cast<decltype(api.CommInitRank)>(sym("ncclCommInitRank"));
    api.CommDestroy = reinterpret_cast<decltype(api.CommDestroy)>(sym("ncclCommDestroy"));
    api.AllReduce = reinterpret_cast<decltype(api.AllReduce)>(sym("ncclAllReduce"));
    api.AllGather = reinterpret_cast<decltype(api.AllGather)>(sym("ncclAllGather"));
    api.Broadcast = reinterpret_cast<decltype(api.Broadcast)>(sym("ncclBroadcast"));
    api.GetErrorString = reinterpret_cast<decltype(api.GetErrorString)>(sym("ncclGetErrorString"));
  });
  return api;
}

#define MLCQ_NCCL_CALL(cmd)                                                                   \
  do {                                                                                        \
    ncclResult_t r = (cmd);                                                                   \
    if (r != ncclSuccess) {                                                                   \
      TVM_FFI_THROW(InternalError) << "NCCL error " << static_cast<int>(r) << ": "            \
                                   << Api().GetErrorString(r) << " (" #cmd ")";               \
    }                                                                                         \
  } while (0)

ncclDataType_t AsNCCLDataType(DLDataType dtype) {
  if (dtype.lanes == 1) {
    if (dtype.code == kDLInt && dtype.bits == 8) return ncclInt8;
    if (dtype.code == kDLUInt && dtype.bits == 8) return ncclUint8;
    if (dtype.code == kDLInt && dtype.bits == 32) return ncclInt32;
    if (dtype.code == kDLUInt && dtype.bits == 32) return ncclUint32;
    if (dtype.code == kDLInt && dtype.bits == 64) return ncclInt64;
    if (dtype.code == kDLUInt && dtype.bits == 64) return ncclUint64;
    if (dtype.code == kDLFloat && dtype.bits == 16) return ncclFloat16;
    if (dtype.code == kDLFloat && dtype.bits == 32) return ncclFloat32;
    if (dtype.code == kDLFloat && dtype.bits == 64) return ncclFloat64;
    if (dtype.code == kDLBfloat && dtype.bits == 16) return ncclBfloat16;
  }
  TVM_FFI_THROW(ValueError) << "NCCL: unsupported data type " << dtype;
  throw;
}

ncclRedOp_t AsNCCLRedOp(int kind) {
  switch (static_cast<ReduceKind>(kind)) {
    case ReduceKind::kSum:
      return ncclSum;
    case ReduceKind::kProd:
      return ncclProd;
    case ReduceKind::kMin:
      return ncclMin;
    case ReduceKind::kMax:
      return ncclMax;
    case ReduceKind::kAvg:
      return ncclAvg;
  }
  TVM_FFI_THROW(ValueError) << "Unknown ReduceKind: " << kind;
  throw;
}

// One per Disco worker thread (a ThreadedSession runs all workers in one process).
struct Context {
  DiscoWorker* worker = nullptr;
  int device_id = 0;
  ncclComm_t comm = nullptr;

  ~Context() { Clear(); }
  void Clear() {
    if (comm) {
      Api().CommDestroy(comm);
      comm = nullptr;
    }
    worker = nullptr;
  }
  // The stream TVM runs this worker's kernels on: the tvm-ffi environment stream of the device
  // (TVM's CUDA-graph capture sets it to the capture stream, so the collective is captured too),
  // else the legacy default stream, which the kernels use then: no cross-stream ordering needed.
  cudaStream_t Stream() const {
    return static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device_id));
  }
  static Context* Get() {
    thread_local static Context ctx;
    return &ctx;
  }
};

// Session.init_ccl("nccl", *device_ids) on the controller: one unique id, sent to every worker.
void InitCCL(ffi::ObjectRef sess, ffi::Shape device_ids) {
  ncclUniqueId id;
  MLCQ_NCCL_CALL(Api().GetUniqueId(&id));
  ffi::Any func = ffi::Function::GetGlobalRequired("runtime.disco.SessionGetGlobalFunc")(
      sess, ffi::String("runtime.disco.nccl.init_ccl_per_worker"));
  ffi::Function::GetGlobalRequired("runtime.disco.SessionCallPacked")(
      sess, 0, 0, func, device_ids, ffi::Bytes(id.internal, NCCL_UNIQUE_ID_BYTES));
}

void InitCCLPerWorker(ffi::Shape device_ids, std::string unique_id_bytes) {
  Context* ctx = Context::Get();
  DiscoWorker* worker = DiscoWorker::ThreadLocal();
  TVM_FFI_ICHECK(worker != nullptr) << "init_ccl_per_worker must run on a Disco worker";
  TVM_FFI_CHECK_EQ(unique_id_bytes.size(), NCCL_UNIQUE_ID_BYTES, ValueError)
      << "NCCL unique id must be " << NCCL_UNIQUE_ID_BYTES << " bytes";
  TVM_FFI_CHECK(worker->num_groups == 1, ValueError)
      << "mlc_quant's NCCL plugin supports one group (tensor parallelism only), got "
      << worker->num_groups;
  TVM_FFI_CHECK(ctx->comm == nullptr, RuntimeError) << "NCCL already initialized on this worker";
  TVM_FFI_CHECK(worker->local_worker_id < static_cast<int>(device_ids.size()), ValueError)
      << "init_ccl got " << device_ids.size() << " device ids for worker " << worker->local_worker_id;
  int device_id = static_cast<int>(device_ids[worker->local_worker_id]);
  TVM_FFI_CHECK_CUDA_ERROR(cudaSetDevice(device_id));
  DLDevice device{kDLCUDA, device_id};
  if (worker->default_device.device_type == kDLCPU) {
    worker->default_device = device;
  } else {
    TVM_FFI_ICHECK(worker->default_device.device_type == kDLCUDA &&
                   worker->default_device.device_id == device_id)
        << "the worker's default device differs from its NCCL device " << device_id;
  }
  // Layout check of the mirrored DiscoWorker against the runtime's accessors.
  int64_t rank = ffi::Function::GetGlobalRequired("runtime.disco.worker_rank")().cast<int64_t>();
  int64_t world = ffi::Function::GetGlobalRequired("runtime.disco.world_size")().cast<int64_t>();
  DLDevice dev = ffi::Function::GetGlobalRequired("runtime.disco.device")().cast<DLDevice>();
  TVM_FFI_CHECK(rank == worker->worker_id && world == worker->num_workers &&
                    dev.device_type == kDLCUDA && dev.device_id == device_id,
                RuntimeError)
      << "mlc_quant's NCCL plugin does not match this TVM's DiscoWorker layout (built for 0.27)";
  worker->ccl = "nccl";
  ctx->worker = worker;
  ctx->device_id = device_id;
  ncclUniqueId id;
  std::memcpy(id.internal, unique_id_bytes.data(), NCCL_UNIQUE_ID_BYTES);
  MLCQ_NCCL_CALL(Api().CommInitRank(&ctx->comm, worker->num_workers, id, worker->worker_id));
}

Context* Ready() {
  Context* ctx = Context::Get();
  TVM_FFI_CHECK(ctx->comm != nullptr, RuntimeError)
      << "NCCL is not initialized on this worker: call Session.init_ccl(\"nccl\", ...) first";
  return ctx;
}

void AllReduce(Tensor send, int kind, bool in_group, Tensor recv) {
  Context* ctx = Ready();
  (void)in_group;  // one group: in-group == global
  MLCQ_NCCL_CALL(Api().AllReduce(send.data_ptr(), recv.data_ptr(), send.numel(),
                                 AsNCCLDataType(send.dtype()), AsNCCLRedOp(kind), ctx->comm,
                                 ctx->Stream()));
}

void AllGather(Tensor send, bool in_group, Tensor recv) {
  Context* ctx = Ready();
  (void)in_group;
  MLCQ_NCCL_CALL(Api().AllGather(send.data_ptr(), recv.data_ptr(), send.numel(),
                                 AsNCCLDataType(send.dtype()), ctx->comm, ctx->Stream()));
}

void BroadcastFromWorker0(ffi::Optional<Tensor> send, bool in_group, Tensor recv) {
  Context* ctx = Ready();
  (void)in_group;
  const void* send_data = nullptr;
  if (ctx->worker->worker_id == 0) {
    TVM_FFI_ICHECK(send.has_value()) << "worker 0 must give the tensor to broadcast";
    TVM_FFI_ICHECK_EQ(send.value().numel(), recv.numel());
    send_data = send.value().data_ptr();
  }
  MLCQ_NCCL_CALL(Api().Broadcast(send_data, recv.data_ptr(), recv.numel(),
                                 AsNCCLDataType(recv.dtype()), 0, ctx->comm, ctx->Stream()));
}

// Session._sync_worker: everything enqueued on this worker's GPU is done (timing relies on it).
void SyncWorker() {
  Context* ctx = Ready();
  TVM_FFI_CHECK_CUDA_ERROR(cudaSetDevice(ctx->device_id));
  TVM_FFI_CHECK_CUDA_ERROR(cudaDeviceSynchronize());
}

int64_t NcclVersion() {
  int v = 0;
  MLCQ_NCCL_CALL(static_cast<ncclResult_t>(Api().GetVersion(&v)));
  return v;
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("runtime.disco.compiled_ccl", []() -> ffi::String { return "nccl"; })
      .def("runtime.disco.nccl.init_ccl", InitCCL)
      .def("runtime.disco.nccl.init_ccl_per_worker", InitCCLPerWorker)
      .def("runtime.disco.nccl.allreduce", AllReduce)
      .def("runtime.disco.nccl.allgather", AllGather)
      .def("runtime.disco.nccl.broadcast_from_worker0", BroadcastFromWorker0)
      .def("runtime.disco.nccl.sync_worker", SyncWorker)
      .def("mlc_quant.disco.nccl_version", NcclVersion)
      .def("mlc_quant.disco.nccl_library", []() -> ffi::String { return Api().library; });
}

}  // namespace disco_nccl
}  // namespace mlcq
