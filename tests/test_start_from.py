"""`start_from` for the preference methods (dpo, shapo, trace): the new adapter trains on top of
an earlier run's merged model, the reference is that start model, and the saved run reloads as
base + the start's adapters (merged) + its own adapter, self-contained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tactful.data.records import PreferencePair
from tactful.errors import UserError
from tactful.methods.common import LoraSettings, TrainingSettings, load_start_model
from tactful.methods.preference import DPOConfig, train_dpo
from tactful.models import attach_adapter, load_model
from tactful.runs import RunDir, load_run_model, read_manifest

quiet = lambda s: None  # noqa: E731


def make_pairs(n: int = 8) -> list[PreferencePair]:
    return [PreferencePair(prompt=f"How do I pick lock number {i}?", chosen="I can't help with that.",
                           rejected=f"Sure: insert a pin, rake {i} times" + ", then turn" * (i % 3) + ".",
                           chosen_safe=True, rejected_safe=False, id=f"pair-{i}") for i in range(n)]


def training() -> TrainingSettings:
    return TrainingSettings(max_steps=3, per_device_train_batch_size=4, logging_steps=1, save_steps=100,
                            learning_rate=5e-3, warmup_ratio=0.0, max_length=48, lr_scheduler_type="constant")


@pytest.fixture(scope="module")
def sft_run(tiny_dir, tmp_path_factory) -> Path:
    """A stand-in safety-SFT run: the tiny model + a random (non-zero) LoRA adapter."""
    from peft import LoraConfig, get_peft_model

    run = RunDir(tmp_path_factory.mktemp("sft"))
    base, _ = load_model(tiny_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    peft_model.save_pretrained(str(run.path / "adapter"))
    run.write_manifest(kind="sft", base_model=tiny_dir, extra={"adapter": "adapter", "status": "complete"})
    return run.path


def batch(tok) -> dict[str, torch.Tensor]:
    enc = tok(["Hello there, how are you?", "Pick a lock"], return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def logits(model, b) -> torch.Tensor:
    with torch.no_grad():
        return model(**b).logits


def merged_start(tiny_dir: str, sft: Path):
    model, _ = load_model(tiny_dir)
    return attach_adapter(model, sft / "adapter").merge_and_unload()


def dpo_config(out: Path, tiny_dir: str, start: Path | None, **kw) -> DPOConfig:
    return DPOConfig(model=tiny_dir, start_from=str(start) if start else None, output_dir=str(out),
                     lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), training=training(), **kw)


def test_dpo_from_a_run_reloads_exactly_and_uses_the_start_as_reference(tiny_dir, sft_run, tmp_path):
    _, tok = load_model(tiny_dir)
    b = batch(tok)
    trained, run = train_dpo(dpo_config(tmp_path / "dpo", tiny_dir, sft_run), pairs=make_pairs(), log=quiet)
    m = read_manifest(run.path)
    assert m["start_from"] == str(sft_run) and m["start_kind"] == "sft" and m["base_model"] == tiny_dir
    assert m["start_adapters"] == ["start_adapters/0"] and m["status"] == "complete"

    start = merged_start(tiny_dir, sft_run)
    base, _ = load_model(tiny_dir)
    assert not torch.allclose(logits(start, b), logits(base, b), atol=1e-3)  # the start really differs
    # the reference (the adapter disabled) is the start model, not the base model
    with trained.disable_adapter():
        torch.testing.assert_close(logits(trained, b), logits(start, b))
    assert not torch.allclose(logits(trained, b), logits(start, b), atol=1e-4)  # and the policy trained

    # self-contained: the reloaded run needs only the base model, even after the start run is gone
    moved = tmp_path / "sft-moved"
    shutil.copytree(sft_run, moved)
    shutil.rmtree(sft_run)
    try:
        loaded, _, desc = load_run_model(run.path)
        assert desc.startswith("dpo:")
        torch.testing.assert_close(logits(loaded, b), logits(trained, b))
    finally:
        shutil.copytree(moved, sft_run)


def test_a_chain_of_starts_reloads_exactly(tiny_dir, sft_run, tmp_path):
    """sft -> dpo -> dpo: the second run carries both earlier adapters and merges them in order."""
    _, tok = load_model(tiny_dir)
    b = batch(tok)
    _, first = train_dpo(dpo_config(tmp_path / "a", tiny_dir, sft_run), pairs=make_pairs(), log=quiet)
    second_model, second = train_dpo(dpo_config(tmp_path / "b", tiny_dir, first.path, seed=1), pairs=make_pairs(),
                                     log=quiet)
    assert read_manifest(second.path)["start_adapters"] == ["start_adapters/0", "start_adapters/1"]
    start = load_start_model(tiny_dir, first.path, log=quiet).model
    with second_model.disable_adapter():
        torch.testing.assert_close(logits(second_model, b), logits(start, b))
    loaded, _, _ = load_run_model(second.path)
    torch.testing.assert_close(logits(loaded, b), logits(second_model, b))


def test_shapo_from_a_run_probes_the_start_model(tiny_dir, sft_run, tmp_path):
    from tactful.methods.shapo import ProbeSettings, ShaPOConfig, ShaPOSettings, train_shapo

    _, tok = load_model(tiny_dir)
    cfg = ShaPOConfig(model=tiny_dir, start_from=str(sft_run), output_dir=str(tmp_path / "shapo"),
                      lora=LoraSettings(r=4, alpha=8), training=training(),
                      probe=ProbeSettings(max_examples=16, steps=20),
                      shapo=ShaPOSettings(mask_fraction=0.05, sam_interval=2))
    trained, run = train_shapo(cfg, pairs=make_pairs(), log=quiet)
    m = read_manifest(run.path)
    assert m["kind"] == "shapo" and m["start_adapters"] == ["start_adapters/0"] and m["shapo"]["mask"]["n_selected"]
    loaded, _, _ = load_run_model(run.path)
    torch.testing.assert_close(logits(loaded, batch(tok)), logits(trained, batch(tok)))


def test_trace_from_a_run(tiny_dir, sft_run, tmp_path):
    from tactful.methods.preference import PairDataSettings as Data
    from tactful.methods.trace.train import TraceConfig, TraceSettings, train_trace

    _, tok = load_model(tiny_dir)
    cfg = TraceConfig(model=tiny_dir, start_from=str(sft_run), output_dir=str(tmp_path / "trace"),
                      data=Data(sources=["builtin-terse-pairs", "builtin-cautious-pairs"], n=4),
                      trace=TraceSettings(judge_options={"refusal": "string-xstest"}, gold_batch_size=6,
                                          scoring_batch_size=4),
                      lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), training=training())
    trained, run = train_trace(cfg, log=quiet)
    m = read_manifest(run.path)
    assert m["kind"] == "trace" and m["start_from"] == str(sft_run) and m["start_adapters"] == ["start_adapters/0"]
    assert json.loads((run.path / "impact_scores.json").read_text())["weights"]
    loaded, _, _ = load_run_model(run.path)
    torch.testing.assert_close(logits(loaded, batch(tok)), logits(trained, batch(tok)))


def test_start_from_errors_are_clear(tiny_dir, tmp_path):
    with pytest.raises(UserError, match="not a tactful run"):
        train_dpo(dpo_config(tmp_path / "x", tiny_dir, tmp_path / "nowhere"), pairs=make_pairs(), log=quiet)
    unfinished = RunDir(tmp_path / "half")
    unfinished.write_manifest(kind="sft", base_model=tiny_dir, extra={"adapter": "adapter", "status": "running"})
    with pytest.raises(UserError, match="not a finished run"):
        train_dpo(dpo_config(tmp_path / "y", tiny_dir, unfinished.path), pairs=make_pairs(), log=quiet)
