#!/usr/bin/env python3
"""Layer-streamed calibration + quantization of a (large) model, with its memory, as JSON.

Runs ``mlc_quant.streamed.quantize_streamed`` (what ``build --calibration streamed`` runs before
compiling) and assembles the deploy ``params.safetensors``, then prints peak RSS, address space
and the sizes of the model: run it under ``prlimit --as=...`` to show that a model whose float32
weights exceed the limit is quantized within it (docs/design.md, "Layer-streamed calibration").

    python scripts/make_random_model.py --out out/stream-demo/rand-2048x24 --layers 24
    prlimit --as=$((4 * 2**30)) python scripts/stream_demo.py --model out/stream-demo/rand-2048x24 \\
        --work out/stream-demo/w24 --json out/stream-demo/rand-2048x24.json

The deploy module's compile (``build``'s last step) is not run: it holds no weights.
"""
import argparse
import json
import logging
import os
import resource
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _status(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Hugging Face folder (e.g. from scripts/make_random_model.py)")
    p.add_argument("--quantization", default="smq_q8i8f16_2")
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--work", required=True, help="scratch folder for the shards and params.safetensors (replaced)")
    p.add_argument("--cache-dir", default="out/stream-demo/cache", help="compiled one-block module cache")
    p.add_argument("--json", default=None, help="write the report here too")
    p.add_argument("--keep", action="store_true", help="keep --work (params.safetensors) afterwards")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from mlc_quant import artifact, streamed  # pylint: disable=import-outside-toplevel
    from mlc_quant.build import parse_target  # pylint: disable=import-outside-toplevel
    from mlc_quant.model.loader import load_config  # pylint: disable=import-outside-toplevel

    t0 = time.time()
    config = load_config(a.model)
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, config.vocab_size, a.calib_seq_len).astype(np.int32) for _ in range(a.calib_samples)]
    shutil.rmtree(a.work, ignore_errors=True)
    result = streamed.quantize_streamed(a.model, a.quantization, samples, os.path.join(a.work, "shards"),
                                        cache_dir=a.cache_dir, config=config)
    stream_rss = result.peak_rss_mb
    _, order = streamed.write_deploy_params(result, config, result.plan.scheme, "float32", parse_target("llvm"),
                                            None, os.path.join(a.work, artifact.PARAMS_FILE))
    shutil.rmtree(os.path.join(a.work, "shards"), ignore_errors=True)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    disk = sum(os.path.getsize(os.path.join(a.model, f)) for f in os.listdir(a.model) if f.endswith(".safetensors"))
    report = {
        "model": a.model, "layers": config.num_hidden_layers, "hidden": config.hidden_size,
        "intermediate": config.intermediate_size, "scheme": a.quantization,
        "calibration": f"{a.calib_samples} x {a.calib_seq_len} tokens (dummy ids, seed 0)",
        "float32_model_mib": round(streamed.float_model_bytes(config) / 2**20),
        "largest_unit_float32_mib": round(streamed.block_float_bytes(config) / 2**20),
        "checkpoint_on_disk_mib": round(disk / 2**20),
        "params_written_mib": round(os.path.getsize(os.path.join(a.work, artifact.PARAMS_FILE)) / 2**20),
        "params_written": len(order),
        "address_space_limit_mib": None if soft == resource.RLIM_INFINITY else round(soft / 2**20),
        "peak_rss_mib_streaming": round(stream_rss),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0),
        "peak_address_space_mib": round(_status("VmPeak")),
        "wall_s": round(time.time() - t0, 1),
    }
    if not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
