"""The one place that knows where things live inside a model, per `model_type`.

Several methods reach into a model by name: the refusal guard hooks the attention output
projection's input, ShaPO edits the MLP down-projection's columns, DCR cuts the forward at
decoder layer l and freezes the layers above it, SafeMoE gates every decoder layer, and
LoRA needs target module names. A wrong guess (hooking a module of the same name in the
MLP, or a fused projection treated as a plain one) trains something other than the method
describes without any error, so nothing here is guessed: every model_type has a table row,
and an unknown one fails with a single line naming the missing piece and the config field
that supplies it.

Pieces (paths are relative to the decoder layer unless noted):
    layers       the ModuleList of decoder layers, relative to the *CausalLM model
    attn         the attention block                    attn_out   its output projection
    attn_q/k/v   query / key / value projections (the same module where they are fused)
    mlp          the MLP block                          mlp_down   its down projection
    mlp_gate/up  gate / up projections (the same module where they are fused)
    hidden_size, num_heads, num_kv_heads, head_dim, num_layers: names of config fields

A model's own config.json may add or override pieces with a `tactful_architecture` mapping,
e.g. `"tactful_architecture": {"layers": "backbone.blocks", "attn_out": "attention.wo"}` --
the way to run a model_type this table does not know.

Methods name LoRA targets by role (`attn_q`, ..., `mlp_down`, see `LORA_ROLES`); a target
that is not a role is taken as a module name and passed through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tactful.errors import UserError

CONFIG_FIELD = "tactful_architecture"

# What each piece is, for error messages.
PIECES: dict[str, str] = {
    "layers": "decoder layer list",
    "attn": "attention block",
    "attn_q": "attention query projection",
    "attn_k": "attention key projection",
    "attn_v": "attention value projection",
    "attn_out": "attention output projection",
    "mlp": "MLP block",
    "mlp_gate": "MLP gate projection",
    "mlp_up": "MLP up projection",
    "mlp_down": "MLP down projection",
    "hidden_size": "hidden size config field",
    "num_heads": "number-of-heads config field",
    "num_kv_heads": "number-of-KV-heads config field",
    "head_dim": "head dimension config field",
    "num_layers": "number-of-layers config field",
}

# The roles a LoRA target list may name; the default adapts every linear of the block.
LORA_ROLES = ("attn_q", "attn_k", "attn_v", "attn_out", "mlp_gate", "mlp_up", "mlp_down")
DEFAULT_LORA_ROLES = list(LORA_ROLES)


@dataclass(frozen=True)
class Architecture:
    """Where the pieces of one model_type live; None where the table does not say."""

    model_type: str
    pieces: dict[str, str | None] = field(default_factory=dict)

    def get(self, piece: str) -> str | None:
        return self.pieces.get(piece)

    def require(self, piece: str) -> str:
        value = self.pieces.get(piece)
        if not value:
            raise missing(self.model_type, piece)
        return value


def missing(model_type: str, piece: str, detail: str = "") -> UserError:
    known = ", ".join(sorted(TABLE))
    why = (f"model_type {model_type!r} is not in tactful's architecture table (known: {known})"
           if model_type not in TABLE else f"tactful's table for model_type {model_type!r} has no {piece}")
    return UserError(f"cannot locate the {PIECES.get(piece, piece)} ({piece}){detail}: {why}; set it in the model's "
                     f"config.json as \"{CONFIG_FIELD}\": {{\"{piece}\": \"<module path or config field name>\"}}")


# Llama's layout, shared (with additions) by most decoder-only models: Qwen2/3 and Gemma3 add
# q_norm/k_norm, Gemma2/3 add pre/post-feedforward norms and soft-capping, none of which
# changes the names below.
_LLAMA: dict[str, str | None] = {
    "layers": "model.layers",
    "attn": "self_attn",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "mlp": "mlp",
    "mlp_gate": "mlp.gate_proj",
    "mlp_up": "mlp.up_proj",
    "mlp_down": "mlp.down_proj",
    "hidden_size": "hidden_size",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "num_layers": "num_hidden_layers",
}

TABLE: dict[str, dict[str, str | None]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "gemma3_text": _LLAMA,
    # Phi-3 fuses q/k/v into one projection and gate/up into another: there is no separate
    # value projection for the value-side guard, and LoRA on attn_q adapts all three.
    "phi3": {**_LLAMA, "attn_q": "self_attn.qkv_proj", "attn_k": "self_attn.qkv_proj",
             "attn_v": "self_attn.qkv_proj", "mlp_gate": "mlp.gate_up_proj", "mlp_up": "mlp.gate_up_proj"},
    # GPT-2: Conv1D layers, fused c_attn, and `c_proj` in both the attention and the MLP.
    "gpt2": {"layers": "transformer.h", "attn": "attn", "attn_q": "attn.c_attn", "attn_k": "attn.c_attn",
             "attn_v": "attn.c_attn", "attn_out": "attn.c_proj", "mlp": "mlp", "mlp_gate": None,
             "mlp_up": "mlp.c_fc", "mlp_down": "mlp.c_proj", "hidden_size": "n_embd", "num_heads": "n_head",
             "num_kv_heads": "n_head", "head_dim": None, "num_layers": "n_layer"},
}

FUSED = ("attn_q", "attn_k", "attn_v", "mlp_gate", "mlp_up")


# ---------------------------------------------------------------- resolving a model


def unwrap(model: Any) -> Any:
    """The transformers model under PEFT and DDP/DeepSpeed wrappers (module names are relative to it)."""
    while True:
        if callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module) and not hasattr(model, "config"):
            model = model.module
        else:
            return model


def text_config(model: Any) -> Any:
    cfg = unwrap(model).config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def architecture(model: Any) -> Architecture:
    """The table row for the model's model_type, with the config's `tactful_architecture` on top."""
    base = unwrap(model)
    cfg = getattr(base, "config", None)
    if cfg is None:
        raise UserError(f"{type(base).__name__} has no config; tactful needs a transformers model")
    model_type = str(getattr(text_config(base), "model_type", None) or getattr(cfg, "model_type", ""))
    pieces = dict(TABLE.get(model_type, {}))
    extra = getattr(cfg, CONFIG_FIELD, None) or getattr(text_config(base), CONFIG_FIELD, None) or {}
    if not isinstance(extra, dict):
        raise UserError(f"config field {CONFIG_FIELD} must be a mapping of piece -> name, got {type(extra).__name__}")
    unknown = sorted(set(extra) - set(PIECES))
    if unknown:
        raise UserError(f"config field {CONFIG_FIELD}: unknown piece {unknown[0]!r}; pieces: {', '.join(PIECES)}")
    pieces.update(extra)
    return Architecture(model_type=model_type, pieces=pieces)


def decoder_layers(model: Any) -> tuple[str, torch.nn.ModuleList]:
    """(name relative to the transformers model, ModuleList) of the decoder layers."""
    base = unwrap(model)
    arch = architecture(base)
    path = arch.require("layers")
    try:
        layers = base.get_submodule(path)
    except AttributeError:
        raise missing(arch.model_type, "layers", f" ({type(base).__name__} has no module {path!r})") from None
    if not isinstance(layers, torch.nn.ModuleList):
        raise missing(arch.model_type, "layers", f" ({path!r} is a {type(layers).__name__}, not a ModuleList)")
    return path, layers


def layer_module(model: Any, layer: int, piece: str) -> tuple[str, torch.nn.Module]:
    """(full name relative to the transformers model, module) of a piece of decoder layer `layer`."""
    prefix, layers = decoder_layers(model)
    arch = architecture(model)
    rel = arch.require(piece)
    try:
        mod = layers[layer].get_submodule(rel)
    except AttributeError:
        found = sorted({n.rsplit(".", 1)[-1] for n, m in layers[layer].named_modules() if is_projection(m)})
        raise missing(arch.model_type, piece, f" in layer {layer} of {type(unwrap(model)).__name__}: no module "
                      f"{rel!r}; linear modules found: {', '.join(found) or 'none'}") from None
    return f"{prefix}.{layer % len(layers)}.{rel}", mod


def is_fused(model: Any, piece: str) -> bool:
    """Whether `piece` shares its module with another piece (Phi-3's qkv_proj, gate_up_proj)."""
    arch = architecture(model)
    name = arch.get(piece)
    return name is not None and any(arch.get(p) == name for p in FUSED if p != piece)


def is_projection(mod: torch.nn.Module) -> bool:
    # nn.Linear, GPT-2's Conv1D, or a PEFT LoRA layer wrapping either
    return isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D" or hasattr(mod, "base_layer")


def mlp_down_projections(model: Any) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every decoder layer's MLP down-projection, in layer order."""
    _, layers = decoder_layers(model)
    return [layer_module(model, i, "mlp_down") for i in range(len(layers))]


# ---------------------------------------------------------------- config numbers


def config_int(model: Any, piece: str, default: int | None = None) -> int:
    """An integer the table names a config field for (hidden_size, num_heads, ...)."""
    arch = architecture(model)
    cfg = text_config(model)
    name = arch.get(piece)
    value = getattr(cfg, name, None) if name else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if default is not None:
        return default
    detail = f" (config has no integer field {name!r})" if name else ""
    raise missing(arch.model_type, piece, detail)


def hidden_size(model: Any) -> int:
    return config_int(model, "hidden_size")


def num_heads(model: Any) -> int:
    return config_int(model, "num_heads")


def num_kv_heads(model: Any) -> int:
    # no field (or null) means plain multi-head attention: one KV head per query head
    return config_int(model, "num_kv_heads", default=num_heads(model))


def head_dim(model: Any) -> int:
    # Gemma and Qwen3 set head_dim independently of hidden_size / num_heads, so the field wins
    return config_int(model, "head_dim", default=hidden_size(model) // num_heads(model))


def num_layers(model: Any) -> int:
    return config_int(model, "num_layers")


# ---------------------------------------------------------------- LoRA targets


def lora_target_modules(model: Any, targets: list[str]) -> list[str]:
    """PEFT target_modules for a list of roles and/or module names: a role becomes the module's
    name (its leaf name where that is unambiguous in a decoder layer, else attn/mlp-qualified);
    fused modules appear once."""
    out: list[str] = []
    layer0 = None
    for t in targets:
        if t not in LORA_ROLES:
            name = t
        else:
            arch = architecture(model)
            if t in arch.pieces and arch.pieces[t] is None:
                continue  # the table says the architecture has no such module (GPT-2's MLP has no gate)
            rel = arch.require(t)
            if layer0 is None:
                layer0 = decoder_layers(model)[1][0]
            leaf = rel.rsplit(".", 1)[-1]
            same_leaf = [n for n, _ in layer0.named_modules() if n.rsplit(".", 1)[-1] == leaf]
            name = leaf if len(same_leaf) <= 1 else rel
        if name not in out:
            out.append(name)
    return out


def matches_target(module_name: str, targets: list[str]) -> bool:
    """PEFT's rule for a target_modules list: the full name, or a suffix at a dot boundary."""
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def attn_out_leaf_names() -> set[str]:
    """Leaf names the attention output projection has in the known architectures (to recognise
    an SAE file's hook module when no model is at hand)."""
    return {row["attn_out"].rsplit(".", 1)[-1] for row in TABLE.values() if row.get("attn_out")}
