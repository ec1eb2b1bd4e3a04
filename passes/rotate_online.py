"""RotateOnline: online Hadamard transforms in the IR (SpinQuant's R4 and R3).

R4 rotates the input of chosen linears (``down_proj``): ``x -> x H^T / sqrt(K)`` by a fast
Walsh-Hadamard kernel, while ``mlc_quant.rotation`` fuses the same transform into the weight
(``W -> W H^T / sqrt(K)``), so ``x W^T`` is unchanged in exact arithmetic but the quantized
activation has no outlier channels.

R3 rotates q and k after RoPE by ``H_d / sqrt(d)`` on every head. TVM's paged KV cache applies
RoPE *inside* its attention call (``RopeMode.NORMAL``), so this pass switches the cache to
``RopeMode.NONE`` and applies RoPE in the graph first, with the cache's own RoPE kernel
(``fused_rope`` with ``apply_rope=1``, the very call the cache would have made) at the cache's
query positions (``vm.builtin.attention_kv_cache_get_query_positions``), then the Hadamard on q
and k. q.k is invariant under the same orthogonal map, so attention is unchanged; the cache
stores the rotated keys, which is what R3 is for (KV-cache quantization, which we do not do).

The transform of size ``K = m * p`` (p a power of two, m a base Hadamard order, see
``mlc_quant.hadamard``) is one PrimFunc per (K, target): a dense m x m step (the constant
``H_m / sqrt(K)``, an input of the call) and log2(p) in-place butterfly stages, in float32.
CPU: rows in parallel. CUDA: a block per row, 256 threads, stages separated by __syncthreads
(compiled for sm_90 in the tests, not run on a GPU here).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import tvm
from tvm import IRModule, relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.script import tirx as T

from ._linear import emit_like, find_linears

_ATTN_FUSED_QKV = "vm.builtin.attention_kv_cache_attention_with_fused_qkv"
_KV_CREATE = "vm.builtin.paged_attention_kv_cache_create"
_QUERY_POS = "vm.builtin.attention_kv_cache_get_query_positions"
_ROPE_MODE_ARG = 9  # index in the create call (after the ExternFunc); see kv_cache.py's args list
_ROPE_NONE, _ROPE_NORMAL = 0, 1
_CUDA_THREADS = 256


# ----------------------------------------------------------------------------- kernels

def hadamard_primfunc(k: int, m: int, target_kind: str = "llvm") -> tirx.PrimFunc:
    """Y[r] = kron(Hm, H_p) X[r] for float32 X, Y [rows, k]; Hm [m, m] (scaled) is an input."""
    p = k // m
    if p * m != k or p & (p - 1):
        raise ValueError(f"hadamard kernel: {k} is not {m} x a power of two")
    log_p = p.bit_length() - 1
    if target_kind == "llvm":
        return tvm.script.from_source(_cpu_source(k, m))
    if target_kind == "cuda":
        nt = _CUDA_THREADS

        @T.prim_func(private=True)
        def hadamard_cuda(x_h: T.handle, hm_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            rows = T.int64()
            X = T.match_buffer(x_h, (rows, k), "float32")
            Hm = T.match_buffer(hm_h, (m, m), "float32")
            Y = T.match_buffer(y_h, (rows, k), "float32")
            bx = T.launch_thread("blockIdx.x", rows)
            tx = T.launch_thread("threadIdx.x", nt)
            for it in range((k + nt - 1) // nt):
                if it * nt + tx < k:
                    acc = T.alloc_buffer((1,), "float32", scope="local")
                    acc[0] = T.float32(0)
                    for c in range(m):
                        acc[0] = acc[0] + Hm[(it * nt + tx) // p, c] * X[bx, c * p + (it * nt + tx) % p]
                    Y[bx, it * nt + tx] = acc[0]
            for s in range(log_p):
                T.tvm_storage_sync("shared")  # __syncthreads: the block's Y writes are visible
                for it in range((k // 2 + nt - 1) // nt):
                    if it * nt + tx < k // 2:
                        j = it * nt + tx
                        i0 = (j // T.shift_left(1, s)) * T.shift_left(2, s) + j % T.shift_left(1, s)
                        u = Y[bx, i0]
                        v = Y[bx, i0 + T.shift_left(1, s)]
                        Y[bx, i0] = u + v
                        Y[bx, i0 + T.shift_left(1, s)] = u - v

        return hadamard_cuda
    raise ValueError(f"online Hadamard kernel: unsupported target kind {target_kind!r} (llvm or cuda)")


def _vec_loop(indent: str, var: str, extent: int, lanes: int = 16) -> Tuple[str, str]:
    """Loop header(s) over ``var`` in [0, extent) with a vectorized inner part; (code, index expr)."""
    v = min(extent, lanes)
    if v == extent:
        return f"{indent}for {var} in T.vectorized({extent}):\n", var
    return (f"{indent}for {var}_o in range({extent // v}):\n{indent}    for {var}_i in T.vectorized({v}):\n",
            f"({var}_o * {v} + {var}_i)")


def _cpu_source(k: int, m: int) -> str:
    """TVMScript of the CPU kernel, generated so every stage has constant strides (vectorizable):
    the dense m x m step, an 8-point WHT per chunk of 8 (stages h = 1, 2, 4, in registers), then
    one vectorized loop per remaining stage h = 8 .. p/2 (blocks of 2h never straddle p-blocks)."""
    p = k // m
    lines = [
        "@T.prim_func(private=True)",
        "def hadamard_cpu(x_h: T.handle, hm_h: T.handle, y_h: T.handle):",
        '    T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})',
        "    rows = T.int64()",
        f'    X = T.match_buffer(x_h, (rows, {k}), "float32")',
        f'    Hm = T.match_buffer(hm_h, ({m}, {m}), "float32")',
        f'    Y = T.match_buffer(y_h, (rows, {k}), "float32")',
        "    for r in T.parallel(rows):",
    ]
    ind = " " * 8
    if m == 1:
        head, b = _vec_loop(ind, "b", p)
        lines.append(head.rstrip("\n"))
        lines.append(f"{ind}{'    ' * head.count(chr(10))}Y[r, {b}] = Hm[0, 0] * X[r, {b}]")
    else:
        lines.append(f"{ind}for a in range({m}):")
        head, b = _vec_loop(ind + "    ", "b", p)
        body = ind + "    " + "    " * head.count("\n")
        lines += [head.rstrip("\n"), f"{body}Y[r, a * {p} + {b}] = T.float32(0)"]
        lines.append(f"{ind}    for c in range({m}):")
        head, b = _vec_loop(ind + "        ", "b", p)
        body = ind + "        " + "    " * head.count("\n")
        lines += [head.rstrip("\n"),
                  f"{body}Y[r, a * {p} + {b}] = Y[r, a * {p} + {b}] + Hm[a, c] * X[r, c * {p} + {b}]"]
    h = 1
    if p >= 8:  # stages 1, 2, 4 on 8 values at a time, in a local (register) buffer
        lines.append(f"{ind}for c8 in range({k // 8}):")
        e = ind + "    "
        lines.append(f'{e}w = T.alloc_buffer((8,), "float32", scope="local")')
        lines += [f"{e}w[{i}] = Y[r, c8 * 8 + {i}]" for i in range(8)]
        for hh in (1, 2, 4):
            for i in range(8):
                if i & hh == 0:
                    lines += [f"{e}tmp{hh}_{i}: T.float32 = w[{i}]",
                              f"{e}w[{i}] = tmp{hh}_{i} + w[{i + hh}]",
                              f"{e}w[{i + hh}] = tmp{hh}_{i} - w[{i + hh}]"]
        lines += [f"{e}Y[r, c8 * 8 + {i}] = w[{i}]" for i in range(8)]
        h = 8
    while h < p:  # (vectorized loops must not hold Let bindings here: TVM mis-vectorizes them)
        v = min(h, 16)
        e = ind + "        "
        lines += [f"{ind}for blk in range({k // (2 * h)}):",
                  f"{ind}    for t_o in range({h // v}):",
                  f'{e}w{h} = T.alloc_buffer((2, {v}), "float32", scope="local")',
                  f"{e}for t in T.vectorized({v}):",
                  f"{e}    w{h}[0, t] = Y[r, blk * {2 * h} + t_o * {v} + t]",
                  f"{e}    w{h}[1, t] = Y[r, blk * {2 * h} + t_o * {v} + t + {h}]",
                  f"{e}for t in T.vectorized({v}):",
                  f"{e}    Y[r, blk * {2 * h} + t_o * {v} + t] = w{h}[0, t] + w{h}[1, t]",
                  f"{e}    Y[r, blk * {2 * h} + t_o * {v} + t + {h}] = w{h}[0, t] - w{h}[1, t]"]
        h *= 2
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the pass

@tvm.transform.module_pass(opt_level=0, name="mlc_quant.RotateOnline")
class RotateOnline:
    """Insert online Hadamard transforms (R4 on linear inputs, R3 on q/k after RoPE).

    Parameters
    ----------
    linears : Iterable[str]
        Weight names whose linear input is rotated (R4: the ``down_proj`` weights). The caller
        must fuse ``W -> W H^T / sqrt(K)`` into those weights (``mlc_quant.rotation``).
    qk : bool
        R3: move RoPE from the paged KV cache into the graph and rotate q and k by
        ``H_d / sqrt(d)`` after it (no weight change).
    target : str | Target
        ``llvm`` or ``cuda``: which kernel the transforms call.
    """

    def __init__(self, linears: Iterable[str] = (), qk: bool = False, target="llvm"):
        self.linears = sorted(set(linears))
        self.qk = qk
        kind = target if isinstance(target, str) else target.kind.name
        self.target_kind = tvm.target.Target(kind).kind.name if kind not in ("llvm", "cuda") else kind

    def transform_module(self, mod: IRModule, _ctx: tvm.transform.PassContext) -> IRModule:
        rope = _find_rope_kernel(mod) if self.qk else None
        rewriter = _Rotator(mod, self.target_kind, rope)
        changed = False
        for gvar, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function):
                continue
            sites = find_linears(gvar.name_hint, func, self.linears) if self.linears else []
            if sites or self.qk:
                new_func = rewriter.rewrite(func, sites)
                if new_func is not None:
                    rewriter.builder_.update_func(gvar, new_func)
                    changed = True
        if self.linears and not rewriter.rotated_linears:
            raise ValueError(f"RotateOnline: none of the linears {self.linears[:3]}... is in the module")
        missing = sorted(set(self.linears) - rewriter.rotated_linears)
        if missing:
            raise ValueError(f"RotateOnline: linears {missing} are not in the module")
        if self.qk and not rewriter.rotated_attention:
            raise ValueError("RotateOnline(qk=True): no attention_with_fused_qkv call in the module")
        return rewriter.builder_.get() if changed else mod


def _find_rope_kernel(mod: IRModule) -> Tuple[relax.GlobalVar, int, int, int]:
    """The KV cache's RoPE kernel (``fused_rope(qkv, position_map, q, k, v, apply_rope)``) and
    (num_q_heads, num_kv_heads, head_dim), read from the cache creation call."""
    for _, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        for call in _calls(func):
            if _extern_name(call) != _KV_CREATE:
                continue
            for arg in call.args:
                if isinstance(arg, relax.GlobalVar) and isinstance(mod[arg], tirx.PrimFunc):
                    prim = mod[arg]
                    if [p.name for p in prim.params][-1] == "apply_rope" and len(prim.params) == 6:
                        q_shape, k_shape = prim.params[2].ty.shape, prim.params[3].ty.shape  # [n, h, d]
                        return arg, int(q_shape[1]), int(k_shape[1]), int(q_shape[2])
    raise ValueError("RotateOnline(qk=True): no paged KV cache creation with a RoPE kernel in the module")


def _calls(func: relax.Function):
    if isinstance(func.body, relax.SeqExpr):
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding) and isinstance(b.value, relax.Call):
                    yield b.value


def _extern_name(call: relax.Call) -> Optional[str]:
    if call.args and isinstance(call.args[0], relax.ExternFunc):
        return str(call.args[0].global_symbol)
    return None


@mutator
class _Rotator(PyExprMutator):
    def __init__(self, mod: IRModule, target_kind: str, rope):
        super().__init__(mod)
        self.target_kind = target_kind
        self.rope = rope
        self.rope_gvar = None
        self.kernels: Dict[int, relax.GlobalVar] = {}
        self.rotated_linears: set = set()
        self.rotated_attention = 0
        self.by_out: Dict[relax.Var, object] = {}
        self.done: Dict[relax.Expr, relax.Expr] = {}
        self.changed = False

    def rewrite(self, func: relax.Function, sites) -> Optional[relax.Function]:
        self.by_out = {s.out: s for s in sites}
        self.done = {}
        self.changed = False
        new_func = self.visit_expr(func)
        return new_func if self.changed else None

    # -- the transform --------------------------------------------------------------------
    def _kernel(self, k: int) -> Tuple[relax.GlobalVar, np.ndarray]:
        from mlc_quant.hadamard import hadamard_factors  # pylint: disable=import-outside-toplevel

        hm, p = hadamard_factors(k)
        if k not in self.kernels:
            prim = hadamard_primfunc(k, hm.shape[0], self.target_kind)
            self.kernels[k] = self.builder_.add_func(prim, f"mlcq_hadamard{k}")
        return self.kernels[k], (hm / np.sqrt(k)).astype(np.float32)

    def hadamard(self, x: relax.Expr) -> relax.Expr:
        """x [..., K] -> x H_K^T / sqrt(K), computed in float32, x's dtype kept."""
        bb, op = self.builder_, relax.op
        k = int(x.ty.shape[-1])
        dtype = str(x.ty.dtype)
        gvar, hm = self._kernel(k)
        x2 = bb.emit(op.reshape(x, (-1, k)))
        if dtype != "float32":
            x2 = bb.emit(op.astype(x2, "float32"))
        rows = x2.ty.shape[0]
        y = bb.emit(relax.call_tir(gvar, [x2, relax.const(hm)], relax.TensorType((rows, k), "float32")))
        if dtype != "float32":
            y = bb.emit(op.astype(y, dtype))
        return op.reshape(y, x.ty.shape)

    # -- bindings -------------------------------------------------------------------------
    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        site = self.by_out.get(binding.var)
        value = binding.value
        if site is not None:
            x = self.visit_expr(site.x)
            if site.x not in self.done:
                self.done[site.x] = self.builder_.emit(self.hadamard(x), name_hint=f"{site.name}_rot_in")
            new_value = relax.op.matmul(self.done[site.x], self.visit_expr(value.args[1]),
                                        out_dtype=value.attrs.out_dtype)
            self.rotated_linears.add(site.name)
            self._rebind(binding, new_value)
            return
        if self.rope is not None and isinstance(value, relax.Call):
            name = _extern_name(value)
            if name == _ATTN_FUSED_QKV:
                kv, layer, scale, qkv = value.args[1].fields
                qkv = self._rope_and_rotate(self.visit_expr(kv), self.visit_expr(qkv))
                new_value = relax.Call(value.op, [value.args[0], relax.Tuple([self.visit_expr(kv), layer, scale, qkv])],
                                       value.attrs, value.ty_args)
                self.rotated_attention += 1
                self._rebind(binding, new_value)
                return
            if name == _KV_CREATE:
                mode = value.args[_ROPE_MODE_ARG]
                if not (isinstance(mode, tirx.IntImm) and int(mode.value) == _ROPE_NORMAL):
                    raise ValueError(f"RotateOnline(qk=True): expected rope_mode NORMAL (1) at argument "
                                     f"{_ROPE_MODE_ARG} of {_KV_CREATE}, found {mode}")
                args = [self.visit_expr(a) if isinstance(a, relax.Var) else a for a in value.args]
                args[_ROPE_MODE_ARG] = tirx.IntImm(str(mode.ty), _ROPE_NONE)
                self._rebind(binding, relax.Call(value.op, args, value.attrs, value.ty_args))
                return
        super().visit_var_binding_(binding)

    def _rope_and_rotate(self, kv: relax.Expr, qkv: relax.Expr) -> relax.Expr:
        """RoPE (the cache's kernel) on q and k at the cache's query positions, then H_d on both."""
        bb, op = self.builder_, relax.op
        cache_rope, nq, nkv, d = self.rope
        if self.rope_gvar is None:  # the cache's own kernel, specialized to apply_rope = 1
            prim = self.builder_.get()[cache_rope]
            prim = prim.specialize({prim.params[-1]: 1}).with_attr("global_symbol", "mlcq_rope_in_graph")
            self.rope_gvar = self.builder_.add_func(prim, "mlcq_rope_in_graph")
        n, heads, hd = qkv.ty.shape
        if int(heads) != nq + 2 * nkv or int(hd) != d:
            raise ValueError(f"RotateOnline(qk=True): qkv {qkv.ty} does not match the cache ({nq}+2x{nkv} heads of {d})")
        dtype = str(qkv.ty.dtype)
        pos = bb.emit(relax.call_pure_packed(_QUERY_POS, kv, ty_args=relax.TensorType((n,), "int32")))
        split = bb.emit(relax.call_tir(
            self.rope_gvar, [qkv, pos],
            [relax.TensorType((n, nq, d), dtype), relax.TensorType((n, nkv, d), dtype),
             relax.TensorType((n, nkv, d), dtype)],
))
        q = bb.emit(self.hadamard(bb.emit(relax.TupleGetItem(split, 0))))
        k = bb.emit(self.hadamard(bb.emit(relax.TupleGetItem(split, 1))))
        v = bb.emit(relax.TupleGetItem(split, 2))
        return bb.emit(op.concat([q, k, v], axis=1))

    def _rebind(self, binding: relax.VarBinding, value: relax.Expr) -> None:
        value = self.builder_.normalize(value)
        self.set_var_remap(binding.var, emit_like(self.builder_, value, binding.var))
        self.changed = True
