"""Tokenising chats for training and scoring, and sequence log-probabilities.

The one place where tactful turns (prompt, response) into token ids with a loss mask
and computes per-sequence log-probs: SFT, DPO, ShaPO, TRACE, SafeMoE and the
multiple-choice evaluator all use these functions, so a masking bug is fixed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from tactful.models import format_chat, format_prompt, messages_for

IGNORE_INDEX = -100
_SENTINEL = "\u2063TACTFUL_RESPONSE\u2063"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens: loss on response tokens only

    @property
    def n_response_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def response_suffix(tokenizer: Any) -> str:
    """What the chat template writes right after an assistant message (e.g. `<|im_end|>`).

    Found by rendering a sentinel reply, so it works for any template. Trailing
    whitespace is dropped: the model should learn to emit the end-of-turn token, not
    the newline the template puts after it.
    """
    cached = getattr(tokenizer, "_tactful_suffix", None)
    if cached is not None:
        return cached
    text = format_chat(tokenizer, messages_for("x", response=_SENTINEL), add_generation_prompt=False)
    suffix = text.split(_SENTINEL, 1)[1].rstrip() if _SENTINEL in text else ""
    if not suffix and tokenizer.eos_token:
        suffix = tokenizer.eos_token
    try:
        tokenizer._tactful_suffix = suffix
    except AttributeError:
        pass
    return suffix


def encode_example(
    tokenizer: Any,
    prompt: str,
    response: str,
    *,
    system: str | None = None,
    max_length: int | None = None,
    prompt_text: str | None = None,
) -> Encoded:
    """Token ids of the chat-formatted prompt followed by the response, with labels on the
    response (and its end-of-turn token) only.

    Prompt and response are tokenised separately and concatenated so the boundary
    never merges into one token; truncation cuts the response end, never the prompt start
    unless the prompt alone is too long (then its left side is cut).
    """
    if prompt_text is None:
        prompt_text = format_prompt(tokenizer, prompt, system=system)
    p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(response + response_suffix(tokenizer), add_special_tokens=False)["input_ids"]
    if max_length is not None and len(p_ids) + len(r_ids) > max_length:
        keep_prompt = min(len(p_ids), max(max_length // 2, max_length - len(r_ids)))
        p_ids = p_ids[len(p_ids) - keep_prompt:]
        r_ids = r_ids[: max_length - len(p_ids)]
    return Encoded(input_ids=p_ids + r_ids, labels=[IGNORE_INDEX] * len(p_ids) + list(r_ids))


def collate(batch: Sequence[Encoded], pad_token_id: int, *, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch into input_ids / attention_mask / labels tensors."""
    longest = max(len(e.input_ids) for e in batch)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of `labels` under `logits` (shifted by one), and the loss mask.

    Returns (logps [B, T-1], mask [B, T-1]); masked positions hold 0.
    """
    return target_logps(logits[:, :-1, :], labels[:, 1:])


def target_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target under the logits at the same position (no shift), and the mask of
    labelled ones; masked positions hold 0."""
    mask = targets != IGNORE_INDEX
    # float32: bf16 log-probs are too coarse for preference margins. logit - logsumexp avoids
    # materialising a second [B, T, vocab] log-softmax tensor (the vocab is 49k for SmolLM2).
    logits = logits.float()
    picked = torch.gather(logits, 2, targets.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)) * mask, mask


def _labelled_logits(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The model's logits at the columns where some row has a label (shifted by one), and the
    targets there: ([B, K, vocab], [B, K]); None when nothing is labelled.

    The columns go to the model as `logits_to_keep` (transformers' own argument: soft-capping
    and scaling stay the model's); a model without it gets the full logits, cut after."""
    targets = labels[:, 1:]
    cols = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
    if cols.numel() == 0:
        return None
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=cols).logits
    except TypeError as e:  # a custom model without logits_to_keep
        if "logits_to_keep" not in str(e):
            raise
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    if logits.shape[1] == input_ids.shape[1] and logits.shape[1] != cols.numel():  # the argument was ignored
        logits = logits[:, :-1][:, cols]
    return logits, targets[:, cols]


def labelled_token_logps(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `token_logps(model(...).logits, labels)`, but the vocabulary projection and its
    log-softmax run only at the columns where some row has a label.

    Scoring short continuations (multiple choice) needs the logits of a few positions per row;
    the full [B, T, vocab] tensor (vocab 49k for SmolLM2) costs more than the rest of the
    forward. Returns (logps [B, K], mask [B, K]) over the K kept columns; masked positions hold 0.
    """
    kept = _labelled_logits(model, input_ids, attention_mask, labels)
    if kept is None:
        empty = torch.zeros((labels.shape[0], 0))
        return empty, empty.bool()
    return target_logps(*kept)


def response_nll(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the labelled tokens, and their count: the SFT loss
    before normalising, with the vocabulary projection only at labelled columns.

    A chat example's prompt (template header, system prompt, request) is often half its tokens
    or more, and at 135M parameters the [tokens x 49k] projection and its backward are a fifth
    of a training step; the labelled columns of a length-grouped batch skip most of the prompt.
    Gradients equal those of the full-logits loss: unlabelled positions contribute zero there."""
    kept = _labelled_logits(model, input_ids, attention_mask, labels)
    if kept is None:  # nothing to learn from: a zero loss still connected to the graph
        zero = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
        return zero, torch.zeros((), dtype=torch.long)
    logits, targets = kept
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="sum")
    return nll, (targets != IGNORE_INDEX).sum()


def sequence_logps(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    average: bool = False,
) -> torch.Tensor:
    """Sum (or mean) log-prob of the labelled tokens of each sequence: shape [B]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logps, mask = token_logps(logits, labels)
    total = logps.sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total
