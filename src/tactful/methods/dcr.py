"""`dcr`: Discernment via Contrastive Refinement (Discern Truth from Falsehood, ICLR 2026).

Safety fine-tuning raises refusal of *seemingly* toxic prompts together with truly toxic
ones, because their hidden states (and so their first-token gradients) are coupled. DCR
adds a stage before ordinary safety SFT:

  stage 1  circle loss on layer-l hidden states of prompts: pull toxic/toxic and
           seemingly-toxic/seemingly-toxic pairs together, push toxic/seemingly-toxic
           pairs apart. Only layers <= l train; the forward pass stops at layer l, so
           nothing after it can change. A weighted sampler balances the two subsets.
  stage 2  exactly the safety SFT of the `sft` baseline (same data, same budget).

Diagnostics written to the run: cosine similarity between toxic and seemingly-toxic
representations at layer l before and after stage 1 (train and held-out prompts), and
the first-token gradient coupling between the two subsets.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from tactful import architectures
from tactful.data.records import PromptRecord
from tactful.distributed import run_on_main
from tactful.errors import UserError
from tactful.methods.common import (
    LoraSettings,
    TrainingSettings,
    is_peft,
    last_checkpoint,
    save_trained,
    set_seed,
    training_arguments,
)
from tactful.methods.losses import circle_loss, pairwise_similarities
from tactful.methods.sft import SFTConfig, train_sft
from tactful.models import format_prompt, materialize_trainable
from tactful.progress import rich_training_progress
from tactful.runs import RUN_LOADERS, RunDir

TOXIC, SEEMINGLY = 0, 1


@dataclass
class DCRStage1:
    layer: int | None = field(default=None, metadata={"help": "Decoder layer l (0-based); default: the middle layer."})
    pooling: str = field(default="last", metadata={"choices": ("last", "mean"),
                                                   "help": "last prompt token, or mean over prompt tokens"})
    m: float = 0.25
    gamma: float = 32.0
    toxic: list[str] = field(default_factory=lambda: ["builtin-harmful"])
    seemingly_toxic: list[str] = field(default_factory=lambda: ["builtin-seemingly-toxic"])
    split: str = "train"
    eval_split: str | None = field(default="test", metadata={"help": "Held-out prompts for the diagnostics."})
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=16, alpha=32))
    training: TrainingSettings = field(default_factory=lambda: TrainingSettings(
        learning_rate=1e-4, num_train_epochs=2.0, per_device_train_batch_size=16, warmup_ratio=0.1,
        lr_scheduler_type="constant_with_warmup", max_length=256, logging_steps=5, save_steps=20))
    gradient_coupling: bool = field(default=True, metadata={"help": "Also measure first-token gradient coupling."})
    coupling_n: int = 12


@dataclass
class DCRConfig:
    model: str = "embedded"
    model_dtype: str | None = field(default=None, metadata={"help": (
        "Weights dtype to load the model in: float32, bfloat16, float16 or auto (the checkpoint's). Unset: float32 "
        "without a GPU; on a GPU the checkpoint's (float32 for full fine-tuning unless DeepSpeed or FSDP with mixed "
        "precision keeps float32 master weights). docs/scale-out.md")})
    output_dir: str = "runs/dcr"
    seed: int = 0
    stage1: DCRStage1 = field(default_factory=DCRStage1)
    sft: SFTConfig = field(default_factory=SFTConfig)
    resume: bool = True


# ---------------------------------------------------------------- representations

class _Stop(Exception):
    """Raised by the layer-l hook: nothing after layer l needs computing."""


def decoder_layers(model: Any) -> Sequence[torch.nn.Module]:
    return architectures.decoder_layers(model)[1]


def default_layer(num_layers: int) -> int:
    return max(0, num_layers // 2 - 1)


def layer_representations(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int,
                          pooling: str, *, stop: bool = True) -> torch.Tensor:
    """Pooled output of decoder layer `layer` for a right-padded batch of prompts: [B, D].

    The forward pass is cut at layer l by a hook, which is both cheaper and the
    structural guarantee that later layers get no gradient. `stop=False` runs the whole
    forward instead (the representation is the same): a model wrapped for DDP, FSDP or
    DeepSpeed must return from its forward normally, or it never prepares the gradient
    all-reduce (DDP would silently train each process on its own gradients).
    """
    captured: dict[str, torch.Tensor] = {}

    def hook(_mod, _inp, out):
        captured["h"] = out[0] if isinstance(out, tuple) else out
        if stop:
            raise _Stop

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        kw = {} if stop else {"logits_to_keep": 1}  # no vocabulary-sized logits for a loss that ignores them
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)
        except TypeError as e:  # a model whose forward has no logits_to_keep
            if not kw or "logits_to_keep" not in str(e):
                raise
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    h = captured["h"]
    mask = attention_mask.to(h.dtype)
    if pooling == "mean":
        return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    last = attention_mask.sum(1) - 1
    return h[torch.arange(h.shape[0]), last]


class PromptSet(torch.utils.data.Dataset):
    def __init__(self, tokenizer: Any, toxic: Sequence[PromptRecord], seemingly: Sequence[PromptRecord],
                 max_length: int):
        self.items = []
        for subset, recs in ((TOXIC, toxic), (SEEMINGLY, seemingly)):
            for r in recs:
                ids = tokenizer(format_prompt(tokenizer, r.prompt), add_special_tokens=False)["input_ids"]
                self.items.append((ids[-max_length:], subset))
        self.subsets = [s for _, s in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        ids, subset = self.items[i]
        return {"input_ids": ids, "subset": subset}


def collate_prompts(batch: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, : len(b["input_ids"])] = torch.tensor(b["input_ids"])
        mask[i, : len(b["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "subset": torch.tensor([b["subset"] for b in batch])}


def balanced_sampler(subsets: Sequence[int], num_samples: int, seed: int) -> torch.utils.data.WeightedRandomSampler:
    """Each draw picks either subset with probability 1/2, whatever their sizes."""
    counts = {s: subsets.count(s) for s in set(subsets)}
    weights = torch.tensor([1.0 / counts[s] for s in subsets], dtype=torch.double)
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=num_samples, replacement=True, generator=gen)


# ---------------------------------------------------------------- stage 1 trainer

def _make_trainer_class():
    from transformers import Trainer

    class CircleTrainer(Trainer):
        """Trainer whose loss is the circle loss on pooled layer-l prompt representations."""

        def __init__(self, *a: Any, dcr: DCRStage1, layer: int, subsets: Sequence[int], **kw: Any):
            super().__init__(*a, **kw)
            self.dcr, self.layer, self.subsets = dcr, layer, list(subsets)

        def _get_train_sampler(self, *args: Any, **kwargs: Any):
            return balanced_sampler(self.subsets, len(self.subsets), self.args.seed)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            from accelerate.utils import DistributedType

            reps = layer_representations(model, inputs["input_ids"], inputs["attention_mask"], self.layer,
                                         self.dcr.pooling,
                                         stop=self.accelerator.distributed_type == DistributedType.NO)
            sp, sn = pairwise_similarities(reps, inputs["subset"])
            if sp.numel() == 0 or sn.numel() == 0:  # a batch drawn from one subset only
                loss = reps.sum() * 0.0
            else:
                loss = circle_loss(sp, sn, m=self.dcr.m, gamma=self.dcr.gamma)
            return (loss, None) if return_outputs else loss

    return CircleTrainer


def freeze_after(model: Any, layer: int) -> None:
    """Full fine-tuning variant: train embeddings and layers <= l only."""
    layers = decoder_layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.get_input_embeddings().parameters():
        p.requires_grad_(True)
    for i in range(layer + 1):
        for p in layers[i].parameters():
            p.requires_grad_(True)
    if getattr(model.config, "tie_word_embeddings", False):
        # The output head shares the embedding matrix; keep it frozen too so nothing after l moves.
        for p in model.get_input_embeddings().parameters():
            p.requires_grad_(False)
    materialize_trainable(model)  # a model without weights here (RAM-efficient FSDP loading): see there


# ---------------------------------------------------------------- diagnostics

@torch.no_grad()
def representation_similarity(model: Any, tokenizer: Any, toxic: Sequence[PromptRecord],
                              seemingly: Sequence[PromptRecord], layer: int, pooling: str,
                              batch_size: int = 16) -> dict[str, float]:
    """Mean cosine similarity across subsets (toxic vs seemingly-toxic) and within each."""
    ds = PromptSet(tokenizer, toxic, seemingly, max_length=256)
    reps, subs = [], []
    for start in range(0, len(ds), batch_size):
        batch = collate_prompts([ds[i] for i in range(start, min(len(ds), start + batch_size))], tokenizer.pad_token_id)
        reps.append(layer_representations(model, batch["input_ids"], batch["attention_mask"], layer, pooling).float())
        subs.append(batch["subset"])
    z = torch.nn.functional.normalize(torch.cat(reps), dim=-1)
    s = torch.cat(subs)
    sim = z @ z.T
    t, st = s == TOXIC, s == SEEMINGLY

    def mean_offdiag(a: torch.Tensor, b: torch.Tensor) -> float:
        block = sim[a][:, b]
        if a.equal(b):
            n = block.shape[0]
            return float((block.sum() - block.diagonal().sum()) / max(1, n * (n - 1)))
        return float(block.mean())

    return {"cross": mean_offdiag(t, st), "within_toxic": mean_offdiag(t, t),
            "within_seemingly_toxic": mean_offdiag(st, st), "n_toxic": int(t.sum()), "n_seemingly_toxic": int(st.sum())}


def gradient_coupling(model: Any, tokenizer: Any, toxic: Sequence[PromptRecord], seemingly: Sequence[PromptRecord],
                      n: int = 12, refusal: str = "I'm sorry") -> dict[str, float]:
    """First-token gradient coupling (the empirical-NTK view of the paper).

    For each prompt, the gradient of log p(first refusal token | prompt) with respect to
    the last decoder layer's weights (what stage-2 SFT moves); returns the mean cosine
    between toxic and seemingly-toxic gradients and within each subset.
    """
    params = [p for p in decoder_layers(model)[-1].parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    target = tokenizer(refusal, add_special_tokens=False)["input_ids"][0]
    grads, subs = [], []
    try:
        for subset, recs in ((TOXIC, toxic[:n]), (SEEMINGLY, seemingly[:n])):
            for r in recs:
                ids = tokenizer(format_prompt(tokenizer, r.prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
                logits = model(input_ids=ids, use_cache=False).logits[0, -1]
                lp = torch.log_softmax(logits.float(), -1)[target]
                g = torch.autograd.grad(lp, params)
                grads.append(torch.cat([x.reshape(-1) for x in g]))
                subs.append(subset)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    G = torch.nn.functional.normalize(torch.stack(grads), dim=-1)
    s = torch.tensor(subs)
    sim = G @ G.T
    t, st = s == TOXIC, s == SEEMINGLY
    off = ~torch.eye(len(s), dtype=torch.bool)
    return {"cross": float(sim[t][:, st].mean()), "within_toxic": float(sim[t][:, t][off[t][:, t]].mean()),
            "within_seemingly_toxic": float(sim[st][:, st][off[st][:, st]].mean()), "n_per_subset": n}


# ---------------------------------------------------------------- the pipeline

def _load_prompts(sources: Sequence[str], split: str | None) -> list[PromptRecord]:
    from tactful.data.registry import load_records

    out: list[PromptRecord] = []
    for src in sources:
        recs = load_records(src, kind="prompts", split=split)
        out.extend(r for r in recs if isinstance(r, PromptRecord))
    if not out:
        raise UserError(f"no prompts in {', '.join(sources)} (split {split})")
    return out


def run_stage1(config: DCRConfig, model: Any, tokenizer: Any, run: RunDir,
               log: Callable[[str], None] = print) -> tuple[Any, dict[str, Any]]:
    """Contrastive refinement of layers <= l. Returns the model with stage 1 merged in, and diagnostics."""
    from tactful.methods.common import apply_lora

    s1 = config.stage1
    n_layers = len(decoder_layers(model))
    layer = default_layer(n_layers) if s1.layer is None else s1.layer
    if not 0 <= layer < n_layers:
        raise UserError(f"stage1.layer must be in [0, {n_layers - 1}] for this model, got {layer}")
    toxic = _load_prompts(s1.toxic, s1.split)
    seemingly = _load_prompts(s1.seemingly_toxic, s1.split)
    held_toxic = _load_prompts(s1.toxic, s1.eval_split) if s1.eval_split else []
    held_seem = _load_prompts(s1.seemingly_toxic, s1.eval_split) if s1.eval_split else []

    diag: dict[str, Any] = {"layer": layer, "num_layers": n_layers, "pooling": s1.pooling,
                            "n_train": {"toxic": len(toxic), "seemingly_toxic": len(seemingly)}}
    model.eval()
    # Diagnostics are computed by the main process and shared: the others may hold no weights
    # (RAM-efficient FSDP loading), and the numbers are the same everywhere anyway.
    diag.update(run_on_main(lambda: _diagnostics(s1, model, tokenizer, layer, toxic, seemingly, held_toxic, held_seem,
                                                 "before"), what="measuring DCR's representations before stage 1"))

    stage_dir = run.path / "stage1_adapter"
    if s1.lora.enabled:
        lora = LoraSettings(**{**asdict(s1.lora), "layers": list(range(layer + 1))})
        model = apply_lora(model, lora)
    else:
        freeze_after(model, layer)
    ds = PromptSet(tokenizer, toxic, seemingly, max_length=s1.training.max_length)
    ckpt_dir = run.path / "checkpoints" / "stage1"
    args = training_arguments(s1.training, ckpt_dir, seed=config.seed)
    Trainer = _make_trainer_class()
    trainer = Trainer(model=model, args=args, train_dataset=ds, dcr=s1, layer=layer, subsets=ds.subsets,
                      data_collator=lambda b: collate_prompts(b, tokenizer.pad_token_id))
    rich_training_progress(trainer, "DCR stage 1 (contrastive)")
    resume = last_checkpoint(ckpt_dir) if config.resume else None
    if resume:
        log(f"resuming stage 1 from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    model = trainer.model
    model.eval()
    save_trained(trainer, None, stage_dir)
    run.write_json("train_log_stage1.json", trainer.state.log_history)
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        # The engine owns (and may have sharded or cast) the trained parameters: continue from
        # the saved stage 1 instead (on every process under DDP-like loading; under RAM-efficient
        # FSDP loading only the main process reads it, and stage 2's FSDP broadcasts it).
        model = _reload_stage1(config.model, stage_dir, lora=s1.lora.enabled, device=trainer.args.device,
                               dtype=dcr_dtype(config))

    diag.update(run_on_main(lambda: _diagnostics(s1, model, tokenizer, layer, toxic, seemingly, held_toxic, held_seem,
                                                 "after", coupling=False),
                            what="measuring DCR's representations after stage 1"))
    if is_peft(model):
        model = model.merge_and_unload()
    if s1.gradient_coupling:
        diag.update(run_on_main(lambda: _diagnostics(s1, model, tokenizer, layer, toxic, seemingly, held_toxic,
                                                     held_seem, "after", similarity=False),
                                what="measuring DCR's gradient coupling after stage 1"))
    for p in model.parameters():
        p.requires_grad_(False)
    run.write_json("dcr_diagnostics.json", diag)
    b, a = diag["similarity_before"]["train"]["cross"], diag["similarity_after"]["train"]["cross"]
    log(f"DCR stage 1 (layer {layer}): toxic vs seemingly-toxic cosine {b:.3f} -> {a:.3f}")
    return model, diag


def _reload_stage1(base: str, stage_dir: Path, *, lora: bool, device: Any, dtype: str = "float32") -> Any:
    """The stage-1 model as saved: the base model with the stage-1 adapter, or the full model."""
    from tactful.models import attach_adapter, load_model, to_device

    if lora:
        model = attach_adapter(load_model(base, dtype=dtype, for_training=True)[0], stage_dir)
    else:
        model = load_model(str(stage_dir), dtype=dtype, for_training=True)[0]
    model = to_device(model, device)
    model.eval()
    return model


def _diagnostics(s1: DCRStage1, model: Any, tokenizer: Any, layer: int, toxic: Sequence[PromptRecord],
                 seemingly: Sequence[PromptRecord], held_toxic: Sequence[PromptRecord],
                 held_seem: Sequence[PromptRecord], when: str, *, similarity: bool = True,
                 coupling: bool = True) -> dict[str, Any]:
    """Representation similarity (train and held-out) and, if configured, gradient coupling, `when`
    being "before" or "after" stage 1."""
    out: dict[str, Any] = {}
    if similarity:
        out[f"similarity_{when}"] = {"train": representation_similarity(model, tokenizer, toxic, seemingly, layer,
                                                                        s1.pooling)}
        if held_toxic:
            out[f"similarity_{when}"]["heldout"] = representation_similarity(model, tokenizer, held_toxic, held_seem,
                                                                              layer, s1.pooling)
    if coupling and s1.gradient_coupling:
        out[f"gradient_coupling_{when}"] = gradient_coupling(model, tokenizer, held_toxic or toxic,
                                                              held_seem or seemingly, n=s1.coupling_n)
    return out


def dcr_dtype(config: DCRConfig) -> str:
    """The dtype of both stages' model: full fine-tuning in either stage counts as full."""
    from tactful.models import training_dtype

    return training_dtype(config.model_dtype, full_finetune=not (config.stage1.lora.enabled
                                                                 and config.sft.lora.enabled))


def train_dcr(config: DCRConfig, *, log: Callable[[str], None] = print) -> tuple[Any, RunDir]:
    from tactful.models import load_model

    set_seed(config.seed)
    run = RunDir(config.output_dir)
    model, tokenizer = load_model(config.model, dtype=dcr_dtype(config), for_training=True)
    model, diag = run_stage1(config, model, tokenizer, run, log=log)
    sft = _sft_from(config)
    model, run = train_sft(sft, model=model, tokenizer=tokenizer, run_dir=run, log=log)
    run.write_config({"method": "dcr", **asdict(config)})
    run.write_manifest(kind="dcr", base_model=config.model, seed=config.seed,
                       extra={"stage1_adapter": "stage1_adapter" if config.stage1.lora.enabled else None,
                              "stage1_full_model": None if config.stage1.lora.enabled else "stage1_adapter",
                              "adapter": "adapter" if config.sft.lora.enabled else None,
                              "model_dir": None if config.sft.lora.enabled else "adapter",
                              "layer": diag["layer"], "status": "complete"})
    return model, run


def _sft_from(config: DCRConfig) -> SFTConfig:
    from tactful.config import from_dict

    d = asdict(config.sft)
    d.update(model=config.model, model_dtype=config.model_dtype, output_dir=config.output_dir, seed=config.seed,
             resume=config.resume)
    return from_dict(SFTConfig, d)


def load_dcr_run(run_dir: Path, manifest: dict[str, Any], **kw: Any) -> tuple[Any, Any]:
    """Base model + stage-1 changes merged + the stage-2 SFT adapter."""
    from tactful.models import attach_adapter, load_model

    if manifest.get("stage1_full_model"):
        model, tok = load_model(str(run_dir / manifest["stage1_full_model"]), **kw)
    else:
        model, tok = load_model(manifest["base_model"], **kw)
        model = attach_adapter(model, run_dir / manifest["stage1_adapter"]).merge_and_unload()
    if manifest.get("model_dir"):
        return load_model(str(run_dir / manifest["model_dir"]), **kw)
    model = attach_adapter(model, run_dir / manifest["adapter"])
    model.eval()
    return model, tok


RUN_LOADERS["dcr"] = load_dcr_run
CONFIG_CLASS = DCRConfig


def run(config: DCRConfig, *, log: Callable[[str], None] = print) -> RunDir:
    return train_dcr(config, log=log)[1]
