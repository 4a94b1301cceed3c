"""Where `tactful demo`'s time goes, each stage before and after this round's changes, in one run.

    python benchmarks/bench_demo.py               # ~5 minutes on 2 idle cores
    python benchmarks/bench_demo.py --steps 4     # fewer training steps per arm

Stages, each measured on the same machine in the same process:
- generation (the evaluations): the demo suites' first 64 harmful test prompts, greedy, 64 new
  tokens: one batch at a time on all intra-op threads (before) against batches side by side, one
  thread each (after); generated tokens/s and the share of the float32 roofline (matmul rate /
  2 x parameters per token).
- training (the alignment): `--steps` SFT steps of recipes/demo.yaml's data: padded to the longest
  example of a random batch at max_length 256 (before), length-grouped batches at max_length 192
  (then), and the same with the vocabulary projection only at labelled columns (after); real
  (non-pad) tokens/s, and the Trainer's own FLOP count (6 x parameters x padded tokens) per second
  against the float32 matmul rate.
- the base model's evaluation on a second demo: generated again (before) against read from the
  cache keyed by model, prompts and settings (after).

Writes benchmarks/results/demo.json (atomically). The demo's own stage times (the real job, end to
end) are in runs/demo/timings.json after `make demo`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tactful.eval.generation import GenerationConfig, HFGenerator
from tactful.io import atomic_write_json
from tactful.models import load_model
from machine import machine_info  # noqa: E402  (benchmarks/ is the script's folder)
from bench_generation import matmul_gflops  # noqa: E402


def bench_generation(model: Any, tok: Any, roofline: float) -> list[dict[str, Any]]:
    from tactful.data import builtin

    prompts = [r.prompt for r in builtin.harmful_prompts("test")[:64]]
    cfg = GenerationConfig(max_new_tokens=64, batch_size=64)
    HFGenerator(model, tok, workers=1).generate_ids(prompts[:4], GenerationConfig(max_new_tokens=4))  # warm up
    rows = []
    for label, workers in (("before: 1 batch at a time, all threads", 1), ("after: batches side by side", None)):
        gen = HFGenerator(model, tok, workers=workers)
        t = time.perf_counter()
        ids = gen.generate_ids(prompts, cfg)
        wall = time.perf_counter() - t
        n = sum(map(len, ids))
        rows.append({"stage": "generation", "arm": label, "workers": gen._workers(len(prompts)),
                     "generated_tokens": n, "seconds": round(wall, 2), "tokens_per_s": round(n / wall, 1),
                     "roofline_fraction": round(n / wall / roofline, 3)})
        print(f"generation  {label:<42} {n / wall:7.1f} tok/s ({100 * n / wall / roofline:.1f}% of roofline)",
              flush=True)
    return rows


def bench_training(steps: int, gflops: float) -> list[dict[str, Any]]:
    from tactful.methods.common import LoraSettings, TrainingSettings
    from tactful.methods.sft import SFTConfig, SFTData, train_sft

    from transformers import Trainer

    from tactful.methods import sft

    rows = []
    arms = (("before: random batches, max_length 256, full logits", 256, False, False),
            ("then: length-grouped, max_length 192, full logits", 192, True, False),
            ("after: length-grouped, max_length 192, logits at labelled columns", 192, True, True))
    for label, max_length, grouped, labelled_only in arms:
        original = sft.response_loss_trainer
        if not labelled_only:  # the model's own loss: vocabulary logits at every position
            sft.response_loss_trainer = lambda **kw: Trainer(**kw)
        model, tok = load_model("embedded")
        n_params = sum(p.numel() for p in model.parameters())
        with tempfile.TemporaryDirectory() as d:
            cfg = SFTConfig(output_dir=d, data=SFTData(benign=["builtin-benign"], refusals=["builtin-informative"],
                                                       extra=["builtin-seemingly-toxic-answers"], split="train"),
                            lora=LoraSettings(), training=TrainingSettings(
                                max_steps=steps, per_device_train_batch_size=8, max_length=max_length,
                                group_by_length=grouped, save_steps=10_000, logging_steps=1, report_to=[]),
                            resume=False)
            counter = _TokenCounter()
            t = time.perf_counter()
            try:
                train_sft(cfg, model=model, tokenizer=tok, callbacks=[counter.callback()], log=lambda s: None)
            finally:
                sft.response_loss_trainer = original
            wall = time.perf_counter() - t
        flops = 6 * n_params * counter.padded
        rows.append({"stage": "training", "arm": label, "steps": steps, "seconds": round(wall, 2),
                     "real_tokens": counter.real, "padded_tokens": counter.padded,
                     "real_tokens_per_s": round(counter.real / wall, 1),
                     "trainer_gflops_per_s": round(flops / wall / 1e9, 1),
                     "roofline_fraction": round(flops / wall / 1e9 / gflops, 3)})
        print(f"training    {label:<66} {counter.real / wall:7.1f} real tok/s, padding "
              f"{100 * (1 - counter.real / counter.padded):.0f}%, {flops / wall / 1e9:.0f} GFLOP/s "
              f"({100 * flops / wall / 1e9 / gflops:.0f}% of matmul rate)", flush=True)
    return rows


class _TokenCounter:
    """Counts the real and padded tokens of every batch the Trainer trains on."""

    def __init__(self) -> None:
        self.real = self.padded = 0

    def callback(self) -> Any:
        from transformers import TrainerCallback

        outer = self

        class Count(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
                def hook(module: Any, a: tuple, kwargs: dict) -> None:
                    mask = kwargs.get("attention_mask")
                    if mask is not None and module.training:
                        outer.real += int(mask.sum())
                        outer.padded += int(mask.numel())

                model.register_forward_pre_hook(hook, with_kwargs=True)

        return Count()


def bench_base_cache() -> list[dict[str, Any]]:
    from tactful import demo
    from tactful.eval.runner import EvalConfig, evaluate

    import shutil

    from tactful.models import tactful_home

    rows = []
    with tempfile.TemporaryDirectory() as d:
        suites, limit = ["safety"], 32
        # A key of its own, removed afterwards: the benchmark must not leave entries in the user's cache.
        key = f"bench-{os.getpid()}-{demo.base_eval_key(suites, limit)}"
        try:
            for label, run in (("before: generated", "run1"), ("after: from the cache", "run2")):
                out = Path(d) / run / "base-eval"
                demo.seed_from_cache(out, key)
                t = time.perf_counter()
                evaluate(EvalConfig(model="embedded", suites=suites, out=str(out), limit=limit))
                wall = time.perf_counter() - t
                demo.store_in_cache(out, key)
                rows.append({"stage": "base evaluation (32 prompts)", "arm": label, "seconds": round(wall, 2)})
                print(f"base eval   {label:<42} {wall:7.1f} s", flush=True)
        finally:
            shutil.rmtree(tactful_home() / "base-evals" / key, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="SFT steps per training arm")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "demo.json"))
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    model, tok = load_model("embedded")
    n_params = sum(p.numel() for p in model.parameters())
    gflops = matmul_gflops()
    roofline = gflops * 1e9 / (2 * n_params)
    print(f"threads {torch.get_num_threads()}, float32 matmul {gflops:.0f} GFLOP/s -> generation roofline "
          f"{roofline:.0f} tok/s", flush=True)
    rows = bench_generation(model, tok, roofline)
    rows += bench_training(args.steps, gflops)
    rows += bench_base_cache()
    result = {"benchmark": "demo stages",
              "command": " ".join(["python", "benchmarks/bench_demo.py", *(argv if argv is not None else sys.argv[1:])]),
              "model": "embedded (SmolLM2-135M-Instruct, float32)", "parameters": n_params,
              "machine": machine_info(load_before), "matmul_gflops": round(gflops, 1),
              "roofline_tokens_per_s": round(roofline, 1), "results": rows}
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
