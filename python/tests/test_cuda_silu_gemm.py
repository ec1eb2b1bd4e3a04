"""The W8A8 gate/up GEMM with SiLU * up + the down_proj's quantize in its epilogue, on the GPU.

``mlcq_linear_silu_q`` (mlc_quant/kernels/linear.cu; CUTLASS epilogue in cutlass_w8a8_sm90.cu,
MLCQ_EPI=1) against the unfused kernels it replaces, on fresh random data: the fp16 GEMM
(``mlcq_linear`` on the same interleaved weight, same tile config) de-interleaved, then
``mlcq_silu_mul_q`` / ``_qs``. The int8 output and the row sums must be equal bit for bit, for
the symmetric (per-tensor and per-channel scale) and asymmetric schemes, M from 1 (GEMV
fallback) to 1000 (the auto policy fuses from M = 65 on, asymmetric weights up to M = 128), N
with a partial last tile, every backend. A float64 numpy reference bounds
both (|q - ref| <= 1: the fp16 roundings on the way). Skipped without a CUDA device; needs only
TVM's runtime (MLC_QUANT_KERNEL_LIB as for test_cuda_kernels.py).
The Relax side (interleave + rewrite): test_fuse_silu_gemm.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_cuda_kernels import (  # noqa: E402,F401  pylint: disable=unused-import
    ASYM, AUTO, CUBLASLT, CUTLASS, CUTLASS_CFG, SIMT, SYM, _dev, _out, _torch_cuda, klib, needs_gpu)

BLOCK = 8


def _deinterleave(a):
    """[..., 2I] with gate/up in blocks of 8 -> [..., 2I] as [gate | up]."""
    lead, n = a.shape[:-1], a.shape[-1]
    b = a.reshape(*lead, n // (2 * BLOCK), 2, BLOCK)
    return np.concatenate([b[..., 0, :].reshape(*lead, n // 2), b[..., 1, :].reshape(*lead, n // 2)], -1)


def _problem(scheme, M, I, K, seed, gain=1.0):
    """gate / up of about unit size (gain 1): SiLU * up spans the int8 range at act_s ~ 0.03;
    gain 1000 saturates them (fp16 overflow of SiLU * up: +-inf must quantize to 127 / -128)."""
    rng = np.random.default_rng(seed)
    N = 2 * I
    xq = rng.integers(-128, 128, (M, K)).astype(np.int8)
    wq = rng.integers(-127, 128, (N, K)).astype(np.int8)
    acc_std = np.sqrt(K) * 74.0 * 73.0  # uniform int8 x and w
    s = (rng.uniform(0.5, 1.5, N if scheme != "sym0" else ()) * gain / acc_std).astype(np.float32)
    p = dict(xq=xq, wq=wq, scale=np.asarray(s, np.float32), zw=None, corr=None, rs=None)
    if scheme == "asym":
        p["zw"] = rng.integers(-10, 10, N).astype(np.int32)
        p["corr"] = rng.integers(-5000, 5000, N).astype(np.int32)
        p["rs"] = xq.astype(np.int32).sum(-1, keepdims=True, dtype=np.int32)
    p["act_s"] = np.array(rng.uniform(0.01, 0.03), np.float32)
    p["act_z"] = np.array(rng.integers(-10, 10) if scheme == "asym" else 0, np.int8)
    return p


def _d(a):
    return _dev(a) if a is not None else None


def _fused(klib, scheme, p, backend, rowsum, runs=1):
    torch = _torch_cuda()
    M, N = p["xq"].shape[0], p["wq"].shape[0]
    q = torch.full((M, N // 2), 99, dtype=torch.int8, device="cuda")
    rs = torch.full((M, 1), 12345, dtype=torch.int32, device="cuda") if rowsum else None
    for _ in range(runs):  # the row sums are added up in the epilogue: zeroed on every call
        klib["mlcq_linear_silu_q"](ASYM if scheme == "asym" else SYM, backend, _d(p["xq"]), _d(p["wq"]), None, None,
                                   _d(p["scale"]), _d(p["zw"]), _d(p["corr"]), _d(p["rs"]), _d(p["act_s"]),
                                   _d(p["act_z"]), q, rs)
    torch.cuda.synchronize()
    return q.cpu().numpy(), (rs.cpu().numpy() if rs is not None else None), klib["mlcq_last_kernel"]()


def _unfused(klib, scheme, p, backend, rowsum):
    torch = _torch_cuda()
    M, N = p["xq"].shape[0], p["wq"].shape[0]
    gu = _out((M, N), "float16")
    klib["mlcq_linear"](ASYM if scheme == "asym" else SYM, backend, _d(p["xq"]), _d(p["wq"]), False, None, None,
                        None, None, _d(p["scale"]), _d(p["zw"]), _d(p["corr"]), _d(p["rs"]), None, gu)
    torch.cuda.synchronize()
    gu_host = gu.cpu().numpy()
    dgu = _dev(_deinterleave(gu_host))
    q = torch.zeros((M, N // 2), dtype=torch.int8, device="cuda")
    if rowsum:
        rs = torch.zeros((M, 1), dtype=torch.int32, device="cuda")
        klib["mlcq_silu_mul_qs"](dgu, _d(p["act_s"]), _d(p["act_z"]), q, rs)
    else:
        rs = None
        klib["mlcq_silu_mul_q"](dgu, _d(p["act_s"]), _d(p["act_z"]), q)
    torch.cuda.synchronize()
    return q.cpu().numpy(), (rs.cpu().numpy() if rs is not None else None), gu_host


def _numpy_ref(gu_host, p):
    """float64 SiLU * up of the fp16 GEMM output, rounded to fp16 as the kernels' contract says,
    then quantized (the kernels' values, but for fp16 roundings flipped by their fp32 math)."""
    g = _deinterleave(gu_host).astype(np.float64)
    gate, up = g[:, : g.shape[1] // 2], g[:, g.shape[1] // 2:]
    with np.errstate(over="ignore"):
        h = (gate / (1 + np.exp(-gate)) * up).astype(np.float16).astype(np.float64)
    return np.clip(np.rint(h / np.float64(p["act_s"])) + int(p["act_z"]), -128, 127)


def _check(klib, scheme, M, I, K, backend, unfused_backend, rowsum, seed, gain=1.0):
    p = _problem(scheme, M, I, K, seed, gain)
    q, rs, kernel = _fused(klib, scheme, p, backend, rowsum, runs=2)
    q_ref, rs_ref, gu = _unfused(klib, scheme, p, unfused_backend, rowsum)
    what = f"{scheme} M={M} I={I} K={K} backend={backend} rowsum={rowsum} ({kernel})"
    np.testing.assert_array_equal(q, q_ref, err_msg=what)
    if rowsum:
        np.testing.assert_array_equal(rs, rs_ref, err_msg=what)
        np.testing.assert_array_equal(rs[:, 0], q.astype(np.int64).sum(-1), err_msg=what)
    ref = _numpy_ref(gu, p)
    assert np.abs(q.astype(np.float64) - ref).max() <= 1, what
    assert (q != ref).mean() < 0.01, what
    if gain == 1.0:  # the data spans the int8 range without piling up at its ends
        q16 = q.astype(np.int16)
        assert 0.05 < (np.abs(q16 - int(p["act_z"])) > 8).mean() and (np.abs(q16) >= 127).mean() < 0.2, what
    return kernel


def _cfg_for(M):
    """linear.cu's tile config for the SiLU epilogue (PingpongConfigForRows)."""
    if M <= 128:
        return CUTLASS_CFG + 2
    return CUTLASS_CFG + (3 if -(-M // 128) in (2, 4) else 0)


@needs_gpu
@pytest.mark.parametrize("M", [1, 5, 64, 65, 128, 129, 300, 500, 1000])
@pytest.mark.parametrize("scheme", ["sym0", "sym1", "asym"])
@pytest.mark.parametrize("rowsum", [False, True])
def test_gpu_silu_gemm_equals_unfused(klib, M, scheme, rowsum):
    # I = 360: N = 720 is 5 whole 128-column tiles and a partial one; K = 256
    # the auto policy (linear.cu) fuses above the cuBLASLt / GEMV sizes, asymmetric weights up to M = 128
    fused = M > 64 and (scheme != "asym" or M <= 128)
    unfused = _cfg_for(M) if fused else AUTO
    kernel = _check(klib, scheme, M, 360, 256, AUTO, unfused, rowsum, seed=hash((M, scheme, rowsum)) % 2**31)
    if fused:
        tile = "64x128x128_c1x1" if M <= 128 else "128x128x128_c2x1" if -(-M // 128) in (2, 4) else "128x128x128_c1x2"
        assert kernel.startswith("cutlass_silu_q:" + tile), kernel
    else:
        assert kernel.endswith("+silu_mul_q"), kernel


@needs_gpu
@pytest.mark.parametrize("backend", [CUTLASS_CFG + 0, CUTLASS_CFG + 2, CUTLASS_CFG + 3, CUTLASS, CUBLASLT, SIMT])
@pytest.mark.parametrize("M", [7, 130, 520])
@pytest.mark.parametrize("scheme", ["sym1", "asym"])
def test_gpu_silu_gemm_every_backend(klib, backend, M, scheme):
    unfused = _cfg_for(M) if backend == CUTLASS else backend
    kernel = _check(klib, scheme, M, 176, 128, backend, unfused, True, seed=hash((backend, M, scheme)) % 2**31)
    fused = backend in (CUTLASS_CFG + 0, CUTLASS_CFG + 2, CUTLASS_CFG + 3, CUTLASS)
    assert kernel.startswith("cutlass_silu_q:") == fused, kernel


@needs_gpu
@pytest.mark.parametrize("M", [5, 300])
def test_gpu_silu_gemm_saturated(klib, M):
    """fp16 gate / up at +-65504 and SiLU * up overflowing to +-inf: the clamp of its sign."""
    p = _problem("sym1", M, 176, 128, seed=M, gain=1e4)
    q, _, _ = _fused(klib, "sym1", p, AUTO, False)
    assert (np.abs(q.astype(np.int16)) >= 127).mean() > 0.3
    _check(klib, "sym1", M, 176, 128, AUTO, AUTO if M <= 64 else _cfg_for(M), True, seed=M, gain=1e4)


@needs_gpu
def test_gpu_silu_gemm_llama_shape(klib):
    """Llama-2-7B's gate/up (I = 11008, K = 4096) at a 512-token prefill."""
    kernel = _check(klib, "sym1", 512, 11008, 4096, AUTO, CUTLASS_CFG + 0, True, seed=7)
    assert kernel.startswith("cutlass_silu_q:128x128x128_c2x1"), kernel  # against config 0's bits


@needs_gpu
def test_gpu_silu_gemm_rejects_bad_arguments(klib):
    torch = _torch_cuda()
    p = _problem("sym1", 8, 24, 64, seed=1)
    q = torch.zeros((8, 24), dtype=torch.int8, device="cuda")
    args = lambda **kw: [kw.get("scheme", SYM), kw.get("backend", AUTO), _d(p["xq"]), kw.get("w", _d(p["wq"])),  # noqa: E731
                         None, None, _d(p["scale"]), None, None, None, _d(p["act_s"]), _d(p["act_z"]),
                         kw.get("q", q), None]
    with pytest.raises(Exception, match="silu_q must be"):
        klib["mlcq_linear_silu_q"](*args(q=torch.zeros((8, 23), dtype=torch.int8, device="cuda")))
    with pytest.raises(Exception, match="N % 16"):
        w = _dev(np.zeros((40, 64), np.int8))
        klib["mlcq_linear_silu_q"](*args(w=w, q=torch.zeros((8, 20), dtype=torch.int8, device="cuda")))
    with pytest.raises(Exception, match="scheme must be"):
        klib["mlcq_linear_silu_q"](*args(scheme=3))
    with pytest.raises(Exception, match="no stream-K"):
        klib["mlcq_linear_silu_q"](*args(backend=CUTLASS_CFG + 1))
    with pytest.raises(Exception, match="bad backend"):
        klib["mlcq_linear_silu_q"](*args(backend=CUTLASS_CFG + 99))
    with pytest.raises(Exception, match="act_scale must be a scalar"):
        bad = _d(np.full(2, 0.02, np.float32))
        klib["mlcq_linear_silu_q"](*args()[:10], bad, *args()[11:])
