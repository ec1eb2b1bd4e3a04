"""MergeSiblingLinears: one wide linear for linears that read the same input (q/k/v, gate/up).

Runs on the deploy module after QuantizeLinear (and before dispatch). Linears that read the same
activation ``x`` with the same activation quantization become one linear whose weight params are
the concatenation along N, followed by ``split`` of its output; each old output var is bound to
its slice (same name), so everything downstream is untouched. At batch 1 one 12288 x 4096 GEMV
streams at the speed of a large matrix and ``x`` is quantized once instead of three times.

Handled linears (docs/design.md contract):

* float: ``matmul(x, permute_dims(w))`` -> ``w`` concatenated (q0f16 / q0f32, keep-float linears);
* quantized, every scheme: the IR of ``QuantScheme.emit_linear``; the merged linear is emitted by
  the same ``emit_linear`` with the merged params (``.q`` rows, per-channel ``.scale`` / ``.zp`` /
  ``.corr`` concatenated). Static activation scale and zero point must be equal (they are when
  calibration saw the same x, as for q/k/v and gate/up). A per-tensor weight scale
  (smq_q8i8f16_0) becomes a per-channel vector (each part's scale repeated over its rows): the
  same products, so the result is bit-identical, and the IR is that of smq_q8i8f16_1.

A group is merged only if every function that uses its weights has the same group (the params
are shared by all functions) and each weight (param) is read by that linear alone. The params
transform is :func:`merge_params`; what was merged is recorded on the module
(``MERGED_ATTR``, read back by :func:`merged_linears`).

``interleave_swiglu=8`` (CUDA builds of the static W8A8 schemes): a statically quantized pair
used as ``quantize(multiply(silu(a), b))`` (gate, up) is merged with its rows interleaved in blocks
of 8 (gate 0-7, up 0-7, gate 8-15, ...), and its output is taken apart by
``reshape(split(reshape(y, [..., n / 8, 2, 8]), 2, axis=-2)[i], [..., n])`` instead of a split.
That is the layout the SiLU * up GEMM epilogue reads (passes/fuse_silu_gemm.py); where that pass
does not apply (decode) TVM compiles the reshapes, and the values are the same.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tvm
from tvm import IRModule, relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._linear import bindings_of, emit_like, find_linears, users_of

MERGED_ATTR = "mlc_quant.merged_linears"
_Q_SUFFIXES = (".q", ".scale", ".zp", ".corr")


def _op(name):
    return tvm.ir.Op.get(name)


@dataclass(frozen=True)
class LinearMerge:
    """One merged linear: its name, the linears it replaces (in order) and their output widths."""

    name: str
    parts: Tuple[str, ...]
    sizes: Tuple[int, ...]
    quantized: bool
    interleave: int = 0  # > 0: two parts' rows interleaved in blocks of this many (see above)

    def to_dict(self) -> Dict:
        d = {"name": self.name, "parts": list(self.parts), "sizes": list(self.sizes), "quantized": self.quantized}
        if self.interleave:
            d["interleave"] = self.interleave
        return d


@dataclass
class _Site:
    name: str  # linear name (float: weight param name; quantized: the prefix of .q/.scale/...)
    out: relax.Var
    x: relax.Var
    key: tuple  # what must agree for a merge: kind, dtype, K, activation quantization
    n: int
    params: Tuple[relax.Var, ...]  # the params this linear alone reads
    act: Optional[tuple] = None  # (scale, zero_point) of a static scheme


# ------------------------------------------------------------------------------------- finding


class _Finder:
    def __init__(self, func: relax.Function):
        self.func = func
        self.table = bindings_of(func)
        self.users = users_of(func)
        self.params = {p.name: p for p in func.params}

    def val(self, e):
        return self.table.get(e, e) if isinstance(e, relax.Var) else e

    def is_call(self, e, name) -> bool:
        return isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == name

    def only_user(self, var, user) -> bool:
        return self.users.get(var, []) == [user]

    def float_sites(self, fname: str) -> List[_Site]:
        out = []
        for s in find_linears(fname, self.func):
            if not s.transposed or s.out_features < 0 or s.in_features < 0 or not isinstance(s.x, relax.Var):
                continue
            wt = self.table[s.out].args[1]
            if not (self.only_user(s.weight, wt) and self.only_user(wt, s.out)):
                continue  # a tied weight, or its transpose read elsewhere
            key = ("float", str(s.weight.ty.dtype), str(s.out.ty.dtype), s.in_features)
            out.append(_Site(s.name, s.out, s.x, key, s.out_features, (s.weight,)))
        return out

    def quantized_sites(self) -> List[_Site]:
        out = []
        for var, value in self.table.items():
            if not (self.is_call(value, "relax.matmul") and str(var.ty.dtype) == "int32"):
                continue
            site = self._quantized_site(var, value)
            if site is not None:
                out.append(site)
        return out

    def _quantized_site(self, acc: relax.Var, value: relax.Call) -> Optional[_Site]:
        xq, wt = value.args
        perm = self.val(wt)
        if not (self.is_call(perm, "relax.permute_dims") and isinstance(perm.args[0], relax.Var)):
            return None
        wq = perm.args[0]
        if not (wq.name.endswith(".q") and wq.same_as(self.params.get(wq.name)) and str(wq.ty.dtype) == "int8"):
            return None
        name = wq.name[:-2]
        n, k = (int(d) for d in wq.ty.shape)
        xq_value = self.val(xq)
        act = None
        if self.is_call(xq_value, "relax.quantize"):  # static per-tensor
            x, sx, zx = xq_value.args
            if not (isinstance(sx, tvm.ir.expr.Constant) and isinstance(zx, tvm.ir.expr.Constant)):
                return None
            act = (float(sx.value.numpy()), int(zx.value.numpy()))
            kind = ("static",) + act
        elif self.is_call(xq_value, "relax.astype"):  # per-token: astype(clip(round(x / s)))
            e = self.val(xq_value.args[0])
            for op_name in ("relax.clip", "relax.round", "relax.divide"):
                if not self.is_call(e, op_name):
                    return None
                if op_name == "relax.divide":
                    break
                e = self.val(e.args[0])
            x = e.args[0]
            xv = self.val(x)
            if self.is_call(xv, "relax.astype") and isinstance(xv.args[0], relax.Var):
                x = xv.args[0]
            kind = ("token",)
        else:
            return None
        if not isinstance(x, relax.Var) or not str(x.ty.dtype).startswith(("float", "bfloat")):
            return None
        dtype = str(x.ty.dtype)
        mine = [self.params[name + s] for s in _Q_SUFFIXES if name + s in self.params]
        scale = self.params.get(name + ".scale")
        if scale is None or any(len(self.users.get(p, [])) != 1 for p in mine) or not self.only_user(wt, acc):
            return None
        # the output: follow the single-user chain from the int32 accumulator past the multiply
        # by (or dequantize with) the weight scale, to the first var of x's dtype
        var, seen_scale = acc, False
        for _ in range(8):
            users = self.users.get(var, [])
            if len(users) != 1 or users[0] is None:
                return None
            var = users[0]
            seen_scale = seen_scale or any(v.same_as(scale) for v in relax.analysis.free_vars(self.table[var]))
            if seen_scale and str(var.ty.dtype) == dtype:
                break
        else:
            return None
        return _Site(name, var, x, ("int8", kind, dtype, k), n, tuple(mine), act)


def _groups(func: relax.Function, fname: str, quantized: bool) -> List[List[_Site]]:
    f = _Finder(func)
    sites = f.float_sites(fname) + (f.quantized_sites() if quantized else [])
    by_key: Dict[tuple, List[_Site]] = {}
    for s in sites:
        by_key.setdefault((s.x, s.key), []).append(s)
    order = {p.name: i for i, p in enumerate(func.params)}
    out = []
    for members in by_key.values():
        if len(members) >= 2:
            out.append(sorted(members, key=lambda s: order[s.params[0].name]))
    return out


def _is_swiglu_pair(f: _Finder, g: List[_Site], block: int) -> bool:
    """Two statically quantized linears of the same width used as quantize(silu(a) * b), the
    quantize static and int8 (the down_proj's input), widths a multiple of ``block``."""
    if len(g) != 2 or g[0].n != g[1].n or g[0].n % block != 0 or g[0].key[1][0] != "static":
        return False
    gate, up = g[0].out, g[1].out
    users = f.users.get(gate, [])
    if len(users) != 1 or not f.is_call(f.table.get(users[0]), "relax.nn.silu"):
        return False
    act = users[0]
    users = f.users.get(act, [])
    if len(users) != 1 or f.users.get(up, []) != users:
        return False
    mul = f.table.get(users[0])
    if not (f.is_call(mul, "relax.multiply") and {a for a in mul.args} == {act, up}):
        return False
    users = f.users.get(users[0], [])
    q = f.table.get(users[0]) if len(users) == 1 else None
    return f.is_call(q, "relax.quantize") and str(q.attrs.out_dtype) == "int8"


def merged_name(parts: Sequence[str], taken=()) -> str:
    """``a.q_proj.weight`` + ``a.k_proj.weight`` + ``a.v_proj.weight`` -> ``a.qkv_proj.weight``;
    ``gate_proj`` + ``up_proj`` -> ``gate_up_proj``."""
    pre = parts[0]
    for p in parts[1:]:
        while not p.startswith(pre):
            pre = pre[:-1]
    # cut the prefix back to a separator so "gate" and "gamma" do not share "ga"
    while pre and pre[-1] not in "._":
        pre = pre[:-1]
    rest = [p[len(pre):] for p in parts]
    suf = rest[0]
    for r in rest[1:]:
        while not r.endswith(suf):
            suf = suf[1:]
    while suf and suf[0] not in "._":
        suf = suf[1:]
    mids = [r[: len(r) - len(suf)] for r in rest]
    joined = "".join(mids) if all(len(m) == 1 for m in mids) else "_".join(mids)
    name = pre + joined + suf
    if not all(mids) or name in taken or name in parts:
        name = parts[0] + ".merged"
    return name


# ------------------------------------------------------------------------------------- the pass


@tvm.transform.module_pass(opt_level=0, name="mlc_quant.MergeSiblingLinears")
class MergeSiblingLinears:
    """Merge linears of the same input into one (see the module docstring).

    Parameters
    ----------
    scheme : Optional[mlc_quant.schemes.QuantScheme]
        The scheme QuantizeLinear applied (its ``emit_linear`` emits the merged quantized linear).
        None: only float linears are merged.
    min_group : int
        Merge groups of at least this many linears (default 2).

    After the pass, ``merges`` (and the module attribute ``MERGED_ATTR``) list what was merged;
    :func:`merge_params` turns the params of the unmerged module into those of the merged one.
    """

    def __init__(self, scheme=None, min_group: int = 2, interleave_swiglu: int = 0):
        self.scheme = scheme
        self.min_group = int(min_group)
        self.interleave_swiglu = int(interleave_swiglu)
        self.merges: List[LinearMerge] = []

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        quantized = self.scheme is not None and self.scheme.quantizes
        per_func: Dict[str, List[List[_Site]]] = {}
        uses: Dict[str, set] = {}  # linear name -> functions that have it
        for gvar, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            groups = [g for g in _groups(func, gvar.name_hint, quantized) if len(g) >= self.min_group]
            per_func[gvar.name_hint] = groups
            f = _Finder(func)
            for s in f.float_sites(gvar.name_hint) + (f.quantized_sites() if quantized else []):
                uses.setdefault(s.name, set()).add(gvar.name_hint)
        # keep a group only if every function using one of its linears has exactly that group
        found: Dict[tuple, set] = {}
        for fname, groups in per_func.items():
            for g in groups:
                found.setdefault(tuple(s.name for s in g), set()).add(fname)
        accepted = {parts for parts, fns in found.items()
                    if all(uses.get(n, set()) == fns for n in parts)}
        if not accepted:
            self.merges = []
            return mod
        taken = {p.name for f in mod.functions.values() if isinstance(f, relax.Function) for p in f.params}
        names = {}
        for parts in sorted(accepted):
            names[parts] = merged_name(parts, taken)
            taken.add(names[parts])
        # a SiLU-gated pair is interleaved only if it is one in every function that has it
        interleave = {}
        if self.interleave_swiglu > 0:
            for fname, groups in per_func.items():
                f = _Finder(mod[fname])
                for g in groups:
                    parts = tuple(s.name for s in g)
                    if parts in accepted:
                        ok = _is_swiglu_pair(f, g, self.interleave_swiglu)
                        interleave[parts] = interleave.get(parts, True) and ok
        merges: Dict[tuple, LinearMerge] = {}
        rewriter = _Merger(mod, self.scheme)
        for fname, groups in per_func.items():
            groups = [g for g in groups if tuple(s.name for s in g) in accepted]
            if not groups:
                continue
            for g in groups:
                parts = tuple(s.name for s in g)
                merges.setdefault(parts, LinearMerge(names[parts], parts, tuple(s.n for s in g),
                                                     g[0].key[0] == "int8",
                                                     self.interleave_swiglu if interleave.get(parts) else 0))
            gvar = mod.get_global_var(fname)
            new = rewriter.rewrite(mod[gvar], groups, names, {p for p, on in interleave.items() if on},
                                   self.interleave_swiglu)
            rewriter.builder_.update_func(gvar, new)
        out = rewriter.builder_.get()
        self.merges = sorted(merges.values(), key=lambda m: m.name)
        prev = merged_linears(mod)
        record = [m.to_dict() for m in prev + self.merges]
        return out.with_attr(MERGED_ATTR, json.dumps(record))


@mutator
class _Merger(PyExprMutator):
    def __init__(self, mod: IRModule, scheme):
        super().__init__(mod)
        self.scheme = scheme
        self.first: Dict[relax.Var, List[_Site]] = {}  # earliest output of a group -> the group
        self.skip: set = set()
        self.names: Dict[tuple, str] = {}
        self.wparams: Dict[tuple, Dict[str, relax.Var]] = {}

    def rewrite(self, func: relax.Function, groups: List[List[_Site]], names, interleaved=(),
                block: int = 0) -> relax.Function:
        table = bindings_of(func)
        position = {v: i for i, v in enumerate(table)}
        self.first, self.skip, self.names, self.wparams = {}, set(), names, {}
        self.interleaved, self.block = set(interleaved), block
        first_param: Dict[relax.Var, List[_Site]] = {}
        dropped = set()
        for g in groups:
            outs = sorted((s.out for s in g), key=position.get)
            self.first[outs[0]] = g
            self.skip.update(outs)
            first_param[min((p for s in g for p in s.params), key=list(func.params).index)] = g
            dropped.update(p for s in g for p in s.params)
        params = []
        for p in func.params:
            g = first_param.get(p)
            if g is not None:
                parts = tuple(s.name for s in g)
                new = self._merged_params(g, names[parts])
                self.wparams[parts] = new
                params.extend(new.values())
            if p not in dropped:
                params.append(p)
        body = self.visit_expr(func).body
        new_func = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
        new_func = relax.analysis.remove_all_unused(new_func)
        left = set(relax.analysis.free_vars(new_func)) & dropped
        if left:
            raise RuntimeError(f"MergeSiblingLinears: {sorted(v.name for v in left)} still read after the merge")
        return new_func

    @staticmethod
    def _merged_params(g: List[_Site], name: str) -> Dict[str, relax.Var]:
        total = sum(s.n for s in g)
        new = {}
        if g[0].key[0] == "float":
            w = g[0].params[0]
            k = int(w.ty.shape[1])
            new[name] = relax.Var(name, relax.TensorType((total, k), str(w.ty.dtype)))
            return new
        for p in g[0].params:
            suffix = p.name[len(g[0].name):]
            shape = [int(d) for d in p.ty.shape]
            shape = [total] + shape[1:] if shape else [total]  # a per-tensor scale becomes per-channel
            new[name + suffix] = relax.Var(name + suffix, relax.TensorType(shape, str(p.ty.dtype)))
        return new

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        var = binding.var
        if var not in self.skip:
            super().visit_var_binding_(binding)
            return
        g = self.first.get(var)
        if g is None:
            return  # a later member: its var is already bound to its slice
        bb = self.builder_
        parts = tuple(s.name for s in g)
        name, wparams = self.names[parts], self.wparams[parts]
        x = self.visit_expr(g[0].x)
        if g[0].key[0] == "float":
            wt = bb.emit(relax.op.permute_dims(wparams[name]))
            y = relax.op.matmul(x, wt)
        else:
            from mlc_quant.schemes import ActQParams  # pylint: disable=import-outside-toplevel

            act = ActQParams(*g[0].act) if g[0].act is not None else None
            y = self.scheme.emit_linear(bb, x, wparams, name, act)
        y = bb.emit(bb.normalize(y), name_hint=name.replace(".", "_"))
        if parts in self.interleaved:  # rows interleaved in blocks: take them apart by a view
            lead = list(y.ty.shape.values)[:-1]
            n, b = g[0].n, self.block
            blocks = bb.emit(relax.op.reshape(y, lead + [n // b, 2, b]))
            pieces = bb.emit(relax.op.split(blocks, 2, axis=-2))
            items = [relax.op.reshape(relax.TupleGetItem(pieces, i), lead + [n]) for i in range(2)]
        else:
            cuts = np.cumsum([s.n for s in g])[:-1].tolist()
            pieces = bb.emit(relax.op.split(y, cuts, axis=-1))
            items = [relax.TupleGetItem(pieces, i) for i in range(len(g))]
        for s, item in zip(g, items):
            self.set_var_remap(s.out, emit_like(bb, item, s.out))


# ------------------------------------------------------------------------------------- records


def merged_linears(mod: IRModule) -> List[LinearMerge]:
    """The merges recorded on ``mod`` by MergeSiblingLinears (empty if none)."""
    if mod.attrs is None or MERGED_ATTR not in mod.attrs:
        return []
    return [LinearMerge(d["name"], tuple(d["parts"]), tuple(d["sizes"]), bool(d["quantized"]),
                        int(d.get("interleave", 0)))
            for d in json.loads(str(mod.attrs[MERGED_ATTR]))]


def interleave_rows(a: np.ndarray, block: int) -> np.ndarray:
    """Rows [a0; a1] (two equal halves) -> blocks of ``block`` rows taken in turn from each."""
    a = np.asarray(a)
    n = a.shape[0] // 2
    return a.reshape((2, n // block, block) + a.shape[1:]).swapaxes(0, 1).reshape(a.shape)


def merge_params(params: Mapping[str, np.ndarray], merges: Sequence[LinearMerge]) -> Dict[str, np.ndarray]:
    """The params of the merged module from those of the unmerged one (parts concatenated along
    N, then dropped; a per-tensor scale repeated over its part's rows). Other params pass through."""
    out = dict(params)
    for m in merges:
        keys = [p for p in m.parts] if not m.quantized else [p + ".q" for p in m.parts]
        if not any(k in params for k in keys):
            continue  # params of other linears only (a partial dict)
        if not all(k in params for k in keys):
            raise KeyError(f"merge_params: {m.name} needs {keys}, some are missing")
        if not m.quantized:
            out[m.name] = np.concatenate([np.asarray(params[p]) for p in m.parts], axis=0)
            for p in m.parts:
                out.pop(p, None)
            continue
        for suffix in _Q_SUFFIXES:
            if m.parts[0] + suffix not in params:
                continue
            arrays = []
            for p, n in zip(m.parts, m.sizes):
                a = np.asarray(params[p + suffix])
                arrays.append(np.full((n,), a, dtype=a.dtype) if a.ndim == 0 else a)
            merged = np.concatenate(arrays, axis=0)
            out[m.name + suffix] = interleave_rows(merged, m.interleave) if m.interleave else merged
            for p in m.parts:
                out.pop(p + suffix, None)
    return out
