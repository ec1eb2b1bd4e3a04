#!/usr/bin/env python3
"""Decode-sized linears (M = 1..8): the GEMV kernels (gemv.cu) against the GEMM routes, in GB/s.

For each M in --m and each Llama-2-7B weight shape N x K (default: the merged decode shapes
(12288, 4096) q/k/v, (4096, 4096) o, (22016, 4096) gate/up, (4096, 11008) down, (32000, 4096) LM
head, and the unmerged (11008, 4096) gate or up; --shapes to choose) it times, in one process on
one card (--variants to choose a subset):

  gemv_i8        W8A8 GEMV, int8 x given, per-channel scale (backend gemv)
  gemv_sym0_q    W8A8 GEMV, fp16 x quantized inside (static per-tensor), per-tensor weight scale
  gemv_sym_q     W8A8 GEMV, fp16 x quantized inside (static per-tensor), per-channel weight scale
  gemv_asym_q    W8A8 GEMV, fp16 x quantized inside (static per-tensor + zero point, row sums,
                 asymmetric correction): a whole smq_q8i8f16_2 linear in one launch
  gemv_tok_q     W8A8 GEMV, fp16 x, per-token scale given
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

--dump FILE saves every gemv_* output (first input set; same seeds in every process) to an .npz;
--check FILE compares them bit for bit with such a file from another build of the kernels (e.g.
before and after a kernel change) and exits 1 on any difference.

    python scripts/bench_gemv.py --lib .gpu/gv/libmlc_quant_kernels.so --json gemv.json
    python scripts/bench_gemv.py --lib old.so --m 1 --variants gemv --dump old.npz
    python scripts/bench_gemv.py --lib new.so --m 1 --variants gemv --check old.npz
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gemm import GRAPH_FAILURES, load_lib, make_runner, time_interleaved  # noqa: E402

SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096), (11008, 4096)]
FLOAT, SYM, ASYM, TOKEN = 0, 1, 2, 3
AUTO, CUBLASLT, GEMV = 0, 4, 6
VARIANTS = ["gemv_i8", "gemv_sym0_q", "gemv_sym_q", "gemv_asym_q", "gemv_tok_q", "gemv_tok_dyn", "old_asym_q",
            "old_tok_dyn", "lt_i8", "gemv_f16", "lt_f16", "torch_f16"]
W8A8_GEMV = [v for v in VARIANTS if v.startswith("gemv_") and v != "gemv_f16"]


def bench(torch, tvm_ffi, lib, M, N, K, variants=VARIANTS, rotate=3, outputs=None):
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
    s_one = torch.tensor(2e-5, device=dev, dtype=torch.float32)  # per-tensor weight scale
    s_tok = torch.rand(M, 1, device=dev, generator=gen, dtype=torch.float32) * 0.04 + 0.01
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
        if name in ("gemv_sym0_q", "gemv_sym_q"):
            sc = s_one if name == "gemv_sym0_q" else s_col
            return lambda: lin(SYM, GEMV, st["x"], st["wq"], False, s_x, None, None, None, sc, None, None, None,
                               None, out_h)
        if name == "gemv_tok_q":
            return lambda: lin(TOKEN, GEMV, st["x"], st["wq"], False, None, None, s_tok, None, s_col, None, None,
                               None, None, out_h)
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
    for name in variants:
        try:
            runners[name] = make_runner(torch, tvm_ffi, [mk(name, st) for st in sets])
            res[f"{name}_kernel"] = str(lib["mlcq_last_kernel"]()) if not name.startswith(("lt_i8", "torch")) else name
        except Exception as err:  # pylint: disable=broad-except
            res[f"{name}_error"] = str(err).splitlines()[0][:200]
    res.update({k: v for k, v in time_interleaved(torch, runners).items()})
    if outputs is not None:  # the W8A8 GEMV outputs of the first input set, for --dump / --check
        for name in variants:
            if name in W8A8_GEMV and name in runners:
                out_h.fill_(float("nan"))
                mk(name, sets[0])()
                torch.cuda.synchronize()
                outputs[f"{M}x{N}x{K}:{name}"] = out_h.cpu().numpy().copy()
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lib")
    p.add_argument("--m", default="1,2,4,8")
    p.add_argument("--json")
    p.add_argument("--shapes", help="N x K list, e.g. 4096x4096,22016x4096 (default: the decode shapes above)")
    p.add_argument("--variants", help="comma list of variants or prefixes (e.g. gemv_ = the GEMVs)")
    p.add_argument("--dump", help="save the W8A8 GEMV outputs to this .npz")
    p.add_argument("--check", help="compare the W8A8 GEMV outputs bit for bit with this .npz")
    args = p.parse_args(argv)
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    variants = VARIANTS
    if args.variants:
        want = args.variants.split(",")
        variants = [v for v in VARIANTS if any(v == w or v.startswith(w) for w in want)]
        if not variants:
            p.error(f"--variants {args.variants}: none of {VARIANTS}")
    import torch  # pylint: disable=import-outside-toplevel
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    lib = load_lib(args.lib)
    card = torch.cuda.get_device_name()
    print(f"card: {card}", flush=True)
    out = {"card": card, "rows": []}
    hdr = f"{'M':>2} {'N':>6} {'K':>6} | " + " | ".join(f"{v:>12}" for v in variants)
    print("us (GB/s of weight bytes)\n" + hdr, flush=True)
    outputs = {} if (args.dump or args.check) else None
    for M in [int(m) for m in args.m.split(",")]:
        for N, K in shapes:
            r = bench(torch, tvm_ffi, lib, M, N, K, variants, outputs=outputs)
            r.update(M=M, N=N, K=K)
            cells = []
            for v in variants:
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
    bad = []
    if args.dump:
        np.savez(args.dump, **outputs)
    if args.check:
        ref = np.load(args.check)
        common = sorted(set(ref.files) & set(outputs))
        for key in common:
            a, b = outputs[key].view(np.uint16), ref[key].view(np.uint16)
            if a.shape != b.shape or not np.array_equal(a, b):
                diff = int((a != b).sum()) if a.shape == b.shape else -1
                bad.append(f"{key}: {diff} of {b.size} fp16 outputs differ")
        out["check"] = {"against": args.check, "compared": len(common), "differ": bad}
        print(f"bitwise check against {args.check}: {len(common)} outputs compared, {len(bad)} differ", flush=True)
        for line in bad[:20]:
            print("  " + line, flush=True)
        if not common:
            bad.append("nothing compared")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
