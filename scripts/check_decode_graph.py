#!/usr/bin/env python3
"""Is a CUDA-graph build's decode the same computation as the plain build's? (GPU machine)

Loads two bench libraries of one scheme (``bench build`` with and without --cuda-graph), gives both
the same seeded random weights, runs a 128-token prefill and N greedy decode steps (each feeding
back its own argmax) and compares the logits of every step and the greedy tokens.

    python scripts/check_decode_graph.py PLAIN_DIR GRAPH_DIR [--steps 16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def decode_logits(lib_dir, steps, seed=0):
    import tvm  # pylint: disable=import-outside-toplevel
    import tvm_ffi  # pylint: disable=import-outside-toplevel

    from mlc_quant import bench  # pylint: disable=import-outside-toplevel
    from mlc_quant.cuda_runtime import prepare_cuda_runtime  # pylint: disable=import-outside-toplevel
    from mlc_quant.runtime import Engine  # pylint: disable=import-outside-toplevel

    prepare_cuda_runtime()
    man = json.loads(open(os.path.join(lib_dir, bench.MANIFEST), encoding="utf-8").read())
    dev = tvm.cuda(0)
    torch = bench._torch()  # pylint: disable=protected-access
    weights, keep = {}, []
    for name, shape, dtype in man["params"]:
        w, owner = bench.random_weight(name, shape, dtype, seed, dev, torch)
        weights[name], _ = w, keep.append(owner)
    vocab = man["model_config"]["vocab_size"]
    eng = Engine(os.path.join(lib_dir, "model.so"), weights, dev, max_seq_len=512, prefill_chunk_size=256,
                 vocab_size=vocab)

    def step(fn, ids, n):
        eng._begin(eng.kv_cache, tvm_ffi.Shape([0]), tvm_ffi.Shape([n]))  # pylint: disable=protected-access
        out = eng._funcs[fn](ids, eng.kv_cache, *eng._args[fn])  # pylint: disable=protected-access
        eng._end(eng.kv_cache)  # pylint: disable=protected-access
        return out[0].numpy().astype(np.float32).reshape(-1, vocab)[-1]

    rng = np.random.default_rng(seed)
    eng.reset()
    logits = [step("prefill", tvm.runtime.tensor(rng.integers(0, vocab, (1, 128)).astype(np.int32), dev), 128)]
    for _ in range(steps):
        tok = int(np.argmax(logits[-1]))
        logits.append(step("decode", tvm.runtime.tensor(np.array([[tok]], np.int32), dev), 1))
    return np.stack(logits)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("plain")
    p.add_argument("graph")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--json")
    a = p.parse_args()
    x, y = decode_logits(a.plain, a.steps), decode_logits(a.graph, a.steps)
    rel = [float(np.linalg.norm(x[i] - y[i]) / (np.linalg.norm(x[i]) + 1e-30)) for i in range(len(x))]
    res = {"plain": a.plain, "graph": a.graph, "steps": a.steps, "max_rel_logit_diff": max(rel),
           "max_abs_logit_diff": float(np.abs(x - y).max()), "bitwise_equal": bool(np.array_equal(x, y)),
           "greedy_tokens_equal": bool((x.argmax(-1) == y.argmax(-1)).all()), "finite": bool(np.isfinite(x).all())}
    print(json.dumps(res))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
