"""TRACE's alignment impact scoring against one training epoch, in one real TRACE run.

    python benchmarks/bench_trace.py --threads 1        # ~5 minutes on 2 busy cores

One `train_trace` run on the embedded model (SmolLM2-135M-Instruct, float32, CPU) with
TRACE's own defaults (LoRA r32 on q_proj / v_proj, beta 0.3, batch 4, max_length 256,
1 epoch, ghost impact scores, gold batch of up to 64 pairs) on built-in pairs that need no
generation (`builtin-terse-pairs` + `builtin-cautious-pairs`, `--pairs-per-source` each),
triaged offline under the `new-contextual` policy by the rule judge.

Timed inside the run, side by side, in wall time and in process CPU time (steadier when
other jobs share the cores):
- **scoring**: `score_impact` (the gold-batch gradient + one batched backward for the
  per-pair inner products), computed once per run;
- **epoch**: `Trainer.train` over the training pairs (INVERT + PUNISH + RETAIN).

The scoring cost is about (gold pairs + conflict pairs) forward/backward passes at the
reference parameters, once per run; an epoch is (training pairs) forward/backward passes
plus the reference forward for the KL term, per epoch. The ratio therefore depends on how
the gold batch compares with the training set: on a large data set (thousands of pairs,
gold batch 64) scoring is a small fraction of an epoch; on this small run the gold batch
is about as large as the training set, the worst case. Both counts are in the result file.

Writes benchmarks/results/trace.json (atomically).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import transformers

from tactful.io import atomic_write_json
from tactful.methods.trace import impact as impact_module
from tactful.methods.preference import PairDataSettings
from tactful.methods.trace.train import TraceConfig, TraceSettings, train_trace
from tactful.models import load_model
from machine import machine_info  # noqa: E402  (benchmarks/ is the script's folder)


def clocked(name: str, fn: Callable, clock: dict[str, tuple[float, float]]) -> Callable:
    """fn, recording its (wall, process CPU) seconds under `name`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kw: Any) -> Any:
        w, c = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kw)
        finally:
            clock[name] = (time.perf_counter() - w, time.process_time() - c)

    return wrapper


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs-per-source", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "trace.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    model, tok = load_model("embedded")
    # The run's own code paths, only wrapped with clocks: prepare_trace imports score_impact
    # from its module at call time, and TraceTrainer inherits Trainer.train.
    clock: dict[str, tuple[float, float]] = {}
    impact_module.score_impact = clocked("scoring", impact_module.score_impact, clock)
    transformers.Trainer.train = clocked("epoch", transformers.Trainer.train, clock)
    lines: list[str] = []

    def log(s: str) -> None:
        lines.append(s)
        print(s, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-trace-") as tmp:
        cfg = TraceConfig(model="embedded", output_dir=str(Path(tmp) / "run"),
                          data=PairDataSettings(sources=["builtin-terse-pairs", "builtin-cautious-pairs"],
                                                n=args.pairs_per_source))
        # string-xstest: the rule judge's refusal detector without loading MiniLM (triage is not timed)
        cfg.trace = TraceSettings(judge_options={"refusal": "string-xstest"})
        cfg.training.save_steps = 10_000  # no mid-epoch checkpoints inside the timed epoch
        cfg.training.logging_steps = 1
        t0 = time.perf_counter()
        _, run = train_trace(cfg, model=model, tokenizer=tok, log=log)
        total = time.perf_counter() - t0
        impact = json.loads((run.path / "impact_scores.json").read_text())
        train_log = json.loads((run.path / "train_log.json").read_text())
        manifest = json.loads((run.path / "manifest.json").read_text())

    (scoring_s, scoring_cpu), (epoch_s, epoch_cpu) = clock["scoring"], clock["epoch"]
    training = manifest["trace"]["training"]
    gold = sum(impact["gold"].values())
    ratio, ratio_cpu = scoring_s / epoch_s, scoring_cpu / epoch_cpu
    print(f"\nscoring {scoring_s:.1f} s (gold gradient over {gold} pairs + per-pair products over "
          f"{impact['n_scored']} pairs); one epoch {epoch_s:.1f} s over {training['pairs']} pairs "
          f"-> scoring / epoch {ratio:.2f}x wall, {ratio_cpu:.2f}x CPU time")
    result = {
        "benchmark": "trace",
        "command": " ".join(["python", "benchmarks/bench_trace.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": "embedded (SmolLM2-135M-Instruct, float32)",
        "settings": {"sources": cfg.data.sources, "pairs_per_source": args.pairs_per_source,
                     "lora": f"r{cfg.lora.r} alpha {cfg.lora.alpha} on {', '.join(cfg.lora.target_modules)}",
                     "batch_size": cfg.training.per_device_train_batch_size, "max_length": cfg.training.max_length,
                     "beta": cfg.loss.beta, "gold_batch_size": cfg.trace.gold_batch_size,
                     "scoring_batch_size": cfg.trace.scoring_batch_size, "policy": cfg.trace.policy,
                     "judge": manifest["trace"]["judge"]},
        "machine": machine_info(load_before),
        "triage": manifest["trace"]["triage"],
        "training_pairs": training,
        "gold_pairs": impact["gold"],
        "scored_pairs": impact["n_scored"],
        "scoring_method": impact["method"],
        "scoring_seconds": round(scoring_s, 2),
        "scoring_cpu_seconds": round(scoring_cpu, 2),
        "scoring_parts_seconds": impact["seconds"],
        "epoch_seconds": round(epoch_s, 2),
        "epoch_cpu_seconds": round(epoch_cpu, 2),
        "trainer_train_runtime": next((e["train_runtime"] for e in reversed(train_log) if "train_runtime" in e), None),
        "run_seconds": round(total, 1),
        "summary": {"scoring_vs_epoch_time": round(ratio, 3), "scoring_vs_epoch_cpu_time": round(ratio_cpu, 3),
                    "scoring_pairs_vs_epoch_pairs": round((gold + impact["n_scored"]) / training["pairs"], 3)},
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
