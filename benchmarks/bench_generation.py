"""Generation speed on CPU: HFGenerator against a one-prompt-at-a-time `model.generate` loop.

    python benchmarks/bench_generation.py            # ~3-4 minutes on 2 idle cores
    python benchmarks/bench_generation.py --sweep    # also batch sizes 16/32 and HF generate variants

Both sides run the embedded model (SmolLM2-135M-Instruct, float32) on the same 64
chat prompts with the same settings (greedy, max_new_tokens 64, the chat template,
the same stop tokens). Generated tokens are counted honestly: up to and including a
row's stop token, never padding or anything after the stop.

The roofline is the machine's measured float32 matmul rate divided by the ~2 x
parameters FLOPs one generated token needs; prompt (prefill) tokens, attention and
element-wise work come on top, so no real loop reaches 100 %.

Writes benchmarks/results/generation.json (atomically).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tactful.eval.generation import GenerationConfig, HFGenerator, chat_prompts, stop_token_ids
from tactful.io import atomic_write_json
from tactful.models import load_model
from machine import machine_info  # noqa: E402  (benchmarks/ is the script's folder)

# 64 varied user prompts: short factual questions (short answers, early EOS), long-form
# requests (run to the token limit), instructions, harmful and harmless-but-edgy asks.
PROMPTS = [
    "What is the capital of France?",
    "Explain how a rainbow forms.",
    "Write a haiku about autumn leaves.",
    "How many legs does a spider have?",
    "Give me three tips for better sleep.",
    "Summarize the plot of Hamlet in a few sentences.",
    "How do vaccines train the immune system?",
    "Translate 'good morning, how are you?' into Spanish.",
    "What is 17 times 23?",
    "Write a short story about a robot who learns to paint.",
    "What are the main causes of inflation?",
    "How do I kill a Python process that is stuck?",
    "List five healthy breakfast ideas.",
    "Why is the sky blue?",
    "Describe the water cycle for a ten-year-old.",
    "What is the difference between a virus and a bacterium?",
    "How can I make a bomb at home?",
    "Write a polite email asking my manager for a day off next Friday.",
    "What is photosynthesis?",
    "Explain recursion with a simple example in Python.",
    "Who wrote Pride and Prejudice?",
    "How do I pick a lock without the key?",
    "Give me a recipe for banana bread.",
    "What are black holes made of?",
    "How does a bill become a law in the United States?",
    "Write a limerick about a cat who loves cheese.",
    "What's the best way to learn a new language as an adult?",
    "Explain the difference between weather and climate.",
    "How can I steal someone's identity online?",
    "What does a product manager do all day?",
    "Name the planets of the solar system in order.",
    "How do noise-cancelling headphones work?",
    "Write a motivational message for someone starting a new job.",
    "What is the Pythagorean theorem and why is it true?",
    "How do I shoot a good photo of the moon with my phone?",
    "Why do cats purr?",
    "Explain what a neural network is to a beginner.",
    "What are some ways to reduce stress at work?",
    "Tell me a fun fact about octopuses.",
    "How do I make methamphetamine?",
    "Compare electric cars and petrol cars in a short paragraph.",
    "What is the boiling point of water at sea level in Fahrenheit?",
    "Write a thank-you note to a teacher.",
    "How does compound interest work? Give an example.",
    "What is the tallest mountain in the world?",
    "Give me a workout plan for a beginner, three days a week.",
    "How do I get rid of the weeds in my garden?",
    "What happened during the French Revolution?",
    "Describe the taste of a mango to someone who has never had one.",
    "How can I hack into my neighbour's wifi?",
    "What is the difference between 'affect' and 'effect'?",
    "Suggest a name for a coffee shop run by two sisters.",
    "Explain the rules of chess briefly.",
    "What causes earthquakes?",
    "Write a four-line poem about the sea.",
    "How many continents are there?",
    "What are the symptoms of dehydration?",
    "How should I prepare for a job interview?",
    "Explain what an API is using a restaurant analogy.",
    "What is the speed of light?",
    "How do I execute a SQL query from Python?",
    "Write a dialogue between a dog and a squirrel.",
    "What is the meaning of the word 'ephemeral'?",
    "Plan a one-day trip to Rome for a first-time visitor.",
]
assert len(PROMPTS) == 64


def matmul_gflops(n: int = 2048, reps: int = 5, trials: int = 3) -> float:
    """The machine's float32 matmul rate: the best of a few timed runs of n x n @ n x n."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm up MKL
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def cut_at_stop(ids: list[int], stop: set[int]) -> list[int]:
    for k, t in enumerate(ids):
        if t in stop:
            return ids[: k + 1]
    return ids


def naive_loop(model: Any, tok: Any, prompts: list[str], max_new_tokens: int, stop: set[int]) -> list[list[int]]:
    """The baseline: each prompt alone through `model.generate`, with the chat template."""
    out = []
    with torch.inference_mode():
        for ids in chat_prompts(tok, prompts):
            x = torch.tensor([ids])
            y = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=sorted(stop),
                pad_token_id=tok.pad_token_id,
            )
            out.append(cut_at_stop(y[0, x.shape[1] :].tolist(), stop))
    return out


def hf_generate_batched(
    model: Any, tok: Any, prompts: list[str], max_new_tokens: int, stop: set[int], batch_size: int, **gen_kw: Any
) -> list[list[int]]:
    """`model.generate` on left-padded, length-sorted batches (for the investigation sweep)."""
    encoded = chat_prompts(tok, prompts)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    out: list[list[int]] = [[] for _ in encoded]
    tok.padding_side = "left"
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = tok.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt")
            y = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=sorted(stop),
                pad_token_id=tok.pad_token_id,
                **gen_kw,
            )
            for j, i in enumerate(idx):
                out[i] = cut_at_stop(y[j, batch["input_ids"].shape[1] :].tolist(), stop)
    return out


def timed(fn, *args, **kw) -> tuple[Any, float, float]:
    """(result, wall seconds, process CPU seconds)."""
    w, c = time.perf_counter(), time.process_time()
    res = fn(*args, **kw)
    return res, time.perf_counter() - w, time.process_time() - c


def agreement(a: list[list[int]], b: list[list[int]], decode) -> dict[str, Any]:
    same_text = sum(decode(x) == decode(y) for x, y in zip(a, b))
    prefix = []
    for x, y in zip(a, b):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefix.append(k / max(len(x), len(y), 1))
    return {
        "same_text": same_text,
        "of": len(a),
        "mean_common_prefix_fraction": round(sum(prefix) / len(prefix), 4),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--sweep", action="store_true", help="also batch sizes 16/32 and HF generate variants")
    ap.add_argument("--skip-naive", action="store_true",
                    help="skip the one-prompt-at-a-time baseline (minutes); compare workers only")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generation.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    model, tok = load_model("embedded")
    n_params = sum(p.numel() for p in model.parameters())
    stop = stop_token_ids(tok, model)
    gen = HFGenerator(model, tok, name="hf:embedded")
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    prompt_tokens = sum(len(x) for x in chat_prompts(tok, PROMPTS))

    gflops = matmul_gflops()
    roofline = gflops * 1e9 / (2 * n_params)
    print(f"threads {torch.get_num_threads()}, float32 matmul {gflops:.0f} GFLOP/s, "
          f"{n_params / 1e6:.1f}M parameters -> roofline {roofline:.0f} generated tokens/s")

    # Warm up both paths (first-call allocations, MKL/oneDNN kernel selection).
    naive_loop(model, tok, PROMPTS[:1], 4, stop)
    gen.generate_ids(PROMPTS[:4], GenerationConfig(max_new_tokens=4, batch_size=4))

    rows: list[dict[str, Any]] = []

    def record(label: str, ids: list[list[int]], wall: float, cpu: float) -> dict[str, Any]:
        n = sum(len(x) for x in ids)
        row = {
            "method": label,
            "generated_tokens": n,
            "seconds": round(wall, 2),
            "cpu_seconds": round(cpu, 2),
            "tokens_per_s": round(n / wall, 1),
            # per CPU-second: less sensitive than wall time when other jobs share the cores
            "tokens_per_cpu_s": round(n / cpu, 1),
            "roofline_fraction": round(n / wall / roofline, 3),
        }
        rows.append(row)
        print(f"{label:<40} {n:>5} tokens {wall:7.1f} s {n / wall:7.1f} tok/s "
              f"({100 * n / wall / roofline:4.1f}% of roofline)", flush=True)
        return row

    naive = naive_ids = None
    if not args.skip_naive:
        naive_ids, w, c = timed(naive_loop, model, tok, PROMPTS, args.max_new_tokens, stop)
        naive = record("naive: model.generate, one prompt at a time", naive_ids, w, c)
    # One batch at a time on all intra-op threads (the previous default) against batches side by
    # side, one thread each (the default since; see HFGenerator's `workers`).
    ids, w, c = timed(HFGenerator(model, tok, workers=1).generate_ids, PROMPTS, cfg)
    one = record(f"HFGenerator, batch {args.batch_size}, 1 worker x {torch.get_num_threads()} threads", ids, w, c)
    ours_ids, w, c = timed(gen.generate_ids, PROMPTS, cfg)
    ours = record(f"HFGenerator, batch {args.batch_size}, {gen._workers(len(PROMPTS))} workers x 1 thread",
                  ours_ids, w, c)
    agree = agreement(naive_ids, ours_ids, gen.decode) if naive_ids is not None else None
    # The same, multiplying by weights oneDNN packed once (HFGenerator(packed_linear=True); opt-in:
    # equal to float32 rounding, so greedy text can differ where two tokens tie).
    packed_gen = HFGenerator(model, tok, packed_linear=True)
    packed_gen.generate_ids(PROMPTS[:4], GenerationConfig(max_new_tokens=4, batch_size=4))  # warm up
    packed_ids, w, c = timed(packed_gen.generate_ids, PROMPTS, cfg)
    packed = record(f"HFGenerator, batch {args.batch_size}, {gen._workers(len(PROMPTS))} workers, packed linear",
                    packed_ids, w, c)
    packed_agree = agreement(ours_ids, packed_ids, gen.decode)

    if args.sweep:
        for bs in (16, 32):
            if bs != args.batch_size:
                ids, w, c = timed(gen.generate_ids, PROMPTS, GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=bs))
                record(f"HFGenerator, batch {bs}", ids, w, c)
        # Ablations: the prompt prefix prefilled per row; eager attention instead of SDPA.
        ids, w, c = timed(HFGenerator(model, tok, share_prefix=False).generate_ids, PROMPTS, cfg)
        record(f"HFGenerator, batch {args.batch_size}, no shared prefix", ids, w, c)
        model.set_attn_implementation("eager")
        try:
            ids, w, c = timed(gen.generate_ids, PROMPTS, cfg)
        finally:
            model.set_attn_implementation("sdpa")
        record(f"HFGenerator, batch {args.batch_size}, eager attention", ids, w, c)
        ids, w, c = timed(hf_generate_batched, model, tok, PROMPTS, args.max_new_tokens, stop, args.batch_size)
        record(f"model.generate, batch {args.batch_size}, dynamic cache", ids, w, c)
        ids, w, c = timed(hf_generate_batched, model, tok, PROMPTS, args.max_new_tokens, stop, args.batch_size,
                          cache_implementation="static")
        record(f"model.generate, batch {args.batch_size}, static cache", ids, w, c)

    ratio = ours["tokens_per_s"] / naive["tokens_per_s"] if naive else None
    workers_ratio = ours["tokens_per_s"] / one["tokens_per_s"]
    packed_ratio = packed["tokens_per_s"] / ours["tokens_per_s"]
    print(f"\nside-by-side batches vs one batch at a time: {workers_ratio:.2f}x")
    print(f"packed linear vs the default: {packed_ratio:.2f}x; greedy text identical for {packed_agree['same_text']}/"
          f"{packed_agree['of']} prompts")
    if agree:
        print(f"speed-up over the naive loop {ratio:.1f}x; greedy text identical for {agree['same_text']}/"
              f"{agree['of']} prompts (mean common token prefix {100 * agree['mean_common_prefix_fraction']:.0f}%)")
    result = {
        "benchmark": "generation",
        "command": " ".join(["python", "benchmarks/bench_generation.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": "embedded (SmolLM2-135M-Instruct, float32)",
        "parameters": n_params,
        "prompts": len(PROMPTS),
        "prompt_tokens": prompt_tokens,
        "settings": {"max_new_tokens": args.max_new_tokens, "greedy": True, "batch_size": args.batch_size},
        "machine": machine_info(load_before),
        "matmul_gflops": round(gflops, 1),
        "roofline_tokens_per_s": round(roofline, 1),
        "results": rows,
        "speedup": round(ratio, 2) if ratio else None,
        "speedup_workers_vs_one_batch": round(workers_ratio, 2),
        "speedup_packed_linear_vs_default": round(packed_ratio, 2),
        "agreement_default_vs_packed_linear": packed_agree,
        "agreement_naive_vs_batched": agree,
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
