"""CollectStats: make every annotated linear also return per-channel statistics of its input."""
from __future__ import annotations

from typing import Dict, List, Sequence

import tvm
from tvm import IRModule, relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._linear import STATS_ATTR, module_linears

STAT_KINDS = ("absmax", "min", "max")


@tvm.transform.module_pass(opt_level=0, name="mlc_quant.CollectStats")
class CollectStats:
    """Rewrite each annotated function to return ``(orig_ret, (stat_0, stat_1, ...))``.

    Each stat is a float32 vector ``[K]``: the input activation reduced over every axis but the
    last. Linears that read the same activation share one reduction. The function attribute
    ``mlc_quant.stats`` names each stat ``"<linear>:<kind>"``; a host-side running max/min merges
    them across calibration batches and across functions (see ``mlc_quant.observers``), so memory
    stays O(channels) whatever the number of batches.

    Parameters
    ----------
    kinds : Sequence[str]
        Which statistics to emit: any of ``absmax`` (symmetric schemes, smoothing), ``min`` and
        ``max`` (asymmetric activations).
    """

    def __init__(self, kinds: Sequence[str] = STAT_KINDS):
        bad = [k for k in kinds if k not in STAT_KINDS]
        if bad:
            raise ValueError(f"unknown stat kind(s) {bad}; valid kinds: {list(STAT_KINDS)}")
        self.kinds = list(kinds)

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        sites_by_func = module_linears(mod)
        emitter = _StatsEmitter(mod, self.kinds)
        for gvar, func in mod.functions_items():
            sites = sites_by_func.get(gvar.name_hint)
            if not sites:
                continue
            new_func = emitter.rewrite(func, sites)
            emitter.builder_.update_func(gvar, new_func)
        return emitter.builder_.get()


@mutator
class _StatsEmitter(PyExprMutator):
    def __init__(self, mod: IRModule, kinds: List[str]):
        super().__init__(mod)
        self.kinds = kinds
        self.by_out: Dict[relax.Var, list] = {}
        self.stat_vars: List[relax.Var] = []
        self.stat_names: List[str] = []
        self.done: Dict[relax.Expr, List[relax.Var]] = {}

    def rewrite(self, func: relax.Function, sites) -> relax.Function:
        self.by_out = {}
        for site in sites:
            self.by_out.setdefault(site.out, []).append(site)
        self.stat_vars, self.stat_names, self.done = [], [], {}
        new_func = self.visit_expr(func)
        body = new_func.body
        if not isinstance(body, relax.SeqExpr):
            raise ValueError("CollectStats expects a normalized function body (SeqExpr)")
        missing = {s.name for s in sites} - {n.split(":")[0] for n in self.stat_names}
        if missing:
            raise ValueError(f"CollectStats: linears {sorted(missing)} are not in the function's "
                             "top-level blocks (inside an If?); statistics cannot be returned")
        ret = relax.Tuple([body.body, relax.Tuple(self.stat_vars)])
        new_body = self.builder_.normalize(relax.SeqExpr(body.blocks, ret))
        return relax.Function(new_func.params, new_body, None, new_func.is_pure, new_func.attrs,
                              new_func.span).with_attr(STATS_ATTR, self.stat_names)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        for site in self.by_out.get(binding.var, []):
            x = self.visit_expr(site.x)
            if x not in self.done:
                self.done[x] = self._emit_stats(x)
            for kind, var in zip(self.kinds, self.done[x]):
                self.stat_vars.append(var)
                self.stat_names.append(f"{site.name}:{kind}")
        super().visit_var_binding_(binding)

    def _emit_stats(self, x: relax.Expr) -> List[relax.Var]:
        ndim = x.ty.ndim
        axes = list(range(ndim - 1)) if ndim > 1 else None
        reduce = {
            "absmax": lambda: relax.op.max(relax.op.abs(x), axis=axes),
            "min": lambda: relax.op.min(x, axis=axes),
            "max": lambda: relax.op.max(x, axis=axes),
        }
        out = []
        for kind in self.kinds:
            stat = reduce[kind]() if axes is not None else (relax.op.abs(x) if kind == "absmax" else x)
            if x.ty.dtype != "float32":
                stat = relax.op.astype(self.builder_.emit(stat), "float32")
            # emit_output: the stat must be visible outside the dataflow block to be returned.
            emit = self.builder_.emit_output if self.builder_.current_block_is_dataflow() else self.builder_.emit
            out.append(emit(stat, name_hint=f"stat_{kind}"))
        return out
