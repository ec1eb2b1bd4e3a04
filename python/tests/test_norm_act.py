"""OffloadNormAct (passes/offload_norm_act.py) and its kernels (mlc_quant/kernels/norm_act.cu).

CPU:
  * Before/Expected: add + rms_norm -> mlcq_add_rms_norm (the sum keeps its other users), a lone
    rms_norm -> mlcq_rms_norm, split + silu + multiply -> mlcq_silu_mul (both operand orders);
    float32, hidden % 8 != 0 and a broadcasting add are left to TVM; well-formedness;
  * the merged Llama modules (q0f16, smq_q8i8f16_3) offload 2 norms per layer + the final one
    and one SiLU * up per layer, and dispatch still offloads every GEMM after it (needs nvcc).
The kernels themselves on the GPU: test_cuda_norm_act.py.
"""
from __future__ import annotations

import shutil

import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from mlc_quant.passes.offload_norm_act import ADD_RMS_NORM, RMS_NORM, SILU_MUL, SILU_MUL2, OffloadNormAct


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
    assert counts == {ADD_RMS_NORM: 1, RMS_NORM: 1, SILU_MUL: 1, SILU_MUL2: 0}
    tvm.ir.assert_structural_equal(out, Expected)


def test_two_tensor_silu_mul_expected():
    """gate and up from two linears (not merged, e.g. tensor-parallel shards): mlcq_silu_mul2."""

    @I.ir_module
    class Before:
        @R.function
        def main(g: R.Tensor((1, "n", 16), "float16"), u: R.Tensor((1, "n", 16), "float16")):
            n = T.int64()
            with R.dataflow():
                a = R.nn.silu(g)
                m = R.multiply(a, u)
                R.output(m)
            return m

    @I.ir_module
    class Expected:
        @R.function
        def main(g: R.Tensor((1, "n", 16), "float16"), u: R.Tensor((1, "n", 16), "float16")):
            n = T.int64()
            with R.dataflow():
                m = R.call_dps_packed("mlcq_silu_mul2", (g, u), out_ty=R.Tensor((1, n, 16), "float16"))
                R.output(m)
            return m

    out, counts = _run(Before)
    assert counts[SILU_MUL2] == 1
    tvm.ir.assert_structural_equal(out, Expected)


def _norm_module(dtype="float16", hidden=64, r_shape=None, rows=128):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((rows, hidden), dtype))
    r = relax.Var("r", relax.TensorType(r_shape or (rows, hidden), dtype))
    w = relax.Var("w", relax.TensorType((hidden,), dtype))
    with bb.function("main", [x, r, w]):
        with bb.dataflow():
            s = bb.emit(relax.op.add(x, r))
            out = bb.emit_output(relax.op.nn.rms_norm(s, w, axes=[-1]))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("kw", [dict(dtype="float32"), dict(hidden=60), dict(r_shape=(1, 64)), dict(rows=1)])
def test_left_to_tvm(kw):
    mod = _norm_module(**kw)
    out, counts = _run(mod)
    if kw.get("r_shape"):  # a broadcasting add is not fused; the norm alone still is
        assert counts == {ADD_RMS_NORM: 0, RMS_NORM: 1, SILU_MUL: 0, SILU_MUL2: 0}
        assert "R.add" in str(out["main"])
    else:
        assert sum(counts.values()) == 0
        tvm.ir.assert_structural_equal(out, mod)


def merged_tiny_llama(scheme_name):
    """The tiny Llama exported for CUDA in fp16, the scheme's IR (synthetic plan), linears merged:
    (config, scheme, module) as dispatch_gemms receives it."""
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
    return config, scheme, pipeline.merge_linears(qmod, {}, scheme)[0]


@pytest.mark.parametrize("scheme_name", ["q0f16", "smq_q8i8f16_3"])
def test_llama_module_offloads_norms_and_silu(scheme_name):
    config, _, qmod = merged_tiny_llama(scheme_name)
    out, counts = _run(qmod)
    layers = config.num_hidden_layers
    # per function over a symbolic number of tokens (prefill): the first norm alone, then add +
    # norm twice per layer (the last one is the final norm); decode (one static row) keeps TVM's
    left = sorted(gv.name_hint for gv, f in out.functions_items()
                  if isinstance(f, relax.Function) and "R.nn.rms_norm" in str(f))
    assert left == ["decode"]
    assert counts == {RMS_NORM: 1, ADD_RMS_NORM: 2 * layers, SILU_MUL: layers, SILU_MUL2: 0}
    tvm.ir.assert_structural_equal(out["decode"], qmod["decode"])
    if shutil.which("nvcc") is not None:
        from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel

        cd.dispatch_gemms(qmod, strict=True, attach_kernels=False)  # raises if a matmul is left to TVM
