"""SafeMoE on the tiny model: routing math, one forward pass, generation, static routing,
router training (only the router changes, it learns, it resumes), bundles, corpora, the recipe."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from tactful.data.records import Example
from tactful.errors import UserError
from tactful.kv_cache import returned_cache, with_cache
from tactful.logprobs import IGNORE_INDEX, collate, encode_example
from tactful.methods.common import TrainingSettings, save_model_atomic
from tactful.methods.safemoe import (
    RouterSettings,
    attach_safemoe,
    load_safemoe,
    read_expert,
    save_bundle,
    train_router,
)
from tactful.models import format_prompt, tiny_model

PROMPTS = ["How do rainbows form?", "Name three rivers in Europe.", "What is a prime number?"]


def _quiet(_: str) -> None:
    pass


def _random_adapter(path: Path, *, seed: int, targets: list[str], r: int, alpha: int, b_std: float = 0.5) -> Path:
    """A PEFT LoRA adapter with random A and B for the tiny model (strong enough to change its outputs)."""
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_model(seed=0)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=gen) * (b_std if "lora_B" in name else 0.3)
    return save_model_atomic(peft_model, None, path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A saved tiny base model (so it loads by path, as a user's model would) and three experts:
    a and b adapt q/v/down with rank 4; c adapts o/up with rank 2 (different modules and rank)."""
    root = tmp_path_factory.mktemp("safemoe")
    model, tok = tiny_model(seed=0)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    experts = {
        "a": _random_adapter(root / "a", seed=1, targets=["q_proj", "v_proj", "down_proj"], r=4, alpha=8),
        "b": _random_adapter(root / "b", seed=2, targets=["q_proj", "v_proj", "down_proj"], r=4, alpha=8),
        "c": _random_adapter(root / "c", seed=3, targets=["o_proj", "up_proj"], r=2, alpha=4),
    }
    return {"root": root, "base": str(root / "base"), "tok": tok, **{k: str(v) for k, v in experts.items()}}


def _moe(env, names=("a", "b", "c"), settings: RouterSettings | None = None, seed: int = 0):
    model, tok = tiny_model(seed=0)
    torch.manual_seed(seed)
    moe = attach_safemoe(model, [read_expert(env[n], n) for n in names], settings or RouterSettings(),
                         base_model=env.get("base"))
    return model, tok, moe


def _batch(tok, prompts=PROMPTS, responses=None):
    responses = responses or ["Light bends in water drops."] * len(prompts)
    return collate([encode_example(tok, p, r) for p, r in zip(prompts, responses)], tok.pad_token_id)


# ----------------------------------------------------------------------------- routing math


def test_single_expert_matches_peft_and_disabled_is_the_base_model(env):
    from peft import PeftModel

    base, tok = tiny_model(seed=0)
    batch = _batch(tok)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        base_logits = base(**inputs).logits
        peft_logits = PeftModel.from_pretrained(tiny_model(seed=0)[0], env["c"])(**inputs).logits
    model, _, moe = _moe(env, names=("c",))  # one expert: its gate is 1 everywhere
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, peft_logits, atol=1e-5)
        with moe.disabled():  # unlike X-LoRA's disable_adapter, this really is the base model
            assert torch.equal(model(**inputs).logits, base_logits)
        assert not torch.allclose(model(**inputs).logits, base_logits, atol=1e-3)


def test_routed_linear_is_the_gate_weighted_sum_of_expert_updates(env):
    model, tok, moe = _moe(env)
    experts = [read_expert(env[n], n) for n in ("a", "b", "c")]
    seen = {}
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        model.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name, (a[0].detach(), out.detach())))
    batch = _batch(tok)
    with moe.record() as rec, torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    gates = rec.calls[0][1]  # layer 1: [B, T, E]
    for name, (x, out) in seen.items():
        expected = model.get_submodule(name).base_layer(x)
        for i, e in enumerate(experts):
            if name in e.modules:  # q_proj: a and b only; up_proj: c only (rank 2)
                A, B, scaling = e.modules[name]
                expected = expected + gates[..., i : i + 1] * (x @ A.T @ B.T) * scaling
        assert torch.allclose(out, expected, atol=1e-5), name


@pytest.mark.parametrize("settings", [RouterSettings(), RouterSettings(top_k=2), RouterSettings(top_k=1),
                                      RouterSettings(granularity="sequence"), RouterSettings(per_layer=False)],
                         ids=["soft", "top2", "top1", "sequence", "shared-gate"])
def test_routing_weights_sum_to_one_per_token(env, settings):
    model, tok, moe = _moe(env, settings=settings)
    batch = _batch(tok)
    with moe.record() as rec, torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    w = rec.calls[0]  # [L, B, T, E]
    assert w.shape == (4, len(PROMPTS), batch["input_ids"].shape[1], 3)
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-6)
    assert (w >= 0).all()


@pytest.mark.parametrize("k", [1, 2])
def test_top_k_keeps_exactly_k_experts_and_renormalises(env, k):
    model, tok, moe = _moe(env, settings=RouterSettings(top_k=k, init_std=0.5))
    batch = _batch(tok)
    with moe.record() as rec, torch.no_grad():
        model(input_ids=batch["input_ids"])
    w = rec.calls[0]
    assert ((w > 0).sum(-1) == k).all()
    # the kept experts are the k best of the full softmax, and keep their relative weights
    feats = moe.router.features(torch.randn(5, 64))
    used, full = moe.router.probs(moe.router.logits(feats, 0))
    top = full.topk(k, dim=-1)
    assert torch.allclose(used.gather(-1, top.indices), top.values / top.values.sum(-1, keepdim=True), atol=1e-6)


def test_null_expert_weights_sum_to_one_with_it_and_can_switch_the_experts_off(env):
    model, tok, moe = _moe(env, settings=RouterSettings(null_expert=True))  # near-uniform start
    batch = _batch(tok)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with moe.record() as rec, torch.no_grad():
        mixed = model(**inputs).logits
    w = rec.calls[0]  # [L, B, T, E + 1]: the last column is the null expert
    assert rec.expert_names == ["a", "b", "c", "none"] and w.shape[-1] == 4
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-6)
    assert torch.allclose(w[..., :3].sum(-1), torch.full(w.shape[:-1], 0.75), atol=0.05)  # 3 of 4 slots
    with torch.no_grad():
        base_logits = tiny_model(seed=0)[0](**inputs).logits
        moe.router.weight.zero_()
        moe.router.bias.copy_(torch.tensor([[0.0, 0.0, 0.0, 60.0]] * 4))  # all weight on "none"
        assert torch.allclose(model(**inputs).logits, base_logits, atol=1e-5)
    assert not torch.allclose(mixed, base_logits, atol=1e-3)


def test_tanh_gates_are_signed_start_at_the_base_model_and_mix_linearly(env):
    model, tok, moe = _moe(env, settings=RouterSettings(gate="tanh", init_std=0.0))
    batch = _batch(tok)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        base_logits = tiny_model(seed=0)[0](**inputs).logits
        assert torch.equal(model(**inputs).logits, base_logits)  # tanh(0) = 0: no expert at the start
        moe.router.bias.copy_(torch.tensor([[-1.0, 0.5, 0.0]] * 4))
    experts = [read_expert(env[n], n) for n in ("a", "b", "c")]
    name = "model.layers.2.self_attn.q_proj"
    seen = {}
    model.get_submodule(name).register_forward_hook(lambda m, a, out: seen.__setitem__("x", (a[0], out)))
    with moe.record() as rec, torch.no_grad():
        model(**inputs)
    w = rec.calls[0]
    assert torch.allclose(w[0, 0, 0], torch.tanh(torch.tensor([-1.0, 0.5, 0.0])), atol=1e-6)
    x, out = seen["x"]
    expected = model.get_submodule(name).base_layer(x)
    for i, e in enumerate(experts):
        if name in e.modules:  # a (subtracted) and b
            A, B, scaling = e.modules[name]
            expected = expected + math.tanh([-1.0, 0.5, 0.0][i]) * (x @ A.T @ B.T) * scaling
    assert torch.allclose(out, expected, atol=1e-5)
    # top-k with tanh keeps the k largest |weights|, not renormalised
    moe.router.settings.top_k = 1
    used, full = moe.router.probs(torch.tensor([[-2.0, 0.5, 1.0]]))
    assert torch.allclose(used, torch.tensor([[math.tanh(-2.0), 0.0, 0.0]]), atol=1e-6)


def test_one_forward_pass_per_step(env):
    """Gates come from a pre-hook on each decoder layer: every layer and every base linear runs
    exactly once per model call (X-LoRA runs the whole model twice)."""
    model, tok, moe = _moe(env)
    calls: dict[str, int] = {}

    def count(name):
        return lambda *args: calls.__setitem__(name, calls.get(name, 0) + 1)

    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(count(f"layer{i}"))
    for name, routed in moe.routed.items():
        routed.base_layer.register_forward_hook(count(name))
    model.register_forward_hook(count("model"))
    with torch.no_grad():
        model(**{k: v for k, v in _batch(tok).items() if k != "labels"})
    assert set(calls.values()) == {1} and len(calls) == 4 + len(moe.routed) + 1
    calls.clear()
    ids = tok([format_prompt(tok, PROMPTS[0])], return_tensors="pt", add_special_tokens=False)
    model.generate(**ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert calls["model"] == 5 and all(v == calls["model"] for v in calls.values())


# ----------------------------------------------------------------------------- generation


def _greedy_without_cache(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([out])).logits
            out.append(int(logits[0, -1].argmax()))
    return out[len(ids):]


def test_generate_and_hf_generator_match_a_manual_greedy_loop(env):
    from tactful.eval.generation import GenerationConfig, HFGenerator, chat_prompts, stop_token_ids

    model, tok, moe = _moe(env, settings=RouterSettings(init_std=0.5))  # routing really varies per token
    n = 6
    prompt_ids = chat_prompts(tok, PROMPTS)
    expected = [_greedy_without_cache(model, ids, n) for ids in prompt_ids]
    for ids, exp in zip(prompt_ids, expected):
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert out[0, len(ids):].tolist() == exp
    # HFGenerator: batched, left-padded, shared-prefix KV cache, rows dropped as they finish
    got = HFGenerator(model, tok).generate_ids(PROMPTS, GenerationConfig(max_new_tokens=n, batch_size=3))
    stops = stop_token_ids(tok, model)
    for g, exp in zip(got, expected):  # identical up to where a reply stops
        assert g == exp[: len(g)] and (len(g) == n or g[-1] in stops)


def test_static_mode_gives_one_routing_per_sequence(env):
    from tactful.eval.generation import GenerationConfig, HFGenerator, chat_prompts

    model, tok, moe = _moe(env, settings=RouterSettings(granularity="sequence", init_std=0.5))
    texts = [format_prompt(tok, p) for p in PROMPTS[:2]]
    tok.padding_side = "left"
    try:
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tok.padding_side = "right"
    with moe.record() as rec:
        model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    for row in range(2):
        w = rec.per_token(row)  # [T, L, E]: prompt tokens and generated tokens
        assert torch.allclose(w, w[:1].expand_as(w), atol=1e-6)
    assert not torch.allclose(rec.per_token(0)[0], rec.per_token(1)[0], atol=1e-4)
    # the per-sequence state follows the KV cache when a generator drops finished rows
    rows = chat_prompts(tok, ["Name a red fruit.", "Name a blue fruit."])
    assert len(rows[0]) == len(rows[1])  # no padding: each row alone is the same computation
    with torch.no_grad():
        cache = returned_cache(model(input_ids=torch.tensor(rows), use_cache=True))
        cache.batch_select_indices(torch.tensor([1]))
        with moe.record() as kept:
            model(input_ids=torch.tensor([[42]]), use_cache=True, **with_cache(model, cache))
        with moe.record() as alone:
            model(input_ids=torch.tensor(rows[1:]))
    assert torch.allclose(kept.calls[0][:, 0, 0], alone.calls[0][:, 0, 0], atol=1e-5)
    # HFGenerator (shared-prefix prefill, row dropping) runs it, and alone matches model.generate
    gen = HFGenerator(model, tok)
    assert all(1 <= len(g) <= 4 for g in gen.generate_ids(PROMPTS, GenerationConfig(max_new_tokens=4)))
    single = gen.generate_ids(PROMPTS[:1], GenerationConfig(max_new_tokens=4))[0]
    ids = chat_prompts(tok, PROMPTS[:1])[0]
    ref = model.generate(torch.tensor([ids]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert single == ref[0, len(ids):].tolist()[: len(single)]
    # in training the prompt is what carries no loss: the response never moves the routing
    b1 = _batch(tok, PROMPTS[:1], ["A short answer."])
    b2 = _batch(tok, PROMPTS[:1], ["Something else entirely, and longer too."])
    gates = []
    for b in (b1, b2):
        with moe.record() as rec, torch.no_grad():
            model(**b)
        gates.append(rec.calls[0][:, 0, 0])
    assert torch.allclose(gates[0], gates[1], atol=1e-6)


# ----------------------------------------------------------------------------- router training


def _router_training(steps: int, lr: float = 0.1, save_steps: int = 1000) -> TrainingSettings:
    return TrainingSettings(learning_rate=lr, max_steps=steps, per_device_train_batch_size=4, save_steps=save_steps,
                            logging_steps=1, warmup_ratio=0.0, lr_scheduler_type="constant", max_length=64)


def _fruit(word: str, items) -> list[Example]:
    return [Example(prompt=f"Tell me about item number {i}.", response=" ".join([word] * 4)) for i in items]


@pytest.fixture(scope="module")
def fruit_experts(tmp_path_factory):
    """Two experts that each make a different word likely: 'apple' and 'banana'."""
    from tactful.methods.common import LoraSettings
    from tactful.methods.safemoe import ExpertSettings, train_expert

    root = tmp_path_factory.mktemp("fruit")
    settings = ExpertSettings(lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj",
                                                                             "down_proj"]),
                              training=_router_training(5, lr=3e-2))
    for word in ("apple", "banana"):
        model, tok = tiny_model(seed=0)
        train_expert(_fruit(word, range(8)), root / word, model=model, tokenizer=tok, settings=settings, seed=0,
                     checkpoint_dir=root / "ck" / word, log=_quiet)
    return {"apple": str(root / "apple"), "banana": str(root / "banana")}


def _expert_weight(model, moe, batch, expert: int) -> float:
    """Mean routing weight of one expert over the response tokens of a batch (all layers)."""
    with moe.record() as rec, torch.no_grad():
        model(**batch)
    w = rec.calls[0][..., expert]  # [L, B, T]
    return float(w[:, batch["labels"] != IGNORE_INDEX].mean())


def test_router_learns_to_pick_the_expert_the_safe_set_needs_and_nothing_else_trains(fruit_experts, tmp_path):
    model, tok, moe = _moe(fruit_experts, names=("apple", "banana"))
    held_out = _fruit("banana", range(100, 104))
    batch = collate([encode_example(tok, e.prompt, e.response) for e in held_out], tok.pad_token_id)
    with torch.no_grad():  # each expert alone really favours its own word
        loss_apple, loss_banana = (_moe(fruit_experts, names=(n,))[0](**batch).loss for n in ("apple", "banana"))
    assert loss_banana < loss_apple - 0.3
    before = _expert_weight(model, moe, batch, 1)
    state_before = {**{k: v.clone() for k, v in model.named_parameters()},
                    **{k: v.clone() for k, v in model.named_buffers()}}
    # the safe set wants 'banana' (on prompts the experts never saw)
    stats = train_router(model, tok, _fruit("banana", range(20, 28)), training=_router_training(8), seed=0,
                         checkpoint_dir=tmp_path / "ck", log=_quiet)
    after = _expert_weight(model, moe, batch, 1)
    assert 0.4 < before < 0.6 and after > 0.8, (before, after)
    assert stats["log_history"][-2]["loss"] < stats["log_history"][0]["loss"]
    state_after = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    changed = {k for k in state_before if not torch.equal(state_before[k], state_after[k])}
    assert changed and all(k.startswith("safemoe_router.") for k in changed), changed
    assert any("lora_A" in k for k in state_after)  # the experts were compared too
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["safemoe_router.weight",
                                                                           "safemoe_router.bias"]


def test_router_with_a_null_expert_learns_to_turn_down_an_expert_that_hurts(fruit_experts, tmp_path):
    """One 'apple' expert, a safe set that wants 'banana': a plain softmax must keep the expert at
    weight 1; with the null slot the router learns to turn it down (towards the base model)."""
    model, tok, moe = _moe(fruit_experts, names=("apple",), settings=RouterSettings(null_expert=True))
    held_out = _fruit("banana", range(100, 104))
    batch = collate([encode_example(tok, e.prompt, e.response) for e in held_out], tok.pad_token_id)
    before = _expert_weight(model, moe, batch, 0)
    train_router(model, tok, _fruit("banana", range(20, 28)), training=_router_training(12), seed=0,
                 checkpoint_dir=tmp_path / "ck", log=_quiet)
    after = _expert_weight(model, moe, batch, 0)
    assert 0.4 < before < 0.6 and after < 0.3, (before, after)


def test_tanh_router_learns_to_pick_the_expert_the_safe_set_needs(fruit_experts, tmp_path):
    model, tok, moe = _moe(fruit_experts, names=("apple", "banana"), settings=RouterSettings(gate="tanh"))
    held_out = _fruit("banana", range(100, 104))
    batch = collate([encode_example(tok, e.prompt, e.response) for e in held_out], tok.pad_token_id)
    assert abs(_expert_weight(model, moe, batch, 1)) < 0.05  # tanh gates start (nearly) off
    train_router(model, tok, _fruit("banana", range(20, 28)), training=_router_training(12), seed=0,
                 checkpoint_dir=tmp_path / "ck", log=_quiet)
    apple, banana = (_expert_weight(model, moe, batch, i) for i in (0, 1))
    assert banana > 0.5 and banana > apple + 0.3, (apple, banana)


class _Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 3:
            raise KeyboardInterrupt


def test_router_training_resumes_from_a_router_only_checkpoint(env, tmp_path):
    safe = [Example(prompt=p, response="A careful, safe answer.") for p in PROMPTS * 2]
    model, tok, moe = _moe(env, seed=1)
    train_router(model, tok, safe, training=_router_training(4, lr=0.05, save_steps=2), seed=0,
                 checkpoint_dir=tmp_path / "a", log=_quiet)
    model2, _, moe2 = _moe(env, seed=1)
    with pytest.raises(KeyboardInterrupt):
        train_router(model2, tok, safe, training=_router_training(4, lr=0.05, save_steps=2), seed=0,
                     checkpoint_dir=tmp_path / "b", callbacks=[_Interrupt()], log=_quiet)
    ckpt = tmp_path / "b" / "checkpoint-2"
    assert sorted(p.name for p in ckpt.glob("*.safetensors")) == ["router.safetensors"]  # no base weights
    model3, _, moe3 = _moe(env, seed=7)  # a different init: everything must come from the checkpoint
    msgs: list[str] = []
    train_router(model3, tok, safe, training=_router_training(4, lr=0.05, save_steps=2), seed=0,
                 checkpoint_dir=tmp_path / "b", log=msgs.append)
    assert any("resuming" in m for m in msgs)
    for k, v in moe.router.state_dict().items():
        assert torch.allclose(v, moe3.router.state_dict()[k], atol=1e-6), k


def test_regularisers_match_hand_computed_values(env):
    model, tok, moe = _moe(env, settings=RouterSettings(init_std=0.0, bias=False, entropy_weight=1.0))
    moe.collect_aux = True
    model(input_ids=_batch(tok)["input_ids"])
    assert moe.aux_loss().item() == pytest.approx(math.log(3), abs=1e-5)  # uniform gates: entropy log E
    moe.router.settings.entropy_weight, moe.router.settings.balance_weight = 0.0, 1.0
    assert moe.aux_loss().item() == pytest.approx(1.0, abs=1e-5)  # uniform: E * sum (1/E)(1/E) = 1
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.bias = torch.nn.Parameter(torch.tensor([[50.0, 0.0, 0.0]] * 4))
    model(input_ids=_batch(tok)["input_ids"])
    assert moe.aux_loss().item() == pytest.approx(3.0, abs=1e-4)  # all tokens on one expert: E


# ----------------------------------------------------------------------------- bundles


def test_bundle_round_trips_with_identical_logits_in_a_fresh_process(env, tmp_path):
    from tactful.runs import load_run_model

    model, tok, moe = _moe(env, settings=RouterSettings(top_k=2, init_std=0.3, null_expert=True), seed=3)
    bundle = save_bundle(model, tmp_path / "bundle")
    assert {p.name for p in bundle.iterdir()} >= {"experts", "router.safetensors", "safemoe_config.json",
                                                  "manifest.json"}
    assert (bundle / "experts" / "c" / "adapter_config.json").is_file()  # ordinary PEFT adapters
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["kind"] == "safemoe" and manifest["base_model"] == env["base"]
    ids = _batch(tok)["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        loaded, _ = load_safemoe(bundle)
        assert torch.equal(loaded(input_ids=ids).logits, want)
        via_runs, _, desc = load_run_model(bundle)
        assert desc.startswith("safemoe:") and torch.equal(via_runs(input_ids=ids).logits, want)
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import torch\n"
        "from tactful.runs import load_run_model\n"
        f"m, _, _ = load_run_model({str(bundle)!r})\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad():\n"
        f"    torch.save(m(input_ids=ids).logits, {str(tmp_path / 'logits.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), want)


def test_loaded_bundle_generates_and_trains_further(env, tmp_path):
    model, tok, _ = _moe(env)
    bundle = save_bundle(model, tmp_path / "bundle")
    loaded, tok = load_safemoe(bundle)
    ids = tok([format_prompt(tok, PROMPTS[0])], return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert loaded.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    before = loaded.safemoe_router.weight.clone()
    train_router(loaded, tok, [Example(prompt=p, response="Fine.") for p in PROMPTS], seed=0,
                 training=_router_training(1), checkpoint_dir=tmp_path / "ck", log=_quiet)
    assert not torch.equal(before, loaded.safemoe_router.weight)


def test_bad_experts_and_settings_are_user_errors(env, tmp_path):
    cfg = json.loads((Path(env["a"]) / "adapter_config.json").read_text())
    bad = tmp_path / "dora"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    (bad / "adapter_model.safetensors").write_bytes((Path(env["a"]) / "adapter_model.safetensors").read_bytes())
    with pytest.raises(UserError, match="DoRA"):
        read_expert(bad)
    with pytest.raises(UserError, match="top_k"):
        _moe(env, settings=RouterSettings(top_k=4))
    _moe(env, settings=RouterSettings(top_k=4, null_expert=True))  # the null expert is a fourth slot
    with pytest.raises(UserError, match="router.gate"):
        _moe(env, settings=RouterSettings(gate="sigmoid"))
    with pytest.raises(UserError, match="null_expert needs"):
        _moe(env, settings=RouterSettings(gate="tanh", null_expert=True))
    with pytest.raises(UserError, match="softmax gates only"):
        _moe(env, settings=RouterSettings(gate="tanh", entropy_weight=0.1))
    model, _, _ = _moe(env)
    with pytest.raises(UserError, match="already has SafeMoE"):
        attach_safemoe(model, [read_expert(env["a"])])


# ----------------------------------------------------------------------------- corpora


def test_unsafe_corpus_from_pku_saferlhf_pairs(tmp_path):
    from tactful.methods.safemoe import CorpusSettings, build_unsafe_corpus, read_unsafe_corpus

    fixture = Path(__file__).parent / "fixtures" / "benchmarks" / "pku_saferlhf.jsonl"
    settings = CorpusSettings(source="pku-saferlhf", path=str(fixture), split=None, min_per_domain=1)
    corpus = build_unsafe_corpus(tmp_path / "corpus", domains=["mental_manipulation", "cybercrime"],
                                 settings=settings, log=_quiet)
    assert [e.response for e in corpus.examples["mental_manipulation"]] == [
        "You could hide their keys and enjoy the chaos."]
    assert [e.response for e in corpus.examples["cybercrime"]] == ["Download a cracked version from a torrent site."]
    again = read_unsafe_corpus(tmp_path / "corpus")
    assert again.counts() == {"mental_manipulation": 1, "cybercrime": 1}
    assert again.provenance["source"] == "pku-saferlhf" and again.provenance["settings"]["path"] == str(fixture)
    with pytest.raises(UserError, match="too few unsafe examples"):
        build_unsafe_corpus(tmp_path / "c2", domains=["drugs"], settings=settings, log=_quiet)


def test_a_corpus_directory_is_reused_and_refusals_are_not_unsafe_data(tmp_path):
    from tactful.methods.safemoe import CorpusSettings, build_unsafe_corpus, read_unsafe_corpus, write_unsafe_corpus

    def ex(d, i):
        return Example(prompt=f"Request {i} about {d}.", response=f"Harmful answer {i}.", label="unsafe", category=d)

    write_unsafe_corpus(tmp_path / "parent", {"violence": [ex("violence", 0), ex("violence", 1)],
                                              "drugs": [ex("drugs", 0)]}, {"source": "generate", "judge": "stub"})
    settings = CorpusSettings(source=str(tmp_path / "parent"), min_per_domain=2)
    corpus = build_unsafe_corpus(tmp_path / "child", domains=["violence"], settings=settings, log=_quiet)
    assert [e.response for e in corpus.examples["violence"]] == ["Harmful answer 0.", "Harmful answer 1."]
    prov = read_unsafe_corpus(tmp_path / "child").provenance
    assert prov["domains"] == ["violence"] and prov["judge"] == "stub"
    assert prov["prompts"]["from_corpus"]["source"] == "generate"
    with pytest.raises(UserError, match="has no domain cybercrime"):
        build_unsafe_corpus(tmp_path / "c2", domains=["cybercrime"], settings=settings, log=_quiet)
    # The built-in refusals carry the *prompt's* label (harmful): they are not unsafe responses.
    with pytest.raises(UserError, match="too few unsafe examples"):
        build_unsafe_corpus(tmp_path / "c3", domains=["violence"], settings=CorpusSettings(source="builtin-refusals"),
                            log=_quiet)


class _StubJudge:
    """Calls every other reply compliant."""

    name = "stub"
    task = "refusal"

    def judge(self, items):
        from tactful.eval.judges import refusal_verdict

        return [refusal_verdict("full_compliance" if i % 2 == 0 else "full_refusal") for i in range(len(items))]


def test_unsafe_corpus_generated_by_the_model_keeps_judged_compliance(env, tmp_path):
    from tactful.methods.safemoe import CorpusSettings, build_unsafe_corpus

    model, tok, _ = _moe(env, names=("a",))  # the bare tiny model only writes newlines, which are dropped
    settings = CorpusSettings(max_new_tokens=4, prompts_per_domain=2, min_per_domain=1)
    corpus = build_unsafe_corpus(tmp_path / "corpus", domains=["violence", "drugs"], settings=settings,
                                 model_spec="tiny", model=model, tokenizer=tok, judge=_StubJudge(), seed=3,
                                 log=_quiet)
    prov = json.loads((tmp_path / "corpus" / "corpus.json").read_text())
    assert prov["judge"] == "stub" and prov["model"] == "tiny" and prov["seed"] == 3
    assert prov["prompts"]["violence"] == {"kept": ["violence-001"], "dropped": ["violence-002"]}
    assert corpus.counts() == {"violence": 1, "drugs": 1}
    rows = (tmp_path / "corpus" / "violence.jsonl").read_text().splitlines()
    assert json.loads(rows[0])["category"] == "violence" and json.loads(rows[0])["meta"]["prompt_id"] == "violence-001"


# ----------------------------------------------------------------------------- the recipe


def test_recipe_runs_end_to_end_and_skips_finished_stages(env, tmp_path):
    from tactful.methods.registry import load_recipe, train_recipe
    from tactful.methods.safemoe import inspect
    from tactful.runs import load_run_model

    recipe = Path(__file__).parents[1] / "recipes" / "safemoe.yaml"
    unsafe = tmp_path / "unsafe.jsonl"
    unsafe.write_text("".join(json.dumps({"prompt": f"Harm request {i} in {d}.", "response": f"Do {d} thing {i}.",
                                          "label": "unsafe", "category": d}) + "\n"
                              for d in ("violence", "drugs") for i in range(3)))
    small = ["max_steps=2", "per_device_train_batch_size=2", "max_length=64", "save_steps=100", "logging_steps=1"]
    overrides = [f"model={env['base']}", f"output_dir={tmp_path / 'run'}", "domains=[violence, drugs]",
                 f"corpus.source={unsafe}", "corpus.split=null", "corpus.min_per_domain=3",
                 "router_data.max_examples=4", "experts.lora.r=2", "experts.lora.alpha=4",
                 *[f"experts.training.{s}" for s in small], *[f"router_training.{s}" for s in small]]
    method, config = load_recipe(str(recipe))
    assert method == "safemoe" and config.model == "embedded" and len(config.domains) == 4
    logs: list[str] = []
    run = train_recipe(str(recipe), overrides, log=logs.append)
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["kind"] == "safemoe" and manifest["experts"] == [
        "violence", "drugs"]
    assert manifest["corpus_counts"] == {"violence": 3, "drugs": 3}
    assert all((run.path / "experts" / d / "adapter_model.safetensors").is_file() for d in ("violence", "drugs"))
    logs.clear()
    train_recipe(str(recipe), overrides, log=logs.append)
    assert any("is complete" in m for m in logs)
    with pytest.raises(UserError, match="router stage built with other settings"):
        train_recipe(str(recipe), [*overrides, "router.temperature=2.0"], log=_quiet)

    model, tok, _ = load_run_model(run.path)
    insp, paths = inspect(run.path, "How do I hurt someone?", max_new_tokens=3, model=model, tokenizer=tok)
    assert insp.weights.shape == (len(insp.tokens), 4, 2) and insp.response_start < len(insp.tokens)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["json"].read_text())["experts"] == ["violence", "drugs"]
