#!/usr/bin/env python3
"""Perplexity of SmolLM2 per scheme, smoothed and naive, on the cleaned Britannica article.

    python scripts/accuracy.py --ctx 512 --max-windows 32 --out docs/accuracy.json

Builds every configuration into a temporary directory with the same calibration, evaluates
the same windows for all of them, and prints a markdown table (also written next to --out).
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mlc_quant.build import BuildOptions, build_model  # noqa: E402
from mlc_quant.datasets import britannica_text  # noqa: E402
from mlc_quant.runner import load_built  # noqa: E402

CONFIGS = [("q0f32", True)] + [(s, smooth) for s in ("smq_q8i8f16_0", "smq_q8i8f16_1", "smq_q8i8f16_2",
                                                     "smq_q8i8f16_3") for smooth in (False, True)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=32, help="evaluate the first N windows (0 = all)")
    p.add_argument("--dataset", default="shakespeare")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--schemes", default="", help="comma-separated subset of the configs' schemes")
    p.add_argument("--out", default="docs/accuracy.json")
    p.add_argument("--keep-float", default="", help="e.g. lm_head: linears kept float (suffixes the row keys)")
    p.add_argument("--skip-existing", action="store_true", help="keep rows already in --out (resume a sweep)")
    args = p.parse_args()
    configs = [c for c in CONFIGS if not args.schemes or c[0] in args.schemes.split(",")]
    results = json.load(open(args.out)) if os.path.exists(args.out) else {}
    results.setdefault("runs", {})
    tokens = None
    with tempfile.TemporaryDirectory() as tmp:
        for scheme, smooth in configs:
            key = f"{scheme}{'' if smooth or scheme.startswith('q0') else ' (naive)'}"
            keep = tuple(x for x in args.keep_float.split(",") if x) if not scheme.startswith("q0") else ()
            key += f" (keep float: {','.join(keep)})" if keep else ""
            if args.skip_existing and key in results["runs"]:
                continue
            out = os.path.join(tmp, key.replace(" ", "_"))
            t0 = time.time()
            build_model(BuildOptions(model=args.model, quantization=scheme, output=out, alpha=args.alpha,
                                     smooth=smooth, max_seq_len=args.ctx, dataset=args.dataset,
                                     calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                                     keep_float=keep))
            t_build = time.time() - t0
            engine, tokenizer, _ = load_built(out, max_seq_len=args.ctx)
            if tokens is None:
                tokens = tokenizer.encode(britannica_text())
                if args.max_windows:
                    tokens = tokens[: args.ctx * args.max_windows]
            t0 = time.time()
            ppl = engine.perplexity(tokens, args.ctx)
            results["runs"][key] = {"perplexity": ppl, "scheme": scheme, "smooth": smooth, "keep_float": list(keep),
                                    "build_s": round(t_build, 1), "eval_s": round(time.time() - t0, 1)}
            print(f"{key:28s} perplexity {ppl:.4f}  (build {t_build:.0f} s)", flush=True)
            del engine
            with open(args.out, "w") as f:  # after every run: a long sweep loses nothing
                json.dump(results, f, indent=2)
    results["setup"] = {"model": args.model, "ctx": args.ctx, "windows": len(tokens) // args.ctx,
                        "tokens": len(tokens), "calibration": f"{args.dataset}, {args.calib_samples} x "
                        f"{args.calib_seq_len} tokens", "alpha": args.alpha,
                        "command": "python " + " ".join(sys.argv)}
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    base = results["runs"].get("q0f32", {}).get("perplexity")
    lines = ["| configuration | perplexity | vs q0f32 |", "|---|---|---|"]
    for key, r in results["runs"].items():
        rel = f"{(r['perplexity'] / base - 1) * 100:+.2f}%" if base else ""
        lines.append(f"| {key} | {r['perplexity']:.3f} | {rel} |")
    print("\n".join(lines))
    with open(os.path.splitext(args.out)[0] + ".table.md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
