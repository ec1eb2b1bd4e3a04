"""QuantizeLinear: replace each annotated linear by its int8 form (quantize -> int8 GEMM -> dequantize)."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import tvm
from tvm import IRModule, relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._linear import LinearSite, emit_like, module_linears, users_of


@tvm.transform.module_pass(opt_level=0, name="mlc_quant.QuantizeLinear")
class QuantizeLinear:
    """Quantize every annotated linear with ``scheme``.

    The float weight parameter ``w`` is replaced, in place in the signature, by the params the
    scheme asks for (``w.q`` int8 ``[N, K]``, ``w.scale``, ...), whose values come from
    ``scheme.quantize_weight`` (``mlc_quant.quantize_params``). It is kept only if something other
    than a linear still reads it (a tied embedding). Static activation scales are bound in as
    constants. Bind the new params (``relax.transform.BindParams``) for a self-contained module.

    Parameters
    ----------
    scheme : mlc_quant.schemes.QuantScheme
        The scheme (see ``mlc_quant.schemes.SCHEMES``).
    act_qparams : Mapping[str, ActQParams]
        Static activation scale/zero point per linear name (schemes with static activations).
    linears : Optional[list of str]
        Quantize only these linears (default: all annotated ones).
    """

    def __init__(self, scheme, act_qparams: Optional[Mapping] = None, linears: Optional[List[str]] = None):
        self.scheme = scheme
        self.act_qparams = dict(act_qparams or {})
        self.linears = None if linears is None else set(linears)

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        if not self.scheme.quantizes:
            return mod
        rewriter = _LinearQuantizer(mod, self.scheme, self.act_qparams)
        for fname, sites in module_linears(mod).items():
            sites = [s for s in sites if self.linears is None or s.name in self.linears]
            if not sites:
                continue
            gvar = mod.get_global_var(fname)
            rewriter.builder_.update_func(gvar, rewriter.rewrite(mod[gvar], sites))
        return rewriter.builder_.get()


@mutator
class _LinearQuantizer(PyExprMutator):
    def __init__(self, mod: IRModule, scheme, act_qparams: Dict):
        super().__init__(mod)
        self.scheme = scheme
        self.act_qparams = act_qparams
        self.by_out: Dict[relax.Var, LinearSite] = {}
        self.drop: set = set()
        self.wparams: Dict[str, relax.Var] = {}

    def rewrite(self, func: relax.Function, sites: List[LinearSite]) -> relax.Function:
        if self.scheme.static_activations:
            missing = sorted({s.name for s in sites} - set(self.act_qparams))
            if missing:
                raise ValueError(f"QuantizeLinear: scheme {self.scheme.name} needs calibrated activation "
                                 f"scales, none given for {missing}; run mlc_quant.calibrate first")
        users = users_of(func)
        bindings = {}
        for block in func.body.blocks:
            for b in block.bindings:
                bindings[b.var] = b.value
        self.by_out = {s.out: s for s in sites}
        # permute_dims(w) bindings that only feed quantized linears disappear with the float weight.
        self.drop = set()
        for s in sites:
            if s.transposed:
                wt = bindings[s.out].args[1]
                if all(u in self.by_out for u in users.get(wt, [])):
                    self.drop.add(wt)
        by_weight = {}
        for s in sites:
            if s.out_features < 0 or s.in_features < 0:
                raise ValueError(f"QuantizeLinear: weight {s.name} needs a static shape")
            by_weight.setdefault(s.weight, s)
        params, self.wparams = [], {}
        for p in func.params:
            site = by_weight.get(p)
            if site is None:
                params.append(p)
                continue
            other = [u for u in users.get(p, []) if u not in self.drop and u not in self.by_out]
            if other:  # still read elsewhere (e.g. tied embedding): keep the float weight too
                params.append(p)
            for pname, shape, dtype in self.scheme.weight_param_specs(site.name, site.out_features, site.in_features):
                var = relax.Var(pname, relax.TensorType(shape, dtype))
                self.wparams[pname] = var
                params.append(var)
        new_func = self.visit_expr(func)
        return relax.Function(params, new_func.body, new_func.ret_ty, new_func.is_pure, new_func.attrs,
                              new_func.span)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.drop:
            return
        site = self.by_out.get(binding.var)
        if site is None:
            super().visit_var_binding_(binding)
            return
        x = self.visit_expr(site.x)
        y = self.scheme.emit_linear(self.builder_, x, self.wparams, site.name, self.act_qparams.get(site.name))
        y = self.builder_.normalize(y)
        self.set_var_remap(binding.var, emit_like(self.builder_, y, binding.var))
