"""FuseActQuantize (passes/fuse_act_quantize.py): the W8A8 activation quantize moves into the
norm_act.cu kernel that produces the activation.

Before/Expected for the static quantize after a lone norm and after add + norm, and the per-token
chain after SiLU * up; what must stay (a second user of the fp16 output, a non-constant scale);
on the merged tiny Llama every norm / SiLU * up feeding a linear is fused for smq_q8i8f16_0..3
(and nothing for q0f16), the IR stays well-formed, and dispatch still offloads every GEMM (the
int8-x patterns). The kernels' bit-exactness against the unfused quantize is a GPU test
(test_cuda_norm_act.py).
"""
from __future__ import annotations

import shutil

import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from mlc_quant.passes.fuse_act_quantize import FuseActQuantize


def _run(mod):
    p = FuseActQuantize()
    out = p(mod)
    relax.analysis.well_formed(out)  # raises on the first violation
    return out, p.fused


@I.ir_module
class Static:
    @R.function
    def main(x: R.Tensor((1, "n", 64), "float16"), r: R.Tensor((1, "n", 64), "float16"),
             w: R.Tensor((64,), "float16")):
        n = T.int64()
        with R.dataflow():
            t = R.call_dps_packed("mlcq_add_rms_norm", (x, r, w, T.float64(1e-5)),
                                  out_ty=[R.Tensor((1, n, 64), "float16"), R.Tensor((1, n, 64), "float16")])
            s = t[0]
            h = t[1]
            q = R.quantize(h, R.const(0.5, "float32"), R.const(-3, "int8"), axis=-1, out_dtype="int8")
            h2 = R.call_dps_packed("mlcq_rms_norm", (s, w, T.float64(1e-5)), out_ty=R.Tensor((1, n, 64), "float16"))
            q2 = R.quantize(h2, R.const(0.25, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
            out = (s, q, q2)
            R.output(out)
        return out


def test_static_expected():
    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, "n", 64), "float16"), r: R.Tensor((1, "n", 64), "float16"),
                 w: R.Tensor((64,), "float16")):
            n = T.int64()
            with R.dataflow():
                t = R.call_dps_packed("mlcq_add_rms_norm_q", (x, r, w, T.float64(1e-5), R.const(0.5, "float32"),
                                                              R.const(-3, "int8")),
                                      out_ty=[R.Tensor((1, n, 64), "float16"), R.Tensor((1, n, 64), "int8")])
                s = t[0]
                q = t[1]
                q2 = R.call_dps_packed("mlcq_rms_norm_q", (s, w, T.float64(1e-5), R.const(0.25, "float32"),
                                                           R.const(0, "int8")), out_ty=R.Tensor((1, n, 64), "int8"))
                out = (s, q, q2)
                R.output(out)
            return out

    out, fused = _run(Static)
    assert fused == 2
    tvm.ir.assert_structural_equal(out, Expected)


@I.ir_module
class StaticRowSums:
    """smq_q8i8f16_2's asymmetric-weight linears take the row sums of their int8 x."""

    @R.function
    def main(x: R.Tensor((1, "n", 64), "float16"), r: R.Tensor((1, "n", 64), "float16"),
             w: R.Tensor((64,), "float16"), gu: R.Tensor((1, "n", 96), "float16")):
        n = T.int64()
        with R.dataflow():
            t = R.call_dps_packed("mlcq_add_rms_norm", (x, r, w, T.float64(1e-5)),
                                  out_ty=[R.Tensor((1, n, 64), "float16"), R.Tensor((1, n, 64), "float16")])
            s = t[0]
            h = t[1]
            q = R.quantize(h, R.const(0.5, "float32"), R.const(-3, "int8"), axis=-1, out_dtype="int8")
            c = R.astype(q, "int32")
            rs = R.sum(c, axis=[-1], keepdims=True)
            y = R.call_dps_packed("mlcq_silu_mul", (gu,), out_ty=R.Tensor((1, n, 48), "float16"))
            q2 = R.quantize(y, R.const(0.25, "float32"), R.const(1, "int8"), axis=-1, out_dtype="int8")
            c2 = R.astype(q2, "int32")
            rs2 = R.sum(c2, axis=[2], keepdims=True)
            c3 = R.astype(q2, "int32")  # a second sum of the same q (unmerged linears): the same output
            rs3 = R.sum(c3, axis=[-1], keepdims=True)
            out = (s, q, rs, q2, rs2, rs3)
            R.output(out)
        return out


def test_static_row_sums_expected():
    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, "n", 64), "float16"), r: R.Tensor((1, "n", 64), "float16"),
                 w: R.Tensor((64,), "float16"), gu: R.Tensor((1, "n", 96), "float16")):
            n = T.int64()
            with R.dataflow():
                t = R.call_dps_packed("mlcq_add_rms_norm_qs", (x, r, w, T.float64(1e-5), R.const(0.5, "float32"),
                                                               R.const(-3, "int8")),
                                      out_ty=[R.Tensor((1, n, 64), "float16"), R.Tensor((1, n, 64), "int8"),
                                              R.Tensor((1, n, 1), "int32")])
                s = t[0]
                q = t[1]
                rs = t[2]
                y = R.call_dps_packed("mlcq_silu_mul_qs", (gu, R.const(0.25, "float32"), R.const(1, "int8")),
                                      out_ty=[R.Tensor((1, n, 48), "int8"), R.Tensor((1, n, 1), "int32")])
                q2 = y[0]
                rs2 = y[1]
                rs3 = y[1]
                out = (s, q, rs, q2, rs2, rs3)
                R.output(out)
            return out

    out, fused = _run(StaticRowSums)
    assert fused == 2
    tvm.ir.assert_structural_equal(out, Expected)


def test_row_sum_of_another_kind_is_kept():
    """A sum over another axis, or of a cast also used elsewhere, is not the kernel's row sum."""

    @I.ir_module
    class Kept:
        @R.function
        def main(x: R.Tensor((1, "n", 64), "float16"), w: R.Tensor((64,), "float16")):
            n = T.int64()
            with R.dataflow():
                h = R.call_dps_packed("mlcq_rms_norm", (x, w, T.float64(1e-5)), out_ty=R.Tensor((1, n, 64), "float16"))
                q = R.quantize(h, R.const(0.5, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
                c = R.astype(q, "int32")
                cs = R.sum(c, axis=[1], keepdims=True)  # over tokens
                c2 = R.astype(q, "int32")
                rs = R.sum(c2, axis=[-1], keepdims=True)
                out = (q, cs, c2, rs)  # c2 is returned too
                R.output(out)
            return out

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, "n", 64), "float16"), w: R.Tensor((64,), "float16")):
            n = T.int64()
            with R.dataflow():
                q = R.call_dps_packed("mlcq_rms_norm_q", (x, w, T.float64(1e-5), R.const(0.5, "float32"),
                                                          R.const(0, "int8")), out_ty=R.Tensor((1, n, 64), "int8"))
                c = R.astype(q, "int32")
                cs = R.sum(c, axis=[1], keepdims=True)
                c2 = R.astype(q, "int32")
                rs = R.sum(c2, axis=[-1], keepdims=True)
                out = (q, cs, c2, rs)
                R.output(out)
            return out

    out, fused = _run(Kept)
    assert fused == 1
    tvm.ir.assert_structural_equal(out, Expected)


@I.ir_module
class PerToken:
    @R.function
    def main(gu: R.Tensor((1, "n", 32), "float16")):
        n = T.int64()
        with R.dataflow():
            y = R.call_dps_packed("mlcq_silu_mul", (gu,), out_ty=R.Tensor((1, n, 16), "float16"))
            xf = R.astype(y, "float32")
            a = R.abs(xf)
            m = R.max(a, axis=[-1], keepdims=True)
            d = R.divide(m, R.const(127.0, "float32"))
            st = R.maximum(d, R.const(1e-8, "float32"))
            z = R.divide(xf, st)
            rz = R.round(z)
            c = R.clip(rz, -127, 127)
            q = R.astype(c, "int8")
            out = (q, st)
            R.output(out)
        return out


def test_per_token_expected():
    @I.ir_module
    class Expected:
        @R.function
        def main(gu: R.Tensor((1, "n", 32), "float16")):
            n = T.int64()
            with R.dataflow():
                y = R.call_dps_packed("mlcq_silu_mul_qt", (gu, R.const(1e-8, "float32")),
                                      out_ty=[R.Tensor((1, n, 16), "int8"), R.Tensor((1, n, 1), "float32")])
                st = y[1]
                q = y[0]
                out = (q, st)
                R.output(out)
            return out

    out, fused = _run(PerToken)
    assert fused == 1
    tvm.ir.assert_structural_equal(out, Expected)


def test_second_user_or_dynamic_scale_is_kept():
    @I.ir_module
    class Kept:
        @R.function
        def main(x: R.Tensor((1, "n", 64), "float16"), w: R.Tensor((64,), "float16"), s: R.Tensor((), "float32")):
            n = T.int64()
            with R.dataflow():
                h = R.call_dps_packed("mlcq_rms_norm", (x, w, T.float64(1e-5)), out_ty=R.Tensor((1, n, 64), "float16"))
                q = R.quantize(h, R.const(0.5, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
                h2 = R.call_dps_packed("mlcq_rms_norm", (x, w, T.float64(1e-5)), out_ty=R.Tensor((1, n, 64), "float16"))
                q2 = R.quantize(h2, s, R.const(0, "int8"), axis=-1, out_dtype="int8")  # scale not a constant
                out = (h, q, q2)  # h is also returned: its fp16 values are needed
                R.output(out)
            return out

    out, fused = _run(Kept)
    assert fused == 0
    tvm.ir.assert_structural_equal(out, Kept)


@pytest.mark.parametrize("scheme_name", ["q0f16", "smq_q8i8f16_0", "smq_q8i8f16_1", "smq_q8i8f16_2", "smq_q8i8f16_3"])
def test_llama_fuses_every_norm_and_silu_before_a_linear(scheme_name):
    from test_norm_act import merged_tiny_llama  # pylint: disable=import-outside-toplevel

    from mlc_quant.passes.offload_norm_act import OffloadNormAct  # pylint: disable=import-outside-toplevel

    config, scheme, qmod = merged_tiny_llama(scheme_name)
    qmod = OffloadNormAct()(qmod)
    out, fused = _run(qmod)
    layers = config.num_hidden_layers
    # prefill: per layer the two norms + SiLU * up, then the final norm (before the LM head)
    assert fused == (3 * layers + 1 if scheme.quantizes else 0)
    text = str(out["prefill"])
    # smq_q8i8f16_2 (asymmetric weights): the kernels also write the row sums its linears need
    suffix = {"smq_q8i8f16_3": "_qt", "smq_q8i8f16_2": "_qs"}.get(scheme_name, "_q")
    if scheme.quantizes:
        for kernel in ("mlcq_rms_norm", "mlcq_add_rms_norm", "mlcq_silu_mul"):
            assert f'"{kernel}{suffix}"' in text and f'"{kernel}"' not in text
    if scheme_name == "smq_q8i8f16_2":
        assert text.count("R.sum(") == layers  # only o_proj's: its quantize and row sum are in the linear
    if shutil.which("nvcc") is not None:
        from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel

        disp = cd.dispatch_gemms(out, strict=True, attach_kernels=False)  # the int8-x patterns take every linear
        relax.analysis.well_formed(disp)
        if scheme_name == "smq_q8i8f16_2":
            # the linears after a norm / SiLU take the row sums as an operand; o_proj computes its own
            # (the offloaded calls are named after the ops they fused)
            calls = str(disp["prefill"])
            assert calls.count("relax_matmul_relax_multiply_relax_subtract") == 3 * layers + 1
            assert calls.count("relax_matmul_relax_astype_relax_sum_relax_multiply") == layers
