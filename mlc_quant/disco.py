"""Run a tensor-parallel build on N GPUs with TVM Disco + NCCL (issue #9), runtime-only TVM.

A ``--tensor-parallel-shards N`` build (mlc_quant/sharding.py) is one compiled module (H/N heads,
I/N MLP width, ``relax.op.ccl.allreduce`` after o/down, lowered to ``runtime.disco.allreduce``)
plus ``params-shard{i}.safetensors``. :class:`DiscoEngine` opens a Disco session of N workers
(one GPU each), initializes NCCL, loads the module on every worker (``load_vm_module``), each
worker's params (worker i reads shard i itself, or makes seeded random weights on its GPU for the
benchmark), creates one paged KV cache per worker (each holds its own KV heads), and drives
prefill/decode: the token ids are copied to worker 0 and broadcast (NCCL), every worker runs the
same function on its shard, the logits (replicated: the LM head is not sharded) come back from
worker 0. It subclasses :class:`mlc_quant.runtime.Engine`, so ``prefill``, ``decode``,
``generate`` and ``perplexity`` behave exactly as on one device.

What the apache-tvm 0.27 wheel lacks, and what this module does about it:

1. Runtime-only TVM (``TVM_USE_RUNTIME_LIB=1``, the GPU machines' bundle) does not load
   ``libtvm_runtime_extra.so``, where Disco lives (``runtime.disco.SessionThreaded`` etc.):
   :func:`load_disco_runtime` ctypes-loads it from ``tvm/lib``.
2. The wheel says ``USE_NCCL=ON`` (``tvm.support.libinfo()``) but registers no
   ``runtime.disco.nccl.*`` function in any of its libraries: ``Session.init_ccl("nccl")`` fails
   and ``runtime.disco.allreduce`` finds no CCL. ``mlc_quant/kernels/disco_nccl.cc`` is TVM's
   own ``nccl.cc`` (shipped as source in the wheel) cut to init/allreduce/allgather/broadcast/
   sync, NCCL resolved with dlopen; :func:`build_nccl_plugin` compiles it with g++ against the
   wheel's ``libtvm_runtime_extra.so``/``libtvm_ffi.so`` (no NCCL headers or library needed), the
   build writes it next to ``model.so`` (``libmlcq_disco_nccl.so``), :func:`load_nccl_plugin`
   loads ``libnccl.so.2`` (the ``nvidia-nccl-cu13`` package PyTorch installs, or the system's)
   and then the plugin.
3. ``ProcessSession`` workers start ``python -m tvm.exec.disco_worker``, which in runtime-only
   mode has no Disco either: the entrypoint :mod:`mlc_quant.disco_worker` prepares the process
   first (environment variables set here carry the plugin path).

No ``tvm.relax`` import: this runs where only TVM's runtime is installed.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import itertools
import json
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from mlc_quant.runtime import Engine

log = logging.getLogger("mlc_quant")

PLUGIN_FILE = "libmlcq_disco_nccl.so"
PLUGIN_SOURCE = Path(__file__).resolve().parent / "kernels" / "disco_nccl.cc"
ENV_PLUGIN = "MLC_QUANT_DISCO_PLUGIN"  # path of the NCCL plugin, read by disco_worker processes
ENV_CUDA = "MLC_QUANT_DISCO_CUDA"  # "1": worker processes prepare the CUDA runtime

_STATE: Dict[str, object] = {}
_LOCK = threading.Lock()


def _global(name: str):
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    return tvm_ffi.get_global_func(name, allow_missing=True)


def _tvm_lib_dir() -> Path:
    import tvm  # pylint: disable=import-outside-toplevel

    return Path(tvm.__file__).resolve().parent / "lib"


def load_disco_runtime() -> Optional[str]:
    """Make TVM's Disco available (idempotent): ctypes-load ``libtvm_runtime_extra.so`` unless
    ``runtime.disco.SessionThreaded`` is registered. Returns the path loaded, or None."""
    if _global("runtime.disco.SessionThreaded") is not None:
        return None
    path = _tvm_lib_dir() / "libtvm_runtime_extra.so"
    if not path.is_file():
        raise RuntimeError(f"TVM's Disco runtime ({path.name}) is not next to the tvm package ({path.parent})")
    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    if _global("runtime.disco.SessionThreaded") is None:
        raise RuntimeError(f"loaded {path} but runtime.disco.SessionThreaded is still not registered")
    return str(path)


# ----------------------------------------------------------------------------- NCCL


def nccl_library_candidates() -> List[str]:
    """Where ``libnccl.so.2`` may be: $MLC_QUANT_NCCL_LIBRARY, the nvidia-nccl pip packages
    (PyTorch's dependency), the CUDA toolkit, then the loader's default search path."""
    out: List[str] = []
    if os.environ.get("MLC_QUANT_NCCL_LIBRARY"):
        out.append(os.environ["MLC_QUANT_NCCL_LIBRARY"])
    try:
        import importlib.util  # pylint: disable=import-outside-toplevel

        spec = importlib.util.find_spec("nvidia")
        for base in (spec.submodule_search_locations or []) if spec else []:
            for sub in ("nccl", "cu13", "cu12"):
                out += sorted(glob.glob(os.path.join(base, sub, "lib", "libnccl.so*")))
    except Exception:  # pylint: disable=broad-except
        pass
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            out += sorted(glob.glob(os.path.join(home, "lib64", "libnccl.so*")))
    out.append("libnccl.so.2")
    return list(dict.fromkeys(out))


def load_nccl() -> str:
    """dlopen ``libnccl.so.2`` (RTLD_GLOBAL) from :func:`nccl_library_candidates`; its path."""
    if "nccl" in _STATE:
        return str(_STATE["nccl"])
    errors = []
    for c in nccl_library_candidates():
        try:
            ctypes.CDLL(c, mode=ctypes.RTLD_GLOBAL)
            _STATE["nccl"] = c
            return c
        except OSError as err:
            errors.append(f"{c}: {err}")
    raise RuntimeError("NCCL (libnccl.so.2) not found; install nvidia-nccl-cu13 (PyTorch's) or set "
                       "MLC_QUANT_NCCL_LIBRARY. Tried: " + "; ".join(errors[-4:]))


def _plugin_flags() -> List[str]:
    import tvm_ffi.libinfo as li  # pylint: disable=import-outside-toplevel

    from mlc_quant.kernels.build import cuda_home  # pylint: disable=import-outside-toplevel

    ffi_inc = list(dict.fromkeys([li.find_include_path(), li.find_dlpack_include_path()]))
    ffi_lib = str(Path(li.find_libtvm_ffi()).parent)
    cuda = cuda_home()
    return ([f"-I{d}" for d in ffi_inc] + [f"-I{cuda / 'include'}", f"-L{_tvm_lib_dir()}", f"-L{ffi_lib}",
                                            f"-L{cuda / 'lib64'}", "-Wl,--no-as-needed", "-ltvm_runtime_extra",
                                            "-ltvm_ffi", "-lcudart", "-ldl"])


def build_nccl_plugin(out_path) -> str:
    """Compile ``kernels/disco_nccl.cc`` into ``out_path`` (g++, the CUDA toolkit's headers; no
    GPU and no NCCL needed). Cached under ``~/.cache/mlc_quant/objects`` by source and flags."""
    from mlc_quant.kernels.build import cache_dir  # pylint: disable=import-outside-toplevel

    cxx = os.environ.get("CXX") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("g++ not found: the Disco NCCL plugin is C++")
    flags = ["-std=c++17", "-O2", "-fPIC", "-shared"] + _plugin_flags()
    key = hashlib.sha256(PLUGIN_SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:20]
    cached = cache_dir() / "objects" / f"mlcq_disco_nccl-{key}.so"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cached.parent)
        os.close(fd)
        cmd = [cxx, str(PLUGIN_SOURCE), "-o", tmp, *flags]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"building the Disco NCCL plugin failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, cached)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, out)
    return str(out)


def load_nccl_plugin(path=None) -> Dict[str, object]:
    """Everything ``Session.init_ccl("nccl", ...)`` needs in this process (idempotent): TVM's CUDA
    runtime, Disco, libnccl.so.2 and the plugin (``path``, else $MLC_QUANT_DISCO_PLUGIN)."""
    with _LOCK:
        if _global("runtime.disco.nccl.init_ccl") is not None and "plugin" in _STATE:
            return dict(_STATE)
        from mlc_quant.cuda_runtime import prepare_cuda_runtime  # pylint: disable=import-outside-toplevel

        prepare_cuda_runtime()
        _STATE["disco_runtime"] = load_disco_runtime()
        _STATE["nccl"] = load_nccl()
        path = path or os.environ.get(ENV_PLUGIN)
        if _global("runtime.disco.nccl.init_ccl") is None:
            if not path or not Path(path).is_file():
                raise RuntimeError(f"no Disco NCCL plugin ({PLUGIN_FILE}): this TVM registers no runtime.disco.nccl.*; "
                                   f"build it with mlc_quant.disco.build_nccl_plugin() (a CUDA tensor-parallel "
                                   f"build writes it next to model.so) or set {ENV_PLUGIN}")
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            if _global("runtime.disco.nccl.init_ccl") is None:
                raise RuntimeError(f"loaded {path} but runtime.disco.nccl.init_ccl is not registered")
        _STATE["plugin"] = str(path) if path else "built-in"
        _STATE["nccl_version"] = int(_global("mlc_quant.disco.nccl_version")()) \
            if _global("mlc_quant.disco.nccl_version") is not None else None
        return dict(_STATE)


# ----------------------------------------------------------------------------- worker-side params
#
# Each worker loads (or makes) its own shard's weights: a worker-side Python function, reached
# through Session.get_global_func, returns one param per call as a Tensor on the worker's device;
# the session keeps it in a register (a DRef) that the model functions take as an argument.

_WORKER_PARAMS: Dict[str, Dict[int, List]] = {}  # token -> rank -> [(name, tensor)], kept alive
_HOST_SOURCES: Dict[str, List] = {}  # token -> per-shard in-memory params (ThreadedSession only)
_TOKENS = itertools.count()


def _worker_rank() -> int:
    return int(_global("runtime.disco.worker_rank")())


def _worker_device():
    import tvm  # pylint: disable=import-outside-toplevel

    return _global("runtime.disco.device")() if _global("runtime.disco.device") else tvm.cpu(0)


def _to_device(array, dev):
    import tvm  # pylint: disable=import-outside-toplevel

    return tvm.runtime.tensor(np.ascontiguousarray(array).reshape(np.shape(array)), dev)


def _load_shard(spec: Dict, rank: int, names: Sequence[str], dev) -> List:
    """[(name, device tensor, keepalive)] of shard ``rank`` from a spec."""
    kind = spec["kind"]
    if kind == "host":  # in-memory dicts registered by the controller (same process)
        src = _HOST_SOURCES[spec["token"]][rank]
        return [(n, _to_device(src[n], dev), None) for n in names]
    if kind == "files":
        from mlc_quant import artifact  # pylint: disable=import-outside-toplevel

        params = artifact.load_safetensors(spec["files"][rank])
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"{spec['files'][rank]} lacks {len(missing)} params the module takes, e.g. {missing[:3]}")
        return [(n, _to_device(params[n], dev), None) for n in names]
    if kind == "random":  # the benchmark: seeded random weights made on the worker's GPU
        from mlc_quant.bench import _torch, random_weight  # pylint: disable=import-outside-toplevel

        torch = _torch() if dev.dlpack_device_type() == 2 else None  # kDLCUDA
        shapes = {n: (s, d) for n, s, d in spec["params"]}
        out = []
        ctx = torch.cuda.device(dev.index) if torch is not None else _null()
        with ctx:
            for n in names:
                shape, dtype = shapes[n]
                t, keep = random_weight(n, shape, dtype, int(spec.get("seed", 0)) + 7919 * rank, dev, torch)
                out.append((n, t, keep))
        return out
    raise ValueError(f"unknown params source {kind!r}")


class _null:  # pylint: disable=invalid-name
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _worker_load(token: str, spec_json: str, names_json: str) -> int:
    rank = _worker_rank()
    loaded = _load_shard(json.loads(spec_json), rank, json.loads(names_json), _worker_device())
    with _LOCK:
        _WORKER_PARAMS.setdefault(token, {})[rank] = loaded
    return len(loaded)


def _worker_param(token: str, index: int):
    return _WORKER_PARAMS[token][_worker_rank()][int(index)][1]


def _worker_free(token: str) -> int:
    with _LOCK:
        _WORKER_PARAMS.get(token, {}).pop(_worker_rank(), None)
        if token in _WORKER_PARAMS and not _WORKER_PARAMS[token]:
            del _WORKER_PARAMS[token]
    return 0


_PROFILES: Dict[int, object] = {}  # rank -> bench.OpProfile


def _worker_set_profiler(vm_module, on: int) -> int:
    """Per-op device time of this worker's VM (bench.OpProfile: synchronize around every call)."""
    from mlc_quant.bench import OpProfile  # pylint: disable=import-outside-toplevel

    rank = _worker_rank()
    if int(on):
        prof = _PROFILES[rank] = OpProfile(_worker_device())
        vm_module["set_instrument"](lambda *a: prof(*a))
    else:
        vm_module["set_instrument"](lambda *a: 0)
    return 0


def _worker_profile_table() -> str:
    prof = _PROFILES.get(_worker_rank())
    return json.dumps(prof.table() if prof is not None else [])


def register_worker_functions() -> None:
    """The worker-side globals (this module's import does it; also in every worker process)."""
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    tvm_ffi.register_global_func("mlc_quant.disco.load", _worker_load, override=True)
    tvm_ffi.register_global_func("mlc_quant.disco.param", _worker_param, override=True)
    tvm_ffi.register_global_func("mlc_quant.disco.free", _worker_free, override=True)
    tvm_ffi.register_global_func("mlc_quant.disco.set_profiler", _worker_set_profiler, override=True)
    tvm_ffi.register_global_func("mlc_quant.disco.profile_table", _worker_profile_table, override=True)


register_worker_functions()


# ----------------------------------------------------------------------------- the engine


class DiscoEngine(Engine):  # pylint: disable=too-many-instance-attributes
    """Batch-1 inference of a tensor-parallel module on ``num_shards`` Disco workers.

    ``params``: per-shard sources, one of
      * a list of ``num_shards`` paths to safetensors files (``params-shard{i}.safetensors``);
      * a list of ``num_shards`` mappings name -> array (ThreadedSession only: same process);
      * ``{"kind": "random", "params": [(name, shape, dtype)], "seed": s}``: seeded random
        weights made on each worker's device (the benchmark; 7B weights never leave the GPU).
    ``device``: ``cuda`` (worker i on GPU ``device_ids[i]``, NCCL) or ``cpu`` (tests: needs
    ``ccl=None`` and a host collective registered by the caller; TVM has no CPU CCL).
    ``session``: ``thread`` (ThreadedSession: one process, a thread per worker) or ``process``
    (ProcessSession: worker 0 in this process, the others in ``mlc_quant.disco_worker``).
    """

    def __init__(self, module_path, params, num_shards: int, *, device: str = "cuda",
                 device_ids: Optional[Sequence[int]] = None, session: str = "thread",
                 ccl: Optional[str] = "auto", plugin: Optional[str] = None, max_seq_len: int = 2048,
                 prefill_chunk_size: Optional[int] = None, page_size: int = 16, eos_token_ids=(),
                 vocab_size: Optional[int] = None):
        # pylint: disable=super-init-not-called  (Engine.__init__ builds a single-device VM)
        import tvm  # pylint: disable=import-outside-toplevel
        import tvm_ffi  # pylint: disable=import-outside-toplevel

        self.num_shards = int(num_shards)
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        if not os.path.isfile(os.fspath(module_path)):
            raise FileNotFoundError(f"compiled model library {module_path} not found")
        if device not in ("cuda", "cpu"):
            raise ValueError(f"device must be cuda or cpu, got {device!r}")
        if session not in ("thread", "process"):
            raise ValueError(f"session must be thread or process, got {session!r}")
        self.device_ids = list(device_ids) if device_ids is not None else list(range(self.num_shards))
        if len(self.device_ids) != self.num_shards:
            raise ValueError(f"{self.num_shards} shards need {self.num_shards} device ids, got {self.device_ids}")
        if ccl == "auto":
            ccl = "nccl" if device == "cuda" else None
        if device == "cuda":
            if ccl != "nccl":
                raise ValueError("CUDA workers communicate through NCCL (ccl='nccl')")
            self.runtime_info = load_nccl_plugin(plugin)
            os.environ[ENV_CUDA] = "1"
            if self.runtime_info.get("plugin") not in (None, "built-in"):
                os.environ[ENV_PLUGIN] = str(self.runtime_info["plugin"])
        else:
            if ccl is not None:
                raise ValueError("TVM's Disco has no CPU collective: use ccl=None on the CPU")
            load_disco_runtime()
            self.runtime_info = {"disco_runtime": "cpu"}
        disco = disco_module()
        self.max_seq_len = int(max_seq_len)
        self.prefill_chunk_size = int(prefill_chunk_size or min(self.max_seq_len, 2048))
        self.page_size = int(page_size)
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.stats_callback = None
        self.device = tvm.cpu(0)  # where results land (the host)
        self.worker_device = "cuda" if device == "cuda" else "cpu"
        if session == "thread":
            self.sess = disco.ThreadedSession(self.num_shards)
        else:
            self.sess = disco.ProcessSession(self.num_shards, entrypoint="mlc_quant.disco_worker")
            self.sess.import_python_module("mlc_quant.disco")
        if ccl is not None:
            self.sess.init_ccl(ccl, *self.device_ids)
        self.mod = self.sess.load_vm_module(os.path.abspath(os.fspath(module_path)))
        self._f = {fn: self.mod[fn] for fn in ("prefill", "decode")}
        names = self._remote_weight_names("prefill")
        if self._remote_weight_names("decode") != names:
            raise ValueError("prefill and decode take different weights: not supported by DiscoEngine")
        self.weight_names = names
        self._token = f"s{os.getpid()}_{next(_TOKENS)}"
        spec = self._params_spec(params, names)
        load = self.sess.get_global_func("mlc_quant.disco.load")
        load(self._token, json.dumps(spec), json.dumps(names))
        getp = self.sess.get_global_func("mlc_quant.disco.param")
        self._params = [getp(self._token, i) for i in range(len(names))]
        self.sess._sync_all()  # pylint: disable=protected-access  (errors surface here)
        self.vocab_size = vocab_size
        g = self.sess.get_global_func
        self._begin = g("vm.builtin.kv_state_begin_forward")
        self._end = g("vm.builtin.kv_state_end_forward")
        self._clear = g("vm.builtin.kv_state_clear")
        self._add_seq = g("vm.builtin.kv_state_add_sequence")
        self._getitem = g("vm.builtin.tuple_getitem")
        self.kv_cache = self.mod["create_paged_kv_cache"](
            tvm_ffi.Shape([1]), tvm_ffi.Shape([self.max_seq_len]), tvm_ffi.Shape([self.prefill_chunk_size]),
            tvm_ffi.Shape([self.page_size]))
        self.seq_len = 0
        self._add_seq(self.kv_cache, 0)
        self.sess._sync_all()  # pylint: disable=protected-access

    # ------------------------------------------------------------------ setup

    def _remote_weight_names(self, fn: str) -> List[str]:
        arity = int(self.mod["get_function_arity"](fn).debug_get_from_remote(0))
        get_name = self.mod["get_function_param_name"]
        return [str(get_name(fn, i).debug_get_from_remote(0)) for i in range(2, arity)]

    def _params_spec(self, params, names) -> Dict:
        if isinstance(params, Mapping) and params.get("kind") == "random":
            return {"kind": "random", "params": [list(p) for p in params["params"]], "seed": params.get("seed", 0)}
        if not isinstance(params, Sequence) or len(params) != self.num_shards:
            raise ValueError(f"params: one source per shard ({self.num_shards}), got {type(params).__name__}")
        if all(isinstance(p, (str, os.PathLike)) for p in params):
            files = [os.path.abspath(os.fspath(p)) for p in params]
            for f in files:
                if not os.path.isfile(f):
                    raise FileNotFoundError(f"shard params {f} not found")
            return {"kind": "files", "files": files}
        if all(isinstance(p, Mapping) for p in params):
            if isinstance(self.sess, _process_session_type()):
                raise ValueError("in-memory params need a ThreadedSession (session='thread'); pass files")
            missing = [n for n in names if n not in params[0]]
            if missing:
                raise ValueError(f"params lack {len(missing)} weights, e.g. {missing[:5]}")
            _HOST_SOURCES[self._token] = list(params)
            self._host_token = self._token
            return {"kind": "host", "token": self._token}
        raise ValueError("params: a list of safetensors paths or of name -> array mappings, or a random spec")

    # ------------------------------------------------------------------ forward

    def broadcast_ids(self, ids: np.ndarray):
        """int32 ids [1, n] on every worker (copied to worker 0, then broadcast by the CCL)."""
        import tvm  # pylint: disable=import-outside-toplevel

        host = tvm.runtime.tensor(np.ascontiguousarray(ids, dtype=np.int32))
        if self.num_shards == 1:  # one worker: a copy (no CCL needed)
            return self.sess.copy_to_worker_0(host)
        return self.sess.broadcast(host)

    def forward(self, fn: str, ids_dref, n: int):
        """Enqueue one step on every worker (no synchronization); the output tuple's DRef."""
        import tvm_ffi  # pylint: disable=import-outside-toplevel

        self._begin(self.kv_cache, tvm_ffi.Shape([0]), tvm_ffi.Shape([n]))
        out = self._f[fn](ids_dref, self.kv_cache, *self._params)
        self._end(self.kv_cache)
        return out

    def profile(self, fn: str, ids_dref, n: int, steps: int = 1) -> List[Dict]:
        """Per-op device time on worker 0 of ``steps`` calls of ``fn`` (every op synchronized:
        for the breakdown, not the total)."""
        setp = self.sess.get_global_func("mlc_quant.disco.set_profiler")
        setp(self.mod, 1)
        for _ in range(steps):
            self.forward(fn, ids_dref, n)
        self.sync()
        setp(self.mod, 0)
        return json.loads(str(self.sess.get_global_func("mlc_quant.disco.profile_table")().debug_get_from_remote(0)))

    def sync(self) -> None:
        """Wait for every worker (and, with NCCL, its GPU) to finish what was enqueued."""
        self.sess._sync_all()  # pylint: disable=protected-access

    def _run(self, fn: str, ids: np.ndarray) -> np.ndarray:
        import tvm  # pylint: disable=import-outside-toplevel

        n = ids.shape[1]
        if self.seq_len + n > self.max_seq_len:
            raise ValueError(f"sequence would reach {self.seq_len + n} tokens, over max_seq_len={self.max_seq_len}: "
                             "reset() or create the engine with a larger max_seq_len")
        if self.vocab_size is None:
            raise ValueError("DiscoEngine needs vocab_size (the logits' width)")
        out = self.forward(fn, self.broadcast_ids(ids), n)
        logits = self._getitem(out, 0)
        host = tvm.runtime.empty((1, n, int(self.vocab_size)), "float32", tvm.cpu(0))
        self.sess.copy_from_worker_0(host, logits)
        self.sess.sync_worker_0()
        self.seq_len += n
        return host.numpy()

    def reset(self) -> None:
        self._clear(self.kv_cache)
        self._add_seq(self.kv_cache, 0)
        self.seq_len = 0

    def close(self) -> None:
        """Free the workers' params and end the session."""
        sess = getattr(self, "sess", None)
        if sess is None:
            return
        try:
            token = getattr(self, "_token", None)
            if token is not None:
                self._params = []
                self.sess.get_global_func("mlc_quant.disco.free")(token)
                self.sess._sync_all()  # pylint: disable=protected-access
            _HOST_SOURCES.pop(getattr(self, "_host_token", None), None)
            sess.shutdown()
        finally:
            self.sess = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # pylint: disable=broad-except
            pass


def disco_module():
    """``tvm.runtime.disco``, complete, once Disco is loaded.

    ``import tvm`` imports it before :func:`load_disco_runtime` can run: with the full TVM the
    import fails on the unknown object types and ``tvm.runtime.disco`` is None (imported afresh
    here); with the runtime-only TVM it succeeds with those types skipped and an empty FFI table
    (both filled in here)."""
    import importlib  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel

    import tvm.runtime  # pylint: disable=import-outside-toplevel
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    load_disco_runtime()
    mod = getattr(tvm.runtime, "disco", None)
    if mod is None:
        for name in ("tvm.runtime.disco", "tvm.runtime.disco._ffi_api", "tvm.runtime.disco.session"):
            sys.modules.pop(name, None)  # process_pool stays: it registered its global already
        mod = importlib.import_module("tvm.runtime.disco")
        tvm.runtime.disco = mod
    ffi_api = sys.modules["tvm.runtime.disco._ffi_api"]
    if not hasattr(ffi_api, "SessionThreaded"):
        importlib.reload(ffi_api)
    session = sys.modules["tvm.runtime.disco.session"]
    for key, cls in (("runtime.disco.DRef", session.DRef), ("runtime.disco.Session", session.Session),
                     ("runtime.disco.ThreadedSession", session.ThreadedSession),
                     ("runtime.disco.ProcessSession", session.ProcessSession)):
        if "__tvm_ffi_type_info__" not in cls.__dict__:
            tvm_ffi.register_object(key)(cls)
    return mod


def _process_session_type():
    return disco_module().ProcessSession


def load_built_tp(build_dir, device: str = "cuda", max_seq_len: Optional[int] = None, session: str = "thread",
                  device_ids: Optional[Sequence[int]] = None):
    """(DiscoEngine, config dict) of a ``--tensor-parallel-shards N`` build directory."""
    from mlc_quant import artifact  # pylint: disable=import-outside-toplevel

    build_dir = Path(build_dir)
    cfg = artifact.read_config(build_dir)
    tp = cfg.get("tensor_parallel")
    if not tp:
        raise ValueError(f"{build_dir} is not a tensor-parallel build (no tensor_parallel in its config)")
    if cfg["target"] != "cuda" and device == "cuda":
        raise ValueError(f"{build_dir} was built for {cfg['target']}, not CUDA")
    seq = max_seq_len or cfg["max_seq_len"]
    if seq > cfg["max_seq_len"]:
        raise ValueError(f"{seq} tokens exceed the build's --max-seq-len={cfg['max_seq_len']}")
    eos = cfg["model_config"].get("eos_token_id")
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else eos)
    plugin = build_dir / PLUGIN_FILE
    engine = DiscoEngine(build_dir / artifact.LIB_FILE, [build_dir / f for f in tp["params_files"]], int(tp["shards"]),
                         device=device, device_ids=device_ids, session=session,
                         plugin=str(plugin) if plugin.is_file() else None, max_seq_len=seq,
                         eos_token_ids=eos, vocab_size=cfg["model_config"]["vocab_size"])
    return engine, cfg


__all__ = ["DiscoEngine", "PLUGIN_FILE", "build_nccl_plugin", "load_built_tp", "load_disco_runtime", "load_nccl",
           "load_nccl_plugin"]
