"""Tensor-parallel sharding (issue #9, CPU part): the sharded math equals the unsharded model.

- single linears, every scheme: column-parallel (concat) and row-parallel (sum of partials, the
  asymmetric correction split by K, per-token absmax all-reduced) vs the unsharded integer math;
- a whole decoder block of the tiny GQA Llama in numpy (attention split by whole heads, MLP split
  by the intermediate width, explicit smoothing of o_proj split with K);
- the Relax build of the tiny model: one shard module (H/N heads, I/N MLP width, all-reduce after
  o/down) run on 2 threads with a host all-reduce (no CPU CCL in the TVM wheel, see below) vs the
  unsharded build;
- plan errors (KV heads not divisible) and the sharding record.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from mlc_quant import sharding
from mlc_quant.schemes import ActQParams, get_scheme

SCHEMES = ["q0f32", "smq_q8i8f16_0", "smq_q8i8f16_1", "smq_q8i8f16_2", "smq_q8i8f16_3"]
TOL = 1e-5


def _act(scheme, scale=0.03, zp=-5):
    if scheme.act == "per_tensor_asym":
        return ActQParams(scale, zp)
    return ActQParams(scale) if scheme.static_activations else None


def _quantize(scheme, name, w, act, bias=None):
    p = scheme.quantize_weight(name, w, act) if scheme.quantizes else {name: w}
    if bias is not None:
        p[name[: -len("weight")] + "bias"] = bias
    return p


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


# ----------------------------------------------------------------------------- single linears


@pytest.mark.parametrize("scheme_name", SCHEMES)
@pytest.mark.parametrize("shards", [2, 4])
def test_linear_split_matches_unsharded(scheme_name, shards, rng):
    scheme = get_scheme(scheme_name)
    name = "layer_proj_weight"
    w = rng.normal(size=(64, 96)).astype(np.float32)
    w[3] *= 20  # an outlier row / column so per-channel scales differ
    w[:, 5] *= 10
    bias = rng.normal(size=64).astype(np.float32)
    act = _act(scheme)
    p = _quantize(scheme, name, w, act, bias)
    x = (rng.normal(size=(7, 96)) + 0.4).astype(np.float32)
    x[:, 40] *= 8  # an activation outlier channel (sits in one shard's K slice)
    ref = sharding.linear_int(scheme, name, p, x, act)

    # the integer reference agrees with the scheme's fake-quant simulation
    from mlc_quant.fakequant import dequantize_weight, quantize_act

    if scheme.quantizes:
        fq = quantize_act(scheme, x, act) @ dequantize_weight(scheme, name, p, 96, act).T + bias
        assert _rel(ref, fq) < 1e-4

    col = sharding.split_linear(scheme, name, p, "column", shards, act)
    y_col = np.concatenate([sharding.linear_int(scheme, name, pi, x, act) for pi in col], axis=-1)
    assert _rel(y_col, ref) < TOL

    row = sharding.split_linear(scheme, name, p, "row", shards, act)
    y_row = sharding.row_parallel_int(scheme, name, row, np.split(x, shards, axis=-1), act)
    assert _rel(y_row, ref) < TOL
    if scheme.weight == "per_channel_asym":
        # the row-parallel correction is split so the int32 partials sum to the unsharded one
        corr = sum(pi[f"{name}.corr"].astype(np.int64) for pi in row)
        assert np.array_equal(corr, p[f"{name}.corr"].astype(np.int64))
        # it is recoverable without the qparams too
        row2 = sharding.split_linear(scheme, name, p, "row", shards, None)
        for a, b in zip(row, row2):
            assert np.array_equal(a[f"{name}.corr"], b[f"{name}.corr"])
    # the bias is added once: shard 0 only
    assert np.array_equal(row[0][name[:-6] + "bias"], bias) and not row[1][name[:-6] + "bias"].any()


def test_per_token_local_amax_would_differ(rng):
    """Why the row-parallel per-token absmax is all-reduced: per-shard scales change the math."""
    scheme = get_scheme("smq_q8i8f16_3")
    name = "w"
    w = rng.normal(size=(32, 64)).astype(np.float32)
    p = _quantize(scheme, name, w, None)
    x = rng.normal(size=(5, 64)).astype(np.float32)
    x[:, 3] *= 30
    ref = sharding.linear_int(scheme, name, p, x)
    row = sharding.split_linear(scheme, name, p, "row", 2)
    local = sum(sharding.linear_int(scheme, name, pi, xi) for pi, xi in zip(row, np.split(x, 2, -1)))
    assert _rel(local, ref) > 1e-4
    assert _rel(sharding.row_parallel_int(scheme, name, row, np.split(x, 2, -1)), ref) < TOL


# ----------------------------------------------------------------------------- plan


def test_plan_and_errors(tiny_llama_dir):
    from mlc_quant.model.loader import load_config, load_params_dict

    cfg = load_config(tiny_llama_dir)
    names = list(load_params_dict(tiny_llama_dir, cfg))
    plan = sharding.resolve_plan(cfg, names, 2)
    assert plan.kind("model_layers_0_self_attn_q_proj_weight") == "column"
    assert plan.kind("model_layers_1_mlp_down_proj_weight") == "row"
    assert plan.kind("lm_head_weight") is None and plan.kind("model_embed_tokens_weight") is None
    assert len(plan.linears) == 7 * cfg.num_hidden_layers
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not a multiple of 4"):
        sharding.resolve_plan(cfg, names, 4)  # 2 KV heads (GQA) cannot split 4 ways
    with pytest.raises(ValueError, match=">= 1"):
        sharding.resolve_plan(cfg, names, 0)
    assert sharding.resolve_plan(cfg, names, 1).linears == {}
    assert sharding.valid_shard_counts(cfg) == [1, 2]
    scfg = sharding.shard_config(cfg, 2)
    assert (scfg.num_attention_heads, scfg.num_key_value_heads, scfg.intermediate_size, scfg.head_dim) == \
        (2, 1, 64, cfg.head_dim)


def test_params_transform_and_record(tiny_llama_dir):
    from mlc_quant.model.loader import load_config, load_params_dict

    cfg = load_config(tiny_llama_dir)
    params = load_params_dict(tiny_llama_dir, cfg)
    scheme = get_scheme("smq_q8i8f16_2")
    plan = sharding.resolve_plan(cfg, list(params), 2)
    act = {n: _act(scheme) for n in plan.linears}
    qparams = {}
    for k, v in params.items():
        if k in plan.linears:
            qparams.update(scheme.quantize_weight(k, v, act[k]))
        else:
            qparams[k] = v
    shards = sharding.shard_params(qparams, plan, scheme, act)
    assert [list(s) for s in shards] == [list(qparams)] * 2  # same keys, same order
    q, o = "model_layers_0_self_attn_q_proj_weight", "model_layers_0_self_attn_o_proj_weight"
    assert shards[0][f"{q}.q"].shape == (cfg.num_attention_heads * cfg.head_dim // 2, cfg.hidden_size)
    assert shards[1][f"{q}.scale"].shape == (cfg.num_attention_heads * cfg.head_dim // 2,)
    assert shards[0][f"{o}.q"].shape == (cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim // 2)
    assert shards[0][f"{o}.scale"] is qparams[f"{o}.scale"]  # replicated
    rec = sharding.sharding_record(qparams, plan, scheme)
    split = rec["param_split"]
    assert rec["shards"] == 2 and split[f"{q}.q"] == "0" and split[f"{q}.corr"] == "0"
    assert split[f"{o}.q"] == "1" and split[f"{o}.corr"] == "recomputed" and split[f"{o}.zp"] == "replicated"
    assert split["model_embed_tokens_weight"] == "replicated" and split["lm_head_weight"] == "replicated"
    assert rec["attention"] == {"num_heads_per_shard": 2, "num_kv_heads_per_shard": 1, "head_dim": cfg.head_dim}
    rec0 = sharding.sharding_record(qparams, sharding.resolve_plan(cfg, list(params), 1), scheme)
    assert set(rec0["param_split"].values()) == {"replicated"}


# ----------------------------------------------------------------------------- decoder block (numpy)


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, theta):  # x [S, heads, d], HF's rotate_half convention (RopeMode.NORMAL)
    s, _, d = x.shape
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = np.arange(s)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    return (x * cos + rot * sin).astype(np.float32)


def _attention(q, k, v):  # causal GQA, q [S, H, d], k/v [S, KV, d]
    s, h, d = q.shape
    g = h // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    logits = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
    logits = np.where(np.tril(np.ones((s, s), bool))[None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", p, v).reshape(s, h * d).astype(np.float32)


def _block(scheme, shard_ps, x, cfg, layer, acts, inv_o):
    """One decoder layer on len(shard_ps) shards: column-parallel q/k/v/gate/up per shard,
    attention on the shard's heads, row-parallel o/down summed (per-token absmax all-reduced)."""
    n = len(shard_ps)
    pre = f"model_layers_{layer}_"
    nm = {r: f"{pre}self_attn_{r}_proj_weight" for r in "qkvo"}
    nm.update({r: f"{pre}mlp_{r}_proj_weight" for r in ("gate", "up", "down")})
    d = cfg.head_dim
    lin = sharding.linear_int
    attn_parts = []
    for p in shard_ps:
        h = _rms(x, p[pre + "input_layernorm_weight"], cfg.rms_norm_eps)
        q = lin(scheme, nm["q"], p, h, acts[nm["q"]]).reshape(len(x), -1, d)
        k = lin(scheme, nm["k"], p, h, acts[nm["k"]]).reshape(len(x), -1, d)
        v = lin(scheme, nm["v"], p, h, acts[nm["v"]]).reshape(len(x), -1, d)
        attn_parts.append(_attention(_rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta), v))
    attn_parts = [a * s for a, s in zip(attn_parts, np.split(inv_o, n))]  # explicit smoothing, split by K
    x = x + sharding.row_parallel_int(scheme, nm["o"], shard_ps, attn_parts, acts[nm["o"]])
    mlp_parts = []
    for p in shard_ps:
        h = _rms(x, p[pre + "post_attention_layernorm_weight"], cfg.rms_norm_eps)
        g = lin(scheme, nm["gate"], p, h, acts[nm["gate"]])
        u = lin(scheme, nm["up"], p, h, acts[nm["up"]])
        mlp_parts.append((g / (1 + np.exp(-g)) * u).astype(np.float32))
    return x + sharding.row_parallel_int(scheme, nm["down"], shard_ps, mlp_parts, acts[nm["down"]])


@pytest.mark.parametrize("scheme_name", SCHEMES)
def test_decoder_block_sharded_matches_unsharded(scheme_name, tiny_llama_dir, rng):
    from mlc_quant.model.loader import load_config, load_params_dict

    scheme = get_scheme(scheme_name)
    cfg = load_config(tiny_llama_dir)
    params = load_params_dict(tiny_llama_dir, cfg)
    plan = sharding.resolve_plan(cfg, list(params), 2)
    acts = {n: _act(scheme, 0.02, -3) for n in plan.linears}
    qparams = {}
    for k, v in params.items():
        qparams.update(_quantize(scheme, k, v, acts[k]) if k in plan.linears and scheme.quantizes else {k: v})
    shards = sharding.shard_params(qparams, plan, scheme, acts)
    inv_o = rng.uniform(0.5, 2.0, size=cfg.num_attention_heads * cfg.head_dim).astype(np.float32)
    x = rng.normal(size=(9, cfg.hidden_size)).astype(np.float32)
    for layer in range(cfg.num_hidden_layers):
        ref = _block(scheme, [qparams], x, cfg, layer, acts, inv_o)
        out = _block(scheme, shards, x, cfg, layer, acts, inv_o)
        assert _rel(out, ref) < TOL, (scheme_name, layer)
        x = ref


# ----------------------------------------------------------------------------- Relax, tiny model


class HostCCL:
    """All-reduce between shard VMs running on host threads (what Disco's CCL does across GPUs).

    TVM 0.27's wheel has Disco sessions (ThreadedSession/ProcessSession) but registers no CPU
    CCL (``runtime.disco.<ccl>.init_ccl`` exists only for nccl/rccl builds), so on CPU the
    all-reduce is a packed function that sums (or maxes) over the shard threads.
    """

    def __init__(self, shards: int):
        import tvm

        self.shards = shards
        self.barrier = threading.Barrier(shards)
        self.slots = [None] * shards
        self.local = threading.local()
        for op in ("sum", "max"):
            tvm.register_global_func(f"mlc_quant.test.host_allreduce_{op}", self._make(op), override=True)

    def _make(self, op):
        def allreduce(x, out):
            rank = self.local.rank
            self.slots[rank] = x.numpy()
            self.barrier.wait()
            red = np.sum(self.slots, axis=0) if op == "sum" else np.max(self.slots, axis=0)
            red = red.astype(self.slots[rank].dtype)  # a left-to-right sum, the same on every rank
            self.barrier.wait()
            out.copyfrom(red)

        return allreduce

    @staticmethod
    def reduce(op):
        from tvm import relax

        return lambda x: relax.call_dps_packed(f"mlc_quant.test.host_allreduce_{op}", [x], x.ty)

    def run(self, fns):
        """fns[i]() on thread i with rank i; their results."""
        results, errors = [None] * self.shards, []

        def work(i):
            self.local.rank = i
            try:
                results[i] = fns[i]()
            except Exception as err:  # pylint: disable=broad-except
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=work, args=(i,)) for i in range(self.shards)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


@pytest.mark.parametrize("scheme_name", ["smq_q8i8f16_2", "smq_q8i8f16_3"])
def test_relax_tiny_model_sharded_matches_unsharded(scheme_name, tiny_llama_dir, rng):
    from conftest import build_cpu

    from mlc_quant import pipeline
    from mlc_quant.model.llama import export_model
    from mlc_quant.model.loader import load_config, load_params_dict
    from mlc_quant.passes import module_linears
    from mlc_quant.runtime import Engine

    scheme = get_scheme(scheme_name)
    cfg = load_config(tiny_llama_dir)
    params = load_params_dict(tiny_llama_dir, cfg)
    mod, _ = export_model(cfg, "float32", "llvm")
    sites = {s.name: s for ss in module_linears(pipeline.annotate(mod, params)).values() for s in ss}
    o_names = [n for n in sites if "o_proj" in n]
    ir = pipeline.IRPlan(scheme, list(params))
    ir.act_qparams = {n: _act(scheme, 0.02, -3) for n in sites} if scheme.static_activations else {}
    # explicit smoothing: o_proj (row-parallel: lifted into per-shard params) and q_proj (column: constant)
    ir.explicit_inv_scales = {n: rng.uniform(0.5, 2.0, size=sites[n].in_features).astype(np.float32)
                              for n in o_names + ["model_layers_0_self_attn_q_proj_weight"]}
    qparams = dict(params)
    qparams.update(pipeline.rtn_weights(params, sites, ir))
    qmod = ir.apply(mod)
    used = [p.name for p in qmod["prefill"].params[2:]]
    ids = rng.integers(3, cfg.vocab_size, size=12)
    ref_engine = Engine(build_cpu(qmod), {k: qparams[k] for k in used}, max_seq_len=64)
    ref = ref_engine.prefill(ids)

    plan = sharding.resolve_plan(cfg, list(params), 2)
    ccl = HostCCL(2)
    smod, _ = export_model(sharding.shard_config(cfg, 2), "float32", "llvm")
    smod, extra = sharding.shard_module(smod, ir, plan, ccl.reduce("sum"), ccl.reduce("max"))
    shard_ps = sharding.shard_params(qparams, plan, scheme, ir.act_qparams)
    for p, e in zip(shard_ps, extra):
        p.update(e)
    assert all(f"{n}.inv_smooth" in shard_ps[0] for n in o_names)
    text = smod["prefill"].script()
    assert text.count("host_allreduce_sum") == 2 * cfg.num_hidden_layers  # after o_proj and down_proj
    assert text.count("host_allreduce_max") == (2 * cfg.num_hidden_layers if scheme.act == "per_token_sym" else 0)
    exe = build_cpu(smod)
    engines = [Engine(exe, p, max_seq_len=64) for p in shard_ps]
    outs = ccl.run([lambda e=e: e.prefill(ids) for e in engines])
    for out in outs:
        assert _rel(out, ref) < TOL
    # decode one more token too (the KV caches of both shards hold their own heads)
    tok = int(np.argmax(ref[-1]))
    want = ref_engine.decode(tok)
    got = ccl.run([lambda e=e: e.decode(tok) for e in engines])
    assert _rel(got[0], want) < TOL and np.argmax(got[1]) == np.argmax(want)


# ----------------------------------------------------------------------------- build integration


def test_build_refuses_what_cannot_run(tiny_llama_dir, tmp_path):
    import tvm

    from mlc_quant import cli, rotation
    from mlc_quant.model.loader import load_config

    cfg = load_config(tiny_llama_dir)
    llvm, cuda = tvm.target.Target("llvm"), tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    assert sharding.check_build(cfg, 1, llvm) is None  # N=1: unchanged
    with pytest.raises(ValueError, match="no CPU collective"):
        sharding.check_build(cfg, 2, llvm)
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not a multiple of 4"):
        sharding.check_build(cfg, 4, cuda)
    with pytest.raises(ValueError, match="online R4"):
        sharding.check_build(cfg, 2, cuda, rotation.Rotation("r1r2r4", "hadamard", 0))
    assert sharding.check_build(cfg, 2, cuda, rotation.Rotation("r1r2", "hadamard", 0)).shards == 2
    # the command line fails before any heavy work, with the reason
    rc = cli.main(["build", "--model", tiny_llama_dir, "--tensor-parallel-shards", "2", "--output",
                   str(tmp_path / "out")])
    assert rc == 2 and not (tmp_path / "out").exists()


def test_deploy_shards_compiles_and_saves(tiny_llama_dir, tmp_path):
    """The artifact side of a 2-shard build: the shard module (with Disco's ccl.allreduce) compiles,
    the per-shard params match its parameters, params-shard{i}.safetensors and the record."""
    from conftest import build_cpu

    from mlc_quant import artifact, pipeline
    from mlc_quant.model.llama import export_model
    from mlc_quant.model.loader import load_config, load_params_dict
    from mlc_quant.passes import module_linears

    scheme = get_scheme("smq_q8i8f16_2")
    cfg = load_config(tiny_llama_dir)
    params = load_params_dict(tiny_llama_dir, cfg)
    mod, _ = export_model(cfg, "float32", "llvm")
    sites = {s.name: s for ss in module_linears(pipeline.annotate(mod, params)).values() for s in ss}
    ir = pipeline.IRPlan(scheme, list(params), {n: np.ones(sites[n].in_features, np.float32) for n in sites
                                                if "o_proj" in n},
                         {n: _act(scheme) for n in sites})
    qparams = dict(params)
    qparams.update(pipeline.rtn_weights(params, sites, ir))
    plan = sharding.resolve_plan(cfg, list(params), 2)
    qmod, shards, record = sharding.deploy_shards(cfg, ir, qparams, plan, "float32", "llvm")
    assert "ccl.allreduce" in qmod["decode"].script()
    build_cpu(qmod)  # compiles (running it needs a Disco worker with a CCL)
    names = [p.name for p in qmod["prefill"].params[2:]]
    assert all(list(s) == names for s in shards) and list(record["param_split"]) == names
    assert record["param_split"]["model_layers_0_self_attn_o_proj_weight.inv_smooth"] == "0"
    files = sharding.save_shards(tmp_path, shards, scheme.name)
    assert files == record["params_files"]
    back = artifact.load_safetensors(tmp_path / files[1])
    for k in names:
        assert np.array_equal(back[k], shards[1][k])


def test_record_of_biases_and_float_linears(rng):
    """Qwen2-style q/k/v biases (split with the rows), a row-parallel bias (shard 0), float linears."""
    plan = sharding.ShardingPlan(2, {"l_q_proj_weight": "column", "l_o_proj_weight": "row"}, 2, 2, 4, 8)
    params = {"l_q_proj_weight": rng.normal(size=(8, 8)).astype(np.float32),
              "l_q_proj_bias": np.arange(8, dtype=np.float32),
              "l_o_proj_weight": rng.normal(size=(8, 8)).astype(np.float32),
              "l_o_proj_bias": np.ones(8, np.float32), "norm_weight": np.ones(8, np.float32)}
    scheme = get_scheme("q0f32")
    rec = sharding.param_split_axes(params, plan, scheme)
    assert rec == {"l_q_proj_weight": "0", "l_q_proj_bias": "0", "l_o_proj_weight": "1", "l_o_proj_bias": "shard0",
                   "norm_weight": "replicated"}
    shards = sharding.shard_params(params, plan, scheme)
    assert np.array_equal(shards[1]["l_q_proj_bias"], np.arange(4, 8)) and shards[1]["l_q_proj_weight"].shape == (4, 8)
    assert shards[1]["l_o_proj_weight"].shape == (8, 4) and not shards[1]["l_o_proj_bias"].any()
    x = rng.normal(size=(3, 8)).astype(np.float32)
    ref = sharding.linear_int(scheme, "l_o_proj_weight", params, x)
    assert _rel(sharding.row_parallel_int(scheme, "l_o_proj_weight", shards, x), ref) < TOL
