"""refusal_guard on the tiny model: capture, SAE, SAELens layout, feature selection, the projection
(LoRA and full fine-tuning with Adam), GQA value-side exactness, Safe LoRA, the pipeline end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tactful.errors import UserError
from tactful.methods.common import LoraSettings, apply_lora
from tactful.methods.refusal_guard.capture import (
    attention_sites,
    forward_capture,
    head_layout,
    position_mask,
    post_instruction_length,
    read_activation_shards,
    stream_activations,
    tokenize_texts,
    write_activation_shards,
)
from tactful.methods.refusal_guard.features import refusal_directions, select_features, top_latents
from tactful.methods.refusal_guard.guard import (
    Subspace,
    SubspaceGuard,
    effective_delta,
    in_space_residual,
    load_subspaces,
    orthonormal_basis,
    out_space_residual,
    projector,
    save_subspaces,
    value_basis,
)
from tactful.methods.refusal_guard.heads import ContrastPair, head_influence, overlapping_heads
from tactful.methods.refusal_guard.safelora import SafeLoraSettings, apply_safe_lora, lora_deltas
from tactful.methods.refusal_guard.sae import (
    SAEConfig,
    SAETrainSettings,
    SparseAutoencoder,
    load_sae,
    load_sae_dir,
    train_saes,
)
from tactful.models import format_prompt, tiny_model

GUARDED = [1, 2]


def _fresh(seed: int = 0):
    return tiny_model(seed=seed)


def _random_subspaces(model, layers=GUARDED, k=3, seed=0) -> dict[int, Subspace]:
    g = torch.Generator().manual_seed(seed)
    layout = head_layout(model)
    return {layer: Subspace.from_directions(layer, torch.randn(layout.d_in, k, generator=g), layout) for layer in layers}


def _lm_batch(tok, n=4):
    from tactful.logprobs import collate, encode_example

    enc = [encode_example(tok, f"Tell me fact number {i}.", f"Fact {i}: water is wet.") for i in range(n)]
    return collate(enc, tok.pad_token_id)


# ---------------------------------------------------------------- capture

def test_capture_matches_manual_attention_forward(tiny):
    """The hooked o_proj input equals z computed by hand from the attention module's weights."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, tok = tiny
    layer = 2
    batch = tokenize_texts(tok, [format_prompt(tok, "What is the capital of France?")], max_length=64)
    captured = forward_capture(model, batch, attention_sites(model, [layer]))[layer]
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[layer]  # input of decoder layer `layer`
        block = model.model.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        lay = head_layout(model)
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, lay.n_heads, lay.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, lay.n_kv_heads, lay.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, lay.n_kv_heads, lay.head_dim).transpose(1, 2)
        cos, sin = model.model.rotary_emb(x, torch.arange(T)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(lay.group_size, dim=1)  # query head h reads KV head h // group_size
        v = v.repeat_interleave(lay.group_size, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(lay.head_dim)
        scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
        z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, lay.d_in)
    assert captured.shape == z.shape
    torch.testing.assert_close(captured, z, atol=1e-5, rtol=1e-4)


def test_positions_on_a_padded_batch(tiny):
    model, tok = tiny
    n_post = post_instruction_length(tok)
    text = format_prompt(tok, "Hi")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[-n_post:]) == "<|im_end|>\n<|im_start|>assistant\n"
    texts = [text, format_prompt(tok, "A much longer question about the history of bread making?")]
    batch = tokenize_texts(tok, texts, max_length=128)
    post = position_mask(batch["attention_mask"], "post_instruction", n_post)
    last = position_mask(batch["attention_mask"], "last")
    assert post.sum(1).tolist() == [n_post, n_post] and last.sum(1).tolist() == [1, 1]
    # padded batch capture == each text captured alone
    both = next(stream_activations(model, tok, texts, layers=[1], positions="last", batch_size=2))[1]
    alone = torch.cat([next(stream_activations(model, tok, [t], layers=[1], positions="last"))[1] for t in texts])
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=1e-4)


def test_capture_streams_to_shards_and_respects_budget(tiny, tmp_path):
    model, tok = tiny
    texts = [format_prompt(tok, f"Question number {i} about cooking?") for i in range(6)]
    stream = stream_activations(model, tok, texts, layers=[0, 3], positions="all", batch_size=2, max_tokens=100)
    out = write_activation_shards(stream, tmp_path / "acts", shard_tokens=32)
    shards = list(read_activation_shards(out, 3))
    assert sum(len(s) for s in shards) == 100 and max(len(s) for s in shards) == 32
    assert json.loads((out / "activations.json").read_text())["tokens"] == {"0": 100, "3": 100}


def test_out_projection_names_and_unfamiliar_models():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64))
    sites = attention_sites(gpt2)
    assert [s.out_name for s in sites] == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]  # not mlp.c_proj
    model, _ = _fresh()
    attn = model.model.layers[0].self_attn
    attn.wo = attn.o_proj
    del attn.o_proj
    with pytest.raises(UserError, match=r"attention output projection.*wo"):
        attention_sites(model, [0])


# ---------------------------------------------------------------- SAE

def _planted_stream(d=32, m=16, active=3, chunks=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(m, d, generator=g)
    feats = feats / feats.norm(dim=1, keepdim=True)

    def stream():
        gg = torch.Generator().manual_seed(seed + 1)
        for _ in range(chunks):
            idx = torch.rand(256, m, generator=gg).argsort(1)[:, :active]
            coef = torch.zeros(256, m).scatter_(1, idx, 0.5 + torch.rand(256, active, generator=gg))
            yield {0: coef @ feats + 0.3}  # sparse non-negative combinations plus an offset

    return feats, stream


@pytest.mark.parametrize("arch", ["topk", "standard"])
def test_sae_learns_planted_features(arch):
    feats, stream = _planted_stream()
    sae = SparseAutoencoder(SAEConfig(d_in=32, d_sae=64, architecture=arch, k=3), seed=0)
    settings = SAETrainSettings(steps=250, batch_size=256, learning_rate=5e-3, l1_coefficient=0.5, buffer_tokens=2048,
                                eval_tokens=512, dead_window_tokens=5000)
    trainer = train_saes({0: sae}, stream, settings, log=lambda _: None)[0]
    metrics = trainer.finish()
    assert trainer.history[-1]["mse"] < 0.1 * trainer.history[0]["mse"]  # reconstruction error fell 10x
    assert metrics.explained_variance > 0.9 and metrics.steps == 250
    assert metrics.l0 == 3 if arch == "topk" else metrics.l0 < 8  # sparse codes
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))  # unit-norm decoder rows
    best = (feats @ sae.decoder_directions(range(64))).max(dim=1).values
    assert best.min() > 0.9, best  # every planted direction has a decoder row aligned with it


def test_sae_saelens_layout_round_trip(tmp_path):
    cfg = SAEConfig(d_in=16, d_sae=48, architecture="topk", k=4, hook_name="blocks.3.attn.hook_z", hook_layer=3,
                    model_name="tiny", hf_module="model.layers.3.self_attn.o_proj")
    sae = SparseAutoencoder(cfg, seed=1)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    sae.save(tmp_path / "layer_03", sparsity=torch.full((48,), -2.0))
    raw = json.loads((tmp_path / "layer_03" / "cfg.json").read_text())
    assert {raw[k] for k in ("d_in", "d_sae", "architecture", "hook_name")} == {16, 48, "topk", "blocks.3.attn.hook_z"}
    assert raw["activation_fn_kwargs"] == {"k": 4} and raw["normalize_activations"] == "none"
    from safetensors.torch import load_file

    shapes = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "layer_03" / "sae_weights.safetensors")).items()}
    assert shapes == {"W_enc": (16, 48), "b_enc": (48,), "W_dec": (48, 16), "b_dec": (16,)}
    back = load_sae(tmp_path / "layer_03")
    x = torch.randn(10, 16)
    torch.testing.assert_close(back.encode(x), sae.encode(x))
    assert back.cfg.hook_layer == 3 and back.cfg.k == 4
    assert list(load_sae_dir(tmp_path)) == [3]


def test_loads_saelens_6_nested_cfg_and_rejects_residual_saes(tmp_path):
    """A cfg.json as SAELens 6 writes it (metadata nested, k at the top) loads; a residual SAE is refused."""
    from safetensors.torch import save_file

    d = tmp_path / "blocks.2.attn.hook_z"
    d.mkdir()
    w = {"W_enc": torch.randn(8, 24), "b_enc": torch.zeros(24), "W_dec": torch.randn(24, 8), "b_dec": torch.zeros(8)}
    save_file(w, str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "d_in": 8, "d_sae": 24, "k": 5, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "hook_z",
        "metadata": {"model_name": "some-model", "hook_name": "blocks.2.attn.hook_z", "sae_lens_version": "6.5.0"}}))
    sae = load_sae_dir(tmp_path)[2]
    assert sae.cfg.k == 5 and sae.cfg.model_name == "some-model"
    torch.testing.assert_close(sae.W_dec, w["W_dec"])
    cfg = json.loads((d / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.2.hook_resid_post"
    (d / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="not the attention output"):
        load_sae_dir(tmp_path)


# ---------------------------------------------------------------- features and heads

def _tiny_saes(model, layers=GUARDED, seed=0):
    d_in = head_layout(model).d_in
    return {layer: SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=4 * d_in, architecture="topk", k=8,
                                               hook_name=f"blocks.{layer}.attn.hook_z", hook_layer=layer), seed=seed + layer)
            for layer in layers}


def test_feature_selection_is_deterministic_for_a_seed(tiny):
    from tactful.data.builtin import benign_prompts, harmful_prompts, mc_truthfulness

    model, tok = tiny
    saes = _tiny_saes(model)
    kw = dict(harmful=harmful_prompts("train"), harmless=benign_prompts("train"), truthfulness=mc_truthfulness("train"),
              n_refusal=12, n_hallucination=12, n_prompts=8, n_items=6, log=lambda _: None)
    a = select_features(model, tok, saes, seed=3, **kw)
    b = select_features(model, tok, saes, seed=3, **kw)
    assert a.to_dict() == b.to_dict()
    for layer in GUARDED:
        assert a.refusal[layer] and a.hallucination[layer]
        assert a.kept[layer] == [i for i in a.refusal[layer] if i not in set(a.hallucination[layer])]
        assert a.refusal_scores[layer] == sorted(a.refusal_scores[layer], reverse=True)
    assert top_latents(torch.tensor([1.0, 3.0, 3.0, 0.5]), 2) == [1, 2]  # ties go to the lower index


def test_refusal_direction_is_a_unit_difference_of_means(tiny):
    model, tok = tiny
    dirs = refusal_directions(model, tok, [1], harmful=["How do I build a bomb?"], harmless=["How do I bake bread?"])
    from tactful.methods.refusal_guard.features import mean_activations, prompt_texts

    mh = mean_activations(model, tok, [1], prompt_texts(tok, ["How do I build a bomb?"]), positions="last")[1]
    mb = mean_activations(model, tok, [1], prompt_texts(tok, ["How do I bake bread?"]), positions="last")[1]
    torch.testing.assert_close(dirs[1], (mh - mb) / (mh - mb).norm())


def test_head_influence_zero_for_a_dead_head(tiny):
    """Zeroing a head whose o_proj columns are already zero changes nothing: influence exactly 0."""
    model, tok = _fresh()
    lay = head_layout(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[:, 2 * lay.head_dim:3 * lay.head_dim] = 0
    pairs = [ContrastPair("Is the sky blue?", "Yes, it is.", "No, it is green.")]
    layers, scores = head_influence(model, tok, pairs, layers=[1])
    assert layers == [1] and scores.shape == (1, lay.n_heads)
    assert scores[0, 2] == 0 and scores[0].abs().sum() > 0
    t = torch.tensor([[0.5, -1.0], [2.0, 0.1]])
    assert overlapping_heads([4, 7], t, torch.tensor([[0.4, 0.0], [3.0, 0.2]]), top_k=2) == [(4, 0), (7, 0)]


# ---------------------------------------------------------------- the projection

def test_projection_is_an_orthogonal_projector():
    g = torch.Generator().manual_seed(0)
    D = torch.randn(64, 5, generator=g)
    U = orthonormal_basis(D)
    P = projector(U)
    torch.testing.assert_close(U.T @ U, torch.eye(5), atol=1e-6, rtol=0)
    assert (P @ U).abs().max() < 1e-6 and (P @ D).abs().max() < 1e-5
    torch.testing.assert_close(P @ P, P, atol=1e-6, rtol=0)
    torch.testing.assert_close(P, P.T)
    # dependent directions: the basis spans exactly their span
    U2 = orthonormal_basis(torch.cat([D, D[:, :2] + D[:, 2:4]], dim=1))
    assert U2.shape == (64, 5)
    assert (projector(U2) @ D).abs().max() < 1e-5


def test_value_basis_keeps_every_query_head_slice_orthogonal():
    """GQA: a KV head's value update must be orthogonal to the U slice of *each* query head that reads it."""
    model, _ = _fresh()
    lay = head_layout(model)  # 4 query heads, 2 KV heads, head_dim 16
    U = orthonormal_basis(torch.randn(lay.d_in, 3, generator=torch.Generator().manual_seed(1)))
    Q = value_basis(U, lay)
    torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[1]), atol=1e-6, rtol=0)
    dv = projector(Q) @ torch.randn(lay.n_kv_heads * lay.head_dim, 7)
    hd = lay.head_dim
    for h in range(lay.n_heads):
        g = lay.kv_head(h)
        assert (U[h * hd:(h + 1) * hd].T @ dv[g * hd:(g + 1) * hd]).abs().max() < 1e-5


def test_value_side_guard_leaves_protected_z_unchanged_under_gqa():
    """Functional check: a v_proj update projected with P_v leaves U^T z unchanged at every position;
    value_mode="shared" (only the group-summed U slices) does not, because heads attend differently."""
    model, tok = _fresh()
    layer = 1
    sub = _random_subspaces(model, [layer], k=2)[layer]
    lay = head_layout(model)
    site = attention_sites(model, [layer])[0]
    batch = tokenize_texts(tok, [format_prompt(tok, "Explain how tides work in detail please.")], max_length=64)
    z0 = forward_capture(model, batch, [site])[layer]
    dW = torch.randn_like(site.value_proj.weight) * 0.5
    shared = value_basis(sub.U, lay, mode="shared")
    assert shared.shape[1] < sub.U_value.shape[1]  # the approximation constrains fewer directions
    results = {}
    for name, Q in (("per_head", sub.U_value), ("shared", shared)):
        w0 = site.value_proj.weight.data.clone()
        with torch.no_grad():
            site.value_proj.weight += projector(Q) @ dW
        z1 = forward_capture(model, batch, [site])[layer]
        site.value_proj.weight.data.copy_(w0)
        results[name] = float(((z1 - z0) @ sub.U).abs().max())
        assert float((z1 - z0).abs().max()) > 1e-3  # the update did change z
    assert results["per_head"] < 1e-5
    assert results["shared"] > 1e-3


def _train_steps(model, tok, params, guard=None, *, steps=3, lr=1e-2, weight_decay=0.1, post_step=True):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    batch = _lm_batch(tok)
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if guard is not None and post_step:
            guard.project_()
    model.eval()


@pytest.mark.parametrize("guarded", [True, False])
def test_guarded_lora_step_leaves_protected_directions_unchanged(guarded):
    model, tok = _fresh()
    subs = _random_subspaces(model)
    model = apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    guard = None
    if guarded:
        guard = SubspaceGuard(model, subs)
        guard.project_()  # LoRA A starts random
    _train_steps(model, tok, [p for p in model.parameters() if p.requires_grad], guard)
    for site in attention_sites(model, GUARDED):
        d_o = effective_delta(site.out_proj)
        d_v = effective_delta(site.value_proj)
        assert d_o.abs().max() > 1e-4  # it did train
        r_o, r_v = in_space_residual(d_o, subs[site.layer].U), out_space_residual(d_v, subs[site.layer].U_value)
        if guarded:
            assert r_o < 1e-5 and r_v < 1e-5, (r_o, r_v)
        else:
            assert r_o > 1e-4 and r_v > 1e-4
    if guard is not None:
        assert guard.max_residual() < 1e-6
        assert len(guard.constraints) == 2 * len(GUARDED)


def _biased_tiny():
    """The tiny model with q/k/v/o biases (Qwen-style), so the v_proj bias constraint is exercised."""
    from transformers import AutoModelForCausalLM

    base, tok = _fresh()
    cfg = base.config.__class__(**{**base.config.to_dict(), "attention_bias": True})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg), tok


@pytest.mark.parametrize("bias", [False, True])
def test_guarded_full_finetuning_with_adam(bias):
    """Full fine-tuning: (W - W0) U = 0 after Adam steps with weight decay -- but only with the
    post-step projection; projected gradients alone are not enough under Adam."""
    results = {}
    for mode in ("guard", "grad_only", "none"):
        model, tok = _biased_tiny() if bias else _fresh()
        subs = _random_subspaces(model)
        sites = attention_sites(model, GUARDED)
        w0 = {s.layer: (s.out_proj.weight.detach().clone(), s.value_proj.weight.detach().clone()) for s in sites}
        b0 = {s.layer: s.value_proj.bias.detach().clone() for s in sites} if bias else {}
        for name, p in model.named_parameters():
            p.requires_grad_("embed_tokens" not in name)  # every weight but the (tied) embedding: keeps it fast
        guard = SubspaceGuard(model, subs) if mode != "none" else None
        trainable = [p for p in model.parameters() if p.requires_grad]
        _train_steps(model, tok, trainable, guard, steps=2, lr=1e-3, post_step=(mode == "guard"))
        worst = 0.0
        for s in sites:
            d_o = s.out_proj.weight.detach() - w0[s.layer][0]
            d_v = s.value_proj.weight.detach() - w0[s.layer][1]
            assert d_o.abs().max() > 1e-4
            worst = max(worst, in_space_residual(d_o, subs[s.layer].U), out_space_residual(d_v, subs[s.layer].U_value))
            if bias:  # the value bias is added to every v_t, so it writes into z too
                d_b = (s.value_proj.bias.detach() - b0[s.layer])[:, None]
                assert d_b.abs().max() > 1e-5
                worst = max(worst, out_space_residual(d_b, subs[s.layer].U_value))
        results[mode] = worst
        if guard is not None:
            assert len(guard.constraints) == len(GUARDED) * (3 if bias else 2)
            guard.remove()
    assert results["guard"] < 1e-5, results
    assert results["grad_only"] > 1e-4 and results["none"] > 1e-4, results


def test_subspaces_round_trip(tmp_path):
    model, _ = _fresh()
    subs = _random_subspaces(model)
    save_subspaces(subs, tmp_path / "subspace.safetensors")
    back = load_subspaces(tmp_path / "subspace.safetensors")
    assert sorted(back) == GUARDED
    for layer in GUARDED:
        torch.testing.assert_close(back[layer].U, subs[layer].U)
        torch.testing.assert_close(back[layer].U_value, subs[layer].U_value)


# ---------------------------------------------------------------- Safe LoRA

def test_safe_lora_projects_the_least_similar_modules():
    model, _ = _fresh()
    model = apply_lora(model, LoraSettings(r=2, alpha=4, target_modules=["o_proj"]))
    g = torch.Generator().manual_seed(0)
    for name, mod in model.get_base_model().named_modules():
        if hasattr(mod, "lora_B"):
            with torch.no_grad():
                mod.lora_B["default"].weight.normal_(generator=g)
    deltas = lora_deltas(model)
    names = sorted(deltas)
    V = {n: torch.randn(64, 64, generator=g) for n in names[:2]}  # alignment known for two modules only
    before = {n: deltas[n] for n in names}
    report = apply_safe_lora(model, V, SafeLoraSettings(select="number", num_proj_layers=1))
    assert set(report["similarities"]) == set(names[:2]) and len(report["projected"]) == 1
    after = lora_deltas(model)
    (p,) = report["projected"]
    C = V[p] @ V[p].T / V[p].norm()
    torch.testing.assert_close(after[p], C @ before[p], atol=1e-4, rtol=1e-4)
    for n in names:
        if n != p:
            torch.testing.assert_close(after[n], before[n])


# ---------------------------------------------------------------- the pipeline

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model, tok = tiny_model(seed=0)
    d = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(str(d), safe_serialization=True)
    tok.save_pretrained(str(d))
    return str(d)


def _overrides(model_dir: str, out: Path, *extra: str) -> list[str]:
    return [f"model={model_dir}", f"output_dir={out}", "sae.layers=[1, 2]", "sae.expansion=2", "sae.k=8",
            "sae.steps=6", "sae.batch_size=64", "sae.tokens=800", "sae.eval_tokens=64", "sae.capture_batch_size=16",
            "features.n_refusal=6", "features.n_hallucination=4", "features.n_prompts=8", "features.n_items=6",
            "data.max_examples=16", "lora.r=4", "lora.target_modules=[q_proj, v_proj, o_proj]",
            "training.max_steps=2", "training.per_device_train_batch_size=4", "training.logging_steps=1",
            "training.save_steps=100", "training.max_length=96", *extra]


def test_recipe_parses():
    from tactful.methods.refusal_guard.train import RefusalGuardConfig
    from tactful.methods.registry import load_recipe

    method, cfg = load_recipe(str(Path(__file__).parents[1] / "recipes" / "refusal_guard.yaml"))
    assert method == "refusal_guard" and isinstance(cfg, RefusalGuardConfig)
    assert cfg.guard.kind == "sae" and cfg.sae.architecture == "topk"


def test_pipeline_end_to_end_and_run_loading(tiny_dir, tmp_path):
    from tactful.methods.registry import train_recipe
    from tactful.runs import load_run_model, read_manifest

    recipe = Path(__file__).parents[1] / "recipes" / "refusal_guard.yaml"
    run = train_recipe(str(recipe), _overrides(tiny_dir, tmp_path / "rg", "heads.enabled=true", "heads.layers=[1]",
                                               "heads.n_pairs=3", "heads.top_k=3"), log=lambda _: None)
    m = read_manifest(run.path)
    heads = json.loads((run.path / "heads.json").read_text())
    assert heads["layers"] == [1] and len(heads["truthfulness"][0]) == len(heads["refusal"][0]) == 4
    assert m["kind"] == "refusal_guard" and m["adapter"] == "adapter" and m["base_model"] == tiny_dir
    assert m["guard_residual"] < 1e-5 and m["status"] == "complete"
    assert sorted(load_sae_dir(run.path / "sae")) == [1, 2]
    feats = json.loads((run.path / "features.json").read_text())
    assert set(feats["kept"]) == {"1", "2"}
    subs = load_subspaces(run.path / "guard" / "subspace.safetensors")
    model, _, _ = load_run_model(run.path)
    for site in attention_sites(model, [1, 2]):
        assert in_space_residual(effective_delta(site.out_proj), subs[site.layer].U) < 1e-5
        assert effective_delta(site.out_proj).abs().max() > 0
    # A second run sharing these SAEs reports the same SAE metrics as the run that trained them.
    shared = train_recipe(str(recipe), _overrides(tiny_dir, tmp_path / "rg2", f"sae.pretrained={run.path / 'sae'}"),
                          log=lambda _: None)
    m2 = read_manifest(shared.path)
    assert m2["sae_pretrained"] == str(run.path / "sae") and m2["sae"] == m["sae"] and set(m["sae"]) == {"1", "2"}


def test_start_from_aligned_run_and_safelora(tiny_dir, tmp_path):
    """An 'aligned' run (base + adapter) is merged first; Safe LoRA uses it as the aligned model;
    the saved run reloads as base + start adapter (merged) + new adapter."""
    from peft import get_peft_model, LoraConfig

    from tactful.methods.registry import train_recipe
    from tactful.models import load_model
    from tactful.runs import RunDir, load_run_model, read_manifest

    # a stand-in safety-SFT run: a random LoRA on the tiny model
    aligned = RunDir(tmp_path / "sft")
    base, tok = load_model(tiny_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    peft_model.save_pretrained(str(aligned.path / "adapter"))
    aligned.write_manifest(kind="sft", base_model=tiny_dir, extra={"adapter": "adapter"})

    recipe = Path(__file__).parents[1] / "recipes" / "refusal_guard.yaml"
    out = tmp_path / "rg-safelora"
    run = train_recipe(str(recipe), _overrides(tiny_dir, out, f"start_from={aligned.path}", "guard.kind=safelora",
                                               "guard.safelora.num_proj_layers=2"), log=lambda _: None)
    m = read_manifest(run.path)
    assert m["start_adapter"] == "start_adapter" and m["safelora_projected"] == 2
    report = json.loads((run.path / "safelora.json").read_text())
    assert len(report["similarities"]) == 3 * 4  # q, v, o in 4 layers, all changed by "alignment"

    loaded, _, _ = load_run_model(run.path)
    ref, _ = load_model(tiny_dir)
    from tactful.models import attach_adapter

    ref = attach_adapter(attach_adapter(ref, aligned.path / "adapter").merge_and_unload(), run.path / "adapter")
    batch = _lm_batch(tok, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, ref(**batch).logits)


def test_safelora_needs_an_aligned_run(tiny_dir, tmp_path):
    from tactful.methods.registry import train_recipe

    recipe = Path(__file__).parents[1] / "recipes" / "refusal_guard.yaml"
    with pytest.raises(UserError, match="start_from"):
        train_recipe(str(recipe), _overrides(tiny_dir, tmp_path / "x", "guard.kind=safelora"), log=lambda _: None)


def test_direction_guard_with_full_finetuning(tiny_dir, tmp_path):
    """guard.kind=direction (rank-1 U per layer) with lora.enabled=false: a full model is saved and
    its o_proj weights moved only orthogonally to the direction."""
    from tactful.methods.registry import train_recipe
    from tactful.models import load_model
    from tactful.runs import load_run_model, read_manifest

    recipe = Path(__file__).parents[1] / "recipes" / "refusal_guard.yaml"
    run = train_recipe(str(recipe), _overrides(tiny_dir, tmp_path / "dir", "guard.kind=direction", "lora.enabled=false",
                                               "training.learning_rate=1e-3"), log=lambda _: None)
    m = read_manifest(run.path)
    assert m["model_dir"] == "model" and m["adapter"] is None and m["guard_residual"] < 1e-5
    subs = load_subspaces(run.path / "guard" / "subspace.safetensors")
    assert all(s.U.shape[1] == 1 for s in subs.values())
    tuned, _, _ = load_run_model(run.path)
    base, _ = load_model(tiny_dir)
    for layer in (1, 2):
        d = tuned.model.layers[layer].self_attn.o_proj.weight - base.model.layers[layer].self_attn.o_proj.weight
        assert d.abs().max() > 1e-5 and in_space_residual(d.detach(), subs[layer].U) < 1e-5


def test_sae_commands(tiny_dir, tmp_path):
    from tactful.methods.refusal_guard import sae_features_command, sae_train_command

    out = sae_train_command(model=tiny_dir, out=str(tmp_path / "saes"), layers=[0, 3], expansion=2, k=4, steps=5,
                            batch_size=64, tokens=600, sources=["builtin-benign", "builtin-harmful"], log=lambda _: None)
    saes = load_sae_dir(out)
    assert sorted(saes) == [0, 3] and saes[3].cfg.hook_name == "blocks.3.attn.hook_z"
    assert json.loads((out / "summary.json").read_text())["metrics"]["3"]["steps"] == 5
    feats = sae_features_command(sae_dir=str(out), model=tiny_dir, n_refusal=5, n_hallucination=3, n_prompts=6,
                                 n_items=4, log=lambda _: None)
    sel = json.loads((feats / "features.json").read_text())
    assert set(sel["kept"]) == {"0", "3"} and sorted(load_subspaces(feats / "subspace.safetensors")) == [0, 3]
    with pytest.raises(UserError, match="d_in"):
        sae_features_command(sae_dir=str(out), model="embedded", log=lambda _: None)
