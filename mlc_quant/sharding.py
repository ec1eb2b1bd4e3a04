"""Tensor parallelism (Megatron-style) of a quantized Llama-family model, for TVM Disco.

Plan (issue #9): q/k/v/gate/up are *column-parallel* (output rows split: every shard reads the
replicated input and produces its slice of heads / intermediate channels), o/down are
*row-parallel* (input columns K split: every shard reads its own slice, the partial outputs are
summed by an all-reduce). Attention is split by whole heads, GQA-aware: shard ``i`` owns query
heads ``[i*H/N, (i+1)*H/N)`` and KV heads ``[i*KV/N, (i+1)*KV/N)``, which are exactly the KV
heads those query heads read (query head ``h`` reads KV head ``h // (H/KV)``), so no KV head is
duplicated; ``KV % N == 0`` is required. Embedding, norms and the LM head are replicated.

Params of each scheme (``QuantScheme.weight_param_specs``):

- column-parallel: ``.q`` rows split; per-channel ``.scale``/``.zp``/``.corr`` (and the bias)
  split with them; a per-tensor ``.scale`` is replicated. Every shard computes its rows exactly
  as the unsharded model (the activation quantization of the replicated input is the same).
- row-parallel: ``.q`` columns (K) split; ``.scale``/``.zp`` are per *output* channel, so
  replicated. The asymmetric correction ``corr = z_x*colsum(W_q) - K*z_x*z_w`` depends on K: shard
  ``i`` gets ``corr_i = z_x*colsum(W_q[:, K_i]) - |K_i|*z_x*z_w`` (recomputed from its slice), and
  its row sum ``rs_i`` of the quantized activation covers its K slice only, so
  ``sum_i (acc_i - rs_i*z_w - corr_i)`` is the unsharded int32 result exactly (integer identity),
  and ``sum_i scale*acc_i`` equals the unsharded output up to float summation order. A bias is
  added once: it is kept on shard 0, zeros elsewhere (so every shard runs the same module).
- static activation scales (per-tensor) and zero points: replicated; the quantization of an
  element does not depend on the others, so quantize-then-slice equals slice-then-quantize.
- per-token dynamic activation scales (smq_q8i8f16_3, q4*_pt) of a row-parallel linear: the
  per-token absmax is taken over the FULL row, i.e. each shard's local absmax ``[M, 1]`` goes
  through an all-reduce(max) before the scale is formed (``GlobalAmaxScheme``). This costs one
  tiny all-reduce of M floats per row-parallel linear but keeps the math identical to the
  unsharded model; a local per-shard scale would be a different (finer) quantizer.
- smoothing factors: folded into the params (norm weights: replicated; up_proj rows: split with
  them) or, where the IR multiplies by ``1/s`` explicitly (typically o_proj's input), the
  ``1/s`` vector of a row-parallel linear is split with K (:func:`shard_ir_plan`); column-parallel
  linears keep theirs whole (their input is replicated).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from mlc_quant.schemes import _EPS, INT8_MAX, INT8_MIN, QuantScheme

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
_LINEAR_RE = re.compile(r"(^|[._])(" + "|".join(COLUMN_PARALLEL + ROW_PARALLEL) + r")[._]weight$")
_SUFFIXES = (".q", ".scale", ".zp", ".corr")


@dataclass
class ShardingPlan:
    """How every linear of the model is split across ``shards`` tensor-parallel workers."""

    shards: int
    linears: Dict[str, str] = field(default_factory=dict)  # weight name -> "column" | "row"
    num_heads: int = 0  # per the unsharded model
    num_kv_heads: int = 0
    head_dim: int = 0
    intermediate_size: int = 0

    def kind(self, name: str) -> Optional[str]:
        return self.linears.get(name)

    @property
    def row_linears(self) -> List[str]:
        return [n for n, k in self.linears.items() if k == "row"]


def linear_kind(name: str) -> Optional[str]:
    """``column``/``row`` for a q/k/v/gate/up or o/down weight name (HF or IR spelling), else None."""
    m = _LINEAR_RE.search(name)
    if m is None:
        return None
    return "column" if m.group(2) in COLUMN_PARALLEL else "row"


def resolve_plan(config, linear_names: Sequence[str], shards: int) -> ShardingPlan:
    """The sharding of ``linear_names`` (weight names) for a Llama-family ``config``.

    Clear errors where the heads, the KV heads (GQA) or the MLP width do not divide by ``shards``.
    """
    shards = int(shards)
    if shards < 1:
        raise ValueError(f"--tensor-parallel-shards must be >= 1, got {shards}")
    h, kv, inter = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    plan = ShardingPlan(shards, {}, h, kv, config.head_dim, inter)
    if shards == 1:
        return plan
    problems = []
    if kv % shards:
        problems.append(f"num_key_value_heads={kv} is not a multiple of {shards} (attention is split by whole "
                        f"KV heads, GQA: each shard owns KV/N heads and the H/N query heads that read them)")
    if h % shards:
        problems.append(f"num_attention_heads={h} is not a multiple of {shards}")
    if inter % shards:
        problems.append(f"intermediate_size={inter} is not a multiple of {shards}")
    if problems:
        raise ValueError(f"cannot split the model into {shards} tensor-parallel shards: " + "; ".join(problems)
                         + f"; valid shard counts: {valid_shard_counts(config)}")
    for name in linear_names:
        kind = linear_kind(name)
        if kind is not None:
            plan.linears[name] = kind
    if not plan.linears:
        raise ValueError("no q/k/v/o/gate/up/down projection among the linears: nothing to shard")
    return plan


def valid_shard_counts(config, limit: int = 64) -> List[int]:
    return [n for n in range(1, limit + 1) if config.num_key_value_heads % n == 0
            and config.num_attention_heads % n == 0 and config.intermediate_size % n == 0]


def shard_config(config, shards: int):
    """The config of one shard's module: H/N heads, KV/N KV heads, I/N MLP width (hidden unchanged)."""
    if shards == 1:
        return config
    return dataclasses.replace(config, num_attention_heads=config.num_attention_heads // shards,
                               num_key_value_heads=config.num_key_value_heads // shards,
                               intermediate_size=config.intermediate_size // shards, head_dim=config.head_dim)


# ----------------------------------------------------------------------------- params transform


def _bias_name(weight: str) -> str:
    return weight[: -len("weight")] + "bias"


def _split(a: np.ndarray, shards: int, axis: int) -> List[np.ndarray]:
    if a.shape[axis] % shards:
        raise ValueError(f"axis {axis} of a {a.shape} tensor does not split into {shards} shards")
    return [np.ascontiguousarray(p) for p in np.split(np.asarray(a), shards, axis=axis)]


def split_linear(scheme, name: str, params: Mapping[str, np.ndarray], kind: str, shards: int,
                 act=None, transposed: bool = True) -> List[Dict[str, np.ndarray]]:
    """Per-shard params of linear ``name`` (weight name) and its bias, for ``kind`` column/row.

    ``act``: the linear's static activation qparams (the zero point re-derives the asymmetric
    correction of a row-parallel shard). ``transposed``: the float weight is [N, K] (nn.Linear).
    """
    out: List[Dict[str, np.ndarray]] = [{} for _ in range(shards)]

    def put(key, parts):
        for i, p in enumerate(parts):
            out[i][key] = p

    bias = _bias_name(name)
    if not scheme.quantizes or f"{name}.q" not in params:  # a float linear
        w = np.asarray(params[name])
        n_axis = 0 if transposed else 1
        put(name, _split(w, shards, n_axis if kind == "column" else 1 - n_axis))
    else:
        q = np.asarray(params[f"{name}.q"])
        if q.dtype != np.int8:
            raise ValueError(f"{name}: packed weights ({q.dtype}) cannot be sharded (only int8 W8A8/W4 in int8)")
        if kind == "column":
            put(f"{name}.q", _split(q, shards, 0))
            for sfx in (".scale", ".zp", ".corr"):
                if f"{name}{sfx}" in params:
                    v = np.asarray(params[f"{name}{sfx}"])
                    put(f"{name}{sfx}", [v] * shards if v.ndim == 0 else _split(v, shards, 0))
        else:
            qs = _split(q, shards, 1)
            put(f"{name}.q", qs)
            put(f"{name}.scale", [np.asarray(params[f"{name}.scale"])] * shards)
            if f"{name}.zp" in params:
                zw = np.asarray(params[f"{name}.zp"]).astype(np.int64)
                put(f"{name}.zp", [np.asarray(params[f"{name}.zp"])] * shards)
                zx = _act_zero_point(scheme, name, params, act)
                put(f"{name}.corr", [(zx * qi.astype(np.int64).sum(axis=1) - qi.shape[1] * zx * zw).astype(np.int32)
                                     for qi in qs])
    if bias in params:
        b = np.asarray(params[bias])
        put(bias, _split(b, shards, 0) if kind == "column" else [b] + [np.zeros_like(b)] * (shards - 1))
    return out


def _act_zero_point(scheme, name, params, act) -> int:
    if act is not None:
        return int(act.zero_point) if scheme.act == "per_tensor_asym" else 0
    # No qparams at hand: recover z_x from corr = z_x * (colsum(W_q) - K*z_w) where it is defined.
    q = np.asarray(params[f"{name}.q"]).astype(np.int64)
    d = q.sum(axis=1) - q.shape[1] * np.asarray(params[f"{name}.zp"]).astype(np.int64)
    corr = np.asarray(params[f"{name}.corr"]).astype(np.int64)
    nz = d != 0
    if not nz.any():
        return 0
    zx = int(round(float(corr[nz][0]) / float(d[nz][0])))
    if not np.array_equal(corr, zx * d):
        raise ValueError(f"{name}: cannot recover the activation zero point from .corr; pass act_qparams")
    return zx


def base_weight_name(param: str) -> str:
    for sfx in _SUFFIXES:
        if param.endswith(sfx):
            return param[: -len(sfx)]
    return param


def shard_params(params: Mapping[str, np.ndarray], plan: ShardingPlan, scheme,
                 act_qparams: Optional[Mapping] = None,
                 layouts: Optional[Mapping[str, bool]] = None) -> List[Dict[str, np.ndarray]]:
    """Every param split for ``plan.shards`` workers (a list of per-shard dicts, same keys and
    insertion order as ``params``); replicated params are shared (not copied)."""
    n = plan.shards
    if n == 1:
        return [dict(params)]
    act_qparams = act_qparams or {}
    done: Dict[str, List[np.ndarray]] = {}
    for name, kind in plan.linears.items():
        parts = split_linear(scheme, name, params, kind, n, act_qparams.get(name),
                             (layouts or {}).get(name, True))
        for key in parts[0]:
            done[key] = [p[key] for p in parts]
    out: List[Dict[str, np.ndarray]] = [{} for _ in range(n)]
    for key, value in params.items():
        for i in range(n):
            out[i][key] = done[key][i] if key in done else value
    return out


def param_split_axes(params: Mapping[str, np.ndarray], plan: ShardingPlan, scheme) -> Dict[str, str]:
    """The sharding record of every param: ``"0"``/``"1"`` (split axis), ``replicated``,
    ``recomputed`` (row-parallel asymmetric ``.corr``), ``shard0`` (row-parallel bias)."""
    rec = {}
    for key, value in params.items():
        base = base_weight_name(key)
        is_bias = key.endswith("bias") and key[: -len("bias")] + "weight" in plan.linears
        kind = plan.linears.get(key[: -len("bias")] + "weight" if is_bias else base)
        if kind is None or plan.shards == 1:
            rec[key] = "replicated"
        elif is_bias:
            rec[key] = "0" if kind == "column" else "shard0"
        elif key == base:  # float weight [N, K]
            rec[key] = "0" if kind == "column" else "1"
        elif key.endswith(".q"):
            rec[key] = "0" if kind == "column" else "1"
        elif key.endswith(".corr"):
            rec[key] = "0" if kind == "column" else "recomputed"
        else:  # .scale / .zp
            rec[key] = "0" if kind == "column" and np.ndim(value) > 0 else "replicated"
    return rec


def sharding_record(params: Mapping[str, np.ndarray], plan: ShardingPlan, scheme) -> Dict:
    """``tensor_parallel`` entry of mlc-quant-config.json."""
    return {
        "shards": plan.shards,
        "scheme": "megatron: q/k/v/gate/up column-parallel, o/down row-parallel (all-reduce sum)",
        "attention": {"num_heads_per_shard": plan.num_heads // plan.shards,
                      "num_kv_heads_per_shard": plan.num_kv_heads // plan.shards, "head_dim": plan.head_dim},
        "intermediate_size_per_shard": plan.intermediate_size // plan.shards,
        "per_token_amax": "all-reduce(max) over the full row for row-parallel linears",
        "params_files": [f"params-shard{i}.safetensors" for i in range(plan.shards)],
        "param_split": param_split_axes(params, plan, scheme),
    }


# ----------------------------------------------------------------------------- IR of one shard


def shard_ir_plan(ir_plan, plan: ShardingPlan, reduce_amax: Optional[Callable] = None):
    """``(IRPlan of every shard, [per-shard extra params])``.

    All shards run one compiled module, so what differs between shards must be a param: the
    explicit ``1/s`` of a row-parallel linear (its K is split) leaves the plan's constants and
    becomes the param ``<linear>.inv_smooth`` (:func:`lift_input_scales`), one slice per shard.
    A per-token scheme is wrapped so a row-parallel linear takes its absmax over the full row.
    """
    from mlc_quant.pipeline import IRPlan

    scheme = ir_plan.scheme
    if plan.shards > 1 and scheme.act == "per_token_sym" and plan.row_linears:
        scheme = GlobalAmaxScheme.wrap(scheme, plan.row_linears, reduce_amax)
    inv = {n: v for n, v in ir_plan.explicit_inv_scales.items() if plan.kind(n) != "row" or plan.shards == 1}
    extra: List[Dict[str, np.ndarray]] = [{} for _ in range(plan.shards)]
    for name, v in ir_plan.explicit_inv_scales.items():
        if name not in inv:
            for i, part in enumerate(_split(np.asarray(v, dtype=np.float32), plan.shards, 0)):
                extra[i][f"{name}.inv_smooth"] = part
    return IRPlan(scheme, list(ir_plan.weight_names), inv, dict(ir_plan.act_qparams)), extra


def shard_module(float_mod, ir_plan, plan: ShardingPlan, reduce_sum: Optional[Callable] = None,
                 reduce_amax: Optional[Callable] = None):
    """The quantized module of one shard (the same for every shard) and the per-shard extra params.

    ``float_mod``: the float export of :func:`shard_config` (H/N heads, I/N MLP width). Inserts
    the all-reduce after o/down, lifts explicit row-parallel smoothing into params, then replays
    the quantization plan.
    """
    splan, extra = shard_ir_plan(ir_plan, plan, reduce_amax)
    mod = float_mod
    if plan.shards > 1:
        mod = insert_allreduce(mod, plan.row_linears, reduce_sum)
        lifted = sorted({k[: -len(".inv_smooth")] for k in extra[0]})
        if lifted:
            mod = lift_input_scales(mod, lifted)
    return splan.apply(mod), extra


def lift_input_scales(mod, names: Sequence[str]):
    """``x * <name>.inv_smooth`` before each linear of ``names``, the factor a new function param
    (appended after the weights) instead of an IR constant."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from mlc_quant.passes import AnnotateLinear, module_linears

    wanted = set(names)
    annotated = AnnotateLinear(weight_names=list(wanted))(mod)

    @mutator
    class _Lift(PyExprMutator):
        by_out: dict = {}
        pvars: dict = {}

        def visit_var_binding_(self, binding):
            site = self.by_out.get(binding.var)
            if site is None:
                super().visit_var_binding_(binding)
                return
            x = self.visit_expr(site.x)
            scaled = self.builder_.emit(relax.op.multiply(x, self.pvars[site.name]), name_hint="smooth")
            call = binding.value
            new_value = relax.Call(call.op, [scaled, self.visit_expr(call.args[1])], call.attrs)
            self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(new_value)))

    rewriter = _Lift(annotated)
    for fname, sites in module_linears(annotated).items():
        sites = [s for s in sites if s.name in wanted]
        if not sites:
            continue
        gvar = annotated.get_global_var(fname)
        func = annotated[gvar]
        rewriter.by_out = {s.out: s for s in sites}
        rewriter.pvars = {s.name: relax.Var(f"{s.name}.inv_smooth", relax.TensorType([s.in_features],
                                                                                      str(s.x.ty.dtype)))
                          for s in sites}
        new = rewriter.visit_expr(func)
        new = relax.Function(list(func.params) + list(rewriter.pvars.values()), new.body, new.ret_ty,
                             new.is_pure, new.attrs, new.span)
        rewriter.builder_.update_func(gvar, new)
    return rewriter.builder_.get()


def _ccl_allreduce(op_type: str):
    from tvm import relax

    return lambda x: relax.op.ccl.allreduce(x, op_type)


@dataclass(frozen=True)
class GlobalAmaxScheme(QuantScheme):
    """A per-token scheme whose row-parallel linears reduce the per-token absmax across shards
    before forming the scale, so the activation quantization is the unsharded one."""

    row_linears: frozenset = frozenset()
    reduce_amax: Optional[Callable] = None  # expr -> expr; default relax.op.ccl.allreduce(max)

    @classmethod
    def wrap(cls, scheme, row_linears, reduce_amax=None):
        fields = {f.name: getattr(scheme, f.name) for f in dataclasses.fields(QuantScheme)}
        return cls(**fields, row_linears=frozenset(row_linears), reduce_amax=reduce_amax)

    def emit_token_amax(self, bb, xf, name):
        local = super().emit_token_amax(bb, xf, name)
        if name not in self.row_linears:
            return local
        return bb.emit((self.reduce_amax or _ccl_allreduce("max"))(local))


def insert_allreduce(mod, row_linears: Sequence[str], reduce: Optional[Callable] = None):
    """After the output of every row-parallel linear, an all-reduce(sum) across shards
    (``relax.op.ccl.allreduce``; Disco lowers it to its CCL, NCCL on CUDA).

    Run on the float module before ``IRPlan.apply`` (the quantized linear keeps the output var).
    ``reduce``: expr -> expr, to replace the CCL op (a host-simulated all-reduce in tests).
    """
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from mlc_quant.passes import AnnotateLinear, module_linears

    reduce = reduce or _ccl_allreduce("sum")
    rows = set(row_linears)
    annotated = AnnotateLinear(weight_names=list(rows))(mod)
    outs = {fname: {s.out for s in sites if s.name in rows} for fname, sites in module_linears(annotated).items()}

    @mutator
    class _Insert(PyExprMutator):
        targets: set = set()

        def visit_var_binding_(self, binding):
            if binding.var not in self.targets:
                super().visit_var_binding_(binding)
                return
            value = self.visit_expr(binding.value)
            part = self.builder_.emit(value, name_hint=binding.var.name + "_partial")
            dataflow_out = (not isinstance(binding.var, relax.DataflowVar)
                            and self.builder_.current_block_is_dataflow())
            red = reduce(part)
            red = (self.builder_.emit_output(red, name_hint=binding.var.name) if dataflow_out
                   else self.builder_.emit(red, name_hint=binding.var.name))
            self.set_var_remap(binding.var, red)

    rewriter = _Insert(annotated)
    for fname, targets in outs.items():
        if targets:
            rewriter.targets = targets
            gvar = annotated.get_global_var(fname)
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(annotated[gvar]))
    return rewriter.builder_.get()


# ----------------------------------------------------------------------------- numpy reference


def linear_int(scheme, name: str, params: Mapping[str, np.ndarray], x: np.ndarray, act=None,
               amax: Optional[np.ndarray] = None) -> np.ndarray:
    """The scheme's quantized linear ``x [M, K] -> [M, N]`` with its integer math, as the IR computes
    it (int8 x int8 -> exact int64 accumulator, the asymmetric corrections, one float dequantize).

    ``amax``: per-token absmax ``[M, 1]`` to use instead of this input's own (a row-parallel shard
    of a per-token scheme gets the full row's, the all-reduce(max) of the shards' ones). Float
    schemes compute ``x @ W^T``. The bias (if any in ``params``) is added.
    """
    x = np.asarray(x, dtype=np.float32)
    bias = params.get(_bias_name(name))
    if not scheme.quantizes:
        y = x @ np.asarray(params[name], dtype=np.float32).T
        return y if bias is None else y + bias
    wq = np.asarray(params[f"{name}.q"]).astype(np.int64)
    scale = np.asarray(params[f"{name}.scale"], dtype=np.float32)
    if scheme.act == "per_token_sym":
        qmax = np.float32(scheme.a_qmax)
        a = np.abs(x).max(axis=-1, keepdims=True) if amax is None else np.asarray(amax, dtype=np.float32)
        s = np.maximum(a / qmax, np.float32(_EPS))
        xq = np.clip(np.round(x / s), -qmax, qmax).astype(np.int64)
        acc = xq @ wq.T
        y = acc.astype(np.float32) * s * scale
    else:
        zx = int(act.zero_point) if scheme.act == "per_tensor_asym" else 0
        xq = np.clip(np.round(x / np.float32(act.scale)) + zx, INT8_MIN, INT8_MAX).astype(np.int64)
        acc = xq @ wq.T
        if scheme.weight == "per_channel_asym":
            rs = xq.sum(axis=-1, keepdims=True)
            acc = acc - rs * np.asarray(params[f"{name}.zp"]).astype(np.int64) - \
                np.asarray(params[f"{name}.corr"]).astype(np.int64)
        y = acc.astype(np.float32) * scale
    return y if bias is None else y + bias


def row_parallel_int(scheme, name: str, shard_params_: Sequence[Mapping[str, np.ndarray]], xs, act=None) -> np.ndarray:
    """A row-parallel linear on ``len(shard_params_)`` shards: shard ``i`` computes its K slice
    ``xs[i]`` (``xs``: the slices, or the whole input to split evenly); per-token schemes use the
    all-reduce(max) of the shards' absmax; the partial outputs are summed (the all-reduce)."""
    n = len(shard_params_)
    if not isinstance(xs, (list, tuple)):
        xs = np.split(np.asarray(xs, dtype=np.float32), n, axis=-1)
    xs = [np.asarray(xi, dtype=np.float32) for xi in xs]
    amax = None
    if scheme.quantizes and scheme.act == "per_token_sym":
        amax = np.max([np.abs(xi).max(axis=-1, keepdims=True) for xi in xs], axis=0)  # all-reduce(max)
    return np.sum([linear_int(scheme, name, p, xi, act, amax) for p, xi in zip(shard_params_, xs)], axis=0)


# ----------------------------------------------------------------------------- build integration


def ccl_available(target) -> Optional[str]:
    """The Disco CCL that runs an all-reduce on ``target``'s devices, or None.

    TVM's Disco registers ``runtime.disco.<ccl>.init_ccl`` for nccl (CUDA) and rccl (ROCm) only;
    there is no CPU collective, so a tensor-parallel build cannot run on ``llvm``.
    """
    kind = target.kind.name
    return {"cuda": "nccl", "rocm": "rccl"}.get(kind)


def check_build(config, shards: int, target, rot=None) -> Optional[ShardingPlan]:
    """Fail fast (before calibration) on a tensor-parallel build that cannot be made or run."""
    if int(shards) == 1:
        return None
    from mlc_quant.model.llama import param_shapes

    plan = resolve_plan(config, list(param_shapes(config)), shards)
    if ccl_available(target) is None:
        raise ValueError(
            f"--tensor-parallel-shards {shards} needs a multi-device runtime: TVM Disco with NCCL (--target cuda). "
            f"TVM's Disco has no CPU collective (no runtime.disco.<ccl>.init_ccl for {target.kind.name}), so a "
            f"sharded {target.kind.name} build could not run; use --tensor-parallel-shards 1 on the CPU")
    if rot is not None and rot.has("r4"):
        raise ValueError("--tensor-parallel-shards > 1 with an online R4 rotation (--rotation r1r2r4/all) is not "
                         "supported: the online Hadamard of down_proj's input spans the full intermediate width, "
                         "which row-parallel down_proj splits; use --rotation r1r2")
    return plan


def deploy_shards(config, ir_plan, qparams: Mapping[str, np.ndarray], plan: ShardingPlan, dtype: str, target,
                  rot=None):
    """``(shard module, [per-shard params], tensor_parallel record)`` of a quantized model.

    ``ir_plan``/``qparams``: the unsharded quantization (``QuantizeResult.plan``, params in the
    deploy dtype). The module is the same for every shard (H/N heads, I/N MLP width, all-reduce
    after o/down through ``relax.op.ccl.allreduce``: Disco's NCCL on CUDA).
    """
    from mlc_quant import rotation
    from mlc_quant.model.llama import export_model

    scfg = shard_config(config, plan.shards)
    smod, _ = export_model(scfg, dtype, target)
    if rot is not None:
        smod = rotation.rotation_ir(smod, scfg, rot, target)
    qmod, extra = shard_module(smod, ir_plan, plan)
    shards = shard_params(qparams, plan, ir_plan.scheme, ir_plan.act_qparams)
    for s, e in zip(shards, extra):
        s.update({k: v.astype(dtype) for k, v in e.items()})
    record = sharding_record(qparams, plan, ir_plan.scheme)
    record["param_split"].update({k: "0" for k in extra[0]})  # lifted explicit smoothing of o/down
    used = [p.name for p in qmod["prefill"].params[2:]]
    missing = [k for k in used if k not in shards[0]]
    if missing:
        raise AssertionError(f"shard module takes params the shards lack: {missing[:5]}")
    record["param_split"] = {k: record["param_split"][k] for k in used}
    return qmod, [{k: s[k] for k in used} for s in shards], record


def save_shards(folder, shards: Sequence[Mapping[str, np.ndarray]], scheme_name: str) -> List[str]:
    """``params-shard{i}.safetensors`` per shard (the layout of ``params.safetensors``)."""
    import pathlib

    from mlc_quant import artifact

    files = []
    for i, s in enumerate(shards):
        name = f"params-shard{i}.safetensors"
        artifact.save_safetensors(pathlib.Path(folder) / name, s, metadata={
            "format": "mlc-quant", "scheme": scheme_name, "shard": i, "shards": len(shards)})
        files.append(name)
    return files
