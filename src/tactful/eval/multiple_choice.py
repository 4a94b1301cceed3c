"""Multiple-choice scoring by log-likelihood (capability and TruthfulQA MC1/MC2).

As in lm-evaluation-harness: the context is "Question: ...\\nAnswer:", each choice is a
continuation " <choice>", and the model's answer is the choice with the highest
log-likelihood (`acc`) or the highest log-likelihood per byte (`acc_norm`). MC2 is the
normalised probability mass on the true answers. Contexts are scored once per item, in
length-sorted batches, and every choice continues from the context's KV cache, many items
per forward pass; a model with forward hooks or without a cache scores each (context, choice)
sequence whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from tactful.data.records import MCItem
from tactful.kv_cache import returned_cache, with_cache
from tactful.logprobs import IGNORE_INDEX, Encoded, collate, labelled_token_logps, target_logps


@dataclass
class MCScore:
    id: str
    logps: list[float]
    pred: int            # argmax of summed log-prob
    pred_norm: int       # argmax of log-prob per byte
    correct: bool
    correct_norm: bool
    mc2: float           # probability mass on the true answers


def mc_context(item: MCItem) -> str:
    ctx = f"{item.context.strip()}\n" if item.context else ""
    return f"{ctx}Question: {item.question.strip()}\nAnswer:"


def score_items(
    model: Any,
    tokenizer: Any,
    items: Sequence[MCItem],
    *,
    batch_size: int = 32,
    max_length: int = 512,
    progress: Callable[[int], None] | None = None,
    share_context: bool | None = None,
) -> list[MCScore]:
    """Score every item's choices. share_context: run each context once and continue every
    choice from its KV cache (None: when the model has no forward hooks, which may keep
    per-sequence state); the log-probs equal whole-sequence scoring up to float rounding."""
    from tactful.models import has_forward_hooks

    encoded = []
    for item in items:
        ctx = tokenizer(mc_context(item), add_special_tokens=False)["input_ids"]
        conts = [tokenizer(" " + c.strip(), add_special_tokens=False)["input_ids"] for c in item.choices]
        encoded.append((ctx, conts))
    auto = share_context is None
    if auto:
        share_context = not has_forward_hooks(model)
    with torch.inference_mode():
        try:
            score = _shared_context_logps if share_context else _whole_sequence_logps
            logps = score(model, tokenizer, encoded, batch_size, max_length, progress)
        except TypeError as e:  # a custom model without position ids, a cache or logits_to_keep
            if not (auto and share_context and "argument" in str(e)):
                raise
            logps = _whole_sequence_logps(model, tokenizer, encoded, batch_size, max_length, progress)
    out = []
    for i, item in enumerate(items):
        lps = [logps[(i, j)] for j in range(len(item.choices))]
        norms = [lp / max(1, len((" " + c.strip()).encode("utf-8"))) for lp, c in zip(lps, item.choices)]
        pred = max(range(len(lps)), key=lambda k: lps[k])
        pred_norm = max(range(len(norms)), key=lambda k: norms[k])
        out.append(MCScore(
            id=item.id or str(i), logps=lps, pred=pred, pred_norm=pred_norm,
            correct=pred in item.answers, correct_norm=pred_norm in item.answers, mc2=_mc2(lps, item.answers),
        ))
    return out


Encodings = Sequence[tuple[list[int], list[list[int]]]]


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _whole_sequence_logps(model: Any, tokenizer: Any, encoded: Encodings, batch_size: int, max_length: int,
                          progress: Callable[[int], None] | None) -> dict[tuple[int, int], float]:
    """Each (context, choice) sequence through the model on its own row."""
    requests: list[tuple[int, int, Encoded]] = []
    for i, (ctx, conts) in enumerate(encoded):
        for j, cont in enumerate(conts):
            ids = (ctx + cont)[-max_length:]
            n_cont = min(len(cont), len(ids) - 1)
            labels = [IGNORE_INDEX] * (len(ids) - n_cont) + ids[len(ids) - n_cont:]
            requests.append((i, j, Encoded(ids, labels)))
    order = sorted(range(len(requests)), key=lambda k: -len(requests[k][2].input_ids))
    logps: dict[tuple[int, int], float] = {}
    remaining = [len(conts) for _, conts in encoded]
    for start in range(0, len(order), batch_size):
        chunk = [requests[k] for k in order[start:start + batch_size]]
        batch = collate([c[2] for c in chunk], _pad_id(tokenizer))
        lp, _ = labelled_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        finished = 0
        for (i, j, _), s in zip(chunk, lp.sum(-1).tolist()):
            logps[(i, j)] = s
            remaining[i] -= 1
            finished += remaining[i] == 0
        if progress and finished:
            progress(finished)
    return logps


def _shared_context_logps(model: Any, tokenizer: Any, encoded: Encodings, batch_size: int, max_length: int,
                          progress: Callable[[int], None] | None) -> dict[tuple[int, int], float]:
    """Contexts once per item (left-padded, positions counting real tokens only, so a row sees
    what it would alone), then every choice from a copy of its item's cache rows: with four
    choices a context of ~40 tokens is run once instead of four times."""
    pad = _pad_id(tokenizer)
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    logps: dict[tuple[int, int], float] = {}
    start = 0
    while start < len(order):
        # Items until their choices fill a batch (at least one item).
        group, rows = [], 0
        while start < len(order) and (not group or rows + len(encoded[order[start]][1]) <= batch_size):
            group.append(order[start])
            rows += len(encoded[order[start]][1])
            start += 1
        # A context is cut on the left so that its longest choice still fits in max_length.
        ctxs = [encoded[i][0][-max(1, max_length - max(map(len, encoded[i][1]), default=0)):] for i in group]
        width = max(map(len, ctxs))
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, c in enumerate(ctxs):
            ids[r, width - len(c):] = torch.tensor(c)
            mask[r, width - len(c):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        res = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        # One row per (item, choice); each context's last logits predict its choices' first tokens.
        owner = [(r, i, j) for r, i in enumerate(group) for j in range(len(encoded[i][1]))]
        conts = [encoded[i][1][j] for _, i, j in owner]
        sel = torch.tensor([r for r, _, _ in owner], device=device)
        logits = res.logits[:, -1:][sel]
        longest = max(map(len, conts))
        if longest > 1:
            # The choices' other tokens, from a copy of their context's cache rows; inputs are
            # each continuation but its last token, right-padded.
            n = longest - 1
            cont_ids = torch.full((len(owner), n), pad, dtype=torch.long)
            cont_mask = torch.zeros((len(owner), n), dtype=torch.long)
            for k, cont in enumerate(conts):
                if len(cont) > 1:
                    cont_ids[k, : len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
                    cont_mask[k, : len(cont) - 1] = 1
            cont_ids, cont_mask = cont_ids.to(device), cont_mask.to(device)
            cache = returned_cache(res)
            cache.batch_select_indices(sel)
            cont_pos = mask[sel].sum(-1, keepdim=True) + torch.arange(n, device=device)[None]
            out = model(input_ids=cont_ids, attention_mask=torch.cat([mask[sel], cont_mask], dim=1),
                        position_ids=cont_pos, use_cache=True, **with_cache(model, cache))
            logits = torch.cat([logits, out.logits], dim=1)
        targets = torch.full((len(owner), logits.shape[1]), IGNORE_INDEX, dtype=torch.long)
        for k, cont in enumerate(conts):
            targets[k, : len(cont)] = torch.tensor(cont, dtype=torch.long)
        lp, _ = target_logps(logits, targets.to(device))
        for (_, i, j), total in zip(owner, lp.sum(-1).tolist()):
            logps[(i, j)] = total
        if progress:
            progress(len(group))
    return logps


def _mc2(logps: Sequence[float], answers: Sequence[int]) -> float:
    top = max(logps)
    probs = [math.exp(lp - top) for lp in logps]
    true_mass = sum(p for k, p in enumerate(probs) if k in answers)
    return true_mass / sum(probs)
