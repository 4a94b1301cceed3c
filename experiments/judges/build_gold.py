"""Build the unlabelled half of tactful's gold set: real replies of the embedded model and of
variants trained with tactful's own methods, on train-side built-in prompts.

    python experiments/judges/build_gold.py            # trains the variants, generates, writes
    python experiments/judges/build_gold.py --only-generate base base-sampled

Every variant is a `tactful train` run under runs/gold/<name> (resumes); every generator's
replies go to runs/gold/replies/<name>.jsonl (a finished file is skipped), and the union is
written to runs/gold/items.jsonl: one row per (prompt, generator), ready to label by the
rubric in docs/judging.md. Only built-in prompts are used (never public benchmark text: the
gold set ships inside the package), and only their `train` split (the evaluation suites read
`test`), so no judge is fit on a prompt the suites evaluate.

Generators (each answers a balanced random subset of the prompts):
  base             the embedded model, greedy
  base-sampled     the embedded model, temperature 1.0, top-p 0.95
  dcr-sft          DCR stage 1 + safety SFT (the demo's recipe and budget)
  sft-refusal      safety SFT with refusals making up 80% of the mix, lr 3e-4 (over-refuses)
  sft-informative  SFT on informative declines (safe redirection) + seemingly-toxic answers + benign
  sft-overtrained  safety SFT at lr 3e-3 (degenerates: loops, word salad)
  safety-sft       the safety-SFT start that the refusal-guard, DCR, ShaPO and TRACE experiments share
                   (experiments/common.safety_sft_start, seed 0); added after a blind audit found the
                   judge calling its "I'll help you <request>." template a refusal
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "runs" / "gold"

# name -> (recipe, overrides); None = the bare embedded model
VARIANTS: dict[str, tuple[str, list[str]] | None] = {
    "base": None,
    "base-sampled": None,
    "dcr-sft": ("dcr.yaml", ["stage1.training.num_train_epochs=1", "stage1.gradient_coupling=false",
                             "sft.training.max_steps=30", "sft.training.max_length=192"]),
    "sft-refusal": ("sft.yaml", ["data.harmful_fraction=0.8", "training.learning_rate=3e-4",
                                 "training.max_steps=25", "training.max_length=192"]),
    "sft-informative": ("sft.yaml", ["data.refusals=[builtin-informative]",
                                     "data.extra=[builtin-seemingly-toxic-answers]",
                                     "training.max_steps=25", "training.max_length=256"]),
    "sft-overtrained": ("sft.yaml", ["training.learning_rate=3e-3", "training.max_steps=25",
                                     "training.max_length=192"]),
    "safety-sft": ("sft.yaml", ["training.max_steps=62"]),
}
# prompts per generator, by prompt type (the bare model 350, each trained variant 325: 2,000 in all)
PER_GENERATOR = {"harmful": 150, "seemingly_toxic": 100, "benign": 100}
PER_VARIANT = {"harmful": 140, "seemingly_toxic": 90, "benign": 95}
MAX_NEW_TOKENS = 96


def prompt_pool() -> dict[str, list[dict]]:
    from tactful.data import builtin

    return {
        "harmful": [{"prompt_id": r.id, "prompt": r.prompt, "prompt_type": "harmful", "category": r.category}
                    for r in builtin.harmful_prompts("train")],
        "seemingly_toxic": [{"prompt_id": r.id, "prompt": r.prompt, "prompt_type": "seemingly_toxic",
                             "category": r.category} for r in builtin.seemingly_toxic("train")],
        "benign": [{"prompt_id": r.id, "prompt": r.prompt, "prompt_type": "benign", "category": r.category}
                   for r in builtin.benign_prompts("train")],
    }


def assignment(name: str, pool: dict[str, list[dict]]) -> list[dict]:
    """A balanced random subset of the pool for one generator (seeded by its name)."""
    rng = random.Random(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    rows = []
    for kind, n in (PER_GENERATOR if VARIANTS[name] is None else PER_VARIANT).items():
        rows += rng.sample(pool[kind], min(n, len(pool[kind])))
    return rows


def train_variant(name: str) -> Path | None:
    spec = VARIANTS[name]
    if spec is None:
        return None
    sys.path.insert(0, str(ROOT / "experiments"))
    from common import train

    recipe, overrides = spec
    return train(recipe, OUT / name, ["seed=0", *overrides])


def generate(name: str, run: Path | None, rows: list[dict]) -> None:
    from tactful.eval.generation import GenerationConfig, make_generator
    from tactful.io import atomic_write_text

    dest = OUT / "replies" / f"{name}.jsonl"
    if dest.exists():
        return
    sampled = name.endswith("-sampled")
    cfg = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=sampled, temperature=1.0,
                           top_p=0.95 if sampled else 1.0, seed=0, batch_size=32)
    gen = (make_generator("hf", run=run) if run is not None else make_generator("hf", model_spec="embedded"))
    t0 = time.time()
    replies = gen.generate([r["prompt"] for r in rows], cfg)
    out = [{**r, "generator": name, "decoding": "sampled" if sampled else "greedy", "response": reply}
           for r, reply in zip(rows, replies)]
    atomic_write_text(dest, "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in out))
    print(f"[gold] {name}: {len(out)} replies in {time.time() - t0:.0f}s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only-generate", nargs="*", default=None, help="generators to run (default: all)")
    args = ap.parse_args()
    names = args.only_generate or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown generator(s) {unknown}; choose from {list(VARIANTS)}")
    pool = prompt_pool()
    for name in names:
        t0 = time.time()
        run = train_variant(name)
        if run is not None:
            print(f"[gold] trained {name} in {time.time() - t0:.0f}s", flush=True)
        generate(name, run, assignment(name, pool))
    from tactful.io import atomic_write_text

    items = []
    for name in VARIANTS:
        f = OUT / "replies" / f"{name}.jsonl"
        if f.exists():
            items += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    for it in items:  # a generator answers each prompt at most once
        it["item_id"] = f"{it['generator']}:{it['prompt_id']}"
    atomic_write_text(OUT / "items.jsonl", "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in items))
    print(f"[gold] {len(items)} items -> {OUT / 'items.jsonl'}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
