"""Offload the GEMMs of a CUDA build to mlc_quant's kernels through Relax BYOC.

``dispatch_gemms(mod)`` is the one entry point:

1. ``FuseOpsByPattern(patterns, annotate_codegen=True)`` groups each quantized linear of the
   docs/design.md contract (quantize -> int8 matmul -> dequantize, the asymmetric and per-token
   variants, each with an optional bias ``add``; the per-token one with its scale computation
   ``max(|x|) / 127`` included, so one kernel reads x) into a composite function for the
   ``mlc_cutlass`` codegen, and each float linear ``matmul(x, permute_dims(w))`` /
   ``matmul(x, w)`` (+ bias) into one for ``mlc_cublaslt``. Constants are lifted to arguments
   (``bind_constants=False``) so bound weights stay VM constants and are not copied into code.
2. ``RunCodegen`` calls ``relax.ext.mlc_cutlass`` / ``relax.ext.mlc_cublaslt`` (registered here):
   for every composite they generate a small C++ tvm-ffi function named after its global symbol
   that maps the composite's arguments onto ``mlcq::RunLinear`` (mlc_quant/kernels/mlcq_api.h),
   compile it with g++ and return it as a static library module.
3. The kernel objects (:func:`mlc_quant.kernels.build_kernels`) are attached once to the module's
   ``external_mods``, so ``tvm.compile`` + ``export_library(path, options=link_options())`` links
   everything into one shared library (see :func:`export_library`).

The kernel is chosen at run time from the actual shape (mlc_quant/kernels/linear.cu): CUTLASS
sm90 with the dequantize fused in its epilogue, except for M <= 64 where cuBLASLt's int8 GEMM +
a separate epilogue kernel measured faster. Shapes CUTLASS cannot take (K % 16 or N % 8 != 0,
non-fp16 output) are still offloaded: they run on cuBLASLt + the epilogue kernel, or a CUDA-core
GEMM for odd K; ``dispatch_gemms`` logs which static shapes take such a path. No padding is
needed, so the IR is never changed beyond the BYOC calls.

Build and export::

    mod = dispatch_gemms(mod)                       # before tvm.compile's legalization
    ex = tvm.compile(mod, target=Target({"kind": "cuda", "arch": "sm_90"}, host="llvm"))
    export_library(ex, "model.so")                  # = ex.export_library(path, options=link_options())
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import tvm
from tvm import relax
from tvm.relax.backend.utils import has_leaking_intermediate_variables
from tvm.relax.dpl import DFPattern, is_const, is_op, wildcard
from tvm.relax.transform import FusionPattern, PatternCheckContext

from . import kernels as _kernels
from .kernels import Scheme

logger = logging.getLogger(__name__)

INT8_CODEGEN = "mlc_cutlass"  # W8A8 linears: CUTLASS sm90 (fused dequantize), fallbacks inside
FLOAT_CODEGEN = "mlc_cublaslt"  # float linears: cuBLASLt
_FLOATS = ("float16", "bfloat16", "float32")


class DispatchError(RuntimeError):
    """A GEMM could not be offloaded while ``strict=True``, or codegen failed."""


# --------------------------------------------------------------------------------------------
# patterns


@dataclass
class _Spec:
    name: str  # "<codegen>.<kind>", the composite's "Composite" attribute
    scheme: Scheme
    pattern: DFPattern
    roles: Dict[str, DFPattern]  # LinearArgs field -> sub-pattern (matched to a composite param)
    parts: Dict[str, DFPattern] = field(default_factory=dict)  # other sub-patterns the check reads
    w_kn: bool = False

    def fusion_pattern(self) -> FusionPattern:
        annotations = {**self.roles, **{f"_{k}": v for k, v in self.parts.items()}}
        return FusionPattern(self.name, self.pattern, annotations, self._check)

    def _check(self, ctx: PatternCheckContext) -> bool:
        if has_leaking_intermediate_variables(ctx):
            return False  # an intermediate (e.g. a shared quantized x) is used elsewhere
        exprs = {k.lstrip("_"): v for k, v in ctx.annotated_expr.items()}
        try:
            return _CHECKS[self.scheme](self, exprs, ctx.matched_expr)
        except Exception as err:  # pylint: disable=broad-except
            # An IR form the checks did not foresee: leave it to TVM, but say so.
            logger.warning("mlc_quant: %s check failed on %s: %r", self.name, ctx.matched_expr, err)
            return False


def _add_bias(y: DFPattern, roles: Dict[str, DFPattern]) -> DFPattern:
    roles["bias"] = b = wildcard()
    return is_op("relax.add")(y, b)  # add is matched commutatively


def _int8_x(quantize_inside: bool, roles, parts, per_token_scale: Optional[DFPattern] = None):
    """The int8 activation: a quantize of float x inside the composite, or int8 x given."""
    x = wildcard()
    roles["x"] = x
    if not quantize_inside:
        return x
    if per_token_scale is None:  # static per-tensor: R.quantize
        sx, zx = wildcard(), wildcard()
        roles["x_scale"], roles["x_zero"] = sx, zx
        parts["quantize"] = q = is_op("relax.quantize")(x, sx, zx)
        return q
    # per-token: astype(clip(round(astype(x, f32) / s), -127, 127), int8)
    xf = is_op("relax.astype")(x) | x
    parts["divide"] = d = is_op("relax.divide")(xf, per_token_scale)
    parts["clip"] = c = is_op("relax.clip")(is_op("relax.round")(d), wildcard(), wildcard())
    parts["quantize"] = q = is_op("relax.astype")(c)
    return q


def _int8_matmul(xq: DFPattern, roles, parts) -> DFPattern:
    roles["w"] = w = wildcard()
    parts["transpose"] = wt = is_op("relax.permute_dims")(w)
    parts["matmul"] = mm = is_op("relax.matmul")(xq, wt)
    return mm


def _spec_symmetric(quantize_inside: bool, bias: bool, const=is_const) -> _Spec:
    roles, parts = {}, {}
    xq = _int8_x(quantize_inside, roles, parts)
    acc = _int8_matmul(xq, roles, parts)
    roles["scale"] = s = wildcard()
    parts["dq_zero"] = z = const()
    parts["dequantize"] = y = is_op("relax.dequantize")(acc, s, z)
    if bias:
        y = _add_bias(y, roles)
    name = f"{INT8_CODEGEN}.w8a8_sym{'_q' if quantize_inside else ''}{'_bias' if bias else ''}"
    return _Spec(name, Scheme.SYMMETRIC, y, roles, parts)


def _spec_asymmetric(quantize_inside: bool, bias: bool, const=is_const, given_rowsum: bool = False) -> _Spec:
    """``given_rowsum``: the row sums of the int8 x are an operand (written by the norm / SiLU
    kernel that quantized x: passes/fuse_act_quantize.py) instead of computed in the pattern."""
    roles, parts = {}, {}
    xq = _int8_x(quantize_inside, roles, parts)
    acc = _int8_matmul(xq, roles, parts)
    if given_rowsum:
        roles["row_sum"] = rs = wildcard()
    else:
        parts["rowsum"] = rs = is_op("relax.sum")(is_op("relax.astype")(xq))
    roles["w_zero"], roles["corr"] = zw, c = wildcard(), wildcard()
    t = is_op("relax.subtract")(acc, is_op("relax.multiply")(rs, zw))
    t = is_op("relax.subtract")(t, c)
    roles["scale"] = s = wildcard()
    parts["dq_zero"] = z = const()
    parts["dequantize"] = y = is_op("relax.dequantize")(t, s, z)
    if bias:
        y = _add_bias(y, roles)
    kind = "_rs" if given_rowsum else "_q" if quantize_inside else ""
    name = f"{INT8_CODEGEN}.w8a8_asym{kind}{'_bias' if bias else ''}"
    return _Spec(name, Scheme.ASYMMETRIC, y, roles, parts)


def _spec_per_token(quantize_inside: bool, bias: bool, const=is_const) -> _Spec:
    roles, parts = {}, {}
    roles["token_scale"] = st = wildcard()
    xq = _int8_x(quantize_inside, roles, parts, per_token_scale=st)
    acc = _int8_matmul(xq, roles, parts)
    parts["acc_f32"] = af = is_op("relax.astype")(acc)
    roles["scale"] = sw = wildcard()
    scaled = is_op("relax.multiply")(is_op("relax.multiply")(af, st), sw) | is_op("relax.multiply")(
        af, is_op("relax.multiply")(st, sw)
    )
    parts["out"] = y = is_op("relax.astype")(scaled) | scaled
    if bias:
        y = _add_bias(y, roles)
    name = f"{INT8_CODEGEN}.w8a8_token{'_q' if quantize_inside else ''}{'_bias' if bias else ''}"
    return _Spec(name, Scheme.PER_TOKEN, y, roles, parts)


def _spec_per_token_dynamic(bias: bool, const=is_const) -> _Spec:
    """design.md's smq_q8i8f16_3 as QuantizeLinear emits it, scale computation included:
    s = maximum(max(abs(astype(x, f32)), -1, keepdims) / 127, eps); the kernel computes s itself,
    so x is read by one kernel instead of TVM's reduction + quantize kernels."""
    roles, parts = {}, {}
    roles["x"] = x = wildcard()
    xf = is_op("relax.astype")(x) | x
    parts["amax"] = amax = is_op("relax.max")(is_op("relax.abs")(xf))
    parts["c127"] = c127 = const()
    roles["token_eps"] = eps = const()
    ratio = is_op("relax.divide")(amax, c127)
    parts["token_scale"] = st = is_op("relax.maximum")(ratio, eps) | is_op("relax.maximum")(eps, ratio)
    parts["divide"] = d = is_op("relax.divide")(xf, st)
    parts["clip"] = c = is_op("relax.clip")(is_op("relax.round")(d), wildcard(), wildcard())
    parts["quantize"] = xq = is_op("relax.astype")(c)
    acc = _int8_matmul(xq, roles, parts)
    parts["acc_f32"] = af = is_op("relax.astype")(acc)
    roles["scale"] = sw = wildcard()
    scaled = is_op("relax.multiply")(is_op("relax.multiply")(af, st), sw) | is_op("relax.multiply")(
        af, is_op("relax.multiply")(st, sw)
    )
    parts["out"] = y = is_op("relax.astype")(scaled) | scaled
    if bias:
        y = _add_bias(y, roles)
    return _Spec(f"{INT8_CODEGEN}.w8a8_token_dyn{'_bias' if bias else ''}", Scheme.PER_TOKEN, y, roles, parts)


def _spec_float(w_kn: bool, bias: bool, const=is_const) -> _Spec:
    roles, parts = {}, {}
    roles["x"], roles["w"] = x, w = wildcard(), wildcard()
    rhs = w if w_kn else is_op("relax.permute_dims")(w)
    if not w_kn:
        parts["transpose"] = rhs
    parts["matmul"] = y = is_op("relax.matmul")(x, rhs)
    if bias:
        y = _add_bias(y, roles)
    name = f"{FLOAT_CODEGEN}.linear{'_kn' if w_kn else ''}{'_bias' if bias else ''}"
    return _Spec(name, Scheme.FLOAT, y, roles, parts, w_kn=w_kn)


def _specs(const=is_const) -> List[_Spec]:
    """All patterns, most specific first (FuseOpsByPattern's priority order).

    ``const`` matches the structural constants (the dequantize zero point). Inside a composite
    made with ``bind_constants=False`` they are parameters, so the codegen re-matches the
    composite body with ``const=wildcard``.
    """
    out = [_spec_per_token_dynamic(True, const), _spec_per_token_dynamic(False, const)]
    for bias in (True, False):
        for q in (True, False):
            out += [_spec_asymmetric(q, bias, const), _spec_per_token(q, bias, const), _spec_symmetric(q, bias, const)]
    for bias in (True, False):  # after the forms that compute the row sums in the pattern
        out.append(_spec_asymmetric(False, bias, const, given_rowsum=True))
    for bias in (True, False):
        out += [_spec_float(False, bias, const), _spec_float(True, bias, const)]
    return out


_SPECS: Dict[str, _Spec] = {}
_LIFTED_SPECS: Dict[str, _Spec] = {}


def _spec_table(lifted: bool = False) -> Dict[str, _Spec]:
    if not _SPECS:
        _SPECS.update({s.name: s for s in _specs()})
        _LIFTED_SPECS.update({s.name: s for s in _specs(const=wildcard)})
    return _LIFTED_SPECS if lifted else _SPECS


def fusion_patterns() -> List[FusionPattern]:
    """The FusionPatterns of both codegens, in priority order."""
    return [s.fusion_pattern() for s in _spec_table().values()]


# --------------------------------------------------------------------------------------------
# checks (what the kernels accept)


def _dtype(e) -> str:
    return str(e.ty.dtype)


def _shape(e) -> Optional[List]:
    shape = getattr(e.ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return None
    return list(shape.values)


def _static(d) -> Optional[int]:
    return int(d) if isinstance(d, (int, tvm.tirx.IntImm)) else None


def _numel_is(e, n) -> bool:
    """Static element count equals n (n an int or a static dim)."""
    shape = _shape(e)
    if shape is None:
        return False
    dims = [_static(d) for d in shape]
    if any(d is None for d in dims):
        return False
    return int(np.prod(dims, dtype=np.int64)) == n


def _is_scalar(e) -> bool:
    return _numel_is(e, 1)


def _is_vector_n(e, n: int) -> bool:
    shape = _shape(e)
    return shape is not None and len(shape) >= 1 and _static(shape[-1]) == n and _numel_is(e, n)


def _const_all(e, value) -> bool:
    return isinstance(e, tvm.ir.expr.Constant) and bool(np.all(e.value.numpy() == value))


def _weight_nk(w) -> Optional[tuple]:
    shape = _shape(w)
    if shape is None or len(shape) != 2:
        return None
    return _static(shape[0]), _static(shape[1])


def _check_transpose(parts) -> bool:
    t = parts.get("transpose")
    if t is None:
        return True
    axes = t.attrs.axes
    return axes is None or [int(a) for a in axes] == [1, 0]


def _check_out_and_bias(exprs, root, n: int) -> bool:
    if _dtype(root) not in _FLOATS:
        return False
    if "bias" in exprs:
        b = exprs["bias"]
        return _dtype(b) == _dtype(root) and _is_vector_n(b, n)
    return True


def _check_int8_common(spec: _Spec, exprs, root) -> Optional[int]:
    """Shared checks; returns N (static) or None to reject."""
    if not _check_transpose(exprs):
        return None
    w = exprs["w"]
    nk = _weight_nk(w)
    if _dtype(w) != "int8" or nk is None or nk[0] is None:
        return None
    if _dtype(exprs["matmul"]) != "int32":
        return None
    x = exprs["x"]
    quantize_inside = "quantize" in exprs
    if quantize_inside and _dtype(x) not in _FLOATS:
        return None
    if not quantize_inside and _dtype(x) != "int8":
        return None
    x_shape = _shape(x)
    if x_shape is None or len(x_shape) < 1 or (nk[1] is not None and _static(x_shape[-1]) not in (None, nk[1])):
        return None
    n = nk[0]
    return n if _check_out_and_bias(exprs, root, n) else None


def _check_dequantize(exprs, n: int) -> bool:
    dq, s = exprs["dequantize"], exprs["scale"]
    if not _const_all(exprs["dq_zero"], 0) or _dtype(s) != "float32":
        return False
    if _is_scalar(s):
        return True
    ndim = len(_shape(dq))
    return _is_vector_n(s, n) and int(dq.attrs.axis) in (-1, ndim - 1)


def _check_static_quantize(exprs) -> bool:
    if "quantize" not in exprs:
        return True
    q = exprs["quantize"]
    return (
        str(q.attrs.out_dtype) == "int8"
        and _dtype(exprs["x_scale"]) == "float32"
        and _is_scalar(exprs["x_scale"])
        and _dtype(exprs["x_zero"]) == "int8"
        and _is_scalar(exprs["x_zero"])
    )


def _check_symmetric(spec: _Spec, exprs, root) -> bool:
    n = _check_int8_common(spec, exprs, root)
    return n is not None and _check_static_quantize(exprs) and _check_dequantize(exprs, n)


def _check_asymmetric(spec: _Spec, exprs, root) -> bool:
    n = _check_int8_common(spec, exprs, root)
    if n is None or not _check_static_quantize(exprs) or not _check_dequantize(exprs, n):
        return False
    if "row_sum" in exprs:  # given: int32 [..., 1], one per row of x (RunLinear checks the count)
        rs_shape, x_shape = _shape(exprs["row_sum"]), _shape(exprs["x"])
        if _dtype(exprs["row_sum"]) != "int32" or rs_shape is None or len(rs_shape) != len(x_shape):
            return False
        if _static(rs_shape[-1]) != 1:
            return False
    else:
        rs = exprs["rowsum"]
        axis = rs.attrs.axis
        ndim = len(_shape(rs.args[0]))
        if _dtype(rs) != "int32" or not bool(rs.attrs.keepdims) or axis is None or len(axis) != 1:
            return False
        if int(axis[0]) not in (-1, ndim - 1):
            return False
    zw, c = exprs["w_zero"], exprs["corr"]
    return _dtype(zw) == "int32" and _dtype(c) == "int32" and _is_vector_n(zw, n) and _is_vector_n(c, n)


def _check_per_token(spec: _Spec, exprs, root) -> bool:
    n = _check_int8_common(spec, exprs, root)
    if n is None:
        return False
    if "token_eps" in exprs:  # dynamic: the scale computation is part of the match
        amax, eps = exprs["amax"], exprs["token_eps"]
        axis = amax.attrs.axis
        ndim = len(_shape(amax.args[0]))
        if axis is None or len(axis) != 1 or int(axis[0]) not in (-1, ndim - 1) or not bool(amax.attrs.keepdims):
            return False
        if not _const_all(exprs["c127"], 127) or _dtype(eps) != "float32" or not _is_scalar(eps):
            return False
        if _dtype(exprs["amax"]) != "float32":
            return False
    st, sw = exprs["token_scale"], exprs["scale"]
    st_shape = _shape(st)
    if _dtype(st) != "float32" or st_shape is None or _static(st_shape[-1]) != 1:
        return False
    if _dtype(sw) != "float32" or not _is_vector_n(sw, n) or _dtype(exprs["acc_f32"]) != "float32":
        return False
    if "quantize" in exprs:
        clip = exprs["clip"]
        lo, hi = clip.args[1], clip.args[2]
        if float(lo.value) != -127 or float(hi.value) != 127 or _dtype(exprs["quantize"]) != "int8":
            return False
        if _dtype(exprs["divide"]) != "float32":
            return False
    return True


def _check_float(spec: _Spec, exprs, root) -> bool:
    if not _check_transpose(exprs):
        return False
    x, w, mm = exprs["x"], exprs["w"], exprs["matmul"]
    nk = _weight_nk(w)
    if nk is None or _dtype(x) not in _FLOATS or _dtype(w) != _dtype(x) or _dtype(mm) != _dtype(x):
        return False
    x_shape = _shape(x)
    if x_shape is None or len(x_shape) < 2:
        return False  # a 1-D x makes matmul a vector product
    n = nk[1] if spec.w_kn else nk[0]
    if n is None:
        return False
    return _check_out_and_bias(exprs, root, n)


_CHECKS: Dict[Scheme, Callable] = {
    Scheme.SYMMETRIC: _check_symmetric,
    Scheme.ASYMMETRIC: _check_asymmetric,
    Scheme.PER_TOKEN: _check_per_token,
    Scheme.FLOAT: _check_float,
}


# --------------------------------------------------------------------------------------------
# codegen: one tvm-ffi wrapper per composite, calling mlcq::RunLinear

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SCHEME_CPP = {
    Scheme.FLOAT: "kFloat",
    Scheme.SYMMETRIC: "kSymmetric",
    Scheme.ASYMMETRIC: "kAsymmetric",
    Scheme.PER_TOKEN: "kPerToken",
}


def _composite_of(func: relax.Function) -> relax.Function:
    """The "Composite" function inside the codegen-annotated wrapper FuseOpsByPattern made."""
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Function) and value.attrs and "Composite" in value.attrs:
                return value
    raise DispatchError(f"no composite function inside {func.attrs['global_symbol']}")


def _roles_of(spec: _Spec, composite: relax.Function) -> Dict[str, int]:
    """Map each kernel operand to the index of the composite parameter that carries it."""
    var2val = relax.analysis.get_var2val(composite)
    body = composite.body
    root = body.body
    if isinstance(root, relax.Var) and root in var2val:
        root = var2val[root]
    matched = spec.pattern.extract_matched_expr(root, var2val)
    if matched is None:
        raise DispatchError(f"{spec.name}: the pattern does not match its own composite function")
    params = list(composite.params)
    roles = {}
    for role, pat in spec.roles.items():
        if pat not in matched:
            continue
        e = matched[pat]
        if e not in params:
            raise DispatchError(f"{spec.name}: operand {role} is not a parameter of the composite ({e})")
        roles[role] = params.index(e)
    return roles


def _wrapper_source(symbol: str, spec: _Spec, roles: Dict[str, int], n_params: int) -> str:
    args = ", ".join([f"TensorView a{i}" for i in range(n_params)] + ["TensorView out"])
    lines = [
        f"void {symbol}_impl({args}) {{",
        "  mlcq::LinearArgs args;",
        f"  args.scheme = mlcq::Scheme::{_SCHEME_CPP[spec.scheme]};",
        f"  args.w_kn = {'true' if spec.w_kn else 'false'};",
        '  mlcq::DLView v_out(out, "out");',
        "  args.out = v_out.get();",
    ]
    for role, idx in sorted(roles.items()):
        lines.append(f'  mlcq::DLView v_{role}(a{idx}, "{role}");')
        lines.append(f"  args.{role} = v_{role}.get();")
    lines += ["  mlcq::RunLinear(args);", "}", ""]
    return "\n".join(lines)


def _codegen(functions: Sequence[relax.Function], options) -> List[tvm.runtime.Module]:
    table = _spec_table(lifted=True)
    bodies, symbols = [], []
    for func in functions:
        symbol = str(func.attrs["global_symbol"])
        if not _IDENT.match(symbol):
            raise DispatchError(f"global symbol {symbol!r} is not a C identifier")
        composite = _composite_of(func)
        spec = table.get(str(composite.attrs["Composite"]))
        if spec is None:
            raise DispatchError(f"unknown composite {composite.attrs['Composite']}")
        roles = _roles_of(spec, composite)
        bodies.append(_wrapper_source(symbol, spec, roles, len(composite.params)))
        symbols.append(symbol)
    if not symbols:
        return []
    source = "\n".join(
        [
            "// Generated by mlc_quant.cuda_dispatch: BYOC wrappers onto mlcq::RunLinear.",
            '#include "mlcq_ffi.h"',
            "using tvm::ffi::TensorView;",
            "namespace {",
            *bodies,
            "}  // namespace",
            *[f"TVM_FFI_DLL_EXPORT_TYPED_FUNC({s}, {s}_impl);" for s in symbols],
            "",
        ]
    )
    # Wrappers compile in seconds; cache them by content anyway (a model has a few hundred).
    digest = hashlib.sha256((source + _kernels.build._local_headers_digest()).encode()).hexdigest()[:24]
    obj = _kernels.build.cache_dir() / "byoc" / f"wrappers-{digest}.o"
    if not obj.is_file():
        _kernels.compile_wrapper(source, obj)
    return [tvm.runtime.load_static_library(str(obj), symbols)]


@tvm.register_global_func(f"relax.ext.{INT8_CODEGEN}", override=True)
def _codegen_cutlass(functions, options, constant_names):  # pylint: disable=unused-argument
    return _codegen(functions, options)


@tvm.register_global_func(f"relax.ext.{FLOAT_CODEGEN}", override=True)
def _codegen_cublaslt(functions, options, constant_names):  # pylint: disable=unused-argument
    return _codegen(functions, options)


# --------------------------------------------------------------------------------------------
# entry points


def kernel_modules(out_dir: Optional[str] = None) -> List[tvm.runtime.Module]:
    """The kernel objects as static library modules (linked in by export_library)."""
    return [tvm.runtime.load_static_library(p, []) for p in _kernels.build_kernels(out_dir)]


def _leftover_matmuls(mod: tvm.IRModule) -> List[str]:
    out = []
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        if func.attrs and ("Codegen" in func.attrs or "Composite" in func.attrs):
            continue  # offloaded (before RunCodegen replaces it)

        def visit(e, name=gv.name_hint):
            if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.matmul":
                shapes = [str(a.ty) for a in e.args]
                out.append(f"{name}: matmul({', '.join(shapes)}) -> {e.ty}")

        relax.analysis.post_order_visit(func, visit)
    return out


def _slow_path_shapes(mod: tvm.IRModule) -> List[str]:
    """Static W8A8 shapes the CUTLASS kernels cannot take (they run on a fallback kernel)."""
    notes = []
    for gv, func in mod.functions_items():
        if not isinstance(func, relax.Function) or not func.attrs or "Codegen" not in func.attrs:
            continue
        if str(func.attrs["Codegen"]) != INT8_CODEGEN:
            continue
        for p in func.params:
            if _dtype(p) == "int8" and _weight_nk(p) is not None and len(_shape(p)) == 2:
                n, k = _weight_nk(p)
                if n is not None and k is not None and (k % 16 or n % 8):
                    notes.append(f"{gv.name_hint}: weight {n}x{k} (K % 16 or N % 8 != 0)")
    return notes


# --------------------------------------------------------------------------------------------
# per-token absmax outside a composite (tensor parallelism)
#
# The per-token scale of smq_q8i8f16_3 is normally computed inside the W8A8 kernel (the
# ``w8a8_token_dyn`` composite). A row-parallel linear of a tensor-parallel module all-reduces
# the absmax across shards between ``max`` and ``divide`` (mlc_quant/sharding.py), so the
# reduction ``max(abs(astype(x, f32)), axis=-1, keepdims=True)`` stays in the graph, and TVM's
# dlight GPU rules (Reduction, GeneralReduction) do not schedule ``max`` reductions in TVM 0.27
# (they take ``sum``): it fell to the Fallback rule, one thread per row reducing K elements in
# sequence (measured on an H100: 2.9 ms per call at 2048 x 5504, 0.1 ms at 1 x 5504, most of a
# 2-shard Llama-2-7B step). Here it becomes a scheduled TIR kernel: one block per row, the K
# axis over 256 threads, a warp-shuffle cross-thread max.


def row_absmax_primfunc(k: int, dtype: str, threads: int = 256) -> tvm.tirx.PrimFunc:
    """``out[0, i, 0] = max_k |float(x[0, i, k])|`` for x ``[1, n, k]`` (n dynamic), scheduled."""
    from tvm import s_tir, te  # pylint: disable=import-outside-toplevel

    n = tvm.tirx.Var("n", "int64")
    x = te.placeholder((1, n, k), dtype, name="x")
    r = te.reduce_axis((0, k), name="k")
    out = te.compute((1, n, 1), lambda b, i, j: te.max(te.abs(x[b, i, r].astype("float32")), axis=r), name="amax")
    sch = s_tir.Schedule(te.create_prim_func([x, out]))
    blk = sch.get_sblock("amax")
    b, i, j, kk = sch.get_loops(blk)
    _, ki = sch.split(kk, [None, threads])
    sch.bind(sch.fuse(b, i, j), "blockIdx.x")
    sch.bind(ki, "threadIdx.x")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).without_attr("global_symbol")


def schedule_row_absmax(mod: tvm.IRModule) -> tvm.IRModule:
    """Replace each ``max(abs(astype(x, f32) | x), axis=-1, keepdims=True)`` of a 3-d x with a
    static last axis by a ``call_tir`` of :func:`row_absmax_primfunc` (one per width/dtype)."""
    from tvm.relax.expr_functor import PyExprMutator, mutator  # pylint: disable=import-outside-toplevel

    funcs: Dict[tuple, tvm.ir.GlobalVar] = {}

    def source(call):
        """x of max(abs(astype(x)|x)), or None."""
        if not (isinstance(call, relax.Call) and getattr(call.op, "name", "") == "relax.max"):
            return None
        attrs = call.attrs
        shape = _shape(call.args[0])
        if shape is None or len(shape) != 3 or not bool(attrs.keepdims) or attrs.axis is None \
                or len(attrs.axis) != 1 or int(attrs.axis[0]) not in (-1, 2) or _dtype(call) != "float32":
            return None
        return call.args[0]

    @mutator
    class _Rewrite(PyExprMutator):
        def visit_var_binding_(self, binding):
            arg = source(binding.value)
            ab = self.lookup_binding(arg) if isinstance(arg, relax.Var) else arg
            if arg is None or not (isinstance(ab, relax.Call) and getattr(ab.op, "name", "") == "relax.abs"):
                super().visit_var_binding_(binding)
                return
            x = ab.args[0]
            xb = self.lookup_binding(x) if isinstance(x, relax.Var) else x
            if isinstance(xb, relax.Call) and getattr(xb.op, "name", "") == "relax.astype" \
                    and _dtype(xb.args[0]) in ("float16", "bfloat16"):
                x = xb.args[0]
            k = _static(_shape(x)[-1]) if _shape(x) is not None else None
            if k is None or _dtype(x) not in _FLOATS:
                super().visit_var_binding_(binding)
                return
            key = (k, _dtype(x))
            if key not in funcs:
                funcs[key] = self.builder_.add_func(row_absmax_primfunc(k, key[1]), f"mlcq_row_absmax_{k}_{key[1]}")
            shape = _shape(x)
            call = relax.call_tir(funcs[key], [self.visit_expr(x)],
                                  relax.TensorType([shape[0], shape[1], 1], "float32"))
            self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(call)))

    rewriter = _Rewrite(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function) and not (func.attrs and ("Codegen" in func.attrs
                                                                     or "Composite" in func.attrs)):
            rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
    if not funcs:
        return mod  # nothing rewritten: the module as it was
    logger.info("mlc_quant: %d per-token absmax reduction(s) scheduled as row kernels (widths %s)",
                len(funcs), sorted(k for k, _ in funcs))
    return relax.transform.DeadCodeElimination()(rewriter.builder_.get())


def dispatch_gemms(mod: tvm.IRModule, *, strict: bool = False, attach_kernels: bool = True,
                   kernel_dir: Optional[str] = None, norm_act: Optional[bool] = None) -> tvm.IRModule:
    """Offload every linear of ``mod`` (high-level Relax, before legalization) to the kernels.

    Returns the module with the linears replaced by ``call_dps_packed`` into the generated
    wrappers and the wrapper + kernel objects in ``external_mods``. Build it with
    ``tvm.compile(mod, target)`` and export with :func:`export_library`.

    ``strict=True`` raises if a ``relax.matmul`` is left for TVM to compile (otherwise it is
    logged: TVM's own CUDA GEMMs are an order of magnitude slower than these kernels).
    ``attach_kernels=False`` leaves the kernel objects out (attach :func:`kernel_modules` yourself).
    ``norm_act`` (default: on unless ``MLC_QUANT_NORM_ACT=tvm``): float16 RMSNorm (+ residual add)
    and SiLU * up go to mlc_quant/kernels/norm_act.cu too (passes/offload_norm_act.py), with the
    W8A8 activation quantize that follows them (passes/fuse_act_quantize.py).
    """
    from mlc_quant.passes.fuse_act_quantize import FuseActQuantize  # pylint: disable=import-outside-toplevel
    from mlc_quant.passes.fuse_silu_gemm import FuseSiluGemm, uses_silu_gemm  # pylint: disable=import-outside-toplevel
    from mlc_quant.passes.offload_norm_act import OffloadNormAct, uses_norm_act  # pylint: disable=import-outside-toplevel

    mod = relax.transform.ConvertToDataflow()(mod)
    # W8A8 gate/up GEMM + SiLU * up + the down_proj's quantize in one kernel, where the merge
    # interleaved gate and up (pipeline.swiglu_interleave); before FuseActQuantize, which then
    # still moves the gate/up input's quantize into the RMSNorm kernel.
    silu = FuseSiluGemm()
    mod = silu(mod)
    if silu.fused:
        logger.info("mlc_quant: %d gate/up linear(s) with SiLU * up + quantize in the GEMM epilogue", silu.fused)
    if norm_act is None:
        env = os.environ.get("MLC_QUANT_NORM_ACT", "kernels").lower()
        if env not in ("kernels", "tvm"):
            raise ValueError(f"MLC_QUANT_NORM_ACT={env!r}: expected 'kernels' (default) or 'tvm'")
        norm_act = env == "kernels"
    if norm_act:  # the W8A8 activation quantize then moves into those kernels
        mod = FuseActQuantize()(OffloadNormAct()(mod))
    mod = relax.transform.FuseOpsByPattern(fusion_patterns(), bind_constants=False, annotate_codegen=True)(mod)
    for note in _slow_path_shapes(mod):
        logger.warning("mlc_quant: %s runs on the cuBLASLt/CUDA-core fallback, not the fused CUTLASS kernel", note)
    n_offloaded = sum(
        1 for _, f in mod.functions_items() if isinstance(f, relax.Function) and f.attrs and "Codegen" in f.attrs
    )
    mod = relax.transform.RunCodegen()(mod)
    mod = schedule_row_absmax(mod)  # per-token absmax left outside the kernels (tensor parallelism)
    from .model.flash_prefill import uses_flash_prefill  # pylint: disable=import-outside-toplevel

    # The KV cache's flash prefill attention (an ExternFunc looked up in the library) lives in the
    # same kernel objects.
    if attach_kernels and (n_offloaded or uses_flash_prefill(mod) or uses_norm_act(mod) or uses_silu_gemm(mod)):
        ext = list(mod.attrs["external_mods"]) if mod.attrs and "external_mods" in mod.attrs else []
        mod = mod.with_attr("external_mods", ext + kernel_modules(kernel_dir))
    left = _leftover_matmuls(mod)
    if left:
        msg = "mlc_quant: %d matmul(s) not offloaded (TVM will compile them):\n  %s" % (len(left), "\n  ".join(left))
        if strict:
            raise DispatchError(msg)
        logger.warning(msg)
    logger.info("mlc_quant: offloaded %d linear(s) to external kernels", n_offloaded)
    return mod


# --------------------------------------------------------------------------------------------
# device code: compile TVM's CUDA source to a fatbin at build time
#
# TVM 0.27 built without a CUDA driver (this CPU machine) keeps every generated CUDA kernel as
# *source* in the exported library (module kind "cuda", format "cuda"); the runtime compiles it
# when the library is loaded, through the global ``tvm_callback_cuda_compile``, which runtime-only
# TVM lacks. ``export_library`` therefore compiles that source with nvcc here and rewrites the
# module's serialized entry to format "fatbin" (the runtime hands any format other than "cuda" to
# ``cuModuleLoadData``), so the GPU machine needs no compiler. Layouts (tvm-ffi / TVM 0.27):
#   library blob: u64 nbytes | vec<u64> import_tree_row_ptr | vec<u64> child_indices |
#                 per module group: str kind [| bytes payload unless kind == "_lib"]
#   "cuda" payload: str fmt | map<str, FunctionInfo> fmap | bytes code
# (str / bytes / vec = u64 length + data). The fmap is copied through untouched.


def _u64(buf: bytes, pos: int) -> int:
    return int.from_bytes(buf[pos:pos + 8], "little")


def _p64(n: int) -> bytes:
    return int(n).to_bytes(8, "little")


def _read_str(buf: bytes, pos: int):
    n = _u64(buf, pos)
    if pos + 8 + n > len(buf):
        raise ValueError("truncated string")
    return buf[pos + 8:pos + 8 + n], pos + 8 + n


def _read_vec_u64(buf: bytes, pos: int):
    n = _u64(buf, pos)
    return [_u64(buf, pos + 8 + 8 * i) for i in range(n)], pos + 8 + 8 * n


def parse_library_blob(blob: bytes):
    """(row_ptr, child_indices, [(kind, payload or None)]) of a packed imports blob."""
    if _u64(blob, 0) != len(blob) - 8:
        raise ValueError("not a tvm-ffi library blob (length header mismatch)")
    pos = 8
    row_ptr, pos = _read_vec_u64(blob, pos)
    child, pos = _read_vec_u64(blob, pos)
    entries = []
    for _ in range(max(len(row_ptr) - 1, 0)):
        kind, pos = _read_str(blob, pos)
        payload = None
        if kind != b"_lib":
            payload, pos = _read_str(blob, pos)
        entries.append((kind.decode(), payload))
    if pos != len(blob):
        raise ValueError(f"library blob has {len(blob) - pos} unparsed bytes")
    return row_ptr, child, entries


def write_library_blob(row_ptr, child, entries) -> bytes:
    body = [_p64(len(row_ptr)), *map(_p64, row_ptr), _p64(len(child)), *map(_p64, child)]
    for kind, payload in entries:
        k = kind.encode()
        body += [_p64(len(k)), k]
        if payload is not None:
            body += [_p64(len(payload)), payload]
    data = b"".join(body)
    return _p64(len(data)) + data


def _skip_fmap(buf: bytes, pos: int) -> int:
    """End of a serialized map<str, FunctionInfo> (FunctionInfo: name, arg_types as 4-byte
    DLDataTypes, launch_param_tags as strings, arg_extra_tags as int32)."""
    count, pos = _u64(buf, pos), pos + 8
    for _ in range(count):
        _, pos = _read_str(buf, pos)  # key
        _, pos = _read_str(buf, pos)  # FunctionInfo.name
        pos += 8 + 4 * _u64(buf, pos)  # arg_types
        n_tags, pos = _u64(buf, pos), pos + 8
        for _ in range(n_tags):
            _, pos = _read_str(buf, pos)
        pos += 8 + 4 * _u64(buf, pos)  # arg_extra_tags
    return pos


def split_cuda_payload(payload: bytes):
    """(fmt, fmap bytes, code) of a serialized "cuda" module."""
    fmt, pos = _read_str(payload, 0)
    try:
        start = _skip_fmap(payload, pos)
        if _u64(payload, start) == len(payload) - start - 8:
            return fmt.decode(), payload[pos:start], payload[start + 8:]
    except (ValueError, IndexError):
        pass
    # Fallback if FunctionInfo's layout changes: code is the last field, so its length is the first
    # u64 after the fmap that reaches exactly the end (scanning from the end would stop inside a
    # fatbin, whose header also holds its remaining size).
    for start in range(pos + 8, len(payload) - 7):
        if _u64(payload, start) == len(payload) - start - 8:
            return fmt.decode(), payload[pos:start], payload[start + 8:]
    raise ValueError("cannot find the code field of a cuda module payload")


def join_cuda_payload(fmt: str, fmap: bytes, code: bytes) -> bytes:
    f = fmt.encode()
    return _p64(len(f)) + f + fmap + _p64(len(code)) + code


def cuda_archs(target=None) -> List[str]:
    """sm_XX of the build: the target's arch (default sm_90)."""
    arch = None
    if target is not None:
        target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
        arch = getattr(target, "arch", None) or (target.attrs.get("arch") if hasattr(target, "attrs") else None)
    arch = str(arch or "sm_90")
    return [arch]


def compile_fatbin(source: str, archs: Sequence[str] = ("sm_90",)) -> bytes:
    """nvcc --fatbin of TVM-generated CUDA source (TVM's own flags), SASS for each arch plus PTX
    of the last (JIT-able on newer GPUs). Cached by content under the kernel cache."""
    from tvm.support import nvcc as tvm_nvcc  # pylint: disable=import-outside-toplevel

    nvcc = _kernels.find_nvcc()
    if nvcc is None:
        raise DispatchError("nvcc not found: it compiles the CUDA kernels of the model at build time")
    gencode = []
    for a in archs:
        num = a[3:] if a.startswith("sm_") else a
        gencode += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    gencode += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    digest = hashlib.sha256(
        (source + " ".join(gencode) + _kernels.build._nvcc_version(nvcc)).encode()
    ).hexdigest()[:24]
    cached = _kernels.build.cache_dir() / "fatbin" / f"tvm-{digest}.fatbin"
    if cached.is_file():
        return cached.read_bytes()
    import os  # pylint: disable=import-outside-toplevel

    env_path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.path.dirname(nvcc) + os.pathsep + env_path  # TVM calls plain "nvcc"
    try:
        with tvm.target.Target({"kind": "cuda", "arch": archs[-1]}):
            data = bytes(tvm_nvcc.compile_cuda(source, target_format="fatbin", arch=gencode, compiler="nvcc"))
    finally:
        os.environ["PATH"] = env_path
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, cached)
    return data


def compile_device_code(blob: bytes, archs: Sequence[str] = ("sm_90",)) -> bytes:
    """The library blob with every "cuda" module's source replaced by a compiled fatbin."""
    row_ptr, child, entries = parse_library_blob(blob)
    out = []
    for kind, payload in entries:
        if kind == "cuda" and payload is not None:
            fmt, fmap, code = split_cuda_payload(payload)
            if fmt == "cuda":
                fatbin = compile_fatbin(code.decode(), archs)
                payload = join_cuda_payload("fatbin", fmap, fatbin)
                logger.info("mlc_quant: compiled the model's CUDA kernels (%d KB source) to a %d KB fatbin for %s",
                            len(code) // 1024, len(fatbin) // 1024, ",".join(archs))
        out.append((kind, payload))
    return write_library_blob(row_ptr, child, out)


def _pack_imports_compiled(archs: Sequence[str]):
    """An ``fpack_imports`` for ``export_library``: TVM's packed imports with the CUDA source
    compiled, embedded through the assembler (.incbin: no giant C array to compile)."""
    import os  # pylint: disable=import-outside-toplevel

    from tvm.runtime import _ffi_api  # pylint: disable=import-outside-toplevel

    def fpack(module, is_system_lib, prefix, workspace_dir):
        if is_system_lib:
            raise DispatchError("system-lib export is not supported for CUDA builds")
        blob = _ffi_api.ModulePackImportsToTensor(module).numpy().tobytes()
        blob = compile_device_code(blob, archs)
        bin_path = os.path.join(workspace_dir, f"{prefix}devc.bin")
        with open(bin_path, "wb") as f:
            f.write(blob)
        sym = f"{prefix}__tvm_ffi__library_bin"
        src = os.path.join(workspace_dir, f"{prefix}devc.c")
        with open(src, "w", encoding="utf-8") as f:
            f.write(
                "__asm__(\n"
                '  ".section .rodata.mlc_quant_devc,\\"a\\"\\n"\n'
                f'  ".globl {sym}\\n"\n'
                f'  ".type {sym}, @object\\n"\n'
                '  ".balign 16\\n"\n'
                f'  "{sym}:\\n"\n'
                f'  ".incbin \\"{bin_path}\\"\\n"\n'
                f'  ".size {sym}, . - {sym}\\n"\n'
                '  ".previous\\n");\n'
            )
        return src

    return fpack


def export_library(executable, path: str, extra_options: Sequence[str] = (), target=None,
                   compile_cuda: Optional[bool] = None) -> str:
    """``executable.export_library(path)`` with the link options the kernels need.

    ``compile_cuda`` (default: on, unless ``MLC_QUANT_CUDA_SOURCE=1``) compiles TVM's CUDA kernels
    to a fatbin for ``target``'s arch here, so the library loads on a GPU machine with the TVM
    runtime alone; off, the library keeps CUDA source and the loader must compile it
    (:func:`mlc_quant.cuda_runtime.prepare_cuda_runtime` registers a compiler for that).
    """
    import os  # pylint: disable=import-outside-toplevel

    if compile_cuda is None:
        compile_cuda = os.environ.get("MLC_QUANT_CUDA_SOURCE", "") not in ("1", "true", "yes")
    kwargs = {}
    if compile_cuda:
        kwargs["fpack_imports"] = _pack_imports_compiled(cuda_archs(target))
    executable.export_library(path, options=[*_kernels.link_options(), *extra_options], **kwargs)
    return path


__all__ = [
    "DispatchError",
    "FLOAT_CODEGEN",
    "INT8_CODEGEN",
    "dispatch_gemms",
    "compile_device_code",
    "export_library",
    "fusion_patterns",
    "kernel_modules",
]
