"""Finding linear ops (``matmul(x, permute_dims(w))`` / ``matmul(x, w)``) in Relax functions.

Shared by every pass so that AnnotateLinear, CollectStats, SmoothLinear and QuantizeLinear agree
on what a linear is and what it is called: its stable name is the weight parameter's name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Set

import tvm
from tvm import relax

_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
LINEARS_ATTR = "mlc_quant.linears"
STATS_ATTR = "mlc_quant.stats"


@dataclass(frozen=True)
class LinearSite:
    """One linear op inside one function."""

    name: str  # the weight parameter's name: stable across functions
    func: str
    out: relax.Var  # the var bound to the matmul
    x: relax.Expr  # the activation input
    weight: relax.Var  # the weight parameter
    transposed: bool  # True: w is [N, K] (nn.Linear layout); False: w is [K, N]
    in_features: int
    out_features: int


def emit_like(builder: relax.BlockBuilder, value: relax.Expr, var: relax.Var) -> relax.Var:
    """Emit ``value`` under ``var``'s name as what ``var`` was: a dataflow var, or an output of
    the dataflow block (a binding outside a dataflow block is a plain emit)."""
    if isinstance(var, relax.DataflowVar) or not builder.current_block_is_dataflow():
        return builder.emit(value, name_hint=var.name)
    return builder.emit_output(value, name_hint=var.name)


def bindings_of(func: relax.Function) -> Dict[relax.Var, relax.Expr]:
    """Map each bound var of the function's top-level blocks to its value."""
    table = {}
    body = func.body
    if isinstance(body, relax.SeqExpr):
        for block in body.blocks:
            for binding in block.bindings:
                if isinstance(binding, relax.VarBinding):
                    table[binding.var] = binding.value
    return table


def users_of(func: relax.Function) -> Dict[relax.Var, List[relax.Var]]:
    """Map each var to the bound vars whose value uses it (plus None for the return)."""
    users: Dict[relax.Var, List[Optional[relax.Var]]] = {}

    def record(expr, user):
        for used in relax.analysis.free_vars(expr) if not isinstance(expr, relax.Var) else [expr]:
            users.setdefault(used, []).append(user)

    for var, value in bindings_of(func).items():
        record(value, var)
    if isinstance(func.body, relax.SeqExpr):
        record(func.body.body, None)
    return users


def num_inputs(func: relax.Function) -> int:
    """Activation inputs come first; nn.Module exports mark their count with ``num_input``."""
    if func.attrs is not None and "num_input" in func.attrs:
        return int(func.attrs["num_input"])
    return -1


def weight_candidates(func: relax.Function, weight_names: Optional[Iterable[str]] = None) -> Set[relax.Var]:
    """Parameters that may be weights: named ones, else those after ``num_input``, else all."""
    if weight_names is not None:
        names = set(weight_names)
        return {p for p in func.params if p.name in names}
    n = num_inputs(func)
    return set(func.params[n:] if n >= 0 else func.params)


def _static_dim(dim) -> int:
    try:
        return int(dim)
    except TypeError:
        return -1


def find_linears(
    gvar_name: str,
    func: relax.Function,
    weight_names: Optional[Iterable[str]] = None,
) -> List[LinearSite]:
    """Every linear of ``func`` in binding order.

    ``matmul(x, permute_dims(w))`` counts for any 2-D weight candidate ``w``;
    ``matmul(x, w)`` only when ``w`` is explicitly a weight (named, or after ``num_input``), since
    a plain ``matmul`` of two inputs is not a linear.
    """
    table = bindings_of(func)
    candidates = weight_candidates(func, weight_names)
    explicit = weight_names is not None or num_inputs(func) >= 0
    sites = []
    for var, value in table.items():
        if not (isinstance(value, relax.Call) and value.op == _MATMUL):
            continue
        x, rhs = value.args
        weight, transposed = None, False
        rhs_value = table.get(rhs) if isinstance(rhs, relax.Var) else None
        if (
            isinstance(rhs_value, relax.Call)
            and rhs_value.op == _PERMUTE
            and rhs_value.args[0] in candidates
            and _is_2d_transpose(rhs_value)
        ):
            weight, transposed = rhs_value.args[0], True
        elif explicit and rhs in candidates and rhs.ty.ndim == 2:
            weight = rhs
        if weight is None or not _is_float(weight) or not _is_float(var):
            continue  # not a weight, or already an integer matmul
        shape = [_static_dim(d) for d in weight.ty.shape]
        n_out, k_in = (shape[0], shape[1]) if transposed else (shape[1], shape[0])
        sites.append(LinearSite(weight.name, gvar_name, var, x, weight, transposed, k_in, n_out))
    return sites


def _is_float(expr: relax.Expr) -> bool:
    return str(expr.ty.dtype).startswith(("float", "bfloat"))


def _is_2d_transpose(call: relax.Call) -> bool:
    if call.args[0].ty.ndim != 2:
        return False
    axes = call.attrs.axes
    return axes is None or [int(a) for a in axes] == [1, 0]


def annotated_linears(func: relax.Function) -> Optional[List[str]]:
    """Names that AnnotateLinear recorded on ``func`` (None if it was not annotated)."""
    if func.attrs is None or LINEARS_ATTR not in func.attrs:
        return None
    return [str(n) for n in func.attrs[LINEARS_ATTR]]


def module_linears(mod) -> Dict[str, List[LinearSite]]:
    """Annotated linear sites of every annotated function, keyed by function name."""
    out = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            names = annotated_linears(func)
            if names:
                out[gvar.name_hint] = find_linears(gvar.name_hint, func, weight_names=names)
    return out


def row_sums_of(q_var, table, users) -> List[tuple]:
    """(cast var, sum var) of every ``sum(astype(q, int32), axis=-1, keepdims=True)`` of ``q_var``
    (the row sums an asymmetric-weight linear takes of its int8 input); ``table`` and ``users``
    as :func:`bindings_of` and :func:`users_of` give them."""
    out = []
    ndim = len(q_var.ty.shape.values)
    for cast_var in users.get(q_var, []):
        cast = table.get(cast_var)
        if not (isinstance(cast, relax.Call) and cast.op == tvm.ir.Op.get("relax.astype")
                and str(cast.attrs.dtype) == "int32"):
            continue
        cast_users = list(users.get(cast_var, []))
        if len(cast_users) != 1:
            continue
        red = table.get(cast_users[0])
        if not (isinstance(red, relax.Call) and red.op == tvm.ir.Op.get("relax.sum")):
            continue
        axis = [int(a) % ndim for a in (red.attrs.axis or [])]
        if axis == [ndim - 1] and bool(red.attrs.keepdims) and str(red.ty.dtype) == "int32":
            out.append((cast_var, cast_users[0]))
    return out


def calls_extern(mod, symbols) -> bool:
    """Whether a Relax function of ``mod`` references an ``ExternFunc`` named in ``symbols`` (a
    name or names): the exported library must then link the kernels that define it."""
    names = {symbols} if isinstance(symbols, str) else set(symbols)
    found = []

    def visit(e):
        if not found and isinstance(e, relax.ExternFunc) and str(e.global_symbol) in names:
            found.append(e)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
            if found:
                return True
    return False
