"""Layer-streamed calibration and quantization: host memory is one decoder block, not the model.

The whole-model path (``mlc_quant.build.build_model`` with ``--calibration whole``) loads every
weight, compiles one calibration module of the model and runs it. This module does the same
work one decoder block at a time (docs/design.md, "Layer-streamed calibration"):

1. the calibration ids are embedded (the embedding table alone is read), giving the first block's
   inputs ``[samples, seq, hidden]`` float32, held in an ``autoround.ActStore`` (a ``np.memmap``
   file above ``spill_mb``);
2. for each layer ``i``: only that layer's tensors are read from the weights file
   (``loader.load_params(..., names=...)``), a compiled *one-block* module (layer 0's weight
   names; CollectStats on it) prefills every sample, which gives the block's per-linear
   statistics and its float output; the output replaces the input in the store and is the next
   block's input (the float model's activations, what the whole-model path calibrates on).
   Smoothing is planned for the block's groups, the block's linears are quantized exactly as
   ``pipeline.quantize_module`` does (same groups, same order, same quantizer), and the block's
   deploy params are written to a shard file;
3. the final norm + LM head the same way (its smoothing folds into the final norm);
4. the deploy module is the whole exported model with the collected :class:`pipeline.IRPlan`
   applied (the plan holds only O(channels) numbers); ``params.safetensors`` is assembled from
   the shards one tensor at a time.

The smoothing groups (and how each folds) come from the IR of the whole model, which holds no
weights, so they are the whole-model path's groups by construction.

Decode-step statistics: the whole-model path prefills each sample's first ``seq - d`` tokens and
runs the last ``d`` through ``decode``. A decode step at position p computes the same activations
as row p of a prefill of the whole sequence (causal attention), so the streamed path prefills all
``seq`` tokens: the same rows in exact arithmetic; in float32 the decode kernels round
differently (tested: the statistics agree to 1e-5 relative, python/tests/test_streamed.py).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tvm
from tvm import IRModule, relax

from mlc_quant import artifact, pipeline
from mlc_quant.observers import ChannelStatsObserver
from mlc_quant.passes import AnnotateLinear, CollectStats, module_linears
from mlc_quant.passes.smooth_linear import SmoothGroup, find_smoothing_groups
from mlc_quant.progress import progress
from mlc_quant.schemes import QuantScheme, get_scheme
from mlc_quant.smoothing import group_key, plan_smoothing, smooth_params

log = logging.getLogger("mlc_quant")

EMBED = "model_embed_tokens_weight"
HEAD = "lm_head_weight"
FINAL_NORM = "model_norm_weight"
_LAYER = re.compile(r"model_layers_(\d+)_")
MODES = ("auto", "whole", "streamed")
DEFAULT_SPILL_MB = 1024  # activations above this go to a np.memmap file


def layer_of(name: str) -> Optional[int]:
    """Decoder layer of an IR param name (``model_layers_{i}_...``), None for embedding/norm/head."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def to_layer(name: str, layer: int) -> str:
    """Layer 0's name of a block weight -> layer ``layer``'s."""
    return _LAYER.sub(f"model_layers_{layer}_", name, count=1)


# --------------------------------------------------------------------------- the one-block module
def export_block_module(config) -> IRModule:
    """Relax functions that run one decoder block and the final norm + LM head, float32, CPU.

    ``block(x [1, n, hidden], kv, *layer-0 weights) -> (y, kv)`` is ``LlamaDecoderLayer`` of
    ``mlc_quant.model.llama`` with a one-layer paged KV cache (the same TIR attention the whole
    model runs); ``head(x [1, n, hidden], model_norm_weight, lm_head_weight | embedding)`` is the
    model's final norm and ``_logits``; ``create_paged_kv_cache`` as in the model.
    """
    from tvm.relax.frontend import nn  # pylint: disable=import-outside-toplevel
    from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache  # pylint: disable=import-outside-toplevel
    from tvm.target import Target  # pylint: disable=import-outside-toplevel

    from mlc_quant.model.flash_prefill import resolve_prefill_attention  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import LlamaDecoderLayer, LlamaForCausalLM, _rename_weights  # pylint: disable=import-outside-toplevel

    cfg1 = dataclasses.replace(config, num_hidden_layers=1)
    hidden = config.hidden_size
    run = {"param_mode": "plain", "effect_mode": "none"}

    class Trunk(nn.Module):
        def __init__(self):
            self.layers = nn.ModuleList([LlamaDecoderLayer(cfg1)])

    class BlockModel(nn.Module):
        def __init__(self):
            self.config = cfg1
            self.model = Trunk()
            self.dtype = "float32"
            self.target = Target("llvm")
            self.prefill_attention = resolve_prefill_attention(
                None, self.target, "float32", cfg1.num_attention_heads, cfg1.num_key_value_heads, cfg1.head_dim)

        def block(self, x, paged_kv_cache):
            return self.model.layers[0](x, paged_kv_cache, 0), paged_kv_cache

        create_paged_kv_cache = LlamaForCausalLM.create_paged_kv_cache

    class NormTrunk(nn.Module):
        def __init__(self):
            self.norm = nn.RMSNorm(hidden, -1, config.rms_norm_eps, bias=False)
            if config.tie_word_embeddings:
                self.embed_tokens = nn.Embedding(config.vocab_size, hidden)

    class HeadModel(nn.Module):
        def __init__(self):
            self.config = config
            self.model = NormTrunk()
            if not config.tie_word_embeddings:
                self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)

        def head(self, x):
            return LlamaForCausalLM._logits(self, self.model.norm(x))  # pylint: disable=protected-access

    x_spec = nn.spec.Tensor([1, "seq_len", hidden], "float32")
    block = BlockModel()
    mod, _ = block.export_tvm(spec=nn.spec.ModuleSpec.from_raw({
        "block": {"x": x_spec, "paged_kv_cache": nn.spec.Object(object_type=PagedKVCache), "$": run},
        "create_paged_kv_cache": {"max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
                                  "page_size": int, "$": {"param_mode": "none", "effect_mode": "none"}},
    }, block))
    head = HeadModel()
    head_mod, _ = head.export_tvm(spec=nn.spec.ModuleSpec.from_raw({"head": {"x": x_spec, "$": run}}, head))
    mod["block"] = _rename_weights(mod["block"], 2)
    mod["head"] = _rename_weights(head_mod["head"], 1)
    return mod


# --------------------------------------------------------------------------- results
@dataclass
class StreamedResult:
    """What :func:`quantize_streamed` produced: the IR plan (O(channels)), the statistics, and the
    deploy params in per-block safetensors shards under ``work_dir`` (read with :meth:`read`)."""

    plan: pipeline.IRPlan
    stats: Optional[ChannelStatsObserver]
    summary: Dict
    inv_scales: Dict[str, np.ndarray]
    index: Dict[str, Tuple[pathlib.Path, dict]] = field(default_factory=dict)  # param -> (shard, entry)
    peak_rss_mb: float = 0.0

    def names(self) -> List[str]:
        return list(self.index)

    def read(self, name: str) -> np.ndarray:
        if name not in self.index:
            raise KeyError(f"param {name!r} is not in the streamed shards (have {len(self.index)} params)")
        path, info = self.index[name]
        return artifact.read_tensor(path, info)


# --------------------------------------------------------------------------- checks
def unsupported(opts_like: Mapping) -> List[str]:
    """Build options the streamed path does not implement (each needs the whole model at once)."""
    why = []
    if opts_like.get("rotation", "none") != "none":
        why.append("--rotation (R1 is fused across every layer and the embedding)")
    if opts_like.get("weight_rounding", "rtn") != "rtn":
        why.append("--weight-rounding autoround (its own block-streamed torch pass)")
    if opts_like.get("alpha_search"):
        why.append("--alpha search (it captures activations of the whole model; pass fixed or per-group alphas)")
    if opts_like.get("tensor_parallel_shards", 1) != 1:
        why.append("--tensor-parallel-shards > 1")
    if opts_like.get("hooks"):
        why.append("on_quantized/capture hooks (the observatory needs the whole quantized module)")
    return why


def float_model_bytes(config) -> int:
    """Bytes of the model's float32 weights."""
    from mlc_quant.model.llama import param_shapes  # pylint: disable=import-outside-toplevel

    return sum(int(np.prod(s, dtype=np.int64)) * 4 for s in param_shapes(config).values())


def block_float_bytes(config) -> int:
    """Bytes of the largest streamed unit's float32 weights: a decoder block, the embedding, or the
    final norm + LM head."""
    from mlc_quant.model.llama import param_shapes  # pylint: disable=import-outside-toplevel

    per = {}
    for n, s in param_shapes(config).items():
        li = layer_of(n)
        key = li if li is not None else ("head" if n in (FINAL_NORM, HEAD) else "embed")
        per[key] = per.get(key, 0) + int(np.prod(s, dtype=np.int64)) * 4
    return max(per.values())


def memory_budget_mb() -> float:
    """Host memory a build may use: MemAvailable, capped by the address-space limit (ulimit -v)."""
    import resource  # pylint: disable=import-outside-toplevel

    avail = float("inf")
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) / 1024.0
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        avail = min(avail, soft / 2**20)
    return avail


# The whole-model path holds the float32 weights twice (numpy + the calibration VM's copies) on top
# of the process itself (TVM, LLVM, the tokenizer): measured 1.95 GB peak for SmolLM2-135M (0.54 GB
# of float32 weights), docs/accuracy.md.
WHOLE_PATH_FACTOR = 2.5
BASE_MB = 1200.0


def choose_mode(mode: str, config, budget_mb: Optional[float] = None, reasons: Sequence[str] = ()) -> str:
    """``auto``: ``streamed`` when the whole-model path would not fit ``budget_mb`` (default:
    :func:`memory_budget_mb`) and nothing in ``reasons`` (unsupported options) forbids it."""
    if mode not in MODES:
        raise ValueError(f"--calibration must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    need = BASE_MB + WHOLE_PATH_FACTOR * float_model_bytes(config) / 2**20
    budget = memory_budget_mb() if budget_mb is None or budget_mb <= 0 else budget_mb
    if need <= budget:
        return "whole"
    if reasons:
        log.warning("the whole-model build needs ~%.0f MB (budget %.0f MB) but the streamed one cannot do %s: "
                    "building whole", need, budget, "; ".join(reasons))
        return "whole"
    log.info("--calibration auto: the whole-model path needs ~%.0f MB, over the %.0f MB budget: streaming "
             "layer by layer", need, budget)
    return "streamed"


def _peak_rss_mb() -> float:
    import resource  # pylint: disable=import-outside-toplevel

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------- the streamed pass
def quantize_streamed(model: str, scheme, samples: Iterable[np.ndarray], work_dir, *, alpha=0.5,
                      smooth: bool = True, keep_float: Sequence[str] = (), deploy_dtype: str = "float32",
                      merges: Sequence = (), spill_mb: float = DEFAULT_SPILL_MB,
                      prefill_chunk_size: int = 2048, config=None, cache_dir=None) -> StreamedResult:
    """Calibrate and quantize ``model`` (HF folder, GGUF file or bundled name) one decoder block at
    a time; the deploy params land in per-block shards under ``work_dir``.

    ``samples``: token-id arrays (each one sequence, prefilled from position 0). ``alpha``: a float
    or ``{group_key: alpha}``. ``keep_float``: fnmatch patterns of weights left float (resolved
    names: pass ``lm_head_weight``/``model_embed_tokens_weight``, see ``build.resolve_keep_float``).
    ``deploy_dtype``: float16 casts the float params as the fp16 build does; ``merges``: the
    ``LinearMerge`` list of a merged deploy module (applied per block). Peak host memory: one
    block's float32 weights (a few copies) + the activations (``spill_mb`` caps what stays in RAM)
    + O(channels) statistics, whatever the number of layers. ``cache_dir``: keep the compiled
    one-block module there (it depends on the layer's shapes, not on the number of layers).
    """
    from mlc_quant.autoround import ActStore  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import export_model, param_shapes  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.loader import load_config, load_params, resolve_model  # pylint: disable=import-outside-toplevel
    from mlc_quant.passes.merge_sibling_linears import merge_params  # pylint: disable=import-outside-toplevel

    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    path = resolve_model(model)
    config = config or load_config(path)
    if deploy_dtype not in ("float32", "float16"):
        raise ValueError(f"deploy_dtype must be float32 or float16, got {deploy_dtype!r}")
    if isinstance(alpha, Mapping):
        for a in alpha.values():
            if not 0.0 <= float(a) <= 1.0:
                raise ValueError(f"alpha must be in [0, 1] (SmoothQuant migration strength), got {a}")
    elif callable(alpha):
        raise ValueError("the streamed build takes a float or per-group alphas, not an alpha search")
    elif not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (SmoothQuant migration strength), got {alpha}")
    if prefill_chunk_size < 1:
        raise ValueError(f"prefill_chunk_size must be positive, got {prefill_chunk_size}")
    work = pathlib.Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    # The whole model's IR (no weights): linears, smoothing groups and their fold, as quantize_module sees them.
    shapes = param_shapes(config)
    full_mod, _ = export_model(config, "float32", "llvm")
    full_mod = pipeline.annotate(full_mod, shapes, keep_float)
    sites = {s.name: s for ss in module_linears(full_mod).values() for s in ss}
    layouts = {n: s.transposed for n, s in sites.items()}
    plan = pipeline.IRPlan(scheme, pipeline.quantizable_weights(shapes, keep_float))
    summary = {"scheme": scheme.name, "alpha": "per-group" if isinstance(alpha, Mapping) else float(alpha),
               "smooth": bool(smooth and scheme.quantizes), "linears": len(sites), "calibration": "streamed"}
    if keep_float:
        summary["keep_float"] = list(keep_float)
    quantizes = scheme.quantizes
    smooth = bool(smooth and quantizes)
    groups = find_smoothing_groups(full_mod) if smooth else []
    if smooth and isinstance(alpha, Mapping):
        missing = [group_key(g.linears) for g in groups if g.fold != "skip" and group_key(g.linears) not in alpha]
        if missing:
            raise ValueError(f"per-group alphas lack smoothing groups {missing[:3]} (a config of another model?)")
        summary["group_alphas"] = {group_key(g.linears): float(alpha[group_key(g.linears)])
                                   for g in groups if g.fold != "skip"}
    need_stats = quantizes and (smooth or scheme.static_activations)
    n_layers = config.num_hidden_layers
    unit_of = {}  # param -> streamed unit: a layer index, "embed" or "head"
    for n in shapes:
        li = layer_of(n)
        unit_of[n] = li if li is not None else ("head" if n in (FINAL_NORM, HEAD) else "embed")
    if config.tie_word_embeddings:
        unit_of[EMBED] = "head"  # the table is the head's weight: quantized (and kept) there

    def unit_groups(unit) -> List[SmoothGroup]:
        return [g for g in groups if unit_of[g.linears[0]] == unit]

    # Token ids of every sample (small), then the first block's inputs.
    ids = [np.asarray(s).reshape(-1).astype(np.int64) for s in samples]
    if need_stats and not ids:
        raise ValueError("the calibration dataset gave no sample")
    if ids and len({len(s) for s in ids}) != 1:
        raise ValueError(f"calibration samples must have one length, got {sorted({len(s) for s in ids})}")
    for s in ids:
        if s.size and (s.min() < 0 or s.max() >= config.vocab_size):
            raise ValueError(f"calibration token ids must lie in [0, {config.vocab_size}), got "
                             f"[{s.min()}, {s.max()}]")
    observer = ChannelStatsObserver() if need_stats else None
    inv_scale: Dict[str, np.ndarray] = {}
    index: Dict[str, Tuple[pathlib.Path, dict]] = {}

    def read_unit(unit) -> Dict[str, np.ndarray]:
        names = [n for n in shapes if unit_of[n] == unit]
        return dict(load_params(path, config, "float32", names=names))

    def finish_unit(unit, params: Dict[str, np.ndarray]) -> None:
        """Smooth, quantize and write the params of one unit (its statistics are in the observer)."""
        unit_sites = {n: sites[n] for n in params if n in sites}
        ugroups = unit_groups(unit)
        if smooth and ugroups:
            stats = {n: observer.stats(n) for g in ugroups if g.fold != "skip" for n in g.linears}
            factors = plan_smoothing(ugroups, stats, params, layouts, alpha)
            params = smooth_params(params, ugroups, factors, layouts)
            pipeline.record_inv_scales(ugroups, factors, inv_scale, plan)
        out = dict(params)
        if quantizes and unit_sites:
            if scheme.static_activations:
                for n in unit_sites:
                    plan.act_qparams[n] = scheme.act_qparams(observer.stats(n), inv_scale.get(n))
            out.update(pipeline.rtn_weights(params, unit_sites, plan))
            for n in unit_sites:  # the float weight goes, unless something else reads it (a tied table)
                if n != EMBED:
                    out.pop(n)
        if deploy_dtype == "float16":
            out = {k: v.astype(np.float16) if v.dtype == np.float32 and not k.endswith(".scale") else v
                   for k, v in out.items()}
        if merges:
            out = merge_params(out, merges)
        shard = work / f"params-{unit}.safetensors"
        artifact.save_safetensors(shard, out)
        for name, info in artifact.safetensors_header(shard).items():
            index[name] = (shard, info)

    store = None
    stats_exe = stats_mod = None
    if need_stats:
        hidden = config.hidden_size
        store_bytes = len(ids) * len(ids[0]) * hidden * 4
        spill = store_bytes > spill_mb * 2**20
        store = ActStore((len(ids), len(ids[0]), hidden), work / "acts.npy" if spill else None)
        log.info("streamed calibration: %d samples x %d tokens, activations %.0f MB %s", len(ids), len(ids[0]),
                 store_bytes / 2**20, "on disk" if spill else "in memory")
        block_mod = export_block_module(config)
        names_all = [p.name for fn in ("block", "head") for p in block_mod[fn].params[(2 if fn == "block" else 1):]]
        block_mod = AnnotateLinear(weight_names=names_all)(block_mod)
        t0 = time.time()
        stats_mod = CollectStats(scheme.stat_kinds)(block_mod)
        stats_exe = _compiled_block(stats_mod, config, scheme, cache_dir)
        log.info("one-block calibration module ready in %.0f s", time.time() - t0)

    # 1. the embedding: the first block's inputs (the table alone is read)
    has_embed_unit = any(unit_of[n] == "embed" for n in shapes)
    emb_params = read_unit("embed") if has_embed_unit else {}
    if store is not None:
        table = emb_params.get(EMBED)
        if table is None:  # tied: the table is read with the head
            table = dict(load_params(path, config, "float32", names=[EMBED]))[EMBED]
        for i, s in enumerate(ids):
            store.array[i] = table[s]
        del table
    if has_embed_unit:
        finish_unit("embed", emb_params)
    del emb_params

    runner = _BlockRunner(stats_exe, stats_mod, len(ids[0]) if ids else 0, prefill_chunk_size) if store is not None else None
    bar = progress(range(n_layers), total=n_layers, desc="streamed calibration", unit="block")
    for layer in bar:
        t0 = time.time()
        params = read_unit(layer)
        if runner is not None:
            runner.run_block(layer, params, store, observer)
        finish_unit(layer, params)
        del params
        log.info("block %d/%d done in %.1f s (peak RSS so far %.0f MB)", layer + 1, n_layers, time.time() - t0,
                 _peak_rss_mb())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(rss_mb=f"{_peak_rss_mb():.0f}")
    head_params = read_unit("head")
    if runner is not None and any(n in sites for n in head_params):
        runner.run_head(head_params, store, observer)
    finish_unit("head", head_params)
    del head_params
    if store is not None:
        store.close()
    if observer is not None:
        never = sorted(set(sites) - set(observer.names()))
        if never:
            raise ValueError(f"streamed calibration never reached linears {never[:5]}")
        summary["calibration_batches"] = observer.num_updates
    if smooth:
        summary["smoothing_groups"] = {fold: sum(g.fold == fold for g in groups)
                                       for fold in ("norm", "linear", "none", "skip")}
    if plan.act_qparams:
        summary["activation_scales"] = {n: [a.scale, a.zero_point] for n, a in plan.act_qparams.items()}
    summary["stream_s"] = round(time.time() - t_start, 1)
    return StreamedResult(plan, observer, summary, inv_scale, index, _peak_rss_mb())


def _compiled_block(stats_mod: IRModule, config, scheme: QuantScheme, cache_dir=None):
    """The compiled one-block module; with ``cache_dir``, a shared library reused across builds of
    models with the same layer shapes (keyed by everything the module depends on)."""
    if cache_dir is None:
        return pipeline.build(stats_mod, "llvm")
    import hashlib  # pylint: disable=import-outside-toplevel
    import json  # pylint: disable=import-outside-toplevel

    from mlc_quant.cpu_schedule import host_target  # pylint: disable=import-outside-toplevel

    from mlc_quant import cpu_schedule  # pylint: disable=import-outside-toplevel

    # the module's text (shapes, stat kinds, KV cache kernels) and what compiles it
    key = {"ir": hashlib.sha256(stats_mod.script().encode()).hexdigest(), "tvm": tvm.__version__,
           "target": str(host_target()), "kinds": list(scheme.stat_kinds),
           "schedule": hashlib.sha256(pathlib.Path(cpu_schedule.__file__).read_bytes()).hexdigest()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    lib = pathlib.Path(cache_dir) / f"stream-block-{digest}.so"
    if lib.is_file():
        log.info("one-block calibration module from %s", lib)
        return tvm.runtime.load_module(str(lib))
    exe = pipeline.build(stats_mod, "llvm")
    lib.parent.mkdir(parents=True, exist_ok=True)
    part = lib.with_suffix(f".{os.getpid()}.tmp.so")
    exe.export_library(str(part))
    part.rename(lib)
    return tvm.runtime.load_module(str(lib))


class _BlockRunner:
    """Runs the compiled one-block module (CollectStats applied) over the activation store: one
    sequence at a time from position 0, in chunks of the whole-model Engine's prefill size."""

    def __init__(self, exe, stats_mod: IRModule, seq_len: int, chunk: int):
        import tvm_ffi  # pylint: disable=import-outside-toplevel

        from mlc_quant.calibration import stat_names  # pylint: disable=import-outside-toplevel

        self.dev = tvm.cpu()
        self.vm = relax.VirtualMachine(exe, self.dev)
        self.chunk = min(chunk, seq_len)
        self.shape = tvm_ffi.Shape
        self.kv = self.vm["create_paged_kv_cache"](self.shape([1]), self.shape([seq_len]),
                                                   self.shape([self.chunk]), self.shape([16]))
        self._begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
        self._end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
        self._clear = tvm.get_global_func("vm.builtin.kv_state_clear")
        self._add_seq = tvm.get_global_func("vm.builtin.kv_state_add_sequence")
        self.param_names = {fn: [p.name for p in stats_mod[fn].params[n_in:]] for fn, n_in in (("block", 2), ("head", 1))}
        self.stat_names = {fn: stat_names(stats_mod[fn]) for fn in ("block", "head")}

    def _tensors(self, fn: str, params: Mapping[str, np.ndarray], rename: Callable[[str], str]):
        return [tvm.runtime.tensor(np.ascontiguousarray(params[rename(n)]), self.dev) for n in self.param_names[fn]]

    def run_block(self, layer: int, params, store, observer) -> None:
        """Statistics of layer ``layer`` into ``observer``; the store's inputs become its outputs."""
        wargs = self._tensors("block", params, lambda n: to_layer(n, layer))
        names = [to_layer(n, layer) for n in self.stat_names["block"]]
        for i in range(store.shape[0]):
            x = store.array[i]
            self._clear(self.kv)
            self._add_seq(self.kv, 0)
            outs = []
            for j in range(0, x.shape[0], self.chunk):
                xs = np.ascontiguousarray(x[None, j:j + self.chunk])
                self._begin(self.kv, self.shape([0]), self.shape([xs.shape[1]]))
                out = self.vm["block"](tvm.runtime.tensor(xs, self.dev), self.kv, *wargs)
                self._end(self.kv)
                observer.update_from_outputs(names, [t.numpy() for t in out[1]])
                outs.append(out[0][0].numpy()[0])
            store.array[i] = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)

    def run_head(self, params, store, observer) -> None:
        """Statistics of the LM head's input (the final norm of the last block's outputs)."""
        wargs = self._tensors("head", params, lambda n: n)
        for i in range(store.shape[0]):
            x = store.array[i]
            for j in range(0, x.shape[0], self.chunk):
                out = self.vm["head"](tvm.runtime.tensor(np.ascontiguousarray(x[None, j:j + self.chunk]), self.dev),
                                      *wargs)
                observer.update_from_outputs(self.stat_names["head"], [t.numpy() for t in out[1]])


# --------------------------------------------------------------------------- the build
def deploy_merges(config, scheme: QuantScheme, keep_float, smooth: bool, deploy_dtype: str, target):
    """The ``LinearMerge`` list MergeSiblingLinears makes on the deploy module, found before any
    statistics exist: the merges depend on the IR's structure only, so a plan with placeholder
    numbers (activation scale 1, explicit smoothing by ones where the real plan has it) gives them."""
    from mlc_quant.model.llama import export_model, param_shapes  # pylint: disable=import-outside-toplevel
    from mlc_quant.schemes import ActQParams  # pylint: disable=import-outside-toplevel

    shapes = param_shapes(config)
    mod = pipeline.annotate(export_model(config, "float32", "llvm")[0], shapes, keep_float)
    sites = {s.name: s for ss in module_linears(mod).values() for s in ss}
    plan = pipeline.IRPlan(scheme, pipeline.quantizable_weights(shapes, keep_float))
    if smooth and scheme.quantizes:
        for g in find_smoothing_groups(mod):
            if g.fold == "none":
                for n in g.linears:
                    plan.explicit_inv_scales[n] = np.ones(sites[n].in_features, np.float32)
    if scheme.static_activations:
        plan.act_qparams = {n: ActQParams(1.0, 0) for n in sites}
    qmod = plan.apply(export_model(config, deploy_dtype, target)[0])
    return pipeline.merge_linears(qmod, {}, scheme, pipeline.swiglu_interleave(target))[2]


def write_deploy_params(result: StreamedResult, config, scheme: QuantScheme, deploy_dtype: str, target,
                        merges: Optional[Sequence], path) -> Tuple[IRModule, List[str]]:
    """The deploy module (the exported model with the streamed plan applied, merged if ``merges``
    is not None) and ``params.safetensors`` at ``path``, assembled from the shards one tensor at a
    time in the module's parameter order. Returns (module, parameter order)."""
    from mlc_quant.model.llama import export_model  # pylint: disable=import-outside-toplevel

    qmod = result.plan.apply(export_model(config, deploy_dtype, target)[0])
    if merges is not None:
        qmod, _, real = pipeline.merge_linears(qmod, {}, scheme, pipeline.swiglu_interleave(target))
        if [m.to_dict() for m in real] != [m.to_dict() for m in merges]:
            raise RuntimeError("streamed build: the deploy module's sibling merges differ from those planned "
                               "before calibration")
    param_order = [p.name for p in qmod["prefill"].params[2:]]
    missing = [n for n in param_order if n not in result.index]
    if missing:
        raise RuntimeError(f"streamed build: params {missing[:5]} of the deploy module were not written")
    specs = [(n, result.index[n][1]["dtype"], result.index[n][1]["shape"]) for n in param_order]
    artifact.save_safetensors_streamed(path, specs, result.read, metadata={"format": "mlc-quant",
                                                                           "scheme": scheme.name})
    return qmod, param_order


def build_streamed(opts, path: str, config, scheme: QuantScheme, target, alpha, t_start: float) -> str:
    """``build_model`` with ``--calibration streamed``: the same artifact, built block by block
    (the caller checked the options; see :func:`unsupported`)."""
    import json  # pylint: disable=import-outside-toplevel

    from mlc_quant.build import _deploy_dtype, config_record, resolve_keep_float  # pylint: disable=import-outside-toplevel
    from mlc_quant.datasets import calibration_samples  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.llama import param_shapes  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.tokenizer import load_tokenizer, save_tokenizer  # pylint: disable=import-outside-toplevel

    deploy_dtype = _deploy_dtype(opts.dtype, target)
    smooth = opts.smooth and scheme.act != "none"
    keep_float = resolve_keep_float(opts.keep_float, param_shapes(config))
    merge = target.kind.name == "cuda" if opts.merge_linears is None else opts.merge_linears
    with artifact.atomic_output_dir(opts.output, opts.overwrite) as tmp:
        tokenizer = load_tokenizer(path)
        merges = deploy_merges(config, scheme, keep_float, smooth, deploy_dtype, target) if merge else []
        samples = calibration_samples(opts.dataset, tokenizer, config.vocab_size, opts.calib_samples,
                                      opts.calib_seq_len, seed=opts.seed)
        work = tmp / ".stream"
        try:
            result = quantize_streamed(path, scheme, samples, work, alpha=alpha, smooth=smooth, keep_float=keep_float,
                                       deploy_dtype=deploy_dtype, merges=merges, spill_mb=opts.calibration_spill_mb,
                                       prefill_chunk_size=min(opts.calib_seq_len, 2048), config=config)
            calib_s = time.time() - t_start
            qmod, param_order = write_deploy_params(result, config, scheme, deploy_dtype, target, merges if merge else None,
                                                    tmp / artifact.PARAMS_FILE)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        t0 = time.time()
        exe = pipeline.build(qmod, target)
        compile_s = time.time() - t0
        pipeline.export_library(exe, str(tmp / artifact.LIB_FILE), target)
        save_tokenizer(tokenizer, tmp)
        summary = dict(result.summary, weight_rounding="rtn", rotation={"mode": "none"})
        cfg = config_record(
            opts, config, summary, result.stats, target, deploy_dtype, param_order, merges, calib_s, compile_s,
            t_start, calibration={"mode": "streamed", "decode_steps": 0,
                                  "note": "prefill of every sample's full sequence: covers the rows decode steps would compute"},
            build={"stream_peak_rss_mb": round(result.peak_rss_mb),
                   "float_model_mb": round(float_model_bytes(config) / 2**20)})
        (tmp / artifact.CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
        log.info("built %s (streamed) in %.0f s (peak RSS %.0f MB)", opts.output, time.time() - t_start,
                 _peak_rss_mb())
    return opts.output
