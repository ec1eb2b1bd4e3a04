"""Capture linear input activations of an LLM on calibration data, memory bounded.

The module is instrumented with ``CaptureInputs``; each calibration sample is prefilled, and of
each linear input only a capped random sample of rows (tokens) is kept, plus exact per-channel
``absmax`` / ``min`` / ``max`` over every token seen. Inputs are keyed by the sorted,
comma-joined names of the linears that read them, which is the smoothing group's key
(``mlc_quant.smoothing.group_key``).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import numpy as np
import tvm

from mlc_quant.progress import progress

log = logging.getLogger("mlc_quant")


@dataclass
class Captured:
    """Sampled rows ``[M, K]`` float32 and per-channel stats ``[K]`` of each linear input."""

    rows: Dict[str, np.ndarray] = field(default_factory=dict)
    absmax: Dict[str, np.ndarray] = field(default_factory=dict)
    min: Dict[str, np.ndarray] = field(default_factory=dict)
    max: Dict[str, np.ndarray] = field(default_factory=dict)
    tokens: int = 0

    def key_of(self, linear: str) -> str:
        """The input key a linear reads."""
        for key in self.rows:
            if linear in key.split(","):
                return key
        raise KeyError(f"no captured input for linear {linear!r}")

    def linears(self) -> List[str]:
        return [n for key in self.rows for n in key.split(",")]

    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.rows.values())


class RowSampler:
    """Keeps at most ``max_rows`` rows per key: a quota per sample, random rows, seeded."""

    def __init__(self, max_rows: int, num_samples: int, seed: int = 0):
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.quota = max(1, math.ceil(max_rows / max(num_samples, 1)))
        self.max_rows = max_rows
        self.rng = np.random.default_rng(seed)
        self.parts: Dict[str, List[np.ndarray]] = {}
        self.count: Dict[str, int] = {}

    def add(self, key: str, x: np.ndarray) -> None:
        room = self.max_rows - self.count.get(key, 0)
        if room <= 0:
            return
        take = min(self.quota, room, x.shape[0])
        idx = np.sort(self.rng.choice(x.shape[0], size=take, replace=False))
        self.parts.setdefault(key, []).append(np.array(x[idx], dtype=np.float32))
        self.count[key] = self.count.get(key, 0) + take

    def rows(self) -> Dict[str, np.ndarray]:
        return {k: np.concatenate(v, axis=0) for k, v in self.parts.items()}


@dataclass
class CaptureModule:
    """A compiled capture module and the input keys each function returns, in order."""

    exe: object
    names: Dict[str, List[str]]


def build_capture_module(mod: tvm.IRModule, weight_names: List[str]) -> CaptureModule:
    """Annotate the linears, instrument them with CaptureInputs, compile for CPU."""
    from mlc_quant import pipeline
    from mlc_quant.passes import AnnotateLinear
    from mlc_quant.passes.capture_inputs import CAPTURES_ATTR, CaptureInputs

    t0 = time.time()
    cap = CaptureInputs()(AnnotateLinear(weight_names=weight_names)(mod))
    tvm.relax.analysis.well_formed(cap)  # raises on the first violation
    names = {gv.name_hint: [str(n) for n in f.attrs[CAPTURES_ATTR]] for gv, f in cap.functions_items()
             if isinstance(f, tvm.relax.Function) and f.attrs is not None and CAPTURES_ATTR in f.attrs}
    exe = pipeline.build(cap, "llvm")
    log.info("compiled the activation-capture module in %.0f s", time.time() - t0)
    return CaptureModule(exe, names)


def capture_activations(mod: tvm.IRModule, params: Dict[str, np.ndarray], samples: Iterable[np.ndarray],
                        num_samples: int, max_rows: int = 256, seed: int = 0, max_seq_len: int = 2048,
                        vocab_size: Optional[int] = None, compiled: Optional[CaptureModule] = None) -> Captured:
    """Prefill each sample through ``mod`` (an exported LLM, float) and capture its linear inputs.

    ``params``: the float weights (keyed by parameter name); ``compiled``: an already built
    :class:`CaptureModule` of ``mod`` to reuse. Memory: ``max_rows`` rows per input, plus one
    prefill's outputs at a time.
    """
    from mlc_quant.runtime import Engine

    compiled = compiled or build_capture_module(mod, list(params))
    out = Captured()
    sampler = RowSampler(max_rows, num_samples, seed)

    def on_outputs(fn: str, values: List[np.ndarray]) -> None:
        keys = compiled.names[fn]
        for i, (key, value) in enumerate(zip(keys, values)):
            x = value.reshape(-1, value.shape[-1])
            if i == 0:
                out.tokens += x.shape[0]
            amax, lo, hi = np.abs(x).max(axis=0), x.min(axis=0), x.max(axis=0)
            if key in out.absmax:
                amax = np.maximum(out.absmax[key], amax)
                lo, hi = np.minimum(out.min[key], lo), np.maximum(out.max[key], hi)
            out.absmax[key], out.min[key], out.max[key] = amax, lo, hi
            sampler.add(key, x)

    engine = Engine(compiled.exe, params, max_seq_len=max_seq_len, stats_callback=on_outputs,
                    vocab_size=vocab_size)
    count = 0
    for ids in progress(samples, total=num_samples, desc="capturing activations", unit="sample"):
        engine.reset()
        engine.prefill(ids)
        count += 1
    if count == 0:
        raise ValueError("no calibration sample to capture activations on")
    out.rows = sampler.rows()
    log.info("captured %d linear inputs (at most %d rows each, %.1f MB)", len(out.rows), max_rows,
             out.nbytes() / 2**20)
    return out
