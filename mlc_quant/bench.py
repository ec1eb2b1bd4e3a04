"""End-to-end GPU speed: ``mlc-quant bench build`` here, ``mlc-quant bench run`` on the GPU.

Build (CPU machine, full TVM + nvcc): for a model *config* (no weights) and each scheme, export
the fp16 CUDA model, apply the scheme's IR with a **synthetic quantization plan** (activation
scales from seeded random statistics, no smoothing: a speed benchmark measures the IR and the
kernels, not accuracy), dispatch every GEMM to the external kernels, compile, and write
``<out>/<config>/<scheme>/model.so`` + ``bench.json`` (config, scheme, weight names/shapes/dtypes).

Run (GPU machine, TVM runtime only): for each built library, make seeded random weights directly
on the GPU (torch when present, else numpy; 7B weights never travel), then measure in one process
on one card: prefill tokens/s at 128/512/2048 input tokens, decode tokens/s at batch 1, weight
bytes and peak device memory; a per-op breakdown through the VM's instrument hook and a
kernel-level one (CUPTI via torch.profiler: device time per kernel, GPU idle gaps, host-side CUDA
API time; plus each prefill's host issue time); and the same config in Hugging Face transformers
(torch fp16, eager and torch.compile) as the reference.

Timing: device work is asynchronous, so every timed region ends with a device synchronize; each
number is the median of ``repeat`` runs after ``warmup`` runs; prefill starts from an empty KV
cache each run; decode is ``decode_tokens`` steps after a 128-token prefill, feeding a fixed token
that already lives on the device (no host round trip per step), synchronized once at the end.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import pathlib
import statistics
import time
import zlib
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from mlc_quant.nvml import card_of_torch_device

log = logging.getLogger("mlc_quant")

LLAMA2_7B = {
    "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 4096, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}
SMQ_SCHEMES = ("smq_q8i8f16_0", "smq_q8i8f16_1", "smq_q8i8f16_2", "smq_q8i8f16_3")
DEFAULT_SCHEMES = ("q0f16",) + SMQ_SCHEMES
PREFILL_LENGTHS = (128, 512, 2048)
DECODE_PROMPT = 128  # decode is measured after a prefill of this many tokens
MANIFEST = "bench.json"


# ============================================================================ build (CPU machine)


def bench_config(name: str):
    """``llama2-7b``, ``smollm2`` (the bundled model's config), a config.json path or a model."""
    from mlc_quant.model.config import LlamaConfig  # pylint: disable=import-outside-toplevel

    if name in ("llama2-7b", "llama-2-7b"):
        return LlamaConfig(**LLAMA2_7B)
    from mlc_quant.model.loader import load_config  # pylint: disable=import-outside-toplevel

    if name.endswith(".json"):
        with open(name, encoding="utf-8") as f:
            raw = json.load(f)
        fields = LlamaConfig.__dataclass_fields__
        return LlamaConfig(**{k: v for k, v in raw.items() if k in fields})
    return load_config(name)


def synthetic_plan(mod, weight_names: Sequence[str], scheme, seed: int = 0):
    """An IRPlan with activation scales from seeded random per-channel statistics (static schemes)
    and no smoothing. For speed benchmarks only: the IR and the kernels are what is measured."""
    from mlc_quant.passes import AnnotateLinear, module_linears  # pylint: disable=import-outside-toplevel
    from mlc_quant.pipeline import IRPlan  # pylint: disable=import-outside-toplevel

    plan = IRPlan(scheme, list(weight_names))
    if scheme.static_activations:
        rng = np.random.default_rng(seed)
        sites = {s.name: s for ss in module_linears(AnnotateLinear(weight_names=list(weight_names))(mod)).values()
                 for s in ss}
        # linears that read the same x (q/k/v, gate/up) get the same scale, as calibration gives
        # them (same statistics, same smoothing), so MergeSiblingLinears can merge them
        by_input: Dict = {}
        for name in sorted(sites):
            key = (sites[name].func, sites[name].x)
            if key not in by_input:
                k = 64  # per-channel stats are reduced to a per-tensor scale: the width does not matter
                absmax = np.abs(rng.standard_normal(k)).astype(np.float32) * 2 + 0.5
                stats = {"absmax": absmax, "min": -absmax * rng.uniform(0.5, 1.0), "max": absmax}
                by_input[key] = scheme.act_qparams(stats)
            plan.act_qparams[name] = by_input[key]
    return plan


def build_one(config, scheme_name: str, out_dir, target: str = "cuda", seed: int = 0,
              strict: bool = True, cuda_graph: bool = False, merge_linears: Optional[bool] = None,
              tensor_parallel_shards: int = 1) -> Dict:
    """Build one benchmark library into ``out_dir``; returns its manifest.

    ``tensor_parallel_shards`` N > 1: the module of one shard (mlc_quant/sharding.py: H/N heads,
    I/N MLP width, all-reduce after o/down, the per-token absmax of o/down all-reduced for
    smq_q8i8f16_3), run on N GPUs by :class:`mlc_quant.disco.DiscoEngine`; the Disco NCCL plugin
    is written next to it."""
    import tvm  # pylint: disable=import-outside-toplevel

    from mlc_quant import pipeline  # pylint: disable=import-outside-toplevel
    from mlc_quant.build import parse_target  # pylint: disable=import-outside-toplevel
    from mlc_quant.cuda_dispatch import dispatch_gemms  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel
    from mlc_quant.schemes import get_scheme  # pylint: disable=import-outside-toplevel

    t0 = time.time()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tgt = parse_target(target)
    cuda = tgt.kind.name == "cuda"
    scheme = get_scheme(scheme_name)
    dtype = "float16" if cuda else "float32"  # a CPU build exists to test this module without a GPU
    mod, names = export_model(config, dtype, tgt if cuda else "llvm")
    shards = int(tensor_parallel_shards)
    if shards > 1:
        from mlc_quant import sharding  # pylint: disable=import-outside-toplevel
        from mlc_quant.model.llama import param_shapes  # pylint: disable=import-outside-toplevel

        plan = sharding.resolve_plan(config, list(param_shapes(config)), shards)
        smod, _ = export_model(sharding.shard_config(config, shards), dtype, tgt if cuda else "llvm")
        if scheme.quantizes:  # the synthetic plan of the whole model, replayed on the shard module
            qmod, _ = sharding.shard_module(smod, synthetic_plan(mod, names, scheme, seed), plan)
        else:
            qmod = sharding.insert_allreduce(smod, plan.row_linears)
    else:
        qmod = synthetic_plan(mod, names, scheme, seed).apply(mod) if scheme.quantizes else mod
    merges = []
    if cuda if merge_linears is None else merge_linears:  # q/k/v and gate/up as one linear each
        qmod, _, merges = pipeline.merge_linears(qmod, {}, scheme, pipeline.swiglu_interleave("cuda" if cuda else "llvm"))
    params = [(p.name, [int(d) for d in p.ty.shape.values], str(p.ty.dtype)) for p in qmod["prefill"].params[2:]]
    t1 = time.time()
    if cuda:
        # cuda_graph: TVM's RewriteCUDAGraph captures the static-shape regions (decode) once and
        # replays them, removing most per-kernel launch and VM overhead.
        with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": bool(cuda_graph)}):
            ex = tvm.compile(dispatch_gemms(qmod, strict=strict), tgt)
    else:
        ex = pipeline.build(qmod, "llvm")
    compile_s = time.time() - t1
    pipeline.export_library(ex, str(out / "model.so"), tgt)
    if shards > 1 and cuda:
        from mlc_quant.disco import PLUGIN_FILE, build_nccl_plugin  # pylint: disable=import-outside-toplevel

        build_nccl_plugin(out / PLUGIN_FILE)
    manifest = {
        "model_config": config.to_dict(), "scheme": scheme_name, "dtype": dtype, "target": target,
        "params": params, "synthetic_plan": bool(scheme.static_activations), "seed": seed,
        "cuda_graph": bool(cuda_graph), "merged_linears": [m.to_dict() for m in merges],
        "tensor_parallel": shards,
        "build": {"compile_s": round(compile_s, 1), "total_s": round(time.time() - t0, 1)},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    log.info("bench build %s/%s: %.0f s (compile %.0f s)", out.parent.name, scheme_name, time.time() - t0, compile_s)
    return manifest


def build_all(configs: Sequence[str], schemes: Sequence[str], out_root, target: str = "cuda",
              seed: int = 0, cuda_graph: bool = False, merge_linears: Optional[bool] = None,
              tensor_parallel_shards: int = 1) -> List[str]:
    done = []
    for cname in configs:
        config = bench_config(cname)
        for s in schemes:
            tp = f"-tp{tensor_parallel_shards}" if tensor_parallel_shards > 1 else ""
            d = pathlib.Path(out_root) / (_slug(cname) + tp) / s
            build_one(config, s, d, target, seed, cuda_graph=cuda_graph, merge_linears=merge_linears,
                      tensor_parallel_shards=tensor_parallel_shards)
            done.append(str(d))
    return done


def _slug(name: str) -> str:
    base = os.path.basename(str(name).rstrip("/"))
    return base.split(".")[0] or "model"


# ============================================================================ run (GPU machine)


class _Cuda:
    """cudaMemGetInfo / device facts through ctypes (works with TVM's runtime alone)."""

    def __init__(self):
        import ctypes  # pylint: disable=import-outside-toplevel

        self.lib = None
        for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        self.ctypes = ctypes

    def mem_info(self):
        if self.lib is None:
            return None, None
        free, total = self.ctypes.c_size_t(), self.ctypes.c_size_t()
        if self.lib.cudaMemGetInfo(self.ctypes.byref(free), self.ctypes.byref(total)) != 0:
            return None, None
        return free.value, total.value


def _torch():
    try:
        import torch  # pylint: disable=import-outside-toplevel

        return torch if torch.cuda.is_available() else None
    except Exception:  # pylint: disable=broad-except
        return None


def random_weight(name: str, shape, dtype: str, seed: int, device, torch=None):
    """Seeded random weights of a plausible scale, made on the device (torch) or on the host."""
    import tvm  # pylint: disable=import-outside-toplevel

    shape = tuple(int(s) for s in shape)
    sub = (zlib.crc32(name.encode()) & 0x7FFFFFFF) ^ seed  # stable across processes (hash() is salted)
    if torch is not None:
        g = torch.Generator(device="cuda")
        g.manual_seed(int(sub))
        if dtype == "int8":
            t = torch.randint(-127, 128, shape, dtype=torch.int8, device="cuda", generator=g)
        elif dtype == "int32":
            t = torch.randint(-8, 9, shape, dtype=torch.int32, device="cuda", generator=g)
        elif dtype == "float32":  # dequantize scales
            t = torch.rand(shape, dtype=torch.float32, device="cuda", generator=g) * 4e-5 + 2e-5
        else:
            t = torch.randn(shape, dtype=getattr(torch, dtype), device="cuda", generator=g) * 0.02
            if "norm" in name:
                t = t + 1.0
        try:
            return tvm.runtime.from_dlpack(t), t  # zero copy: the weights never leave the device
        except (RuntimeError, ValueError):  # e.g. a pointer not 64-byte aligned: copy instead
            out = tvm.runtime.empty(shape, dtype, device)
            out.copyfrom(t.cpu().numpy())
            return out, None
    rng = np.random.default_rng(sub)
    if dtype == "int8":
        a = rng.integers(-127, 128, shape, dtype=np.int8)
    elif dtype == "int32":
        a = rng.integers(-8, 9, shape).astype(np.int32)
    elif dtype == "float32":
        a = (rng.random(shape, dtype=np.float32) * 4e-5 + 2e-5).astype(np.float32)
    else:
        a = (rng.standard_normal(shape, dtype=np.float32) * 0.02 + (1.0 if "norm" in name else 0.0)).astype(dtype)
    return tvm.runtime.tensor(a, device), None


def _timed_call(fn, sync, setup=None, issue: Optional[List[float]] = None) -> float:
    """Wall time of ``fn()`` + device synchronize, ``setup()`` run untimed before; the time the
    host took to issue the work (until ``fn`` returned) is appended to ``issue`` when given."""
    if setup:
        setup()
    sync()
    t0 = time.perf_counter()
    fn()
    if issue is not None:
        issue.append(time.perf_counter() - t0)
    sync()
    return time.perf_counter() - t0


def _median_time(fn, sync, warmup: int, repeat: int, setup=None, samples: Optional[List[float]] = None) -> float:
    """Median wall time of ``fn()`` + device synchronize; ``setup()`` runs untimed before each;
    every timed run is appended to ``samples`` (seconds) when given."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    sync()
    times = [_timed_call(fn, sync, setup) for _ in range(repeat)]
    if samples is not None:
        samples.extend(times)
    return statistics.median(times)


def _decode_result(decode_run: Callable[[], float], warmup: int, repeat: int, decode_tokens: int) -> dict:
    """Median of ``decode_run`` (seconds for ``decode_tokens`` steps) after ``warmup`` runs, as the
    report's ``decode`` entry (every engine measured here, ours and transformers, the same way)."""
    for _ in range(warmup):
        decode_run()
    t = statistics.median([decode_run() for _ in range(max(repeat // 2, 2))])
    return {"batch": 1, "steps": decode_tokens, "ms_per_token": round(t / decode_tokens * 1e3, 3),
            "tokens_per_s": round(decode_tokens / t, 1)}


class OpProfile:
    """Per-op device time through the VM instrument hook (synchronize around every call)."""

    def __init__(self, dev):
        self.dev = dev
        self.total: Dict[str, float] = {}
        self.count: Dict[str, int] = {}
        self._t0 = 0.0

    def __call__(self, func, name, before, ret, *args):  # pylint: disable=unused-argument
        self.dev.sync()
        if before:
            self._t0 = time.perf_counter()
        else:
            dt = time.perf_counter() - self._t0
            key = _op_kind(str(name))
            self.total[key] = self.total.get(key, 0.0) + dt
            self.count[key] = self.count.get(key, 0) + 1
        return 0  # VMInstrumentReturnKind.kNoOp

    def table(self, top: int = 15) -> List[Dict]:
        s = sum(self.total.values()) or 1.0
        rows = sorted(self.total.items(), key=lambda kv: -kv[1])[:top]
        return [{"op": k, "ms": round(v * 1e3, 3), "calls": self.count[k], "share": round(v / s, 3)} for k, v in rows]


def kernel_kind(name: str) -> str:
    """One row per kernel family: TVM's per-layer copies share a name up to a numeric suffix; the
    C++ template kernels (CUTLASS, cuBLAS, ours) are named by their function up to the template
    arguments."""
    import re  # pylint: disable=import-outside-toplevel

    name = re.sub(r"^void ", "", name).replace("(anonymous namespace)::", "")
    name = name.split("<", 1)[0].split("(", 1)[0]
    return re.sub(r"\d+(_kernel)?$", r"\1", name)[:120]


def kernel_profile(fn, torch, top: int = 25) -> Dict:
    """Device time per kernel of one call of ``fn`` (CUPTI through torch.profiler: it records every
    kernel of the process, TVM's and the external ones, and nothing is synchronized between
    calls, so the sum is what the GPU spent, unlike the VM instrument profile)."""
    from torch.autograd import DeviceType  # pylint: disable=import-outside-toplevel
    from torch.profiler import ProfilerActivity, profile  # pylint: disable=import-outside-toplevel

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    total: Dict[str, float] = {}
    count: Dict[str, int] = {}
    spans = []
    api: Dict[str, float] = {}  # host side: CUDA runtime / driver calls (CUPTI records them too)
    first_api = None
    timeline = []  # (start, kind, name, us): what happens before the GPU gets going
    for e in prof.events():
        if getattr(e, "device_type", None) != DeviceType.CUDA:
            if str(e.name).startswith(("cuda", "cu", "cublas")):
                api[e.name] = api.get(e.name, 0.0) + e.time_range.elapsed_us()
                first_api = e.time_range.start if first_api is None else min(first_api, e.time_range.start)
                timeline.append((e.time_range.start, "host", str(e.name), e.time_range.elapsed_us()))
            continue
        timeline.append((e.time_range.start, "device", kernel_kind(e.name), e.time_range.elapsed_us()))
        key = kernel_kind(e.name)
        total[key] = total.get(key, 0.0) + e.time_range.elapsed_us()
        count[key] = count.get(key, 0) + 1
        spans.append((e.time_range.start, e.time_range.end, key))
    timeline.sort()
    # GPU idle time between kernels (the device waiting for the host), by the kernel before the gap
    spans.sort()
    idle: Dict[str, float] = {}
    end, prev = None, None
    for start, stop, key in spans:
        if end is not None and start > end:
            idle[prev] = idle.get(prev, 0.0) + (start - end)
        if end is None or stop > end:
            end, prev = stop, key
    s = sum(total.values())
    rows = sorted(total.items(), key=lambda kv: -kv[1])[:top]
    return {"wall_ms": round(wall * 1e3, 3), "kernel_ms": round(s / 1e3, 3), "kernels": sum(count.values()),
            "span_ms": round((spans[-1][1] - spans[0][0]) / 1e3, 3) if spans else 0.0,
            "idle_ms": round(sum(idle.values()) / 1e3, 3),
            "idle_after": [{"kernel": k, "ms": round(v / 1e3, 3)} for k, v in sorted(idle.items(), key=lambda kv: -kv[1])[:6]],
            "host_api": [{"call": k, "ms": round(v / 1e3, 3)} for k, v in sorted(api.items(), key=lambda kv: -kv[1])[:6]],
            "first_api_to_first_kernel_ms": (round((spans[0][0] - first_api) / 1e3, 3)
                                             if spans and first_api is not None else None),
            "first_events": [{"t_us": round(t - timeline[0][0], 1), "side": side, "name": name[:60], "us": round(us, 1)}
                             for t, side, name, us in timeline[:16]],
            "top": [{"kernel": k, "ms": round(v / 1e3, 3), "calls": count[k], "share": round(v / (s or 1.0), 3)}
                    for k, v in rows]}


def _op_kind(name: str) -> str:
    """Group per-layer instances of one op: strip numeric suffixes (fused_..._add3 -> fused_..._add)."""
    import re  # pylint: disable=import-outside-toplevel

    base = re.sub(r"\d+(_mlc_cutlass|_mlc_cublaslt)$", r"\1", name)
    return re.sub(r"\d+$", "", base)


class LoadedModel:  # pylint: disable=too-few-public-methods
    """One built library with seeded random weights on the device, and its forward step."""

    def __init__(self, lib_dir, dev, torch, seed: int, max_seq_len: int, prefill_chunk: int):
        from mlc_quant.runtime import Engine  # pylint: disable=import-outside-toplevel

        lib_dir = pathlib.Path(lib_dir)
        self.manifest = json.loads((lib_dir / MANIFEST).read_text())
        t0 = time.time()
        weights, self._keep = {}, []
        for name, shape, dtype in self.manifest["params"]:
            w, owner = random_weight(name, shape, dtype, seed, dev, torch)
            weights[name] = w
            self._keep.append(owner)
        self.weight_bytes = int(sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize
                                    for _, s, d in self.manifest["params"]))
        self.weights_made_s = round(time.time() - t0, 1)
        self.engine = Engine(str(lib_dir / "model.so"), weights, dev, max_seq_len=max_seq_len,
                             prefill_chunk_size=prefill_chunk, vocab_size=self.manifest["model_config"]["vocab_size"])
        self.step = self.engine.forward  # (fn, ids on the device, n): one prefill / decode call


def run_ours(lib_dir, lengths=PREFILL_LENGTHS, decode_tokens: int = 64, warmup: int = 2, repeat: int = 5,
             seed: int = 0, profile: bool = True) -> Dict:
    """Measure one built library (weights made on the device)."""
    import tvm  # pylint: disable=import-outside-toplevel

    lib_dir = pathlib.Path(lib_dir)
    man = json.loads((lib_dir / MANIFEST).read_text())
    on_gpu = str(man.get("target", "cuda")).startswith("cuda")
    if on_gpu:
        from mlc_quant.cuda_runtime import prepare_cuda_runtime  # pylint: disable=import-outside-toplevel

        prepare_cuda_runtime()
    dev = tvm.cuda(0) if on_gpu else tvm.cpu(0)
    cuda = _Cuda() if on_gpu else None
    torch = _torch() if on_gpu else None
    tvm.get_global_func("vm.builtin.memory_manager.clear")()
    free0, total = cuda.mem_info() if cuda else (None, None)
    max_len = max(max(lengths), DECODE_PROMPT)
    lm = LoadedModel(lib_dir, dev, torch, seed, max_len + decode_tokens + 16, max_len)
    engine, step = lm.engine, lm.step
    res = {"config": man["model_config"], "scheme": man["scheme"], "synthetic_plan": man["synthetic_plan"],
           "weight_bytes": lm.weight_bytes, "weights_made_s": lm.weights_made_s, "prefill": {}, "decode": {}}
    rng = np.random.default_rng(seed)
    vocab = man["model_config"]["vocab_size"]

    finite = True
    for n in lengths:
        ids = tvm.runtime.tensor(rng.integers(0, vocab, (1, n)).astype(np.int32), dev)

        def prefill(ids=ids, n=n):
            return step("prefill", ids, n)

        runs: List[float] = []
        t = _median_time(prefill, dev.sync, warmup, repeat, setup=engine.reset, samples=runs)
        res["prefill"][str(n)] = {"ms": round(t * 1e3, 3), "tokens_per_s": round(n / t, 1),
                                  "ms_samples": [round(x * 1e3, 3) for x in runs]}
        # How long the host takes to issue the prefill (the call returns before the GPU is done):
        # close to "ms" means the host, not the GPU, sets the pace.
        host: List[float] = []
        for _ in range(3):
            _timed_call(prefill, dev.sync, engine.reset, issue=host)
        res["prefill"][str(n)]["host_issue_ms"] = round(statistics.median(host) * 1e3, 3)
        if n == lengths[0]:
            engine.reset()
            logits = prefill()[0].numpy()
            finite = bool(np.isfinite(logits).all())
    tok = tvm.runtime.tensor(np.array([[7]], np.int32), dev)
    prompt = tvm.runtime.tensor(rng.integers(0, vocab, (1, DECODE_PROMPT)).astype(np.int32), dev)

    def decode_run():
        engine.reset()
        step("prefill", prompt, DECODE_PROMPT)
        dev.sync()
        t_start = time.perf_counter()
        for _ in range(decode_tokens):
            step("decode", tok, 1)
        dev.sync()
        return time.perf_counter() - t_start

    res["decode"] = _decode_result(decode_run, warmup, repeat, decode_tokens)
    free1, _ = cuda.mem_info() if cuda else (None, None)
    if free0 is not None and free1 is not None:
        # TVM pools device memory and does not return it, so what is in use now is its peak.
        res["peak_device_bytes"] = int(free0 - free1)
    res["logits_finite"] = finite
    if profile:
        res["profile"] = {}
        prof = OpProfile(dev)
        vm = engine.vm
        n = 2048 if 2048 in lengths else max_len
        ids = tvm.runtime.tensor(rng.integers(0, vocab, (1, n)).astype(np.int32), dev)
        vm.set_instrument(lambda *a: prof(*a))
        engine.reset()
        step("prefill", ids, n)
        dev.sync()
        res["profile"][f"prefill_{n}"] = prof.table()
        vm.set_instrument(lambda *args: 0)  # prefill of the prompt: not profiled
        engine.reset()
        step("prefill", prompt, DECODE_PROMPT)
        prof2 = OpProfile(dev)
        vm.set_instrument(lambda *a: prof2(*a))
        for _ in range(8):
            step("decode", tok, 1)
        dev.sync()
        res["profile"]["decode_8_steps"] = prof2.table()
        vm.set_instrument(lambda *args: 0)
    if profile and torch is not None:
        # Kernel-level device time (no synchronization inside): what holds each number back.
        res["kernel_profile"] = {}
        for n in lengths:
            ids = tvm.runtime.tensor(rng.integers(0, vocab, (1, n)).astype(np.int32), dev)
            engine.reset()
            res["kernel_profile"][f"prefill_{n}"] = kernel_profile(lambda ids=ids, n=n: step("prefill", ids, n), torch)
        engine.reset()
        step("prefill", prompt, DECODE_PROMPT)

        def decode_8():
            for _ in range(8):
                step("decode", tok, 1)

        res["kernel_profile"]["decode_8_steps"] = kernel_profile(decode_8, torch)
    del engine, step, lm
    gc.collect()
    if torch is not None:
        torch.cuda.empty_cache()
    tvm.get_global_func("vm.builtin.memory_manager.clear")()
    return res


def run_tp(lib_dir, lengths=PREFILL_LENGTHS, decode_tokens: int = 64, warmup: int = 2, repeat: int = 5,
           seed: int = 0, session: str = "thread", workers: Optional[int] = None, profile: bool = False) -> Dict:
    """Measure a tensor-parallel library (``bench build --tensor-parallel-shards N``) on N GPUs of
    this host through :class:`mlc_quant.disco.DiscoEngine`: the same timing as :func:`run_ours`
    (ids already on the devices, every timed region ends with a synchronize of every worker and
    its GPU), seeded random weights made on each worker's GPU. ``workers``: run on fewer workers
    than the library's shards (1: one shard's share of the work on one GPU, its all-reduces over
    one rank; a diagnosis of compute vs communication). ``profile``: per-op times of worker 0."""
    import tvm  # pylint: disable=import-outside-toplevel

    from mlc_quant.disco import PLUGIN_FILE, DiscoEngine  # pylint: disable=import-outside-toplevel

    lib_dir = pathlib.Path(lib_dir)
    man = json.loads((lib_dir / MANIFEST).read_text())
    n_shards = int(workers or man["tensor_parallel"])
    cuda = _Cuda()
    free0, _ = cuda.mem_info()
    max_len = max(max(lengths), DECODE_PROMPT)
    vocab = man["model_config"]["vocab_size"]
    t0 = time.time()
    engine = DiscoEngine(lib_dir / "model.so", {"kind": "random", "params": man["params"], "seed": seed}, n_shards,
                         session=session, plugin=str(lib_dir / PLUGIN_FILE), max_seq_len=max_len + decode_tokens + 16,
                         prefill_chunk_size=max_len, vocab_size=vocab)
    weight_bytes = int(sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, s, d in man["params"]))
    res = {"config": man["model_config"], "scheme": man["scheme"], "synthetic_plan": man["synthetic_plan"],
           "tensor_parallel": n_shards, "session": session, "cuda_graph": man.get("cuda_graph"),
           "weight_bytes_per_gpu": weight_bytes, "weight_bytes": weight_bytes * n_shards,
           "setup_s": round(time.time() - t0, 1), "nccl": engine.runtime_info.get("nccl"),
           "nccl_version": engine.runtime_info.get("nccl_version"), "prefill": {}, "decode": {}}
    rng = np.random.default_rng(seed)
    finite = True
    try:
        for n in lengths:
            ids = engine.broadcast_ids(rng.integers(0, vocab, (1, n)).astype(np.int32))

            def prefill(ids=ids, n=n):
                return engine.forward("prefill", ids, n)

            t = _median_time(prefill, engine.sync, warmup, repeat, setup=engine.reset)
            res["prefill"][str(n)] = {"ms": round(t * 1e3, 3), "tokens_per_s": round(n / t, 1)}
            if n == lengths[0]:
                engine.reset()
                logits = engine.prefill(rng.integers(0, vocab, n))
                finite = bool(np.isfinite(logits).all())
        tok = engine.broadcast_ids(np.array([[7]], np.int32))
        prompt = engine.broadcast_ids(rng.integers(0, vocab, (1, DECODE_PROMPT)).astype(np.int32))

        def decode_run():
            engine.reset()
            engine.forward("prefill", prompt, DECODE_PROMPT)
            engine.sync()
            t_start = time.perf_counter()
            for _ in range(decode_tokens):
                engine.forward("decode", tok, 1)
            engine.sync()
            return time.perf_counter() - t_start

        res["decode"] = _decode_result(decode_run, warmup, repeat, decode_tokens)
        free1, _ = cuda.mem_info()  # device 0 (TVM pools memory: in use now is its peak)
        if free0 is not None and free1 is not None:
            res["peak_device_bytes_gpu0"] = int(free0 - free1)
        res["logits_finite"] = finite
        if profile:
            n = max(lengths)
            engine.reset()
            ids = engine.broadcast_ids(rng.integers(0, vocab, (1, n)).astype(np.int32))
            res["profile"] = {f"prefill_{n}": engine.profile("prefill", ids, n)}
            engine.reset()
            engine.forward("prefill", prompt, DECODE_PROMPT)
            res["profile"]["decode_8_steps"] = engine.profile("decode", tok, 1, steps=8)
    finally:
        engine.close()
        gc.collect()
        tvm.get_global_func("vm.builtin.memory_manager.clear")()
        torch = _torch()
        if torch is not None:
            torch.cuda.empty_cache()
    return res


def run_interleaved(build_root, config: str, schemes: Optional[Sequence[str]] = None, lengths=PREFILL_LENGTHS,
                    decode_tokens: int = 64, rounds: int = 20, warmup: int = 3, seed: int = 0,
                    order: str = "blocks", warmup_s: float = 2.0) -> Dict:
    """Every scheme of one config loaded at once, each timed in its steady state: ``rounds``
    samples per scheme and length after at least ``warmup_s`` seconds of that scheme's own runs
    (``order="blocks"``; under sustained load the card runs into its power cap, and its clocks
    follow the load of the last few hundred ms, so a scheme timed right after another one starts
    in that one's state). ``order="turns"`` alternates instead: round ``r`` times each scheme once
    (its order rotated every round), which spreads slow drift of the card over all schemes but
    starts every sample in the previous scheme's power state. Keeps every sample and its host
    issue time; the ratios are those of the medians and, sample by sample, of the paired
    samples (their median and spread). With ``order="blocks"``, ``block_spans`` gives each
    block's wall-clock span (for ``scripts/power_by_block.py`` and an nvidia-smi log) and, where
    NVML is there, the card's joules per call over the block."""
    if order not in ("turns", "blocks"):
        raise ValueError(f"order must be 'turns' or 'blocks', not {order!r}")
    if rounds < 1 or warmup < 0 or warmup_s < 0:
        raise ValueError(f"rounds must be >= 1 and warmup, warmup_s >= 0 (got {rounds}, {warmup}, {warmup_s})")
    import tvm  # pylint: disable=import-outside-toplevel

    cdir = pathlib.Path(build_root) / config
    if not cdir.is_dir():
        raise FileNotFoundError(f"{cdir} does not exist: pass a --config that `bench build` wrote under {build_root}")
    dirs = sorted(d for d in cdir.iterdir() if (d / MANIFEST).is_file() and (schemes is None or d.name in schemes))
    names = [d.name for d in dirs]
    if "q0f16" not in names or len(names) < 2:
        raise ValueError(f"interleaved timing needs q0f16 and at least one other scheme under {cdir}; found {names}")
    on_gpu = str(json.loads((dirs[0] / MANIFEST).read_text()).get("target", "cuda")).startswith("cuda")
    if on_gpu:
        from mlc_quant.cuda_runtime import prepare_cuda_runtime  # pylint: disable=import-outside-toplevel

        prepare_cuda_runtime()
    dev = tvm.cuda(0) if on_gpu else tvm.cpu(0)
    torch = _torch() if on_gpu else None
    max_len = max(max(lengths), DECODE_PROMPT)
    models = {d.name: LoadedModel(d, dev, torch, seed, max_len + decode_tokens + 16, max_len) for d in dirs}
    vocab = models["q0f16"].manifest["model_config"]["vocab_size"]
    rng = np.random.default_rng(seed)
    samples: Dict[str, Dict[str, List[float]]] = {s: {} for s in names}
    issue: Dict[str, Dict[str, List[float]]] = {s: {} for s in names}  # host issue time of each sample

    def timed(fn, setup, record=None) -> float:
        return _timed_call(fn, dev.sync, setup, record)

    def prefill_of(m, ids, n):
        return (lambda: m.step("prefill", ids, n)), m.engine.reset

    tok = tvm.runtime.tensor(np.array([[7]], np.int32), dev)
    prompt = tvm.runtime.tensor(rng.integers(0, vocab, (1, DECODE_PROMPT)).astype(np.int32), dev)

    def decode_of(m):
        def setup():
            m.engine.reset()
            m.step("prefill", prompt, DECODE_PROMPT)

        def run():
            for _ in range(decode_tokens):
                m.step("decode", tok, 1)

        return run, setup

    cases = [(f"prefill_{n}", n) for n in lengths] + [("decode", None)]
    spans: List[Dict] = []
    card = card_of_torch_device(torch) if torch is not None else None  # NVML energy counter, or None
    for key, n in cases:
        ids = None if n is None else tvm.runtime.tensor(rng.integers(0, vocab, (1, n)).astype(np.int32), dev)
        fns = {s: (decode_of(m) if n is None else prefill_of(m, ids, n)) for s, m in models.items()}

        def warm(s) -> int:
            t_end, calls = time.perf_counter() + warmup_s, 0
            for _ in range(max(warmup, 1)):
                timed(*fns[s])
                calls += 1
            while time.perf_counter() < t_end:
                timed(*fns[s])
                calls += 1
            return calls

        for s in names:
            samples[s][key], issue[s][key] = [], []
        if order == "turns":
            for s in names:
                warm(s)
            for r in range(rounds):
                for s in names[r % len(names):] + names[:r % len(names)]:
                    samples[s][key].append(timed(*fns[s], issue[s][key]))
        else:  # "blocks": every sample of one scheme, then the next (what `bench run` does, one process)
            for s in names:
                t_warm, e0 = time.time(), card.energy_mj() if card else None
                n_warm = warm(s)
                t_samples = time.time()
                for _ in range(rounds):
                    samples[s][key].append(timed(*fns[s], issue[s][key]))
                # wall-clock spans, to line a block up with a power / clock log (nvidia-smi -lms),
                # and the card's energy per call over the warm-up and the samples (the reset
                # between calls included; NVML's counter moves in steps too coarse for the samples alone)
                spans.append({"scheme": s, "case": key, "warm_start": round(t_warm, 3),
                              "samples_start": round(t_samples, 3), "end": round(time.time(), 3),
                              "joules_per_call": (round((card.energy_mj() - e0) / 1e3 / (n_warm + rounds), 4)
                                                  if card else None)})
    out: Dict = {"device": _device_facts(), "config": config, "order": order, "rounds": rounds, "warmup": warmup,
                 "warmup_s": warmup_s,
                 "decode_tokens": decode_tokens, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "schemes": {},
                 "ratios": {}, "block_spans": spans}
    for s in names:
        out["schemes"][s] = {}
        for key, n in cases:
            t = samples[s][key]
            work = decode_tokens if n is None else n
            out["schemes"][s][key] = {"tokens_per_s": round(work / statistics.median(t), 1),
                                      "ms_median": round(statistics.median(t) * 1e3, 3),
                                      "ms_min": round(min(t) * 1e3, 3), "ms_max": round(max(t) * 1e3, 3),
                                      "ms_samples": [round(x * 1e3, 3) for x in t],
                                      "issue_ms_median": round(statistics.median(issue[s][key]) * 1e3, 3),
                                      "issue_ms_samples": [round(x * 1e3, 3) for x in issue[s][key]]}
    base = samples["q0f16"]
    for s in names:
        if s == "q0f16":
            continue
        out["ratios"][s] = {}
        for key, _ in cases:
            paired = sorted(b / x for b, x in zip(base[key], samples[s][key]))
            out["ratios"][s][key] = {
                "of_medians": round(statistics.median(base[key]) / statistics.median(samples[s][key]), 3),
                "paired_median": round(statistics.median(paired), 3),
                "paired_min": round(paired[0], 3), "paired_max": round(paired[-1], 3)}
    del models
    gc.collect()
    return out


def run_transformers(config: Dict, lengths=PREFILL_LENGTHS, decode_tokens: int = 64, warmup: int = 2,
                     repeat: int = 5, compile_mode: Optional[str] = None, seed: int = 0) -> Dict:
    """The same config in Hugging Face transformers, fp16, random weights, on cuda:0."""
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    cfg = transformers.LlamaConfig(
        hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"], num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"], vocab_size=config["vocab_size"],
        rms_norm_eps=config["rms_norm_eps"], rope_theta=config["rope_theta"],
        max_position_embeddings=max(config["max_position_embeddings"], 4096),
        tie_word_embeddings=config["tie_word_embeddings"],
    )  # default attention (sdpa): what a user of transformers gets
    torch.manual_seed(seed)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    dtype0 = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(dtype0)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    label = "eager" if compile_mode is None else f"compile-{compile_mode}"
    fwd = model if compile_mode is None else torch.compile(model, mode=compile_mode, dynamic=False)
    res = {"impl": f"transformers {transformers.__version__} fp16 {label}", "torch": torch.__version__,
           "weight_bytes": int(weight_bytes), "prefill": {}, "decode": {}}
    sync = torch.cuda.synchronize
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.inference_mode():
        for n in lengths:
            ids = torch.randint(0, cfg.vocab_size, (1, n), generator=g).cuda()
            t_c = time.time()
            t = _median_time(lambda ids=ids: fwd(input_ids=ids, use_cache=True), sync, warmup, repeat)
            res["prefill"][str(n)] = {"ms": round(t * 1e3, 3), "tokens_per_s": round(n / t, 1),
                                      "first_calls_s": round(time.time() - t_c, 1)}
        if compile_mode is None:
            prompt = torch.randint(0, cfg.vocab_size, (1, 128), generator=g).cuda()
            tok = torch.tensor([[7]], device="cuda")

            def decode_run():
                out = model(input_ids=prompt, use_cache=True)
                cache = out.past_key_values
                sync()
                t_start = time.perf_counter()
                for _ in range(decode_tokens):
                    out = model(input_ids=tok, past_key_values=cache, use_cache=True)
                    cache = out.past_key_values
                sync()
                return time.perf_counter() - t_start

            res["decode"] = _decode_result(decode_run, warmup, repeat, decode_tokens)
    res["peak_device_bytes"] = int(torch.cuda.max_memory_allocated())
    del model, fwd
    gc.collect()
    torch.cuda.empty_cache()
    return res


def run_all(build_root, out_json: Optional[str] = None, *, configs: Optional[Sequence[str]] = None,
            schemes: Optional[Sequence[str]] = None, lengths=PREFILL_LENGTHS, decode_tokens: int = 64,
            hf: bool = True, hf_compile: bool = True, profile: bool = True, budget_s: float = 1e9,
            seed: int = 0, tp_session: str = "thread") -> Dict:
    """Every built library under ``build_root`` (``<config>/<scheme>/``), then transformers."""
    root = pathlib.Path(build_root)
    t_start = time.time()
    out: Dict = {"device": _device_facts(), "runs": [], "reference": [], "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def save():
        if out_json:
            pathlib.Path(out_json).write_text(json.dumps(out, indent=1))

    cfg_dirs = sorted(d for d in root.iterdir() if d.is_dir() and (configs is None or d.name in configs))
    model_cfgs: Dict[str, Dict] = {}
    for cdir in cfg_dirs:
        for sdir in sorted(d for d in cdir.iterdir() if (d / MANIFEST).is_file()):
            if schemes is not None and sdir.name not in schemes:
                continue
            t0 = time.time()
            try:
                tp = int(json.loads((sdir / MANIFEST).read_text()).get("tensor_parallel", 1))
                r = (run_tp(sdir, lengths, decode_tokens, seed=seed, session=tp_session) if tp > 1
                     else run_ours(sdir, lengths, decode_tokens, seed=seed, profile=profile))
            except Exception as err:  # pylint: disable=broad-except
                import traceback  # pylint: disable=import-outside-toplevel

                traceback.print_exc()
                r = {"scheme": sdir.name, "error": repr(err)[:2000]}
            r["model"] = cdir.name
            r["wall_s"] = round(time.time() - t0, 1)
            out["runs"].append(r)
            if "config" in r:
                model_cfgs[cdir.name] = r["config"]
            _log_run(r)
            save()
    # The reference: transformers eager for every model first, torch.compile (slow to compile)
    # last, each started only while the time budget lasts.
    modes = ([None] + (["default"] if hf_compile else [])) if hf and _torch() is not None else []
    for mode in modes:
        for model, cfg in model_cfgs.items():
            if time.time() - t_start > budget_s:
                out["reference"].append({"model": model, "impl": f"transformers {mode or 'eager'}",
                                         "skipped": "time budget of the run"})
                continue
            # torch.compile compiles once per shape (minutes for 7B): the two long prefills only
            lens = lengths if mode is None else tuple(n for n in lengths if n >= 512) or lengths
            t0 = time.time()
            try:
                r = run_transformers(cfg, lens, decode_tokens, compile_mode=mode, seed=seed)
            except Exception as err:  # pylint: disable=broad-except
                r = {"impl": f"transformers {mode or 'eager'}", "error": repr(err)[:2000]}
            r["model"] = model
            r["wall_s"] = round(time.time() - t0, 1)
            out["reference"].append(r)
            _log_run(r)
            save()
    out["ratios"] = ratios(out)
    out["tensor_parallel_ratios"] = tp_ratios(out)
    save()
    return out


def tp_ratios(out: Dict) -> Dict:
    """N-GPU over 1-GPU tokens/s, per scheme: ``<config>-tp<N>`` runs vs ``<config>`` runs of the
    same call (same host, same kind of card)."""
    res: Dict = {}
    runs = {(r.get("model"), r.get("scheme")): r for r in out["runs"] if "error" not in r}
    for (model, scheme), r in sorted(runs.items()):
        if "-tp" not in str(model):
            continue
        base = runs.get((str(model).rsplit("-tp", 1)[0], scheme))
        if base is None:
            continue
        res[f"{model}/{scheme}"] = {
            **{f"prefill_{n}": round(r["prefill"][n]["tokens_per_s"] / base["prefill"][n]["tokens_per_s"], 3)
               for n in r["prefill"] if n in base["prefill"]},
            "decode": round(r["decode"]["tokens_per_s"] / base["decode"]["tokens_per_s"], 3),
        }
    return res


def _log_run(r: Dict) -> None:
    name = r.get("scheme") or r.get("impl")
    if "error" in r:
        print(f"[bench] {r.get('model')} {name}: ERROR {r['error'][:300]}", flush=True)
        return
    pre = " ".join(f"{n}:{v['tokens_per_s']:.0f}" for n, v in r["prefill"].items())
    dec = r["decode"].get("tokens_per_s", "-")
    mem = r.get("peak_device_bytes", r.get("peak_device_bytes_gpu0", 0)) / 2**30
    print(f"[bench] {r.get('model')} {name}: prefill tok/s {pre} | decode tok/s {dec} | weights "
          f"{r['weight_bytes'] / 2**30:.2f} GiB | peak {mem:.2f} GiB | {r.get('wall_s')} s", flush=True)


def ratios(out: Dict) -> Dict:
    """The issue's targets, per model: W8A8 vs our q0f16, our q0f16 vs transformers eager."""
    res: Dict = {}
    for model in sorted({r.get("model") for r in out["runs"]}):
        runs = {r["scheme"]: r for r in out["runs"] if r.get("model") == model and "error" not in r}
        ref = next((r for r in out["reference"] if r.get("model") == model and "eager" in r.get("impl", "")
                    and "error" not in r), None)
        base = runs.get("q0f16")
        if base is None:
            continue
        m: Dict = {}
        for s, r in runs.items():
            if s == "q0f16":
                continue
            m[s] = {
                **{f"prefill_{n}": round(r["prefill"][n]["tokens_per_s"] / base["prefill"][n]["tokens_per_s"], 3)
                   for n in r["prefill"] if n in base["prefill"]},
                "decode": round(r["decode"]["tokens_per_s"] / base["decode"]["tokens_per_s"], 3),
                "weight_memory": round(r["weight_bytes"] / base["weight_bytes"], 3),
            }
        if ref is not None:
            m["q0f16_vs_transformers_eager"] = {
                **{f"prefill_{n}": round(base["prefill"][n]["tokens_per_s"] / ref["prefill"][n]["tokens_per_s"], 3)
                   for n in base["prefill"] if n in ref["prefill"]},
                "decode": round(base["decode"]["tokens_per_s"] / ref["decode"]["tokens_per_s"], 3),
            }
        res[model] = m
    return res


def _device_facts() -> Dict:
    facts: Dict = {}
    try:
        import subprocess  # pylint: disable=import-outside-toplevel

        q = "name,memory.total,driver_version,clocks.sm,clocks.max.sm"
        facts["nvidia_smi"] = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                                             capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as err:  # pylint: disable=broad-except
        facts["nvidia_smi"] = repr(err)
    return facts


def format_interleaved(out: Dict) -> str:
    """tok/s per scheme and the ratios over q0f16 of an interleaved run."""
    schemes = list(out["schemes"])
    keys = list(out["schemes"][schemes[0]])
    lines = [f"{out['config']}, {out['rounds']} rounds in {out.get('order', 'turns')}, "
             f"{out['device'].get('nvidia_smi', '')}",
             "| scheme | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for s in schemes:
        lines.append(f"| {s} | " + " | ".join(f"{out['schemes'][s][k]['tokens_per_s']:.1f}" for k in keys) + " |")
    lines += ["", "ratio over q0f16: of medians (paired per round: median [min, max])",
              "| scheme | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for s, r in out["ratios"].items():
        lines.append(f"| {s} | " + " | ".join(
            f"{r[k]['of_medians']:.3f} ({r[k]['paired_median']:.3f} [{r[k]['paired_min']:.2f}, {r[k]['paired_max']:.2f}])"
            for k in keys) + " |")
    return "\n".join(lines)


def format_table(out: Dict) -> str:
    """Markdown table of a run_all result."""
    lines = ["| model | implementation | prefill 128 tok/s | prefill 512 | prefill 2048 | decode b=1 tok/s | "
             "weights GiB | peak GiB |", "|---|---|---|---|---|---|---|---|"]
    for r in out["runs"] + out["reference"]:
        name = r.get("scheme") or r.get("impl")
        if "error" in r or "skipped" in r:
            lines.append(f"| {r.get('model')} | {name} | {r.get('error', r.get('skipped'))[:80]} | | | | | |")
            continue
        p = r["prefill"]
        cell = [f"{p[n]['tokens_per_s']:.0f}" if n in p else "-" for n in ("128", "512", "2048")]
        dec = r["decode"].get("tokens_per_s")
        lines.append(f"| {r.get('model')} | {name} | {' | '.join(cell)} | {dec if dec else '-'} | "
                     f"{r['weight_bytes'] / 2**30:.2f} | "
                     f"{r.get('peak_device_bytes', r.get('peak_device_bytes_gpu0', 0)) / 2**30:.2f} |")
    return "\n".join(lines)


# ============================================================================ command line


def add_args(p) -> None:
    """``mlc-quant bench {build,run,table}`` (also ``scripts/bench.py``)."""
    sub = p.add_subparsers(dest="bench_command", required=True)
    b = sub.add_parser("build", help="compile benchmark libraries for CUDA (CPU machine, needs nvcc)")
    b.add_argument("--config", action="append", default=None,
                   help="llama2-7b, smollm2, a config.json or a model folder (repeatable; default: both named)")
    b.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES), help="comma-separated (default: q0f16 + every smq)")
    b.add_argument("--target", default="cuda", help="cuda (sm_90) or cuda:sm_XX")
    b.add_argument("--output", "-o", required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="compile with relax.backend.use_cuda_graph (default on: decode replays one graph "
                        "instead of ~550 launches per token; --no-cuda-graph for the plain VM)")
    b.add_argument("--merge-linears", action=argparse.BooleanOptionalAction, default=None,
                   help="merge q/k/v and gate/up into one linear each (default: on for CUDA builds)")
    b.add_argument("--tensor-parallel-shards", type=int, default=1,
                   help="N > 1: the shard module of N-GPU tensor parallelism (run through TVM Disco + NCCL), "
                        "written to <output>/<config>-tp<N>/<scheme>")
    r = sub.add_parser("run", help="measure the built libraries on the GPU (TVM runtime only) + transformers")
    r.add_argument("dir")
    r.add_argument("--json", default="bench.json")
    r.add_argument("--configs", default=None, help="comma-separated subfolders of DIR (default: all)")
    r.add_argument("--schemes", default=None)
    r.add_argument("--lengths", default=",".join(map(str, PREFILL_LENGTHS)))
    r.add_argument("--decode-tokens", type=int, default=64)
    r.add_argument("--no-hf", dest="hf", action="store_false", help="skip the transformers reference")
    r.add_argument("--no-compile", dest="hf_compile", action="store_false", help="skip torch.compile")
    r.add_argument("--no-profile", dest="profile", action="store_false")
    r.add_argument("--budget-s", type=float, default=1e9, help="skip further reference runs after this many seconds")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--tp-session", choices=["thread", "process"], default="thread",
                   help="Disco session of tensor-parallel libraries: one process (threads) or one per GPU")
    iv = sub.add_parser("interleave", help="one config's schemes loaded together, each timed in its steady state "
                                           "(or alternating with --order turns); every sample kept")
    iv.add_argument("dir")
    iv.add_argument("--config", default="llama2-7b", help="subfolder of DIR (default: llama2-7b)")
    iv.add_argument("--schemes", default=None, help="comma-separated (default: every built one; q0f16 is required)")
    iv.add_argument("--lengths", default=",".join(map(str, PREFILL_LENGTHS)))
    iv.add_argument("--decode-tokens", type=int, default=64)
    iv.add_argument("--rounds", type=int, default=20)
    iv.add_argument("--warmup", type=int, default=3)
    iv.add_argument("--order", choices=["turns", "blocks"], default="blocks",
                    help="blocks: all samples of one scheme, then the next (default); turns: one sample of each "
                         "scheme per round")
    iv.add_argument("--warmup-s", type=float, default=2.0,
                    help="warm each scheme up for at least this many seconds of its own runs, per length "
                         "(default 2: the card's steady state under load)")
    iv.add_argument("--json", default="interleave.json")
    t = sub.add_parser("table", help="markdown table of a bench JSON")
    t.add_argument("json")
    pl = sub.add_parser("plot", help="PNG of a bench JSON (needs matplotlib)")
    pl.add_argument("json")
    pl.add_argument("--output", "-o", required=True)


def main(args) -> int:
    if args.bench_command == "build":
        configs = args.config or ["llama2-7b", "smollm2"]
        done = build_all(configs, [s for s in args.schemes.split(",") if s], args.output, args.target, args.seed,
                         cuda_graph=args.cuda_graph, merge_linears=args.merge_linears,
                         tensor_parallel_shards=args.tensor_parallel_shards)
        print("\n".join(done))
        return 0
    if args.bench_command == "run":
        os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
        out = run_all(args.dir, args.json, configs=args.configs.split(",") if args.configs else None,
                      schemes=args.schemes.split(",") if args.schemes else None,
                      lengths=tuple(int(x) for x in args.lengths.split(",")), decode_tokens=args.decode_tokens,
                      hf=args.hf, hf_compile=args.hf_compile, profile=args.profile, budget_s=args.budget_s,
                      seed=args.seed, tp_session=args.tp_session)
        print(format_table(out))
        print(json.dumps(out.get("ratios", {}), indent=1))
        if out.get("tensor_parallel_ratios"):
            print(json.dumps({"tensor_parallel_ratios": out["tensor_parallel_ratios"]}, indent=1))
        return 0
    if args.bench_command == "interleave":
        os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
        out = run_interleaved(args.dir, args.config, args.schemes.split(",") if args.schemes else None,
                              tuple(int(x) for x in args.lengths.split(",")), args.decode_tokens, args.rounds,
                              args.warmup, order=args.order, warmup_s=args.warmup_s)
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1))
        print(format_interleaved(out))
        return 0
    out = json.loads(pathlib.Path(args.json).read_text())
    if args.bench_command == "plot":
        plot(out, args.output)
        print(f"wrote {args.output}")
        return 0
    print(format_table(out))
    return 0


def _interleave_as_runs(out: Dict) -> Dict:
    """``bench interleave`` output in ``bench run``'s shape (runs per scheme, no reference), for plot()."""
    runs = []
    for scheme, cases in out["schemes"].items():
        run = {"model": out.get("config", "?"), "scheme": scheme, "prefill": {}, "decode": {}}
        for key, v in cases.items():
            if key == "decode":
                run["decode"] = {"tokens_per_s": v["tokens_per_s"]}
            else:
                run["prefill"][key[len("prefill_"):]] = {"tokens_per_s": v["tokens_per_s"]}
        runs.append(run)
    return {"runs": runs, "reference": [], "device": out.get("device", {})}


def plot(out: Dict, path: str) -> None:
    """Bars per model: prefill tokens/s at each length and decode tokens/s, every implementation."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    if "schemes" in out:  # a `bench interleave` JSON: one config, every scheme in its steady state
        out = _interleave_as_runs(out)
    models = sorted({r.get("model") for r in out["runs"]})
    metrics = [("prefill", "128"), ("prefill", "512"), ("prefill", "2048"), ("decode", None)]
    fig, axes = plt.subplots(len(models), len(metrics), figsize=(4.2 * len(metrics), 3.6 * len(models)),
                             squeeze=False)
    for i, model in enumerate(models):
        rows = [r for r in out["runs"] + out["reference"]
                if r.get("model") == model and "error" not in r and "skipped" not in r]
        for j, (kind, n) in enumerate(metrics):
            ax = axes[i][j]
            names, vals = [], []
            for r in rows:
                v = r[kind].get(n, {}).get("tokens_per_s") if n else r[kind].get("tokens_per_s")
                if v:
                    names.append(r["scheme"] if "scheme" in r else "HF " + r["impl"].split()[-1])
                    vals.append(v)
            colors = ["#888888" if "eager" in nm or "compile" in nm else
                      ("#1f77b4" if nm == "q0f16" else "#d62728") for nm in names]
            ax.barh(range(len(vals)), vals, color=colors)
            ax.set_yticks(range(len(vals)))
            ax.set_yticklabels(names, fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{model}: {kind} {n or 'batch 1'} (tok/s)", fontsize=9)
            ax.tick_params(axis="x", labelsize=8)
    card = out.get("device", {}).get("nvidia_smi", "").split(",")[0]
    fig.suptitle(f"mlc-quant end-to-end on {card} (higher is better)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
