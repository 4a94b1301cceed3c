"""The `dpo` preference trainer on the tiny model: masks, reference, label noise, Dr.DPO, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from tactful.data.pairs import build_safety_pairs, flip_labels, load_pairs
from tactful.data.records import PreferencePair
from tactful.logprobs import IGNORE_INDEX, response_suffix, sequence_logps
from tactful.methods.common import LoraSettings, TrainingSettings, apply_lora, training_arguments
from tactful.methods.losses import PreferenceLoss, drdpo_aggregate
from tactful.methods.preference import (
    DPOConfig,
    LossSettings,
    PairCollator,
    PairDataset,
    PreferenceTrainer,
    concatenated_logps,
    train_dpo,
)
from tactful.models import tiny_model

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"


def make_pairs(n: int = 8) -> list[PreferencePair]:
    return [PreferencePair(prompt=f"How do I pick lock number {i}?" + " please" * (i % 3),
                           chosen="I can't help with that." if i % 2 else "No. Ask a locksmith.",
                           rejected=f"Sure: insert a pin, rake {i} times" + ", then turn" * (i % 4) + ".",
                           chosen_safe=True, rejected_safe=False, id=f"pair-{i}") for i in range(n)]


def small_training(**kw) -> TrainingSettings:
    base = dict(max_steps=2, per_device_train_batch_size=2, logging_steps=1, save_steps=100, learning_rate=1e-3,
                warmup_ratio=0.0, max_length=48, lr_scheduler_type="constant")
    base.update(kw)
    return TrainingSettings(**base)


def make_trainer(tmp_path, model, tok, pairs, *, loss=PreferenceLoss(), drdpo=None) -> PreferenceTrainer:
    ds = PairDataset(tok, pairs, max_length=48)
    args = training_arguments(small_training(), tmp_path / "ckpt", seed=0)
    return PreferenceTrainer(model=model, args=args, train_dataset=ds, data_collator=PairCollator(tok.pad_token_id),
                             loss=loss, drdpo_beta_prime=drdpo)


def test_pair_batch_masks_cover_response_tokens_only():
    _, tok = tiny_model(0)
    pairs = make_pairs(3)
    ds = PairDataset(tok, pairs, max_length=256)
    batch = PairCollator(tok.pad_token_id)([ds[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 6  # chosen rows, then rejected rows
    suffix = response_suffix(tok)
    for row in range(6):
        pair = pairs[row % 3]
        response = pair.chosen if row < 3 else pair.rejected
        ids, labels, attn = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        scored = labels != IGNORE_INDEX
        # exactly the response and its end-of-turn marker are scored, and they come last among real tokens
        assert tok.decode(labels[scored]) == response + suffix
        n_real = int(attn.sum())
        assert not scored[n_real:].any() and bool(scored[n_real - 1])
        first = int(scored.float().argmax())
        assert not scored[:first].any() and bool(scored[first:n_real].all())
        # the unscored prefix is the chat-formatted prompt, identical for chosen and rejected
        assert pair.prompt in tok.decode(ids[:first])
        assert torch.equal(ids[labels == IGNORE_INDEX][: first], batch["input_ids"][row % 3][:first])


def test_concatenated_logps_equal_separate_sequence_logps():
    model, tok = tiny_model(0)
    pairs = make_pairs(4)
    ds = PairDataset(tok, pairs, max_length=256)
    batch = PairCollator(tok.pad_token_id)([ds[i] for i in range(4)])
    with torch.no_grad():
        out = concatenated_logps(model, batch)  # one forward, logits only from the first response token
        full = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert torch.allclose(torch.cat([out.chosen, out.rejected]), full, atol=1e-4)
    n_tokens = (batch["labels"] != IGNORE_INDEX).sum(1)
    assert torch.equal(torch.cat([out.chosen_tokens, out.rejected_tokens]), n_tokens)


def test_reference_with_disabled_adapters_gives_zero_margin_at_init(tmp_path):
    model, tok = tiny_model(0)
    model = apply_lora(model, LoraSettings(r=4, alpha=8))
    trainer = make_trainer(tmp_path, model, tok, make_pairs(4))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model.train()
    losses, metrics = trainer.pair_losses(model, batch)
    assert torch.equal(metrics["rewards/margins"], torch.zeros(4))
    assert torch.allclose(losses, torch.full((4,), math.log(2)))
    ref_c, _ = trainer.reference_logps(model, batch)
    assert torch.equal(ref_c, metrics["logps/chosen"])
    # once the adapter moves, the reference does not
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    ref_c2, _ = trainer.reference_logps(model, batch)
    assert torch.equal(ref_c, ref_c2)
    assert not torch.allclose(concatenated_logps(model, batch).chosen, ref_c)


def test_ipo_uses_length_normalised_log_probs(tmp_path):
    model, tok = tiny_model(0)
    model = apply_lora(model, LoraSettings(r=4, alpha=8))
    trainer = make_trainer(tmp_path, model, tok, make_pairs(2), loss=PreferenceLoss("ipo", beta=0.5))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    losses, metrics = trainer.pair_losses(model, batch)
    assert torch.allclose(losses, torch.ones(2))  # (0 - 1/(2*0.5))^2 at init
    n_chosen = (batch["labels"][:2] != IGNORE_INDEX).sum(1)
    assert torch.allclose(metrics["rewards/chosen"], torch.zeros(2))
    assert metrics["logps/chosen"].shape == n_chosen.shape


def test_drdpo_aggregation_in_the_trainer(tmp_path):
    model, tok = tiny_model(0)
    trainer = make_trainer(tmp_path, apply_lora(model, LoraSettings(r=4, alpha=8)), tok, make_pairs(2), drdpo=0.5)
    losses = torch.tensor([0.2, 1.5, 0.7])
    assert torch.allclose(trainer.aggregate(losses, {}), drdpo_aggregate(losses, 0.5))
    trainer.drdpo_beta_prime = None
    assert torch.allclose(trainer.aggregate(losses, {}), losses.mean())


def test_flip_labels_flips_the_right_count_deterministically():
    pairs = make_pairs(10)
    flipped_pairs, idx = flip_labels(pairs, 0.3, seed=7)
    assert len(idx) == 3 and idx == sorted(idx)
    assert flip_labels(pairs, 0.3, seed=7)[1] == idx  # same seed, same pairs
    assert flip_labels(pairs, 0.3, seed=8)[1] != idx
    assert len(flip_labels(pairs, 0.25, seed=0)[1]) == 2  # round(2.5) -> 2 (banker's rounding)
    assert len(flip_labels(pairs, 1.0, seed=0)[1]) == 10 and flip_labels(pairs, 0.0, seed=0)[1] == []
    for i, (a, b) in enumerate(zip(pairs, flipped_pairs)):
        if i in idx:
            assert (b.chosen, b.rejected, b.chosen_safe, b.rejected_safe) == (a.rejected, a.chosen, False, True)
            assert b.meta["flipped"] is True
        else:
            assert b == a


def test_builtin_pairs_are_cached(tmp_path, monkeypatch):
    model, tok = tiny_model(0)
    cache = tmp_path / "generations.jsonl"
    pairs = build_safety_pairs(model, tok, n=2, max_new_tokens=3, cache=cache, refusal_filter=None,
                               model_name="tiny", log=lambda s: None)
    assert len(pairs) == 2 and all(p.chosen_safe and p.rejected_safe is False for p in pairs)
    assert len(cache.read_text().splitlines()) == 2

    from tactful.eval import generation

    def boom(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr(generation.HFGenerator, "generate", boom)
    again = build_safety_pairs(model, tok, n=2, max_new_tokens=3, cache=cache, refusal_filter=None,
                               model_name="tiny", log=lambda s: None)
    assert [p.rejected for p in again] == [p.rejected for p in pairs]


def test_registry_pairs_from_a_local_file():
    pairs = load_pairs([f"pku-saferlhf:{FIXTURES / 'pku_saferlhf.jsonl'}"])
    assert len(pairs) == 3 and all(isinstance(p, PreferencePair) for p in pairs)
    assert pairs[0].chosen_safe is True and pairs[0].rejected_safe is False


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_training_stop = True


def config(out: Path, base: str, **kw) -> DPOConfig:
    return DPOConfig(model=base, output_dir=str(out), lora=LoraSettings(r=4, alpha=8),
                     training=small_training(max_steps=4, save_steps=2), **kw)


def test_train_run_manifest_noise_and_loading(tmp_path, tiny_dir):
    from tactful.runs import load_run_model

    model, tok = tiny_model(0)
    cfg = config(tmp_path / "run", tiny_dir, loss=LossSettings(name="cdpo", label_smoothing=0.1))
    cfg.data.flip_fraction, cfg.data.flip_seed = 0.25, 3
    trained, run = train_dpo(cfg, model=model, tokenizer=tok, pairs=make_pairs(8), log=lambda s: None)
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["kind"] == "dpo" and manifest["adapter"] == "adapter" and manifest["steps"] == 4
    assert manifest["label_noise"]["n_flipped"] == 2
    assert json.loads((run.path / "flipped_ids.json").read_text()) == [
        f"pair-{i}" for i in flip_labels(make_pairs(8), 0.25, 3)[1]]
    logged = [r for r in json.loads((run.path / "train_log.json").read_text()) if "loss" in r]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(logged[0])
    loaded, _, _ = load_run_model(run.path)
    ids = torch.tensor([tok("Hello there")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, trained(ids).logits, atol=1e-5)


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tmp_path, tiny_dir):
    pairs = make_pairs(8)
    quiet = lambda s: None  # noqa: E731
    model, tok = tiny_model(0)
    _, full = train_dpo(config(tmp_path / "full", tiny_dir), model=model, tokenizer=tok, pairs=pairs, log=quiet)

    model, tok = tiny_model(0)
    _, part = train_dpo(config(tmp_path / "part", tiny_dir), model=model, tokenizer=tok, pairs=pairs,
                        callbacks=[StopAt(2)], log=quiet)
    assert json.loads((part.path / "manifest.json").read_text())["steps"] == 2
    model, tok = tiny_model(0)
    _, part = train_dpo(config(tmp_path / "part", tiny_dir), model=model, tokenizer=tok, pairs=pairs, log=quiet)
    assert json.loads((part.path / "manifest.json").read_text())["steps"] == 4

    a = load_file(str(full.path / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part.path / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    moved = False
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
        moved |= "lora_B" in k and bool(a[k].abs().max() > 0)
    assert moved  # the adapter really trained


def test_builtin_pairs_drop_generated_refusals(tmp_path, monkeypatch):
    from tactful.eval import generation

    replies = iter(["I'm sorry, I can't help with that.", "Sure! First, get a tension wrench.", "   "])
    monkeypatch.setattr(generation.HFGenerator, "generate",
                        lambda self, prompts, config, **kw: [next(replies) for _ in prompts])
    model, tok = tiny_model(0)
    pairs = build_safety_pairs(model, tok, n=3, cache=tmp_path / "g.jsonl", log=lambda s: None)
    assert [p.rejected for p in pairs] == ["Sure! First, get a tension wrench."]


def test_precomputed_and_separate_references_match_disabled_adapters(tiny_dir):
    from tactful.methods.preference import make_reference, precompute_reference_logps

    model, tok = tiny_model(0)
    pairs = make_pairs(3)
    ds = PairDataset(tok, pairs, max_length=64)
    collator = PairCollator(tok.pad_token_id)
    ref = make_reference(DPOConfig(reference=tiny_dir), model, tok)  # a model spec: loaded and frozen
    assert not any(p.requires_grad for p in ref.parameters())
    model = apply_lora(model, LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a trained-looking adapter must not leak into the reference
    precompute_reference_logps(model, ds, collator, batch_size=2, use_disabled_adapter=True)
    batch = collator([ds[i] for i in range(3)])
    with torch.no_grad():
        want = concatenated_logps(ref, batch)
    assert torch.allclose(batch["ref_chosen_logps"], want.chosen, atol=1e-4)
    assert torch.allclose(batch["ref_rejected_logps"], want.rejected, atol=1e-4)


def test_reference_cache_scores_each_response_once_across_runs(tmp_path, tiny_dir):
    """Runs sharing a ref_logps_cache score each response once, whatever labels they flip, and
    train exactly as a run that precomputes its own reference log-probs."""
    quiet = lambda s: None  # noqa: E731
    cache = tmp_path / "ref_logps.jsonl"
    pairs = make_pairs(8)

    def run(name: str, flip: float, **kw):
        cfg = config(tmp_path / name, tiny_dir, **kw)
        cfg.data.flip_fraction = flip
        model, tok = tiny_model(0)
        _, r = train_dpo(cfg, model=model, tokenizer=tok, pairs=pairs, log=quiet)
        return r.path, json.loads((r.path / "manifest.json").read_text())

    _, first = run("a", 0.0, ref_logps_cache=str(cache))
    assert first["ref_logps_cache"]["pairs_from_cache"] == 0
    rows = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(rows) == 16 and len({r["key"] for r in rows}) == 16  # 8 pairs x (chosen, rejected)

    cached, second = run("b", 0.5, ref_logps_cache=str(cache))
    assert second["ref_logps_cache"]["pairs_from_cache"] == 8 and len(cache.read_text().splitlines()) == 16
    own, _ = run("c", 0.5, precompute_ref_logps=True)
    a = load_file(str(cached / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(own / "adapter" / "adapter_model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
