"""The HTTP side of `tactful serve`: FastAPI routes on uvicorn, in OpenAI's format.

    POST /v1/chat/completions   chat completion (no streaming: stream=true gets a 400)
    GET  /v1/models             the one model this server serves
    GET  /health                {"status": "ok", "model": ..., "stats": {... batch sizes ...}}

Every error is JSON in OpenAI's shape with a 4xx status for anything the client can fix
(bad JSON, wrong types, unknown roles or arguments, a prompt over --max-prompt-tokens);
5xx only for a failure of the server itself, which keeps serving.

A client that disconnects while its reply is generated gets its request cancelled: the
worker drops it from the running batch (counted in /health's requests_cancelled).

Shutdown (SIGINT / SIGTERM, or `ChatServer.stop()`): uvicorn stops accepting
connections, waits for the requests in flight to be answered, then the worker thread
finishes and the process exits 0.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tactful.errors import UserError
from tactful.eval.generation import HFGenerator
from tactful.models import format_chat
from tactful.serve.validation import RequestError, parse_chat_request
from tactful.serve.worker import BatchWorker, WorkerClosed

MAX_BODY_BYTES = 4 * 1024 * 1024  # far above any prompt a 2k-32k-token context can hold
# How often a waiting handler checks that its client is still connected: the most a
# hung-up client's request keeps generating for (plus one decode step).
DISCONNECT_POLL_S = 0.1


def _error(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status)


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body is larger than {limit} bytes", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the request body is larger than {limit} bytes", status=413)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise RequestError("the request body is empty; send a JSON object with 'model' and 'messages'")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError("the request body is nested too deeply") from None


async def _wait_unless_disconnected(request: Request, future: Future) -> Any:
    """The worker's result, or None if the client disconnects first. Then the future is
    cancelled, which makes the worker drop the request from its running batch at the next
    decode step (and count it in /health's requests_cancelled): a client that hangs up must
    not keep the model busy for up to max_tokens."""
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
        if done:
            return waiting.result()
        if await request.is_disconnected():
            future.cancel()
            return None


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation under the chat template, ready for the assistant's turn.

    Same rendering as the evaluation harness (tactful.eval.generation.chat_prompts), so a
    served model answers a one-message conversation exactly as `tactful eval` sees it.
    """
    try:
        text = format_chat(tokenizer, messages, add_generation_prompt=True)
    except UserError:
        raise
    except Exception as e:  # templates raise on conversations they do not allow
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RequestError(f"the model's chat template rejects these messages: {first}", param="messages") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class GateRouter:
    """Sends each request to the safety adapter's worker or the base model's, as a run's prompt gate
    decides on the rendered conversation. The gate's feature pass runs on a weight-sharing twin of
    the base model (its forward hook must not fire inside the base worker's decoding), one request at
    a time."""

    def __init__(self, gate: Any, base_model: Any, tokenizer: Any):
        from tactful.eval.generation import pad_id_of
        from tactful.methods.prompt_gate import weight_sharing_twin

        self.gate = gate
        self._twin = weight_sharing_twin(base_model)
        self._pad = pad_id_of(tokenizer)
        self._lock = threading.Lock()
        self.counts = {"adapter": 0, "base": 0}

    def __call__(self, prompt_ids: list[int]) -> str:
        with self._lock:
            route = "adapter" if self.gate.decide_ids(self._twin, [prompt_ids], pad_id=self._pad)[0] else "base"
            self.counts[route] += 1
        return route


def create_app(worker: BatchWorker | dict[str, BatchWorker], tokenizer: Any, *, model_name: str,
               max_prompt_tokens: int, max_new_tokens: int, max_body_bytes: int = MAX_BODY_BYTES,
               router: GateRouter | None = None) -> FastAPI:
    """The FastAPI application; the worker(s) must be started by the caller. With a `router`, `worker`
    is {"adapter": ..., "base": ...} and each request goes to the one the router names."""
    app = FastAPI(title="tactful serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    workers = worker if isinstance(worker, dict) else {"model": worker}
    if router is not None and set(workers) != {"adapter", "base"}:
        raise ValueError("a gated server needs an 'adapter' and a 'base' worker")

    def stats() -> dict[str, Any]:
        if router is None:
            return next(iter(workers.values())).stats()
        return {"routes": dict(router.counts), **{name: w.stats() for name, w in workers.items()}}

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            message = f"no route {request.method} {request.url.path}; this server has POST /v1/chat/completions, " \
                      "GET /v1/models and GET /health"
        elif e.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(e.detail)
        return _error(e.status_code, message, code="not_found" if e.status_code == 404 else None)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "tactful"}

    @app.get("/health")
    async def health() -> JSONResponse:
        closed = any(w.closed for w in workers.values())
        return JSONResponse({"status": "shutting_down" if closed else "ok", "model": model_name, "stats": stats()})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        if model_id != model_name:
            return _error(404, f"model {model_id!r} is not served here; this server serves {model_name!r}",
                          param="model", code="model_not_found")
        return JSONResponse(model_card())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        body = await _read_json(request, max_body_bytes)
        req = parse_chat_request(body, max_new_tokens=max_new_tokens)
        if req.model != model_name:
            raise RequestError(f"model {req.model!r} is not served here; this server serves {model_name!r}",
                               param="model", status=404, code="model_not_found")
        prompt_ids = render_prompt(tokenizer, req.messages)
        if len(prompt_ids) > max_prompt_tokens:
            raise RequestError(f"the prompt is {len(prompt_ids)} tokens; this server takes at most "
                               f"{max_prompt_tokens} (--max-prompt-tokens)", param="messages",
                               code="context_length_exceeded")
        target = next(iter(workers.values()))
        if router is not None:  # the gate's pass is CPU work: off the event loop
            target = workers[await asyncio.get_running_loop().run_in_executor(None, router, prompt_ids)]
        try:
            future = target.submit(prompt_ids, req)
        except WorkerClosed as e:
            return _error(503, str(e), type="server_error")
        try:
            done = await _wait_unless_disconnected(request, future)
        except Exception as e:  # a failed generation is the server's fault, not the client's
            first = (str(e).strip().splitlines() or [""])[0]
            return _error(500, f"generation failed: {type(e).__name__}: {first}", type="server_error")
        if done is None:  # nobody will read this; the status is for the access log
            return _error(499, "the client closed the connection before the reply was ready",
                          type="client_closed_request")
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": done.text},
                "logprobs": None,
                "finish_reason": done.finish_reason,
            }],
            "usage": {
                "prompt_tokens": done.prompt_tokens,
                "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens,
            },
        })

    return app


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling us when it really listens (for the ready line and tests)."""

    def __init__(self, config: uvicorn.Config, ready: threading.Event):
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._ready.set()


def _swallow_signal(signum: int, frame: Any) -> None:
    pass


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket's bind, done before anything slow (loading a model) so that a port
    in use fails at once. Port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


class ChatServer:
    """A model behind an OpenAI-compatible endpoint: one batching worker plus uvicorn.

        server = ChatServer(model, tokenizer, model_name="embedded")
        host, port = server.bind("127.0.0.1", 0)   # 0: any free port
        server.serve_forever()                     # blocks; server.stop() from another thread
    """

    def __init__(self, model: Any, tokenizer: Any, *, model_name: str, max_batch_size: int = 16,
                 max_prompt_tokens: int = 2048, max_new_tokens: int = 512, batch_wait_s: float = 0.02,
                 log_level: str = "info", access_log: bool = True, gate: Any = None, base_model: Any = None):
        """gate, base_model: a prompt-gated run (tactful.methods.prompt_gate): `model` is the run's model
        with its adapter, `base_model` the model as it was; each request goes to the one the gate picks,
        each with its own batching worker."""
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("this tokenizer has no chat template; pass one with --chat-template FILE")
        if (gate is None) != (base_model is None):
            raise ValueError("a gated server needs both gate and base_model")
        self.model_name = model_name

        def worker(m: Any, name: str) -> BatchWorker:
            return BatchWorker(HFGenerator(m, tokenizer, name=name), max_batch_size=max_batch_size,
                               batch_wait_s=batch_wait_s)

        self.router = GateRouter(gate, base_model, tokenizer) if gate is not None else None
        if self.router is None:
            self.workers = {"model": worker(model, f"hf:{model_name}")}
        else:
            self.workers = {"adapter": worker(model, f"hf:{model_name}:adapter"),
                            "base": worker(base_model, f"hf:{model_name}:base")}
        self.worker = next(iter(self.workers.values()))
        self.app = create_app(self.workers if self.router else self.worker, tokenizer, model_name=model_name,
                              max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens, router=self.router)
        self.ready = threading.Event()
        # lifespan off: the worker's life is managed here, around uvicorn's run, so that it
        # outlives every in-flight request that uvicorn waits for at shutdown.
        config = uvicorn.Config(self.app, lifespan="off", log_level=log_level, access_log=access_log,
                                timeout_graceful_shutdown=None)
        self._server = _Uvicorn(config, self.ready)
        self._sock: socket.socket | None = None
        self.address: tuple[str, int] | None = None

    @property
    def base_url(self) -> str:
        if self.address is None:
            raise RuntimeError("bind() first")
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    def bind(self, host: str = "127.0.0.1", port: int = 8000) -> tuple[str, int]:
        """Bind the listening socket now (port 0 picks a free one) and return the real address."""
        return self.adopt(bind_socket(host, port))

    def adopt(self, sock: socket.socket) -> tuple[str, int]:
        """Serve on an already bound socket (see `bind_socket`); returns its address."""
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self.address = (host, port)
        return self.address

    def serve_forever(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve until stop() or SIGINT / SIGTERM, then finish in-flight requests and return."""
        if self._sock is None:
            self.bind()
        if on_ready is not None:
            threading.Thread(target=lambda: self.ready.wait() and on_ready(), daemon=True).start()
        in_main = threading.current_thread() is threading.main_thread()
        previous = {}
        if in_main:
            # uvicorn re-raises the signal that stopped it once shutdown is done; catch that
            # one, so a graceful stop returns normally (exit 0) instead of dying by SIGTERM.
            previous = {s: signal.signal(s, _swallow_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        for w in self.workers.values():
            w.start()
        try:
            self._server.run(sockets=[self._sock])
        finally:
            # A second Ctrl-C (force exit) should not wait for a long batch; the thread is a daemon.
            for w in self.workers.values():
                w.close(timeout=0 if self._server.force_exit else None)
            self._sock.close()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def stop(self) -> None:
        """Graceful stop from another thread: what SIGTERM does."""
        self._server.should_exit = True
