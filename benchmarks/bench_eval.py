"""The demo's evaluation stage before and after this round's changes, in one run.

    python benchmarks/bench_eval.py                 # ~9 minutes on 2 idle cores
    python benchmarks/bench_eval.py --skip-generation

Measured on the embedded model (SmolLM2-135M-Instruct, float32), the demo's own suites:
- multiple choice (the demo's 180 capability questions): each (question, choice) sequence whole with
  logits over the whole vocabulary at every position (before); the same with `labelled_token_logps`,
  which projects onto the vocabulary only at the columns that hold a continuation token (then); each
  question's context run once and every choice continued from its KV cache (after). Same
  predictions required.
- generation (the demo's five generative suites, 379 prompts, greedy, 64 new tokens): suite by suite,
  as the runner did (before), against every suite's prompts pooled into shared, length-sorted batches
  (after). Reports wall time, generated tokens/s and how many replies are identical.
- converting the embedded GGUF into the float model cache (the first demo on a machine): transformers'
  GGUF loader as it is (before) against the same loader with its parse and name-map work memoised
  (after). Same weights required.

Writes benchmarks/results/eval.json (atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tactful.io import atomic_write_json
from machine import machine_info  # noqa: E402  (benchmarks/ is the script's folder)


def demo_suites(d: Path) -> list[str]:
    from tactful import demo

    sub = demo.write_subsampled_suites(d)
    suites = [sub.get(n, n) for n in demo.DEMO_SUITES]
    csv = demo.find_public_file(None)
    if csv is not None:
        suites += demo.write_public_suites(csv, d)
    return suites


def bench_mc(model: Any, tok: Any) -> list[dict[str, Any]]:
    from tactful.eval import multiple_choice as mc
    from tactful.eval.runner import load_suite_records
    from tactful.eval.suites import load_suite
    from tactful.logprobs import token_logps

    items = load_suite_records(load_suite("capability"))

    def full_logits(model: Any, input_ids: Any, attention_mask: Any, labels: Any) -> Any:
        return token_logps(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)

    rows, preds = [], {}
    arms = (("before: whole sequences, logits at every position", full_logits, False),
            ("then: whole sequences, logits at continuation columns", mc.labelled_token_logps, False),
            ("after: each context once, choices from its KV cache", mc.labelled_token_logps, True))
    for label, fn, share in arms:
        original = mc.labelled_token_logps
        mc.labelled_token_logps = fn
        try:
            t = time.perf_counter()
            scores = mc.score_items(model, tok, items, batch_size=64, share_context=share)
            wall = time.perf_counter() - t
        finally:
            mc.labelled_token_logps = original
        preds[label] = [s.pred for s in scores]
        rows.append({"stage": "multiple choice", "arm": label, "items": len(items), "seconds": round(wall, 2),
                     "accuracy": round(sum(s.correct for s in scores) / len(scores), 4)})
        print(f"MC          {label:<54} {wall:6.1f} s  accuracy {rows[-1]['accuracy']:.4f}", flush=True)
    a, *others = preds.values()
    for row, b in zip(rows[1:], others):
        row["same_predictions"] = sum(x == y for x, y in zip(a, b))
    print(f"MC          same prediction on {rows[-1]['same_predictions']}/{len(a)} items", flush=True)
    return rows


def bench_generation(model: Any, tok: Any, suites: list[str], d: Path) -> list[dict[str, Any]]:
    from tactful.eval.generation import HFGenerator
    from tactful.eval.runner import EvalConfig, Evaluator
    from tactful.eval.suites import load_suite

    generative = [s for s in suites if load_suite(s).generates]
    gen = HFGenerator(model, tok)
    rows, replies = [], {}
    for label, groups in (("before: suite by suite", [[s] for s in generative]),
                          ("after: all suites in shared batches", [generative])):
        out = d / label.split(":")[0]
        t = time.perf_counter()
        for group in groups:  # a one-suite Evaluator generates as the runner did before pooling
            Evaluator(EvalConfig(model="embedded", suites=group, out=str(out), judge="string-xstest"),
                      model=model, tokenizer=tok, generator=gen).run()
        wall = time.perf_counter() - t
        texts = {}
        for s in generative:
            name = load_suite(s).name
            for line in (out / name / "generations.jsonl").read_text().splitlines():
                row = json.loads(line)
                texts[(name, row["id"])] = row["response"]
        replies[label] = texts
        n_tok = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts.values())
        rows.append({"stage": "generation", "arm": label, "prompts": len(texts), "seconds": round(wall, 2),
                     "reply_tokens": n_tok, "tokens_per_s": round(n_tok / wall, 1)})
        print(f"generation  {label:<44} {wall:6.1f} s  {n_tok / wall:6.1f} reply tok/s  ({len(texts)} prompts)",
              flush=True)
    a, b = replies.values()
    rows[-1]["identical_replies"] = sum(a[k] == b.get(k) for k in a)
    print(f"generation  identical replies {rows[-1]['identical_replies']}/{len(a)}", flush=True)
    return rows


def bench_conversion() -> list[dict[str, Any]]:
    from tactful import models

    rows, weights = [], {}
    for label, fast in (("before: transformers' GGUF loader as is", False),
                        ("after: parse and name maps memoised", True)):
        with tempfile.TemporaryDirectory() as home:
            original = models._memoised_gguf_loading
            if not fast:
                models._memoised_gguf_loading = contextlib.nullcontext
            try:
                t = time.perf_counter()
                path = models.local_model_dir(models.EMBEDDED, home=Path(home))
                wall = time.perf_counter() - t
            finally:
                models._memoised_gguf_loading = original
            from safetensors.torch import load_file

            weights[label] = load_file(str(path / "model.safetensors"))
        rows.append({"stage": "model conversion", "arm": label, "seconds": round(wall, 2)})
        print(f"conversion  {label:<44} {wall:6.1f} s", flush=True)
    a, b = weights.values()
    rows[-1]["same_weights"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"conversion  same weights: {rows[-1]['same_weights']}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--skip-conversion", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "eval.json"))
    args = ap.parse_args()
    load_before = os.getloadavg()
    from tactful.models import load_model

    rows: list[dict[str, Any]] = []
    if not args.skip_conversion:
        rows += bench_conversion()
    model, tok = load_model("embedded")
    model.eval()
    rows += bench_mc(model, tok)
    if not args.skip_generation:
        with tempfile.TemporaryDirectory() as d:
            rows += bench_generation(model, tok, demo_suites(Path(d)), Path(d))
    atomic_write_json(Path(args.out), {"machine": machine_info(load_before), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
