"""--weight-clip mse: the per-channel MSE-optimal clip ratio of RTN weights, against an independent
numpy reference on fresh random data, through the pipeline (well-formed IR, exact int8 GEMM) and
as a build option with clear errors."""
import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from conftest import build_cpu
from mlc_quant import pipeline
from mlc_quant.schemes import CLIP_GRID, get_scheme, mse_clip_ratios

QMAX = 127


def ref_sym_error(w, amax, qmax=QMAX):
    """Squared error per row of symmetric RTN with range +-amax per row (float64 throughout)."""
    w = w.astype(np.float64)
    s = np.maximum(amax, 1e-8)[:, None] / qmax
    return (((np.clip(np.round(w / s), -qmax, qmax) * s) - w) ** 2).sum(1)


def ref_best_ratios(w, qmax=QMAX):
    """Brute force, one row and one ratio at a time: the best error of the grid per row."""
    best = np.full(w.shape[0], np.inf)
    amax = np.abs(w.astype(np.float64)).max(1)
    for r in CLIP_GRID:
        best = np.minimum(best, ref_sym_error(w, amax * r, qmax))
    return best


def heavy_tailed(rng, n, k):
    w = rng.standard_t(df=3, size=(n, k)).astype(np.float32) * 0.02
    w[rng.integers(0, n, 5), rng.integers(0, k, 5)] *= 30.0  # a few outliers
    return w


def dequant(params, name="w"):
    return params[f"{name}.q"].astype(np.float64) * params[f"{name}.scale"].astype(np.float64).reshape(-1, 1)


@pytest.mark.parametrize("scheme_name", ["smq_q8i8f16_3", "q4i8f16_pt"])
def test_mse_clip_beats_absmax_and_matches_the_reference(scheme_name):
    rng = np.random.default_rng(1234)
    w = heavy_tailed(rng, 96, 200)
    w[7] = 0.0  # an all-zero row
    scheme = get_scheme(scheme_name)
    qmax = scheme.w_qmax
    plain = scheme.quantize_weight("w", w, None)
    clipped = scheme.quantize_weight("w", w, None, clip="mse")
    err_plain = ((dequant(plain) - w) ** 2).sum(1)
    err_mse = ((dequant(clipped) - w) ** 2).sum(1)
    # never worse than absmax, per channel, and the grid's best by an independent brute force
    assert np.all(err_mse <= err_plain * (1 + 1e-6) + 1e-30)
    np.testing.assert_allclose(err_mse, ref_best_ratios(w, qmax), rtol=1e-4, atol=1e-30)
    assert err_mse.sum() < err_plain.sum()  # some channels do clip
    # the all-zero row: finite scale, zero codes
    assert np.all(np.isfinite(clipped["w.scale"])) and np.all(clipped["w.q"][7] == 0)
    assert clipped["w.q"].dtype == np.int8 and np.abs(clipped["w.q"]).max() <= qmax
    # ratios are grid values; absmax's scale is the ratio-1 scale
    r = mse_clip_ratios(w, True, qmax)
    assert set(np.round(r, 2)) <= set(CLIP_GRID) and r[7] == 1.0
    np.testing.assert_allclose(clipped["w.scale"], plain["w.scale"] * r, rtol=1e-6)


def test_mse_clip_gaussian_rows_clip_a_little():
    """Gaussian rows of 576 (a rotated weight): the optimum is inside the range, not at absmax."""
    w = np.random.default_rng(7).standard_normal((64, 576)).astype(np.float32)
    r = mse_clip_ratios(w, True, QMAX)
    assert 0.6 < r.mean() < 1.0


@pytest.mark.parametrize("scheme_name", ["smq_q8i8f16_0", "smq_q8i8f16_2"])
def test_mse_clip_per_tensor_and_asym(scheme_name):
    rng = np.random.default_rng(99)
    w = heavy_tailed(rng, 48, 64)
    scheme = get_scheme(scheme_name)

    def deq(p):
        q = p["w.q"].astype(np.float64)
        zp = p.get("w.zp")
        if zp is not None:
            q = q - zp.astype(np.float64)[:, None]
        return q * p["w.scale"].astype(np.float64).reshape(-1, 1) if p["w.scale"].ndim else q * float(p["w.scale"])

    e_plain = ((deq(scheme.quantize_weight("w", w, None)) - w) ** 2).sum()
    e_mse = ((deq(scheme.quantize_weight("w", w, None, clip="mse")) - w) ** 2).sum()
    assert e_mse <= e_plain * (1 + 1e-6)
    if scheme.weight == "per_channel_asym":  # asym: the corr term stays consistent with the codes
        p = scheme.quantize_weight("w", w, None, clip="mse")
        assert np.all(p["w.corr"] == 0)  # no activation zero point given


def test_bad_clip_values_are_clear_errors():
    scheme = get_scheme("smq_q8i8f16_3")
    with pytest.raises(ValueError, match="unknown weight clip"):
        scheme.quantize_weight("w", np.ones((2, 4), np.float32), None, clip="percentile")
    with pytest.raises(ValueError, match="unknown weight clip"):
        pipeline.make_rtn_weights("max")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        mse_clip_ratios(np.ones((2, 4), np.float32), grid=(1.0, 0.0))
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        mse_clip_ratios(np.ones(4, np.float32))


def test_pipeline_with_mse_clip_is_well_formed_and_exact():
    """A clipped W8A8 linear built by the pipeline computes what numpy says it should."""

    @I.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((8, 64), "float32"), w: R.Tensor((32, 64), "float32")) -> R.Tensor((8, 32), "float32"):
            with R.dataflow():
                y = R.matmul(x, R.permute_dims(w))
                R.output(y)
            return y

    rng = np.random.default_rng(5)
    w = heavy_tailed(rng, 32, 64)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    scheme = get_scheme("smq_q8i8f16_3")
    res = pipeline.quantize_module(Mod, {"w": w}, scheme, calibrate=None, smooth=False,
                                   quantize_weights=pipeline.make_rtn_weights("mse"))
    relax.analysis.well_formed(res.mod)
    assert np.array_equal(res.params["w.q"], scheme.quantize_weight("w", w, None, clip="mse")["w.q"])
    mod = pipeline.bind_params(res.mod, {k: v for k, v in res.params.items() if k != "x"})
    relax.analysis.well_formed(mod)
    vm = relax.VirtualMachine(build_cpu(mod), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    # numpy reference: per-token int8 activations times the clipped int8 weights
    s = np.maximum(np.abs(x).max(1, keepdims=True) / 127, 1e-8)
    xq = np.clip(np.round(x / s), -127, 127)
    ref = (xq @ res.params["w.q"].astype(np.float32).T) * s * res.params["w.scale"][None, :]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, x @ w.T, rtol=0, atol=0.05 * np.abs(x @ w.T).max())


def test_build_option_errors():
    from mlc_quant.build import _rtn_quantizer

    assert _rtn_quantizer(get_scheme("smq_q8i8f16_3"), "absmax", "rtn") is pipeline.rtn_weights
    with pytest.raises(ValueError, match="unknown weight clip"):
        _rtn_quantizer(get_scheme("smq_q8i8f16_3"), "p99", "rtn")
    with pytest.raises(ValueError, match="W8A8/W4A8/W4A4"):
        _rtn_quantizer(get_scheme("q4f16_rtn"), "mse", "rtn")
    with pytest.raises(ValueError, match="W8A8/W4A8/W4A4"):
        _rtn_quantizer(get_scheme("q0f32"), "mse", "rtn")
    with pytest.raises(ValueError, match="rounding rtn"):
        _rtn_quantizer(get_scheme("smq_q8i8f16_3"), "mse", "autoround")


def test_build_flag_on_a_rotated_tiny_llama(tiny_llama_dir, tmp_path, capsys):
    """--weight-clip mse through the CLI on a rotated model: recorded in the config, perplexity near
    the float build's; bad values are clear errors."""
    import json
    import shutil

    from test_build import byte_tokenizer

    from mlc_quant import artifact
    from mlc_quant.cli import main as cli

    model = tmp_path / "tiny"
    shutil.copytree(tiny_llama_dir, model)
    byte_tokenizer(256).save_pretrained(model)
    ppl = {}
    for scheme, clip in [("q0f32", "absmax"), ("smq_q8i8f16_3", "mse")]:
        out = tmp_path / f"{scheme}-{clip}"
        args = ["build", "--model", str(model), "--quantization", scheme, "--max-seq-len", "128", "--no-smooth",
                "--rotation", "r1r2r4", "--output", str(out), "--calib-seq-len", "32"]
        assert cli(args + (["--weight-clip", clip] if clip != "absmax" else [])) == 0
        cfg = json.loads((out / artifact.CONFIG_FILE).read_text())
        assert cfg["quantization"].get("weight_clip", "absmax") == clip
        capsys.readouterr()
        assert cli(["ppl", str(out), "--text", "britannica", "--ctx", "64", "--max-windows", "2"]) == 0
        ppl[scheme] = float(capsys.readouterr().out.strip().splitlines()[-1].split("perplexity:")[1])
    assert abs(ppl["smq_q8i8f16_3"] / ppl["q0f32"] - 1) < 0.05
    with pytest.raises(SystemExit):  # argparse choices
        cli(["build", "--model", str(model), "--weight-clip", "p99", "--output", str(tmp_path / "x")])
    capsys.readouterr()
    assert cli(["build", "--model", str(model), "--quantization", "q4f16_rtn", "--weight-clip", "mse",
                "--output", str(tmp_path / "y")]) == 2
    assert "W8A8/W4A8/W4A4" in capsys.readouterr().err and not (tmp_path / "y").exists()
