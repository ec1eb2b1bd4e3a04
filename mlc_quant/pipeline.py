"""The whole pipeline in one place: annotate -> calibrate -> smooth -> quantize -> dispatch -> build.

Every step is a Relax pass (``mlc_quant.passes``) plus, where weights change, a numpy transform
of the params dict; weights stay function parameters throughout, so the same code serves a
single matmul and a 7B model. ``mlc_quant.quantize`` (the API) and ``scripts/build.py`` (LLMs)
both call :func:`quantize_module`; they differ only in how calibration data is fed.
"""
from __future__ import annotations

import os

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import tvm
from tvm import IRModule, relax

from mlc_quant.observers import ChannelStatsObserver
from mlc_quant.passes import AnnotateLinear, CollectStats, QuantizeLinear, SmoothLinear, module_linears
from mlc_quant.passes.smooth_linear import find_smoothing_groups
from mlc_quant.schemes import QuantScheme, get_scheme
from mlc_quant.smoothing import group_key, linear_weight_nk, plan_smoothing, smooth_params

log = logging.getLogger("mlc_quant")

# calibrate(stats_module, function_names) -> observer holding the merged statistics
Calibrator = Callable[[IRModule, List[str]], ChannelStatsObserver]
# quantize_weights(float params after smoothing, {linear: LinearSite}, plan) -> the params of every
# linear that the scheme's weight_param_specs name. Default: round-to-nearest (rtn_weights).
WeightQuantizer = Callable[[Dict[str, np.ndarray], Dict, "IRPlan"], Dict[str, np.ndarray]]
# alpha_search(annotated float module, smoothing groups, observer, float params, layouts, scheme)
# -> {group_key: alpha}; may carry a ``report`` dict for the summary (mlc_quant.alpha_search).
AlphaSearch = Callable[..., Dict[str, float]]
Alpha = Union[float, Mapping[str, float], AlphaSearch]


@dataclass
class IRPlan:
    """Every decision the IR passes need, so the same rewrite applies to another export of the
    model (calibrate on the fp32 CPU build, deploy the fp16 CUDA build)."""

    scheme: QuantScheme
    weight_names: List[str]
    explicit_inv_scales: Dict[str, np.ndarray] = field(default_factory=dict)  # SmoothLinear
    act_qparams: Dict = field(default_factory=dict)  # QuantizeLinear

    def apply(self, mod: IRModule) -> IRModule:
        mod = AnnotateLinear(weight_names=self.weight_names)(mod)
        mod = SmoothLinear(self.explicit_inv_scales)(mod)
        return QuantizeLinear(self.scheme, self.act_qparams)(mod)


@dataclass
class QuantizeResult:
    mod: IRModule  # quantized module; weights are function parameters
    params: Dict[str, np.ndarray]  # its weight params (int8 weights, scales, untouched floats)
    stats: Optional[ChannelStatsObserver]
    plan: IRPlan
    summary: Dict = field(default_factory=dict)  # what was done, for mlc-quant-config.json
    inv_scales: Dict[str, np.ndarray] = field(default_factory=dict)  # 1/s of every smoothed linear's input


def quantizable_weights(params: Mapping[str, np.ndarray], keep_float: Sequence[str] = ()) -> List[str]:
    """Weight names the pipeline may quantize: every param but those matching a ``keep_float``
    pattern (fnmatch; llm-compressor's ``ignore``, e.g. the LM head)."""
    return [n for n in params if not any(fnmatch.fnmatchcase(n, pat) for pat in keep_float)]


def annotate(mod: IRModule, params: Mapping[str, np.ndarray], keep_float: Sequence[str] = ()) -> IRModule:
    """Step 0: find the linears (those whose weight is not kept float); check the params."""
    all_params = {p.name for f in mod.functions.values() if isinstance(f, relax.Function) for p in f.params}
    unknown = sorted(set(params) - all_params)
    if unknown:
        raise ValueError(f"params {unknown} are not parameters of any function in the module "
                         f"(its parameters: {sorted(all_params)})")
    if keep_float:
        linear_weights = {s.name for ss in module_linears(AnnotateLinear(weight_names=list(params))(mod)).values()
                          for s in ss}
        for pat in keep_float:
            if not any(fnmatch.fnmatchcase(n, pat) for n in linear_weights):
                raise ValueError(f"keep_float pattern {pat!r} matches no linear weight; linear weights: "
                                 f"{sorted(linear_weights)}")
    mod = AnnotateLinear(weight_names=quantizable_weights(params, keep_float))(mod)
    if not module_linears(mod):
        raise ValueError("the module has no linear op: expected matmul(x, permute_dims(w)) or matmul(x, w) with "
                         "w a weight named in params")
    return mod


def rtn_weights(params: Dict[str, np.ndarray], sites: Dict, plan: "IRPlan") -> Dict[str, np.ndarray]:
    """Round-to-nearest weight quantization of every linear (the scheme's own quantizer)."""
    out = {}
    for name, site in sites.items():
        w_nk = linear_weight_nk(params[name], site.transposed)
        out.update(plan.scheme.quantize_weight(name, w_nk, plan.act_qparams.get(name)))
    return out


def make_rtn_weights(clip: str = "absmax") -> WeightQuantizer:
    """Round-to-nearest with the weight range chosen by ``clip`` (``mlc_quant.schemes.WEIGHT_CLIPS``):
    ``absmax`` is :func:`rtn_weights`; ``mse`` shrinks each output channel's range to the clip
    ratio of least squared weight error (``schemes.mse_clip_ratios``). W8A8 schemes only."""
    from mlc_quant.schemes import check_weight_clip  # pylint: disable=import-outside-toplevel

    if check_weight_clip(clip) == "absmax":
        return rtn_weights

    def clipped_weights(params: Dict[str, np.ndarray], sites: Dict, plan: "IRPlan") -> Dict[str, np.ndarray]:
        if not isinstance(plan.scheme, QuantScheme) or type(plan.scheme).quantize_weight is not QuantScheme.quantize_weight:
            raise ValueError(f"weight clip {clip!r} is implemented for the W8A8/W4A8/W4A4 schemes, not "
                             f"{plan.scheme.name}")
        out = {}
        for name, site in sites.items():
            w_nk = linear_weight_nk(params[name], site.transposed)
            out.update(plan.scheme.quantize_weight(name, w_nk, plan.act_qparams.get(name), clip=clip))
        return out

    return clipped_weights


def record_inv_scales(groups, factors: Mapping, inv_scale: Dict[str, np.ndarray], plan: "IRPlan") -> None:
    """1/s of every smoothed linear (its quantizer sees the smoothed input); groups with no fold
    target get the explicit multiply the plan replays on the deploy export."""
    for g in groups:
        if g.linears in factors:
            for n in g.linears:
                inv_scale[n] = 1.0 / factors[g.linears]
                if g.fold == "none":
                    plan.explicit_inv_scales[n] = inv_scale[n]


def quantize_module(mod: IRModule, params: Mapping[str, np.ndarray], scheme: str | QuantScheme,
                    calibrate: Calibrator, alpha: Alpha = 0.5, smooth: bool = True,
                    func_names: Optional[Sequence[str]] = None,
                    quantize_weights: WeightQuantizer = rtn_weights,
                    keep_float: Sequence[str] = ()) -> QuantizeResult:
    """``keep_float``: fnmatch patterns of weights whose linears stay float (not smoothed, not
    quantized), e.g. the LM head as llm-compressor's ``ignore=["lm_head"]``.

    ``alpha``: SmoothQuant migration strength: one float for every smoothing group, a mapping
    ``{group_key: alpha}`` (per group, as stored in mlc-quant-config.json), or a callable that
    searches per-group alphas once calibration statistics exist (``mlc_quant.alpha_search``)."""
    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    per_group = isinstance(alpha, Mapping) or callable(alpha)
    for a in (alpha.values() if isinstance(alpha, Mapping) else [] if callable(alpha) else [alpha]):
        if not 0.0 <= float(a) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (SmoothQuant migration strength), got {a}")
    mod = annotate(mod, params, keep_float)
    sites = {s.name: s for ss in module_linears(mod).values() for s in ss}
    funcs = list(func_names) if func_names else list(module_linears(mod))
    summary = {"scheme": scheme.name, "alpha": ("search" if callable(alpha) else "per-group") if per_group else alpha,
               "smooth": bool(smooth and scheme.quantizes), "linears": len(sites)}
    if keep_float:
        summary["keep_float"] = list(keep_float)
    plan = IRPlan(scheme, quantizable_weights(params, keep_float))
    if not scheme.quantizes:
        return QuantizeResult(mod, dict(params), None, plan, summary)
    layouts = {n: s.transposed for n, s in sites.items()}

    # 1. calibrate: one pass, running per-channel stats (O(channels) memory)
    observer = None
    if smooth or scheme.static_activations:
        observer = calibrate(CollectStats(scheme.stat_kinds)(mod), funcs)
        never_ran = sorted(set(sites) - set(observer.names()))
        if never_ran:
            raise ValueError(f"calibration never reached linears {never_ran}: calibrate every function that "
                             f"uses them (func_names={funcs})")
        summary["calibration_batches"] = observer.num_updates

    # 2. smooth: factors from stats and weights; fold 1/s into producers or multiply explicitly
    inv_scale: Dict[str, np.ndarray] = {}
    if smooth:
        groups = find_smoothing_groups(mod)
        if callable(alpha):
            searcher, alpha = alpha, alpha(mod, groups, observer, params, layouts, scheme)
            if getattr(searcher, "report", None):
                summary["alpha_search"] = searcher.report
        if isinstance(alpha, Mapping):
            summary["group_alphas"] = {group_key(g.linears): float(alpha[group_key(g.linears)])
                                       for g in groups if g.fold != "skip" and group_key(g.linears) in alpha}
        factors = plan_smoothing(groups, observer.as_dict(), params, layouts, alpha)
        params = smooth_params(dict(params), groups, factors, layouts)
        record_inv_scales(groups, factors, inv_scale, plan)
        summary["smoothing_groups"] = {fold: sum(g.fold == fold for g in groups)
                                       for fold in ("norm", "linear", "none", "skip")}

    # 3. quantize: activation qparams from (smoothed) stats, int8 weights, the int8 IR
    if scheme.static_activations:
        plan.act_qparams = {n: scheme.act_qparams(observer.stats(n), inv_scale.get(n)) for n in sites}
    qparams = dict(params)
    qparams.update(quantize_weights(params, sites, plan))
    mod = plan.apply(mod)
    used = {p.name for f in mod.functions.values() if isinstance(f, relax.Function) for p in f.params}
    qparams = {k: v for k, v in qparams.items() if k in used}
    if plan.act_qparams:
        summary["activation_scales"] = {n: [a.scale, a.zero_point] for n, a in plan.act_qparams.items()}
    return QuantizeResult(mod, qparams, observer, plan, summary, inv_scale)


def merge_linears(mod: IRModule, params: Mapping[str, np.ndarray], scheme=None, interleave_swiglu: int = 0):
    """Merge the linears that read the same x (q/k/v, gate/up) into one wide linear each
    (``passes/merge_sibling_linears.py``), then fold the split -> reshape -> concat round trip
    of the merged q/k/v back into a view (``passes/fold_split_concat.py``); returns (module, its
    params, the merges). ``interleave_swiglu=8``: a statically quantized gate/up pair gets the
    row layout of the SiLU * up GEMM epilogue (:func:`swiglu_interleave` says when)."""
    from mlc_quant.passes.fold_split_concat import FoldSplitConcat
    from mlc_quant.passes.merge_sibling_linears import MergeSiblingLinears, merge_params

    scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
    merger = MergeSiblingLinears(scheme, interleave_swiglu=interleave_swiglu)
    mod = FoldSplitConcat()(merger(mod))
    return mod, merge_params(params, merger.merges), merger.merges


def swiglu_interleave(target) -> int:
    """The gate/up interleave block for a build on ``target``: 8 on CUDA (the W8A8 gate/up GEMM
    then runs SiLU * up + the down_proj's quantize in its epilogue, passes/fuse_silu_gemm.py),
    0 elsewhere or with ``MLC_QUANT_SILU_GEMM=off`` (the unfused kernels, for comparisons)."""
    env = os.environ.get("MLC_QUANT_SILU_GEMM", "on").lower()
    if env not in ("on", "off"):
        raise ValueError(f"MLC_QUANT_SILU_GEMM={env!r}: expected 'on' (default) or 'off'")
    kind = target if isinstance(target, str) else target.kind.name
    return 8 if kind == "cuda" and env == "on" else 0


def bind_params(mod: IRModule, params: Mapping[str, np.ndarray]) -> IRModule:
    """Bind weight params as constants in every function that takes them."""
    for gvar, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mine = {p.name: params[p.name] for p in func.params if p.name in params}
            if mine:
                mod = relax.transform.BindParams(gvar.name_hint, mine)(mod)
                if "num_input" in (mod[gvar.name_hint].attrs or {}):
                    mod[gvar.name_hint] = mod[gvar.name_hint].without_attr("num_input")
    return mod


def dispatch(mod: IRModule, target: tvm.target.Target) -> IRModule:
    """4. dispatch: on CUDA every GEMM goes to an external kernel (cuBLASLt / CUTLASS)."""
    if target.kind.name == "cuda":
        from mlc_quant.cuda_dispatch import dispatch_gemms  # needs nvcc; imported only for CUDA

        return dispatch_gemms(mod)
    return mod


def resolve_target(target="llvm") -> tvm.target.Target:
    """A Target; a bare ``llvm`` means this machine's CPU (generic x86-64 lacks FMA/AVX2)."""
    if isinstance(target, tvm.target.Target):
        return target
    if target == "llvm":
        from mlc_quant.cpu_schedule import host_target

        return host_target()
    return tvm.target.Target(target)


def build(mod: IRModule, target="llvm"):
    """5. build: dispatch, schedule, then compile with TVM's default Relax pipeline.

    On CPU, ``schedule_for_cpu`` gives matmuls a register-tiled, parallel schedule: TVM's
    default llvm build leaves them as naive loops (~1 GFLOP/s, 20x slower).
    """
    target = resolve_target(target)
    mod = dispatch(mod, target)
    if target.kind.name == "llvm":
        from mlc_quant.cpu_schedule import schedule_for_cpu

        mod = schedule_for_cpu(mod, target)
    return tvm.compile(mod, target)


def export_library(exe, path: str, target) -> None:
    """Write the compiled library; a CUDA build links the external GEMM kernels in."""
    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    if target.kind.name == "cuda":
        from mlc_quant.cuda_dispatch import export_library as export_cuda_library

        export_cuda_library(exe, path, target=target)  # TVM's kernels compiled to a fatbin here
    else:
        exe.export_library(path)
