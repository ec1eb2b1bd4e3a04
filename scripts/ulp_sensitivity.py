#!/usr/bin/env python3
"""How far a built model moves when its arithmetic moves by one ulp.

Two deployments of the same plan (CPU vs CUDA, or two BLAS) never round identically: reductions
run in another order, ``exp``/``pow`` differ in the last bit. A W8A8 model requantizes every
linear's input, so a last-bit difference that pushes one element across an int8 rounding boundary
changes it by a whole quantization step, and the cascade grows layer by layer. This script
measures that floor on ONE backend: the build against itself with every embedding value moved by
one ulp (``np.nextafter``), greedy tokens free-running and teacher-forced (with the top-2 logit
gaps), and perplexity. Whatever two backends disagree on below this floor is not a kernel error.

    python scripts/ulp_sensitivity.py out/gpu-smq3-cpu --ctx 512 --windows 4 --out docs/bench/ulp.json
"""
import argparse
import json
import os
import sys


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PROMPT = "Once upon a time, in a small village by the sea, there lived"  # test_cuda_build's


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("build", help="a CPU build directory (scripts/build.py output)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--out", help="write the result as JSON")
    args = p.parse_args()

    from mlc_quant import artifact
    from mlc_quant.compare import first_difference, greedy_tokens, teacher_forced, ulp_nudged, window_choices
    from mlc_quant.runner import load_built, read_text
    from mlc_quant.runtime import Engine

    engine, tok, cfg = load_built(args.build, max_seq_len=args.ctx)
    if cfg["target"] != "llvm":
        raise SystemExit(f"{args.build} is a {cfg['target']} build: give a CPU build")
    prompt_ids = tok.encode(args.prompt)
    ppl_ids = tok.encode(read_text("britannica"))[: args.ctx * args.windows]
    ref_tokens = greedy_tokens(engine, prompt_ids, args.tokens)
    _, ref_margins = teacher_forced(engine, prompt_ids, ref_tokens)
    ref_ppl, ref_choices, choice_margins = window_choices(engine, ppl_ids, args.ctx)

    params = dict(artifact.load_safetensors(os.path.join(args.build, artifact.PARAMS_FILE)))
    nudged = Engine(os.path.join(args.build, artifact.LIB_FILE), ulp_nudged(params), max_seq_len=args.ctx,
                    vocab_size=cfg["model_config"]["vocab_size"])
    tokens = greedy_tokens(nudged, prompt_ids, args.tokens)
    forced, _ = teacher_forced(nudged, prompt_ids, ref_tokens)
    ppl, choices, _ = window_choices(nudged, ppl_ids, args.ctx)
    flips = [m for a, b, m in zip(choices, ref_choices, choice_margins) if a != b]
    result = {
        "build": args.build, "scheme": cfg["quantization"].get("scheme"), "dtype": cfg["dtype"],
        "perturbation": "embedding table, every value np.nextafter(+inf) (one ulp)",
        "ppl": ref_ppl, "ppl_nudged": ppl, "ppl_rel_diff": abs(ppl - ref_ppl) / ref_ppl,
        "tokens": ref_tokens, "tokens_nudged": tokens,
        "free_running_equal_steps": first_difference(tokens, ref_tokens),
        "choices": len(ref_choices), "choices_agree": len(ref_choices) - len(flips),
        "choices_max_disagree_margin": max(flips, default=0.0),
        "teacher_forced_agree": sum(a == b for a, b in zip(forced, ref_tokens)),
        "teacher_forced_disagree_at": [(i, ref_margins[i]) for i, (a, b) in enumerate(zip(forced, ref_tokens))
                                       if a != b],
        "margins": ref_margins,
        "command": "python " + " ".join(sys.argv),
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("tokens", "tokens_nudged", "margins")}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
