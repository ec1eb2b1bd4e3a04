"""Running statistics (batch-invariance, O(channels)) and the API's errors on bad input."""
import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

import mlc_quant
from mlc_quant.observers import ChannelStatsObserver


@I.ir_module
class Mod:
    @R.function
    def main(x: R.Tensor(("m", 16), "float32"), w: R.Tensor((8, 16), "float32")):
        with R.dataflow():
            y = R.matmul(x, R.permute_dims(w))
            R.output(y)
        return y


@I.ir_module
class PrefillDecode:
    @R.function
    def prefill(x: R.Tensor((1, "n", 16), "float32"), w: R.Tensor((8, 16), "float32")):
        with R.dataflow():
            y = R.matmul(x, R.permute_dims(w))
            R.output(y)
        return y

    @R.function
    def decode(x: R.Tensor((1, 1, 16), "float32"), w: R.Tensor((8, 16), "float32")):
        with R.dataflow():
            y = R.matmul(R.multiply(x, R.const(3.0, "float32")), R.permute_dims(w))
            R.output(y)
        return y


def W():
    return {"w": np.random.default_rng().standard_normal((8, 16)).astype(np.float32)}


def test_running_stats_equal_stats_of_concatenation():
    rng = np.random.default_rng()
    batches = [rng.standard_normal((int(rng.integers(1, 9)), 16)).astype(np.float32) for _ in range(6)]
    cat = np.concatenate(batches)
    split = mlc_quant.calibrate(Mod, W(), [(b,) for b in batches])["w"]
    whole = mlc_quant.calibrate(Mod, W(), [(cat,)])["w"]
    for kind, expect in (("absmax", np.abs(cat).max(0)), ("min", cat.min(0)), ("max", cat.max(0))):
        np.testing.assert_array_equal(split[kind], whole[kind])
        np.testing.assert_allclose(split[kind], expect, rtol=0, atol=0)


def test_observer_is_batch_invariant_and_o_channels():
    rng = np.random.default_rng()
    vecs = [rng.standard_normal(32).astype(np.float32) for _ in range(50)]
    a, b = ChannelStatsObserver(), ChannelStatsObserver()
    for v in vecs:
        a.update("l", "max", v)
    for v in reversed(vecs):
        b.update("l", "max", v)
    np.testing.assert_array_equal(a.stats("l")["max"], np.max(vecs, axis=0))
    np.testing.assert_array_equal(a.stats("l")["max"], b.stats("l")["max"])
    assert a.nbytes() == 32 * 4  # one vector, however many updates
    with pytest.raises(ValueError, match="non-finite"):
        a.update("l", "max", np.full(32, np.nan, np.float32))
    with pytest.raises(ValueError, match="channels"):
        a.update("l", "max", np.zeros(31, np.float32))


def test_prefill_and_decode_stats_merge_by_weight_name():
    rng = np.random.default_rng()
    p = rng.standard_normal((1, 5, 16)).astype(np.float32)
    d = rng.standard_normal((1, 1, 16)).astype(np.float32)
    stats = mlc_quant.calibrate(PrefillDecode, W(), [{"prefill": (p,), "decode": (d,)}])
    assert list(stats) == ["w"]
    expect = np.maximum(np.abs(p).max((0, 1)), np.abs(3 * d).max((0, 1)))
    np.testing.assert_allclose(stats["w"]["absmax"], expect, rtol=1e-6)


def test_quantized_prefill_decode_share_params():
    rng = np.random.default_rng()
    data = [{"prefill": (rng.standard_normal((1, 4, 16)).astype(np.float32),),
             "decode": (rng.standard_normal((1, 1, 16)).astype(np.float32),)} for _ in range(2)]
    qmod, qparams = mlc_quant.quantize(PrefillDecode, W(), data, scheme="smq_q8i8f16_1", bind=False)
    relax.analysis.well_formed(qmod)
    assert [p.name for p in qmod["prefill"].params] == [p.name for p in qmod["decode"].params] == ["x", "w.q", "w.scale"]
    assert sorted(qparams) == ["w.q", "w.scale"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(scheme="smq_q9"), "unknown quantization scheme 'smq_q9'; valid schemes: q0f32"),
    (dict(alpha=1.5), r"alpha must be in \[0, 1\]"),
    (dict(dataset=[]), "calibration dataset is empty"),
    (dict(dataset=[(np.zeros((2, 16), np.float32), np.zeros(3))]), "got 2 inputs, expected 1"),
    (dict(dataset=[(np.zeros((2, 15), np.float32),)]), r"shape \(2, 15\), expected"),
    (dict(dataset=[(np.zeros((2, 16), np.float64),)]), "dtype float64, expected float32"),
    (dict(dataset=[(np.full((2, 16), np.nan, np.float32),)]), "NaN or Inf"),
    (dict(dataset=[{"y": np.zeros((2, 16), np.float32)}]), r"missing \['x'\], unexpected \['y'\]"),
    (dict(params={"w": np.zeros((8, 16), np.float32), "bias": np.zeros(8)}), r"params \['bias'\] are not parameters"),
])
def test_bad_input_gets_clear_error(kwargs, match):
    args = dict(mod=Mod, params=W(), dataset=[(np.ones((2, 16), np.float32),)], scheme="smq_q8i8f16_1")
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        mlc_quant.quantize(**args)


def test_module_without_linears_is_an_error():
    @I.ir_module
    class NoLinear:
        @R.function
        def main(x: R.Tensor((2, 16), "float32"), w: R.Tensor((2, 16), "float32")):
            with R.dataflow():
                y = R.add(x, w)
                R.output(y)
            return y

    with pytest.raises(ValueError, match="no linear op"):
        mlc_quant.quantize(NoLinear, {"w": np.zeros((2, 16), np.float32)}, [(np.ones((2, 16), np.float32),)])


def test_calibrate_rejects_unknown_function():
    with pytest.raises(ValueError, match=r"functions \['nope'\] are not in the module"):
        mlc_quant.calibrate(Mod, W(), [(np.ones((2, 16), np.float32),)], func_names=["nope"])
