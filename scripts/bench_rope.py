"""Time the KV cache's RoPE split (fused qkv [S, Hq + 2 Hkv, D] -> rotated q, rotated k, v) on a GPU:
mlc_quant's kernel (``mlcq_rope_make``, mlc_quant/kernels/rope.cu) against TVM's TIR ``fused_rope``
(as TIRPagedKVCache builds it), and a plain device copy of the same bytes (torch) as the memory
roofline; then the k/v append to the pages (``mlcq_kv_transpose_append`` vs TVM's TIR
``tir_kv_cache_transpose_append``, page size 16, slots 0..S-1). Llama-2-7B shape by default (32 heads, 32 KV heads, head_dim 128, theta 1e4).

Runs with the runtime-only TVM: the libraries come from
``python python/tests/test_cuda_rope.py make-gpu-bundle DIR`` (built on the CPU machine)::

    python scripts/bench_rope.py --bundle DIR --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# name in the bundle (tir_rope_<name>.so): heads, kv heads, head_dim, theta, scale (as test_cuda_rope.TIR_CASES)
CASES = {"llama7b": (32, 32, 128, 1e4, 1.0), "gqa64": (8, 2, 64, 1e5, 1.0), "gqa128": (8, 2, 128, 5e5, 0.25)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--cases", default="llama7b")
    ap.add_argument("--lengths", default="1,128,512,2048,4096")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--inner", type=int, default=20, help="launches per timed sample")
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch  # pylint: disable=import-outside-toplevel
    import tvm  # pylint: disable=import-outside-toplevel
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mlc_quant.cuda_runtime import prepare_cuda_runtime  # pylint: disable=import-outside-toplevel

    prepare_cuda_runtime()
    b = Path(args.bundle)
    lib = tvm_ffi.load_module(str(b / "libmlc_quant_kernels.so"))
    make, append = lib["mlcq_rope_make"], lib["mlcq_kv_transpose_append"]
    dev = tvm.cuda(0)

    def timed(fn):
        """Median over ``repeat`` samples of ``inner`` back-to-back launches, per launch (ms)."""
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        dev.sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(args.repeat):
            start.record()
            for _ in range(args.inner):
                fn()
            end.record()
            end.synchronize()
            dev.sync()
            times.append(start.elapsed_time(end) / args.inner)
        return float(np.median(times))

    out = {"device": torch.cuda.get_device_name(), "repeat": args.repeat, "inner": args.inner, "cases": {}}
    for case in args.cases.split(","):
        h, hkv, d, theta, scale = CASES[case]
        ours = make(theta, scale, h, hkv, d)
        tir_path = b / f"tir_rope_{case}.so"
        tir = tvm.runtime.load_module(str(tir_path))["tir_rope"] if tir_path.is_file() else None
        res = {"heads": h, "kv_heads": hkv, "head_dim": d, "theta": theta, "scale": scale, "lengths": {}}
        for n in [int(x) for x in args.lengths.split(",")]:
            g = torch.Generator(device="cuda").manual_seed(n)
            qkv = torch.randn(n, h + 2 * hkv, d, device="cuda", dtype=torch.float16, generator=g)
            pos = torch.arange(n, dtype=torch.int32, device="cuda")
            q = torch.empty(n, h, d, device="cuda", dtype=torch.float16)
            k = torch.empty(n, hkv, d, device="cuda", dtype=torch.float16)
            v = torch.empty(n, hkv, d, device="cuda", dtype=torch.float16)
            nbytes = 2 * qkv.numel() * 2 + pos.numel() * 4  # read qkv, write q/k/v, read positions
            r = {"bytes": nbytes}
            t = tvm.runtime.from_dlpack  # converted once: the timed calls pass the same tensors to both kernels
            tq, tp, tqo, tko, tvo = t(qkv), t(pos), t(q), t(k), t(v)
            r["ours_us"] = timed(lambda: ours(tq, tp, tqo, tko, tvo, 1)) * 1e3
            copy_dst = torch.empty_like(qkv)
            r["copy_us"] = timed(lambda: copy_dst.copy_(qkv)) * 1e3
            if tir is not None:
                outs = [tvm.runtime.tensor(np.zeros((n, hh, d), np.float16), dev) for hh in (h, hkv, hkv)]
                r["tir_us"] = timed(lambda: tir(tq, tp, *outs, 1)) * 1e3
                diffs = [float((x.float().cpu() - torch.from_numpy(o.numpy()).float()).abs().max())
                         for x, o in zip((q, k, v), outs)]
                r["max_abs_diff_vs_tir"] = dict(zip("qkv", diffs))
            for key in [k_ for k_ in list(r) if k_.endswith("_us")]:
                r[key.replace("_us", "_gbps")] = round(nbytes / (r[key] * 1e-6) / 1e9, 1)
                r[key] = round(r[key], 2)
            if "tir_us" in r:
                r["speedup_vs_tir"] = round(r["tir_us"] / r["ours_us"], 2)
            # k/v append to the pages (page size 16, prefill from an empty cache: slots 0..n-1)
            pages = torch.zeros((n + 15) // 16, 2, hkv, 16, d, device="cuda", dtype=torch.float16)
            abytes = 2 * 2 * k.numel() + pos.numel() * 4
            tpg = t(pages)
            a = {"bytes": abytes, "ours_us": timed(lambda: append(tpg, tko, tvo, tp)) * 1e3}
            ap_path = b / f"tir_append_{case}.so"
            if ap_path.is_file():
                tir_append = tvm.runtime.load_module(str(ap_path))["tir_append"]
                ours_pages = pages.cpu()
                pages.zero_()
                a["tir_us"] = timed(lambda: tir_append(tpg, tko, tvo, tp)) * 1e3
                a["identical_to_tir"] = bool(torch.equal(ours_pages, pages.cpu()))
            for key in [k_ for k_ in list(a) if k_.endswith("_us")]:
                a[key.replace("_us", "_gbps")] = round(abytes / (a[key] * 1e-6) / 1e9, 1)
                a[key] = round(a[key], 2)
            if "tir_us" in a:
                a["speedup_vs_tir"] = round(a["tir_us"] / a["ours_us"], 2)
            r["kv_append"] = a
            res["lengths"][str(n)] = r
            print(case, n, json.dumps(r), flush=True)
        out["cases"][case] = res
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
