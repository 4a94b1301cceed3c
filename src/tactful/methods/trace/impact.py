"""TRACE's alignment impact scores: how much does training on a conflict pair help the new policy?

1. A gold batch stands for the new policy (TRACE Algorithm 2, `build_gold_batch`): a third
   RETAIN pairs as they are, a third INVERT pairs swapped, the rest PUNISH prompts with a
   compliant response taken from another pair preferred over their (violating) chosen one.
2. g_J = gradient of the gold batch's mean DPO loss at the reference parameters, over the
   trainable parameters (the LoRA adapter).
3. g_k = gradient of conflict pair k's own loss (INVERT: DPO on the swapped pair; PUNISH: NPO on
   both responses; oracle PUNISH: DPO with the correction), at the same parameters.
4. w_k = <g_J, g_k> / gamma, clipped at 0, normalised to sum 1 over the conflict pairs;
   RETAIN pairs get weight 0 (`impact_weights`).

Descending on a pair whose gradient points along the gold gradient lowers the gold loss, so
it gets weight; a pair that would raise it gets none.

Per-sample gradients without one backward per sample (`method="ghost"`): every trainable
parameter of a LoRA model is the weight of an nn.Linear (lora_A, lora_B), and for a Linear
y = W u the gradient of a sample's loss is sum_t g_t u_t^T (g_t = dL/dy_t, u_t its input at
token t). So

    <G, dL_k/dW> = sum_{t in k's rows} g_t . (G u_t)

needs only each layer's input and output gradient, which hooks capture during ONE batched
backward of sum_k L_k: rows of a causal-LM batch do not interact, so each row's output
gradients are its own sample's. Per-sample gradients are never materialised; the cost is one
forward + backward per batch plus a (tokens x in x out) product per layer, like a training
step. `method="loop"` is the brute-force reference: one autograd.grad per sample. "auto"
picks ghost unless a trainable parameter is not (only) an nn.Linear weight or bias, e.g.
tied embeddings in full fine-tuning.

Scores are computed at the starting parameters (a fresh adapter), as the official code does.
When the reference IS the starting model (recipe `reference: base` and a LoRA update that is
still exactly zero) pi_theta = pi_ref there, so the reference log-probs are the policy's own
(detached): no second forward. Otherwise the reference is another function and the scores must
use it: `scoring_reference` picks the right one (a separate frozen model, the policy with its
adapter disabled, or the shortcut) and train.py passes it as `reference`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from tactful.data.records import PreferencePair
from tactful.errors import UserError
from tactful.methods.losses import dpo_loss
from tactful.methods.preference import PairCollator, PairDataset, PairLogps, concatenated_logps
from tactful.methods.trace.losses import conflict_losses
from tactful.methods.trace.triage import INVERT, PUNISH, RETAIN, TriagedPair

METHODS = ("auto", "ghost", "loop")

# reference(model, batch) -> (ref_chosen, ref_rejected) summed log-probs, no grad
ReferenceFn = Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


# ---------------------------------------------------------------- the gold batch


def build_gold_batch(triaged: Sequence[TriagedPair], size: int = 64, seed: int = 0) -> list[PreferencePair]:
    """TRACE Algorithm 2: min(|RETAIN|, size//3) RETAIN pairs as they are, min(|INVERT|, size//3)
    INVERT pairs swapped, and the rest PUNISH prompts paired as (a compliant response from
    another pair) > their chosen response.

    Compliant responses come from RETAIN chosen and INVERT rejected responses (as in the
    official code); we prefer one of the same harm category, so the gold pair stays on topic."""
    rng = random.Random(seed)
    retain = [t for t in triaged if t.label == RETAIN]
    invert = [t for t in triaged if t.label == INVERT]
    punish = [t for t in triaged if t.label == PUNISH]
    gold = [_tagged(t.training_pair(), "RETAIN") for t in rng.sample(retain, min(len(retain), size // 3))]
    gold += [_tagged(t.training_pair(), "INVERT") for t in rng.sample(invert, min(len(invert), size // 3))]
    pool = [(t.pair.prompt, t.category, t.pair.chosen) for t in retain]
    pool += [(t.pair.prompt, t.category, t.pair.rejected) for t in invert]
    n_punish = min(len(punish), size - len(gold))
    for t in rng.sample(punish, n_punish) if n_punish > 0 else []:
        others = [c for c in pool if c[0] != t.pair.prompt]
        same = [c for c in others if c[1] is not None and c[1] == t.category]
        if not others:
            continue  # no compliant response anywhere: the PUNISH part of the gold batch stays empty
        _, _, response = rng.choice(same or others)
        p = t.pair
        gold.append(PreferencePair(prompt=p.prompt, chosen=response, rejected=p.chosen, category=p.category,
                                   id=p.id, source=p.source, meta={"gold": "PUNISH"}))
    return gold


def _tagged(p: PreferencePair, part: str) -> PreferencePair:
    p.meta = {**p.meta, "gold": part}
    return p


def gold_composition(gold: Sequence[PreferencePair]) -> dict[str, int]:
    return {k: sum(p.meta.get("gold") == k for p in gold) for k in ("RETAIN", "INVERT", "PUNISH")}


# ---------------------------------------------------------------- gradients


def trainable_parameters(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def adapter_is_zero(model: Any) -> bool:
    """Whether `model` is a PEFT model whose every LoRA B matrix is exactly zero, i.e. the
    adapter adds nothing and the policy equals the model with its adapter disabled."""
    from tactful.methods.common import is_peft

    if not is_peft(model):
        return False
    b = [p for n, p in model.named_parameters() if "lora_B" in n or "lora_embedding_B" in n]
    return bool(b) and all(not bool(p.detach().any()) for p in b)


def frozen_model_reference(ref: Any) -> ReferenceFn:
    """Reference log-probs from a separate frozen model (a recipe `reference` that is not the
    starting model), in eval mode (no dropout) and without gradient."""
    from tactful.methods.preference import _eval_mode_logps

    def reference(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = _eval_mode_logps(ref, batch)
        return out.chosen, out.rejected

    return reference


def disabled_adapter_reference(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs from the policy itself with its adapter disabled (the starting model)."""
    from tactful.methods.preference import _eval_mode_logps

    with torch.no_grad(), model.disable_adapter():
        out = _eval_mode_logps(model, batch)
    return out.chosen, out.rejected


def scoring_reference(model: Any, ref_model: Any = None) -> tuple[ReferenceFn | None, str]:
    """The reference the impact scores compare against, and a description for the manifest.

    The scores must use the same reference as the training loss: with a separate reference
    model (a recipe `reference` other than base, or full fine-tuning's frozen copy) that model;
    with `reference: base` under LoRA, the starting model, which the policy equals while its
    adapter is zero (then no second forward is needed)."""
    if ref_model is not None:
        return frozen_model_reference(ref_model), "reference model"
    if adapter_is_zero(model):
        return None, "policy at start (adapter zero: pi_theta = pi_ref)"
    from tactful.methods.common import is_peft

    if is_peft(model):
        return disabled_adapter_reference, "policy with its adapter disabled"
    raise UserError("impact scores need a reference: a LoRA policy or a frozen reference model")


def _at_reference(policy: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    # At the reference parameters pi_theta = pi_ref: the reference log-probs are the policy's.
    return policy.chosen.detach(), policy.rejected.detach()


def _batches(dataset: PairDataset, indices: Sequence[int], batch_size: int, collator: PairCollator,
             device: Any) -> Any:
    for start in range(0, len(indices), batch_size):
        idx = list(indices[start:start + batch_size])
        batch = collator([dataset[i] for i in idx])
        yield idx, {k: v.to(device) for k, v in batch.items()}


def gold_gradient(model: Any, gold: PairDataset, collator: PairCollator, *, beta: float, batch_size: int = 8,
                  reference: ReferenceFn | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """g_J: the gradient of the gold batch's mean DPO loss over the trainable parameters
    (by name), and the loss. Accumulated batch by batch; the model's .grad is not touched."""
    params = trainable_parameters(model)
    if not params:
        raise UserError("the model has no trainable parameters to score against")
    device = params[0][1].device
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    loss_sum = 0.0
    n = len(gold)
    for _, batch in _batches(gold, range(n), batch_size, collator, device):
        policy = concatenated_logps(model, batch)
        rc, rr = reference(model, batch) if reference is not None else _at_reference(policy)
        losses = dpo_loss((policy.chosen - rc) - (policy.rejected - rr), beta)
        grads = torch.autograd.grad(losses.sum() / n, [p for _, p in params], allow_unused=True)
        for (name, _), g in zip(params, grads):
            if g is not None:
                total[name] += g.float()
        loss_sum += float(losses.detach().sum())
    return total, loss_sum / max(n, 1)


def _sample_losses(model: Any, batch: dict[str, torch.Tensor], beta: float,
                   reference: ReferenceFn | None) -> torch.Tensor:
    policy = concatenated_logps(model, batch)
    rc, rr = reference(model, batch) if reference is not None else _at_reference(policy)
    return conflict_losses(batch["trace_kind"], policy.chosen, policy.rejected, rc, rr, beta,
                           npo_chosen=batch.get("npo_chosen"), npo_rejected=batch.get("npo_rejected"))


def loop_dots(model: Any, dataset: PairDataset, collator: PairCollator, indices: Sequence[int],
              g_J: dict[str, torch.Tensor], *, beta: float, reference: ReferenceFn | None = None) -> torch.Tensor:
    """<g_J, g_k> by brute force: one forward + autograd.grad per sample (the reference
    implementation the ghost method is tested against)."""
    params = trainable_parameters(model)
    device = params[0][1].device
    out = torch.zeros(len(indices), dtype=torch.float64)
    for j, (_, batch) in enumerate(_batches(dataset, indices, 1, collator, device)):
        loss = _sample_losses(model, batch, beta, reference).sum()
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        out[j] = sum(float((g.double() * g_J[n].double()).sum()) for (n, _), g in zip(params, grads) if g is not None)
    return out


class _GhostDots:
    """Hooks on the trainable nn.Linear modules that add each batch row's <G, dL_row/dW> into
    `self.rows` during backward (see the module docstring)."""

    def __init__(self, model: Any, g_J: dict[str, torch.Tensor]):
        self.targets: list[tuple[torch.nn.Linear, torch.Tensor | None, torch.Tensor | None]] = []
        names = {id(p): n for n, p in model.named_parameters()}
        for module in model.modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            w = g_J.get(names.get(id(module.weight), "")) if module.weight.requires_grad else None
            b = None
            if module.bias is not None and module.bias.requires_grad:
                b = g_J.get(names.get(id(module.bias), ""))
            if w is not None or b is not None:
                self.targets.append((module, w, b))
        self.rows: torch.Tensor | None = None
        self.handles: list[Any] = []

    def __enter__(self) -> "_GhostDots":
        for module, gw, gb in self.targets:
            self.handles.append(module.register_forward_hook(self._forward_hook(gw, gb)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _forward_hook(self, gw: torch.Tensor | None, gb: torch.Tensor | None) -> Callable:
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            u = inputs[0].detach()

            def on_grad(g: torch.Tensor) -> None:
                rows = g.shape[0]
                dtype = torch.promote_types(g.dtype, torch.float32)  # at least float32, even for bf16 models
                gg = g.reshape(rows, -1, g.shape[-1]).to(dtype)
                dots = torch.zeros(rows, dtype=torch.float64, device=g.device)
                if gw is not None:
                    proj = u.reshape(rows, -1, u.shape[-1]).to(dtype) @ gw.to(dtype).T  # [rows, T, out]: G u_t
                    dots += (gg * proj).sum(dim=(1, 2), dtype=torch.float64)
                if gb is not None:
                    dots += (gg.sum(1, dtype=torch.float64) @ gb.double())
                self.rows = dots if self.rows is None else self.rows + dots

            output.register_hook(on_grad)

        return hook


def ghost_supported(model: Any) -> tuple[bool, str]:
    """Whether every trainable parameter is the weight or bias of exactly one nn.Linear and of
    no other module (a tied embedding also gets gradient outside the Linear)."""
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for _, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    for name, p in trainable_parameters(model):
        mods = owners.get(id(p), [])
        if len(mods) != 1 or not isinstance(mods[0], torch.nn.Linear):
            return False, f"trainable parameter {name} is not the weight of a single nn.Linear"
    return True, ""


def ghost_dots(model: Any, dataset: PairDataset, collator: PairCollator, indices: Sequence[int],
               g_J: dict[str, torch.Tensor], *, beta: float, batch_size: int = 8,
               reference: ReferenceFn | None = None) -> torch.Tensor:
    """<g_J, g_k> for each sample in `indices` from one batched backward per batch."""
    params = trainable_parameters(model)
    device = params[0][1].device
    out = torch.zeros(len(indices), dtype=torch.float64)
    pos = 0
    with _GhostDots(model, g_J) as ghost:
        for idx, batch in _batches(dataset, indices, batch_size, collator, device):
            ghost.rows = None
            losses = _sample_losses(model, batch, beta, reference)
            # Backward of the SUM: each row's output gradients are exactly its own sample's.
            torch.autograd.grad(losses.sum(), [p for _, p in params], allow_unused=True)
            rows = ghost.rows if ghost.rows is not None else torch.zeros(2 * len(idx), dtype=torch.float64)
            b = len(idx)
            out[pos:pos + b] = (rows[:b] + rows[b:2 * b]).cpu()  # chosen row + rejected row of each pair
            pos += b
    return out


# ---------------------------------------------------------------- weights


def impact_weights(dots: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """w_k = max(0, <g_J, g_k> / gamma), normalised to sum 1 (all zeros if none is positive)."""
    if gamma <= 0:
        raise UserError(f"trace.gamma must be > 0, got {gamma}")
    w = (dots.double() / gamma).clamp(min=0.0)
    z = w.sum()
    return w / z if z > 0 else torch.zeros_like(w)


@dataclass
class ImpactResult:
    dots: list[float]        # <g_J, g_k> of each scored pair, in `indices` order
    weights: list[float]     # normalised weights, same order
    gold: dict[str, int]     # gold batch composition
    gold_loss: float
    gold_grad_norm: float
    method: str
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        n = len(self.weights)
        return {"method": self.method, "gold": self.gold, "gold_loss": self.gold_loss,
                "gold_grad_norm": self.gold_grad_norm, "n_scored": n,
                "n_positive": sum(w > 0 for w in self.weights), "seconds": self.seconds,
                "dots": self.dots, "weights": self.weights}


def score_impact(model: Any, tokenizer: Any, dataset: PairDataset, indices: Sequence[int],
                 gold_pairs: Sequence[PreferencePair], *, beta: float, gamma: float = 1.0, batch_size: int = 8,
                 method: str = "auto", max_length: int = 384, system: str | None = None,
                 reference: ReferenceFn | None = None, log: Callable[[str], None] = print) -> ImpactResult:
    """Impact weights of the pairs `indices` of `dataset` (which carries the trace_kind /
    npo_chosen / npo_rejected columns) against the gold batch. The model is put in eval mode
    (no dropout: the score is a property of the parameters) and restored afterwards."""
    if method not in METHODS:
        raise UserError(f"trace.scoring_method must be one of {', '.join(METHODS)}, got {method!r}")
    if not gold_pairs:
        raise UserError("the gold batch is empty: impact scores need RETAIN, INVERT or PUNISH pairs with a compliant "
                        "response")
    ok, why = ghost_supported(model)
    if method == "auto":
        method = "ghost" if ok else "loop"
        if not ok:
            log(f"impact scores: one backward per sample ({why})")
    elif method == "ghost" and not ok:
        raise UserError(f"trace.scoring_method ghost needs LoRA-style trainable parameters: {why}")
    collator = PairCollator(tokenizer.pad_token_id)
    gold = PairDataset(tokenizer, gold_pairs, max_length=max_length, system=system)
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        g_J, gold_loss = gold_gradient(model, gold, collator, beta=beta, batch_size=batch_size, reference=reference)
        t1 = time.perf_counter()
        if method == "ghost":
            dots = ghost_dots(model, dataset, collator, indices, g_J, beta=beta, batch_size=batch_size,
                              reference=reference)
        else:
            dots = loop_dots(model, dataset, collator, indices, g_J, beta=beta, reference=reference)
        t2 = time.perf_counter()
    finally:
        model.train(was_training)
    weights = impact_weights(dots, gamma)
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in g_J.values())))
    return ImpactResult(dots=dots.tolist(), weights=weights.tolist(), gold=gold_composition(gold_pairs),
                        gold_loss=gold_loss, gold_grad_norm=norm, method=method,
                        seconds={"gold_gradient": round(t1 - t0, 3), "per_sample": round(t2 - t1, 3)})


__all__ = ["ImpactResult", "METHODS", "adapter_is_zero", "build_gold_batch", "disabled_adapter_reference",
           "frozen_model_reference", "ghost_dots", "ghost_supported", "gold_composition", "gold_gradient",
           "impact_weights", "loop_dots", "score_impact", "scoring_reference", "trainable_parameters"]
