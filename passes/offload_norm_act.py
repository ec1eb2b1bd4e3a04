"""OffloadNormAct: float16 RMSNorm (+ residual add) and SiLU-gated multiply -> mlc_quant kernels.

TVM's generated CUDA for these memory-bound ops moves one fp16 element per thread and reaches
1-2 TB/s on an H200; in a 2048-token Llama-2-7B prefill the residual adds, RMSNorms and the
split + SiLU + multiply of the merged gate/up take ~6.6 ms, more than a third of the W8A8 GEMM
time. mlc_quant/kernels/norm_act.cu does them with 16-byte accesses (and the add inside the
norm). Rewrites, on high-level Relax before dispatch (CUDA builds, float16 only):

* ``s = add(a, b); n = rms_norm(s, w, axes=[-1])`` (``a``, ``b`` of one shape)
  -> ``t = call_dps_packed("mlcq_add_rms_norm", (a, b, w, eps), [s's type, n's type])``,
  ``s = t[0]``, ``n = t[1]`` (``s``, the residual stream, keeps its other users);
* any other ``rms_norm(x, w, axes=[-1])`` -> ``call_dps_packed("mlcq_rms_norm", (x, w, eps))``;
* ``multiply(silu(p[0]), p[1])`` with ``p = split(gu, 2, axis=-1)`` (either operand order)
  -> ``call_dps_packed("mlcq_silu_mul", (gu,))``; ``multiply(silu(g), u)`` of two tensors (gate
  and up not merged, e.g. tensor-parallel shards) -> ``mlcq_silu_mul2(g, u)``: the same
  arithmetic either way, so merged and unmerged builds agree.

Only static last dims that are multiples of 8 (16 for ``2 I``) are rewritten, up to 32768 for the
norm, and only where the row count is symbolic or at least ``MIN_ROWS`` (prefill; decode's single
row stays with TVM's fused kernels, measured faster there): anything else stays TVM's. The numerics are TVM's formulas in fp32 with one rounding per
output (SiLU is computed in fp32, where TVM's float16 ``silu`` rounds twice).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import tvm
import tvm.sym
from tvm import IRModule, relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._linear import bindings_of, calls_extern, emit_like

RMS_NORM, ADD_RMS_NORM, SILU_MUL = "mlcq_rms_norm", "mlcq_add_rms_norm", "mlcq_silu_mul"
SILU_MUL2 = "mlcq_silu_mul2"  # gate and up as two tensors (linears not merged)
MAX_HIDDEN = 32768
MIN_ROWS = 64
_ANALYZER = tvm.sym.Analyzer()


def _op(name):
    return tvm.ir.Op.get(name)


def _is_call(e, name) -> bool:
    return isinstance(e, relax.Call) and e.op == _op(name)


def _fp16_last_dim(e) -> Optional[int]:
    """The static last dim of a float16 tensor expression, else None."""
    ty = getattr(e, "ty", None)
    if not isinstance(ty, relax.TensorType) or str(ty.dtype) != "float16" or ty.shape is None:
        return None
    dims = list(ty.shape.values) if hasattr(ty.shape, "values") else None
    if not dims or not isinstance(dims[-1], tvm.tirx.IntImm):
        return None
    return int(dims[-1])


def _many_rows(e) -> bool:
    """False for a static row count below MIN_ROWS (decode): there TVM's fused kernels for one
    row (2 us) beat these (one CTA per row, 3 us measured on the H200); symbolic counts (prefill)
    are rewritten."""
    rows = 1
    for d in list(e.ty.shape.values)[:-1]:
        if not isinstance(d, tvm.tirx.IntImm):
            return True
        rows *= int(d)
    return rows >= MIN_ROWS


def _norm_ok(call: relax.Call) -> bool:
    if _fp16_last_dim(call.args[0]) is None or not _many_rows(call.args[0]):
        return False
    h = _fp16_last_dim(call.args[0])
    axes = [int(a) for a in call.attrs.axes]
    ndim = len(call.args[0].ty.shape.values)
    return (h is not None and h % 8 == 0 and h <= MAX_HIDDEN and axes in ([-1], [ndim - 1])
            and _fp16_last_dim(call.args[1]) == h and len(call.args[1].ty.shape.values) == 1)


def _same_type(a, b) -> bool:
    """Same dtype and shape (symbolic dims proven equal): an add without broadcasting."""
    ta, tb = getattr(a, "ty", None), getattr(b, "ty", None)
    if not (isinstance(ta, relax.TensorType) and isinstance(tb, relax.TensorType)) or str(ta.dtype) != str(tb.dtype):
        return False
    if ta.shape is None or tb.shape is None or not hasattr(ta.shape, "values") or not hasattr(tb.shape, "values"):
        return False
    da, db = list(ta.shape.values), list(tb.shape.values)
    return len(da) == len(db) and all(_ANALYZER.can_prove_equal(x, y) for x, y in zip(da, db))


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: IRModule):
        super().__init__(mod)
        self.table: Dict[relax.Var, relax.Expr] = {}
        self.fused_adds: Dict[relax.Var, relax.Var] = {}  # add var -> the norm var that absorbs it
        self.pending: Dict[relax.Var, relax.Var] = {}  # norm var -> the emitted tuple
        self.counts = {RMS_NORM: 0, ADD_RMS_NORM: 0, SILU_MUL: 0, SILU_MUL2: 0}

    def value(self, e):
        return self.table.get(e, e) if isinstance(e, relax.Var) else e

    def _plan(self, func: relax.Function):
        self.table = bindings_of(func)
        self.fused_adds, self.pending = {}, {}
        for var, val in self.table.items():
            if not (_is_call(val, "relax.nn.rms_norm") and _norm_ok(val)):
                continue
            src = val.args[0]
            add = self.value(src)
            if (isinstance(src, relax.Var) and _is_call(add, "relax.add") and src not in self.fused_adds
                    and _same_type(add.args[0], add.args[1]) and _same_type(add.args[0], src)):
                self.fused_adds[src] = var

    def _silu_mul_source(self, call: relax.Call) -> Optional[Tuple[relax.Expr, ...]]:
        """``(gate_up,)`` for silu(split(gu)[0]) * split(gu)[1], ``(gate, up)`` for two tensors."""
        if not _is_call(call, "relax.multiply"):
            return None
        for act, other in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
            silu = self.value(act)
            if not _is_call(silu, "relax.nn.silu"):
                continue
            g, u = self.value(silu.args[0]), self.value(other)
            inter = _fp16_last_dim(call)
            if (not isinstance(g, relax.TupleGetItem) and inter is not None and inter % 8 == 0
                    and _same_type(silu.args[0], other) and _same_type(other, call) and _many_rows(other)):
                return silu.args[0], other  # gate and up not merged
            if not (isinstance(g, relax.TupleGetItem) and isinstance(u, relax.TupleGetItem)
                    and g.index == 0 and u.index == 1 and g.tuple_value.same_as(u.tuple_value)):
                continue
            split = self.value(g.tuple_value)
            if not _is_call(split, "relax.split") or len(split.ty.fields) != 2:
                continue
            gu = split.args[0]
            width = _fp16_last_dim(gu)
            ndim = len(gu.ty.shape.values) if width is not None else 0
            if (width is None or width % 16 or not _many_rows(gu) or int(split.attrs.axis) % ndim != ndim - 1
                    or _fp16_last_dim(call) != width // 2):
                continue
            sections = split.attrs.indices_or_sections
            halves = (isinstance(sections, tvm.tirx.IntImm) and int(sections) == 2) or (
                not isinstance(sections, tvm.tirx.IntImm) and len(sections) == 1 and int(sections[0]) == width // 2)
            if halves:
                return (gu,)
        return None

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var, val = binding.var, binding.value
        if var in self.fused_adds:
            norm = self.table[self.fused_adds[var]]
            a, b = (self.visit_expr(x) for x in val.args)
            args = [a, b, self.visit_expr(norm.args[1]), tvm.tirx.FloatImm("float64", float(norm.attrs.epsilon))]
            t = self.builder_.emit(relax.call_dps_packed(ADD_RMS_NORM, args, [var.ty, self.fused_adds[var].ty]),
                                   "add_rms_norm")
            self.pending[self.fused_adds[var]] = t
            self._bind(var, relax.TupleGetItem(t, 0))
            self.counts[ADD_RMS_NORM] += 1
            return
        if var in self.pending:
            self._bind(var, relax.TupleGetItem(self.pending[var], 1))
            return
        if _is_call(val, "relax.nn.rms_norm") and _norm_ok(val):
            args = [self.visit_expr(val.args[0]), self.visit_expr(val.args[1]),
                    tvm.tirx.FloatImm("float64", float(val.attrs.epsilon))]
            self._bind(var, relax.call_dps_packed(RMS_NORM, args, var.ty))
            self.counts[RMS_NORM] += 1
            return
        src = self._silu_mul_source(val) if isinstance(val, relax.Call) else None
        if src is not None:
            kernel = SILU_MUL if len(src) == 1 else SILU_MUL2
            self._bind(var, relax.call_dps_packed(kernel, [self.visit_expr(e) for e in src], var.ty))
            self.counts[kernel] += 1
            return
        super().visit_var_binding_(binding)

    def _bind(self, var: relax.Var, value: relax.Expr) -> None:
        self.set_var_remap(var, emit_like(self.builder_, value, var))

    def rewrite(self, func: relax.Function) -> relax.Function:
        self._plan(func)
        return relax.analysis.remove_all_unused(self.visit_expr(func))


@tvm.transform.module_pass(opt_level=0, name="OffloadNormAct")
class OffloadNormAct:  # pylint: disable=too-few-public-methods
    """Rewrite float16 RMSNorm (+ add) and SiLU * up to the norm_act.cu kernels in every Relax
    function; ``counts`` holds how many of each the last run made."""

    def __init__(self):
        self.counts: Dict[str, int] = {}

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        rw = _Rewriter(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rw.builder_.update_func(gvar, rw.rewrite(func))
        self.counts = dict(rw.counts)
        return rw.builder_.get()


def uses_norm_act(mod: IRModule) -> bool:
    """True if a function of ``mod`` calls one of the norm_act.cu kernels."""
    return calls_extern(mod, [k + suffix for k in (RMS_NORM, ADD_RMS_NORM, SILU_MUL, SILU_MUL2)
                              for suffix in ("", "_q", "_qt")])
