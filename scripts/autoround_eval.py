#!/usr/bin/env python3
"""Perplexity of SmolLM2 with W4 weights: float, round-to-nearest and AutoRound, same windows.

    python scripts/autoround_eval.py --ctx 512 --max-windows 16 --preset fast \
        --schemes q0f32,q4f16_rtn,q4f16_autoround --out docs/autoround.json

Each configuration goes through ``mlc_quant.pipeline.quantize_module`` exactly as a build does
(W4: no smoothing; AutoRound through ``make_autoround_quantizer``), is compiled for the CPU with
``pipeline.build`` (``schedule_for_cpu``) and evaluated with ``Engine.perplexity`` on the
first N windows of the cleaned Britannica article. AutoRound checkpoints are kept in
``--work-dir``, so an interrupted run resumes where it stopped (and a rerun is cheap).
"""
import argparse
import dataclasses
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mlc_quant import pipeline  # noqa: E402
from mlc_quant.autoround import get_preset, make_autoround_quantizer  # noqa: E402
from mlc_quant.datasets import britannica_text, calibration_samples  # noqa: E402
from mlc_quant.schemes import get_scheme  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=16, help="evaluate the first N windows (0 = all)")
    p.add_argument("--schemes", default="q0f32,q4f16_rtn,q4f16_autoround")
    p.add_argument("--dataset", default="shakespeare", help="AutoRound calibration text")
    p.add_argument("--preset", default="fast", choices=["fast", "paper"])
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--nsamples", type=int, default=None)
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--work-dir", default="out/autoround-work", help="AutoRound per-block checkpoints")
    p.add_argument("--tag", default="", help="suffix of the result keys (e.g. a settings variant)")
    p.add_argument("--out", default="docs/autoround.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    from mlc_quant.model.llama import export_model
    from mlc_quant.model.loader import load_config, load_params_dict, resolve_model
    from mlc_quant.model.tokenizer import load_tokenizer
    from mlc_quant.runtime import Engine

    overrides = {k: v for k, v in {"iters": args.iters, "nsamples": args.nsamples, "seqlen": args.seqlen,
                                   "batch_size": args.batch_size, "lr": args.lr}.items() if v is not None}
    preset = get_preset(args.preset, **overrides)
    path = resolve_model(args.model)
    config = load_config(path)
    tokenizer = load_tokenizer(path)
    params = load_params_dict(path, config, "float32")
    tokens = tokenizer.encode(britannica_text())
    if args.max_windows:
        tokens = tokens[: args.ctx * args.max_windows]
    mod, _ = export_model(config, "float32", "llvm")
    results = json.load(open(args.out)) if os.path.exists(args.out) else {}
    runs = results.setdefault("runs", {})
    for name in args.schemes.split(","):
        scheme = get_scheme(name.split(":")[0])
        if name.endswith(":h4"):  # the LM head in 4 bits like every other linear
            scheme = dataclasses.replace(scheme, head_bits=4)
        key = name + (f" {args.tag}" if args.tag else "")
        t0 = time.time()
        quantizer, extra = pipeline.rtn_weights, {}
        if getattr(scheme, "rounding", "rtn") == "autoround":
            samples = calibration_samples(args.dataset, tokenizer, config.vocab_size, preset.nsamples,
                                          preset.seqlen, seed=preset.seed)
            quantizer = make_autoround_quantizer(config, samples, preset, args.work_dir, keep_checkpoints=True)
            extra = {"preset": preset.name, "iters": preset.iters, "nsamples": preset.nsamples,
                     "seqlen": preset.seqlen, "batch_size": preset.batch_size, "lr": preset.learning_rate,
                     "dataset": args.dataset}
        res = pipeline.quantize_module(mod, params, scheme, calibrate=None, smooth=False,
                                       quantize_weights=quantizer)
        quant_s = time.time() - t0
        t0 = time.time()
        exe = pipeline.build(res.mod, "llvm")  # schedule_for_cpu on the host CPU
        compile_s = time.time() - t0
        engine = Engine(exe, res.params, max_seq_len=args.ctx, vocab_size=config.vocab_size)
        t0 = time.time()
        ppl = engine.perplexity(tokens, args.ctx)
        eval_s = time.time() - t0
        report = getattr(quantizer, "report", None) or {}
        resumed = sum(1 for b in report.get("blocks", []) if b.get("resumed"))
        runs[key] = {"perplexity": ppl, "scheme": scheme.name, "head_bits": getattr(scheme, "head_bits", None),
                     "quantize_s": round(quant_s, 1),
                     "compile_s": round(compile_s, 1), "eval_s": round(eval_s, 1), **extra}
        if report:
            runs[key]["autoround_blocks"] = [
                {k: b.get(k) for k in ("block", "mse_rtn", "mse_autoround", "best_iter", "tune_s", "resumed")}
                for b in report["blocks"]]
            runs[key]["blocks_resumed"] = resumed
            runs[key]["autoround_tune_s_total"] = round(sum(b.get("tune_s") or 0 for b in report["blocks"]), 1)
        print(f"{key:28s} perplexity {ppl:.4f}  (quantize {quant_s:.0f} s, compile {compile_s:.0f} s, "
              f"eval {eval_s:.0f} s{f', {resumed} blocks resumed' if resumed else ''})", flush=True)
        results["setup"] = {"model": args.model, "ctx": args.ctx, "windows": len(tokens) // args.ctx,
                            "tokens": len(tokens), "command": "python " + " ".join(sys.argv)}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        del engine, exe, res
    base = runs.get("q0f32", {}).get("perplexity")
    print("| configuration | perplexity | vs q0f32 |\n|---|---|---|")
    for key, r in runs.items():
        rel = f"{(r['perplexity'] / base - 1) * 100:+.2f}%" if base else ""
        print(f"| {key} | {r['perplexity']:.3f} | {rel} |")


if __name__ == "__main__":
    main()
