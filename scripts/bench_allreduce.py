"""All-reduce latency and bandwidth on N GPUs: TVM Disco + mlc_quant's NCCL plugin (what a
tensor-parallel build runs) vs torch.distributed's NCCL (one process per GPU), same host.

    python scripts/bench_allreduce.py --plugin DIR/libmlcq_disco_nccl.so --json out.json

Sizes: what a Llama-2-7B layer all-reduces at 2 shards (fp16 [n, 4096] after o/down: n = 1 for
decode, 512/2048 for prefill) and smq_q8i8f16_3's per-token absmax (fp32 [n, 1]). Each number is
the median over 5 rounds of (``iters`` all-reduces enqueued back to back, then a synchronize of
every GPU) / ``iters``. busbw = 2 (N-1)/N * bytes / time (NCCL's convention).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = [("fp16[1,4096]", (1, 4096), "float16"), ("fp32[1,1]", (1, 1), "float32"),
         ("fp16[512,4096]", (512, 4096), "float16"), ("fp16[2048,4096]", (2048, 4096), "float16"),
         ("fp32[2048,1]", (2048, 1), "float32")]


def _row(name, shape, dtype, n, t):
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return {"tensor": name, "bytes": nbytes, "us": round(t * 1e6, 2),
            "busbw_GBs": round(2 * (n - 1) / n * nbytes / t / 1e9, 2)}


def disco_allreduce(n: int, session: str, plugin: str, iters: int) -> list:
    from mlc_quant import disco  # pylint: disable=import-outside-toplevel

    disco.load_nccl_plugin(plugin)
    dm = disco.disco_module()
    if session == "thread":
        sess = dm.ThreadedSession(n)
    else:
        os.environ[disco.ENV_CUDA] = "1"
        os.environ[disco.ENV_PLUGIN] = plugin
        sess = dm.ProcessSession(n, entrypoint="mlc_quant.disco_worker")
    sess.init_ccl("nccl", *range(n))
    out = []
    try:
        for name, shape, dtype in SIZES:
            x, y = sess.empty(shape, dtype), sess.empty(shape, dtype)
            for _ in range(10):
                sess.allreduce(x, y, "sum")
            sess._sync_all()  # pylint: disable=protected-access
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(iters):
                    sess.allreduce(x, y, "sum")
                sess._sync_all()  # pylint: disable=protected-access
                times.append((time.perf_counter() - t0) / iters)
            out.append(_row(name, shape, dtype, n, statistics.median(times)))
    finally:
        sess.shutdown()
    return out


def _torch_worker(rank, n, iters, port, q):
    import torch  # pylint: disable=import-outside-toplevel
    import torch.distributed as dist  # pylint: disable=import-outside-toplevel

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n)
    rows = []
    for name, shape, dtype in SIZES:
        x = torch.ones(shape, dtype=getattr(torch, dtype), device="cuda")
        for _ in range(10):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        dist.barrier()
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                dist.all_reduce(x)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / iters)
        rows.append(_row(name, shape, dtype, n, statistics.median(times)))
    if rank == 0:
        q.put(rows)
    dist.destroy_process_group()


def torch_allreduce(n: int, iters: int) -> list:
    import torch.multiprocessing as mp  # pylint: disable=import-outside-toplevel

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_torch_worker, args=(r, n, iters, port, q)) for r in range(n)]
    for p in procs:
        p.start()
    rows = q.get(timeout=300)
    for p in procs:
        p.join(60)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--plugin", required=True, help="libmlcq_disco_nccl.so (a tensor-parallel build has one)")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--modes", default="disco-thread,disco-process,torch")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    res = {}
    for mode in a.modes.split(","):
        t0 = time.time()
        try:
            if mode.startswith("disco-"):
                res[mode] = disco_allreduce(a.gpus, mode.split("-", 1)[1], a.plugin, a.iters)
            elif mode == "torch":
                res[mode] = torch_allreduce(a.gpus, a.iters)
            else:
                raise ValueError(f"unknown mode {mode}")
        except Exception as err:  # pylint: disable=broad-except
            res[mode] = {"error": repr(err)[:1000]}
        print(f"[allreduce] {mode} ({time.time() - t0:.1f} s): {json.dumps(res[mode])}", flush=True)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
