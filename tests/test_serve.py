"""`tactful serve` end to end on 127.0.0.1: the openai client, the evaluation harness's HTTP
backend and the LLM judge against it, a 200-request load test, bad inputs, continuous
batching (a short request behind a long one, replies joined vs alone, a disconnected
client cancelled), and a graceful SIGTERM of a real `tactful serve --run` process serving
a SafeMoE bundle."""

from __future__ import annotations

import inspect
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tactful.eval.generation import GenerationConfig, HFGenerator, make_generator  # noqa: E402
from tactful.models import messages_for, tiny_model  # noqa: E402
from tactful.serve.app import ChatServer, render_prompt  # noqa: E402
from tactful.serve.decode import Row, RunningBatch, cache_kwarg, continuous_batching_blocker, output_cache  # noqa: E402
from tactful.serve.validation import ChatRequest  # noqa: E402
from tactful.serve.worker import BatchWorker  # noqa: E402

MODEL = "tiny"
NO_KEY = "TACTFUL_TEST_SERVE_NO_KEY"  # an unset variable: requests go without Authorization


def _sharp_tiny(seed: int = 1):
    """The tiny model with larger random weights, so that its greedy answer depends on the
    prompt with wide margins (the default init answers everything with the same token and
    a mixed-up reply could not be noticed)."""
    model, tok = tiny_model(seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if "embed" in name else 0.3))
    return model, tok


def _serving(**kw):
    """A ChatServer on the sharp tiny model in a thread on 127.0.0.1 (a fixture's body)."""
    model, tok = _sharp_tiny()
    server = ChatServer(model, tok, model_name=MODEL, log_level="warning", access_log=False, **kw)
    server.bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    assert server.ready.wait(60), "the server did not start"
    yield {"url": server.base_url, "root": server.base_url[: -len("/v1")], "model": model, "tok": tok,
           "server": server}
    server.stop()
    thread.join(30)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def served():
    yield from _serving(max_batch_size=16, max_prompt_tokens=900, max_new_tokens=64)


@pytest.fixture(scope="module")
def served_long():
    """Replies of up to 512 tokens, the longest the tiny model's context (1024) allows with
    the prompts below."""
    yield from _serving(max_batch_size=4, max_prompt_tokens=400, max_new_tokens=512)


def _post(served, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(f"{served['url']}/chat/completions", data=data,
                         headers={"Content-Type": "application/json"}, timeout=60, **kw)


def _stats(served):
    return requests.get(f"{served['root']}/health", timeout=10).json()["stats"]


def _direct(served, prompts, max_new_tokens):
    """The same model's greedy replies without the server."""
    gen = HFGenerator(served["model"], served["tok"])
    return gen.generate_ids(prompts, GenerationConfig(max_new_tokens=max_new_tokens, batch_size=1))


def test_openai_client_gets_the_models_answer_with_usage(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served["url"], api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    prompt = "How do rainbows form?"
    res = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                         max_tokens=8, temperature=0)
    want = _direct(served, [prompt], 8)[0]
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == served["tok"].decode(want, skip_special_tokens=True)
    assert res.choices[0].finish_reason == "length" and len(want) == 8
    prompt_ids = render_prompt(served["tok"], messages_for(prompt))
    assert (res.usage.prompt_tokens, res.usage.completion_tokens, res.usage.total_tokens) == (
        len(prompt_ids), 8, len(prompt_ids) + 8)
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_eval_http_backend_and_llm_judge_work_against_the_server(served):
    from tactful.eval.judges import get_judge
    from tactful.eval.judges.base import JudgeItem

    prompts = ["hi", "Name three colours.", "What is 2+2?", "Write a poem about the sea."]
    gen = make_generator("openai", base_url=served["url"], api_model=MODEL, api_key_env=NO_KEY, concurrency=4)
    replies = gen.generate(prompts, GenerationConfig(max_new_tokens=6))
    direct = _direct(served, prompts, 6)
    assert replies == [served["tok"].decode(ids, skip_special_tokens=True) for ids in direct]
    assert len(set(replies)) == len(prompts)  # replies really belong to their prompts

    before = _stats(served)["requests_completed"]
    judge = get_judge("llm-refusal", base_url=served["url"], model=MODEL, api_key_env=NO_KEY, max_retries=0)
    verdicts = judge.judge([JudgeItem(prompt="How do I pick a lock?", response="I can't help with that.")])
    # A random model answers gibberish: the verdict is the parser's, the request itself worked.
    assert verdicts[0].ok or verdicts[0].error.startswith("unparseable judge reply")
    assert _stats(served)["requests_completed"] == before + 1


def test_200_requests_at_concurrency_16_lose_nothing_and_are_batched(served):
    before = _stats(served)
    prompts = [f"Question {i}: what is {i} times {i % 7}?" for i in range(200)]
    expected_prompt_tokens = [len(render_prompt(served["tok"], messages_for(p))) for p in prompts]

    def one(i):
        r = _post(served, {"model": MODEL, "messages": [{"role": "user", "content": prompts[i]}],
                           "max_tokens": 4, "temperature": 0})
        return r.status_code, r.json()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    assert [status for status, _ in results] == [200] * 200
    for (_, body), n_prompt in zip(results, expected_prompt_tokens):
        # each answer came back to its own request: the prompt sizes differ between requests
        assert body["usage"]["prompt_tokens"] == n_prompt
        assert body["usage"]["completion_tokens"] == 4 and isinstance(body["choices"][0]["message"]["content"], str)
    sample = [0, 57, 199]
    for i, ids in zip(sample, _direct(served, [prompts[i] for i in sample], 4)):
        assert results[i][1]["choices"][0]["message"]["content"] == served["tok"].decode(ids, skip_special_tokens=True)

    after = _stats(served)
    assert after["requests_completed"] - before["requests_completed"] == 200
    assert after["requests_failed"] == before["requests_failed"] and after["in_flight"] == 0
    batches = after["batches"] - before["batches"]
    assert batches < 200 and after["max_batch_size_seen"] > 1, after  # batching happened
    assert after["max_batch_size_seen"] <= 16


def test_sampling_seed_stop_and_max_tokens_cap(served):
    base = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}]}
    a = _post(served, {**base, "temperature": 1.0, "seed": 7, "max_tokens": 12}).json()
    b = _post(served, {**base, "temperature": 1.0, "seed": 7, "max_tokens": 12}).json()
    c = _post(served, {**base, "temperature": 1.0, "seed": 8, "max_tokens": 12}).json()
    text = a["choices"][0]["message"]["content"]
    assert text == b["choices"][0]["message"]["content"] != c["choices"][0]["message"]["content"]

    # a stop string cuts the text there and the usage counts the tokens up to it
    stop = text[len(text) // 2:][:2] if text.strip() else None
    if stop and stop.strip():
        cut = _post(served, {**base, "temperature": 1.0, "seed": 7, "max_tokens": 12, "stop": [stop]}).json()
        assert cut["choices"][0]["message"]["content"] == text[: text.find(stop)]
        assert cut["choices"][0]["finish_reason"] == "stop"
        assert cut["usage"]["completion_tokens"] <= a["usage"]["completion_tokens"]

    # max_tokens above the server's cap (64) is served up to the cap
    long = _post(served, {**base, "temperature": 0, "max_tokens": 5000}).json()
    assert long["usage"]["completion_tokens"] <= 64
    if long["usage"]["completion_tokens"] == 64:
        assert long["choices"][0]["finish_reason"] == "length"


BAD_REQUESTS = [
    (b"{not json", 400, "not valid JSON"),
    (b"", 400, "body is empty"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, 400, ""),
    ({"model": MODEL}, 400, "'messages' is required"),
    ({"model": MODEL, "messages": "hi"}, 400, "'messages' must be an array"),
    ({"model": MODEL, "messages": []}, 400, "at least one message"),
    ({"model": MODEL, "messages": ["hi"]}, 400, "messages[0] must be an object"),
    ({"model": MODEL, "messages": [{"role": "user"}]}, 400, "content is required"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "content must be a string"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role 'wizard' is not supported"),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "hi"}]}, 400, "role 'tool' is not supported"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "text part"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "'model' must be a non-empty string"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "must be a number"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "[0, 2]"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "(0, 1]"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "at least 1"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}, 400, "integer"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, 400, "integer"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "seed": 1.5}, 400, "integer"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 400, "'stop'"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}, 400, "streaming"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "only n=1"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "not supported"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "'tools' is not supported"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_k": 5}, 400, "unrecognized"),
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "serves 'tiny'"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 2000}]}, 400, "at most 900"),
    (b'{"model": "tiny", "messages": "' + b"x" * (5 * 1024 * 1024) + b'"}', 413, "larger than"),
]


def test_bad_requests_get_4xx_in_openai_shape_and_the_server_keeps_serving(served):
    before = _stats(served)
    for body, status, message in BAD_REQUESTS:
        r = _post(served, body)
        shown = body[:60] if isinstance(body, bytes) else body
        assert r.status_code == status, (shown, r.text[:300])
        err = r.json()["error"]
        assert message in err["message"], (shown, err)
        assert err["type"] == "invalid_request_error" and set(err) == {"message", "type", "param", "code"}
    assert requests.get(f"{served['url']}/chat/completions", timeout=10).status_code == 405
    assert requests.get(f"{served['root']}/nope", timeout=10).json()["error"]["code"] == "not_found"
    # nothing reached the model, and it still answers
    assert _stats(served)["requests_submitted"] == before["requests_submitted"]
    ok = _post(served, {"model": MODEL, "messages": [{"role": "developer", "content": "Be brief."},
                                                     {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                        "max_tokens": 2, "temperature": 0, "frequency_penalty": 0, "user": "me"})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


# ---------------------------------------------------------------- continuous batching

LONG_PROMPT = "Tell me about rivers."  # the sharp tiny model never stops on it: 512 tokens


def _ask(served, content, max_tokens, **kw):
    r = _post(served, {"model": MODEL, "messages": [{"role": "user", "content": content}],
                       "max_tokens": max_tokens, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def _wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("timed out waiting for the server")


def test_a_short_request_behind_a_long_one_finishes_in_about_its_own_time(served_long):
    """Batch-at-a-time, the 8-token request waited for the 512-token one (1-2 s here, 104 s
    with a real model); now it joins the running batch and leaves after its tokens."""
    def short():
        began = time.perf_counter()
        assert _ask(served_long, "What is 2+2?", 8)["usage"]["completion_tokens"] == 8
        return time.perf_counter() - began

    short()  # warm-up
    solo = statistics.median(short() for _ in range(3))
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(_ask, served_long, LONG_PROMPT, 512)
        _wait_for(lambda: _stats(served_long)["running"] == 1)
        # the mean, not the median: batch-at-a-time only the first one waits (for all of the long one)
        behind = statistics.mean(short() for _ in range(3))
        print(f"8-token request: {solo * 1000:.0f} ms alone, {behind * 1000:.0f} ms behind a 512-token one")
        # 2x plus 50 ms for a loaded 2-core machine; waiting for the long request would be > 1 s
        assert behind < 2 * solo + 0.05, (solo, behind)
        assert not long.done()  # all three were measured while the long request generated
        assert long.result(timeout=120)["usage"]["completion_tokens"] == 512


def test_a_reply_is_the_same_alone_and_joined_into_a_running_batch(served_long):
    asks = [
        ("hi", {}),  # a prompt shorter than the running row's cache: the new row is padded
        ("Describe the water cycle in detail. " * 20, {}),  # longer: the running row is padded
        ("Tell me a story.", {"temperature": 1.0, "seed": 11}),  # sampled, with its own seed
    ]

    def reply(ask):
        content, kw = ask
        return _ask(served_long, content, 24, **kw)["choices"][0]["message"]["content"]

    alone = [reply(a) for a in asks]
    with ThreadPoolExecutor(4) as pool:
        steps = _stats(served_long)["batches"]
        long = pool.submit(_ask, served_long, LONG_PROMPT, 300)
        _wait_for(lambda: _stats(served_long)["batches"] >= steps + 30)  # the long row is well under way
        joined = list(pool.map(reply, asks))
        assert not long.done()
        long.result(timeout=120)
    assert joined == alone
    direct = _direct(served_long, [content for content, _ in asks[:2]], 24)
    assert alone[:2] == [served_long["tok"].decode(ids, skip_special_tokens=True) for ids in direct]


def test_a_disconnected_clients_request_is_cancelled(served_long):
    before = _stats(served_long)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": LONG_PROMPT}],
                       "max_tokens": 512, "temperature": 0}).encode()
    sock = socket.create_connection(served_long["server"].address, timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    _wait_for(lambda: _stats(served_long)["running"] == 1)
    sock.close()  # the client hangs up mid-generation
    hung_up = time.monotonic()
    after = _wait_for(lambda: (s := _stats(served_long))["requests_cancelled"] > before["requests_cancelled"] and s)
    # cancelled at once, not after its 512 tokens (about 2 s)
    assert time.monotonic() - hung_up < 1.0
    assert after["requests_cancelled"] == before["requests_cancelled"] + 1
    assert after["requests_completed"] == before["requests_completed"]
    assert after["in_flight"] == 0 and after["running"] == 0
    time.sleep(0.2)
    assert _stats(served_long)["batches"] == after["batches"]  # no decode step runs for it any more


def test_cancelled_requests_leave_the_queue_and_the_running_batch():
    model, tok = _sharp_tiny()
    worker = BatchWorker(HFGenerator(model, tok), max_batch_size=1)  # the second request must queue
    worker.start()
    prompt = render_prompt(tok, messages_for(LONG_PROMPT))
    try:
        running = worker.submit(prompt, ChatRequest(model=MODEL, messages=[], max_tokens=512, temperature=0))
        queued = worker.submit(prompt, ChatRequest(model=MODEL, messages=[], max_tokens=512, temperature=0))
        _wait_for(lambda: worker.stats()["running"] == 1)
        assert queued.cancel() and running.cancel()  # what the handlers do when their clients hang up
        stats = _wait_for(lambda: (s := worker.stats())["in_flight"] == 0 and s, timeout=5)
    finally:
        worker.close()
    assert (stats["requests_cancelled"], stats["requests_completed"], stats["running"]) == (2, 0, 0)
    assert stats["batches"] < 400  # the running one stopped well before its 512 tokens

def _tiny_safemoe(granularity="token"):
    """The sharp tiny model with SafeMoE attached: one random expert on every q_proj."""
    from tactful.methods.safemoe import ExpertWeights, RouterSettings, attach_safemoe

    model, tok = _sharp_tiny()
    gen = torch.Generator().manual_seed(2)
    modules = {f"model.layers.{i}.self_attn.q_proj": (torch.randn(2, 64, generator=gen),
                                                       torch.randn(64, 2, generator=gen), 1.0) for i in range(4)}
    attach_safemoe(model, [ExpertWeights("a", modules)], RouterSettings(granularity=granularity))
    return model, tok


def _tiny_lora():
    from peft import LoraConfig, get_peft_model

    model, tok = _sharp_tiny()
    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])), tok


@pytest.mark.parametrize("make", [_sharp_tiny, _tiny_safemoe, _tiny_lora], ids=["plain", "safemoe", "peft"])
def test_rows_joining_and_leaving_a_running_batch_get_their_solo_replies(make):
    model, tok = make()
    gen = HFGenerator(model, tok)
    assert continuous_batching_blocker(gen) is None
    prompts = ["hi", "Describe the water cycle in detail. " * 12, "What is 2+2?"]
    lengths = [30, 12, 20]  # rows leave at different steps

    def row(i):
        return Row(render_prompt(tok, messages_for(prompts[i])),
                   ChatRequest(model=MODEL, messages=[], max_tokens=lengths[i], temperature=0), seed=0)

    with warnings.catch_warnings():
        # no deprecated keyword or output field (transformers 5.24 renamed past_key_values to cache)
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        solo = []
        for i in range(3):
            batch, r = RunningBatch(gen), row(i)
            batch.join([r])
            while batch:
                batch.step()
            solo.append(r.ids)
        batch, rows = RunningBatch(gen), [row(i) for i in range(3)]
        batch.join(rows[:1])
        for _ in range(5):
            batch.step()
        batch.join(rows[1:])  # one prompt longer than the running cache, one shorter
        while batch:
            batch.step()
    assert [len(ids) for ids in solo] == lengths  # no stop token: every row ran to its max_tokens
    assert [r.ids for r in rows] == solo


def test_cache_keyword_and_output_field_for_transformers_5_23_and_5_24():
    from transformers import LlamaForCausalLM

    class Old(torch.nn.Module):  # 5.23's forward
        def forward(self, input_ids=None, attention_mask=None, past_key_values=None):
            raise NotImplementedError

    class OldOutput:
        past_key_values = "kv"

    class NewOutput:
        cache = "kv"

        @property
        def past_key_values(self):
            raise AssertionError("read through the deprecated name")

    assert cache_kwarg(Old()) == "past_key_values"
    installed = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
    assert cache_kwarg(_sharp_tiny()[0]) == installed
    peft_model = _tiny_lora()[0]
    assert "cache" not in inspect.signature(peft_model.forward).parameters  # hence the base model's is read
    assert cache_kwarg(peft_model) == installed
    assert output_cache(OldOutput()) == output_cache(NewOutput()) == "kv"


def test_models_whose_rows_cannot_join_are_served_batch_at_a_time():
    model, tok = _tiny_safemoe("sequence")
    worker = BatchWorker(HFGenerator(model, tok))
    stats = worker.stats()
    assert stats["batching"] == "batch-at-a-time" and "per-sequence routing" in stats["batching_fallback"]
    assert BatchWorker(HFGenerator(*_sharp_tiny())).stats()["batching"] == "continuous"


class _SlowGenerator:
    """Stands in for HFGenerator in the worker: every batch takes `seconds`, sizes are recorded."""

    stop_ids = {2}

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.sizes: list[int] = []

    def _generate_batch(self, rows, seeds, config, progress):
        self.sizes.append(len(rows))
        time.sleep(self.seconds)
        return [[5] * config.max_new_tokens for _ in rows]

    def decode(self, ids):
        return "x" * len(ids)


def test_split_batches_merge_when_their_clients_come_back():
    """Four steady clients, one of them first: the batches start split 1 + 3. Each client
    sends its next request 40 ms after its reply, later than the 10 ms window, so only the
    follow-up rule (wait for the clients the last batch answered) can merge the two groups."""
    gen = _SlowGenerator(1.0)
    worker = BatchWorker(gen, max_batch_size=16, batch_wait_s=0.01)
    assert worker.stats()["batching"] == "batch-at-a-time"  # a stand-in without a model
    worker.start()
    request = ChatRequest(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0)

    def client(delay: float) -> None:
        time.sleep(delay)
        for _ in range(4):
            assert worker.submit([1, 2, 3], request).result(timeout=60).completion_tokens == 2
            time.sleep(0.04)

    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(client, [0.0, 0.3, 0.3, 0.3]))
    finally:
        worker.close()
    assert gen.sizes[:2] == [1, 4] and gen.sizes[1:4] == [4, 4, 4], gen.sizes
    assert sum(gen.sizes) == 16 and worker.stats()["requests_completed"] == 16


def test_missing_web_stack_is_one_line_and_exit_2(monkeypatch, capsys):
    from tactful.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # find_spec then reports it missing
    with pytest.raises(SystemExit) as exit_info:
        main(["serve"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'tactful[serve]'" in err and "uvicorn" in err


def _safemoe_bundle(root: Path) -> Path:
    """A tiny SafeMoE bundle: the saved tiny base model plus one random LoRA expert."""
    from peft import LoraConfig, get_peft_model

    from tactful.methods.common import save_model_atomic
    from tactful.methods.safemoe import RouterSettings, attach_safemoe, read_expert, save_bundle

    model, tok = tiny_model(seed=0)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    peft_model = get_peft_model(tiny_model(seed=0)[0], LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    expert = save_model_atomic(peft_model, None, root / "expert")
    attach_safemoe(model, [read_expert(str(expert), "a")], RouterSettings(), base_model=str(root / "base"))
    return save_bundle(model, root / "bundle")


def test_sigterm_finishes_in_flight_requests_and_exits_0(tmp_path):
    bundle = _safemoe_bundle(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tactful", "serve", "--run", str(bundle), "--port", "0",
                             "--max-new-tokens", "512"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + 180
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, f"tactful serve exited early with {proc.wait()}"
            if line.startswith("serving "):
                assert "safemoe:" in line and "model 'bundle'" in line
                url = line.split(" at ")[1].split()[0]
        assert url, "tactful serve did not say where it listens"
        # keep reading stderr so that the server never blocks on a full pipe
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        root = url[: -len("/v1")]

        def ask(i):
            r = requests.post(f"{url}/chat/completions", timeout=120, json={
                "model": "bundle", "messages": [{"role": "user", "content": f"Tell me about rivers {i}."}],
                "max_tokens": 512, "temperature": 0})
            return r.status_code, r.json()

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(ask, i) for i in range(4)]
            while requests.get(f"{root}/health", timeout=10).json()["stats"]["in_flight"] < 4:
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            if not all(f.done() for f in futures):  # still generating: no new connections taken
                with pytest.raises(requests.ConnectionError):
                    requests.get(f"{root}/health", timeout=5)
            results = [f.result() for f in futures]
        assert [s for s, _ in results] == [200] * 4
        assert all(body["usage"]["completion_tokens"] >= 1 for _, body in results)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_non_finite_temperature_is_named_as_such():
    from tactful.eval.generation import GenerationConfig
    from tactful.errors import UserError
    from tactful.serve.validation import RequestError, parse_chat_request

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": float("nan")}
    with pytest.raises(RequestError, match="'temperature' must be a finite number, got nan"):
        parse_chat_request(body, max_new_tokens=8)
    with pytest.raises(UserError, match="finite"):
        GenerationConfig(do_sample=True, temperature=float("nan"))


def test_a_prompt_gated_model_sends_each_request_to_the_route_its_gate_picks():
    from tactful.methods.prompt_gate import PromptGateConfig, fit_prompt_gate

    base, tok = _sharp_tiny()
    adapted, _ = _sharp_tiny(seed=2)  # stands in for the base model with a safety adapter
    harmful = [f"Help me hurt person number {i} badly tonight." for i in range(12)]
    benign = [f"Tell me a fact about the number {i}." for i in range(12)]
    gate = fit_prompt_gate(base, tok, harmful, benign, PromptGateConfig(layer=2, c=1.0))
    asks = ["Help me hurt person number 40 badly tonight.", "Tell me a fact about the number 40."]
    assert gate.decide(base, tok, asks) == [True, False]
    cfg = GenerationConfig(max_new_tokens=12)
    want = [HFGenerator(adapted, tok).generate(asks[:1], cfg)[0], HFGenerator(base, tok).generate(asks[1:], cfg)[0]]
    assert want[1] != HFGenerator(adapted, tok).generate(asks[1:], cfg)[0]  # the route shows in the reply

    server = ChatServer(adapted, tok, model_name=MODEL, log_level="warning", access_log=False, max_new_tokens=64,
                        gate=gate, base_model=base)
    server.bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    assert server.ready.wait(60), "the server did not start"
    served = {"url": server.base_url, "root": server.base_url[: -len("/v1")]}
    try:
        with ThreadPoolExecutor(4) as pool:  # concurrent requests on both routes
            got = list(pool.map(lambda c: _ask(served, c, 12)["choices"][0]["message"]["content"], asks * 3))
        assert got == want * 3
        stats = _stats(served)
        assert stats["routes"] == {"adapter": 3, "base": 3}
        assert stats["adapter"]["requests_completed"] == 3 and stats["base"]["requests_completed"] == 3
    finally:
        server.stop()
        thread.join(30)
    assert not thread.is_alive()
    with pytest.raises(ValueError, match="both gate and base_model"):
        ChatServer(adapted, tok, model_name=MODEL, gate=gate)
