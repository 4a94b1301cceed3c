"""Pieces every training method shares: LoRA and optimisation settings, model preparation,
tokenised datasets with response-only labels, Trainer arguments, checkpoint resume,
saving the final adapter atomically into the run directory, and starting from an earlier
run (`start_from`: `load_start_model`, `save_start`, `load_started_run`).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from tactful import architectures
from tactful.data.records import Example
from tactful.errors import UserError
from tactful.io import publish_dir
from tactful.logprobs import Encoded, collate, encode_example
from tactful.models import materialize_trainable, to_device

# Roles, resolved per architecture (Phi-3's fused qkv_proj, Llama's q_proj/k_proj/v_proj, ...).
DEFAULT_TARGETS = list(architectures.DEFAULT_LORA_ROLES)


@dataclass
class LoraSettings:
    enabled: bool = field(default=True, metadata={"help": "LoRA (true) or full fine-tuning (false)."})
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS), metadata={"help": (
        "Roles (attn_q, attn_k, attn_v, attn_out, mlp_gate, mlp_up, mlp_down; resolved per architecture) "
        "and/or module names.")})
    layers: list[int] | None = field(default=None, metadata={"help": "Only adapt these layer indices."})


@dataclass
class TrainingSettings:
    learning_rate: float = 2e-4
    num_train_epochs: float = 1.0
    max_steps: int = field(default=-1, metadata={"min": 1, "except": {-1: "unset: train num_train_epochs"}})
    per_device_train_batch_size: int = field(default=8, metadata={"min": 1})
    gradient_accumulation_steps: int = field(default=1, metadata={"min": 1})
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler_type: str = "cosine"
    max_length: int = field(default=384, metadata={"min": 1})
    logging_steps: int = field(default=10, metadata={"min": 1})
    save_steps: int = field(default=50, metadata={"min": 1})
    save_total_limit: int = 2
    report_to: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False
    bf16: bool = False
    optim: str = "adamw_torch"
    max_grad_norm: float = 1.0
    dataloader_num_workers: int = 0
    group_by_length: bool = field(default=False, metadata={"help": (
        "sft and dcr: batch examples of similar length together (less padding, faster on CPU), batches in a "
        "seeded random order")})
    ddp_find_unused_parameters: bool | None = field(default=None, metadata={"help": (
        "DDP only: false skips the per-step search for parameters that got no gradient (faster; right when every "
        "trainable parameter gets one each step, as in tactful's methods with LoRA); null keeps the Trainer's "
        "choice (true for PEFT models)")})


def set_seed(seed: int) -> None:
    from transformers import set_seed as hf_set_seed

    hf_set_seed(seed)


def apply_lora(model: Any, lora: LoraSettings, *, adapter_name: str = "default") -> Any:
    """Wrap a model with a fresh trainable LoRA adapter (PEFT)."""
    from peft import LoraConfig, get_peft_model

    targets = architectures.lora_target_modules(model, list(lora.target_modules))
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(architectures.matches_target(n, [t]) for n in names)]
    if missing:
        raise UserError(f"LoRA target module(s) {', '.join(missing)} not found in the model; "
                        f"linear modules present: {', '.join(sorted(_linear_names(model)))}")
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                     layers_to_transform=lora.layers, task_type="CAUSAL_LM")
    # PEFT (0.21) reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: a
    # FutureWarning on every `tactful train` that no user can act on, so that one is silenced here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = get_peft_model(model, cfg, adapter_name=adapter_name)
    # On a model built without weights (RAM-efficient FSDP loading) PEFT puts the new factors on
    # the meta device too; the optimizer needs them real (`materialize_trainable`).
    return materialize_trainable(wrapped)


def _linear_names(model: Any) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def prepare_trainable(model: Any, lora: LoraSettings) -> Any:
    if lora.enabled:
        return apply_lora(model, lora)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    return materialize_trainable(model)


class EncodedDataset(torch.utils.data.Dataset):
    """Chat-formatted examples with labels on response tokens only."""

    def __init__(self, tokenizer: Any, examples: Sequence[Example], *, max_length: int = 384,
                 system: str | None = None):
        if not examples:
            raise UserError("no training examples")
        self.items = [encode_example(tokenizer, e.prompt, e.response, system=system, max_length=max_length)
                      for e in examples]

    def __len__(self) -> int:
        return len(self.items)

    def group_by_length(self, batch_size: int, seed: int) -> None:
        """Reorder the items so that each run of `batch_size` has similar lengths (little padding),
        with the batches in a seeded random order; train with sequential sampling to keep it."""
        rng = random.Random(seed)
        order = list(range(len(self.items)))
        rng.shuffle(order)
        # Sort within mega-batches (as transformers' LengthGroupedSampler does) so that batches
        # still mix examples from across the data set rather than sorting all of it.
        mega = batch_size * 50
        grouped = []
        for k in range(0, len(order), mega):
            chunk = sorted(order[k:k + mega], key=lambda i: -len(self.items[i].input_ids))
            grouped.extend(chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size))
        rng.shuffle(grouped)
        self.items = [self.items[i] for batch in grouped for i in batch]

    def __getitem__(self, i: int) -> Encoded:
        return self.items[i]


class ResponseCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        return collate(batch, self.pad_token_id)


def _sampling(settings: TrainingSettings, params: Any, grouped: bool) -> dict[str, Any]:
    # The dataset itself is in length-grouped order (EncodedDataset.group_by_length): transformers'
    # own grouping sampler only reads lengths from dict items or a datasets.Dataset column.
    if not settings.group_by_length:
        return {}
    if not grouped:
        raise UserError("training.group_by_length is supported by sft and dcr only; remove it from this recipe")
    if "train_sampling_strategy" in params:
        return {"train_sampling_strategy": "sequential"}
    raise UserError("training.group_by_length needs transformers >= 5 (train_sampling_strategy)")


def training_arguments(settings: TrainingSettings, output_dir: str | Path, *, seed: int, grouped: bool = False,
                       **extra: Any) -> Any:
    """TrainingArguments from a recipe's training block; grouped: the train dataset is already in
    length-grouped order (train it sequentially)."""
    import inspect

    from transformers import TrainingArguments

    from tactful.distributed import setup

    setup()  # under a multi-process launch: the process group, on gloo when there is no GPU
    params = inspect.signature(TrainingArguments.__init__).parameters
    # transformers 5 folded warmup_ratio into warmup_steps (a float < 1 is a ratio)
    warmup = {"warmup_ratio": settings.warmup_ratio} if "warmup_ratio" in params else {"warmup_steps": settings.warmup_ratio}
    return TrainingArguments(
        **warmup,
        output_dir=str(output_dir),
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.per_device_train_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        weight_decay=settings.weight_decay,
        lr_scheduler_type=settings.lr_scheduler_type,
        logging_steps=settings.logging_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        report_to=list(settings.report_to) or "none",
        **({"gradient_checkpointing": True} if settings.gradient_checkpointing else {}),
        dataloader_pin_memory=False,  # nothing to pin to on CPU; GPUs gain little for these small batches
        bf16=settings.bf16,
        optim=settings.optim,
        max_grad_norm=settings.max_grad_norm,
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=settings.dataloader_num_workers,
        **_sampling(settings, params, grouped),
        ddp_find_unused_parameters=settings.ddp_find_unused_parameters,
        remove_unused_columns=False,
        disable_tqdm=False,
        **({"save_safetensors": True} if "save_safetensors" in params else {}),
        **extra,
    )


def log_at_checkpoints() -> Any:
    """A Trainer callback that logs the running loss at every checkpoint and at the last step.

    The log history a checkpoint carries then covers every step before it, so `run_train_loss`
    can average over a whole run even when it was resumed (otherwise the steps between the
    last logging step and the checkpoint are lost with the interrupted process).
    """
    from transformers import TrainerCallback

    class LogAtCheckpoints(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            if control.should_save or state.global_step >= state.max_steps:
                control.should_log = True
            return control

    return LogAtCheckpoints()


def response_loss_trainer(**kwargs: Any) -> Any:
    """A `transformers.Trainer` (kwargs as its own) whose causal-LM loss projects to the
    vocabulary only at labelled columns (`logprobs.response_nll`): the same loss and gradients as
    the model's own full-logits loss, about a tenth less time per SFT step on CPU at 135M
    parameters (benchmarks/bench_demo.py). Normalisation follows the Trainer's: by the labelled
    tokens of the whole accumulated batch when it counts them, else the micro-batch mean."""
    from transformers import Trainer

    from tactful.logprobs import response_nll

    class ResponseLossTrainer(Trainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            nll, n = response_nll(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                loss = nll / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    loss = loss * self.accelerator.num_processes  # the Trainer's own scaling, mirrored
            else:
                loss = nll / n.clamp(min=1)
            return (loss, None) if return_outputs else loss

    return ResponseLossTrainer(**kwargs)


def run_train_loss(trainer: Any, fallback: float) -> float:
    """Mean training loss over every step of the run, steps before a resume included.

    `TrainOutput.training_loss` averages only the steps of the last `train()` call; the log
    history (restored from the checkpoint on resume) has the loss of every logging window.
    `fallback` when the history has no loss (nothing logged).
    """
    total, covered, last = 0.0, 0, 0
    for entry in trainer.state.log_history:
        if "loss" in entry and "step" in entry and entry["step"] > last:
            total += entry["loss"] * (entry["step"] - last)  # a window's loss is its mean per step
            covered += entry["step"] - last
            last = entry["step"]
    return total / covered if covered else fallback


def last_checkpoint(output_dir: str | Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    d = Path(output_dir)
    if not d.is_dir():
        return None
    return get_last_checkpoint(str(d))


def save_model_atomic(model: Any, tokenizer: Any, target: str | Path) -> Path:
    """Save an adapter (or a full model) to `target` via a temp dir + rename: never half-written.

    In a multi-process launch only the main process writes; after a Trainer, use
    `save_trained`, which also gathers sharded parameters and waits for the write."""
    from tactful.distributed import is_main_process

    target = Path(target)
    if not is_main_process():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def save_trained(trainer: Any, tokenizer: Any, target: str | Path) -> Path:
    """Save what `trainer` trained (adapter or full model) to `target`, atomically.

    Every process must call it. With parameters sharded across processes (FSDP, DeepSpeed) the
    Trainer gathers them, which is a collective; the main process writes. Every process
    returns once `target` is in place, so it can be read back at once.
    """
    from tactful.distributed import barrier, is_main_process

    target = Path(target)
    if not (getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)):
        save_model_atomic(trainer.model, tokenizer, target)
    else:
        # A fixed name every process agrees on (only the main one writes into it).
        tmp = target.parent / f".{target.name}.saving"
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
        barrier()
        trainer.save_model(str(tmp))
        if is_main_process():
            try:
                if not any(tmp.glob("*.safetensors")):
                    raise UserError(
                        f"the trainer saved no weights to {target}: with DeepSpeed ZeRO-3 set "
                        "zero3_save_16bit_model: true (configs/accelerate/deepspeed_zero3.yaml), with FSDP "
                        "fsdp_state_dict_type: FULL_STATE_DICT (configs/accelerate/fsdp.yaml)")
                (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle: artifacts are safetensors + JSON
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(tmp))
                publish_dir(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    barrier()
    return target


def is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


# ---------------------------------------------------------------- starting from an earlier run

# Method kinds whose runs use `load_started_run` (they register it in tactful.runs.RUN_LOADERS):
# a run of theirs is base model + the start's adapters (merged) + its own adapter.
STARTABLE_KINDS = ("dpo", "shapo", "trace")


@dataclass
class StartModel:
    """The model a method fine-tunes: `model`, or an earlier run's model with its adapter(s) merged."""

    model: Any
    tokenizer: Any
    base_model: str  # the root model spec the adapters ultimately sit on
    start_from: str | None = None
    start_kind: str | None = None
    # The start as an ordered chain of adapter directories to merge into base_model, when it is
    # one (base + adapters); None for other starts (bundles, other methods' loaders).
    adapter_chain: list[Path] | None = None

    @property
    def name(self) -> str:
        """A name for the starting weights (keys generation caches: the start answers differently)."""
        return self.base_model if not self.start_from else f"{self.base_model}+run:{self.start_from}"


def _adapter_chain(run_dir: Path, manifest: dict[str, Any]) -> list[Path] | None:
    """A run's model as base_model + adapters merged in order, or None if it is not that simple."""
    from tactful.runs import RUN_LOADERS

    if manifest.get("model_dir") or not manifest.get("adapter"):
        return None
    own = run_dir / manifest["adapter"]
    if "start_adapters" in manifest:  # written by `start_manifest`
        if manifest.get("start_from") and manifest["start_adapters"] is None:
            return None
        return [run_dir / p for p in manifest["start_adapters"] or []] + [own]
    kind = manifest.get("kind", "")
    if manifest.get("start_from") or manifest.get("start_adapter"):
        return None
    if kind in RUN_LOADERS and kind not in STARTABLE_KINDS:
        return None  # a custom loader: only it knows how the run's model is assembled
    return [own]


def load_start_model(model: str, start_from: str | os.PathLike | None, *, device: Any = None,
                     log: Callable[[str], None] = print, **load_kw: Any) -> StartModel:
    """`model`, or the model of run `start_from` with every adapter merged into the weights, so a
    new adapter trains on top of it and disabling that adapter gives the start back (the
    reference of a preference method)."""
    from tactful.models import load_model
    from tactful.runs import load_run_model

    if not start_from:
        m, tok = load_model(model, **load_kw)
        return StartModel(to_device(m, device), tok, base_model=model)
    start = describe_start(model, start_from, log=log)
    m, tok, desc = load_run_model(start_from, **load_kw)
    if is_peft(m):
        m = m.merge_and_unload()  # on a model without weights (`weights_deferred`) it merges nothing, on meta
    m = to_device(m, device)
    m.eval()
    log(f"starting from {desc} (adapters merged)")
    start.model, start.tokenizer = m, tok
    return start


def describe_start(model: str, start_from: str | os.PathLike, *, log: Callable[[str], None] = print) -> StartModel:
    """What `load_start_model` would start from, without loading any weights."""
    import importlib

    from tactful.methods.registry import METHODS
    from tactful.runs import RUN_LOADERS, read_manifest

    run_dir = Path(start_from)
    manifest = read_manifest(run_dir)
    kind = manifest.get("kind", "")
    if kind in METHODS and kind not in RUN_LOADERS:
        importlib.import_module(METHODS[kind])  # a method module registers its run loader on import
    base = manifest.get("base_model")
    if not base:
        raise UserError(f"{run_dir}/manifest.json names no base_model")
    if manifest.get("status", "complete") != "complete":
        raise UserError(f"start_from: {run_dir} is not a finished run (status {manifest.get('status')!r})")
    if model not in ("embedded", base):
        log(f"note: model={model!r} is ignored; the base model comes from {run_dir} ({base})")
    return StartModel(None, None, base_model=base, start_from=str(run_dir), start_kind=kind,
                      adapter_chain=_adapter_chain(run_dir, manifest))


def save_start(start: StartModel, run_dir: Path) -> dict[str, Any]:
    """Copy the start's adapters into the run (so loading it needs only the base model) and
    return the manifest fields that `load_started_run` reads."""
    if not start.start_from:
        return {"start_from": None, "start_kind": None, "start_adapters": []}
    from tactful.distributed import is_main_process

    names = None
    if start.adapter_chain is not None:
        names = []
        for i, src in enumerate(start.adapter_chain):
            name = f"start_adapters/{i}"
            dst = run_dir / name
            if is_main_process() and Path(src).resolve() != dst.resolve():
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(src, dst)
            names.append(name)
    return {"start_from": start.start_from, "start_kind": start.start_kind, "start_adapters": names}


def load_started_run(run_dir: Path, manifest: dict[str, Any], **kw: Any) -> tuple[Any, Any]:
    """Run loader for methods that can start from an earlier run: base model, the start's
    adapters merged in order (or the start run loaded and merged), then this run's adapter."""
    from tactful.models import attach_adapter, load_model
    from tactful.runs import load_run_model

    if manifest.get("model_dir"):  # full fine-tuning saved the whole model, start included
        return load_model(str(run_dir / manifest["model_dir"]), **kw)
    chain = manifest.get("start_adapters")
    if manifest.get("start_from") and chain is None:
        model, tok, _ = load_run_model(manifest["start_from"], **kw)
        if is_peft(model):
            model = model.merge_and_unload()
    else:
        model, tok = load_model(manifest["base_model"], **kw)
        for name in chain or []:
            model = attach_adapter(model, run_dir / name).merge_and_unload()
    if manifest.get("adapter"):
        model = attach_adapter(model, run_dir / manifest["adapter"])
    model.eval()
    return model, tok
