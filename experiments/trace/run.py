"""TRACE experiment: re-align a model when its written policy changes.

    python experiments/trace/run.py                       # seed 0
    python experiments/trace/run.py --seeds 0 1 2
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
4. From the old-aligned model, the same budget for each arm: (a) naive DPO on the relabelled
   pairs (swapped where the chosen answer violates and the rejected one complies, pairs where
   both violate dropped, the rest kept), (b) NPO on every flagged response (trace.no_triage),
   (c) TRACE with uniform weights (trace.no_impact_weights), (d) TRACE.

Metrics on held-out prompts (built-in TEST split), judged by policy-rules under the NEW policy:
agreement on prompts whose rule changed (harmful prompts in cybercrime, drugs, privacy,
manipulation; prompts that only sound harmful), on prompts whose rule did not change (the other
harm domains: must not regress), pooled target agreement; built-in multiple-choice capability.

Raw outputs go to runs/exp-trace/ (not committed); aggregates, triage summary, impact-score
statistics, timings and summary.md go to experiments/trace/results/. Finished arms are skipped.
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

from common import (copy_aggregates, evaluate, fmt_delta, is_complete, item_outcomes, safety_sft_start,  # noqa: E402
                    summarise, train)

OLD_POLICY, NEW_POLICY = "old-strict", "new-contextual"
OLD_SOURCES = ["builtin-refusal-pairs", "builtin-terse-pairs", "builtin-cautious-pairs"]
ARMS = ("naive-dpo", "npo-no-triage", "trace-uniform", "trace")
SUITES = ["policy-changed", "policy-unchanged", "capability"]
JUDGE_OPTIONS = {"policy": NEW_POLICY, "refusal": "embedding-minilm"}

# The shift arms share TRACE's adapter and optimisation (the paper's: LoRA r32 / alpha 16 /
# dropout 0.1 on q and v, beta 0.3; lr --lr, the paper's 1e-4 by default), so naive DPO differs from
# TRACE only in its loss.
SHIFT_COMMON = ["lora.r=32", "lora.alpha=16", "lora.dropout=0.1", "lora.target_modules=[q_proj, v_proj]",
                "loss.beta=0.3", "training.max_length=256"]
ARM_OVERRIDES: dict[str, tuple[str, list[str]]] = {
    "naive-dpo": ("dpo.yaml", []),
    "npo-no-triage": ("trace.yaml", ["trace.no_triage=true"]),
    "trace-uniform": ("trace.yaml", ["trace.no_impact_weights=true"]),
    "trace": ("trace.yaml", []),
}

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

    summary = triage_command(NEW_POLICY, str(pairs), "policy-rules", out, judge_options={"refusal": "embedding-minilm"},
                             log=print)
    if summary["counts"]["FAILED"]:
        sys.exit(f"error: {summary['counts']['FAILED']} pairs got no verdict; run again to retry them")
    return summary


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


# ---------------------------------------------------------------- suites


def write_suites(runs: Path, n_changed: int, n_unchanged: int) -> list[str]:
    import yaml

    sdir = runs / "suites"
    sdir.mkdir(parents=True, exist_ok=True)
    out = []
    for name, n, what in (("policy-changed", n_changed, "prompts whose rule changed (cybercrime, drugs, privacy, "
                                                          "manipulation; prompts that only sound harmful)"),
                          ("policy-unchanged", n_unchanged, "prompts whose rule did not change (violence, economic "
                                                            "crime, discrimination, public health)")):
        spec = {"name": name, "dataset": str(runs / "data" / f"heldout_{name.split('-')[1]}.jsonl"), "n": n,
                "expected": "policy", "policy": NEW_POLICY, "judge": "policy-rules", "metric": "policy_agreement",
                "description": f"Built-in TEST {what}; share judged compliant with the new policy "
                               f"({NEW_POLICY}) by policy-rules (refusal detection: embedding-minilm).",
                "generation": {"max_new_tokens": 64}}
        p = sdir / f"{name}.yaml"
        p.write_text(yaml.safe_dump(spec, sort_keys=False))
        out.append(str(p))
    return out + ["capability"]


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


def item_flags(eval_dir: Path, suite: str) -> dict[str, float]:
    """Per-item policy agreement (1 = complies) of a policy suite, keyed suite/id so suites can pool."""
    return {f"{suite}/{k}": v for k, v in item_outcomes(eval_dir, suite).items()}


def mc_flags(eval_dir: Path) -> dict[str, float]:
    return item_outcomes(eval_dir, "capability")


def paired(a: dict[str, float], b: dict[str, float], seed: int) -> str:
    from tactful.eval.metrics import paired_difference

    ids = sorted(set(a) & set(b))
    return fmt_delta(paired_difference([a[i] for i in ids], [b[i] for i in ids], seed=seed).to_dict())


def pooled_agreement(eval_dir: Path, seed: int) -> dict[str, Any]:
    from tactful.eval.metrics import rate

    flags = {**item_flags(eval_dir, "policy-changed"), **item_flags(eval_dir, "policy-unchanged")}
    return {"metric": "policy_agreement", **rate([v == 1.0 for v in flags.values()], seed=seed).to_dict()}


def claim_table(runs: Path, arms: list[str], seeds: list[int]) -> str:
    lines = ["| comparison | seed | pooled agreement | changed rules | unchanged rules | capability |",
             "|---|---|---|---|---|---|"]
    for seed in seeds:
        base = runs / f"old-aligned-seed{seed}" / "eval"
        naive = runs / f"naive-dpo-seed{seed}" / "eval"
        for a, b, bdir in [(arm, "naive-dpo", naive) for arm in arms if arm != "naive-dpo"] + \
                          [(arm, "old-aligned", base) for arm in arms]:
            adir = runs / f"{a}-seed{seed}" / "eval"
            if not ((adir / "metrics.json").exists() and (bdir / "metrics.json").exists()):
                continue
            both = lambda d: {**item_flags(d, "policy-changed"), **item_flags(d, "policy-unchanged")}  # noqa: E731
            cells = [paired(both(adir), both(bdir), seed),
                     paired(item_flags(adir, "policy-changed"), item_flags(bdir, "policy-changed"), seed),
                     paired(item_flags(adir, "policy-unchanged"), item_flags(bdir, "policy-unchanged"), seed),
                     paired(mc_flags(adir), mc_flags(bdir), seed)]
            lines.append(f"| {a} − {b} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--pairs-n", type=int, default=40, help="prompts drawn from each of the three old sources")
    ap.add_argument("--old-steps", type=int, default=12, help="DPO steps aligning the start to the old policy")
    ap.add_argument("--steps", type=int, default=30, help="steps of every shift arm (batch --batch pairs)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4, help="learning rate of every shift arm")
    ap.add_argument("--old-lr", type=float, default=1e-4, help="learning rate of the old-aligned DPO")
    ap.add_argument("--gold", type=int, default=12, help="TRACE's gold batch size")
    ap.add_argument("--weight-scale", default="mean", choices=["mean", "sum"],
                    help="conflict weights average 1 (default here, see README) or sum to 1 (the paper)")
    ap.add_argument("--n-changed", type=int, default=48, help="held-out prompts whose rule changed")
    ap.add_argument("--n-unchanged", type=int, default=32, help="held-out prompts whose rule did not change")
    ap.add_argument("--limit", type=int, default=None, help="cap items per suite, capability included (smoke)")
    ap.add_argument("--start", default=None, help="start run (default: the safety-SFT run of the seed)")
    ap.add_argument("--runs", default=None, help="raw outputs (default runs/exp-trace; --quick: runs/exp-trace-quick)")
    ap.add_argument("--results", default=None, help="committed aggregates (default experiments/trace/results)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 3 steps, 4 items per suite, 4 pairs per "
                                                         "source, a 2-step SFT start, all under runs/exp-trace-quick")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override for the shift arms")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.old_steps, args.pairs_n, args.gold = 3, 3, 4, 6
        args.limit = args.limit or 4
    runs = Path(args.runs or ROOT / "runs" / ("exp-trace-quick" if args.quick else "exp-trace")).resolve()
    results = Path(args.results or (runs / "results" if args.quick else HERE / "results"))
    data = runs / "data"
    data.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)

    # Shared by every arm and seed: held-out prompts, the old data, its triage, the relabelled pairs.
    t0 = time.time()
    split = heldout_prompts(data)
    pairs = old_pairs(data, args.pairs_n)
    summary = triage_once(pairs, runs / "triage")
    naive = relabelled_pairs(runs / "triage", data / "relabelled_pairs.jsonl")
    suites = write_suites(runs, args.n_changed, args.n_unchanged)
    shared_s = round(time.time() - t0, 1)
    (results / "triage_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (results / "data.json").write_text(json.dumps({"heldout": split, "old_pairs": summary["n_pairs"],
                                                   "relabelled_for_naive_dpo": naive}, indent=2) + "\n")

    n_arms = len(args.arms) * len(args.seeds)
    c = CALIBRATION
    n_conf = summary["counts"]["INVERT"] + summary["counts"]["PUNISH"]
    scored = sum(a in ("trace", "npo-no-triage") for a in args.arms) * len(args.seeds)
    est = c["shared_s"] + len(args.seeds) * (args.old_steps * c["step_s"] + c["overhead_s"] + c["eval_s"]) + \
        n_arms * (args.steps * c["step_s"] + c["overhead_s"] + c["eval_s"]) + \
        scored * (n_conf * c["score_conflict_s"] + args.gold * c["score_gold_s"])
    print(f"{n_arms} shift arms + {len(args.seeds)} old-aligned, {args.steps} steps x batch {args.batch}; estimated "
          f"time on 2 free cores: {est / 60:.0f} min (threads: {os.environ.get('OMP_NUM_THREADS', 'all')})")

    timings_path = results / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    timings["shared_data_and_triage"] = timings.get("shared_data_and_triage", shared_s)
    eval_kw = {"judge_options": JUDGE_OPTIONS}

    def record(name: str, run_dir: Path, t_train: float | None, ev_fresh: bool, t_eval: float) -> None:
        entry = timings.get(name, {})
        if t_train is not None:
            entry["train_s"] = round(t_train, 1)
        if ev_fresh:
            entry["eval_s"] = round(t_eval, 1)
        timings[name] = entry
        timings_path.write_text(json.dumps(timings, indent=2) + "\n")
        print(f"{name}: {entry}")

    for seed in args.seeds:
        if args.start:
            start = Path(args.start).resolve()
        elif args.quick:
            start = train("sft.yaml", runs / f"sft-start-seed{seed}", [f"seed={seed}", "training.max_steps=2"])
        else:
            start = safety_sft_start(seed)
        steps = [f"training.per_device_train_batch_size={args.batch}", "training.save_steps=20",
                 "training.logging_steps=4"]
        # 1. the old-aligned model
        name = f"old-aligned-seed{seed}"
        t = time.time()
        fresh = not is_complete(runs / name)
        old = train("dpo.yaml", runs / name, [f"seed={seed}", f"start_from={start}", f"data.sources=[{pairs}]",
                                              "data.n=null", f"training.max_steps={args.old_steps}",
                                              f"training.learning_rate={args.old_lr}", *steps])
        t_train = time.time() - t if fresh else None
        ev_fresh = not (old / "eval" / "metrics.json").exists()
        t = time.time()
        ev = evaluate(old, suites, old / "eval", seed=seed, limit=args.limit, **eval_kw)
        copy_aggregates(ev, results / name, old)
        record(name, old, t_train, ev_fresh, time.time() - t)

        # 2. the shift arms, all from the old-aligned model
        for arm in args.arms:
            recipe, extra = ARM_OVERRIDES[arm]
            overrides = [f"seed={seed}", f"start_from={old}", f"training.max_steps={args.steps}",
                         f"training.learning_rate={args.lr}", *steps,
                         *SHIFT_COMMON, *extra]
            if recipe == "dpo.yaml":
                overrides += [f"data.sources=[{data / 'relabelled_pairs.jsonl'}]", "data.n=null"]
            else:
                overrides += [f"trace.triage_file={runs / 'triage' / 'triage.jsonl'}",
                              f"trace.gold_batch_size={args.gold}", f"trace.weight_scale={args.weight_scale}",
                              "trace.judge_options={refusal: embedding-minilm}"]
            name = f"{arm}-seed{seed}"
            t = time.time()
            fresh = not is_complete(runs / name)
            run_dir = train(recipe, runs / name, [*overrides, *args.extra])
            t_train = time.time() - t if fresh else None
            ev_fresh = not (run_dir / "eval" / "metrics.json").exists()
            t = time.time()
            ev = evaluate(run_dir, suites, run_dir / "eval", seed=seed, limit=args.limit, **eval_kw)
            copy_aggregates(ev, results / name, run_dir)
            pooled = pooled_agreement(ev, seed)
            (results / name / "train_diagnostics.json").write_text(
                json.dumps({**diagnostics(run_dir), "pooled_policy_agreement": pooled}, indent=2) + "\n")
            record(name, run_dir, t_train, ev_fresh, time.time() - t)
        pooled = pooled_agreement(old / "eval", seed)
        (results / f"old-aligned-seed{seed}" / "train_diagnostics.json").write_text(
            json.dumps({**diagnostics(old), "pooled_policy_agreement": pooled}, indent=2) + "\n")

    header = "\n".join([
        "# TRACE experiment: results", "",
        f"Old data: {summary['n_pairs']} pairs chosen under {OLD_POLICY}; triage under {NEW_POLICY} with "
        f"{summary['judge']}: " + ", ".join(f"{k} {v}" for k, v in summary["counts"].items()) + ".",
        f"Old-aligned: DPO {args.old_steps} steps (lr {args.old_lr:g}) from the safety-SFT start. Shift arms: {args.steps} steps x batch "
        f"{args.batch}, LoRA r32 on q/v, beta 0.3, lr {args.lr:g}; TRACE weight scale {args.weight_scale}, gold batch "
        f"{args.gold}.", "",
        "Cells: agreement with the new policy (policy-rules judge) / multiple-choice accuracy, "
        "value [95% bootstrap CI] for one seed, mean ± sd over seeds.",
    ])
    table = summarise(results, ["old-aligned", *args.arms], SUITES, args.seeds)
    claim = claim_table(runs, list(args.arms), args.seeds)
    body = [header, table,
            "## Claim: TRACE's policy agreement >= 10 points above naive DPO, capability within 2 points of the "
            "start (old-aligned) model",
            "Paired differences on the same held-out items, in points, with a bootstrap 95% CI ('pooled' = both "
            "policy suites together):", claim, "## Triage and impact scores",
            "Triage counts per harm domain: results/triage_summary.json. Training sets and weights:",
            impact_table(results, list(args.arms), args.seeds)]
    from tactful.io import atomic_write_text

    atomic_write_text(results / "summary.md", "\n\n".join(body) + "\n")
    print("\n" + claim)
    print(f"wrote {results / 'summary.md'}")


if __name__ == "__main__":
    main()
