"""Before/Expected structural tests of each pass, plus well-formedness after every pass."""
import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from mlc_quant.passes import AnnotateLinear, CollectStats, QuantizeLinear, SmoothLinear, find_smoothing_groups
from mlc_quant.schemes import ActQParams, get_scheme


def _check(mod):
    relax.analysis.well_formed(mod)  # raises on the first violation
    return mod


@I.ir_module
class Linear:
    @R.function
    def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((16, 8), "float32")) -> R.Tensor((4, 16), "float32"):
        with R.dataflow():
            wt = R.permute_dims(w)
            y = R.matmul(x, wt)
            R.output(y)
        return y


def test_annotate_linear_names_weights():
    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((16, 8), "float32")) -> R.Tensor((4, 16), "float32"):
            R.func_attr({"mlc_quant.linears": ["w"]})
            with R.dataflow():
                wt = R.permute_dims(w)
                y = R.matmul(x, wt)
                R.output(y)
            return y

    after = _check(AnnotateLinear()(Linear))
    tvm.ir.assert_structural_equal(after, Expected)


def test_annotate_linear_ignores_non_linears():
    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor((4, 8), "float32"), k: R.Tensor((4, 8), "float32"), x: R.Tensor((4, 8), "float32"),
                 w: R.Tensor((8, 16), "float32")):
            R.func_attr({"num_input": 3})
            with R.dataflow():
                kt = R.permute_dims(R.multiply(k, k))  # transposed activation: attention, not a linear
                s = R.matmul(q, kt)
                y = R.matmul(x, w)  # [K, N] weight after num_input: a linear
                R.output(s, y)
            return (s, y)

    after = _check(AnnotateLinear()(Before))
    assert [str(n) for n in after["main"].attrs["mlc_quant.linears"]] == ["w"]


def test_annotate_linear_explicit_weight_names_and_shared_weights():
    @I.ir_module
    class Before:
        @R.function
        def prefill(x: R.Tensor((1, "n", 8), "float32"), w: R.Tensor((16, 8), "float32")):
            with R.dataflow():
                y = R.matmul(x, R.permute_dims(w))
                R.output(y)
            return y

        @R.function
        def decode(x: R.Tensor((1, 1, 8), "float32"), w: R.Tensor((16, 8), "float32")):
            with R.dataflow():
                y = R.matmul(x, R.permute_dims(w))
                R.output(y)
            return y

    after = _check(AnnotateLinear(weight_names=["w"])(Before))
    for f in ("prefill", "decode"):
        assert [str(n) for n in after[f].attrs["mlc_quant.linears"]] == ["w"]
    assert "mlc_quant.linears" not in (AnnotateLinear(weight_names=["v"])(Before)["prefill"].attrs or {})


def test_collect_stats_expected():
    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((16, 8), "float32")):
            R.func_attr({"mlc_quant.linears": ["w"], "mlc_quant.stats": ["w:absmax", "w:min", "w:max"]})
            with R.dataflow():
                wt = R.permute_dims(w)
                a = R.abs(x)
                s0 = R.max(a, axis=[0])
                s1 = R.min(x, axis=[0])
                s2 = R.max(x, axis=[0])
                y = R.matmul(x, wt)
                R.output(s0, s1, s2, y)
            return (y, (s0, s1, s2))

    after = _check(CollectStats()(AnnotateLinear()(Linear)))
    tvm.ir.assert_structural_equal(after, Expected)


def test_collect_stats_fp16_casts_and_shares_reduction():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 3, 8), "float16"), wq: R.Tensor((16, 8), "float16"), wk: R.Tensor((4, 8), "float16")):
            with R.dataflow():
                q = R.matmul(x, R.permute_dims(wq))
                k = R.matmul(x, R.permute_dims(wk))
                R.output(q, k)
            return (q, k)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 3, 8), "float16"), wq: R.Tensor((16, 8), "float16"), wk: R.Tensor((4, 8), "float16")):
            R.func_attr({"mlc_quant.linears": ["wq", "wk"], "mlc_quant.stats": ["wq:absmax", "wk:absmax"]})
            with R.dataflow():
                t = R.permute_dims(wq)
                a = R.abs(x)
                m = R.max(a, axis=[0, 1])
                s = R.astype(m, "float32")
                q = R.matmul(x, t)
                t2 = R.permute_dims(wk)
                k = R.matmul(x, t2)
                R.output(s, q, k)
            return ((q, k), (s, s))

    after = _check(CollectStats(["absmax"])(AnnotateLinear()(Before)))
    tvm.ir.assert_structural_equal(after, Expected)


def test_collect_stats_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown stat kind"):
        CollectStats(["median"])


def test_smooth_linear_inserts_explicit_multiply():
    inv = np.linspace(0.5, 2.0, 8).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    w = relax.Var("w", relax.TensorType((16, 8), "float32"))
    with bb.function("main", [x, w], attrs={"mlc_quant.linears": ["w"]}):
        with bb.dataflow():
            wt = bb.emit(relax.op.permute_dims(w))
            xs = bb.emit(relax.op.multiply(x, relax.const(inv)))
            y = bb.emit_output(relax.op.matmul(xs, wt))
        bb.emit_func_output(y)
    expected = bb.get()
    after = _check(SmoothLinear({"w": inv})(AnnotateLinear()(Linear)))
    tvm.ir.assert_structural_equal(after, expected)


@I.ir_module
class NormQKV:
    @R.function
    def main(x: R.Tensor((2, 8), "float32"), g: R.Tensor((8,), "float32"), wq: R.Tensor((8, 8), "float32"),
             wk: R.Tensor((4, 8), "float32"), wv: R.Tensor((4, 8), "float32"), wo: R.Tensor((8, 4), "float32"),
             wd: R.Tensor((8, 8), "float32")):
        R.func_attr({"num_input": 1})
        with R.dataflow():
            h = R.nn.rms_norm(x, g, axes=[-1])
            q = R.matmul(h, R.permute_dims(wq))
            k = R.matmul(h, R.permute_dims(wk))
            v = R.matmul(h, R.permute_dims(wv))
            o = R.matmul(v, R.permute_dims(wo))  # v feeds only o: fold into v's rows
            g2 = R.nn.gelu(q)
            d = R.matmul(g2, R.permute_dims(wd))  # gelu in between: explicit multiply
            out = R.add(R.add(d, o), R.sum(k))
            R.output(out)
        return out


def test_find_smoothing_groups_folds():
    groups = {g.linears: g for g in find_smoothing_groups(AnnotateLinear()(NormQKV))}
    assert groups[("wk", "wq", "wv")].fold == "norm" and groups[("wk", "wq", "wv")].fold_params == ("g",)
    assert groups[("wo",)].fold == "linear" and groups[("wo",)].fold_params == ("wv",)
    assert groups[("wd",)].fold == "none"


def test_find_smoothing_groups_skips_tied_weight():
    @I.ir_module
    class Tied:
        @R.function
        def main(ids: R.Tensor((3,), "int32"), emb: R.Tensor((10, 8), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                h = R.take(emb, ids, axis=0)
                logits = R.matmul(h, R.permute_dims(emb))
                R.output(logits)
            return logits

    (group,) = find_smoothing_groups(AnnotateLinear()(Tied))
    assert group.fold == "skip"


def _expected_quantized(scheme_name, act, n=16, k=8):
    """The quantized linear as docs/design.md specifies it, written out by hand."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, k), "float32"))
    wq = relax.Var("w.q", relax.TensorType((n, k), "int8"))
    per_tensor = scheme_name == "smq_q8i8f16_0"
    scale = relax.Var("w.scale", relax.TensorType(() if per_tensor else (n,), "float32"))
    params = [x, wq, scale]
    if scheme_name == "smq_q8i8f16_2":
        zp = relax.Var("w.zp", relax.TensorType((n,), "int32"))
        corr = relax.Var("w.corr", relax.TensorType((n,), "int32"))
        params += [zp, corr]
    op = relax.op
    with bb.function("main", params, attrs={"mlc_quant.linears": ["w"]}):
        with bb.dataflow():
            wt = bb.emit(op.permute_dims(wq))
            if scheme_name == "smq_q8i8f16_3":
                amax = bb.emit(op.max(op.abs(x), axis=[-1], keepdims=True))
                s = bb.emit(op.maximum(op.divide(amax, relax.const(127.0, "float32")), relax.const(1e-8, "float32")))
                xq = bb.emit(op.astype(op.clip(op.round(op.divide(x, s)), -127, 127), "int8"))
                acc = bb.emit(op.matmul(xq, wt, out_dtype="int32"))
                y = bb.emit_output(op.multiply(op.multiply(op.astype(acc, "float32"), s), scale))
            else:
                xq = bb.emit(op.quantize(x, relax.const(act.scale, "float32"), relax.const(act.zero_point, "int8"),
                                         axis=-1, out_dtype="int8"))
                acc = bb.emit(op.matmul(xq, wt, out_dtype="int32"))
                if scheme_name == "smq_q8i8f16_2":
                    rs = bb.emit(op.sum(op.astype(xq, "int32"), axis=[-1], keepdims=True))
                    acc = bb.emit(op.subtract(op.subtract(acc, op.multiply(rs, zp)), corr))
                y = bb.emit_output(op.dequantize(acc, scale, relax.const(0, "int32"), axis=-1, out_dtype="float32"))
        bb.emit_func_output(y)
    return bb.get()


@pytest.mark.parametrize("scheme_name", ["smq_q8i8f16_0", "smq_q8i8f16_1", "smq_q8i8f16_2", "smq_q8i8f16_3"])
def test_quantize_linear_expected(scheme_name):
    scheme = get_scheme(scheme_name)
    act = ActQParams(0.05, -3 if scheme_name == "smq_q8i8f16_2" else 0)
    after = _check(QuantizeLinear(scheme, {"w": act})(AnnotateLinear()(Linear)))
    tvm.ir.assert_structural_equal(after, _expected_quantized(scheme_name, act))


def test_quantize_linear_requires_activation_scales():
    with pytest.raises(ValueError, match="needs calibrated activation scales"):
        QuantizeLinear(get_scheme("smq_q8i8f16_1"), {})(AnnotateLinear()(Linear))


def test_quantize_linear_keeps_tied_float_weight():
    @I.ir_module
    class Tied:
        @R.function
        def main(ids: R.Tensor((3,), "int32"), emb: R.Tensor((10, 8), "float32")):
            R.func_attr({"num_input": 1})
            with R.dataflow():
                h = R.take(emb, ids, axis=0)
                logits = R.matmul(h, R.permute_dims(emb))
                R.output(logits)
            return logits

    after = _check(QuantizeLinear(get_scheme("smq_q8i8f16_3"))(AnnotateLinear()(Tied)))
    assert [p.name for p in after["main"].params] == ["ids", "emb", "emb.q", "emb.scale"]


def test_quantize_linear_float_schemes_are_identity():
    mod = AnnotateLinear()(Linear)
    assert QuantizeLinear(get_scheme("q0f32"))(mod).same_as(mod)
