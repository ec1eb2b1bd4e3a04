#!/usr/bin/env python3
"""Perplexity of SmolLM2 with and without SpinQuant rotations, on the cleaned Britannica article.

    python scripts/rotation_accuracy.py --ctx 512 --max-windows 16 --out docs/rotation_accuracy.json

Every configuration is built with ``mlc_quant.build.build_model`` (``--rotation``) into a
temporary directory and evaluated on the same first N windows. Per-token schemes without
smoothing need no calibration. Prints a markdown table (also written next to --out).
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

# (scheme, rotation, rotation kind, smooth)
CONFIGS = [
    ("q0f32", "none", "hadamard", False),
    ("q4i4f16_pt", "none", "hadamard", False),
    ("q4i4f16_pt", "r1r2r4", "hadamard", False),
    ("smq_q8i8f16_3", "r1r2r4", "hadamard", False),
    ("smq_q8i8f16_3", "none", "hadamard", False),
    ("q4i4f16_pt", "r1r2", "hadamard", False),
    ("q4i8f16_pt", "none", "hadamard", False),
    ("q4i8f16_pt", "r1r2r4", "hadamard", False),
    ("q4i4f16_pt", "r1r2r4", "random-orthogonal", False),
    ("q0f32", "r1r2r4", "hadamard", False),
    ("smq_q8i8f16_3", "r1r2r4", "hadamard", True),
    ("smq_q8i8f16_3", "none", "hadamard", True),
]


def key_of(scheme, rot, kind, smooth):
    key = f"{scheme} rot={rot}"
    if rot != "none" and kind != "hadamard":
        key += f" ({kind})"
    return key + (" smooth" if smooth else "")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=16, help="evaluate the first N windows (0 = all)")
    p.add_argument("--only", default="", help="comma-separated config keys (default: all)")
    p.add_argument("--out", default="docs/rotation_accuracy.json")
    p.add_argument("--keep-float", default="", help="e.g. lm_head: linears kept float (suffixes the row keys)")
    p.add_argument("--weight-clip", default="absmax", choices=["absmax", "mse"],
                   help="RTN weight range of quantized configs (mse suffixes the row keys; build --weight-clip)")
    p.add_argument("--dataset", default="shakespeare", help="calibration text of smoothed configs")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seq-len", type=int, default=256)
    args = p.parse_args()
    configs = [c for c in CONFIGS if not args.only or key_of(*c) in args.only.split(",")]
    results = json.load(open(args.out)) if os.path.exists(args.out) else {}
    results.setdefault("runs", {})
    tokens = None
    with tempfile.TemporaryDirectory() as tmp:
        for scheme, rot, kind, smooth in configs:
            key = key_of(scheme, rot, kind, smooth)
            keep = tuple(x for x in args.keep_float.split(",") if x) if not scheme.startswith("q0") else ()
            key += f" keep-float={','.join(keep)}" if keep else ""
            clip = args.weight_clip if not scheme.startswith("q0") else "absmax"
            key += f" clip={clip}" if clip != "absmax" else ""
            out = os.path.join(tmp, key.replace(" ", "_").replace("=", "-"))
            t0 = time.time()
            build_model(BuildOptions(model=args.model, quantization=scheme, output=out, smooth=smooth,
                                     max_seq_len=args.ctx, rotation=rot, rotation_kind=kind,
                                     dataset=args.dataset, calib_samples=args.calib_samples,
                                     calib_seq_len=args.calib_seq_len, keep_float=keep, weight_clip=clip))
            t_build = time.time() - t0
            engine, tokenizer, _ = load_built(out, max_seq_len=args.ctx)
            if tokens is None:
                tokens = tokenizer.encode(britannica_text())
                if args.max_windows:
                    tokens = tokens[: args.ctx * args.max_windows]
            t0 = time.time()
            ppl = engine.perplexity(tokens, args.ctx)
            results["runs"][key] = {"perplexity": ppl, "scheme": scheme, "rotation": rot, "kind": kind,
                                    "smooth": smooth, "keep_float": list(keep), "weight_clip": clip,
                                    "build_s": round(t_build, 1),
                                    "eval_s": round(time.time() - t0, 1),
                                    "command": "python " + " ".join(sys.argv)}
            print(f"{key:40s} perplexity {ppl:.4f}  (build {t_build:.0f} s, eval {time.time() - t0:.0f} s)",
                  flush=True)
            del engine
            with open(args.out, "w") as f:  # keep partial results
                json.dump(results, f, indent=2)
    results["setup"] = {"model": args.model, "ctx": args.ctx, "windows": len(tokens) // args.ctx,
                        "tokens": len(tokens), "command": "python " + " ".join(sys.argv)}
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    base = results["runs"].get(key_of("q0f32", "none", "hadamard", False), {}).get("perplexity")
    lines = ["| configuration | perplexity | vs q0f32 |", "|---|---|---|"]
    for key, r in results["runs"].items():
        rel = f"{(r['perplexity'] / base - 1) * 100:+.2f}%" if base else ""
        lines.append(f"| {key} | {r['perplexity']:.3f} | {rel} |")
    print("\n".join(lines))
    with open(os.path.splitext(args.out)[0] + ".table.md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
