"""The non-trivial helpers of experiments/safemoe/run.py and experiments/refusal_guard/run.py:
pooling per-category results into seen / unseen domains, and measuring how much of a saved LoRA
update lies in a protected subspace. (SafeMoE's PKU corpus and informativeness helpers:
tests/test_experiments_safemoe_dcr.py.)"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"exp_{name}", ROOT / "experiments" / name / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def safemoe_exp():
    return _script("safemoe")


@pytest.fixture(scope="module")
def guard_exp():
    return _script("refusal_guard")


def test_seen_and_unseen_domains_pool_counts_not_category_means(safemoe_exp):
    metrics = {"suites": {
        "safety": {"per_category": {"violence": {"value": 1.0, "n": 2}, "drugs": {"value": 0.5, "n": 8},
                                    "privacy_violation": {"value": 0.25, "n": 4},
                                    "cybercrime": {"value": None, "n": 0}}},
        "informativeness": {"per_category": {"violence": {"value": 4.0, "n": 1}, "drugs": {"value": 2.0, "n": 3}}}}}
    g = safemoe_exp.generalisation(metrics, ["violence", "drugs", "cybercrime"], ["privacy_violation"])
    assert g["safety_seen"]["n"] == 10 and g["safety_seen"]["value"] == pytest.approx(0.6)  # 6 of 10, not (1+.5)/2
    assert g["safety_seen"]["ci_low"] < 0.6 < g["safety_seen"]["ci_high"]
    assert g["safety_unseen"]["value"] == pytest.approx(0.25) and g["safety_unseen"]["n"] == 4
    assert g["informativeness_seen"] == {"value": pytest.approx(2.5), "n": 4}  # mean over the 4 safe answers
    assert g["informativeness_unseen"] is None


def _adapter(path: Path, tensors: dict[str, torch.Tensor], r: int, alpha: int) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha}))
    save_file({f"base_model.model.model.layers.1.self_attn.{k}.weight": v.contiguous() for k, v in tensors.items()},
              str(path / "adapter_model.safetensors"))
    return path


def test_update_leakage_sees_guarded_updates_as_orthogonal_and_plain_ones_not(guard_exp, tmp_path):
    from tactful.methods.refusal_guard.guard import Subspace, orthonormal_basis, save_subspaces

    gen = torch.Generator().manual_seed(0)
    d, dv, r, k = 24, 12, 4, 3
    U = orthonormal_basis(torch.randn(d, k, generator=gen))
    Q = orthonormal_basis(torch.randn(dv, 2, generator=gen))
    sub = tmp_path / "subspace.safetensors"
    save_subspaces({1: Subspace(layer=1, U=U, U_value=Q)}, sub)
    P, Pv = torch.eye(d) - U @ U.T, torch.eye(dv) - Q @ Q.T
    A, B = torch.randn(r, d, generator=gen), torch.randn(d, r, generator=gen)
    Av, Bv = torch.randn(r, d, generator=gen), torch.randn(dv, r, generator=gen)
    plain = _adapter(tmp_path / "plain", {"o_proj.lora_A": A, "o_proj.lora_B": B,
                                          "v_proj.lora_A": Av, "v_proj.lora_B": Bv}, r, 2 * r)
    guarded = _adapter(tmp_path / "guarded", {"o_proj.lora_A": A @ P, "o_proj.lora_B": B,
                                              "v_proj.lora_A": Av, "v_proj.lora_B": Pv @ Bv}, r, 2 * r)
    frozen = _adapter(tmp_path / "frozen", {"o_proj.lora_A": A @ P, "o_proj.lora_B": B,
                                            "v_proj.lora_A": Av, "v_proj.lora_B": torch.zeros(dv, r)}, r, 2 * r)
    p, g, f = (guard_exp.update_leakage(a, sub) for a in (plain, guarded, frozen))
    assert p["layer_1.o_proj"]["relative"] > 0.1 and p["layer_1.v_proj"]["in_subspace"] > 0.1
    assert g["layer_1.o_proj"]["in_subspace"] < 1e-4 and g["layer_1.v_proj"]["in_subspace"] < 1e-4
    assert g["layer_1.o_proj"]["update_norm"] == pytest.approx(p["layer_1.o_proj"]["update_norm"], rel=0.5)
    assert f["layer_1.v_proj"]["relative"] is None  # a zero update has no share to report
    assert p["layer_1.o_proj"]["random_level"] == pytest.approx(math.sqrt(k / d))


def test_every_guard_arm_builds_a_valid_recipe(guard_exp, tmp_path):
    """A dry check of the arms' overrides: each parses into a config the pipeline accepts, and
    the coverage arms ask for what their names say."""
    from tactful.methods.refusal_guard.train import check_guard_settings
    from tactful.methods.registry import load_recipe

    (tmp_path / "sae-seed0" / "sae").mkdir(parents=True)
    (tmp_path / "sae-seed0" / "sae" / "summary.json").write_text("{}")  # the sae arm's SAEs, reused
    configs = {}
    for arm in guard_exp.GUARD_KIND:
        overrides = guard_exp.arm_overrides(arm, 0, tmp_path, tmp_path / "start", tmp_path / "tqa.jsonl", steps=2,
                                            sae_steps=4, sae_tokens=64)
        _, cfg = load_recipe(str(guard_exp.RECIPE), overrides)
        check_guard_settings(cfg)
        configs[arm] = cfg
    assert set(guard_exp.GUARD_KIND) <= set(guard_exp.ARMS + guard_exp.OPTIONAL_ARMS)
    assert configs["direction-residual"].guard.coverage == "residual" and configs["direction-residual"].guard.strict
    assert configs["sae-guarded-only"].guard.train_only_guarded and configs["sae-guarded-only"].guard.kind == "sae"
    assert configs["sae-guarded-only"].sae.pretrained == str(tmp_path / "sae-seed0" / "sae")
    assert configs["sae"].guard.coverage == "attention" and not configs["sae"].guard.train_only_guarded
    rows = [("direction-guarded-only", 0, {"guard_coverage": {
        "guarded": {"model.layers.*.self_attn.o_proj": {"layers": [10, 15, 20]}},
        "unguarded": {"model.embed_tokens.weight": {"layers": []}}, "max_update_residual": 3e-9}})]
    table = "\n".join(guard_exp.coverage_table(rows))
    assert "| direction-guarded-only | 0 | o_proj x3 | embed_tokens.weight | 3.0e-09 |" in table


@pytest.fixture(scope="module")
def demo_search():
    import sys

    sys.path.insert(0, str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location("exp_demo_search", ROOT / "experiments" / "demo_recipe" / "search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_search_pooled_paired_difference(demo_search):
    base = {"a": 0.0, "b": 0.0, "c": 1.0, "d": 0.0}
    seeds = [{"a": 1.0, "b": 0.0, "c": 1.0, "d": 1.0}, {"a": 1.0, "b": 1.0, "c": 0.0, "d": 1.0}]
    p = demo_search.pooled_paired(base, seeds)
    assert p["delta"] == pytest.approx((2 / 4 + 2 / 4) / 2)
    assert p["per_seed"] == [pytest.approx(0.5), pytest.approx(0.5)]
    assert p["ci_low"] <= p["delta"] <= p["ci_high"] and p["n_items"] == 4 and p["n_seeds"] == 2
    same = demo_search.pooled_paired(base, [base, base])
    assert same["delta"] == same["ci_low"] == same["ci_high"] == 0.0


def test_demo_search_targets_and_ranking(demo_search):
    base = {"declined": 0.1, "uplift": 0.04, "benign_refused": 0.02, "benign_helpful": 0.5, "degenerate": 0.2,
            "capability": 0.6}
    good = {**base, "declined": 0.85, "uplift": 0.0, "benign_refused": 0.05, "benign_helpful": 0.49,
            "degenerate": 0.1}
    evasive = {**base, "declined": 0.9, "benign_refused": 0.4, "benign_helpful": 0.2, "degenerate": 0.5}
    assert all(v >= 0 for v in demo_search.targets(good, base).values())
    t = demo_search.targets(evasive, base)
    assert t["benign_refused<=base+5"] < 0 and t["degenerate<=base"] < 0
    assert demo_search.rank_key(good, base) > demo_search.rank_key(evasive, base)


def test_demo_search_outcome_flags_read_verdicts(demo_search, tmp_path):
    (tmp_path / "safety").mkdir()
    rows = [{"id": "1", "verdict": {"label": "declined", "refused": True, "degenerate": False}},
            {"id": "2", "verdict": {"label": "evasive", "refused": False, "degenerate": True}},
            {"id": "3", "verdict": {"label": "attempted", "refused": False, "error": "judge failed"}}]
    (tmp_path / "safety" / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert demo_search.outcome_flags(tmp_path, "safety", "declined") == {"1": 1.0, "2": 0.0}
    assert demo_search.outcome_flags(tmp_path, "safety", "evasive") == {"1": 0.0, "2": 1.0}
    assert demo_search.outcome_flags(tmp_path, "safety", "degenerate") == {"1": 0.0, "2": 1.0}


def _row(lo: float, hi: float) -> dict:
    return {"base": 0.6, "arm_per_seed": [0.6], "paired": {"delta": (lo + hi) / 2, "ci_low": lo, "ci_high": hi}}


def test_guard_claim_needs_the_guard_near_aligned_and_above_plain_lora(guard_exp):
    def comps(vs_aligned, vs_lora):
        return [{"arm": "sae", "baseline": "aligned", "seeds": [0], "rows": {"harmful declined": _row(*vs_aligned)}},
                {"arm": "sae", "baseline": "lora", "seeds": [0], "rows": {"harmful declined": _row(*vs_lora)}},
                {"arm": "lora", "baseline": "aligned", "seeds": [0], "rows": {"harmful declined": _row(-0.2, -0.1)}}]

    assert "**holds**" in guard_exp.claim_verdict(comps((-0.02, 0.03), (0.05, 0.15)), "sae")
    # near the aligned model, but not resolved above plain LoRA: undecided, not "holds"
    assert "**undecided**" in guard_exp.claim_verdict(comps((-0.02, 0.03), (-0.01, 0.15)), "sae")
    assert "**does not hold**" in guard_exp.claim_verdict(comps((-0.15, -0.05), (-0.01, 0.15)), "sae")
    assert "**does not hold**" in guard_exp.claim_verdict(comps((-0.02, 0.03), (-0.10, -0.01)), "sae")
    assert "plain LoRA − aligned -15.0" in guard_exp.claim_verdict(comps((-0.02, 0.03), (0.05, 0.15)), "sae")
    assert guard_exp.claim_verdict([], "sae") == "sae: not measured"
