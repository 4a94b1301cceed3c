"""The paper's head-level view: which attention heads carry truthfulness, which carry refusal.

Contrastive influence of head (l, h) on a set of (prompt, good, bad) completions:

    margin(x)   = log P(good | x) - log P(bad | x)
    I(l, h)     = mean over pairs of  margin_full - margin_without_head(l, h)

A head is removed by zeroing its slice of the o_proj input (z[..., h*d:(h+1)*d] = 0),
which is exactly "this head contributes nothing to the layer output". Scored twice:
truthfulness pairs (right vs wrong answer) and refusal pairs (a refusal vs a harmful
compliance); heads near the top of both rankings are the overlap the paper blames for the
trade-off.

Cost: one batched scoring pass per (layer, head) and pair set; restrict `layers` on big
models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from tactful.data.records import Example, MCItem, PromptRecord
from tactful.errors import UserError
from tactful.logprobs import collate, encode_example, sequence_logps
from tactful.methods.refusal_guard.capture import attention_sites, head_layout, projection_in_features

DEFAULT_COMPLIANCE = "Sure, here is how to do that. First,"


@dataclass
class ContrastPair:
    prompt: str
    good: str  # the completion the model should prefer (correct answer / refusal)
    bad: str  # the one it should not (incorrect answer / harmful compliance)


@dataclass
class HeadScores:
    layers: list[int]
    n_heads: int
    truthfulness: list[list[float]]  # [len(layers)][n_heads]
    refusal: list[list[float]]
    overlap: list[tuple[int, int]] = field(default_factory=list)  # (layer, head) in the top of both
    top_k: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "n_heads": self.n_heads, "truthfulness": self.truthfulness,
                "refusal": self.refusal, "overlap": [list(x) for x in self.overlap], "top_k": self.top_k}


def truthfulness_pairs(items: Sequence[MCItem]) -> list[ContrastPair]:
    """One pair per item: the best (or first) correct answer vs the first incorrect one."""
    out = []
    for it in items:
        best = it.meta.get("best")
        good = it.choices[best] if isinstance(best, int) and best in it.answers else it.choices[it.answers[0]]
        bad = next((c for i, c in enumerate(it.choices) if i not in it.answers), None)
        if bad is not None:
            out.append(ContrastPair(it.question, good, bad))
    return out


def refusal_pairs(harmful: Sequence[Example | PromptRecord], *, refusal: str = "I'm sorry, but I can't help with that.",
                  compliance: str = DEFAULT_COMPLIANCE) -> list[ContrastPair]:
    """A refusal vs a harmful compliance per harmful prompt. An example's own refusal is used
    when it has one; a benchmark target (AdvBench's "Sure, here is ...") is the compliance when known."""
    out = []
    for r in harmful:
        good = r.response if isinstance(r, Example) else refusal
        bad = (r.meta or {}).get("target") or compliance
        out.append(ContrastPair(r.prompt, good, bad))
    return out


def _pair_batches(tokenizer: Any, pairs: Sequence[ContrastPair], batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    """Batches holding each pair's good then bad sequence (2 * n rows per batch)."""
    batches = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        enc = [encode_example(tokenizer, p.prompt, p.good, max_length=max_length) for p in chunk]
        enc += [encode_example(tokenizer, p.prompt, p.bad, max_length=max_length) for p in chunk]
        batches.append(collate(enc, tokenizer.pad_token_id))
    return batches


@torch.no_grad()
def _margins(model: Any, batches: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    for b in batches:
        lp = sequence_logps(model, b["input_ids"].to(device), b["attention_mask"].to(device), b["labels"].to(device))
        n = len(lp) // 2
        out.append(lp[:n] - lp[n:])
    return torch.cat(out).float().cpu()


def head_influence(model: Any, tokenizer: Any, pairs: Sequence[ContrastPair], *, layers: Sequence[int] | None = None,
                   batch_size: int = 8, max_length: int = 256,
                   progress: Callable[[str], None] | None = None) -> tuple[list[int], torch.Tensor]:
    """(layers, I [len(layers), n_heads]): mean drop in the good-vs-bad margin when a head is removed."""
    if not pairs:
        raise UserError("no contrast pairs to score heads on")
    sites = attention_sites(model, layers, value=False)
    lay = head_layout(model)
    d_in = projection_in_features(sites[0].out_proj)
    if d_in != lay.d_in:
        raise UserError(f"the o_proj input has {d_in} features, not n_heads * head_dim = {lay.d_in}: "
                        "cannot split it into heads")
    was_training = model.training
    model.eval()
    batches = _pair_batches(tokenizer, pairs, batch_size, max_length)
    full = _margins(model, batches)
    scores = torch.zeros(len(sites), lay.n_heads)
    try:
        for li, site in enumerate(sites):
            for h in range(lay.n_heads):
                sl = slice(h * lay.head_dim, (h + 1) * lay.head_dim)

                def ablate(_mod: Any, args: tuple, kwargs: dict, *, sl: slice = sl) -> tuple:
                    z = args[0].clone()
                    z[..., sl] = 0
                    return (z, *args[1:]), kwargs

                handle = site.out_proj.register_forward_pre_hook(ablate, with_kwargs=True)
                try:
                    scores[li, h] = (full - _margins(model, batches)).mean()
                finally:
                    handle.remove()
            if progress:
                progress(f"scored heads of layer {site.layer}")
    finally:
        model.train(was_training)
    return [s.layer for s in sites], scores


def score_heads(model: Any, tokenizer: Any, *, truthfulness: Sequence[ContrastPair], refusal: Sequence[ContrastPair],
                layers: Sequence[int] | None = None, top_k: int = 10, batch_size: int = 8, max_length: int = 256,
                log: Callable[[str], None] = print) -> HeadScores:
    """Score every head for truthfulness and for refusal; report the heads in the top_k of both."""
    lays, truth = head_influence(model, tokenizer, truthfulness, layers=layers, batch_size=batch_size,
                                 max_length=max_length)
    _, refuse = head_influence(model, tokenizer, refusal, layers=layers, batch_size=batch_size,
                               max_length=max_length)
    overlap = overlapping_heads(lays, truth, refuse, top_k)
    log(f"head scores: {len(overlap)} head(s) in the top {top_k} for both truthfulness and refusal: "
        + ", ".join(f"L{l}H{h}" for l, h in overlap))
    return HeadScores(layers=lays, n_heads=truth.shape[1], truthfulness=truth.tolist(), refusal=refuse.tolist(),
                      overlap=overlap, top_k=top_k)


def overlapping_heads(layers: Sequence[int], truth: torch.Tensor, refuse: torch.Tensor, top_k: int) -> list[tuple[int, int]]:
    """(layer, head) pairs among the top_k most influential heads for both signals (positive influence only)."""
    def top(s: torch.Tensor) -> set[tuple[int, int]]:
        flat = s.flatten().double()
        order = torch.sort(-flat, stable=True).indices[:top_k]
        return {(layers[int(i) // s.shape[1]], int(i) % s.shape[1]) for i in order if flat[i] > 0}

    return sorted(top(truth) & top(refuse))
