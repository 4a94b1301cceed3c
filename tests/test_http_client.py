"""ChatClient and OpenAIGenerator against a real HTTP server on 127.0.0.1 (http.server in a thread)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tactful.errors import UserError
from tactful.eval.generation import GenerationConfig, OpenAIGenerator, make_generator
from tactful.eval.http_client import ChatClient, EndpointError

KEY = "sk-test-very-secret-4f1c9e"
KEY_ENV = "TACTFUL_TEST_API_KEY"


class FakeServer:
    """An OpenAI-style chat endpoint. `script` is a list of (status, body, headers) answered
    in turn before the default behaviour: a 200 that echoes the last user message."""

    def __init__(self) -> None:
        self.script: list[tuple[int, object, dict]] = []
        self.requests: list[dict] = []  # {"path", "headers", "body", "time"}
        self.delay_for: dict[str, float] = {}  # user message -> seconds to wait before answering
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body, "time": time.monotonic()}
                    )
                    step = server.script.pop(0) if server.script else None
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                counted = True
                try:
                    user = body["messages"][-1]["content"]
                    time.sleep(server.delay_for.get(user, 0.0))
                    if step is None:
                        step = (200, {"choices": [{"message": {"role": "assistant", "content": f"echo: {user}"}}]}, {})
                    status, payload, headers = step
                    if callable(payload):
                        payload = payload(self)
                    data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                    # Stop counting before the reply leaves: once the client has it, it may send its
                    # next request before this thread runs again (a race that counted 5 of 4 slots).
                    with server.lock:
                        server.in_flight -= 1
                    counted = False
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    if counted:
                        with server.lock:
                            server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


@pytest.fixture
def server():
    s = FakeServer()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY_ENV


def client(server, key_env=KEY_ENV, **kw) -> ChatClient:
    kw.setdefault("backoff", 0.01)
    kw.setdefault("timeout", 5.0)
    return ChatClient(server.base_url, "test-model", api_key_env=key_env, **kw)


def test_successful_call_sends_openai_request(server, key_env):
    c = client(server)
    reply = c.chat([{"role": "user", "content": "hello"}], max_tokens=7, temperature=0.5, seed=3, stop=["\n"])
    assert reply == "echo: hello"
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    assert req["body"] == {
        "model": "test-model",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 7,
        "temperature": 0.5,
        "seed": 3,
        "stop": ["\n"],
    }


def test_no_key_no_authorization_header(server, monkeypatch):
    monkeypatch.delenv("TACTFUL_NO_SUCH_KEY", raising=False)
    c = client(server, key_env="TACTFUL_NO_SUCH_KEY")
    assert c.chat([{"role": "user", "content": "x"}]) == "echo: x"
    assert "Authorization" not in server.requests[0]["headers"]


def test_retry_after_503_then_success(server, key_env):
    server.script = [(503, {"error": {"message": "overloaded"}}, {})]
    c = client(server)
    assert c.chat([{"role": "user", "content": "again"}]) == "echo: again"
    assert len(server.requests) == 2


def test_429_backs_off_exponentially_and_honours_retry_after(server, key_env):
    server.script = [
        (429, {"error": {"message": "rate limited"}}, {}),
        (429, {"error": {"message": "rate limited"}}, {}),
        (429, {"error": {"message": "rate limited"}}, {"Retry-After": "0.3"}),
    ]
    c = client(server, backoff=0.05)
    assert c.chat([{"role": "user", "content": "hi"}]) == "echo: hi"
    t = [r["time"] for r in server.requests]
    assert len(t) == 4
    gaps = [b - a for a, b in zip(t, t[1:])]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1  # backoff * 2**attempt
    assert gaps[2] >= 0.3  # the server asked for longer than 0.2


def test_429_quota_exhausted_is_not_retried(server, key_env):
    server.script = [(429, {"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}}, {})]
    with pytest.raises(UserError, match="exceeded your current quota"):
        client(server).chat([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 1


def test_retries_exhausted_raise_endpoint_error(server, key_env):
    server.script = [(500, "internal error", {})] * 3
    c = client(server, max_retries=2)
    with pytest.raises(EndpointError, match="3 attempt") as err:
        c.chat([{"role": "user", "content": "hi"}])
    assert isinstance(err.value, RuntimeError)
    assert "HTTP 500: internal error" in str(err.value)
    assert len(server.requests) == 3


def test_connection_refused_retries_then_endpoint_error(key_env):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = ChatClient(f"http://127.0.0.1:{port}/v1", "m", api_key_env=key_env, max_retries=1, backoff=0.01)
    with pytest.raises(EndpointError, match="ConnectionError"):
        c.chat([{"role": "user", "content": "hi"}])


def test_401_is_user_error_with_server_message_and_no_key(server, key_env):
    # A careless server that echoes the key it was given, as some do in their error text.
    def echo_key(handler):
        return {"error": {"message": f"Incorrect API key provided: {handler.headers['Authorization']}"}}

    server.script = [(401, echo_key, {})]
    c = client(server)
    with pytest.raises(UserError) as err:
        c.chat([{"role": "user", "content": "hi"}])
    msg = str(err.value)
    assert "401" in msg and "Incorrect API key provided" in msg and KEY_ENV in msg
    assert KEY not in msg
    assert len(server.requests) == 1  # a 4xx is not retried
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"


def test_key_never_in_repr_logs_or_exhausted_errors(server, key_env, caplog):
    server.script = [(503, lambda h: f"busy, your header was {h.headers['Authorization']}", {})] * 2
    c = client(server, max_retries=1)
    assert KEY not in repr(c) and KEY not in str(vars(c))
    with caplog.at_level("DEBUG"), pytest.raises(EndpointError) as err:
        c.chat([{"role": "user", "content": "hi"}])
    assert "busy" in str(err.value)
    assert KEY not in str(err.value)
    assert caplog.records and all(KEY not in r.getMessage() for r in caplog.records)


def test_404_user_error_names_url(server, key_env):
    server.script = [(404, {"error": {"message": "model 'test-model' not found"}}, {})]
    with pytest.raises(UserError, match="404.*model 'test-model' not found"):
        client(server).chat([{"role": "user", "content": "hi"}])


def test_malformed_answer_is_endpoint_error(server, key_env):
    server.script = [(200, {"unexpected": True}, {})]
    with pytest.raises(EndpointError, match="not an OpenAI chat completion"):
        client(server).chat([{"role": "user", "content": "hi"}])


def test_bad_url_is_user_error():
    with pytest.raises(UserError, match="http"):
        ChatClient("localhost:8000/v1", "m")


def test_openai_generator_keeps_order_with_concurrency(server, key_env):
    prompts = [f"prompt {i}" for i in range(12)]
    # Early prompts answer last, so completion order is the reverse of input order.
    server.delay_for = {p: 0.02 * (12 - i) for i, p in enumerate(prompts)}
    gen = OpenAIGenerator(server.base_url, "test-model", api_key_env=key_env, concurrency=4)
    done = []
    replies = gen.generate(prompts, GenerationConfig(max_new_tokens=5, system="Be brief."), progress=done.append)
    assert replies == [f"echo: {p}" for p in prompts]
    assert sum(done) == len(prompts)
    assert 1 < server.max_in_flight <= 4
    body = server.requests[0]["body"]
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["max_tokens"] == 5 and body["temperature"] == 0.0
    assert gen.name.startswith("openai:")


def test_openai_generator_sampling_options(server, key_env):
    gen = make_generator("openai", base_url=server.base_url, api_model="test-model", api_key_env=key_env)
    gen.generate(["x"], GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, seed=5))
    body = server.requests[0]["body"]
    assert (body["temperature"], body["top_p"], body["seed"]) == (0.7, 0.9, 5)


def test_openai_generator_raises_first_failure(server, key_env):
    server.script = [(401, {"error": {"message": "bad key"}}, {})] * 20
    gen = OpenAIGenerator(server.base_url, "test-model", api_key_env=key_env, concurrency=2)
    with pytest.raises(UserError, match="bad key"):
        gen.generate([f"p{i}" for i in range(20)], GenerationConfig())
    assert len(server.requests) < 20  # queued requests were cancelled
