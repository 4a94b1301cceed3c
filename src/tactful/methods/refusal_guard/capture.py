"""Activation capture at the input of each attention block's output projection.

The paper trains its SAEs on the attention output *before* `o_proj`: the concatenated
per-head outputs z = [z_1, ..., z_H] (n_heads * head_dim values per token; TransformerLens
calls this `hook_z`). A forward pre-hook on `o_proj` sees exactly that tensor, for any
attention implementation (eager, sdpa, flash), so we never re-implement attention.

Capture is a generator: one forward pass per batch of texts yields, per chosen layer,
the activations at the chosen token positions, and nothing is kept after the caller has
consumed a chunk. `write_activation_shards` optionally streams the chunks to a directory of
safetensors shards so several SAE runs can reuse one capture.

Positions:
    all               every non-padding token
    post_instruction  the chat-template tokens after the user message (`<|im_end|>\\n
                      <|im_start|>assistant\\n` for ChatML) -- where Arditi et al. find refusal
    last              the last token of each text
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from tactful import architectures
from tactful.errors import UserError

POSITIONS = ("all", "post_instruction", "last")

class _StopForward(Exception):
    """Raised after the last hooked layer: nothing above it needs computing."""


# ---------------------------------------------------------------- model anatomy

@dataclass
class AttentionSite:
    """Where to hook one decoder layer: its attention module and output projection."""

    layer: int
    attn_name: str  # e.g. "model.layers.3.self_attn"
    out_name: str  # e.g. "model.layers.3.self_attn.o_proj"
    out_proj: torch.nn.Module
    value_name: str | None  # e.g. "model.layers.3.self_attn.v_proj" (None when fused)
    value_proj: torch.nn.Module | None


@dataclass(frozen=True)
class HeadLayout:
    """How the o_proj input splits into heads, and which KV head each query head reads."""

    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def d_in(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        # transformers' repeat_kv expands KV head g into query heads g*n_rep .. (g+1)*n_rep-1
        return head // self.group_size


def decoder_layer_list(model: Any) -> tuple[str, torch.nn.ModuleList]:
    """(name, ModuleList) of the decoder blocks, from the architecture table."""
    return architectures.decoder_layers(model)


def attention_sites(model: Any, layers: Sequence[int] | None = None, *, value: bool = True) -> list[AttentionSite]:
    """The attention output projection (and, with `value`, the value projection) of each requested layer.

    `value=False` (capture, head scoring) leaves the value projection unresolved, so an
    architecture configured with only its output projection can still be captured.

    Names are relative to the underlying transformers model, so they match with or
    without a PEFT wrapper (where o_proj is then a LoRA layer around the base Linear).
    """
    _, blocks = decoder_layer_list(model)
    n = len(blocks)
    wanted = list(range(n)) if layers is None else list(layers)
    bad = [i for i in wanted if not -n <= i < n]
    if bad:
        raise UserError(f"layer index {bad[0]} out of range: the model has {n} layers (0..{n - 1})")
    # A fused qkv module (Phi-3, GPT-2) also writes queries and keys, so the value-side guard
    # cannot constrain it alone: no value site there.
    fused_value = value and architectures.is_fused(model, "attn_v")
    sites = []
    for i in wanted:
        i = i % n
        attn_name, _ = architectures.layer_module(model, i, "attn")
        out_name, out_mod = architectures.layer_module(model, i, "attn_out")
        v_name, v_mod = (architectures.layer_module(model, i, "attn_v") if value and not fused_value
                         else (None, None))
        sites.append(AttentionSite(layer=i, attn_name=attn_name, out_name=out_name, out_proj=out_mod,
                                   value_name=v_name, value_proj=v_mod))
    return sites


def head_layout(model: Any) -> HeadLayout:
    return HeadLayout(n_heads=architectures.num_heads(model), n_kv_heads=architectures.num_kv_heads(model),
                      head_dim=architectures.head_dim(model))


def projection_in_features(mod: torch.nn.Module) -> int:
    mod = getattr(mod, "base_layer", mod)
    if isinstance(mod, torch.nn.Linear):
        return mod.in_features
    return mod.weight.shape[0]  # Conv1D stores [in, out]


# ---------------------------------------------------------------- token positions

_SENTINEL = "\u2063TACTFULQ\u2063"


def post_instruction_length(tokenizer: Any, *, system: str | None = None) -> int:
    """Number of chat-template tokens between the end of the user message and the start of
    the reply (Arditi et al.'s "end of instruction" tokens), found by rendering a sentinel."""
    from tactful.models import format_prompt

    text = format_prompt(tokenizer, _SENTINEL, system=system)
    cut = text.rfind(_SENTINEL)
    if cut < 0:
        raise UserError("the chat template dropped the user message; cannot find post-instruction tokens")
    head = text[: cut + len(_SENTINEL)]
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"]) - len(tokenizer(head, add_special_tokens=False)["input_ids"])
    if n <= 0:
        raise UserError("the chat template adds no tokens after the user message; use positions='last'")
    return n


def position_mask(attention_mask: torch.Tensor, positions: str, n_post: int | None = None) -> torch.Tensor:
    """Boolean [B, T] mask of the positions to capture in a right-padded batch."""
    if positions not in POSITIONS:
        raise UserError(f"unknown positions {positions!r}; choose one of {', '.join(POSITIONS)}")
    mask = attention_mask.bool()
    if positions == "all":
        return mask
    lengths = attention_mask.sum(1)
    idx = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None, :]
    if positions == "last":
        return idx == (lengths - 1)[:, None]
    if n_post is None:
        raise ValueError("positions='post_instruction' needs n_post")
    return mask & (idx >= (lengths - n_post)[:, None])


# ---------------------------------------------------------------- streaming capture

class capture_inputs:
    """Context manager: forward pre-hooks storing the o_proj input of the given sites.

    `stop_after_last=True` ends the forward pass right after the deepest hooked layer's
    projection (the caller catches `_StopForward`), which skips the rest of the network.
    """

    def __init__(self, sites: Sequence[AttentionSite], *, stop_after_last: bool = False):
        self.sites = list(sites)
        self.stop_after_last = stop_after_last
        self.store: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "capture_inputs":
        deepest = max(s.layer for s in self.sites)
        for site in self.sites:
            def hook(_mod: Any, args: tuple, kwargs: dict | None = None, *, layer: int = site.layer) -> None:
                x = args[0] if args else (kwargs or {}).get("input", (kwargs or {}).get("x"))
                self.store[layer] = x.detach()
                if self.stop_after_last and layer == deepest:
                    raise _StopForward

            self._handles.append(site.out_proj.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@torch.no_grad()
def forward_capture(model: Any, batch: dict[str, torch.Tensor], sites: Sequence[AttentionSite]) -> dict[int, torch.Tensor]:
    """o_proj inputs [B, T, d_in] of each site for one batch (the forward is cut after the deepest site)."""
    with capture_inputs(sites, stop_after_last=True) as cap:
        try:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        except _StopForward:
            pass
    return cap.store


def tokenize_texts(tokenizer: Any, texts: Sequence[str], *, max_length: int, device: Any = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded ids and mask; chat-formatted texts carry their own special tokens.

    Truncation keeps the *end* of a text, where the post-instruction and last tokens are.
    """
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][-max_length:] for t in texts]
    ids = [x if x else [tokenizer.pad_token_id] for x in ids]
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(ids), longest), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        attention[i, : len(x)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}


def stream_activations(
    model: Any,
    tokenizer: Any,
    texts: Iterable[str],
    *,
    layers: Sequence[int],
    positions: str = "all",
    batch_size: int = 8,
    max_length: int = 256,
    max_tokens: int | None = None,
    n_post: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[dict[int, torch.Tensor]]:
    """Yield, per batch of texts, {layer: activations [n_positions, d_in]} on the CPU.

    Texts are already chat-formatted (see `format_prompt` / `format_chat`). Stops once
    `max_tokens` positions have been yielded (the last chunk is cut to fit).
    """
    if positions == "post_instruction" and n_post is None:
        n_post = post_instruction_length(tokenizer)
    sites = attention_sites(model, layers, value=False)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for chunk in _batched(texts, batch_size):
            batch = tokenize_texts(tokenizer, chunk, max_length=max_length, device=device)
            store = forward_capture(model, batch, sites)
            keep = position_mask(batch["attention_mask"], positions, n_post)
            out = {s.layer: store[s.layer][keep].to("cpu", dtype) for s in sites}
            n = int(keep.sum())
            if max_tokens is not None and seen + n > max_tokens:
                n = max_tokens - seen
                out = {k: v[:n] for k, v in out.items()}
            seen += n
            if n > 0:
                yield out
            if max_tokens is not None and seen >= max_tokens:
                return
    finally:
        model.train(was_training)


def _batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for x in items:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------- shards on disk

SHARD_INDEX = "activations.json"


def write_activation_shards(stream: Iterable[dict[int, torch.Tensor]], out_dir: str | os.PathLike, *,
                            shard_tokens: int = 65536, meta: dict[str, Any] | None = None) -> Path:
    """Write a capture stream as `layer_XX/shard_NNNNN.safetensors` (key `activations`) plus an
    index, into a temp dir renamed into place at the end (a crash leaves no half capture)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    pending: dict[int, list[torch.Tensor]] = {}
    counts: dict[int, int] = {}
    shards: dict[int, int] = {}

    def flush(layer: int, force: bool = False) -> None:
        buf = pending.get(layer, [])
        while buf and (force or sum(len(t) for t in buf) >= shard_tokens):
            data = torch.cat(buf)
            head, rest = data[:shard_tokens], data[shard_tokens:]
            d = tmp / f"layer_{layer:02d}"
            d.mkdir(exist_ok=True)
            save_file({"activations": head.contiguous()}, str(d / f"shard_{shards.get(layer, 0):05d}.safetensors"))
            shards[layer] = shards.get(layer, 0) + 1
            buf = [rest] if len(rest) else []
            if force and not buf:
                break
        pending[layer] = buf

    try:
        d_in = None
        for chunk in stream:
            for layer, acts in chunk.items():
                pending.setdefault(layer, []).append(acts)
                counts[layer] = counts.get(layer, 0) + len(acts)
                d_in = acts.shape[-1]
                flush(layer)
        for layer in list(pending):
            flush(layer, force=True)
        index = {"layers": sorted(counts), "tokens": {str(k): v for k, v in sorted(counts.items())},
                 "d_in": d_in, **(meta or {})}
        (tmp / SHARD_INDEX).write_text(json.dumps(index, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_activation_shards(shard_dir: str | os.PathLike, layer: int) -> Iterator[torch.Tensor]:
    """Yield a layer's shards one at a time (only one shard is in memory)."""
    from safetensors.torch import load_file

    d = Path(shard_dir) / f"layer_{layer:02d}"
    files = sorted(d.glob("shard_*.safetensors"))
    if not files:
        raise UserError(f"{shard_dir}: no activation shards for layer {layer}")
    for f in files:
        yield load_file(str(f))["activations"]


def shard_layers(shard_dir: str | os.PathLike) -> list[int]:
    path = Path(shard_dir) / SHARD_INDEX
    if not path.is_file():
        raise UserError(f"{shard_dir} is not an activation capture directory (no {SHARD_INDEX})")
    return list(json.loads(path.read_text())["layers"])
