#!/usr/bin/env python3
"""Is a CUDA-graph build's decode the same computation as the plain build's? (GPU machine)

Loads two bench libraries of one scheme (``bench build`` with and without --cuda-graph), gives both
the same seeded random weights, runs a 128-token prefill and N greedy decode steps (each feeding
back its own argmax) and compares the logits of every step and the greedy tokens.

    python scripts/check_decode_graph.py PLAIN_DIR GRAPH_DIR [--steps 16] [--json out.json]

With ``--second-env VAR=VALUE`` the second library runs in a child process with that variable set
(switches the kernels read once per process), e.g. one library with and without programmatic
dependent launch, which must give bit-identical logits:

    MLC_QUANT_PDL=0 python scripts/check_decode_graph.py DIR DIR --second-env MLC_QUANT_PDL=1
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def decode_logits(lib_dir, steps, seed=0, prompt=128):
    import tvm  # pylint: disable=import-outside-toplevel

    from mlc_quant import bench  # pylint: disable=import-outside-toplevel
    from mlc_quant.cuda_runtime import prepare_cuda_runtime  # pylint: disable=import-outside-toplevel

    prepare_cuda_runtime()
    dev = tvm.cuda(0)
    model = bench.LoadedModel(lib_dir, dev, bench._torch(), seed,  # pylint: disable=protected-access
                               max_seq_len=prompt + steps + 16, prefill_chunk=prompt)
    eng = model.engine
    vocab = model.manifest["model_config"]["vocab_size"]

    def step(fn, ids, n):
        return eng.forward(fn, ids, n)[0].numpy().astype(np.float32).reshape(-1, vocab)[-1]

    rng = np.random.default_rng(seed)
    eng.reset()
    logits = [step("prefill", tvm.runtime.tensor(rng.integers(0, vocab, (1, prompt)).astype(np.int32), dev), prompt)]
    for _ in range(steps):
        tok = int(np.argmax(logits[-1]))
        logits.append(step("decode", tvm.runtime.tensor(np.array([[tok]], np.int32), dev), 1))
    return np.stack(logits)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("plain")
    p.add_argument("graph")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prompt", type=int, default=128, help="prefill length")
    p.add_argument("--json")
    p.add_argument("--second-env", help="VAR=VALUE: run the second library in a child process with it")
    p.add_argument("--dump", help=argparse.SUPPRESS)  # child mode: write GRAPH's logits (.npy) and exit
    a = p.parse_args()
    if a.dump:
        np.save(a.dump, decode_logits(a.graph, a.steps, prompt=a.prompt))
        return
    x = decode_logits(a.plain, a.steps, prompt=a.prompt)
    if a.second_env:
        import subprocess  # pylint: disable=import-outside-toplevel
        import tempfile  # pylint: disable=import-outside-toplevel

        var, _, value = a.second_env.partition("=")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "logits.npy")
            subprocess.run([sys.executable, os.path.abspath(__file__), a.plain, a.graph, "--steps", str(a.steps),
                            "--prompt", str(a.prompt), "--dump", out], env={**os.environ, var: value}, check=True)
            y = np.load(out)
    else:
        y = decode_logits(a.graph, a.steps, prompt=a.prompt)
    rel = [float(np.linalg.norm(x[i] - y[i]) / (np.linalg.norm(x[i]) + 1e-30)) for i in range(len(x))]
    res = {"plain": a.plain, "graph": a.graph, "second_env": a.second_env, "prompt": a.prompt, "steps": a.steps, "max_rel_logit_diff": max(rel),
           "max_abs_logit_diff": float(np.abs(x - y).max()), "bitwise_equal": bool(np.array_equal(x, y)),
           "greedy_tokens_equal": bool((x.argmax(-1) == y.argmax(-1)).all()), "finite": bool(np.isfinite(x).all())}
    print(json.dumps(res))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
