"""Data for the ShaPO experiment: PKU-SafeRLHF safety pairs split by prompt into training pairs
and held-out evaluation prompts, written once under runs/ and shared by every arm.

The source file (../shared/data/pku_saferlhf_test_safety_pairs_5k.json) holds PKU-SafeRLHF
pairs where exactly one response is safe, [safe, unsafe]; many prompts come with several
pairs. Splitting by pair would leak a held-out prompt into training through its other pairs,
so the split is by normalised prompt: a held-out prompt has no pair in training.

Nothing written here is committed (it is derived from a public data set); the committed
split.json holds only counts, hashes and settings.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

SOURCE_NAME = "pku-saferlhf-safety-pairs"


def prompt_key(prompt: str) -> str:
    """Prompts that differ only in case, spacing or trailing punctuation are the same prompt."""
    return re.sub(r"\s+", " ", prompt.lower()).strip().rstrip("?.!").strip()


def split_by_prompt(pairs: list[Any], holdout_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train pairs, held-out pairs): a seeded share of the distinct prompts is held out whole."""
    keys = sorted({prompt_key(p.prompt) for p in pairs})
    random.Random(seed).shuffle(keys)
    held = set(keys[:round(holdout_fraction * len(keys))])
    return ([p for p in pairs if prompt_key(p.prompt) not in held],
            [p for p in pairs if prompt_key(p.prompt) in held])


def one_per_prompt(pairs: list[Any], n: int, seed: int) -> list[Any]:
    """n pairs with distinct prompts where possible (more prompts seen per step), seeded."""
    rng = random.Random(seed)
    by_prompt: dict[str, list[Any]] = {}
    for p in pairs:
        by_prompt.setdefault(prompt_key(p.prompt), []).append(p)
    keys = sorted(by_prompt)
    rng.shuffle(keys)
    out = [rng.choice(by_prompt[k]) for k in keys[:n]]
    if len(out) < n:  # fewer prompts than wanted pairs: top up with the remaining pairs
        chosen = {id(p) for p in out}
        rest = [p for p in pairs if id(p) not in chosen]
        out += rng.sample(rest, min(n - len(out), len(rest)))
    return out


def fits(pairs: list[Any], tokenizer: Any, max_tokens: int) -> list[Any]:
    """Pairs whose chosen and rejected conversations both fit in max_tokens (chat template
    included): no truncated answer, and short batches, which is what the CPU budget allows."""
    from tactful.logprobs import encode_example

    def length(prompt: str, response: str) -> int:
        return len(encode_example(tokenizer, prompt, response, max_length=4 * max_tokens).input_ids)

    return [p for p in pairs if max(length(p.prompt, p.chosen), length(p.prompt, p.rejected)) <= max_tokens]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(source: Path, out: Path, *, n_train: int, max_tokens: int = 128, holdout_fraction: float = 0.2,
            split_seed: int = 0, model: str = "embedded") -> dict[str, Any]:
    """Write out/train_pairs.jsonl and out/heldout_prompts.jsonl once (kept while the settings
    and the source file are the same) and return the split's description. Training pairs are
    drawn from the training prompts' pairs that fit in max_tokens; held-out prompts are all kept."""
    from tactful.data.registry import load_benchmark
    from tactful.io import atomic_write_json, atomic_write_jsonl
    from tactful.models import load_tokenizer

    settings = {"source": source.name, "source_sha256": _sha256(source), "n_train": n_train,
                "max_tokens": max_tokens, "tokenizer": model, "holdout_fraction": holdout_fraction,
                "split_seed": split_seed, "split": "by normalised prompt"}
    info_path = out / "split.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("settings") == settings and (out / "train_pairs.jsonl").is_file():
            return info
    pairs = load_benchmark(SOURCE_NAME, path=str(source))
    train_pool, held = split_by_prompt(pairs, holdout_fraction, split_seed)
    short = fits(train_pool, load_tokenizer(model), max_tokens)
    train = one_per_prompt(short, n_train, split_seed)
    held_prompts: dict[str, Any] = {}
    for p in held:  # one evaluation item per held-out prompt, with its dataset safe answer for win rates
        held_prompts.setdefault(prompt_key(p.prompt), {"prompt": p.prompt, "label": "harmful", "id": p.id,
                                                       "source": SOURCE_NAME, "meta": {"reference": p.chosen}})
    rows = sorted(held_prompts.values(), key=lambda r: r["id"])
    atomic_write_jsonl(out / "train_pairs.jsonl", [p.to_dict() for p in train])
    atomic_write_jsonl(out / "heldout_prompts.jsonl", rows)
    info = {"settings": settings, "pairs_in_source": len(pairs),
            "prompts": {"train": len({prompt_key(p.prompt) for p in train_pool}), "heldout": len(rows)},
            "train_pool_pairs": len(train_pool), "train_pool_pairs_that_fit": len(short),
            "train_pairs": len(train), "train_pairs_distinct_prompts": len({prompt_key(p.prompt) for p in train}),
            "train_pairs_sha256": _sha256(out / "train_pairs.jsonl"),
            "heldout_prompts_sha256": _sha256(out / "heldout_prompts.jsonl")}
    atomic_write_json(info_path, info)
    return info


def probe_pairs(source: Path, out: Path, *, holdout_fraction: float = 0.2, split_seed: int = 0) -> dict[str, Any]:
    """Write out/probe_pairs.jsonl once: every labelled pair of the TRAINING prompts (no length
    filter, no one-per-prompt draw), for a probe fitted on every labelled response available
    (the official code fits its probe on all of PKU-SafeRLHF-30K's training responses). The
    held-out prompts stay out, so nothing about the evaluation prompts shapes the neuron mask."""
    from tactful.data.registry import load_benchmark
    from tactful.io import atomic_write_json, atomic_write_jsonl

    settings = {"source": source.name, "source_sha256": _sha256(source), "holdout_fraction": holdout_fraction,
                "split_seed": split_seed, "pairs": "every pair of the training prompts"}
    info_path = out / "probe_pairs.json"
    if info_path.is_file() and (out / "probe_pairs.jsonl").is_file():
        info = json.loads(info_path.read_text())
        if info.get("settings") == settings:
            return info
    train_pool, _ = split_by_prompt(load_benchmark(SOURCE_NAME, path=str(source)), holdout_fraction, split_seed)
    atomic_write_jsonl(out / "probe_pairs.jsonl", [p.to_dict() for p in train_pool])
    responses = {(p.prompt, r) for p in train_pool for r in (p.chosen, p.rejected)}
    info = {"settings": settings, "pairs": len(train_pool), "distinct_responses": len(responses),
            "prompts": len({prompt_key(p.prompt) for p in train_pool}),
            "sha256": _sha256(out / "probe_pairs.jsonl")}
    atomic_write_json(info_path, info)
    return info
