"""Continuous batching: one running batch that requests join and leave between decode steps.

The batch keeps one transformers KV cache (`DynamicCache`) for all its rows. Rows are
left-padded to a common width: a row's real tokens sit at the right end of its cache
row, and an attention mask marks which columns are real. Every row carries its own
position counter, so a padded row sees the same positions (and RoPE phases) as it would
alone, and its greedy reply is the one it would get alone.

- join: new requests are prefilled together (left-padded, one forward), their first
  token is picked, and their cache is merged into the running one by left-padding
  whichever is shorter and concatenating along the batch dimension;
- step: one forward over every row's last token, one new token per row;
- leave: rows that finished (stop token, `max_tokens`, a stop string) or were cancelled
  are dropped from the cache, and cache columns that no remaining row uses are cut off,
  so a long request that left does not keep its width in everyone's attention.

This works for models whose cache is full-attention `DynamicLayer`s and whose forward
pass treats each row on its own; `continuous_batching_blocker` says when it does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F

from tactful.eval.generation import GenerationConfig, _model_device, _next_tokens, _row_seed
from tactful.serve.validation import ChatRequest
from tactful.kv_cache import cache_kwarg, returned_cache as output_cache


def continuous_batching_blocker(generator: Any) -> str | None:
    """Why this generator's model cannot have rows join a running batch; None when it can."""
    model = getattr(generator, "model", None)
    if not isinstance(model, torch.nn.Module):
        return "the generator is not a transformers model"
    base = _base_model(model)
    moe = getattr(base, "safemoe", None)
    if moe is not None and getattr(moe.settings, "granularity", "token") != "token":
        # Static routing mixes the experts by the mean of the whole prompt's hidden states,
        # kept as running sums on the cache object: a row prefilled on its own and merged
        # into another cache would lose them.
        return "SafeMoE with per-sequence routing: its routing state lives on the whole KV cache"
    try:
        cache = _new_cache(model)
    except Exception as e:  # an older transformers, or a config DynamicCache cannot read
        return f"cannot build a DynamicCache for this model ({type(e).__name__}: {e})"
    if not _mergeable(cache):
        kinds = sorted({type(layer).__name__ for layer in cache.layers})
        return f"its KV cache has {', '.join(kinds)} layers; only full-attention DynamicLayer rows can be merged"
    return None


def _base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (whose own forward takes **kwargs only)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _mergeable(cache: Any) -> bool:
    # Exactly DynamicLayer: sliding-window and indexed subclasses keep extra state
    # (cumulative lengths, windows) that per-row padding would corrupt.
    from transformers.cache_utils import DynamicLayer

    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


@dataclass(eq=False)
class Row:
    """One request in the running batch. `job` is the caller's handle, returned untouched."""

    prompt_ids: list[int]
    request: ChatRequest
    seed: int
    job: Any = None
    ids: list[int] = field(default_factory=list)  # generated so far
    sampler: Any = None  # torch.Generator of a sampled row; None for greedy

    @cached_property
    def config(self) -> GenerationConfig:
        """The sampling settings of a sampled row, in the form `_next_tokens` takes."""
        r = self.request
        return GenerationConfig(do_sample=True, temperature=r.temperature, top_p=r.top_p)


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros prepended along `dim` (counted from the end) up to `width`."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(t, pad)


class RunningBatch:
    """The rows being generated together, with their shared KV cache. Not thread-safe:
    the worker thread alone drives it."""

    def __init__(self, generator: Any):
        self.generator = generator
        self.model = generator.model
        self.device = _model_device(self.model)
        self._cache_kw = cache_kwarg(self.model)
        self._stop = torch.tensor(sorted(generator.stop_ids), dtype=torch.long, device=self.device)
        self.rows: list[Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [B, W]: 1 where a cache column is a real token of that row
        self._positions: torch.Tensor | None = None  # [B, 1]: position of each row's next input token
        self._tokens: torch.Tensor | None = None  # [B]: each row's last picked token, the next step's input

    def __len__(self) -> int:
        return len(self.rows)

    # ---------------------------------------------------------------- public steps
    def join(self, rows: list[Row]) -> list[Row]:
        """Prefill `rows` and pick their first token; those not finished by it join the batch.
        Returns the finished ones."""
        for row in rows:
            if not row.request.greedy:
                row.sampler = torch.Generator(device=self.device)
                # the same per-request seed derivation as the batch-at-a-time path
                row.sampler.manual_seed(_row_seed(0, row.seed))
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.generator.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[j, width - len(r.prompt_ids):] = 1
        # positions count real tokens only, as they would for the row alone
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        with torch.inference_mode():
            out = self._forward(ids, mask, positions, _new_cache(self.model))
        tokens = self._pick(out.logits[:, -1, :], rows)
        part = (output_cache(out), mask, positions[:, -1:] + 1, tokens)
        finished = self._record(rows, tokens)
        keep = [j for j, r in enumerate(rows) if r not in finished]
        if keep:
            self._merge([rows[j] for j in keep], *self._select(part, keep, len(rows)))
        return finished

    def step(self) -> list[Row]:
        """One decode step over every row; finished rows leave the batch and are returned."""
        mask = torch.cat([self._mask, self._mask.new_ones((len(self.rows), 1))], dim=1)
        with torch.inference_mode():
            out = self._forward(self._tokens[:, None], mask, self._positions, self._cache)
        self._cache, self._mask = output_cache(out), mask
        self._positions = self._positions + 1
        self._tokens = self._pick(out.logits[:, -1, :], self.rows)
        finished = self._record(self.rows, self._tokens)
        self.remove(finished)
        return finished

    def remove(self, rows: list[Row]) -> None:
        """Drop rows (finished or cancelled) from the batch and its cache."""
        gone = {id(r) for r in rows}
        keep = [j for j, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
            return
        self._cache, self._mask, self._positions, self._tokens = self._select(
            (self._cache, self._mask, self._positions, self._tokens), keep, len(self.rows))
        self.rows = [self.rows[j] for j in keep]
        self._trim()

    def clear(self) -> None:
        self.rows, self._cache, self._mask, self._positions, self._tokens = [], None, None, None, None

    # ---------------------------------------------------------------- internals
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> Any:
        # generator._forward asks for the last position's logits only when the model allows it
        return self.generator._forward(input_ids=ids, attention_mask=mask, position_ids=positions,
                                       use_cache=True, **{self._cache_kw: cache})

    def _pick(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        """Each row's next token: greedy argmax, or a sample from its own settings and generator."""
        tokens = logits.argmax(dim=-1)
        for j, row in enumerate(rows):
            if row.sampler is not None:
                tokens[j] = _next_tokens(logits[j:j + 1], row.config, [row.sampler])[0]
        return tokens

    def _record(self, rows: list[Row], tokens: torch.Tensor) -> list[Row]:
        """Append each row's new token; the rows that are done with it."""
        stopped = torch.isin(tokens, self._stop).tolist()
        finished = []
        for row, token, stop in zip(rows, tokens.tolist(), stopped):
            row.ids.append(token)
            if stop or len(row.ids) >= row.request.max_tokens or self._hit_stop_string(row):
                finished.append(row)
        return finished

    def _hit_stop_string(self, row: Row) -> bool:
        # Checked every step so that the row frees its place as soon as a stop string
        # appears; the worker cuts the text at it afterwards, as before.
        stops = row.request.stop
        return bool(stops) and any(s in self.generator.decode(row.ids) for s in stops)

    def _select(self, part: tuple, keep: list[int], n: int) -> tuple:
        """The rows `keep` of (cache, mask, positions, tokens)."""
        cache, mask, positions, tokens = part
        if len(keep) == n:
            return part
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        cache.batch_select_indices(index)
        return cache, mask[index], positions[index], tokens[index]

    def _merge(self, rows: list[Row], cache: Any, mask: torch.Tensor, positions: torch.Tensor,
               tokens: torch.Tensor) -> None:
        """Add prefilled rows to the batch: left-pad the narrower cache, concatenate rows."""
        if not self.rows:
            self.rows, self._cache, self._mask, self._positions, self._tokens = rows, cache, mask, positions, tokens
            return
        width = max(self._mask.shape[1], mask.shape[1])

        def both(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
            return torch.cat([_pad_left(a, width, dim), _pad_left(b, width, dim)])

        # Everything is built before anything is assigned, so that a failure (out of
        # memory) leaves the running batch as it was.
        layers = [(both(mine.keys, theirs.keys, -2), both(mine.values, theirs.values, -2))
                  for mine, theirs in zip(self._cache.layers, cache.layers)]
        merged_mask = both(self._mask, mask, -1)
        merged_positions = torch.cat([self._positions, positions])
        merged_tokens = torch.cat([self._tokens, tokens])
        for layer, (keys, values) in zip(self._cache.layers, layers):
            layer.keys, layer.values = keys, values
        self._mask, self._positions, self._tokens = merged_mask, merged_positions, merged_tokens
        self.rows = self.rows + rows

    def _trim(self) -> None:
        """Cut the leading cache columns that every remaining row has as padding."""
        used = self._mask.any(dim=0)
        first = int(used.to(torch.long).argmax())  # the first column some row uses
        if first == 0:
            return
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
        self._mask = self._mask[:, first:]
