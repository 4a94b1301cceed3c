"""Multiple-choice scoring by log-likelihood (capability and TruthfulQA MC1/MC2).

As in lm-evaluation-harness: the context is "Question: ...\\nAnswer:", each choice is a
continuation " <choice>", and the model's answer is the choice with the highest
log-likelihood (`acc`) or the highest log-likelihood per byte (`acc_norm`). MC2 is the
normalised probability mass on the true answers. Continuations are scored in
length-sorted batches, many items per forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from tactful.data.records import MCItem
from tactful.logprobs import IGNORE_INDEX, Encoded, collate, labelled_token_logps


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
) -> list[MCScore]:
    requests: list[tuple[int, int, Encoded]] = []
    for i, item in enumerate(items):
        ctx_ids = tokenizer(mc_context(item), add_special_tokens=False)["input_ids"]
        for j, choice in enumerate(item.choices):
            cont = tokenizer(" " + choice.strip(), add_special_tokens=False)["input_ids"]
            ids = (ctx_ids + cont)[-max_length:]
            n_cont = min(len(cont), len(ids) - 1)
            labels = [IGNORE_INDEX] * (len(ids) - n_cont) + ids[len(ids) - n_cont:]
            requests.append((i, j, Encoded(ids, labels)))
    order = sorted(range(len(requests)), key=lambda k: -len(requests[k][2].input_ids))
    logps: dict[tuple[int, int], float] = {}
    done_items: set[int] = set()
    remaining = [len(it.choices) for it in items]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = [requests[k] for k in order[start:start + batch_size]]
            batch = collate([c[2] for c in chunk], pad)
            lp, _ = labelled_token_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            sums = lp.sum(-1).tolist()
            finished = 0
            for (i, j, _), s in zip(chunk, sums):
                logps[(i, j)] = s
                remaining[i] -= 1
                if remaining[i] == 0 and i not in done_items:
                    done_items.add(i)
                    finished += 1
            if progress and finished:
                progress(finished)
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


def _mc2(logps: Sequence[float], answers: Sequence[int]) -> float:
    top = max(logps)
    probs = [math.exp(lp - top) for lp in logps]
    true_mass = sum(p for k, p in enumerate(probs) if k in answers)
    return true_mass / sum(probs)
