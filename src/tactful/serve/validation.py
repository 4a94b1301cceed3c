"""Checking an OpenAI chat-completions request body before it reaches the model.

`parse_chat_request` turns the decoded JSON body into a `ChatRequest` or raises
`RequestError`, which the app sends back in OpenAI's error shape:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "top_p", "code": null}}

Pure Python, no web framework: the rules can be tested without a server. Token limits
(an over-long prompt) need the tokenizer and are checked by the app after rendering.

Accepted: model, messages, max_tokens / max_completion_tokens, temperature, top_p, n=1,
stream=false, stop, seed, user. Fields for features we do not have (tools, logprobs,
penalties, logit_bias, JSON mode) are accepted only at their "off" value, so a client
that sends the defaults works and one that relies on the feature gets a clear 400
instead of a silently different answer. Anything else is an unrecognized argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# OpenAI's own ranges; the same numbers mean the same thing here.
MAX_TEMPERATURE = 2.0
MAX_STOP_SEQUENCES = 4
ROLES = ("system", "developer", "user", "assistant")

# Fields a client may send that change nothing when at these values.
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none", "auto"),
    "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},),
}
# Fields that have no effect on a local model and are ignored whatever their value.
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options"})
_KNOWN = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
                    "stream", "stop", "seed"}) | _IGNORED | frozenset(_OFF_VALUES)
_MESSAGE_KEYS = frozenset({"role", "content", "name"})


class RequestError(Exception):
    """A request the server will not run: HTTP status plus OpenAI's error fields."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code
        self.type = type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A validated request. `max_tokens` is already clamped to the server's cap; `seed` is
    None when the client gave none (the worker then draws one)."""

    model: str
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    # bool is an int in Python but never a number in JSON
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{key}' must be a number, got {_type_name(value)}", param=key)
    if not math.isfinite(value):
        raise RequestError(f"'{key}' must be a finite number, got {value!r}", param=key)
    if value < lo or value > hi or (lo_open and value == lo):
        interval = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
        raise RequestError(f"'{key}' must be in {interval}, got {value!r}", param=key)
    return float(value)


def _same(value: Any, off: Any) -> bool:
    # JSON false is not the number 0, and 0 is not false: compare bools only with bools.
    if isinstance(value, bool) or isinstance(off, bool):
        return isinstance(value, bool) and isinstance(off, bool) and value == off
    return value == off


def _integer(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RequestError(f"'{key}' must be an integer, got {_type_name(value)}", param=key)
    return value


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                raise RequestError(f"{where}.content[{j}] must be a text part "
                                   f"{{\"type\": \"text\", \"text\": ...}}; got {kind!r} (text only)",
                                   param=f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"{where}.content must be a string or a list of text parts, got {_type_name(value)}",
                       param=f"{where}.content")


def _messages(value: Any) -> list[dict[str, str]]:
    if value is None:
        raise RequestError("'messages' is required: a list of {\"role\", \"content\"} objects", param="messages")
    if not isinstance(value, list):
        raise RequestError(f"'messages' must be an array, got {_type_name(value)}", param="messages")
    if not value:
        raise RequestError("'messages' must contain at least one message", param="messages")
    out = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RequestError(f"{where} must be an object, got {_type_name(msg)}", param=where)
        role = msg.get("role")
        if not isinstance(role, str):
            raise RequestError(f"{where}.role must be a string, got {_type_name(role)}", param=f"{where}.role")
        if role not in ROLES:
            raise RequestError(f"{where}.role {role!r} is not supported; use one of {', '.join(ROLES)} "
                               "(no tool calling)", param=f"{where}.role")
        extra = sorted(k for k, v in msg.items() if k not in _MESSAGE_KEYS and v is not None)
        if extra:
            raise RequestError(f"{where} has unsupported field(s): {', '.join(extra)}", param=f"{where}.{extra[0]}")
        if msg.get("name") is not None and not isinstance(msg["name"], str):
            raise RequestError(f"{where}.name must be a string, got {_type_name(msg['name'])}", param=f"{where}.name")
        if "content" not in msg or msg["content"] is None:
            raise RequestError(f"{where}.content is required", param=f"{where}.content")
        # Chat templates know "system"; "developer" is OpenAI's newer name for the same turn.
        out.append({"role": "system" if role == "developer" else role, "content": _content(msg["content"], where)})
    return out


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError(f"'stop' must be a string or an array of strings, got {_type_name(value)}", param="stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise RequestError(f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", param="stop")
    if any(s == "" for s in stops):
        raise RequestError("'stop' sequences must not be empty", param="stop")
    return list(stops)


def parse_chat_request(body: Any, *, max_new_tokens: int) -> ChatRequest:
    """Validate a decoded chat-completions body; `max_new_tokens` is the server's cap."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_type_name(body)}")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise RequestError(f"unrecognized request argument(s): {', '.join(unknown)}", param=unknown[0])
    for key, off in _OFF_VALUES.items():
        value = body.get(key)
        if value is not None and not any(_same(value, v) for v in off):
            raise RequestError(f"'{key}' is not supported by tactful serve (got {value!r}); leave it out",
                               param=key)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(f"'model' must be a non-empty string, got {_type_name(model)}", param="model")
    messages = _messages(body.get("messages"))

    n = body.get("n")
    if n is not None and _integer(n, "n") != 1:
        raise RequestError(f"only n=1 is supported, got n={n!r}", param="n")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError(f"'stream' must be a boolean, got {_type_name(stream)}", param="stream")
    if stream:
        raise RequestError("streaming is not supported by tactful serve; send stream=false (the default)",
                           param="stream")

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = max_new_tokens
    else:
        max_tokens = _integer(max_tokens, key)
        if max_tokens < 1:
            raise RequestError(f"'{key}' must be at least 1, got {max_tokens}", param=key)
        # A longer request is served up to the cap, and finish_reason "length" says so: a client
        # such as an LLM judge asking for 1024 tokens should get an answer, not an error.
        max_tokens = min(max_tokens, max_new_tokens)

    seed = body.get("seed")
    if seed is not None:
        seed = _integer(seed, "seed")
        if not -(2**63) <= seed < 2**63:
            raise RequestError("'seed' must fit in a signed 64-bit integer", param="seed")

    return ChatRequest(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        stop=_stop(body.get("stop")),
        seed=seed,
    )
