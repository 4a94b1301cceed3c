"""`refusal_guard`: refusal-preserving fine-tuning ("The Unintended Trade-off of AI Alignment").

    capture   o_proj inputs of the chosen layers on a mixed corpus (streamed)
    SAE       one TopK (or ReLU + L1) SAE per layer, saved in SAELens's layout
    features  refusal latents minus hallucination latents
    guard     U = QR basis of their decoder directions; LoRA / full updates kept orthogonal
    train     LoRA (or full) fine-tuning on benign / factuality data with transformers.Trainer,
              a callback re-projecting after every optimizer step

Baselines on the same pipeline: `guard.kind: direction` (rank-1 difference-of-means refusal
direction, Arditi et al.), `none` (plain LoRA), `safelora` (Safe LoRA's post-hoc projection;
needs `start_from`, an aligned run, because it compares aligned and unaligned weights).

What the guard covers of what is trained (`guard.coverage`, `guard.train_only_guarded`,
`guard.strict`): `attention` (default) guards o_proj/v_proj at the SAE layers only; `residual`
adds the refusal directions in the residual stream at every trained layer, for every module
that reads or writes it (residual.py). `train_only_guarded` trains only what the guard protects
(LoRA: target modules and `layers_to_transform`; full fine-tuning: freezes the rest), `strict`
refuses to train anything unguarded. The manifest and guard/coverage.json list the trained
modules, guarded or not, with each guarded update's measured orthogonality residual.

`start_from` names a tactful run (e.g. a safety-SFT run): its model is loaded with its
adapter merged, and everything above happens on that aligned model.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from tactful.data.records import Example, MCItem, PromptRecord
from tactful.distributed import is_main_process, run_on_main
from tactful import architectures
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
    run_train_loss,
    save_trained,
    set_seed,
    training_arguments,
)
from tactful.methods.refusal_guard.capture import (
    POSITIONS,
    attention_sites,
    decoder_layer_list,
    head_layout,
    projection_in_features,
    read_activation_shards,
    shard_layers,
    stream_activations,
    write_activation_shards,
)
from tactful.methods.refusal_guard.coverage import coverage_report, require_full_coverage
from tactful.methods.refusal_guard.features import FeatureSelection, refusal_directions, select_features
from tactful.methods.refusal_guard.guard import (
    SIDE_ROLES,
    SIDES,
    VALUE_MODES,
    Subspace,
    SubspaceGuard,
    guard_callback,
    save_subspaces,
    subspaces_from_saes,
)
from tactful.methods.refusal_guard.residual import (
    require_supported,
    residual_bases,
    residual_refusal_directions,
    save_residual_bases,
)
from tactful.methods.refusal_guard.safelora import SafeLoraSettings, apply_safe_lora
from tactful.methods.refusal_guard.sae import (
    ARCHITECTURES,
    SAEConfig,
    SAETrainSettings,
    SparseAutoencoder,
    load_sae_dir,
    train_saes,
)
from tactful.progress import rich_training_progress
from tactful.runs import RUN_LOADERS, RunDir, read_manifest

GUARDS = ("sae", "direction", "none", "safelora")
COVERAGES = ("attention", "residual")
DEFAULT_SAE_SOURCES = ["builtin-benign", "builtin-refusals", "builtin-harmful", "builtin-seemingly-toxic-answers",
                       "builtin-informative", "builtin-truthfulness"]


# ---------------------------------------------------------------- config

@dataclass
class SAESettings:
    layers: list[int] | None = field(default=None, metadata={
        "help": "Decoder layers to train SAEs on (and guard); default: at 1/3, 1/2 and 2/3 of the depth."})
    architecture: str = field(default="topk", metadata={"choices": ARCHITECTURES})
    expansion: int = field(default=8, metadata={"help": "d_sae = expansion * d_in (the paper's width multiplier)."})
    k: int = field(default=32, metadata={"help": "Active latents per token (topk)."})
    l1_coefficient: float = field(default=2.0, metadata={"help": "L1 weight (standard / ReLU SAEs)."})
    steps: int = 2000
    batch_size: int = field(default=512, metadata={"help": "Activation tokens per SAE step."})
    learning_rate: float = 5e-4
    tokens: int = field(default=200_000, metadata={"help": "Activation tokens captured per pass over the corpus."})
    max_length: int = 256
    capture_batch_size: int = 8
    sources: list[str] = field(default_factory=lambda: list(DEFAULT_SAE_SOURCES),
                               metadata={"help": "Corpus for the SAE: any record sources (prompts, examples, mc)."})
    split: str | None = "train"
    dead_window_tokens: int = 50_000
    eval_tokens: int = 2048
    pretrained: str | None = field(default=None, metadata={
        "help": "Directory of SAEs in SAELens layout (one per layer, on hook_z / the o_proj input) to use instead of training."})
    activations_dir: str | None = field(default=None, metadata={
        "help": "Write the captured activations here as safetensors shards (and reuse them if present)."})


@dataclass
class FeatureSettings:
    n_refusal: int = 32
    n_hallucination: int = 32
    harmful: list[str] = field(default_factory=lambda: ["builtin-harmful"])
    harmless: list[str] = field(default_factory=lambda: ["builtin-benign"])
    truthfulness: list[str] = field(default_factory=lambda: ["builtin-truthfulness"],
                                    metadata={"help": "MC items (builtin-truthfulness, truthfulqa-mc, a file)."})
    split: str | None = "train"
    n_prompts: int | None = field(default=128, metadata={"help": "Harmful and harmless prompts each (Arditi: 128)."})
    n_items: int | None = 64


@dataclass
class GuardSettings:
    kind: str = field(default="sae", metadata={"choices": GUARDS, "help": "sae | direction | none | safelora"})
    sides: list[str] = field(default_factory=lambda: list(SIDES), metadata={
        "help": "o_proj: input side (dW P); v_proj: output side (P_v dW, per KV head)."})
    value_mode: str = field(default="per_head", metadata={"choices": VALUE_MODES, "help": (
        "v_proj constraint under grouped KV heads: per_head (exact; may freeze v_proj when many latents are kept) "
        "or shared (orthogonal to the group's summed U slices; exact only if the group's heads attend alike).")})
    direction_positions: str = field(default="last", metadata={"choices": POSITIONS})
    coverage: str = field(default="attention", metadata={"choices": COVERAGES, "help": (
        "attention: guard `sides` at the SAE layers only (the paper's space). residual: also keep the "
        "difference-of-means refusal directions in the residual stream at every trained layer out of every "
        "trained reader (q/k/v/gate/up, input side through the norm gain) and writer (o_proj, down_proj, output "
        "side). Llama-style models only.")})
    train_only_guarded: bool = field(default=False, metadata={"help": (
        "Train only what the guard protects: LoRA targets and layers cut to the guarded modules and layers "
        "(peft layers_to_transform); full fine-tuning freezes every unguarded parameter.")})
    strict: bool = field(default=False, metadata={"help": (
        "Refuse to start when the fine-tuning trains a module the guard does not protect.")})
    safelora: SafeLoraSettings = field(default_factory=SafeLoraSettings)


@dataclass
class HeadSettings:
    enabled: bool = field(default=False, metadata={"help": "Score attention heads (one scoring pass per head)."})
    layers: list[int] | None = None
    n_pairs: int = 32
    top_k: int = 10


@dataclass
class FinetuneData:
    sources: list[str] = field(default_factory=lambda: ["builtin-benign", "builtin-truthfulness"], metadata={
        "help": "Benign / factuality data: examples, or MC items (trained on question -> best correct answer)."})
    split: str | None = "train"
    max_examples: int | None = None


@dataclass
class RefusalGuardConfig:
    model: str = "embedded"
    start_from: str | None = field(default=None, metadata={
        "help": "A tactful run (e.g. safety SFT) to start from; its adapter is merged first."})
    output_dir: str = "runs/refusal_guard"
    model_dtype: str | None = field(default=None, metadata={"help": (
        "Weights dtype to load the model in: float32, bfloat16, float16 or auto (the checkpoint's). Unset: float32 "
        "without a GPU; on a GPU the checkpoint's (float32 for full fine-tuning unless DeepSpeed or FSDP with mixed "
        "precision keeps float32 master weights). docs/scale-out.md")})
    seed: int = 0
    system: str | None = None
    sae: SAESettings = field(default_factory=SAESettings)
    features: FeatureSettings = field(default_factory=FeatureSettings)
    guard: GuardSettings = field(default_factory=GuardSettings)
    heads: HeadSettings = field(default_factory=HeadSettings)
    data: FinetuneData = field(default_factory=FinetuneData)
    lora: LoraSettings = field(default_factory=LoraSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    resume: bool = True


# ---------------------------------------------------------------- data

def _load(sources: list[str], split: str | None) -> list[Any]:
    from tactful.data.registry import load_records

    out: list[Any] = []
    for src in sources:
        out.extend(load_records(src, split=split))
    return out


def mc_to_example(item: MCItem) -> Example:
    """A factuality QA example: the question answered with its best (else first) correct choice."""
    best = item.meta.get("best")
    idx = best if isinstance(best, int) and best in item.answers else item.answers[0]
    return Example(prompt=item.question, response=item.choices[idx], id=item.id, source=item.source,
                   category=item.meta.get("category"))


def load_finetune_examples(data: FinetuneData, seed: int) -> list[Example]:
    out = []
    for r in _load(data.sources, data.split):
        if isinstance(r, MCItem):
            out.append(mc_to_example(r))
        elif isinstance(r, Example):
            out.append(r)
        else:
            raise UserError(f"fine-tuning data must be (prompt, response) examples or MC items, got {type(r).__name__} "
                            f"(data.sources: {', '.join(data.sources)})")
    random.Random(seed).shuffle(out)
    if data.max_examples is not None:
        out = out[: data.max_examples]
    if not out:
        raise UserError("no fine-tuning examples: check data.sources")
    return out


def corpus_texts(tokenizer: Any, sources: list[str], split: str | None, *, seed: int, system: str | None = None) -> list[str]:
    """Chat-formatted texts for SAE training, shuffled so any token budget sees every source."""
    from tactful.models import format_chat, format_prompt, messages_for

    texts = []
    for r in _load(sources, split):
        if isinstance(r, MCItem):
            r = mc_to_example(r)
        if isinstance(r, Example) or hasattr(r, "response"):
            texts.append(format_chat(tokenizer, messages_for(r.prompt, system, r.response), add_generation_prompt=False))
        elif isinstance(r, PromptRecord):
            texts.append(format_prompt(tokenizer, r.prompt, system=system))
        else:
            raise UserError(f"cannot use {type(r).__name__} records as SAE corpus text")
    random.Random(seed).shuffle(texts)
    if not texts:
        raise UserError("the SAE corpus is empty: check sae.sources")
    return texts


def default_layers(n_layers: int) -> list[int]:
    return sorted({n_layers // 3, n_layers // 2, (2 * n_layers) // 3})


# ---------------------------------------------------------------- starting model

@dataclass
class StartModel:
    model: Any
    tokenizer: Any
    base_model: str  # the root model spec (what an adapter ultimately sits on)
    start_from: str | None = None
    start_kind: str | None = None
    start_adapter: str | None = None  # the start run's adapter directory, when it is base + one adapter


def load_start_model(config: RefusalGuardConfig, *, log: Callable[[str], None] = print) -> StartModel:
    """The model to fine-tune: `model`, or the model of run `start_from` with its adapter(s) merged."""
    from tactful.models import load_model, to_device
    from tactful.runs import load_run_model

    # Everything done with the model before training runs on the main process (SAEs, heads), so
    # under RAM-efficient FSDP loading the others need no weights (only guard.kind none runs there).
    load_kw: dict[str, Any] = {"dtype": guard_dtype(config), "for_training": True}
    if not config.start_from:
        model, tok = load_model(config.model, device=_device(), **load_kw)
        return StartModel(model, tok, base_model=config.model)
    manifest = read_manifest(config.start_from)
    kind = manifest.get("kind", "")
    from tactful.methods.registry import METHODS

    if kind in METHODS and kind not in RUN_LOADERS:
        import importlib

        importlib.import_module(METHODS[kind])  # a method module registers its run loader on import
    base = manifest.get("base_model")
    if not base:
        raise UserError(f"{config.start_from}/manifest.json names no base_model")
    if config.model not in ("embedded", base):
        log(f"note: model={config.model!r} is ignored; the base model comes from {config.start_from} ({base})")
    model, tok, desc = load_run_model(config.start_from, **load_kw)
    simple = kind not in RUN_LOADERS and manifest.get("adapter") and not manifest.get("model_dir")
    if is_peft(model):
        model = model.merge_and_unload()
    model = to_device(model, _device())
    model.eval()
    log(f"starting from {desc} (adapter merged)")
    return StartModel(model, tok, base_model=base, start_from=str(config.start_from), start_kind=kind,
                      start_adapter=str(Path(config.start_from) / manifest["adapter"]) if simple else None)


def guard_dtype(config: RefusalGuardConfig) -> str:
    """The dtype every load of the base model in this run uses (`model_dtype`)."""
    from tactful.models import training_dtype

    return training_dtype(config.model_dtype, full_finetune=not config.lora.enabled)


def _device() -> Any:
    """Where capture and SAE training run: this process's accelerator (the Trainer would move
    the model there anyway), else the CPU."""
    from accelerate import PartialState

    return PartialState().device


# ---------------------------------------------------------------- SAEs

def sae_hook_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"  # TransformerLens's name for the o_proj input


def train_layer_saes(model: Any, tokenizer: Any, settings: SAESettings, layers: list[int], out_dir: Path, *,
                     model_name: str, seed: int = 0, system: str | None = None,
                     log: Callable[[str], None] = print) -> tuple[dict[int, SparseAutoencoder], dict[str, Any]]:
    """Capture, train one SAE per layer, save each to out_dir/layer_XX (SAELens layout). Returns (saes, summary)."""
    sites = {s.layer: s for s in attention_sites(model, layers, value=False)}
    texts = corpus_texts(tokenizer, settings.sources, settings.split, seed=seed, system=system)

    def model_stream() -> Iterator[dict[int, torch.Tensor]]:
        return stream_activations(model, tokenizer, texts, layers=layers, positions="all",
                                  batch_size=settings.capture_batch_size, max_length=settings.max_length,
                                  max_tokens=settings.tokens)

    source: Callable[[], Iterator[dict[int, torch.Tensor]]] = model_stream
    tmp_shards = None
    needed = settings.steps * settings.batch_size
    shard_dir = Path(settings.activations_dir) if settings.activations_dir else None
    if shard_dir is None and needed > settings.tokens:
        # Several passes over the data: capture once to disk rather than re-running the model.
        tmp_shards = shard_dir = out_dir / ".activations"
    if shard_dir is not None:
        if not (shard_dir / "activations.json").is_file() or not set(layers) <= set(shard_layers(shard_dir)):
            gb = settings.tokens * projection_in_features(sites[layers[0]].out_proj) * 4 * len(layers) / 1e9
            log(f"capturing up to {settings.tokens} tokens x {len(layers)} layer(s) to {shard_dir} (~{gb:.2f} GB)")
            write_activation_shards(model_stream(), shard_dir, meta={"model": model_name, "positions": "all"})
        source = lambda: _zip_shards(shard_dir, layers)  # noqa: E731
    saes = {}
    for i, layer in enumerate(layers):
        d_in = projection_in_features(sites[layer].out_proj)
        cfg = SAEConfig(d_in=d_in, d_sae=settings.expansion * d_in, architecture=settings.architecture, k=settings.k,
                        hook_name=sae_hook_name(layer), hook_layer=layer, model_name=model_name,
                        hf_module=sites[layer].out_name)
        saes[layer] = SparseAutoencoder(cfg, seed=seed + i).to(next(model.parameters()).device)
    train_settings = SAETrainSettings(steps=settings.steps, batch_size=settings.batch_size,
                                      learning_rate=settings.learning_rate, l1_coefficient=settings.l1_coefficient,
                                      dead_window_tokens=settings.dead_window_tokens,
                                      # never hold out more than a tenth of a small capture for evaluation
                                      eval_tokens=min(settings.eval_tokens, max(1, settings.tokens // 10)), seed=seed)
    try:
        trainers = train_saes(saes, source, train_settings, log=log)
    finally:
        if tmp_shards is not None:
            shutil.rmtree(tmp_shards, ignore_errors=True)
    summary: dict[str, Any] = {"layers": layers, "settings": asdict(settings), "metrics": {}}
    for layer, t in trainers.items():
        metrics = t.finish()
        sae = saes[layer]
        sae.cfg.extra = {"metrics": metrics.to_dict(), "train": asdict(train_settings), "sources": settings.sources,
                         "history": t.history[-5:]}
        sae.save(out_dir / f"layer_{layer:02d}", sparsity=t.log_sparsity())
        summary["metrics"][str(layer)] = metrics.to_dict()
        log(f"SAE layer {layer}: explained variance {metrics.explained_variance:.3f}, L0 {metrics.l0:.1f}, "
            f"dead {metrics.dead_fraction:.1%}, mse {metrics.mse:.3g}")
    from tactful.io import atomic_write_json

    atomic_write_json(out_dir / "summary.json", summary)
    return saes, summary


def _zip_shards(shard_dir: Path, layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    streams = [read_activation_shards(shard_dir, layer) for layer in layers]
    for chunks in zip(*streams):
        yield dict(zip(layers, chunks))


def _get_saes(config: RefusalGuardConfig, start: StartModel, run: RunDir, layers: list[int],
              log: Callable[[str], None]) -> tuple[dict[int, SparseAutoencoder], dict[str, Any]]:
    s = config.sae
    d_in = projection_in_features(attention_sites(start.model, layers[:1], value=False)[0].out_proj)
    if s.pretrained:
        saes = load_sae_dir(s.pretrained)
        if config.sae.layers is not None:
            missing = [layer for layer in layers if layer not in saes]
            if missing:
                raise UserError(f"sae.pretrained {s.pretrained} has no SAE for layer(s) {missing}")
            saes = {layer: saes[layer] for layer in layers}
        for layer, sae in saes.items():
            if sae.cfg.d_in != d_in:
                raise UserError(f"SAE for layer {layer} in {s.pretrained} has d_in {sae.cfg.d_in}, but the model's "
                                f"o_proj input has {d_in} features")
        log(f"using pretrained SAEs from {s.pretrained} for layer(s) {sorted(saes)}")
        # SAEs trained by tactful carry their held-out metrics in cfg.json; report them as a
        # freshly trained run would, so runs sharing one set of SAEs stay comparable.
        metrics = {str(layer): sae.cfg.extra["metrics"] for layer, sae in sorted(saes.items())
                   if isinstance(sae.cfg.extra.get("metrics"), dict)}
        return saes, {"pretrained": s.pretrained, **({"metrics": metrics} if metrics else {})}
    sae_dir = run.path / "sae"
    if config.resume and (sae_dir / "summary.json").is_file():
        summary = run.read_json("sae/summary.json")
        if summary.get("layers") == layers and summary.get("settings") == asdict(s):
            log(f"reusing the SAEs already trained in {sae_dir}")
            return load_sae_dir(sae_dir), summary
    return train_layer_saes(start.model, start.tokenizer, s, layers, sae_dir, model_name=start.base_model,
                            seed=config.seed, system=config.system, log=log)


def _prompts(sources: list[str], split: str | None) -> list[Any]:
    recs = _load(sources, split)
    bad = [r for r in recs if not hasattr(r, "prompt")]
    if bad:
        raise UserError(f"prompt sources must give prompts or examples, got {type(bad[0]).__name__} ({', '.join(sources)})")
    return recs


def _mc_items(sources: list[str], split: str | None) -> list[MCItem]:
    recs = _load(sources, split)
    bad = [r for r in recs if not isinstance(r, MCItem)]
    if bad:
        raise UserError(f"features.truthfulness must give multiple-choice items, got {type(bad[0]).__name__}")
    return recs


# ---------------------------------------------------------------- the pipeline

def build_subspaces(config: RefusalGuardConfig, start: StartModel, run: RunDir, *,
                    log: Callable[[str], None] = print) -> tuple[dict[int, Subspace], dict[str, Any]]:
    """The protected subspace per layer for guard.kind sae / direction (empty for none / safelora)."""
    kind = config.guard.kind
    if kind in ("none", "safelora"):
        return {}, {}
    n_layers = len(decoder_layer_list(start.model)[1])
    layers = list(config.sae.layers) if config.sae.layers is not None else default_layers(n_layers)
    layout = head_layout(start.model)
    f = config.features
    harmful, harmless = _prompts(f.harmful, f.split), _prompts(f.harmless, f.split)
    info: dict[str, Any] = {"layers": layers, "value_mode": config.guard.value_mode}
    if kind == "direction":
        dirs = refusal_directions(start.model, start.tokenizer, layers, harmful=harmful, harmless=harmless,
                                  n_prompts=f.n_prompts, seed=config.seed, positions=config.guard.direction_positions,
                                  system=config.system, max_length=config.sae.max_length)
        log(f"refusal direction (difference of means) at layer(s) {layers}")
        return {layer: Subspace.from_directions(layer, d[:, None], layout, value_mode=config.guard.value_mode)
                for layer, d in dirs.items()}, info
    saes, summary = _get_saes(config, start, run, layers, log)
    info["sae"] = summary.get("metrics", summary)
    if summary.get("pretrained"):
        info["sae_pretrained"] = summary["pretrained"]
    truth = _mc_items(f.truthfulness, f.split) if f.truthfulness and f.n_hallucination > 0 else []
    selection = select_features(start.model, start.tokenizer, saes, harmful=harmful, harmless=harmless,
                                truthfulness=truth, n_refusal=f.n_refusal, n_hallucination=f.n_hallucination,
                                n_prompts=f.n_prompts, n_items=f.n_items, seed=config.seed, system=config.system,
                                max_length=config.sae.max_length, log=log)
    run.write_json("features.json", selection.to_dict())
    subspaces = subspaces_from_saes(saes, selection.kept, layout, value_mode=config.guard.value_mode)
    if not subspaces:
        raise UserError("no refusal latents survived feature selection; raise features.n_refusal or check the SAEs")
    info["rank"] = {str(layer): int(s.U.shape[1]) for layer, s in subspaces.items()}
    return subspaces, info


def check_guard_settings(config: RefusalGuardConfig) -> None:
    """The guard.* combinations that cannot work, each as one UserError before anything loads."""
    g = config.guard
    if g.kind not in GUARDS:
        raise UserError(f"guard.kind must be one of {', '.join(GUARDS)}, got {g.kind!r}")
    if g.coverage not in COVERAGES:
        raise UserError(f"guard.coverage must be one of {', '.join(COVERAGES)}, got {g.coverage!r}")
    unknown = [s for s in g.sides if s not in SIDES]
    if unknown:
        raise UserError(f"guard.sides: unknown side(s) {', '.join(map(repr, unknown))}; choose from {', '.join(SIDES)}")
    if g.kind in ("none", "safelora"):
        asked = [name for name, on in (("coverage=residual", g.coverage == "residual"),
                                       ("train_only_guarded=true", g.train_only_guarded),
                                       ("strict=true", g.strict)) if on]
        if asked:
            raise UserError(f"guard.{asked[0]} needs a projection guard (guard.kind sae or direction); "
                            f"guard.kind={g.kind} constrains no module during training")
    if g.train_only_guarded and g.coverage == "attention" and not g.sides:
        raise UserError("guard.train_only_guarded=true with guard.sides=[] would train nothing; "
                        "name the guarded sides (o_proj, v_proj)")


def trained_layers(config: RefusalGuardConfig, n_layers: int) -> list[int]:
    """The decoder layers the fine-tuning adapts: lora.layers, or all of them."""
    if config.lora.enabled and config.lora.layers is not None:
        return sorted({layer % n_layers for layer in config.lora.layers})
    return list(range(n_layers))


def build_residual(config: RefusalGuardConfig, start: StartModel, *,
                   log: Callable[[str], None] = print) -> dict[int, torch.Tensor]:
    """guard.coverage=residual: U_l per trained layer from the refusal directions at its residual
    input and output (residual.py); {} for attention coverage."""
    if config.guard.coverage != "residual":
        return {}
    require_supported(start.model)
    n_layers = len(decoder_layer_list(start.model)[1])
    layers = trained_layers(config, n_layers)
    f = config.features
    dirs = residual_refusal_directions(start.model, start.tokenizer, layers, harmful=_prompts(f.harmful, f.split),
                                       harmless=_prompts(f.harmless, f.split), n_prompts=f.n_prompts,
                                       seed=config.seed, positions=config.guard.direction_positions,
                                       system=config.system, max_length=config.sae.max_length)
    log(f"residual refusal directions (difference of means) at the input and output of {len(layers)} layer(s)")
    return residual_bases(dirs, layers)


def guarded_lora_settings(config: RefusalGuardConfig, model: Any, guarded_layers: list[int]) -> LoraSettings:
    """guard.train_only_guarded with LoRA: targets and layers_to_transform cut to what the guard protects."""
    lora = config.lora
    if config.guard.coverage == "residual":
        return lora  # every reader and writer of every trained layer is guarded already
    roles = [SIDE_ROLES[s] for s in config.guard.sides]
    if architectures.is_fused(model, "attn_v"):
        roles = [r for r in roles if r != "attn_v"]  # a fused qkv has no value-side guard (attention_sites)
    guarded = architectures.lora_target_modules(model, roles)
    targets = [t for t in architectures.lora_target_modules(model, list(lora.target_modules)) if t in guarded]
    layers = sorted(set(guarded_layers) & (set(lora.layers) if lora.layers is not None else set(guarded_layers)))
    if not targets or not layers:
        raise UserError(f"guard.train_only_guarded=true leaves nothing to train: the guard protects "
                        f"{', '.join(guarded) or 'no module'} at layer(s) {guarded_layers}, the LoRA targets "
                        f"{', '.join(lora.target_modules)} at layer(s) {lora.layers or 'all'}")
    return replace(lora, target_modules=targets, layers=layers)


def freeze_unguarded(model: Any, guard: SubspaceGuard) -> list[str]:
    """guard.train_only_guarded with full fine-tuning: stop training every parameter no constraint holds."""
    held = {id(c.param) for c in guard.constraints}
    frozen = []
    for name, p in architectures.unwrap(model).named_parameters():
        if p.requires_grad and id(p) not in held:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def train_refusal_guard(config: RefusalGuardConfig, *, log: Callable[[str], None] = print) -> tuple[Any, RunDir]:
    """The whole pipeline; returns (fine-tuned model, run dir)."""
    from transformers import Trainer

    check_guard_settings(config)
    if config.guard.kind == "safelora" and not config.start_from:
        raise UserError("guard.kind=safelora compares an aligned and an unaligned model: set start_from to an aligned "
                        "run (e.g. a safety-SFT run); its base model is the unaligned one")
    if config.guard.kind == "safelora" and not config.lora.enabled:
        raise UserError("guard.kind=safelora projects a LoRA adapter; set lora.enabled=true")
    _check_engine(config.guard.kind)
    set_seed(config.seed)
    run = RunDir(config.output_dir)
    start = load_start_model(config, log=log)
    # SAEs, features and the basis come from the main process (which writes them): every
    # process then projects onto exactly the same subspace.
    subspaces, info = run_on_main(lambda: build_subspaces(config, start, run, log=log),
                                  what="building the protected subspace")
    if subspaces and is_main_process():
        save_subspaces(subspaces, run.path / "guard" / "subspace.safetensors")
    residual = run_on_main(lambda: build_residual(config, start, log=log),
                           what="computing the residual refusal directions")
    if residual:
        info["residual_rank"] = {str(layer): int(U.shape[1]) for layer, U in residual.items()}
        if is_main_process():
            save_residual_bases(residual, run.path / "guard" / "residual.safetensors")
    if config.heads.enabled:
        run_on_main(lambda: _score_heads(config, start, run, log), what="scoring attention heads", share=False)
    alignment = (_alignment_matrices(start, config.lora, log, guard_dtype(config)) if config.guard.kind == "safelora"
                 else None)

    set_seed(config.seed)
    examples = load_finetune_examples(config.data, config.seed)
    model, tok = start.model, start.tokenizer
    lora_settings = config.lora
    if config.guard.train_only_guarded and config.lora.enabled:
        lora_settings = guarded_lora_settings(config, model, sorted(subspaces))
        log(f"training only the guarded modules: LoRA on {', '.join(lora_settings.target_modules)} at layer(s) "
            f"{lora_settings.layers if lora_settings.layers is not None else 'all'}")
        info["lora_trained"] = {"target_modules": list(lora_settings.target_modules), "layers": lora_settings.layers}
    model = prepare_trainable(model, lora_settings)
    guard = (SubspaceGuard(model, subspaces, sides=config.guard.sides, residual=residual)
             if subspaces or residual else None)
    if guard is not None:
        if config.guard.train_only_guarded and not config.lora.enabled:
            frozen = freeze_unguarded(model, guard)
            log(f"training only the guarded parameters: froze {len(frozen)} unguarded parameter(s)")
        log(guard.describe())
        if config.guard.strict:
            require_full_coverage(coverage_report(model, guard, measure=False))
    dataset = EncodedDataset(tok, examples, max_length=config.training.max_length, system=config.system)
    ckpt_dir = run.path / "checkpoints"
    args = training_arguments(config.training, ckpt_dir, seed=config.seed)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=ResponseCollator(tok.pad_token_id),
                      callbacks=[log_at_checkpoints(), *([guard_callback(guard)] if guard is not None else [])])
    rich_training_progress(trainer, "fine-tuning (refusal guard)")
    resume = last_checkpoint(ckpt_dir) if config.resume else None
    if resume:
        log(f"resuming from {resume}")
    result = trainer.train(resume_from_checkpoint=resume)
    model = trainer.model
    model.eval()
    extra: dict[str, Any] = {"guard": config.guard.kind, **info}
    if guard is not None:
        guard.project_()  # idempotent; makes the saved weights exact even if training stopped mid-step
        extra["guard_residual"] = guard.max_residual()
        extra["guarded_parameters"] = [c.name for c in guard.constraints]
        extra["guard_notes"] = guard.notes
        report = coverage_report(model, guard)
        run.write_json("guard/coverage.json", report)
        # the manifest keeps the per-pattern summary; guard/coverage.json has every module's residual
        extra["guard_coverage"] = {k: v for k, v in report.items() if k != "update_residuals"}
        guard.remove()
        log(f"guard residual (max |dW U|): {extra['guard_residual']:.2e}; update residual over "
            f"{len(report['update_residuals'])} guarded unit(s): {report['max_update_residual']:.2e}; "
            f"unguarded trained: {', '.join(report['unguarded']) or 'none'}")
    if alignment is not None:
        report = apply_safe_lora(model, alignment, config.guard.safelora)
        run.write_json("safelora.json", report)
        extra["safelora_projected"] = len(report["projected"])
        log(f"Safe LoRA projected {len(report['projected'])} of {len(report['similarities'])} module(s)")

    lora = is_peft(model)
    save_trained(trainer, tok, run.path / ("adapter" if lora else "model"))
    if start.start_adapter and is_main_process():
        # a private copy makes the run self-contained: loading it needs only the base model
        dst = run.path / "start_adapter"
        if Path(start.start_adapter).resolve() != dst.resolve():
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(start.start_adapter, dst)
    run.write_json("train_log.json", trainer.state.log_history)
    run.write_config({"method": "refusal_guard", **asdict(config)})
    run.write_manifest(
        kind="refusal_guard", base_model=start.base_model, seed=config.seed,
        data={"finetune": [e.to_dict() for e in examples]},
        extra={"adapter": "adapter" if lora else None, "model_dir": None if lora else "model",
               "start_from": start.start_from, "start_kind": start.start_kind,
               "start_adapter": "start_adapter" if start.start_adapter else None,
               "train_loss": run_train_loss(trainer, result.training_loss), "steps": trainer.state.global_step, "n_examples": len(examples),
               "status": "complete", **extra},
    )
    return model, run


def _check_engine(kind: str) -> None:
    """The guards edit parameters in place after each optimizer step, which needs them whole and
    owned by the torch optimizer: DDP (or one process), not FSDP or DeepSpeed."""
    from tactful.distributed import deepspeed_zero_stage, require_unsharded

    if kind in ("sae", "direction"):
        if deepspeed_zero_stage() is not None:
            raise UserError(f"refusal_guard with guard.kind={kind} does not support DeepSpeed: it projects the "
                            "weights after every optimizer step, and DeepSpeed keeps its own master copy of them; "
                            "launch it with DDP (configs/accelerate/ddp.yaml)")
        require_unsharded(f"refusal_guard with guard.kind={kind}", "it projects whole weight matrices after every "
                          "optimizer step")
    elif kind == "safelora":
        require_unsharded("refusal_guard with guard.kind=safelora", "it projects the whole trained adapter")


def _alignment_matrices(start: StartModel, lora: LoraSettings, log: Callable[[str], None],
                        dtype: str = "float32") -> dict[str, torch.Tensor]:
    """V_i = W_aligned - W_unaligned for every module the fine-tuning LoRA will adapt."""
    from tactful.models import load_model

    base, _ = load_model(start.base_model, dtype=dtype)
    targets = architectures.lora_target_modules(base, list(lora.target_modules))
    aligned_mods = dict(start.model.named_modules())
    out = {}
    for name, mod in base.named_modules():
        if architectures.matches_target(name, targets) and isinstance(mod, torch.nn.Linear) and name in aligned_mods:
            out[name] = aligned_mods[name].weight.detach().float().cpu() - mod.weight.detach().float().cpu()
    del base
    changed = sum(1 for v in out.values() if torch.any(v))
    log(f"Safe LoRA: alignment matrices for {len(out)} module(s), {changed} changed by alignment")
    return out


def _score_heads(config: RefusalGuardConfig, start: StartModel, run: RunDir, log: Callable[[str], None]) -> None:
    from tactful.methods.refusal_guard.features import subsample
    from tactful.methods.refusal_guard.heads import refusal_pairs, score_heads, truthfulness_pairs

    f, h = config.features, config.heads
    truth = truthfulness_pairs(subsample(_mc_items(f.truthfulness, f.split), h.n_pairs, config.seed))
    refuse = refusal_pairs(subsample(_prompts(f.harmful, f.split), h.n_pairs, config.seed))
    scores = score_heads(start.model, start.tokenizer, truthfulness=truth, refusal=refuse, layers=h.layers,
                         top_k=h.top_k, max_length=config.sae.max_length, log=log)
    run.write_json("heads.json", scores.to_dict())


# ---------------------------------------------------------------- loading a run

def load_refusal_guard_run(run_dir: Path, manifest: dict[str, Any], **kw: Any) -> tuple[Any, Any]:
    """Base model, the start run's adapter merged (if any), then this run's adapter."""
    from tactful.models import attach_adapter, load_model
    from tactful.runs import load_run_model

    if manifest.get("model_dir"):
        return load_model(str(run_dir / manifest["model_dir"]), **kw)
    if manifest.get("start_adapter"):
        model, tok = load_model(manifest["base_model"], **kw)
        model = attach_adapter(model, run_dir / manifest["start_adapter"]).merge_and_unload()
    elif manifest.get("start_from"):
        model, tok, _ = load_run_model(manifest["start_from"], **kw)
        if is_peft(model):
            model = model.merge_and_unload()
    else:
        model, tok = load_model(manifest["base_model"], **kw)
    model = attach_adapter(model, run_dir / manifest["adapter"])
    model.eval()
    return model, tok


RUN_LOADERS["refusal_guard"] = load_refusal_guard_run


# ---------------------------------------------------------------- CLI entry points

def sae_train_command(
    *,
    model: str = "embedded",
    out: str = "runs/sae",
    layers: list[int] | None = None,
    architecture: str = "topk",
    expansion: int = 8,
    k: int = 32,
    l1_coefficient: float = 2.0,
    steps: int = 2000,
    batch_size: int = 512,
    learning_rate: float = 5e-4,
    tokens: int = 200_000,
    sources: list[str] | None = None,
    split: str | None = "train",
    max_length: int = 256,
    activations_dir: str | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """`tactful sae train`: train SAEs on the o_proj input of `layers`, saved in SAELens layout under
    out/layer_XX (plus out/summary.json). Returns `out`."""
    from tactful.models import load_model

    if architecture not in ARCHITECTURES:
        raise UserError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    set_seed(seed)
    m, tok = load_model(model, device=_device())
    n_layers = len(decoder_layer_list(m)[1])
    settings = SAESettings(layers=layers, architecture=architecture, expansion=expansion, k=k,
                           l1_coefficient=l1_coefficient, steps=steps, batch_size=batch_size,
                           learning_rate=learning_rate, tokens=tokens,
                           sources=list(sources) if sources else list(DEFAULT_SAE_SOURCES), split=split,
                           max_length=max_length, activations_dir=activations_dir)
    chosen = list(layers) if layers is not None else default_layers(n_layers)
    out_dir = Path(out)
    train_layer_saes(m, tok, settings, chosen, out_dir, model_name=model, seed=seed, log=log)
    return out_dir


def sae_features_command(
    *,
    sae_dir: str,
    model: str = "embedded",
    out: str | None = None,
    n_refusal: int = 32,
    n_hallucination: int = 32,
    harmful: list[str] | None = None,
    harmless: list[str] | None = None,
    truthfulness: list[str] | None = None,
    split: str | None = "train",
    n_prompts: int | None = 128,
    n_items: int | None = 64,
    heads: bool = False,
    value_mode: str = "per_head",
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """`tactful sae features`: pick refusal-minus-hallucination latents of SAEs (tactful's or SAELens's)
    and write out/features.json + out/subspace.safetensors (+ heads.json). Returns `out`."""
    from tactful.models import load_model

    set_seed(seed)
    saes = load_sae_dir(sae_dir)
    m, tok = load_model(model, device=_device())
    d_in = projection_in_features(attention_sites(m, sorted(saes)[:1], value=False)[0].out_proj)
    for layer, sae in saes.items():
        if sae.cfg.d_in != d_in:
            raise UserError(f"SAE for layer {layer} has d_in {sae.cfg.d_in}; {model}'s o_proj input has {d_in}")
    harmful_src, harmless_src = harmful or ["builtin-harmful"], harmless or ["builtin-benign"]
    truth_src = truthfulness if truthfulness is not None else ["builtin-truthfulness"]
    harmful_recs, harmless_recs = _prompts(harmful_src, split), _prompts(harmless_src, split)
    truth = _mc_items(truth_src, split) if truth_src and n_hallucination > 0 else []
    selection: FeatureSelection = select_features(m, tok, saes, harmful=harmful_recs, harmless=harmless_recs,
                                                  truthfulness=truth, n_refusal=n_refusal,
                                                  n_hallucination=n_hallucination, n_prompts=n_prompts,
                                                  n_items=n_items, seed=seed, log=log)
    selection.settings.update(sae_dir=str(sae_dir), model=model, harmful=harmful_src, harmless=harmless_src,
                              truthfulness=truth_src)
    out_dir = RunDir(out or Path(sae_dir) / "features")
    out_dir.write_json("features.json", selection.to_dict())
    subspaces = subspaces_from_saes(saes, selection.kept, head_layout(m), value_mode=value_mode)
    save_subspaces(subspaces, out_dir.path / "subspace.safetensors")
    if heads:
        from tactful.methods.refusal_guard.features import subsample
        from tactful.methods.refusal_guard.heads import refusal_pairs, score_heads, truthfulness_pairs

        scores = score_heads(m, tok, truthfulness=truthfulness_pairs(subsample(truth, 32, seed)),
                             refusal=refusal_pairs(subsample(harmful_recs, 32, seed)), log=log)
        out_dir.write_json("heads.json", scores.to_dict())
    return out_dir.path


CONFIG_CLASS = RefusalGuardConfig


def run(config: RefusalGuardConfig, *, log: Callable[[str], None] = print) -> RunDir:
    """Entry point for `tactful train` recipes with `method: refusal_guard`."""
    return train_refusal_guard(config, log=log)[1]
