"""Time the ragged prefill attention kernels on a GPU: mlc_quant's (mlcq_attn_prefill_ragged), TVM's
TIR kernel (as TIRPagedKVCache builds it) and torch SDPA (FlashAttention backend), causal, one
sequence, Llama-2-7B shapes by default (32 heads, 32 KV heads, head_dim 128).

Runs with the runtime-only TVM: the libraries come from
``python python/tests/test_cuda_attention.py make-gpu-bundle DIR`` (built on the CPU machine)::

    python scripts/bench_attention.py --bundle DIR --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--lengths", default="128,512,2048,4096")
    ap.add_argument("--tir-case", default="llama7b", help="tir_<case>.so in the bundle")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch  # pylint: disable=import-outside-toplevel
    import tvm  # pylint: disable=import-outside-toplevel
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mlc_quant.cuda_runtime import prepare_cuda_runtime  # pylint: disable=import-outside-toplevel

    prepare_cuda_runtime()
    b = Path(args.bundle)
    ours = tvm_ffi.load_module(str(b / "libmlc_quant_kernels.so"))["mlcq_attn_prefill_ragged"]
    tir_path = b / f"tir_{args.tir_case}.so"
    tir = tvm.runtime.load_module(str(tir_path))["tir_ragged"] if tir_path.is_file() else None
    h, hkv, d = args.heads, args.kv_heads, args.head_dim
    scale = d ** -0.5
    dev = tvm.cuda(0)

    def timed(fn, repeat):
        fn()
        torch.cuda.synchronize()
        dev.sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeat):
            start.record()
            fn()
            end.record()
            end.synchronize()
            dev.sync()
            times.append(start.elapsed_time(end))
        return float(np.median(times))

    out = {"device": torch.cuda.get_device_name(), "heads": h, "kv_heads": hkv, "head_dim": d, "causal": True,
           "lengths": {}}
    for n in [int(x) for x in args.lengths.split(",")]:
        g = torch.Generator(device="cuda").manual_seed(n)
        q = torch.randn(n, h, d, device="cuda", dtype=torch.float16, generator=g)
        k = torch.randn(n, hkv, d, device="cuda", dtype=torch.float16, generator=g)
        v = torch.randn(n, hkv, d, device="cuda", dtype=torch.float16, generator=g)
        ind = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        pos = torch.arange(n, dtype=torch.int32, device="cuda")
        off = torch.zeros(1, dtype=torch.int32, device="cuda")
        o1 = torch.empty(n, h, d, device="cuda", dtype=torch.float16)
        l1 = torch.empty(n, h, device="cuda", dtype=torch.float32)
        flops = 4 * n * n * h * d / 2  # causal: half of QK^T and PV
        r = {}
        r["ours_ms"] = timed(lambda: ours(q, ind, k, v, ind, pos, off, o1, l1, 1, 0, 1.0, 1e4, scale), args.repeat)
        if tir is not None:
            t = lambda x: tvm.runtime.from_dlpack(x)  # noqa: E731
            tq, tk, tv, ti, tp, to_ = t(q), t(k), t(v), t(ind), t(pos), t(off)
            o2 = tvm.runtime.tensor(np.zeros((n, h, d), np.float16), dev)
            l2 = tvm.runtime.tensor(np.zeros((n, h), np.float32), dev)
            reps = max(3, args.repeat // 5) if n >= 2048 else args.repeat
            r["tir_ms"] = timed(lambda: tir(tq, ti, tk, tv, ti, tp, to_, o2, l2, 1, 0, 1.0, 1e4, scale), reps)
            diff = float((o1.float().cpu() - torch.from_numpy(o2.numpy()).float()).abs().max())
            ldiff = float((l1.cpu() - torch.from_numpy(l2.numpy())).abs().max())
            r["max_abs_diff_vs_tir"] = {"out": diff, "lse": ldiff}
        qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        if hkv != h:
            kt = kt.repeat_interleave(h // hkv, dim=1)
            vt = vt.repeat_interleave(h // hkv, dim=1)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        r["torch_sdpa_ms"] = timed(lambda: sdpa(qt, kt, vt, is_causal=True), args.repeat)
        for key in [k_ for k_ in list(r) if k_.endswith("_ms")]:
            r[key.replace("_ms", "_tflops")] = round(flops / (r[key] * 1e-3) / 1e12, 1)
            r[key] = round(r[key], 4)
        if "tir_ms" in r:
            r["speedup_vs_tir"] = round(r["tir_ms"] / r["ours_ms"], 1)
        out["lengths"][str(n)] = r
        print(n, json.dumps(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
