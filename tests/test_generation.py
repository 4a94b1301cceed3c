"""Generation backends: the batched HF loop against one-at-a-time `model.generate`, stop
tokens, sampling, and the vLLM request building (tested without vLLM)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from tactful.errors import UserError
from tactful.eval.generation import (
    GenerationConfig,
    Generator,
    HFGenerator,
    VLLMGenerator,
    chat_prompts,
    make_generator,
    stop_token_ids,
    vllm_engine_kwargs,
    vllm_lora_request_args,
    vllm_prompts,
    vllm_sampling_kwargs,
)
from tactful.models import format_prompt, tiny_model

EOS = 2  # <|im_end|>, the embedded tokenizer's EOS and ChatML end of turn

PROMPTS = [
    "hi",
    "Explain how a rainbow forms, in as much detail as you can manage please.",
    "What is 2+2?",
    "Write a short poem about the sea and the sky at night.",
    "ok",
    "Name three colours.",
]


@pytest.fixture(scope="module")
def sharp():
    """The tiny model with larger random weights.

    tiny_model's default init gives near-uniform logits, so it answers every prompt with
    the same token and a test of ordering could not fail. Larger weights make the
    argmax depend on the prompt, with wide margins, so exact token matches are meaningful.
    """
    model, tok = tiny_model(seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 if "embed" in name else 0.3))
    return model, tok


def reference(model, tok, prompt, max_new_tokens, system=None):
    """One prompt alone through transformers' own generate: the behaviour to match."""
    enc = tok(format_prompt(tok, prompt, system=system), return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, enc.input_ids.shape[1] :].tolist()


class ForceEOS:
    """Forward hook: the token after any generated token divisible by 7 is EOS.

    A random model never says EOS by itself; this makes rows stop at different,
    prompt-dependent steps in both our loop and `model.generate`, so stopping and
    dropping finished rows from the batch are exercised against the reference.
    """

    def __init__(self, model):
        self.handle = model.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output):
        ids = kwargs["input_ids"]
        if ids.shape[1] == 1:  # decode steps only: the prompt's last token is always "\n"
            hit = ids[:, -1] % 7 == 0
            output.logits[hit, -1, :] = -1e4
            output.logits[hit, -1, EOS] = 1e4
        return output

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_hf_generator_is_a_generator(sharp):
    assert isinstance(HFGenerator(*sharp, name="hf:tiny"), Generator)


@pytest.mark.parametrize("batch_size,share_prefix", [(1, True), (4, True), (16, True), (4, False)])
def test_batched_equals_one_at_a_time_generate(sharp, batch_size, share_prefix):
    model, tok = sharp
    gen = HFGenerator(model, tok, share_prefix=share_prefix)
    ours = gen.generate_ids(PROMPTS, GenerationConfig(max_new_tokens=10, batch_size=batch_size))
    refs = [reference(model, tok, p, 10) for p in PROMPTS]
    assert ours == refs
    assert len({tuple(r) for r in refs}) == len(PROMPTS)  # the test can tell prompts apart
    assert gen.generate(PROMPTS, GenerationConfig(max_new_tokens=10, batch_size=batch_size)) == [
        tok.decode(r, skip_special_tokens=True) for r in refs
    ]


def test_peft_model_in_training_mode(sharp):
    """A LoRA-wrapped model left in train mode (an eval callback mid-training) generates
    deterministically, like generate() on the same model in eval mode, and stays in train mode."""
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_model(seed=0)
    model.load_state_dict(sharp[0].state_dict())
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.train()
    gen = HFGenerator(peft_model, tok)
    ours = gen.generate_ids(PROMPTS, GenerationConfig(max_new_tokens=6, batch_size=4))
    assert peft_model.training
    peft_model.eval()
    assert ours == [reference(peft_model, tok, p, 6) for p in PROMPTS]
    assert ours != [reference(sharp[0], tok, p, 6) for p in PROMPTS]  # the adapter matters


def test_shared_prefix_prefilled_once(sharp):
    model, tok = sharp
    shapes = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        HFGenerator(model, tok).generate_ids(PROMPTS[:4], GenerationConfig(max_new_tokens=3, batch_size=4))
    finally:
        handle.remove()
    lengths = [len(x) for x in chat_prompts(tok, PROMPTS[:4])]
    # the template header + default system prompt once at batch size 1, then the rest
    assert shapes[0][0] == 1 and shapes[0][1] >= 20
    assert shapes[1] == (4, max(lengths) - shapes[0][1])
    assert shapes[2:] == [(4, 1), (4, 1)]


def test_order_preserved_after_length_sorting(sharp):
    gen = HFGenerator(*sharp)
    cfg = GenerationConfig(max_new_tokens=6, batch_size=3)
    forward = gen.generate(PROMPTS, cfg)
    backward = gen.generate(PROMPTS[::-1], cfg)
    assert backward == forward[::-1]
    assert gen.generate([PROMPTS[1]], cfg) == [forward[1]]


def test_stops_at_eos_like_generate_and_drops_special_tokens(sharp):
    model, tok = sharp
    gen = HFGenerator(model, tok)
    cfg = GenerationConfig(max_new_tokens=16, batch_size=8)
    with ForceEOS(model):
        ours = gen.generate_ids(PROMPTS, cfg)
        refs = [reference(model, tok, p, 16) for p in PROMPTS]
        texts = gen.generate(PROMPTS, cfg)
    assert ours == refs
    stopped = [ids for ids in ours if ids[-1] == EOS]
    assert 0 < len(stopped) < len(ours)  # some rows stop early, others run to the limit
    assert len({len(ids) for ids in ours}) > 1
    for ids, text in zip(ours, texts):
        assert EOS not in ids[:-1]  # nothing generated after a stop token
        if ids[-1] == EOS:
            assert ids[-2] % 7 == 0
        assert "<|im_end|>" not in text
        assert text == tok.decode(ids[:-1] if ids[-1] == EOS else ids, skip_special_tokens=True)


def test_max_new_tokens_respected(sharp):
    gen = HFGenerator(*sharp)
    for n in (0, 1, 5):
        ids = gen.generate_ids(PROMPTS, GenerationConfig(max_new_tokens=n, batch_size=4))
        assert [len(x) for x in ids] == [n] * len(PROMPTS)  # the random model never says EOS
    assert gen.generate(PROMPTS[:2], GenerationConfig(max_new_tokens=0)) == ["", ""]


def test_system_message_goes_through_the_chat_template(sharp):
    model, tok = sharp
    gen = HFGenerator(model, tok)
    cfg = GenerationConfig(max_new_tokens=6, batch_size=4, system="You answer in French.")
    assert gen.generate_ids(PROMPTS, cfg) == [reference(model, tok, p, 6, system=cfg.system) for p in PROMPTS]
    assert chat_prompts(tok, ["hi"], "You answer in French.")[0] == tok(
        format_prompt(tok, "hi", system="You answer in French."), add_special_tokens=False
    ).input_ids


def test_progress_counts_every_prompt_once(sharp):
    gen = HFGenerator(*sharp)
    calls: list[int] = []
    with ForceEOS(sharp[0]):
        gen.generate(PROMPTS, GenerationConfig(max_new_tokens=12, batch_size=4), progress=calls.append)
    assert sum(calls) == len(PROMPTS)
    assert len(calls) > 2  # reported as rows finish, not once at the end
    assert gen.generate([], GenerationConfig()) == []


def test_seeded_sampling_is_deterministic(sharp):
    gen = HFGenerator(*sharp)
    cfg = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=20.0, top_p=0.95, seed=7, batch_size=4)
    a = gen.generate_ids(PROMPTS, cfg)
    assert gen.generate_ids(PROMPTS, cfg) == a
    # A prompt's sample depends on its seed and index, not on how prompts were batched.
    assert gen.generate_ids(PROMPTS, GenerationConfig(**{**cfg.__dict__, "batch_size": 1})) == a
    assert gen.generate_ids(PROMPTS, GenerationConfig(**{**cfg.__dict__, "seed": 8})) != a
    greedy = gen.generate_ids(PROMPTS, GenerationConfig(max_new_tokens=8))
    assert a != greedy
    # temperature 0 means greedy even with do_sample
    assert gen.generate_ids(PROMPTS, GenerationConfig(max_new_tokens=8, do_sample=True, temperature=0.0)) == greedy


def test_top_p_tiny_is_greedy(sharp):
    gen = HFGenerator(*sharp)
    sampled = gen.generate_ids(PROMPTS, GenerationConfig(max_new_tokens=6, do_sample=True, top_p=1e-6, seed=3))
    assert sampled == gen.generate_ids(PROMPTS, GenerationConfig(max_new_tokens=6))


def test_stop_token_ids(sharp):
    _, tok = sharp
    ids = stop_token_ids(tok)
    assert EOS in ids and tok.convert_tokens_to_ids("<|endoftext|>") in ids
    # Unknown markers must not sneak in as the unk id's alias: only real vocabulary.
    assert ids == {EOS, tok.get_vocab()["<|endoftext|>"]}
    model = types.SimpleNamespace(generation_config=types.SimpleNamespace(eos_token_id=[EOS, 42]))
    assert 42 in stop_token_ids(tok, model)


def test_config_validation():
    for bad in ({"batch_size": 0}, {"max_new_tokens": -1}, {"temperature": -0.1}, {"top_p": 0.0}):
        with pytest.raises(UserError):
            GenerationConfig(**bad)


# ---------------------------------------------------------------- vLLM request building


def test_vllm_sampling_kwargs():
    assert vllm_sampling_kwargs(GenerationConfig(max_new_tokens=32)) == {
        "n": 1, "max_tokens": 32, "skip_special_tokens": True, "temperature": 0.0, "top_p": 1.0,
    }
    kw = vllm_sampling_kwargs(GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, seed=4), stop_ids=[2, 0])
    assert (kw["temperature"], kw["top_p"], kw["seed"], kw["stop_token_ids"]) == (0.7, 0.9, 4, [0, 2])


def test_vllm_prompts_are_chat_token_ids_without_double_bos(sharp):
    _, tok = sharp
    reqs = vllm_prompts(tok, ["hi", "there"], system="S")
    assert reqs == [{"prompt_token_ids": ids} for ids in chat_prompts(tok, ["hi", "there"], "S")]
    first = reqs[0]["prompt_token_ids"]
    assert tok.decode(first) == format_prompt(tok, "hi", system="S")
    assert first[:2] != [tok.bos_token_id, tok.bos_token_id]


def test_vllm_lora_and_engine_args(tmp_path):
    assert vllm_lora_request_args(None) is None
    adir = tmp_path / "my-adapter"
    adir.mkdir()
    with pytest.raises(UserError, match="adapter_config.json"):
        vllm_lora_request_args(adir)
    (adir / "adapter_config.json").write_text(json.dumps({"r": 20, "peft_type": "LORA"}))
    assert vllm_lora_request_args(adir) == {"lora_name": "my-adapter", "lora_int_id": 1, "lora_path": str(adir)}
    kw = vllm_engine_kwargs("/models/x", adapter=str(adir), dtype="bfloat16", gpu_memory_utilization=0.5)
    assert kw == {
        "model": "/models/x", "dtype": "bfloat16", "gpu_memory_utilization": 0.5,
        "enable_lora": True, "max_lora_rank": 32, "max_loras": 1,
    }
    assert "enable_lora" not in vllm_engine_kwargs("/models/x")
    with pytest.raises(UserError):
        vllm_engine_kwargs("/models/x", gpu_memory_utilization=1.5)


def test_missing_vllm_is_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(UserError, match=r"pip install 'tactful\[vllm\]'"):
        VLLMGenerator("embedded")
    with pytest.raises(UserError, match="vllm"):  # options for other backends are ignored
        make_generator("vllm", model_spec="embedded", api_key_env="X", base_url=None, dtype="bfloat16")


def test_vllm_without_cuda_is_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA GPU"):
        VLLMGenerator("embedded")


# ---------------------------------------------------------------- factory


def test_make_generator(sharp):
    model, tok = sharp
    gen = make_generator("hf", model=model, tokenizer=tok, name="hf:tiny")
    assert isinstance(gen, HFGenerator) and gen.name == "hf:tiny"
    with pytest.raises(UserError, match="unknown generation backend 'gpt'"):
        make_generator("gpt", model=model, tokenizer=tok)
    with pytest.raises(UserError, match="tokenizer"):
        make_generator("hf", model=model)
    with pytest.raises(UserError):
        make_generator("hf")
    with pytest.raises(UserError, match="base URL"):
        make_generator("openai", api_model="m")
    with pytest.raises(UserError, match="model name"):
        make_generator("openai", base_url="http://127.0.0.1:1/v1")
    with pytest.raises(TypeError, match="tempreature"):
        make_generator("hf", model=model, tokenizer=tok, tempreature=0.5)
    gen = make_generator("openai", base_url="http://127.0.0.1:1/v1", api_model="m", api_key_env=None, dtype="auto",
                         concurrency=3)
    assert gen.concurrency == 3 and gen.client.api_key_env == "OPENAI_API_KEY"


@pytest.mark.parametrize("batch_size", [2, 16])
def test_parallel_workers_match_generate_and_restore_threads(sharp, batch_size):
    """Batches decoded side by side on two threads give generate()'s tokens, in input order,
    and torch's intra-op thread count is what it was before."""
    model, tok = sharp
    threads = torch.get_num_threads()
    gen = HFGenerator(model, tok, workers=2)
    ours = gen.generate_ids(PROMPTS, GenerationConfig(max_new_tokens=10, batch_size=batch_size))
    assert ours == [reference(model, tok, p, 10) for p in PROMPTS]
    assert torch.get_num_threads() == threads


def test_auto_workers_follow_threads_and_avoid_hooked_models(sharp, monkeypatch):
    gen = HFGenerator(*sharp)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert gen._workers(10) == 2
    assert gen._workers(1) == 1  # never more workers than prompts
    with ForceEOS(sharp[0]):  # a hook may keep per-forward state: one batch at a time
        assert gen._workers(10) == 1
    assert HFGenerator(*sharp, workers=3)._workers(10) == 3


def test_an_error_in_a_worker_reaches_the_caller(sharp, monkeypatch):
    gen = HFGenerator(*sharp, workers=2)
    threads = torch.get_num_threads()

    def boom(*a, **k):
        raise RuntimeError("out of memory in batch")

    monkeypatch.setattr(gen, "_generate_batch", boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        gen.generate_ids(PROMPTS, GenerationConfig(max_new_tokens=4, batch_size=2))
    assert torch.get_num_threads() == threads
