"""Tensor parallelism at run time (issue #9): the Disco runner, the NCCL plugin, CUDA dispatch of
the sharded IR, and the 2-GPU checks.

CPU, in CI:
  * a 2-shard CUDA module of the tiny Llama (H/N heads, I/N MLP width, all-reduce after o/down,
    smq_q8i8f16_3's per-token absmax of o/down all-reduced) still offloads every GEMM
    (``dispatch_gemms(strict=True)``) and compiles;
  * :class:`mlc_quant.disco.DiscoEngine` on a ThreadedSession of CPU workers: N=1 gives the
    single-device Engine's logits exactly; N=2 on the 2-shard build (with a host all-reduce in
    place of NCCL, which TVM has no CPU version of) gives the unsharded build's logits to 1e-5
    and its greedy tokens;
  * the NCCL plugin builds (g++, no NCCL needed) and registers ``runtime.disco.nccl.*``.
GPU (skipped without CUDA GPUs / without the bundle; run on the GPU machine, runtime-only TVM):
  * Disco + NCCL on one GPU: the 1-shard CUDA build through DiscoEngine equals the Engine;
  * with >= 2 GPUs: an NCCL all-reduce across 2 workers; greedy tokens of the 2-shard W8A8 CUDA
    build (tiny random Llama: SmolLM2 has 3 KV heads, which do not split in 2) equal the 1-shard
    CUDA build's, on a ThreadedSession and on a ProcessSession.
The bundle (``python python/tests/test_tensor_parallel.py make-bundle DIR``, CPU machine) holds
the CUDA builds and the CPU build's tokens; MLC_QUANT_TP_BUNDLE points the GPU tests at it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from test_cuda_build import _full_tvm, _nvcc  # noqa: F401  (the same probes)

sys.path.insert(0, str(Path(__file__).resolve().parent))

TOL = 1e-5
GREEDY = 24


def _gpu_count() -> int:
    try:
        from mlc_quant.cuda_runtime import prepare_cuda_runtime  # pylint: disable=import-outside-toplevel

        prepare_cuda_runtime()
        import ctypes  # pylint: disable=import-outside-toplevel

        n = ctypes.c_int(0)
        if ctypes.CDLL("libcudart.so.13").cudaGetDeviceCount(ctypes.byref(n)) != 0:
            return 0
        return n.value
    except Exception:  # pylint: disable=broad-except
        return 0


def _bundle():
    d = os.environ.get("MLC_QUANT_TP_BUNDLE")
    return Path(d) if d and Path(d).is_dir() else None


needs_relax = pytest.mark.skipif(not _full_tvm(), reason="needs the full TVM (compiler)")
needs_build = pytest.mark.skipif(not _nvcc(), reason="needs nvcc (CUDA toolkit) and the full TVM")


def _tiny_config():
    from conftest import TINY  # pylint: disable=import-outside-toplevel

    from mlc_quant.model.config import LlamaConfig  # pylint: disable=import-outside-toplevel

    fields = LlamaConfig.__dataclass_fields__
    return LlamaConfig(**{k: v for k, v in TINY.items() if k in fields})


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


# =============================================================================================
# CPU: CUDA dispatch of the sharded IR


def _offloaded_calls(dmod, fn):
    from tvm import relax  # pylint: disable=import-outside-toplevel

    calls = []
    relax.analysis.post_order_visit(
        dmod[fn],
        lambda e: calls.append(str(e.args[0].global_symbol))
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_dps_packed"
        and str(e.args[0].global_symbol).endswith(("mlc_cutlass", "mlc_cublaslt")) else None)
    return calls


def _ccl_calls(mod, fn):
    from tvm import relax  # pylint: disable=import-outside-toplevel

    ops = []
    relax.analysis.post_order_visit(
        mod[fn], lambda e: ops.append(str(e.attrs.op_type)) if isinstance(e, relax.Call)
        and getattr(e.op, "name", "") == "relax.ccl.allreduce" else None)
    return ops


@needs_build
@pytest.mark.parametrize("scheme_name,merge", [("smq_q8i8f16_3", False), ("smq_q8i8f16_2", False),
                                               ("smq_q8i8f16_3", True)])
def test_sharded_cuda_module_offloads_every_gemm(scheme_name, merge):
    """The 2-shard module (what ``--tensor-parallel-shards 2 --target cuda`` compiles): every linear
    is an external GEMM, none left to TVM. For smq_q8i8f16_3 the per-token absmax of o/down goes
    through an all-reduce(max) between the scale's max and divide, so their GEMMs match the
    per-token pattern with the scale given (``w8a8_token``: int8 x and its scale given) instead of
    the one that computes the scale inside (``w8a8_token_dyn``), and the absmax itself is a
    scheduled row-reduction kernel."""
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm import relax  # pylint: disable=import-outside-toplevel

    from mlc_quant import cuda_dispatch as cd  # pylint: disable=import-outside-toplevel
    from mlc_quant import sharding  # pylint: disable=import-outside-toplevel
    from mlc_quant.bench import synthetic_plan  # pylint: disable=import-outside-toplevel
    from mlc_quant.build import parse_target  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model, param_shapes  # pylint: disable=import-outside-toplevel
    from mlc_quant.passes.merge_sibling_linears import MergeSiblingLinears  # pylint: disable=import-outside-toplevel
    from mlc_quant.schemes import get_scheme  # pylint: disable=import-outside-toplevel

    target = parse_target("cuda")
    config = _tiny_config()
    scheme = get_scheme(scheme_name)
    mod, names = export_model(config, "float16", target)
    plan = sharding.resolve_plan(config, list(param_shapes(config)), 2)
    smod, _ = export_model(sharding.shard_config(config, 2), "float16", target)
    qmod, _ = sharding.shard_module(smod, synthetic_plan(mod, names, scheme), plan)
    if merge:
        qmod = MergeSiblingLinears(scheme)(qmod)
    relax.analysis.well_formed(qmod)  # raises on the first violation
    layers = config.num_hidden_layers
    for fn in ("prefill", "decode"):
        ops = _ccl_calls(qmod, fn)
        assert ops.count("sum") == 2 * layers  # after o_proj and down_proj
        assert ops.count("max") == (2 * layers if scheme.act == "per_token_sym" else 0)
    dmod = cd.dispatch_gemms(qmod, strict=True, attach_kernels=False)  # raises if a matmul is left
    per_layer = 4 if merge else 7
    for fn in ("prefill", "decode"):
        calls = _offloaded_calls(dmod, fn)
        assert len(calls) == per_layer * layers + 1, (fn, calls)  # + the (replicated) LM head
        assert all(c.endswith("mlc_cutlass") for c in calls)
        assert len(_ccl_calls(dmod, fn)) == len(_ccl_calls(qmod, fn))  # the all-reduces stay in the graph
        rowmax = []
        relax.analysis.post_order_visit(
            dmod[fn], lambda e: rowmax.append(e) if isinstance(e, relax.Call)
            and getattr(e.op, "name", "") == "relax.call_tir" and "row_absmax" in e.args[0].name_hint else None)
        if scheme.act == "per_token_sym":
            fused_scale = [c for c in calls if "relax_abs_relax_max" in c]
            given_scale = [c for c in calls if "relax_abs_relax_max" not in c]
            # o_proj, down_proj (row-parallel: their absmax is all-reduced); in prefill also the
            # linears whose norm hands them int8 x and the per-token scales (FuseActQuantize: a
            # norm with one consumer, i.e. merged q/k/v and gate/up, and the LM head)
            fused_norm = ((2 * layers if merge else 0) + 1) if fn == "prefill" else 0
            assert len(given_scale) == 2 * layers + fused_norm, (fn, given_scale)
            assert len(fused_scale) == (per_layer - 2) * layers + 1 - fused_norm
            # their absmax (before the all-reduce) runs as the scheduled row kernel, not dlight's
            # fallback (cuda_dispatch.schedule_row_absmax)
            assert len(rowmax) == 2 * layers
        else:
            assert not rowmax
    if scheme_name == "smq_q8i8f16_3" and not merge:
        tvm.compile(dmod, target)  # the sharded module compiles (ccl.allreduce -> runtime.disco.allreduce)


# =============================================================================================
# CPU: DiscoEngine on a ThreadedSession with a host all-reduce


class HostCCL:
    """A collective among the Disco worker threads of one ThreadedSession, for CPU tests.

    TVM's Disco registers no CPU CCL. A worker that never ran ``init_ccl`` has an empty CCL name,
    so ``runtime.disco.allreduce`` (what ``relax.op.ccl.allreduce`` lowers to) and
    ``runtime.disco.broadcast_from_worker0`` look up ``runtime.disco..allreduce`` /
    ``runtime.disco..broadcast_from_worker0``: registered here as barrier-synchronized numpy
    reductions over the worker threads (the same left-to-right sum on every rank).
    """

    def __init__(self, shards: int):
        import tvm_ffi  # pylint: disable=import-outside-toplevel

        self.barrier = threading.Barrier(shards)
        self.slots = [None] * shards
        rank = tvm_ffi.get_global_func("runtime.disco.worker_rank")
        ops = {0: np.sum, 3: np.max}  # ReduceKind: kSum, kMax

        def allreduce(send, kind, in_group, recv):  # pylint: disable=unused-argument
            r = int(rank())
            self.slots[r] = send.numpy()
            self.barrier.wait()
            red = ops[int(kind)](np.stack(self.slots), axis=0).astype(self.slots[r].dtype)
            self.barrier.wait()
            recv.copyfrom(red)

        def broadcast(send, in_group, recv):  # pylint: disable=unused-argument
            if int(rank()) == 0:
                self.slots[0] = send.numpy()
            self.barrier.wait()
            recv.copyfrom(self.slots[0])
            self.barrier.wait()

        tvm_ffi.register_global_func("runtime.disco..allreduce", allreduce, override=True)
        tvm_ffi.register_global_func("runtime.disco..broadcast_from_worker0", broadcast, override=True)


def _tiny_quantized(tiny_llama_dir, scheme_name, tmp_path):
    """(config, lib of the unsharded build, its params, lib of the 2-shard build, shard params)."""
    from conftest import build_cpu  # pylint: disable=import-outside-toplevel

    from mlc_quant import pipeline, sharding  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.loader import load_config, load_params_dict  # pylint: disable=import-outside-toplevel
    from mlc_quant.passes import module_linears  # pylint: disable=import-outside-toplevel
    from mlc_quant.schemes import ActQParams, get_scheme  # pylint: disable=import-outside-toplevel

    scheme = get_scheme(scheme_name)
    cfg = load_config(tiny_llama_dir)
    params = load_params_dict(tiny_llama_dir, cfg)
    mod, _ = export_model(cfg, "float32", "llvm")
    sites = {s.name: s for ss in module_linears(pipeline.annotate(mod, params)).values() for s in ss}
    ir = pipeline.IRPlan(scheme, list(params))
    if scheme.static_activations:
        zp = -3 if scheme.act == "per_tensor_asym" else 0
        ir.act_qparams = {n: ActQParams(0.02, zp) for n in sites}
    rng = np.random.default_rng(1)  # explicit smoothing of o_proj: lifted into per-shard params
    ir.explicit_inv_scales = {n: rng.uniform(0.5, 2.0, size=sites[n].in_features).astype(np.float32)
                              for n in sites if "o_proj" in n}
    qparams = dict(params)
    qparams.update(pipeline.rtn_weights(params, sites, ir))
    qmod = ir.apply(mod)
    used = [p.name for p in qmod["prefill"].params[2:]]
    lib1 = str(tmp_path / "model1.so")
    build_cpu(qmod).export_library(lib1)
    plan = sharding.resolve_plan(cfg, list(params), 2)
    smod, shards, _ = sharding.deploy_shards(cfg, ir, qparams, plan, "float32", "llvm")
    relax_well_formed(smod)
    lib2 = str(tmp_path / "model2.so")
    build_cpu(smod).export_library(lib2)
    return cfg, lib1, {k: qparams[k] for k in used}, lib2, shards


def relax_well_formed(mod) -> None:
    from tvm import relax  # pylint: disable=import-outside-toplevel

    relax.analysis.well_formed(mod)  # raises on the first violation


@needs_relax
@pytest.mark.parametrize("scheme_name", ["smq_q8i8f16_2", "smq_q8i8f16_3"])
def test_disco_engine_cpu_matches_single_device(scheme_name, tiny_llama_dir, tmp_path):
    from mlc_quant import artifact  # pylint: disable=import-outside-toplevel
    from mlc_quant.disco import DiscoEngine  # pylint: disable=import-outside-toplevel
    from mlc_quant.runtime import Engine  # pylint: disable=import-outside-toplevel

    cfg, lib1, params1, lib2, shards = _tiny_quantized(tiny_llama_dir, scheme_name, tmp_path)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, size=13)
    ref = Engine(lib1, params1, max_seq_len=64, vocab_size=cfg.vocab_size)
    ref_logits = ref.prefill(ids)
    ref_tokens = list(ref.generate(ids, 8))

    # N = 1: the unsharded build through Disco (one worker, no CCL) is the Engine, exactly
    e1 = DiscoEngine(lib1, [params1], 1, device="cpu", ccl=None, max_seq_len=64, vocab_size=cfg.vocab_size)
    try:
        assert np.array_equal(e1.prefill(ids), ref_logits)
        assert list(e1.generate(ids, 8)) == ref_tokens
    finally:
        e1.close()

    # N = 2: the 2-shard build on 2 workers (each its own KV heads and cache), params from files
    HostCCL(2)
    files = []
    for i, s in enumerate(shards):
        files.append(tmp_path / f"params-shard{i}.safetensors")
        artifact.save_safetensors(files[-1], s)
    e2 = DiscoEngine(lib2, files, 2, device="cpu", ccl=None, max_seq_len=64, vocab_size=cfg.vocab_size)
    try:
        assert _rel(e2.prefill(ids), ref_logits) < TOL
        ref.reset()
        ref.prefill(ids)
        want = ref.decode(int(ref_tokens[0]))
        assert _rel(e2.decode(int(ref_tokens[0])), want) < TOL  # decode continues the same KV caches
        assert list(e2.generate(ids, 8)) == ref_tokens
        assert e2.seq_len == len(ids) + 7
        with pytest.raises(ValueError, match="token ids must lie"):
            e2.prefill([cfg.vocab_size])
    finally:
        e2.close()


@needs_relax
def test_disco_engine_bad_input(tiny_llama_dir, tmp_path):
    from mlc_quant.disco import DiscoEngine  # pylint: disable=import-outside-toplevel

    lib = tmp_path / "missing.so"
    with pytest.raises(FileNotFoundError):
        DiscoEngine(lib, [{}], 1, device="cpu", ccl=None)
    lib.write_bytes(b"")
    with pytest.raises(ValueError, match="device ids"):
        DiscoEngine(lib, [{}, {}], 2, device="cpu", ccl=None, device_ids=[0])
    with pytest.raises(ValueError, match="no CPU collective"):
        DiscoEngine(lib, [{}], 1, device="cpu", ccl="nccl")
    with pytest.raises(ValueError, match="session must be"):
        DiscoEngine(lib, [{}], 1, device="cpu", ccl=None, session="mpi")


@needs_relax
def test_runner_refuses_tp_build_on_cpu(tmp_path):
    from mlc_quant import artifact  # pylint: disable=import-outside-toplevel
    from mlc_quant.runner import load_built  # pylint: disable=import-outside-toplevel

    (tmp_path / artifact.CONFIG_FILE).write_text(json.dumps(
        {"target": "cuda", "tensor_parallel": {"shards": 2}, "max_seq_len": 64, "model_config": {}}))
    with pytest.raises(ValueError, match="--device cuda"):
        load_built(tmp_path, device="cpu")


@pytest.mark.skipif(not _nvcc(), reason="needs the CUDA toolkit's headers and the full TVM's libraries")
def test_nccl_plugin_builds_and_registers(tmp_path):
    """TVM's wheel registers no runtime.disco.nccl.*; the plugin does (no NCCL needed to build or
    load it: NCCL is opened when a collective is first used)."""
    import ctypes  # pylint: disable=import-outside-toplevel

    from mlc_quant import disco  # pylint: disable=import-outside-toplevel

    so = disco.build_nccl_plugin(tmp_path / disco.PLUGIN_FILE)
    undefined = subprocess.run(["nm", "-D", "--undefined-only", so], capture_output=True, text=True,
                               check=True).stdout
    assert "_ZN3tvm7runtime11DiscoWorker11ThreadLocalEv" in undefined  # from libtvm_runtime_extra.so
    assert "nccl" not in undefined  # NCCL is dlopen'ed, not linked
    disco.load_disco_runtime()
    ctypes.CDLL(so, mode=ctypes.RTLD_GLOBAL)
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    for name in ("init_ccl", "init_ccl_per_worker", "allreduce", "allgather", "broadcast_from_worker0",
                 "sync_worker"):
        assert tvm_ffi.get_global_func(f"runtime.disco.nccl.{name}", allow_missing=True) is not None, name


# =============================================================================================
# GPU


needs_bundle = pytest.mark.skipif(_bundle() is None, reason="set MLC_QUANT_TP_BUNDLE to make-bundle's output")
needs_gpu = pytest.mark.skipif(_gpu_count() < 1, reason="needs a CUDA GPU")
needs_2gpu = pytest.mark.skipif(_gpu_count() < 2, reason="needs 2 CUDA GPUs")


def _record(key, value):
    out = os.environ.get("MLC_QUANT_GPU_RESULT")
    print(json.dumps({key: value}))
    if out:
        p = Path(out)
        data = json.loads(p.read_text()) if p.is_file() else {}
        data[key] = value
        p.write_text(json.dumps(data, indent=1))


@needs_gpu
@needs_bundle
def test_gpu_disco_one_gpu_equals_engine():
    """Disco + the NCCL plugin on one GPU (one rank): the 1-shard CUDA build equals the Engine."""
    from mlc_quant import artifact  # pylint: disable=import-outside-toplevel
    from mlc_quant.disco import DiscoEngine  # pylint: disable=import-outside-toplevel
    from mlc_quant.runner import load_built  # pylint: disable=import-outside-toplevel

    d = _bundle()
    expect = json.loads((d / "expect.json").read_text())
    ref, _, cfg = load_built(d / "tp1", device="cuda")
    ref_logits = ref.prefill(expect["prompt"])
    plugin = d / "tp2" / "libmlcq_disco_nccl.so"
    e = DiscoEngine(d / "tp1" / artifact.LIB_FILE, [d / "tp1" / artifact.PARAMS_FILE], 1, plugin=str(plugin),
                    max_seq_len=cfg["max_seq_len"], vocab_size=cfg["model_config"]["vocab_size"])
    try:
        logits = e.prefill(expect["prompt"])
        _record("one_gpu", {"max_abs_diff": float(np.abs(logits - ref_logits).max()),
                            "nccl": e.runtime_info.get("nccl"), "nccl_version": e.runtime_info.get("nccl_version")})
        assert np.array_equal(logits, ref_logits)
    finally:
        e.close()


@needs_2gpu
def test_gpu_nccl_allreduce_two_workers():
    from mlc_quant import disco  # pylint: disable=import-outside-toplevel

    plugin = (_bundle() / "tp2" / disco.PLUGIN_FILE) if _bundle() else None
    disco.load_nccl_plugin(str(plugin) if plugin else None)
    import tvm  # pylint: disable=import-outside-toplevel

    sess = disco.disco_module().ThreadedSession(2)
    try:
        sess.init_ccl("nccl", 0, 1)
        x = sess.empty((4,), "float32")
        rank = sess.get_global_func("runtime.disco.worker_rank")()
        # worker i holds [i+1, ...]: fill through a broadcast of the base, then scale per rank
        base = sess.broadcast(tvm.runtime.tensor(np.arange(4, dtype=np.float32)))
        y = sess.empty((4,), "float32")
        sess.allreduce(base, y, "sum")
        host = tvm.runtime.empty((4,), "float32", tvm.cpu(0))
        sess.copy_from_worker_0(host, y)
        sess.sync_worker_0()
        assert np.array_equal(host.numpy(), 2 * np.arange(4, dtype=np.float32))
        sess.allreduce(base, x, "max")
        sess.copy_from_worker_0(host, x)
        sess.sync_worker_0()
        assert np.array_equal(host.numpy(), np.arange(4, dtype=np.float32))
        assert int(rank.debug_get_from_remote(1)) == 1
    finally:
        sess.shutdown()


@needs_2gpu
@needs_bundle
@pytest.mark.parametrize("session", ["thread", "process"])
def test_gpu_two_shards_greedy_equals_one_shard(session):
    """Greedy tokens of the 2-shard W8A8 CUDA build on 2 GPUs equal the 1-shard CUDA build's."""
    from mlc_quant.disco import load_built_tp  # pylint: disable=import-outside-toplevel
    from mlc_quant.runner import load_built  # pylint: disable=import-outside-toplevel
    from test_cuda_build import greedy_tokens  # pylint: disable=import-outside-toplevel

    d = _bundle()
    expect = json.loads((d / "expect.json").read_text())
    prompt = expect["prompt"]
    one, _, _ = load_built(d / "tp1", device="cuda")
    want_logits = one.prefill(prompt)
    want = greedy_tokens(one, prompt, GREEDY)
    two, cfg = load_built_tp(d / "tp2", session=session)
    try:
        assert two.num_shards == 2 and cfg["tensor_parallel"]["shards"] == 2
        logits = two.prefill(prompt)
        got = greedy_tokens(two, prompt, GREEDY)
        top2 = np.sort(want_logits[-1])[::-1][:2]
        result = {"session": session, "tokens_tp2": got, "tokens_tp1": want, "tokens_cpu": expect["tokens"],
                  "prefill_rel_diff_vs_tp1": _rel(logits, want_logits),
                  "equal_steps": next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), GREEDY),
                  "last_prompt_top2_gap_tp1": float(top2[0] - top2[1])}
        _record(f"tp2_vs_tp1_{session}", result)
        assert got == want, result
        assert result["prefill_rel_diff_vs_tp1"] < 2e-2, result
    finally:
        two.close()


# =============================================================================================
# make-bundle (CPU machine): the builds the GPU tests load


def make_bundle(out: Path, scheme: str = "smq_q8i8f16_3") -> None:
    import shutil  # pylint: disable=import-outside-toplevel
    import tempfile  # pylint: disable=import-outside-toplevel

    from conftest import make_hf_model, save_hf_model  # pylint: disable=import-outside-toplevel
    from test_build import byte_tokenizer  # pylint: disable=import-outside-toplevel

    from mlc_quant.cli import main as cli  # pylint: disable=import-outside-toplevel
    from mlc_quant.runner import load_built  # pylint: disable=import-outside-toplevel

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = save_hf_model(make_hf_model("llama", tie_word_embeddings=False), os.path.join(tmp, "m"))
        byte_tokenizer(256).save_pretrained(model)
        common = ["--model", model, "--quantization", scheme, "--max-seq-len", "128", "--calib-samples", "3",
                  "--calib-seq-len", "32", "--overwrite"]
        assert cli(["build", *common, "--output", str(out / "cpu")]) == 0
        assert cli(["build", *common, "--target", "cuda", "--output", str(out / "tp1")]) == 0
        assert cli(["build", *common, "--target", "cuda", "--tensor-parallel-shards", "2",
                    "--output", str(out / "tp2")]) == 0
        engine, _, _ = load_built(out / "cpu")
        prompt = [5, 17, 33, 101, 7, 250, 3]
        from test_cuda_build import greedy_tokens  # pylint: disable=import-outside-toplevel

        (out / "expect.json").write_text(json.dumps({"prompt": prompt, "scheme": scheme,
                                                     "tokens": greedy_tokens(engine, prompt, GREEDY)}))
    shutil.rmtree(out / "cpu")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="build what the tensor-parallel GPU tests need (CPU machine)")
    ap.add_argument("command", choices=["make-bundle"])
    ap.add_argument("out")
    ap.add_argument("--scheme", default="smq_q8i8f16_3")
    a = ap.parse_args()
    make_bundle(Path(a.out), a.scheme)
