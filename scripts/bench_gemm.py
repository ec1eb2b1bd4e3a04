#!/usr/bin/env python3
"""Benchmark mlc_quant's GEMM kernels on one GPU (numbers for docs/performance.md).

For each shape M x N x K (default: Llama-2-7B prefill, M=2048 and (N, K) = (4096, 4096),
(11008, 4096), (4096, 11008)) it times, in one process on one card:

  lt_i8          plain cuBLASLt int8 x int8 -> int32 (64 MiB workspace): the ceiling to match
  fused          our W8A8 GEMM with the per-channel dequantize, fp16 out (auto policy: CUTLASS
                 with the dequantize fused in the epilogue, or cuBLASLt + epilogue for M <= 64)
  fused_cfgN     the same forced onto CUTLASS tile config N (0: 128x128 ping-pong, 1: stream-K,
                 2: 64x128 ping-pong, the M <= 128 config, 3: 128x128 ping-pong in 2x1 clusters;
                 see cutlass_w8a8_sm90.cu)
  lt_i8+epi      cuBLASLt int8 -> int32 + our separate dequantize kernel (the unfused fallback)
  fused_token    per-token x per-channel scales (auto policy)
  linear_q       fused plus the activation quantization kernel (fp16 x in, as a model runs it)
  linear_token   per-token dynamic: scale computation + quantization kernel + fused GEMM
  fp16           our fp16 GEMM (cuBLASLt, fp32 accumulation): the q0f16 baseline
  torch_fp16     torch.nn.functional.linear, a sanity check of the fp16 number

Each variant is captured in a CUDA graph (launch overhead out of the numbers) of 20 calls that
rotate over 3 input sets (so the weights are not served from L2); the graphs of one shape are
replayed in interleaved rounds (clock drift hits all variants alike) and timed with CUDA events;
the median per call over the rounds is reported. Needs torch with CUDA and the kernel library:
``--lib libmlc_quant_kernels.so`` (built with mlc_quant.kernels.build_shared_library) or, with
the full mlc_quant installed and nvcc present, it is built on the fly.

    python scripts/bench_gemm.py --lib .gpu/libmlc_quant_kernels.so [--sweep] [--tiles] [--json out.json]

``--silu`` times the merged gate/up GEMM of Llama-2-7B (22016 x 4096) with SiLU * up and the
down_proj's quantize, M = 128-2048: ``silu_unfused`` (the fp16 GEMM, then norm_act.cu's
mlcq_silu_mul_q) against ``silu_fused`` (mlcq_linear_silu_q: the same values from the GEMM's
epilogue, passes/fuse_silu_gemm.py), the asymmetric ``_qs`` pair (row sums written too), and
``silu_fused_cfg0`` / ``_cfg2`` / ``_cfg3`` with the tile config forced.

``--energy VARIANTS`` measures joules per call instead, with the card in the state a long prefill
puts it in (at its power limit, clock lowered), at ``--m`` (default 512, 2048): under the cap a
build's speed is its energy per token, so a config can win here and not at full clock, or lose.

``--tiles`` times every CUTLASS tile config at the shapes a merged Llama-2-7B layer runs
(q/k/v 12288 x 4096, o 4096 x 4096, gate/up 22016 x 4096, down 4096 x 11008) for M = 128-2048:
the data behind linear.cu's per-shape config choice.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

LLAMA_SHAPES = [(2048, 4096, 4096), (2048, 11008, 4096), (2048, 4096, 11008)]
SWEEP_M = [1, 16, 64, 128, 256, 512, 1024, 2048, 4096]
SYM, ASYM, TOKEN, FLOAT = 1, 2, 3, 0
AUTO, CUTLASS0, CUTLASS1, CUBLASLT, CUTLASS_CFG = 0, 2, 3, 4, 16
N_CUTLASS_CONFIGS = 4  # add configs to cutlass_w8a8_sm90.cu and raise this to compare them
MERGED_LAYER_NK = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]
TILES_M = [128, 256, 512, 1024, 2048]


def load_lib(path):
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    if path is None:
        from mlc_quant.kernels import build_shared_library  # pylint: disable=import-outside-toplevel

        path = build_shared_library("build/bench/libmlc_quant_kernels.so")
    return tvm_ffi.load_module(path)


GRAPH_FAILURES = []


def make_runner(torch, tvm_ffi, fn_sets, iters=20):
    """A zero-argument callable that runs `iters` calls (cycling through fn_sets): a replayed
    CUDA graph, or plain back-to-back launches if capture fails (noted in GRAPH_FAILURES)."""
    for fn in fn_sets:  # warm-up: plans, workspaces, lazy loading happen outside the capture
        fn()
    torch.cuda.synchronize()

    def eager():
        for i in range(iters):
            fn_sets[i % len(fn_sets)]()

    try:
        g = torch.cuda.CUDAGraph()
        with tvm_ffi.use_torch_stream(torch.cuda.graph(g)):
            eager()
        g.replay()
        torch.cuda.synchronize()
        return g.replay
    except Exception as err:  # pylint: disable=broad-except
        torch.cuda.synchronize()
        GRAPH_FAILURES.append(str(err).splitlines()[0][:160])
        return eager


def time_interleaved(torch, runners, iters=20, rounds=9):
    """Median seconds per call of each runner, timed round-robin."""
    times = {k: [] for k in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) / 1e3 / iters)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_shape(torch, tvm_ffi, lib, M, N, K, variants, rotate=3):
    res, runners = build_runners(torch, tvm_ffi, lib, M, N, K, variants, rotate)
    res.update(time_interleaved(torch, runners))
    return res


def build_runners(torch, tvm_ffi, lib, M, N, K, variants, rotate=3):
    """({kernel names, errors}, {variant: replayable runner of 20 calls}) at one shape."""
    dev = "cuda"
    gen = torch.Generator(device=dev)
    gen.manual_seed(M * 131 + N * 7 + K)
    sets = []
    for _ in range(rotate):
        x = torch.randn(M, K, device=dev, generator=gen, dtype=torch.float16)
        xq = torch.randint(-127, 128, (M, K), device=dev, generator=gen, dtype=torch.int8)
        wq = torch.randint(-127, 128, (N, K), device=dev, generator=gen, dtype=torch.int8)
        w = torch.randn(N, K, device=dev, generator=gen, dtype=torch.float16) / K**0.5
        sets.append(dict(x=x, xq=xq, wq=wq, w=w))
    s_col = torch.rand(N, device=dev, generator=gen, dtype=torch.float32) * 1e-4
    s_tok = torch.rand(M, 1, device=dev, generator=gen, dtype=torch.float32) * 1e-2 + 1e-3
    s_x = torch.tensor(0.05, device=dev, dtype=torch.float32)
    out_h = torch.empty(M, N, device=dev, dtype=torch.float16)
    out_i = torch.empty(M, N, device=dev, dtype=torch.int32)
    lin, i8 = lib["mlcq_linear"], lib["mlcq_int8_gemm_i32"]
    none8 = (None,) * 8
    eps = torch.tensor(1e-8, device=dev, dtype=torch.float32)
    if any(v.startswith("silu") for v in variants):
        act_s, act_z = torch.tensor(0.02, device=dev), torch.tensor(-3, device=dev, dtype=torch.int8)
        q = torch.empty(M, N // 2, device=dev, dtype=torch.int8)
        rs_x = torch.randint(-1000, 1000, (M, 1), device=dev, generator=gen, dtype=torch.int32)
        rs_q = torch.empty(M, 1, device=dev, dtype=torch.int32)
        zw = torch.randint(-8, 8, (N,), device=dev, generator=gen, dtype=torch.int32)
        corr = torch.randint(-999, 999, (N,), device=dev, generator=gen, dtype=torch.int32)
        silu_q, silu_qs, lsq = lib["mlcq_silu_mul_q"], lib["mlcq_silu_mul_qs"], lib["mlcq_linear_silu_q"]

    def mk(name, st):
        if name == "silu_unfused":
            return lambda: (lin(SYM, AUTO, st["xq"], st["wq"], False, *(None,) * 4, s_col, None, None, None, None,
                                out_h), silu_q(out_h, act_s, act_z, q))
        if name.startswith("silu_fused") and not name.startswith("silu_fused_qs"):
            backend = AUTO if name == "silu_fused" else CUTLASS_CFG + int(name[len("silu_fused_cfg"):])
            return lambda: lsq(SYM, backend, st["xq"], st["wq"], None, None, s_col, None, None, None, act_s, act_z,
                               q, None)
        if name == "silu_unfused_qs":
            return lambda: (lin(ASYM, AUTO, st["xq"], st["wq"], False, *(None,) * 4, s_col, zw, corr, rs_x, None,
                                out_h), silu_qs(out_h, act_s, act_z, q, rs_q))
        if name == "silu_fused_qs":
            return lambda: lsq(ASYM, AUTO, st["xq"], st["wq"], None, None, s_col, zw, corr, rs_x, act_s, act_z, q,
                               rs_q)
        if name == "lt_i8":
            return lambda: i8(st["xq"], st["wq"], out_i)
        if name == "fp16":
            return lambda: lin(FLOAT, AUTO, st["x"], st["w"], False, *none8, None, out_h)
        if name == "torch_fp16":
            return lambda: torch.matmul(st["x"], st["w"].t(), out=out_h)
        if name == "fused_token":
            return lambda: lin(TOKEN, AUTO, st["xq"], st["wq"], False, None, None, s_tok, None, s_col, None, None,
                               None, None, out_h)
        if name == "linear_token":
            return lambda: lin(TOKEN, AUTO, st["x"], st["wq"], False, None, None, None, eps, s_col, None, None,
                               None, None, out_h)
        if name == "linear_q":
            return lambda: lin(SYM, AUTO, st["x"], st["wq"], False, s_x, None, None, None, s_col, None, None, None,
                               None, out_h)
        if name.startswith("fused_cfg"):
            backend = CUTLASS_CFG + int(name[len("fused_cfg"):])
        else:
            backend = {"fused": AUTO, "lt_i8+epi": CUBLASLT}[name]
        return lambda: lin(SYM, backend, st["xq"], st["wq"], False, None, None, None, None, s_col, None, None, None,
                           None, out_h)

    res, runners = {}, {}
    for name in variants:
        try:
            runners[name] = make_runner(torch, tvm_ffi, [mk(name, st) for st in sets])
            if name == "fused":
                res["fused_kernel"] = str(lib["mlcq_last_kernel"]())
        except Exception as err:  # pylint: disable=broad-except
            res[name] = None
            res[f"{name}_error"] = str(err).splitlines()[0][:200]
        if name.startswith("silu"):
            res[f"{name}_kernel"] = str(lib["mlcq_last_kernel"]())
    return res, runners


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lib", help="prebuilt libmlc_quant_kernels.so")
    p.add_argument("--sweep", action="store_true", help="also sweep M for the tile-config policy")
    p.add_argument("--tiles", action="store_true",
                   help="time every CUTLASS tile config at the merged Llama-2-7B layer shapes")
    p.add_argument("--tiles-only", action="store_true", help="--tiles, and skip the default shapes")
    p.add_argument("--silu", action="store_true",
                   help="only the gate/up GEMM with SiLU * up + quantize, fused and unfused")
    p.add_argument("--energy", help="comma-separated variants (e.g. fused_cfg0,fused_cfg3,fp16): energy per call "
                   "at the card's sustained (power-capped) state, merged-layer shapes")
    p.add_argument("--m", type=lambda v: [int(x) for x in v.split(",")],
                   help="comma-separated M values for --tiles / --energy (default 128-2048 / 512,2048)")
    p.add_argument("--json", help="write all numbers here")
    args = p.parse_args(argv)

    import torch  # pylint: disable=import-outside-toplevel
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    if not torch.cuda.is_available():
        sys.exit("bench_gemm.py needs a CUDA GPU")
    lib = load_lib(args.lib)
    card = torch.cuda.get_device_name()
    print(f"card: {card}  (torch {torch.__version__}, CUDA {torch.version.cuda})", flush=True)
    probes = {f"int8->{k}{' alpha-vector' if v else ''}": int(lib["mlcq_lt_probe_int8"](2048, 4096, 4096, code, v, 0))
              for k, code in (("int8", 1), ("fp16", 2), ("bf16", 3)) for v in (False, True)}
    print("cuBLASLt heuristic algos for int8 GEMMs with an fp32 scale:", probes, flush=True)

    main_variants = ["lt_i8", "fused", "fused_cfg0", "fused_cfg1", "lt_i8+epi", "fused_token",
                     "linear_q", "linear_token", "fp16", "torch_fp16"]
    results = {"card": card, "cublaslt_probes": probes, "shapes": []}
    if args.energy:
        results["energy"] = bench_energy(torch, tvm_ffi, lib, args.energy.split(","), args.m or [512, 2048])
        return finish(results, args.json)
    if args.silu:
        results["silu"] = bench_silu(torch, tvm_ffi, lib)
        return finish(results, args.json)
    if args.tiles or args.tiles_only:
        results["tiles"] = bench_tiles(torch, tvm_ffi, lib, args.m or TILES_M)
    if args.tiles_only:
        return finish(results, args.json)
    print(f"\n{'M':>5} {'N':>6} {'K':>6} | " + " | ".join(f"{v:>11}" for v in main_variants))
    rows = []
    for M, N, K in LLAMA_SHAPES:
        r = bench_shape(torch, tvm_ffi, lib, M, N, K, main_variants)
        r.update(M=M, N=N, K=K)
        results["shapes"].append(r)
        rows.append(r)
        cells = [f"{r[v] * 1e6:9.1f}us" if r.get(v) else f"{'n/a':>11}" for v in main_variants]
        print(f"{M:>5} {N:>6} {K:>6} | " + " | ".join(cells), flush=True)
    print("\nTOP/s and targets (fused vs lt_i8 >= 90%, fused vs fp16 >= 1.6x):")
    for r in rows:
        ops = 2.0 * r["M"] * r["N"] * r["K"]
        f, li, h = r.get("fused"), r.get("lt_i8"), r.get("fp16")
        line = f"  {r['M']}x{r['N']}x{r['K']}: fused {ops / f / 1e12:7.1f} TOP/s ({r.get('fused_kernel')})" if f else "  fused n/a"
        if f and li:
            line += f", lt_i8 {ops / li / 1e12:7.1f} TOP/s, fused/lt_i8 = {li / f * 100:5.1f}%"
        if f and h:
            line += f", fp16 {ops / h / 1e12:6.1f} TF/s, fp16/fused time = {h / f:4.2f}x"
        print(line, flush=True)
    if args.sweep:
        sweep_variants = ["lt_i8", "fused", "fused_cfg0", "fused_cfg1", "lt_i8+epi", "fp16"]
        print(f"\nM sweep (us): {'M':>5} {'N':>6} {'K':>6} | " + " | ".join(f"{v:>10}" for v in sweep_variants))
        results["sweep"] = []
        for N, K in [(4096, 4096), (11008, 4096), (4096, 11008)]:
            for M in SWEEP_M:
                r = bench_shape(torch, tvm_ffi, lib, M, N, K, sweep_variants)
                r.update(M=M, N=N, K=K)
                results["sweep"].append(r)
                cells = [f"{r[v] * 1e6:10.1f}" if r.get(v) else f"{'n/a':>10}" for v in sweep_variants]
                print(f"             {M:>5} {N:>6} {K:>6} | " + " | ".join(cells) + f"  [{r.get('fused_kernel')}]",
                      flush=True)
    return finish(results, args.json)


def bench_tiles(torch, tvm_ffi, lib, ms_list):
    """Every CUTLASS config at the merged-layer shapes; per M, the layer's summed GEMM time for
    the auto policy, for config 0 alone, for the best config per shape, and for fp16."""
    variants = ["fused"] + [f"fused_cfg{c}" for c in range(N_CUTLASS_CONFIGS)] + ["fp16"]
    print(f"\nCUTLASS tile configs (us): {'M':>5} {'N':>6} {'K':>6} | "
          + " | ".join(f"{v:>10}" for v in variants), flush=True)
    rows, per_m = [], {}
    for M in ms_list:
        layer = dict.fromkeys(["fused", "fused_cfg0", "best", "fp16"], 0.0)
        for N, K in MERGED_LAYER_NK:
            r = bench_shape(torch, tvm_ffi, lib, M, N, K, variants)
            r.update(M=M, N=N, K=K)
            cfgs = {v: r[v] for v in variants if v.startswith("fused_cfg") and r.get(v)}
            r["best_cfg"] = min(cfgs, key=cfgs.get) if cfgs else None
            rows.append(r)
            for k in ("fused", "fused_cfg0", "fp16"):
                layer[k] += r.get(k) or float("nan")
            layer["best"] += cfgs[r["best_cfg"]] if cfgs else float("nan")
            cells = [f"{r[v] * 1e6:10.1f}" if r.get(v) else f"{'n/a':>10}" for v in variants]
            print(f"                           {M:>5} {N:>6} {K:>6} | " + " | ".join(cells)
                  + f"  [auto: {r.get('fused_kernel')}; best {r['best_cfg']}]", flush=True)
        per_m[M] = layer
        print(f"  M={M} layer GEMMs: auto {layer['fused'] * 1e6:.1f} us, cfg0 {layer['fused_cfg0'] * 1e6:.1f}, "
              f"best per shape {layer['best'] * 1e6:.1f}, fp16 {layer['fp16'] * 1e6:.1f}; "
              f"fp16/auto {layer['fp16'] / layer['fused']:.2f}x, fp16/best {layer['fp16'] / layer['best']:.2f}x",
              flush=True)
    return {"shapes": rows, "layer_sums": per_m}


def bench_silu(torch, tvm_ffi, lib):
    """The gate/up GEMM + SiLU * up + quantize, unfused and fused, at Llama-2-7B's shape."""
    variants = ["silu_unfused", "silu_fused", "silu_unfused_qs", "silu_fused_qs", "silu_fused_cfg0", "silu_fused_cfg2",
                "silu_fused_cfg3", "fp16"]
    print(f"\ngate/up + SiLU * up + quantize (us): {'M':>5} | " + " | ".join(f"{v:>15}" for v in variants), flush=True)
    rows = []
    for M in TILES_M:
        r = bench_shape(torch, tvm_ffi, lib, M, 22016, 4096, variants)
        r.update(M=M, N=22016, K=4096)
        rows.append(r)
        cells = [f"{r[v] * 1e6:15.1f}" if r.get(v) else f"{'n/a':>15}" for v in variants]
        print(f"                                     {M:>5} | " + " | ".join(cells)
              + f"  unfused/fused {r['silu_unfused'] / r['silu_fused']:.3f}x, "
              f"_qs {r['silu_unfused_qs'] / r['silu_fused_qs']:.3f}x [{r.get('silu_fused_kernel')}]", flush=True)
    return rows


def bench_energy(torch, tvm_ffi, lib, variants, ms_list, seconds=1.5, warm_s=0.5, rounds=2):
    """Energy per call at the card's sustained state, where a long prefill runs: each variant's
    graph replayed back to back (no host sync in between) for ``seconds``, after ``warm_s`` of the
    same, with the NVML energy counter read around it and the SM clock / throttle reasons polled
    by a thread. Round-robin over the variants, ``rounds`` times; medians."""
    import threading  # pylint: disable=import-outside-toplevel
    import time  # pylint: disable=import-outside-toplevel

    from mlc_quant.nvml import SW_POWER_CAP, card_of_torch_device  # pylint: disable=import-outside-toplevel

    card = card_of_torch_device(torch)
    if card is None:
        sys.exit("--energy needs NVML (libnvidia-ml.so.1) with an energy counter")
    print(f"\nenergy per call at the sustained state (power limit {card.power_limit_w():.0f} W): "
          "mJ, us per call, W, median SM MHz, power-capped share", flush=True)

    def replay(run, n):
        for _ in range(n):
            run()
        torch.cuda.synchronize()

    def measure(run, per_replay_s):
        replay(run, max(1, int(warm_s / per_replay_s)))
        n = max(1, int(seconds / per_replay_s))
        polled, stop = [], threading.Event()

        def poll():
            while not stop.is_set():
                polled.append(card.read())
                time.sleep(0.02)

        th = threading.Thread(target=poll, daemon=True)
        e0, t0 = card.energy_mj(), time.perf_counter()
        th.start()
        replay(run, n)
        dt, de = time.perf_counter() - t0, card.energy_mj() - e0
        stop.set()
        th.join()
        calls = n * 20
        mhz = statistics.median(p.sm_mhz for p in polled) if polled else float("nan")
        capped = sum(bool(p.reasons & SW_POWER_CAP) for p in polled) / max(len(polled), 1)
        return de / calls, dt / calls * 1e6, de / 1e3 / dt, mhz, capped

    rows = []
    for M in ms_list:
        for N, K in MERGED_LAYER_NK:
            names = [v for v in variants if not v.startswith("silu") or N == 22016]  # SiLU: gate/up only
            kernels, graphs = build_runners(torch, tvm_ffi, lib, M, N, K, names)
            burst = time_interleaved(torch, graphs)  # the same graphs at full clock, for comparison
            per = {name: [] for name in graphs}
            for _ in range(rounds):
                for name, run in graphs.items():
                    per[name].append(measure(run, burst[name] * 20))
            row = {"M": M, "N": N, "K": K}
            cells = []
            for name, v in per.items():
                mj, us, w, mhz, cap = (statistics.median(x[i] for x in v) for i in range(5))
                row[name] = {"mJ": round(mj, 4), "us": round(us, 2), "W": round(w, 1), "sm_mhz": mhz,
                             "capped": round(cap, 2), "burst_us": round(burst[name] * 1e6, 2),
                             "kernel": kernels.get(f"{name}_kernel")}
                cells.append(f"{name} {mj:6.3f} mJ {us:6.1f} us {w:4.0f} W {mhz:4.0f} MHz {cap:.2f}")
            rows.append(row)
            print(f"  {M:>5} {N:>6} {K:>6} | " + " | ".join(cells), flush=True)
    return rows


def finish(results, json_path):
    if GRAPH_FAILURES:
        print(f"\nCUDA graph capture failed {len(GRAPH_FAILURES)}x (timed eagerly): {GRAPH_FAILURES[0]}")
    results["graph_failures"] = GRAPH_FAILURES
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
