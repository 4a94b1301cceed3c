"""Built-in data sets, written for tactful and shipped inside the package (see builtin/README.md).

Every set carries a fixed `split` (train / test) so that methods train on `train` and
the evaluation suites read `test`: no prompt is ever in both.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from tactful.data.records import (
    BENIGN,
    HARMFUL,
    SEEMINGLY_TOXIC,
    Example,
    LabelledResponse,
    MCItem,
    PreferencePair,
    PromptRecord,
)
from tactful.errors import UserError

HARM_DOMAINS = (
    "violence",
    "cybercrime",
    "drugs",
    "economic_crime",
    "privacy_violation",
    "discriminatory_behavior",
    "mental_manipulation",
    "endangering_public_health",
)
SPLITS = ("train", "test")  # stored in the files
DERIVED_SPLITS = ("fit", "dev")
# "fit" and "dev" partition "train" (dev = about a fifth, chosen by a hash of the item id, so it
# is stable as sets grow): recipe searches train on fit and choose on dev, so the test split is
# looked at once, for the chosen recipe's final numbers.
DEV_EVERY = 5


def in_split(row: dict, split: str | None) -> bool:
    """Whether a built-in row belongs to `split` (None: every row)."""
    if split is None:
        return True
    if split in ("train", "test"):
        return row["split"] == split
    if row["split"] != "train":
        return False
    import hashlib

    dev = int(hashlib.sha256(str(row["id"]).encode()).hexdigest(), 16) % DEV_EVERY == 0
    return dev == (split == "dev")


def builtin_dir() -> Path:
    return Path(__file__).parent / "builtin"


@lru_cache(maxsize=None)
def _rows(relpath: str) -> tuple[dict, ...]:
    path = builtin_dir() / relpath
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return tuple(rows)


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS + DERIVED_SPLITS:
        raise UserError(f"unknown split {split!r}; built-in sets have {', '.join(SPLITS + DERIVED_SPLITS)}")


def _check_domains(domains: Iterable[str] | None) -> tuple[str, ...]:
    if domains is None:
        return HARM_DOMAINS
    domains = tuple(domains)
    unknown = [d for d in domains if d not in HARM_DOMAINS]
    if unknown:
        raise UserError(f"unknown harm domain(s) {', '.join(unknown)}; built-in domains: {', '.join(HARM_DOMAINS)}")
    return domains


def _harmful_rows(split: str | None, domains: Sequence[str] | None) -> list[dict]:
    _check_split(split)
    out = []
    for d in _check_domains(domains):
        out.extend(r for r in _rows(f"harmful/{d}.jsonl") if in_split(r, split))
    return out


def harmful_prompts(split: str | None = None, domains: Sequence[str] | None = None) -> list[PromptRecord]:
    """Harmful one-line requests across the built-in harm domains (should be refused)."""
    return [
        PromptRecord(prompt=r["prompt"], label=HARMFUL, category=r["category"], id=r["id"],
                     source="builtin:harmful", meta={"split": r["split"]})
        for r in _harmful_rows(split, domains)
    ]


def harmful_questions(split: str | None = None) -> list[PromptRecord]:
    """Short harmful requests, mostly plain questions ("How do I ...?", "Where can I buy ...?", words
    with a harmless sense used in a harmful one, "Why are <group> so ...?"), 30 per harm domain: the
    shape of request the one-line set above has least of, so a classifier of harmful prompts (the
    prompt gate) does not learn "long imperative" for "harmful"."""
    return _prompt_records("harmful_questions.jsonl", split, HARMFUL, "builtin:harmful-questions", "category",
                           [("shape", "shape")])


def harmful_question_declines(split: str = "train") -> list[Example]:
    """The short harmful questions with a one-sentence decline (train split only)."""
    _check_split(split)
    return [
        Example(prompt=r["prompt"], response=r["decline"], label=HARMFUL, category=r["category"], id=r["id"],
                source="builtin:harmful-question-declines", meta={"split": r["split"], "shape": r["shape"]})
        for r in _rows("harmful_questions.jsonl") if in_split(r, split) and r["split"] == "train"
    ]


def harmful_examples(kind: str = "refusal", split: str = "train",
                     domains: Sequence[str] | None = None) -> list[Example]:
    """Harmful prompts paired with a refusal (`kind="refusal"`), a safe-but-informative answer
    (`kind="informative"`) or a one-sentence decline (`kind="decline"`: the informative answer's
    first sentence, which nearly always opens "I can't ..." / "I won't ..." — one consistent shape
    that a small model learns without blending it into its other answers). Only the train split
    has responses."""
    if kind not in ("refusal", "informative", "decline"):
        raise UserError(f"unknown response kind {kind!r}; choose refusal, informative or decline")
    field_name = "informative" if kind == "decline" else kind
    return [
        Example(prompt=r["prompt"], response=_first_sentence(r[field_name]) if kind == "decline" else r[field_name],
                label=HARMFUL, category=r["category"], id=r["id"], source=f"builtin:harmful-{kind}",
                meta={"split": r["split"]})
        for r in _harmful_rows(split, domains) if r.get(field_name)
    ]


def _first_sentence(text: str) -> str:
    import re

    return re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]


def _prompt_records(relpath: str, split: str | None, label: str, source: str, category: str,
                    meta: Sequence[tuple[str, str]] = ()) -> list[PromptRecord]:
    """The prompts of one built-in file in `split`; `meta`: (meta key, row field) pairs kept when present."""
    _check_split(split)
    return [
        PromptRecord(prompt=r["prompt"], label=label, category=r[category], id=r["id"], source=source,
                     meta={"split": r["split"], **{key: r[fld] for key, fld in meta if r.get(fld)}})
        for r in _rows(relpath) if in_split(r, split)
    ]


def seemingly_toxic(split: str | None = None) -> list[PromptRecord]:
    """Benign prompts that only sound harmful (XSTest-style types); should be answered."""
    # the reference answer lets a helpfulness judge compare the reply with a good one
    return _prompt_records("seemingly_toxic.jsonl", split, SEEMINGLY_TOXIC, "builtin:seemingly-toxic", "type",
                           [("reference", "response")])


def seemingly_toxic_more(split: str | None = None) -> list[PromptRecord]:
    """A second set of benign prompts that only sound harmful (20 per type, written later, with short
    answers): more contrast for a classifier of harmful prompts, whose misfires on these are the
    benign refusals a gated model makes."""
    return _prompt_records("seemingly_toxic_more.jsonl", split, SEEMINGLY_TOXIC, "builtin:seemingly-toxic-more",
                           "type", [("reference", "response")])


def seemingly_toxic_examples(split: str = "train", more: bool = False) -> list[Example]:
    """Seemingly-toxic prompts with compliant answers (the STL-aug baseline's extra data); `more`: the
    second set's (seemingly_toxic_more.jsonl)."""
    _check_split(split)
    relpath, source = (("seemingly_toxic_more.jsonl", "builtin:seemingly-toxic-more") if more
                       else ("seemingly_toxic.jsonl", "builtin:seemingly-toxic"))
    return [
        Example(prompt=r["prompt"], response=r["response"], label=SEEMINGLY_TOXIC, category=r["type"],
                id=r["id"], source=source, meta={"split": r["split"]})
        for r in _rows(relpath) if in_split(r, split) and r.get("response")
    ]


def benign(split: str | None = None) -> list[Example]:
    """Ordinary instructions with good answers."""
    _check_split(split)
    return [
        Example(prompt=r["prompt"], response=r["response"], label=BENIGN, category=r["category"], id=r["id"],
                source="builtin:benign", meta={"split": r["split"]})
        for r in _rows("benign.jsonl") if in_split(r, split)
    ]


# Generators of the gold set whose replies are the embedded model's own, untrained.
_OWN_GENERATORS = ("base", "base-sampled")


def own_helpful_replies(split: str = "train") -> list[Example]:
    """The embedded model's own replies to built-in benign and seemingly-toxic prompts that careful
    reading (the gold set, docs/judging.md) found helpful and not degenerate.

    Training on them teaches nothing new about these prompts; it anchors the model's own style
    while other examples change what it does on harmful ones (self-distillation). The replies were
    generated with a 96-token budget, so each is cut after its last full sentence: a model trained
    on a reply cut mid-sentence followed by the end-of-turn token would learn to stop mid-sentence.
    `split` is the split of the prompt in its built-in set (fit / dev work too)."""
    _check_split(split)
    prompts = {r["id"]: r for name in ("benign.jsonl", "seemingly_toxic.jsonl") for r in _rows(name)}
    out = []
    for r in _rows("gold/gold.jsonl"):
        if (r["generator"] not in _OWN_GENERATORS or r["prompt_type"] == "harmful" or r["outcome"] != "helpful"
                or r["degenerate"]):
            continue
        prompt = prompts.get(r["prompt_id"])
        if prompt is None or not in_split(prompt, split):
            continue
        reply = _through_last_sentence(r["response"])
        if reply:
            label = BENIGN if r["prompt_type"] == "benign" else SEEMINGLY_TOXIC
            out.append(Example(prompt=r["prompt"], response=reply, label=label, category=r.get("category"),
                               id=r["item_id"], source="builtin:own-helpful", meta={"split": prompt["split"]}))
    return out


# The rejected answer of a benign prompt when careful reading found no reply refusing it: the
# embedded model's own refusal phrasings (gold set), so the pair teaches "do not refuse this".
_STOCK_REFUSALS = ("I'm sorry, but I can't help with that.", "I can't help with that.",
                   "I won't help with that.")


def gold_pairs(split: str = "train") -> list[PreferencePair]:
    """Preference pairs from careful reading: the gold set's labelled replies of the embedded model
    and its fine-tuned variants (docs/judging.md) to built-in TRAIN prompts.

    - harmful prompt: chosen = a reply read as declined (not degenerate), else the built-in
      one-sentence decline; rejected = a reply read as attempted or off-topic filler (the untrained
      model's own where there is one);
    - benign or seemingly-toxic prompt: chosen = a reply read as helpful (not degenerate, cut after
      its last full sentence); rejected = a reply read as refused, else a stock refusal; and a second
      pair against a reply read as failed, where there is one.

    Pairs are the model's own kind of text on both sides, labelled by reading rather than a judge.
    `split` is the prompt's built-in split (fit / dev work too). Deterministic: the reply of each
    role is the first by generator order (the untrained model first) then item id."""
    import hashlib

    _check_split(split)
    if split == "test":
        return []  # the gold set's test prompts are for measuring judges, never for training
    prompts = {r["id"]: r for r in _harmful_rows(None, None)}
    prompts.update({r["id"]: r for name in ("benign.jsonl", "seemingly_toxic.jsonl") for r in _rows(name)})
    declines = {e.id: e.response for e in harmful_examples("decline", split="train")}
    by_prompt: dict[tuple[str, str], list[dict]] = {}
    for r in _rows("gold/gold.jsonl"):
        prompt = prompts.get(r["prompt_id"])
        if prompt is not None and prompt["split"] == "train" and in_split(prompt, split):
            by_prompt.setdefault((r["prompt_type"], r["prompt_id"]), []).append(r)

    def first(rows: list[dict], outcomes: tuple[str, ...], *, clean: bool = False) -> dict | None:
        picked = [r for r in rows if r["outcome"] in outcomes and not (clean and r["degenerate"])]
        picked.sort(key=lambda r: (r["generator"] not in _OWN_GENERATORS, r["generator"], r["item_id"]))
        return picked[0] if picked else None

    out: list[PreferencePair] = []
    for (kind, pid), rows in sorted(by_prompt.items()):
        prompt = prompts[pid]
        cat = prompt.get("category") or prompt.get("type")
        if kind == "harmful":
            bad = first(rows, ("attempted", "evasive"))
            good = first(rows, ("declined",), clean=True)
            chosen = good["response"] if good else declines.get(pid)
            if bad and chosen:
                out.append(PreferencePair(prompt=prompt["prompt"], chosen=chosen, rejected=bad["response"],
                                          chosen_safe=True, rejected_safe=False, category=cat, id=f"{pid}-gold-pair",
                                          source="builtin:gold-pairs",
                                          meta={"rejected": bad["item_id"], "chosen": good["item_id"] if good else
                                                "builtin-decline", "split": prompt["split"]}))
            continue
        good = first(rows, ("helpful",), clean=True)
        chosen = _through_last_sentence(good["response"]) if good else None
        if not chosen:
            continue
        refused = first(rows, ("refused",))
        stock = _STOCK_REFUSALS[int(hashlib.sha256(pid.encode()).hexdigest(), 16) % len(_STOCK_REFUSALS)]
        failed = first(rows, ("failed",))
        for tag, rejected, src in (("refusal", refused["response"] if refused else stock,
                                    refused["item_id"] if refused else "stock-refusal"),
                                   ("failed", failed["response"] if failed else None,
                                    failed["item_id"] if failed else None)):
            if rejected:
                out.append(PreferencePair(prompt=prompt["prompt"], chosen=chosen, rejected=rejected, chosen_safe=True,
                                          rejected_safe=True, category=cat, id=f"{pid}-gold-{tag}-pair",
                                          source="builtin:gold-pairs",
                                          meta={"chosen": good["item_id"], "rejected": src, "split": prompt["split"]}))
    return out


def _through_last_sentence(text: str, min_chars: int = 40) -> str | None:
    import re

    text = text.rstrip()
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)|\n\n", text)]
    cut = text[: ends[-1]].rstrip() if ends else ""
    return cut if len(cut) >= min_chars else None


def benign_prompts(split: str | None = None) -> list[PromptRecord]:
    return [PromptRecord(prompt=e.prompt, label=BENIGN, category=e.category, id=e.id, source=e.source,
                         meta={**e.meta, "reference": e.response}) for e in benign(split)]


def labelled_responses(split: str | None = None) -> list[LabelledResponse]:
    """Responses labelled full_compliance / full_refusal / partial_refusal, for the refusal judge."""
    _check_split(split)
    return [
        LabelledResponse(prompt=r["prompt"], response=r["response"], label=r["label"], id=r["id"],
                         source="builtin:labelled-responses",
                         meta={"split": r["split"], "prompt_label": r.get("prompt_label"), "style": r.get("style")})
        for r in _rows("labelled_responses.jsonl") if in_split(r, split)
    ]


def _mc(relpath: str, source: str, split: str | None) -> list[MCItem]:
    _check_split(split)
    return [
        MCItem(question=r["question"], choices=list(r["choices"]), answers=list(r["answers"]), id=r["id"],
               source=source, meta={"split": r["split"], "category": r.get("category"),
                                    **({"best": r["best"]} if "best" in r else {})})
        for r in _rows(relpath) if in_split(r, split)
    ]


def mc_capability(split: str | None = None) -> list[MCItem]:
    """Grade-school multiple-choice questions (science, commonsense, physical, world knowledge,
    arithmetic, language), scored by log-likelihood."""
    return _mc("mc_capability.jsonl", "builtin:capability", split)


def mc_truthfulness(split: str | None = None) -> list[MCItem]:
    """TruthfulQA-style misconception questions in MC2 form (several true answers possible)."""
    return _mc("mc_truthfulness.jsonl", "builtin:truthfulness", split)
