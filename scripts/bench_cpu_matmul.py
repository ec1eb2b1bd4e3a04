"""GFLOP/s of our linears on CPU: tvm.compile default vs mlc_quant.cpu_schedule, side by side.

    .venv/bin/python scripts/bench_cpu_matmul.py [--threads N]

Each case is `matmul(x[1, M, K], permute_dims(w[N, K]))` (how nn.Linear exports), built for this
host's CPU (host_target(); a bare "llvm" is generic x86-64 without AVX/FMA). M is symbolic for
M > 1 like in prefill, static 1 for decode GEMVs. numpy (BLAS) fp32 is printed for reference.
The machine may be shared: the numbers move with other load.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from mlc_quant.cpu_schedule import host_target, schedule_for_cpu  # noqa: E402

CASES = [  # (M, K, N, dtype)
    (128, 576, 1536, "float32"),
    (512, 576, 1536, "float32"),
    (128, 1536, 576, "float32"),
    (128, 576, 192, "float32"),
    (128, 576, 1536, "int8"),
    (512, 576, 1536, "int8"),
    (1, 576, 1536, "float32"),
    (1, 576, 49152, "float32"),
    (1, 576, 49152, "int8"),
]


def linear(m, k, n, dtype):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, m, k], dtype))
    w = relax.Var("w", relax.TensorType([n, k], dtype))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.op.permute_dims(w),
                                        out_dtype="int32" if dtype == "int8" else ""))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def seconds(mod, target, xn, wn):
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    x, w = tvm.runtime.tensor(xn), tvm.runtime.tensor(wn)
    out = vm["main"](x, w).numpy()
    t = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=5, min_repeat_ms=200)(x, w).min
    return t, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-default", action="store_true", help="only the scheduled build")
    args = ap.parse_args()
    target = host_target()
    rng = np.random.default_rng(0)
    print(f"target {target}, TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'all')}")
    print(f"{'M':>4} {'K':>5} {'N':>6} {'dtype':>8} | {'default':>9} {'scheduled':>9} "
          f"{'speedup':>7} | {'sched ms':>8} {'weight GB/s':>11} {'numpy':>7}")
    for m, k, n, dtype in CASES:
        sym = tvm.tirx.Var("m", "int64") if m > 1 else 1
        if dtype == "int8":
            xn = rng.integers(-128, 128, (1, m, k)).astype(dtype)
            wn = rng.integers(-128, 128, (n, k)).astype(dtype)
        else:
            xn = rng.standard_normal((1, m, k)).astype(dtype)
            wn = rng.standard_normal((n, k)).astype(dtype)
        flop = 2 * m * k * n
        t_s, out = seconds(schedule_for_cpu(linear(sym, k, n, dtype), target), target, xn, wn)
        wide = "int64" if dtype == "int8" else "float64"
        ref = xn[0].astype(wide) @ wn.T.astype(wide)
        assert np.abs(out[0] - ref).max() <= 1e-5 * np.abs(ref).max(), "scheduled result wrong"
        t_d = float("nan")
        if not args.skip_default:
            t_d, _ = seconds(linear(sym, k, n, dtype), target, xn, wn)
        npy = ""
        if dtype == "float32":
            xf, wt = xn[0], np.ascontiguousarray(wn.T)
            best = float("inf")
            for _ in range(max(3, int(2e9 // flop))):
                t0 = time.perf_counter()
                xf @ wt
                best = min(best, time.perf_counter() - t0)
            npy = f"{flop / best / 1e9:7.1f}"
        print(f"{m:>4} {k:>5} {n:>6} {dtype:>8} | {flop / t_d / 1e9:9.2f} {flop / t_s / 1e9:9.2f} "
              f"{t_d / t_s:6.1f}x | {t_s * 1e3:8.2f} {wn.nbytes / t_s / 1e9:11.2f} {npy:>7}",
              flush=True)
    print("GFLOP/s (int8: GOP/s); numpy = BLAS fp32 on the same data")


if __name__ == "__main__":
    main()
