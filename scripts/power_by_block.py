#!/usr/bin/env python3
"""SM clock and board power during each timed block of ``bench interleave --order blocks``.

Log the card while the bench runs, then line the log up with the blocks' wall-clock spans
(``block_spans`` in the bench JSON):

    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_event_reasons.active \\
        --format=csv,noheader,nounits -lms 50 > smi.csv &
    python3 scripts/bench.py interleave DIR --lengths 512 --json bench.json
    kill %1; python3 scripts/power_by_block.py smi.csv bench.json

For each block (scheme x case, the timed samples only, not the warm-up): the median SM clock,
the median and max power, and the share of log lines whose throttle reasons include the
software power cap (0x4). nvidia-smi's timestamps are the GPU machine's local time; pass
``--utc-offset-h`` if that is not UTC.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys

from mlc_quant.nvml import SW_POWER_CAP  # the same bit in nvidia-smi's clocks_event_reasons



def read_log(path: str, utc_offset_h: float):
    rows = []
    for line in open(path, encoding="utf-8"):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4 or not parts[1].replace(".", "").isdigit():
            continue  # header or a line cut short when the logger was stopped
        t = dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=dt.timezone.utc)
        reasons = int(parts[3], 16) if parts[3].startswith("0x") else 0
        rows.append((t.timestamp() - utc_offset_h * 3600, float(parts[1]), float(parts[2]), reasons))
    return rows


def summarize(rows, spans):
    out = []
    for b in spans:
        inside = [r for r in rows if b["samples_start"] <= r[0] <= b["end"]]
        if not inside:
            out.append({**b, "log_lines": 0})
            continue
        out.append({"scheme": b["scheme"], "case": b["case"], "seconds": round(b["end"] - b["samples_start"], 2),
                    "log_lines": len(inside),
                    "sm_mhz_median": statistics.median(r[1] for r in inside),
                    "sm_mhz_min": min(r[1] for r in inside),
                    "power_w_median": round(statistics.median(r[2] for r in inside), 1),
                    "power_w_max": round(max(r[2] for r in inside), 1),
                    "power_capped_share": round(sum(1 for r in inside if r[3] & SW_POWER_CAP) / len(inside), 2),
                    "joules_per_call": b.get("joules_per_call")})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", help="nvidia-smi CSV (timestamp, clocks.sm, power.draw, clocks_event_reasons.active)")
    p.add_argument("bench_json", help="bench interleave --order blocks --json output")
    p.add_argument("--utc-offset-h", type=float, default=0.0)
    p.add_argument("--json", help="write the table here too")
    args = p.parse_args(argv)
    spans = json.load(open(args.bench_json, encoding="utf-8")).get("block_spans")
    if not spans:
        print(f"{args.bench_json}: no block_spans (run bench interleave --order blocks)", file=sys.stderr)
        return 2
    rows = read_log(args.log, args.utc_offset_h)
    if not rows:
        print(f"{args.log}: no log lines", file=sys.stderr)
        return 2
    table = summarize(rows, spans)
    print(f"{'scheme':16} {'case':12} {'lines':>5} {'MHz med':>8} {'MHz min':>8} {'W med':>7} {'W max':>7} {'capped':>6} {'J/call':>9}")
    for r in table:
        if not r["log_lines"]:
            print(f"{r['scheme']:16} {r['case']:12} {0:>5}  (no log lines in the block: clocks out of line?)")
            continue
        print(f"{r['scheme']:16} {r['case']:12} {r['log_lines']:>5} {r['sm_mhz_median']:>8.0f} {r['sm_mhz_min']:>8.0f} "
              f"{r['power_w_median']:>7.1f} {r['power_w_max']:>7.1f} {r['power_capped_share']:>6.2f} "
              f"{r['joules_per_call'] if r['joules_per_call'] is not None else '-':>9}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
