"""Generation backends behind one interface: Hugging Face (CPU/GPU), vLLM, OpenAI-compatible HTTP.

Every part of tactful that needs model replies (evaluation suites, judges, data
building) asks a `Generator` for them:

    gen = make_generator("hf", model_spec="embedded")
    replies = gen.generate(["How do rainbows form?"], GenerationConfig(max_new_tokens=64))

Prompts are user messages; each backend applies the chat template itself and
returns the assistant replies in input order.

`HFGenerator` is the default and the one that must be fast on a laptop CPU. It
sorts prompts by token length, runs them in left-padded batches through a
hand-written decode loop over a KV cache (the prompt prefix shared by a batch's rows
prefilled once, one forward per step, logits only for the last position, finished
rows dropped from the batch), and stops each row at the tokenizer's EOS or the chat
template's end-of-turn token. See benchmarks/README.md for how it compares with a
one-prompt-at-a-time `model.generate` loop (about 8x faster on 2 CPU cores).
"""

from __future__ import annotations

import contextlib
import math
import os
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from tactful.errors import UserError
from tactful.kv_cache import returned_cache, with_cache

BACKENDS = ("hf", "vllm", "openai")

# End-of-turn markers of common chat templates. A reply ends at the first of these
# (or the tokenizer's EOS): ChatML (<|im_end|>), Llama 3 (<|eot_id|>, <|eom_id|>),
# Gemma (<end_of_turn>), Phi-3 (<|end|>), GPT-2 style (<|endoftext|>).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")

ProgressFn = Callable[[int], None]


@dataclass
class GenerationConfig:
    """How replies are generated; the same fields mean the same thing for every backend."""

    max_new_tokens: int = 128
    do_sample: bool = False  # greedy unless True
    temperature: float = 1.0  # only used when do_sample; 0 means greedy
    top_p: float = 1.0  # nucleus sampling threshold, only used when do_sample
    seed: int = 0  # sampling seed: the same seed gives the same replies
    batch_size: int = 16  # prompts per forward pass (HF) / per progress chunk (vLLM)
    system: str | None = None  # optional system message

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


@runtime_checkable
class Generator(Protocol):
    name: str  # recorded in reports, e.g. "hf:embedded", "vllm:...", "openai:..."

    def generate(
        self, prompts: list[str], config: GenerationConfig, *, progress: ProgressFn | None = None
    ) -> list[str]:
        """prompts are user messages; the backend applies the chat template; returns the
        assistant replies in input order. progress(k) is called with the number of prompts
        finished since the last call."""
        ...


def stop_token_ids(tokenizer: Any, model: Any = None) -> set[int]:
    """Token ids that end a reply: the tokenizer's EOS, the model's generation-config EOS
    (an int or a list), and any end-of-turn marker of a known chat template that this
    tokenizer really has in its vocabulary."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    # Look tokens up in the vocabulary rather than with convert_tokens_to_ids, which
    # silently maps an unknown token to the unk id.
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return ids


def pad_id_of(tokenizer: Any) -> int:
    """The id that left-pads prompt batches: the pad token, else end-of-sequence, else 0 (the
    attention mask hides it either way)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else 0


def chat_prompts(tokenizer: Any, prompts: Sequence[str], system: str | None = None) -> list[list[int]]:
    """Token ids of each prompt rendered with the chat template, ready for the assistant's reply.

    add_special_tokens=False because the template already writes any BOS it wants;
    tokenising the rendered text with specials on would double it for Llama-style models.
    """
    from tactful.models import format_prompt

    texts = [format_prompt(tokenizer, p, system=system) for p in prompts]
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _check_prompts(prompts: Sequence[str]) -> None:
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise UserError(f"prompt {i} is a {type(p).__name__}, not a string")


# ------------------------------------------------------------------------ Hugging Face


def _row_seed(seed: int, index: int) -> int:
    """A per-prompt sampling seed, so a prompt's sample does not depend on which other
    prompts share its batch or on the batch size."""
    import numpy as np

    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class HFGenerator:
    """Batched generation with a transformers causal LM (plain or PEFT-wrapped) on CPU or GPU.

    Greedy by default. Sampling draws each prompt's tokens from its own torch.Generator,
    seeded from (config.seed, prompt index), so results are reproducible and do not
    depend on batching.
    """

    def __init__(self, model: Any, tokenizer: Any, *, name: str = "hf", share_prefix: bool = True,
                 workers: int | None = None, packed_linear: bool | None = None):
        """share_prefix: prefill the prompt prefix that a batch's rows share (the chat
        template's header and system prompt) once, then copy its KV cache to every row.
        Exact for ordinary models; turn it off for a model whose forward pass depends on
        how the prompt was split into calls (e.g. per-sequence routing over the prompt).

        workers: batches decoded at once, each in its own thread with one intra-op thread
        (None: as many as torch has threads, on CPU, for a model without forward hooks). On a
        few CPU cores the small matrix products of decoding barely speed up with more intra-op
        threads, but independent batches side by side do (benchmarks/bench_generation.py).

        packed_linear: on CPU, multiply by weights that oneDNN packed once for the batch width
        (tactful.packed_linear: ~1.2x per decode step at 32-64 rows). Equal to float32 rounding,
        not bit for bit, so off by default: recorded greedy replies reproduce without it. None:
        on where the environment sets TACTFUL_PACKED_LINEAR=1 (every command that generates)."""
        self.model = model
        self.workers = workers
        if packed_linear is None:
            from tactful.packed_linear import ENV

            packed_linear = os.environ.get(ENV, "") == "1"
        self.packed_linear = packed_linear
        self.tokenizer = tokenizer
        self.name = name
        self.share_prefix = share_prefix
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.pad_id = pad_id_of(tokenizer)
        self._logits_to_keep = True  # switched off for models whose forward does not take it

    def __repr__(self) -> str:
        return f"HFGenerator(name={self.name!r})"

    def generate(
        self, prompts: list[str], config: GenerationConfig, *, progress: ProgressFn | None = None
    ) -> list[str]:
        token_lists = self.generate_ids(prompts, config, progress=progress)
        return [self.decode(ids) for ids in token_lists]

    def _workers(self, n_prompts: int) -> int:
        import torch

        from tactful.models import has_forward_hooks

        if self.workers is not None:
            return max(1, min(self.workers, n_prompts))
        if _model_device(self.model).type != "cpu" or has_forward_hooks(self.model):
            return 1  # a GPU runs one batch best; hooks may keep per-forward state (not thread-safe)
        return max(1, min(torch.get_num_threads(), n_prompts))

    def decode(self, ids: Sequence[int]) -> str:
        """Reply text of generated ids: without the final stop token and special tokens."""
        ids = list(ids)
        if ids and ids[-1] in self.stop_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate_ids(
        self, prompts: list[str], config: GenerationConfig, *, progress: ProgressFn | None = None
    ) -> list[list[int]]:
        """Generated token ids per prompt, in input order. A list ends with its stop token
        if the reply stopped before max_new_tokens; nothing after it, no padding. So
        `sum(map(len, ...))` is the honest count of generated tokens."""
        _check_prompts(prompts)
        encoded = chat_prompts(self.tokenizer, prompts, config.system)
        # Longest first: rows of a batch have similar lengths (little padding), and a
        # batch too large for memory fails at the start, not after an hour.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        results: list[list[int]] = [[] for _ in encoded]
        # Generation mid-training (e.g. an eval callback) must not sample LoRA dropout masks.
        was_training = bool(getattr(self.model, "training", False))
        if was_training:
            self.model.eval()
        workers = self._workers(len(order))
        # With several workers every worker needs a batch: split evenly rather than leave one idle.
        size = min(config.batch_size, -(-len(order) // workers)) if workers > 1 else config.batch_size
        batches = [order[start : start + size] for start in range(0, len(order), size)]

        def run(idx: list[int]) -> None:
            outs = self._generate_batch([encoded[i] for i in idx], idx, config, progress)
            for i, out in zip(idx, outs):
                results[i] = out

        from tactful.packed_linear import packed_linears

        pack = self.packed_linear and _model_device(self.model).type == "cpu"
        try:
            with packed_linears(self.model, rows=size) if pack else contextlib.nullcontext():
                if workers > 1:
                    _run_parallel(run, batches, workers)
                else:
                    for idx in batches:
                        run(idx)
        finally:
            if was_training:
                self.model.train()
        return results

    def _forward(self, **kw: Any) -> Any:
        if self._logits_to_keep:
            try:
                return self.model(logits_to_keep=1, **kw)
            except TypeError as e:  # a custom model without logits_to_keep
                if "logits_to_keep" not in str(e):
                    raise
                self._logits_to_keep = False
        return self.model(**kw)

    def _generate_batch(
        self, rows: list[list[int]], indices: list[int], config: GenerationConfig, progress: ProgressFn | None
    ) -> list[list[int]]:
        import torch

        n = len(rows)
        out: list[list[int]] = [[] for _ in range(n)]
        if config.max_new_tokens == 0:
            if progress:
                progress(n)
            return out
        device = _model_device(self.model)
        # Chat prompts share a long prefix (the template's header and default system
        # prompt: 25 of ~37 tokens for SmolLM). Prefill it once at batch size 1 and copy
        # its KV cache to every row, instead of recomputing it for each row. Keep at
        # least one token per row for the batched prefill, which yields the first logits.
        shared = _common_prefix_len(rows, max_len=min(len(r) for r in rows) - 1)
        if not self.share_prefix or shared < _MIN_SHARED_PREFIX or n == 1:
            shared = 0
        suffixes = [r[shared:] for r in rows]
        width = max(len(r) for r in suffixes)
        # Left padding of the part after the shared prefix: a row is [prefix][pad][suffix],
        # so every row's last prompt token sits in the last column.
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.ones((n, shared + width), dtype=torch.long)
        for j, r in enumerate(suffixes):
            input_ids[j, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[j, shared : shared + width - len(r)] = 0
        # Positions count real tokens only, so a padded row sees the same positions (and
        # RoPE phases) as it would alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        input_ids, mask, positions = input_ids.to(device), mask.to(device), positions.to(device)

        gens = None
        if not config.greedy:
            gens = []
            for i in indices:
                g = torch.Generator(device=device)
                g.manual_seed(_row_seed(config.seed, i))
                gens.append(g)

        stop = torch.tensor(sorted(self.stop_ids), dtype=torch.long, device=device)
        active = list(range(n))  # batch row -> position in `out`
        next_pos = positions[:, -1:] + 1
        with torch.inference_mode():
            cache = None
            if shared:
                prefix = torch.tensor([rows[0][:shared]], dtype=torch.long, device=device)
                cache = returned_cache(self._forward(input_ids=prefix, use_cache=True))
                cache.batch_repeat_interleave(n)
            res = self._forward(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **with_cache(self.model, cache),
            )
            cache = returned_cache(res)
            for step in range(config.max_new_tokens):
                tok = _next_tokens(res.logits[:, -1, :], config, gens)
                done = torch.isin(tok, stop)
                for j, t in enumerate(tok.tolist()):
                    out[active[j]].append(t)
                last_step = step == config.max_new_tokens - 1
                n_done = len(active) if last_step else int(done.sum())
                if n_done and progress:
                    progress(n_done)
                if last_step or n_done == len(active):
                    break
                if n_done:
                    # Drop finished rows: the remaining steps get cheaper instead of
                    # computing tokens that would be thrown away.
                    keep = (~done).nonzero().squeeze(1)
                    cache.batch_select_indices(keep)
                    mask, next_pos, tok = mask[keep], next_pos[keep], tok[keep]
                    active = [active[j] for j in keep.tolist()]
                    if gens is not None:
                        gens = [gens[j] for j in keep.tolist()]
                mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
                res = self._forward(
                    input_ids=tok[:, None],
                    attention_mask=mask,
                    position_ids=next_pos,
                    use_cache=True,
                    **with_cache(self.model, cache),
                )
                next_pos = next_pos + 1
        return out


def _run_parallel(run: Callable[[list[int]], None], batches: list[list[int]], workers: int) -> None:
    """Run batches on `workers` threads, torch at one intra-op thread each (restored after).
    Longest batches go first (they are sorted), so the threads finish close together."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tactful-decode") as pool:
            futures = [pool.submit(run, idx) for idx in batches]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                pool.shutdown(cancel_futures=True)  # don't start batches nobody will read
                raise
    finally:
        torch.set_num_threads(threads)


# Below this many shared tokens the extra batch-1 forward costs more than it saves.
_MIN_SHARED_PREFIX = 4


def _common_prefix_len(rows: Sequence[Sequence[int]], max_len: int) -> int:
    first = rows[0]
    k = 0
    while k < max_len and all(r[k] == first[k] for r in rows):
        k += 1
    return k


def _model_device(model: Any) -> Any:
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _next_tokens(logits: Any, config: GenerationConfig, gens: list[Any] | None) -> Any:
    """Greedy argmax, or a temperature / top-p sample per row with that row's generator."""
    import torch

    if gens is None:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_p < 1.0:
        sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= config.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, sorted_i, sorted_p)
    picks = [torch.multinomial(probs[j], 1, generator=g) for j, g in enumerate(gens)]
    return torch.cat(picks)


# ------------------------------------------------------------------------ vLLM

# vLLM only accepts these LoRA ranks for max_lora_rank.
_VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_sampling_kwargs(config: GenerationConfig, stop_ids: Sequence[int] = ()) -> dict[str, Any]:
    """Keyword arguments for vllm.SamplingParams equivalent to `config`."""
    kw: dict[str, Any] = {
        "n": 1,
        "max_tokens": config.max_new_tokens,
        "skip_special_tokens": True,
    }
    if config.greedy:
        kw.update(temperature=0.0, top_p=1.0)
    else:
        kw.update(temperature=config.temperature, top_p=config.top_p, seed=config.seed)
    if stop_ids:
        kw["stop_token_ids"] = sorted(int(i) for i in stop_ids)
    return kw


def vllm_prompts(tokenizer: Any, prompts: Sequence[str], system: str | None = None) -> list[dict[str, list[int]]]:
    """Chat-formatted prompts as vLLM token prompts (so vLLM adds no second BOS)."""
    return [{"prompt_token_ids": ids} for ids in chat_prompts(tokenizer, prompts, system)]


def vllm_lora_request_args(adapter: str | os.PathLike | None) -> dict[str, Any] | None:
    """Arguments for vllm.lora.request.LoRARequest for a PEFT adapter directory, or None."""
    if adapter is None:
        return None
    path = Path(adapter).expanduser().resolve()
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
    return {"lora_name": path.name or "adapter", "lora_int_id": 1, "lora_path": str(path)}


def vllm_engine_kwargs(
    model_path: str,
    *,
    adapter: str | os.PathLike | None = None,
    dtype: str = "auto",
    gpu_memory_utilization: float = 0.85,
    engine_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for vllm.LLM: LoRA enabled with a large enough max_lora_rank when
    an adapter is given (vLLM's default of 16 rejects larger adapters at request time).

    `engine_options` go to vllm.LLM as they are (tensor_parallel_size, max_model_len,
    max_num_seqs, enforce_eager, quantization, ...) and win over the values set here."""
    if not 0 < gpu_memory_utilization <= 1:
        raise UserError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    kw: dict[str, Any] = {
        "model": model_path,
        "dtype": dtype,
        "gpu_memory_utilization": gpu_memory_utilization,
    }
    if adapter is not None:
        import json

        cfg_path = Path(adapter).expanduser() / "adapter_config.json"
        try:
            rank = int(json.loads(cfg_path.read_text()).get("r", 16))
        except (OSError, ValueError) as e:
            raise UserError(f"{cfg_path}: cannot read the adapter config ({e})") from None
        fits = [r for r in _VLLM_LORA_RANKS if r >= rank]
        if not fits:
            raise UserError(f"{cfg_path}: LoRA rank {rank} is larger than vLLM supports ({_VLLM_LORA_RANKS[-1]})")
        kw.update(enable_lora=True, max_lora_rank=fits[0], max_loras=1)
    options = dict(engine_options or {})
    if "model" in options:
        raise UserError("the vllm engine option 'model' is tactful's --model (or --run)")
    kw.update(options)
    return kw


def _import_vllm() -> Any:
    try:
        import vllm
    except ModuleNotFoundError as e:
        if e.name not in (None, "vllm"):  # vLLM is there, one of its own dependencies is not
            raise UserError(f"vLLM is installed but cannot be imported (no module named {e.name!r}); reinstall it "
                            "with `pip install 'tactful[vllm]'` in an environment with a CUDA build of torch") from None
        raise UserError("the vllm backend needs vLLM, which is not installed: `pip install 'tactful[vllm]'` "
                        "(Linux with a CUDA GPU), or use --backend hf") from None
    except ImportError as e:
        raise UserError(f"vLLM is installed but cannot be imported ({_first_line(e)}); reinstall it with "
                        "`pip install 'tactful[vllm]'` in an environment with a CUDA build of torch") from None
    return vllm


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass
class VLLMPlan:
    """How vLLM can serve a tactful run: a model directory or hub id, plus at most one LoRA
    adapter (one LoRARequest). `model` None means it cannot, for `reason`."""

    model: str | None
    adapter: str | None = None
    reason: str | None = None


def plan_vllm_run(run_dir: str | os.PathLike) -> VLLMPlan:
    """What vLLM should load to generate with the model a training run produced.

    Base model + one adapter (sft, dpo, shapo, trace, refusal_guard without a start run) is
    a plain model with a LoRARequest; a full fine-tune is a plain model directory. SafeMoE
    bundles route their experts per token with a learned router, and runs that stack
    adapters (DCR's stage 1 under its SFT adapter, a `start_from` chain) need them merged
    first: vLLM applies one LoRA per request, so these fall back to the HF backend.
    """
    from tactful.methods.registry import METHODS, method_module
    from tactful.runs import read_manifest

    run = Path(run_dir)
    manifest = read_manifest(run)
    kind = manifest.get("kind", "")
    if kind == "safemoe":
        return VLLMPlan(None, reason="a SafeMoE bundle mixes its LoRA experts per token with a learned router, "
                                     "which vLLM cannot run")
    if manifest.get("gate"):
        return VLLMPlan(None, reason="a prompt-gated run sends each prompt to its adapter or its base model, "
                                     "which tactful's vLLM backend does not do")
    if manifest.get("model_dir"):
        return VLLMPlan(str(run / manifest["model_dir"]))
    base = manifest.get("base_model")
    if not base:
        raise UserError(f"{run}/manifest.json names no base_model")
    if kind in METHODS:
        method_module(kind)  # registers the run loader that `_adapter_chain` consults
    from tactful.methods.common import _adapter_chain

    chain = _adapter_chain(run, manifest)
    if chain is None and kind == "refusal_guard" and manifest.get("adapter") and not (
            manifest.get("start_from") or manifest.get("start_adapter")):
        chain = [run / manifest["adapter"]]  # its loader's plain case: the base model + this adapter
    if not chain:
        return VLLMPlan(None, reason=f"a {kind or 'tactful'} run is not one adapter on its base model "
                                     "(its loader merges several), and vLLM applies one LoRA adapter per request")
    if len(chain) > 1:
        return VLLMPlan(None, reason=f"the run stacks {len(chain)} adapters (its start run's and its own), and "
                                     "vLLM applies one LoRA adapter per request")
    return VLLMPlan(base, adapter=str(chain[0]))


class VLLMGenerator:
    """Generation with vLLM on a CUDA GPU (optionally with one LoRA adapter)."""

    def __init__(
        self,
        model_path: str,
        *,
        adapter: str | None = None,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        engine_options: dict[str, Any] | None = None,
        name: str | None = None,
    ):
        from tactful.models import resolve_model_path

        vllm = _import_vllm()
        import torch

        if not torch.cuda.is_available():
            raise UserError("the vllm backend needs a CUDA GPU and none is visible; use the hf backend on CPU")
        self.name = name or f"vllm:{model_path}" + (f"+{adapter}" if adapter else "")
        self._lora_args = vllm_lora_request_args(adapter)
        self.llm = vllm.LLM(
            **vllm_engine_kwargs(
                resolve_model_path(model_path),
                adapter=adapter,
                dtype=dtype,
                gpu_memory_utilization=gpu_memory_utilization,
                engine_options=engine_options,
            )
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.stop_ids = stop_token_ids(self.tokenizer)

    def __repr__(self) -> str:
        return f"VLLMGenerator(name={self.name!r})"

    def generate(
        self, prompts: list[str], config: GenerationConfig, *, progress: ProgressFn | None = None
    ) -> list[str]:
        from vllm import SamplingParams

        _check_prompts(prompts)
        params = SamplingParams(**vllm_sampling_kwargs(config, self.stop_ids))
        lora = None
        if self._lora_args is not None:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest(**self._lora_args)
        requests = vllm_prompts(self.tokenizer, prompts, config.system)
        # vLLM schedules its own batches; we hand it large chunks (not batch_size-sized
        # ones, which would starve it) only so that progress moves during long runs.
        chunk = max(config.batch_size, 256)
        replies: list[str] = []
        for start in range(0, len(requests), chunk):
            part = requests[start : start + chunk]
            outs = self.llm.generate(part, params, lora_request=lora, use_tqdm=False)
            replies.extend(o.outputs[0].text for o in outs)  # vLLM returns input order
            if progress:
                progress(len(part))
        return replies


# ------------------------------------------------------------------------ OpenAI-compatible HTTP


class OpenAIGenerator:
    """Replies from an OpenAI-compatible chat endpoint (OpenAI, vLLM serve, llama.cpp, ...).

    Requests run concurrently on `concurrency` threads; replies come back in input order.
    The server applies the chat template.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 4,
        name: str | None = None,
    ):
        from tactful.eval.http_client import ChatClient

        if concurrency < 1:
            raise UserError(f"concurrency must be >= 1, got {concurrency}")
        self.client = ChatClient(base_url, model, api_key_env=api_key_env)
        self.concurrency = concurrency
        self.name = name or f"openai:{model}@{base_url}"

    def __repr__(self) -> str:
        return f"OpenAIGenerator(name={self.name!r}, concurrency={self.concurrency})"

    def generate(
        self, prompts: list[str], config: GenerationConfig, *, progress: ProgressFn | None = None
    ) -> list[str]:
        from tactful.models import messages_for

        _check_prompts(prompts)
        kw: dict[str, Any] = {"max_tokens": config.max_new_tokens}
        if config.greedy:
            kw["temperature"] = 0.0
        else:
            kw.update(temperature=config.temperature, top_p=config.top_p, seed=config.seed)
        replies: list[str | None] = [None] * len(prompts)
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="tactful-http")
        try:
            futures = {
                pool.submit(self.client.chat, messages_for(p, config.system), **kw): i
                for i, p in enumerate(prompts)
            }
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    replies[futures[f]] = f.result()  # re-raises the first failure
                if progress and done:
                    progress(len(done))
        finally:
            # On a failure, do not send the requests still queued.
            pool.shutdown(wait=True, cancel_futures=True)
        return [r if r is not None else "" for r in replies]


# ------------------------------------------------------------------------ factory


# The extra keyword options each backend understands.
_BACKEND_OPTIONS = {
    "hf": frozenset({"dtype", "device", "trust_remote_code", "chat_template"}),
    "vllm": frozenset({"dtype", "gpu_memory_utilization", "engine_options"}),
    "openai": frozenset({"api_key_env", "concurrency"}),
}


def make_generator(
    backend: str,
    *,
    model: Any = None,
    tokenizer: Any = None,
    model_spec: str | None = None,
    adapter: str | None = None,
    base_url: str | None = None,
    api_model: str | None = None,
    run: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
    **kw: Any,
) -> Generator:
    """Build a generator by backend name.

    hf: an already loaded `model` + `tokenizer`, or `model_spec` (+ `adapter`) to load, or a
        training `run`; extra keywords (dtype, device, ...) go to tactful.models.load_model.
    vllm: `model_spec` (+ `adapter`), or a training `run` (`plan_vllm_run`: its base model and
        adapter; runs vLLM cannot run, SafeMoE bundles first, fall back to the hf backend with a
        message to `log`); extra keywords: dtype, gpu_memory_utilization, engine_options.
    openai: `base_url` and `api_model` (defaults to `model_spec`); extra keywords:
        api_key_env, concurrency.
    Every backend takes `name=` to override the name recorded in reports. Options meant
    for another backend (say api_key_env for vllm) are ignored, so a caller can pass one
    set of options whatever the backend; None means "the default".
    """
    backend = (backend or "").strip().lower()
    name = kw.pop("name", None)
    unknown = set(kw) - set().union(*_BACKEND_OPTIONS.values())
    if unknown:
        raise TypeError(f"make_generator got unexpected options: {', '.join(sorted(unknown))}")
    hf_kw = {k: v for k, v in kw.items() if v is not None and k in _BACKEND_OPTIONS["hf"]}
    kw = {k: v for k, v in kw.items() if v is not None and k in _BACKEND_OPTIONS.get(backend, ())}
    if backend == "vllm" and run is None and model_spec and _is_run_dir(model_spec):
        run = model_spec  # a training run given as the model
    if run is not None and backend in ("hf", "vllm"):  # an endpoint (openai) serves whatever it serves
        if adapter is not None:
            raise UserError("give either a training run or an adapter, not both (the run names its own adapter)")
        if backend == "vllm":
            plan = plan_vllm_run(run)
            if plan.model is not None:
                return VLLMGenerator(plan.model, adapter=plan.adapter, name=name or f"vllm:run:{run}", **kw)
            log(f"note: vLLM cannot generate with {run}: {plan.reason}; falling back to the hf backend")
            backend, kw = "hf", hf_kw
        if backend == "hf":
            from tactful.runs import load_run_model

            from tactful.methods.prompt_gate import gated_if_run_has_gate

            load_kw = {k: v for k, v in kw.items() if k in ("dtype", "device")}
            model, tokenizer, desc = load_run_model(run, **load_kw)
            return gated_if_run_has_gate(run, HFGenerator(model, tokenizer, name=name or f"hf:{desc}"),
                                         name=name or f"hf:{desc}", **load_kw)
    if backend == "hf":
        if model is not None:
            if tokenizer is None:
                raise UserError("the hf backend needs the tokenizer along with the model")
            if adapter is not None:
                from tactful.models import attach_adapter

                model = attach_adapter(model, adapter)
            return HFGenerator(model, tokenizer, name=name or "hf")
        if not model_spec:
            raise UserError("the hf backend needs a model (give a model spec, e.g. 'embedded')")
        from tactful.models import load_model

        model, tokenizer = load_model(model_spec, adapter=adapter, **kw)
        return HFGenerator(model, tokenizer, name=name or f"hf:{model_spec}" + (f"+{adapter}" if adapter else ""))
    if backend == "vllm":
        if not model_spec:
            raise UserError("the vllm backend needs a model (a hub id or a local directory)")
        return VLLMGenerator(model_spec, adapter=adapter, name=name, **kw)
    if backend == "openai":
        api_model = api_model or model_spec
        if not base_url:
            raise UserError("the openai backend needs a base URL, e.g. http://localhost:8000/v1")
        if not api_model:
            raise UserError("the openai backend needs the model name the endpoint serves")
        if adapter is not None:
            raise UserError("the openai backend cannot attach an adapter; serve the adapted model instead")
        return OpenAIGenerator(base_url, api_model, name=name, **kw)
    raise UserError(f"unknown generation backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _is_run_dir(spec: str | os.PathLike) -> bool:
    """A tactful training run directory (model directories have no manifest.json)."""
    return (Path(spec).expanduser() / "manifest.json").is_file()
