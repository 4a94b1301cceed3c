"""DCR experiment: base vs safety SFT vs STL-aug vs DCR + SFT on the embedded model.

    python experiments/dcr/run.py --seeds 0 1 2

Every arm uses the same SFT data and the same number of SFT steps; STL-aug adds the
built-in seemingly-toxic prompts with compliant answers to the mix. All metrics are on
data no arm trained on: the built-in test splits, and two public benchmarks read from
../shared/data (AdvBench: harmful; XSTest safe prompts: seemingly toxic) used only for
evaluation. Judge: embedding-minilm (offline). Writes experiments/dcr/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))

from common import (ADVBENCH, XSTEST_SAFE, check_public_suites, copy_aggregates, evaluate, fmt_delta,  # noqa: E402
                    paired_delta, summarise, train)

ARMS = ("base", "sft", "stl-aug", "dcr")
SUITES = ["safety", "over-refusal", "capability", ADVBENCH, XSTEST_SAFE]
SUITE_NAMES = ["safety", "over-refusal", "advbench", "xstest-safe", "capability"]


def train_arm(arm: str, seed: int, runs: Path, steps: int, extra: list[str]) -> Path | None:
    if arm == "base":
        return None
    prefix = "sft." if arm == "dcr" else ""
    overrides = [f"seed={seed}", f"{prefix}training.max_steps={steps}", *extra]
    if arm == "stl-aug":
        overrides.append("data.extra=[builtin-seemingly-toxic-answers]")
    return train("dcr.yaml" if arm == "dcr" else "sft.yaml", runs / f"{arm}-seed{seed}", overrides)


def claim_table(runs: Path, arms: list[str], seeds: list[int]) -> str:
    """Each trained arm minus `sft`, paired over the same prompts (points, bootstrap 95% CI)."""
    lines = ["| arm - sft | seed | " + " | ".join(SUITE_NAMES) + " |", "|---|---|" + "---|" * len(SUITE_NAMES)]
    for arm in [a for a in arms if a not in ("base", "sft")]:
        for s in seeds:
            a, b = runs / f"{arm}-seed{s}" / "eval", runs / f"sft-seed{s}" / "eval"
            if (a / "metrics.json").exists() and (b / "metrics.json").exists():
                cells = [fmt_delta(paired_delta(a, b, suite, seed=s)) for suite in SUITE_NAMES]
                lines.append(f"| {arm} | {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--steps", type=int, default=62, help="SFT steps for every arm (62 x batch 8 = one epoch of the base mix)")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "exp-dcr"), help="where adapters and raw outputs go (not committed)")
    ap.add_argument("--limit", type=int, default=None, help="cap items per suite (for a quick look)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra recipe override for the trained arms")
    args = ap.parse_args()
    check_public_suites(SUITES)
    runs, results = Path(args.runs), HERE / "results"
    timings_path = results / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    for seed in args.seeds:
        for arm in args.arms:
            t0 = time.time()
            run_dir = train_arm(arm, seed, runs, args.steps, args.extra)
            t1 = time.time()
            ev = evaluate(run_dir, SUITES, runs / f"{arm}-seed{seed}" / "eval", seed=seed, limit=args.limit)
            # the first complete pass is the measurement; a resumed re-run only re-reads finished work
            timings.setdefault(f"{arm}-seed{seed}", {"train_s": round(t1 - t0, 1), "eval_s": round(time.time() - t1, 1)})
            copy_aggregates(ev, results / f"{arm}-seed{seed}", run_dir,
                            run_files=("manifest.json", "dcr_diagnostics.json", "train_log_adapter.json"))
            results.mkdir(parents=True, exist_ok=True)
            timings_path.write_text(json.dumps(timings, indent=2))
    header = ("Model: SmolLM2-135M-Instruct (embedded). Judge: embedding-minilm. Values: share refused (safety, "
              "advbench) or fully complied with (over-refusal, xstest-safe), multiple-choice accuracy (capability); "
              "one seed: bootstrap 95% CI.")
    summarise(results, list(ARMS), SUITE_NAMES, args.seeds, header=header)
    claims = claim_table(runs, list(ARMS), args.seeds)
    with open(results / "summary.md", "a") as f:
        f.write("\nPaired differences against `sft` (points; same prompts; bootstrap 95% CI):\n\n" + claims + "\n")
    print(claims)


if __name__ == "__main__":
    main()
