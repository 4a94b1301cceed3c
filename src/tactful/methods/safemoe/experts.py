"""SafeMoE experts: one LoRA adapter per harm domain, trained only on that domain's unsafe corpus.

Experts are ordinary PEFT adapter directories (adapter_config.json +
adapter_model.safetensors), trained with next-token cross-entropy on response tokens via
`transformers.Trainer` (the same pieces as the SFT baseline: `apply_lora`,
`EncodedDataset`, `ResponseCollator`, `training_arguments`, checkpoint resume, atomic
save). `read_expert` turns such a directory back into plain tensors for the router.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tactful.data.records import Example
from tactful.errors import UserError
from tactful.methods.common import (
    log_at_checkpoints,
    run_train_loss,
    DEFAULT_TARGETS,
    EncodedDataset,
    LoraSettings,
    ResponseCollator,
    TrainingSettings,
    apply_lora,
    last_checkpoint,
    save_trained,
    set_seed,
    training_arguments,
)
from tactful.methods.safemoe.router import ExpertWeights
from tactful.progress import rich_training_progress

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def _expert_lora() -> LoraSettings:
    # Rank 8 on every linear of the block: enough for a 135M-7B model to absorb one
    # domain's corpus, and small enough that four stacked experts keep generation >= 0.8x
    # the base model's speed (benchmarks/bench_safemoe.py).
    return LoraSettings(r=8, alpha=16, target_modules=list(DEFAULT_TARGETS))


def _expert_training() -> TrainingSettings:
    return TrainingSettings(learning_rate=2e-4, num_train_epochs=3.0, per_device_train_batch_size=4,
                            max_length=256, save_steps=50, logging_steps=5, warmup_ratio=0.05)


@dataclass
class ExpertSettings:
    lora: LoraSettings = field(default_factory=_expert_lora)
    training: TrainingSettings = field(default_factory=_expert_training)
    adapters: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Bring your own experts: domain -> an existing PEFT LoRA adapter directory (not trained)."})


# --------------------------------------------------------------------------- training


def train_expert(
    examples: Sequence[Example],
    out_dir: str | Path,
    *,
    model: Any,
    tokenizer: Any,
    settings: ExpertSettings,
    seed: int,
    checkpoint_dir: str | Path,
    resume: bool = True,
    system: str | None = None,
    callbacks: list[Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train one LoRA expert on `examples` (loss on response tokens) and save it to `out_dir`.

    `model` is a plain base model; it is wrapped with a fresh adapter (and so consumed).
    Re-running with the same checkpoint_dir resumes. Returns training stats.
    """
    from transformers import Trainer

    if not settings.lora.enabled:
        raise UserError("SafeMoE experts are LoRA adapters: experts.lora.enabled must be true")
    if not examples:
        raise UserError(f"no unsafe examples to train expert {Path(out_dir).name!r} on")
    set_seed(seed)
    model = apply_lora(model, settings.lora)
    dataset = EncodedDataset(tokenizer, list(examples), max_length=settings.training.max_length, system=system)
    args = training_arguments(settings.training, checkpoint_dir, seed=seed)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=ResponseCollator(tokenizer.pad_token_id), callbacks=[log_at_checkpoints(), *(callbacks or [])])
    rich_training_progress(trainer, f"expert {Path(out_dir).name}")
    ckpt = last_checkpoint(checkpoint_dir) if resume else None
    if ckpt:
        log(f"resuming expert {Path(out_dir).name} from {ckpt}")
    result = trainer.train(resume_from_checkpoint=ckpt)
    save_trained(trainer, None, out_dir)
    return {"examples": len(examples), "steps": trainer.state.global_step, "train_loss": run_train_loss(trainer, result.training_loss),
            "log_history": trainer.state.log_history}


def train_experts(
    corpus: dict[str, list[Example]],
    experts_dir: str | Path,
    *,
    load_base: Callable[[], tuple[Any, Any]],
    settings: ExpertSettings,
    seed: int,
    checkpoints_dir: str | Path,
    resume: bool = True,
    overwrite: bool = False,
    system: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Train one expert per domain into experts_dir/<domain>; experts already saved are kept
    (retrained with `overwrite`).

    A fresh base model per expert (from `load_base`) keeps the experts independent.
    Returns per-domain stats (empty for experts that were already there).
    """
    stats: dict[str, dict[str, Any]] = {}
    for i, (domain, examples) in enumerate(corpus.items()):
        out = Path(experts_dir) / domain
        if is_adapter_dir(out) and not overwrite:
            log(f"expert {domain}: already trained ({out})")
            continue
        log(f"expert {domain}: training on {len(examples)} unsafe examples")
        model, tok = load_base()
        stats[domain] = train_expert(examples, out, model=model, tokenizer=tok, settings=settings, seed=seed + i,
                                     checkpoint_dir=Path(checkpoints_dir) / domain, resume=resume, system=system,
                                     log=log)
    return stats


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file() and (Path(path) / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------- reading


def read_expert(adapter_dir: str | Path, name: str | None = None) -> ExpertWeights:
    """A PEFT LoRA adapter directory as tensors: module -> (A [r, in], B [out, r], scaling).

    Supports plain LoRA and rsLoRA with rank/alpha patterns; refuses what a router cannot
    mix (DoRA, trained biases, modules_to_save, non-Linear targets) with a clear message.
    """
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    where = str(d)
    if not (d / "adapter_config.json").is_file():
        raise UserError("not a PEFT adapter directory (no adapter_config.json)", where=where)
    try:
        cfg = json.loads((d / "adapter_config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"malformed adapter_config.json ({e.msg})", where=where) from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise UserError(f"experts must be LoRA adapters, this one is {cfg.get('peft_type')}", where=where)
    for key, bad, what in (("use_dora", True, "DoRA"), ("bias", "all", "trained biases"),
                           ("bias", "lora_only", "trained biases")):
        if cfg.get(key) == bad:
            raise UserError(f"SafeMoE cannot route {what} ({key}={bad!r}); train the expert as plain LoRA",
                            where=where)
    if cfg.get("modules_to_save"):
        raise UserError(f"SafeMoE cannot route modules_to_save ({cfg['modules_to_save']})", where=where)
    weights_file = d / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise UserError("no adapter_model.safetensors (tactful reads safetensors only, never pickles)", where=where)
    tensors = load_file(str(weights_file))

    factors: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise UserError(f"unexpected tensor {key!r}: SafeMoE routes LoRA A/B matrices of Linear layers only",
                            where=where)
        factors.setdefault(m["module"], {})[m["which"]] = value
    if not factors:
        raise UserError("the adapter holds no LoRA weights", where=where)

    alpha = float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    alpha_pattern = cfg.get("alpha_pattern") or {}
    modules: dict[str, tuple[Any, Any, float]] = {}
    for module, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise UserError(f"module {module} has only lora_{''.join(ab)}", where=where)
        A, B = ab["A"].float(), ab["B"].float()
        r = A.shape[0]
        a = float(alpha_pattern[_pattern_key(alpha_pattern, module)]) if _pattern_key(alpha_pattern, module) else alpha
        modules[module] = (A, B, a / (math.sqrt(r) if rslora else r))
    return ExpertWeights(name=name or d.name, modules=modules, source=str(d))


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The rank/alpha pattern that applies to a module: a key matching the end of its dotted name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None
