"""The norm_act.cu kernels (mlcq_rms_norm, mlcq_add_rms_norm, mlcq_silu_mul) on the GPU.

Skipped without a CUDA device (torch for device memory); needs only TVM's runtime (tvm_ffi): the
kernel library comes from MLC_QUANT_KERNEL_LIB or is built here (nvcc).
  * against numpy in float64 on fresh random data, rows 1 .. 2048, hidden 8 .. 11008: the residual
    sum bit-exact (fp16 rounding of a + b, as R.add), the norm and SiLU * up within 2 fp16 ulps of
    the float64 value (|err| <= 2^-9 |ref| + 1e-6); an all-zero row normalizes to 0 (finite);
  * the W8A8 variants (_q static, _qt per token) write exactly the int8 values (and row scales)
    that quantizing the fp16 kernels' output in float32 numpy gives (a zero row: scale = eps);
    the _qs variants the same int8 values plus their exact int32 row sums;
  * bad arguments raise with the function's name.
The Relax rewrite that calls them: test_norm_act.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


# the GEMM kernels' tests' GPU probe and kernel library fixture (runtime-only TVM imports them)
from test_cuda_kernels import _torch_cuda, klib, needs_gpu  # noqa: E402,F401  pylint: disable=unused-import


def _close(out, ref, what):
    err = np.abs(out.astype(np.float64) - ref)
    bound = 2.0 ** -9 * np.abs(ref) + 1e-6
    assert np.isfinite(out).all(), what
    assert (err <= bound).all(), f"{what}: worst err {err.max():.3g} at |ref| {np.abs(ref).ravel()[err.argmax()]:.3g}"


def _ref_norm(s, w, eps):
    s64 = s.astype(np.float64)
    return s64 / np.sqrt((s64 ** 2).mean(-1, keepdims=True) + eps) * w.astype(np.float64)


@needs_gpu
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (7, 576), (2048, 4096), (3, 11008), (5, 8)])
def test_gpu_norms(klib, rows, hidden):
    torch = _torch_cuda()
    rng = np.random.default_rng()
    a = (rng.standard_normal((1, rows, hidden)) * rng.uniform(0.1, 30)).astype(np.float16)
    b = (rng.standard_normal((1, rows, hidden)) * 0.5).astype(np.float16)
    w = rng.uniform(0.2, 2.0, hidden).astype(np.float16)
    eps = 1e-5
    da, db, dw = (torch.from_numpy(v).cuda() for v in (a, b, w))
    s_out = torch.full_like(da, float("nan"))
    n_out = torch.full_like(da, float("nan"))
    klib["mlcq_add_rms_norm"](da, db, dw, eps, s_out, n_out)
    torch.cuda.synchronize()
    s = (a + b)  # numpy float16 add: the exact sum rounded once, as R.add in float16
    np.testing.assert_array_equal(s_out.cpu().numpy(), s)
    _close(n_out.cpu().numpy(), _ref_norm(s, w, eps), "add_rms_norm")
    n2 = torch.full_like(da, float("nan"))
    klib["mlcq_rms_norm"](da, dw, eps, n2)
    _close(n2.cpu().numpy(), _ref_norm(a, w, eps), "rms_norm")
    z = torch.zeros_like(da)  # an all-zero row: eps keeps it finite (output 0)
    klib["mlcq_rms_norm"](z, dw, eps, n2)
    assert (n2.cpu().numpy() == 0).all()


@needs_gpu
@pytest.mark.parametrize("rows,inter", [(1, 11008), (2048, 11008), (9, 1536), (4, 8)])
def test_gpu_silu_mul(klib, rows, inter):
    torch = _torch_cuda()
    rng = np.random.default_rng()
    gu = (rng.standard_normal((rows, 2 * inter)) * 4).astype(np.float16)
    out = torch.full((rows, inter), float("nan"), dtype=torch.float16, device="cuda")
    klib["mlcq_silu_mul"](torch.from_numpy(gu).cuda(), out)
    torch.cuda.synchronize()
    g, u = gu[:, :inter].astype(np.float64), gu[:, inter:].astype(np.float64)
    _close(out.cpu().numpy(), g / (1 + np.exp(-g)) * u, "silu_mul")


@needs_gpu
def test_gpu_bad_arguments(klib):
    torch = _torch_cuda()
    x = torch.zeros((2, 12), dtype=torch.float16, device="cuda")
    w = torch.zeros((12,), dtype=torch.float16, device="cuda")
    with pytest.raises(Exception, match="mlcq_rms_norm.*multiple of 8"):
        klib["mlcq_rms_norm"](x, w, 1e-5, torch.zeros_like(x))
    x = torch.zeros((2, 16), dtype=torch.float32, device="cuda")
    with pytest.raises(Exception, match="mlcq_silu_mul.*float16"):
        klib["mlcq_silu_mul"](x, torch.zeros((2, 8), dtype=torch.float32, device="cuda"))


def _ref_quant_static(y, s, z):
    q = np.rint(y.astype(np.float32) / np.float32(s)) + np.float32(z)  # float32 division, ties to even
    return np.clip(q, -128, 127).astype(np.int8)


def _ref_quant_token(y, eps):
    yf = y.astype(np.float32)
    s = np.maximum(np.abs(yf).max(-1, keepdims=True) / np.float32(127), np.float32(eps)).astype(np.float32)
    return np.clip(np.rint(yf / s), -127, 127).astype(np.int8), s


@needs_gpu
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (7, 576), (300, 4096), (3, 11008), (4, 8)])
def test_gpu_norm_quant_variants_equal_unfused(klib, rows, hidden):
    """The _q / _qt kernels write exactly what quantizing the fp16 kernels' output gives."""
    torch = _torch_cuda()
    rng = np.random.default_rng()
    a = (rng.standard_normal((1, rows, hidden)) * rng.uniform(0.1, 30)).astype(np.float16)
    b = (rng.standard_normal((1, rows, hidden)) * 0.5).astype(np.float16)
    w = rng.uniform(0.2, 2.0, hidden).astype(np.float16)
    a[0, 0] = 0  # an all-zero row: the per-token scale is eps, q is 0
    b[0, 0] = 0
    da, db, dw = (torch.from_numpy(v).cuda() for v in (a, b, w))
    s, z, eps_tok = np.float32(rng.uniform(0.005, 0.05)), np.int8(rng.integers(-30, 30)), np.float32(1e-8)
    ds, dz, deps = (torch.tensor(v).cuda() for v in (s, z, eps_tok))
    y = torch.empty_like(da)
    sum_ref = torch.empty_like(da)
    klib["mlcq_add_rms_norm"](da, db, dw, 1e-5, sum_ref, y)
    y_add = y.cpu().numpy()
    klib["mlcq_rms_norm"](da, dw, 1e-5, y)
    y_one = y.cpu().numpy()
    q = torch.empty(da.shape, dtype=torch.int8, device="cuda")
    s_row = torch.empty((1, rows, 1), dtype=torch.float32, device="cuda")
    sum_out = torch.full_like(da, float("nan"))
    klib["mlcq_add_rms_norm_q"](da, db, dw, 1e-5, ds, dz, sum_out, q)
    np.testing.assert_array_equal(sum_out.cpu().numpy(), sum_ref.cpu().numpy())
    np.testing.assert_array_equal(q.cpu().numpy(), _ref_quant_static(y_add, s, z))
    klib["mlcq_rms_norm_q"](da, dw, 1e-5, ds, dz, q)
    np.testing.assert_array_equal(q.cpu().numpy(), _ref_quant_static(y_one, s, z))
    rs = torch.full((1, rows, 1), -(2 ** 31), dtype=torch.int32, device="cuda")
    q.fill_(99)
    klib["mlcq_add_rms_norm_qs"](da, db, dw, 1e-5, ds, dz, sum_out, q, rs)
    want = _ref_quant_static(y_add, s, z)
    np.testing.assert_array_equal(q.cpu().numpy(), want)
    np.testing.assert_array_equal(rs.cpu().numpy(), want.astype(np.int64).sum(-1, keepdims=True))
    klib["mlcq_rms_norm_qs"](da, dw, 1e-5, ds, dz, q, rs)
    want = _ref_quant_static(y_one, s, z)
    np.testing.assert_array_equal(q.cpu().numpy(), want)
    np.testing.assert_array_equal(rs.cpu().numpy(), want.astype(np.int64).sum(-1, keepdims=True))
    klib["mlcq_add_rms_norm_qt"](da, db, dw, 1e-5, deps, sum_out, q, s_row)
    want_q, want_s = _ref_quant_token(y_add, eps_tok)
    np.testing.assert_array_equal(s_row.cpu().numpy(), want_s)
    np.testing.assert_array_equal(q.cpu().numpy(), want_q)
    assert want_s[0, 0, 0] == eps_tok and (want_q[0, 0] == 0).all()
    klib["mlcq_rms_norm_qt"](da, dw, 1e-5, deps, q, s_row)
    want_q, want_s = _ref_quant_token(y_one, eps_tok)
    np.testing.assert_array_equal(s_row.cpu().numpy(), want_s)
    np.testing.assert_array_equal(q.cpu().numpy(), want_q)


@needs_gpu
@pytest.mark.parametrize("rows,inter", [(1, 11008), (300, 11008), (9, 1536), (4, 8), (2, 16384)])
def test_gpu_silu_quant_variants_equal_unfused(klib, rows, inter):
    torch = _torch_cuda()
    rng = np.random.default_rng()
    gu = (rng.standard_normal((rows, 2 * inter)) * 4).astype(np.float16)
    dgu = torch.from_numpy(gu).cuda()
    y = torch.empty((rows, inter), dtype=torch.float16, device="cuda")
    klib["mlcq_silu_mul"](dgu, y)
    y = y.cpu().numpy()
    s, z, eps_tok = np.float32(0.02), np.int8(-7), np.float32(1e-8)
    ds, dz, deps = (torch.tensor(v).cuda() for v in (s, z, eps_tok))
    q = torch.empty((rows, inter), dtype=torch.int8, device="cuda")
    klib["mlcq_silu_mul_q"](dgu, ds, dz, q)
    np.testing.assert_array_equal(q.cpu().numpy(), _ref_quant_static(y, s, z))
    q.fill_(99)
    rs = torch.full((rows, 1), -(2 ** 31), dtype=torch.int32, device="cuda")
    klib["mlcq_silu_mul_qs"](dgu, ds, dz, q, rs)
    np.testing.assert_array_equal(q.cpu().numpy(), _ref_quant_static(y, s, z))
    np.testing.assert_array_equal(rs.cpu().numpy(), _ref_quant_static(y, s, z).astype(np.int64).sum(-1, keepdims=True))
    s_row = torch.empty((rows, 1), dtype=torch.float32, device="cuda")
    klib["mlcq_silu_mul_qt"](dgu, deps, q, s_row)
    want_q, want_s = _ref_quant_token(y, eps_tok)
    np.testing.assert_array_equal(s_row.cpu().numpy(), want_s)
    np.testing.assert_array_equal(q.cpu().numpy(), want_q)


@needs_gpu
def test_gpu_quant_variants_reject_bad_arguments(klib):
    torch = _torch_cuda()
    gu = torch.zeros((2, 2 * 16392), dtype=torch.float16, device="cuda")  # I = 16392 > the row kernel's 16384
    with pytest.raises(Exception, match="mlcq_silu_mul_qt.*intermediate size"):
        klib["mlcq_silu_mul_qt"](gu, torch.tensor(1e-8).cuda(), torch.zeros((2, 16392), dtype=torch.int8, device="cuda"),
                                 torch.zeros((2, 1), device="cuda"))
    with pytest.raises(Exception, match="mlcq_silu_mul_qs.*intermediate size"):
        klib["mlcq_silu_mul_qs"](gu, torch.tensor(0.5).cuda(), torch.tensor(0, dtype=torch.int8).cuda(),
                                 torch.zeros((2, 16392), dtype=torch.int8, device="cuda"),
                                 torch.zeros((2, 1), dtype=torch.int32, device="cuda"))
    x = torch.zeros((2, 16), dtype=torch.float16, device="cuda")
    w = torch.ones((16,), dtype=torch.float16, device="cuda")
    with pytest.raises(Exception, match="mlcq_rms_norm_q.*scale must be a float32"):
        klib["mlcq_rms_norm_q"](x, w, 1e-5, torch.tensor(0.5, dtype=torch.float64).cuda(),
                                torch.tensor(0, dtype=torch.int8).cuda(), torch.zeros((2, 16), dtype=torch.int8, device="cuda"))


@needs_gpu
@pytest.mark.parametrize("rows,inter", [(1, 11008), (300, 1536), (3, 8)])
def test_gpu_two_tensor_silu_equals_merged(klib, rows, inter):
    """mlcq_silu_mul2* (gate and up as two tensors) compute what the merged kernels compute."""
    torch = _torch_cuda()
    rng = np.random.default_rng()
    gu = (rng.standard_normal((rows, 2 * inter)) * 4).astype(np.float16)
    dgu = torch.from_numpy(gu).cuda()
    dg, du = (torch.from_numpy(np.ascontiguousarray(gu[:, k * inter:(k + 1) * inter])).cuda() for k in (0, 1))
    ds, dz, deps = (torch.tensor(v).cuda() for v in (np.float32(0.02), np.int8(3), np.float32(1e-8)))
    outs = []
    for two in (False, True):
        y = torch.empty((rows, inter), dtype=torch.float16, device="cuda")
        q = torch.empty((rows, inter), dtype=torch.int8, device="cuda")
        qt = torch.empty((rows, inter), dtype=torch.int8, device="cuda")
        st = torch.empty((rows, 1), dtype=torch.float32, device="cuda")
        ins = (dg, du) if two else (dgu,)
        suffix = "2" if two else ""
        klib[f"mlcq_silu_mul{suffix}"](*ins, y)
        klib[f"mlcq_silu_mul{suffix}_q"](*ins, ds, dz, q)
        klib[f"mlcq_silu_mul{suffix}_qt"](*ins, deps, qt, st)
        qs = torch.empty((rows, inter), dtype=torch.int8, device="cuda")
        rs = torch.empty((rows, 1), dtype=torch.int32, device="cuda")
        klib[f"mlcq_silu_mul{suffix}_qs"](*ins, ds, dz, qs, rs)
        np.testing.assert_array_equal(qs.cpu().numpy(), q.cpu().numpy())
        outs.append([t.cpu().numpy() for t in (y, q, qt, st, rs)])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


@needs_gpu
@pytest.mark.parametrize("rows", [512, 2048])
def test_gpu_dependent_chain_without_syncs(klib, rows):
    """A W8A8 layer's chain of our kernels back to back, each reading what the one before wrote:
    add_rms_norm_qt -> CUTLASS linear (per-token x per-channel) -> add_rms_norm_qt -> ... and
    silu_mul_qt. Launched without a sync in between (with programmatic dependent launch on
    sm_90, mlcq_pdl.h: a kernel may start before the previous one finished), the result must be
    bit-identical to the same calls with a device sync after each one."""
    torch = _torch_cuda()
    rng = np.random.default_rng()
    hidden, steps = 4096, 6
    x0 = torch.from_numpy((rng.standard_normal((rows, hidden)) * 3).astype(np.float16)).cuda()
    r0 = torch.from_numpy((rng.standard_normal((rows, hidden)) * 0.5).astype(np.float16)).cuda()
    w = torch.from_numpy(rng.uniform(0.2, 2.0, hidden).astype(np.float16)).cuda()
    wq = torch.from_numpy(rng.integers(-127, 128, (2 * hidden, hidden), dtype=np.int8)).cuda()
    wq2 = torch.from_numpy(rng.integers(-127, 128, (hidden, hidden), dtype=np.int8)).cuda()
    s_col = torch.from_numpy(rng.uniform(0.5, 1.5, 2 * hidden).astype(np.float32) / 2e4).cuda()
    s_col2 = torch.from_numpy(rng.uniform(0.5, 1.5, hidden).astype(np.float32) / 2e4).cuda()
    eps = torch.tensor(np.float32(1e-8)).cuda()
    lin = klib["mlcq_linear"]

    def run(sync):
        x, r = x0.clone(), r0.clone()
        s = torch.empty_like(x)
        q = torch.empty((rows, hidden), dtype=torch.int8, device="cuda")
        srow = torch.empty((rows, 1), dtype=torch.float32, device="cuda")
        gu = torch.empty((rows, 2 * hidden), dtype=torch.float16, device="cuda")
        calls = []
        for _ in range(steps):
            calls += [
                lambda: klib["mlcq_add_rms_norm_qt"](x, r, w, 1e-5, eps, s, q, srow),
                lambda: lin(3, 0, q, wq, False, None, None, srow, None, s_col, None, None, None, None, gu),
                lambda: klib["mlcq_silu_mul_qt"](gu, eps, q, srow),
                lambda: lin(3, 0, q, wq2, False, None, None, srow, None, s_col2, None, None, None, None, x),
                lambda: r.copy_(s),
            ]
        for c in calls:
            c()
            if sync:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        return x.cpu().numpy(), r.cpu().numpy()

    want_x, want_r = run(sync=True)
    assert np.isfinite(want_x).all() and np.abs(want_x).max() > 0
    for _ in range(3):
        got_x, got_r = run(sync=False)
        np.testing.assert_array_equal(got_r, want_r)
        np.testing.assert_array_equal(got_x, want_x)


@needs_gpu
@pytest.mark.parametrize("rows", [1, 7, 512])
def test_gpu_asym_linear_takes_the_norms_row_sums(klib, rows):
    """smq_q8i8f16_2's chain: mlcq_add_rms_norm_qs writes q and its row sums, and the asymmetric
    linear given those sums gives what it gives when it sums q itself, bit for bit, and the
    float64 reference (dequant(q @ wq^T - rs * zw - c) within fp16 rounding)."""
    torch = _torch_cuda()
    rng = np.random.default_rng()
    hidden, n = 4096, 1024
    a = (rng.standard_normal((1, rows, hidden)) * 3).astype(np.float16)
    b = (rng.standard_normal((1, rows, hidden)) * 0.5).astype(np.float16)
    w = rng.uniform(0.2, 2.0, hidden).astype(np.float16)
    wq = rng.integers(-127, 128, (n, hidden), dtype=np.int8)
    zw = rng.integers(-10, 10, n).astype(np.int32)
    c = rng.integers(-5000, 5000, n).astype(np.int32)
    sc = (rng.uniform(0.5, 1.5, n) / 2e4).astype(np.float32)
    da, db, dw, dwq, dzw, dc, dsc = (torch.from_numpy(v).cuda() for v in (a, b, w, wq, zw, c, sc))
    ds, dz = torch.tensor(np.float32(0.03)).cuda(), torch.tensor(np.int8(-4)).cuda()
    sum_out = torch.empty_like(da)
    q = torch.empty(da.shape, dtype=torch.int8, device="cuda")
    rs = torch.empty((1, rows, 1), dtype=torch.int32, device="cuda")
    klib["mlcq_add_rms_norm_qs"](da, db, dw, 1e-5, ds, dz, sum_out, q, rs)
    outs = []
    for given in (rs, None):
        out = torch.empty((1, rows, n), dtype=torch.float16, device="cuda")
        klib["mlcq_linear"](2, 0, q, dwq, False, None, None, None, None, dsc, dzw, dc, given, None, out)
        outs.append(out.cpu().numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    qn = q.cpu().numpy().reshape(rows, hidden).astype(np.int64)
    acc = qn @ wq.astype(np.int64).T - qn.sum(-1, keepdims=True) * zw - c
    _close(outs[0].reshape(rows, n), acc * sc.astype(np.float64), "asym linear with given row sums")
