"""FuseSiluGemm: a W8A8 gate/up linear, SiLU * up and the down_proj's quantize -> one GEMM.

In a W8A8 prefill the merged gate/up GEMM writes fp16 [tokens, 2I], and a second kernel reads it
back to compute ``quantize(silu(gate) * up)`` for the down_proj (int8 [tokens, I]). With the gate
and up rows interleaved in blocks of 8 (MergeSiblingLinears(interleave_swiglu=8)), each thread
of the GEMM holds a gate column and its up column in registers, so the CUTLASS epilogue computes
the int8 result directly (mlc_quant/kernels/cutlass_w8a8_sm90.cu, MLCQ_EPI=1): a quarter of the
bytes written and one kernel less per layer. Rewritten, in functions over a symbolic number of
rows (prefill; decode keeps TVM's kernels, as OffloadNormAct does):

    acc = matmul(xq, permute_dims(w))                      # int8 x, int8 w [n, k]
    t = acc  |  subtract(subtract(acc, multiply(rs, zp)), corr)     # asymmetric weights
    y = dequantize(t, scale, 0)                             # float16
    p = split(reshape(y, [..., n / 8, 2, 8]), 2, axis=-2)
    g, u = reshape(p[0], [..., n / 2]), reshape(p[1], [..., n / 2])
    q = quantize(multiply(silu(g), u), s, z)                # static, int8
    [r = sum(astype(q, int32), axis=-1, keepdims=True)]    # the asymmetric down_proj's row sums
->
    q = call_dps_packed("mlcq_w8a8[_asym]_silu_q[s]", (xq, w, scale, [rs, zp, corr,] s, z))

``xq`` (and ``rs``) stay as they are, so FuseActQuantize still moves their quantize into the
RMSNorm kernel before. The kernel is bit-identical to the unfused fp16 GEMM + mlcq_silu_mul_q(s)
and falls back to exactly those where the CUTLASS epilogue does not apply or the policy in
mlc_quant/kernels/linear.cu does not take it (small M, asymmetric weights above M = 128, other
GPUs).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import tvm
from tvm import IRModule, relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._linear import bindings_of, calls_extern, emit_like, row_sums_of, users_of
from .offload_norm_act import _many_rows

BLOCK = 8  # rows of gate, then of up, in turn (the accumulator fragment's 8-column chunks)


def _op(name):
    return tvm.ir.Op.get(name)


def _is_call(e, name) -> bool:
    return isinstance(e, relax.Call) and e.op == _op(name)


def _scalar(e, dtype: str) -> bool:
    ty = getattr(e, "ty", None)
    return (isinstance(ty, relax.TensorType) and str(ty.dtype) == dtype and ty.shape is not None
            and hasattr(ty.shape, "values") and len(ty.shape.values) == 0)


def _const_zero(e) -> bool:
    return isinstance(e, tvm.ir.expr.Constant) and not e.value.numpy().any()


def _static_dims(e) -> Optional[List[int]]:
    shape = getattr(getattr(e, "ty", None), "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    dims = list(shape.values)
    return [int(d) for d in dims] if all(isinstance(d, tvm.tirx.IntImm) for d in dims) else None


def _last(e) -> Optional[int]:
    shape = getattr(getattr(e, "ty", None), "shape", None)
    if shape is None or not hasattr(shape, "values") or not shape.values:
        return None
    d = shape.values[-1]
    return int(d) if isinstance(d, tvm.tirx.IntImm) else None


class _Site:  # pylint: disable=too-few-public-methods
    def __init__(self, q_var, args, name, rs_var=None):
        self.q_var, self.args, self.name, self.rs_var = q_var, args, name, rs_var


@mutator
class _Fuser(PyExprMutator):
    def __init__(self, mod: IRModule):
        super().__init__(mod)
        self.table: Dict[relax.Var, relax.Expr] = {}
        self.users: Dict[relax.Var, List] = {}
        self.sites: Dict[relax.Var, _Site] = {}  # by q var
        self.rebind: Dict[relax.Var, relax.Var] = {}  # row-sum var -> its site's q var
        self.fused = 0
        self._tuples: Dict[relax.Var, relax.Var] = {}  # q var -> the fused call's tuple (with row sums)

    def val(self, e):
        return self.table.get(e, e) if isinstance(e, relax.Var) else e

    def single(self, var, user) -> bool:
        users = list(self.users.get(var, []))
        return len(users) == 1 and users[0] is not None and users[0].same_as(user)

    def _deinterleave(self, e, index: int, n: int):
        """(y, split var) if e is reshape(split(reshape(y, [..., n/16, 2, 8]), 2, axis=-2)[index]);
        every var on the way used once (the split: by its two items)."""
        r = self.val(e)
        if not (_is_call(r, "relax.reshape") and _last(e) == n // 2):
            return None
        item_e = r.args[0]
        item = self.val(item_e)
        if not (isinstance(item, relax.TupleGetItem) and item.index == index):
            return None
        if isinstance(item_e, relax.Var) and not self.single(item_e, e):
            return None
        sp_var = item.tuple_value
        split = self.val(sp_var)
        if not (isinstance(sp_var, relax.Var) and _is_call(split, "relax.split")
                and len(self.users.get(sp_var, [])) == 2):
            return None
        ndim = len(split.args[0].ty.shape.values)
        sections = split.attrs.indices_or_sections
        if int(split.attrs.axis) not in (-2, ndim - 2) or not (
                isinstance(sections, (int, tvm.tirx.IntImm)) and int(sections) == 2):
            return None
        blocks_var = split.args[0]
        blocks = self.val(blocks_var)
        dims = list(blocks_var.ty.shape.values)[-3:]
        if not (_is_call(blocks, "relax.reshape") and isinstance(blocks_var, relax.Var)
                and self.single(blocks_var, sp_var)):
            return None
        if [int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in dims] != [n // (2 * BLOCK), 2, BLOCK]:
            return None
        y = blocks.args[0]
        return (y, sp_var) if isinstance(y, relax.Var) and self.single(y, blocks_var) else None

    def _linear(self, y, n: int):
        """(xq, w, scale, asym operands or None) of the W8A8 linear whose dequantize is y."""
        dq = self.val(y)
        if not (_is_call(dq, "relax.dequantize") and str(y.ty.dtype) == "float16" and _const_zero(dq.args[2])):
            return None
        t, scale = dq.args[0], dq.args[1]
        ndim = len(y.ty.shape.values)
        if int(dq.attrs.axis) not in (-1, ndim - 1) or str(scale.ty.dtype) != "float32":
            return None
        if not (_scalar(scale, "float32") or _static_dims(scale) == [n]) or not self.single(t, y):
            return None
        acc, asym = t, None
        tv = self.val(t)
        if _is_call(tv, "relax.subtract"):  # subtract(subtract(acc, multiply(rs, zp)), corr)
            inner, corr = tv.args
            iv = self.val(inner)
            if not (_is_call(iv, "relax.subtract") and self.single(inner, t)):
                return None
            acc, m = iv.args
            mv = self.val(m)
            if not (_is_call(mv, "relax.multiply") and self.single(m, inner) and self.single(acc, inner)):
                return None
            rs, zp = mv.args
            if _static_dims(rs) == [n]:
                rs, zp = zp, rs
            if any(str(e.ty.dtype) != "int32" or _static_dims(e) != [n] for e in (zp, corr)):
                return None
            if str(rs.ty.dtype) != "int32" or _last(rs) != 1:
                return None
            asym = [rs, zp, corr]
        mm = self.val(acc)
        if not (_is_call(mm, "relax.matmul") and str(acc.ty.dtype) == "int32"):
            return None
        xq, wt = mm.args
        perm = self.val(wt)
        if not (_is_call(perm, "relax.permute_dims") and self.single(wt, acc)):
            return None
        axes, w = perm.attrs.axes, perm.args[0]
        if axes is not None and [int(x) for x in axes] != [1, 0]:
            return None
        wdims = _static_dims(w)
        if str(w.ty.dtype) != "int8" or wdims is None or len(wdims) != 2 or wdims[0] != n:
            return None
        if str(xq.ty.dtype) != "int8" or not _many_rows(xq):
            return None
        return xq, w, scale, asym

    def _site(self, q_var, q) -> Optional[_Site]:
        if not (_is_call(q, "relax.quantize") and str(q.attrs.out_dtype) == "int8"):
            return None
        h, s, z = q.args
        if not (isinstance(s, tvm.ir.expr.Constant) and _scalar(s, "float32")
                and isinstance(z, tvm.ir.expr.Constant) and _scalar(z, "int8")):
            return None
        mul = self.val(h)
        if not (_is_call(mul, "relax.multiply") and self.single(h, q_var)):
            return None
        a, b = mul.args
        if not _is_call(self.val(a), "relax.nn.silu"):
            a, b = b, a
        act = self.val(a)
        if not (_is_call(act, "relax.nn.silu") and self.single(a, h) and self.single(b, h)
                and self.single(act.args[0], a)):
            return None
        n = 2 * (_last(b) or 0)
        if n == 0 or n % (2 * BLOCK) != 0:
            return None
        gate, up = self._deinterleave(act.args[0], 0, n), self._deinterleave(b, 1, n)
        if gate is None or up is None or not (gate[0].same_as(up[0]) and gate[1].same_as(up[1])):
            return None
        linear = self._linear(gate[0], n)
        if linear is None:
            return None
        xq, w, scale, asym = linear
        # the row sums of q the asymmetric down_proj takes: the epilogue writes them as well
        row_sums = row_sums_of(q_var, self.table, self.users)
        rs_var = row_sums[0][1] if row_sums else None
        name = "mlcq_w8a8" + ("_asym" if asym else "") + "_silu_q" + ("s" if rs_var is not None else "")
        return _Site(q_var, [xq, w, scale] + (asym or []) + [s, z], name, rs_var)

    def plan(self, func: relax.Function) -> None:
        self.table = bindings_of(func)
        self.users = users_of(func)
        self.sites, self.rebind = {}, {}
        for var, val in self.table.items():
            site = self._site(var, val)
            if site is not None:
                self.sites[var] = site
                if site.rs_var is not None:
                    self.rebind[site.rs_var] = var

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var = binding.var
        site = self.sites.get(var)
        if site is not None:
            args = [self.visit_expr(a) for a in site.args]
            if site.rs_var is None:
                self.set_var_remap(var, emit_like(self.builder_, relax.call_dps_packed(site.name, args, var.ty), var))
            else:
                outs = [var.ty, site.rs_var.ty]
                tup = self.builder_.emit(relax.call_dps_packed(site.name, args, outs), var.name + "_silu")
                self._tuples[var] = tup
                self.set_var_remap(var, emit_like(self.builder_, relax.TupleGetItem(tup, 0), var))
            self.fused += 1
            return
        if var in self.rebind:
            self.set_var_remap(var, emit_like(self.builder_, relax.TupleGetItem(self._tuples[self.rebind[var]], 1), var))
            return
        super().visit_var_binding_(binding)

    def rewrite(self, func: relax.Function) -> relax.Function:
        self.plan(func)
        self._tuples = {}
        return relax.analysis.remove_all_unused(self.visit_expr(func))


@tvm.transform.module_pass(opt_level=0, name="FuseSiluGemm")
class FuseSiluGemm:  # pylint: disable=too-few-public-methods
    """Fuse SiLU * up and the down_proj's static quantize into the interleaved W8A8 gate/up GEMM;
    ``fused`` is the number of linears rewritten by the last run."""

    def __init__(self):
        self.fused = 0

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        fuser = _Fuser(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function) and not (func.attrs and "Composite" in func.attrs):
                fuser.builder_.update_func(gvar, fuser.rewrite(func))
        self.fused = fuser.fused
        return fuser.builder_.get()


def uses_silu_gemm(mod: IRModule) -> bool:
    """Whether ``mod`` calls the fused kernels (they live in the mlc_quant kernel objects)."""
    return calls_extern(mod, ["mlcq_w8a8" + a + "_silu_q" + s for a in ("", "_asym") for s in ("", "s")])
