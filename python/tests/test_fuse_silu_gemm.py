"""Gate/up interleave (MergeSiblingLinears(interleave_swiglu=8)) and FuseSiluGemm, on the CPU.

* interleave_rows / merge_params: the merged rows are gate and up in blocks of 8, in turn;
* the tiny Llama merged with the interleave computes what the unmerged one computes (CPU build,
  fresh random weights and tokens, prefill + decode logits within 1e-6): the de-interleaving
  reshapes undo the params' permutation;
* FuseSiluGemm: Before / Expected modules (symmetric; asymmetric with both row sums), forms it
  must leave alone, and the tiny Llama for CUDA: one fused call per layer in prefill, decode as
  before, every other linear still offloaded.
The kernel itself: test_cuda_silu_gemm.py (GPU).
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from mlc_quant.passes.fuse_silu_gemm import FuseSiluGemm, uses_silu_gemm
from mlc_quant.passes.merge_sibling_linears import LinearMerge, interleave_rows, merge_params


def _run(mod):
    p = FuseSiluGemm()
    out = p(mod)
    relax.analysis.well_formed(out)
    return out, p.fused


def test_interleave_rows():
    a = np.arange(32 * 3).reshape(32, 3)  # gate rows 0-15, up rows 16-31
    out = interleave_rows(a, 8)
    want = np.concatenate([a[0:8], a[16:24], a[8:16], a[24:32]])
    np.testing.assert_array_equal(out, want)
    v = np.arange(32)
    np.testing.assert_array_equal(interleave_rows(v, 8), np.concatenate([v[0:8], v[16:24], v[8:16], v[24:32]]))


def test_merge_params_interleaves_every_quantized_param():
    rng = np.random.default_rng()
    params = {"g.q": rng.integers(-127, 128, (16, 4)).astype(np.int8), "u.q": rng.integers(-127, 128, (16, 4)).astype(np.int8),
              "g.scale": np.float32(0.5), "u.scale": np.float32(0.25)}
    out = merge_params(params, [LinearMerge("gu", ("g", "u"), (16, 16), True, 8)])
    np.testing.assert_array_equal(out["gu.q"], np.concatenate([params["g.q"][:8], params["u.q"][:8],
                                                               params["g.q"][8:], params["u.q"][8:]]))
    np.testing.assert_array_equal(out["gu.scale"], np.repeat(np.float32([0.5, 0.25, 0.5, 0.25]), 8))
    assert set(out) == {"gu.q", "gu.scale"}


@pytest.mark.parametrize("scheme_name", ["smq_q8i8f16_0", "smq_q8i8f16_1", "smq_q8i8f16_2"])
def test_tiny_llama_interleaved_equals_unmerged(scheme_name):
    from conftest import build_cpu  # pylint: disable=import-outside-toplevel
    from test_merge_linears import _check, _random_params, _tiny_config  # pylint: disable=import-outside-toplevel

    from mlc_quant import pipeline  # pylint: disable=import-outside-toplevel
    from mlc_quant.bench import synthetic_plan  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel
    from mlc_quant.runtime import Engine  # pylint: disable=import-outside-toplevel
    from mlc_quant.schemes import get_scheme  # pylint: disable=import-outside-toplevel

    config = _tiny_config()
    scheme = get_scheme(scheme_name)
    mod, names = export_model(config, "float32", "llvm")
    qmod = synthetic_plan(mod, names, scheme).apply(mod)
    rng = np.random.default_rng()  # fresh weights and tokens every run
    params = _random_params(qmod["prefill"], rng)
    mmod, mparams, merges = pipeline.merge_linears(qmod, params, scheme, interleave_swiglu=8)
    _check(mmod)
    assert sorted(m.interleave for m in merges) == [0] * config.num_hidden_layers + [8] * config.num_hidden_layers
    assert all((m.interleave == 8) == (len(m.parts) == 2) for m in merges)  # gate/up, not q/k/v
    ids = rng.integers(3, config.vocab_size, 12)
    logits = []
    for m, p in ((qmod, params), (mmod, mparams)):
        eng = Engine(build_cpu(m), p, max_seq_len=32, vocab_size=config.vocab_size)
        out = [eng.prefill(ids)] + [eng.decode(int(t)) for t in (5, 7)]
        logits.append([np.asarray(o, np.float32) for o in out])
    for a, b in zip(*logits):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * max(1.0, float(np.abs(a).max())))


@pytest.mark.parametrize("scheme_name", ["q0f16", "smq_q8i8f16_3"])
def test_no_interleave_without_a_static_down_proj_quantize(scheme_name):
    from test_merge_linears import _tiny_config  # pylint: disable=import-outside-toplevel

    from mlc_quant import pipeline  # pylint: disable=import-outside-toplevel
    from mlc_quant.bench import synthetic_plan  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel
    from mlc_quant.schemes import get_scheme  # pylint: disable=import-outside-toplevel

    scheme = get_scheme(scheme_name)
    mod, names = export_model(_tiny_config(), "float16", "llvm")
    qmod = synthetic_plan(mod, names, scheme).apply(mod) if scheme.quantizes else mod
    _, _, merges = pipeline.merge_linears(qmod, {}, scheme, interleave_swiglu=8)
    assert merges and all(m.interleave == 0 for m in merges)


def test_swiglu_interleave_switch(monkeypatch):
    from mlc_quant.pipeline import swiglu_interleave  # pylint: disable=import-outside-toplevel

    monkeypatch.delenv("MLC_QUANT_SILU_GEMM", raising=False)
    assert swiglu_interleave("cuda") == 8 and swiglu_interleave("llvm") == 0
    monkeypatch.setenv("MLC_QUANT_SILU_GEMM", "off")
    assert swiglu_interleave("cuda") == 0
    monkeypatch.setenv("MLC_QUANT_SILU_GEMM", "maybe")
    with pytest.raises(ValueError, match="MLC_QUANT_SILU_GEMM"):
        swiglu_interleave("cuda")


# ---------------------------------------------------------------------------------------------
# FuseSiluGemm: Before / Expected


@I.ir_module
class SymBefore:
    @R.function
    def main(x: R.Tensor((1, "n", 64), "int8"), w: R.Tensor((32, 64), "int8"), s: R.Tensor((32,), "float32")):
        n = T.int64()
        with R.dataflow():
            wt = R.permute_dims(w, axes=None)
            acc = R.matmul(x, wt, out_dtype="int32")
            y = R.dequantize(acc, s, R.const(0, "int32"), out_dtype="float16", axis=-1)
            b = R.reshape(y, R.shape([1, n, 2, 2, 8]))
            p = R.split(b, 2, axis=-2)
            g = R.reshape(p[0], R.shape([1, n, 16]))
            u = R.reshape(p[1], R.shape([1, n, 16]))
            a = R.nn.silu(g)
            h = R.multiply(a, u)
            q = R.quantize(h, R.const(0.05, "float32"), R.const(0, "int8"), out_dtype="int8", axis=-1)
            R.output(q)
        return q


def test_symmetric_expected():
    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, "n", 64), "int8"), w: R.Tensor((32, 64), "int8"), s: R.Tensor((32,), "float32")):
            n = T.int64()
            with R.dataflow():
                q = R.call_dps_packed("mlcq_w8a8_silu_q", (x, w, s, R.const(0.05, "float32"), R.const(0, "int8")),
                                      out_ty=R.Tensor((1, n, 16), "int8"))
                R.output(q)
            return q

    out, fused = _run(SymBefore)
    assert fused == 1
    tvm.ir.assert_structural_equal(out, Expected)


def test_asymmetric_with_row_sums_expected():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, "n", 64), "int8"), rs: R.Tensor((1, "n", 1), "int32"), w: R.Tensor((32, 64), "int8"),
                 s: R.Tensor((), "float32"), zp: R.Tensor((32,), "int32"), c: R.Tensor((32,), "int32")):
            n = T.int64()
            with R.dataflow():
                wt = R.permute_dims(w, axes=None)
                acc = R.matmul(x, wt, out_dtype="int32")
                m = R.multiply(rs, zp)
                t1 = R.subtract(acc, m)
                t2 = R.subtract(t1, c)
                y = R.dequantize(t2, s, R.const(0, "int32"), out_dtype="float16", axis=-1)
                b = R.reshape(y, R.shape([1, n, 2, 2, 8]))
                p = R.split(b, 2, axis=-2)
                g = R.reshape(p[0], R.shape([1, n, 16]))
                u = R.reshape(p[1], R.shape([1, n, 16]))
                a = R.nn.silu(g)
                h = R.multiply(u, a)
                q = R.quantize(h, R.const(0.05, "float32"), R.const(-3, "int8"), out_dtype="int8", axis=-1)
                qi = R.astype(q, "int32")
                r = R.sum(qi, axis=[-1], keepdims=True)
                R.output(q, r)
            return (q, r)

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, "n", 64), "int8"), rs: R.Tensor((1, "n", 1), "int32"), w: R.Tensor((32, 64), "int8"),
                 s: R.Tensor((), "float32"), zp: R.Tensor((32,), "int32"), c: R.Tensor((32,), "int32")):
            n = T.int64()
            with R.dataflow():
                q_silu = R.call_dps_packed(
                    "mlcq_w8a8_asym_silu_qs", (x, w, s, rs, zp, c, R.const(0.05, "float32"), R.const(-3, "int8")),
                    out_ty=[R.Tensor((1, n, 16), "int8"), R.Tensor((1, n, 1), "int32")])
                q = q_silu[0]
                r = q_silu[1]
                R.output(q, r)
            return (q, r)

    out, fused = _run(Before)
    assert fused == 1
    tvm.ir.assert_structural_equal(out, Expected)


def _sym_variant(second_user=False, rows=None, plain_split=False):
    n = rows if rows is not None else tvm.tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, n, 64], "int8"))
    w = relax.Var("w", relax.TensorType([32, 64], "int8"))
    s = relax.Var("s", relax.TensorType([32], "float32"))
    with bb.function("main", [x, w, s]):
        with bb.dataflow():
            acc = bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w)), out_dtype="int32"))
            y = bb.emit(relax.op.dequantize(acc, s, relax.const(0, "int32"), out_dtype="float16"))
            if plain_split:
                p = bb.emit(relax.op.split(y, 2, axis=-1))
                g, u = (bb.emit(relax.TupleGetItem(p, i)) for i in range(2))
            else:
                p = bb.emit(relax.op.split(bb.emit(relax.op.reshape(y, [1, n, 2, 2, 8])), 2, axis=-2))
                g, u = (bb.emit(relax.op.reshape(relax.TupleGetItem(p, i), [1, n, 16])) for i in range(2))
            h = bb.emit(relax.op.multiply(bb.emit(relax.op.nn.silu(g)), u))
            q = bb.emit(relax.op.quantize(h, relax.const(0.05, "float32"), relax.const(0, "int8"), out_dtype="int8"))
            outs = [bb.emit_output(q)] + ([bb.emit_output(y)] if second_user else [])
        bb.emit_func_output(relax.Tuple(outs) if second_user else outs[0])
    return bb.get()


@pytest.mark.parametrize("case", ["second_user", "static_rows", "plain_split"])
def test_forms_left_alone(case):
    kw = {"second_user": dict(second_user=True), "static_rows": dict(rows=1), "plain_split": dict(plain_split=True)}[case]
    mod = _sym_variant(**kw)
    out, fused = _run(mod)
    assert fused == 0
    tvm.ir.assert_structural_equal(out, mod)
    assert _run(_sym_variant())[1] == 1  # the same builder without the difference is fused


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("scheme_name", ["smq_q8i8f16_1", "smq_q8i8f16_2"])
def test_tiny_llama_cuda_dispatch_fuses_every_gate_up(scheme_name):
    from test_merge_linears import _tiny_config  # pylint: disable=import-outside-toplevel

    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel
    from mlc_quant import pipeline  # pylint: disable=import-outside-toplevel
    from mlc_quant.bench import synthetic_plan  # pylint: disable=import-outside-toplevel
    from mlc_quant.build import parse_target  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel
    from mlc_quant.schemes import get_scheme  # pylint: disable=import-outside-toplevel

    config = _tiny_config()
    layers = config.num_hidden_layers
    mod, names = export_model(config, "float16", parse_target("cuda"))
    s = get_scheme(scheme_name)
    mmod, _, _ = pipeline.merge_linears(synthetic_plan(mod, names, s).apply(mod), {}, s, interleave_swiglu=8)
    dmod = cd.dispatch_gemms(mmod, strict=True, attach_kernels=False)
    relax.analysis.well_formed(dmod)
    assert uses_silu_gemm(dmod) and not uses_silu_gemm(mmod)  # the library must link the kernels
    fused = "mlcq_w8a8_asym_silu_qs" if scheme_name == "smq_q8i8f16_2" else "mlcq_w8a8_silu_q"
    for fn, want_fused in (("prefill", layers), ("decode", 0)):
        calls = []
        relax.analysis.post_order_visit(
            dmod[fn], lambda e: calls.append(str(e.args[0].global_symbol))
            if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_dps_packed" else None)
        assert calls.count(fused) == want_fused, (fn, calls)
        offloaded = [c for c in calls if c.endswith("mlc_cutlass")]
        assert len(offloaded) == 4 * layers + 1 - want_fused, (fn, calls)
        if fn == "prefill":  # the gate/up input's quantize still went into the RMSNorm kernel
            suffix = "_qs" if scheme_name == "smq_q8i8f16_2" else "_q"
            assert calls.count("mlcq_add_rms_norm" + suffix) == 2 * layers
            assert not any(c.startswith("mlcq_silu_mul") for c in calls)
