"""Layer-streamed calibration + quantization (mlc_quant/streamed.py) against the whole-model path.

Both paths calibrate the same samples. The whole-model path here prefills each sample (no decode
steps), the streamed one always prefills the full sample: then the statistics, activation scales
and quantized params must agree to float32 rounding (observed: bit-identical on the build
machine; the tolerances below allow 1-ulp differences and the int8 rounding flips they cause).
With decode steps on the whole-model side the same rows are computed by the decode kernels, which
round differently: statistics agree to 1e-5 relative.
"""
import json
import os
import shutil

import numpy as np
import pytest

from mlc_quant import artifact, pipeline, streamed
from mlc_quant.calibration import stat_names
from mlc_quant.cli import main as cli
from mlc_quant.model.llama import export_model
from mlc_quant.model.loader import load_config, load_params_dict
from mlc_quant.observers import ChannelStatsObserver
from mlc_quant.passes import CollectStats
from mlc_quant.passes.collect_stats import STAT_KINDS
from mlc_quant.runtime import Engine

from conftest import make_hf_model, save_hf_model

SCHEMES = ["smq_q8i8f16_0", "smq_q8i8f16_1", "smq_q8i8f16_2", "smq_q8i8f16_3", "q4f16_rtn"]
SEQ = 32
RTOL = 1e-6  # float32 rounding (prefill on both sides)
FLIP_FRACTION = 1e-3  # int8 entries allowed to differ (by one) where a 1-ulp scale moves a rounding


def _samples(config, n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, config.vocab_size, SEQ).astype(np.int32) for _ in range(n)]


class WholePath:
    """The whole-model path's statistics, computed once per model (all stat kinds, so one run
    serves every scheme: quantize_module reads only the kinds its scheme needs)."""

    def __init__(self, folder, decode_steps=0):
        self.config = load_config(folder)
        self.mod, _ = export_model(self.config)
        self.params = load_params_dict(folder, self.config)
        self.samples = _samples(self.config)
        self.decode_steps = decode_steps
        self._observer = None

    def calibrate(self, stats_mod, funcs):
        if self._observer is None:
            obs = ChannelStatsObserver()
            mod = CollectStats(STAT_KINDS)(pipeline.annotate(self.mod, self.params))
            names = {fn: stat_names(mod[fn]) for fn in funcs}
            engine = Engine(pipeline.build(mod, "llvm"), self.params, max_seq_len=SEQ,
                            stats_callback=lambda fn, v: obs.update_from_outputs(names[fn], v),
                            vocab_size=self.config.vocab_size)
            d = self.decode_steps
            for ids in self.samples:
                engine.reset()
                engine.prefill(ids[: len(ids) - d])
                for t in ids[len(ids) - d:]:
                    engine.decode(int(t))
            self._observer = obs
        return self._observer

    def quantize(self, scheme, keep_float=()):
        return pipeline.quantize_module(self.mod, self.params, scheme, self.calibrate, alpha=0.5,
                                        keep_float=keep_float)


@pytest.fixture(scope="module")
def whole(tiny_llama_dir):
    return WholePath(tiny_llama_dir)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny_tied"))
    return save_hf_model(make_hf_model("llama", seed=1, tie_word_embeddings=True), folder)


def assert_params_match(ref: dict, got: streamed.StreamedResult, rtol=RTOL, flips=FLIP_FRACTION):
    assert sorted(got.names()) == sorted(ref), (sorted(set(got.names()) ^ set(ref)))
    for name, a in ref.items():
        b = got.read(name)
        assert b.dtype == a.dtype and b.shape == a.shape, name
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b, a, rtol=rtol, atol=0, err_msg=name)
        elif name.endswith(".corr"):  # z_x * rowsum(wq) - K z_x z_w: moves by z_x per flipped entry of the row
            q_a, q_b = ref[name[:-5] + ".q"], got.read(name[:-5] + ".q")
            row_flips = np.abs(q_a.astype(np.int64) - q_b.astype(np.int64)).sum(axis=1)
            assert np.all(np.abs(a.astype(np.int64) - b.astype(np.int64)) <= 128 * row_flips), name
        else:
            diff = np.abs(a.astype(np.int64) - b.astype(np.int64))
            assert diff.max() <= 1 and np.mean(diff > 0) <= flips, (name, diff.max(), np.mean(diff > 0))


def assert_stats_match(ref: ChannelStatsObserver, got: ChannelStatsObserver, linears, rtol=RTOL):
    for n in linears:
        for kind, a in ref.stats(n).items():
            if kind in got.stats(n):
                np.testing.assert_allclose(got.stats(n)[kind], a, rtol=rtol, atol=0, err_msg=f"{n}:{kind}")


def assert_plan_match(ref: pipeline.IRPlan, got: pipeline.IRPlan, rtol=RTOL):
    assert sorted(got.act_qparams) == sorted(ref.act_qparams)
    for n, a in ref.act_qparams.items():
        b = got.act_qparams[n]
        assert b.zero_point == a.zero_point and b.scale == pytest.approx(a.scale, rel=rtol), n
    assert sorted(got.explicit_inv_scales) == sorted(ref.explicit_inv_scales)
    for n, a in ref.explicit_inv_scales.items():
        np.testing.assert_allclose(got.explicit_inv_scales[n], a, rtol=rtol)
    assert got.weight_names == ref.weight_names


@pytest.mark.parametrize("scheme", SCHEMES)
def test_streamed_equals_whole_model_path(whole, tiny_llama_dir, tmp_path, scheme):
    ref = whole.quantize(scheme)
    got = streamed.quantize_streamed(tiny_llama_dir, scheme, whole.samples, tmp_path / "work", alpha=0.5)
    assert_stats_match(ref.stats, got.stats, ref.stats.names())
    assert_plan_match(ref.plan, got.plan)
    assert_params_match(ref.params, got)
    assert got.summary["smoothing_groups"] == ref.summary["smoothing_groups"]
    assert got.summary["linears"] == ref.summary["linears"] == 2 * 7 + 1
    # the per-block shards replay into the same deploy module
    qmod = got.plan.apply(export_model(whole.config)[0])
    from tvm import relax  # pylint: disable=import-outside-toplevel

    relax.analysis.well_formed(qmod)  # raises on the first violation
    assert [p.name for p in qmod["prefill"].params] == [p.name for p in ref.mod["prefill"].params]


def test_streamed_tied_head_keep_float(tied_dir, tmp_path):
    """Tied embedding: the head's group is skipped (the table is also gathered), the table stays
    float beside its int8 copy; with --keep-float on a block linear that linear stays float."""
    ref_path = WholePath(tied_dir)
    keep = ("model_layers_1_mlp_down_proj_weight",)
    for scheme, kf in (("smq_q8i8f16_1", ()), ("smq_q8i8f16_2", keep)):
        ref = ref_path.quantize(scheme, keep_float=kf)
        got = streamed.quantize_streamed(tied_dir, scheme, ref_path.samples, tmp_path / scheme, keep_float=kf)
        assert_plan_match(ref.plan, got.plan)
        assert_params_match(ref.params, got)
        assert "model_embed_tokens_weight" in got.names() and "model_embed_tokens_weight.q" in got.names()
        assert ("model_layers_1_mlp_down_proj_weight" in got.names()) == bool(kf)
        assert got.summary["smoothing_groups"]["skip"] == 1


def test_streamed_with_decode_steps_close(tiny_llama_dir, tmp_path):
    """The whole-model path with decode steps: the streamed prefill computes the same rows with
    other kernels; statistics and activation scales agree to 1e-5 relative."""
    ref_path = WholePath(tiny_llama_dir, decode_steps=4)
    ref = ref_path.quantize("smq_q8i8f16_2")
    got = streamed.quantize_streamed(tiny_llama_dir, "smq_q8i8f16_2", ref_path.samples, tmp_path / "w")
    assert_stats_match(ref.stats, got.stats, ref.stats.names(), rtol=1e-5)
    assert_plan_match(ref.plan, got.plan, rtol=1e-5)
    assert_params_match(ref.params, got, rtol=1e-5, flips=1e-2)


def test_streamed_block_module_cache(whole, tiny_llama_dir, tmp_path):
    """cache_dir: the compiled one-block module is written once and reloaded; same result."""
    ref = whole.quantize("smq_q8i8f16_1")
    first = streamed.quantize_streamed(tiny_llama_dir, "smq_q8i8f16_1", whole.samples, tmp_path / "a",
                                       cache_dir=tmp_path / "cache")
    libs = sorted((tmp_path / "cache").glob("stream-block-*.so"))
    assert len(libs) == 1
    mtime = libs[0].stat().st_mtime_ns
    again = streamed.quantize_streamed(tiny_llama_dir, "smq_q8i8f16_1", whole.samples, tmp_path / "b",
                                       cache_dir=tmp_path / "cache")
    assert libs[0].stat().st_mtime_ns == mtime  # reused, not rebuilt
    for got in (first, again):
        assert_plan_match(ref.plan, got.plan)
        assert_params_match(ref.params, got)


def test_streamed_bad_input(tiny_llama_dir, tmp_path, whole):
    with pytest.raises(ValueError, match="alpha must be in"):
        streamed.quantize_streamed(tiny_llama_dir, "smq_q8i8f16_1", whole.samples, tmp_path / "a", alpha=1.5)
    with pytest.raises(ValueError, match="token ids must lie"):
        streamed.quantize_streamed(tiny_llama_dir, "smq_q8i8f16_1", [np.array([0, 9999])], tmp_path / "b")
    with pytest.raises(ValueError, match="one length"):
        streamed.quantize_streamed(tiny_llama_dir, "smq_q8i8f16_1", [np.arange(8), np.arange(9)], tmp_path / "c")
    with pytest.raises(ValueError, match="gave no sample"):
        streamed.quantize_streamed(tiny_llama_dir, "smq_q8i8f16_1", [], tmp_path / "d")
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        streamed.quantize_streamed(tiny_llama_dir, "w8a8", whole.samples, tmp_path / "e")
    with pytest.raises(ValueError, match="lack smoothing groups"):
        streamed.quantize_streamed(tiny_llama_dir, "smq_q8i8f16_1", whole.samples, tmp_path / "f", alpha={"x": 0.5})
    with pytest.raises(ValueError, match="--calibration must be one of"):
        streamed.choose_mode("fast", whole.config)
    with pytest.raises(ValueError, match="not weights of this model"):
        from mlc_quant.model.loader import load_params  # pylint: disable=import-outside-toplevel

        load_params(tiny_llama_dir, names=["model_layers_7_mlp_up_proj_weight"])


def test_choose_mode(whole):
    assert streamed.choose_mode("whole", whole.config, 1.0) == "whole"
    assert streamed.choose_mode("streamed", whole.config, 1e9) == "streamed"
    assert streamed.choose_mode("auto", whole.config, 1e9) == "whole"
    assert streamed.choose_mode("auto", whole.config, 1.0) == "streamed"  # 1 MB: nothing fits
    assert streamed.choose_mode("auto", whole.config, 1.0, reasons=["--rotation"]) == "whole"


# --------------------------------------------------------------------------- the build
@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir, tmp_path_factory):
    from test_build import byte_tokenizer  # pylint: disable=import-outside-toplevel

    folder = tmp_path_factory.mktemp("tiny-stream-tok")
    shutil.copytree(tiny_llama_dir, folder, dirs_exist_ok=True)
    byte_tokenizer(256).save_pretrained(folder)
    return str(folder)


def build(model, out, scheme, *extra):
    return cli(["build", "--model", model, "--quantization", scheme, "--max-seq-len", "64",
                "--calib-samples", "3", "--calib-seq-len", str(SEQ), "--output", str(out), *extra])


@pytest.mark.parametrize("extra", [(), ("--dtype", "float16", "--merge-linears")], ids=["fp32", "fp16-merged"])
def test_streamed_build_artifact_matches_whole(tiny_model, tmp_path, extra):
    """scripts/build.py --calibration streamed gives the whole-model build's artifact (prefill-only
    calibration on the whole side): same params, same logits."""
    from mlc_quant.runner import load_built  # pylint: disable=import-outside-toplevel

    a, b = tmp_path / "whole", tmp_path / "streamed"
    assert build(tiny_model, a, "smq_q8i8f16_2", "--calibration", "whole", "--calib-decode-steps", "0", *extra) == 0
    assert build(tiny_model, b, "smq_q8i8f16_2", "--calibration", "streamed", *extra) == 0
    ca, cb = (json.loads((d / artifact.CONFIG_FILE).read_text()) for d in (a, b))
    assert cb["calibration"]["mode"] == "streamed" and cb["quantization"]["calibration"] == "streamed"
    assert cb["params"] == ca["params"] and cb["merged_linears"] == ca["merged_linears"] and cb["dtype"] == ca["dtype"]
    pa, pb = artifact.load_safetensors(a / artifact.PARAMS_FILE), artifact.load_safetensors(b / artifact.PARAMS_FILE)
    assert list(pb) == list(pa)
    for n in pa:
        assert pb[n].dtype == pa[n].dtype and pb[n].shape == pa[n].shape, n
        if pa[n].dtype.kind == "f":
            np.testing.assert_allclose(pb[n], pa[n], rtol=RTOL if pa[n].dtype == np.float32 else 1e-3, err_msg=n)
        else:
            assert np.mean(pa[n] != pb[n]) <= FLIP_FRACTION * (100 if n.endswith(".corr") else 1), n
    prompt = [5, 17, 33, 101, 7, 250, 3, 9]
    la = load_built(a)[0].prefill(prompt).astype(np.float32)
    lb = load_built(b)[0].prefill(prompt).astype(np.float32)
    np.testing.assert_allclose(lb, la, rtol=0, atol=1e-4 * np.abs(la).max())
    assert not (b / ".stream").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_streamed_build_refuses_and_leaves_nothing(tiny_model, tmp_path):
    """Unsupported options fail before any work; a failure mid-stream leaves no output."""
    for extra in (("--rotation", "r1r2"), ("--alpha", "search"), ("--weight-rounding", "autoround")):
        out = tmp_path / f"bad{len(os.listdir(tmp_path))}"
        assert build(tiny_model, out, "smq_q8i8f16_3", "--calibration", "streamed", *extra) == 2
        assert not out.exists()
    # a checkpoint whose layer 1 lacks a tensor: layer 0 is quantized and written, then the read fails
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    tensors = dict(artifact.load_safetensors(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    artifact.save_safetensors(broken / "model.safetensors", {k: np.array(v) for k, v in tensors.items()})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight missing"):
        streamed_opts_build(str(broken), out)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def streamed_opts_build(model, out):
    from mlc_quant.build import BuildOptions, build_model  # pylint: disable=import-outside-toplevel

    return build_model(BuildOptions(model=model, quantization="smq_q8i8f16_1", output=str(out), max_seq_len=64,
                                    calib_samples=2, calib_seq_len=16, calibration="streamed"))
