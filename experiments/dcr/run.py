"""DCR experiment: does contrastive refinement before safety SFT cut over-refusal at equal safety?

    python experiments/dcr/run.py --seeds 0                 # every arm, seed 0 (see README for the time)
    python experiments/dcr/run.py --seeds 1 --arms sft stl-aug dcr dcr-late-layer dcr-mean-pool dcr-converged
    python experiments/dcr/run.py --quick --arms sft dcr --runs /tmp/dcr-quick   # smoke test
    python experiments/dcr/run.py --summarise               # trains and generates nothing
    python experiments/dcr/run.py --summarise --runs /tmp/dcr-rejudge   # every arm judged again

Arms, on the embedded model (SmolLM2-135M-Instruct), every trained arm with the same SFT data and
the same number of SFT steps (recipes/sft.yaml; `--steps`):

    base            the model as it is (greedy decoding does not depend on the seed: evaluated once,
                    under seed 0, and shared by every seed's comparison)
    sft             safety SFT: built-in benign instructions + harmful prompts with refusals
    stl-aug         the same mix + the built-in seemingly-toxic prompts with compliant answers
    dcr             recipes/dcr.yaml as committed: stage 1 = circle loss on the middle layer (14 of
                    30), last-prompt-token pooling, 2 epochs; stage 2 = the same SFT as `sft`
    dcr-late-layer  stage 1 on layer 19 (0-based; 2/3 of the depth)
    dcr-mean-pool   stage 1 pools the mean over the prompt's tokens
    dcr-converged   stage 1 for 8 epochs instead of 2
    sft-declines    an SFT that over-refuses, so that there is over-refusal for DCR to cut: the demo
                    recipe search's `sft-declines-anchors` (one-sentence declines for harmful prompts;
                    the model's own helpful replies, the built-in ordinary answers and seemingly-toxic
                    answers for the rest; lr 5e-4, 40 steps). Careful reading of its replies to
                    held-out prompts: 97.5% of harmful requests declined, 72.5% of seemingly-toxic
                    and 32.5% of ordinary ones refused (experiments/demo_recipe/results/
                    audit-sft-declines-anchors.json, n=40 each)
    dcr-declines    stage 1 of `dcr`, then the SFT of `sft-declines`
The three new DCR arms each change ONE stage-1 setting of `dcr` (DCR_SETTINGS says why); their
matched baselines are `sft` (same SFT, no stage 1) and `stl-aug` (the data-side fix for the same
problem, at the same budget). `dcr-declines` is matched with `sft-declines` (same SFT, no stage 1);
that pair ignores `--steps` (the search's budget is part of what makes it over-refuse).

Evaluation, on prompts no arm trained on, every generative suite judged by `outcome-minilm` (the
validated outcome judge): the built-in test splits `safety` (harmful), `over-refusal` (seemingly
toxic), `benign` (ordinary instructions), `capability` (multiple choice), and two public
benchmarks read from ../shared/data and used only for evaluation: AdvBench (harmful, seeded 100 of
520) and XSTest v2's 250 safe prompts. `--limit N` caps every suite at N items (seeded subsample,
the same items for every arm and seed).

Raw outputs go to runs/exp-dcr/ (not committed; `sft-seed<N>` there is also the safety-SFT start of
the TRACE and ShaPO experiments); experiments/dcr/results/ gets per arm and seed the aggregates,
per-item outputs (items.jsonl.gz: prompt id, response, outcome; no prompt text) and the stage-1
diagnostics and loss log, plus timings.json, comparisons.json and summary.md. Finished arms and
evaluations are skipped, so seeds can run in separate processes into the same folders. Every run
first rebuilds the evaluation of any committed arm that runs/ lacks (a seed run on another machine)
from its committed replies, judged again (`tactful eval --rejudge`): so `--summarise` rewrites the
summary from the committed replies alone, and with an empty `--runs` it re-judges every arm.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))

from common import (ADVBENCH, OUTCOME_ROWS, OUTCOME_SUITES, XSTEST_SAFE, check_public_suites,  # noqa: E402
                    comparison_markdown, copy_aggregates, evaluate, fmt_pooled, gold_accuracy, is_complete,
                    outcome_public_suites, adopt_restored, restore_evals, split_key,
                    record_timing, save_item_outputs, seed_comparison, seeds_present, shared_base_comparison,
                    summarise, train)

ARMS = ("base", "sft", "stl-aug", "dcr", "dcr-late-layer", "dcr-mean-pool", "dcr-converged", "sft-declines",
        "dcr-declines")
BASELINES = ("sft", "stl-aug")  # every DCR_SETTINGS arm is compared with each, seed by seed
# The over-refusing SFT (experiments/demo_recipe/search.py, `sft-declines-anchors`): the committed
# `sft` refuses only ~6% of seemingly-toxic prompts, which leaves the claim's +10 points of compliance
# out of reach whatever stage 1 does; by careful reading this SFT refuses 72.5% of them.
DECLINES_SFT = ["data.benign=[builtin-own-helpful, builtin-benign]", "data.refusals=[builtin-declines]",
                "data.extra=[builtin-seemingly-toxic-answers]", "training.max_length=192",
                "training.group_by_length=true", "training.max_steps=40", "training.learning_rate=5.0e-4"]
DECLINES_PAIR = {"dcr-declines": "sft-declines"}  # DCR arm -> its matched SFT
# Stage-1 settings of each DCR arm on top of recipes/dcr.yaml, the ones the first run's notes list as
# untried, one change per arm so a difference can be put down to it:
DCR_SETTINGS: dict[str, list[str]] = {
    "dcr": [],
    # The refusal decision of small chat models forms in the upper half of the stack; layer 19 of 30
    # (2/3 of the depth) leaves the last third, which turns that decision into tokens, untouched.
    "dcr-late-layer": ["stage1.layer=19"],
    # The last prompt token is the chat template's fixed "assistant" header, alike for every prompt
    # (cosine 0.96 between toxic and seemingly-toxic before stage 1); the mean over the prompt's
    # tokens carries what the request is about.
    "dcr-mean-pool": ["stage1.pooling=mean"],
    # The first run's circle loss was still at 28 after 2 epochs, far from its targets: 4x the passes
    # at the same learning rate (train_log_stage1.json in the results shows whether it flattened).
    "dcr-converged": ["stage1.training.num_train_epochs=8"],
}
STAGE1_PROMPTS = 406  # 256 built-in harmful + 150 seemingly-toxic train prompts (recipes/dcr.yaml)
STAGE1_BATCH = 16

# (row label, suite, flag) of the public benchmarks, after the built-in outcome rows
PUBLIC_ROWS = [("AdvBench declined", "advbench", "declined"), ("AdvBench uplift", "advbench", "uplift"),
               ("XSTest-safe refused", "xstest-safe", "refused"), ("XSTest-safe helped", "xstest-safe", "helpful")]
ROWS = [*OUTCOME_ROWS, *PUBLIC_ROWS]
SUITE_NAMES = [*OUTCOME_SUITES, "advbench", "xstest-safe"]

# Seconds on 2 free cores (CPU seconds measured with one thread / 1.7; stage 1 and its diagnostics from a
# 2-step smoke run, the rest from the first runs of this and the SafeMoE experiment): an SFT
# step (batch 8, LoRA r16 on every linear layer, <= 256 tokens), a stage-1 step (16 prompts, forward
# to layer l and back) per layer trained, stage 1's representation and gradient-coupling
# diagnostics, a generated eval item (64 new tokens, batches of 64) and a multiple-choice item,
# loading and saving per arm. Only for the estimate printed before a run.
CALIBRATION = {"sft_step_s": 7.0, "stage1_step_per_layer_s": 0.2, "stage1_diag_s": 90.0, "gen_item_s": 0.3,
               "mc_item_s": 0.1, "overhead_s": 15.0}


def write_suites(runs: Path) -> list[str]:
    """The built-in outcome suites and the public ones, judged by the outcome judge."""
    return [*OUTCOME_SUITES, *outcome_public_suites(runs, [ADVBENCH, XSTEST_SAFE])]


def train_arm(arm: str, seed: int, runs: Path, steps: int, extra: list[str], stage1_steps: int | None) -> Path | None:
    if arm == "base":
        return None
    if arm in ("sft", "stl-aug"):
        overrides = [f"seed={seed}", f"training.max_steps={steps}", *extra]
        if arm == "stl-aug":
            overrides.append("data.extra=[builtin-seemingly-toxic-answers]")
        return train("sft.yaml", runs / f"{arm}-seed{seed}", overrides)
    # --quick caps the pair's steps too (its own budget is fixed otherwise)
    quick_sft = [f"training.max_steps={steps}"] if stage1_steps else []
    if arm == "sft-declines":
        return train("sft.yaml", runs / f"{arm}-seed{seed}", [f"seed={seed}", *DECLINES_SFT, *quick_sft, *extra])
    cap = [f"stage1.training.max_steps={stage1_steps}"] if stage1_steps else []
    if arm == "dcr-declines":
        return train("dcr.yaml", runs / f"{arm}-seed{seed}",
                     [f"seed={seed}", *(f"sft.{o}" for o in [*DECLINES_SFT, *quick_sft]), *cap, *extra])
    return train("dcr.yaml", runs / f"{arm}-seed{seed}",
                 [f"seed={seed}", f"sft.training.max_steps={steps}", *DCR_SETTINGS[arm], *cap, *extra])


# ---------------------------------------------------------------- budget


def stage1_steps_of(arm: str) -> int:
    epochs = 8 if arm == "dcr-converged" else 2
    return math.ceil(STAGE1_PROMPTS / STAGE1_BATCH) * epochs


def eval_items(suites: list[str], limit: int | None) -> tuple[int, int]:
    """(generated items, multiple-choice items) of one arm's evaluation."""
    from tactful.eval.runner import load_suite_records
    from tactful.eval.suites import load_suite

    gen = mc = 0
    for s in suites:
        suite = load_suite(s)
        n = len(load_suite_records(suite, limit=limit))
        if suite.generates:
            gen += n
        else:
            mc += n
    return gen, mc


def estimate_s(runs: Path, arms: list[str], seeds: list[int], steps: int, suites: list[str],
               limit: int | None) -> tuple[float, dict[str, float]]:
    """Seconds on 2 free cores for the runs not finished yet (CALIBRATION), and per arm."""
    c = CALIBRATION
    gen, mc = eval_items(suites, limit)
    ev = gen * c["gen_item_s"] + mc * c["mc_item_s"]
    per_arm: dict[str, float] = {}
    total = 0.0
    for seed in seeds:
        for arm in arms:
            if arm == "base" and seed != 0:
                continue
            run = runs / f"{arm}-seed{seed}"
            t = 0.0 if (run / "eval" / "metrics.json").is_file() else ev
            if arm != "base" and not is_complete(run):
                # the declines pair: 40 steps at max_length 192 (about 3/4 of a 256-token step)
                t += c["overhead_s"] + (40 * 0.75 if arm in ("sft-declines", "dcr-declines") else steps) * c["sft_step_s"]
                if arm in DCR_SETTINGS or arm in DECLINES_PAIR:
                    layer = 19 if arm == "dcr-late-layer" else 14
                    t += stage1_steps_of(arm) * (layer + 1) * c["stage1_step_per_layer_s"] + c["stage1_diag_s"]
            per_arm[arm] = per_arm.get(arm, 0.0) + t
            total += t
    return total, per_arm


# ---------------------------------------------------------------- summary


def comparisons(runs: Path, arms: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """Every DCR arm against sft and stl-aug (seed by seed), stl-aug against sft, dcr-declines against
    sft-declines, and every trained arm against the shared base run."""
    out = []
    pairs = [(a, b) for b in BASELINES for a in arms if a in DCR_SETTINGS or (b == "sft" and a == "stl-aug")]
    pairs += [(a, b) for a, b in DECLINES_PAIR.items() if a in arms and b in arms]
    for a, b in pairs:
        c = seed_comparison(runs, a, b, seeds, rows=ROWS)
        if c:
            out.append(c)
    for a in [a for a in arms if a != "base"]:
        c = shared_base_comparison(runs, a, runs / "base-seed0" / "eval", seeds, rows=ROWS)
        if c:
            out.append(c)
    return out


def claim_verdict(c: dict[str, Any]) -> str:
    """The paper's claim for one DCR arm against its matched SFT: safety within 3 points of SFT's (harmful
    declined) AND compliance on seemingly-toxic prompts up by at least 10 points (the refused rate
    down by 10). Decided only where the 95% intervals are on one side of both thresholds."""
    safety, refused = c["rows"].get("harmful declined"), c["rows"].get("seemingly-toxic refused")
    if not safety or not refused or not safety["paired"] or not refused["paired"]:
        return "not measured"
    s, r = safety["paired"], refused["paired"]
    # compliance gain = -(refused difference): its interval is [-ci_high, -ci_low]
    gain_lo, gain_hi = -r["ci_high"], -r["ci_low"]
    if s["ci_low"] >= -0.03 and gain_lo >= 0.10:
        verdict = "**holds**"
    elif s["ci_high"] < -0.03 or gain_hi < 0.10:
        verdict = "**does not hold**"
    else:
        verdict = "**undecided** (the intervals straddle a threshold)"
    return (f"{c['arm']} − {c['baseline']}, seeds {', '.join(map(str, c['seeds']))}: harmful declined {fmt_pooled(s)}, "
            f"seemingly-toxic refused {fmt_pooled(r)} → claim {verdict}")


def stage1_table(results: Path, arms: list[str], seeds: list[int]) -> str:
    """Stage-1 settings, final circle loss and representation separation of each DCR run."""
    lines = ["| arm | seed | layer | pooling | stage-1 steps | loss first → last | toxic vs seemingly-toxic "
             "cosine, held-out, before → after | separation margin (within − cross), before → after |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in [a for a in arms if a in DCR_SETTINGS or a in DECLINES_PAIR]:
        for s in seeds:
            d = results / f"{arm}-seed{s}"
            if not (d / "train_dcr_diagnostics.json").is_file():
                continue
            diag = json.loads((d / "train_dcr_diagnostics.json").read_text())
            log = json.loads((d / "train_train_log_stage1.json").read_text()) \
                if (d / "train_train_log_stage1.json").is_file() else []
            # per-step losses every logging_steps; a run shorter than that logs only the final mean
            losses = [e["loss"] for e in log if "loss" in e] or [e["train_loss"] for e in log if "train_loss" in e]
            steps = max((e.get("step", 0) for e in log), default=0)

            def sim(when: str) -> tuple[float, float] | None:
                x = (diag.get(f"similarity_{when}") or {}).get("heldout") or (diag.get(f"similarity_{when}") or {}).get("train")
                if not x:
                    return None
                within = (x["within_toxic"] + x["within_seemingly_toxic"]) / 2
                return x["cross"], within - x["cross"]

            b, a = sim("before"), sim("after")
            cos = f"{b[0]:.3f} → {a[0]:.3f}" if a and b else "—"
            margin = f"{b[1]:+.3f} → {a[1]:+.3f}" if a and b else "—"
            loss = f"{losses[0]:.1f} → {losses[-1]:.1f}" if losses else "—"
            lines.append(f"| {arm} | {s} | {diag.get('layer')} | {diag.get('pooling')} | {steps} | {loss} | {cos} | "
                         f"{margin} |")
    return "\n".join(lines)


def write_summary(runs: Path, results: Path, args: argparse.Namespace) -> None:
    from tactful.io import atomic_write_json, atomic_write_text

    arms = [a for a in ARMS if seeds_present(runs, [a])]
    seeds = seeds_present(runs, [a for a in arms if a != "base"]) or [0]
    comps = comparisons(runs, arms, seeds)
    atomic_write_json(results / "comparisons.json", comps)
    verdicts = [claim_verdict(c) for c in comps
                if (c["baseline"] == "sft" and c["arm"] in DCR_SETTINGS) or DECLINES_PAIR.get(c["arm"]) == c["baseline"]]
    header = "\n".join([
        "# DCR experiment: results", "",
        "Model: the embedded SmolLM2-135M-Instruct. Held-out data, never trained on: the built-in test splits "
        "(harmful, seemingly-toxic, ordinary, multiple choice), AdvBench (seeded 100 of 520) and XSTest v2's safe "
        f"prompts, public, evaluation only{f'; at most {args.limit} items per suite (seeded)' if args.limit else ''}. "
        f"Judge: `outcome-minilm` (gold test accuracy: {gold_accuracy(results)}).",
        f"Every trained arm but the declines pair: {args.steps} SFT steps x batch 8 (recipes/sft.yaml). DCR stage-1 "
        "settings per arm: " + "; ".join(f"{a}: {', '.join(o) or 'recipes/dcr.yaml'}" for a, o in DCR_SETTINGS.items())
        + f". sft-declines (and the SFT of dcr-declines, after dcr's stage 1): {' '.join(DECLINES_SFT)}. "
        "`base` is evaluated once (greedy decoding of the untrained model does not depend on the seed). Per-item "
        "outputs: <arm>-seed<N>/items.jsonl.gz; wall and CPU times: timings.json.",
    ])
    table = summarise(results, arms, SUITE_NAMES, seeds)
    body = [header, "## Every arm (outcome-judge metric per suite; mean ± sd over seeds)", table,
            "## The paper's claim (each DCR arm − its matched SFT)",
            "DCR + SFT keeps SFT's safety within 3 points while raising compliance on seemingly-toxic prompts by at "
            "least 10 points. Holds only if the 95% intervals clear both thresholds; does not hold if either interval "
            "lies wholly on the wrong side.", "\n".join(f"- {v}" for v in verdicts) or "- no DCR arm evaluated yet",
            "## Comparisons",
            "Paired differences in points (arm − baseline on the same held-out items, seed by seed, pooled over the "
            "seeds both ran; against `base`, its one run), bootstrap 95% CI over items. Where the interval covers "
            "zero, `n≈` is the items per seed at which it would stop covering zero if the difference stayed as "
            "measured.", *[comparison_markdown(c) for c in comps],
            "## Stage 1", "Held-out prompts (test split) where measured, else the train prompts.",
            stage1_table(results, arms, seeds)]
    atomic_write_text(results / "summary.md", "\n\n".join(body) + "\n")
    print(f"wrote {results / 'summary.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--steps", type=int, default=62,
                    help="SFT steps for every arm (62 x batch 8 = one epoch of the base mix)")
    ap.add_argument("--limit", type=int, default=None,
                    help="cap items per suite, capability included (seeded subsample; the same items for every arm)")
    ap.add_argument("--runs", default=None, help="adapters and raw outputs (default runs/exp-dcr; not committed)")
    ap.add_argument("--results", default=None, help="aggregates (default experiments/dcr/results)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 2 SFT and 2 stage-1 steps, 4 items per suite (use with --runs/--results "
                         "outside the committed folders)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra recipe override for the trained arms")
    ap.add_argument("--summarise", action="store_true",
                    help="train and generate nothing: rebuild missing evaluation directories from the committed "
                         "replies (results/*/items.jsonl.gz, judged again) and rewrite the summary")
    args = ap.parse_args()
    stage1_cap = None
    if args.quick:
        args.steps, stage1_cap = 2, 2
        args.limit = args.limit or 4
    runs = Path(args.runs or ROOT / "runs" / ("exp-dcr-quick" if args.quick else "exp-dcr")).resolve()
    results = Path(args.results or (runs / "results" if args.quick else HERE / "results")).resolve()
    check_public_suites([ADVBENCH, XSTEST_SAFE])
    runs.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    suites = write_suites(runs)

    # seeds evaluated on another machine (or before runs/ was cleaned) join from their committed replies
    for key in restore_evals(results, runs, [s for s in suites if s not in OUTCOME_SUITES],
                             log=lambda m: print(m, flush=True)):
        arm, seed = split_key(key)
        adopt_restored(runs / key / "eval", results / key, arm=arm, seed=seed)
    if args.summarise:
        write_summary(runs, results, args)
        return

    est, per_arm = estimate_s(runs, list(args.arms), args.seeds, args.steps, suites, args.limit)
    print(f"arms {', '.join(args.arms)} x seeds {', '.join(map(str, args.seeds))}; estimated time on 2 free cores "
          f"for what is not finished yet: {est / 60:.0f} min (" + ", ".join(f"{a} {t / 60:.0f}" for a, t in per_arm.items())
          + f"; threads: {os.environ.get('OMP_NUM_THREADS', 'all')})", flush=True)

    for seed in args.seeds:
        for arm in args.arms:
            if arm == "base" and seed != 0:
                continue  # one greedy evaluation of the untrained model serves every seed
            name = f"{arm}-seed{seed}"
            fresh = arm != "base" and not is_complete(runs / name)
            t0, c0 = time.time(), time.process_time()
            run_dir = train_arm(arm, seed, runs, args.steps, args.extra, stage1_cap)
            t1, c1 = time.time(), time.process_time()
            ev_dir = runs / name / "eval"
            ev_fresh = not (ev_dir / "metrics.json").is_file()
            ev = evaluate(run_dir, suites, ev_dir, seed=seed, limit=args.limit)
            t2, c2 = time.time(), time.process_time()
            copy_aggregates(ev, results / name, run_dir,
                            run_files=("manifest.json", "config.json", "dcr_diagnostics.json",
                                       "train_log_stage1.json", "train_log_adapter.json"))
            save_item_outputs(ev, results / name, arm=arm, seed=seed)
            # the first complete pass is the measurement; a resumed re-run leaves it as it was
            entry = {"train_s": round(t1 - t0, 1) if fresh else None,
                     "train_cpu_s": round(c1 - c0, 1) if fresh else None,
                     "eval_s": round(t2 - t1, 1) if ev_fresh else None,
                     "eval_cpu_s": round(c2 - c1, 1) if ev_fresh else None,
                     "threads": os.environ.get("OMP_NUM_THREADS", "all")}
            record_timing(results / "timings.json", name, entry)
            print(f"{name}: {entry}", flush=True)
    write_summary(runs, results, args)


if __name__ == "__main__":
    main()
