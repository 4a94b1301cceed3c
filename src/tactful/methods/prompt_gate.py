"""A prompt gate: which prompts a safety adapter should answer, and which the model answers as it was.

Every safety fine-tune of the embedded model that declines most harmful requests also refuses
benign ones that share their words (experiments/demo_recipe/README.md: the binding constraint).
A gate routes each prompt, before any reply is written, either to the safety adapter or to the
untouched model, so the adapter's refusals reach only the prompts the gate calls harmful (static,
per-sequence routing, as in MoGU's routing between a "glad" and an "unwilling" adapter; SafeMoE
routes per token instead).

The gate is a logistic probe on the untrained model's residual stream at the last prompt token
(the assistant header of the chat template, where the model has read the whole request and not
yet answered), standardised per dimension. It is fitted on harmful against benign prompts and
stored as safetensors plus a JSON sidecar (no pickle).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from tactful.errors import UserError

GATE_FORMAT = "tactful-prompt-gate-v1"
WEIGHTS_FILE = "gate.safetensors"
SIDECAR_FILE = "gate.json"


@dataclass
class PromptGateConfig:
    """layer: the residual stream after this many decoder layers (1 to the model's count); c: inverse
    L2 strength of the logistic regression; threshold: probability of "harmful" at which the adapter
    answers."""

    layer: int = 20
    c: float = 0.1
    threshold: float = 0.5
    batch_size: int = 32
    seed: int = 0


@dataclass
class PromptGate:
    layer: int
    weight: torch.Tensor  # [d]
    bias: float
    mean: torch.Tensor  # [d]
    scale: torch.Tensor  # [d]
    threshold: float = 0.5
    meta: dict[str, Any] = field(default_factory=dict)

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """P(harmful) per row of `features` ([n, d] hidden states at `layer`)."""
        z = (features.float() - self.mean) / self.scale
        return torch.sigmoid(z @ self.weight + self.bias)

    def score(self, model: Any, tokenizer: Any, prompts: Sequence[str], *, system: str | None = None,
              batch_size: int = 32) -> torch.Tensor:
        return self.probabilities(prompt_features(model, tokenizer, prompts, self.layer, system=system,
                                                  batch_size=batch_size))

    def decide(self, model: Any, tokenizer: Any, prompts: Sequence[str], *, system: str | None = None,
               batch_size: int = 32) -> list[bool]:
        """True where the safety adapter should answer."""
        if not prompts:  # e.g. a resumed evaluation with nothing left to score
            return []
        p = self.score(model, tokenizer, prompts, system=system, batch_size=batch_size)
        return [bool(x) for x in (p >= self.threshold).tolist()]

    def decide_ids(self, model: Any, encoded: Sequence[Sequence[int]], *, pad_id: int = 0) -> list[bool]:
        """`decide` for prompts already rendered to token ids."""
        if not encoded:
            return []
        p = self.probabilities(features_of_ids(model, encoded, self.layer, pad_id=pad_id))
        return [bool(x) for x in (p >= self.threshold).tolist()]

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        from tactful.io import atomic_write_bytes, atomic_write_json

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.contiguous(), "mean": self.mean.contiguous(),
                   "scale": self.scale.contiguous(), "bias": torch.tensor([self.bias])}
        tmp = d / f".{WEIGHTS_FILE}.tmp"
        save_file(tensors, str(tmp))
        blob = tmp.read_bytes()
        tmp.unlink()
        atomic_write_bytes(d / WEIGHTS_FILE, blob)
        atomic_write_json(d / SIDECAR_FILE, {"format": GATE_FORMAT, "layer": self.layer, "threshold": self.threshold,
                                             "weights_sha256": hashlib.sha256(blob).hexdigest(), **self.meta})
        return d

    @classmethod
    def load(cls, directory: str | Path) -> PromptGate:
        from safetensors.torch import load_file

        d = Path(directory)
        side, weights = d / SIDECAR_FILE, d / WEIGHTS_FILE
        if not side.is_file() or not weights.is_file():
            raise UserError(f"{d}: no prompt gate ({SIDECAR_FILE} and {WEIGHTS_FILE}); fit one with fit_prompt_gate")
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{side}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if meta.get("format") != GATE_FORMAT:
            raise UserError(f"{side}: not a tactful prompt gate (format {meta.get('format')!r})")
        if meta.get("weights_sha256") != hashlib.sha256(weights.read_bytes()).hexdigest():
            raise UserError(f"{weights} does not match its sidecar {side.name}; refit the gate")
        t = load_file(str(weights))
        extra = {k: v for k, v in meta.items() if k not in ("format", "layer", "threshold", "weights_sha256")}
        return cls(layer=int(meta["layer"]), weight=t["weight"], bias=float(t["bias"][0]), mean=t["mean"],
                   scale=t["scale"], threshold=float(meta["threshold"]), meta=extra)


class _Stop(Exception):
    """Raised by the capture hook: the layers above the gate's are not needed."""


def _run_to(model: Any, *, hook_rows: list[torch.Tensor], **kw: Any) -> None:
    """One forward pass, up to the hooked layer; `hook_rows` then holds that layer's last-token states."""
    hook_rows.clear()
    try:
        model(**kw)
    except _Stop:
        pass


def prompt_features(model: Any, tokenizer: Any, prompts: Sequence[str], layer: int, *, system: str | None = None,
                    batch_size: int = 32) -> torch.Tensor:
    """[n, d] residual stream after `layer` decoder layers at each chat-formatted prompt's last token.

    The forward stops at that layer (a hook raises once it has the output), so neither the layers
    above it nor the vocabulary projection run: about half a forward pass at layer 20 of 30."""
    from tactful.eval.generation import chat_prompts, pad_id_of

    encoded = chat_prompts(tokenizer, prompts, system) if prompts else []
    return features_of_ids(model, encoded, layer, pad_id=pad_id_of(tokenizer), batch_size=batch_size)


def features_of_ids(model: Any, encoded: Sequence[Sequence[int]], layer: int, *, pad_id: int = 0,
                    batch_size: int = 32) -> torch.Tensor:
    """`prompt_features` of prompts already rendered to token ids (e.g. a whole conversation under
    the chat template, ending with the assistant's header)."""
    from transformers import DynamicCache

    from tactful.architectures import decoder_layers
    from tactful.eval.generation import _common_prefix_len, _model_device
    from tactful.kv_cache import with_cache

    _, layers = decoder_layers(model)
    if not 1 <= layer <= len(layers):
        raise UserError(f"prompt gate layer {layer} is outside the model's decoder layers 1..{len(layers)}")
    if not encoded:
        return torch.zeros((0, int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)))
    encoded = [list(e) for e in encoded]
    device = _model_device(model)
    captured: list[torch.Tensor] = []

    def hook(module: Any, args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        captured.append(hidden[:, -1].float().cpu())
        raise _Stop

    # Longest first, so a batch's rows have similar lengths and little padding; rows go back in order at the end.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    # The chat template's header and system prompt are the same for every prompt (25 of ~46 tokens for
    # SmolLM2): run them once per batch at batch size 1 and copy their KV cache to every row.
    shared = _common_prefix_len(encoded, max_len=min(map(len, encoded)) - 1) if len(encoded) > 1 else 0
    if shared < 4:  # too short to be worth the extra call
        shared = 0
    rows = []
    handle = layers[layer - 1].register_forward_hook(hook)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = [encoded[i][shared:] for i in order[start:start + batch_size]]
                width = max(map(len, chunk))
                ids = torch.full((len(chunk), width), int(pad_id), dtype=torch.long)
                mask = torch.zeros((len(chunk), shared + width), dtype=torch.long)
                mask[:, :shared] = 1
                for j, r in enumerate(chunk):  # left padding: every prompt's last token in the last column
                    ids[j, width - len(r):] = torch.tensor(r, dtype=torch.long)
                    mask[j, shared + width - len(r):] = 1
                positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
                kw: dict[str, Any] = {"use_cache": False}
                if shared:
                    cache = DynamicCache(config=model.config)
                    _run_to(model, hook_rows=captured, input_ids=torch.tensor([encoded[order[start]][:shared]],
                                                                               device=device),
                            use_cache=True, **with_cache(model, cache))
                    cache.batch_repeat_interleave(len(chunk))
                    kw = {"use_cache": True, **with_cache(model, cache)}
                _run_to(model, hook_rows=captured, input_ids=ids.to(device), attention_mask=mask.to(device),
                        position_ids=positions.to(device), **kw)
                if not captured:
                    raise UserError(f"prompt gate: decoder layer {layer} did not run in the model's forward")
                rows.append(captured[0])
    finally:
        handle.remove()
    feats = torch.cat(rows)
    out = torch.empty_like(feats)
    out[torch.tensor(order)] = feats
    return out


def fit_prompt_gate(model: Any, tokenizer: Any, harmful: Sequence[str], benign: Sequence[str],
                    config: PromptGateConfig | None = None, *, system: str | None = None,
                    source: str | None = None, features: torch.Tensor | None = None) -> PromptGate:
    """Fit the gate on harmful (adapter answers) against benign (the model answers) prompts, with
    balanced class weights so neither side's size decides the threshold. `features`: the prompts'
    `prompt_features` at the config's layer, harmful first, when the caller has them already."""
    from sklearn.linear_model import LogisticRegression

    cfg = config or PromptGateConfig()
    if not harmful or not benign:
        raise UserError("a prompt gate needs both harmful and benign prompts to fit on")
    x = features if features is not None else prompt_features(model, tokenizer, [*harmful, *benign], cfg.layer,
                                                              system=system, batch_size=cfg.batch_size)
    if len(x) != len(harmful) + len(benign):
        raise UserError(f"prompt gate: {len(x)} feature rows for {len(harmful) + len(benign)} prompts")
    y = [1] * len(harmful) + [0] * len(benign)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=cfg.c, max_iter=5000, class_weight="balanced", random_state=cfg.seed)
    clf.fit(((x - mean) / scale).double().numpy(), y)
    data = json.dumps([list(harmful), list(benign)], ensure_ascii=False)
    gate = PromptGate(layer=cfg.layer, weight=torch.tensor(clf.coef_[0], dtype=torch.float32),
                      bias=float(torch.tensor(clf.intercept_[0], dtype=torch.float32)), mean=mean, scale=scale, threshold=cfg.threshold,
                      meta={"c": cfg.c, "seed": cfg.seed, "system": system, "source": source,
                            "train_data": {"harmful": len(harmful), "benign": len(benign),
                                           "sha256": hashlib.sha256(data.encode("utf-8")).hexdigest()}})
    fired = gate.probabilities(x) >= gate.threshold
    gate.meta["train_accuracy"] = round(float((fired == torch.tensor(y, dtype=torch.bool)).float().mean()), 4)
    return gate


# ---------------------------------------------------------------- training runs with a gate

@dataclass
class GateSettings:
    """A recipe's `gate:` section. Fitted after training on the untrained model's states (the
    adapter switched off), on the prompts of `harmful` against those of `benign` (the training
    split of each source)."""

    enabled: bool = False
    layer: int = 20
    c: float = 0.1
    threshold: float = 0.5
    harmful: list[str] = field(default_factory=lambda: ["builtin-harmful"])
    benign: list[str] = field(default_factory=lambda: ["builtin-seemingly-toxic", "builtin-benign"])


def check_gate_settings(settings: GateSettings, model: Any = None) -> None:
    """Bad gate settings fail before training, not after it."""
    if not settings.enabled:
        return
    if settings.c <= 0:
        raise UserError(f"gate.c must be > 0, got {settings.c}")
    if not 0 < settings.threshold < 1:
        raise UserError(f"gate.threshold must be in (0, 1), got {settings.threshold}")
    if not settings.harmful or not settings.benign:
        raise UserError("gate.harmful and gate.benign each need at least one prompt source")
    from tactful.data.registry import get_benchmark

    for field_name, sources in (("gate.harmful", settings.harmful), ("gate.benign", settings.benign)):
        for src in sources:  # a typo fails now, not after training
            path = Path(src).expanduser()
            if path.is_file():
                continue
            if "/" in src or path.suffix:
                raise UserError(f"{field_name}: {src} does not exist")
            try:
                get_benchmark(src)
            except UserError as e:
                raise UserError(f"{field_name}: {e}") from None
    n_layers = None
    if model is not None:
        from tactful.architectures import decoder_layers

        n_layers = len(decoder_layers(model)[1])
    if settings.layer < 1 or (n_layers is not None and settings.layer > n_layers):
        raise UserError(f"gate.layer must be in 1..{n_layers or 'the number of decoder layers'}, got {settings.layer}")


def weight_sharing_twin(model: Any) -> Any:
    """A second module tree over the same weight tensors (no copy of the weights).

    The gate's feature pass puts a forward hook on one decoder layer; a server that decodes with
    the same model on another thread would run into that hook. The twin has its own modules (and
    hooks) but shares every parameter and buffer, so it costs no weight memory."""
    import copy

    memo: dict[int, Any] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    twin = copy.deepcopy(model, memo)
    twin.eval()
    return twin


def source_prompts(sources: Sequence[str], split: str | None) -> list[str]:
    """The prompts of record sources (registry names or files), in order: a prompt record's,
    example's or pair's `prompt`, a multiple-choice item's `question` (so a gate can learn that
    quiz-style questions are benign too)."""
    from tactful.data.records import MCItem
    from tactful.data.registry import load_records

    return [r.question if isinstance(r, MCItem) else r.prompt for src in sources for r in load_records(src, split=split)]


def fit_run_gate(model: Any, tokenizer: Any, settings: GateSettings, split: str, out_dir: str | Path, *,
                 system: str | None = None, log: Any = print) -> PromptGate:
    """Fit the gate of a trained LoRA run on its base model's states and save it to `out_dir`."""
    harmful, benign = source_prompts(settings.harmful, split), source_prompts(settings.benign, split)
    if not hasattr(model, "disable_adapter"):
        raise UserError("a prompt gate routes between the model and its LoRA adapter: set lora.enabled: true")
    cfg = PromptGateConfig(layer=settings.layer, c=settings.c, threshold=settings.threshold)
    with model.disable_adapter():
        gate = fit_prompt_gate(model, tokenizer, harmful, benign, cfg, system=system,
                               source=f"harmful {settings.harmful} vs benign {settings.benign}, split {split}")
    gate.save(out_dir)
    log(f"prompt gate: layer {gate.layer}, fitted on {len(harmful)} harmful / {len(benign)} benign prompts "
        f"(train accuracy {100 * gate.meta['train_accuracy']:.1f}%)")
    return gate


def run_gate(run_dir: str | Path) -> PromptGate | None:
    """The prompt gate a training run saved, or None."""
    from tactful.runs import read_manifest

    sub = read_manifest(run_dir).get("gate")
    return PromptGate.load(Path(run_dir) / sub) if sub else None


def load_base_of_run(run_dir: str | Path, **kw: Any) -> tuple[Any, Any]:
    """The model a gated run routes non-gated prompts to: its base model, without the adapter."""
    from tactful.models import load_model
    from tactful.runs import read_manifest

    base = read_manifest(run_dir).get("base_model")
    if not base:
        raise UserError(f"{run_dir}/manifest.json names no base_model")
    return load_model(base, **kw)


def gated_if_run_has_gate(run_dir: str | Path, adapted: Any, *, name: str, **load_kw: Any) -> Any:
    """`adapted` (an HFGenerator over the run's model) behind the run's prompt gate, or `adapted`
    itself when the run has none; load_kw (dtype, device) load the base model the gate routes to."""
    from tactful.eval.generation import HFGenerator

    gate = run_gate(run_dir)
    if gate is None:
        return adapted
    base, _ = load_base_of_run(run_dir, **load_kw)
    return GatedGenerator(gate, adapted, HFGenerator(base, adapted.tokenizer), name=f"{name} (prompt-gated)")


class GatedGenerator:
    """Generation through a prompt gate: each prompt goes to `adapted` where the gate fires and to
    `base` elsewhere (both HFGenerators over the same tokenizer). `route(prompts)` tells, ahead of
    generating, where each prompt goes, so a caller can batch prompts of one route together."""

    def __init__(self, gate: PromptGate, adapted: Any, base: Any, *, name: str = "gated",
                 base_replies: dict[tuple[str, str], str] | None = None):
        """base_replies: the base model's replies already generated, by (prompt, settings_key(config));
        base-routed prompts found there are not generated again (greedy replies depend only on the
        model, the prompt and the settings)."""
        self.gate, self.adapted, self.base, self.name = gate, adapted, base, name
        self.base_replies = base_replies or {}
        self.reused = 0
        self._routes: dict[tuple[str, str | None], bool] = {}

    def __repr__(self) -> str:
        return f"GatedGenerator(name={self.name!r})"

    def route(self, prompts: Sequence[str], system: str | None = None) -> list[bool]:
        """True where the adapter answers (decided once per prompt and system prompt, then remembered)."""
        todo = sorted({p for p in prompts if (p, system) not in self._routes})
        if todo:
            decided = self.gate.decide(self.base.model, self.base.tokenizer, todo, system=system)
            self._routes.update({(p, system): d for p, d in zip(todo, decided)})
        return [self._routes[(p, system)] for p in prompts]

    def generate(self, prompts: list[str], config: Any, *, progress: Any = None) -> list[str]:
        routes = self.route(prompts, config.system)
        out: list[str] = [""] * len(prompts)
        key = settings_key(config)
        for gen, want in ((self.adapted, True), (self.base, False)):
            idx = [i for i, r in enumerate(routes) if r is want]
            if not want and self.base_replies:
                known = [i for i in idx if (prompts[i], key) in self.base_replies]
                for i in known:
                    out[i] = self.base_replies[(prompts[i], key)]
                if known and progress:
                    progress(len(known))
                self.reused += len(known)
                idx = [i for i in idx if (prompts[i], key) not in self.base_replies]
            if idx:
                for i, text in zip(idx, gen.generate([prompts[i] for i in idx], config, progress=progress)):
                    out[i] = text
        return out


def settings_key(config: Any) -> str:
    """The generation settings a greedy reply depends on (not the batch size), as a string key."""
    from dataclasses import asdict

    d = asdict(config) if not isinstance(config, dict) else dict(config)
    d.pop("batch_size", None)
    return json.dumps(d, sort_keys=True)


def read_base_replies(eval_dir: str | Path, base_model: str) -> dict[tuple[str, str], str]:
    """The replies an earlier evaluation of `base_model` generated, by (prompt, settings_key), for
    GatedGenerator(base_replies=...). Suites generated by another model or backend are skipped."""
    out: dict[tuple[str, str], str] = {}
    root = Path(eval_dir)
    if not root.is_dir():
        raise UserError(f"base evaluation {root}: no such folder")
    for settings_path in sorted(root.glob("*/settings.json")):
        try:
            settings = json.loads(settings_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{settings_path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if settings.get("model") != base_model or settings.get("backend", "hf") != "hf" or "generation" not in settings:
            continue
        key = settings_key(settings["generation"])
        gen_path = settings_path.with_name("generations.jsonl")
        from tactful.io import read_jsonl_tolerant

        for row in read_jsonl_tolerant(gen_path) if gen_path.is_file() else []:
            if isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
                out[(row["prompt"], key)] = row["response"]
    return out
