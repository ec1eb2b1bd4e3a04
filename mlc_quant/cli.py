"""``mlc-quant`` command line: build, generate, ppl, eval, bench."""
from __future__ import annotations

import argparse
import logging
import sys
import time



def _scheme_names():
    """Scheme names for --quantization; None where only TVM's runtime is installed (a GPU machine
    runs generate/ppl/bench there and cannot build, so mlc_quant.schemes and tvm.relax are absent)."""
    try:
        from mlc_quant.schemes import SCHEMES  # pylint: disable=import-outside-toplevel

        return list(SCHEMES)
    except Exception:  # pylint: disable=broad-except
        return None


def add_build_args(p: argparse.ArgumentParser) -> None:
    schemes = _scheme_names()
    p.add_argument("--model", default="smollm2",
                   help="bundled name (smollm2), a .gguf file, or a Hugging Face folder (config.json + safetensors)")
    p.add_argument("--quantization", default="smq_q8i8f16_2", choices=schemes, metavar="SCHEME",
                   help=f"one of: {', '.join(schemes or ['(needs the full TVM)'])} (default: smq_q8i8f16_2)")
    p.add_argument("--alpha", default="0.5",
                   help="SmoothQuant migration strength: a number in [0, 1] (default 0.5), 'search' (per smoothing "
                        "group, grid minimising the group's output MSE; docs/accuracy.md), or an "
                        "mlc-quant-config.json (or build dir) whose per-group alphas to reuse")
    p.add_argument("--alpha-grid", default="0.3,0.4,0.5,0.6,0.7,0.8,0.9", help="alphas tried by --alpha search")
    p.add_argument("--alpha-objective", default="block", choices=["block", "group"],
                   help="what --alpha search minimises: block (decoder block output MSE, default; group output "
                        "where it cannot) or group (output MSE of the group's linears)")
    p.add_argument("--no-smooth", dest="smooth", action="store_false", help="naive W8A8 (no smoothing)")
    p.add_argument("--tensor-parallel-shards", type=int, default=1, metavar="N",
                   help="Megatron tensor parallelism over N GPUs (q/k/v/gate/up by columns, o/down by rows, "
                        "all-reduce through TVM Disco's NCCL; needs --target cuda; default 1)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16"],
                   help="compute dtype of the built model (default auto: float16 on CUDA, float32 on the CPU)")
    p.add_argument("--keep-float", default="",
                   help="comma-separated weights whose linears stay float (fnmatch patterns of IR param names; "
                        "'lm_head' = the LM head, tied or not), e.g. --keep-float lm_head (default: quantize all)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="longest sequence the built model serves")
    p.add_argument("--dataset", default="dummy",
                   help="calibration data: dummy (seeded random ids), shakespeare, or a local .txt/.json/.jsonl/.parquet path")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--calib-decode-steps", type=int, default=4,
                   help="of each sequence, the last N tokens run through decode, the rest through prefill")
    p.add_argument("--target", default="llvm", help="llvm (default), cuda (sm_90) or cuda:sm_XX")
    p.add_argument("--calibration", default="auto", choices=["auto", "whole", "streamed"],
                   help="whole: load the float model and calibrate it at once; streamed: one decoder block at a "
                        "time (peak memory one block + activations; docs/design.md); auto (default): whole unless "
                        "the float model would not fit the memory budget")
    p.add_argument("--calibration-budget-mb", type=float, default=0.0,
                   help="memory budget of --calibration auto (default 0: available memory, capped by ulimit -v)")
    p.add_argument("--calibration-spill-mb", type=float, default=1024.0,
                   help="--calibration streamed keeps block activations in RAM up to this size, else in a file")
    p.add_argument("--merge-linears", action=argparse.BooleanOptionalAction, default=None,
                   help="one wide linear for q/k/v and for gate/up (default: on for CUDA, off on the CPU)")
    p.add_argument("--output", "-o", default=None, help="output directory (default: out/<model>-<scheme>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rotation", default="none", choices=["none", "r1r2", "r1r2r4", "all"],
                   help="SpinQuant rotations before quantization: R1+R2 fused into weights, R4 online on the "
                        "down_proj input, all = + R3 on q/k after RoPE (docs/rotation.md; default none)")
    p.add_argument("--rotation-kind", default="hadamard", choices=["hadamard", "random-orthogonal"],
                   help="matrices of the fused R1/R2 (online R3/R4 are always Hadamard; default hadamard)")
    p.add_argument("--weight-rounding", default="rtn", choices=["rtn", "autoround"],
                   help="how weights are rounded: rtn (round to nearest) or autoround (learned per block, "
                        "SignSGD; q4f16_autoround implies it; docs/accuracy.md)")
    p.add_argument("--weight-clip", default="absmax", choices=["absmax", "mse"],
                   help="RTN weight range: absmax (default) or mse (per output channel, the clip ratio in "
                        "1.00..0.50 of least squared weight error; W8A8/W4A8/W4A4 schemes; docs/accuracy.md)")
    p.add_argument("--autoround-preset", default="fast", choices=["fast", "paper"],
                   help="AutoRound settings: fast (CPU: 50 iters, 32 x 256 tokens) or paper (200 iters, "
                        "128 x 2048 tokens, batch 8; GPU)")


def _grid(spec):
    from mlc_quant.alpha_search import parse_grid

    return parse_grid(spec)


def cmd_build(args) -> int:
    import os

    from mlc_quant.build import BuildOptions, build_model

    output = args.output or os.path.join("out", f"{os.path.basename(str(args.model)).split('.')[0]}-{args.quantization}")
    opts = BuildOptions(model=args.model, quantization=args.quantization, output=output, alpha=args.alpha,
                        smooth=args.smooth, max_seq_len=args.max_seq_len, dataset=args.dataset,
                        calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
                        calib_decode_steps=args.calib_decode_steps, target=args.target,
                        overwrite=args.overwrite, seed=args.seed, rotation=args.rotation,
                        rotation_kind=args.rotation_kind, weight_rounding=args.weight_rounding,
                        autoround_preset=args.autoround_preset, weight_clip=args.weight_clip,
                        alpha_grid=_grid(args.alpha_grid),
                        alpha_objective=args.alpha_objective,
                        tensor_parallel_shards=args.tensor_parallel_shards,
                        keep_float=tuple(p for p in args.keep_float.split(",") if p), dtype=args.dtype,
                        merge_linears=args.merge_linears, calibration=args.calibration,
                        calibration_budget_mb=args.calibration_budget_mb,
                        calibration_spill_mb=args.calibration_spill_mb)
    build_model(opts)
    print(f"wrote {output}")
    return 0


def cmd_generate(args) -> int:
    from mlc_quant.runner import load_built

    engine, tokenizer, _ = load_built(args.dir, device=args.device)
    prompt = args.prompt
    if args.chat and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    ids = tokenizer.encode(prompt)
    t0 = time.time()
    out: list = []
    printed = ""
    sys.stdout.write(args.prompt if not args.chat else "")
    for token in engine.generate(ids, args.max_new_tokens, greedy=args.temperature <= 0,
                                 temperature=args.temperature, seed=args.seed):
        out.append(token)
        text = tokenizer.decode(out, skip_special_tokens=True)
        sys.stdout.write(text[len(printed):])  # stream only what is new (tokens can merge)
        sys.stdout.flush()
        printed = text
    dt = time.time() - t0
    sys.stdout.write("\n")
    print(f"[{len(out)} tokens in {dt:.2f} s, {len(out) / max(dt, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0


def cmd_ppl(args) -> int:
    from mlc_quant.runner import perplexity_of_build

    value, windows = perplexity_of_build(args.dir, args.text, args.ctx, args.max_windows, args.device)
    print(f"windows: {windows} x {args.ctx} tokens")
    print(f"perplexity: {value:.4f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mlc-quant", description="Quantize and run LLMs with TVM Relax")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="quantize and compile a model into a directory")
    add_build_args(b)
    b.set_defaults(func=cmd_build)
    g = sub.add_parser("generate", help="stream text from a built model")
    g.add_argument("dir")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    g.set_defaults(func=cmd_generate)
    q = sub.add_parser("ppl", help="perplexity of a built model over a text file")
    q.add_argument("dir")
    q.add_argument("--text", required=True, help="a text file, or 'britannica' for the cleaned shksprdata article")
    q.add_argument("--ctx", type=int, default=512)
    q.add_argument("--max-windows", type=int, default=0, help="evaluate only the first N windows (0 = all)")
    q.add_argument("--device", default="cpu", help="cpu or cuda")
    q.set_defaults(func=cmd_ppl)
    ev = sub.add_parser("eval", help="quantization observatory: perplexity and per-layer error per scheme, figures")
    from mlc_quant import observatory as _observatory  # numpy only at import

    _observatory.add_args(ev)
    ev.set_defaults(func=_observatory.main)
    bn = sub.add_parser("bench", help="end-to-end GPU speed: build here, run on the GPU (docs/performance.md)")
    from mlc_quant import bench as _bench  # numpy only at import: fine on a runtime-only machine

    _bench.add_args(bn)
    bn.set_defaults(func=_bench.main)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
