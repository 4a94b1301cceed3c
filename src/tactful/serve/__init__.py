"""`tactful serve`: any tactful model behind an OpenAI-compatible chat endpoint.

    tactful serve --model embedded --port 8000
    tactful serve --run runs/safemoe          # any run, SafeMoE bundles included
    tactful serve --run runs/demo/aligned     # a prompt-gated run: its gate picks adapter or base per request

Concurrent requests are generated together by one worker thread that owns the model,
with continuous batching: a request joins the running batch at the next decode step and
leaves it when done (serve/worker.py, serve/decode.py); requests are validated before
they reach it (serve/validation.py); routes, disconnect cancellation and shutdown live
in serve/app.py. Streaming is not offered: replies are handed back whole. `stream: true`
gets a 400 that says so.

The web stack (FastAPI + uvicorn) is the optional extra `tactful[serve]`; this module
imports it only when a server starts, so the rest of tactful does not need it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

from tactful.errors import UserError

SERVER_PACKAGES = ("fastapi", "uvicorn")
INSTALL_HINT = "pip install 'tactful[serve]'"
DEFAULT_MAX_PROMPT_TOKENS = 2048


def require_server_deps() -> None:
    """One clear error naming the install command when the web stack is missing."""
    missing = [p for p in SERVER_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise UserError(f"tactful serve needs {' and '.join(missing)}; install with `{INSTALL_HINT}`")


def serve_command(
    *,
    model: str = "embedded",
    adapter: str | None = None,
    run: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    max_batch_size: int = 16,
    max_prompt_tokens: int | None = None,
    max_new_tokens: int = 512,
    batch_wait_ms: float = 20.0,
    device: str = "cpu",
    dtype: str = "float32",
    chat_template: str | None = None,
    trust_remote_code: bool = False,
    announce: Callable[[str], None] = print,
) -> None:
    """Load a model (or a run's model) and serve it until SIGINT / SIGTERM.

    max_prompt_tokens None: 2048, lowered to fit the model's context with max_new_tokens.
    """
    require_server_deps()
    for name, value in (("max-batch-size", max_batch_size), ("max-prompt-tokens", max_prompt_tokens),
                        ("max-new-tokens", max_new_tokens)):
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if not 0 <= batch_wait_ms <= 10_000:
        raise UserError(f"--batch-wait-ms must be in 0-10000, got {batch_wait_ms}")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0-65535, got {port}")
    if run and adapter:
        raise UserError("--adapter cannot be combined with --run (a run brings its own adapters)")

    from tactful.serve.app import bind_socket

    sock = bind_socket(host, port)  # a busy port fails now, not after loading the model
    try:
        _serve_on(sock, model=model, adapter=adapter, run=run, model_name=model_name,
                  max_batch_size=max_batch_size, max_prompt_tokens=max_prompt_tokens,
                  max_new_tokens=max_new_tokens, batch_wait_ms=batch_wait_ms, device=device, dtype=dtype,
                  chat_template=chat_template, trust_remote_code=trust_remote_code, announce=announce)
    finally:
        sock.close()


def _serve_on(sock: Any, *, model: str, adapter: str | None, run: str | None, model_name: str | None,
              max_batch_size: int, max_prompt_tokens: int | None, max_new_tokens: int, batch_wait_ms: float,
              device: str, dtype: str, chat_template: str | None, trust_remote_code: bool,
              announce: Callable[[str], None]) -> None:
    from tactful.models import load_model
    from tactful.serve.app import ChatServer

    kw: dict[str, Any] = {"device": device, "dtype": dtype}
    if chat_template is not None:
        kw["chat_template"] = chat_template
    if trust_remote_code:
        kw["trust_remote_code"] = True
    gated: dict[str, Any] = {}
    if run:
        from tactful.methods.prompt_gate import load_base_of_run, run_gate
        from tactful.runs import load_run_model

        m, tok, description = load_run_model(run, **kw)
        gate = run_gate(run)
        if gate is not None:  # each request goes to the adapter or to the model as it was
            gated = {"gate": gate, "base_model": load_base_of_run(run, **kw)[0]}
            description += f" behind its prompt gate (layer {gate.layer})"
        name = model_name or Path(run).resolve().name
    else:
        m, tok = load_model(model, adapter=adapter, **kw)
        description = model + (f"+{adapter}" if adapter else "")
        name = model_name or model
    max_prompt_tokens = _fit_context(m, max_prompt_tokens, max_new_tokens)

    server = ChatServer(m, tok, model_name=name, max_batch_size=max_batch_size,
                        max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                        batch_wait_s=batch_wait_ms / 1000, **gated)
    server.adopt(sock)
    server.serve_forever(on_ready=lambda: announce(
        f"serving {description} as model {name!r} at {server.base_url} "
        f"(batches of up to {max_batch_size}); Ctrl-C stops after the requests in flight"))


def _fit_context(model: Any, max_prompt_tokens: int | None, max_new_tokens: int) -> int:
    """The prompt limit: as asked, or the default lowered so prompt + reply fit the context."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(context, int):
        return max_prompt_tokens or DEFAULT_MAX_PROMPT_TOKENS
    if max_new_tokens >= context:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context "
                        f"of {context} tokens")
    if max_prompt_tokens is None:
        return min(DEFAULT_MAX_PROMPT_TOKENS, context - max_new_tokens)
    if max_prompt_tokens + max_new_tokens > context:
        raise UserError(f"--max-prompt-tokens {max_prompt_tokens} + --max-new-tokens {max_new_tokens} exceed the "
                        f"model's context of {context} tokens; lower one of them")
    return max_prompt_tokens
