"""Make a CUDA build loadable where only TVM's runtime is installed (the GPU machines).

``prepare_cuda_runtime()`` is what :func:`mlc_quant.runner.load_built` calls before it loads a
CUDA ``model.so``. It is idempotent and imports nothing from ``tvm.relax`` (runtime-only TVM,
``TVM_USE_RUNTIME_LIB=1``, has no compiler). It

1. loads TVM's CUDA runtime (``tvm/lib/libtvm_runtime_cuda.so``) with ctypes when nothing has
   registered the ``cuda`` module loader yet: runtime-only TVM does not load it by itself;
2. preloads the shared libraries the linked-in GEMM kernels need (``libcudart.so.13``,
   ``libcublasLt.so.13``) from ``$CUDA_HOME``/``/usr/local/cuda``, the ``nvidia-*`` pip packages or
   the default search path, so ``model.so`` resolves them wherever it was built;
3. registers its own ``tvm_callback_cuda_compile`` (replacing TVM's, which needs a target in
   scope that a loading process does not have): libraries exported by
   ``mlc_quant`` carry a fatbin compiled at build time and never call it, but a library that kept
   CUDA source (``MLC_QUANT_CUDA_SOURCE=1`` at build time, or a plain ``tvm.compile`` export) is
   compiled when loaded, for the device's own ``sm_XX``, with nvcc (``--fatbin``) or else NVRTC
   (``cuda-bindings``); results are cached under ``~/.cache/mlc_quant/jit``.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

log = logging.getLogger("mlc_quant")

_STATE: Dict[str, object] = {}
# Flags TVM's own nvcc path uses (tvm.support.nvcc.compile_cuda), so JIT code matches build-time code.
_NVCC_FLAGS = [
    "-O3",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
]


def _global(name: str):
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    return tvm_ffi.get_global_func(name, allow_missing=True)


def cuda_home() -> Optional[Path]:
    for c in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if c and Path(c).is_dir():
            return Path(c)
    nvcc = shutil.which("nvcc")
    return Path(os.path.realpath(nvcc)).parent.parent if nvcc else None


def load_tvm_cuda_runtime() -> Optional[str]:
    """ctypes-load ``libtvm_runtime_cuda.so`` unless the ``cuda`` loader is registered already.
    Returns the path loaded, or None when nothing had to be loaded."""
    if _global("ffi.Module.load_from_bytes.cuda") is not None:
        return None
    import tvm  # pylint: disable=import-outside-toplevel

    candidates = [Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"]
    try:
        import tvm.libinfo as li  # pylint: disable=import-outside-toplevel

        for p in li.find_lib_path(name=["libtvm_runtime_cuda.so"], optional=True) or []:
            candidates.append(Path(p))
    except Exception:  # pylint: disable=broad-except
        pass
    for c in candidates:
        if c.is_file():
            ctypes.CDLL(str(c), mode=ctypes.RTLD_GLOBAL)
            if _global("ffi.Module.load_from_bytes.cuda") is None:
                raise RuntimeError(f"loaded {c} but the CUDA module loader is still not registered")
            return str(c)
    raise RuntimeError(
        "TVM's CUDA runtime (libtvm_runtime_cuda.so) was not found next to the tvm package: "
        "this TVM was built without CUDA"
    )


def _library_dirs() -> List[Path]:
    dirs: List[Path] = []
    home = cuda_home()
    if home is not None:
        dirs += [home / "lib64", home / "lib"]
    try:
        import importlib.util  # pylint: disable=import-outside-toplevel

        spec = importlib.util.find_spec("nvidia")
        for base in (spec.submodule_search_locations or []) if spec else []:
            for sub in ("cu13", "cublas", "cuda_runtime", "cu12"):
                dirs.append(Path(base) / sub / "lib")
    except Exception:  # pylint: disable=broad-except
        pass
    return [d for d in dirs if d.is_dir()]


def preload_library(stem: str, versions=("13",)) -> Optional[str]:
    """dlopen ``lib<stem>.so.<v>`` (RTLD_GLOBAL) from the CUDA toolkit, pip packages or the default
    search path; returns the path or soname loaded, None if not found."""
    for d in _library_dirs():
        for v in versions:
            for p in sorted(glob.glob(str(d / f"lib{stem}.so.{v}*"))):
                try:
                    ctypes.CDLL(p, mode=ctypes.RTLD_GLOBAL)
                    return p
                except OSError:
                    continue
    for v in versions:
        try:
            ctypes.CDLL(f"lib{stem}.so.{v}", mode=ctypes.RTLD_GLOBAL)
            return f"lib{stem}.so.{v}"
        except OSError:
            continue
    return None


def device_arch(device_id: int = 0) -> str:
    """``sm_XX`` of a CUDA device (needs the CUDA runtime loaded)."""
    import tvm  # pylint: disable=import-outside-toplevel

    dev = tvm.cuda(device_id)
    if not dev.exist:
        raise RuntimeError(f"no CUDA device {device_id}")
    return "sm_" + str(dev.compute_version).replace(".", "")


def _jit_cache() -> Path:
    root = os.environ.get("MLC_QUANT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mlc_quant")
    return Path(root) / "jit"


def _compile_nvcc(nvcc: str, code: str, arch: str) -> bytes:
    num = arch[3:]
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.cu"), os.path.join(tmp, "k.fatbin")
        Path(src).write_text(code)
        cmd = [nvcc, "--fatbin", *_NVCC_FLAGS, "-gencode", f"arch=compute_{num},code=sm_{num}", "-o", out, src]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"nvcc failed on the model's CUDA kernels:\n{res.stdout}{res.stderr}"[-4000:])
        return Path(out).read_bytes()


def _compile_nvrtc(code: str, arch: str) -> bytes:
    from cuda.bindings import nvrtc  # pylint: disable=import-outside-toplevel

    def check(res):
        err = res[0] if isinstance(res, tuple) else res
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC error {err}")
        return res[1:] if isinstance(res, tuple) and len(res) > 2 else (res[1] if isinstance(res, tuple) else None)

    opts = [f"--gpu-architecture={arch}", "-default-device", "--use_fast_math", "-std=c++17",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    home = cuda_home()
    if home is not None:
        for inc in (home / "include", home / "include" / "cccl"):
            if inc.is_dir():
                opts.append(f"-I{inc}")
    prog = check(nvrtc.nvrtcCreateProgram(code.encode(), b"tvm_kernels.cu", 0, [], []))
    res = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
    if res[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        size = check(nvrtc.nvrtcGetProgramLogSize(prog))
        buf = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, buf)
        raise RuntimeError(f"NVRTC failed on the model's CUDA kernels:\n{buf.decode(errors='replace')[-4000:]}")
    size = check(nvrtc.nvrtcGetCUBINSize(prog))
    buf = b" " * size
    check(nvrtc.nvrtcGetCUBIN(prog, buf))
    return bytes(buf)


def compile_cuda_source(code: str, arch: Optional[str] = None) -> bytes:
    """CUDA source -> fatbin (nvcc) or cubin (NVRTC) for ``arch`` (default: device 0's)."""
    arch = arch or _STATE.get("arch") or device_arch(0)
    nvcc = os.environ.get("MLC_QUANT_NVCC") or shutil.which("nvcc")
    if nvcc is None and cuda_home() is not None and (cuda_home() / "bin" / "nvcc").is_file():
        nvcc = str(cuda_home() / "bin" / "nvcc")
    key = hashlib.sha256(f"{arch}|{bool(nvcc)}|{' '.join(_NVCC_FLAGS)}|{code}".encode()).hexdigest()[:24]
    cached = _jit_cache() / f"{key}.bin"
    if cached.is_file():
        return cached.read_bytes()
    if nvcc and os.environ.get("MLC_QUANT_JIT", "") != "nvrtc":
        data = _compile_nvcc(nvcc, code, arch)
    else:
        data = _compile_nvrtc(code, arch)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, cached)
    except OSError:
        pass
    return data


def register_cuda_compiler(force: bool = False) -> bool:
    """Register ``tvm_callback_cuda_compile`` (one argument: the source; returns the binary).
    Returns whether ours was registered (False: one existed and ``force`` was off)."""
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    if not force and _global("tvm_callback_cuda_compile") is not None:
        return False

    def _callback(code):
        return bytes(compile_cuda_source(str(code)))  # the runtime casts the result to ffi::Bytes

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", _callback, override=True)
    return True


def prepare_cuda_runtime(device_id: int = 0, compile_callback: bool = True) -> Dict[str, object]:
    """Everything a CUDA ``model.so`` needs before ``tvm.runtime.load_module`` (idempotent).
    Returns what was done: ``{"tvm_cuda": path or None, "cudart": ..., "cublasLt": ...,
    "arch": "sm_90", "compile_callback": bool}``."""
    if _STATE.get("done"):
        return dict(_STATE)
    _STATE["tvm_cuda"] = load_tvm_cuda_runtime()
    _STATE["cudart"] = preload_library("cudart")
    _STATE["cublasLt"] = preload_library("cublasLt")
    try:
        _STATE["arch"] = device_arch(device_id)
    except Exception as err:  # pylint: disable=broad-except
        raise RuntimeError(f"no usable CUDA device {device_id}: {err}") from err
    # TVM's own callback (tvm.support.nvcc, registered by ``import tvm`` even in runtime-only
    # mode) takes the arch from ``Target.current()``, which is unset when a library is loaded:
    # ours compiles for the device that is actually there.
    _STATE["compile_callback"] = register_cuda_compiler(force=True) if compile_callback else False
    _STATE["done"] = True
    log.debug("mlc_quant: CUDA runtime ready: %s", _STATE)
    return dict(_STATE)


__all__ = ["compile_cuda_source", "device_arch", "load_tvm_cuda_runtime", "preload_library",
           "prepare_cuda_runtime", "register_cuda_compiler"]
