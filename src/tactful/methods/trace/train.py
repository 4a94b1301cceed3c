"""`trace`: re-align a model when the policy changes (TRACE, "The Realignment Problem").

    pairs --triage under the new policy--> INVERT / PUNISH / RETAIN
          --impact scores (gold batch)---> a weight per conflict pair
          --hybrid loss------------------> LoRA adapter

    L = sum_INVERT w * l_inv + sum_PUNISH w * l_npo + alpha_KL * sum_RETAIN KL(pi_ref || pi_theta)

The preference core (`tactful.methods.preference`) does the plumbing: pair tokenisation,
one forward for chosen + rejected, the reference as the same model with its adapter
disabled, the Trainer (checkpoints, resume, accumulation, report_to, accelerate), saving and
the manifest. This module adds the triage, the scores and `TraceTrainer.pair_losses`.

Ablations: trace.no_triage (no inversion; trace.no_triage_target says what is suppressed: every
response the judge flags, ours, or every relabelled pair's rejected response without a KL term,
the paper's), trace.no_impact_weights (uniform weights), trace.no_kl (no RETAIN term).
Oracle variant: trace.oracle trains PUNISH pairs as (corrected > old chosen) when the pair
has a correction (meta["corrected"]) that the judge says complies; others stay NPO.

The run directory holds, besides the adapter: triage/triage.jsonl and triage_summary.json
(labels and verdicts), verdict_cache.jsonl (re-runs judge nothing twice), impact_scores.json
(dots, weights, gold batch; reused on resume), train_pairs.jsonl (what was trained on, with
kind and weight), and the judge and policy hash in manifest.json.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from tactful.data.records import PreferencePair
from tactful.errors import UserError
from tactful.distributed import is_main_process, run_on_main, share_from_main
from tactful.io import atomic_write_jsonl, read_jsonl_tolerant
from tactful.logprobs import IGNORE_INDEX
from tactful.methods.common import (
    LoraSettings,
    StartModel,
    TrainingSettings,
    describe_start,
    is_peft,
    load_start_model,
    load_started_run,
    set_seed,
    training_arguments,
)
from tactful.methods.preference import (
    DPOConfig,
    LossSettings,
    PairDataSettings,
    PairLogps,
    PreferenceSetup,
    PreferenceTrainer,
    concatenated_logps,
    train_preference,
)
from tactful.methods.trace.judges import VIOLATES, make_policy_judge
from tactful.methods.trace.losses import (
    KIND_KL,
    KIND_NPO,
    KIND_PREF,
    conflict_losses,
    sequence_kl,
    trace_pair_losses,
)
from tactful.methods.trace.triage import (
    FAILED,
    INVERT,
    PUNISH,
    RETAIN,
    TriagedPair,
    VerdictCache,
    format_summary,
    load_trace_pairs,
    read_triage,
    summarize,
    triage_pairs,
    write_triage,
)
from tactful.models import to_device, training_dtype
from tactful.policies import load_policy
from tactful.runs import RUN_LOADERS, RunDir

# ---------------------------------------------------------------- config

NO_TRIAGE_TARGETS = ("flagged", "rejected")


@dataclass
class TraceSettings:
    policy: str = field(default="new-contextual", metadata={"help": (
        "The NEW policy: a shipped policy name (old-strict, new-contextual) or a policy YAML file.")})
    judge: str = field(default="policy-rules", metadata={"help": (
        "Policy judge: policy-rules (offline, rule-based), policy-minilm (option head), llm-policy (options "
        "base_url, model) or llm:<model>:policy.")})
    judge_options: dict[str, Any] = field(default_factory=dict, metadata={"help": (
        "Options of the judge, e.g. {refusal: embedding-minilm} for policy-rules or {base_url: ..., model: ...}.")})
    triage_file: str | None = field(default=None, metadata={"help": (
        "Use this triage.jsonl (from `tactful triage`) instead of judging the data sources again.")})
    triage_batch_size: int = 32
    allow_failed: bool = field(default=False, metadata={"help": (
        "Train even if some pairs got no verdict (they are left out); by default the run stops so they can be "
        "retried.")})
    alpha_kl: float = field(default=0.1, metadata={"help": "Weight of the RETAIN KL term."})
    gamma: float = field(default=1.0, metadata={"help": "Impact-score damping: w = max(0, <g_J, g_k>) / gamma."})
    gold_batch_size: int = field(default=64, metadata={"help": "Pairs in the gold batch (1/3 RETAIN, 1/3 INVERT, "
                                                                "rest PUNISH)."})
    scoring_batch_size: int = 8
    scoring_method: str = field(default="auto", metadata={"choices": ("auto", "ghost", "loop"), "help": (
        "Per-sample gradients: ghost (one batched backward, LoRA/Linear parameters), loop (one backward per "
        "sample), auto.")})
    weight_scale: str = field(default="sum", metadata={"choices": ("sum", "mean"), "help": (
        "sum: conflict weights sum to 1 (the paper); mean: they average 1, so each weighted term is on the "
        "scale of one loss.")})
    oracle: bool = field(default=False, metadata={"help": (
        "Oracle variant: PUNISH pairs with a compliant correction (meta['corrected']) train (correction > chosen).")})
    no_triage: bool = field(default=False, metadata={"help": "Ablation: no triage (see no_triage_target)."})
    no_triage_target: str = field(default="flagged", metadata={"choices": NO_TRIAGE_TARGETS, "help": (
        "What the no-triage ablation suppresses. flagged (ours): NPO on each response the judge flags, KL on pairs "
        "with none flagged. rejected (the paper's, official trace_notriage.py): NPO on the rejected response of "
        "every relabelled pair (INVERT pairs swapped), no KL term, impact weights over all pairs.")})
    no_impact_weights: bool = field(default=False, metadata={"help": (
        "Ablation: uniform conflict weights, 1/N each under weight_scale sum; the official script "
        "(trace_no_impact_score.py) gives each conflict weight 1, which is weight_scale mean.")})
    no_kl: bool = field(default=False, metadata={"help": "Ablation: no KL term (RETAIN pairs are not trained on)."})


def _trace_training() -> TrainingSettings:
    # The paper: lr 1e-4, 1 epoch, cosine; batch 1 x 4 accumulation there, 4 pairs here.
    return TrainingSettings(learning_rate=1e-4, num_train_epochs=1.0, per_device_train_batch_size=4,
                            warmup_ratio=0.1, max_length=256, save_steps=50, logging_steps=5)


def _trace_data() -> PairDataSettings:
    return PairDataSettings(sources=["builtin-refusal-pairs", "builtin-terse-pairs", "builtin-cautious-pairs"])


@dataclass
class TraceConfig(DPOConfig):
    output_dir: str = "runs/trace"
    data: PairDataSettings = field(default_factory=_trace_data)
    loss: LossSettings = field(default_factory=lambda: LossSettings(name="sigmoid", beta=0.3))
    # The paper's adapter: r 32, alpha 16, dropout 0.1 on the query and value projections.
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=32, alpha=16, dropout=0.1,
                                                                    target_modules=["attn_q", "attn_v"]))
    training: TrainingSettings = field(default_factory=_trace_training)
    trace: TraceSettings = field(default_factory=TraceSettings)


def check_trace_config(config: TraceConfig) -> None:
    t = config.trace
    if config.loss.name != "sigmoid" or config.loss.drdpo:
        raise UserError("trace uses DPO's logistic loss for INVERT pairs: loss.name must be sigmoid and loss.drdpo "
                        "false (loss.beta is TRACE's beta)")
    if config.data.flip_fraction:
        raise UserError("data.flip_fraction must be 0 for trace: the policy judge, not random flips, decides which "
                        "pairs change")
    if config.precompute_ref_logps or config.ref_logps_cache:
        raise UserError("precompute_ref_logps / ref_logps_cache are not supported by trace: the KL term needs "
                        "reference logits")
    if t.alpha_kl < 0:
        raise UserError(f"trace.alpha_kl must be >= 0, got {t.alpha_kl}")
    if t.gamma <= 0:
        raise UserError(f"trace.gamma must be > 0, got {t.gamma}")
    if t.no_triage_target not in NO_TRIAGE_TARGETS:
        raise UserError(f"trace.no_triage_target must be one of {', '.join(NO_TRIAGE_TARGETS)}, got "
                        f"{t.no_triage_target!r}")
    if t.gold_batch_size < 1:
        raise UserError(f"trace.gold_batch_size must be >= 1, got {t.gold_batch_size}")


# ---------------------------------------------------------------- the training set


@dataclass
class TrainingSet:
    pairs: list[PreferencePair]
    kind: list[int]
    npo_chosen: list[float]
    npo_rejected: list[float]
    label: list[str]  # the triage label each training pair came from

    @property
    def conflict_indices(self) -> list[int]:
        return [i for i, k in enumerate(self.kind) if k != KIND_KL]


def build_training_set(triaged: Sequence[TriagedPair], settings: TraceSettings) -> TrainingSet:
    """Turn triaged pairs into training pairs with their loss kind (see the module docstring).

    INVERT -> PREF on the swapped pair; PUNISH -> NPO on both (PREF with the correction when
    oracle); RETAIN -> KL (left out with no_kl or alpha_kl 0). no_triage with target "flagged":
    NPO on each flagged response of every pair, KL for pairs with nothing flagged; with target
    "rejected" (the paper's ablation): NPO on the rejected response of every relabelled pair
    and no KL pairs at all, so every pair is scored and weighted."""
    ts = TrainingSet([], [], [], [], [])
    keep_retain = not settings.no_kl and settings.alpha_kl > 0

    def add(pair: PreferencePair, kind: int, label: str, npo_c: float = 0.0, npo_r: float = 0.0) -> None:
        ts.pairs.append(pair)
        ts.kind.append(kind)
        ts.npo_chosen.append(npo_c)
        ts.npo_rejected.append(npo_r)
        ts.label.append(label)

    for t in triaged:
        if t.label == FAILED:
            continue
        if settings.no_triage and settings.no_triage_target == "rejected":
            # The official ablation trains on the relabelled data (INVERT pairs already swapped)
            # and suppresses each pair's rejected response, whatever its label.
            add(t.training_pair(), KIND_NPO, t.label, 0.0, 1.0)
            continue
        if settings.no_triage:
            c, r = t.chosen.label == VIOLATES, t.rejected.label == VIOLATES
            if c or r:  # no inversion: the masks say which of the pair's own responses to suppress
                add(t.as_is(), KIND_NPO, t.label, float(c), float(r))
            elif keep_retain:
                add(t.as_is(), KIND_KL, t.label)
            continue
        if t.label == INVERT:
            add(t.training_pair(), KIND_PREF, INVERT)
        elif t.label == PUNISH:
            if settings.oracle and t.corrected_complies():
                add(t.training_pair(oracle=True), KIND_PREF, PUNISH)
            else:
                add(t.training_pair(), KIND_NPO, PUNISH, 1.0, 1.0)
        elif keep_retain:
            add(t.training_pair(), KIND_KL, RETAIN)
    return ts


# ---------------------------------------------------------------- trainer


class _KeepLogits:
    """Calls a model and keeps the logits of its output, so the shared `concatenated_logps`
    computes the log-probs while the KL term reads the same forward pass's logits."""

    def __init__(self, model: Any):
        self.model = model
        self.logits: torch.Tensor | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.model(*args, **kwargs)
        self.logits = out.logits
        return out


def _response_logits(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """The logits that predict each scored token of `rows`, and the mask of scored tokens,
    aligned as in `tactful.logprobs.token_logps` (the logits may cover only the last positions)."""
    labels = labels[:, labels.shape[1] - logits.shape[1]:]
    return logits[rows, :-1], labels[rows, 1:] != IGNORE_INDEX


def _sum_count(values: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    values = values.detach()
    return torch.stack([torch.where(select, values, torch.zeros_like(values)).sum(), select.to(values.dtype).sum()])


class TraceTrainer(PreferenceTrainer):
    """PreferenceTrainer with TRACE's hybrid loss. Batches carry per-pair columns trace_kind,
    trace_weight, npo_chosen, npo_rejected; the loss is the SUM of the pairs' terms."""

    def __init__(self, *args: Any, alpha_kl: float = 0.1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.alpha_kl = alpha_kl

    def _reference_forward(self, model: Any, batch: dict[str, torch.Tensor],
                           keep_logits: bool) -> tuple[PairLogps, torch.Tensor | None]:
        if not keep_logits:
            rc, rr = self.reference_logps(model, batch)  # the shared hook: adapters disabled or a frozen copy
            return PairLogps(rc, rr, torch.zeros_like(rc), torch.zeros_like(rr)), None
        if self.ref_model is not None:
            ref, ctx = self.ref_model, contextlib.nullcontext()
        else:
            ref = self.accelerator.unwrap_model(model)
            if not is_peft(ref):
                raise UserError("reference 'base' without LoRA needs a reference model copy")
            ctx = ref.disable_adapter()
        was_training = ref.training
        ref.eval()  # the reference is a fixed function: no dropout
        try:
            with torch.no_grad(), ctx:
                keep = _KeepLogits(ref)
                out = concatenated_logps(keep, batch)
        finally:
            ref.train(was_training)
        return out, keep.logits

    def pair_losses(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        kind = batch["trace_kind"].long()
        kl_rows = torch.nonzero(kind == KIND_KL).flatten()
        need_kl = self.alpha_kl > 0 and kl_rows.numel() > 0

        keep = _KeepLogits(model)
        policy = concatenated_logps(keep, batch)
        ref, ref_logits = self._reference_forward(model, batch, need_kl)
        beta = self.loss_spec.beta
        conflict = conflict_losses(kind, policy.chosen, policy.rejected, ref.chosen, ref.rejected, beta,
                                   npo_chosen=batch.get("npo_chosen"), npo_rejected=batch.get("npo_rejected"))
        kl = torch.zeros_like(conflict)
        if need_kl:
            # KL over the response tokens of y_w: the chosen rows (the first B rows) of RETAIN pairs
            pol, mask = _response_logits(keep.logits, batch["labels"], kl_rows)
            ref_l, _ = _response_logits(ref_logits, batch["labels"], kl_rows)
            kl = kl.index_put((kl_rows,), sequence_kl(ref_l, pol, mask).to(kl.dtype))
        losses = trace_pair_losses(kind, batch["trace_weight"], conflict, kl, self.alpha_kl)

        lr_c = (policy.chosen - ref.chosen).detach()
        lr_r = (policy.rejected - ref.rejected).detach()
        pref, npo, retain = kind == KIND_PREF, kind == KIND_NPO, kind == KIND_KL
        # Per-kind metrics as [sum, count]: a batch may hold no pair of a kind (see store_metrics).
        metrics: dict[str, torch.Tensor] = {
            "trace/pref_loss": _sum_count(conflict, pref),
            "trace/npo_loss": _sum_count(conflict, npo),
            "trace/kl": _sum_count(kl, retain),
            "trace/pref_accuracy": _sum_count((lr_c > lr_r).float(), pref),
            "logratio/chosen": lr_c,
            "logratio/rejected": lr_r,
        }
        return losses, metrics

    def aggregate(self, losses: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # L is a sum over pairs: the impact weights are normalised over the whole data set. Each
        # process sums its share of the global batch and DDP averages the gradients, so scaling
        # by the process count gives the gradient of the sum over the global batch.
        return losses.sum() * self.accelerator.num_processes

    def store_metrics(self, metrics: dict[str, torch.Tensor]) -> None:
        # "trace/" metrics are [sum, count]; every process gathers every key (a collective that
        # must not depend on what a batch holds), then the mean is logged where count > 0.
        rest = {}
        for k, v in metrics.items():
            if not k.startswith("trace/"):
                rest[k] = v
                continue
            v = v.detach().float().reshape(1, 2)
            if self.accelerator.num_processes > 1:
                v = self.accelerator.gather(v)
            total, count = v.sum(0).tolist()
            if count > 0:
                self._metrics[k].append(total / count)
        super().store_metrics(rest)


# ---------------------------------------------------------------- impact scores inside the run


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def prepare_trace(setup: PreferenceSetup, *, training: TrainingSet, triaged: Sequence[TriagedPair],
                  summary: dict[str, Any]) -> None:
    """Called by `train_preference` once the LoRA model and the pair dataset exist: add the
    TRACE columns, compute (or reuse) the impact weights at the reference parameters."""
    from tactful.methods.trace.impact import build_gold_batch, score_impact, scoring_reference

    config: TraceConfig = setup.config  # type: ignore[assignment]
    t = config.trace
    ds, run, log = setup.dataset, setup.run, setup.log
    ds.add_column("trace_kind", training.kind)
    ds.add_column("npo_chosen", training.npo_chosen)
    ds.add_column("npo_rejected", training.npo_rejected)
    conflict = training.conflict_indices
    if not conflict:
        raise UserError("triage found no INVERT or PUNISH pairs: the data already agrees with the new policy, so "
                        "there is nothing to re-align")

    impact: dict[str, Any]
    if t.no_impact_weights:
        raw = [1.0 / len(conflict)] * len(conflict)
        impact = {"method": "uniform (no_impact_weights)"}
    else:
        gold = build_gold_batch(triaged, t.gold_batch_size, seed=config.seed)
        # The scores compare against the same reference as the loss: a separate reference model
        # when the recipe names one, else the starting model (see impact.scoring_reference).
        if setup.ref_model is not None:
            setup.ref_model.to(setup.device)
        reference, reference_desc = scoring_reference(setup.model, setup.ref_model)
        key = _fingerprint({"pairs": [p.to_dict() for p in training.pairs], "kind": training.kind,
                            "npo": [training.npo_chosen, training.npo_rejected], "gold": [p.to_dict() for p in gold],
                            "beta": config.loss.beta, "gamma": t.gamma, "model": config.model,
                            "start_from": config.start_from, "lora": asdict(config.lora), "max_length": config.training.max_length,
                            "system": config.system, "reference": config.reference})
        path = run.path / "impact_scores.json"
        saved = json.loads(path.read_text()) if path.is_file() else None
        if not is_main_process():
            impact = {}  # scored once, by the main process (which writes the file), and shared below
        elif saved is not None and saved.get("fingerprint") == key:
            log(f"reusing the impact scores in {path}")
            impact = saved
        else:
            log(f"impact scores: gold batch of {len(gold)} pairs, {len(conflict)} conflict pairs to score")
            result = score_impact(setup.model, setup.tokenizer, ds, conflict, gold, beta=config.loss.beta,
                                  gamma=t.gamma, batch_size=t.scoring_batch_size, method=t.scoring_method,
                                  max_length=config.training.max_length, system=config.system, reference=reference,
                                  log=log)
            impact = {"fingerprint": key, "judge": summary["judge"], "policy": summary["policy"], **result.to_dict(),
                      "reference": {"recipe": config.reference, "scored_against": reference_desc},
                      "ids": [training.pairs[i].id for i in conflict]}
            run.write_json("impact_scores.json", impact)
            log(f"impact scores ({result.method}): {impact['n_positive']} of {len(conflict)} pairs get weight; "
                f"{result.seconds}")
        impact = share_from_main(impact, what="scoring TRACE's impact weights")
        raw = list(impact["weights"])
        if sum(raw) == 0:
            log("warning: no conflict pair has a positive impact score; only the KL term will train "
                "(try a larger trace.gold_batch_size or trace.no_impact_weights)")
    scale = len(conflict) if t.weight_scale == "mean" else 1.0
    weights = [0.0] * len(training.pairs)
    for i, w in zip(conflict, raw):
        weights[i] = w * scale
    ds.add_column("trace_weight", weights)
    if is_main_process():
        atomic_write_jsonl(run.path / "train_pairs.jsonl",
                           [{**p.to_dict(), "trace_label": lab, "trace_kind": k, "trace_weight": w,
                             "judge": summary["judge"], "policy_hash": summary["policy"]["hash"]}
                            for p, lab, k, w in zip(training.pairs, training.label, training.kind, weights)])
    setup.trainer_kwargs["alpha_kl"] = 0.0 if t.no_kl else t.alpha_kl
    setup.manifest["trace"] = {
        "policy": summary["policy"], "judge": summary["judge"], "triage": summary["counts"],
        "triage_file": "triage/triage.jsonl", "by_category": summary["by_category"],
        "training": {"pairs": len(training.pairs), "pref": training.kind.count(KIND_PREF),
                     "npo": training.kind.count(KIND_NPO), "kl": training.kind.count(KIND_KL)},
        "impact": {k: v for k, v in impact.items() if k not in ("dots", "weights", "ids", "judge", "policy")},
        "impact_file": None if t.no_impact_weights else "impact_scores.json",
        "alpha_kl": t.alpha_kl, "gamma": t.gamma, "beta": config.loss.beta, "weight_scale": t.weight_scale,
        "oracle": t.oracle, "ablations": {"no_triage": t.no_triage, "no_impact_weights": t.no_impact_weights,
                                          "no_kl": t.no_kl,
                                          "no_triage_target": t.no_triage_target if t.no_triage else None},
    }


# ---------------------------------------------------------------- the run


def run_triage(config: TraceConfig, run: RunDir, *, model: Any = None, tokenizer: Any = None,
               model_name: str | None = None,
               log: Callable[[str], None] = print) -> tuple[list[TriagedPair], dict[str, Any]]:
    """Triage step of a TRACE run: the configured pairs judged under the new policy (or a
    triage file read back), written to <run>/triage/. Built-in sources that generate are
    answered by `model`, named `model_name` (default config.model) in the generation cache."""
    t = config.trace
    policy = load_policy(t.policy)
    if t.triage_file:
        triaged = read_triage(t.triage_file)
        rows = read_jsonl_tolerant(t.triage_file)
        hashes = {r.get("policy_hash") for r in rows}
        if hashes != {policy.hash}:
            raise UserError(f"{t.triage_file} was triaged under another policy (hash {', '.join(map(str, hashes))}); "
                            f"trace.policy {policy.name!r} has hash {policy.hash}")
        judges = sorted({str(r.get("judge")) for r in rows})
        summary = summarize(triaged, judge=" + ".join(judges), policy=policy)
        summary["source"] = str(t.triage_file)
    else:
        d = config.data
        pairs = load_trace_pairs(d.sources, split=d.split, n=d.n, seed=config.seed, model=model, tokenizer=tokenizer,
                                 model_name=model_name or config.model, system=config.system, max_new_tokens=d.max_new_tokens,
                                 cache=run.path / "generations.jsonl", refusal_filter=d.refusal_filter, log=log)
        judge = make_policy_judge(t.judge, policy, **t.judge_options)
        cache_path = run.path / "verdict_cache.jsonl"
        triaged, stats = triage_pairs(pairs, judge, policy, cache=VerdictCache(cache_path),
                                      batch_size=t.triage_batch_size, judge_corrected=t.oracle, log=log)
        summary = summarize(triaged, judge=judge.name, policy=policy, stats=stats, cache_path=cache_path)
        summary["data"] = list(d.sources)
    write_triage(run.path / "triage", triaged, summary)
    log(format_summary(summary))
    n_failed = summary["counts"][FAILED]
    if n_failed and not t.allow_failed:
        where = run.path / "triage" / "triage_summary.json"
        raise UserError(f"{n_failed} pairs got no verdict from the judge (see {where}); "
                        "run again to retry them (finished verdicts are cached), or set trace.allow_failed=true "
                        "to train without them")
    return triaged, summary


def train_trace(config: TraceConfig, *, model: Any = None, tokenizer: Any = None, run_dir: RunDir | None = None,
                callbacks: list[Any] | None = None, log: Callable[[str], None] = print) -> tuple[Any, RunDir]:
    """Triage, impact scores and hybrid-loss training; returns (model, run dir).

    The policy starts from `model` if given (with `config.start_from`, that run's model with
    its adapters merged), else from `config.start_from` or `config.model`. Re-running with
    the same output_dir resumes: cached verdicts, saved impact scores and the last Trainer
    checkpoint are reused."""
    check_trace_config(config)
    set_seed(config.seed)
    run = run_dir or RunDir(config.output_dir)
    if model is None:
        # Triage and impact scores run on the main process only: the others need no weights
        # before FSDP shards the model (RAM-efficient loading).
        start = load_start_model(config.model, config.start_from, log=log, for_training=True,
                                 dtype=training_dtype(config.model_dtype, full_finetune=not config.lora.enabled))
        model, tokenizer = start.model, start.tokenizer
    elif config.start_from:
        start = describe_start(config.model, config.start_from, log=log)
    else:
        start = StartModel(None, None, base_model=config.model)
    # Built-in pairs are answered by the starting model: put it where it will train first.
    model = to_device(model, training_arguments(config.training, run.path / "checkpoints", seed=config.seed).device)
    # Judged once, by the main process (it owns the verdict cache and the triage files); all get its labels.
    triaged, summary = run_on_main(lambda: run_triage(config, run, model=model, tokenizer=tokenizer,
                                                      model_name=start.name, log=log),
                                   what="triaging the pairs under the new policy")
    training = build_training_set(triaged, config.trace)
    if not training.pairs:
        raise UserError("nothing to train on after triage (all pairs failed, or only RETAIN pairs with no_kl)")
    prepare = functools.partial(prepare_trace, training=training, triaged=triaged, summary=summary)
    return train_preference(config, kind="trace", model=model, tokenizer=tokenizer, pairs=training.pairs,
                            run_dir=run, trainer_class=TraceTrainer, prepare=prepare, callbacks=callbacks,
                            start=start, log=log)


CONFIG_CLASS = TraceConfig
RUN_LOADERS["trace"] = load_started_run  # runs with start_from: base + start adapters + own adapter


def run(config: TraceConfig, *, log: Callable[[str], None] = print) -> RunDir:
    """Entry point for `tactful train` recipes with `method: trace`."""
    return train_trace(config, log=log)[1]
