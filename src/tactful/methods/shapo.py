"""`shapo`: sharpness-aware preference optimisation on probe-selected neurons (ShaPO).

"Revisiting Robustness for LLM Safety Alignment via Selective Geometry Control"
(arXiv 2602.07340; official code github liujilong0116/ShaPO, read at commit dea6efb, May 2026).
Preference training is brittle under noisy labels partly because of the geometry of the loss
around the parameters that matter for safety. ShaPO flattens it there, and only there:

1. Probe. A linear classifier on mean-pooled last-layer hidden states of responses labelled
   safe / unsafe. Toxic direction v = W[unsafe] - W[safe].
   Official (train_probe_pku_30k.py, gen_probe_vector.py): a linear head trained with Adam
   (README: 10 epochs, lr 1e-5, batch 256) on both responses of every PKU-SafeRLHF-30K training
   pair (length-filtered), pooled over prompt + response tokens, 256 responses held out at
   random, on the PRETRAINED base model (get_sentive_n.py also scores the base model's
   down-projections; preference training then starts from the SFT checkpoint).
   Here: a logistic regression by L-BFGS, held out by prompt, on the starting model (whose
   down-projections are the ones scored and perturbed), pooled over the response (or prompt +
   response, `probe.pool: all`). Its labels: the training pairs' chosen_safe / rejected_safe,
   or a judge; or `probe.file`, a probe fitted beforehand by `fit_probe_on_pairs` on any
   labelled pairs (e.g. every labelled response available, as the official code does).
2. Neurons. Every MLP neuron j of every layer writes its value vector, the column
   down_proj.weight[:, j], into the residual stream. Score each by cos(v, column) and
   keep the top `mask_fraction` of all (layer, neuron) pairs (official: probe_percentage % of
   num_hidden_layers x intermediate_size from the model config), ranked by `sign`:
     negative (default, the official code: ascending sort) - value vectors pointing
         AWAY from the toxic direction, i.e. the neurons that push outputs towards the
         safe side; the paper's "alignment-critical" neurons;
     positive - the most toxic-aligned value vectors (the opposite order, commented
         out in the official code; the "toxic neurons" of Lee et al. 2024);
     abs - both ends.
3. Masked sharpness-aware step on every `sam_interval`-th batch (official interval_for_shapo:
   (step + 1) % k == 0; k = 1 makes every step one); the others are the plain preference step.
   Official, per micro-batch: the gradients accumulated so far are stashed; g = dL/dW at theta
   from that micro-batch's (unscaled) loss; gamma ~ U[2e-6, 4e-6] drawn afresh; the selected
   columns move, W += gamma * (g * mask) (no normalisation, no rho-ball); the loss at the
   perturbed point, divided by the accumulation steps, is back-propagated on top of the stash;
   then W -= gamma * (g * mask). Options here: `perturbation: official` is that step (gamma
   from `gamma_min`/`gamma_max`, drawn per micro-batch); `perturbation: sam` is the classic SAM
   ascent step restricted to the mask, eps = rho * g / ||g||.
4. Reward-level variant: soft labels p* = sigmoid(s (c(y_l) - c(y_w))) from a cost function c
   (official: the beaver-7b-v1.0-cost model, s = reward_beta = 10), and the loss
   BCE(p*, sigmoid(beta h)) instead of the hard-label loss.

It composes with every base loss (sigmoid / cdpo / rdpo / ipo / simpo) and with Dr.DPO
(`loss.drdpo`; the official README's runs use it: loss.mode_loss=DrDPO, beta 0.1, weight 1),
because it only changes *where* the gradient is taken, through `PreferenceTrainer`.

How the perturbation meets LoRA (and why it is done with hooks)
-----------------------------------------------------------------
The official code does full fine-tuning: the selected columns are perturbed in place
(W.add_), the gradient at the perturbed point is taken for every parameter, and the
perturbation is subtracted again. We perturb the *effective* down-projection instead:
a forward hook adds x[..., S] @ eps^T to the module's output, which is exactly
(W_eff[:, S] + eps) applied to x, where W_eff = W (+ the LoRA update B A when down_proj
carries LoRA). Consequences:

- The geometry probed is the official one. g is dL/dW_eff[:, S], the gradient w.r.t. the
  function the neurons compute, which does not depend on how W_eff is parameterised; with
  LoRA it is obtained by differentiating w.r.t. a zero "delta" tensor in the hook, so the
  frozen base weight needs no gradient buffer.
- The step is SAM's: the trainable parameters (the LoRA matrices, or all weights with
  `lora.enabled: false`) get the gradient of the loss at theta + eps. The frozen base
  columns are never trained, only used as the direction of the sharpness probe.
  (Training the selected columns themselves under LoRA would need an extra non-PEFT
  weight delta in the artifact; full fine-tuning gives that, faithfully, if wanted.)
- Restoring is exact by construction: no weight is ever modified, the hook is removed.
  (The official code now subtracts the same masked gamma * g it added, exact up to floating
  point rounding; an earlier commit subtracted the unmasked g, shifting the other columns.)
- It is meant to work under DDP (hooks live on the inner modules; the probing pass runs on
  the unwrapped model and its small gradient is averaged across processes); only the
  single-process path is tested. FSDP / ZeRO-3 (sharded down-projections) are not supported.

The current official code has one schedule, the one implemented here. An earlier commit also
offered k plain steps followed by an *extra* sharpness-aware step on a batch resampled from the
last k, losses scaled by k/(k+1) (`same_steps: false`); it was removed (the config key remains,
unread).

Reference log-probs for a SAM step are computed once, before any perturbation, so the
reference is never perturbed (with LoRA the reference is the same modules with adapters
disabled, and a hook would otherwise leak into it).
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from tactful import architectures
from tactful.data.records import PreferencePair
from tactful.distributed import is_main_process, require_unsharded, run_on_main, share_from_main
from tactful.errors import UserError
from tactful.logprobs import IGNORE_INDEX, collate, encode_example
from tactful.methods.common import is_peft, load_started_run
from tactful.methods.preference import (
    DPOConfig,
    PreferenceSetup,
    PreferenceTrainer,
    train_preference,
)
from tactful.runs import RUN_LOADERS, RunDir

SIGNS = ("negative", "positive", "abs")
PERTURBATIONS = ("official", "sam")


# ---------------------------------------------------------------- config


@dataclass
class ProbeSettings:
    labels: str = field(default="pairs", metadata={"help": (
        "Where safe/unsafe labels of responses come from: 'pairs' (chosen_safe / rejected_safe) or a judge name "
        "(e.g. string-xstest, embedding-minilm: a refusal counts as safe)")})
    pool: str = field(default="response", metadata={"choices": ("response", "all"), "help": (
        "Mean-pool hidden states over the response tokens, or over prompt + response as the official code does")})
    max_examples: int | None = field(default=256, metadata={"help": (
        "Responses used to fit the probe (seeded subsample); null: all of them.")})
    file: str | None = field(default=None, metadata={"help": (
        "A probe fitted elsewhere (a shapo_probe.safetensors, e.g. on every labelled response available, see "
        "`fit_probe_on_pairs`): its direction is used and no probe is fitted on the training pairs.")})
    steps: int = field(default=100, metadata={"help": "L-BFGS iterations of the logistic regression."})
    l2: float = field(default=1e-3, metadata={"help": "L2 penalty on the probe weights."})
    batch_size: int = 8


@dataclass
class ShaPOSettings:
    mask_fraction: float = field(default=0.01, metadata={"help": "Share of all (layer, neuron) pairs perturbed."})
    sign: str = field(default="negative", metadata={"choices": SIGNS, "help": (
        "negative: most negative cos(v, value vector), the official choice; positive: most toxic-aligned; abs")})
    sam_interval: int = field(default=5, metadata={"help": "Every k-th optimizer step is a sharpness-aware one."})
    perturbation: str = field(default="official", metadata={"choices": PERTURBATIONS, "help": (
        "official: eps = gamma * g (gamma ~ U[gamma_min, gamma_max]); sam: eps = rho * g / ||g||")})
    gamma_min: float = 2e-6
    gamma_max: float = 4e-6
    rho: float = 0.05
    reward_level: bool = field(default=False, metadata={"help": "Soft labels p* = sigmoid(s (c(y_l) - c(y_w)))."})
    cost: str = field(default="labels", metadata={"help": (
        "Cost c(y) in [0, 1] for reward-level labels: 'labels' (1 if the response is labelled unsafe) or a judge "
        "name (1 if it complied / is unsafe)")})
    cost_scale: float = 10.0


@dataclass
class ShaPOConfig(DPOConfig):
    output_dir: str = "runs/shapo"
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    shapo: ShaPOSettings = field(default_factory=ShaPOSettings)


# ---------------------------------------------------------------- model anatomy


def down_projections(model: Any) -> list[torch.nn.Module]:
    """The MLP down-projection of every decoder layer, in layer order (with PEFT, the
    LoRA-wrapped module); where it lives comes from the architecture table."""
    return [m for _, m in architectures.mlp_down_projections(model)]


def base_weight(module: torch.nn.Module) -> torch.Tensor:
    """The [d_model, d_ff] weight of a down-projection, under a PEFT wrapper if there is one."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base.weight


# ---------------------------------------------------------------- probe


@torch.no_grad()
def pooled_hidden_states(model: Any, tokenizer: Any, items: Sequence[tuple[str, str]], *, pool: str = "response",
                         system: str | None = None, max_length: int = 384, batch_size: int = 8) -> torch.Tensor:
    """Mean of the last layer's hidden states over each (prompt, response): [N, d_model]."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(items), batch_size):
            enc = [encode_example(tokenizer, p, r, system=system, max_length=max_length)
                   for p, r in items[start:start + batch_size]]
            batch = {k: v.to(device) for k, v in collate(enc, tokenizer.pad_token_id).items()}
            kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
            try:  # no vocabulary-sized logits: only the hidden states are wanted
                hidden = model(**kw, logits_to_keep=1).hidden_states[-1].float()
            except TypeError as e:
                if "logits_to_keep" not in str(e):
                    raise
                hidden = model(**kw).hidden_states[-1].float()
            mask = (batch["labels"] != IGNORE_INDEX) if pool == "response" else batch["attention_mask"].bool()
            mask = mask.unsqueeze(-1).float()
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    finally:
        model.train(was_training)
    return torch.cat(out)


@dataclass
class Probe:
    weight: torch.Tensor  # [2, d_model]: row 0 safe, row 1 unsafe
    bias: torch.Tensor  # [2]
    train_accuracy: float
    heldout_accuracy: float | None
    n_train: int
    n_heldout: int

    @property
    def direction(self) -> torch.Tensor:
        """The toxic direction v = W[unsafe] - W[safe]."""
        return self.weight[1] - self.weight[0]


def fit_probe(features: torch.Tensor, unsafe: torch.Tensor, *, steps: int = 100, l2: float = 1e-3,
              seed: int = 0, heldout_fraction: float = 0.2, groups: Sequence[Any] | None = None) -> Probe:
    """Two-class logistic regression (softmax over {safe, unsafe}) by full-batch L-BFGS.

    Deterministic: zero initialisation and a seeded held-out split. Features are not
    standardised, so the direction lives in the residual-stream coordinates the
    down-projection columns write to.
    """
    x = features.double()
    y = unsafe.long()
    if y.unique().numel() < 2:
        raise UserError("the ShaPO probe needs both safe and unsafe responses; check the pairs' chosen_safe / "
                        "rejected_safe labels or probe.labels")
    # Held out by group (the prompt): a response whose sibling (same prompt, other label) is in
    # training measures how well the probe memorised that prompt, not toxicity.
    keys = list(groups) if groups is not None else list(range(len(y)))
    if len(keys) != len(y):
        raise ValueError("fit_probe: one group per example")
    distinct = list(dict.fromkeys(keys))
    random.Random(seed).shuffle(distinct)
    n_held_groups = int(len(distinct) * heldout_fraction) if len(y) >= 20 else 0
    held_groups = set(distinct[:n_held_groups])
    held = [i for i, k in enumerate(keys) if k in held_groups]
    train = [i for i, k in enumerate(keys) if k not in held_groups]
    w = torch.zeros(2, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")
    xt, yt = x[train], y[train]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w.T + b, yt) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()

    def acc(idx: list[int]) -> float:
        return float(((x[idx] @ w.T + b).argmax(1) == y[idx]).double().mean()) if idx else float("nan")

    return Probe(weight=w.float(), bias=b.float(), train_accuracy=acc(train),
                 heldout_accuracy=acc(held) if held else None, n_train=len(train), n_heldout=len(held))


# ---------------------------------------------------------------- neuron selection


def neuron_scores(modules: Sequence[torch.nn.Module], direction: torch.Tensor) -> list[torch.Tensor]:
    """cos(v, down_proj.weight[:, j]) for every neuron j of every layer: one [d_ff] tensor per layer."""
    v = direction.float()
    v = v / (v.norm() + 1e-12)
    scores = []
    for m in modules:
        w = base_weight(m).detach().float()  # [d_model, d_ff]: column j = neuron j's value vector
        vd = v.to(w.device)
        scores.append(((w.T @ vd) / (w.norm(dim=0) + 1e-12)).cpu())
    return scores


def select_neurons(scores: Sequence[torch.Tensor], fraction: float, sign: str = "negative") -> list[torch.Tensor]:
    """Boolean masks (one [d_ff] per layer) of the top `fraction` of all neurons ranked by `sign`."""
    if sign not in SIGNS:
        raise UserError(f"shapo.sign must be one of {', '.join(SIGNS)}, got {sign!r}")
    if not 0 < fraction <= 1:
        raise UserError(f"shapo.mask_fraction must be in (0, 1], got {fraction}")
    flat = torch.cat([s.flatten() for s in scores])
    key = {"negative": -flat, "positive": flat, "abs": flat.abs()}[sign]
    k = max(1, int(fraction * flat.numel()))
    top = torch.argsort(key, descending=True, stable=True)[:k]
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[top] = True
    return list(chosen.split([s.numel() for s in scores]))


# ---------------------------------------------------------------- the perturbation


class NeuronPerturbation:
    """Perturbs selected columns of the down-projections through forward hooks.

    With `delta(tensors)` active, each selected module returns
    `output + x[..., idx] @ d^T`, i.e. computes with W_eff[:, idx] + d, while the weights
    themselves are never touched; leaving the context removes the perturbation exactly.
    """

    def __init__(self, modules: Sequence[torch.nn.Module], masks: Sequence[torch.Tensor]):
        if len(modules) != len(masks):
            raise ValueError(f"{len(modules)} modules but {len(masks)} masks")
        self.layers = [(i, m, mask.nonzero().flatten()) for i, (m, mask) in enumerate(zip(modules, masks))
                       if bool(mask.any())]
        self.masks = [mask.clone() for mask in masks]

    @property
    def n_selected(self) -> int:
        return sum(int(idx.numel()) for _, _, idx in self.layers)

    def zeros(self, *, requires_grad: bool = False) -> list[torch.Tensor]:
        """One zero delta per perturbed layer, [d_model, n_selected_in_layer]."""
        out = []
        for _, m, idx in self.layers:
            w = base_weight(m)
            out.append(torch.zeros(w.shape[0], idx.numel(), dtype=torch.float32, device=w.device,
                                   requires_grad=requires_grad))
        return out

    @contextlib.contextmanager
    def delta(self, deltas: Sequence[torch.Tensor]) -> Iterator[None]:
        handles = []
        try:
            for (_, m, idx), d in zip(self.layers, deltas, strict=True):
                idx = idx.to(d.device)
                handles.append(m.register_forward_hook(_column_hook(idx, d)))
            yield
        finally:
            for h in handles:
                h.remove()

    def full_columns(self, deltas: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Deltas scattered into full [d_model, d_ff] matrices (zero outside the mask): for tests and inspection."""
        out = []
        by_layer = {i: (idx, d) for (i, _, idx), d in zip(self.layers, deltas)}
        for i, mask in enumerate(self.masks):
            full = torch.zeros(deltas[0].shape[0] if deltas else 0, mask.numel())
            if i in by_layer:
                idx, d = by_layer[i]
                full[:, idx.cpu()] = d.detach().float().cpu()
            out.append(full)
        return out


def _column_hook(idx: torch.Tensor, d: torch.Tensor) -> Callable[..., torch.Tensor]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        return output + F.linear(x.index_select(-1, idx), d.to(x.dtype))
    return hook


def perturbation_from_gradient(grads: Sequence[torch.Tensor], settings: ShaPOSettings,
                               generator: torch.Generator) -> tuple[list[torch.Tensor], float]:
    """eps from g (already restricted to the mask): official gamma * g, or SAM's rho * g / ||g||.
    Returns (eps per layer, the scale applied to g)."""
    if settings.perturbation == "official":
        u = torch.rand((), generator=generator).item()
        scale = settings.gamma_min + (settings.gamma_max - settings.gamma_min) * u
    else:
        norm = math.sqrt(sum(float((g.float() ** 2).sum()) for g in grads))
        scale = settings.rho / (norm + 1e-12)
    return [g.detach() * scale for g in grads], scale


# ---------------------------------------------------------------- trainer


class ShaPOTrainer(PreferenceTrainer):
    """`PreferenceTrainer` whose every `sam_interval`-th step is a masked sharpness-aware step."""

    def __init__(self, *args: Any, perturbation: NeuronPerturbation, shapo: ShaPOSettings, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.perturbation = perturbation
        self.shapo = shapo
        self._micro = (-1, 0)  # (global step, micro-batch index) for the per-micro-batch gamma draw

    def is_sam_step(self) -> bool:
        return (self.state.global_step + 1) % self.shapo.sam_interval == 0

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if not self.is_sam_step() or self.perturbation.n_selected == 0:
            return super().training_step(model, inputs, num_items_in_batch)
        return self.sam_training_step(model, inputs, num_items_in_batch)

    def sam_training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        inputs = self._prepare_inputs(inputs)
        model.train()
        unwrapped = self.accelerator.unwrap_model(model)

        # The reference is fixed: score it once, unperturbed, and share it between both passes.
        if self.loss_spec.needs_reference and "ref_chosen_logps" not in inputs:
            ref_c, ref_r = self.reference_logps(model, inputs)
            inputs = {**inputs, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}

        # 1. g = dL/dW_eff[:, selected] at theta, via zero deltas in the hooks. autograd.grad
        #    leaves the trainable parameters' .grad alone, and the unwrapped model keeps DDP
        #    out of this extra backward.
        zeros = self.perturbation.zeros(requires_grad=True)
        self.record_metrics = False
        try:
            with self.perturbation.delta(zeros), self.compute_loss_context_manager():
                loss_at_theta = self.compute_loss(unwrapped, inputs)
            grads = torch.autograd.grad(loss_at_theta, zeros, allow_unused=True)
        finally:
            self.record_metrics = True
        grads = [torch.zeros_like(z) if g is None else g for g, z in zip(grads, zeros)]
        if self.accelerator.num_processes > 1:
            grads = [self.accelerator.reduce(g, reduction="mean") for g in grads]

        # 2. The ordinary Trainer step (loss scaling, backward, accumulation) at theta + eps;
        #    leaving the context removes eps exactly.
        eps, scale = perturbation_from_gradient(grads, self.shapo, self._generator())
        with self.perturbation.delta(eps):
            loss = super().training_step(model, inputs, num_items_in_batch)

        self._metrics["shapo/sam_loss_theta"].append(float(loss_at_theta.detach()))
        self._metrics["shapo/grad_norm_selected"].append(math.sqrt(sum(float((g ** 2).sum()) for g in grads)))
        self._metrics["shapo/eps_norm"].append(math.sqrt(sum(float((e ** 2).sum()) for e in eps)))
        self._metrics["shapo/scale"].append(scale)
        return loss

    def _generator(self) -> torch.Generator:
        # gamma is drawn per micro-batch from (seed, step, micro-batch): reproducible, and the
        # same after resuming from a checkpoint.
        step, micro = self._micro
        micro = micro + 1 if step == self.state.global_step else 0
        self._micro = (self.state.global_step, micro)
        return torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.global_step * 101 + micro)


# ---------------------------------------------------------------- costs and soft labels


def verdict_cost(verdict: Any) -> float:
    """1 for an unsafe / complying / policy-violating verdict, 0 for safe / refused, 0.5 if unknown."""
    label = getattr(verdict, "label", None)
    if label in ("unsafe", "violates"):
        return 1.0
    if label in ("safe", "complies"):
        return 0.0
    refused = getattr(verdict, "refused", None)
    if refused is not None:
        return 0.0 if refused else 1.0
    return 0.5


def response_costs(pairs: Sequence[PreferencePair], source: str) -> list[tuple[float, float]]:
    """(c(chosen), c(rejected)) per pair, from the pairs' safety labels or a judge."""
    if source == "labels":
        out = []
        for p in pairs:
            if p.chosen_safe is None or p.rejected_safe is None:
                raise UserError(f"pair {p.id or p.prompt[:40]!r} has no chosen_safe / rejected_safe label; "
                                "use a judge as the cost (e.g. shapo.cost: string-xstest)")
            out.append((0.0 if p.chosen_safe else 1.0, 0.0 if p.rejected_safe else 1.0))
        return out
    from tactful.eval.judges import JudgeItem, get_judge

    judge = get_judge(source)
    items = [JudgeItem(prompt=p.prompt, response=r) for p in pairs for r in (p.chosen, p.rejected)]
    costs = [verdict_cost(v) for v in judge.judge(items)]
    return [(costs[2 * i], costs[2 * i + 1]) for i in range(len(pairs))]


def soft_labels(costs: Sequence[tuple[float, float]], scale: float) -> list[float]:
    """p* = sigmoid(s (c(y_l) - c(y_w))): near 1 when the rejected answer costs more."""
    return [1 / (1 + math.exp(-scale * (cl - cw))) for cw, cl in costs]


# ---------------------------------------------------------------- the run


def _probe_items(pairs: Sequence[PreferencePair], labels: str, max_examples: int | None,
                 seed: int) -> tuple[list[tuple[str, str]], list[bool]]:
    """Unique (prompt, response) items and their unsafe labels, seeded subsample."""
    if labels == "pairs":
        seen: dict[tuple[str, str], bool] = {}
        for p in pairs:
            for r, safe in ((p.chosen, p.chosen_safe), (p.rejected, p.rejected_safe)):
                if safe is not None:
                    seen.setdefault((p.prompt, r), not safe)
        if not seen:
            raise UserError("no pair has chosen_safe / rejected_safe labels for the ShaPO probe; "
                            "set probe.labels to a judge (e.g. string-xstest)")
        items, unsafe = list(seen), list(seen.values())
    else:
        costs = response_costs(pairs, labels)
        seen = {}
        for p, (cw, cl) in zip(pairs, costs):
            seen.setdefault((p.prompt, p.chosen), cw > 0.5)
            seen.setdefault((p.prompt, p.rejected), cl > 0.5)
        items, unsafe = list(seen), list(seen.values())
    if max_examples is not None and len(items) > max_examples:
        keep = sorted(random.Random(seed).sample(range(len(items)), max_examples))
        items, unsafe = [items[i] for i in keep], [unsafe[i] for i in keep]
    return items, unsafe


def fit_probe_on_pairs(model: Any, tokenizer: Any, pairs: Sequence[PreferencePair], settings: ProbeSettings, *,
                       seed: int = 0, system: str | None = None, max_length: int = 384,
                       log: Callable[[str], None] = print) -> tuple[Probe, dict[str, Any]]:
    """Fit the toxicity probe on the labelled responses of `pairs` with `model` as it is (call
    it on the starting model). Returns the probe and what the manifest records about it,
    timings included (the hidden-state pass is the cost that grows with the data)."""
    import time

    items, unsafe = _probe_items(pairs, settings.labels, settings.max_examples, seed)
    log(f"fitting the toxicity probe on {len(items)} responses ({sum(unsafe)} unsafe)")
    t0 = time.perf_counter()
    feats = pooled_hidden_states(model, tokenizer, items, pool=settings.pool, system=system, max_length=max_length,
                                 batch_size=settings.batch_size)
    t1 = time.perf_counter()
    probe = fit_probe(feats.cpu(), torch.tensor(unsafe), steps=settings.steps, l2=settings.l2, seed=seed,
                      groups=[prompt for prompt, _ in items])
    t2 = time.perf_counter()
    info = {"train_accuracy": probe.train_accuracy, "heldout_accuracy": probe.heldout_accuracy,
            "n_train": probe.n_train, "n_heldout": probe.n_heldout, "n_unsafe": int(sum(unsafe)),
            "labels": settings.labels, "pool": settings.pool, "heldout_split": "by prompt",
            "seconds": {"hidden_states": round(t1 - t0, 2), "fit": round(t2 - t1, 2)}}
    log(f"probe accuracy: train {probe.train_accuracy:.3f}"
        + (f", held-out {probe.heldout_accuracy:.3f} (n={probe.n_heldout})" if probe.heldout_accuracy is not None
           else ""))
    return probe, info


def save_probe(path: Any, probe: Probe, info: dict[str, Any]) -> None:
    """The probe as safetensors (direction, weight, bias), with `info` as JSON metadata."""
    import json

    from safetensors.torch import save_file

    save_file({"direction": probe.direction.contiguous(), "weight": probe.weight.contiguous(),
               "bias": probe.bias.contiguous()}, str(path),
              metadata={"classes": "safe,unsafe", "info": json.dumps(info, sort_keys=True)})


def load_probe(path: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """(toxic direction, recorded info) of a probe written by `save_probe`."""
    import json

    from safetensors import safe_open

    if not Path(path).is_file():
        raise UserError(f"probe.file {path} does not exist")
    with safe_open(str(path), "pt") as f:
        if "direction" not in set(f.keys()):
            raise UserError(f"probe.file {path} holds no 'direction' tensor (not a ShaPO probe)")
        meta = f.metadata() or {}
        direction = f.get_tensor("direction")
    return direction, json.loads(meta.get("info", "{}"))


def _probe_source(pr: ProbeSettings) -> str:
    """What the probe came from, so a mask saved in the run is reused only for the same probe."""
    import hashlib

    if pr.file:
        return "file:" + hashlib.sha256(Path(pr.file).read_bytes()).hexdigest()[:16]
    return f"fitted:{pr.labels}:{pr.pool}:{pr.max_examples}"


def _saved_mask_matches(mask_path: Any, probe_path: Any, s: ShaPOSettings, n_layers: int, source: str) -> bool:
    """A probe and mask from an earlier run in this directory, made with the same selection settings."""
    from safetensors import safe_open

    if not (mask_path.is_file() and probe_path.is_file()):
        return False
    with safe_open(str(mask_path), "pt") as f:
        meta = f.metadata() or {}
        keys = set(f.keys())
    return (meta.get("sign") == s.sign and meta.get("mask_fraction") == str(s.mask_fraction)
            # masks saved before the probe source was recorded were fitted on the run's own pairs
            and meta.get("probe_source", source if source.startswith("fitted:") else None) == source
            and {f"mask.{i}" for i in range(n_layers)} <= keys)


def prepare_shapo(setup: PreferenceSetup) -> None:
    """Probe, neuron mask, optional soft labels; saved into the run and handed to the trainer."""
    import shutil

    from safetensors.torch import load_file, save_file

    config: ShaPOConfig = setup.config  # type: ignore[assignment]
    s, pr = config.shapo, config.probe
    if s.sam_interval < 1:
        raise UserError(f"shapo.sam_interval must be >= 1, got {s.sam_interval}")
    if s.perturbation == "official" and not 0 <= s.gamma_min <= s.gamma_max:
        raise UserError("shapo.gamma_min must be in [0, shapo.gamma_max]")
    model, run, log = setup.model, setup.run, setup.log
    modules = down_projections(model)
    probe_path, mask_path = run.path / "shapo_probe.safetensors", run.path / "shapo_mask.safetensors"

    source = _probe_source(pr)
    if not is_main_process():
        masks = scores = probe_info = None  # the main process fits the probe, writes it and shares the mask below
    elif config.resume and _saved_mask_matches(mask_path, probe_path, s, len(modules), source):
        # Resuming: the probe was fitted on the starting model; reuse it rather than refit.
        saved_probe, saved = load_file(str(probe_path)), load_file(str(mask_path))
        direction = saved_probe["direction"]
        masks = [saved[f"mask.{i}"].bool() for i in range(len(modules))]
        scores = [saved[f"score.{i}"] for i in range(len(modules))]
        probe_info = {"reused": True}
        log(f"reusing the ShaPO probe and mask in {run.path}")
    else:
        if pr.file:  # fitted beforehand (e.g. on every labelled response available): copied into the run
            direction, fitted = load_probe(pr.file)
            d_model = base_weight(modules[0]).shape[0]
            if direction.numel() != d_model:
                raise UserError(f"probe.file {pr.file} has a {direction.numel()}-dimensional direction; this model's "
                                f"hidden size is {d_model}")
            shutil.copyfile(pr.file, probe_path)
            probe_info = {**fitted, "from_file": str(pr.file)}
            log(f"ShaPO probe from {pr.file}" + (f" (held-out accuracy {fitted['heldout_accuracy']:.3f})"
                                                  if fitted.get("heldout_accuracy") is not None else ""))
        else:
            ctx = model.disable_adapter() if is_peft(model) else contextlib.nullcontext()
            with ctx:  # the starting model (at init LoRA adds exactly zero anyway)
                probe, probe_info = fit_probe_on_pairs(model, setup.tokenizer, setup.pairs, pr, seed=config.seed,
                                                       system=config.system, max_length=config.training.max_length,
                                                       log=log)
            direction = probe.direction
            save_probe(probe_path, probe, probe_info)
        scores = neuron_scores(modules, direction)
        masks = select_neurons(scores, s.mask_fraction, s.sign)
        tensors = {f"mask.{i}": m.contiguous() for i, m in enumerate(masks)}
        tensors.update({f"score.{i}": sc.float().cpu().contiguous() for i, sc in enumerate(scores)})
        save_file(tensors, str(mask_path), metadata={"sign": s.sign, "mask_fraction": str(s.mask_fraction),
                                                     "probe_source": source})
    # Every process must perturb the same neurons: the main process's choice.
    masks, scores, probe_info = share_from_main((masks, scores, probe_info), what="fitting the ShaPO probe")

    perturbation = NeuronPerturbation(modules, masks)
    selected = torch.cat([sc[m] for sc, m in zip(scores, masks)])
    log(f"ShaPO perturbs {perturbation.n_selected} of {sum(m.numel() for m in masks)} neurons "
        f"(sign {s.sign}, cos in [{float(selected.min()):.3f}, {float(selected.max()):.3f}])")
    setup.trainer_kwargs.update(perturbation=perturbation, shapo=s)
    info: dict[str, Any] = {
        "probe": {**probe_info, "file": probe_path.name},
        "mask": {"file": mask_path.name, "n_selected": perturbation.n_selected,
                 "per_layer": [int(m.sum()) for m in masks], "sign": s.sign, "fraction": s.mask_fraction},
        "sam": {"interval": s.sam_interval, "perturbation": s.perturbation,
                "gamma": [s.gamma_min, s.gamma_max] if s.perturbation == "official" else None,
                "rho": s.rho if s.perturbation == "sam" else None},
    }
    if s.reward_level:
        p_star = run_on_main(lambda: soft_labels(response_costs(setup.pairs, s.cost), s.cost_scale),
                             what="judging responses for ShaPO's soft labels")
        setup.dataset.add_column("p_star", p_star)
        info["reward_level"] = {"cost": s.cost, "scale": s.cost_scale,
                                "mean_p_star": sum(p_star) / len(p_star)}
    setup.manifest["shapo"] = info


def train_shapo(config: ShaPOConfig, **kw: Any) -> tuple[Any, RunDir]:
    """Train ShaPO (see `tactful.methods.preference.train_preference` for the keywords)."""
    require_unsharded("shapo", "its perturbation hooks and probe read whole down-projection weights")
    return train_preference(config, kind="shapo", trainer_class=ShaPOTrainer, prepare=prepare_shapo, **kw)


CONFIG_CLASS = ShaPOConfig
RUN_LOADERS["shapo"] = load_started_run  # runs with start_from: base + start adapters + own adapter


def run(config: ShaPOConfig, *, log: Callable[[str], None] = print) -> RunDir:
    """Entry point for `tactful train` recipes with `method: shapo`."""
    return train_shapo(config, log=log)[1]
