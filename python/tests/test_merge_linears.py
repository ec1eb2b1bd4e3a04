"""MergeSiblingLinears (passes/merge_sibling_linears.py): q/k/v and gate/up as one linear each.

* Before/Expected on a small module (float, and a per-token W8A8 one) and well-formedness;
* numerics: on the tiny Llama (CPU), the merged module with merged params gives the unmerged
  module's logits on fresh random weights and tokens, for q0f32, q0f16 and every smq scheme;
* merge_params / merged_name / the cross-function consistency rule;
* a tiny `--target cuda` module still offloads every GEMM after the merge (needs nvcc).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from mlc_quant.passes.merge_sibling_linears import (
    MERGED_ATTR, LinearMerge, MergeSiblingLinears, merge_params, merged_linears, merged_name,
)
from mlc_quant.schemes import get_scheme

sys.path.insert(0, str(Path(__file__).resolve().parent))

SMQ = ["smq_q8i8f16_0", "smq_q8i8f16_1", "smq_q8i8f16_2", "smq_q8i8f16_3"]


def _check(mod):
    relax.analysis.well_formed(mod)  # raises on the first violation
    return mod


@I.ir_module
class Siblings:
    @R.function
    def main(x: R.Tensor((4, 8), "float32"), wq: R.Tensor((16, 8), "float32"), wk: R.Tensor((8, 8), "float32"),
             wo: R.Tensor((8, 24), "float32")) -> R.Tensor((4, 8), "float32"):
        with R.dataflow():
            a = R.permute_dims(wq)
            q = R.matmul(x, a)
            b = R.permute_dims(wk)
            k = R.matmul(x, b)
            c = R.concat([q, k], axis=-1)
            d = R.permute_dims(wo)
            y = R.matmul(c, d)
            R.output(y)
        return y


def test_merge_float_expected():
    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((4, 8), "float32"), wqk: R.Tensor((24, 8), "float32"),
                 wo: R.Tensor((8, 24), "float32")) -> R.Tensor((4, 8), "float32"):
            with R.dataflow():
                wt = R.permute_dims(wqk)
                y0 = R.matmul(x, wt)
                parts = R.split(y0, [16], axis=-1)
                q = parts[0]
                k = parts[1]
                c = R.concat([q, k], axis=-1)
                d = R.permute_dims(wo)
                y = R.matmul(c, d)
                R.output(y)
            return y

    merger = MergeSiblingLinears()
    after = _check(merger(Siblings))
    assert merger.merges == [LinearMerge("wq_wk", ("wq", "wk"), (16, 8), False)]
    assert merged_linears(after) == merger.merges
    tvm.ir.assert_structural_equal(after["main"], Expected["main"])  # the module attr aside
    assert MERGED_ATTR in after.attrs


def test_merge_per_token_expected():
    from mlc_quant.passes import AnnotateLinear, QuantizeLinear  # pylint: disable=import-outside-toplevel

    scheme = get_scheme("smq_q8i8f16_3")
    quantized = QuantizeLinear(scheme)(AnnotateLinear(weight_names=["wq", "wk", "wo"])(Siblings))

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((4, 8), "float32"), wqk_q: R.Tensor((24, 8), "int8"),
                 wqk_scale: R.Tensor((24,), "float32"), wo_q: R.Tensor((8, 24), "int8"),
                 wo_scale: R.Tensor((8,), "float32")) -> R.Tensor((4, 8), "float32"):
            R.func_attr({"mlc_quant.linears": ["wq", "wk", "wo"]})
            with R.dataflow():
                wt = R.permute_dims(wqk_q)
                ax = R.abs(x)
                am = R.max(ax, axis=[-1], keepdims=True)
                r = R.divide(am, R.const(127.0, "float32"))
                s = R.maximum(r, R.const(1e-8, "float32"))
                xd = R.divide(x, s)
                xr = R.round(xd)
                xc = R.clip(xr, -127, 127)
                xq = R.astype(xc, "int8")
                acc = R.matmul(xq, wt, out_dtype="int32")
                af = R.astype(acc, "float32")
                m = R.multiply(af, s)
                y0 = R.multiply(m, wqk_scale)
                parts = R.split(y0, [16], axis=-1)
                q = parts[0]
                k = parts[1]
                c = R.concat([q, k], axis=-1)
                wt2 = R.permute_dims(wo_q)
                ax2 = R.abs(c)
                am2 = R.max(ax2, axis=[-1], keepdims=True)
                r2 = R.divide(am2, R.const(127.0, "float32"))
                s2 = R.maximum(r2, R.const(1e-8, "float32"))
                cd = R.divide(c, s2)
                cr = R.round(cd)
                cc = R.clip(cr, -127, 127)
                cq = R.astype(cc, "int8")
                acc2 = R.matmul(cq, wt2, out_dtype="int32")
                af2 = R.astype(acc2, "float32")
                m2 = R.multiply(af2, s2)
                y = R.multiply(m2, wo_scale)
                R.output(y)
            return y

    merger = MergeSiblingLinears(scheme)
    after = _check(merger(quantized))
    assert [m.name for m in merger.merges] == ["wq_wk"] and merger.merges[0].quantized
    assert [p.name for p in after["main"].params] == ["x", "wq_wk.q", "wq_wk.scale", "wo.q", "wo.scale"]
    # TVMScript cannot spell "wqk.q": compare with the params renamed
    expected = Expected["main"]
    tvm.ir.assert_structural_equal(after["main"].params[1].ty, expected.params[1].ty)
    tvm.ir.assert_structural_equal(after["main"].body, expected.body, map_free_vars=True)


def test_merge_skips_different_static_scales_and_shared_weights():
    from mlc_quant.passes import AnnotateLinear, QuantizeLinear  # pylint: disable=import-outside-toplevel
    from mlc_quant.schemes import ActQParams  # pylint: disable=import-outside-toplevel

    scheme = get_scheme("smq_q8i8f16_2")
    ann = AnnotateLinear(weight_names=["wq", "wk", "wo"])(Siblings)
    same = {"wq": ActQParams(0.1, 3), "wk": ActQParams(0.1, 3), "wo": ActQParams(0.2, 0)}
    differ = dict(same, wk=ActQParams(0.1, 4))
    m1 = MergeSiblingLinears(scheme)
    _check(m1(QuantizeLinear(scheme, same)(ann)))
    assert [m.parts for m in m1.merges] == [("wq", "wk")]
    m2 = MergeSiblingLinears(scheme)
    out = m2(QuantizeLinear(scheme, differ)(ann))
    assert m2.merges == [] and MERGED_ATTR not in (out.attrs or {})

    @I.ir_module
    class Tied:  # wk also read by something other than its linear: not merged
        @R.function
        def main(x: R.Tensor((4, 8), "float32"), wq: R.Tensor((8, 8), "float32"),
                 wk: R.Tensor((8, 8), "float32")) -> R.Tuple(R.Tensor((4, 8), "float32"), R.Tensor((4, 8), "float32"),
                                                           R.Tensor((8, 8), "float32")):
            with R.dataflow():
                a = R.permute_dims(wq)
                q = R.matmul(x, a)
                b = R.permute_dims(wk)
                k = R.matmul(x, b)
                e = R.add(wk, wk)
                R.output(q, k, e)
            return (q, k, e)

    m3 = MergeSiblingLinears()
    m3(Tied)
    assert m3.merges == []


def test_merged_name_and_params():
    assert merged_name(["l0_attn_q_proj_weight", "l0_attn_k_proj_weight", "l0_attn_v_proj_weight"]) == \
        "l0_attn_qkv_proj_weight"
    assert merged_name(["m.l.0.mlp.gate_proj.weight", "m.l.0.mlp.up_proj.weight"]) == "m.l.0.mlp.gate_up_proj.weight"
    assert merged_name(["a", "b"]) == "ab"
    assert merged_name(["wx", "wx2"]) == "wx_wx2"
    assert merged_name(["a", "b"], taken={"ab"}) == "a.merged"
    rng = np.random.default_rng()
    p = {"a.q": rng.integers(-127, 128, (3, 4)).astype(np.int8), "a.scale": np.float32(0.5),
         "b.q": rng.integers(-127, 128, (2, 4)).astype(np.int8), "b.scale": np.float32(0.25), "c": np.ones(2)}
    out = merge_params(p, [LinearMerge("ab", ("a", "b"), (3, 2), True)])
    assert sorted(out) == ["ab.q", "ab.scale", "c"]
    np.testing.assert_array_equal(out["ab.q"], np.concatenate([p["a.q"], p["b.q"]]))
    np.testing.assert_array_equal(out["ab.scale"], np.array([0.5] * 3 + [0.25] * 2, np.float32))


# ------------------------------------------------------------------------------- tiny Llama


def _tiny_config():
    from test_cuda_build import _tiny_config as cfg  # pylint: disable=import-outside-toplevel

    return cfg()


def _random_params(func, rng, n_inputs=2):
    out = {}
    for p in func.params[n_inputs:]:
        shape, dtype = [int(d) for d in p.ty.shape], str(p.ty.dtype)
        if p.name.endswith(".q"):
            out[p.name] = rng.integers(-127, 128, shape).astype(np.int8)
        elif p.name.endswith(".scale"):
            out[p.name] = (rng.uniform(0.5, 1.5, shape) * 0.02).astype(np.float32)
        elif p.name.endswith((".zp", ".corr")):
            out[p.name] = rng.integers(-8, 9, shape).astype(np.int32)
        else:
            out[p.name] = (rng.standard_normal(shape) * (1.0 if "norm" in p.name else 0.2)).astype(dtype)
    return out


@pytest.mark.parametrize("scheme_name", ["q0f32", "q0f16"] + SMQ)
def test_tiny_llama_merged_equals_unmerged(scheme_name):
    from conftest import build_cpu  # pylint: disable=import-outside-toplevel

    from mlc_quant import pipeline  # pylint: disable=import-outside-toplevel
    from mlc_quant.bench import synthetic_plan  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel
    from mlc_quant.runtime import Engine  # pylint: disable=import-outside-toplevel

    config = _tiny_config()
    scheme = get_scheme(scheme_name)
    dtype = "float16" if scheme_name == "q0f16" else "float32"
    mod, names = export_model(config, dtype, "llvm")
    qmod = synthetic_plan(mod, names, scheme).apply(mod) if scheme.quantizes else mod
    rng = np.random.default_rng()  # fresh weights and tokens every run
    params = _random_params(qmod["prefill"], rng)
    mmod, mparams, merges = pipeline.merge_linears(qmod, params, scheme)
    _check(mmod)
    layers = config.num_hidden_layers
    assert len(merges) == 2 * layers and sorted(len(m.parts) for m in merges) == [2] * layers + [3] * layers
    assert set(mparams) == {p.name for p in mmod["prefill"].params[2:]}
    assert [p.name for p in mmod["prefill"].params] == [p.name for p in mmod["decode"].params]
    ids = rng.integers(3, config.vocab_size, 12)
    logits = []
    for m, p in ((qmod, params), (mmod, mparams)):
        eng = Engine(build_cpu(m), p, max_seq_len=32, vocab_size=config.vocab_size)
        out = [eng.prefill(ids)]
        out += [eng.decode(int(t)) for t in (5, 7)]
        logits.append([np.asarray(o, np.float32) for o in out])
    for a, b in zip(*logits):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6 * max(1.0, float(np.abs(a).max())))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("scheme_name", ["q0f16", "smq_q8i8f16_2", "smq_q8i8f16_3"])
def test_tiny_llama_cuda_merged_offloads_every_gemm(scheme_name):
    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel
    from mlc_quant import pipeline  # pylint: disable=import-outside-toplevel
    from mlc_quant.bench import synthetic_plan  # pylint: disable=import-outside-toplevel
    from mlc_quant.build import parse_target  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel

    target = parse_target("cuda")
    config = _tiny_config()
    mod, names = export_model(config, "float16", target)
    s = get_scheme(scheme_name)
    qmod = synthetic_plan(mod, names, s).apply(mod) if s.quantizes else mod
    mmod, _, merges = pipeline.merge_linears(qmod, {}, s)
    assert len(merges) == 2 * config.num_hidden_layers
    dmod = cd.dispatch_gemms(mmod, strict=True, attach_kernels=False)  # raises if a matmul is left to TVM
    n_linears = 4 * config.num_hidden_layers + 1  # qkv, o, gate_up, down per layer + the head
    for fn in ("prefill", "decode"):
        calls = []
        relax.analysis.post_order_visit(
            dmod[fn],
            lambda e: calls.append(str(e.args[0].global_symbol))
            if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_dps_packed"
            and str(e.args[0].global_symbol).endswith(("mlc_cutlass", "mlc_cublaslt")) else None,
        )
        assert len(calls) == n_linears, (fn, calls)
        want = "mlc_cublaslt" if scheme_name == "q0f16" else "mlc_cutlass"
        assert all(c.endswith(want) for c in calls)


# ------------------------------------------------------------------------------- a built artifact


def test_cpu_build_with_merge_records_and_runs(tiny_llama_dir, tmp_path):
    """`mlc-quant build --merge-linears` (CPU, smq_q8i8f16_2): the config records the merges, the
    params file holds the merged params in the module's order, the runner places them, and the
    logits equal those of the same build without merging."""
    import json  # pylint: disable=import-outside-toplevel

    from test_build import build, byte_tokenizer  # pylint: disable=import-outside-toplevel

    from mlc_quant import artifact  # pylint: disable=import-outside-toplevel
    from mlc_quant.runner import load_built  # pylint: disable=import-outside-toplevel

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    byte_tokenizer(256).save_pretrained(model)
    plain, merged = tmp_path / "plain", tmp_path / "merged"
    assert build(str(model), plain, "smq_q8i8f16_2") == 0
    assert build(str(model), merged, "smq_q8i8f16_2", "--merge-linears") == 0
    cfg = json.loads((merged / artifact.CONFIG_FILE).read_text())
    assert json.loads((plain / artifact.CONFIG_FILE).read_text())["merged_linears"] == []
    names = sorted(m["name"] for m in cfg["merged_linears"])
    layers = cfg["model_config"]["num_hidden_layers"]
    assert len(names) == 2 * layers and "model_layers_0_self_attn_qkv_proj_weight" in names
    params = artifact.load_safetensors(merged / artifact.PARAMS_FILE)
    assert list(params) == cfg["params"] or sorted(params) == sorted(cfg["params"])
    assert "model_layers_0_self_attn_qkv_proj_weight.q" in params
    assert "model_layers_0_self_attn_q_proj_weight.q" not in params
    prompt = [5, 17, 33, 101, 7, 250, 3, 9]
    e0, e1 = load_built(plain)[0], load_built(merged)[0]
    ref, got = e0.prefill(prompt), e1.prefill(prompt)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * float(np.abs(ref).max()))
    np.testing.assert_allclose(e1.decode(11), e0.decode(11), rtol=0, atol=1e-6 * float(np.abs(ref).max()))
