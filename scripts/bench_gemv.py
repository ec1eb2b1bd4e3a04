#!/usr/bin/env python3
"""Decode-sized linears (M = 1..8): the GEMV kernels (gemv.cu) against the GEMM routes, in GB/s.

For each M in --m and each Llama-2-7B weight shape N x K ((4096, 4096) q/k/v/o, (11008, 4096)
gate/up, (4096, 11008) down, (32000, 4096) LM head) it times, in one process on one card:

  gemv_i8        W8A8 GEMV, int8 x given, per-channel scale (backend gemv)
  gemv_asym_q    W8A8 GEMV, fp16 x quantized inside (static per-tensor + zero point, row sums,
                 asymmetric correction): a whole smq_q8i8f16_2 linear in one launch
  gemv_tok_dyn   W8A8 GEMV, fp16 x, dynamic per-token scale computed inside (smq_q8i8f16_3)
  old_asym_q     the pre-GEMV route of the same linear: quantize kernel + cuBLASLt int8 + epilogue
  old_tok_dyn    the pre-GEMV route of smq_q8i8f16_3 (dynamic quantize + cuBLASLt + epilogue)
  lt_i8          plain cuBLASLt int8 -> int32 (no quantize, no epilogue)
  gemv_f16       fp16 GEMV (the q0f16 decode path now)
  lt_f16         cuBLASLt fp16 (the q0f16 decode path before), fp32 accumulation
  torch_f16      torch.matmul fp16 (cuBLAS): the best other fp16 path at hand

Method as scripts/bench_gemm.py: CUDA graphs of 20 calls over 3 rotating input sets (weights
well beyond L2 except 4096 x 4096 int8 at 3 x 17 MB), interleaved rounds, CUDA events, median.
GB/s counts the weight bytes alone (x and out are < 0.5 % of them at these shapes).

    python scripts/bench_gemv.py --lib .gpu/gv/libmlc_quant_kernels.so --json gemv.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gemm import GRAPH_FAILURES, load_lib, make_runner, time_interleaved  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096)]
FLOAT, SYM, ASYM, TOKEN = 0, 1, 2, 3
AUTO, CUBLASLT, GEMV = 0, 4, 6
VARIANTS = ["gemv_i8", "gemv_asym_q", "gemv_tok_dyn", "old_asym_q", "old_tok_dyn", "lt_i8",
            "gemv_f16", "lt_f16", "torch_f16"]


def bench(torch, tvm_ffi, lib, M, N, K, rotate=3):
    dev = "cuda"
    gen = torch.Generator(device=dev)
    gen.manual_seed(M * 131 + N * 7 + K)
    sets = []
    for _ in range(rotate):
        sets.append(dict(
            x=torch.randn(M, K, device=dev, generator=gen, dtype=torch.float16),
            xq=torch.randint(-127, 128, (M, K), device=dev, generator=gen, dtype=torch.int8),
            wq=torch.randint(-127, 128, (N, K), device=dev, generator=gen, dtype=torch.int8),
            w=torch.randn(N, K, device=dev, generator=gen, dtype=torch.float16) / K**0.5,
        ))
    s_col = torch.rand(N, device=dev, generator=gen, dtype=torch.float32) * 1e-4
    s_x = torch.tensor(0.05, device=dev, dtype=torch.float32)
    z_x = torch.tensor(-3, device=dev, dtype=torch.int8)
    zw = torch.randint(-8, 9, (N,), device=dev, generator=gen, dtype=torch.int32)
    corr = torch.randint(-500, 500, (N,), device=dev, generator=gen, dtype=torch.int32)
    eps = torch.tensor(1e-8, device=dev, dtype=torch.float32)
    out_h = torch.empty(M, N, device=dev, dtype=torch.float16)
    out_i = torch.empty(M, N, device=dev, dtype=torch.int32)
    lin, i8 = lib["mlcq_linear"], lib["mlcq_int8_gemm_i32"]

    def mk(name, st):
        if name == "gemv_i8":
            return lambda: lin(SYM, GEMV, st["xq"], st["wq"], False, None, None, None, None, s_col, None, None, None,
                               None, out_h)
        if name in ("gemv_asym_q", "old_asym_q"):
            b = GEMV if name.startswith("gemv") else CUBLASLT
            return lambda: lin(ASYM, b, st["x"], st["wq"], False, s_x, z_x, None, None, s_col, zw, corr, None, None,
                               out_h)
        if name in ("gemv_tok_dyn", "old_tok_dyn"):
            b = GEMV if name.startswith("gemv") else CUBLASLT
            return lambda: lin(TOKEN, b, st["x"], st["wq"], False, None, None, None, eps, s_col, None, None, None,
                               None, out_h)
        if name == "lt_i8":
            return lambda: i8(st["xq"], st["wq"], out_i)
        if name in ("gemv_f16", "lt_f16"):
            b = GEMV if name == "gemv_f16" else CUBLASLT
            return lambda: lin(FLOAT, b, st["x"], st["w"], False, None, None, None, None, None, None, None, None,
                               None, out_h)
        if name == "torch_f16":
            return lambda: torch.matmul(st["x"], st["w"].t(), out=out_h)
        raise KeyError(name)

    res, runners = {}, {}
    for name in VARIANTS:
        try:
            runners[name] = make_runner(torch, tvm_ffi, [mk(name, st) for st in sets])
            res[f"{name}_kernel"] = str(lib["mlcq_last_kernel"]()) if not name.startswith(("lt_i8", "torch")) else name
        except Exception as err:  # pylint: disable=broad-except
            res[f"{name}_error"] = str(err).splitlines()[0][:200]
    res.update({k: v for k, v in time_interleaved(torch, runners).items()})
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lib")
    p.add_argument("--m", default="1,2,4,8")
    p.add_argument("--json")
    args = p.parse_args(argv)
    import torch  # pylint: disable=import-outside-toplevel
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    lib = load_lib(args.lib)
    card = torch.cuda.get_device_name()
    print(f"card: {card}", flush=True)
    out = {"card": card, "rows": []}
    hdr = f"{'M':>2} {'N':>6} {'K':>6} | " + " | ".join(f"{v:>12}" for v in VARIANTS)
    print("us (GB/s of weight bytes)\n" + hdr, flush=True)
    for M in [int(m) for m in args.m.split(",")]:
        for N, K in SHAPES:
            r = bench(torch, tvm_ffi, lib, M, N, K)
            r.update(M=M, N=N, K=K)
            cells = []
            for v in VARIANTS:
                t = r.get(v)
                if not t:
                    cells.append(f"{'n/a':>12}")
                    continue
                wbytes = N * K * (2 if v.endswith("f16") else 1)
                r[f"{v}_GBps"] = round(wbytes / t / 1e9, 1)
                cells.append(f"{t * 1e6:5.1f} ({wbytes / t / 1e9:4.0f})")
            out["rows"].append(r)
            print(f"{M:>2} {N:>6} {K:>6} | " + " | ".join(cells), flush=True)
    out["graph_failures"] = GRAPH_FAILURES
    if GRAPH_FAILURES:
        print("graph capture failures:", GRAPH_FAILURES[:3])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
