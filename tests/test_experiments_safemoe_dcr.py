"""The re-run helpers of experiments/safemoe/run.py and experiments/dcr/run.py, and the shared ones
they added to experiments/common.py: every new arm's settings parse as its recipe's config, safe
replies and their informativeness are chosen by the outcome judge, verdicts are decided only by
intervals, timings from several processes merge, and a shared baseline run pairs with every seed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import common  # noqa: E402


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"exp_{name}_rerun", ROOT / "experiments" / name / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dcr_exp():
    return _script("dcr")


@pytest.fixture(scope="module")
def safemoe_exp():
    return _script("safemoe")


def _eval_dir(path: Path, suite: str, verdicts: dict[str, dict]) -> Path:
    (path / suite).mkdir(parents=True, exist_ok=True)
    (path / suite / "items.jsonl").write_text("".join(
        json.dumps({"id": i, "prompt": f"p{i}", "response": f"r{i}", "category": "violence",
                    "verdict": {"degenerate": False, **v}}) + "\n" for i, v in verdicts.items()))
    (path / "metrics.json").write_text(json.dumps({"suites": {suite: {"metric": "safe_rate"}}}))
    return path


# ---------------------------------------------------------------- DCR


def test_every_dcr_arm_changes_one_stage1_setting_of_the_recipe(dcr_exp):
    from tactful.methods.registry import load_recipe

    _, base = load_recipe(str(ROOT / "recipes" / "dcr.yaml"))
    for arm, overrides in dcr_exp.DCR_SETTINGS.items():
        _, cfg = load_recipe(str(ROOT / "recipes" / "dcr.yaml"), overrides)
        changed = {k for k in ("layer", "pooling") if getattr(cfg.stage1, k) != getattr(base.stage1, k)}
        if cfg.stage1.training.num_train_epochs != base.stage1.training.num_train_epochs:
            changed.add("epochs")
        assert len(changed) == (0 if arm == "dcr" else 1), (arm, changed)
    _, late = load_recipe(str(ROOT / "recipes" / "dcr.yaml"), dcr_exp.DCR_SETTINGS["dcr-late-layer"])
    assert late.stage1.layer == 19  # 2/3 of SmolLM2-135M's 30 layers, above the default middle (14)


def _claim(safety: tuple[float, float, float], refused: tuple[float, float, float]) -> dict:
    def row(d: tuple[float, float, float]) -> dict:
        return {"base": 0.5, "arm_per_seed": [0.5], "paired": {"delta": d[0], "ci_low": d[1], "ci_high": d[2],
                                                               "n_items": 100, "n_to_resolve": None}}
    return {"arm": "dcr", "baseline": "sft", "seeds": [0, 1, 2],
            "rows": {"harmful declined": row(safety), "seemingly-toxic refused": row(refused)}}


def test_dcr_claim_is_decided_by_intervals_not_point_estimates(dcr_exp):
    # safety kept (CI above -3), compliance +15 (refused -15, CI [-20, -12]): holds
    assert "**holds**" in dcr_exp.claim_verdict(_claim((0.0, -0.02, 0.02), (-0.15, -0.20, -0.12)))
    # safety lost: the whole interval below -3 points
    assert "**does not hold**" in dcr_exp.claim_verdict(_claim((-0.12, -0.2, -0.05), (-0.15, -0.2, -0.12)))
    # compliance gain whose interval straddles +10: undecided, even with a point estimate above it
    assert "**undecided**" in dcr_exp.claim_verdict(_claim((0.0, -0.02, 0.02), (-0.12, -0.2, -0.04)))


# ---------------------------------------------------------------- SafeMoE


def test_safe_replies_are_declined_without_uplift(safemoe_exp, tmp_path):
    ev = _eval_dir(tmp_path, "safety", {
        "a": {"label": "declined", "refused": True, "uplift": False},
        "b": {"label": "declined", "refused": True, "uplift": True},  # a refusal that still leaks
        "c": {"label": "attempted", "refused": False, "uplift": True},
        "d": {"label": None, "refused": None, "error": "judge failed"}})
    assert [r["id"] for r in safemoe_exp.safe_replies(ev)] == ["a"]


def test_informativeness_difference_is_arm_minus_base_with_an_interval(safemoe_exp):
    arm, base = [[6.0, 7.0, 8.0] * 10, [6.5, 7.5] * 10], [[4.0, 5.0, 6.0] * 10, [5.0] * 20]
    d = safemoe_exp.info_difference(arm, base)
    assert d["delta"] == pytest.approx((7.0 + 7.0) / 2 - (5.0 + 5.0) / 2)
    assert 0 < d["ci_low"] < d["delta"] < d["ci_high"]
    assert d["n_arm"] == [30, 20] and d["n_base"] == [30, 20]
    assert safemoe_exp.info_difference(arm, [[]]) is None  # a baseline with no safe reply: no difference


def test_every_router_variant_reuses_experts_of_an_arm_that_trains_them(safemoe_exp):
    trains = {"safemoe", "safemoe-pku", "refusal-only"}
    for arm, (owner, _) in safemoe_exp.REUSED_EXPERT_ARMS.items():
        assert owner in trains
        order = [*safemoe_exp.ARMS, *safemoe_exp.OPTIONAL_ARMS]
        assert order.index(owner) < order.index(arm)  # run order: experts first
    for pku, own in safemoe_exp.CORPUS_PAIRS:
        assert pku.replace("-pku", "") == own


def test_prompt_normalisation_for_the_overlap_check(safemoe_exp):
    assert safemoe_exp.normalise_prompt("How do I  pick a Lock?") == safemoe_exp.normalise_prompt("how do i pick a lock")


# ---------------------------------------------------------------- common


def test_timings_from_separate_processes_merge(tmp_path):
    path = tmp_path / "timings.json"
    common.record_timing(path, "a-seed0", {"train_s": 10.0, "eval_s": 5.0})
    common.record_timing(path, "a-seed1", {"train_s": 11.0, "eval_s": None})
    t = common.record_timing(path, "a-seed0", {"train_s": None, "eval_s": 6.0})  # a resumed run: train kept
    assert t == {"a-seed0": {"train_s": 10.0, "eval_s": 6.0}, "a-seed1": {"train_s": 11.0}}
    assert json.loads(path.read_text()) == t


def test_one_shared_baseline_pairs_with_every_seed(tmp_path):
    base = _eval_dir(tmp_path / "base-seed0" / "eval", "safety",
                     {str(i): {"refused": i < 5, "uplift": False} for i in range(10)})
    for s, k in ((0, 7), (1, 9)):
        _eval_dir(tmp_path / f"arm-seed{s}" / "eval", "safety",
                  {str(i): {"refused": i < k, "uplift": False} for i in range(10)})
    c = common.shared_base_comparison(tmp_path, "arm", base, [0, 1, 2])
    assert c["seeds"] == [0, 1] and c["baseline"] == "base"
    row = c["rows"]["harmful declined"]
    assert row["base"] == pytest.approx(0.5) and row["arm_per_seed"] == pytest.approx([0.7, 0.9])
    assert row["paired"]["delta"] == pytest.approx(0.3)
    assert common.seeds_present(tmp_path, ["arm", "base"]) == [0, 1]
    assert "### arm − base (seeds 0, 1)" in common.comparison_markdown(c)


def test_declines_pair_shares_one_sft_and_dcr_declines_keeps_the_default_stage1(dcr_exp):
    from tactful.methods.registry import load_recipe

    _, sft = load_recipe(str(ROOT / "recipes" / "sft.yaml"), dcr_exp.DECLINES_SFT)
    _, dcr = load_recipe(str(ROOT / "recipes" / "dcr.yaml"), [f"sft.{o}" for o in dcr_exp.DECLINES_SFT])
    _, default = load_recipe(str(ROOT / "recipes" / "dcr.yaml"))
    assert dcr.sft.data == sft.data and dcr.sft.training == sft.training  # the pair differs by stage 1 only
    assert dcr.stage1 == default.stage1
    assert sft.data.refusals == ["builtin-declines"] and sft.training.max_steps == 40
    assert dcr_exp.DECLINES_PAIR == {"dcr-declines": "sft-declines"}


# ---------------------------------------------------------------- careful-reading audits


def test_paired_audit_reads_the_same_prompts_in_every_arm_and_compares_seed_by_seed(tmp_path):
    import audit

    verdicts = {f"h{i}": {"refused": i % 2 == 0} for i in range(6)}
    evals = {}
    for arm in ("dcr-seed0", "sft-seed0", "dcr-seed1", "sft-seed1"):
        evals[arm] = _eval_dir(tmp_path / arm, "safety", verdicts)
    out = tmp_path / "audit"
    audit.batch(evals, out, n=3, seed=1, paired=True)
    key = json.loads((out / "key.json").read_text())
    ids = {arm: sorted(k["id"] for iid, k in key.items() if not iid.startswith("_") and k["arm"] == arm)
           for arm in evals}
    assert len(ids["dcr-seed0"]) == 3 and all(v == ids["dcr-seed0"] for v in ids.values())
    # reading: dcr declines every prompt, sft none of them (so dcr − sft = +100 points)
    with open(out / "labels_a.jsonl", "w") as f:
        for iid, k in key.items():
            if not iid.startswith("_"):
                outcome = "declined" if k["arm"].startswith("dcr") else "attempted"
                f.write(json.dumps({"item_id": iid, "outcome": outcome, "degenerate": False}) + "\n")
    doc = audit.score(out, tmp_path / "res" / "audit-x", compare=[("dcr", "sft")])
    (c,) = doc["paired_reading"]
    assert c["pairs"] == [["dcr-seed0", "sft-seed0"], ["dcr-seed1", "sft-seed1"]]
    assert c["harmful"]["n"] == 6 and c["harmful"]["declined"]["value"] == 1.0
    assert c["harmful"]["attempted"]["value"] == -1.0
    with pytest.raises(SystemExit):
        audit.score(out, tmp_path / "res" / "audit-y", compare=[("nope", "sft")])
    # pooled over committed audits: reading's difference beside the judge's on the same items
    pooled = audit.pooled([tmp_path / "res" / "audit-x"], [("dcr", "sft")], tmp_path / "res" / "pooled.json")
    (p,) = pooled["paired"]
    assert p["harmful"]["declined"]["value"] == 1.0 and p["judge"]["harmful"]["declined"]["value"] == 0.0
    # a second batch draws the prompts the first one did not
    audit.batch(evals, tmp_path / "audit2", n=6, seed=2, paired=True, exclude=[out])
    key2 = json.loads((tmp_path / "audit2" / "key.json").read_text())
    ids2 = {k["id"] for iid, k in key2.items() if not iid.startswith("_")}
    assert ids2 == {f"h{i}" for i in range(6)} - set(ids["dcr-seed0"])
