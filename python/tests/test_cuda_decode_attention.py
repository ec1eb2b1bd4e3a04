"""Paged decode attention (mlc_quant/kernels/decode_attention.cu) and its KV-cache wiring
(mlc_quant/model/fast_decode.py).

CPU, in CI (needs nvcc and the full TVM; no GPU):
  * the kernel compiles with the other kernels, links, exports ``mlcq_attn_decode_paged`` and
    rejects bad arguments;
  * a CUDA fp16 export of a Llama with head_dim 64 or 128 puts ``mlcq_attn_decode_paged`` in the
    KV cache's decode slot (auto; the sliding-window slot keeps TVM's), the module is well formed;
    CPU / fp32 / head_dim 16 / ``MLC_QUANT_DECODE_ATTENTION=tir`` / TVM's prefill keep the TIR
    function; ``fast`` on an unsupported configuration is an error.
GPU (skipped without a CUDA device; needs torch for device memory):
  * the kernel against a float64 numpy reference on random paged caches (page_size 16, pages
    shuffled in a pool with unused garbage pages): several sequences of lengths 1, 17, 200, 2048
    in one call, an empty sequence, head_dim 64/128, MHA and GQA (groups 1, 3, 4, 8), index
    tensors given as views at an offset. Tolerance: output max |err| <= 1e-3 + 1e-3 * max|ref|
    (fp32 softmax and accumulation, fp16 output), lse (base 2) |err| <= 1e-3;
  * the kernel against TVM's TIR ``batch_decode_paged_kv`` (built here) on the same data;
  * the tiny Llama (head_dim 64, GQA) CUDA build with this kernel against the same build with
    TVM's decode function: a 187-token prompt (two prefill chunks), then 40 greedy decode steps
    (contexts 188-227: several splits per kv head): equal tokens, logits within 1e-2 (relative).
  The GPU side needs only TVM's runtime: ``python python/tests/test_cuda_decode_attention.py
  make-gpu-bundle DIR`` builds everything here; set MLC_QUANT_DECATTN_BUNDLE=DIR there.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cuda_kernels import _full_tvm, _nvcc  # noqa: E402

KERNEL = "mlcq_attn_decode_paged"
PAGE = 16
OUT_ATOL, OUT_RTOL, LSE_ATOL = 1e-3, 1e-3, 1e-3
TIR_CASES = {"llama7b": (32, 32, 128), "gqa64": (8, 2, 64), "gqa128": (8, 2, 128), "g3_64": (9, 3, 64),
             "g8_128": (32, 4, 128)}
TINY_PROMPT, TINY_CHUNK2, TINY_DECODE = 150, 37, 40

needs_build = pytest.mark.skipif(not _full_tvm() or _nvcc() is None, reason="needs nvcc and the full TVM")


def _decode_slot(mod):
    """The (kind, function) tuple in the decode slot of create_paged_kv_cache."""
    from tvm import relax  # pylint: disable=import-outside-toplevel

    found = []

    def visit(e):
        if isinstance(e, relax.Call) and len(e.args) > 20 and isinstance(e.args[0], relax.ExternFunc) \
                and str(e.args[0].global_symbol) == "vm.builtin.paged_attention_kv_cache_create":
            found.append(e)

    relax.analysis.post_order_visit(mod["create_paged_kv_cache"], visit)
    assert len(found) == 1
    # args[0] is the builtin; 15 common args; ragged prefill (16), paged prefill (17), decode (18),
    # paged prefill sliding window (19), decode sliding window (20)
    return found[0].args[18], found[0].args[20]


# =============================================================================================
# CPU


@needs_build
def test_kernel_compiles_links_and_rejects_bad_arguments(tmp_path):
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    from mlc_quant.kernels import build_kernels, build_shared_library  # pylint: disable=import-outside-toplevel

    objs = build_kernels(tmp_path / "obj")
    assert any(Path(p).stem == "mlcq_decode_attention" for p in objs)
    lib = build_shared_library(tmp_path / "libk.so", objs)
    nm = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True, check=True).stdout
    assert f"__tvm_ffi_{KERNEL}" in nm
    f = tvm_ffi.load_module(lib)[KERNEL]
    t = lambda a: tvm_ffi.from_dlpack(a)  # noqa: E731
    q = np.zeros((1, 2, 64), np.float16)
    pages = np.zeros((2, 2, 1, PAGE, 64), np.float16)
    ind, vals, last = np.array([0, 1], np.int32), np.array([0], np.int32), np.array([3], np.int32)
    lse = np.zeros((1, 2), np.float32)
    args = lambda q_, p_: [t(q_), t(p_), t(ind), t(vals), t(last), t(last), t(last), t(q_), t(lse)]  # noqa: E731
    with pytest.raises(Exception, match="CUDA device"):
        f(*args(q, pages), 0, 1.0, 1e4, 0.125)
    with pytest.raises(Exception, match="RoPE"):
        f(*args(q, pages), 1, 1.0, 1e4, 0.125)
    q48, p48 = np.zeros((1, 2, 48), np.float16), np.zeros((2, 2, 1, PAGE, 48), np.float16)
    with pytest.raises(Exception, match="head_dim 48"):
        f(*args(q48, p48), 0, 1.0, 1e4, 0.125)
    with pytest.raises(Exception, match="pages must be"):
        f(*args(q, np.zeros((2, 1, PAGE, 64), np.float16)), 0, 1.0, 1e4, 0.125)


@needs_build
def test_kv_cache_uses_fast_decode_where_supported(monkeypatch):
    from tvm import relax  # pylint: disable=import-outside-toplevel
    from test_cuda_attention import tiny_config  # pylint: disable=import-outside-toplevel

    from mlc_quant.build import parse_target  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.fast_decode import uses_fast_decode  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel

    cuda = parse_target("cuda")
    monkeypatch.delenv("MLC_QUANT_DECODE_ATTENTION", raising=False)
    monkeypatch.delenv("MLC_QUANT_PREFILL_ATTENTION", raising=False)
    for hd in (64, 128):
        mod, _ = export_model(tiny_config(hd), "float16", cuda)
        slot, sliding = _decode_slot(mod)
        assert isinstance(slot.fields[1], relax.ExternFunc) and str(slot.fields[1].global_symbol) == KERNEL
        assert not isinstance(sliding.fields[1], relax.ExternFunc)  # the sliding-window slot stays TVM's
        relax.analysis.well_formed(mod)  # raises on a violation
        assert uses_fast_decode(mod)
    # TVM's TIR function: CPU builds, fp32, head_dim 16, TVM's prefill cache
    for cfg, dtype, tgt, prefill in [(tiny_config(64), "float32", "llvm", None), (tiny_config(64), "float32", cuda, None),
                                     (tiny_config(16), "float16", cuda, None), (tiny_config(64), "float16", cuda, "tir")]:
        mod, _ = export_model(cfg, dtype, tgt, prefill_attention=prefill)
        slot, _ = _decode_slot(mod)
        assert not isinstance(slot.fields[1], relax.ExternFunc) and not uses_fast_decode(mod)
    monkeypatch.setenv("MLC_QUANT_DECODE_ATTENTION", "tir")
    mod, _ = export_model(tiny_config(64), "float16", cuda)
    relax.analysis.well_formed(mod)  # raises on a violation
    assert not uses_fast_decode(mod)
    monkeypatch.setenv("MLC_QUANT_DECODE_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        export_model(tiny_config(64), "float16", cuda)


@pytest.mark.skipif(not _full_tvm(), reason="needs the full TVM (mlc_quant.model)")
def test_fast_decode_supported_rules():
    from mlc_quant.model.fast_decode import fast_decode_supported, plan_decode  # pylint: disable=import-outside-toplevel

    cuda = {"kind": "cuda", "arch": "sm_90"}
    assert fast_decode_supported(cuda, "float16", 32, 32, 128) is None
    assert fast_decode_supported(cuda, "float16", 9, 3, 64) is None
    assert "CUDA only" in fast_decode_supported("llvm", "float16", 32, 32, 128)
    assert "float16 only" in fast_decode_supported(cuda, "float32", 32, 32, 128)
    assert "head_dim 96" in fast_decode_supported(cuda, "float16", 32, 32, 96)
    assert "kv heads" in fast_decode_supported(cuda, "float16", 32, 2, 128)  # group 16 > 8
    kw = dict(target=cuda, dtype="float16", num_attention_heads=32, num_key_value_heads=2, qk_head_dim=128,
              v_head_dim=128, attn_kind="mha")
    assert plan_decode("auto", **kw) is False
    with pytest.raises(ValueError, match="does not support"):
        plan_decode("fast", **kw)
    assert plan_decode("tir", **{**kw, "num_key_value_heads": 32}) is False
    assert plan_decode("auto", **{**kw, "num_key_value_heads": 32}) is True


# =============================================================================================
# build helpers (also make-gpu-bundle)


def build_tir_decode(out: Path, name: str, heads: int, kv_heads: int, d: int) -> Path:
    """TVM's TIR decode kernel (as TIRPagedKVCache builds it) for CUDA, exported alone."""
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm.relax.frontend.nn.llm import kv_cache as kvc  # pylint: disable=import-outside-toplevel

    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel
    from mlc_quant.build import parse_target  # pylint: disable=import-outside-toplevel

    target = parse_target("cuda")
    rope = kvc._prepare_yarn_rope_scaling({}, 10000)  # pylint: disable=protected-access
    f = kvc._attention_decode(kv_heads, heads, d, "float16", False, rope, target)  # pylint: disable=protected-access
    mod = tvm.IRModule({"tir_decode": f.with_attr("global_symbol", "tir_decode")})
    ex = tvm.compile(mod, target)
    return Path(cd.export_library(ex, str(out / f"tir_decode_{name}.so"), target=target))


def build_tiny_decode(out: Path, cases=("fast", "tir")) -> dict:
    """CUDA q0f16 builds of the tiny model (flash prefill) with this / TVM's decode kernel."""
    import tvm  # pylint: disable=import-outside-toplevel
    from test_cuda_attention import tiny_config  # pylint: disable=import-outside-toplevel

    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel
    from mlc_quant.build import parse_target  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.fast_decode import uses_fast_decode  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel

    target = parse_target("cuda")
    out.mkdir(parents=True, exist_ok=True)
    libs = {}
    old = os.environ.get("MLC_QUANT_DECODE_ATTENTION")
    try:
        for case in cases:
            os.environ["MLC_QUANT_DECODE_ATTENTION"] = case
            mod, _ = export_model(tiny_config(64), "float16", target, prefill_attention="flash")
            assert uses_fast_decode(mod) == (case == "fast")
            ex = tvm.compile(cd.dispatch_gemms(mod, strict=True), target)
            libs[case] = Path(cd.export_library(ex, str(out / f"tiny_dec_{case}.so"), target=target))
    finally:
        if old is None:
            os.environ.pop("MLC_QUANT_DECODE_ATTENTION", None)
        else:
            os.environ["MLC_QUANT_DECODE_ATTENTION"] = old
    return libs


def make_gpu_bundle(out_dir: str) -> None:
    from test_cuda_attention import tiny_prompt, tiny_weights  # pylint: disable=import-outside-toplevel

    from mlc_quant.kernels import build_shared_library  # pylint: disable=import-outside-toplevel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_shared_library(out / "libmlc_quant_kernels.so")
    print("[make-gpu-bundle] kernels", flush=True)
    for name, (h, hkv, d) in TIR_CASES.items():
        build_tir_decode(out, name, h, hkv, d)
        print(f"[make-gpu-bundle] TIR decode kernel {name}", flush=True)
    build_tiny_decode(out)
    w = tiny_weights()
    np.savez(out / "tiny_weights.npz", **{k: v.astype(np.float16) for k, v in w.items()})
    (out / "tiny_prompt.json").write_text(json.dumps(tiny_prompt()))
    print("[make-gpu-bundle] tiny model builds", flush=True)


# =============================================================================================
# GPU: data and reference


def make_paged(lens, heads, kv_heads, d, seed, spare_pages=5, scale_q=2.0):
    """Random q and a paged cache: pages of all sequences shuffled in a pool with garbage pages."""
    rng = np.random.default_rng(seed)
    npages = [(n + PAGE - 1) // PAGE for n in lens]
    total = sum(npages) + spare_pages
    perm = rng.permutation(total).astype(np.int32)
    pages = (rng.standard_normal((total, 2, kv_heads, PAGE, d))).astype(np.float16)
    indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
    values = perm[:sum(npages)].copy()
    last = np.array([n - (p - 1) * PAGE if p else 0 for n, p in zip(lens, npages)], np.int32)
    q = (rng.standard_normal((len(lens), heads, d)) * scale_q).astype(np.float16)
    return q, pages, indptr, values, last


def reference(q, pages, indptr, values, last, sm_scale):
    """float64: output [B, H, D] and lse (base 2) [B, H]; TIR's values for an empty sequence."""
    b_, heads, d = q.shape
    kv_heads = pages.shape[2]
    group = heads // kv_heads
    out = np.zeros(q.shape, np.float64)
    lse = np.full((b_, heads), -5e4, np.float64)
    for b in range(b_):
        pg = values[indptr[b]:indptr[b + 1]]
        if len(pg) == 0:
            continue
        n = (len(pg) - 1) * PAGE + last[b]
        kv = pages[pg].astype(np.float64)  # [np, 2, Hkv, P, D]
        k = kv[:, 0].transpose(1, 0, 2, 3).reshape(kv_heads, -1, d)[:, :n]
        v = kv[:, 1].transpose(1, 0, 2, 3).reshape(kv_heads, -1, d)[:, :n]
        for h in range(heads):
            s = k[h // group] @ q[b, h].astype(np.float64) * sm_scale
            m = s.max()
            p = np.exp(s - m)
            out[b, h] = p @ v[h // group] / p.sum()
            lse[b, h] = (m + np.log(p.sum())) / np.log(2.0)
    return out, lse


def check(out, lse, ref_out, ref_lse, what):
    assert np.isfinite(out).all() and np.isfinite(lse).all(), f"{what}: non-finite (unwritten?) values"
    err = np.abs(out.astype(np.float64) - ref_out).max()
    tol = OUT_ATOL + OUT_RTOL * np.abs(ref_out).max()
    lerr = np.abs(lse.astype(np.float64) - ref_lse).max()
    assert err <= tol and lerr <= LSE_ATOL, f"{what}: out max err {err:.3g} (tol {tol:.3g}), lse max err {lerr:.3g}"
    return float(err), float(lerr)


def _torch_cuda():
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except Exception:  # pylint: disable=broad-except
        return None
    return torch if torch.cuda.is_available() else None


def _bundle():
    d = os.environ.get("MLC_QUANT_DECATTN_BUNDLE")
    return Path(d) if d and Path(d).is_dir() else None


needs_gpu = pytest.mark.skipif(_torch_cuda() is None, reason="needs a CUDA GPU (and torch for device memory)")
needs_bundle = pytest.mark.skipif(_bundle() is None, reason="set MLC_QUANT_DECATTN_BUNDLE to make-gpu-bundle's output")


@pytest.fixture(scope="module")
def kernel():
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    path = os.environ.get("MLC_QUANT_KERNEL_LIB") or (str(_bundle() / "libmlc_quant_kernels.so") if _bundle() else None)
    if not path:
        if _nvcc() is None:
            pytest.skip("set MLC_QUANT_DECATTN_BUNDLE / MLC_QUANT_KERNEL_LIB or install nvcc")
        from mlc_quant.kernels import build_shared_library  # pylint: disable=import-outside-toplevel

        path = build_shared_library(Path(os.environ.get("TMPDIR", "/tmp")) / "mlcq_decattn_test" / "libk.so")
    return tvm_ffi.load_module(path)[KERNEL]


def run_kernel(fn, q, pages, indptr, values, last, sm_scale, offset_views=False):
    torch = _torch_cuda()
    dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda()  # noqa: E731

    def idx(a):  # as the runtime passes them: views into a bigger int32 buffer
        if not offset_views:
            return dev(a)
        buf = torch.full((len(a) + 11,), -7, dtype=torch.int32, device="cuda")
        buf[5:5 + len(a)] = dev(a)
        return buf[5:5 + len(a)]

    out = torch.full(q.shape, float("nan"), dtype=torch.float16, device="cuda")
    lse = torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device="cuda")
    zeros = torch.zeros(q.shape[0], dtype=torch.int32, device="cuda")
    fn(dev(q), dev(pages), idx(indptr), idx(values), idx(last), zeros, zeros, out, lse, 0, 1.0, 1e4, float(sm_scale))
    torch.cuda.synchronize()
    return out.cpu().numpy(), lse.cpu().numpy()


# =============================================================================================
# GPU tests


@needs_gpu
@pytest.mark.parametrize("shape", [(8, 2, 64), (8, 2, 128), (32, 32, 128), (9, 3, 64), (32, 4, 128)])
def test_gpu_kernel_matches_numpy_batch(kernel, shape):
    heads, kv_heads, d = shape
    lens = [1, 17, 200, 2048]
    data = make_paged(lens, heads, kv_heads, d, seed=heads + d)
    ref = reference(*data, d ** -0.5)
    for views in (False, True):
        print(shape, views, check(*run_kernel(kernel, *data, d ** -0.5, offset_views=views), *ref, f"{shape} {lens}"))


@needs_gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n", [0, 1, 16, 17, 31, 32, 33, 130, 200, 513, 2048, 4100])
def test_gpu_kernel_matches_numpy_single(kernel, n, d):
    """Batch 1 (the decode bench's case): every split count from 1 to the maximum."""
    data = make_paged([n], 32, 32 if d == 128 else 8, d, seed=n + d)
    check(*run_kernel(kernel, *data, 0.07), *reference(*data, 0.07), f"n={n} d={d}")


@needs_gpu
def test_gpu_kernel_repeated_calls_and_mixed_batch(kernel):
    """The split counters are reset by the kernel: back-to-back calls with other lengths agree."""
    for i, lens in enumerate([[300, 5, 0, 64], [2048], [1, 1, 1], [700, 33]]):
        data = make_paged(lens, 8, 2, 128, seed=100 + i)
        ref = reference(*data, 0.09)
        for _ in range(3):
            check(*run_kernel(kernel, *data, 0.09), *ref, f"call {i} {lens}")


@needs_gpu
def test_gpu_kernel_in_cuda_graph_follows_device_lengths(kernel):
    """Captured once in a CUDA graph, the kernel reads the lengths on the device: replays after
    rewriting the page table in place (other lengths, other split counts) stay correct."""
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    torch = _torch_cuda()
    heads, kv_heads, d, pool = 8, 2, 128, 200
    rng = np.random.default_rng(5)
    pages_np = rng.standard_normal((pool, 2, kv_heads, PAGE, d)).astype(np.float16)
    pages = torch.from_numpy(pages_np).cuda()
    q_np = (rng.standard_normal((2, heads, d)) * 2).astype(np.float16)
    q = torch.from_numpy(q_np).cuda()
    indptr = torch.zeros(3, dtype=torch.int32, device="cuda")
    values = torch.zeros(pool, dtype=torch.int32, device="cuda")
    last = torch.zeros(2, dtype=torch.int32, device="cuda")
    zeros = torch.zeros(2, dtype=torch.int32, device="cuda")
    out = torch.zeros((2, heads, d), dtype=torch.float16, device="cuda")
    lse = torch.zeros((2, heads), dtype=torch.float32, device="cuda")

    def set_lens(lens):
        npg = [(n + PAGE - 1) // PAGE for n in lens]
        perm = rng.permutation(pool)[:sum(npg)].astype(np.int32)
        ind = np.concatenate([[0], np.cumsum(npg)]).astype(np.int32)
        lst = np.array([n - (p - 1) * PAGE if p else 0 for n, p in zip(lens, npg)], np.int32)
        indptr.copy_(torch.from_numpy(ind))
        values[:len(perm)].copy_(torch.from_numpy(perm))
        last.copy_(torch.from_numpy(lst))
        return ind, perm, lst

    set_lens([40, 3])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with tvm_ffi.use_torch_stream(torch.cuda.stream(s)):
        kernel(q, pages, indptr, values, last, zeros, zeros, out, lse, 0, 1.0, 1e4, 0.08)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with tvm_ffi.use_torch_stream(torch.cuda.graph(g)):
        kernel(q, pages, indptr, values, last, zeros, zeros, out, lse, 0, 1.0, 1e4, 0.08)
    for lens in ([40, 3], [1500, 700], [0, 2048], [33, 1], [3000, 64]):
        ind, perm, lst = set_lens(lens)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ref = reference(q_np, pages_np, ind, perm, lst, 0.08)
        check(out.cpu().numpy(), lse.cpu().numpy(), *ref, f"graph replay {lens}")


def _tir_fn(name):
    import tvm  # pylint: disable=import-outside-toplevel

    from mlc_quant.cuda_runtime import prepare_cuda_runtime  # pylint: disable=import-outside-toplevel

    prepare_cuda_runtime()
    return tvm.runtime.load_module(str(_bundle() / f"tir_decode_{name}.so"))["tir_decode"]


def run_tir(fn, q, pages, indptr, values, last, sm_scale):
    import tvm  # pylint: disable=import-outside-toplevel

    dev = tvm.cuda(0)
    t = lambda a: tvm.runtime.tensor(np.ascontiguousarray(a), dev)  # noqa: E731
    out = t(np.full(q.shape, np.nan, np.float16))
    lse = t(np.full(q.shape[:2], np.nan, np.float32))
    zeros = t(np.zeros(q.shape[0], np.int32))
    fn(t(q), t(pages), t(indptr), t(values), t(last), zeros, zeros, out, lse, 0, 1.0, 1e4, float(sm_scale))
    dev.sync()
    return out.numpy(), lse.numpy()


@needs_gpu
@needs_bundle
@pytest.mark.parametrize("name", list(TIR_CASES))
def test_gpu_kernel_matches_tvm_tir_kernel(kernel, name):
    heads, kv_heads, d = TIR_CASES[name]
    data = make_paged([1, 17, 200, 2048, 130], heads, kv_heads, d, seed=11)
    ours = run_kernel(kernel, *data, d ** -0.5)
    tir = run_tir(_tir_fn(name), *data, d ** -0.5)
    ref = reference(*data, d ** -0.5)
    e_tir = check(*tir, *ref, f"TVM TIR kernel {name}")  # the reference's conventions are TVM's
    e_ours = check(*ours, *ref, f"ours {name}")
    d_out = float(np.abs(ours[0].astype(np.float64) - tir[0]).max())
    d_lse = float(np.abs(ours[1] - tir[1]).max())
    print(json.dumps({"case": name, "tir_vs_ref": e_tir, "ours_vs_ref": e_ours, "ours_vs_tir": [d_out, d_lse]}))
    assert d_lse <= LSE_ATOL and d_out <= 2 * (OUT_ATOL + OUT_RTOL * np.abs(ref[0]).max())


@needs_gpu
@needs_bundle
def test_gpu_tiny_fast_decode_matches_tir_decode():
    import tvm  # pylint: disable=import-outside-toplevel

    from mlc_quant.cuda_runtime import prepare_cuda_runtime  # pylint: disable=import-outside-toplevel
    from mlc_quant.runtime import Engine  # pylint: disable=import-outside-toplevel

    prepare_cuda_runtime()
    d = _bundle()
    prompt = json.loads((d / "tiny_prompt.json").read_text())
    w = dict(np.load(d / "tiny_weights.npz"))
    res = {}
    for case in ("fast", "tir"):
        engine = Engine(str(d / f"tiny_dec_{case}.so"), w, tvm.cuda(0), max_seq_len=256)
        engine.reset()
        engine.prefill(prompt[:TINY_PROMPT])
        logits = engine.prefill(prompt[TINY_PROMPT:TINY_PROMPT + TINY_CHUNK2])[-1]
        tokens, steps = [], []
        for _ in range(TINY_DECODE):
            tokens.append(int(np.argmax(logits)))
            logits = engine.decode(tokens[-1])
            steps.append(np.asarray(logits, np.float64).ravel())
        res[case] = (tokens, np.stack(steps))
    rel = [float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(res["fast"][1], res["tir"][1])]
    print(json.dumps({"tokens_fast": res["fast"][0], "tokens_tir": res["tir"][0], "max_rel_logits": max(rel)}))
    assert res["fast"][0] == res["tir"][0]
    assert max(rel) < 1e-2, rel


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "make-gpu-bundle":
        make_gpu_bundle(sys.argv[2])
    else:
        print(f"usage: {sys.argv[0]} make-gpu-bundle OUT_DIR", file=sys.stderr)
        sys.exit(2)
