"""UntieHead: give a tied LM head its own weight parameter.

A tied head is ``matmul(h, permute_dims(embed))`` with ``embed`` also read by the embedding
``take``. Rotations that fold a norm weight or an orthogonal matrix into the head's input side
(SpinQuant/QuaRot R1 with the final RMSNorm fused) change the head's weight but not the table,
so the head needs its own copy. This pass adds the parameter ``head_name`` (same type as the
embedding, appended after the other weights, where an untied model has ``lm_head_weight``) to
every function with such a linear, and points the head's transpose at it. The params dict gets
``params[head_name] = params[embed_name]`` (``mlc_quant.rotation`` does this).
"""
from __future__ import annotations

import tvm
from tvm import IRModule, relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._linear import emit_like, find_linears


@tvm.transform.module_pass(opt_level=0, name="mlc_quant.UntieHead")
class UntieHead:
    """Untie ``matmul(h, permute_dims(<embed_name>))`` into ``matmul(h, permute_dims(<head_name>))``."""

    def __init__(self, embed_name: str = "model_embed_tokens_weight", head_name: str = "lm_head_weight"):
        self.embed_name = embed_name
        self.head_name = head_name

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        rewriter = _Untie(mod)
        found = False
        for gvar, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function):
                continue
            if any(p.name == self.head_name for p in func.params):
                raise ValueError(f"UntieHead: {gvar.name_hint} already has a parameter {self.head_name}")
            sites = [s for s in find_linears(gvar.name_hint, func, [self.embed_name]) if s.transposed]
            if not sites:
                continue
            found = True
            embed = sites[0].weight
            head = relax.Var(self.head_name, embed.ty)
            table = {b.var: b.value for blk in func.body.blocks for b in blk.bindings}
            rewriter.targets = {table[s.out].args[1] for s in sites}  # the permute_dims vars
            rewriter.embed, rewriter.head = embed, head
            new = rewriter.visit_expr(func)
            rewriter.builder_.update_func(gvar, relax.Function(list(func.params) + [head], new.body, new.ret_ty,
                                                               new.is_pure, new.attrs, new.span))
        if not found:
            raise ValueError(f"UntieHead: no linear reads {self.embed_name} (is the head already untied?)")
        return rewriter.builder_.get()


@mutator
class _Untie(PyExprMutator):
    def __init__(self, mod: IRModule):
        super().__init__(mod)
        self.targets = set()
        self.embed = None
        self.head = None

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.targets:
            value = binding.value
            new_value = relax.op.permute_dims(self.head, value.attrs.axes)
            self.set_var_remap(binding.var, emit_like(self.builder_, self.builder_.normalize(new_value), binding.var))
            return
        super().visit_var_binding_(binding)
