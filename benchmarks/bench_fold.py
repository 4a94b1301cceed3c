"""Evaluating a LoRA-trained model: adapter kept separate vs folded into the weights.

    python benchmarks/bench_fold.py                          # a fresh r=16 adapter on every linear layer
    python benchmarks/bench_fold.py --adapter runs/sft/adapter   # a trained one
    python benchmarks/bench_fold.py --threads 1              # when other jobs share the cores

The evaluation runner folds a float32 LoRA adapter into the weights before it generates
(`tactful.models.merged_for_inference`). This measures why, on the embedded model with the
64 prompts of bench_generation.py, greedy decoding, the same HFGenerator on both sides:
generated tokens per wall second and per CPU-second, and whether the replies are identical.
Without --adapter the adapter is the SFT recipe's (r=16, alpha 32, q/k/v/o and the MLP) with
its B matrices drawn at random (seeded), so that it changes the replies as a trained one does.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from bench_generation import PROMPTS, agreement, timed  # noqa: E402  (benchmarks/ is the script's folder)
from machine import machine_info  # noqa: E402
from tactful.eval.generation import GenerationConfig, HFGenerator
from tactful.io import atomic_write_json
from tactful.models import attach_adapter, load_model, merged_for_inference

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(adapter: str | None, seed: int) -> Any:
    model, tok = load_model("embedded")
    if adapter:
        return attach_adapter(model, adapter), tok
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: the adapter would be a no-op
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    model.eval()
    return model, tok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", default=None, help="a trained LoRA adapter folder (default: a random one)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fold.json"))
    args = ap.parse_args(argv)
    if args.adapter and not Path(args.adapter, "adapter_config.json").is_file():
        print(f"error: --adapter {args.adapter}: no adapter_config.json there", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    model, tok = lora_model(args.adapter, args.seed)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    rows: list[dict[str, Any]] = []

    def run(label: str, m: Any) -> list[list[int]]:
        gen = HFGenerator(m, tok, name=label)
        gen.generate_ids(PROMPTS[:4], GenerationConfig(max_new_tokens=4, batch_size=4))  # warm-up
        ids, wall, cpu = timed(gen.generate_ids, PROMPTS, cfg)
        n = sum(len(x) for x in ids)
        rows.append({"method": label, "generated_tokens": n, "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
                     "tokens_per_s": round(n / wall, 1), "tokens_per_cpu_s": round(n / cpu, 1)})
        print(f"{label:<32} {n:>5} tokens {wall:7.1f} s {cpu:7.1f} CPU-s {n / cpu:7.1f} tokens per CPU-s", flush=True)
        return ids

    separate = run("adapter separate (PeftModel)", model)
    folded_model = merged_for_inference(model)
    if folded_model is model:
        print("error: this adapter cannot be folded in (not float32 LoRA)", file=sys.stderr)
        return 2
    folded = run("adapter folded in", folded_model)
    agree = agreement(separate, folded, lambda ids: tok.decode(ids, skip_special_tokens=True))
    speedup_cpu = rows[1]["tokens_per_cpu_s"] / rows[0]["tokens_per_cpu_s"]
    speedup_wall = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(f"\nfolded vs separate: {speedup_cpu:.2f}x per CPU-second, {speedup_wall:.2f}x wall; greedy text "
          f"identical for {agree['same_text']}/{agree['of']} prompts")
    atomic_write_json(args.out, {
        "benchmark": "fold",
        "command": " ".join(["python", "benchmarks/bench_fold.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": "embedded (SmolLM2-135M-Instruct, float32)",
        "adapter": args.adapter or f"random r=16 on {TARGETS}, B ~ N(0, 0.01^2), seed {args.seed}",
        "prompts": len(PROMPTS),
        "settings": {"max_new_tokens": args.max_new_tokens, "greedy": True, "batch_size": args.batch_size},
        "machine": machine_info(load_before),
        "results": rows,
        "speedup_per_cpu_s": round(speedup_cpu, 3),
        "speedup_wall": round(speedup_wall, 3),
        "agreement": agree,
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
