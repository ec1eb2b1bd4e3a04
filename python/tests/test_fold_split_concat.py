"""FoldSplitConcat (passes/fold_split_concat.py): concat(reshape(split(x))) -> reshape(x).

Before/Expected on a merged-q/k/v-shaped module (symbolic sequence length), the cases that must
stay as they are, numerics against numpy, and the tiny Llama's merged module (no concat left;
its logits equal the unmerged module's in test_merge_linears).
"""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from mlc_quant.passes.fold_split_concat import FoldSplitConcat


def _fold(mod):
    p = FoldSplitConcat()
    out = p(mod)
    relax.analysis.well_formed(out)  # raises on the first violation
    return out, p.folded


def _qkv_module(order=(0, 1, 2), axis=2, kv_dim=8, split_axis=-1):
    """x [1, n, 16 + 2*kv_dim] split into q (4 heads of 4) and k/v (kv_dim // 4 heads of 4)."""
    bb = relax.BlockBuilder()
    n = T.int64()
    width = 16 + 2 * kv_dim
    x = relax.Var("x", relax.TensorType((1, n, width), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            parts = bb.emit(relax.op.split(x, [16, 16 + kv_dim], axis=split_axis))
            heads = [4, kv_dim // 4, kv_dim // 4]
            rs = [bb.emit(relax.op.reshape(bb.emit(relax.TupleGetItem(parts, i)), (1, n, heads[i], 4)))
                  for i in range(3)]
            out = bb.emit_output(relax.op.concat([rs[i] for i in order], axis=axis))
        bb.emit_func_output(out)
    return bb.get()


def test_fold_expected():
    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, "n", 32), "float32")) -> R.Tensor((1, "n", 8, 4), "float32"):
            n = T.int64()
            with R.dataflow():
                gv = R.reshape(x, R.shape([1, n, 8, 4]))
                R.output(gv)
            return gv

    out, folded = _fold(_qkv_module())
    assert folded == 1
    tvm.ir.assert_structural_equal(out, Expected)


@pytest.mark.parametrize("kw", [dict(order=(1, 0, 2)), dict(axis=3), dict(kv_dim=4, order=(0, 2, 1))])
def test_not_a_round_trip_is_kept(kw):
    mod = _qkv_module(**kw) if "axis" not in kw else None
    if mod is None:  # concat along the head_dim axis: not the merged layout
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((1, 3, 32), "float32"))
        with bb.function("main", [x]):
            with bb.dataflow():
                parts = bb.emit(relax.op.split(x, 2, axis=-1))
                rs = [bb.emit(relax.op.reshape(bb.emit(relax.TupleGetItem(parts, i)), (1, 3, 4, 4))) for i in range(2)]
                out = bb.emit_output(relax.op.concat(rs, axis=3))
            bb.emit_func_output(out)
        mod = bb.get()
    out, folded = _fold(mod)
    assert folded == 0
    tvm.ir.assert_structural_equal(out, mod)


def test_partial_use_is_kept():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 48), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            parts = bb.emit(relax.op.split(x, 3, axis=-1))
            rs = [bb.emit(relax.op.reshape(bb.emit(relax.TupleGetItem(parts, i)), (1, 3, 4, 4))) for i in range(2)]
            out = bb.emit_output(relax.op.concat(rs, axis=2))  # parts 0 and 1 of 3: not the whole of x
        bb.emit_func_output(out)
    mod = bb.get()
    out, folded = _fold(mod)
    assert folded == 0


def test_numerics_against_numpy():
    from tvm import runtime  # pylint: disable=import-outside-toplevel

    mod = _qkv_module()
    out, _ = _fold(mod)
    x = np.random.default_rng().standard_normal((1, 5, 32)).astype("float32")
    want = np.concatenate([x[..., :16].reshape(1, 5, 4, 4), x[..., 16:24].reshape(1, 5, 2, 4),
                           x[..., 24:].reshape(1, 5, 2, 4)], axis=2)
    for m in (mod, out):
        ex = tvm.compile(m, "llvm")
        vm = relax.VirtualMachine(ex, tvm.cpu())
        got = vm["main"](runtime.tensor(x)).numpy()
        np.testing.assert_array_equal(got, want)


def test_tiny_llama_merged_module_has_no_concat():
    from test_merge_linears import _tiny_config  # pylint: disable=import-outside-toplevel

    from mlc_quant import pipeline  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel

    config = _tiny_config()
    mod, _ = export_model(config, "float32", "llvm")
    assert "R.concat" in str(mod["prefill"])
    mmod, _, merges = pipeline.merge_linears(mod, {}, "q0f32")
    relax.analysis.well_formed(mmod)
    assert merges
    for fn in ("prefill", "decode"):
        assert "R.concat" not in str(mmod[fn]), fn
