#!/usr/bin/env python3
"""Sums an ncu CSV of decode-step kernels (benchmarks/e2e_on_device.sh) by kind.

Input: `ncu --csv --print-units base --metrics gpu__time_duration.sum` over the kernels of --steps decode
steps (other lines of the file, such as the profiled program's own output, are ignored). Prints, per
step, the time of attention (the NSA or dense decode kernels), of the cuBLASLt GEMMs and of each other
kernel family, with shares of the step's kernel time, and optionally writes them as JSON. The kernels
ran one at a time under the profiler, so the sum is GPU time without launch gaps or overlap: the
shares are what it is for, not the step's wall time.
"""
import argparse
import csv
import io
import json
import re
import sys

ATTENTION = re.compile(r"Nsa(Partial|Select|Merge|Decode)Kernel|Dense(Partial|Merge|Attention)Kernel")
GEMM = re.compile(r"nvjet|gemm|xmma|cutlass|splitk", re.IGNORECASE)
FAMILY = re.compile(r"([A-Z][A-Za-z0-9]*Kernel)")


def kind(name):
    if ATTENTION.search(name):
        return "attention"
    if GEMM.search(name):
        return "gemm"
    m = FAMILY.search(name)
    return m.group(1) if m else name.split("(")[0][:40]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    lines = [l for l in open(args.csv, errors="replace") if l.startswith('"')]
    if not lines:
        sys.exit(f"{args.csv}: no ncu CSV rows")
    totals, counts = {}, {}
    for row in csv.DictReader(io.StringIO("".join(lines))):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        k = kind(row["Kernel Name"])
        us = float(row["Metric Value"].replace(",", "")) / 1e3  # ns
        totals[k] = totals.get(k, 0.0) + us
        counts[k] = counts.get(k, 0) + 1
    step = sum(totals.values()) / args.steps
    print(f"{'kind':<28} {'us/step':>10} {'share':>7} {'kernels/step':>13}")
    for k in sorted(totals, key=totals.get, reverse=True):
        print(f"{k:<28} {totals[k] / args.steps:>10.1f} {totals[k] / args.steps / step:>7.1%} "
              f"{counts[k] / args.steps:>13.0f}")
    print(f"{'total':<28} {step:>10.1f}")
    if args.json:
        json.dump({"steps": args.steps, "step_us": step,
                   "kinds": {k: {"us_per_step": totals[k] / args.steps, "share": totals[k] / args.steps / step,
                                 "kernels_per_step": counts[k] / args.steps} for k in totals}},
                  open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
