"""ShaPO experiment: is sharpness-aware preference optimisation on probe-selected neurons robust
to noisy preference labels?

    python experiments/shapo/run.py                       # 6 methods x {0%, 30%} flipped labels, seed 0
    python experiments/shapo/run.py --seeds 0 1 2         # more seeds (each seed also flips other pairs)
    python experiments/shapo/run.py --quick               # smoke test: a few steps, 4 eval items, runs/ only
    python experiments/shapo/run.py --probe-data all      # ShaPO's probe on every labelled training response
    python experiments/shapo/run.py --probe-measure 64    # only the cost of that probe, on 64 responses

From the safety-SFT start (runs/exp-dcr/sft-seed<seed>, shared with the DCR experiment), every
arm trains a LoRA adapter with the same budget on the same PKU-SafeRLHF safety pairs (one
response safe, one unsafe), with 0% or 30% of the pair labels flipped: DPO, cDPO, rDPO, Dr.DPO,
ShaPO and Dr.DPO + ShaPO. Metrics on prompts no arm trained on: safety (refusal rate) on held-out
PKU-SafeRLHF prompts (in-distribution), on the built-in harmful test split and on AdvBench
(out-of-distribution); compliance on the built-in seemingly-toxic test split (over-refusal);
built-in multiple-choice capability. Win rate against the dataset's safe answer needs an LLM
judge endpoint (--judge-url); without one it is not run. Judge: outcome-minilm (offline,
validated on real replies of this model: docs/judging.md); PKU answers are judged by harmful
uplift first, then declined.

The ShaPO arms' probe: by default fitted by each arm on up to 128 responses of its own
training pairs. With --probe-data all it is fitted once per seed, on the start model (the model
before preference alignment, whose down-projections ShaPO perturbs), on every labelled response
of the training prompts (3,810 distinct responses in the 4,115 pairs of the 744 training
prompts; the held-out prompts' pairs stay out; the official code fits on all of
PKU-SafeRLHF-30K's training responses), and handed to the ShaPO arms (probe.file), which are
then named <method>-probeall-noise<N>; its held-out accuracy (20% of the prompts held out) is
reported. --probe-measure N fits that probe on a seeded N-response subset only, records
its cost and prints the estimated cost of the full fit, and stops.

Raw outputs go to runs/exp-shapo/ (not committed); aggregates, per-item outputs (items.jsonl.gz:
prompt id, response, outcome, seed, arm; no prompt text), per-arm diagnostics (probe accuracy,
mask size, perturbation norms), the split description, timings and summary.md go to
experiments/shapo/results/. Finished arms are skipped, so the script resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    ADVBENCH,
    OUTCOME_ROWS,
    OUTCOME_SUITES,
    TWO_CORE_SPEEDUP,
    adopt_restored,
    check_public_suites,
    comparison_markdown,
    copy_aggregates,
    gold_accuracy,
    evaluate,
    is_complete,
    restore_evals,
    safety_sft_start,
    save_item_outputs,
    seed_comparison,
    seeds_present,
    split_key,
    summarise,
    train,
)
from tactful.io import atomic_write_json  # noqa: E402

PKU_FILE = ROOT.parent / "shared" / "data" / "pku_saferlhf_test_safety_pairs_5k.json"

# method -> (recipe, extra overrides); "{eps}" is the flip rate cDPO / rDPO are told.
METHODS: dict[str, tuple[str, list[str]]] = {
    "dpo": ("dpo.yaml", []),
    "cdpo": ("dpo.yaml", ["loss.name=cdpo", "loss.label_smoothing={eps}"]),
    "rdpo": ("dpo.yaml", ["loss.name=rdpo", "loss.label_smoothing={eps}"]),
    "drdpo": ("dpo.yaml", ["loss.drdpo=true"]),
    "shapo": ("shapo.yaml", []),
    "drdpo-shapo": ("shapo.yaml", ["loss.drdpo=true"]),
}
# each ShaPO arm and the arm that differs from it only by ShaPO
MATCHED_BASELINE = {"shapo": "dpo", "drdpo-shapo": "drdpo"}
SUITE_ORDER = ["pku-heldout", "advbench", "safety", "over-refusal", "benign", "capability"]
# The comparisons' rows: PKU-SafeRLHF's held-out prompts are judged by harmful uplift first (their
# safe answers often help rather than refuse, so declining is not the only safe outcome), then
# what the replies do on the out-of-distribution sets (outcome-minilm on every generative suite).
PKU_ROWS = [("PKU held-out uplift", "pku-heldout", "uplift"), ("PKU held-out declined", "pku-heldout", "declined"),
            ("PKU held-out degenerate", "pku-heldout", "degenerate"),
            ("AdvBench uplift", "advbench", "uplift"), ("AdvBench declined", "advbench", "declined")]

# Seconds on 2 free cores, from CPU seconds measured with one thread on this (shared) machine
# divided by 1.7 (see README, "Budget"): a training step at batch 4 with cached reference
# log-probs (ShaPO: every 5th step has a second forward and backward), scoring one pair with
# the reference (once, for all arms), ShaPO's probe, one arm's evaluation at the default sizes,
# loading and saving. Only for the estimate printed before a run; timings.json has the real ones.
# probe_response_s: the --probe-data all probe per response (hidden states at <= 256 tokens + the
# L-BFGS fit), 0.572 CPU s measured with --probe-measure 64 (one thread), / 1.7.
CALIBRATION = {"dpo_step_s": 5.0, "shapo_step_s": 6.0, "ref_pair_s": 0.45, "probe_s": 15.0, "eval_s": 65.0,
               "overhead_s": 10.0, "probe_response_s": 0.34}


# The ShaPO arms' probe sees at most this many tokens per (prompt, response), as an arm's own
# probe does (recipes/shapo.yaml training.max_length).
PROBE_MAX_LENGTH = 256


def arm_name(method: str, noise: float, probe_data: str = "train", perturbation: str = "sam") -> str:
    # A probe fitted on all labelled responses, or the official gamma perturbation, makes a
    # different ShaPO arm; the others do not depend on them, so they keep their names (and runs).
    shapo = "shapo" in method
    probe = "-probeall" if probe_data == "all" and shapo else ""
    gamma = "-gamma" if perturbation == "official" and shapo else ""
    return f"{method}{probe}{gamma}-noise{round(100 * noise)}"


def label_smoothing(noise: float) -> float:
    # cDPO / rDPO are told the true flip rate (an advantage the other arms do not get); at 0% noise
    # the conventional 0.1, since eps = 0 makes both plain DPO.
    return noise if noise > 0 else 0.1


def write_suites(runs: Path, heldout: Path, n_gen: int, n_pku: int, n_mc: int) -> list[str]:
    """Suite files for this experiment (the generative suites capped at n items, seeded)."""
    import yaml

    from tactful.eval.suites import load_suite

    sdir = runs / "suites"
    sdir.mkdir(parents=True, exist_ok=True)
    adv = load_suite(ADVBENCH)
    specs = {
        "pku-heldout": {"name": "pku-heldout", "dataset": str(heldout), "n": n_pku, "expected": "refuse",
                        "description": "PKU-SafeRLHF prompts held out from training (split by prompt; "
                                       "in-distribution). Metric = share declined; the outcome judge also "
                                       "reports harmful uplift.",
                        "judge": "outcome-minilm", "metric": "safe_rate", "generation": {"max_new_tokens": 64}},
        "safety": {"name": "safety", "dataset": "builtin-harmful", "split": "test", "n": n_gen, "expected": "refuse",
                   "description": "Built-in harmful test prompts (out-of-distribution for PKU training). "
                                  "Metric = share declined.",
                   "judge": "outcome-minilm", "metric": "safe_rate", "generation": {"max_new_tokens": 64}},
        "advbench": {"name": "advbench", "dataset": "advbench", "path": str(Path(adv.path).resolve()), "n": n_gen,
                     "expected": "refuse", "description": adv.description.split(",")[0] + f", seeded subsample of "
                     f"{n_gen}. Metric = share declined.",
                     "judge": "outcome-minilm", "metric": "safe_rate", "generation": {"max_new_tokens": 64}},
        "over-refusal": {"name": "over-refusal", "dataset": "builtin-seemingly-toxic", "split": "test", "n": n_gen,
                         "expected": "comply", "description": "Built-in seemingly-toxic test prompts. Metric = "
                                                              "share not refused.",
                         "judge": "outcome-minilm", "metric": "compliance_rate",
                         "generation": {"max_new_tokens": 64}},
        "benign": {"name": "benign", "dataset": "builtin-benign", "split": "test", "n": n_gen, "expected": "comply",
                   "description": "Built-in ordinary instructions (test split). Metric = share not refused.",
                   "judge": "outcome-minilm", "metric": "compliance_rate", "generation": {"max_new_tokens": 64}},
        "capability": {"name": "capability", "dataset": "builtin-capability", "split": "test", "n": n_mc,
                       "expected": "multiple-choice", "metric": "accuracy",
                       "description": "Built-in multiple-choice questions (test split), a sanity check of the "
                                      "budget's side effects; scored by log-likelihood. Metric = accuracy."},
    }
    paths = []
    for name in SUITE_ORDER:
        p = sdir / f"{name}.yaml"
        p.write_text(yaml.safe_dump(specs[name], sort_keys=False))
        paths.append(str(p))
    return paths


def train_arm(method: str, noise: float, seed: int, *, start: Path, pairs: Path, runs: Path, steps: int,
              batch: int, shapo: list[str], extra: list[str], probe_file: Path | None = None) -> Path:
    recipe, method_overrides = METHODS[method]
    eps = label_smoothing(noise)
    # Every arm has the same start and pairs, so the reference log-probs are scored once, by the
    # first arm, and read by the rest (keys are per response: label flips do not matter).
    overrides = [f"seed={seed}", f"start_from={start}", f"data.sources=[{pairs}]", "data.n=null",
                 f"ref_logps_cache={pairs.parent / 'ref_logps.jsonl'}",
                 f"data.flip_fraction={noise}", f"data.flip_seed={seed}", f"training.max_steps={steps}",
                 f"training.per_device_train_batch_size={batch}", "training.save_steps=20",
                 "training.logging_steps=5", *[o.format(eps=eps) for o in method_overrides]]
    if recipe == "shapo.yaml":
        overrides += shapo + ([f"probe.file={probe_file}"] if probe_file else [])
    perturbation = next((o.split("=", 1)[1] for o in shapo if o.startswith("shapo.perturbation=")), "sam")
    name = arm_name(method, noise, "all" if probe_file and recipe == "shapo.yaml" else "train", perturbation)
    return train(recipe, runs / f"{name}-seed{seed}", [*overrides, *extra])


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def fit_all_probe(start: Path, pairs_file: Path, out: Path, *, seed: int, limit: int | None = None) -> dict[str, Any]:
    """ShaPO's probe fitted once on the start model with the library's fit (the labels, pooling
    and by-prompt held-out split of an arm's own probe) on every labelled response of
    `pairs_file`, or on a seeded subset of `limit` responses to measure the cost. Writes
    out/shapo_probe.safetensors (for probe.file) and out/probe.json; reused while the settings
    match. CPU seconds are recorded (they barely depend on other jobs' load)."""
    from tactful.data.records import PreferencePair
    from tactful.io import atomic_write_json
    from tactful.methods.common import load_start_model
    from tactful.methods.shapo import ProbeSettings, fit_probe_on_pairs, save_probe

    settings = {"start": str(start), "pairs_sha256": _sha256(pairs_file), "limit": limit, "seed": seed,
                "max_length": PROBE_MAX_LENGTH, "labels": "pairs", "pool": "response"}
    info_path, probe_path = out / "probe.json", out / "shapo_probe.safetensors"
    if info_path.is_file() and probe_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("settings") == settings:
            return info
    out.mkdir(parents=True, exist_ok=True)
    pairs = [PreferencePair.from_dict(json.loads(line)) for line in pairs_file.read_text().splitlines() if line.strip()]
    t0 = time.time()
    st = load_start_model("embedded", start)
    t_load = time.time() - t0
    cpu0, t0 = time.process_time(), time.time()
    probe, fitted = fit_probe_on_pairs(st.model, st.tokenizer, pairs, ProbeSettings(max_examples=limit), seed=seed,
                                       max_length=PROBE_MAX_LENGTH)
    cpu, wall = time.process_time() - cpu0, time.time() - t0
    n = fitted["n_train"] + fitted["n_heldout"]
    info = {"settings": settings, **fitted, "n_responses": n, "load_s": round(t_load, 1), "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1), "cpu_s_per_response": round(cpu / max(n, 1), 3),
            "threads": os.environ.get("OMP_NUM_THREADS", "all")}
    save_probe(probe_path, probe, info)
    atomic_write_json(info_path, info)
    return info


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def diagnostics(run_dir: Path) -> dict[str, Any]:
    """What the committed results keep about training: loss, reward accuracy, label noise and, for
    ShaPO, the probe, the mask and the perturbation sizes."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    log = json.loads((run_dir / "train_log.json").read_text())
    steps = [r for r in log if "loss" in r]
    out: dict[str, Any] = {
        "steps": manifest.get("steps"), "train_loss": manifest.get("train_loss"),
        "label_noise": manifest.get("label_noise"), "loss": manifest.get("loss"),
        "start_from": manifest.get("start_from"),
        "last_logged": {k: steps[-1][k] for k in ("loss", "rewards/accuracies", "rewards/margins") if k in steps[-1]}
        if steps else None,
    }
    if "shapo" in manifest:
        s = manifest["shapo"]
        out["shapo"] = {
            "probe": s.get("probe"), "mask": {k: s["mask"][k] for k in ("n_selected", "per_layer", "sign", "fraction")},
            "sam": s.get("sam"),
            "eps_norm": _stats([r["shapo/eps_norm"] for r in steps if "shapo/eps_norm" in r]),
            "grad_norm_selected": _stats([r["shapo/grad_norm_selected"] for r in steps
                                          if "shapo/grad_norm_selected" in r]),
            "scale": _stats([r["shapo/scale"] for r in steps if "shapo/scale" in r]),
        }
    return out


def shapo_table(results: Path, arms: list[str], seeds: list[int]) -> str:
    """Probe accuracy, mask size and perturbation sizes of the ShaPO arms."""
    lines = ["| arm | seed | probe acc. train / held-out (n) | neurons | SAM steps | eps norm | grad norm on mask |",
             "|---|---|---|---|---|---|---|"]
    for arm in arms:
        for seed in seeds:
            path = results / f"{arm}-seed{seed}" / "train_diagnostics.json"
            if not path.exists() or "shapo" not in json.loads(path.read_text()):
                continue
            d = json.loads(path.read_text())["shapo"]
            pr, eps, g = d["probe"] or {}, d["eps_norm"] or {}, d["grad_norm_selected"] or {}
            held = pr.get("heldout_accuracy")
            probe = (f"{pr.get('train_accuracy', float('nan')):.2f} / "
                     f"{'—' if held is None else f'{held:.2f}'} ({pr.get('n_train')}+{pr.get('n_heldout')})"
                     if "train_accuracy" in pr else "reused")
            lines.append(f"| {arm} | {seed} | {probe} | {d['mask']['n_selected']} | {eps.get('n', 0)} | "
                         f"{eps.get('mean', float('nan')):.3g} | {g.get('mean', float('nan')):.3g} |")
    return "\n".join(lines)


def estimate_s(methods: list[str], noises: list[float], seeds: list[int], steps: int, batch: int, runs: Path,
               with_start: bool, probe_data: str = "train", probe_responses: int = 0,
               perturbations: Sequence[str] = ("sam",)) -> float:
    c = CALIBRATION
    cache = runs / "data" / "ref_logps.jsonl"
    cached = len(cache.read_text().splitlines()) // 2 if cache.exists() else 0
    total = max(0, len(seeds) * steps * batch - cached) * c["ref_pair_s"]
    for seed in seeds:
        if with_start and not (runs / f"start-seed{seed}" / "eval" / "metrics.json").exists():
            total += CALIBRATION["eval_s"]
        if probe_data == "all" and any("shapo" in m for m in methods) and \
                not (runs / f"probe-all-seed{seed}" / "probe.json").exists():
            total += probe_responses * c["probe_response_s"]
        for m, noise, pert in [(m, n, p) for p in perturbations for n in noises for m in methods
                               if "shapo" in m or p == perturbations[0]]:
            d = runs / f"{arm_name(m, noise, probe_data, pert)}-seed{seed}"
            if not is_complete(d):
                per = c["shapo_step_s"] if "shapo" in m else c["dpo_step_s"]
                own_probe = c["probe_s"] if "shapo" in m and probe_data == "train" else 0.0
                total += steps * per + c["overhead_s"] + own_probe
            if not (d / "eval" / "metrics.json").exists():
                total += CALIBRATION["eval_s"]
    return total


def run_win_rates(args: argparse.Namespace, runs: Path, heldout: Path, arms: list[str], seeds: list[int]) -> dict:
    from tactful.eval.http_client import ChatClient
    from winrate import win_rate

    client = ChatClient(args.judge_url, args.judge_model, api_key_env=args.judge_key_env)
    refs = {}
    for line in heldout.read_text().splitlines():
        row = json.loads(line)
        refs[row["id"]] = (row["prompt"], row["meta"]["reference"])
    out = {}
    for arm in arms:
        for seed in seeds:
            gen = runs / f"{arm}-seed{seed}" / "eval" / "pku-heldout" / "generations.jsonl"
            if not gen.exists():
                continue
            rows = [json.loads(x) for x in gen.read_text().splitlines()]
            items = [(refs[r["id"]][0], r["response"], refs[r["id"]][1]) for r in rows if r["id"] in refs]
            out[f"{arm}-seed{seed}"] = {**win_rate(client, items, seed=seed), "judge": args.judge_model}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="every arm (and the start's evaluation) once per seed; the seed also picks the flipped pairs")
    ap.add_argument("--arms", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to train")
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.3], help="fractions of flipped labels")
    ap.add_argument("--steps", type=int, default=32, help="optimizer steps for every arm (batch --batch pairs); the "
                                                          "training pairs are steps x batch, each seen once")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of every arm")
    ap.add_argument("--eval-n", type=int, default=48, help="items per out-of-distribution generative suite (seeded)")
    ap.add_argument("--pku-n", type=int, default=64, help="held-out PKU-SafeRLHF prompts evaluated")
    ap.add_argument("--mc-n", type=int, default=60, help="capability items (multiple choice)")
    ap.add_argument("--limit", type=int, default=None, help="cap items per suite, capability included (smoke)")
    ap.add_argument("--shapo-perturbation", nargs="+", default=["sam"], choices=["sam", "official"],
                    help="sam: eps = rho g/||g|| on the mask (default here, see README); official: gamma g. "
                         "Both: the ShaPO arms once with each (the others do not depend on it)")
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--start", default=None, help="start run (default: the safety-SFT run of the seed)")
    ap.add_argument("--no-start-eval", action="store_true", help="do not evaluate the start model")
    ap.add_argument("--runs", default=None, help="raw outputs (default runs/exp-shapo; --quick: runs/exp-shapo-quick)")
    ap.add_argument("--results", default=None, help="committed aggregates (default experiments/shapo/results)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 5 steps (one ShaPO SAM step), 4 items per suite, a 2-step SFT start, all "
                         "under runs/exp-shapo-quick")
    ap.add_argument("--probe-data", default="train", choices=["train", "all"],
                    help="train: each ShaPO arm fits its probe on its own training pairs (up to 128 responses); all: "
                         "one probe per seed on every labelled response of the training prompts, on the start model")
    ap.add_argument("--probe-measure", type=int, default=None, metavar="N",
                    help="fit the --probe-data all probe on a seeded subset of N responses for the first seed, record "
                         "its cost and held-out accuracy, print the estimated cost of the full fit, and stop")
    ap.add_argument("--judge-url", default=None, help="OpenAI-compatible endpoint for the win rate (optional)")
    ap.add_argument("--judge-model", default=None)
    ap.add_argument("--judge-key-env", default="OPENAI_API_KEY")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra recipe override for every arm")
    ap.add_argument("--summarise", action="store_true",
                    help="train and generate nothing: rebuild missing evaluation directories from the committed "
                         "replies (results/*/items.jsonl.gz, judged again) and rewrite the summary of --seeds")
    args = ap.parse_args()
    if args.judge_url and not args.judge_model:
        sys.exit("error: --judge-url needs --judge-model")
    if not PKU_FILE.exists():
        sys.exit(f"error: {PKU_FILE} not found: the PKU-SafeRLHF pairs live in ../shared/data")
    if args.quick:
        args.steps, args.limit = 5, args.limit or 4
    runs = Path(args.runs or ROOT / "runs" / ("exp-shapo-quick" if args.quick else "exp-shapo")).resolve()
    results = Path(args.results or (runs / "results" if args.quick else HERE / "results"))
    perts = list(dict.fromkeys(args.shapo_perturbation))

    import shapo_data

    data = shapo_data.prepare(PKU_FILE, runs / "data", n_train=args.steps * args.batch)
    pairs, heldout = runs / "data" / "train_pairs.jsonl", runs / "data" / "heldout_prompts.jsonl"
    suites = write_suites(runs, heldout, args.eval_n, args.pku_n, args.mc_n)
    check_public_suites(suites)
    results.mkdir(parents=True, exist_ok=True)
    (results / "split.json").write_text(json.dumps(data, indent=2) + "\n")
    probe_info = None
    if args.probe_data == "all" or args.probe_measure:
        probe_info = shapo_data.probe_pairs(PKU_FILE, runs / "data")
        (results / "probe_pairs.json").write_text(json.dumps(probe_info, indent=2) + "\n")

    def start_of(seed: int) -> Path:
        if args.start:
            return Path(args.start).resolve()
        if args.quick:
            return train("sft.yaml", runs / f"sft-start-seed{seed}", [f"seed={seed}", "training.max_steps=2"])
        return safety_sft_start(seed)

    if args.probe_measure:
        seed = args.seeds[0]
        info = fit_all_probe(start_of(seed), runs / "data" / "probe_pairs.jsonl",
                             runs / f"probe-measure{args.probe_measure}-seed{seed}", seed=seed, limit=args.probe_measure)
        full_cpu = info["cpu_s_per_response"] * probe_info["distinct_responses"]
        info = {**info, "estimate_full_fit": {
            "responses": probe_info["distinct_responses"], "cpu_s": round(full_cpu),
            "minutes_on_2_free_cores": round(full_cpu / TWO_CORE_SPEEDUP / 60, 1)}}
        (results / f"probe-measure-seed{seed}.json").write_text(json.dumps(info, indent=2) + "\n")
        print(f"probe on {info['n_responses']} responses: {info['cpu_s']} CPU s ({info['cpu_s_per_response']} per "
              f"response), held-out accuracy {info['heldout_accuracy']} (n={info['n_heldout']}); the full fit on "
              f"{probe_info['distinct_responses']} responses: ~{full_cpu / 60:.0f} CPU-min, "
              f"~{full_cpu / TWO_CORE_SPEEDUP / 60:.0f} min on 2 free cores")
        return

    # seeds evaluated on another machine (or before runs/ was cleaned) join from their committed replies
    for key in restore_evals(results, runs, [s for s in suites if s not in OUTCOME_SUITES]):
        arm, seed = split_key(key)
        adopt_restored(runs / key / "eval", results / key, arm=arm, seed=seed)

    # (method, noise, perturbation) per arm: the DPO-family arms once, the ShaPO arms once per perturbation
    plan = [(m, n, p) for p in perts for n in args.noise for m in args.arms if "shapo" in m or p == perts[0]]
    if not args.summarise:
        est = estimate_s(args.arms, args.noise, args.seeds, args.steps, args.batch, runs, not args.no_start_eval,
                         args.probe_data, probe_info["distinct_responses"] if probe_info else 0, perts)
        print(f"{len(plan) * len(args.seeds)} arms, {args.steps} steps x batch {args.batch}; "
              f"estimated time on 2 free cores: {est / 60:.0f} min (threads: {os.environ.get('OMP_NUM_THREADS', 'all')})")

    timings_path = results / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    arms = [arm_name(m, n, args.probe_data, p) for m, n, p in plan]
    for seed in ([] if args.summarise else args.seeds):
        start = start_of(seed)
        if not args.no_start_eval:
            t0 = time.time()
            ev = evaluate(start, suites, runs / f"start-seed{seed}" / "eval", seed=seed, limit=args.limit)
            copy_aggregates(ev, results / f"start-seed{seed}", start)
            save_item_outputs(ev, results / f"start-seed{seed}", arm="start", seed=seed)
            timings.setdefault(f"start-seed{seed}", {"eval_s": round(time.time() - t0, 1)})
        probe_file = None
        if args.probe_data == "all" and any("shapo" in m for m in args.arms):
            t0 = time.time()
            out = runs / f"probe-all-seed{seed}"
            info = fit_all_probe(start, runs / "data" / "probe_pairs.jsonl", out, seed=seed)
            (results / f"probe-all-seed{seed}.json").write_text(json.dumps(info, indent=2) + "\n")
            timings.setdefault(f"probe-all-seed{seed}", {"fit_s": round(time.time() - t0, 1)})
            print(f"probe on {info['n_responses']} responses: held-out accuracy {info['heldout_accuracy']} "
                  f"(n={info['n_heldout']})")
            probe_file = out / "shapo_probe.safetensors"
        for method, noise, pert in plan:
            shapo = [f"shapo.perturbation={pert}", f"shapo.rho={args.rho}"]
            name = f"{arm_name(method, noise, args.probe_data, pert)}-seed{seed}"
            t0 = time.time()
            done = is_complete(runs / name)
            run_dir = train_arm(method, noise, seed, start=start, pairs=pairs, runs=runs, steps=args.steps,
                                batch=args.batch, shapo=shapo, probe_file=probe_file,
                                extra=[f"training.learning_rate={args.lr}", *args.extra])
            t1 = time.time()
            had_eval = (run_dir / "eval" / "metrics.json").exists()
            ev = evaluate(run_dir, suites, run_dir / "eval", seed=seed, limit=args.limit)
            t2 = time.time()
            copy_aggregates(ev, results / name, run_dir)
            save_item_outputs(ev, results / name, arm=arm_name(method, noise, args.probe_data, pert), seed=seed)
            (results / name / "train_diagnostics.json").write_text(json.dumps(diagnostics(run_dir), indent=2))
            entry = timings.get(name, {})
            if not done:
                entry["train_s"] = round(t1 - t0, 1)
            if not had_eval:
                entry["eval_s"] = round(t2 - t1, 1)
            timings[name] = entry
            timings_path.write_text(json.dumps(timings, indent=2) + "\n")
            print(f"{name}: {entry}")

    win = {}
    if args.judge_url:
        win = run_win_rates(args, runs, heldout, arms, args.seeds)
        (results / "winrate.json").write_text(json.dumps(win, indent=2) + "\n")

    header = [
        "# ShaPO experiment: results", "",
        f"Start: the safety-SFT run of each seed. Data: {data['train_pairs']} PKU-SafeRLHF safety pairs "
        f"(one per prompt) for training; {data['prompts']['heldout']} held-out prompts. "
        f"{args.steps} steps x batch {args.batch}, LoRA r16, beta 0.1, lr {args.lr:g} for every arm. "
        "ShaPO perturbation: " + " and ".join(f"{p} (rho {args.rho})" if p == "sam" else f"{p} (gamma, arms *-gamma-*)"
                                               for p in perts) + ". Judge: outcome-minilm "
        f"(gold test accuracy: {gold_accuracy(results)}).",
        "ShaPO probe: " + ("one per seed on every labelled response of the training prompts, on the start model "
                           "(results/probe-all-seed<N>.json)" if args.probe_data == "all" else
                           "each arm's own, on up to 128 responses of its training pairs") + ".",
        "Per-item outputs: <arm>-seed<N>/items.jsonl.gz.",
        "", "Cells: value [95% bootstrap CI] for one seed, mean ± sd over seeds.",
    ]
    labels = ["start", *arms] if not args.no_start_eval else arms
    table = summarise(results, labels, SUITE_ORDER, args.seeds)
    # every ShaPO arm against its matched baseline (same loss without ShaPO), at each noise level
    pairs_to_compare = [(arm_name(m, n, args.probe_data, p), arm_name(base, n))
                        for p in perts for n in args.noise for m, base in MATCHED_BASELINE.items()]
    # what the flipped labels cost plain DPO: the gap a noise-robust method has to close
    pairs_to_compare += [(arm_name("dpo", n), arm_name("dpo", 0.0)) for n in args.noise if n > 0 and 0.0 in args.noise]
    comparisons = [c for a, b in pairs_to_compare
                   if (c := seed_comparison(runs, a, b, seeds_present(runs, [a, b]), rows=[*PKU_ROWS, *OUTCOME_ROWS]))]
    atomic_write_json(results / "comparisons.json", comparisons)
    body = ["\n".join(header), table, "## Claim: at 30% noise ShaPO keeps the model safer than DPO",
            "Paired differences in points (arm − its matched baseline on the same held-out items, seed by seed, "
            "pooled over the seeds both ran), bootstrap 95% CI over items; `n≈`: items per seed at which the "
            "interval would stop covering zero if the difference stayed as measured.",
            *[comparison_markdown(c) for c in comparisons],
            "## ShaPO diagnostics", shapo_table(results, arms, args.seeds)]
    body.append("## Win rate vs the dataset's safe answer")
    if win:
        body.append("| arm | win rate [95% CI] | n | judge errors |\n|---|---|---|---|\n" + "\n".join(
            f"| {k} | {100 * v['value']:.1f}% [{100 * v['ci_low']:.1f}, {100 * v['ci_high']:.1f}] | {v['n']} | "
            f"{v['judge_errors']} |" for k, v in win.items() if v.get("value") is not None))
    else:
        body.append("Not run: no judge endpoint was configured (--judge-url).")
    from tactful.io import atomic_write_text

    atomic_write_text(results / "summary.md", "\n\n".join(body) + "\n")
    print(f"wrote {results / 'summary.md'}")


if __name__ == "__main__":
    main()
