"""Tensor-core ragged prefill attention (mlc_quant/kernels/attention.cu) and its KV-cache wiring
(mlc_quant/model/flash_prefill.py).

CPU, in CI (needs nvcc and the full TVM; no GPU):
  * the kernel compiles with the other kernels, links, loads, and rejects bad arguments;
  * a CUDA fp16 export of a Llama with head_dim 64 or 128 puts ``mlcq_attn_prefill_ragged`` in the
    KV cache's ragged-prefill slot (auto), CPU / fp32 / other head dims keep TVM's TIR kernel, and
    the tiny model's CUDA build links the kernel into its library.
GPU (skipped without a CUDA device; needs torch for device memory):
  * the kernel against a numpy float64 reference on fresh random data: causal and not, GQA,
    lengths 1, 7, 100, 513, 2048, head_dim 64 and 128, several ragged sequences in one call and
    kv_len != q_len. Tolerance: output max |err| <= 4e-3 + 4e-3 * max|ref| (fp16 output, P
    rounded to fp16 before P @ V), lse (base 2) |err| <= 1e-3;
  * the kernel against TVM's TIR ragged prefill kernel (built here) on the same data;
  * the tiny Llama (head_dim 64, GQA) CUDA build with the new attention against its fp32 CPU
    build and its CUDA build with TVM's attention: logits of a 150-token prefill, of a second
    37-token chunk on top of it (ragged part merged with the paged part through the lse) and
    greedy tokens.
  The GPU side needs only TVM's runtime: ``python python/tests/test_cuda_attention.py
  make-gpu-bundle DIR`` builds everything here; set MLC_QUANT_ATTN_BUNDLE=DIR there.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cuda_kernels import _full_tvm, _nvcc  # noqa: E402  the same probes as the GEMM kernels' tests

KERNEL = "mlcq_attn_prefill_ragged"
OUT_ATOL, OUT_RTOL, LSE_ATOL = 4e-3, 4e-3, 1e-3
LLAMA_SHAPE = (32, 32, 128)  # Llama-2-7B: heads, kv heads, head_dim
TIR_CASES = {"llama7b": LLAMA_SHAPE, "gqa64": (8, 2, 64), "gqa128": (8, 2, 128)}

needs_build = pytest.mark.skipif(not _full_tvm() or _nvcc() is None, reason="needs nvcc and the full TVM")


def tiny_config(head_dim: int = 64):
    """The test suite's tiny Llama with head_dim 64 (or 128): 4 heads, 2 KV heads."""
    from conftest import TINY  # pylint: disable=import-outside-toplevel

    from mlc_quant.model.config import LlamaConfig  # pylint: disable=import-outside-toplevel

    fields = LlamaConfig.__dataclass_fields__
    raw = {**TINY, "hidden_size": 4 * head_dim, "intermediate_size": 8 * head_dim}
    return LlamaConfig(**{k: v for k, v in raw.items() if k in fields})


def _ragged_slot(mod):
    """The (kind, function) tuple in the ragged-prefill slot of create_paged_kv_cache."""
    from tvm import relax  # pylint: disable=import-outside-toplevel

    found = []

    def visit(e):
        if isinstance(e, relax.Call) and len(e.args) > 15 and isinstance(e.args[0], relax.ExternFunc) \
                and str(e.args[0].global_symbol) == "vm.builtin.paged_attention_kv_cache_create":
            found.append(e.args[16])  # args[0] is the builtin; then 15 common args, then ragged prefill

    relax.analysis.post_order_visit(mod["create_paged_kv_cache"], visit)
    assert len(found) == 1
    return found[0]


# =============================================================================================
# CPU


@needs_build
def test_kernel_compiles_links_and_rejects_bad_arguments(tmp_path):
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    from mlc_quant.kernels import build_kernels, build_shared_library  # pylint: disable=import-outside-toplevel

    objs = build_kernels(tmp_path / "obj")
    assert any(Path(p).stem == "mlcq_attention" for p in objs)
    lib = build_shared_library(tmp_path / "libk.so", objs)
    nm = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True, check=True).stdout
    assert f"__tvm_ffi_{KERNEL}" in nm
    f = tvm_ffi.load_module(lib)[KERNEL]
    q = np.zeros((4, 2, 64), np.float16)
    ind = np.array([0, 4], np.int32)
    lse = np.zeros((4, 2), np.float32)
    args = [q, ind, q, q, ind, ind[:1], ind[:1], q, lse]
    with pytest.raises(Exception, match="CUDA device"):
        f(*[tvm_ffi.from_dlpack(a) for a in args], 1, 0, 1.0, 1e4, 0.125)
    with pytest.raises(Exception, match="RoPE"):
        f(*[tvm_ffi.from_dlpack(a) for a in args], 1, 1, 1.0, 1e4, 0.125)
    q48 = np.zeros((4, 2, 48), np.float16)
    with pytest.raises(Exception, match="head_dim 48"):
        f(*[tvm_ffi.from_dlpack(a) for a in [q48, ind, q48, q48, ind, ind[:1], ind[:1], q48, lse]], 1, 0, 1.0, 1e4, 0.1)


@needs_build
def test_kv_cache_uses_flash_prefill_where_supported(monkeypatch):
    from tvm import relax  # pylint: disable=import-outside-toplevel

    from mlc_quant.build import parse_target  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.flash_prefill import uses_flash_prefill  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel

    cuda = parse_target("cuda")
    monkeypatch.delenv("MLC_QUANT_PREFILL_ATTENTION", raising=False)
    for hd in (64, 128):
        mod, _ = export_model(tiny_config(hd), "float16", cuda)
        slot = _ragged_slot(mod)
        assert isinstance(slot.fields[1], relax.ExternFunc) and str(slot.fields[1].global_symbol) == KERNEL
        assert uses_flash_prefill(mod)
    # TVM's TIR kernel: CPU builds, fp32, head_dim 16, or asked for
    for cfg, dtype, tgt, choice in [(tiny_config(64), "float32", "llvm", None), (tiny_config(64), "float32", cuda, None),
                                    (tiny_config(16), "float16", cuda, None), (tiny_config(64), "float16", cuda, "tir")]:
        mod, _ = export_model(cfg, dtype, tgt, prefill_attention=choice)
        slot = _ragged_slot(mod)
        assert not isinstance(slot.fields[1], relax.ExternFunc) and not uses_flash_prefill(mod)
    monkeypatch.setenv("MLC_QUANT_PREFILL_ATTENTION", "tir")
    assert not uses_flash_prefill(export_model(tiny_config(64), "float16", cuda)[0])
    with pytest.raises(ValueError, match="head_dim 16"):
        export_model(tiny_config(16), "float16", cuda, prefill_attention="flash")


@needs_build
def test_tiny_cuda_build_links_flash_prefill(tmp_path):
    tiny = build_tiny(tmp_path, cases=("flash",))
    nm = subprocess.run(["nm", "-D", "--defined-only", str(tiny["flash"])], capture_output=True, text=True,
                        check=True).stdout
    assert f"__tvm_ffi_{KERNEL}" in nm and "__tvm_ffi_mlcq_linear" in nm


# =============================================================================================
# build helpers (also make-gpu-bundle)


def build_tiny(out: Path, cases=("flash", "tir"), head_dim: int = 64):
    """CUDA q0f16 builds of the tiny model: {case: library path}."""
    import tvm  # pylint: disable=import-outside-toplevel

    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel
    from mlc_quant.build import parse_target  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel

    target = parse_target("cuda")
    out.mkdir(parents=True, exist_ok=True)
    libs = {}
    for case in cases:
        mod, _ = export_model(tiny_config(head_dim), "float16", target, prefill_attention=case)
        ex = tvm.compile(cd.dispatch_gemms(mod, strict=True), target)
        libs[case] = Path(cd.export_library(ex, str(out / f"tiny_{case}.so"), target=target))
    return libs


def tiny_weights(seed: int = 0, head_dim: int = 64):
    from mlc_quant.model.llama import param_shapes  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in param_shapes(tiny_config(head_dim)).items():
        if "norm" in name:
            out[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(shape) * 0.2).astype(np.float32)  # as conftest's init range
    return out


TINY_PROMPT, TINY_CHUNK2, TINY_TOKENS = 150, 37, 8


def tiny_prompt():
    rng = np.random.default_rng(7)
    return rng.integers(3, 256, TINY_PROMPT + TINY_CHUNK2).tolist()


def run_tiny(engine, prompt):
    """Logits of the prompt's first part, of a second chunk on top of it, and greedy tokens."""
    engine.reset()
    a = engine.prefill(prompt[:TINY_PROMPT])
    b = engine.prefill(prompt[TINY_PROMPT:])
    tokens, logits = [], b[-1]
    for _ in range(TINY_TOKENS):
        tokens.append(int(np.argmax(logits)))
        logits = engine.decode(tokens[-1])
    return a, b, tokens


def build_tir_kernel(out: Path, name: str, heads: int, kv_heads: int, d: int) -> Path:
    """TVM's TIR ragged prefill kernel (as TIRPagedKVCache builds it) for CUDA, exported alone."""
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm.relax.frontend.nn.llm import kv_cache as kvc  # pylint: disable=import-outside-toplevel

    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel
    from mlc_quant.build import parse_target  # pylint: disable=import-outside-toplevel

    target = parse_target("cuda")
    rope = kvc._prepare_yarn_rope_scaling({}, 10000)  # pylint: disable=protected-access
    f = kvc._attention_prefill_ragged(kv_heads, heads, d, d, "float16", rope, target)  # pylint: disable=protected-access
    mod = tvm.IRModule({"tir_ragged": f.with_attr("global_symbol", "tir_ragged")})
    ex = tvm.compile(mod, target)
    return Path(cd.export_library(ex, str(out / f"tir_{name}.so"), target=target))


def make_gpu_bundle(out_dir: str) -> None:
    from mlc_quant.kernels import build_shared_library  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel
    from mlc_quant.pipeline import build as cpu_build  # pylint: disable=import-outside-toplevel
    from mlc_quant.runtime import Engine  # pylint: disable=import-outside-toplevel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_shared_library(out / "libmlc_quant_kernels.so")
    print("[make-gpu-bundle] kernels", flush=True)
    for name, (h, hkv, d) in TIR_CASES.items():
        build_tir_kernel(out, name, h, hkv, d)
        print(f"[make-gpu-bundle] TIR kernel {name}", flush=True)
    build_tiny(out)
    w = tiny_weights()
    np.savez(out / "tiny_weights.npz", **{k: v.astype(np.float16) for k, v in w.items()})
    # fp32 CPU reference with the same (fp16-rounded) weights
    mod, _ = export_model(tiny_config(), "float32", "llvm")
    engine = Engine(cpu_build(mod, "llvm"), {k: v.astype(np.float16).astype(np.float32) for k, v in w.items()},
                    max_seq_len=256)
    prompt = tiny_prompt()
    a, b, tokens = run_tiny(engine, prompt)
    np.savez(out / "tiny_cpu.npz", a=a, b=b)
    (out / "tiny_expect.json").write_text(json.dumps({"prompt": prompt, "tokens": tokens}))
    print(f"[make-gpu-bundle] tiny model, CPU tokens {tokens}", flush=True)


# =============================================================================================
# GPU


def _torch_cuda():
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except Exception:  # pylint: disable=broad-except
        return None
    return torch if torch.cuda.is_available() else None


def _bundle():
    d = os.environ.get("MLC_QUANT_ATTN_BUNDLE")
    return Path(d) if d and Path(d).is_dir() else None


needs_gpu = pytest.mark.skipif(_torch_cuda() is None, reason="needs a CUDA GPU (and torch for device memory)")
needs_bundle = pytest.mark.skipif(_bundle() is None, reason="set MLC_QUANT_ATTN_BUNDLE to make-gpu-bundle's output")


@pytest.fixture(scope="module")
def kernel():
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    path = os.environ.get("MLC_QUANT_KERNEL_LIB") or (str(_bundle() / "libmlc_quant_kernels.so") if _bundle() else None)
    if not path:
        if _nvcc() is None:
            pytest.skip("set MLC_QUANT_ATTN_BUNDLE / MLC_QUANT_KERNEL_LIB or install nvcc")
        from mlc_quant.kernels import build_shared_library  # pylint: disable=import-outside-toplevel

        path = build_shared_library(Path(os.environ.get("TMPDIR", "/tmp")) / "mlcq_attn_test" / "libk.so")
    return tvm_ffi.load_module(path)[KERNEL]


def make_inputs(q_lens, kv_lens, heads, kv_heads, d, seed, scale_q=2.0):
    rng = np.random.default_rng(seed)
    lq, lk = int(sum(q_lens)), int(sum(kv_lens))
    q = (rng.standard_normal((lq, heads, d)) * scale_q).astype(np.float16)
    k = rng.standard_normal((lk, kv_heads, d)).astype(np.float16)
    v = rng.standard_normal((lk, kv_heads, d)).astype(np.float16)
    qi = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    ki = np.concatenate([[0], np.cumsum(kv_lens)]).astype(np.int32)
    return q, k, v, qi, ki


def reference(q, k, v, qi, ki, causal, sm_scale):
    """float64: output [Lq, H, D] and lse (base 2) [Lq, H]."""
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    out = np.zeros(q.shape, np.float64)
    lse = np.zeros(q.shape[:2], np.float64)
    for b in range(len(qi) - 1):
        qs = q[qi[b]:qi[b + 1]].astype(np.float64)
        ks = k[ki[b]:ki[b + 1]].astype(np.float64)
        vs = v[ki[b]:ki[b + 1]].astype(np.float64)
        nq, nk = len(qs), len(ks)
        mask = np.ones((nq, nk), bool)
        if causal:
            mask = np.arange(nk)[None, :] < nk - nq + np.arange(nq)[:, None] + 1
        for h in range(heads):
            s = qs[:, h] @ ks[:, h // group].T * sm_scale
            s = np.where(mask, s, -np.inf)
            m = s.max(axis=1, keepdims=True)
            p = np.exp(s - m)
            den = p.sum(axis=1, keepdims=True)
            out[qi[b]:qi[b + 1], h] = (p / den) @ vs[:, h // group]
            lse[qi[b]:qi[b + 1], h] = (m[:, 0] + np.log(den[:, 0])) / np.log(2.0)
    return out, lse


def run_kernel(fn, q, k, v, qi, ki, causal, sm_scale):
    torch = _torch_cuda()
    dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda()  # noqa: E731
    out = torch.full(q.shape, float("nan"), dtype=torch.float16, device="cuda")
    lse = torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device="cuda")
    pos = torch.zeros(q.shape[0], dtype=torch.int32, device="cuda")
    off = torch.zeros(len(qi) - 1, dtype=torch.int32, device="cuda")
    fn(dev(q), dev(qi), dev(k), dev(v), dev(ki), pos, off, out, lse, int(causal), 0, 1.0, 1e4, float(sm_scale))
    torch.cuda.synchronize()
    return out.cpu().numpy(), lse.cpu().numpy()


def check(out, lse, ref_out, ref_lse, what):
    assert np.isfinite(out).all() and np.isfinite(lse).all(), f"{what}: non-finite (unwritten?) values"
    err = np.abs(out.astype(np.float64) - ref_out).max()
    tol = OUT_ATOL + OUT_RTOL * np.abs(ref_out).max()
    lerr = np.abs(lse.astype(np.float64) - ref_lse).max()
    assert err <= tol and lerr <= LSE_ATOL, f"{what}: out max err {err:.3g} (tol {tol:.3g}), lse max err {lerr:.3g}"
    return float(err), float(lerr)


@needs_gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n", [1, 7, 100, 513, 2048])
def test_gpu_kernel_matches_numpy_causal_gqa(kernel, n, d):
    heads, kv_heads = 8, 2
    q, k, v, qi, ki = make_inputs([n], [n], heads, kv_heads, d, seed=n + d)
    out, lse = run_kernel(kernel, q, k, v, qi, ki, True, d ** -0.5)
    print(check(out, lse, *reference(q, k, v, qi, ki, True, d ** -0.5), f"n={n} d={d}"))


@needs_gpu
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_kernel_ragged_batch_noncausal_and_kv_offset(kernel, d):
    q_lens, kv_lens = [7, 100, 1, 513, 64], [7, 130, 5, 513, 64]  # kv_len >= q_len: causal offset
    q, k, v, qi, ki = make_inputs(q_lens, kv_lens, 4, 4, d, seed=3)
    for causal in (True, False):
        out, lse = run_kernel(kernel, q, k, v, qi, ki, causal, 0.1)
        check(out, lse, *reference(q, k, v, qi, ki, causal, 0.1), f"ragged d={d} causal={causal}")
    q, k, v, qi, ki = make_inputs([300], [300], 32, 32, d, seed=4)  # MHA (group 1), many heads
    out, lse = run_kernel(kernel, q, k, v, qi, ki, True, d ** -0.5)
    check(out, lse, *reference(q, k, v, qi, ki, True, d ** -0.5), f"mha d={d}")


@needs_gpu
@pytest.mark.parametrize("q_lens", [[512], [200, 312, 64]])
def test_gpu_kernel_whole_grid_resident_snake_order(kernel, q_lens):
    """Grids of more than one CTA per SM that are resident at once (132-SM cards: 32 heads x 8
    blocks = 256 CTAs; 16 heads x 11 = 176 for the ragged batch, some CTAs without a block) are
    numbered in a snake (attention.cu, CtaRank): every query block of every head must still be
    computed once; the outputs start as NaN, so a block left out fails `check`."""
    heads = 32 if len(q_lens) == 1 else 16
    q, k, v, qi, ki = make_inputs(q_lens, q_lens, heads, heads, 128, seed=len(q_lens) + 21)
    out, lse = run_kernel(kernel, q, k, v, qi, ki, True, 128 ** -0.5)
    check(out, lse, *reference(q, k, v, qi, ki, True, 128 ** -0.5), f"snake {q_lens}")


@needs_gpu
@needs_bundle
def test_gpu_kernel_in_two_loaded_libraries(kernel, tmp_path):
    """Every model library links its own copy of the kernel; a second one loaded in the same
    process must set up its own kernel (a shared function-local static once made it skip the
    > 48 KB shared-memory opt-in: 'launch failed: invalid argument')."""
    import shutil  # pylint: disable=import-outside-toplevel

    import tvm_ffi  # pylint: disable=import-outside-toplevel

    copy = tmp_path / "libmlc_quant_kernels_copy.so"
    shutil.copyfile(_bundle() / "libmlc_quant_kernels.so", copy)
    second = tvm_ffi.load_module(str(copy))[KERNEL]
    q, k, v, qi, ki = make_inputs([130], [130], 4, 2, 128, seed=5)
    ref = reference(q, k, v, qi, ki, True, 0.09)
    for fn in (kernel, second, kernel):
        check(*run_kernel(fn, q, k, v, qi, ki, True, 0.09), *ref, "two libraries")


def _tir_fn(name):
    import tvm  # pylint: disable=import-outside-toplevel

    from mlc_quant.cuda_runtime import prepare_cuda_runtime  # pylint: disable=import-outside-toplevel

    prepare_cuda_runtime()
    return tvm.runtime.load_module(str(_bundle() / f"tir_{name}.so"))["tir_ragged"]


def run_tir(fn, q, k, v, qi, ki, causal, sm_scale):
    import tvm  # pylint: disable=import-outside-toplevel

    dev = tvm.cuda(0)
    t = lambda a: tvm.runtime.tensor(np.ascontiguousarray(a), dev)  # noqa: E731
    out = t(np.full(q.shape, np.nan, np.float16))
    lse = t(np.full(q.shape[:2], np.nan, np.float32))
    fn(t(q), t(qi), t(k), t(v), t(ki), t(np.zeros(q.shape[0], np.int32)), t(np.zeros(len(qi) - 1, np.int32)),
       out, lse, int(causal), 0, 1.0, 1e4, float(sm_scale))
    dev.sync()
    return out.numpy(), lse.numpy()


@needs_gpu
@needs_bundle
@pytest.mark.parametrize("name", ["gqa64", "gqa128", "llama7b"])
def test_gpu_kernel_matches_tvm_tir_kernel(kernel, name):
    heads, kv_heads, d = TIR_CASES[name]
    q, k, v, qi, ki = make_inputs([100, 513], [100, 513], heads, kv_heads, d, seed=11)
    ours = run_kernel(kernel, q, k, v, qi, ki, True, d ** -0.5)
    tir = run_tir(_tir_fn(name), q, k, v, qi, ki, True, d ** -0.5)
    ref = reference(q, k, v, qi, ki, True, d ** -0.5)
    check(*tir, *ref, f"TVM TIR kernel {name}")  # the reference's conventions are TVM's
    check(*ours, *ref, f"ours {name}")
    assert np.abs(ours[1] - tir[1]).max() <= LSE_ATOL


@needs_gpu
@needs_bundle
def test_gpu_tiny_flash_build_matches_cpu_build():
    import tvm  # pylint: disable=import-outside-toplevel

    from mlc_quant.cuda_runtime import prepare_cuda_runtime  # pylint: disable=import-outside-toplevel
    from mlc_quant.runtime import Engine  # pylint: disable=import-outside-toplevel

    prepare_cuda_runtime()
    d = _bundle()
    expect = json.loads((d / "tiny_expect.json").read_text())
    cpu = np.load(d / "tiny_cpu.npz")
    w = dict(np.load(d / "tiny_weights.npz"))
    res = {}
    for case in ("flash", "tir"):
        engine = Engine(str(d / f"tiny_{case}.so"), w, tvm.cuda(0), max_seq_len=256)
        a, b, tokens = run_tiny(engine, expect["prompt"])
        rel = [float(np.linalg.norm(x - cpu[k]) / np.linalg.norm(cpu[k])) for x, k in ((a, "a"), (b, "b"))]
        res[case] = {"rel_prefill": rel[0], "rel_chunk2": rel[1], "tokens": tokens, "a": a, "b": b}
    flash, tir = res["flash"], res["tir"]
    rel_ft = [float(np.linalg.norm(flash[k] - tir[k]) / np.linalg.norm(tir[k])) for k in ("a", "b")]
    print(json.dumps({c: {k: v for k, v in r.items() if k not in ("a", "b")} for c, r in res.items()}
                     | {"rel_flash_vs_tir": rel_ft, "cpu_tokens": expect["tokens"]}))
    assert flash["tokens"] == expect["tokens"] and tir["tokens"] == expect["tokens"]
    # fp16 CUDA vs fp32 CPU: the TIR build's own distance sets the scale
    for k in ("rel_prefill", "rel_chunk2"):
        assert flash[k] < max(2 * tir[k], 1e-2), (k, flash[k], tir[k])
    assert max(rel_ft) < 1e-2, rel_ft


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "make-gpu-bundle":
        make_gpu_bundle(sys.argv[2])
    else:
        print(f"usage: {sys.argv[0]} make-gpu-bundle OUT_DIR", file=sys.stderr)
        sys.exit(2)
