"""CUDA RoPE split kernel (mlc_quant/kernels/rope.cu) and its KV-cache wiring
(mlc_quant/model/fast_rope.py).

CPU, in CI (needs nvcc and the full TVM; no GPU):
  * the kernels compile with the other kernels, link, export ``mlcq_rope`` / ``mlcq_rope_make`` /
    ``mlcq_kv_transpose_append`` and reject bad arguments;
  * a CUDA fp16 export of a Llama with head_dim 64 or 128 puts ``mlcq_rope_make(theta, scale, Hq,
    Hkv, D)`` in the KV cache's ``f_split_rotary`` slot (auto); CPU / fp32 / head_dim 16 /
    llama3 RoPE scaling / ``MLC_QUANT_ROPE=tir`` / ``prefill_attention="tir"`` keep TVM's
    ``tir_split_rotary``; the append slot gets ``mlcq_kv_transpose_append`` with it
    (``MLC_QUANT_KV_APPEND=tir`` keeps TVM's append alone); the tiny model's CUDA build links the
    kernels into its library.
GPU (skipped without a CUDA device; needs torch for device memory):
  * the kernel against a numpy float64 RoPE (exact angles) on random data: lengths 1, 7, 2048,
    head_dim 64 and 128, GQA (8 q / 2 kv heads), contiguous, offset and random positions, scale
    != 1, apply_rope 0, a misaligned qkv view (scalar path). Tolerance per element:
    |out - ref| <= 2^-10 |ref| + (|x_j| + |x_j+D/2|) (p * 2^-20 + 2^-20) + 2^-24: the fp16 output
    rounding (half an ulp, doubled; 2^-24 for subnormals) plus the fp32 angle error the TIR formula has (powf and the division,
    a few ulp of an angle up to p radians) and cosf/sinf;
  * the kernel against TVM's TIR ``fused_rope`` (built here as TIRPagedKVCache builds it, dlight
    default schedule, TVM's nvcc flags: --use_fast_math, as rope.cu) on the same data: at most 1
    fp16 ulp apart (ulp at the larger magnitude), both within the reference tolerance, and v and
    the apply_rope=0 outputs bit-identical;
  * ``mlcq_kv_transpose_append`` (the k/v append to the pages, also in rope.cu) against a numpy
    scatter and TVM's TIR ``tir_kv_cache_transpose_append``: bit-identical pages (shuffled slots,
    -1 entries skipped, vector and scalar paths), lengths 1, 7, 2048 and 300, head_dim 64 and 128;
  * the tiny Llama (head_dim 64, GQA) CUDA build with these kernels against the same build with TVM's
    RoPE and append (``MLC_QUANT_ROPE=tir``) and the fp32 CPU build: logits of a 150-token prefill, of a 37-token second chunk and
    greedy tokens.
  The GPU side needs only TVM's runtime: ``python python/tests/test_cuda_rope.py make-gpu-bundle
  DIR`` builds everything here; set MLC_QUANT_ROPE_BUNDLE=DIR there.
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
from test_cuda_attention import run_tiny, tiny_config, tiny_prompt, tiny_weights  # noqa: E402
from test_cuda_kernels import _full_tvm, _nvcc  # noqa: E402

MAKE, DIRECT, APPEND = "mlcq_rope_make", "mlcq_rope", "mlcq_kv_transpose_append"
# name: (q heads, kv heads, head_dim, theta, scale)
TIR_CASES = {"llama7b": (32, 32, 128, 1e4, 1.0), "gqa64": (8, 2, 64, 1e5, 1.0), "gqa128": (8, 2, 128, 5e5, 0.25)}
ULP_EXP = 10  # relative output tolerance 2^-10
ANGLE_EXP = 20  # angle tolerance p * 2^-20 + 2^-20 radians

needs_build = pytest.mark.skipif(not _full_tvm() or _nvcc() is None, reason="needs nvcc and the full TVM")


def _create_call(mod):
    from tvm import relax  # pylint: disable=import-outside-toplevel

    found = []

    def visit(e):
        if isinstance(e, relax.Call) and len(e.args) > 25 and isinstance(e.args[0], relax.ExternFunc) \
                and str(e.args[0].global_symbol) == "vm.builtin.paged_attention_kv_cache_create":
            found.append(e)

    relax.analysis.post_order_visit(mod["create_paged_kv_cache"], visit)
    assert len(found) == 1
    return found[0]


def _rope_make_calls(mod):
    """[(theta, scale, hq, hkv, d)] of each ``call_pure_packed("mlcq_rope_make", ...)``."""
    from tvm import relax  # pylint: disable=import-outside-toplevel

    calls = []

    def visit(e):
        if isinstance(e, relax.Call) and e.args and isinstance(e.args[0], relax.ExternFunc) \
                and str(e.args[0].global_symbol) == MAKE:
            calls.append(tuple(float(a.value) for a in e.args[1:]))

    relax.analysis.post_order_visit(mod["create_paged_kv_cache"], visit)
    return calls


def _tir_rope_slot(mod) -> bool:
    """Whether f_split_rotary (4th from the end of the create call, on CPU and CUDA) is a PrimFunc."""
    import tvm  # pylint: disable=import-outside-toplevel

    slot = _create_call(mod).args[-4]
    return isinstance(slot, tvm.ir.GlobalVar) and isinstance(mod[slot], tvm.tirx.PrimFunc)


# =============================================================================================
# CPU


@needs_build
def test_kernel_compiles_links_and_rejects_bad_arguments(tmp_path):
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    from mlc_quant.kernels import build_kernels, build_shared_library  # pylint: disable=import-outside-toplevel

    objs = build_kernels(tmp_path / "obj")
    assert any(Path(p).stem == "mlcq_rope" for p in objs)
    lib = build_shared_library(tmp_path / "libk.so", objs)
    nm = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True, check=True).stdout
    assert f"__tvm_ffi_{MAKE}" in nm and f"__tvm_ffi_{DIRECT}" in nm and f"__tvm_ffi_{APPEND}" in nm
    m = tvm_ffi.load_module(lib)
    qkv = np.zeros((3, 12, 64), np.float16)
    q, kv = np.zeros((3, 8, 64), np.float16), np.zeros((3, 2, 64), np.float16)
    pos = np.zeros(3, np.int32)
    t = tvm_ffi.from_dlpack
    with pytest.raises(Exception, match="CUDA device"):
        m[DIRECT](t(qkv), t(pos), t(q), t(kv), t(kv), 1, 1e4, 1.0)
    f = m[MAKE](1e4, 1.0, 8, 2, 64)
    with pytest.raises(Exception, match="CUDA device"):
        f(t(qkv), t(pos), t(q), t(kv), t(kv), 1)
    with pytest.raises(Exception, match=r"qkv must be a contiguous \[3, 8, 64\]"):  # built for 4 q heads
        m[MAKE](1e4, 1.0, 4, 2, 64)(t(qkv), t(pos), t(q), t(kv), t(kv), 1)
    with pytest.raises(Exception, match="theta"):
        m[MAKE](0.0, 1.0, 8, 2, 64)
    with pytest.raises(Exception, match="float16"):
        m[DIRECT](t(qkv.astype(np.float32)), t(pos), t(q), t(kv), t(kv), 1, 1e4, 1.0)
    pages = np.zeros((4, 2, 2, 16, 64), np.float16)
    with pytest.raises(Exception, match="CUDA"):
        m[APPEND](t(pages), t(kv), t(kv), t(pos))
    with pytest.raises(Exception, match=r"pages must be .*\[pages, 2, 2, page_size, 64\]"):
        m[APPEND](t(pages[:, :, :1]), t(kv), t(kv), t(pos))


@needs_build
def test_kv_cache_uses_cuda_rope_where_supported(monkeypatch):
    from tvm import relax  # pylint: disable=import-outside-toplevel

    from mlc_quant.build import parse_target  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.fast_rope import uses_fast_rope  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel

    cuda = parse_target("cuda")
    monkeypatch.delenv("MLC_QUANT_ROPE", raising=False)
    monkeypatch.delenv("MLC_QUANT_PREFILL_ATTENTION", raising=False)
    for hd in (64, 128):
        cfg = tiny_config(hd)
        mod, _ = export_model(cfg, "float16", cuda)
        relax.analysis.well_formed(mod)
        assert uses_fast_rope(mod) and not _tir_rope_slot(mod) and uses_fast_rope(mod, APPEND)
        assert _rope_make_calls(mod) == [(cfg.rope_theta, 1.0, cfg.num_attention_heads, cfg.num_key_value_heads, hd)]
    llama3 = tiny_config(64)
    llama3.rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}
    # TVM's TIR function: CPU builds, fp32, head_dim 16, llama3 scaling, or asked for
    for cfg, dtype, tgt, attn in [(tiny_config(64), "float32", "llvm", None), (tiny_config(64), "float32", cuda, None),
                                  (tiny_config(16), "float16", cuda, None), (llama3, "float16", cuda, None),
                                  (tiny_config(64), "float16", cuda, "tir")]:
        mod, _ = export_model(cfg, dtype, tgt, prefill_attention=attn)
        assert _tir_rope_slot(mod) and not uses_fast_rope(mod) and not _rope_make_calls(mod)
        assert not uses_fast_rope(mod, APPEND)
    monkeypatch.setenv("MLC_QUANT_KV_APPEND", "tir")  # RoPE kernel, TVM's append
    mod, _ = export_model(tiny_config(64), "float16", cuda)
    assert uses_fast_rope(mod) and not uses_fast_rope(mod, APPEND)
    monkeypatch.delenv("MLC_QUANT_KV_APPEND")
    monkeypatch.setenv("MLC_QUANT_ROPE", "tir")
    mod, _ = export_model(tiny_config(64), "float16", cuda)
    assert _tir_rope_slot(mod) and not uses_fast_rope(mod)
    monkeypatch.setenv("MLC_QUANT_ROPE", "cuda")
    with pytest.raises(ValueError, match="RoPE scaling 'llama3'"):
        export_model(llama3, "float16", cuda)
    monkeypatch.setenv("MLC_QUANT_ROPE", "fast")
    with pytest.raises(ValueError, match="expected one of"):
        export_model(tiny_config(64), "float16", cuda)


@needs_build
def test_tiny_cuda_build_links_cuda_rope(tmp_path):
    libs = build_tiny(tmp_path, cases=("cuda",))
    nm = subprocess.run(["nm", "-D", "--defined-only", str(libs["cuda"])], capture_output=True, text=True,
                        check=True).stdout
    assert f"__tvm_ffi_{MAKE}" in nm and "__tvm_ffi_mlcq_attn_prefill_ragged" in nm


# =============================================================================================
# build helpers (also make-gpu-bundle)


def build_tiny(out: Path, cases=("cuda", "tir")):
    """CUDA q0f16 builds of the tiny model (flash prefill) with each RoPE kernel: {case: path}."""
    import tvm  # pylint: disable=import-outside-toplevel

    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel
    from mlc_quant.build import parse_target  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.fast_rope import uses_fast_rope  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel

    target = parse_target("cuda")
    out.mkdir(parents=True, exist_ok=True)
    libs = {}
    old = os.environ.get("MLC_QUANT_ROPE")
    try:
        for case in cases:
            os.environ["MLC_QUANT_ROPE"] = case
            mod, _ = export_model(tiny_config(64), "float16", target, prefill_attention="flash")
            assert uses_fast_rope(mod) == (case == "cuda")
            ex = tvm.compile(cd.dispatch_gemms(mod, strict=True), target)
            libs[case] = Path(cd.export_library(ex, str(out / f"tiny_rope_{case}.so"), target=target))
    finally:
        if old is None:
            os.environ.pop("MLC_QUANT_ROPE", None)
        else:
            os.environ["MLC_QUANT_ROPE"] = old
    return libs


def build_tir_rope(out: Path, name: str, heads: int, kv_heads: int, d: int, theta: float, scale: float) -> Path:
    """TVM's TIR ``fused_rope`` as TIRPagedKVCache adds it (scheduled by the CUDA pipeline's dlight
    rules), exported alone as ``tir_rope``."""
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm.relax.frontend.nn.llm.position_embedding import (  # pylint: disable=import-outside-toplevel
        llama_rope_with_position_map,
    )
    from tvm.s_tir import dlight as dl  # pylint: disable=import-outside-toplevel

    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel
    from mlc_quant.build import parse_target  # pylint: disable=import-outside-toplevel

    target = parse_target("cuda")
    f = llama_rope_with_position_map(theta, scale, d, heads, kv_heads, "float16", {}, d)
    mod = tvm.IRModule({"tir_rope": f.with_attr("global_symbol", "tir_rope")})
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                      dl.gpu.Fallback())(mod)
    ex = tvm.compile(mod, target)
    return Path(cd.export_library(ex, str(out / f"tir_rope_{name}.so"), target=target))


def build_tir_append(out: Path, name: str, kv_heads: int, d: int) -> Path:
    """TVM's TIR ``tir_kv_cache_transpose_append`` (page size 16) the same way, as ``tir_append``."""
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm.relax.frontend.nn.llm._page_kernels import (  # pylint: disable=import-outside-toplevel
        _kv_cache_transpose_append,
    )
    from tvm.s_tir import dlight as dl  # pylint: disable=import-outside-toplevel

    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel
    from mlc_quant.build import parse_target  # pylint: disable=import-outside-toplevel

    target = parse_target("cuda")
    f = _kv_cache_transpose_append(kv_heads, d, "float16")
    mod = tvm.IRModule({"tir_append": f.with_attr("global_symbol", "tir_append")})
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                      dl.gpu.Fallback())(mod)
    ex = tvm.compile(mod, target)
    return Path(cd.export_library(ex, str(out / f"tir_append_{name}.so"), target=target))


def make_gpu_bundle(out_dir: str) -> None:
    from mlc_quant.kernels import build_shared_library  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel
    from mlc_quant.pipeline import build as cpu_build  # pylint: disable=import-outside-toplevel
    from mlc_quant.runtime import Engine  # pylint: disable=import-outside-toplevel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_shared_library(out / "libmlc_quant_kernels.so")
    print("[make-gpu-bundle] kernels", flush=True)
    for name, case in TIR_CASES.items():
        build_tir_rope(out, name, *case)
        build_tir_append(out, name, case[1], case[2])
        print(f"[make-gpu-bundle] TIR rope {name}", flush=True)
    build_tiny(out)
    w = tiny_weights()
    np.savez(out / "tiny_weights.npz", **{k: v.astype(np.float16) for k, v in w.items()})
    mod, _ = export_model(tiny_config(), "float32", "llvm")
    engine = Engine(cpu_build(mod, "llvm"), {k: v.astype(np.float16).astype(np.float32) for k, v in w.items()},
                    max_seq_len=256)
    prompt = tiny_prompt()
    a, b, tokens = run_tiny(engine, prompt)
    np.savez(out / "tiny_cpu.npz", a=a, b=b)
    (out / "tiny_expect.json").write_text(json.dumps({"prompt": prompt, "tokens": tokens}))
    print(f"[make-gpu-bundle] tiny model, CPU tokens {tokens}", flush=True)


# =============================================================================================
# reference


def reference(qkv, pos, hq, hkv, theta, scale, apply=True):
    """float64 RoPE with exact angles: (q, k, v)."""
    x = qkv.astype(np.float64)
    d = x.shape[2]
    q, k, v = x[:, :hq], x[:, hq:hq + hkv], x[:, hq + hkv:]
    if not apply:
        return q, k, v
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # [d/2]
    ang = (pos.astype(np.float64) * scale)[:, None] * inv[None, :]  # [s, d/2]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

    def rot(t):
        lo, hi = t[..., :d // 2], t[..., d // 2:]
        return np.concatenate([lo * c - hi * s, hi * c + lo * s], axis=-1)

    return rot(q), rot(k), v


def tolerance(qkv, pos, hq, hkv, scale):
    """Elementwise bound of |out - ref| for q and k (see the module docstring), and 0 for v."""
    x = np.abs(qkv.astype(np.float64))
    d = x.shape[2]
    pair = x[..., :d // 2] + x[..., d // 2:]
    pair = np.concatenate([pair, pair], axis=-1)
    angle = (np.abs(pos.astype(np.float64) * scale) + 1.0)[:, None, None] * 2.0 ** -ANGLE_EXP
    return pair[:, :hq] * angle, pair[:, hq:hq + hkv] * angle


def check(outs, qkv, pos, hq, hkv, theta, scale, what, apply=True):
    ref = reference(qkv, pos, hq, hkv, theta, scale, apply)
    tq, tk = tolerance(qkv, pos, hq, hkv, scale) if apply else (0.0, 0.0)
    errs = {}
    for name, o, r, t in zip("qkv", outs, ref, (tq, tk, 0.0)):
        assert np.isfinite(o).all(), f"{what}: {name} has non-finite (unwritten?) values"
        err = np.abs(o.astype(np.float64) - r)
        bound = 2.0 ** -ULP_EXP * np.abs(r) + t + 2.0 ** -24
        worst = np.unravel_index(np.argmax(err - bound), err.shape)
        assert (err <= bound).all(), f"{what}: {name} err {err[worst]:.3g} > {bound[worst]:.3g} at {worst}"
        errs[name] = float(err.max())
    return errs


def make_qkv(n, hq, hkv, d, seed, positions="arange"):
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((n, hq + 2 * hkv, d)).astype(np.float16)
    if positions == "arange":
        pos = np.arange(n, dtype=np.int32)
    elif positions == "offset":
        pos = np.arange(n, dtype=np.int32) + 1000
    else:
        pos = rng.integers(0, 4096, n).astype(np.int32)
    return qkv, pos


# =============================================================================================
# GPU


def _torch_cuda():
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except Exception:  # pylint: disable=broad-except
        return None
    return torch if torch.cuda.is_available() else None


def _bundle():
    d = os.environ.get("MLC_QUANT_ROPE_BUNDLE")
    return Path(d) if d and Path(d).is_dir() else None


needs_gpu = pytest.mark.skipif(_torch_cuda() is None, reason="needs a CUDA GPU (and torch for device memory)")
needs_bundle = pytest.mark.skipif(_bundle() is None, reason="set MLC_QUANT_ROPE_BUNDLE to make-gpu-bundle's output")


@pytest.fixture(scope="module")
def kernels():
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    path = os.environ.get("MLC_QUANT_KERNEL_LIB") or (str(_bundle() / "libmlc_quant_kernels.so") if _bundle() else None)
    if not path:
        if _nvcc() is None:
            pytest.skip("set MLC_QUANT_ROPE_BUNDLE / MLC_QUANT_KERNEL_LIB or install nvcc")
        from mlc_quant.kernels import build_shared_library  # pylint: disable=import-outside-toplevel

        path = build_shared_library(Path(os.environ.get("TMPDIR", "/tmp")) / "mlcq_rope_test" / "libk.so")
    return tvm_ffi.load_module(path)


def run_ours(fn, qkv, pos, hq, hkv, apply=1, misalign=False):
    """fn(qkv, pos, q, k, v, apply) on the GPU; misalign: qkv and q are views 1 element in."""
    torch = _torch_cuda()
    n, _, d = qkv.shape
    if misalign:
        flat = torch.empty(qkv.size + 1, dtype=torch.float16, device="cuda")
        flat[1:] = torch.from_numpy(qkv.reshape(-1)).cuda()
        tq = flat[1:].view(qkv.shape)
        qflat = torch.full((n * hq * d + 1,), float("nan"), dtype=torch.float16, device="cuda")
        q = qflat[1:].view(n, hq, d)
    else:
        tq = torch.from_numpy(qkv).cuda()
        q = torch.full((n, hq, d), float("nan"), dtype=torch.float16, device="cuda")
    k = torch.full((n, hkv, d), float("nan"), dtype=torch.float16, device="cuda")
    v = torch.full((n, hkv, d), float("nan"), dtype=torch.float16, device="cuda")
    big = torch.zeros(n + 5, dtype=torch.int32, device="cuda")
    big[3:3 + n] = torch.from_numpy(pos).cuda()
    fn(tq, big[3:3 + n], q, k, v, int(apply))  # the position map is a view with an offset
    torch.cuda.synchronize()
    return q.cpu().numpy(), k.cpu().numpy(), v.cpu().numpy()


@needs_gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n", [1, 7, 2048])
def test_gpu_kernel_matches_numpy_gqa(kernels, n, d):
    hq, hkv = 8, 2
    for positions, theta, scale in [("arange", 1e4, 1.0), ("offset", 5e5, 1.0), ("random", 1e4, 0.25)]:
        qkv, pos = make_qkv(n, hq, hkv, d, seed=n + d, positions=positions)
        outs = run_ours(kernels[MAKE](theta, scale, hq, hkv, d), qkv, pos, hq, hkv)
        print(n, d, positions, check(outs, qkv, pos, hq, hkv, theta, scale, f"n={n} d={d} {positions}"))
        direct = run_ours(lambda *a: kernels[DIRECT](*a, theta, scale), qkv, pos, hq, hkv)
        for o, dd in zip(outs, direct):
            np.testing.assert_array_equal(o, dd)


@needs_gpu
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_kernel_no_rope_and_misaligned(kernels, d):
    hq, hkv = 4, 4
    qkv, pos = make_qkv(300, hq, hkv, d, seed=5, positions="random")
    f = kernels[MAKE](1e4, 1.0, hq, hkv, d)
    copies = run_ours(f, qkv, pos, hq, hkv, apply=0)
    check(copies, qkv, pos, hq, hkv, 1e4, 1.0, f"apply_rope=0 d={d}", apply=False)
    vec = run_ours(f, qkv, pos, hq, hkv)
    scalar = run_ours(f, qkv, pos, hq, hkv, misalign=True)  # the scalar kernel
    check(scalar, qkv, pos, hq, hkv, 1e4, 1.0, f"misaligned d={d}")
    for a, b in zip(vec, scalar):
        np.testing.assert_array_equal(a, b)


def _tir(name):
    import tvm  # pylint: disable=import-outside-toplevel

    from mlc_quant.cuda_runtime import prepare_cuda_runtime  # pylint: disable=import-outside-toplevel

    prepare_cuda_runtime()
    return tvm.runtime.load_module(str(_bundle() / f"tir_rope_{name}.so"))["tir_rope"]


def run_tir(fn, qkv, pos, hq, hkv, apply=1):
    import tvm  # pylint: disable=import-outside-toplevel

    dev = tvm.cuda(0)
    n, _, d = qkv.shape
    t = lambda a: tvm.runtime.tensor(np.ascontiguousarray(a), dev)  # noqa: E731
    outs = [t(np.full((n, h, d), np.nan, np.float16)) for h in (hq, hkv, hkv)]
    fn(t(qkv), t(pos), *outs, int(apply))
    dev.sync()
    return tuple(o.numpy() for o in outs)


def ulp_diff(a, b):
    """|a - b| in fp16 ulps at the magnitude of max(|a|, |b|) (ulp 2^(e - 10), at least 2^-24)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    mag = np.maximum(np.abs(a64), np.abs(b64))
    ulp = np.exp2(np.floor(np.log2(np.maximum(mag, 2.0 ** -14))) - 10)
    return np.abs(a64 - b64) / ulp


@needs_gpu
@needs_bundle
@pytest.mark.parametrize("name", list(TIR_CASES))
@pytest.mark.parametrize("n", [1, 7, 2048])
def test_gpu_kernel_matches_tvm_tir_rope(kernels, name, n):
    hq, hkv, d, theta, scale = TIR_CASES[name]
    qkv, pos = make_qkv(n, hq, hkv, d, seed=11 + n, positions="random" if n == 2048 else "offset")
    ours = run_ours(kernels[MAKE](theta, scale, hq, hkv, d), qkv, pos, hq, hkv)
    tir = run_tir(_tir(name), qkv, pos, hq, hkv)
    check(tir, qkv, pos, hq, hkv, theta, scale, f"TVM TIR {name}")  # the reference's conventions are TVM's
    check(ours, qkv, pos, hq, hkv, theta, scale, f"ours {name}")
    ulps = [ulp_diff(o, t) for o, t in zip(ours, tir)]
    same = float(np.mean(np.concatenate([u.ravel() for u in ulps]) == 0))
    print(name, n, {"max_ulp": [float(u.max()) for u in ulps], "bit_identical": same})
    assert max(float(u.max()) for u in ulps) <= 1
    np.testing.assert_array_equal(ours[2], tir[2])  # v: a copy
    ours0, tir0 = run_ours(kernels[MAKE](theta, scale, hq, hkv, d), qkv, pos, hq, hkv, 0), run_tir(_tir(name), qkv, pos,
                                                                                                   hq, hkv, 0)
    for a, b in zip(ours0, tir0):
        np.testing.assert_array_equal(a, b)


PAGE = 16


def make_append(n, hkv, d, seed, num_pages=None):
    """k, v, a position map (shuffled slots, every 5th token -1: not appended) and the pages."""
    rng = np.random.default_rng(seed)
    num_pages = num_pages or (n + PAGE - 1) // PAGE + 2
    k = rng.standard_normal((n, hkv, d)).astype(np.float16)
    v = rng.standard_normal((n, hkv, d)).astype(np.float16)
    pos = rng.permutation(num_pages * PAGE)[:n].astype(np.int32)
    pos[::5] = -1
    pages = rng.standard_normal((num_pages, 2, hkv, PAGE, d)).astype(np.float16)
    return pages, k, v, pos


def append_reference(pages, k, v, pos):
    out = pages.copy()
    for t, p in enumerate(pos):
        if p != -1:
            out[p // PAGE, 0, :, p % PAGE] = k[t]
            out[p // PAGE, 1, :, p % PAGE] = v[t]
    return out


def run_append_ours(fn, pages, k, v, pos, misalign=False):
    torch = _torch_cuda()
    if misalign:  # the scalar kernel
        flat = torch.empty(k.size + 1, dtype=torch.float16, device="cuda")
        flat[1:] = torch.from_numpy(k.reshape(-1)).cuda()
        tk = flat[1:].view(k.shape)
    else:
        tk = torch.from_numpy(k).cuda()
    tp = torch.from_numpy(pages).cuda()
    fn(tp, tk, torch.from_numpy(v).cuda(), torch.from_numpy(pos).cuda())
    torch.cuda.synchronize()
    return tp.cpu().numpy()


@needs_gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("n", [1, 7, 2048])
def test_gpu_kv_append_matches_numpy(kernels, n, d):
    pages, k, v, pos = make_append(n, 2, d, seed=n + d)
    ref = append_reference(pages, k, v, pos)
    np.testing.assert_array_equal(run_append_ours(kernels[APPEND], pages, k, v, pos), ref)
    np.testing.assert_array_equal(run_append_ours(kernels[APPEND], pages, k, v, pos, misalign=True), ref)


@needs_gpu
@needs_bundle
@pytest.mark.parametrize("name", list(TIR_CASES))
def test_gpu_kv_append_matches_tvm_tir(kernels, name):
    import tvm  # pylint: disable=import-outside-toplevel

    from mlc_quant.cuda_runtime import prepare_cuda_runtime  # pylint: disable=import-outside-toplevel

    prepare_cuda_runtime()
    _, hkv, d, _, _ = TIR_CASES[name]
    pages, k, v, pos = make_append(300, hkv, d, seed=2)
    fn = tvm.runtime.load_module(str(_bundle() / f"tir_append_{name}.so"))["tir_append"]
    dev = tvm.cuda(0)
    tpages = tvm.runtime.tensor(pages, dev)
    fn(tpages, tvm.runtime.tensor(k, dev), tvm.runtime.tensor(v, dev), tvm.runtime.tensor(pos, dev))
    dev.sync()
    tir = tpages.numpy()
    np.testing.assert_array_equal(tir, append_reference(pages, k, v, pos))
    np.testing.assert_array_equal(run_append_ours(kernels[APPEND], pages, k, v, pos), tir)


@needs_gpu
@needs_bundle
def test_gpu_tiny_build_with_cuda_rope_matches_tir_rope_and_cpu():
    import tvm  # pylint: disable=import-outside-toplevel

    from mlc_quant.cuda_runtime import prepare_cuda_runtime  # pylint: disable=import-outside-toplevel
    from mlc_quant.runtime import Engine  # pylint: disable=import-outside-toplevel

    prepare_cuda_runtime()
    d = _bundle()
    expect = json.loads((d / "tiny_expect.json").read_text())
    cpu = np.load(d / "tiny_cpu.npz")
    w = dict(np.load(d / "tiny_weights.npz"))
    res = {}
    for case in ("cuda", "tir"):
        engine = Engine(str(d / f"tiny_rope_{case}.so"), w, tvm.cuda(0), max_seq_len=256)
        a, b, tokens = run_tiny(engine, expect["prompt"])
        rel = [float(np.linalg.norm(x - cpu[k]) / np.linalg.norm(cpu[k])) for x, k in ((a, "a"), (b, "b"))]
        res[case] = {"rel_prefill": rel[0], "rel_chunk2": rel[1], "tokens": tokens, "a": a, "b": b}
    ours, tir = res["cuda"], res["tir"]
    rel_ot = [float(np.linalg.norm(ours[k] - tir[k]) / np.linalg.norm(tir[k])) for k in ("a", "b")]
    print(json.dumps({c: {k: v for k, v in r.items() if k not in ("a", "b")} for c, r in res.items()}
                     | {"rel_cuda_rope_vs_tir_rope": rel_ot, "cpu_tokens": expect["tokens"]}))
    assert ours["tokens"] == expect["tokens"] and tir["tokens"] == expect["tokens"]
    for k in ("rel_prefill", "rel_chunk2"):
        assert ours[k] < max(2 * tir[k], 1e-2), (k, ours[k], tir[k])
    assert max(rel_ot) < 1e-2, rel_ot


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "make-gpu-bundle":
        make_gpu_bundle(sys.argv[2])
    else:
        print(f"usage: {sys.argv[0]} make-gpu-bundle OUT_DIR", file=sys.stderr)
        sys.exit(2)
