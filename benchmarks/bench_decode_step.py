"""Where one decode step's time goes: the embedded model, one thread, a full batch mid-reply.

    python benchmarks/bench_decode_step.py                 # batches 16, 32, 64; ~3 minutes on an idle core
    python benchmarks/bench_decode_step.py --batches 64 --context 200

bench_generation.py measures whole replies; this splits one steady decode step (every row still
generating, `--context` tokens already in the KV cache) into what it costs:
- **step**: the model's forward for one new token per row (logits at the last position only, as
  HFGenerator asks), timed over `--steps` steps with the cache growing as in real decoding;
- **KV-cache update**: time inside transformers' DynamicLayer.update (the per-layer `torch.cat`);
- **linear layers alone**: the same weights applied to a batch of random rows, back to back (the
  compute a perfect kernel schedule would still need; attention, norms, RoPE and SiLU are not in it).
Tokens/s are per thread; the roofline is the measured float32 2048^3 matmul rate / (2 x parameters).
Each time is the best of `--trials` runs: on a shared machine the slowest run measures the neighbours.
One thread, because HFGenerator decodes one batch per thread side by side (benchmarks/README.md).

Writes benchmarks/results/decode-step.json (atomically).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench_generation import matmul_gflops  # noqa: E402  (benchmarks/ is the script's folder)
from machine import machine_info  # noqa: E402
from tactful.io import atomic_write_json
from tactful.kv_cache import returned_cache, with_cache
from tactful.models import load_model


def linear_weights(model: Any) -> list[torch.Tensor]:
    """The matrices a decode step multiplies by: every nn.Linear weight (the LM head included)."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


def time_linears(weights: list[torch.Tensor], batch: int, steps: int) -> float:
    """Seconds per step for the linear layers alone at this batch size."""
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w in weights}
    with torch.inference_mode():
        for w in weights:  # warm up
            torch.nn.functional.linear(inputs[w.shape[1]], w)
        t = time.perf_counter()
        for _ in range(steps):
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)
    return (time.perf_counter() - t) / steps


def time_step(model: Any, batch: int, context: int, steps: int) -> tuple[float, float]:
    """(seconds per decode step, of which in the KV-cache update) with `context` tokens cached."""
    import transformers.cache_utils as cu

    spent = [0.0]
    update = cu.DynamicLayer.update

    def timed_update(self: Any, *args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return update(self, *args, **kw)
        finally:
            spent[0] += time.perf_counter() - t

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 10000, (batch, context), generator=gen)
    cu.DynamicLayer.update = timed_update
    try:
        with torch.inference_mode():
            cache = returned_cache(model(input_ids=ids, use_cache=True))
            tok = torch.randint(100, 10000, (batch, 1), generator=gen)
            mask = torch.ones(batch, context + 1, dtype=torch.long)
            pos = torch.full((batch, 1), context)

            def step() -> None:
                nonlocal mask, pos
                model(input_ids=tok, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                      **with_cache(model, cache))
                mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
                pos = pos + 1

            step()  # warm up
            spent[0] = 0.0
            t = time.perf_counter()
            for _ in range(steps):
                step()
            total = time.perf_counter() - t
    finally:
        cu.DynamicLayer.update = update
    return total / steps, spent[0] / steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--context", type=int, default=100, help="tokens in the KV cache when timing starts")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--trials", type=int, default=3, help="timed runs per measurement; the fastest counts")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode-step.json")
    args = ap.parse_args(argv)
    if min(args.batches) < 1 or args.context < 1 or args.steps < 1 or args.trials < 1:
        print("error: --batches, --context, --steps and --trials must be positive", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    model, _ = load_model("embedded")
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    gflops = matmul_gflops()
    roofline = gflops * 1e9 / (2 * n_params)
    weights = linear_weights(model)
    print(f"1 thread, float32 matmul {gflops:.0f} GFLOP/s, {n_params / 1e6:.1f}M parameters -> roofline "
          f"{roofline:.0f} tokens/s; context {args.context}, {args.steps} steps")
    rows = []
    for b in args.batches:
        step, kv = min(time_step(model, b, args.context, args.steps) for _ in range(args.trials))
        lin = min(time_linears(weights, b, args.steps) for _ in range(args.trials))
        flops = 2 * sum(w.numel() for w in weights) * b
        row = {"batch": b, "step_ms": round(1e3 * step, 1), "tokens_per_s": round(b / step, 1),
               "of_roofline": round(b / step / roofline, 3), "kv_update_ms": round(1e3 * kv, 1),
               "linear_alone_ms": round(1e3 * lin, 1), "linear_gflops": round(flops / lin / 1e9, 1),
               "rest_ms": round(1e3 * (step - kv - lin), 1)}
        rows.append(row)
        print(f"batch {b:3d}: step {row['step_ms']:6.1f} ms = {row['tokens_per_s']:6.1f} tok/s "
              f"({100 * row['of_roofline']:.0f}% of roofline); KV update {row['kv_update_ms']:5.1f} ms, linear layers "
              f"alone {row['linear_alone_ms']:6.1f} ms ({row['linear_gflops']:.0f} GFLOP/s), rest "
              f"{row['rest_ms']:5.1f} ms", flush=True)
    atomic_write_json(args.out, {
        "benchmark": "decode-step",
        "command": " ".join(["python", "benchmarks/bench_decode_step.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": "embedded (SmolLM2-135M-Instruct, float32)", "parameters": n_params, "threads": 1,
        "context": args.context, "steps": args.steps, "trials": args.trials, "machine": machine_info(load_before),
        "matmul_gflops": round(gflops, 1), "roofline_tokens_per_s": round(roofline, 1), "results": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
