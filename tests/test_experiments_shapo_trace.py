"""The non-trivial logic of the ShaPO and TRACE experiment scripts: the held-out split of the
PKU pairs leaks no prompt into training, the win-rate judge undoes its order randomisation,
TRACE's 'rule changed' sets follow the policies' decisions, naive relabelling."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tactful.data.records import PreferencePair
from tactful.eval.judges.base import Verdict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "experiments" / "shapo"))

import shapo_data  # noqa: E402
import winrate  # noqa: E402


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


trace_run = _load("trace_experiment_run", ROOT / "experiments" / "trace" / "run.py")


def _pairs() -> list[PreferencePair]:
    out = []
    for i in range(40):
        # case, spacing and a trailing "?" vary between pairs of the same prompt
        prompt = [f"How do I do thing {i % 13}?", f"how do I  do thing {i % 13}", f"HOW DO I DO THING {i % 13} ?"][i % 3]
        out.append(PreferencePair(prompt=prompt, chosen=f"safe {i}", rejected=f"unsafe {i}", chosen_safe=True,
                                  rejected_safe=False, id=f"p{i}"))
    return out


def test_heldout_prompts_never_appear_in_training():
    pairs = _pairs()
    train, held = shapo_data.split_by_prompt(pairs, 0.3, seed=0)
    keys_train = {shapo_data.prompt_key(p.prompt) for p in train}
    keys_held = {shapo_data.prompt_key(p.prompt) for p in held}
    assert len(keys_train | keys_held) == 13 and len(keys_held) == 4  # variants count as one prompt
    assert not keys_train & keys_held and len(train) + len(held) == len(pairs)
    assert shapo_data.split_by_prompt(pairs, 0.3, seed=0) == (train, held)  # deterministic
    picked = shapo_data.one_per_prompt(train, 5, seed=0)
    assert len({shapo_data.prompt_key(p.prompt) for p in picked}) == 5
    assert len(shapo_data.one_per_prompt(train, 20, seed=0)) == 20  # topped up past the 9 prompts


class FakeJudge:
    """Prefers whichever answer contains 'GOOD', wherever it is shown."""

    def __init__(self):
        self.calls = 0

    def chat(self, messages, **kw):
        self.calls += 1
        text = messages[0]["content"]
        a = text.split("Answer A:")[1].split("Answer B:")[0]
        return "A" if "GOOD" in a else "B."


def test_win_rate_undoes_the_order_randomisation():
    items = [("q", "GOOD answer", "reference")] * 30 + [("q", "bad answer", "GOOD reference")] * 10
    res = winrate.win_rate(FakeJudge(), items, seed=3)
    assert res["value"] == pytest.approx(0.75) and res["n"] == 40 and res["judge_errors"] == 0
    assert 5 < res["model_answer_first"] < 35  # both orders were used
    assert winrate.parse_choice("  b") == "B" and winrate.parse_choice("Answer: A") == "A"
    assert winrate.parse_choice("neither") is None


def test_trace_changed_rules_follow_the_policies_decisions():
    changed = trace_run.changed_categories(["violence", "economic_crime", "cybercrime", "mental_manipulation",
                                            "homonyms", None])
    # violence: the new policy only adds notes; manipulation: refusals now need a resource;
    # cybercrime: restricted with allowed contexts; others: over-refusal now violates
    assert changed == {"violence": False, "economic_crime": False, "cybercrime": True, "mental_manipulation": True,
                       "homonyms": True, None: True}


def test_naive_relabelling_swaps_inverted_pairs_and_drops_punished_ones(tmp_path):
    from tactful.io import read_jsonl_tolerant
    from tactful.methods.trace.triage import INVERT, PUNISH, RETAIN, TriagedPair, write_triage

    v, c = Verdict("violates"), Verdict("complies")
    rows = [TriagedPair(PreferencePair(prompt=f"p{i}", chosen=f"c{i}", rejected=f"r{i}", id=str(i)), label, a, b)
            for i, (label, a, b) in enumerate([(INVERT, v, c), (PUNISH, v, v), (RETAIN, c, v)])]
    write_triage(tmp_path / "triage", rows, {"judge": "test", "policy": {"hash": "h"}})
    counts = trace_run.relabelled_pairs(tmp_path / "triage", tmp_path / "naive.jsonl")
    got = [(r["prompt"], r["chosen"], r["rejected"]) for r in read_jsonl_tolerant(tmp_path / "naive.jsonl")]
    assert got == [("p0", "r0", "c0"), ("p2", "c2", "r2")]
    assert counts == {"pairs": 2, "swapped": 1, "dropped": 1}


def test_paper_relabelling_keeps_punished_pairs(tmp_path):
    from tactful.io import read_jsonl_tolerant
    from tactful.methods.trace.triage import INVERT, PUNISH, RETAIN, TriagedPair, write_triage

    v, c = Verdict("violates"), Verdict("complies")
    rows = [TriagedPair(PreferencePair(prompt=f"p{i}", chosen=f"c{i}", rejected=f"r{i}", id=str(i)), label, a, b)
            for i, (label, a, b) in enumerate([(INVERT, v, c), (PUNISH, v, v), (RETAIN, c, v)])]
    write_triage(tmp_path / "triage", rows, {"judge": "test", "policy": {"hash": "h"}})
    counts = trace_run.relabelled_all_pairs(tmp_path / "triage", tmp_path / "all.jsonl")
    got = [(r["prompt"], r["chosen"], r["rejected"]) for r in read_jsonl_tolerant(tmp_path / "all.jsonl")]
    assert got == [("p0", "r0", "c0"), ("p1", "c1", "r1"), ("p2", "c2", "r2")]
    assert counts == {"pairs": 3, "swapped": 1, "kept_punish": 1}


def _arm_config(arm: str, settings: dict, tmp_path: Path):
    """The config an arm of the TRACE experiment would train with (overrides applied to its recipe)."""
    from tactful.methods.registry import load_recipe

    recipe, overrides = trace_run.shift_overrides(arm, seed=1, start=tmp_path / "old", steps=30, batch=4, lr=5e-4,
                                                  settings=settings, data=tmp_path, triage_file=tmp_path / "t.jsonl",
                                                  paper_dpo_lr=5e-5)
    return load_recipe(str(ROOT / "recipes" / recipe), [f"output_dir={tmp_path / arm}", *overrides])[1]


def test_trace_experiment_defaults_to_the_official_settings(tmp_path):
    assert trace_run.parser().parse_args([]).settings == "official"
    official = trace_run.resolve_settings("official")
    cfg = _arm_config("trace", official, tmp_path)
    assert (cfg.trace.weight_scale, cfg.trace.gold_batch_size) == ("sum", 64)
    # the official 1 x 4: a micro-batch's TRACE loss is a sum, averaged over the accumulation steps
    assert (cfg.training.per_device_train_batch_size, cfg.training.gradient_accumulation_steps) == (1, 4)
    assert cfg.loss.beta == 0.3 and cfg.seed == 1 and cfg.training.learning_rate == 5e-4
    assert _arm_config("trace-uniform", official, tmp_path).trace.weight_scale == "mean"  # official: weight 1 each
    paper = _arm_config("no-triage-paper", official, tmp_path)
    assert paper.trace.no_triage and paper.trace.no_triage_target == "rejected"
    assert _arm_config("npo-no-triage", official, tmp_path).trace.no_triage_target == "flagged"
    naive = _arm_config("naive-dpo-paper", official, tmp_path)
    assert naive.loss.beta == 0.1 and naive.data.sources == [str(tmp_path / "relabelled_all_pairs.jsonl")]
    assert (naive.lora.r, naive.lora.alpha, len(naive.lora.target_modules)) == (16, 16, 7)
    assert naive.training.learning_rate == 5e-5
    matched = _arm_config("naive-dpo", official, tmp_path)
    assert matched.loss.beta == 0.3 and matched.data.sources == [str(tmp_path / "relabelled_pairs.jsonl")]
    ours = _arm_config("trace", trace_run.resolve_settings("ours"), tmp_path)
    assert (ours.trace.weight_scale, ours.trace.gold_batch_size) == ("mean", 12)
    assert (ours.training.per_device_train_batch_size, ours.training.gradient_accumulation_steps) == (4, 1)
    assert trace_run.resolve_settings("official", gold=12, weight_scale="mean")["gold"] == 12


def test_a_runs_directory_holds_one_set_of_settings(tmp_path):
    trace_run.check_runs_settings(tmp_path, {"name": "official", "gold": 64})
    trace_run.check_runs_settings(tmp_path, {"name": "official", "gold": 64})  # same: fine
    with pytest.raises(SystemExit, match="other settings"):
        trace_run.check_runs_settings(tmp_path, {"name": "ours", "gold": 12})


def test_probe_pairs_are_every_training_prompt_pair_and_no_heldout_one(tmp_path):
    import json

    from tactful.io import read_jsonl_tolerant

    rows = [{"prompt": p.prompt, "response": [p.chosen, p.rejected]} for p in _pairs()]
    src = tmp_path / "pku.json"
    src.write_text(json.dumps(rows))
    info = shapo_data.probe_pairs(src, tmp_path / "data", holdout_fraction=0.3, split_seed=0)
    got = list(read_jsonl_tolerant(tmp_path / "data" / "probe_pairs.jsonl"))
    from tactful.data.registry import load_benchmark

    train, held = shapo_data.split_by_prompt(load_benchmark(shapo_data.SOURCE_NAME, path=str(src)), 0.3, seed=0)
    assert [r["chosen"] for r in got] == [p.chosen for p in train]  # every pair of the training prompts
    assert not {shapo_data.prompt_key(r["prompt"]) for r in got} & {shapo_data.prompt_key(p.prompt) for p in held}
    assert info["pairs"] == len(train) and info["distinct_responses"] == 2 * len(train)
    assert all(r["chosen_safe"] is True and r["rejected_safe"] is False for r in got)  # the probe's labels
    assert shapo_data.probe_pairs(src, tmp_path / "data", holdout_fraction=0.3, split_seed=0) == info  # reused


def test_a_probe_on_all_responses_makes_other_shapo_arms_only():
    shapo_run = _load("shapo_experiment_run", ROOT / "experiments" / "shapo" / "run.py")
    assert shapo_run.arm_name("shapo", 0.3) == "shapo-noise30"
    assert shapo_run.arm_name("drdpo-shapo", 0.3, "all") == "drdpo-shapo-probeall-noise30"
    assert shapo_run.arm_name("dpo", 0.3, "all") == "dpo-noise30"  # no probe: its finished runs are reused


def test_both_perturbations_add_shapo_arms_only(tmp_path):
    # one invocation may train (and summarise) the SAM and the official-gamma ShaPO arms; the DPO-family
    # arms do not depend on the perturbation, so they are planned once
    shapo_run = _load("shapo_experiment_run", ROOT / "experiments" / "shapo" / "run.py")
    c = shapo_run.CALIBRATION

    def est(perts):
        return shapo_run.estimate_s(["dpo", "shapo"], [0.3], [0], 2, 1, tmp_path, False, perturbations=perts)

    one_shapo_arm = 2 * c["shapo_step_s"] + c["overhead_s"] + c["probe_s"] + c["eval_s"]
    assert est(("sam", "official")) - est(("sam",)) == pytest.approx(one_shapo_arm)
    assert est(("official",)) == pytest.approx(est(("sam",)))
