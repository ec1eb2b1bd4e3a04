"""FuseActQuantize: the W8A8 activation quantize moves into the norm / SiLU kernel before it.

After OffloadNormAct, a W8A8 prefill reads every RMSNorm and SiLU * up output back once more to
quantize it for the next linear (a separate kernel inside the linear). This pass gives that
quantize to the kernel that produces the activation, which then writes int8 (half the bytes)
and, per token, the row scales; the linear gets int8 x (dispatch's int8-x patterns). Rewritten
(the fp16 output must have no other user):

* static (smq_q8i8f16_0/1/2): ``quantize(y, s, z)`` (scalar constants, int8 out) of
  ``y = mlcq_rms_norm(...)`` / ``mlcq_add_rms_norm(...)[1]`` / ``mlcq_silu_mul(...)``
  -> ``mlcq_rms_norm_q`` / ``mlcq_add_rms_norm_q`` (outputs: sum, q) / ``mlcq_silu_mul_q``;
  where the int8 output's row sums ``sum(astype(q, int32), -1, keepdims)`` are taken (the
  asymmetric-weight linear of smq_q8i8f16_2 subtracts ``rowsum * w_zero``), the ``_qs`` kernels
  write them too (last output), so the linear does not read q once more in a kernel of its own;
* per token (smq_q8i8f16_3), QuantizeLinear's IR: ``xf = astype(y, f32)``,
  ``st = maximum(max(abs(xf), -1, keepdims) / 127, eps)``,
  ``q = astype(clip(round(xf / st), -127, 127), int8)`` -> the ``_qt`` kernels, whose outputs
  give ``q`` and ``st`` (sum, q, st for the add variant).

The kernels compute what the unfused kernels compute (the fp16 output rounded, then kernels.cu's
quantize arithmetic), so the result is the same bit for bit.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import tvm
from tvm import IRModule, relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._linear import bindings_of, emit_like, row_sums_of, users_of
from .offload_norm_act import ADD_RMS_NORM, RMS_NORM, SILU_MUL, SILU_MUL2

SILU_MAX_PER_TOKEN = 16384  # norm_act.cu's row kernel: 256 threads x 8 chunks x 8


def _op(name):
    return tvm.ir.Op.get(name)


def _is_call(e, name) -> bool:
    return isinstance(e, relax.Call) and e.op == _op(name)


def _kernel_of(call) -> Optional[str]:
    if _is_call(call, "relax.call_dps_packed") and isinstance(call.args[0], relax.ExternFunc):
        name = str(call.args[0].global_symbol)
        return name if name in (RMS_NORM, ADD_RMS_NORM, SILU_MUL, SILU_MUL2) else None
    return None


def _tensor_const(e) -> bool:
    return isinstance(e, tvm.ir.expr.Constant) and isinstance(getattr(e, "ty", None), relax.TensorType)


def _scalar_const(e, dtype: str) -> bool:
    return _tensor_const(e) and str(e.ty.dtype) == dtype and len(e.ty.shape.values) == 0


def _const_value(e) -> Optional[float]:
    """A scalar tensor constant or a prim value (clip bounds), as float; else None."""
    if _tensor_const(e):
        return float(e.value.numpy()) if len(e.ty.shape.values) == 0 else None
    v = getattr(e, "value", None)
    return float(v) if isinstance(v, (int, float)) else None


class _Site:  # pylint: disable=too-few-public-methods
    """One fusion: the kernel call var, the var of its fp16 output, the new outputs' vars."""

    def __init__(self, call_var, out_var, kind, q_var, scalars, st_var=None, dropped=(), rs_vars=()):
        self.call_var, self.out_var, self.kind = call_var, out_var, kind
        self.q_var, self.st_var, self.scalars = q_var, st_var, scalars
        self.dropped = set(dropped)
        self.rs_vars = list(rs_vars)  # row sums of q the kernel writes as well (static only)


@mutator
class _Fuser(PyExprMutator):
    def __init__(self, mod: IRModule):
        super().__init__(mod)
        self.table: Dict[relax.Var, relax.Expr] = {}
        self.users: Dict[relax.Var, List] = {}
        self.sites: Dict[relax.Var, _Site] = {}  # by kernel call var
        self.drop: set = set()
        self.rebind: Dict[relax.Var, Tuple[relax.Var, int]] = {}  # old var -> (site call var, output index)
        self.fused = 0
        self._new: Dict[relax.Var, relax.Var] = {}

    def only_user(self, var, user) -> bool:
        return list(self.users.get(var, [])) == [user]

    def _source(self, y) -> Optional[Tuple[relax.Var, relax.Var, str]]:
        """(kernel call var, fp16 output var, kernel) if ``y`` is a norm_act kernel's output."""
        if not isinstance(y, relax.Var):
            return None
        val = self.table.get(y)
        if _kernel_of(val) in (RMS_NORM, SILU_MUL, SILU_MUL2):
            return y, y, _kernel_of(val)
        if isinstance(val, relax.TupleGetItem) and val.index == 1 and isinstance(val.tuple_value, relax.Var):
            t = val.tuple_value
            if _kernel_of(self.table.get(t)) == ADD_RMS_NORM:
                return t, y, ADD_RMS_NORM
        return None

    def _static_site(self, q_var, q) -> Optional[_Site]:
        if not (_is_call(q, "relax.quantize") and str(q.attrs.out_dtype) == "int8"):
            return None
        y, s, z = q.args
        src = self._source(y)
        if src is None or not _scalar_const(s, "float32") or not _scalar_const(z, "int8"):
            return None
        call_var, out_var, kernel = src
        if not self.only_user(out_var, q_var):
            return None
        dropped = [out_var] if call_var is not out_var else []
        rs_vars = []
        if kernel in (RMS_NORM, ADD_RMS_NORM) or int(q_var.ty.shape.values[-1]) <= SILU_MAX_PER_TOKEN:
            for cast_var, rs_var in row_sums_of(q_var, self.table, self.users):
                dropped.append(cast_var)
                rs_vars.append(rs_var)
        return _Site(call_var, out_var, kernel, q_var, [s, z], dropped=dropped, rs_vars=rs_vars)

    def _per_token_site(self, q_var, q) -> Optional[_Site]:
        # q = astype(clip(round(divide(xf, st)), -127, 127), int8), xf = astype(y, float32),
        # st = maximum(divide(max(abs(xf), axis=-1, keepdims), 127), eps)
        if not (_is_call(q, "relax.astype") and str(q.attrs.dtype) == "int8"):
            return None
        clip_var = q.args[0]
        clip = self.table.get(clip_var)
        if not _is_call(clip, "relax.clip") or [_const_value(a) for a in clip.args[1:]] != [-127.0, 127.0]:
            return None
        rnd_var = clip.args[0]
        rnd = self.table.get(rnd_var)
        div_var = rnd.args[0] if _is_call(rnd, "relax.round") else None
        div = self.table.get(div_var) if div_var is not None else None
        if not _is_call(div, "relax.divide"):
            return None
        xf_var, st_var = div.args
        xf, st = self.table.get(xf_var), self.table.get(st_var)
        if not (_is_call(xf, "relax.astype") and str(xf.attrs.dtype) == "float32" and _is_call(st, "relax.maximum")):
            return None
        ratio_var, eps = st.args
        if _tensor_const(ratio_var):
            ratio_var, eps = eps, ratio_var
        ratio = self.table.get(ratio_var)
        if not (_scalar_const(eps, "float32") and _is_call(ratio, "relax.divide")
                and _const_value(ratio.args[1]) == 127.0):
            return None
        amax_var = ratio.args[0]
        amax = self.table.get(amax_var)
        if not (_is_call(amax, "relax.max") and bool(amax.attrs.keepdims)):
            return None
        abs_var = amax.args[0]
        absv = self.table.get(abs_var)
        if not (_is_call(absv, "relax.abs") and absv.args[0].same_as(xf_var)):
            return None
        dims = list(xf_var.ty.shape.values)
        if [int(a) % len(dims) for a in (amax.attrs.axis or [])] != [len(dims) - 1]:
            return None
        src = self._source(xf.args[0])
        if src is None:
            return None
        call_var, out_var, kernel = src
        if kernel in (SILU_MUL, SILU_MUL2) and int(dims[-1]) > SILU_MAX_PER_TOKEN:
            return None
        # the chain's intermediates are used by the chain alone (st may also feed the dequantize)
        if not self.only_user(out_var, xf_var) or set(self.users.get(xf_var, [])) != {abs_var, div_var}:
            return None
        for v, u in ((abs_var, amax_var), (amax_var, ratio_var), (ratio_var, st_var), (div_var, rnd_var),
                     (rnd_var, clip_var), (clip_var, q_var)):
            if not self.only_user(v, u):
                return None
        dropped = [xf_var, abs_var, amax_var, ratio_var, div_var, rnd_var, clip_var]
        if call_var is not out_var:
            dropped.append(out_var)
        return _Site(call_var, out_var, kernel, q_var, [eps], st_var=st_var, dropped=dropped)

    def plan(self, func: relax.Function) -> None:
        self.table = bindings_of(func)
        self.users = users_of(func)
        self.sites, self.drop, self.rebind = {}, set(), {}
        for var, val in self.table.items():
            site = self._static_site(var, val) or self._per_token_site(var, val)
            if site is None or site.call_var in self.sites:
                continue
            if site.kind != ADD_RMS_NORM and site.call_var is not site.out_var:
                continue
            self.sites[site.call_var] = site
            self.drop |= site.dropped
            base = 1 if site.kind == ADD_RMS_NORM else 0  # the add variant keeps the sum first
            self.rebind[site.q_var] = (site.call_var, base)
            if site.st_var is not None:
                self.rebind[site.st_var] = (site.call_var, base + 1)
            for rs_var in site.rs_vars:
                self.rebind[rs_var] = (site.call_var, base + 1)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var = binding.var
        if var in self.drop:
            return
        site = self.sites.get(var)
        if site is not None:
            self._emit_fused(site, binding.value)
            return
        if var in self.rebind:
            call_var, index = self.rebind[var]
            fused = self._new[call_var]
            if isinstance(fused.ty, relax.TupleType):
                self.set_var_remap(var, emit_like(self.builder_, relax.TupleGetItem(fused, index), var))
            else:  # a static lone kernel: its one output is q
                self.set_var_remap(var, fused)
            return
        super().visit_var_binding_(binding)

    def _emit_fused(self, site: _Site, call: relax.Call) -> None:
        args = [self.visit_expr(a) for a in call.args[1].fields] + list(site.scalars)
        per_token = site.st_var is not None
        name = site.kind + ("_qt" if per_token else "_qs" if site.rs_vars else "_q")
        outs = [site.q_var.ty] + ([site.st_var.ty] if per_token else []) + [v.ty for v in site.rs_vars[:1]]
        if site.kind == ADD_RMS_NORM:
            outs = [site.call_var.ty.fields[0]] + outs
        new = emit_like(self.builder_, relax.call_dps_packed(name, args, outs if len(outs) > 1 else outs[0]), site.call_var)
        if site.kind == ADD_RMS_NORM:
            self.set_var_remap(site.call_var, new)
        self._new[site.call_var] = new
        self.fused += 1

    def rewrite(self, func: relax.Function) -> relax.Function:
        self.plan(func)
        self._new = {}
        return relax.analysis.remove_all_unused(self.visit_expr(func))


@tvm.transform.module_pass(opt_level=0, name="FuseActQuantize")
class FuseActQuantize:  # pylint: disable=too-few-public-methods
    """Move W8A8 activation quantizes into the norm_act.cu kernel producing the activation;
    ``fused`` is the number of kernels rewritten by the last run."""

    def __init__(self):
        self.fused = 0

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        fuser = _Fuser(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                fuser.builder_.update_func(gvar, fuser.rewrite(func))
        self.fused = fuser.fused
        return fuser.builder_.get()
