#!/usr/bin/env python3
"""needle_client.py: stream one completion from needle-server (the Python twin of needle-client).

Generates the gRPC stubs at run time from proto/needle/v1/generation.proto into a temporary
directory, so nothing generated is checked in. Uses Debian's python3-grpcio and python3-protobuf.
The stubs come from protoc (protobuf-compiler) with grpc_python_plugin (protobuf-compiler-grpc);
Debian 12's grpc_tools bundles protoc 3.5, which predates proto3 `optional`, so grpc_tools.protoc
is only the fallback for installations whose grpc_tools is newer.

    /usr/bin/python3 clients/python/needle_client.py --server 127.0.0.1:50051 \
        --prompt "The quick brown fox" --max-tokens 32 --temperature 0
"""

import argparse
import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO_PROTO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")
PROTO = "needle/v1/generation.proto"
REASONS = {0: "unspecified", 1: "stop", 2: "length", 3: "eos", 4: "cancelled", 5: "deadline", 6: "error"}


def generate_stubs(proto_dir, out_dir):
    """Writes generation_pb2.py and generation_pb2_grpc.py under out_dir/needle/v1."""
    protoc = shutil.which("protoc")
    plugin = shutil.which("grpc_python_plugin")
    if protoc and plugin:
        cmd = [protoc, "-I", proto_dir, "--python_out", out_dir, "--grpc_python_out", out_dir,
               "--plugin=protoc-gen-grpc_python=" + plugin, PROTO]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit("needle_client: protoc failed:\n" + result.stderr)
        return
    from grpc_tools import protoc as grpc_protoc  # fallback: needs a protoc >= 3.15 inside
    rc = grpc_protoc.main(["grpc_tools.protoc", "-I", proto_dir, "--python_out", out_dir,
                           "--grpc_python_out", out_dir, PROTO])
    if rc != 0:
        sys.exit("needle_client: grpc_tools.protoc failed (install protobuf-compiler and protobuf-compiler-grpc)")


def load_stubs(proto_dir, tmp):
    generate_stubs(proto_dir, tmp)
    sys.path.insert(0, tmp)
    pb2 = importlib.import_module("needle.v1.generation_pb2")
    pb2_grpc = importlib.import_module("needle.v1.generation_pb2_grpc")
    return pb2, pb2_grpc


def build_request(pb2, args):
    req = pb2.GenerateRequest(request_id=args.request_id or "")
    if args.prompt is not None:
        req.text = args.prompt
    elif args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8") as f:
            req.text = f.read()
    else:
        req.token_ids.ids.extend(32 + i % 95 for i in range(args.prompt_tokens))
    if args.temperature is not None:
        req.sampling.temperature = args.temperature
    if args.top_p is not None:
        req.sampling.top_p = args.top_p
    if args.top_k is not None:
        req.sampling.top_k = args.top_k
    if args.seed is not None:
        req.sampling.seed = args.seed
    if args.max_tokens is not None:
        req.stopping.max_tokens = args.max_tokens
    req.stopping.stop.extend(args.stop)
    req.stopping.ignore_eos = args.ignore_eos
    return req


def summarize(times):
    """Mean and nearest-rank percentiles of the gaps between consecutive times, in seconds."""
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    if not gaps:
        return {"n": 0, "mean_s": 0.0, "p50_s": 0.0, "p90_s": 0.0, "p99_s": 0.0, "max_s": 0.0}
    def rank(p):
        return gaps[min(len(gaps) - 1, max(0, math.ceil(p * len(gaps)) - 1))]

    return {"n": len(gaps), "mean_s": sum(gaps) / len(gaps), "p50_s": rank(0.50), "p90_s": rank(0.90),
            "p99_s": rank(0.99), "max_s": gaps[-1]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1:50051")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-file")
    src.add_argument("--prompt-tokens", type=int, help="N synthetic token ids (printable bytes)")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--stop", action="append", default=[])
    parser.add_argument("--request-id")
    parser.add_argument("--timeout-s", type=float)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--proto-dir", default=REPO_PROTO_DIR, help="directory holding needle/v1/*.proto")
    args = parser.parse_args()

    import grpc  # python3-grpcio

    with tempfile.TemporaryDirectory(prefix="needle-stubs-") as tmp:
        pb2, pb2_grpc = load_stubs(args.proto_dir, tmp)
        request = build_request(pb2, args)
        channel = grpc.insecure_channel(args.server, options=[("grpc.keepalive_time_ms", 20000)])
        stub = pb2_grpc.GenerationStub(channel)

        ids, text, times, finished, request_id = [], [], [], None, ""
        code, message = "OK", ""
        start = time.monotonic()
        try:
            for response in stub.Generate(request, timeout=args.timeout_s):
                request_id = response.request_id
                kind = response.WhichOneof("event")
                if kind == "tokens":
                    now = time.monotonic() - start
                    ids.extend(response.tokens.token_ids)
                    times.extend([now] * len(response.tokens.token_ids))
                    text.append(response.tokens.text)
                    if not args.json:
                        sys.stdout.write(response.tokens.text)
                        sys.stdout.flush()
                elif kind == "finished":
                    finished = response.finished
        except grpc.RpcError as e:
            code, message = e.code().name, e.details()
        total = time.monotonic() - start
        channel.close()

    server_times = list(finished.timings.token_times_s) if finished is not None else []
    result = {
        "request_id": request_id,
        "status": {"code": code, "message": message},
        "token_ids": ids,
        "text": "".join(text),
        "finish_reason": REASONS.get(finished.reason, "unspecified") if finished is not None else "none",
        "client": {"first_token_s": times[0] if times else 0.0, "total_s": total, "inter_token": summarize(times)},
    }
    if finished is not None:
        t = finished.timings
        result["matched_stop"] = finished.matched_stop
        result["usage"] = {"prompt_tokens": finished.usage.prompt_tokens,
                           "completion_tokens": finished.usage.completion_tokens}
        result["server"] = {"queue_s": t.queue_s, "prefill_s": t.prefill_s, "first_token_s": t.first_token_s,
                            "decode_s": t.decode_s, "inter_token": summarize(server_times)}
    if args.json:
        print(json.dumps(result))
    else:
        print()
        c, s = result["client"], result.get("server", {})
        print(f"request {request_id}: {len(ids)} tokens, finish reason {result['finish_reason']}", file=sys.stderr)
        print(f"{'':22} {'client (ms)':>12} {'server (ms)':>12}", file=sys.stderr)
        print(f"{'time to first token':22} {c['first_token_s'] * 1e3:12.2f} {s.get('first_token_s', 0) * 1e3:12.2f}",
              file=sys.stderr)
        for key in ("mean", "p50", "p90", "p99", "max"):
            ci = c["inter_token"][key + "_s"] * 1e3
            si = s["inter_token"][key + "_s"] * 1e3 if s else 0.0
            print(f"{'inter-token ' + key:22} {ci:12.2f} {si:12.2f}", file=sys.stderr)
    if code != "OK":
        print(f"needle_client: {code}: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
