#!/usr/bin/env python3
"""Run ``bench run`` once per value of an environment variable and print the tok/s side by side.

For switches the kernels read once per process (MLC_QUANT_PDL, MLC_QUANT_GEMV, ...): each value
gets a fresh process on the same card, so the values are compared in one device call.

    SWEEP_JSON=sweep.json python scripts/bench_env_sweep.py MLC_QUANT_PDL 0 1 2 124 0 1 -- .gpu/bench \\
        --configs llama2-7b --schemes q0f16,smq_q8i8f16_0 --no-hf --no-profile --lengths 512,2048
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main(argv):
    if "--" not in argv or len(argv) < 4:
        sys.exit(__doc__)
    cut = argv.index("--")
    var, values, bench_args = argv[0], argv[1:cut], argv[cut + 1:]
    bench = [sys.executable, str(Path(__file__).resolve().parent / "bench.py"), "run"]
    rows = []
    for i, value in enumerate(values):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "bench.json"
            env = {**os.environ, var: value}
            res = subprocess.run(bench + bench_args + ["--json", str(out)], env=env, capture_output=True, text=True)
            if res.returncode != 0 or not out.is_file():
                print(f"{var}={value}: bench run failed (rc {res.returncode})\n{res.stderr[-3000:]}", flush=True)
                continue
            data = json.loads(out.read_text())
        for run in data["runs"]:
            cells = {f"prefill_{n}": p.get("tokens_per_s") for n, p in run.get("prefill", {}).items()}
            dec = run.get("decode")
            cells["decode"] = dec.get("tokens_per_s") if isinstance(dec, dict) else None
            rows.append({"order": i, var: value, "scheme": run.get("scheme"), **cells})
            print(f"{i:2d} {var}={value:>4} {str(run.get('scheme')):14s} "
                  + " ".join(f"{k} {v:9.1f}" for k, v in cells.items() if v), flush=True)
    if os.environ.get("SWEEP_JSON"):
        with open(os.environ["SWEEP_JSON"], "w", encoding="utf-8") as f:
            json.dump({"variable": var, "values": values, "bench_args": bench_args, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
