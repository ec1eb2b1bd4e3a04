"""CUDA kernels (mlc_quant/kernels) and their BYOC dispatch (mlc_quant/cuda_dispatch).

CPU, in CI (needs nvcc, no GPU):
  * the kernels compile (objects cached in ~/.cache/mlc_quant), link and load, and reject bad
    arguments with clear errors;
  * dispatch_gemms turns every linear of the docs/design.md contract into a composite function
    for the mlc_cutlass / mlc_cublaslt codegens, leaves no matmul behind, and a CUDA build with
    the wrappers and kernels exports to one shared library.
GPU (skipped without a CUDA device; needs torch for device memory):
  * every scheme, backend and output type against a numpy reference on fresh random data, with
    M = 1, 7, 16, 128, 2048 and K, N that are not multiples of 64;
  * the decode GEMVs (M <= 8: W8A8 with the quantize + epilogue fused, and fp16) for every
    scheme's epilogue, M = 1, 2, 7, 8, (N, K) = (11008, 4096), (1536, 576), (1003, 1000);
  * BYOC-built modules (made on the CPU machine) against the CPU build of the same module.

On a machine with only TVM's runtime (the GPU machines), the GPU tests import nothing from
mlc_quant: set MLC_QUANT_KERNEL_LIB to a prebuilt libmlc_quant_kernels.so and MLC_QUANT_E2E_DIR
to the cases `python python/tests/test_cuda_kernels.py make-gpu-bundle DIR` writes, and run
pytest with --noconftest.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# mirrors mlcq::Scheme / mlcq::Backend (mlc_quant/kernels/mlcq_api.h)
FLOAT, SYM, ASYM, TOKEN = 0, 1, 2, 3
AUTO, CUTLASS, CUTLASS0, CUTLASS1, CUBLASLT, SIMT, GEMV = range(7)
CUTLASS_CFG = 16  # + n: force CUTLASS tile config n


def _full_tvm() -> bool:
    try:
        import tvm.relax  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except Exception:  # pylint: disable=broad-except
        return False
    return True


def _nvcc():
    if not _full_tvm():
        return None
    from mlc_quant.kernels import find_nvcc  # pylint: disable=import-outside-toplevel

    return find_nvcc()


needs_build = pytest.mark.skipif(
    not _full_tvm() or _nvcc() is None, reason="needs nvcc (CUDA toolkit) and the full TVM to build the kernels"
)


# =============================================================================================
# Relax modules following the docs/design.md contract (built by hand)


def linear_module(scheme: str, N: int, K: int, F: str = "float16", bias: bool = False,
                  quantize_inside: bool = True, M=None, lead=()):
    """One linear: scheme in float | sym0 (per-tensor scale) | sym1 (per-channel) | asym | token
    (per-token scale given as an input) | token_dyn (per-token scale computed in the graph, as
    QuantizeLinear emits smq_q8i8f16_3).

    Parameters of `main`: x, then the weights/scales in the order of `param_names(...)`.
    M None -> a symbolic row count.
    """
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm import relax  # pylint: disable=import-outside-toplevel

    bb = relax.BlockBuilder()
    m = tvm.tirx.Var("m", "int64") if M is None else M
    xshape = [*lead, m, K]
    T = relax.TensorType
    x_dtype = F if (quantize_inside or scheme == "float") else "int8"
    x = relax.Var("x", T(xshape, x_dtype))
    params = [x]

    def param(name, shape, dtype):
        v = relax.Var(name, T(shape, dtype))
        params.append(v)
        return v

    if scheme == "float":
        w = param("w", [N, K], F)
        b = param("b", [N], F) if bias else None
        with bb.function("main", params):
            with bb.dataflow():
                y = bb.emit(relax.op.matmul(x, relax.op.permute_dims(w)))
                if b is not None:
                    y = bb.emit(relax.op.add(y, b))
                out = bb.emit_output(y)
            bb.emit_func_output(out)
        return bb.get()
    wq = param("wq", [N, K], "int8")
    if scheme in ("sym0", "sym1", "asym"):
        sx = param("sx", [], "float32")
        zx = param("zx", [], "int8") if scheme == "asym" else None
        s = param("s", [] if scheme == "sym0" else [N], "float32")
        if scheme == "asym":
            zw = param("zw", [N], "int32")
            c = param("c", [N], "int32")
    elif scheme == "token":
        stok = param("stok", [*xshape[:-1], 1], "float32")
        sw = param("sw", [N], "float32")
    else:
        sw = param("sw", [N], "float32")
    b = param("b", [N], F) if bias else None
    R = relax.op
    with bb.function("main", params):
        with bb.dataflow():
            if scheme in ("sym0", "sym1", "asym"):
                zero = zx if zx is not None else relax.const(0, "int8")
                xq = bb.emit(R.quantize(x, sx, zero, axis=-1, out_dtype="int8")) if quantize_inside else x
                acc = bb.emit(R.matmul(xq, R.permute_dims(wq), out_dtype="int32"))
                if scheme == "asym":
                    rs = bb.emit(R.sum(R.astype(xq, "int32"), axis=[-1], keepdims=True))
                    acc = bb.emit(R.subtract(R.subtract(acc, R.multiply(rs, zw)), c))
                y = bb.emit(R.dequantize(acc, s, relax.const(0, "int32"), axis=-1, out_dtype=F))
            else:
                if scheme == "token_dyn":
                    xf = bb.emit(R.astype(x, "float32")) if F != "float32" else x
                    amax = bb.emit(R.max(R.abs(xf), axis=[-1], keepdims=True))
                    stok = bb.emit(R.maximum(R.divide(amax, relax.const(127.0, "float32")),
                                             relax.const(1e-8, "float32")))
                    xq = bb.emit(R.astype(R.clip(R.round(R.divide(xf, stok)), -127, 127), "int8"))
                elif quantize_inside:
                    xf = R.astype(x, "float32") if F != "float32" else x
                    xq = bb.emit(R.astype(R.clip(R.round(R.divide(xf, stok)), -127, 127), "int8"))
                else:
                    xq = x
                acc = bb.emit(R.matmul(xq, R.permute_dims(wq), out_dtype="int32"))
                y = R.multiply(R.multiply(R.astype(acc, "float32"), stok), sw)
                y = bb.emit(R.astype(y, F) if F != "float32" else y)
            if b is not None:
                y = bb.emit(R.add(y, b))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def random_params(mod, M: int, seed: int):
    """Fresh random inputs for `main` of a linear_module (scales chosen so fp16 stays finite)."""
    rng = np.random.default_rng(seed)
    out = []
    func = mod["main"]
    K = int(func.params[0].ty.shape[-1])
    for p in func.params:
        shape = [M if str(d) == "m" else int(d) for d in p.ty.shape.values]
        dt = str(p.ty.dtype)
        name = p.name
        if name == "x":
            a = rng.standard_normal(shape) * 2 if dt != "int8" else rng.integers(-128, 128, shape)
        elif name in ("wq",):
            a = rng.integers(-127, 128, shape)
        elif name in ("w",):
            a = rng.standard_normal(shape) / np.sqrt(K)
        elif name == "sx":
            a = np.array(0.05)
        elif name == "stok":
            a = rng.uniform(0.01, 0.05, shape)
        elif name in ("s", "sw"):
            a = rng.uniform(0.5, 1.5, shape) / (127.0 * np.sqrt(K)) * (1 if name == "sw" else 20)
        elif name == "zx":
            a = np.array(rng.integers(-20, 20))
        elif name == "zw":
            a = rng.integers(-10, 10, shape)
        elif name == "c":
            a = rng.integers(-5000, 5000, shape)
        elif name == "b":
            a = rng.standard_normal(shape)
        else:
            raise AssertionError(name)
        out.append(np.asarray(a).astype(dt))
    return out


# =============================================================================================
# CPU: build, link, load


@needs_build
def test_kernels_compile_link_and_load(tmp_path):
    from mlc_quant.kernels import build_kernels, build_shared_library  # pylint: disable=import-outside-toplevel

    objs = build_kernels(tmp_path / "obj")
    names = {Path(o).stem for o in objs}
    assert {"mlcq_kernels", "mlcq_cublaslt", "mlcq_linear", "mlcq_gemv"} <= names
    assert sum(n.startswith("mlcq_cutlass_sm90_cfg") for n in names) >= 2
    lib = build_shared_library(tmp_path / "libmlc_quant_kernels.so", objs)
    nm = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True, check=True).stdout
    for sym in ("__tvm_ffi_mlcq_linear", "__tvm_ffi_mlcq_int8_gemm_i32", "__tvm_ffi_mlcq_quantize",
                "__tvm_ffi_mlcq_last_kernel"):
        assert sym in nm, sym
    # The CUTLASS objects hold sm_90a machine code with Hopper's wgmma (HGMMA would be fp16).
    cuobjdump = shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"
    if os.path.exists(cuobjdump):
        cfg0 = next(o for o in objs if Path(o).stem.endswith("cfg0"))
        sass = subprocess.run([cuobjdump, "--dump-sass", cfg0], capture_output=True, text=True).stdout
        assert "IGMMA" in sass or "GMMA" in sass, "no wgmma in the CUTLASS kernel"
        gemv = next(o for o in objs if Path(o).stem == "mlcq_gemv")
        sass = subprocess.run([cuobjdump, "--dump-sass", gemv], capture_output=True, text=True).stdout
        assert "IDP" in sass, "no dp4a (IDP.4A) in the W8A8 GEMV"

    import tvm_ffi  # pylint: disable=import-outside-toplevel

    mod = tvm_ffi.load_module(lib)  # loads without a GPU (cudart is lazy)
    x = np.zeros((4, 32), "float16")
    w = np.zeros((8, 32), "float16")
    out = np.zeros((4, 8), "float16")
    with pytest.raises(ValueError, match="not on a CUDA device"):
        mod["mlcq_linear"](FLOAT, AUTO, x, w, False, None, None, None, None, None, None, None, None, None, out)
    with pytest.raises(ValueError, match="bad scheme"):
        mod["mlcq_linear"](9, AUTO, x, w, False, None, None, None, None, None, None, None, None, None, out)


# =============================================================================================
# CPU: pattern partitioning and codegen

_SCHEMES = ["sym0", "sym1", "asym", "token", "token_dyn"]


def _composites(mod):
    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel

    out = []
    for _, f in mod.functions_items():
        if f.attrs is not None and "Codegen" in f.attrs:
            out.append(str(cd._composite_of(f).attrs["Composite"]))  # pylint: disable=protected-access
    return sorted(out)


def _matmuls(mod):
    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel

    return cd._leftover_matmuls(mod)  # pylint: disable=protected-access


@pytest.mark.skipif(not _full_tvm(), reason="needs the full TVM (relax)")
@pytest.mark.parametrize("scheme", _SCHEMES)
@pytest.mark.parametrize("quantize_inside", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_patterns_partition_every_linear(scheme, quantize_inside, bias):
    from tvm import relax  # pylint: disable=import-outside-toplevel

    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel

    if scheme == "token_dyn" and not quantize_inside:
        pytest.skip("the dynamic per-token scale is computed from the float x")
    mod = linear_module(scheme, 72, 176, bias=bias, quantize_inside=quantize_inside, lead=(2,))
    fused = relax.transform.FuseOpsByPattern(cd.fusion_patterns(), bind_constants=False, annotate_codegen=True)(mod)
    if scheme == "token_dyn":
        expect = f"mlc_cutlass.w8a8_token_dyn{'_bias' if bias else ''}"
    else:
        kind = {"sym0": "sym", "sym1": "sym", "asym": "asym", "token": "token"}[scheme]
        expect = f"mlc_cutlass.w8a8_{kind}{'_q' if quantize_inside else ''}{'_bias' if bias else ''}"
    assert _composites(fused) == [expect]
    assert _matmuls(fused) == []
    # Nothing of the linear is left in main: one call to the codegen function.
    main_calls = []
    relax.analysis.post_order_visit(
        fused["main"], lambda e: main_calls.append(e) if isinstance(e, relax.Call) else None
    )
    assert all(not hasattr(c.op, "name") for c in main_calls), [getattr(c.op, "name", c.op) for c in main_calls]


@pytest.mark.skipif(not _full_tvm(), reason="needs the full TVM (relax)")
@pytest.mark.parametrize("bias", [False, True])
def test_patterns_float_linear(bias):
    from tvm import relax  # pylint: disable=import-outside-toplevel

    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel

    mod = linear_module("float", 96, 200, bias=bias)
    fused = relax.transform.FuseOpsByPattern(cd.fusion_patterns(), bind_constants=False, annotate_codegen=True)(mod)
    assert _composites(fused) == [f"mlc_cublaslt.linear{'_bias' if bias else ''}"]
    assert _matmuls(fused) == []


@pytest.mark.skipif(not _full_tvm(), reason="needs the full TVM (relax)")
def test_patterns_leave_unsupported_forms_and_strict_raises():
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm import relax  # pylint: disable=import-outside-toplevel

    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel

    # A dequantize with a non-zero accumulator zero point is not what the kernels compute.
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([4, 64], "int8"))
    w = relax.Var("w", relax.TensorType([32, 64], "int8"))
    s = relax.Var("s", relax.TensorType([], "float32"))
    with bb.function("main", [x, w, s]):
        with bb.dataflow():
            acc = bb.emit(relax.op.matmul(x, relax.op.permute_dims(w), out_dtype="int32"))
            y = bb.emit(relax.op.dequantize(acc, s, relax.const(3, "int32"), axis=-1, out_dtype="float16"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    fused = relax.transform.FuseOpsByPattern(cd.fusion_patterns(), bind_constants=False, annotate_codegen=True)(mod)
    assert _composites(fused) == []
    with pytest.raises(cd.DispatchError, match="not offloaded"):
        cd.dispatch_gemms(mod, strict=True, attach_kernels=False)
    # A shared quantized activation (q/k/v style) is not fused into one consumer: the quantize
    # stays in TVM and each matmul -> dequantize becomes its own int8-input composite.
    bb = relax.BlockBuilder()
    xf = relax.Var("x", relax.TensorType([4, 64], "float16"))
    sx = relax.Var("sx", relax.TensorType([], "float32"))
    ws = [relax.Var(f"w{i}", relax.TensorType([32, 64], "int8")) for i in range(2)]
    with bb.function("main", [xf, sx, *ws, s]):
        with bb.dataflow():
            xq = bb.emit(relax.op.quantize(xf, sx, relax.const(0, "int8"), axis=-1, out_dtype="int8"))
            ys = []
            for wi in ws:
                acc = bb.emit(relax.op.matmul(xq, relax.op.permute_dims(wi), out_dtype="int32"))
                ys.append(bb.emit(relax.op.dequantize(acc, s, relax.const(0, "int32"), axis=-1, out_dtype="float16")))
            out = bb.emit_output(relax.op.add(ys[0], ys[1]))
        bb.emit_func_output(out)
    fused = relax.transform.FuseOpsByPattern(cd.fusion_patterns(), bind_constants=False, annotate_codegen=True)(bb.get())
    # (identical composites are shared by both call sites)
    assert _composites(fused) == ["mlc_cutlass.w8a8_sym"]
    assert _matmuls(fused) == []
    ops = []
    relax.analysis.post_order_visit(
        fused["main"],
        lambda e: ops.append(e.op.name if isinstance(e.op, tvm.ir.Op) else "call")
        if isinstance(e, relax.Call) else None,
    )
    assert sorted(ops) == ["call", "call", "relax.add", "relax.quantize"], ops


@needs_build
def test_dispatch_codegen_build_and_export(tmp_path):
    """Full route: patterns -> RunCodegen wrappers -> CUDA build -> one exported library."""
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm import relax  # pylint: disable=import-outside-toplevel

    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel

    mod = _two_layer_module()
    out = cd.dispatch_gemms(mod, strict=True)
    assert _matmuls(out) == []
    ext = list(out.attrs["external_mods"])
    assert len(ext) >= 2  # the wrappers + the kernel objects
    # main calls the generated wrappers by their global symbols.
    callees = []
    relax.analysis.post_order_visit(
        out["main"],
        lambda e: callees.append(str(e.args[0].global_symbol))
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_dps_packed"
        else None,
    )
    assert len(callees) == 3 and all(c.endswith(("mlc_cutlass", "mlc_cublaslt")) for c in callees), callees
    ex = tvm.compile(out, target=_cuda_target())
    lib = cd.export_library(ex, str(tmp_path / "two_layer.so"))
    nm = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True, check=True).stdout
    for c in callees:
        assert f"__tvm_ffi_{c}" in nm
    assert "__tvm_ffi_mlcq_linear" in nm  # the kernels are linked in


@pytest.mark.skipif(not _full_tvm(), reason="needs the full TVM (relax)")
@pytest.mark.parametrize("scheme,kind", [("smq_q8i8f16_0", "w8a8_sym_q"), ("smq_q8i8f16_1", "w8a8_sym_q"),
                                         ("smq_q8i8f16_2", "w8a8_asym_q"), ("smq_q8i8f16_3", "w8a8_token_dyn")])
def test_quantize_linear_output_is_fully_offloaded(scheme, kind):
    """What mlc_quant.quantize emits (the real QuantizeLinear) matches the patterns as a whole."""
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm import relax  # pylint: disable=import-outside-toplevel

    import mlc_quant  # pylint: disable=import-outside-toplevel
    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel

    K, N = 96, 40
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((tvm.tirx.Var("m", "int64"), K), "float16"))
    w = relax.Var("w", relax.TensorType((N, K), "float16"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.matmul(x, relax.op.permute_dims(w)))
        bb.emit_func_output(y)
    calib = [((rng.standard_normal((6, K)) * 2).astype(np.float16),) for _ in range(3)]
    wv = rng.standard_normal((N, K)).astype(np.float16)
    for bind in (True, False):
        qmod = mlc_quant.quantize(bb.get(), {"w": wv}, calib, scheme=scheme, smooth=False, bind=bind)
        qmod = qmod if bind else qmod[0]
        fused = relax.transform.FuseOpsByPattern(cd.fusion_patterns(), bind_constants=False, annotate_codegen=True)(
            relax.transform.ConvertToDataflow()(qmod)
        )
        assert _composites(fused) == [f"mlc_cutlass.{kind}"], (scheme, bind)
        assert _matmuls(fused) == []


@needs_build
def test_dispatch_with_bound_constant_weights():
    """Weights bound as constants stay VM constants: lifted to wrapper arguments, not code."""
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm import relax  # pylint: disable=import-outside-toplevel

    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel

    mod = linear_module("asym", 72, 176, bias=True)
    values = random_params(mod, 4, seed=0)
    names = [p.name for p in mod["main"].params]
    bound = relax.transform.BindParams("main", {n: tvm.runtime.tensor(v) for n, v in zip(names[1:], values[1:])})(mod)
    assert len(bound["main"].params) == 1
    out = cd.dispatch_gemms(bound, strict=True, attach_kernels=False)
    calls = []
    relax.analysis.post_order_visit(
        out["main"],
        lambda e: calls.append(e)
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_dps_packed"
        else None,
    )
    assert len(calls) == 1
    args = list(calls[0].args[1].fields)
    assert sum(isinstance(a, tvm.ir.expr.Constant) for a in args) >= 6  # wq, scales, zero points, bias


def _cuda_target():
    import tvm  # pylint: disable=import-outside-toplevel

    return tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})


def _two_layer_module(N1=96, K=128, N2=64):
    """x -> W8A8 per-channel linear (+bias) -> asym W8A8 linear -> fp16 linear: three GEMMs."""
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm import relax  # pylint: disable=import-outside-toplevel

    R = relax.op
    T = relax.TensorType
    m = tvm.tirx.Var("m", "int64")
    x = relax.Var("x", T([m, K], "float16"))
    ps = dict(
        w1=T([N1, K], "int8"), sx1=T([], "float32"), s1=T([N1], "float32"), b1=T([N1], "float16"),
        w2=T([N2, N1], "int8"), sx2=T([], "float32"), zx2=T([], "int8"), s2=T([N2], "float32"),
        zw2=T([N2], "int32"), c2=T([N2], "int32"), w3=T([N2, N2], "float16"),
    )
    pv = {k: relax.Var(k, t) for k, t in ps.items()}
    bb = relax.BlockBuilder()
    with bb.function("main", [x, *pv.values()]):
        with bb.dataflow():
            xq = bb.emit(R.quantize(x, pv["sx1"], relax.const(0, "int8"), axis=-1, out_dtype="int8"))
            acc = bb.emit(R.matmul(xq, R.permute_dims(pv["w1"]), out_dtype="int32"))
            h = bb.emit(R.dequantize(acc, pv["s1"], relax.const(0, "int32"), axis=-1, out_dtype="float16"))
            h = bb.emit(R.add(h, pv["b1"]))
            hq = bb.emit(R.quantize(h, pv["sx2"], pv["zx2"], axis=-1, out_dtype="int8"))
            acc2 = bb.emit(R.matmul(hq, R.permute_dims(pv["w2"]), out_dtype="int32"))
            rs = bb.emit(R.sum(R.astype(hq, "int32"), axis=[-1], keepdims=True))
            acc2 = bb.emit(R.subtract(R.subtract(acc2, R.multiply(rs, pv["zw2"])), pv["c2"]))
            h2 = bb.emit(R.dequantize(acc2, pv["s2"], relax.const(0, "int32"), axis=-1, out_dtype="float16"))
            y = bb.emit(R.matmul(h2, R.permute_dims(pv["w3"])))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


# =============================================================================================
# GPU: kernels against numpy


def _torch_cuda():
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except Exception:  # pylint: disable=broad-except
        return None
    return torch if torch.cuda.is_available() else None


needs_gpu = pytest.mark.skipif(_torch_cuda() is None, reason="needs a CUDA GPU (and torch for device memory)")


@pytest.fixture(scope="module")
def klib(tmp_path_factory):
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    path = os.environ.get("MLC_QUANT_KERNEL_LIB")
    if not path:
        if _nvcc() is None:
            pytest.skip("set MLC_QUANT_KERNEL_LIB or install nvcc to build the kernels")
        from mlc_quant.kernels import build_shared_library  # pylint: disable=import-outside-toplevel

        path = build_shared_library(tmp_path_factory.mktemp("k") / "libmlc_quant_kernels.so")
    return tvm_ffi.load_module(path)


def _dev(a):
    torch = _torch_cuda()
    return torch.from_numpy(np.ascontiguousarray(a)).cuda()


_TORCH_DT = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def _out(shape, dtype):
    torch = _torch_cuda()
    return torch.full(shape, float("nan"), dtype=getattr(torch, dtype), device="cuda")


def _host(t):
    torch = _torch_cuda()
    torch.cuda.synchronize()
    return t.float().cpu().numpy() if t.dtype == torch.bfloat16 else t.cpu().numpy()


def _ref_quantize(x, s, z=0, per_token=False):
    xf = x.astype(np.float32)
    q = np.rint(xf / np.asarray(s, np.float32)) + np.float32(z)
    lo = -127 if per_token else -128
    return np.clip(q, lo, 127).astype(np.int8)


def _ref_int_gemm(xq, wq):
    return (xq.astype(np.float64) @ wq.astype(np.float64).T).astype(np.int64)  # exact below 2**53


def _assert_close(out, ref, what, rel=2e-3):
    assert np.all(np.isfinite(out)), f"{what}: non-finite output (unwritten elements?)"
    ref = ref.astype(np.float64)
    err = np.abs(out.astype(np.float64) - ref)
    scale = np.abs(ref).max() + 1e-30
    norm_rel = np.linalg.norm(err) / (np.linalg.norm(ref) + 1e-30)
    assert err.max() <= rel * scale and norm_rel <= rel, (
        f"{what}: max err {err.max():.3g} (max |ref| {scale:.3g}), normwise {norm_rel:.3g}"
    )


_M_LIST = [1, 7, 16, 128, 2048]
# (N, K): K % 16 == 0 and N % 8 == 0 take CUTLASS; K % 4 == 0 cuBLASLt; anything else the
# CUDA-core kernel. None of them is a multiple of 64.
_NK_LIST = [(328, 176), (200, 100), (72, 37), (30, 64)]


def _run_w8a8(klib, scheme, M, N, K, *, x_float, bias, seed, backend=AUTO, F="float16", lead=()):
    """Run one W8A8 linear on fresh random data; return (out, reference) as numpy."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((*lead, M, K)) * 2).astype(np.float16 if F == "float16" else np.float32)
    wq = rng.integers(-127, 128, (N, K)).astype(np.int8)
    b = rng.standard_normal(N).astype(np.float32) if bias else None
    x_scale = np.float32(0.05)
    kw = dict(x_scale=None, x_zero=None, token_scale=None, token_eps=None, scale=None, w_zero=None, corr=None)
    zx = 0
    if scheme == "token_dyn" and not x_float:
        scheme = "token"  # int8 x: the scale comes from the graph
    if scheme == "token_dyn":
        eps = np.float32(1e-8)
        amax = np.abs(x.astype(np.float32)).max(-1, keepdims=True)
        st = np.maximum(amax / np.float32(127), eps).astype(np.float32)
        xq = _ref_quantize(x, st, per_token=True)
        sw = (rng.uniform(0.5, 1.5, N) / (127 * np.sqrt(K))).astype(np.float32)
        acc = _ref_int_gemm(xq.reshape(-1, K), wq)
        ref = acc * st.reshape(-1, 1).astype(np.float64) * sw
        kw.update(token_eps=np.array(eps, np.float32), scale=sw)
        sch = TOKEN
    elif scheme == "token":
        st = rng.uniform(0.01, 0.05, (*lead, M, 1)).astype(np.float32)
        xq = _ref_quantize(x, st, per_token=True)
        sw = (rng.uniform(0.5, 1.5, N) / (127 * np.sqrt(K))).astype(np.float32)
        acc = _ref_int_gemm(xq.reshape(-1, K), wq)
        ref = acc * st.reshape(-1, 1).astype(np.float64) * sw
        kw.update(token_scale=st, scale=sw)
        sch = TOKEN
    else:
        zx = int(rng.integers(-20, 20)) if scheme == "asym" else 0
        xq = _ref_quantize(x, x_scale, zx)
        acc = _ref_int_gemm(xq.reshape(-1, K), wq)
        s = np.float32(rng.uniform(0.5, 1.5) * 20 / (127 * np.sqrt(K))) if scheme == "sym0" else (
            rng.uniform(0.5, 1.5, N) * 20 / (127 * np.sqrt(K))
        ).astype(np.float32)
        if scheme == "asym":
            zw = rng.integers(-10, 10, N).astype(np.int32)
            c = rng.integers(-5000, 5000, N).astype(np.int32)
            rs = xq.reshape(-1, K).astype(np.int64).sum(-1, keepdims=True)
            acc = acc - rs * zw - c
            kw.update(w_zero=zw, corr=c, x_zero=np.array(zx, np.int8))
        ref = acc * np.asarray(s, np.float64)
        kw.update(scale=np.asarray(s, np.float32), x_scale=np.array(x_scale, np.float32))
        sch = ASYM if scheme == "asym" else SYM
    if b is not None:
        b = b.astype(F if F != "bfloat16" else np.float32)
        ref = ref + b.astype(np.float64)
    x_in = x if x_float else xq
    if not x_float:
        kw["x_scale"] = kw["x_zero"] = None
    dev = {k: (_dev(v) if v is not None else None) for k, v in kw.items()}
    bias_t = None
    torch = _torch_cuda()
    if b is not None:
        bias_t = _dev(b).to(getattr(torch, F))
    out = _out((*lead, M, N), F)
    klib["mlcq_linear"](sch, backend, _dev(x_in), _dev(wq), False, dev["x_scale"], dev["x_zero"],
                        dev["token_scale"], dev["token_eps"], dev["scale"], dev["w_zero"], dev["corr"], None,
                        bias_t, out)
    return _host(out).reshape(-1, N), ref


@needs_gpu
@pytest.mark.parametrize("M", _M_LIST)
@pytest.mark.parametrize("NK", _NK_LIST + [(4096, 4096)])
@pytest.mark.parametrize("scheme", _SCHEMES)
def test_gpu_w8a8_schemes(klib, M, NK, scheme):
    N, K = NK
    if N * K >= 4096 * 4096 and M not in (1, 16, 2048):
        pytest.skip("large weight: a few M are enough")
    seed = hash((M, N, K, scheme)) % 2**31
    for x_float in (True, False):
        for bias in (False, True):
            out, ref = _run_w8a8(klib, scheme, M, N, K, x_float=x_float, bias=bias, seed=seed)
            _assert_close(out, ref, f"{scheme} M={M} N={N} K={K} x_float={x_float} bias={bias} "
                                    f"({klib['mlcq_last_kernel']()})")


@needs_gpu
def test_gpu_kernel_choice(klib):
    torch = _torch_cuda()
    sm90 = torch.cuda.get_device_capability() == (9, 0)
    # M > 64, K % 16 == 0 and N % 8 == 0: CUTLASS (64-row ping-pong up to M = 128, then 128x128
    # ping-pong, in 2x1 clusters for two or four row tiles, or stream-K when the 128x128 tiles
    # cannot fill half the SMs); M <= 64: cuBLASLt + epilogue; cuBLASLt's int8 GEMM where it has
    # an algorithm (K % 4 == 0), else the CUDA-core kernel.
    pp = "cutlass:128x128x128_c1x2_pingpong" if sm90 else "cublaslt"
    pp2x1 = "cutlass:128x128x128_c2x1_pingpong" if sm90 else "cublaslt"
    sk = "cutlass:128x64x128_c1x1_coop_streamk" if sm90 else "cublaslt"
    p64 = "cutlass:64x128x128_c1x1_pingpong" if sm90 else "cublaslt"
    expected = {(2048, 4096, 4096): (pp,), (256, 4096, 4096): (sk,), (16, 4096, 4096): ("cublaslt",),
                (512, 4096, 4096): (pp2x1,), (450, 4096, 4096): (pp2x1,), (256, 12288, 4096): (pp2x1,),
                (384, 4096, 4096): (pp,), (640, 4096, 4096): (pp,), (1024, 4096, 4096): (pp,),
                (128, 4096, 4096): (p64,), (100, 22016, 512): (p64,),
                (130, 328, 176): (sk,), (130, 200, 100): ("cublaslt",), (130, 72, 37): ("simt", "cublaslt"),
                (130, 30, 64): ("cublaslt", "simt")}
    for (M, N, K), prefixes in expected.items():
        _run_w8a8(klib, "sym1", M, N, K, x_float=True, bias=False, seed=1)
        assert str(klib["mlcq_last_kernel"]()).startswith(prefixes), (M, N, K, klib["mlcq_last_kernel"]())


@needs_gpu
@pytest.mark.parametrize("backend", [CUTLASS, CUTLASS0, CUTLASS1, CUBLASLT, SIMT])
@pytest.mark.parametrize("M", [1, 7, 130, 2048])
@pytest.mark.parametrize("scheme", _SCHEMES)
def test_gpu_w8a8_every_backend(klib, backend, M, scheme):
    torch = _torch_cuda()
    if backend in (CUTLASS, CUTLASS0, CUTLASS1) and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("CUTLASS kernels are sm_90a")
    N, K = (1032, 528) if M < 2048 else (2056, 1040)
    out, ref = _run_w8a8(klib, scheme, M, N, K, x_float=True, bias=True, seed=M * 7 + backend, backend=backend)
    _assert_close(out, ref, f"backend {backend} {scheme} M={M} ({klib['mlcq_last_kernel']()})")


@needs_gpu
@pytest.mark.parametrize("cfg", [0, 1, 2, 3])
@pytest.mark.parametrize("M", [7, 130, 520])
@pytest.mark.parametrize("scheme", _SCHEMES)
def test_gpu_w8a8_every_cutlass_config(klib, cfg, M, scheme):
    """Each tile config forced through backend CUTLASS_CFG + n; M = 520 is not a multiple of
    any tile or cluster height."""
    torch = _torch_cuda()
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("CUTLASS kernels are sm_90a")
    N, K = (1032, 528) if M < 520 else (4104, 1040)
    out, ref = _run_w8a8(klib, scheme, M, N, K, x_float=True, bias=True, seed=M * 11 + cfg,
                         backend=CUTLASS_CFG + cfg)
    assert str(klib["mlcq_last_kernel"]()).startswith("cutlass:"), klib["mlcq_last_kernel"]()
    _assert_close(out, ref, f"cutlass config {cfg} {scheme} M={M} ({klib['mlcq_last_kernel']()})")


@needs_gpu
def test_gpu_w8a8_batched_input_and_other_out_types(klib):
    out, ref = _run_w8a8(klib, "sym1", 5, 264, 128, x_float=True, bias=True, seed=3, lead=(3,))
    _assert_close(out, ref, "3-D x")
    for F in ("bfloat16", "float32"):
        out, ref = _run_w8a8(klib, "asym", 33, 264, 128, x_float=True, bias=True, seed=4, F=F)
        _assert_close(out, ref, f"out {F}", rel=1e-2 if F == "bfloat16" else 1e-5)


@needs_gpu
def test_gpu_forced_cutlass_rejects_unaligned(klib):
    torch = _torch_cuda()
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("sm_90a only")
    with pytest.raises(ValueError, match="K % 16"):
        _run_w8a8(klib, "sym1", 8, 64, 100, x_float=True, bias=False, seed=5, backend=CUTLASS0)
    with pytest.raises(ValueError, match="float16 only"):
        _run_w8a8(klib, "sym1", 8, 64, 128, x_float=True, bias=False, seed=5, backend=CUTLASS, F="float32")


@needs_gpu
@pytest.mark.parametrize("per_token", [False, True])
def test_gpu_quantize_exact(klib, per_token):
    rng = np.random.default_rng(11)
    M, K = 37, 1000
    x = (rng.standard_normal((M, K)) * 3).astype(np.float16)
    q = _dev(np.zeros((M, K), np.int8))
    rs = _dev(np.zeros((M,), np.int32))
    if per_token:
        st = rng.uniform(0.01, 0.05, (M, 1)).astype(np.float32)
        klib["mlcq_quantize"](_dev(x), None, None, _dev(st), q, rs)
        ref = _ref_quantize(x, st, per_token=True)
    else:
        klib["mlcq_quantize"](_dev(x), _dev(np.array(0.02, np.float32)), _dev(np.array(-7, np.int8)), None, q, rs)
        ref = _ref_quantize(x, np.float32(0.02), -7)
    np.testing.assert_array_equal(_host(q), ref)
    np.testing.assert_array_equal(_host(rs), ref.astype(np.int64).sum(-1))


@needs_gpu
@pytest.mark.parametrize("K", [4096, 1000, 37])
def test_gpu_quantize_dynamic_exact(klib, K):
    rng = np.random.default_rng(K)
    M = 300
    x = (rng.standard_normal((M, K)) * rng.uniform(0.01, 50, (M, 1))).astype(np.float16)
    x[0] = 0  # all-zero row: the scale is eps
    eps = np.float32(1e-8)
    q = _dev(np.zeros((M, K), np.int8))
    s_out = _dev(np.zeros((M,), np.float32))
    klib["mlcq_quantize_dynamic"](_dev(x), _dev(np.array(eps)), q, s_out)
    st = np.maximum(np.abs(x.astype(np.float32)).max(-1, keepdims=True) / np.float32(127), eps)
    np.testing.assert_array_equal(_host(s_out), st[:, 0])
    np.testing.assert_array_equal(_host(q), _ref_quantize(x, st, per_token=True))


@needs_gpu
def test_gpu_quantize_division_is_exact(klib):
    """The kernel divides with a reciprocal + one fma correction: it must equal IEEE x / s."""
    rng = np.random.default_rng(12)
    M, K = 512, 4096
    for s in (0.1, 0.0123, 1 / 3, 1.9999999, 7.3e-4, 3.0e-6, 1.0000001, 0.05):
        x = (rng.standard_normal((M, K)) * rng.choice([0.01, 1, 30, 1000])).astype(np.float16)
        q = _dev(np.zeros((M, K), np.int8))
        klib["mlcq_quantize"](_dev(x), _dev(np.array(s, np.float32)), None, None, q, None)
        np.testing.assert_array_equal(_host(q), _ref_quantize(x, np.float32(s)), err_msg=f"s={s}")
        # the same through per-token scales, one scale per row
        st = rng.uniform(1e-4, 1.0, (M, 1)).astype(np.float32)
        klib["mlcq_quantize"](_dev(x), None, None, _dev(st), q, None)
        np.testing.assert_array_equal(_host(q), _ref_quantize(x, st, per_token=True))


@needs_gpu
@pytest.mark.parametrize("M", _M_LIST)
@pytest.mark.parametrize("w_kn", [False, True])
def test_gpu_float_gemm(klib, M, w_kn):
    torch = _torch_cuda()
    rng = np.random.default_rng(M + 100 * w_kn)
    for N, K, F in [(328, 176, "float16"), (200, 100, "float16"), (4096, 4096, "float16"),
                    (72, 40, "bfloat16"), (72, 40, "float32")]:
        x = rng.standard_normal((M, K)).astype(np.float32)
        w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)
        b = rng.standard_normal(N).astype(np.float32)
        dt = getattr(torch, F)
        xd, wd, bd = _dev(x).to(dt), _dev(w.T.copy() if w_kn else w).to(dt), _dev(b).to(dt)
        xr = xd.float().cpu().numpy().astype(np.float64)
        wr = _dev(w).to(dt).float().cpu().numpy().astype(np.float64)
        ref = xr @ wr.T + bd.float().cpu().numpy()
        out = _out((M, N), F)
        klib["mlcq_linear"](FLOAT, AUTO, xd, wd, w_kn, None, None, None, None, None, None, None, None, bd, out)
        _assert_close(_host(out), ref, f"float {F} M={M} N={N} K={K} kn={w_kn}",
                      rel={"float16": 3e-3, "bfloat16": 2e-2, "float32": 1e-5}[F])


# =============================================================================================
# GPU: the decode GEMVs (gemv.cu), M <= 8

# Llama-2-7B's MLP, SmolLM2's MLP, and an odd shape (K % 16 != 0: the 4-byte load path; N odd).
_GEMV_NK = [(11008, 4096), (1536, 576), (1003, 1000)]
_GEMV_M = [1, 2, 7, 8]


@needs_gpu
@pytest.mark.parametrize("M", _GEMV_M)
@pytest.mark.parametrize("NK", _GEMV_NK)
@pytest.mark.parametrize("scheme", _SCHEMES)
def test_gpu_gemv_w8a8(klib, M, NK, scheme):
    """The W8A8 GEMV (activation quantize, int8 dot products, dequantize epilogue in one kernel)
    against numpy on fresh random data: forced (backend gemv) for every M <= 8, and by the auto
    policy, which picks it for M <= 2 only (measured: the GEMM route wins from M = 4).

    Tolerance: the reference quantizes with the same IEEE division and ties-to-even rounding, so
    both sides hold the same int8 codes and the int32 sums are exact; what differs is the fp32
    scale products and the fp16 output rounding: max |err| <= 2e-3 max|ref| and
    ||err|| / ||ref|| <= 2e-3 (a wrong code or row sum shows up far above that).
    """
    N, K = NK
    seed = (M * 1000003 + N * 101 + K * 7 + _SCHEMES.index(scheme)) % 2**31
    for x_float, bias in ((True, False), (True, True), (False, True)):
        out, ref = _run_w8a8(klib, scheme, M, N, K, x_float=x_float, bias=bias, seed=seed, backend=GEMV)
        kernel = str(klib["mlcq_last_kernel"]())
        assert kernel == "gemv_w8a8", (M, N, K, scheme, kernel)
        _assert_close(out, ref, f"gemv {scheme} M={M} N={N} K={K} x_float={x_float} bias={bias}")
    out, ref = _run_w8a8(klib, scheme, M, N, K, x_float=True, bias=True, seed=seed + 1)
    kernel = str(klib["mlcq_last_kernel"]())
    assert (kernel == "gemv_w8a8") == (M <= 2), (M, kernel)
    _assert_close(out, ref, f"auto {scheme} M={M} N={N} K={K} ({kernel})")


@needs_gpu
@pytest.mark.parametrize("scheme", _SCHEMES)
def test_gpu_gemv_w8a8_forced_and_fallback(klib, scheme):
    # forced backend, a 3-D x (M = 2 x 3 = 6 rows), K % 16 != 0
    out, ref = _run_w8a8(klib, scheme, 3, 520, 1000, x_float=True, bias=True, seed=5, backend=GEMV, lead=(2,))
    assert str(klib["mlcq_last_kernel"]()) == "gemv_w8a8"
    _assert_close(out, ref, f"forced gemv {scheme}")
    # K % 4 != 0: the GEMV cannot take it; auto falls back (to the CUDA-core GEMM), forced raises
    out, ref = _run_w8a8(klib, scheme, 1, 72, 37, x_float=True, bias=False, seed=6)
    assert str(klib["mlcq_last_kernel"]()) != "gemv_w8a8"
    _assert_close(out, ref, f"fallback {scheme}")
    with pytest.raises(ValueError, match="GEMV backend forced"):
        _run_w8a8(klib, scheme, 1, 72, 37, x_float=True, bias=False, seed=6, backend=GEMV)
    # M = 9: the GEMM path
    _run_w8a8(klib, scheme, 9, 520, 1000, x_float=True, bias=False, seed=7)
    assert str(klib["mlcq_last_kernel"]()) != "gemv_w8a8"


@needs_gpu
def test_gpu_gemv_dynamic_extreme_rows(klib):
    """Dynamic per-token: rows of very different ranges and an all-zero row (scale = eps)."""
    torch = _torch_cuda()
    rng = np.random.default_rng(21)
    M, N, K = 8, 1003, 1000
    x = (rng.standard_normal((M, K)) * rng.uniform(1e-3, 300, (M, 1))).astype(np.float16)
    x[3] = 0
    wq = rng.integers(-127, 128, (N, K)).astype(np.int8)
    sw = (rng.uniform(0.5, 1.5, N) / (127 * np.sqrt(K))).astype(np.float32)
    eps = np.float32(1e-8)
    st = np.maximum(np.abs(x.astype(np.float32)).max(-1, keepdims=True) / np.float32(127), eps)
    ref = _ref_int_gemm(_ref_quantize(x, st, per_token=True), wq) * st.astype(np.float64) * sw
    out = _out((M, N), "float16")
    klib["mlcq_linear"](TOKEN, GEMV, _dev(x), _dev(wq), False, None, None, None, _dev(np.array(eps)), _dev(sw),
                        None, None, None, None, out)
    assert str(klib["mlcq_last_kernel"]()) == "gemv_w8a8"
    res = _host(out)
    assert np.all(res[3] == 0)
    for m in range(M):  # per row: rows differ by 5 orders of magnitude
        if m != 3:
            _assert_close(res[m], ref[m], f"row {m}")
    del torch


@needs_gpu
@pytest.mark.parametrize("M", _GEMV_M)
@pytest.mark.parametrize("NK", _GEMV_NK)
def test_gpu_gemv_f16(klib, M, NK):
    """fp16 GEMV (q0f16 decode) against a float64 reference of the same fp16 inputs; fp32
    accumulation in a different order than the reference: tolerance 3e-3 (as the fp16 GEMM).
    Forced for every M; the auto policy keeps cuBLASLt (the GEMV at best ties it at M = 1)."""
    torch = _torch_cuda()
    N, K = NK
    rng = np.random.default_rng(M * 31 + N + K)
    for bias in (False, True):
        x = rng.standard_normal((M, K)).astype(np.float16)
        w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float16)
        b = rng.standard_normal(N).astype(np.float16) if bias else None
        ref = x.astype(np.float64) @ w.astype(np.float64).T + (b.astype(np.float64) if bias else 0)
        out = _out((M, N), "float16")
        klib["mlcq_linear"](FLOAT, GEMV, _dev(x), _dev(w), False, None, None, None, None, None, None, None, None,
                            _dev(b) if bias else None, out)
        assert str(klib["mlcq_last_kernel"]()) == "gemv_f16"
        _assert_close(_host(out), ref, f"gemv_f16 M={M} N={N} K={K} bias={bias}", rel=3e-3)
        klib["mlcq_linear"](FLOAT, AUTO, _dev(x), _dev(w), False, None, None, None, None, None, None, None, None,
                            _dev(b) if bias else None, out)
        assert str(klib["mlcq_last_kernel"]()) == "cublaslt_float"  # auto keeps cuBLASLt (measured)
        # cuBLASLt on request (the comparison baseline) agrees
        out2 = _out((M, N), "float16")
        klib["mlcq_linear"](FLOAT, CUBLASLT, _dev(x), _dev(w), False, None, None, None, None, None, None, None,
                            None, _dev(b) if bias else None, out2)
        assert str(klib["mlcq_last_kernel"]()) == "cublaslt_float"
        _assert_close(_host(out2), ref, "cublaslt fp16", rel=3e-3)
    del torch


# =============================================================================================
# GPU: BYOC modules built on the CPU machine (make_gpu_bundle) against the CPU build


def _e2e_cases():
    d = os.environ.get("MLC_QUANT_E2E_DIR")
    if not d or not os.path.exists(os.path.join(d, "cases.json")):
        return []
    with open(os.path.join(d, "cases.json"), encoding="utf-8") as f:
        return [(d, c) for c in json.load(f)]


@needs_gpu
@pytest.mark.skipif(not _e2e_cases(), reason="set MLC_QUANT_E2E_DIR to cases from make-gpu-bundle")
@pytest.mark.parametrize("case", _e2e_cases(), ids=lambda c: c[1]["name"])
def test_gpu_byoc_module_matches_cpu_build(case):
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm.runtime import vm as tvm_vm  # pylint: disable=import-outside-toplevel

    d, c = case
    cuda_rt = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    if cuda_rt.exists():  # runtime-only TVM does not load its CUDA support by itself
        ctypes.CDLL(str(cuda_rt), mode=ctypes.RTLD_GLOBAL)
    lib = tvm.runtime.load_module(os.path.join(d, c["lib"]))
    dev = tvm.cuda(0)
    vm = tvm_vm.VirtualMachine(lib, dev)
    data = np.load(os.path.join(d, c["data"]))
    for run in range(c["runs"]):
        args = [tvm.runtime.tensor(data[f"in{run}_{i}"], dev) for i in range(c["n_inputs"])]
        out = vm["main"](*args).numpy()
        _assert_close(out.astype(np.float64), data[f"out{run}"], f"{c['name']} run {run}", rel=c["rel"])


def make_gpu_bundle(out_dir: str) -> None:
    """Build, on the CPU machine, what the GPU tests need: the kernel library and BYOC modules
    exported for CUDA with inputs and the CPU build's outputs (run here with TVM's llvm target)."""
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm import relax  # pylint: disable=import-outside-toplevel

    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel
    from mlc_quant.kernels import build_shared_library  # pylint: disable=import-outside-toplevel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_shared_library(out / "libmlc_quant_kernels.so")
    cases = []
    specs = [
        (f"{s}_{'q' if q else 'i8'}{'_bias' if b else ''}", lambda s=s, q=q, b=b: linear_module(s, 328, 176, bias=b, quantize_inside=q))
        for s in _SCHEMES for q in (True, False) for b in (False, True) if q or s != "token_dyn"
    ] + [
        ("float_bias", lambda: linear_module("float", 328, 176, bias=True)),
        ("float", lambda: linear_module("float", 200, 100)),
        ("sym1_unaligned_k", lambda: linear_module("sym1", 72, 100, bias=True)),
        ("two_layer", _two_layer_module),
    ]
    for name, make in specs:
        mod = make()
        cpu = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
        arrays = {}
        n_inputs = len(mod["main"].params)
        for run, M in enumerate((1, 7, 130)):
            ins = _two_layer_inputs(M, run) if name == "two_layer" else random_params(mod, M, seed=run)
            for i, a in enumerate(ins):
                arrays[f"in{run}_{i}"] = a
            arrays[f"out{run}"] = cpu["main"](*[tvm.runtime.tensor(a) for a in ins]).numpy().astype(np.float64)
        dmod = cd.dispatch_gemms(mod, strict=True)
        cd.export_library(tvm.compile(dmod, target=_cuda_target()), str(out / f"{name}.so"))
        np.savez(out / f"{name}.npz", **arrays)
        # TVM's CPU matmul accumulates fp16 in fp16: the float cases' reference is coarser.
        rel = 2e-2 if name.startswith("float") or name == "two_layer" else 3e-3
        cases.append(dict(name=name, lib=f"{name}.so", data=f"{name}.npz", runs=3, n_inputs=n_inputs, rel=rel))
        print(f"[make-gpu-bundle] {name}", flush=True)
    (out / "cases.json").write_text(json.dumps(cases, indent=1))


def _two_layer_inputs(M, seed):
    rng = np.random.default_rng(seed)
    K, N1, N2 = 128, 96, 64
    w1 = rng.integers(-127, 128, (N1, K)).astype(np.int8)
    w2 = rng.integers(-127, 128, (N2, N1)).astype(np.int8)
    return [
        (rng.standard_normal((M, K)) * 2).astype(np.float16),
        w1, np.array(0.05, np.float32), (rng.uniform(0.5, 1.5, N1) / (127 * np.sqrt(K)) * 20).astype(np.float32),
        rng.standard_normal(N1).astype(np.float16),
        w2, np.array(0.03, np.float32), np.array(-3, np.int8),
        (rng.uniform(0.5, 1.5, N2) * 0.03 / 127).astype(np.float32),
        rng.integers(-5, 5, N2).astype(np.int32), rng.integers(-500, 500, N2).astype(np.int32),
        (rng.standard_normal((N2, N2)) / np.sqrt(N2)).astype(np.float16),
    ]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "make-gpu-bundle":
        make_gpu_bundle(sys.argv[2])
    else:
        print(f"usage: {sys.argv[0]} make-gpu-bundle OUT_DIR", file=sys.stderr)
        sys.exit(2)
