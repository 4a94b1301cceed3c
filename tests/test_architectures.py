"""The architecture matrix: tiny random-weight Llama, Qwen2, Qwen3, Gemma2, Gemma3 (text), Mistral
and Phi-3 models built from configs (no network), each saved with a chat template.

For every architecture: SAE capture takes exactly the input of the attention output projection
(checked against a hook placed by hand), SafeMoE routes every linear of every decoder layer, and
each method (sft, dcr, dpo, shapo, trace, safemoe, refusal_guard) runs 1-2 optimiser steps through
the recipe loader, saves, reloads through the run loader and generates. The full method x
architecture product is marked `slow`; the default run covers every method and every
architecture along a diagonal (each method on two architectures, each architecture >= 2 methods).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tactful import architectures
from tactful.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "src" / "tactful"
ARCHS = ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "mistral", "phi3"]
METHODS = ["sft", "dcr", "dpo", "shapo", "trace", "safemoe", "refusal_guard"]
N_LAYERS = 2
# ChatML, set explicitly (rather than relying on the tokenizer file) so every model carries one.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _config(arch: str, tok: Any) -> Any:
    """Hidden 64, 2 layers, 4 heads, 2 KV heads. Qwen3 and Gemma3 get head_dim 32, so the attention
    output (4 * 32 = 128) is wider than the residual stream: a hook on the wrong module shows."""
    import transformers as tf

    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32)
    if arch == "gemma2":  # soft-capping stays on (the defaults), as in the released models
        return tf.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=32)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=32, query_pre_attn_scalar=32, sliding_window=32)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=32)
    if arch == "phi3":
        return tf.Phi3Config(**common)
    raise AssertionError(arch)


def _build(arch: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    from tactful.models import load_tokenizer

    tok = load_tokenizer("embedded")
    tok.chat_template = CHATML
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(arch, tok))
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def arch_model():
    """arch -> (model, tokenizer), built once per module (each test must leave the model unchanged)."""
    cache: dict[str, tuple[Any, Any]] = {}

    def get(arch: str) -> tuple[Any, Any]:
        if arch not in cache:
            cache[arch] = _build(arch)
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def arch_dir(tmp_path_factory, arch_model):
    """arch -> a saved model directory (what a recipe's `model:` names)."""
    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            model, tok = arch_model(arch)
            d = tmp_path_factory.mktemp(f"arch-{arch}")
            model.save_pretrained(str(d))
            tok.save_pretrained(str(d))
            cache[arch] = str(d)
        return cache[arch]

    return get


def _prompt_batch(tok: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    from tactful.methods.refusal_guard.capture import tokenize_texts
    from tactful.models import format_prompt

    return tokenize_texts(tok, [format_prompt(tok, p) for p in prompts], max_length=64)


# ---------------------------------------------------------------- the adapter module, per architecture


EXPECTED_TYPE = {"gemma3": "gemma3_text"}


@pytest.mark.parametrize("arch", ARCHS)
def test_sae_capture_is_the_attention_output_projection_input(arch, arch_model):
    from tactful.methods.refusal_guard.capture import attention_sites, forward_capture, head_layout

    model, tok = arch_model(arch)
    assert model.config.model_type == EXPECTED_TYPE.get(arch, arch)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    lay = head_layout(model)
    assert (lay.n_heads, lay.n_kv_heads, lay.head_dim) == (4, 2, head_dim)
    batch = _prompt_batch(tok, ["How do I bake bread?", "Name a planet."])
    # the reference: a hook placed by hand on the module every one of these architectures uses
    expected: dict[int, torch.Tensor] = {}
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda _m, args, i=i: expected.__setitem__(i, args[0].detach())) for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    sites = attention_sites(model)
    assert [s.out_name for s in sites] == [f"model.layers.{i}.self_attn.o_proj" for i in range(N_LAYERS)]
    got = forward_capture(model, batch, sites)
    for i in range(N_LAYERS):
        assert got[i].shape == (*batch["input_ids"].shape, 4 * head_dim)
        torch.testing.assert_close(got[i], expected[i])
    # Phi-3's fused qkv_proj writes queries and keys too: no separate value site to guard there
    assert all((s.value_proj is None) == (arch == "phi3") for s in sites)


@pytest.mark.parametrize("arch", ARCHS)
def test_safemoe_routes_every_linear_of_every_decoder_layer(arch):
    from tactful.methods.safemoe.router import ExpertWeights, attach_safemoe

    model, tok = _build(arch)  # its own copy: SafeMoE rewires the model in place
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    g = torch.Generator().manual_seed(0)
    experts = [ExpertWeights(name, {n: (torch.randn(2, m.in_features, generator=g) * 0.1,
                                        torch.randn(m.out_features, 2, generator=g) * 0.1, 1.0)
                                    for n, m in linears.items()}) for name in ("a", "b", "c")]
    batch = _prompt_batch(tok, ["How do I bake bread?", "Name a planet."])
    with torch.no_grad():
        base_logits = model(**batch).logits
    moe = attach_safemoe(model, experts)
    assert list(moe.layers) == [f"model.layers.{i}" for i in range(N_LAYERS)]
    assert sorted(moe.routed) == sorted(linears)
    with moe.record() as rec, torch.no_grad():
        routed_logits = model(**batch).logits
    w = rec.calls[0]
    assert w.shape == (N_LAYERS, *batch["input_ids"].shape, 3)
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-5)
    assert not torch.allclose(routed_logits, base_logits)  # the experts really are in the forward


@pytest.mark.parametrize("arch", ARCHS)
def test_multiple_choice_from_a_shared_context_equals_whole_sequences(arch, arch_model):
    """Each context once and every choice from its KV cache (left-padded contexts, sliding-window
    caches: contexts past the 32-token window) scores what whole sequences score."""
    from tactful.data.records import MCItem
    from tactful.eval.multiple_choice import score_items

    model, tok = arch_model(arch)
    long = "A long preamble about geography, rivers, mountains and the capitals of Europe. " * 4
    items = [MCItem(question="Which is a colour?", choices=["red", "table", "seven apples"], answers=[0]),
             MCItem(question="2+2?", choices=["4", "five and a half"], answers=[0], context=long),
             MCItem(question="Capital of France?", choices=["Paris", "Marseille on the coast"], answers=[0])]
    whole = score_items(model, tok, items, batch_size=16, share_context=False)
    shared = score_items(model, tok, items, batch_size=16, share_context=True)
    for w, s in zip(whole, shared):
        assert s.logps == pytest.approx(w.logps, abs=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_roles_resolve_to_the_architecture_s_modules(arch, arch_model):
    model, _ = arch_model(arch)
    targets = architectures.lora_target_modules(model, architectures.DEFAULT_LORA_ROLES)
    if arch == "phi3":
        assert targets == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    else:
        assert targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # every Linear of a decoder layer is covered, nothing outside them
    linears = {n.rsplit(".", 1)[-1] for n, m in model.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(targets) == linears
    assert architectures.lora_target_modules(model, ["attn_q", "attn_v", "down_proj"]) == (
        ["qkv_proj", "down_proj"] if arch == "phi3" else ["q_proj", "v_proj", "down_proj"])


def test_gpt2_keeps_the_attention_and_mlp_c_proj_apart():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64))
    assert architectures.lora_target_modules(gpt2, ["attn_out", "mlp_down", "mlp_gate"]) == ["attn.c_proj", "mlp.c_proj"]
    assert [n for n, _ in architectures.mlp_down_projections(gpt2)] == ["transformer.h.0.mlp.c_proj",
                                                                      "transformer.h.1.mlp.c_proj"]


def test_an_unknown_architecture_fails_with_one_line_naming_the_piece_and_the_config_field(arch_model):
    from tactful.methods import dcr, shapo
    from tactful.methods.common import LoraSettings, apply_lora
    from tactful.methods.refusal_guard.capture import attention_sites
    from tactful.methods.safemoe.router import hidden_size_of

    model, _ = _build("llama")
    model.config.model_type = "mystery"
    for call, piece in [(lambda: attention_sites(model), "layers"), (lambda: dcr.decoder_layers(model), "layers"),
                        (lambda: shapo.down_projections(model), "layers"), (lambda: hidden_size_of(model), "hidden_size"),
                        (lambda: apply_lora(model, LoraSettings()), "attn_q")]:
        with pytest.raises(UserError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and f"({piece})" in msg and "'mystery' is not in tactful's architecture table" in msg
        assert f'"tactful_architecture": {{"{piece}"' in msg
    # the config field named in the message is the way in: pieces it names win over the table
    model.config.tactful_architecture = {"layers": "model.layers", "attn": "self_attn", "attn_out": "self_attn.o_proj",
                                         "mlp_down": "mlp.down_proj", "hidden_size": "hidden_size",
                                         "num_heads": "num_attention_heads", "num_layers": "num_hidden_layers"}
    assert [s.out_name for s in attention_sites(model, value=False)][0] == "model.layers.0.self_attn.o_proj"
    assert len(shapo.down_projections(model)) == N_LAYERS and hidden_size_of(model) == 64
    with pytest.raises(UserError, match=r"attention value projection \(attn_v\).*tactful_architecture"):
        attention_sites(model, value=True)  # the value-side guard needs attn_v, which is still missing
    # a piece the table names but the model lacks: the modules that are there, and the field to set
    model.config.tactful_architecture = {**model.config.tactful_architecture, "attn_out": "self_attn.wo"}
    with pytest.raises(UserError, match=r"attention output projection \(attn_out\) in layer 0.*no module "
                                        r"'self_attn.wo'; linear modules found: .*o_proj.*tactful_architecture"):
        attention_sites(model, value=False)
    model.config.tactful_architecture = {"attn_out_proj": "x"}
    with pytest.raises(UserError, match="unknown piece 'attn_out_proj'"):
        attention_sites(model)


# Module names (and the layer-list path) that only architectures.py may spell out. guard.py's
# SIDES are the values of the `guard.sides` option (which side of the attention is guarded),
# not module look-ups, and keep their historical spelling.
_PROJ = r"q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj|c_proj|c_attn"
# a projection's name anywhere; a block's name (a bare "mlp" is also a judge head type) only in a dotted path
_NAMES = re.compile(rf"(^|\.)({_PROJ})(\.|$)|(self_attn|mlp|embed_tokens)\.|\.(self_attn|mlp|embed_tokens)$|"
                    r"model\.layers|transformer\.h\b")
_ALLOWED = {("methods/refusal_guard/guard.py", "o_proj"), ("methods/refusal_guard/guard.py", "v_proj")}


def test_no_module_outside_architectures_py_spells_a_model_s_module_names():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "architectures.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and " " not in node.value
                    and _NAMES.search(node.value) and (rel, node.value) not in _ALLOWED):
                offenders.append(f"{rel}:{node.lineno}: {node.value!r}")
            # attribute access such as model.model.layers or layer.self_attn.o_proj
            if isinstance(node, ast.Attribute) and re.fullmatch(rf"{_PROJ}|self_attn|mlp|embed_tokens", node.attr):
                offenders.append(f"{rel}:{node.lineno}: .{node.attr}")
    assert not offenders, "\n".join(offenders)


# ---------------------------------------------------------------- every method on every architecture


def _training(steps: int = 1, batch: int = 4) -> dict[str, Any]:
    return {"max_steps": steps, "per_device_train_batch_size": batch, "logging_steps": 1, "save_steps": 1000,
            "warmup_ratio": 0.0, "lr_scheduler_type": "constant", "learning_rate": 1e-3, "max_length": 64}


def _recipe(method: str, base: str, out: Path) -> dict[str, Any]:
    """A 1-2 step recipe; LoRA targets are roles (or the default), resolved per architecture."""
    lora = {"r": 2, "alpha": 4}
    pairs = {"sources": ["builtin-refusal-pairs"], "n": 4, "max_new_tokens": 6, "refusal_filter": None}
    r: dict[str, dict[str, Any]] = {
        "sft": {"data": {"max_examples": 8}, "lora": lora, "training": _training()},
        "dpo": {"data": pairs, "lora": {**lora, "target_modules": ["attn_q", "attn_v", "mlp_down"]},
                "training": _training()},
        "shapo": {"data": pairs, "lora": {**lora, "target_modules": ["attn_q", "attn_v", "mlp_down"]},
                  "probe": {"max_examples": 12, "steps": 5},
                  "shapo": {"mask_fraction": 0.05, "sam_interval": 2, "perturbation": "sam", "rho": 0.5},
                  "training": _training(steps=2)},
        "trace": {"data": {"sources": ["builtin-terse-pairs"], "n": 4},
                  "trace": {"judge_options": {"refusal": "string-xstest"}, "gold_batch_size": 4, "scoring_batch_size": 4},
                  "lora": {**lora, "dropout": 0.0}, "training": _training()},
        "dcr": {"stage1": {"eval_split": None, "gradient_coupling": False, "layer": 0, "lora": lora,
                           "training": _training(steps=1, batch=8)},
                "sft": {"data": {"max_examples": 4}, "lora": {**lora, "target_modules": ["attn_out"]},
                        "training": _training()}},
        "safemoe": {"domains": ["violence", "cybercrime"],
                    "corpus": {"judge": "string-xstest", "prompts_per_domain": 2, "samples_per_prompt": 2,
                               "temperature": 1.0, "max_new_tokens": 6, "min_per_domain": 2, "batch_size": 8},
                    "experts": {"lora": lora, "training": _training(batch=2)},
                    "router_data": {"max_examples": 4}, "router_training": _training()},
        "refusal_guard": {"sae": {"layers": [0, 1], "expansion": 2, "k": 8, "steps": 3, "batch_size": 64,
                                  "tokens": 400, "eval_tokens": 64, "capture_batch_size": 16},
                          "features": {"n_refusal": 4, "n_hallucination": 2, "n_prompts": 6, "n_items": 4},
                          "data": {"max_examples": 8}, "lora": lora, "training": _training()},
    }
    return {"method": method, "model": base, "output_dir": str(out / method), **r[method]}


# The default run: a diagonal through the matrix, every method and every architecture at least twice.
FAST = {("llama", "sft"), ("qwen2", "dcr"), ("qwen3", "dpo"), ("gemma2", "shapo"), ("gemma3", "trace"),
        ("mistral", "safemoe"), ("phi3", "refusal_guard"),
        ("phi3", "sft"), ("gemma3", "dcr"), ("gemma2", "dpo"), ("phi3", "shapo"), ("qwen2", "trace"),
        ("qwen3", "safemoe"), ("gemma3", "refusal_guard"), ("phi3", "safemoe")}
CASES = [pytest.param(a, m, id=f"{a}-{m}", marks=() if (a, m) in FAST else pytest.mark.slow)
         for a in ARCHS for m in METHODS]


@pytest.mark.parametrize("arch,method", CASES)
def test_method_trains_saves_reloads_and_generates(arch, method, arch_dir, tmp_path):
    from tactful.methods.registry import train_recipe
    from tactful.models import format_prompt
    from tactful.runs import load_run_model, read_manifest

    base = arch_dir(arch)
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(_recipe(method, base, tmp_path / "runs")))
    run = train_recipe(str(path), log=lambda _: None)
    manifest = read_manifest(run.path)
    assert manifest["kind"] == method and manifest.get("status", "complete") == "complete"
    model, tok, _ = load_run_model(run.path)
    assert architectures.unwrap(model).config.model_type == EXPECTED_TYPE.get(arch, arch)
    ids = tok(format_prompt(tok, "Name a planet."), return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 3) and torch.equal(out[0, : ids.shape[1]], ids[0])
    assert torch.isfinite(model(input_ids=out).logits).all()
