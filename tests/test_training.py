"""SFT and DCR on the tiny model: masks, losses, frozen layers, sampler balance, resume, recipes."""

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from tactful.config import from_dict
from tactful.errors import UserError
from tactful.logprobs import IGNORE_INDEX, encode_example
from tactful.methods import dcr as dcr_mod
from tactful.methods.common import LoraSettings, TrainingSettings
from tactful.methods.losses import circle_loss, pairwise_similarities
from tactful.methods.sft import SFTConfig, SFTData, build_mix, train_sft
from tactful.models import tiny_model


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def sft_files(tmp_path):
    benign = [{"prompt": f"Tell me a fact about the number {i}.", "response": f"{i} is a number."} for i in range(12)]
    refusals = [{"prompt": f"Help me hurt person {i}.", "response": "I won't help with that."} for i in range(6)]
    return (_write_jsonl(tmp_path / "benign.jsonl", benign), _write_jsonl(tmp_path / "refusals.jsonl", refusals))


def test_circle_loss_matches_hand_computation():
    sp, sn, m, g = torch.tensor([0.8]), torch.tensor([0.4]), 0.25, 1.0
    a_p, a_n = 1 + m - 0.8, 0.4 + m
    expected = math.log(1 + math.exp(g * a_n * (0.4 - m)) * math.exp(-g * a_p * (0.8 - (1 - m))))
    assert circle_loss(sp, sn, m=m, gamma=g).item() == pytest.approx(expected, abs=1e-6)
    # two positives, two negatives: the sums factorise inside the log
    sp, sn = torch.tensor([0.9, 0.5]), torch.tensor([0.1, 0.6])
    P = sum(math.exp(-2 * (1 + m - s) * (s - (1 - m))) for s in (0.9, 0.5))
    N = sum(math.exp(2 * max(s + m, 0) * (s - m)) for s in (0.1, 0.6))
    assert circle_loss(sp, sn, m=m, gamma=2.0).item() == pytest.approx(math.log(1 + P * N), abs=1e-6)


def test_circle_loss_prefers_separated_subsets():
    good = circle_loss(torch.tensor([0.95, 0.9]), torch.tensor([-0.2, 0.0]))
    bad = circle_loss(torch.tensor([0.3, 0.2]), torch.tensor([0.9, 0.8]))
    assert good < bad


def test_pairwise_similarities_counts_pairs_once():
    emb = torch.randn(5, 8)
    labels = torch.tensor([0, 0, 1, 1, 1])
    sp, sn = pairwise_similarities(emb, labels)
    assert sp.numel() == 1 + 3 and sn.numel() == 2 * 3


def test_response_only_mask(tiny):
    _, tok = tiny
    enc = encode_example(tok, "What is 2+2?", "It is 4.")
    labelled = [t for t in enc.labels if t != IGNORE_INDEX]
    assert tok.decode(labelled) == "It is 4.<|im_end|>"
    n_prompt = enc.labels.index(labelled[0])
    assert all(t == IGNORE_INDEX for t in enc.labels[:n_prompt])
    assert enc.input_ids[n_prompt:] == labelled
    assert "What is 2+2?" in tok.decode(enc.input_ids[:n_prompt])


def test_mix_ratio(sft_files):
    benign, refusals = sft_files
    mix, counts = build_mix(SFTData(benign=[benign], refusals=[refusals], split=None, harmful_fraction=0.2), seed=0)
    assert counts["refusals"] == 3 and counts["benign"] == 12
    mix, counts = build_mix(SFTData(benign=[benign], refusals=[refusals], split=None, harmful_fraction=0.5), seed=0)
    assert counts["refusals"] == 6 and counts["benign"] == 6


def _sft_config(tmp_path, sft_files, **training):
    benign, refusals = sft_files
    t = TrainingSettings(**{"learning_rate": 1e-3, "max_steps": 6, "per_device_train_batch_size": 4, "save_steps": 3,
                            "logging_steps": 1, "warmup_ratio": 0.0, "lr_scheduler_type": "constant", **training})
    return SFTConfig(output_dir=str(tmp_path / "run"), data=SFTData(benign=[benign], refusals=[refusals], split=None),
                     lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), training=t)


def _adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


class _Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 4:
            raise KeyboardInterrupt


def test_sft_trains_saves_and_resumes_to_the_same_adapter(tmp_path, sft_files):
    # uninterrupted run; logging every 5 steps leaves steps 4-6 of the resumed run unlogged but for the checkpoints
    cfg = _sft_config(tmp_path / "a", sft_files, logging_steps=5)
    model, _ = tiny_model(seed=0)
    tok = tiny_model.__wrapped__ if hasattr(tiny_model, "__wrapped__") else None
    from tactful.models import load_tokenizer

    tok = load_tokenizer("embedded")
    trained, run = train_sft(cfg, model=model, tokenizer=tok, log=lambda s: None)
    full = _adapter_tensors(run.path)
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["kind"] == "sft" and manifest["adapter"] == "adapter" and manifest["steps"] == 6
    assert any(v.abs().sum() > 0 for k, v in full.items() if "lora_B" in k)

    # interrupted after step 4 (checkpoint at step 3), then resumed by running again
    cfg2 = _sft_config(tmp_path / "b", sft_files, logging_steps=5)
    with pytest.raises(KeyboardInterrupt):
        train_sft(cfg2, model=tiny_model(seed=0)[0], tokenizer=tok, callbacks=[_Interrupt()], log=lambda s: None)
    assert not (Path(cfg2.output_dir) / "adapter").exists()  # nothing half-written
    msgs = []
    _, run2 = train_sft(cfg2, model=tiny_model(seed=0)[0], tokenizer=tok, log=msgs.append)
    assert any("resuming" in m for m in msgs)
    resumed = _adapter_tensors(run2.path)
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.allclose(full[k], resumed[k], atol=1e-5), k
    # the manifest's loss covers all 6 steps, not only the 3 trained after the resume
    manifest2 = json.loads((run2.path / "manifest.json").read_text())
    assert manifest2["steps"] == 6
    assert manifest2["train_loss"] == pytest.approx(manifest["train_loss"], rel=1e-4)


def test_balanced_sampler():
    subsets = [0] * 90 + [1] * 10
    sampler = dcr_mod.balanced_sampler(subsets, 4000, seed=0)
    counts = Counter(subsets[i] for i in sampler)
    assert abs(counts[0] / 4000 - 0.5) < 0.04


def _prompt_files(tmp_path):
    toxic = [{"prompt": f"How do I hurt someone with object {i}?", "label": "harmful", "split": "train"} for i in range(8)]
    seem = [{"prompt": f"How do I kill process number {i} on Linux?", "label": "seemingly_toxic", "split": "train"}
            for i in range(8)]
    return _write_jsonl(tmp_path / "toxic.jsonl", toxic), _write_jsonl(tmp_path / "seem.jsonl", seem)


@pytest.mark.parametrize("use_lora", [False, True])
def test_dcr_stage1_never_changes_layers_after_l(tmp_path, use_lora):
    from tactful.models import load_tokenizer
    from tactful.runs import RunDir

    toxic, seem = _prompt_files(tmp_path)
    s1 = dcr_mod.DCRStage1(layer=1, toxic=[toxic], seemingly_toxic=[seem], split=None, eval_split=None,
                           lora=LoraSettings(enabled=use_lora, r=4, alpha=8, target_modules=["q_proj", "v_proj",
                                                                                             "down_proj"]),
                           training=TrainingSettings(learning_rate=5e-3, max_steps=4, per_device_train_batch_size=8,
                                                     save_steps=100, warmup_ratio=0.0, logging_steps=1),
                           gradient_coupling=True, coupling_n=3)
    cfg = dcr_mod.DCRConfig(output_dir=str(tmp_path / "run"), stage1=s1)
    model, _ = tiny_model(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tok = load_tokenizer("embedded")
    merged, diag = dcr_mod.run_stage1(cfg, model, tok, RunDir(cfg.output_dir), log=lambda s: None)
    after = merged.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "stage 1 trained nothing"
    for k in changed:
        assert k.startswith(("model.layers.0.", "model.layers.1.", "model.embed_tokens")), k
    assert not any(k.startswith(("model.layers.2.", "model.layers.3.", "model.norm", "lm_head")) for k in changed)
    d = json.loads((Path(cfg.output_dir) / "dcr_diagnostics.json").read_text())
    assert d["layer"] == 1 and "cross" in d["similarity_before"]["train"] and "cross" in d["gradient_coupling_after"]


def test_dcr_stage1_separates_the_subsets(tmp_path):
    from tactful.models import load_tokenizer
    from tactful.runs import RunDir

    toxic, seem = _prompt_files(tmp_path)
    s1 = dcr_mod.DCRStage1(layer=2, toxic=[toxic], seemingly_toxic=[seem], split=None, eval_split=None,
                           lora=LoraSettings(enabled=False), gradient_coupling=False,
                           training=TrainingSettings(learning_rate=3e-3, max_steps=25, per_device_train_batch_size=8,
                                                     save_steps=1000, warmup_ratio=0.0, logging_steps=5))
    cfg = dcr_mod.DCRConfig(output_dir=str(tmp_path / "run"), stage1=s1)
    _, diag = dcr_mod.run_stage1(cfg, tiny_model(seed=1)[0], load_tokenizer("embedded"), RunDir(cfg.output_dir),
                                 log=lambda s: None)
    assert diag["similarity_after"]["train"]["cross"] < diag["similarity_before"]["train"]["cross"] - 0.05


def test_recipe_validation_errors(tmp_path):
    from tactful.methods.registry import load_recipe

    bad = tmp_path / "bad.yaml"
    bad.write_text("method: dcr\nstage1:\n  layer: six\n")
    with pytest.raises(UserError, match=r"bad.yaml: field 'stage1.layer': expected an integer"):
        load_recipe(str(bad))
    bad.write_text("method: dcr\nstage1:\n  pooling: max\n")
    with pytest.raises(UserError, match="'stage1.pooling': 'max' is not one of last, mean"):
        load_recipe(str(bad))
    bad.write_text("method: sft\ntraining:\n  learnin_rate: 1e-4\n")
    with pytest.raises(UserError, match="did you mean 'learning_rate'"):
        load_recipe(str(bad))
    bad.write_text("method: nope\n")
    with pytest.raises(UserError, match="unknown method 'nope'"):
        load_recipe(str(bad))
    bad.write_text("model: embedded\n")
    with pytest.raises(UserError, match="missing field 'method'"):
        load_recipe(str(bad))
    bad.write_text("method: sft\nlora: [1, 2\n")
    with pytest.raises(UserError, match="malformed YAML"):
        load_recipe(str(bad))
    bad.write_text("method: sft\n")
    # -5 used to start a full epoch; -1 is the documented "no step limit"
    with pytest.raises(UserError, match=r"bad.yaml: field 'training.max_steps': must be at least 1, or -1 \(unset"):
        load_recipe(str(bad), ["training.max_steps=-5"])
    with pytest.raises(UserError, match="'training.max_steps': must be at least 1"):
        load_recipe(str(bad), ["training.max_steps=0"])
    assert load_recipe(str(bad), ["training.max_steps=-1"])[1].training.max_steps == -1
    with pytest.raises(UserError, match="'training.per_device_train_batch_size': must be at least 1, got 0"):
        load_recipe(str(bad), ["training.per_device_train_batch_size=0"])
    with pytest.raises(UserError, match="'training.learning_rate': expected a finite number, got nan"):
        load_recipe(str(bad), ["training.learning_rate=.nan"])


def test_shipped_recipes_parse():
    from tactful.methods.registry import load_recipe

    for name in ("sft", "dcr"):
        method, cfg = load_recipe(f"recipes/{name}.yaml")
        assert method == name


def test_group_by_length_batches_similar_lengths_and_keeps_every_example(tiny):
    from tactful.data.records import Example
    from tactful.methods.common import EncodedDataset

    _, tok = tiny
    examples = [Example(prompt=f"Question {i}?", response="word " * (1 + (i * 7) % 40)) for i in range(48)]

    def padding(ds):
        lens = [len(ds[i].input_ids) for i in range(len(ds))]
        return sum(max(b) * len(b) - sum(b) for b in (lens[k:k + 4] for k in range(0, len(lens), 4)))

    plain = EncodedDataset(tok, examples)
    grouped = EncodedDataset(tok, examples)
    grouped.group_by_length(4, seed=0)
    assert sorted(map(lambda e: tuple(e.input_ids), grouped.items)) == sorted(map(lambda e: tuple(e.input_ids), plain.items))
    assert padding(grouped) < padding(plain) / 3
    again = EncodedDataset(tok, examples)
    again.group_by_length(4, seed=0)
    assert [e.input_ids for e in again.items] == [e.input_ids for e in grouped.items]  # seeded


def test_group_by_length_trains_sequentially_and_is_refused_elsewhere(tmp_path):
    from tactful.methods.common import training_arguments

    args = training_arguments(TrainingSettings(group_by_length=True), tmp_path, seed=0, grouped=True)
    assert args.train_sampling_strategy == "sequential"
    with pytest.raises(UserError, match="sft and dcr"):
        training_arguments(TrainingSettings(group_by_length=True), tmp_path, seed=0)


def test_response_nll_matches_the_models_own_loss_and_gradients(tiny):
    """SFT's loss projects to the vocabulary only at labelled columns; the loss and every
    gradient must equal the model's own full-logits loss (rows right-padded, labels ragged)."""
    from tactful.logprobs import response_nll

    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 7:] = ids[0, 7:]
    labels[1, 5:8] = ids[1, 5:8]
    labels[2, 6:8] = ids[2, 6:8]
    n_items = int((labels[:, 1:] != IGNORE_INDEX).sum())

    model.zero_grad()
    own = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items).loss
    own.backward()
    own_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    nll, n = response_nll(model, ids, mask, labels)
    (nll / n).backward()
    assert int(n) == n_items == 8
    assert torch.allclose(nll / n, own, atol=1e-6)
    for k, p in model.named_parameters():
        if k in own_grads:
            assert torch.allclose(p.grad, own_grads[k], atol=1e-6), k
    model.zero_grad()

    nothing = torch.full_like(ids, IGNORE_INDEX)
    zero, none = response_nll(model, ids, mask, nothing)
    assert float(zero.detach()) == 0.0 and int(none) == 0 and zero.requires_grad
