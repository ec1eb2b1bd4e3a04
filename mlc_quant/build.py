"""Build a Llama-family LLM: load, calibrate over prefill + decode, quantize, compile, write DIR.

``scripts/build.py`` and ``mlc-quant build`` are thin command lines over :func:`build_model`.
The steps themselves live in ``mlc_quant.pipeline``; this module feeds them a real model.
"""
from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import tvm

from mlc_quant import alpha_search, artifact, autoround, pipeline, rotation, sharding, streamed
from mlc_quant.calibration import stat_names
from mlc_quant.datasets import calibration_samples
from mlc_quant.observers import ChannelStatsObserver
from mlc_quant.progress import progress
from mlc_quant.schemes import get_scheme

log = logging.getLogger("mlc_quant")


@dataclass
class BuildOptions:
    model: str = "smollm2"
    quantization: str = "smq_q8i8f16_2"
    output: str = ""
    alpha: Union[float, str] = 0.5  # a float, "search" (per-group grid search) or a config/JSON of group alphas
    alpha_grid: Tuple[float, ...] = alpha_search.DEFAULT_GRID  # the grid of --alpha search
    alpha_rows: int = 256  # calibration rows per linear input the search keeps (group objective)
    alpha_objective: str = "block"  # block (decoder block output MSE; group where it cannot) or group
    alpha_block_samples: int = 4  # calibration sequences of the block objective
    alpha_block_seq_len: int = 128  # their length (tokens)
    smooth: bool = True
    max_seq_len: int = 2048
    dataset: str = "dummy"
    calib_samples: int = 16
    calib_seq_len: int = 512
    calib_decode_steps: int = 4
    target: str = "llvm"
    overwrite: bool = False
    seed: int = 0
    rotation: str = "none"  # SpinQuant rotations: none, r1r2, r1r2r4, all (mlc_quant/rotation.py)
    rotation_kind: str = "hadamard"  # fused R1/R2 matrices: hadamard or random-orthogonal
    weight_rounding: str = "rtn"  # rtn or autoround (mlc_quant/autoround.py); q4f16_autoround implies autoround
    autoround_preset: str = "fast"  # fast (CPU) or paper (the reference defaults)
    # RTN weight range (schemes.WEIGHT_CLIPS): absmax, or mse = per-channel clip ratio of least
    # squared weight error (W8A8/W4A8/W4A4 schemes with rtn rounding)
    weight_clip: str = "absmax"
    # weights whose linears stay float (fnmatch patterns of IR param names; "lm_head" names the LM
    # head whether tied to the embedding or not); default: every linear is quantized
    keep_float: Tuple[str, ...] = ()
    # Megatron tensor parallelism over N devices (mlc_quant/sharding.py; Disco + NCCL at run time)
    tensor_parallel_shards: int = 1
    # compute dtype of the built model: auto = float16 on CUDA, float32 on the CPU; float16 on the
    # CPU computes what the CUDA build computes (to compare targets, or to halve CPU weight memory)
    dtype: str = "auto"
    # one wide linear for q/k/v and for gate/up (passes/merge_sibling_linears.py); None: CUDA only
    merge_linears: Optional[bool] = None
    # whole (load the float model, calibrate it at once), streamed (one decoder block at a time:
    # mlc_quant/streamed.py) or auto (streamed when the whole-model path would not fit the budget)
    calibration: str = "auto"
    calibration_budget_mb: float = 0.0  # auto's memory budget; 0: MemAvailable capped by ulimit -v
    calibration_spill_mb: float = 1024.0  # streamed: activations above this go to a file


def _rtn_quantizer(scheme, clip: str, rounding: str):
    """The RTN weight quantizer of ``--weight-clip``; a clear error where the clip does not apply."""
    from mlc_quant.schemes import QuantScheme, check_weight_clip

    if check_weight_clip(clip) != "absmax":
        if not scheme.quantizes or type(scheme).quantize_weight is not QuantScheme.quantize_weight:
            raise ValueError(f"--weight-clip {clip} applies to the W8A8/W4A8/W4A4 schemes, not {scheme.name}")
        if rounding != "rtn":
            raise ValueError(f"--weight-clip {clip} goes with --weight-rounding rtn (AutoRound learns its own "
                             "clipping)")
    return pipeline.make_rtn_weights(clip)


def resolve_keep_float(patterns, params) -> Tuple[str, ...]:
    """``lm_head`` -> the LM head's weight: its own (untied, or untied by rotation) or the embedding."""
    head = "lm_head_weight" if "lm_head_weight" in params else "model_embed_tokens_weight"
    return tuple(head if p == "lm_head" else p for p in patterns)


def parse_target(spec: str) -> tvm.target.Target:
    """``llvm``, ``cuda`` (sm_90) or ``cuda:sm_XX``; anything else through tvm.target.Target."""
    host = {"kind": "llvm"}
    if spec == "cuda" or spec.startswith("cuda:"):
        arch = spec.split(":", 1)[1] if ":" in spec else "sm_90"
        return tvm.target.Target({"kind": "cuda", "arch": arch}, host=host)
    try:
        return tvm.target.Target(spec)
    except Exception as err:  # TVM raises several error types for a bad spec
        raise ValueError(f"unknown --target {spec!r}: use llvm, cuda or cuda:sm_XX ({err})") from None


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _calibrator(opts: BuildOptions, config, params: Dict[str, np.ndarray], tokenizer):
    """Calibration over the dataset: each sample is prefilled, then continued by decode steps."""
    from mlc_quant.runtime import Engine

    def calibrate(stats_mod: tvm.IRModule, funcs: List[str]) -> ChannelStatsObserver:
        observer = ChannelStatsObserver()
        names = {fn: stat_names(stats_mod[fn]) for fn in funcs}

        def on_stats(fn: str, values: List[np.ndarray]) -> None:
            observer.update_from_outputs(names[fn], values)

        t0 = time.time()
        exe = pipeline.build(stats_mod, "llvm")
        log.info("compiled the calibration module in %.0f s", time.time() - t0)
        engine = Engine(exe, params, max_seq_len=opts.calib_seq_len, stats_callback=on_stats,
                        vocab_size=config.vocab_size)
        samples = calibration_samples(opts.dataset, tokenizer, config.vocab_size, opts.calib_samples,
                                      opts.calib_seq_len, seed=opts.seed)
        decode_steps = min(opts.calib_decode_steps, opts.calib_seq_len - 1)
        count = 0
        for ids in progress(samples, total=opts.calib_samples, desc="calibrating", unit="sample"):
            engine.reset()
            engine.prefill(ids[: len(ids) - decode_steps])
            for token in ids[len(ids) - decode_steps:]:
                engine.decode(int(token))
            count += 1
        if count == 0:
            raise ValueError(f"dataset {opts.dataset!r} gave no calibration sample")
        return observer

    return calibrate


def _capturer(opts: BuildOptions, config, tokenizer) -> Callable:
    """capture(mod, params): sampled linear inputs on the calibration data (for --alpha search)."""
    from mlc_quant.capture import capture_activations

    def capture(mod: tvm.IRModule, params: Dict[str, np.ndarray]):
        samples = calibration_samples(opts.dataset, tokenizer, config.vocab_size, opts.calib_samples,
                                      opts.calib_seq_len, seed=opts.seed)
        return capture_activations(mod, params, samples, opts.calib_samples, max_rows=opts.alpha_rows,
                                   seed=opts.seed, max_seq_len=opts.calib_seq_len, vocab_size=config.vocab_size)

    return capture


def _block_data(opts: BuildOptions, config, tokenizer) -> Callable:
    """block_data() for the block objective of --alpha search: (config, ids [samples, seq])."""

    def block_data():
        seq = min(opts.alpha_block_seq_len, opts.calib_seq_len)
        ids = [s[:seq] for s in calibration_samples(opts.dataset, tokenizer, config.vocab_size,
                                                    min(opts.alpha_block_samples, opts.calib_samples),
                                                    opts.calib_seq_len, seed=opts.seed)]
        return config, np.stack(ids).astype(np.int64)

    return block_data


def _deploy_dtype(dtype: str, target) -> str:
    """auto: float16 on CUDA (the fast path), float32 on the CPU. ``--dtype float32`` on CUDA keeps
    every activation in fp32 (int8 GEMMs dequantize to fp32 through cuBLASLt + the epilogue
    kernel, attention on TVM's kernels): slower, but it computes what the fp32 CPU build does."""
    if dtype == "auto":
        return "float16" if target.kind.name == "cuda" else "float32"
    return dtype


def config_record(opts: BuildOptions, config, summary: dict, stats, target, deploy_dtype: str, param_order,
                  merges, calib_s: float, compile_s: float, t_start: float, *, calibration: Optional[dict] = None,
                  build: Optional[dict] = None) -> dict:
    """The artifact's mlc-quant-config.json (whole-model and streamed builds alike)."""
    summary = dict(summary)
    summary.pop("activation_scales", None)  # kept in the IR constants; too long for the config
    return {
        "mlc_quant_version": __import__("mlc_quant").__version__,
        "model": opts.model,
        "model_config": config.to_dict(),
        "quantization": summary,
        "calibration": {"dataset": opts.dataset, "samples": opts.calib_samples, "seq_len": opts.calib_seq_len,
                        "seed": opts.seed, "stats_bytes": stats.nbytes() if stats is not None else 0,
                        **(calibration or {})},
        "target": str(target.kind.name), "target_spec": opts.target, "dtype": deploy_dtype,
        "max_seq_len": opts.max_seq_len,
        "params": list(param_order),
        "merged_linears": [m.to_dict() for m in merges],
        "build": {"calibrate_s": round(calib_s, 1), "compile_s": round(compile_s, 1),
                  "total_s": round(time.time() - t_start, 1), "peak_rss_mb": round(_peak_rss_mb()), **(build or {})},
    }


def build_model(opts: BuildOptions, on_quantized: Optional[Callable] = None,
                capture: Optional[Callable] = None) -> str:
    """Build ``opts.model`` with ``opts.quantization`` into ``opts.output``; returns the path.

    ``on_quantized(result: pipeline.QuantizeResult)`` is called once the model is quantized (the
    observatory measures per-layer errors there); ``capture(mod, params)`` replaces the
    activation capture of ``--alpha search`` (the observatory passes the one it already has).
    """
    from mlc_quant.model.llama import export_model
    from mlc_quant.model.loader import load_config, load_params_dict, resolve_model
    from mlc_quant.model.tokenizer import load_tokenizer, save_tokenizer

    t_start = time.time()
    scheme = get_scheme(opts.quantization)
    target = parse_target(opts.target)
    if not opts.output:
        raise ValueError("--output DIR is required")
    path = resolve_model(opts.model)
    config = load_config(path)
    if opts.dtype not in ("auto", "float32", "float16"):
        raise ValueError(f"--dtype must be auto, float32 or float16, got {opts.dtype!r}")
    rot = rotation.Rotation(opts.rotation, opts.rotation_kind, opts.seed)
    rotation.check_supported(config, rot)  # a size without a matrix fails before any heavy work
    tp = sharding.check_build(config, opts.tensor_parallel_shards, target, rot)  # None: not sharded
    rounding = autoround.build_rounding(scheme, opts.weight_rounding, opts.autoround_preset, opts.rotation)
    quantize_rtn = _rtn_quantizer(scheme, opts.weight_clip, rounding)  # a bad --weight-clip fails early
    if opts.max_seq_len > config.max_position_embeddings:
        raise ValueError(f"--max-seq-len={opts.max_seq_len} exceeds the model's maximum "
                         f"{config.max_position_embeddings} (max_position_embeddings)")
    if opts.max_seq_len < 1:
        raise ValueError(f"--max-seq-len must be at least 1, got {opts.max_seq_len}")
    if scheme.act != "none" and opts.calib_seq_len > config.max_position_embeddings:  # q0f32/W4: no calibration
        raise ValueError(f"--calib-seq-len={opts.calib_seq_len} must be at most the model's "
                         f"{config.max_position_embeddings}")
    alpha_spec = alpha_search.resolve_alpha(opts.alpha, capture=lambda *a: None)  # bad --alpha fails early
    if opts.alpha_objective not in alpha_search.OBJECTIVES:
        raise ValueError(f"unknown alpha objective {opts.alpha_objective!r}; valid: {', '.join(alpha_search.OBJECTIVES)}")
    if isinstance(alpha_spec, float) and not 0.0 <= alpha_spec <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], 'search' or a config with group alphas, got {opts.alpha}")
    hooks = on_quantized is not None or capture is not None
    why_not = streamed.unsupported({"rotation": opts.rotation, "weight_rounding": rounding,
                                    "alpha_search": isinstance(alpha_spec, alpha_search.AlphaSearch),
                                    "tensor_parallel_shards": opts.tensor_parallel_shards, "hooks": hooks})
    if opts.weight_clip != "absmax":
        why_not.append(f"--weight-clip {opts.weight_clip} (the streamed path rounds with absmax ranges)")
    if streamed.choose_mode(opts.calibration, config, opts.calibration_budget_mb, why_not) == "streamed":
        if why_not:
            raise ValueError(f"--calibration streamed does not support {'; '.join(why_not)}")
        return streamed.build_streamed(opts, path, config, scheme, target, alpha_spec, t_start)
    # Refuse an existing output before any heavy work.
    with artifact.atomic_output_dir(opts.output, opts.overwrite) as tmp:
        tokenizer = load_tokenizer(path)
        log.info("loading %s (%s)", opts.model, path)
        mod, names = export_model(config, "float32", "llvm")
        params = load_params_dict(path, config, "float32")
        mod, params, rot_summary = rotation.rotate_model(mod, params, config, rot)
        quantize_weights = quantize_rtn
        if rounding == "autoround":
            quantize_weights = autoround.build_quantizer(config, tokenizer, opts.dataset, opts.autoround_preset,
                                                         opts.seed)
        if isinstance(alpha_spec, alpha_search.AlphaSearch):
            # the block objective runs torch blocks that do not model online rotations
            block = opts.alpha_objective == "block" and not rot.enabled
            alpha_spec = alpha_search.AlphaSearch(capture or _capturer(opts, config, tokenizer), opts.alpha_grid,
                                                  block_data=_block_data(opts, config, tokenizer) if block else None)
        result = pipeline.quantize_module(mod, params, scheme, _calibrator(opts, config, params, tokenizer),
                                          alpha=alpha_spec, smooth=opts.smooth and scheme.act != "none",
                                          quantize_weights=quantize_weights,
                                          keep_float=resolve_keep_float(opts.keep_float, params))
        if on_quantized is not None:
            on_quantized(result)
        result.summary["weight_rounding"] = rounding
        if opts.weight_clip != "absmax":
            result.summary["weight_clip"] = opts.weight_clip
        if rounding == "autoround":
            result.summary["autoround"] = quantize_weights.report
        calib_s = time.time() - t_start
        del params
        qmod, qparams = result.mod, result.params
        deploy_dtype = _deploy_dtype(opts.dtype, target)
        if deploy_dtype == "float16" or target.kind.name == "cuda":
            # Re-export for the target (the GPU KV cache on CUDA; fp16 unless --dtype float32) and
            # replay the same IR decisions; calibration always runs on the fp32 CPU build.
            mod_t, _ = export_model(config, deploy_dtype, target)
            qmod = result.plan.apply(rotation.rotation_ir(mod_t, config, rot, target))
            if deploy_dtype == "float16":
                qparams = {k: v.astype(np.float16) if v.dtype == np.float32 and not k.endswith(".scale") else v
                           for k, v in qparams.items()}
        tp_shards = tp_record = None
        if tp is not None:  # one module for every shard (H/N heads, I/N MLP, all-reduce), per-shard params
            qmod, tp_shards, tp_record = sharding.deploy_shards(config, result.plan, qparams, tp, deploy_dtype,
                                                                target, rot)
        merges = []
        if (target.kind.name == "cuda" if opts.merge_linears is None else opts.merge_linears) and tp is None:
            qmod, qparams, merges = pipeline.merge_linears(qmod, qparams, scheme, pipeline.swiglu_interleave(target))
        t0 = time.time()
        exe = pipeline.build(qmod, target)
        compile_s = time.time() - t0
        lib_path = tmp / artifact.LIB_FILE
        pipeline.export_library(exe, str(lib_path), target)
        param_order = [p.name for p in qmod["prefill"].params[2:]]
        if tp_shards is not None:
            sharding.save_shards(tmp, tp_shards, scheme.name)
            if target.kind.name == "cuda":  # the wheel's TVM has no NCCL for Disco: ship ours (mlc_quant/disco.py)
                from mlc_quant.disco import PLUGIN_FILE, build_nccl_plugin

                build_nccl_plugin(tmp / PLUGIN_FILE)
                tp_record["nccl_plugin"] = PLUGIN_FILE
        else:
            artifact.save_safetensors(tmp / artifact.PARAMS_FILE, {k: qparams[k] for k in param_order},
                                      metadata={"format": "mlc-quant", "scheme": scheme.name})
        save_tokenizer(tokenizer, tmp)
        summary = dict(result.summary, rotation=rot_summary)
        cfg = config_record(opts, config, summary, result.stats, target, deploy_dtype, param_order, merges,
                            calib_s, compile_s, t_start, calibration={"decode_steps": opts.calib_decode_steps})
        if tp_record is not None:
            cfg["tensor_parallel"] = tp_record
        (tmp / artifact.CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
        log.info("built %s in %.0f s (peak RSS %.0f MB)", opts.output, time.time() - t_start, _peak_rss_mb())
    return opts.output
