"""OffloadNormAct (passes/offload_norm_act.py) and its kernels (mlc_quant/kernels/norm_act.cu).

CPU:
  * Before/Expected: add + rms_norm -> mlcq_add_rms_norm (the sum keeps its other users), a lone
    rms_norm -> mlcq_rms_norm, split + silu + multiply -> mlcq_silu_mul (both operand orders);
    float32, hidden % 8 != 0 and a broadcasting add are left to TVM; well-formedness;
  * the merged Llama modules (q0f16, smq_q8i8f16_3) offload 2 norms per layer + the final one
    and one SiLU * up per layer, and dispatch still offloads every GEMM after it (needs nvcc).
GPU (skipped without one; the kernel library from MLC_QUANT_KERNEL_LIB or built here):
  * the kernels against numpy in float64 on fresh random data, rows 1 .. 2048, hidden 576 ..
    11008: the residual sum bit-exact (fp16 rounding of a + b, as R.add), the norm and SiLU * up
    within 2 fp16 ulps of the float64 value (|err| <= 2^-9 |ref| + 1e-6);
  * bad arguments raise with the function's name.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from mlc_quant.passes.offload_norm_act import ADD_RMS_NORM, RMS_NORM, SILU_MUL, OffloadNormAct


def _run(mod):
    p = OffloadNormAct()
    out = p(mod)
    relax.analysis.well_formed(out)  # raises on the first violation
    return out, p.counts


@I.ir_module
class Layer:
    @R.function
    def main(x: R.Tensor((1, "n", 64), "float16"), r: R.Tensor((1, "n", 64), "float16"),
             w: R.Tensor((64,), "float16"), gu: R.Tensor((1, "n", 32), "float16")):
        n = T.int64()
        with R.dataflow():
            s = R.add(x, r)
            h = R.nn.rms_norm(s, w, axes=[-1], epsilon=1e-5)
            h2 = R.nn.rms_norm(x, w, axes=[-1], epsilon=1e-6)
            p = R.split(gu, indices_or_sections=[16], axis=-1)
            g = p[0]
            u = p[1]
            a = R.nn.silu(g)
            m = R.multiply(u, a)
            out = (s, h, h2, m)
            R.output(out)
        return out


def test_expected():
    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, "n", 64), "float16"), r: R.Tensor((1, "n", 64), "float16"),
                 w: R.Tensor((64,), "float16"), gu: R.Tensor((1, "n", 32), "float16")):
            n = T.int64()
            with R.dataflow():
                t = R.call_dps_packed("mlcq_add_rms_norm", (x, r, w, T.float64(1e-5)),
                                      out_ty=[R.Tensor((1, n, 64), "float16"), R.Tensor((1, n, 64), "float16")])
                s = t[0]
                h = t[1]
                h2 = R.call_dps_packed("mlcq_rms_norm", (x, w, T.float64(1e-6)),
                                       out_ty=R.Tensor((1, n, 64), "float16"))
                m = R.call_dps_packed("mlcq_silu_mul", (gu,), out_ty=R.Tensor((1, n, 16), "float16"))
                out = (s, h, h2, m)
                R.output(out)
            return out

    out, counts = _run(Layer)
    assert counts == {ADD_RMS_NORM: 1, RMS_NORM: 1, SILU_MUL: 1}
    tvm.ir.assert_structural_equal(out, Expected)


def _norm_module(dtype="float16", hidden=64, r_shape=None):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((3, hidden), dtype))
    r = relax.Var("r", relax.TensorType(r_shape or (3, hidden), dtype))
    w = relax.Var("w", relax.TensorType((hidden,), dtype))
    with bb.function("main", [x, r, w]):
        with bb.dataflow():
            s = bb.emit(relax.op.add(x, r))
            out = bb.emit_output(relax.op.nn.rms_norm(s, w, axes=[-1]))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("kw", [dict(dtype="float32"), dict(hidden=60), dict(r_shape=(1, 64))])
def test_left_to_tvm(kw):
    mod = _norm_module(**kw)
    out, counts = _run(mod)
    if kw.get("r_shape"):  # a broadcasting add is not fused; the norm alone still is
        assert counts == {ADD_RMS_NORM: 0, RMS_NORM: 1, SILU_MUL: 0}
        assert "R.add" in str(out["main"])
    else:
        assert sum(counts.values()) == 0
        tvm.ir.assert_structural_equal(out, mod)


@pytest.mark.parametrize("scheme_name", ["q0f16", "smq_q8i8f16_3"])
def test_llama_module_offloads_norms_and_silu(scheme_name):
    from test_merge_linears import _tiny_config  # pylint: disable=import-outside-toplevel

    from mlc_quant import pipeline  # pylint: disable=import-outside-toplevel
    from mlc_quant.bench import synthetic_plan  # pylint: disable=import-outside-toplevel
    from mlc_quant.build import parse_target  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel
    from mlc_quant.schemes import get_scheme  # pylint: disable=import-outside-toplevel

    config = _tiny_config()
    scheme = get_scheme(scheme_name)
    mod, names = export_model(config, "float16", parse_target("cuda"))
    qmod = synthetic_plan(mod, names, scheme).apply(mod) if scheme.quantizes else mod
    qmod, _, _ = pipeline.merge_linears(qmod, {}, scheme)
    out, counts = _run(qmod)
    layers = config.num_hidden_layers
    # per function with norms (prefill, decode, ...): the first norm alone, then add + norm twice
    # per layer (the last one is the final norm)
    left = [gv.name_hint for gv, f in out.functions_items() if isinstance(f, relax.Function) and "R.nn.rms_norm" in str(f)]
    per_func = {gv.name_hint: str(f) for gv, f in qmod.functions_items() if isinstance(f, relax.Function)}
    n_funcs = sum(1 for t in per_func.values() if "R.nn.rms_norm" in t)
    assert counts == {RMS_NORM: n_funcs, ADD_RMS_NORM: 2 * layers * n_funcs, SILU_MUL: layers * n_funcs}
    assert not left, left  # no R.nn.rms_norm left anywhere
    if shutil.which("nvcc") is not None:
        from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel

        cd.dispatch_gemms(qmod, strict=True, attach_kernels=False)  # raises if a matmul is left to TVM


# =============================================================================================
# GPU


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
        from mlc_quant.kernels import build_shared_library, find_nvcc  # pylint: disable=import-outside-toplevel

        if find_nvcc() is None:
            pytest.skip("set MLC_QUANT_KERNEL_LIB or install nvcc to build the kernels")
        path = build_shared_library(tmp_path_factory.mktemp("k") / "libmlc_quant_kernels.so")
    return tvm_ffi.load_module(path)


def _close(out, ref, what):
    err = np.abs(out.astype(np.float64) - ref)
    bound = 2.0 ** -9 * np.abs(ref) + 1e-6
    assert np.isfinite(out).all(), what
    assert (err <= bound).all(), f"{what}: worst err {err.max():.3g} at |ref| {np.abs(ref).ravel()[err.argmax()]:.3g}"


def _ref_norm(s, w, eps):
    s64 = s.astype(np.float64)
    return s64 / np.sqrt((s64 ** 2).mean(-1, keepdims=True) + eps) * w.astype(np.float64)


@needs_gpu
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (7, 576), (2048, 4096), (3, 11008), (5, 8)])
def test_gpu_norms(klib, rows, hidden):
    torch = _torch_cuda()
    rng = np.random.default_rng()
    a = (rng.standard_normal((1, rows, hidden)) * rng.uniform(0.1, 30)).astype(np.float16)
    b = (rng.standard_normal((1, rows, hidden)) * 0.5).astype(np.float16)
    w = rng.uniform(0.2, 2.0, hidden).astype(np.float16)
    eps = 1e-5
    da, db, dw = (torch.from_numpy(v).cuda() for v in (a, b, w))
    s_out = torch.full_like(da, float("nan"))
    n_out = torch.full_like(da, float("nan"))
    klib["mlcq_add_rms_norm"](da, db, dw, eps, s_out, n_out)
    torch.cuda.synchronize()
    s = (a + b)  # numpy float16 add: the exact sum rounded once, as R.add in float16
    np.testing.assert_array_equal(s_out.cpu().numpy(), s)
    _close(n_out.cpu().numpy(), _ref_norm(s, w, eps), "add_rms_norm")
    n2 = torch.full_like(da, float("nan"))
    klib["mlcq_rms_norm"](da, dw, eps, n2)
    _close(n2.cpu().numpy(), _ref_norm(a, w, eps), "rms_norm")
    z = torch.zeros_like(da)  # an all-zero row: eps keeps it finite (output 0)
    klib["mlcq_rms_norm"](z, dw, eps, n2)
    assert (n2.cpu().numpy() == 0).all()


@needs_gpu
@pytest.mark.parametrize("rows,inter", [(1, 11008), (2048, 11008), (9, 1536), (4, 8)])
def test_gpu_silu_mul(klib, rows, inter):
    torch = _torch_cuda()
    rng = np.random.default_rng()
    gu = (rng.standard_normal((rows, 2 * inter)) * 4).astype(np.float16)
    out = torch.full((rows, inter), float("nan"), dtype=torch.float16, device="cuda")
    klib["mlcq_silu_mul"](torch.from_numpy(gu).cuda(), out)
    torch.cuda.synchronize()
    g, u = gu[:, :inter].astype(np.float64), gu[:, inter:].astype(np.float64)
    _close(out.cpu().numpy(), g / (1 + np.exp(-g)) * u, "silu_mul")


@needs_gpu
def test_gpu_bad_arguments(klib):
    torch = _torch_cuda()
    x = torch.zeros((2, 12), dtype=torch.float16, device="cuda")
    w = torch.zeros((12,), dtype=torch.float16, device="cuda")
    with pytest.raises(Exception, match="mlcq_rms_norm.*multiple of 8"):
        klib["mlcq_rms_norm"](x, w, 1e-5, torch.zeros_like(x))
    x = torch.zeros((2, 16), dtype=torch.float32, device="cuda")
    with pytest.raises(Exception, match="mlcq_silu_mul.*float16"):
        klib["mlcq_silu_mul"](x, torch.zeros((2, 8), dtype=torch.float32, device="cuda"))
