"""TRACE experiment: re-align a model when its written policy changes.

    python experiments/trace/run.py                       # official settings, seed 0
    python experiments/trace/run.py --seeds 0 1 2         # every arm once per seed
    python experiments/trace/run.py --settings ours       # the first runs' scaling (results/ of the README)
    python experiments/trace/run.py --quick               # smoke test: a few steps, 4 eval items, runs/ only

Scenario, on the embedded model (SmolLM2-135M-Instruct), offline:

1. The old preference data: pairs whose chosen answer an annotator picked under the OLD policy
   (src/tactful/policies/old-strict.yaml: refuse everything in the harm domains, briefly is
   fine, over-caution tolerated). Built once from the built-in TRAIN split and shared by every
   arm: a built-in refusal > the base model's own answer (harmful prompts), a curt refusal > the
   safe-informative answer (harmful prompts), a stock refusal > the helpful answer (prompts that
   only sound harmful).
2. The old-aligned model: DPO on that data from the safety-SFT start (runs/exp-dcr/sft-seed<seed>).
3. The policy changes to new-contextual.yaml (over-refusal of benign requests now violates; a
   refusal of a manipulation request must point to help; cybercrime, drugs and privacy allow
   some contexts). The data is triaged ONCE under it with the offline policy-rules judge.
4. From the old-aligned model, the same budget for each arm:
   naive-dpo         DPO on the relabelled pairs with TRACE's adapter and beta (swapped where the
                     chosen answer violates and the rejected one complies, pairs where both
                     violate dropped, the rest kept): the matched baseline;
   naive-dpo-paper   the paper's naive DPO as its code runs it: every relabelled pair (PUNISH
                     pairs kept), beta 0.1, LoRA r16 on all linear layers;
   npo-no-triage     NPO on every flagged response, KL on the rest (trace.no_triage, ours);
   no-triage-paper   the paper's no-triage ablation: NPO on every relabelled pair's rejected
                     response, no KL term (trace.no_triage_target=rejected);
   trace-uniform     TRACE with uniform weights (trace.no_impact_weights);
   trace             TRACE.
   --settings official (default) scales TRACE's terms and builds its gold batch as the official
   code does; --settings ours as the first runs did (see SETTINGS).

Metrics on held-out prompts (built-in TEST split), judged by policy-rules under the NEW policy:
agreement on prompts whose rule changed (harmful prompts in cybercrime, drugs, privacy,
manipulation; prompts that only sound harmful), on prompts whose rule did not change (the other
harm domains: must not regress), pooled target agreement; built-in multiple-choice capability.

Raw outputs go to runs/exp-trace-official/ (ours: runs/exp-trace/; not committed); aggregates,
per-item outputs (items.jsonl.gz: prompt id, response, outcome, seed, arm; no prompt text), each
arm's config, the settings, triage summary, impact-score statistics, timings and summary.md go
to experiments/trace/results-official/ (ours: results/). Finished arms are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))

from common import (OUTCOME_SUITES, adopt_restored, comparison_markdown, copy_aggregates, evaluate,  # noqa: E402
                    gold_accuracy, is_complete, pooled_paired, record_timing, restore_evals, safety_sft_start,
                    save_item_outputs, seed_comparison, seeds_present, split_key, summarise, train)
from tactful.io import atomic_write_json  # noqa: E402

OLD_POLICY, NEW_POLICY = "old-strict", "new-contextual"
OLD_SOURCES = ["builtin-refusal-pairs", "builtin-terse-pairs", "builtin-cautious-pairs"]
ARMS = ("naive-dpo", "naive-dpo-paper", "npo-no-triage", "no-triage-paper", "trace-uniform", "trace")
BASELINES = ("naive-dpo", "naive-dpo-paper")  # every other arm is compared with each one run
# TRACE minus each ablation present: what triage (npo-no-triage, no-triage-paper) and the impact
# weights (trace-uniform) add
ABLATIONS = ("npo-no-triage", "no-triage-paper", "trace-uniform")
SUITES = OUTCOME_SUITES
# Refusal detection inside the policy judge (triage, and policy agreement of the replies): the
# outcome judge, validated on real replies of this model (docs/judging.md).
REFUSAL_JUDGE = "outcome-minilm"

# How TRACE's terms are scaled, and the gold batch.
#   official: what respailab/TRACE runs (src/trace.py and its ablation scripts). Impact weights
#     are normalised to sum 1 over the conflict pairs (compute_impact_scores); a micro-batch's
#     loss is the plain SUM of w * l_inv, w * l_npo and alpha_KL * (per-sequence mean KL) of
#     each RETAIN pair (the KL is not weighted); gold batch 64; per-device batch 1 with
#     gradient accumulation 4, and the Trainer divides each micro-batch loss by the
#     accumulation steps, so a step's loss is the MEAN of the pairs' terms. Here: micro-batch
#     1 x accumulation --batch. The uniform-weight ablation (trace_no_impact_score.py) gives
#     each conflict weight 1.0 (not 1/N), which is our weight_scale mean.
#   ours: the first runs' choices (README): weights average 1 (weight_scale mean), gold batch
#     12, micro-batch --batch (a step's loss is the sum over its pairs).
SETTINGS: dict[str, dict[str, Any]] = {
    "official": {"weight_scale": "sum", "gold": 64, "micro_batch": 1, "uniform_weight_scale": "mean"},
    "ours": {"weight_scale": "mean", "gold": 12, "micro_batch": None, "uniform_weight_scale": None},
}

# The matched shift arms share TRACE's adapter and optimisation (the paper's: LoRA r32 / alpha 16
# / dropout 0.1 on q and v, beta 0.3; lr --lr), so naive DPO differs from TRACE only in its loss.
SHIFT_COMMON = ["lora.r=32", "lora.alpha=16", "lora.dropout=0.1", "lora.target_modules=[q_proj, v_proj]",
                "loss.beta=0.3", "training.max_length=256"]
# The paper's naive DPO as the official code runs it (ablations/dpo_accelerate.py on the
# relabelled "DPO-Gold" split): trl's DPO with its default beta 0.1, LoRA r16 / alpha 16 /
# dropout 0.05 on every linear layer, on ALL relabelled pairs (INVERT swapped, PUNISH pairs kept
# as they were, RETAIN as they were). Its lr (5e-5, half TRACE's 1e-4) is --paper-dpo-lr.
PAPER_DPO = ["lora.r=16", "lora.alpha=16", "lora.dropout=0.05",
             "lora.target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
             "loss.beta=0.1", "training.max_length=256"]
# arm -> (recipe, training data, overrides)
ARM_OVERRIDES: dict[str, tuple[str, str, list[str]]] = {
    "naive-dpo": ("dpo.yaml", "relabelled_pairs.jsonl", SHIFT_COMMON),
    "naive-dpo-paper": ("dpo.yaml", "relabelled_all_pairs.jsonl", PAPER_DPO),
    "npo-no-triage": ("trace.yaml", "triage", [*SHIFT_COMMON, "trace.no_triage=true"]),
    # the paper's no-triage ablation (official trace_notriage.py): NPO on every relabelled pair's
    # rejected response, impact weights over all pairs, no KL term
    "no-triage-paper": ("trace.yaml", "triage", [*SHIFT_COMMON, "trace.no_triage=true",
                                                 "trace.no_triage_target=rejected"]),
    "trace-uniform": ("trace.yaml", "triage", [*SHIFT_COMMON, "trace.no_impact_weights=true"]),
    "trace": ("trace.yaml", "triage", SHIFT_COMMON),
}


def resolve_settings(name: str, *, gold: int | None = None, weight_scale: str | None = None) -> dict[str, Any]:
    """The named settings with explicit --gold / --weight-scale overrides applied."""
    out = {"name": name, **SETTINGS[name]}
    if gold is not None:
        out["gold"] = gold
    if weight_scale is not None:
        out["weight_scale"] = weight_scale
    return out


def shift_overrides(arm: str, *, seed: int, start: Path, steps: int, batch: int, lr: float, settings: dict[str, Any],
                    data: Path, triage_file: Path, paper_dpo_lr: float | None = None) -> tuple[str, list[str]]:
    """(recipe, overrides) of one shift arm: its data, loss and adapter, the shared budget
    (steps x batch pairs at lr), and the TRACE scaling and gold batch of `settings`."""
    recipe, source, arm_overrides = ARM_OVERRIDES[arm]
    micro = settings["micro_batch"] or batch
    if batch % micro:
        raise ValueError(f"--batch {batch} is not a multiple of the micro-batch {micro}")
    rate = paper_dpo_lr if arm == "naive-dpo-paper" and paper_dpo_lr is not None else lr
    out = [f"seed={seed}", f"start_from={start}", f"training.max_steps={steps}", f"training.learning_rate={rate}",
           f"training.per_device_train_batch_size={micro}", f"training.gradient_accumulation_steps={batch // micro}",
           "training.save_steps=20", "training.logging_steps=4", *arm_overrides]
    if recipe == "dpo.yaml":
        return recipe, [*out, f"data.sources=[{data / source}]", "data.n=null"]
    scale = settings["weight_scale"]
    if arm == "trace-uniform" and settings.get("uniform_weight_scale"):
        scale = settings["uniform_weight_scale"]
    return recipe, [*out, f"trace.triage_file={triage_file}", f"trace.gold_batch_size={settings['gold']}",
                    f"trace.weight_scale={scale}", f"trace.judge_options={{refusal: {REFUSAL_JUDGE}}}"]


# Seconds on 2 free cores, from CPU seconds measured with one thread on this (shared) machine
# divided by 1.7 (see README, "Budget"): a training step at batch 4, impact scoring per conflict
# pair and per gold pair, one arm's evaluation at the default sizes, loading and saving, and the
# shared data + triage step. Only for the estimate printed before a run.
CALIBRATION = {"step_s": 7.5, "score_conflict_s": 2.5, "score_gold_s": 2.5, "eval_s": 52.0, "overhead_s": 10.0,
               "shared_s": 40.0}


# ---------------------------------------------------------------- data (built once)


def decision_fields(rule: Any) -> tuple:
    """The parts of a rule the policy-rules judge decides with (notes do not count; over-refusal
    does not matter where the tier forbids answering anyway)."""
    if rule.tier == "forbidden":
        return ("forbidden", rule.require_safety_resource)
    if rule.tier == "restricted":
        return ("restricted", tuple(sorted(rule.allowed_contexts)), rule.over_refusal, rule.require_safety_resource)
    return (rule.tier, rule.over_refusal, rule.require_safety_resource)


def changed_categories(categories: list[str | None]) -> dict[str | None, bool]:
    """For each category (harm domains; other values fall under the default rule), whether the
    new policy decides differently from the old one."""
    from tactful.policies import load_policy

    old, new = load_policy(OLD_POLICY), load_policy(NEW_POLICY)
    return {c: decision_fields(old.rule_for(c)) != decision_fields(new.rule_for(c)) for c in categories}


def heldout_prompts(data: Path) -> dict[str, Any]:
    """Held-out (TEST split) prompts split by whether their rule changed; written once."""
    from tactful.data import builtin
    from tactful.io import atomic_write_jsonl

    records = builtin.harmful_prompts("test") + builtin.seemingly_toxic("test")
    changed = changed_categories(sorted({r.category for r in records}, key=str))
    rows = {"changed": [], "unchanged": []}
    for r in records:
        rows["changed" if changed[r.category] else "unchanged"].append(r.to_dict())
    for name, items in rows.items():
        atomic_write_jsonl(data / f"heldout_{name}.jsonl", items)
    return {"changed_categories": sorted(c for c, v in changed.items() if v and c in _HARM),
            "unchanged_categories": sorted(c for c, v in changed.items() if not v and c in _HARM),
            "outside_harm_domains_changed": any(v for c, v in changed.items() if c not in _HARM),
            "n": {k: len(v) for k, v in rows.items()}}


_HARM = ("violence", "cybercrime", "drugs", "economic_crime", "privacy_violation", "discriminatory_behavior",
         "mental_manipulation", "endangering_public_health")


def old_pairs(data: Path, n: int, seed: int = 0) -> Path:
    """The old preference data, written once: generated answers come from the base model (what
    an annotator compared the built-in refusals against), cached in data/generations.jsonl."""
    from tactful.io import atomic_write_jsonl
    from tactful.methods.trace.triage import load_trace_pairs
    from tactful.models import load_model

    path = data / "old_pairs.jsonl"
    meta = data / "old_pairs.json"
    want = {"sources": OLD_SOURCES, "n": n, "seed": seed, "split": "train", "generator": "embedded",
            "max_new_tokens": 96, "refusal_filter": "string-xstest"}
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()) == want:
        return path
    model, tok = load_model("embedded")
    pairs = load_trace_pairs(OLD_SOURCES, split="train", n=n, seed=seed, model=model, tokenizer=tok,
                             model_name="embedded", max_new_tokens=96, cache=data / "generations.jsonl",
                             refusal_filter="string-xstest")
    atomic_write_jsonl(path, [p.to_dict() for p in pairs])
    meta.write_text(json.dumps(want, indent=2))
    return path


def triage_once(pairs: Path, out: Path) -> dict[str, Any]:
    """Triage the old data under the new policy (verdicts cached: a re-run judges nothing)."""
    from tactful.methods.trace.triage import triage_command

    summary = triage_command(NEW_POLICY, str(pairs), "policy-rules", out, judge_options={"refusal": REFUSAL_JUDGE},
                             log=print)
    if summary["counts"]["FAILED"]:
        sys.exit(f"error: {summary['counts']['FAILED']} pairs got no verdict; run again to retry them")
    return summary


def relabelled_all_pairs(triage_dir: Path, out: Path) -> dict[str, int]:
    """The paper's relabelling for its naive DPO baseline (official datagen/oracle_triage_relabel.py):
    INVERT pairs swapped, PUNISH pairs (both answers violate) kept as they were, RETAIN pairs as
    they were; every pair is trained on."""
    from tactful.io import atomic_write_jsonl
    from tactful.methods.trace.triage import FAILED, INVERT, PUNISH, read_triage

    triaged = [t for t in read_triage(triage_dir / "triage.jsonl") if t.label != FAILED]
    atomic_write_jsonl(out, [t.training_pair().to_dict() for t in triaged])
    return {"pairs": len(triaged), "swapped": sum(t.label == INVERT for t in triaged),
            "kept_punish": sum(t.label == PUNISH for t in triaged)}


def relabelled_pairs(triage_dir: Path, out: Path) -> dict[str, int]:
    """Naive relabelling for the DPO baseline: the compliant answer first where the judge says the
    chosen one violates and the rejected one complies; pairs where both violate have no compliant
    answer to prefer and are dropped; the rest as they were."""
    from tactful.io import atomic_write_jsonl
    from tactful.methods.trace.triage import INVERT, PUNISH, read_triage

    triaged = read_triage(triage_dir / "triage.jsonl")
    rows = [(t.training_pair() if t.label == INVERT else t.as_is()).to_dict() for t in triaged if t.label != PUNISH]
    atomic_write_jsonl(out, rows)
    return {"pairs": len(rows), "swapped": sum(t.label == INVERT for t in triaged),
            "dropped": sum(t.label == PUNISH for t in triaged)}


# ---------------------------------------------------------------- policy agreement of the replies


def policy_flags(eval_dir: Path) -> dict[str, dict[str, float]]:
    """The paper's measure on our held-out replies: does each reply to a harmful or seemingly-toxic
    test prompt comply with the NEW policy (policy-rules, refusal detection by outcome-minilm)?
    Per item 1/0, split by whether the prompt's rule changed ("changed" / "unchanged"); cached in
    eval_dir/policy-<policy>.json (the replies never change once generated)."""
    from tactful.eval.judges.base import JudgeItem
    from tactful.io import atomic_write_json
    from tactful.methods.trace.judges import COMPLIES, PolicyRulesJudge

    cache = eval_dir / f"policy-{NEW_POLICY}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    rows = []
    for suite, ptype in (("safety", "harmful"), ("over-refusal", "seemingly_toxic")):
        for line in (eval_dir / suite / "items.jsonl").read_text().splitlines():
            if line.strip():
                rows.append((suite, ptype, json.loads(line)))
    judge = PolicyRulesJudge(NEW_POLICY, refusal=REFUSAL_JUDGE)
    verdicts = judge.judge([JudgeItem(prompt=r["prompt"], response=r["response"],
                                      meta={"category": r.get("category"), "prompt_type": ptype})
                            for _, ptype, r in rows])
    changed = changed_categories(sorted({r.get("category") for _, _, r in rows}, key=str))
    out: dict[str, dict[str, float]] = {"changed": {}, "unchanged": {}}
    for (suite, _, r), v in zip(rows, verdicts):
        if v.error is None:
            out["changed" if changed[r.get("category")] else "unchanged"][f"{suite}/{r['id']}"] = \
                float(v.label == COMPLIES)
    atomic_write_json(cache, out)
    return out


def policy_rows(base_dirs: list[Path], arm_dirs: list[Path]) -> dict[str, dict[str, Any]]:
    """outcome_rows' shape for the policy agreement: changed rules, unchanged rules, pooled."""
    out = {}
    bases, arms = [policy_flags(d) for d in base_dirs], [policy_flags(d) for d in arm_dirs]
    for label, pick in (("policy agreement, rule changed", lambda f: f["changed"]),
                        ("policy agreement, rule unchanged", lambda f: f["unchanged"]),
                        ("policy agreement, pooled", lambda f: {**f["changed"], **f["unchanged"]})):
        b, a = [pick(f) for f in bases], [pick(f) for f in arms]
        if all(b) and all(a):
            out[label] = {"base": statistics.fmean(sum(x.values()) / len(x) for x in b),
                          "arm_per_seed": [sum(x.values()) / len(x) for x in a],
                          "paired": pooled_paired(b if len(b) > 1 else b[0], a)}
    return out


# ---------------------------------------------------------------- results


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def diagnostics(run_dir: Path) -> dict[str, Any]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    out: dict[str, Any] = {"steps": manifest.get("steps"), "train_loss": manifest.get("train_loss"),
                           "start_from": manifest.get("start_from"), "counts": manifest.get("counts")}
    if "trace" in manifest:
        t = manifest["trace"]
        out["trace"] = {k: t.get(k) for k in ("triage", "by_category", "training", "impact", "alpha_kl", "beta",
                                              "weight_scale", "ablations", "judge")}
        scores = run_dir / "impact_scores.json"
        if scores.is_file() and not t["ablations"]["no_impact_weights"]:
            s = json.loads(scores.read_text())
            w, dots = s.get("weights", []), s.get("dots", [])
            out["impact_scores"] = {"weights": _stats(w), "dots": _stats(dots),
                                    "share_zero_weight": sum(x == 0 for x in w) / len(w) if w else None,
                                    "top5_weight_share": sum(sorted(w, reverse=True)[:5]) / sum(w) if sum(w) else None,
                                    **{k: s.get(k) for k in ("method", "n_positive", "seconds", "gold_size")}}
    return out


# The rows of the claim tables: the paper's measure first, then what the replies do.
CLAIM_ROWS = ["policy agreement, pooled", "policy agreement, rule changed", "policy agreement, rule unchanged",
              "harmful declined", "harmful uplift", "harmful degenerate", "seemingly-toxic refused",
              "seemingly-toxic helped", "ordinary refused", "ordinary helped", "ordinary degenerate",
              "capability (MC accuracy)"]


def comparison(runs: Path, arm: str, baseline: str, seeds: list[int]) -> dict[str, Any] | None:
    """arm - baseline, paired seed by seed and pooled (common.seed_comparison), in CLAIM_ROWS order."""
    c = seed_comparison(runs, arm, baseline, seeds, extra=policy_rows)
    if c:
        c["rows"] = {k: c["rows"][k] for k in CLAIM_ROWS if k in c["rows"]}
    return c


def impact_table(results: Path, arms: list[str], seeds: list[int]) -> str:
    """Training-set composition and impact-score statistics of the TRACE arms."""
    lines = ["| arm | seed | trained pairs (pref / npo / kl) | conflicts with weight > 0 | top-5 weight share | "
             "scoring s (gold + per-sample) |", "|---|---|---|---|---|---|"]
    for arm in arms:
        for seed in seeds:
            path = results / f"{arm}-seed{seed}" / "train_diagnostics.json"
            if not path.exists() or "trace" not in json.loads(path.read_text()):
                continue
            d = json.loads(path.read_text())
            tr, imp = d["trace"]["training"], d.get("impact_scores")
            if imp:
                secs = imp.get("seconds") or {}
                cells = [f"{imp.get('n_positive')} of {imp['weights']['n']}", f"{imp['top5_weight_share']:.2f}",
                         " + ".join(f"{v:.0f}" for v in secs.values()) if isinstance(secs, dict) else str(secs)]
            else:
                cells = ["uniform", "—", "—"]
            lines.append(f"| {arm} | {seed} | {tr['pref']} / {tr['npo']} / {tr['kl']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def check_runs_settings(runs: Path, settings: dict[str, Any]) -> None:
    """Finished arms are reused, so a runs directory must hold one set of settings: refuse to
    mix (a run made with other settings would be skipped as finished and reported as this one)."""
    path = runs / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            sys.exit(f"error: {runs} holds runs made with other settings ({old}); use another --runs directory")
    else:
        path.write_text(json.dumps(settings, indent=2) + "\n")


def estimate_s(args: argparse.Namespace, summary: dict[str, Any], gold: int) -> float:
    """Seconds on 2 free cores for the whole run (CALIBRATION), printed before it starts."""
    c = CALIBRATION
    n_arms = len(args.arms) * len(args.seeds)
    n_conf = summary["counts"]["INVERT"] + summary["counts"]["PUNISH"]
    n_all = n_conf + summary["counts"]["RETAIN"]
    per_seed_scoring = sum(gold * c["score_gold_s"] + (n_all if a == "no-triage-paper" else n_conf)
                           * c["score_conflict_s"] for a in args.arms if a in ("trace", "npo-no-triage",
                                                                             "no-triage-paper"))
    return c["shared_s"] + len(args.seeds) * (args.old_steps * c["step_s"] + c["overhead_s"] + c["eval_s"]
                                              + per_seed_scoring) + \
        n_arms * (args.steps * c["step_s"] + c["overhead_s"] + c["eval_s"])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="every arm (and the old-aligned model) is trained and evaluated once per seed")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--settings", default="official", choices=list(SETTINGS),
                    help="TRACE's term scaling, gold batch and micro-batch: official (respailab/TRACE, the default) "
                         "or ours (the first runs'); see SETTINGS")
    ap.add_argument("--pairs-n", type=int, default=40, help="prompts drawn from each of the three old sources")
    ap.add_argument("--old-steps", type=int, default=12, help="DPO steps aligning the start to the old policy")
    ap.add_argument("--steps", type=int, default=30, help="steps of every shift arm (batch --batch pairs)")
    ap.add_argument("--batch", type=int, default=4, help="pairs per optimizer step of every shift arm")
    ap.add_argument("--lr", type=float, default=5e-4, help="learning rate of every shift arm")
    ap.add_argument("--paper-dpo-lr", type=float, default=None,
                    help="learning rate of naive-dpo-paper (default --lr; the official script's is 5e-5, half of "
                         "TRACE's 1e-4)")
    ap.add_argument("--old-lr", type=float, default=1e-4, help="learning rate of the old-aligned DPO")
    ap.add_argument("--gold", type=int, default=None, help="TRACE's gold batch size (default: from --settings)")
    ap.add_argument("--weight-scale", default=None, choices=["mean", "sum"],
                    help="conflict weights sum to 1 (official) or average 1 (ours) (default: from --settings)")
    ap.add_argument("--limit", type=int, default=None, help="cap items per suite, capability included (smoke)")
    ap.add_argument("--start", default=None, help="start run (default: the safety-SFT run of the seed)")
    ap.add_argument("--runs", default=None, help="raw outputs (default runs/exp-trace-official, with --settings ours "
                                                 "runs/exp-trace; --quick: runs/exp-trace-quick-<settings>)")
    ap.add_argument("--results", default=None, help="committed aggregates (default experiments/trace/results-official, "
                                                    "with --settings ours experiments/trace/results)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 steps, 4 items per suite, 4 pairs per "
                                                         "source, a 2-step SFT start, all under runs/")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override for the shift arms")
    ap.add_argument("--summarise", action="store_true",
                    help="train nothing: rebuild the summary from what is evaluated, the committed replies included")
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.quick:
        args.steps, args.old_steps, args.pairs_n = 3, 3, 4
        args.gold = args.gold or 6
        args.limit = args.limit or 4
    settings = resolve_settings(args.settings, gold=args.gold, weight_scale=args.weight_scale)
    # "ours" keeps the directories of the committed first runs; the official settings get their own.
    suffix = "" if args.settings == "ours" else f"-{args.settings}"
    runs = Path(args.runs or ROOT / "runs" / (f"exp-trace-quick-{args.settings}" if args.quick
                                              else f"exp-trace{suffix}")).resolve()
    results = Path(args.results or (runs / "results" if args.quick else HERE / f"results{suffix}"))
    data = runs / "data"
    data.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    recorded = {**settings, "batch": args.batch, "steps": args.steps, "lr": args.lr,
                "paper_dpo_lr": args.paper_dpo_lr if args.paper_dpo_lr is not None else args.lr, "extra": args.extra}
    check_runs_settings(runs, recorded)

    # Shared by every arm and seed: held-out prompts, the old data, its triage, the relabelled pairs.
    t0 = time.time()
    split = heldout_prompts(data)
    pairs = old_pairs(data, args.pairs_n)
    summary = triage_once(pairs, runs / "triage")
    naive = relabelled_pairs(runs / "triage", data / "relabelled_pairs.jsonl")
    naive_paper = relabelled_all_pairs(runs / "triage", data / "relabelled_all_pairs.jsonl")
    suites = SUITES
    shared_s = round(time.time() - t0, 1)
    (results / "triage_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results / "data.json").write_text(json.dumps({"heldout": split, "old_pairs": summary["n_pairs"],
                                                   "relabelled_for_naive_dpo": naive,
                                                   "relabelled_for_naive_dpo_paper": naive_paper}, indent=2) + "\n")
    (results / "settings.json").write_text(json.dumps({
        **recorded, "seeds": args.seeds, "arms": args.arms,
        "meaning": {"weight_scale": "sum: conflict weights sum to 1 (official); mean: they average 1",
                    "gold": "pairs in TRACE's gold batch (official default 64)",
                    "micro_batch": "per-device batch of the shift arms; the rest of --batch is gradient "
                                   "accumulation (official: 1 x 4, a step's loss is the mean of the pairs' terms); "
                                   "null: --batch pairs in one micro-batch (a step's loss is their sum)",
                    "uniform_weight_scale": "weight_scale of trace-uniform (official: 1.0 per conflict = mean)"}},
        indent=2) + "\n")

    est = estimate_s(args, summary, settings["gold"])
    print(f"{len(args.arms) * len(args.seeds)} shift arms + {len(args.seeds)} old-aligned, {args.steps} steps x batch "
          f"{args.batch}, settings {args.settings}; estimated time on 2 free cores: {est / 60:.0f} min "
          f"(threads: {os.environ.get('OMP_NUM_THREADS', 'all')})")

    # Arms evaluated on another machine (or before runs/ was cleaned) join from their committed
    # replies, re-judged: their old-aligned evaluation is reused, the model is retrained only if a
    # shift arm needs it as its start.
    for key in restore_evals(results, runs):
        arm, seed = split_key(key)
        adopt_restored(runs / key / "eval", results / key, arm=arm, seed=seed)
    if args.summarise:
        write_summary(runs, results, args, settings, summary)
        return

    timings_path = results / "timings.json"
    if "shared_data_and_triage" not in (json.loads(timings_path.read_text()) if timings_path.exists() else {}):
        record_timing(timings_path, "shared_data_and_triage", {"wall_s": shared_s})
    eval_kw: dict[str, Any] = {}

    def record(name: str, run_dir: Path, t_train: float | None, ev_fresh: bool, t_eval: float) -> None:
        entry = record_timing(timings_path, name, {
            "train_s": round(t_train, 1) if t_train is not None else None,
            "eval_s": round(t_eval, 1) if ev_fresh else None, "threads": os.environ.get("OMP_NUM_THREADS", "all")})
        print(f"{name}: {entry[name]}")

    for seed in args.seeds:
        if args.start:
            start = Path(args.start).resolve()
        elif args.quick:
            start = train("sft.yaml", runs / f"sft-start-seed{seed}", [f"seed={seed}", "training.max_steps=2"])
        else:
            start = safety_sft_start(seed)
        # 1. the old-aligned model (our construction, not the paper's: same batch under both settings)
        name = f"old-aligned-seed{seed}"
        t = time.time()
        fresh = not is_complete(runs / name)
        old = train("dpo.yaml", runs / name, [f"seed={seed}", f"start_from={start}", f"data.sources=[{pairs}]",
                                              "data.n=null", f"training.max_steps={args.old_steps}",
                                              f"training.learning_rate={args.old_lr}",
                                              f"training.per_device_train_batch_size={args.batch}",
                                              "training.save_steps=20", "training.logging_steps=4"])
        t_train = time.time() - t if fresh else None
        ev_fresh = not (old / "eval" / "metrics.json").exists()
        t = time.time()
        # a finished evaluation (or one rebuilt from the committed replies) is not generated again
        ev = evaluate(old, suites, old / "eval", seed=seed, limit=args.limit, **eval_kw) if ev_fresh else old / "eval"
        copy_aggregates(ev, results / name, old)
        save_item_outputs(ev, results / name, arm="old-aligned", seed=seed)
        record(name, old, t_train, ev_fresh, time.time() - t)

        # 2. the shift arms, all from the old-aligned model
        for arm in args.arms:
            recipe, overrides = shift_overrides(arm, seed=seed, start=old, steps=args.steps, batch=args.batch,
                                                lr=args.lr, settings=settings, data=data,
                                                triage_file=runs / "triage" / "triage.jsonl",
                                                paper_dpo_lr=args.paper_dpo_lr)
            name = f"{arm}-seed{seed}"
            t = time.time()
            fresh = not is_complete(runs / name)
            run_dir = train(recipe, runs / name, [*overrides, *args.extra])
            t_train = time.time() - t if fresh else None
            ev_fresh = not (run_dir / "eval" / "metrics.json").exists()
            t = time.time()
            ev = (evaluate(run_dir, suites, run_dir / "eval", seed=seed, limit=args.limit, **eval_kw) if ev_fresh
                  else run_dir / "eval")
            # config.json too: the arm's full settings (lr, batch, accumulation, beta, adapter) in the results
            copy_aggregates(ev, results / name, run_dir, run_files=("manifest.json", "config.json"))
            save_item_outputs(ev, results / name, arm=arm, seed=seed)
            (results / name / "train_diagnostics.json").write_text(
                json.dumps({**diagnostics(run_dir), "settings": args.settings,
                            "policy_agreement": agreement(ev)}, indent=2) + "\n")
            record(name, run_dir, t_train, ev_fresh, time.time() - t)
        (results / f"old-aligned-seed{seed}" / "train_diagnostics.json").write_text(
            json.dumps({**diagnostics(old), "policy_agreement": agreement(old / "eval")}, indent=2) + "\n")

    write_summary(runs, results, args, settings, summary)


def agreement(eval_dir: Path) -> dict[str, float | int]:
    """Share of held-out replies that comply with the new policy, by whether the rule changed."""
    f = policy_flags(eval_dir)
    pooled = {**f["changed"], **f["unchanged"]}
    return {"changed": statistics.fmean(f["changed"].values()), "unchanged": statistics.fmean(f["unchanged"].values()),
            "pooled": statistics.fmean(pooled.values()), "n_changed": len(f["changed"]),
            "n_unchanged": len(f["unchanged"])}


def write_summary(runs: Path, results: Path, args: argparse.Namespace, settings: dict[str, Any],
                  summary: dict[str, Any]) -> None:
    """results/summary.md and comparisons.json over every arm and seed evaluated so far."""
    from tactful.io import atomic_write_text

    arms = [a for a in ARMS if seeds_present(runs, [a])]
    seeds = seeds_present(runs, ["old-aligned", *arms])
    comparisons = [c for c in (
        [comparison(runs, a, b, seeds) for b in BASELINES for a in arms if a not in BASELINES]
        + [comparison(runs, "trace", a, seeds) for a in ABLATIONS if "trace" in arms and a in arms]
        + [comparison(runs, a, "old-aligned", seeds) for a in arms]) if c]
    atomic_write_json(results / "comparisons.json", comparisons)
    micro = settings["micro_batch"] or args.batch
    header = "\n".join([
        "# TRACE experiment: results", "",
        "Model: the embedded SmolLM2-135M-Instruct. Held-out data: the built-in test splits (harmful, "
        "seemingly-toxic, ordinary, multiple choice), never trained on. Judge: `outcome-minilm` (gold test "
        f"accuracy: {gold_accuracy(results)}); policy agreement: policy-rules under "
        f"{NEW_POLICY} with outcome-minilm's refusal decision.",
        f"Old data: {summary['n_pairs']} pairs chosen under {OLD_POLICY}; triage under {NEW_POLICY} with "
        f"{summary['judge']}: " + ", ".join(f"{k} {v}" for k, v in summary["counts"].items()) + ".",
        f"Old-aligned: DPO {args.old_steps} steps (lr {args.old_lr:g}) from the safety-SFT start. Shift arms: "
        f"{args.steps} steps x {args.batch} pairs (micro-batch {micro} x accumulation {args.batch // micro}), lr "
        f"{args.lr:g}; matched arms LoRA r32 on q/v, beta 0.3; naive-dpo-paper LoRA r16 on all linear layers, beta "
        f"0.1, every relabelled pair (PUNISH kept), lr {args.paper_dpo_lr or args.lr:g}.",
        f"Settings {args.settings}: TRACE weight scale {settings['weight_scale']}, gold batch {settings['gold']}"
        + (f", trace-uniform weight scale {settings['uniform_weight_scale']}" if settings["uniform_weight_scale"]
           else "") + " (settings.json). Per-item outputs: <arm>-seed<N>/items.jsonl.gz; wall times: timings.json.",
    ])
    table = summarise(results, ["old-aligned", *arms], SUITES, seeds)
    body = [header, "## Every arm (outcome-judge metrics per suite; mean ± sd over seeds)", table,
            "## Comparisons",
            "Paired differences in points (arm − baseline on the same held-out items, seed by seed, pooled over "
            "the seeds both ran), bootstrap 95% CI over items. Where the interval covers zero, `n≈` is the items "
            "per seed at which it would stop covering zero if the difference stayed as measured.",
            *[comparison_markdown(c) for c in comparisons], "## Triage and impact scores",
            "Triage counts per harm domain: triage_summary.json. Training sets and weights:",
            impact_table(results, arms, seeds)]
    atomic_write_text(results / "summary.md", "\n\n".join(body) + "\n")
    print(f"wrote {results / 'summary.md'}")


if __name__ == "__main__":
    main()
