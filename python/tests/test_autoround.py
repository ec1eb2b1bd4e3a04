"""AutoRound (mlc_quant/autoround.py) and the W4 weight-only schemes (mlc_quant/schemes_w4.py).

* the quantizer (torch, differentiable) against the numpy reference, values and gradients;
* SignSGD against a numpy reference;
* the torch block computes what our compiled Relax decoder layer computes (1e-5);
* on a tiny block AutoRound's loss ends below round-to-nearest's;
* per-block checkpoints: resume after an interruption, disk spill = in-memory result;
* the int4 linear in Relax, and builds through the command line (q4f16_autoround, and
  smq_q8i8f16_3 with --weight-rounding autoround).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch

import mlc_quant
from mlc_quant import autoround as ar
from mlc_quant import pipeline
from mlc_quant.model.config import LlamaConfig
from mlc_quant.schemes import get_scheme
from mlc_quant.schemes_w4 import dequantize_groups_np, pack_int4, quantize_groups_np, unpack_int4

from conftest import TINY

FORMATS = {
    "w4_g128": ar.WeightFormat(0, 15, False, 128),  # 200 columns: a padded last group
    "w4_g32": ar.WeightFormat(0, 15, False, 32),
    "w4_per_channel": ar.WeightFormat(0, 15, False, -1),
    "w8_sym": ar.WeightFormat(-127, 127, True, -1),
    "w8_asym": ar.WeightFormat(-128, 127, False, -1),
}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors: one thread (OpenMP threads waiting on a busy shared CPU cost more than they give)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**overrides) -> LlamaConfig:
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "max_position_embeddings", "rope_theta", "rms_norm_eps")
    return LlamaConfig.from_dict({**{k: TINY[k] for k in keys}, "num_hidden_layers": 1, **overrides})


def random_block_params(cfg: LlamaConfig, rng, layer: int = 0, scale: float = 0.1):
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (i, h), "up": (i, h), "down": (h, i)}
    params = {n: (rng.standard_normal(shapes[r]) * scale).astype(np.float32)
              for r, n in ar.block_linear_names(layer).items()}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        params[f"model_layers_{layer}_{norm}_weight"] = (1 + 0.3 * rng.standard_normal(h)).astype(np.float32)
    if cfg.attention_bias:
        for r, n in list(ar.block_linear_names(layer).items())[:3]:
            params[n[: -len("weight")] + "bias"] = (0.3 * rng.standard_normal(shapes[r][0])).astype(np.float32)
    return params


# ----------------------------------------------------------------------------- quantizer


def ste_reference(wg, fmt, v, mn, mx):
    """AutoRound's fake quantization written plainly (auto-round's quant_tensor_asym/sym with our
    grids): straight-through rounding, autograd does the rest."""
    lo = torch.clamp(wg.amin(-1), max=0) * mn
    hi = torch.clamp(wg.amax(-1), min=0) * mx
    if fmt.sym:
        s = torch.clamp(torch.maximum(lo.abs(), hi), min=1e-8) / fmt.qmax
        return torch.clamp(ar.round_ste(wg / s[..., None] + v), -fmt.qmax, fmt.qmax) * s[..., None]
    s64 = torch.clamp(hi.double() - lo.double(), min=1e-8) / (fmt.qmax - fmt.qmin)
    s = s64.float()
    zp = torch.clamp(ar.round_ste(fmt.qmin - lo.double() / s64), fmt.qmin, fmt.qmax).float()
    q = torch.clamp(ar.round_ste(wg / s[..., None] + v) + zp[..., None], fmt.qmin, fmt.qmax)
    return (q - zp[..., None]) * s[..., None]


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_quantizer_matches_numpy_reference(fmt, rng):
    w = rng.standard_normal((24, 200)).astype(np.float32)
    wg = ar.pad_groups_torch(torch.from_numpy(w), fmt.group_size)
    v0 = rng.uniform(-0.5, 0.5, wg.shape).astype(np.float32)
    mn0, mx0 = (rng.uniform(0.5, 1.0, wg.shape[:2]).astype(np.float32) for _ in range(2))
    # values: bit-exact with numpy quantize + dequantize
    q, s, z = fmt.quantize_np(w, v=v0, min_scale=mn0, max_scale=mx0)
    assert q.min() >= fmt.qmin and q.max() <= fmt.qmax
    ref = dequantize_groups_np(q, s, z, w.shape[1])
    grads = []
    for fn in (ar.qdq_torch, ste_reference):
        v, mn, mx = (torch.tensor(a, requires_grad=True) for a in (v0, mn0, mx0))
        out = fn(wg, fmt, v, mn, mx)
        np.testing.assert_array_equal(out.detach().reshape(w.shape[0], -1)[:, :200].numpy(), ref)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append([t.grad.numpy() for t in (v, mn, mx)])
    # gradients: the fused autograd node equals the straight-through formula
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
    assert np.abs(grads[0][0]).sum() > 0


@pytest.mark.parametrize("scheme", ["q4f16_rtn", "smq_q8i8f16_1", "smq_q8i8f16_3", "smq_q8i8f16_2", "q4i8f16_pt"])
def test_zero_offsets_are_the_schemes_round_to_nearest(scheme, rng):
    """AutoRound's starting point (v = 0, scales 1) packs into exactly the scheme's own RTN params."""
    s = get_scheme(scheme)
    w = rng.standard_normal((16, 192)).astype(np.float32)
    act = s.act_qparams({"absmax": np.full(192, 3.0, np.float32), "min": np.full(192, -2.0, np.float32),
                         "max": np.full(192, 3.0, np.float32)})
    got = ar.pack_weight(s, "w", *ar.weight_format(s).quantize_np(w), act)
    want = s.quantize_weight("w", w, act)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_allclose(got[k], want[k], rtol=1e-7, err_msg=k)


def test_groupquant_constants_match_schemes():
    """mlc_quant.groupquant (numpy only, for the GPU side) repeats two constants of mlc_quant.schemes."""
    from mlc_quant import groupquant, schemes

    assert groupquant._EPS == schemes._EPS and groupquant.INT8_MAX == schemes.INT8_MAX


def test_int4_packing_roundtrip(rng):
    q = rng.integers(0, 16, (5, 13))
    packed = pack_int4(q)
    assert packed.shape == (5, 7) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_int4(packed, 13), q)


@pytest.mark.parametrize("scheme, k", [("q4f16_rtn", 192), ("q4f16_rtn", 256), ("q4f16_rtn_pc", 96)])
def test_w4_linear_in_relax(scheme, k, rng):
    """The IR of the int4 linear (unpack, dequantize per group, float matmul) computes
    x @ dequantize(W)^T; the padded last group is cut off."""
    import tvm
    from tvm import relax
    from tvm.script import ir as I, relax as R

    n = 32

    @I.ir_module
    class Linear:
        @R.function
        def main(x: R.Tensor(("m", k), "float32"), w: R.Tensor((n, k), "float32")):
            with R.dataflow():
                y = R.matmul(x, R.permute_dims(w))
                R.output(y)
            return y

    w = rng.standard_normal((n, k)).astype(np.float32)
    qmod, qparams = mlc_quant.quantize(Linear, {"w": w}, None, scheme=scheme, smooth=False, bind=False)
    s = get_scheme(scheme)
    assert [(p.name, str(p.ty.dtype)) for p in qmod["main"].params[1:]] == [
        ("w.q", "uint8"), ("w.scale", "float32"), ("w.zp", "uint8")]
    q, sc, zp = s.quantize_groups(w)
    w_dq = dequantize_groups_np(q, sc, zp, k)
    vm = relax.VirtualMachine(pipeline.build(qmod, "llvm"), tvm.cpu())
    x = rng.standard_normal((7, k)).astype(np.float32)
    y = vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(qparams[f"w.{p}"]) for p in ("q", "scale", "zp")])
    np.testing.assert_allclose(y.numpy(), x @ w_dq.T, rtol=1e-5, atol=1e-4)
    assert np.abs(w_dq - w).max() <= sc.max() / 2 + 1e-6  # round-to-nearest: half a step


# ----------------------------------------------------------------------------- SignSGD


def test_signsgd_matches_numpy_reference(rng):
    """p -= lr_t * sign(grad), lr_t = lr * (1 - t / T) per parameter group (torch's LinearLR from
    1 to 0), as auto-round's SignSGD + LinearLR."""
    p0 = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)]
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in p0] for _ in range(4)]
    grads[1][0][0, 0] = 0.0  # sign(0) = 0: no move
    lrs, total = (0.01, 0.003), 4
    ps = [torch.tensor(p) for p in p0]
    opt = ar.SignSGD([([ps[0]], lrs[0]), ([ps[1]], lrs[1])], total)
    ref = [p.copy() for p in p0]
    for t, g in enumerate(grads):
        for p, gi in zip(ps, g):
            p.grad = torch.tensor(gi)
        opt.step()
        for i in range(2):
            ref[i] = ref[i] - np.float32(lrs[i] * (1 - t / total)) * np.sign(g[i])
        for p, r in zip(ps, ref):
            np.testing.assert_allclose(p.numpy(), r, rtol=0, atol=1e-7)
    assert opt.lr_factor() == 0.0


# ----------------------------------------------------------------------------- block vs Relax


def relax_block_outputs(cfg: LlamaConfig, params, xs: np.ndarray) -> np.ndarray:
    """Run our Relax decoder layer (model.llama.LlamaDecoderLayer + the paged KV cache's RoPE and
    attention), compiled for the CPU, on each sequence of ``xs [B, S, hidden]`` (fresh caches)."""
    import tvm
    import tvm_ffi
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache
    from tvm.target import Target

    from mlc_quant.model.llama import LlamaDecoderLayer, LlamaForCausalLM

    class RelaxBlock(nn.Module):
        def __init__(self):
            self.config, self.dtype, self.target = cfg, "float32", Target("llvm")
            self.prefill_attention = "tir"  # CPU: TVM's kernels (what LlamaForCausalLM picks on llvm)
            self.layer = LlamaDecoderLayer(cfg)

        def block(self, x, paged_kv_cache):
            return self.layer(x, paged_kv_cache, 0), paged_kv_cache

        create_paged_kv_cache = LlamaForCausalLM.create_paged_kv_cache

    m = RelaxBlock()
    kv = nn.spec.Object(object_type=PagedKVCache)
    spec = nn.spec.ModuleSpec.from_raw({
        "block": {"x": nn.spec.Tensor([1, "n", cfg.hidden_size], "float32"), "paged_kv_cache": kv,
                  "$": {"param_mode": "plain", "effect_mode": "none"}},
        "create_paged_kv_cache": {"max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
                                  "page_size": int, "$": {"param_mode": "none", "effect_mode": "none"}},
    }, m)
    mod, named = m.export_tvm(spec=spec)
    vm = tvm.runtime.vm.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())  # TVM's default lowering
    weights = [tvm.runtime.tensor(params["model_layers_0_" + name[len("layer."):].replace(".", "_")])
               for name, _ in named]
    begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
    end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
    add_seq = tvm.get_global_func("vm.builtin.kv_state_add_sequence")
    outs = []
    for x in xs:
        cache = vm["create_paged_kv_cache"](tvm_ffi.Shape([1]), tvm_ffi.Shape([128]), tvm_ffi.Shape([128]),
                                            tvm_ffi.Shape([16]))
        add_seq(cache, 0)
        begin(cache, tvm_ffi.Shape([0]), tvm_ffi.Shape([x.shape[0]]))
        outs.append(vm["block"](tvm.runtime.tensor(x[None]), cache, *weights)[0].numpy()[0])
        end(cache)
    return np.stack(outs)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


@pytest.mark.parametrize("variant", [{}, {"attention_bias": True, "rope_scaling": LLAMA3}],
                         ids=["gqa", "gqa_qkv_bias_llama3_rope"])
def test_torch_block_matches_relax_block(variant, rng):
    cfg = tiny_config(**variant)
    params = random_block_params(cfg, rng, scale=0.2)
    xs = rng.standard_normal((3, 40, cfg.hidden_size)).astype(np.float32)
    want = relax_block_outputs(cfg, params, xs)
    with torch.no_grad():
        got = ar.TorchBlock(cfg, params, 0).forward(torch.from_numpy(xs)).numpy()  # batched
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


# ----------------------------------------------------------------------------- tuning


def test_autoround_loss_ends_below_rtn_on_a_tiny_block(rng):
    cfg = tiny_config()
    params = random_block_params(cfg, rng)
    block = ar.TorchBlock(cfg, params, 0)
    inputs = ar.ActStore((16, 32, cfg.hidden_size))
    inputs.array[:] = rng.standard_normal(inputs.shape)
    targets = ar.ActStore(inputs.shape)
    ar._forward_store(block, inputs, targets, 8)
    fmt = FORMATS["w4_g32"]
    preset = ar.get_preset("fast", iters=80, batch_size=4)
    result, stats = ar.tune_block(block, inputs, targets, fmt, preset, seed=0)
    ks = {r: block.weights[r].shape[1] for r in block.names}

    def mse(qres):
        w = {r: ar._dequant_torch(*qres[n], ks[r], "cpu") for r, n in block.names.items()}
        return ar._forward_store(block, inputs, None, 8, w, True, targets)

    rtn = {n: fmt.quantize_np(params[n]) for n in block.names.values()}
    loss_rtn, loss_ar = mse(rtn), mse(result)
    assert stats["best_iter"] > 0 and stats["best_batch_loss"] < stats["first_batch_loss_rtn"]
    assert loss_ar < 0.8 * loss_rtn, (loss_ar, loss_rtn)
    for n, (q, s, z) in result.items():  # still on the grid, and not simply RTN
        assert q.min() >= 0 and q.max() <= 15 and s.shape == z.shape
    assert any(not np.array_equal(result[n][0], rtn[n][0]) for n in result)


@pytest.fixture(scope="module")
def tiny_params(tiny_llama_dir):
    from mlc_quant.model.loader import load_config, load_params_dict

    cfg = load_config(tiny_llama_dir)
    return cfg, load_params_dict(tiny_llama_dir, cfg, "float32")


def test_resume_after_interruption_and_disk_spill(tiny_params, tmp_path, monkeypatch):
    cfg, params = tiny_params
    rng = np.random.default_rng(1)
    samples = [rng.integers(0, cfg.vocab_size, 24) for _ in range(6)]
    fmt = FORMATS["w4_g32"]
    preset = ar.get_preset("fast", iters=6, nsamples=6, seqlen=24, batch_size=4)
    # In memory, fresh directory: the reference result.
    want = ar.run_autoround(cfg, params, samples, fmt, preset, tmp_path / "a", keep_checkpoints=False)
    assert not list((tmp_path / "a").iterdir())
    # Spilled to disk (tiny budget), interrupted while tuning block 1.
    spill = dataclasses.replace(preset, memory_budget_mb=1e-3)
    real_tune = ar.tune_block

    def failing(block, *args, **kwargs):
        if block.layer == 1:
            raise KeyboardInterrupt
        return real_tune(block, *args, **kwargs)

    monkeypatch.setattr(ar, "tune_block", failing)
    with pytest.raises(KeyboardInterrupt):
        ar.run_autoround(cfg, params, samples, fmt, spill, tmp_path / "b")
    (ckdir,) = (tmp_path / "b").iterdir()
    assert sorted(p.name for p in ckdir.iterdir()) == ["block_000.npz"]  # no activation file left
    monkeypatch.setattr(ar, "tune_block", real_tune)
    report: dict = {}
    got = ar.run_autoround(cfg, params, samples, fmt, spill, tmp_path / "b", report=report)
    assert report["spilled"] and [b.get("resumed", False) for b in report["blocks"]] == [True, False]
    assert sorted(p.name for p in ckdir.iterdir()) == ["block_000.npz", "block_001.npz"]
    assert sorted(got) == sorted(want)
    for name in want:
        for a, b in zip(got[name], want[name]):
            np.testing.assert_array_equal(a, b)
    # Every block checkpointed (as scripts/autoround_gpu.py leaves it after a GPU run): the
    # checkpoints are used as they are, without a single forward pass.
    monkeypatch.setattr(ar, "_forward_store", lambda *a, **k: pytest.fail("forward pass on a finished run"))
    report = {}
    again = ar.run_autoround(cfg, params, samples, fmt, spill, tmp_path / "b", report=report)
    monkeypatch.undo()
    assert [b["resumed"] for b in report["blocks"]] == [True, True] and report["fingerprint"] == ckdir.name
    for name in want:
        for a, b in zip(again[name], want[name]):
            np.testing.assert_array_equal(a, b)
    # Other settings -> another fingerprint, nothing reused.
    report = {}
    ar.run_autoround(cfg, params, samples, fmt, dataclasses.replace(preset, iters=3), tmp_path / "b", report=report)
    assert not any(b.get("resumed") for b in report["blocks"])


def test_smq_per_token_with_autoround_weights(tiny_params, tmp_path):
    """SmoothQuant then AutoRound: smoothed float params in, int8 per-channel params out, in the
    scheme's layout; the LM head (outside the blocks) keeps round-to-nearest."""
    from mlc_quant.model.llama import export_model
    from mlc_quant.observers import ChannelStatsObserver

    cfg, params = tiny_params
    rng = np.random.default_rng(2)
    samples = [rng.integers(0, cfg.vocab_size, 32) for _ in range(4)]
    mod, _ = export_model(cfg)

    def calibrate(stats_mod, funcs):  # synthetic per-channel stats (the same each call): smoothing matters here
        obs, rng = ChannelStatsObserver(), np.random.default_rng(3)
        for f in funcs:
            names = [s.split(":")[0] for s in stats_mod[f].attrs["mlc_quant.stats"]]
            obs.update_from_outputs(list(stats_mod[f].attrs["mlc_quant.stats"]),
                                    [np.abs(rng.standard_normal(params[n].shape[1])).astype(np.float32) + 0.1
                                     for n in names])
        return obs

    quantizer = ar.make_autoround_quantizer(cfg, samples, ar.get_preset("fast", iters=5, nsamples=4, seqlen=32),
                                            tmp_path)
    kw = dict(calibrate=calibrate, alpha=0.5, smooth=True)
    rtn = pipeline.quantize_module(mod, params, "smq_q8i8f16_3", **kw)
    res = pipeline.quantize_module(mod, params, "smq_q8i8f16_3", quantize_weights=quantizer, **kw)
    assert sorted(res.params) == sorted(rtn.params)
    for k, v in rtn.params.items():
        assert res.params[k].dtype == v.dtype and res.params[k].shape == v.shape, k
    assert np.array_equal(res.params["lm_head_weight.q"], rtn.params["lm_head_weight.q"])
    changed = [k for k in rtn.params if k.endswith(".q") and not np.array_equal(res.params[k], rtn.params[k])]
    assert changed and all(k.startswith("model_layers_") for k in changed)
    assert [b["mse_autoround"] <= b["mse_rtn"] * 1.05 for b in quantizer.report["blocks"]]
    assert not list(tmp_path.iterdir())  # checkpoints removed after success


# ----------------------------------------------------------------------------- build


@pytest.fixture(scope="module")
def tiny_model_with_tokenizer(tiny_llama_dir, tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-ar")
    shutil.copytree(tiny_llama_dir, folder, dirs_exist_ok=True)
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    return str(folder)


def test_build_q4f16_autoround_fast_preset(tiny_model_with_tokenizer, tmp_path, monkeypatch, capsys):
    from mlc_quant import artifact
    from mlc_quant.cli import main as cli

    monkeypatch.setenv("MLC_QUANT_AUTOROUND_DIR", str(tmp_path / "work"))
    monkeypatch.setitem(ar.PRESETS, "fast", dataclasses.replace(ar.PRESETS["fast"], iters=8, nsamples=4, seqlen=64))
    out = tmp_path / "w4"
    assert cli(["build", "--model", tiny_model_with_tokenizer, "--quantization", "q4f16_autoround",
                "--autoround-preset", "fast", "--max-seq-len", "128", "--calib-seq-len", "32", "--output", str(out)]) == 0
    cfg = json.loads((out / artifact.CONFIG_FILE).read_text())
    assert cfg["quantization"]["weight_rounding"] == "autoround"
    assert cfg["quantization"]["autoround"]["preset"] == "fast"
    assert len(cfg["quantization"]["autoround"]["blocks"]) == 2
    params = artifact.load_safetensors(out / artifact.PARAMS_FILE)
    assert params["model_layers_0_mlp_down_proj_weight.q"].dtype == np.uint8
    assert params["model_layers_0_mlp_down_proj_weight.q"].shape == (64, 64)  # [N, 128 / 2]
    assert params["lm_head_weight.q"].dtype == np.int8 and params["lm_head_weight.scale"].shape == (256, 1)
    assert cli(["ppl", str(out), "--text", "britannica", "--ctx", "64", "--max-windows", "2"]) == 0
    ppl = float(capsys.readouterr().out.strip().splitlines()[-1].split("perplexity:")[1])
    assert np.isfinite(ppl) and ppl > 1
    assert not os.listdir(tmp_path / "work")  # checkpoints go once the build succeeded
