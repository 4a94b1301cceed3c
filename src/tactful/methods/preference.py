"""`dpo`: preference optimisation on `transformers.Trainer` (DPO, cDPO, rDPO, IPO, SimPO, Dr.DPO).

The one preference code path of tactful. ShaPO (`shapo.py`) and TRACE reuse its pieces
instead of copying them:

    PairDataset / PairCollator    (prompt, chosen, rejected) -> one padded batch of 2B rows,
                                  chosen rows first, labels on response tokens only
                                  (`tactful.logprobs.encode_example`), plus per-pair columns
                                  (precomputed reference log-probs, soft labels p*, weights)
    concatenated_logps            chosen and rejected log-probs in ONE forward pass
    PreferenceTrainer             a Trainer whose loss is built from overridable hooks:
        reference_logps(model, batch)   adapters disabled (the usual implicit reference),
                                        a separate frozen model, or precomputed columns
        pair_losses(model, batch)       per-example losses + metrics
        aggregate(losses, batch)        mean, or Dr.DPO's soft minimum
    train_preference              data -> label noise -> model -> trainer -> adapter + manifest;
                                  a `prepare` callback lets a method add columns, trainer
                                  arguments and manifest fields (ShaPO adds its probe and mask)

Being a Trainer, it gets checkpoints, `resume_from_checkpoint`, gradient accumulation,
`report_to` and `accelerate launch` for free. The logged metrics follow trl's names:
rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen,
logps/rejected.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from tactful.data.records import PreferencePair
from tactful.errors import UserError
from tactful.logprobs import IGNORE_INDEX, Encoded, collate, encode_example, token_logps
from tactful.methods.common import (
    LoraSettings,
    StartModel,
    TrainingSettings,
    describe_start,
    is_peft,
    last_checkpoint,
    load_start_model,
    load_started_run,
    log_at_checkpoints,
    prepare_trainable,
    run_train_loss,
    save_start,
    save_trained,
    set_seed,
    training_arguments,
)
from tactful.distributed import ram_efficient_loading, run_on_main
from tactful.models import to_device, training_dtype
from tactful.methods.losses import PREFERENCE_LOSSES, PreferenceLoss, drdpo_aggregate, soft_label_loss
from tactful.progress import rich_training_progress
from tactful.runs import RUN_LOADERS, RunDir

from transformers import Trainer


# ---------------------------------------------------------------- config


@dataclass
class PairDataSettings:
    sources: list[str] = field(default_factory=lambda: ["builtin-refusal-pairs"], metadata={
        "help": "Pair sources: builtin-refusal-pairs / builtin-informative-pairs (rejected = the model's own "
                "answer, generated once and cached in the run), a registry pairs benchmark, NAME:PATH for a "
                "benchmark file in its own columns, or a pairs file in tactful's format."})
    split: str = "train"
    n: int | None = field(default=None, metadata={"help": "At most n pairs from each source (seeded subsample)."})
    max_new_tokens: int = field(default=128, metadata={"help": "Answer length when generating rejected answers."})
    refusal_filter: str | None = field(default="string-xstest", metadata={"help": (
        "Judge that drops built-in pairs whose generated (rejected) answer is a refusal; null keeps all")})
    flip_fraction: float = field(default=0.0, metadata={
        "help": "Swap chosen/rejected in this fraction of pairs (simulated label noise; ShaPO uses 0.3-0.4)."})
    flip_seed: int = 0


@dataclass
class LossSettings:
    name: str = field(default="sigmoid", metadata={"choices": PREFERENCE_LOSSES, "help": (
        "sigmoid (DPO) | cdpo (label smoothing) | rdpo (robust, unbiased) | ipo | simpo (reference-free)")})
    beta: float = 0.1
    label_smoothing: float = field(default=0.0, metadata={"help": "Label-flip rate eps for cdpo and rdpo."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target margin gamma."})
    drdpo: bool = field(default=False, metadata={"help": "Aggregate with Dr.DPO: -beta' log mean exp(-loss/beta')."})
    beta_prime: float = 1.0

    def spec(self) -> PreferenceLoss:
        try:
            return PreferenceLoss(self.name, beta=self.beta, eps=self.label_smoothing, gamma=self.simpo_gamma)
        except ValueError as e:
            raise UserError(f"loss: {e}") from None


def _dpo_training() -> TrainingSettings:
    # LoRA DPO wants a smaller step than LoRA SFT; batch 4 pairs = 8 sequences per forward.
    return TrainingSettings(learning_rate=5e-5, per_device_train_batch_size=4, warmup_ratio=0.1, max_length=384)


@dataclass
class DPOConfig:
    model: str = "embedded"
    start_from: str | None = field(default=None, metadata={"help": (
        "A finished tactful run (e.g. safety SFT) to start from: its adapter(s) are merged into the model, the new "
        "adapter trains on top, and the reference ('base') is that start model. Its base model replaces `model`.")})
    output_dir: str = "runs/dpo"
    model_dtype: str | None = field(default=None, metadata={"help": (
        "Weights dtype to load the model (and a `reference` model) in: float32, bfloat16, float16 or auto (the "
        "checkpoint's). Unset: float32 without a GPU; on a GPU the checkpoint's (float32 for full fine-tuning unless "
        "DeepSpeed or FSDP with mixed precision keeps float32 master weights). docs/scale-out.md")})
    seed: int = 0
    system: str | None = None
    data: PairDataSettings = field(default_factory=PairDataSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    reference: str = field(default="base", metadata={"help": (
        "base: the starting model, `start_from` if set (with LoRA: the same model with adapters disabled, no extra "
        "copy); "
        "or a model spec / tactful run directory to use as a frozen reference")})
    precompute_ref_logps: bool = field(default=False, metadata={
        "help": "Score every pair with the reference once before training (no reference forward per step)."})
    ref_logps_cache: str | None = field(default=None, metadata={"help": (
        "A JSONL file of reference log-probs shared by runs with the same reference model, system prompt and "
        "max_length (the arms of a sweep over losses or label noise): each response is scored once for all of "
        "them. Implies precompute_ref_logps.")})
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainingSettings = field(default_factory=_dpo_training)
    resume: bool = True


# ---------------------------------------------------------------- data


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded
    columns: dict[str, float] = field(default_factory=dict)  # per-pair scalars (ref log-probs, p*, weights)


class PairDataset(torch.utils.data.Dataset):
    """Pairs tokenised with the chat template; labels on the response (and its end-of-turn) only."""

    def __init__(self, tokenizer: Any, pairs: Sequence[PreferencePair], *, max_length: int = 384,
                 system: str | None = None):
        if not pairs:
            raise UserError("no preference pairs to train on")
        self.pairs = list(pairs)
        self.items = [
            EncodedPair(chosen=encode_example(tokenizer, p.prompt, p.chosen, system=system, max_length=max_length),
                        rejected=encode_example(tokenizer, p.prompt, p.rejected, system=system, max_length=max_length))
            for p in self.pairs
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> EncodedPair:
        return self.items[i]

    def add_column(self, name: str, values: Sequence[float]) -> None:
        """Attach one float per pair; the collator hands it to the trainer as batch[name] of shape [B]."""
        if len(values) != len(self.items):
            raise ValueError(f"column {name!r} has {len(values)} values for {len(self.items)} pairs")
        for item, v in zip(self.items, values):
            item.columns[name] = float(v)


class PairCollator:
    """Chosen rows then rejected rows, right-padded to one length, so one forward pass scores both."""

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[EncodedPair]) -> dict[str, torch.Tensor]:
        batch = collate([it.chosen for it in items] + [it.rejected for it in items], self.pad_token_id,
                        pad_to_multiple_of=self.pad_to_multiple_of)
        for name in items[0].columns:
            batch[name] = torch.tensor([it.columns[name] for it in items], dtype=torch.float32)
        return batch


# ---------------------------------------------------------------- log-probs


@dataclass
class PairLogps:
    chosen: torch.Tensor  # [B] summed log-probs of the chosen responses
    rejected: torch.Tensor  # [B]
    chosen_tokens: torch.Tensor  # [B] number of scored response tokens (for per-token means)
    rejected_tokens: torch.Tensor


def concatenated_logps(model: Any, batch: dict[str, torch.Tensor]) -> PairLogps:
    """Sequence log-probs of the chosen and rejected responses of a `PairCollator` batch, in one
    forward pass over the 2B rows.

    Logits are only materialised from the first response position on (`logits_to_keep`):
    the prompt and the chat template's system preamble need no LM head, which saves a
    large part of the vocabulary-sized work on short answers. Log-probs themselves come from
    `tactful.logprobs.token_logps`, the shared implementation.
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    seq_len = labels.shape[1]
    is_response = labels != IGNORE_INDEX
    first = int(torch.where(is_response.any(1), is_response.float().argmax(1), seq_len).min())
    first = max(first, 1)  # a label at position 0 has no predicting logit
    keep = seq_len - first + 1
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False).logits
    except TypeError as e:  # a model whose forward has no logits_to_keep
        if "logits_to_keep" not in str(e):
            raise
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logps, mask = token_logps(logits, labels[:, seq_len - logits.shape[1]:])
    total, count = logps.sum(-1), mask.sum(-1)
    n = total.shape[0] // 2
    return PairLogps(total[:n], total[n:], count[:n], count[n:])


# ---------------------------------------------------------------- trainer


class PreferenceTrainer(Trainer):
    """A `transformers.Trainer` for pairwise preference losses.

    Subclasses change one hook: `pair_losses` (what each pair costs), `aggregate` (how a
    batch of costs becomes the loss) or `reference_logps` (what the policy is compared to).
    """

    def __init__(self, *args: Any, loss: PreferenceLoss, drdpo_beta_prime: float | None = None,
                 ref_model: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_spec = loss
        self.drdpo_beta_prime = drdpo_beta_prime
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.to(self.args.device)
        # Our loss is a mean over pairs, not a token sum the model normalises itself: the
        # Trainer must divide it by the accumulation steps as usual.
        self.model_accepts_loss_kwargs = False
        self.record_metrics = True  # ShaPO turns this off for its probing forward pass
        self._metrics: dict[str, list[float]] = defaultdict(list)

    # -- hooks

    def concatenated_logps(self, model: Any, batch: dict[str, torch.Tensor]) -> PairLogps:
        return concatenated_logps(model, batch)

    @torch.no_grad()
    def reference_logps(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reference log-probs (chosen, rejected): precomputed columns, the frozen
        reference model, or the policy itself with its LoRA adapters disabled."""
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if self.ref_model is not None:
            out = _eval_mode_logps(self.ref_model, batch)
        else:
            unwrapped = self.accelerator.unwrap_model(model)
            if not is_peft(unwrapped):
                raise UserError("reference 'base' without LoRA needs a reference model copy")
            with unwrapped.disable_adapter():
                out = _eval_mode_logps(unwrapped, batch)
        return out.chosen, out.rejected

    def pair_losses(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses [B] and per-pair metrics."""
        spec = self.loss_spec
        policy = self.concatenated_logps(model, batch)
        pc, pr = policy.chosen, policy.rejected
        if spec.needs_reference:
            rc, rr = self.reference_logps(model, batch)
        else:
            rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
        if spec.length_normalised:
            pc, pr = pc / policy.chosen_tokens.clamp(min=1), pr / policy.rejected_tokens.clamp(min=1)
            rc, rr = rc / policy.chosen_tokens.clamp(min=1), rr / policy.rejected_tokens.clamp(min=1)
        h = (pc - rc) - (pr - rr)
        if "p_star" in batch:  # reward-level soft labels (ShaPO): BCE against p*
            losses = soft_label_loss(h, batch["p_star"].to(h.dtype), spec.beta)
        else:
            losses = spec.from_margin(h)
        chosen_rewards = spec.beta * (pc - rc).detach()
        rejected_rewards = spec.beta * (pr - rr).detach()
        metrics = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": policy.chosen.detach(),
            "logps/rejected": policy.rejected.detach(),
        }
        return losses, metrics

    def aggregate(self, losses: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over pairs, or Dr.DPO's soft minimum over the (micro-)batch."""
        if self.drdpo_beta_prime is not None:
            return drdpo_aggregate(losses, self.drdpo_beta_prime)
        return losses.mean()

    # -- Trainer plumbing

    def compute_loss(self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        losses, metrics = self.pair_losses(model, inputs)
        loss = self.aggregate(losses, inputs)
        if self.record_metrics:
            self.store_metrics(metrics)
        return (loss, metrics) if return_outputs else loss

    def store_metrics(self, metrics: dict[str, torch.Tensor]) -> None:
        # Local only: a collective here would hang as soon as two processes' batches gave
        # different metric keys (or one skipped a step's metrics); `log` reduces them instead.
        for k, v in metrics.items():
            v = v.detach().float()
            if v.numel():
                self._metrics[k].append(v.mean().item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log (every process logs it): add the averages since the last one
            from tactful.distributed import mean_across_processes

            logs.update(mean_across_processes(self._metrics))
            self._metrics.clear()
        super().log(logs, start_time)


def _eval_mode_logps(model: Any, batch: dict[str, torch.Tensor]) -> PairLogps:
    # The reference is a fixed function: no dropout, whatever mode training left it in.
    was_training = model.training
    model.eval()
    try:
        return concatenated_logps(model, batch)
    finally:
        model.train(was_training)


class RefLogpsCache:
    """Reference log-probs of responses in a JSONL file, keyed by (reference identity, prompt,
    response). Keys are per response, not per pair, so runs that flip different labels share them.
    Only the main process appends; every process reads."""

    def __init__(self, path: str | Path, reference: str):
        from tactful.io import read_jsonl_tolerant

        self.path = Path(path)
        self.reference = reference
        self.values = {row["key"]: float(row["logp"]) for row in read_jsonl_tolerant(self.path)
                       if "key" in row and "logp" in row}
        self.hits = 0

    def key(self, prompt: str, response: str) -> str:
        import hashlib
        import json

        blob = json.dumps([self.reference, prompt, response], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def put(self, rows: Sequence[tuple[str, float]]) -> None:
        from tactful.distributed import is_main_process
        from tactful.io import append_jsonl

        for k, v in rows:
            self.values[k] = v
            if is_main_process():
                append_jsonl(self.path, {"key": k, "logp": v})


def reference_identity(config: DPOConfig, start: StartModel) -> str:
    """What a reference log-prob depends on besides the text: the reference weights, the chat
    formatting and truncation."""
    import json

    ref = start.name if config.reference == "base" else f"reference:{config.reference}"
    return json.dumps({"reference": ref, "system": config.system, "max_length": config.training.max_length})


@torch.no_grad()
def precompute_reference_logps(ref: Any, dataset: PairDataset, collator: PairCollator, *, batch_size: int,
                               device: Any = None, use_disabled_adapter: bool = False,
                               cache: RefLogpsCache | None = None) -> None:
    """Score every pair with the reference once and store ref_chosen_logps / ref_rejected_logps
    columns, so training runs no reference forward (trl's precompute_ref_log_probs). With a
    cache, only pairs with a response it lacks are scored, and their scores are added to it."""
    keys = ([(cache.key(p.prompt, p.chosen), cache.key(p.prompt, p.rejected)) for p in dataset.pairs]
            if cache is not None else [])
    todo = [i for i in range(len(dataset)) if cache is None or keys[i][0] not in cache.values
            or keys[i][1] not in cache.values]
    scored: dict[int, tuple[float, float]] = {}
    ctx = ref.disable_adapter() if use_disabled_adapter else contextlib.nullcontext()
    with ctx:
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            batch = collator([dataset[i] for i in idx])
            batch = {k: v.to(device) if device is not None else v for k, v in batch.items()}
            out = _eval_mode_logps(ref, batch)
            for i, c, r in zip(idx, out.chosen.tolist(), out.rejected.tolist()):
                scored[i] = (c, r)
            if cache is not None:
                cache.put([(keys[i][j], scored[i][j]) for i in idx for j in (0, 1)])
    if cache is not None:
        cache.hits += len(dataset) - len(todo)
    values = [scored[i] if i in scored else (cache.values[keys[i][0]], cache.values[keys[i][1]])  # type: ignore[union-attr]
              for i in range(len(dataset))]
    dataset.add_column("ref_chosen_logps", [c for c, _ in values])
    dataset.add_column("ref_rejected_logps", [r for _, r in values])


# ---------------------------------------------------------------- the training run


@dataclass
class PreferenceSetup:
    """What `train_preference` has built when it calls a method's `prepare` callback.

    The callback may add dataset columns, keyword arguments for the trainer class, and
    fields for the manifest."""

    config: DPOConfig
    model: Any  # trainable (LoRA-wrapped) policy
    tokenizer: Any
    pairs: list[PreferencePair]
    dataset: PairDataset
    run: RunDir
    device: Any
    log: Callable[[str], None]
    # The frozen reference model, or None when the policy with its adapters disabled is the
    # reference. A method that scores pairs before training (TRACE) must compare against it too.
    ref_model: Any = None
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


def load_training_pairs(config: DPOConfig, model: Any, tokenizer: Any, run: RunDir,
                        log: Callable[[str], None] = print, *, model_name: str | None = None) -> list[PreferencePair]:
    """The configured pairs; built-in sources are answered by `model` (named `model_name` in
    the generation cache, default `config.model`)."""
    from tactful.data.pairs import load_pairs

    d = config.data
    return load_pairs(d.sources, split=d.split, n=d.n, seed=config.seed, model=model, tokenizer=tokenizer,
                      model_name=model_name or config.model, system=config.system, max_new_tokens=d.max_new_tokens,
                      cache=run.path / "generations.jsonl", refusal_filter=d.refusal_filter, log=log)


def make_reference(config: DPOConfig, model: Any, tokenizer: Any) -> Any:
    """The frozen reference model, or None when the policy's disabled adapters serve as one."""
    if config.reference == "base":
        if config.lora.enabled:
            return None  # implicit: the same model with adapters disabled
        ref = copy.deepcopy(model)  # full fine-tuning changes the weights: keep a frozen copy
        if ram_efficient_loading() and not (config.precompute_ref_logps or config.ref_logps_cache):
            # The policy's weights exist on the main process only (FSDP will broadcast them when it
            # shards); the reference stays whole on every process, so it is copied over now. (With
            # precomputed log-probs only the main process uses it, before training.)
            from tactful.distributed import broadcast_module

            broadcast_module(ref)
    else:
        from tactful.models import load_model
        from tactful.runs import load_run_model

        dtype = training_dtype(config.model_dtype, full_finetune=not config.lora.enabled)
        if (Path(config.reference) / "manifest.json").is_file():
            ref, ref_tok, _ = load_run_model(config.reference, dtype=dtype)
        else:
            ref, ref_tok = load_model(config.reference, dtype=dtype)
        if len(ref_tok) != len(tokenizer):
            raise UserError(f"reference {config.reference!r} has a different vocabulary ({len(ref_tok)} tokens) "
                            f"from model {config.model!r} ({len(tokenizer)})")
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def check_config(config: DPOConfig) -> PreferenceLoss:
    spec = config.loss.spec()
    if config.loss.drdpo and config.loss.beta_prime <= 0:
        raise UserError(f"loss.beta_prime must be > 0, got {config.loss.beta_prime}")
    if not 0 <= config.data.flip_fraction <= 1:
        raise UserError(f"data.flip_fraction must be in [0, 1], got {config.data.flip_fraction}")
    return spec


def train_preference(
    config: DPOConfig,
    *,
    kind: str = "dpo",
    model: Any = None,
    tokenizer: Any = None,
    pairs: Sequence[PreferencePair] | None = None,
    run_dir: RunDir | None = None,
    trainer_class: type = PreferenceTrainer,
    prepare: Callable[[PreferenceSetup], None] | None = None,
    callbacks: list[Any] | None = None,
    start: StartModel | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Any, RunDir]:
    """Train a preference method and save its adapter (or full model) into the run directory.

    The policy starts from `model` if given (with `config.start_from` set, the caller's model
    must be that run's model with its adapters merged, as `load_start_model` gives; `start`
    describes it), else from `start.model`, else from what the config names. Re-running with the same output_dir
    resumes from the last checkpoint (generations of built-in pairs are cached in the run, so
    they are not redone). Returns (model, run dir).
    """
    from tactful.data.pairs import flip_labels

    spec = check_config(config)
    set_seed(config.seed)
    run = run_dir or RunDir(config.output_dir)
    if start is None and model is not None:
        start = (describe_start(config.model, config.start_from, log=log) if config.start_from
                 else StartModel(None, None, base_model=config.model))
    elif start is None:
        start = load_start_model(config.model, config.start_from, log=log, for_training=True,
                                 dtype=training_dtype(config.model_dtype, full_finetune=not config.lora.enabled))
    if model is None:
        model, tokenizer = start.model, start.tokenizer
    start.model = start.tokenizer = None  # the policy will train: keep no second name for it
    ckpt_dir = run.path / "checkpoints"
    args = training_arguments(config.training, ckpt_dir, seed=config.seed)
    model = to_device(model, args.device)  # not a model without weights here (RAM-efficient FSDP loading)

    # Data: pairs (built-in ones are generated by the model before it is trained), then label noise.
    if pairs is None:
        # One process answers the built-in prompts (and writes the generation cache); all get its pairs.
        pairs = run_on_main(lambda: load_training_pairs(config, model, tokenizer, run, log, model_name=start.name),
                            what="building the preference pairs")
    pairs, flipped = flip_labels(list(pairs), config.data.flip_fraction, config.data.flip_seed)
    if flipped:
        log(f"flipped the labels of {len(flipped)} of {len(pairs)} pairs (seed {config.data.flip_seed})")
    run.write_json("flipped_ids.json", [pairs[i].id if pairs[i].id is not None else i for i in flipped])

    # Model: the reference is fixed before the policy becomes trainable.
    ref_model = make_reference(config, model, tokenizer) if spec.needs_reference else None
    model = prepare_trainable(model, config.lora)
    if config.training.gradient_checkpointing and is_peft(model):
        model.enable_input_require_grads()
    dataset = PairDataset(tokenizer, pairs, max_length=config.training.max_length, system=config.system)
    collator = PairCollator(tokenizer.pad_token_id)

    setup = PreferenceSetup(config=config, model=model, tokenizer=tokenizer, pairs=list(pairs), dataset=dataset,
                            run=run, device=args.device, log=log, ref_model=ref_model)
    if prepare is not None:
        prepare(setup)

    ref_cache = None
    if (config.precompute_ref_logps or config.ref_logps_cache) and spec.needs_reference:
        if config.ref_logps_cache:
            ref_cache = RefLogpsCache(config.ref_logps_cache, reference_identity(config, start))
        log(f"scoring {len(dataset)} pairs with the reference model"
            + (f" (cache {config.ref_logps_cache})" if ref_cache is not None else ""))
        score = functools.partial(precompute_reference_logps, ref_model if ref_model is not None else model, dataset,
                                  collator, batch_size=config.training.per_device_train_batch_size,
                                  device=args.device, use_disabled_adapter=ref_model is None, cache=ref_cache)
        if ram_efficient_loading():
            # Only the main process holds the weights: it scores, every process gets the columns.
            def scored_columns() -> list[dict[str, float]]:
                score()
                return [it.columns for it in dataset.items]

            columns = run_on_main(scored_columns, what="scoring the pairs with the reference model")
            for item, cols in zip(dataset.items, columns):
                item.columns.update(cols)
        else:
            score()
        if ref_cache is not None:
            log(f"reference log-probs: {ref_cache.hits} of {len(dataset)} pairs from the cache")
        ref_model = None  # not needed any more: free it

    trainer = trainer_class(model=model, args=args, train_dataset=dataset, data_collator=collator, loss=spec,
                            drdpo_beta_prime=config.loss.beta_prime if config.loss.drdpo else None,
                            ref_model=ref_model, callbacks=[log_at_checkpoints(), *(callbacks or [])],
                            **setup.trainer_kwargs)
    rich_training_progress(trainer, type(trainer).__name__.removesuffix("Trainer") or "preference")
    resume = last_checkpoint(ckpt_dir) if config.resume else None
    if resume:
        log(f"resuming from {resume}")
    result = trainer.train(resume_from_checkpoint=resume)
    model = trainer.model
    model.eval()

    subdir = "adapter" if is_peft(model) else "model"
    save_trained(trainer, tokenizer, run.path / subdir)
    run.write_json("train_log.json", trainer.state.log_history)
    run.write_config({"method": kind, **asdict(config)})
    started = save_start(start, run.path)
    run.write_manifest(
        kind=kind, base_model=start.base_model, seed=config.seed,
        data={"pairs": [p.to_dict() for p in pairs]},
        extra={**started, "adapter": subdir if subdir == "adapter" else None,
               "model_dir": subdir if subdir == "model" else None,
               "counts": {"pairs": len(pairs), "sources": list(config.data.sources)},
               "label_noise": {"flip_fraction": config.data.flip_fraction, "flip_seed": config.data.flip_seed,
                               "n_flipped": len(flipped), "flipped_ids": "flipped_ids.json"},
               "loss": {"name": spec.name, "beta": spec.beta, "eps": spec.eps, "gamma": spec.gamma,
                        "drdpo_beta_prime": config.loss.beta_prime if config.loss.drdpo else None},
               "reference": config.reference, "precompute_ref_logps": config.precompute_ref_logps,
               "ref_logps_cache": ({"file": config.ref_logps_cache, "pairs_from_cache": ref_cache.hits}
                                   if ref_cache is not None else None),
               "train_loss": run_train_loss(trainer, result.training_loss), "steps": trainer.state.global_step,
               **setup.manifest, "status": "complete"},
    )
    return model, run


def train_dpo(config: DPOConfig, **kw: Any) -> tuple[Any, RunDir]:
    """Train DPO-family preference optimisation (see `train_preference` for the keywords)."""
    return train_preference(config, kind="dpo", **kw)


CONFIG_CLASS = DPOConfig
# Runs that started from another run load as base + the start's adapters + their own.
RUN_LOADERS["dpo"] = load_started_run


def run(config: DPOConfig, *, log: Callable[[str], None] = print) -> RunDir:
    """Entry point for `tactful train` recipes with `method: dpo`."""
    return train_dpo(config, log=log)[1]
