"""SmoothLinear: SmoothQuant's per-channel smoothing of linear inputs.

Smoothing divides input channel j of a linear by s_j and multiplies the weight's column j by s_j,
so outputs are unchanged while activation outliers shrink. Where the division can be folded
exactly into the producer of the input, the IR does not change at all (the params transform in
``mlc_quant.smoothing`` rescales the producer's weights): an RMSNorm/LayerNorm weight, the rows
of a preceding linear, or the rows of a linear feeding an elementwise multiply (SwiGLU's up_proj
before down_proj). Otherwise this pass inserts an explicit ``multiply(x, 1/s)`` that fuses into
the quantize kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Tuple

import numpy as np
import tvm
from tvm import IRModule, relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._linear import bindings_of, module_linears, num_inputs, users_of

_OPS = {name: tvm.ir.Op.get(f"relax.{name}") for name in
        ("nn.rms_norm", "nn.layer_norm", "matmul", "permute_dims", "add", "multiply")}


@dataclass(frozen=True)
class SmoothGroup:
    """Linears that read one activation, so they share one smoothing factor.

    fold: ``norm`` (divide the norm's weight/bias), ``linear`` (divide the rows of the producing
    linear ``fold_params[0]`` and its bias), ``none`` (explicit multiply in the IR) or ``skip``
    (a weight is shared with a non-linear use, e.g. a tied embedding: no smoothing).
    """

    linears: Tuple[str, ...]
    fold: str
    fold_params: Tuple[str, ...] = ()
    fold_transposed: bool = True
    channels: int = -1


def find_smoothing_groups(mod: IRModule) -> List[SmoothGroup]:
    """Group the annotated linears by shared input and decide how 1/s is applied.

    Functions that share weights (prefill/decode) must agree; where their producers differ the
    group falls back to an explicit multiply, which is exact everywhere.
    """
    merged: Dict[Tuple[str, ...], SmoothGroup] = {}
    for fname, sites in module_linears(mod).items():
        func = mod[fname]
        for group in _function_groups(func, sites):
            prev = merged.get(group.linears)
            if prev is None or prev == group:
                merged[group.linears] = group
            elif "skip" in (prev.fold, group.fold):
                merged[group.linears] = SmoothGroup(group.linears, "skip", channels=group.channels)
            else:
                merged[group.linears] = SmoothGroup(group.linears, "none", channels=group.channels)
    seen: Dict[str, Tuple[str, ...]] = {}
    for key in merged:
        for name in key:
            if name in seen and seen[name] != key:
                raise ValueError(f"linear {name} reads different inputs together with {seen[name]} and {key} in "
                                 "different functions; smoothing needs one shared factor per weight")
            seen[name] = key
    return list(merged.values())


def _function_groups(func: relax.Function, sites) -> List[SmoothGroup]:
    table = bindings_of(func)
    users = users_of(func)
    weights = set(func.params[num_inputs(func):]) if num_inputs(func) >= 0 else set(func.params)
    linear_outs = {s.out: s for s in sites}
    linear_uses = set()  # vars that only serve as linear weights (w, permute_dims(w))
    for s in sites:
        linear_uses.add(s.out)
        rhs = table[s.out].args[1]
        if rhs is not s.weight:
            linear_uses.add(rhs)

    def only_used_by(var, allowed) -> bool:
        return all(u in allowed for u in users.get(var, []))

    def weight_only_in_linears(w) -> bool:
        return all(u in linear_uses for u in users.get(w, []))

    def single_use_param(p) -> bool:
        return isinstance(p, relax.Var) and p in weights and len(users.get(p, [])) == 1

    def linear_rows(var, consumers) -> Tuple[str, ...]:
        """If ``var`` is the (bias-added) output of a linear read only by ``consumers``: its params."""
        if not only_used_by(var, consumers):
            return ()
        value = table.get(var)
        bias = ()
        if isinstance(value, relax.Call) and value.op == _OPS["add"]:
            a, b = value.args
            mm, bvar = (a, b) if a in linear_outs else (b, a)
            if mm not in linear_outs or not single_use_param(bvar) or not only_used_by(mm, {var}):
                return ()
            var, bias = mm, (bvar.name,)
        site = linear_outs.get(var)
        if site is None or not weight_only_in_linears(site.weight) or len(users.get(site.weight, [])) != 1:
            return ()
        return (site.name,) + bias, site.transposed

    by_input: Dict[relax.Expr, list] = {}
    for s in sites:
        by_input.setdefault(s.x, []).append(s)
    groups = []
    for x, members in by_input.items():
        names = tuple(sorted({s.name for s in members}))
        channels = members[0].in_features
        if not all(weight_only_in_linears(s.weight) for s in members):
            groups.append(SmoothGroup(names, "skip", channels=channels))
            continue
        consumers = {s.out for s in members}
        value = table.get(x) if isinstance(x, relax.Var) else None
        group = SmoothGroup(names, "none", channels=channels)
        if isinstance(value, relax.Call) and only_used_by(x, consumers):
            if value.op in (_OPS["nn.rms_norm"], _OPS["nn.layer_norm"]):
                norm_params = value.args[1:]
                if all(single_use_param(p) for p in norm_params):
                    group = SmoothGroup(names, "norm", tuple(p.name for p in norm_params), channels=channels)
            elif value.op == _OPS["multiply"]:
                for operand in value.args:
                    found = isinstance(operand, relax.Var) and linear_rows(operand, {x})
                    if found:
                        group = SmoothGroup(names, "linear", found[0], found[1], channels)
                        break
            else:
                found = linear_rows(x, consumers)
                if found:
                    group = SmoothGroup(names, "linear", found[0], found[1], channels)
        groups.append(group)
    return groups


@tvm.transform.module_pass(opt_level=0, name="mlc_quant.SmoothLinear")
class SmoothLinear:
    """Insert ``x * (1/s)`` before the linears of each group smoothed by an explicit multiply.

    Parameters
    ----------
    inv_scales : Mapping[str, np.ndarray]
        1/s per linear name, for the groups whose fold is ``none`` (folded groups need no IR
        change). Linears of one group share the same vector.
    """

    def __init__(self, inv_scales: Mapping[str, np.ndarray]):
        self.inv_scales = {k: np.asarray(v) for k, v in inv_scales.items()}

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        if not self.inv_scales:
            return mod
        rewriter = _SmoothRewriter(mod, self.inv_scales)
        for fname, sites in module_linears(mod).items():
            sites = [s for s in sites if s.name in self.inv_scales]
            if sites:
                gvar = mod.get_global_var(fname)
                rewriter.builder_.update_func(gvar, rewriter.rewrite(mod[gvar], sites))
        return rewriter.builder_.get()


@mutator
class _SmoothRewriter(PyExprMutator):
    def __init__(self, mod, inv_scales):
        super().__init__(mod)
        self.inv_scales = inv_scales
        self.by_out = {}
        self.scaled = {}

    def rewrite(self, func, sites):
        self.by_out = {s.out: s for s in sites}
        self.scaled = {}
        return self.visit_expr(func)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        site = self.by_out.get(binding.var)
        if site is None:
            super().visit_var_binding_(binding)
            return
        x = self.visit_expr(site.x)
        if x not in self.scaled:
            inv = self.inv_scales[site.name].astype(str(x.ty.dtype))
            self.scaled[x] = self.builder_.emit(relax.op.multiply(x, relax.const(inv)), name_hint="smooth")
        call = binding.value
        new_value = relax.Call(call.op, [self.scaled[x], self.visit_expr(call.args[1])], call.attrs)
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(new_value)))
