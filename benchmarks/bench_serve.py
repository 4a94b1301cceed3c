"""Serving throughput of `tactful serve` at concurrency 1, 4 and 16: what request batching buys.

    python benchmarks/bench_serve.py                 # ~5 minutes on 2 busy cores
    python benchmarks/bench_serve.py --threads 1     # when other jobs share the cores

The embedded model (SmolLM2-135M-Instruct, float32, CPU) is served in this process
(`tactful.serve.app.ChatServer` on 127.0.0.1, batches of up to 16, the CLI's defaults) and
`--concurrency` client threads send the same fixed prompts (the 64 of
bench_generation.py, first `--requests` of them) as OpenAI chat requests, greedy, with
`max_tokens` fixed. Each level sends the same requests, so the replies and token counts
are the same at every level; only how many arrive together changes.

Reported per level: requests/s, generated tokens/s (`usage.completion_tokens`, up to and
including each reply's stop token), latency p50/p95 and the batch sizes the server formed.
The ratio that matters is throughput at concurrency 4 and 16 over concurrency 1.

The ceiling is the engine itself: `HFGenerator.generate_ids` on the same prompts in
batches of 16 without HTTP, measured in the same run. Server throughput at concurrency
16 as a fraction of it is what the HTTP layer, request queueing and batch formation cost
(a server batch holds whichever requests arrived together, an offline batch holds the 16
longest prompts: not identical batches, so small differences either way are noise).

Writes benchmarks/results/serve.json (atomically).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_generation import PROMPTS  # noqa: E402  (the same 64 prompts as the generation benchmark)

from tactful.eval.generation import GenerationConfig, HFGenerator  # noqa: E402
from tactful.io import atomic_write_json  # noqa: E402
from tactful.models import load_model  # noqa: E402
from tactful.serve.app import ChatServer  # noqa: E402
from machine import machine_info  # noqa: E402  (benchmarks/ is the script's folder)

MODEL = "embedded"


def run_level(url: str, prompts: list[str], concurrency: int, max_tokens: int, stats_url: str) -> dict[str, Any]:
    """Send every prompt once with `concurrency` client threads; time the whole level."""
    local = threading.local()

    def one(prompt: str) -> tuple[float, dict[str, Any]]:
        s = getattr(local, "session", None) or requests.Session()
        local.session = s
        t = time.perf_counter()
        r = s.post(f"{url}/chat/completions", timeout=600, json={
            "model": MODEL, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0})
        r.raise_for_status()
        return time.perf_counter() - t, r.json()

    before = requests.get(stats_url, timeout=30).json()["stats"]
    wall, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, prompts))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = requests.get(stats_url, timeout=30).json()["stats"]

    latencies = sorted(t for t, _ in results)
    tokens = sum(body["usage"]["completion_tokens"] for _, body in results)
    hist = {k: v - before["batch_size_histogram"].get(k, 0) for k, v in after["batch_size_histogram"].items()}
    hist = {k: v for k, v in hist.items() if v}
    n_batches = sum(hist.values())
    return {
        "concurrency": concurrency,
        "requests": len(prompts),
        "generated_tokens": tokens,
        "seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "requests_per_s": round(len(prompts) / wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "tokens_per_cpu_s": round(tokens / cpu, 1),
        "latency_p50_s": round(statistics.median(latencies), 2),
        "latency_p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2),
        "batches": n_batches,
        "mean_batch_size": round(sum(int(k) * v for k, v in hist.items()) / max(n_batches, 1), 2),
        "batch_size_histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
        "replies": [body["choices"][0]["message"]["content"] for _, body in results],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=20.0, help="the server's batch window (CLI default)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(x) for x in args.levels.split(",")]
    prompts = PROMPTS[: args.requests]
    load_before = os.getloadavg()

    model, tok = load_model(MODEL)
    server = ChatServer(model, tok, model_name=MODEL, max_batch_size=args.max_batch_size,
                        max_new_tokens=max(args.max_tokens, 64), batch_wait_s=args.batch_wait_ms / 1000,
                        log_level="warning", access_log=False)
    server.bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    if not server.ready.wait(120):
        raise SystemExit("the server did not start")
    url, stats_url = server.base_url, server.base_url[: -len("/v1")] + "/health"
    print(f"serving {MODEL} at {url}; threads {torch.get_num_threads()}; {len(prompts)} requests per level, "
          f"max_tokens {args.max_tokens}", flush=True)

    # Warm-up: first-call allocations and kernel selection, at batch 1 and at a full batch.
    run_level(url, prompts[:1], 1, 4, stats_url)
    run_level(url, prompts[: args.max_batch_size], args.max_batch_size, 4, stats_url)

    rows = []
    for c in levels:
        row = run_level(url, prompts, c, args.max_tokens, stats_url)
        rows.append(row)
        print(f"concurrency {c:>2}: {row['requests_per_s']:6.2f} req/s {row['tokens_per_s']:7.1f} tok/s "
              f"p50 {row['latency_p50_s']:5.1f} s p95 {row['latency_p95_s']:5.1f} s "
              f"mean batch {row['mean_batch_size']:.1f} ({row['seconds']:.0f} s)", flush=True)

    # The engine without HTTP, same prompts and settings, batches of max_batch_size.
    gen = HFGenerator(model, tok)
    t, c0 = time.perf_counter(), time.process_time()
    ids = gen.generate_ids(prompts, GenerationConfig(max_new_tokens=args.max_tokens, batch_size=args.max_batch_size))
    t, c0 = time.perf_counter() - t, time.process_time() - c0
    offline_tokens = sum(len(x) for x in ids)
    offline = {"method": f"HFGenerator.generate_ids, batch {args.max_batch_size}, no HTTP",
               "generated_tokens": offline_tokens, "seconds": round(t, 2), "cpu_seconds": round(c0, 2),
               "requests_per_s": round(len(prompts) / t, 3), "tokens_per_s": round(offline_tokens / t, 1)}
    print(f"engine ceiling (no HTTP): {offline['tokens_per_s']:.1f} tok/s ({t:.0f} s)", flush=True)

    server.stop()
    thread.join(60)

    base = rows[0]
    same_replies = all(r["replies"] == base["replies"] for r in rows)
    summary = {f"c{r['concurrency']}_vs_c1_requests_per_s": round(r["requests_per_s"] / base["requests_per_s"], 2)
               for r in rows[1:]}
    summary.update({f"c{r['concurrency']}_vs_c1_tokens_per_s": round(r["tokens_per_s"] / base["tokens_per_s"], 2)
                    for r in rows[1:]})
    summary[f"c{rows[-1]['concurrency']}_vs_engine_tokens_per_s"] = round(
        rows[-1]["tokens_per_s"] / offline["tokens_per_s"], 2)
    summary["same_replies_at_every_level"] = same_replies
    for r in rows:
        r.pop("replies")
    print("\n" + ", ".join(f"{k} {v}" for k, v in summary.items()))

    result = {
        "benchmark": "serve",
        "command": " ".join(["python", "benchmarks/bench_serve.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": "embedded (SmolLM2-135M-Instruct, float32)",
        "settings": {"requests_per_level": len(prompts), "max_tokens": args.max_tokens, "greedy": True,
                     "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms, "server": "in-process uvicorn",
                     "client": "requests, one session per client thread"},
        "machine": machine_info(load_before),
        "results": rows,
        "engine_ceiling": offline,
        "summary": summary,
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
