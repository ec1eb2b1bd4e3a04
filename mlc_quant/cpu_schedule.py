"""CPU (llvm) schedules for matmul-like PrimFuncs, dlight style.

``tvm.compile(mod, "llvm")`` leaves every legalized matmul as a naive loop nest (~1 GFLOP/s),
and ``tvm.s_tir.dlight.cpu`` only has GEMV and Reduction rules. ``schedule_for_cpu`` runs the
legalize + fuse part of the Relax pipeline and then ``ApplyDefaultSchedule`` with
``CPUMatmul`` (below) first, then dlight's CPU GEMV / Reduction rules.

The matmul schedule is the classic register-blocked outer product:

    parallel for (batch, jo):            # over both cores, N / NR panels of the output
        Bp[K, NR] = B[jo*NR : jo*NR+NR, :]^T     # pack one weight panel (contiguous in j)
        for io:                           # MR rows at a time (M may be symbolic)
            acc[MR, NR] = 0               # "local" cache_write -> lives in vector registers
            for k: for ii (unrolled): for ji (vectorized):
                acc[ii, ji] += A[i, k] * Bp[k, ji]
            C[i, j] = epilogue(acc)      # dequantize / astype / bias / residual, fused

Our linears are ``matmul(x, permute_dims(w))`` with w [N, K] row-major. Left alone, Relax
materializes the transpose (a full weight copy per call); ``FuseTransposeMatmul`` turns it
into one ``NT_matmul`` reading ``W[j, k]`` and the per-panel pack above makes the NR
weight values of one k contiguous, so the inner loop is an FMA over a vector of j.
Anything the rule does not recognise is left to the next rule or unscheduled: schedule
primitives are semantics-preserving, so detection only decides speed, never correctness.
"""

from __future__ import annotations

import re

import tvm
from tvm import IRModule, relax, s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import get_root_block
from tvm.tirx.analysis import undefined_vars
from tvm.target import Target

__all__ = ["CPUMatmul", "host_target", "schedule_for_cpu"]


class CPUMatmul(dl.ScheduleRule):
    """Register-blocked, packed, parallel matmul (and GEMV) for llvm targets.

    Matches a PrimFunc with exactly one reduction block
    C[S.., I, J] += A[S.., I, K] * B[S.., J, K]   (any index order inside A and B)
    where J is the last index of C (so it can be vectorized), plus injective producers and
    consumers. Without an I axis (static M = 1, decode) it is a GEMV: see `_gemv`.
    A symbolic M (prefill) always takes the matmul path, also when it is 1 at run time.
    """

    def __init__(self, mr: int = 4, nr: int = 16, gemv_rows: int = 8, gemv_lanes: int = 8):
        self.mr = mr  # rows of the register tile: MR x NR/8 ymm accumulators (4 x 2 = 8)
        self.nr = nr  # columns of the register tile: two AVX2 fp32 vectors
        self.gemv_rows, self.gemv_lanes = gemv_rows, gemv_lanes

    def apply(self, func, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        try:
            return self._schedule(func)
        except Exception:  # pylint: disable=broad-except
            # A primitive refused (unexpected structure): leave it to the next rule.
            return None

    def _schedule(self, func: tirx.PrimFunc):  # pylint: disable=too-many-locals
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        main = _single_reduction(sch, blocks)
        if main is None:
            return None

        # Inline index-only producers (transpose / reshape / cast of the weight) into the
        # matmul so the pack reads the original buffer. Arithmetic producers of the
        # activation (quantize) stay materialized: inlined they would be recomputed N/NR times.
        for blk in blocks:
            if not sch.get(blk).same_as(sch.get(main)) and _is_layout_only(sch.get(blk)):
                try:
                    sch.compute_inline(blk)
                except Exception:  # pylint: disable=broad-except
                    pass

        stmt = sch.get(main)
        axes = _matmul_axes(stmt)
        if axes is None or len(sch.get_loops(main)) != len(stmt.iter_vars):
            return None
        kinds, b_read = axes
        n_ext = _const(stmt.iter_vars[kinds.index("J")].dom.extent)
        m_ext = _const(stmt.iter_vars[kinds.index("I")].dom.extent) if "I" in kinds else 1
        if n_ext is None or n_ext < 8:
            return None  # vectorized J needs a static, not tiny N
        if "I" not in kinds:
            return self._gemv(sch, main, kinds, stmt, b_read)
        nr = self.nr if n_ext % self.nr == 0 else 8
        mr = self.mr
        if m_ext is None or m_ext % mr:
            # Pad M to a multiple of MR (copies A once, O(M*K)). A tail predicate inside the
            # k loop would turn the register accumulator into conditional memory stores.
            sch.pad_einsum(main, [mr if k == "I" else 1 for k in kinds])

        def loops_of(kind):
            return [l for l, k in zip(sch.get_loops(main), kinds) if k == kind]

        batch, (j_loop,), (k_loop,) = loops_of("S"), loops_of("J"), loops_of("K")
        # ---- tile ---------------------------------------------------------------------
        jo, ji = sch.split(j_loop, [None, nr])
        io, ii = sch.split(loops_of("I")[0], [None, mr])
        sch.reorder(*batch, jo, io, k_loop, ii, ji)
        outer = sch.fuse(*batch, jo) if batch else jo
        sch.parallel(outer)

        # ---- pack the weight panel [NR, K] -> Bp[K, NR] once per (batch, jo) -------------
        bp = sch.cache_read(main, b_read, "global")
        sch.compute_at(bp, outer)
        if _b_is_jk(stmt, b_read):
            # B[.., j, k] -> Bp[.., k, j] (compacted to [K, NR] per panel): for each k the NR
            # weights are one contiguous vector load.
            sch.transform_layout(bp, ("write", 0), lambda *idx: (*idx[:-2], idx[-1], idx[-2]))
        sch.vectorize(sch.get_loops(bp)[-1])  # k-contiguous reads

        # ---- accumulate in registers, write back with the epilogue fused ----------------
        acc = sch.cache_write(main, 0, "local")
        sch.reverse_compute_at(acc, io, preserve_unit_loops=True)
        _inline_consumers(sch, acc, io)
        # vectorize before decompose_reduction: the split-off update block has no init and
        # no longer passes the "complete or reduction block" check of `vectorize`.
        sch.unroll(ii)
        sch.vectorize(ji)
        init = sch.decompose_reduction(main, k_loop)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.get_loops(acc)[-1])
        return sch

    def _gemv(self, sch, main, kinds, stmt, b_read):
        """C[j] = sum_k A[k] * B[j, k] (decode): memory bound, read the weight exactly once.

        fp: split k into (ko, 8 lanes) and rfactor the lanes, so each of `rows` (8) rows of B
        accumulates a vector over k (LLVM will not reassociate a float reduction itself);
        one horizontal sum per output. Integer: LLVM vectorizes the k reduction of the plain
        loop on its own and that measured fastest (dlight's GEMV is 5x slower on int8), so
        the function is claimed but left as is.
        """
        rows, lanes = self.gemv_rows, self.gemv_lanes
        if not _b_is_jk(stmt, b_read):
            return None
        if not str(stmt.writes[0].source.dtype).startswith(("float", "bfloat")):
            return sch
        k_ext = _const(stmt.iter_vars[kinds.index("K")].dom.extent)
        n_ext = _const(stmt.iter_vars[kinds.index("J")].dom.extent)
        if k_ext is None or k_ext % lanes or n_ext % rows:
            return None
        batch = [l for l, k in zip(sch.get_loops(main), kinds) if k == "S"]
        (j_loop,) = [l for l, k in zip(sch.get_loops(main), kinds) if k == "J"]
        (k_loop,) = [l for l, k in zip(sch.get_loops(main), kinds) if k == "K"]
        ko, ki = sch.split(k_loop, [None, lanes])
        jo, ji = sch.split(j_loop, [None, rows])
        sch.reorder(*batch, jo, ko, ji, ki)
        rf = sch.rfactor(ki, 0)  # rf block: partial[ki, .., j] over ko; main sums the lanes
        sch.set_scope(rf, 0, "local")
        loops = sch.get_loops(rf)  # (*batch, jo, ko, ji, ki): rfactor made new loops
        outer = sch.fuse(*loops[:-3])
        sch.parallel(outer)
        sch.reverse_compute_at(main, outer)
        _inline_consumers(sch, main, outer)
        sch.unroll(sch.get_loops(rf)[-2])
        sch.vectorize(sch.get_loops(rf)[-1])
        init = sch.decompose_reduction(rf, sch.get_loops(rf)[1])
        sch.vectorize(sch.get_loops(init)[-1])
        return sch


def _matmul_axes(stmt):
    """Classify the block iters as S(batch, or extent 1) / I / J / K; None if not a matmul.

    J is the last index of C; the read holding J is the weight B (returned as b_read), the
    other read is the activation A. I: in A and C. K: reduce, in A and B.
    """
    if len(stmt.reads) != 2 or len(stmt.writes) != 1:
        return None

    def index_vars(region):
        if not all(_const(r.extent) == 1 for r in region):
            return None  # not an element-wise access
        return [set(undefined_vars(r.min)) for r in region]

    c_vars = index_vars(stmt.writes[0].region)
    r_vars = [index_vars(r.region) for r in stmt.reads]
    if c_vars is None or None in r_vars or not c_vars:
        return None
    j_var = stmt.writes[0].region[-1].min
    if not isinstance(j_var, tirx.Var):
        return None
    holds_j = [any(j_var in v for v in rv) for rv in r_vars]
    if holds_j.count(True) != 1:
        return None
    b_read = holds_j.index(True)
    a_set = set().union(*r_vars[1 - b_read])
    b_set = set().union(*r_vars[b_read])
    c_set = set().union(*c_vars)
    kinds = []
    for iv in stmt.iter_vars:
        v = iv.var
        if _const(iv.dom.extent) == 1:
            kinds.append("S")
        elif iv.iter_type == tirx.IterVar.CommReduce:
            kinds.append("K" if (v in a_set and v in b_set and v not in c_set) else None)
        elif v.same_as(j_var):
            kinds.append("J" if v not in a_set else None)
        elif v in c_set and v in a_set and v in b_set:
            kinds.append("S")
        elif v in c_set and v in a_set:
            kinds.append("I")
        else:
            kinds.append(None)
    if None in kinds or kinds.count("J") != 1 or kinds.count("K") != 1 or kinds.count("I") > 1:
        return None
    return kinds, b_read


def _b_is_jk(stmt, b_read: int) -> bool:
    """Whether the weight is read as B[.., j, k] (k innermost): then the pack transposes."""
    last = stmt.reads[b_read].region[-1].min
    return any(
        iv.iter_type == tirx.IterVar.CommReduce and iv.var.same_as(last) for iv in stmt.iter_vars
    )


def _const(expr):
    return int(expr) if isinstance(expr, tirx.IntImm) else None


def _single_reduction(sch, blocks):
    reds = []
    for blk in blocks:
        types = {iv.iter_type for iv in sch.get(blk).iter_vars}
        if types == {tirx.IterVar.CommReduce, tirx.IterVar.DataPar}:
            reds.append(blk)
        elif types != {tirx.IterVar.DataPar}:
            return None
    return reds[0] if len(reds) == 1 else None


def _is_layout_only(block) -> bool:
    """B[f(i)] = A[g(i)] or a plain cast of it: no arithmetic worth materializing."""
    body = block.body
    if not isinstance(body, tirx.BufferStore):
        return False
    value = body.value
    if isinstance(value, tirx.Cast):
        value = value.value
    return isinstance(value, tvm.ir.expr.TensorLoad)  # what tirx.BufferLoad(...) builds


def _inline_consumers(sch, block, loop) -> None:
    """Fuse the injective consumer chain (the epilogue) of `block` into the tile at `loop`.

    First compute_inline intermediate epilogue stages into their own consumers (silu:
    sigmoid(x) into x * sigmoid(x)). Then reverse_compute_inline a consumer into `block` only
    where it is `block`'s sole consumer and reads its output once: TVM 0.27 accepts the other
    cases but leaves a load of the no longer written buffer behind (the build then fails with
    "used before its definition"). Such a consumer is placed under `loop` with
    reverse_compute_at instead (still fused, per tile), and its own consumers follow it.
    """
    for consumer in sch.get_consumers(block):
        try:
            sch.compute_inline(consumer)
        except Exception:  # pylint: disable=broad-except
            pass
    out = sch.get(block).writes[0].source.name
    consumers = sch.get_consumers(block)
    for consumer in consumers:
        try:  # the dependency cache can still list a stage that compute_inline just removed
            body = sch.get(consumer).body.script()
        except Exception:  # pylint: disable=broad-except
            continue
        loads = re.findall(rf"(?<![\w.]){re.escape(out)}\[", body)
        if len(consumers) == 1 and len(loads) == 1:
            try:
                sch.reverse_compute_inline(consumer)
                _inline_consumers(sch, block, loop)  # the next stage of the chain
                return
            except Exception:  # pylint: disable=broad-except
                pass
        try:
            sch.reverse_compute_at(consumer, loop, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(consumer)[-1])
            _inline_consumers(sch, consumer, loop)
        except Exception:  # pylint: disable=broad-except
            pass


def host_target() -> Target:
    """llvm for this machine's CPU. A bare "llvm" means generic x86-64 (SSE2, no FMA): the
    same schedule then runs ~1.6x slower. Use this (or set "mcpu") when not cross-compiling."""
    return Target({"kind": "llvm", "mcpu": tvm.get_global_func("target.llvm_get_system_cpu")()})


def schedule_for_cpu(mod: IRModule, target: str | Target = "llvm") -> IRModule:
    """Legalize + fuse a Relax module and schedule its PrimFuncs for a CPU target.

    The result is ready for ``tvm.compile(mod, target)``: the default build pipeline's
    LegalizeOps has nothing left to do and scheduled PrimFuncs carry ``tirx.is_scheduled``.
    """
    target = Target(target) if not isinstance(target, Target) else target
    seq = tvm.transform.Sequential(
        [
            relax.transform.FuseTransposeMatmul(),  # no per-call weight transpose
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
    )
    mod = seq(mod)
    with target:
        mod = dl.ApplyDefaultSchedule(CPUMatmul(), dl.cpu.GEMV(), dl.cpu.Reduction())(mod)
    return mod
