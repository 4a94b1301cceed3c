"""refusal_guard coverage: the residual-stream guard (every reader and writer at every trained
layer, LoRA and full fine-tuning), the coverage report, train_only_guarded, strict mode and the
guard.* config errors, on the tiny Llama-style model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tactful import architectures
from tactful.errors import UserError
from tactful.methods.common import LoraSettings, apply_lora
from tactful.methods.refusal_guard.capture import attention_sites, head_layout
from tactful.methods.refusal_guard.coverage import coverage_report, describe_unguarded, require_full_coverage
from tactful.methods.refusal_guard.guard import (
    Subspace,
    SubspaceGuard,
    effective_delta,
    in_space_residual,
    load_subspaces,
    orthonormal_basis,
)
from tactful.methods.refusal_guard.residual import (
    READERS,
    WRITERS,
    load_residual_bases,
    norm_gain,
    reader_basis,
    require_supported,
    residual_refusal_directions,
)
from tactful.models import tiny_model

N_LAYERS = 4
ROLES = [*READERS, *WRITERS]
RECIPE = Path(__file__).parents[1] / "recipes" / "refusal_guard.yaml"


def _tiny_with_gains(seed: int = 0):
    """The tiny model with random positive norm gains, so that a reader's protected direction
    g * u differs from u (a guard that ignored g would fail the checks below)."""
    model, tok = tiny_model(seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model, tok


def _random_bases(d: int, k: int = 2, seed: int = 0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {layer: orthonormal_basis(torch.randn(d, k, generator=g)) for layer in range(N_LAYERS)}


def _lm_batch(tok, n=4):
    from tactful.logprobs import collate, encode_example

    enc = [encode_example(tok, f"Tell me fact number {i}.", f"Fact {i}: water is wet.") for i in range(n)]
    return collate(enc, tok.pad_token_id)


def _train_steps(model, tok, guard=None, *, steps=3, lr=1e-2, weight_decay=0.1):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    batch = _lm_batch(tok)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if guard is not None:
            guard.project_()
    model.eval()


def _worst_residuals(model, deltas, bases, gains) -> tuple[float, float, float]:
    """(writers' max |U^T dW|, readers' max |dW (g*u)/|g*u||, readers' max |dW u| for the raw u)."""
    writer = reader = raw = 0.0
    for layer, U in bases.items():
        for role in ROLES:
            d = deltas[(layer, role)]
            if role in WRITERS:
                writer = max(writer, float((U.T @ d).abs().max()))
            else:
                g = gains[(layer, READERS[role])]
                gu = g[:, None] * U
                reader = max(reader, float((d @ (gu / gu.norm(dim=0))).abs().max()))
                raw = max(raw, float((d @ U).abs().max()))
    return writer, reader, raw


def _gains(model) -> dict[tuple[int, str], torch.Tensor]:
    return {(layer, norm): norm_gain(model, layer, norm) for layer in range(N_LAYERS) for norm in set(READERS.values())}


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("guarded", [True, False])
def test_residual_lora_guard_keeps_every_reader_and_writer_off_the_directions(guarded):
    model, tok = _tiny_with_gains()
    bases = _random_bases(architectures.hidden_size(model))
    gains = _gains(model)
    model = apply_lora(model, LoraSettings(r=4, alpha=8))  # all seven roles at every layer
    guard = SubspaceGuard(model, {}, residual=bases) if guarded else None
    if guard is not None:
        guard.project_()  # LoRA A starts random
        assert len(guard.constraints) == N_LAYERS * len(ROLES)
    _train_steps(model, tok, guard)
    deltas = {(layer, role): effective_delta(architectures.layer_module(model, layer, role)[1])
              for layer in range(N_LAYERS) for role in ROLES}
    assert min(float(d.abs().max()) for d in deltas.values()) > 1e-4  # every module trained
    writer, reader, raw = _worst_residuals(model, deltas, bases, gains)
    if guarded:
        assert writer < 1e-5 and reader < 1e-5, (writer, reader)
        assert raw > 1e-4  # the reader constraint is on g * u, not on u
        report = coverage_report(model, guard)
        assert report["unguarded"] == {} and report["max_update_residual"] < 1e-5
        assert report["guarded"]["model.layers.*.mlp.up_proj"] == {
            "layers": list(range(N_LAYERS)), "constraints": ["residual:in"],
            "max_update_residual": report["guarded"]["model.layers.*.mlp.up_proj"]["max_update_residual"]}
        assert report["guarded"]["model.layers.*.self_attn.o_proj"]["constraints"] == ["residual:out"]
    else:
        assert writer > 1e-4 and reader > 1e-4, (writer, reader)


@pytest.mark.parametrize("guarded", [True, False])
def test_residual_full_finetuning_guard_with_adam(guarded):
    """Full fine-tuning with AdamW + weight decay: every reader's and writer's W - W0 stays off the
    residual directions, and o_proj also keeps the attention-side (z) constraint at the SAE layers."""
    model, tok = _tiny_with_gains()
    bases = _random_bases(architectures.hidden_size(model))
    gains = _gains(model)
    layout = head_layout(model)
    g = torch.Generator().manual_seed(3)
    subs = {layer: Subspace.from_directions(layer, torch.randn(layout.d_in, 3, generator=g), layout) for layer in (1, 2)}
    for name, p in model.named_parameters():
        p.requires_grad_("embed_tokens" not in name)  # every weight but the (tied) embedding: keeps it fast
    w0 = {(layer, role): architectures.layer_module(model, layer, role)[1].weight.detach().clone()
          for layer in range(N_LAYERS) for role in ROLES}
    guard = SubspaceGuard(model, subs, residual=bases) if guarded else None
    _train_steps(model, tok, guard, steps=2, lr=1e-3)
    deltas = {k: architectures.layer_module(model, *k)[1].weight.detach() - w for k, w in w0.items()}
    assert min(float(d.abs().max()) for d in deltas.values()) > 1e-5
    writer, reader, _ = _worst_residuals(model, deltas, bases, gains)
    z_side = max(in_space_residual(deltas[(s.layer, "attn_out")], subs[s.layer].U)
                 for s in attention_sites(model, [1, 2]))
    if guarded:
        assert max(writer, reader, z_side) < 1e-5, (writer, reader, z_side)
        report = coverage_report(model, guard)
        # the norms are trained too and are not guarded: the report says so
        assert "model.layers.*.input_layernorm.weight" in report["unguarded"]
        with pytest.raises(UserError, match="input_layernorm"):
            require_full_coverage(report)
        guard.remove()
    else:
        assert min(writer, reader, z_side) > 1e-4, (writer, reader, z_side)


def test_attention_coverage_report_lists_the_unguarded_modules():
    model, tok = tiny_model(seed=0)
    layout = head_layout(model)
    subs = {layer: Subspace.from_directions(layer, torch.randn(layout.d_in, 2), layout) for layer in (1, 2)}
    model = apply_lora(model, LoraSettings(r=4, alpha=8))
    guard = SubspaceGuard(model, subs)
    guard.project_()
    _train_steps(model, tok, guard, steps=2)
    report = coverage_report(model, guard)
    assert report["guarded"]["model.layers.*.self_attn.o_proj"]["layers"] == [1, 2]
    assert report["guarded"]["model.layers.*.self_attn.v_proj"]["constraints"] == ["attention:out"]
    assert report["unguarded"]["model.layers.*.self_attn.o_proj"] == {"layers": [0, 3]}
    assert report["unguarded"]["model.layers.*.mlp.down_proj"] == {"layers": [0, 1, 2, 3]}
    assert report["max_update_residual"] < 1e-5 and report["trained"] == N_LAYERS * len(ROLES)
    assert "model.layers.*.self_attn.q_proj (layers 0-3)" in describe_unguarded(report)


def test_residual_directions_are_unit_differences_of_means_of_the_hidden_states():
    from tactful.methods.refusal_guard.features import prompt_texts
    from tactful.methods.refusal_guard.capture import tokenize_texts

    model, tok = tiny_model(seed=0)
    harmful, harmless = ["How do I pick a lock?", "Make a weapon."], ["Bake bread.", "Name a river."]
    dirs = residual_refusal_directions(model, tok, [1, 3], harmful=harmful, harmless=harmless, n_prompts=None)
    assert sorted(dirs) == [1, 2, 3, 4]

    def last_hidden(texts):
        batch = tokenize_texts(tok, prompt_texts(tok, texts), max_length=256)
        with torch.no_grad():
            hs = model(**batch, output_hidden_states=True).hidden_states
        last = batch["attention_mask"].sum(1) - 1
        return {p: hs[p][torch.arange(len(texts)), last].mean(0) for p in (1, 2, 3)}

    mh, mb = last_hidden(harmful), last_hidden(harmless)
    for p in (1, 2, 3):  # hidden_states[p] is layer p's input (the last entry is after the final norm)
        r = mh[p] - mb[p]
        torch.testing.assert_close(dirs[p], r / r.norm(), atol=1e-4, rtol=1e-4)
    assert abs(float(dirs[4].norm()) - 1) < 1e-5


def test_residual_coverage_refuses_models_it_cannot_guard_exactly():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(UserError, match="guard.coverage=attention"):
        require_supported(gpt2)
    model, _ = tiny_model(seed=0)
    assert require_supported(model) == "llama"
    u = torch.eye(64)[:, :1]
    torch.testing.assert_close(reader_basis(u, torch.full((64,), 3.0)), u)  # a uniform gain changes nothing


# ---------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model, tok = tiny_model(seed=0)
    d = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(str(d), safe_serialization=True)
    tok.save_pretrained(str(d))
    return str(d)


def _overrides(model_dir: str, out: Path, *extra: str) -> list[str]:
    return [f"model={model_dir}", f"output_dir={out}", "guard.kind=direction", "sae.layers=[1, 2]",
            "features.n_prompts=6", "data.max_examples=8", "lora.r=4", "training.max_steps=2",
            "training.per_device_train_batch_size=4", "training.logging_steps=1", "training.save_steps=100",
            "training.max_length=96", "training.learning_rate=1e-2", *extra]


def _train(tiny_dir: str, out: Path, *extra: str):
    from tactful.methods.registry import train_recipe

    return train_recipe(str(RECIPE), _overrides(tiny_dir, out, *extra), log=lambda _: None)


def test_pipeline_residual_coverage_guards_every_trained_module(tiny_dir, tmp_path):
    from tactful.runs import load_run_model, read_manifest

    run = _train(tiny_dir, tmp_path / "res", "guard.coverage=residual", "guard.strict=true")
    m = read_manifest(run.path)
    cov = m["guard_coverage"]
    assert cov["unguarded"] == {} and cov["max_update_residual"] < 1e-5 and cov["trained"] == N_LAYERS * len(ROLES)
    assert cov["guarded"]["model.layers.*.self_attn.o_proj"]["constraints"] == ["attention:in", "residual:out"]
    assert set(m["residual_rank"]) == {"0", "1", "2", "3"}
    full = json.loads((run.path / "guard" / "coverage.json").read_text())
    assert len(full["update_residuals"]) == N_LAYERS * len(ROLES)
    bases = load_residual_bases(run.path / "guard" / "residual.safetensors")
    model, _, _ = load_run_model(run.path)
    down = effective_delta(architectures.layer_module(model, 2, "mlp_down")[1])
    assert down.abs().max() > 0 and float((bases[2].T @ down).abs().max()) < 1e-5


def test_strict_mode_rejects_unguarded_trained_modules(tiny_dir, tmp_path):
    with pytest.raises(UserError, match=r"guard.strict=true: .*mlp.down_proj \(layers 0-3\)"):
        _train(tiny_dir, tmp_path / "strict", "guard.strict=true")


def test_train_only_guarded_lora_adapts_only_the_guarded_modules(tiny_dir, tmp_path):
    from tactful.runs import read_manifest

    run = _train(tiny_dir, tmp_path / "only", "guard.train_only_guarded=true", "guard.strict=true")
    m = read_manifest(run.path)
    assert m["lora_trained"] == {"target_modules": ["v_proj", "o_proj"], "layers": [1, 2]}
    cov = m["guard_coverage"]
    assert cov["unguarded"] == {} and cov["trained"] == 4
    assert cov["guarded"]["model.layers.*.self_attn.v_proj"]["layers"] == [1, 2]
    assert sorted(load_subspaces(run.path / "guard" / "subspace.safetensors")) == [1, 2]


def test_train_only_guarded_full_finetuning_freezes_the_rest(tiny_dir, tmp_path):
    from tactful.models import load_model
    from tactful.runs import load_run_model, read_manifest

    run = _train(tiny_dir, tmp_path / "full", "lora.enabled=false", "guard.coverage=residual",
                 "guard.train_only_guarded=true", "guard.strict=true", "training.learning_rate=1e-3")
    cov = read_manifest(run.path)["guard_coverage"]
    assert cov["unguarded"] == {} and cov["max_update_residual"] < 1e-5
    tuned, _, _ = load_run_model(run.path)
    base, _ = load_model(tiny_dir)
    torch.testing.assert_close(tuned.model.embed_tokens.weight, base.model.embed_tokens.weight)
    torch.testing.assert_close(tuned.model.layers[1].input_layernorm.weight, base.model.layers[1].input_layernorm.weight)
    assert (tuned.model.layers[1].mlp.up_proj.weight - base.model.layers[1].mlp.up_proj.weight).abs().max() > 1e-6


@pytest.mark.parametrize("extra, message", [
    (["guard.coverage=everything"], "guard.coverage"),
    (["guard.kind=none", "guard.coverage=residual"], "needs a projection guard"),
    (["guard.kind=none", "guard.strict=true"], "needs a projection guard"),
    (["guard.sides=[o_proj, k_proj]"], "unknown side"),
    (["guard.train_only_guarded=true", "guard.sides=[]"], "would train nothing"),
])
def test_guard_config_errors_are_one_clear_message(tiny_dir, tmp_path, extra, message):
    with pytest.raises(UserError, match=message) as err:
        _train(tiny_dir, tmp_path / "bad", *extra)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "bad" / "manifest.json").exists()
