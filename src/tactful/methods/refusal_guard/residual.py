"""Residual-stream coverage: protect refusal directions at every trained layer, in every module
that reads from or writes to the residual stream.

Why the attention-side guard is not enough
------------------------------------------
`guard.py` protects the SAE's space z (the o_proj input) at a few layers: o_proj and v_proj
there. LoRA also trains q/k, the MLPs and every other layer, and refusal lost by fine-tuning
comes through those (experiments/refusal_guard/README.md, "Follow-up: where is refusal lost?").
Every trained module of a pre-norm decoder layer touches the residual stream h in one of two ways:

    writers  o_proj, down_proj       h <- h + W y          (y: the attention / MLP hidden values)
    readers  q/k/v_proj (attn norm)  W RMSNorm(h) = W (g * h) / rms(h)
             gate/up_proj (MLP norm)

Per trained layer l, U_l [d_model, k] is an orthonormal basis of the refusal directions at the
residual stream the layer sees: the difference-of-means direction (harmful - harmless prompts,
Arditi et al.) at the layer's input h_l and at its output h_{l+1}, so both the stream the
attention reads and the stream the MLP writes into are covered (rank <= 2 per layer; they are
usually close to parallel). A point where the two means coincide contributes nothing: layer 0's
input at a chat-template position is the same token embedding for every prompt.

    writer  delta_W <- P delta_W,  P = I - U U^T
            u^T (W + delta_W) y = u^T W y for every y and every u in span(U): the update writes
            nothing along a protected direction, whatever the module's input.
    reader  delta_W <- delta_W P_g,  P_g = I - V V^T,  V = orthonormal basis of g * U
            For h = h_perp + a u (u in span(U)): delta_W (g * h) = delta_W (g * h_perp), because
            g * u lies in span(V). The update cannot read the protected component: the module's
            response to u is W (g * u) / rms(h), exactly as before fine-tuning. (Gemma's norm
            multiplies by 1 + weight; that is its g.)

LoRA keeps this exactly (A <- A P_g for readers, B <- P B for writers: B A P_g = (B A) P_g,
P B A = P (B A)); full fine-tuning uses guard.py's gradient projection plus post-step parameter
re-projection onto W U = W_0 U (writers also project their bias, which is written at every
position). An o_proj under both coverages carries two constraints, z-side on A (input) and
residual on B (output); with full fine-tuning both targets come from the same W_0, so projecting
one after the other keeps both.

What this cannot cover
----------------------
- The upstream computation that decides *whether* a direction is written. The constraint fixes
  u^T W y for a given y, but y (the attention pattern, the MLP activations) is computed from all
  of h, whose other components the update is free to change. A model can lose refusal by no
  longer recognising a harmful request, without any update touching u. Only behaviour (the
  evaluation) measures that.
- The norm's scalar: rms(h) depends on |h|, so a reader still sees how large the u component is
  through the normalisation, just not its direction.
- Directions other than the protected ones (rank 1-2 per layer from a difference of means), and
  parameters outside the decoder layers' linear maps: with full fine-tuning the embeddings, the
  norm gains (which change g, hence what a reader reads along u) and the head stay free. The
  coverage report (coverage.py) lists them; `guard.train_only_guarded` freezes them.
- Architectures that normalise a block's output before adding it to the residual stream
  (Gemma 2/3: post-attention and post-feed-forward norms), where a writer's effect along u is
  rescaled per token and no linear constraint on delta_W fixes it; fused q/k/v in GPT-2 style
  Conv1D models. Those are refused with one error rather than guarded approximately.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from tactful import architectures
from tactful.data.records import Example, PromptRecord
from tactful.errors import UserError
from tactful.methods.refusal_guard.capture import (
    _StopForward,
    position_mask,
    post_instruction_length,
    tokenize_texts,
)

# Where the residual-stream guard is exact: pre-norm blocks that add their outputs to h unchanged.
# The norm feeding each reader, relative to the decoder layer, and the offset of its gain.
_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
SUPPORTED_MODEL_TYPES = {"llama": 0.0, "mistral": 0.0, "qwen2": 0.0, "qwen3": 0.0, "phi3": 0.0, "gemma": 1.0}
READERS = {"attn_q": "attn_norm", "attn_k": "attn_norm", "attn_v": "attn_norm",
           "mlp_gate": "mlp_norm", "mlp_up": "mlp_norm"}
WRITERS = ("attn_out", "mlp_down")


def require_supported(model: Any) -> str:
    """The model_type, or one UserError saying why residual coverage cannot be exact for it."""
    model_type = architectures.architecture(model).model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"guard.coverage=residual supports model types {', '.join(sorted(SUPPORTED_MODEL_TYPES))}, "
                        f"not {model_type!r}: it needs pre-norm blocks that add their outputs to the residual stream "
                        "unnormalised (Gemma 2/3 normalise them first) and separate linear maps; use "
                        "guard.coverage=attention there")
    return model_type


# ---------------------------------------------------------------- directions


class _capture_residuals:
    """Forward hooks storing the residual stream at points 0..n: point i < n is decoder layer i's
    input, point n the last layer's output (before the final norm). The forward stops after the
    deepest point needed."""

    def __init__(self, model: Any, points: Sequence[int]):
        _, self.blocks = architectures.decoder_layers(model)
        self.points = sorted(set(points))
        self.store: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "_capture_residuals":
        n, deepest = len(self.blocks), max(self.points)
        for p in self.points:
            if p < n:
                def pre(_mod: Any, args: tuple, kwargs: dict, *, point: int = p) -> None:
                    h = args[0] if args else kwargs["hidden_states"]
                    self.store[point] = h.detach()
                    if point == deepest:
                        raise _StopForward
                self._handles.append(self.blocks[p].register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(_mod: Any, _args: tuple, out: Any) -> None:
                    self.store[n] = (out[0] if isinstance(out, tuple) else out).detach()
                    raise _StopForward
                self._handles.append(self.blocks[n - 1].register_forward_hook(post))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@torch.no_grad()
def mean_residuals(model: Any, tokenizer: Any, texts: Sequence[str], points: Sequence[int], *, positions: str,
                   n_post: int | None = None, batch_size: int = 8, max_length: int = 256) -> dict[int, torch.Tensor]:
    """Mean residual stream [d_model] per point over the chosen token positions of all texts."""
    device = next(model.parameters()).device
    sums: dict[int, torch.Tensor] = {}
    count = 0
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(texts), batch_size):
            batch = tokenize_texts(tokenizer, texts[i:i + batch_size], max_length=max_length, device=device)
            with _capture_residuals(model, points) as cap:
                try:
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                except _StopForward:
                    pass
            keep = position_mask(batch["attention_mask"], positions, n_post)
            for p, h in cap.store.items():
                sums[p] = sums.get(p, 0) + h[keep].double().sum(0).cpu()
            count += int(keep.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise UserError("no tokens captured for the residual refusal directions")
    return {p: (s / count).float() for p, s in sums.items()}


def residual_refusal_directions(
    model: Any,
    tokenizer: Any,
    layers: Sequence[int],
    *,
    harmful: Sequence[PromptRecord | Example | str],
    harmless: Sequence[PromptRecord | Example | str],
    n_prompts: int | None = 128,
    seed: int = 0,
    positions: str = "last",
    system: str | None = None,
    batch_size: int = 8,
    max_length: int = 256,
) -> dict[int, torch.Tensor]:
    """Unit difference-of-means refusal direction at each residual point layer l and l+1 of
    `layers` ({point: [d_model]}; point l is layer l's input). The same prompt subsamples as
    features.refusal_directions, so the two guards see the same data."""
    from tactful.methods.refusal_guard.features import prompt_texts, subsample

    points = sorted({p for layer in layers for p in (layer, layer + 1)})
    n_post = post_instruction_length(tokenizer, system=system) if positions == "post_instruction" else None
    kw = dict(positions=positions, n_post=n_post, batch_size=batch_size, max_length=max_length)
    mh = mean_residuals(model, tokenizer, prompt_texts(tokenizer, subsample(harmful, n_prompts, seed), system=system),
                        points, **kw)
    mb = mean_residuals(model, tokenizer, prompt_texts(tokenizer, subsample(harmless, n_prompts, seed + 1),
                                                       system=system), points, **kw)
    out = {}
    for p in points:
        r = mh[p] - mb[p]
        out[p] = r / r.norm().clamp_min(1e-12)
    return out


def residual_bases(directions: Mapping[int, torch.Tensor], layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per layer l, the orthonormal basis U_l [d_model, <=2] of the directions at points l and l+1."""
    from tactful.methods.refusal_guard.guard import orthonormal_basis

    return {layer: orthonormal_basis(torch.stack([directions[layer], directions[layer + 1]], dim=1))
            for layer in layers}


def reader_basis(U: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of g * U: the directions in a reader's input through which it sees span(U)."""
    from tactful.methods.refusal_guard.guard import orthonormal_basis

    return orthonormal_basis(gain.float().cpu()[:, None] * U)


def norm_gain(model: Any, layer: int, norm: str) -> torch.Tensor:
    """The elementwise gain g of a reader's RMSNorm (weight, or 1 + weight for Gemma)."""
    model_type = require_supported(model)
    _, blocks = architectures.decoder_layers(model)
    mod = blocks[layer].get_submodule(_NORMS[norm]) if _has(blocks[layer], _NORMS[norm]) else None
    if mod is None or getattr(mod, "weight", None) is None:
        raise UserError(f"layer {layer}: no {_NORMS[norm]} with a weight; the residual guard needs the norm gain "
                        "that feeds each reader")
    return mod.weight.detach().float().cpu() + SUPPORTED_MODEL_TYPES[model_type]


def _has(module: torch.nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


# ---------------------------------------------------------------- constraints


def residual_modules(model: Any, layer: int) -> list[tuple[str, str, torch.nn.Module, str | None]]:
    """(role, name, module, norm piece or None for writers) for one layer; a fused module once."""
    out, seen = [], set()
    for role in (*READERS, *WRITERS):
        arch = architectures.architecture(model)
        if role in arch.pieces and arch.pieces[role] is None:
            continue  # the architecture has no such module
        name, mod = architectures.layer_module(model, layer, role)
        if name in seen:
            continue
        seen.add(name)
        out.append((role, name, mod, READERS.get(role)))
    return out


def is_trained(mod: torch.nn.Module, adapter: str) -> bool:
    """A LoRA target of `adapter`, or a module whose own weight is trainable."""
    lora_a = getattr(mod, "lora_A", None)
    if lora_a is not None and adapter in lora_a:
        return True
    base = getattr(mod, "base_layer", mod)
    return bool(getattr(getattr(base, "weight", None), "requires_grad", False))


def add_residual_constraints(guard: Any, model: Any, bases: Mapping[int, torch.Tensor], *,
                             adapter_name: str = "default") -> None:
    """Append to `guard` (a SubspaceGuard) the residual constraints of every trained reader and
    writer at each layer of `bases`. Modules that are not trained need none and are skipped."""
    require_supported(model)
    for layer, U in sorted(bases.items()):
        if U.shape[1] == 0:
            continue
        for role, name, mod, norm in residual_modules(model, layer):
            if not is_trained(mod, adapter_name):
                continue
            if norm is None:
                guard.add(name, mod, U, side="out", adapter=adapter_name, space="residual")
            else:
                guard.add(name, mod, reader_basis(U, norm_gain(model, layer, norm)), side="in",
                          adapter=adapter_name, space="residual")


def save_residual_bases(bases: Mapping[int, torch.Tensor], path: Any) -> None:
    """U_l per layer (`layer_12.U`) in one safetensors file, written atomically."""
    from safetensors.torch import save

    from tactful.io import atomic_write_bytes

    tensors = {f"layer_{layer}.U": U.float().contiguous() for layer, U in sorted(bases.items())}
    atomic_write_bytes(path, save(tensors, metadata={"format": "tactful-refusal-guard-residual"}))


def load_residual_bases(path: Any) -> dict[int, torch.Tensor]:
    from safetensors.torch import load_file

    return {int(key.split(".", 1)[0].split("_", 1)[1]): t for key, t in load_file(str(path)).items()}
