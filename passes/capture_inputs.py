"""CaptureInputs: make every annotated function also return the input activations of its linears.

What CollectStats reduces to per-channel vectors, this pass returns whole (as float32), so the
host can keep a sample of rows per linear input: the observatory's per-layer errors and the
per-group alpha search (``mlc_quant.capture``) run on real activations. Only for analysis: the
outputs are as large as the activations themselves.
"""
from __future__ import annotations

from typing import Dict, List

import tvm
from tvm import IRModule, relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._linear import module_linears

CAPTURES_ATTR = "mlc_quant.captures"


@tvm.transform.module_pass(opt_level=0, name="mlc_quant.CaptureInputs")
class CaptureInputs:
    """Rewrite each annotated function to return ``(orig_ret, (x_0, x_1, ...))``.

    ``x_i`` is the input of one set of linears that read the same activation, cast to float32,
    with its original shape (``[..., K]``). The function attribute ``mlc_quant.captures`` names
    each ``x_i`` by those linears, sorted and comma-joined (``mlc_quant.smoothing.group_key``), so
    the names match the smoothing groups. Same return convention as CollectStats, so
    ``Engine(stats_callback=...)`` receives the captures.
    """

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        sites_by_func = module_linears(mod)
        emitter = _CaptureEmitter(mod)
        for gvar, func in mod.functions_items():
            sites = sites_by_func.get(gvar.name_hint)
            if sites:
                emitter.builder_.update_func(gvar, emitter.rewrite(func, sites))
        return emitter.builder_.get()


@mutator
class _CaptureEmitter(PyExprMutator):
    def __init__(self, mod: IRModule):
        super().__init__(mod)
        self.first_use: Dict[relax.Var, relax.Expr] = {}
        self.keys: Dict[relax.Expr, str] = {}
        self.vars: List[relax.Var] = []
        self.names: List[str] = []
        self.done = set()

    def rewrite(self, func: relax.Function, sites) -> relax.Function:
        readers: Dict[relax.Expr, set] = {}
        for s in sites:
            readers.setdefault(s.x, set()).add(s.name)
        self.keys = {x: ",".join(sorted(names)) for x, names in readers.items()}
        # capture each input at its first reading linear
        self.first_use = {}
        seen = set()
        for s in sites:
            if s.x not in seen:
                seen.add(s.x)
                self.first_use[s.out] = s.x
        self.vars, self.names, self.done = [], [], set()
        new_func = self.visit_expr(func)
        body = new_func.body
        if not isinstance(body, relax.SeqExpr):
            raise ValueError("CaptureInputs expects a normalized function body (SeqExpr)")
        if len(self.names) != len(self.keys):
            raise ValueError("CaptureInputs: some linears are not in the function's top-level blocks")
        ret = relax.Tuple([body.body, relax.Tuple(self.vars)])
        new_body = self.builder_.normalize(relax.SeqExpr(body.blocks, ret))
        return relax.Function(new_func.params, new_body, None, new_func.is_pure, new_func.attrs,
                              new_func.span).with_attr(CAPTURES_ATTR, self.names)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        x_old = self.first_use.get(binding.var)
        if x_old is not None and x_old not in self.done:
            self.done.add(x_old)
            x = self.visit_expr(x_old)
            value = x if x.ty.dtype == "float32" else relax.op.astype(x, "float32")
            if isinstance(value, relax.Var):
                value = relax.op.add(value, relax.const(0.0, "float32"))  # a fresh var to return
            emit = self.builder_.emit_output if self.builder_.current_block_is_dataflow() else self.builder_.emit
            self.vars.append(emit(value, name_hint="captured"))
            self.names.append(self.keys[x_old])
        super().visit_var_binding_(binding)
