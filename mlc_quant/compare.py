"""Compare two builds of one model by their next-token choices (runtime side: no tvm.relax).

A greedy path of 32 tokens is one sample; the choices at every scored position of a perplexity
text are thousands. ``ulp_nudged`` gives the floor: a build against itself with its input moved by
one ulp, the least change another backend's arithmetic makes (scripts/ulp_sensitivity.py,
python/tests/test_cuda_build.py; docs/performance.md says what it showed for W8A8).
"""
from __future__ import annotations

import numpy as np

EMBED = "model_embed_tokens_weight"


def greedy_tokens(engine, prompt, n: int):
    """n greedy tokens after a fresh prefill of prompt, not stopping at eos (the comparison is of
    the model's next-token choice at every step, not of where a chat would end)."""
    engine.reset()
    logits = engine.prefill(prompt)[-1]
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = engine.decode(out[-1])
    return out


def teacher_forced(engine, prompt, tokens):
    """Feed ``tokens`` (another build's greedy path) after a fresh prefill of ``prompt``; at every
    step the engine's argmax and its top-1 minus top-2 logit (how close each choice was)."""
    engine.reset()
    logits = engine.prefill(prompt)[-1]
    argmax, margins = [], []
    for t in tokens:
        top = np.sort(np.asarray(logits, np.float64))[::-1]
        argmax.append(int(np.argmax(logits)))
        margins.append(float(top[0] - top[1]))
        logits = engine.decode(t)
    return argmax, margins


def window_choices(engine, ids, ctx: int):
    """Perplexity over non-overlapping windows of ``ctx`` tokens (as ``Engine.perplexity``) and, at
    every scored position, the argmax and the top-1 minus top-2 logit."""
    from mlc_quant.runtime import nll  # pylint: disable=import-outside-toplevel

    ids = np.asarray(ids, np.int32)
    total, count, argmax, margins = 0.0, 0, [], []
    for w in range(max(ids.size // ctx, 1)):
        window = ids[w * ctx: (w + 1) * ctx]
        engine.reset()
        logits = np.asarray(engine.prefill(window), np.float64)[:-1]
        total += float(nll(logits, window[1:]).sum())
        count += window.size - 1
        top2 = np.partition(logits, -2, axis=-1)[:, -2:]
        argmax += np.argmax(logits, axis=-1).tolist()
        margins += (top2[:, 1] - top2[:, 0]).tolist()
    engine.reset()
    return float(np.exp(total / count)), argmax, margins


def first_difference(a, b) -> int:
    """Index of the first differing token of two paths (their common length if none differs)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def ulp_nudged(params: dict, name: str = EMBED) -> dict:
    """The params with every value of ``name`` (the embedding table) one ulp up."""
    if name not in params:
        raise KeyError(f"{name} is not a param of this build (params: {', '.join(sorted(params)[:5])}, ...)")
    out = dict(params)
    out[name] = np.nextafter(params[name], np.inf).astype(params[name].dtype)
    return out
