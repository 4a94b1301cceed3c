"""SafeMoE end to end: unsafe corpus -> one LoRA expert per domain -> router -> bundle.

Router training freezes the base model and every expert; only the gates train, with
next-token cross-entropy on safe-and-informative answers (response tokens only) plus the
optional routing regularisers. It runs on `transformers.Trainer` (checkpoints, resume,
gradient accumulation, `report_to`), whose checkpoints hold only the router.

`run(config)` is what `tactful train recipes/safemoe.yaml` calls. The run directory is the
bundle (see bundle.py) plus `corpus/`, `checkpoints/`, `config.json` and training logs.
Re-running skips finished stages and resumes unfinished ones; a stage whose recorded
settings differ from the config stops with a clear message instead of mixing runs.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from tactful.data.builtin import HARM_DOMAINS, harmful_examples
from tactful.data.records import Example
from tactful.distributed import barrier, is_main_process, require_unsharded, share_from_main
from tactful.errors import UserError
from tactful.methods.common import (
    log_at_checkpoints,
    run_train_loss,
    EncodedDataset,
    ResponseCollator,
    TrainingSettings,
    last_checkpoint,
    set_seed,
    training_arguments,
)
from tactful.methods.safemoe.bundle import ROUTER_FILE, copy_dir_atomic, load_safemoe, router_bytes, save_bundle
from tactful.methods.safemoe.corpus import (
    CorpusSettings,
    build_unsafe_corpus,
    corpus_is_current,
    read_unsafe_corpus,
)
from tactful.methods.safemoe.experts import ExpertSettings, is_adapter_dir, read_expert, train_experts
from tactful.methods.safemoe.router import ROUTER_ATTR, RouterSettings, attach_safemoe, get_safemoe
from tactful.progress import rich_training_progress
from tactful.runs import RunDir

BUILTIN_INFORMATIVE = "builtin-informative"


@dataclass
class RouterData:
    safe: list[str] = field(default_factory=lambda: [BUILTIN_INFORMATIVE], metadata={
        "help": "Safe, informative (prompt, response) sources; builtin-informative is restricted to `domains`."})
    extra: list[str] = field(default_factory=list, metadata={
        "help": "More example sources mixed in as-is (e.g. builtin-benign to keep ordinary answers good)."})
    split: str = "train"
    max_examples: int | None = None


def _router_training() -> TrainingSettings:
    # The router has ~L*E*d parameters: a large learning rate and a few epochs over ~130
    # examples are enough, and each step is one forward/backward of the frozen model.
    return TrainingSettings(learning_rate=5e-3, num_train_epochs=3.0, per_device_train_batch_size=8,
                            max_length=256, save_steps=50, logging_steps=5, warmup_ratio=0.05)


@dataclass
class SafeMoEConfig:
    model: str = "embedded"
    output_dir: str = "runs/safemoe"
    model_dtype: str | None = field(default=None, metadata={"help": (
        "Weights dtype to load the base model in (corpus generation, experts, router): float32, bfloat16, float16 or "
        "auto (the checkpoint's). Unset: float32 without a GPU, the checkpoint's on a GPU. docs/scale-out.md")})
    seed: int = 0
    system: str | None = None
    domains: list[str] = field(default_factory=lambda: list(HARM_DOMAINS[:4]), metadata={
        "help": "One expert per harm domain (built-in: " + ", ".join(HARM_DOMAINS) + ")."})
    corpus: CorpusSettings = field(default_factory=CorpusSettings)
    experts: ExpertSettings = field(default_factory=ExpertSettings)
    router: RouterSettings = field(default_factory=RouterSettings)
    router_data: RouterData = field(default_factory=RouterData)
    router_training: TrainingSettings = field(default_factory=_router_training)
    resume: bool = field(default=True, metadata={
        "help": "Skip finished stages and resume unfinished ones from their checkpoints; false rebuilds all."})


# --------------------------------------------------------------------------- router training


def _trainer_class() -> type:
    from transformers import Trainer

    class RouterTrainer(Trainer):
        """Trainer whose loss adds the routing regularisers and whose checkpoints hold only the router."""

        def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            moe = get_safemoe(self.model)
            if moe.collect_aux:
                aux = moe.aux_loss()
                # The CE is already normalised over the accumulated batch when the model took
                # num_items_in_batch; the per-batch regulariser must then be divided here.
                if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                    aux = aux / getattr(self, "current_gradient_accumulation_steps",
                                        self.args.gradient_accumulation_steps)
                loss = loss + aux
            return (loss, outputs) if return_outputs else loss

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            from safetensors.torch import save_file

            if not self.args.should_save:  # every process gets here; one writes
                return
            out = Path(output_dir or self.args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            if state_dict is not None:  # FSDP / DeepSpeed hand over a gathered full state dict
                prefix = ROUTER_ATTR + "."
                state = {k[len(prefix):]: v.detach().cpu().contiguous()
                         for k, v in state_dict.items() if k.startswith(prefix)}
                save_file(state, str(out / ROUTER_FILE))
            else:
                (out / ROUTER_FILE).write_bytes(router_bytes(get_safemoe(self.model)))

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            from safetensors.torch import load_file

            path = Path(resume_from_checkpoint) / ROUTER_FILE
            if not path.is_file():
                raise UserError(f"checkpoint {resume_from_checkpoint} has no {ROUTER_FILE}")
            get_safemoe(self.model).router.load_state_dict(load_file(str(path)))

    return RouterTrainer


def train_router(
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    *,
    training: TrainingSettings,
    seed: int,
    checkpoint_dir: str | Path,
    resume: bool = True,
    system: str | None = None,
    callbacks: list[Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the router of a SafeMoE model in place on (prompt, safe response) examples."""
    moe = get_safemoe(model)
    set_seed(seed)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable or not all(n.startswith(ROUTER_ATTR + ".") for n in trainable):
        raise UserError("router training needs a SafeMoE model whose only trainable parameters are the router's")
    s = moe.settings
    moe.collect_aux = s.entropy_weight != 0 or s.balance_weight != 0
    dataset = EncodedDataset(tokenizer, examples, max_length=training.max_length, system=system)
    # DDP would otherwise re-broadcast every buffer before each forward: here that is all the
    # experts' stacked LoRA factors, identical on every process and never trained.
    args = training_arguments(training, checkpoint_dir, seed=seed, ddp_broadcast_buffers=False)
    trainer = _trainer_class()(model=model, args=args, train_dataset=dataset,
                               data_collator=ResponseCollator(tokenizer.pad_token_id), callbacks=[log_at_checkpoints(), *(callbacks or [])])
    rich_training_progress(trainer, "router")
    ckpt = last_checkpoint(checkpoint_dir) if resume else None
    if ckpt:
        log(f"router: resuming from {ckpt}")
    try:
        result = trainer.train(resume_from_checkpoint=ckpt)
    finally:
        moe.collect_aux = False
    model.eval()
    return {"examples": len(examples), "steps": trainer.state.global_step, "train_loss": run_train_loss(trainer, result.training_loss),
            "log_history": trainer.state.log_history}


def load_router_examples(data: RouterData, domains: list[str], seed: int) -> list[Example]:
    """The router's safe set: built-in informative answers of the expert domains + other sources."""
    from tactful.methods.sft import load_examples

    examples: list[Example] = []
    for src in data.safe:
        if src == BUILTIN_INFORMATIVE:
            builtin_domains = [d for d in domains if d in HARM_DOMAINS]
            if not builtin_domains:
                raise UserError(f"router_data.safe: {BUILTIN_INFORMATIVE} covers the built-in domains only "
                                f"({', '.join(HARM_DOMAINS)}); none of {', '.join(domains)} is one")
            examples.extend(harmful_examples("informative", data.split, builtin_domains))
        else:
            examples.extend(load_examples([src], data.split))
    examples.extend(load_examples(data.extra, data.split))
    random.Random(seed).shuffle(examples)
    if data.max_examples is not None:
        examples = examples[: data.max_examples]
    if not examples:
        raise UserError("the router's training set is empty: check router_data.safe / router_data.extra")
    return examples


# --------------------------------------------------------------------------- the pipeline


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Stages:
    """stages.json: the settings fingerprint each stage was started with."""

    def __init__(self, run: RunDir):
        self.run = run
        path = run / "stages.json"
        self.data: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}

    def check(self, stage: str, fingerprint: str, output: str) -> None:
        recorded = self.data.get(stage)
        if recorded is not None and recorded != fingerprint:
            raise UserError(f"{self.run.path} holds a SafeMoE {stage} stage built with other settings; use a new "
                            f"output_dir, or delete {self.run.path / output}, the later stages' outputs and "
                            "stages.json to rebuild")

    def enter(self, stage: str, fingerprint: str, output: str) -> None:
        self.check(stage, fingerprint, output)
        self.data[stage] = fingerprint
        self.run.write_json("stages.json", self.data)


def train_safemoe(
    config: SafeMoEConfig,
    *,
    judge: Any = None,
    log: Callable[[str], None] = print,
) -> tuple[Any, RunDir]:
    """Run (or finish) the whole SafeMoE pipeline; returns (SafeMoE model, run dir)."""
    from tactful.models import load_model, training_dtype

    domains = list(config.domains)
    if not domains or len(set(domains)) != len(domains):
        raise UserError(f"domains must be a non-empty list of distinct names, got {domains}")
    unknown_adapters = sorted(set(config.experts.adapters) - set(domains))
    if unknown_adapters:
        raise UserError(f"experts.adapters names domains not in `domains`: {', '.join(unknown_adapters)}")
    config.router.validate(len(domains))
    require_unsharded("safemoe", "the router's gates are read from decoder-layer hooks, outside the module "
                      "forwards in which FSDP and ZeRO-3 gather parameters")
    run = RunDir(config.output_dir)
    stages = _Stages(run)
    if not config.resume:  # start over: every stage is rebuilt and overwritten
        stages.data = {}
    to_train = [d for d in domains if d not in config.experts.adapters]
    dtype = training_dtype(config.model_dtype)  # experts are LoRA and the router trains on a frozen base
    # the dtype joins the fingerprint only when set, so runs from before the option resume as they were
    corpus_fp = _fingerprint({"domains": to_train, "corpus": asdict(config.corpus), "model": config.model,
                              "seed": config.seed, "system": config.system,
                              **({"model_dtype": config.model_dtype} if config.model_dtype else {})})
    experts_fp = _fingerprint({"corpus": corpus_fp, "experts": asdict(config.experts), "domains": domains})
    router_fp = _fingerprint({"experts": experts_fp, "router": asdict(config.router),
                              "data": asdict(config.router_data), "training": asdict(config.router_training)})
    manifest_path = run / "manifest.json"
    if config.resume and manifest_path.is_file() and json.loads(manifest_path.read_text()).get("status") == "complete":
        for stage, fp, output in (("corpus", corpus_fp, "corpus"), ("experts", experts_fp, "experts"),
                                  ("router", router_fp, ROUTER_FILE)):
            if stage != "corpus" or to_train:
                stages.check(stage, fp, output)
        log(f"SafeMoE run {run.path} is complete; loading it")
        return load_safemoe(run.path)[0], run
    run.write_config({"method": "safemoe", **asdict(config)})
    run.write_manifest(kind="safemoe", base_model=config.model, seed=config.seed, extra={"status": "incomplete"})
    barrier()  # every process has read the old manifest and stages before the main one moves on

    # 1. unsafe corpus (only for domains whose expert we train)
    corpus_dir = run / "corpus"
    corpus = None
    if to_train:
        stages.enter("corpus", corpus_fp, "corpus")
        current = corpus_is_current(corpus_dir, domains=to_train, settings=config.corpus, model_spec=config.model,
                                    seed=config.seed, system=config.system)
        if not is_main_process():
            pass  # the main process generates and writes the corpus; the others read it below
        elif current and config.resume:
            log(f"unsafe corpus: reusing {corpus_dir}")
            corpus = read_unsafe_corpus(corpus_dir)
        else:
            corpus = build_unsafe_corpus(corpus_dir, domains=to_train, settings=config.corpus,
                                         model_spec=config.model, judge=judge, seed=config.seed,
                                         system=config.system, dtype=dtype, log=log)
        share_from_main(None, what="building the unsafe corpus")
        if corpus is None:
            corpus = read_unsafe_corpus(corpus_dir)

    # 2. experts: user-provided adapters are copied in; the others trained on their corpus
    experts_dir = run / "experts"
    stages.enter("experts", experts_fp, "experts")
    for domain, src in config.experts.adapters.items():
        read_expert(src, domain)  # fail early on an adapter the router cannot mix
        if is_main_process() and (not config.resume or not is_adapter_dir(experts_dir / domain)):
            copy_dir_atomic(Path(src), experts_dir / domain)
    barrier()
    expert_stats = {}
    if corpus is not None:
        expert_stats = train_experts(corpus.examples, experts_dir, load_base=lambda: load_model(config.model, dtype=dtype),
                                     settings=config.experts, seed=config.seed,
                                     checkpoints_dir=run / "checkpoints" / "experts", resume=config.resume,
                                     overwrite=not config.resume, system=config.system, log=log)
        for domain, st in expert_stats.items():
            run.write_json(f"train_log_expert_{domain}.json", st.pop("log_history"))

    # 3. router on the safe set, base model and experts frozen
    stages.enter("router", router_fp, ROUTER_FILE)
    model, tok = load_model(config.model, dtype=dtype)
    set_seed(config.seed)  # the router's initial weights
    experts = [read_expert(experts_dir / d, d) for d in domains]
    attach_safemoe(model, experts, config.router, base_model=config.model)
    examples = load_router_examples(config.router_data, domains, config.seed)
    log(f"router: training on {len(examples)} safe examples over {len(domains)} experts")
    router_stats = train_router(model, tok, examples, training=config.router_training, seed=config.seed,
                                checkpoint_dir=run / "checkpoints" / "router", resume=config.resume,
                                system=config.system, log=log)
    run.write_json("train_log_router.json", router_stats.pop("log_history"))

    # 4. bundle: router + config next to the experts, manifest last
    if is_main_process():
        save_bundle(model, run.path, base_model=config.model, manifest=False)
    data = {"router_examples": [e.to_dict() for e in examples]}
    if corpus is not None:
        data.update({f"corpus_{d}": str(corpus_dir / f"{d}.jsonl") for d in corpus.examples})
    run.write_manifest(kind="safemoe", base_model=config.model, seed=config.seed, data=data, extra={
        "experts": domains, "router": ROUTER_FILE, "corpus_counts": corpus.counts() if corpus else {},
        "expert_training": expert_stats, "router_training": router_stats, "status": "complete"})
    log(f"SafeMoE bundle: {run.path}")
    barrier()  # no process returns before the bundle is complete
    return model, run


CONFIG_CLASS = SafeMoEConfig


def run(config: SafeMoEConfig, *, log: Callable[[str], None] = print) -> RunDir:
    """Entry point for `tactful train` recipes with `method: safemoe`."""
    return train_safemoe(config, log=log)[1]
