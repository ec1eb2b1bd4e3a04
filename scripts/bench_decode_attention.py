"""Time the paged decode attention kernels on a GPU: mlc_quant's (mlcq_attn_decode_paged) and TVM's
TIR ``batch_decode_paged_kv`` (as TIRPagedKVCache builds it), one sequence (batch 1), Llama-2-7B
shapes by default (32 heads, 32 KV heads, head_dim 128, page_size 16, pages shuffled in the pool).

Three numbers per kernel and context length:
  * ``kernel_us``: median GPU duration of the kernel alone (CUPTI through torch.profiler, every
    kernel of the process, no synchronization between the calls);
  * ``graph_us``: wall time per call of ``--graph-calls`` calls captured in one CUDA graph and
    replayed (what a CUDA-graph decode step pays: kernel + the gap to the next node);
  * ``eager_us``: wall time per call of back-to-back calls from Python (launch-bound).
The outputs of both kernels are compared with each other first.

Runs with the runtime-only TVM: the libraries come from
``python python/tests/test_cuda_decode_attention.py make-gpu-bundle DIR`` (built on the CPU machine)::

    python scripts/bench_decode_attention.py --bundle DIR --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

PAGE = 16


def main() -> int:  # pylint: disable=too-many-locals,too-many-statements
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--lengths", default="128,200,512,2048")
    ap.add_argument("--tir-case", default="llama7b", help="tir_decode_<case>.so in the bundle")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calls", type=int, default=200, help="calls per measurement")
    ap.add_argument("--graph-calls", type=int, default=100)
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch  # pylint: disable=import-outside-toplevel
    import tvm  # pylint: disable=import-outside-toplevel
    import tvm_ffi  # pylint: disable=import-outside-toplevel
    from torch.profiler import ProfilerActivity, profile  # pylint: disable=import-outside-toplevel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mlc_quant.cuda_runtime import prepare_cuda_runtime  # pylint: disable=import-outside-toplevel

    prepare_cuda_runtime()
    b = Path(args.bundle)
    fns = {"mlcq": tvm_ffi.load_module(str(b / "libmlc_quant_kernels.so"))["mlcq_attn_decode_paged"],
           "tir": tvm.runtime.load_module(str(b / f"tir_decode_{args.tir_case}.so"))["tir_decode"]}
    # CUDA kernel names: ours is the DecodeKernel<D, G> template; TVM names a PrimFunc's kernel
    # after its global symbol ("tir_decode" in the bundle, batch_decode_paged_kv in a model).
    kernel_names = {"mlcq": ("DecodeKernel",), "tir": ("tir_decode", "batch_decode_paged_kv")}
    h, hkv, d, bs = args.heads, args.kv_heads, args.head_dim, args.batch
    scale = d ** -0.5
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for n in [int(x) for x in args.lengths.split(",")]:
        npages = (n + PAGE - 1) // PAGE
        total = bs * npages + 7
        pages = torch.randn((total, 2, hkv, PAGE, d), generator=gen, device="cuda").half()
        values = torch.randperm(total, generator=gen, device="cuda")[:bs * npages].int()
        indptr = (torch.arange(bs + 1, device="cuda") * npages).int()
        last = torch.full((bs,), n - (npages - 1) * PAGE, dtype=torch.int32, device="cuda")
        q = (torch.randn((bs, h, d), generator=gen, device="cuda") * 2).half()
        zeros = torch.zeros(bs, dtype=torch.int32, device="cuda")
        outs = {k: (torch.empty((bs, h, d), dtype=torch.float16, device="cuda"),
                    torch.empty((bs, h), dtype=torch.float32, device="cuda")) for k in fns}

        def call(k):
            fns[k](q, pages, indptr, values, last, zeros, zeros, outs[k][0], outs[k][1], 0, 1.0, 1e4, scale)

        for k in fns:
            call(k)
        torch.cuda.synchronize()
        row = {"context": n, "batch": bs, "heads": h, "kv_heads": hkv, "head_dim": d,
               "max_abs_diff_out": float((outs["mlcq"][0].float() - outs["tir"][0].float()).abs().max()),
               "max_abs_diff_lse": float((outs["mlcq"][1] - outs["tir"][1]).abs().max())}
        for k in fns:
            # eager
            for _ in range(10):
                call(k)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.calls):
                call(k)
            torch.cuda.synchronize()
            row[f"{k}_eager_us"] = (time.perf_counter() - t0) / args.calls * 1e6
            # CUPTI kernel durations
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.calls):
                    call(k)
                torch.cuda.synchronize()
            durs = [e.device_time for e in prof.events()
                    if e.device_type.name == "CUDA" and any(x in e.name for x in kernel_names[k]) and e.device_time > 0]
            row[f"{k}_kernel_us"] = statistics.median(durs) if durs else None
            row[f"{k}_kernels_seen"] = len(durs)
            # CUDA graph of graph_calls calls
            try:
                g = torch.cuda.CUDAGraph()
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with tvm_ffi.use_torch_stream(torch.cuda.stream(s)):
                    call(k)  # warm-up on the capture stream
                torch.cuda.current_stream().wait_stream(s)
                torch.cuda.synchronize()
                with tvm_ffi.use_torch_stream(torch.cuda.graph(g)):
                    for _ in range(args.graph_calls):
                        call(k)
                g.replay()
                torch.cuda.synchronize()
                reps = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    g.replay()
                    torch.cuda.synchronize()
                    reps.append((time.perf_counter() - t0) / args.graph_calls * 1e6)
                row[f"{k}_graph_us"] = min(reps)
            except Exception as e:  # pylint: disable=broad-except
                row[f"{k}_graph_us"] = None
                row[f"{k}_graph_error"] = str(e)[:300]
        if row.get("mlcq_kernel_us") and row.get("tir_kernel_us"):
            row["kernel_speedup"] = row["tir_kernel_us"] / row["mlcq_kernel_us"]
        print(json.dumps(row), flush=True)
        results.append(row)
    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "args": vars(args),
            "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
