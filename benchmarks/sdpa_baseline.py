#!/usr/bin/env python3
"""cuDNN dense decode baseline for needle-kernel-bench (BENCHMARKS.md).

Times torch.nn.functional.scaled_dot_product_attention with the cuDNN backend and enable_gqa=True for
one decode token (q [B, Hq, 1, d], contiguous k/v [B, Hkv, S, d]), median of CUDA-event timings over
rotated copies of k/v so a call's bytes do not sit in L2, and prints/writes the same fields as the C++
benchmark's dense rows. Exits 0 with a message when torch (or CUDA, or the cuDNN backend) is missing.
"""
import argparse
import json
import math
import statistics
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    ap.add_argument("--contexts", default="8192,16384,32768,65536,131072")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--trials", type=int, default=15)
    ap.add_argument("--rotation_mb", type=float, default=256)
    args = ap.parse_args()
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception as e:  # noqa: BLE001
        print(f"sdpa_baseline: torch not available ({e}); skipped")
        return 0
    if not torch.cuda.is_available():
        print("sdpa_baseline: no CUDA device; skipped")
        return 0
    dev = torch.device("cuda")
    # (name, Hq, Hkv, d_k, d_v): the brief's "64 q / 4 KV heads d 128", the FLA geometry d 64 G 16, and
    # the paper geometry's dense form (d_k 192, d_v 128: what needle-kernel-bench's paper dense rows
    # read), where the cuDNN build supports a value head dim unlike the key's.
    shapes = [("llama-d128-G16", 64, 4, 128, 128), ("fla-d64-G16", 64, 4, 64, 64),
              ("paper-dk192-dv128", 64, 4, 192, 128)]
    results = []
    free = torch.cuda.mem_get_info()[0]
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'shape':18} {'context':>7} {'batch':>5} {'cuDNN us':>9} {'MB':>9} {'GB/s':>7}")
    for name, hq, hkv, d, dv in shapes:
        for ctx in [int(x) for x in args.contexts.split(",")]:
            for b in [int(x) for x in args.batches.split(",")]:
                kv_bytes = b * hkv * ctx * (d + dv) * 2
                copies = max(1, min(64, math.ceil(args.rotation_mb * 1e6 / kv_bytes)))
                if copies * kv_bytes > free - 8e9:
                    copies = int((free - 8e9) // kv_bytes)
                if copies < 1:
                    results.append({"shape": name, "context": ctx, "batch": b, "skipped": "memory"})
                    continue
                q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.bfloat16)
                kv = [(torch.randn(b, hkv, ctx, d, device=dev, dtype=torch.bfloat16),
                       torch.randn(b, hkv, ctx, dv, device=dev, dtype=torch.bfloat16)) for _ in range(copies)]
                try:
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                        def call(i):
                            k, v = kv[i % copies]
                            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                        for i in range(3):
                            call(i)
                        torch.cuda.synchronize()
                        reps = max(copies, 10)
                        times = []
                        for _ in range(args.trials):
                            s = torch.cuda.Event(enable_timing=True)
                            e = torch.cuda.Event(enable_timing=True)
                            s.record()
                            for i in range(reps):
                                call(i)
                            e.record()
                            torch.cuda.synchronize()
                            times.append(1000.0 * s.elapsed_time(e) / reps)
                except Exception as ex:  # noqa: BLE001
                    print(f"sdpa_baseline: {name} {ctx} {b}: cuDNN backend failed: {ex}")
                    results.append({"shape": name, "context": ctx, "batch": b, "error": str(ex)[:200]})
                    del kv
                    torch.cuda.empty_cache()
                    continue
                us = statistics.median(times)
                gbps = kv_bytes / (us * 1e-6) / 1e9
                print(f"{name:18} {ctx:7d} {b:5d} {us:9.1f} {kv_bytes / 1e6:9.1f} {gbps:7.0f}")
                results.append({"shape": name, "context": ctx, "batch": b, "median_us": us, "bytes": kv_bytes,
                                "gbps": gbps, "copies": copies})
                del kv
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "timing": "eager launches (no graph), median per call", "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
