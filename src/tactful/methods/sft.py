"""`sft`: the safety-SFT baseline ("Safety-Tuned LLaMAs" style).

A mix of benign instructions with good answers and harmful prompts with refusals,
trained with next-token cross-entropy on response tokens only (LoRA or full). Built on
`transformers.Trainer`, so checkpoints, `resume_from_checkpoint`, gradient accumulation,
`report_to` and `accelerate launch` come for free.

Stage 2 of DCR calls `train_sft` with its stage-1 model, so both see exactly the same
SFT data and budget.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from tactful.data.records import Example
from tactful.errors import UserError
from tactful.methods.common import (
    EncodedDataset,
    LoraSettings,
    ResponseCollator,
    TrainingSettings,
    is_peft,
    last_checkpoint,
    log_at_checkpoints,
    prepare_trainable,
    response_loss_trainer,
    run_train_loss,
    save_trained,
    set_seed,
    training_arguments,
)
from tactful.methods.prompt_gate import GateSettings, check_gate_settings, fit_run_gate
from tactful.progress import rich_training_progress
from tactful.runs import RunDir


@dataclass
class SFTData:
    benign: list[str] = field(default_factory=lambda: ["builtin-benign"],
                              metadata={"help": "Sources of benign (prompt, response) examples."})
    refusals: list[str] = field(default_factory=lambda: ["builtin-refusals"],
                                metadata={"help": "Sources of harmful prompts with refusals."})
    extra: list[str] = field(default_factory=list,
                             metadata={"help": "More example sources, e.g. builtin-seemingly-toxic-answers (STL-aug)."})
    split: str = "train"
    harmful_fraction: float | None = field(default=None, metadata={
        "help": "If set, subsample so refusals make up this share of benign + refusals."})
    max_examples: int | None = None


@dataclass
class SFTConfig:
    model: str = "embedded"
    model_dtype: str | None = field(default=None, metadata={"help": (
        "Weights dtype to load the model in: float32, bfloat16, float16 or auto (the checkpoint's). Unset: float32 "
        "without a GPU; on a GPU the checkpoint's (float32 for full fine-tuning unless DeepSpeed or FSDP with mixed "
        "precision keeps float32 master weights). docs/scale-out.md")})
    output_dir: str = "runs/sft"
    seed: int = 0
    system: str | None = None
    data: SFTData = field(default_factory=SFTData)
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    # A prompt gate fitted after training: the adapter answers only what it calls harmful (prompt_gate.py).
    gate: GateSettings = field(default_factory=GateSettings)
    resume: bool = True


def load_examples(sources: list[str], split: str) -> list[Example]:
    from tactful.data.registry import load_records

    out: list[Example] = []
    for src in sources:
        recs = load_records(src, kind="examples", split=split)
        for r in recs:
            if not isinstance(r, Example):
                raise UserError(f"data source {src!r} gives {type(r).__name__} records; SFT needs "
                                "(prompt, response) examples")
        out.extend(recs)
    return out


def build_mix(data: SFTData, seed: int) -> tuple[list[Example], dict[str, int]]:
    """The SFT mix: benign + refusals (at the configured ratio) + extras, shuffled with the seed."""
    rng = random.Random(seed)
    benign = load_examples(data.benign, data.split)
    refusals = load_examples(data.refusals, data.split)
    extra = load_examples(data.extra, data.split)
    if data.harmful_fraction is not None:
        f = data.harmful_fraction
        if not 0 <= f <= 1:
            raise UserError(f"data.harmful_fraction must be in [0, 1], got {f}")
        if f in (0.0, 1.0):
            refusals, benign = (refusals, []) if f == 1.0 else ([], benign)
        elif len(refusals) / (len(refusals) + len(benign)) > f:
            refusals = rng.sample(refusals, int(round(f / (1 - f) * len(benign))))
        else:
            benign = rng.sample(benign, int(round((1 - f) / f * len(refusals))))
    mix = benign + refusals + extra
    rng.shuffle(mix)
    if data.max_examples is not None:
        mix = mix[: data.max_examples]
    if not mix:
        raise UserError("the SFT mix is empty: check data.benign / data.refusals / data.extra")
    return mix, {"benign": len(benign), "refusals": len(refusals), "extra": len(extra), "total": len(mix)}


def train_sft(
    config: SFTConfig,
    *,
    model: Any = None,
    tokenizer: Any = None,
    run_dir: RunDir | None = None,
    adapter_subdir: str = "adapter",
    callbacks: list[Any] | None = None,
    log: Callable[[str], None] = print,
) -> tuple[Any, RunDir]:
    """Train safety SFT and save the adapter (or full model) into the run directory.

    Re-running with the same output_dir resumes from the last checkpoint.
    Returns (trained model, run dir).
    """
    from tactful.distributed import is_main_process
    from tactful.models import load_model, training_dtype

    set_seed(config.seed)
    if config.gate.enabled and not config.lora.enabled:
        raise UserError("gate.enabled needs lora.enabled: the gate routes between the model and its adapter")
    run = run_dir or RunDir(config.output_dir)
    examples, counts = build_mix(config.data, config.seed)
    if model is None:
        # Straight into the Trainer: under FSDP / ZeRO-3 the other processes never hold the weights.
        model, tokenizer = load_model(config.model, dtype=training_dtype(config.model_dtype,
                                                                         full_finetune=not config.lora.enabled),
                                      for_training=True, partitioned=True)
    check_gate_settings(config.gate, model)
    model = prepare_trainable(model, config.lora)
    dataset = EncodedDataset(tokenizer, examples, max_length=config.training.max_length, system=config.system)
    if config.training.group_by_length:
        dataset.group_by_length(config.training.per_device_train_batch_size, config.seed)
    ckpt_dir = run.path / "checkpoints" / adapter_subdir
    args = training_arguments(config.training, ckpt_dir, seed=config.seed, grouped=config.training.group_by_length)
    trainer = response_loss_trainer(model=model, args=args, train_dataset=dataset,
                                    data_collator=ResponseCollator(tokenizer.pad_token_id),
                                    callbacks=[log_at_checkpoints(), *(callbacks or [])])
    rich_training_progress(trainer, "SFT")
    resume = last_checkpoint(ckpt_dir) if config.resume else None
    if resume:
        log(f"resuming from {resume}")
    result = trainer.train(resume_from_checkpoint=resume)
    model = trainer.model
    model.eval()
    save_trained(trainer, tokenizer, run.path / adapter_subdir)
    if config.gate.enabled and is_main_process():
        fit_run_gate(model, tokenizer, config.gate, config.data.split, run.path / "gate", system=config.system, log=log)
    run.write_json(f"train_log_{adapter_subdir}.json", trainer.state.log_history)
    run.write_config({"method": "sft", **asdict(config)})
    run.write_manifest(
        kind="sft", base_model=config.model, seed=config.seed,
        data={"sft_mix": [e.to_dict() for e in examples]},
        extra={"adapter": adapter_subdir if is_peft(model) else None,
               "model_dir": None if is_peft(model) else adapter_subdir,
               "gate": "gate" if config.gate.enabled else None,
               "counts": counts, "train_loss": run_train_loss(trainer, result.training_loss), "steps": trainer.state.global_step,
               "status": "complete"},
    )
    return model, run


CONFIG_CLASS = SFTConfig


def run(config: SFTConfig, *, log: Callable[[str], None] = print) -> RunDir:
    """Entry point for `tactful train` recipes with `method: sft`."""
    return train_sft(config, log=log)[1]
