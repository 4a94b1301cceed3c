"""ShaPO on the tiny model: probe, neuron mask, the masked sharpness-aware step, soft labels."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tactful.data.records import PreferencePair
from tactful.methods.common import LoraSettings, TrainingSettings, apply_lora, training_arguments
from tactful.methods.losses import PreferenceLoss
from tactful.methods.preference import PairCollator, PairDataset, concatenated_logps
from tactful.errors import UserError
from tactful.methods.shapo import (
    NeuronPerturbation,
    ProbeSettings,
    ShaPOConfig,
    ShaPOSettings,
    ShaPOTrainer,
    _probe_items,
    base_weight,
    down_projections,
    fit_probe,
    fit_probe_on_pairs,
    load_probe,
    neuron_scores,
    perturbation_from_gradient,
    response_costs,
    save_probe,
    select_neurons,
    soft_labels,
    train_shapo,
    verdict_cost,
)
from tactful.models import tiny_model


def make_pairs(n: int = 4) -> list[PreferencePair]:
    return [PreferencePair(prompt=f"How do I hotwire car {i}?", chosen="I can't help with that." if i % 2 else
                           "No. Call a locksmith or your dealer.", rejected=f"Sure: strip wire {i}, then touch it.",
                           chosen_safe=True, rejected_safe=False, id=f"p{i}") for i in range(n)]


# ---------------------------------------------------------------- selection and probe


def test_select_neurons_by_sign():
    scores = [torch.tensor([0.1, -0.5, 0.3]), torch.tensor([-0.9, 0.8, 0.0])]
    pick = lambda sign, f=0.34: [m.nonzero().flatten().tolist() for m in select_neurons(scores, f, sign)]  # noqa: E731
    assert pick("negative") == [[1], [0]]  # -0.5 and -0.9: the official ascending sort
    assert pick("positive") == [[2], [1]]  # 0.3 and 0.8
    assert pick("abs") == [[], [0, 1]]  # |-0.9| and |0.8|
    assert pick("negative", 1e-6) == [[], [0]]  # at least one neuron
    assert sum(int(m.sum()) for m in select_neurons(scores, 1.0, "abs")) == 6


def test_neuron_scores_are_cosines_with_down_proj_columns():
    model, _ = tiny_model(0)
    modules = down_projections(model)
    assert len(modules) == 4
    v = torch.randn(64)
    scores = neuron_scores(modules, v)
    w = base_weight(modules[2])
    assert scores[2].shape == (128,)
    assert scores[2][17].item() == pytest.approx(torch.nn.functional.cosine_similarity(w[:, 17], v, dim=0).item(),
                                                 abs=1e-5)


def test_probe_recovers_a_planted_direction():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(16, generator=g)
    u = u / u.norm()
    y = torch.arange(80) % 2
    x = torch.randn(80, 16, generator=g) * 0.3 + (2 * y - 1).unsqueeze(1) * u
    probe = fit_probe(x, y, seed=0)
    assert probe.train_accuracy == 1.0 and probe.heldout_accuracy == 1.0 and probe.n_heldout == 16
    assert torch.nn.functional.cosine_similarity(probe.direction, u, dim=0) > 0.9  # unsafe minus safe


def test_probe_holds_out_whole_prompts():
    """Siblings (same prompt, opposite labels) never straddle the split: a probe that memorises
    prompts instead of toxicity must not look good on held-out data."""
    g = torch.Generator().manual_seed(0)
    prompts = torch.randn(40, 16, generator=g)
    x = prompts.repeat_interleave(2, 0) + 0.01 * torch.randn(80, 16, generator=g)  # features = the prompt
    y = torch.arange(80) % 2
    groups = [i // 2 for i in range(80)]
    probe = fit_probe(x, y, seed=0, groups=groups)
    assert probe.n_heldout == 16 and probe.n_train == 64
    # no information about toxicity in the features: chance on held-out prompts (both siblings get
    # the same prediction) -- while a split by response scores the memorised sibling, below chance
    assert 0.4 <= probe.heldout_accuracy <= 0.6
    assert fit_probe(x, y, seed=0).heldout_accuracy < 0.3
    with pytest.raises(ValueError):
        fit_probe(x, y, groups=groups[:10])


def test_probe_labels_from_pairs_or_a_judge_agree():
    pairs = make_pairs(4)
    items, unsafe = _probe_items(pairs, "pairs", 100, 0)
    assert len(items) == 8 and sum(unsafe) == 4
    items_j, unsafe_j = _probe_items(pairs, "string-xstest", 100, 0)
    assert dict(zip(items_j, unsafe_j)) == dict(zip(items, unsafe))
    assert len(_probe_items(make_pairs(30), "pairs", None, 0)[0]) == 60  # max_examples null: every response
    assert len(_probe_items(make_pairs(30), "pairs", 16, 0)[0]) == 16


def test_a_probe_fitted_beforehand_is_used_instead_of_fitting(tmp_path):
    """probe.file: a probe fitted on other labelled data (the experiment's --probe-data all)
    selects the neurons, and its held-out accuracy reaches the manifest; nothing is refitted."""
    model, tok = tiny_model(0)
    probe, info = fit_probe_on_pairs(model, tok, make_pairs(12), ProbeSettings(max_examples=None), seed=0,
                                     max_length=48, log=lambda s: None)
    assert info["n_train"] + info["n_heldout"] == 24 and info["heldout_accuracy"] is not None
    path = tmp_path / "probe.safetensors"
    save_probe(path, probe, info)
    direction, saved = load_probe(path)
    assert torch.equal(direction, probe.direction) and saved["heldout_accuracy"] == info["heldout_accuracy"]

    cfg = ShaPOConfig(model="tiny", output_dir=str(tmp_path / "run"), lora=LoraSettings(r=4, alpha=8),
                      training=TrainingSettings(max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3,
                                                warmup_ratio=0.0, logging_steps=1, save_steps=100, max_length=48))
    cfg.probe.file, cfg.shapo.mask_fraction = str(path), 0.02
    logs: list[str] = []
    _, run = train_shapo(cfg, model=tiny_model(0)[0], tokenizer=tok, pairs=make_pairs(2), log=logs.append)
    assert not any("fitting the toxicity probe" in line for line in logs)
    shapo = json.loads((run.path / "manifest.json").read_text())["shapo"]
    assert shapo["probe"]["from_file"] == str(path) and shapo["probe"]["heldout_accuracy"] == info["heldout_accuracy"]
    saved_mask = load_file(str(run.path / "shapo_mask.safetensors"))
    want = select_neurons(neuron_scores(down_projections(tiny_model(0)[0]), probe.direction), 0.02, "negative")
    assert all(torch.equal(saved_mask[f"mask.{i}"], m) for i, m in enumerate(want))
    bad = tmp_path / "bad.safetensors"
    save_probe(bad, fit_probe(torch.randn(24, 8), torch.tensor([0, 1] * 12)), {})
    cfg.probe.file, cfg.output_dir = str(bad), str(tmp_path / "bad-run")
    with pytest.raises(UserError, match="hidden size"):
        train_shapo(cfg, model=tiny_model(0)[0], tokenizer=tok, pairs=make_pairs(2), log=lambda s: None)


# ---------------------------------------------------------------- the perturbation


def random_masks(modules, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = []
    for m in modules:
        mask = torch.zeros(base_weight(m).shape[1], dtype=torch.bool)
        mask[torch.randperm(mask.numel(), generator=g)[:k]] = True
        masks.append(mask)
    return masks


@pytest.mark.parametrize("lora", [False, True])
def test_hook_delta_equals_editing_only_the_selected_columns(lora):
    model, tok = tiny_model(0)
    if lora:
        model = apply_lora(model, LoraSettings(r=4, alpha=8))
        with torch.no_grad():  # a non-zero LoRA update, so W_eff != W
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    ids = torch.tensor([tok("The quick brown fox jumps")["input_ids"]])
    modules = down_projections(model)
    pert = NeuronPerturbation(modules, random_masks(modules))
    deltas = [torch.randn(d.shape) * 0.1 for d in pert.zeros()]
    with torch.no_grad(), pert.delta(deltas):
        hooked = model(ids).logits
    # the same numbers from editing the weight columns in place, on a copy
    edited = copy.deepcopy(model)
    full = pert.full_columns(deltas)
    for m, mask, f in zip(down_projections(edited), pert.masks, full):
        assert torch.count_nonzero(f[:, ~mask]) == 0  # nothing outside the selected columns
        with torch.no_grad():
            base_weight(m).add_(f)
    with torch.no_grad():
        assert torch.allclose(hooked, edited(ids).logits, atol=1e-5)
        assert not torch.allclose(hooked, model(ids).logits, atol=1e-4)  # the hook is gone and did something
    assert all(not m._forward_hooks for m in modules)

    # and the gradient w.r.t. the zero deltas is dL/dW[:, selected]
    if not lora:
        zeros = pert.zeros(requires_grad=True)
        with pert.delta(zeros):
            g = torch.autograd.grad(model(ids).logits.square().mean(), zeros)
        model.zero_grad()
        model(ids).logits.square().mean().backward()
        for (_, m, idx), gi in zip(pert.layers, g):
            assert torch.allclose(gi, base_weight(m).grad[:, idx], atol=1e-6)


def test_perturbation_scales():
    grads = [torch.tensor([[3.0, 0.0]]), torch.tensor([[4.0]])]
    eps, scale = perturbation_from_gradient(grads, ShaPOSettings(perturbation="sam", rho=0.5), torch.Generator())
    assert math.sqrt(sum(float((e ** 2).sum()) for e in eps)) == pytest.approx(0.5)  # rho * g / ||g||, ||g|| = 5
    settings = ShaPOSettings(perturbation="official")
    eps1, gamma = perturbation_from_gradient(grads, settings, torch.Generator().manual_seed(3))
    assert 2e-6 <= gamma <= 4e-6 and torch.allclose(eps1[1], gamma * grads[1])
    assert perturbation_from_gradient(grads, settings, torch.Generator().manual_seed(3))[1] == gamma


def make_trainer(tmp_path, model, tok, pairs, settings, masks, *, optim="adamw_torch", lr=1e-3, **kw):
    ds = PairDataset(tok, pairs, max_length=48)
    training = TrainingSettings(max_steps=1, per_device_train_batch_size=len(pairs), learning_rate=lr, warmup_ratio=0.0,
                                lr_scheduler_type="constant", max_grad_norm=0.0, optim=optim, save_steps=100,
                                logging_steps=1, max_length=48)
    args = training_arguments(training, tmp_path / "ckpt", seed=0)
    pert = NeuronPerturbation(down_projections(model), masks)
    return ShaPOTrainer(model=model, args=args, train_dataset=ds, data_collator=PairCollator(tok.pad_token_id),
                        loss=PreferenceLoss("sigmoid", beta=0.5), perturbation=pert, shapo=settings, **kw)


def manual_sam_grads(trainer, model, batch):
    """The step by hand: reference unperturbed, g at theta, eps = rho g/||g||, gradient at theta + eps."""
    pert = trainer.perturbation
    ref_c, ref_r = trainer.reference_logps(model, batch)
    batch = {**batch, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    zeros = pert.zeros(requires_grad=True)
    with pert.delta(zeros):
        g = torch.autograd.grad(trainer.compute_loss(model, batch), zeros)
    eps, _ = perturbation_from_gradient(g, trainer.shapo, torch.Generator())
    model.zero_grad()
    with pert.delta(eps):
        trainer.compute_loss(model, batch).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return grads


def test_sam_step_gradient_and_exact_restore(tmp_path):
    model, tok = tiny_model(0)
    model = apply_lora(model, LoraSettings(r=4, alpha=8))
    with torch.no_grad():  # away from init, so the perturbation has something to act on
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pairs = make_pairs(2)
    settings = ShaPOSettings(sam_interval=1, perturbation="sam", rho=5.0)
    trainer = make_trainer(tmp_path, model, tok, pairs, settings, random_masks(down_projections(model), k=20))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    model.train()
    expected = manual_sam_grads(trainer, model, batch)

    model.zero_grad()
    trainer.compute_loss(model, batch).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = batch["input_ids"][:1]
    with torch.no_grad():
        out_before = model(ids).logits
    trainer.current_gradient_accumulation_steps = 1
    assert trainer.is_sam_step()
    trainer.training_step(model, batch)

    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # no weight was ever touched
    assert all(not m._forward_hooks for m in down_projections(model))  # the perturbation is gone
    with torch.no_grad():
        assert torch.equal(model(ids).logits, out_before)
    differs = False
    for n, g in expected.items():
        got = dict(model.named_parameters())[n].grad
        assert torch.allclose(got, g, atol=1e-6), n
        differs |= not torch.allclose(g, plain[n], atol=1e-6)
    assert differs  # the gradient really was taken at theta + eps


def test_trained_step_equals_a_plain_step_with_the_sam_gradient(tmp_path):
    model, tok = tiny_model(0)
    model = apply_lora(model, LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pairs = make_pairs(2)
    settings = ShaPOSettings(sam_interval=1, perturbation="sam", rho=5.0)
    trainer = make_trainer(tmp_path, model, tok, pairs, settings, random_masks(down_projections(model), k=20),
                           optim="sgd", lr=0.1)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    model.train()
    grads = manual_sam_grads(trainer, model, batch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()  # one optimizer step on the whole (2-pair) data set
    for n, p in model.named_parameters():
        want = before[n] - 0.1 * grads[n] if n in grads else before[n]
        assert torch.allclose(p.detach(), want, atol=1e-6), n


def hand_loss(model, batch, beta, beta_prime):
    """The official preference_loss by hand: DPO per pair, then the mean or Dr.DPO's
    -beta' log mean exp(-l / beta') (its mode_loss DrDPO)."""
    pol = concatenated_logps(model, batch)
    h = (pol.chosen - batch["ref_chosen_logps"]) - (pol.rejected - batch["ref_rejected_logps"])
    losses = -torch.nn.functional.logsigmoid(beta * h)
    if beta_prime is None:
        return losses.mean()
    return -beta_prime * torch.log(torch.mean(torch.exp(-losses / beta_prime)))


@pytest.mark.parametrize("perturbation,beta_prime", [("official", None), ("sam", None), ("official", 2.0)])
def test_sam_step_matches_the_official_in_place_edit(tmp_path, perturbation, beta_prime):
    """Full fine-tuning, as the official code: our hooked step gives the gradient the official
    algorithm gets by editing the weights, W += scale * (g * mask) with g the full dL/dW, loss
    at the perturbed point, W -= scale * (g * mask); scale = gamma (official; gamma_min = gamma_max
    pins the draw) or rho / ||g * mask|| (sam). With beta_prime, the loss is Dr.DPO + ShaPO."""
    model, tok = tiny_model(0)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    ref = copy.deepcopy(model).eval()
    pairs = make_pairs(2)
    settings = ShaPOSettings(sam_interval=1, perturbation=perturbation, gamma_min=0.3, gamma_max=0.3, rho=3.0)
    masks = random_masks(down_projections(model), k=20)
    trainer = make_trainer(tmp_path, model, tok, pairs, settings, masks, ref_model=ref,
                           drdpo_beta_prime=beta_prime)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad():
        r = concatenated_logps(ref, batch)
    refd = {**batch, "ref_chosen_logps": r.chosen, "ref_rejected_logps": r.rejected}

    hand = copy.deepcopy(model)
    hand_loss(hand, refd, 0.5, beta_prime).backward()
    plain = {n: p.grad.clone() for n, p in hand.named_parameters()}
    moved = [(base_weight(m), base_weight(m).grad * mask.float()[None, :])
             for m, mask in zip(down_projections(hand), masks)]
    scale = 0.3 if perturbation == "official" else 3.0 / math.sqrt(sum(float((g ** 2).sum()) for _, g in moved))
    with torch.no_grad():
        for w, g in moved:
            w.add_(scale * g)
    hand.zero_grad()
    hand_loss(hand, refd, 0.5, beta_prime).backward()
    expected = {n: p.grad.clone() for n, p in hand.named_parameters()}

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(model, batch)
    got = dict(model.named_parameters())
    for n, p in got.items():
        assert torch.equal(p.detach(), before[n]), n  # restored exactly
    atol = 1e-6 * max(float(g.abs().max()) for g in expected.values())
    assert all(torch.allclose(got[n].grad, g, atol=atol) for n, g in expected.items())
    assert any(not torch.allclose(g, plain[n], atol=10 * atol) for n, g in expected.items())  # eps mattered


def test_shapo_composes_with_drdpo_as_the_official_readme_runs_it():
    """The loss a ShaPO run with loss.drdpo optimises is Dr.DPO's aggregate of the per-pair
    DPO losses (README: loss=dpo beta 0.1, loss.mode_loss=DrDPO, mode_weight 1)."""
    model, tok = tiny_model(0)
    model = apply_lora(model, LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # pairs far apart in loss, so the soft minimum and the mean differ
    trainer = ShaPOTrainer.__new__(ShaPOTrainer)  # the loss only: no Trainer machinery needed
    trainer.loss_spec, trainer.drdpo_beta_prime, trainer.ref_model = PreferenceLoss("sigmoid", beta=0.1), 1.0, None
    trainer.record_metrics = False

    class Acc:
        def unwrap_model(self, m):
            return m

    trainer.accelerator = Acc()
    ds = PairDataset(tok, make_pairs(4), max_length=48)
    batch = PairCollator(tok.pad_token_id)([ds[i] for i in range(4)])
    got = trainer.compute_loss(model, batch)
    with torch.no_grad(), model.disable_adapter():
        r = concatenated_logps(model, batch)
    want = hand_loss(model, {**batch, "ref_chosen_logps": r.chosen, "ref_rejected_logps": r.rejected}, 0.1, 1.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    trainer.drdpo_beta_prime = None  # plain DPO: the mean, which the soft minimum stays below
    mean = hand_loss(model, {**batch, "ref_chosen_logps": r.chosen, "ref_rejected_logps": r.rejected}, 0.1, None)
    assert trainer.compute_loss(model, batch).item() == pytest.approx(mean.item(), rel=1e-5)
    assert want.item() < mean.item() - 1e-6  # (at beta 0.1 the losses sit near log 2: a small gap)


def test_sam_interval():
    trainer = ShaPOTrainer.__new__(ShaPOTrainer)
    trainer.shapo = ShaPOSettings(sam_interval=5)

    class State:
        global_step = 0

    trainer.state = State()
    sam = []
    for step in range(12):
        trainer.state.global_step = step
        sam.append(trainer.is_sam_step())
    assert [i + 1 for i, s in enumerate(sam) if s] == [5, 10]  # the 5th and 10th optimizer steps


# ---------------------------------------------------------------- soft labels and the run


def test_costs_and_soft_labels():
    pairs = make_pairs(2)
    assert response_costs(pairs, "labels") == [(0.0, 1.0), (0.0, 1.0)]
    assert response_costs(pairs, "string-xstest") == [(0.0, 1.0), (0.0, 1.0)]
    flipped = PreferencePair(prompt="x", chosen="Sure: do it.", rejected="I can't help.", chosen_safe=False,
                             rejected_safe=True)
    p = soft_labels(response_costs([pairs[0], flipped], "labels"), 10.0)
    assert p[0] == pytest.approx(1 / (1 + math.exp(-10)))
    assert p[1] == pytest.approx(1 / (1 + math.exp(10)))  # the noisy label is corrected, not trusted
    assert soft_labels([(1.0, 1.0)], 10.0) == [0.5]

    class V:
        def __init__(self, label, refused=None):
            self.label, self.refused = label, refused

    assert [verdict_cost(V("unsafe")), verdict_cost(V("safe")), verdict_cost(V("full_refusal", True)),
            verdict_cost(V("full_compliance", False)), verdict_cost(V("error"))] == [1.0, 0.0, 0.0, 1.0, 0.5]


@pytest.mark.parametrize("lora", [True, False])
def test_train_shapo_end_to_end(tmp_path, lora):
    model, tok = tiny_model(0)
    cfg = ShaPOConfig(model="tiny", output_dir=str(tmp_path / "run"), lora=LoraSettings(enabled=lora, r=4, alpha=8),
                      training=TrainingSettings(max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                                                warmup_ratio=0.0, logging_steps=1, save_steps=100, max_length=48))
    cfg.loss.name, cfg.loss.label_smoothing, cfg.loss.drdpo = "rdpo", 0.2, True
    cfg.shapo.sam_interval, cfg.shapo.mask_fraction, cfg.shapo.reward_level = 2, 0.02, True
    logs: list[str] = []
    _, run = train_shapo(cfg, model=model, tokenizer=tok, pairs=make_pairs(4), log=logs.append)
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["kind"] == "shapo" and manifest["steps"] == 2
    assert manifest["adapter" if lora else "model_dir"] == ("adapter" if lora else "model")
    saved = load_file(str(run.path / "shapo_mask.safetensors"))
    n_selected = sum(int(saved[f"mask.{i}"].sum()) for i in range(4))
    assert n_selected == int(0.02 * 4 * 128) == manifest["shapo"]["mask"]["n_selected"]
    assert load_file(str(run.path / "shapo_probe.safetensors"))["direction"].shape == (64,)
    assert manifest["shapo"]["reward_level"]["mean_p_star"] > 0.99
    history = json.loads((run.path / "train_log.json").read_text())
    assert "shapo/eps_norm" in history[1] and "shapo/eps_norm" not in history[0]  # step 2 is the SAM step

    # a re-run in the same directory reuses the probe and the mask, unless the selection changed
    model, tok = tiny_model(0)
    train_shapo(cfg, model=model, tokenizer=tok, pairs=make_pairs(4), log=logs.append)
    assert sum("reusing the ShaPO probe" in line for line in logs) == 1
    if lora:
        cfg.shapo.sign = "positive"
        model, tok = tiny_model(0)
        train_shapo(cfg, model=model, tokenizer=tok, pairs=make_pairs(4), log=logs.append)
        assert sum("reusing the ShaPO probe" in line for line in logs) == 1
        assert load_file(str(run.path / "shapo_mask.safetensors"))["score.0"].shape == (128,)


def test_shapo_resume_gives_the_same_adapter(tmp_path):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= 2:
                control.should_training_stop = True

    def cfg(out):
        c = ShaPOConfig(model="tiny", output_dir=str(out), lora=LoraSettings(r=4, alpha=8),
                        training=TrainingSettings(max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
                                                  warmup_ratio=0.0, logging_steps=1, save_steps=2, max_length=48))
        c.shapo.sam_interval, c.shapo.mask_fraction = 2, 0.05
        c.shapo.gamma_min, c.shapo.gamma_max = 0.5, 1.0  # the official draw, large enough to matter here
        return c

    quiet = lambda s: None  # noqa: E731
    model, tok = tiny_model(0)
    _, full = train_shapo(cfg(tmp_path / "full"), model=model, tokenizer=tok, pairs=make_pairs(8), log=quiet)
    model, tok = tiny_model(0)
    train_shapo(cfg(tmp_path / "part"), model=model, tokenizer=tok, pairs=make_pairs(8), callbacks=[StopAt()],
                log=quiet)
    model, tok = tiny_model(0)
    _, part = train_shapo(cfg(tmp_path / "part"), model=model, tokenizer=tok, pairs=make_pairs(8), log=quiet)
    a = load_file(str(full.path / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part.path / "adapter" / "adapter_model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
