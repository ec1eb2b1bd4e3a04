"""FoldSplitConcat: ``concat`` of reshaped consecutive ``split`` parts -> one ``reshape``.

After MergeSiblingLinears, q/k/v come out of one linear as ``[..., (Hq + 2 Hkv) * D]`` and are
split; the Llama export then reshapes each part to ``[..., H_i, D]`` and concatenates them again
along the head axis for ``attention_with_fused_qkv``. In row-major layout that concatenation is
exactly the merged output viewed as ``[..., Hq + 2 Hkv, D]``, so the split and the concat (two
full copies of the q/k/v activations: ~3.7 ms of a 2048-token Llama-2-7B prefill on an H200)
become one reshape, which TVM lowers to a view.

Folded: ``concat((reshape(s[0]), ..., reshape(s[n-1])), axis=-2)`` where ``s = split(x, axis=-1)``,
every part of ``s`` is used in order, each reshape keeps the leading dims of ``x`` and splits the
last one into ``(H_i, D)`` with one ``D`` for all parts. Anything else is left alone (the split
and its other users stay; unused bindings are removed).
"""
from __future__ import annotations

from typing import List, Optional

import tvm
import tvm.sym
from tvm import IRModule, relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._linear import bindings_of

_ANALYZER = tvm.sym.Analyzer()  # proves symbolic dims equal (seq_len * 4096 == seq_len * 4096)


def _op(name):
    return tvm.ir.Op.get(name)


def _static_shape(e: relax.Expr) -> Optional[List]:
    """The shape as a list of PrimExprs (symbolic dims allowed), or None if unknown."""
    ty = getattr(e, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None or not hasattr(ty.shape, "values"):
        return None
    return list(ty.shape.values)


def _same(a, b) -> bool:
    return bool(_ANALYZER.can_prove_equal(a, b))


@mutator
class _Folder(PyExprMutator):
    def __init__(self, mod: IRModule):
        super().__init__(mod)
        self.table = {}
        self.folded = 0

    def value(self, e):
        while isinstance(e, relax.Var) and e in self.table:
            e = self.table[e]
        return e

    def is_call(self, e, name) -> bool:
        return isinstance(e, relax.Call) and e.op == _op(name)

    def folded_source(self, call: relax.Call) -> Optional[relax.Expr]:
        """``x`` if ``call`` (a concat) is a reshaped split of ``x`` put back together, else None."""
        fields = self.value(call.args[0])
        if not isinstance(fields, relax.Tuple) or len(fields.fields) < 2:
            return None
        out_shape = _static_shape(call)
        if out_shape is None or len(out_shape) < 2 or int(call.attrs.axis) % len(out_shape) != len(out_shape) - 2:
            return None
        split_var, x, head_dim = None, None, None
        for i, f in enumerate(fields.fields):
            r = self.value(f)
            if not self.is_call(r, "relax.reshape"):
                return None
            part = r.args[0]
            item = self.value(part)
            if not isinstance(item, relax.TupleGetItem) or item.index != i:
                return None
            if split_var is None:
                split_var = item.tuple_value
                split = self.value(split_var)
                if not self.is_call(split, "relax.split"):
                    return None
                x = split.args[0]
                xs = _static_shape(x)
                if xs is None or int(split.attrs.axis) % len(xs) != len(xs) - 1:
                    return None
                n_parts = len(split.ty.fields) if isinstance(split.ty, relax.TupleType) else None
                if n_parts != len(fields.fields):
                    return None
            elif not item.tuple_value.same_as(split_var):
                return None
            ps, rs = _static_shape(part), _static_shape(r)
            if ps is None or rs is None or len(rs) != len(xs) + 1:
                return None
            if not all(_same(a, b) for a, b in zip(rs[:-2], xs[:-1])):
                return None
            if not _same(rs[-2] * rs[-1], ps[-1]):
                return None
            if head_dim is None:
                head_dim = rs[-1]
            elif not _same(head_dim, rs[-1]):
                return None
        if not all(_same(a, b) for a, b in zip(out_shape[:-2], xs[:-1])) or not _same(out_shape[-1], head_dim):
            return None
        return x

    def visit_call_(self, call: relax.Call) -> relax.Expr:  # pylint: disable=arguments-renamed
        x = self.folded_source(call) if self.is_call(call, "relax.concat") else None
        if x is None:
            return super().visit_call_(call)
        self.folded += 1
        return relax.op.reshape(self.visit_expr(x), call.ty.shape)

    def rewrite(self, func: relax.Function) -> relax.Function:
        self.table = bindings_of(func)
        new = self.visit_expr(func)
        return relax.analysis.remove_all_unused(new)


@tvm.transform.module_pass(opt_level=0, name="FoldSplitConcat")
class FoldSplitConcat:  # pylint: disable=too-few-public-methods
    """Fold ``concat(reshape(split(x)))`` round trips into ``reshape(x)`` in every Relax function.

    ``folded`` holds the number of concats replaced by the last run."""

    def __init__(self):
        self.folded = 0

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        folder = _Folder(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                new = folder.rewrite(func)
                folder.builder_.update_func(gvar, new)
        self.folded = folder.folded
        return folder.builder_.get()
