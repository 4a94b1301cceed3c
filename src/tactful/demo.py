"""`tactful demo`: the main job, on the embedded model, offline, in minutes on 2 CPU cores.

1. evaluate the embedded model (SmolLM2-135M-Instruct) on the built-in held-out test splits;
2. align it with DCR + safety SFT on the built-in train splits (recipes/dcr.yaml, with a
   demo-sized budget);
3. evaluate the aligned model on the same test prompts and print the before/after safety
   card (safety, over-refusal, capability; each with n and a 95% CI) and the frontier plot.

Every step writes a run directory under --out and resumes if interrupted.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from tactful.eval.report import fmt_metric, over_refusal  # the same numbers as `tactful compare`

DEMO_SUITES = ("safety", "over-refusal", "capability")

# A demo-sized budget: the full recipes/dcr.yaml trains for an epoch; the demo trains for
# fewer steps so the whole job stays within ~10 minutes on two CPU cores.
DEMO_OVERRIDES = [
    "stage1.training.num_train_epochs=1",
    "stage1.gradient_coupling=false",
    "sft.training.max_steps=40",
    "sft.training.max_length=192",
    "sft.training.save_steps=10",
]


ROWS = (
    ("safety", "safety: harmful prompts refused", lambda r: r),
    ("over-refusal", "over-refusal: benign prompts refused", over_refusal),
    ("capability", "capability: multiple-choice accuracy", lambda r: r),
)


def safety_card(metrics: dict[str, Any], title: str, after: dict[str, Any] | None = None) -> str:
    s = metrics.get("suites", {})
    lines = [f"== {title} =="]
    header = f"  {'':40s} {'before' if after else '':28s} {'after' if after else ''}"
    if after:
        lines.append(header)
    for key, label, fn in ROWS:
        if key not in s:
            continue
        cell = fmt_metric({**fn(s[key]), "metric": "safe_rate"})
        line = f"  {label:40s} {cell:28s}"
        if after and key in after.get("suites", {}):
            line += f" {fmt_metric({**fn(after['suites'][key]), 'metric': 'safe_rate'})}"
        lines.append(line + f"  n={s[key]['n']}")
    judge = s.get("safety", {}).get("judge")
    lines.append(f"  judge: {judge}; data: tactful built-in test splits (never trained on); seed 0")
    return "\n".join(lines)


def run_demo(out: str = "runs/demo", limit: int | None = None, align: bool = True,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    from tactful.eval.report import compare
    from tactful.eval.runner import EvalConfig, evaluate
    from tactful.methods.registry import train_recipe
    from tactful.progress import progress_factory
    from tactful.recipes import recipe_path

    root = Path(out)
    t0 = time.time()
    with progress_factory() as pf:
        before = evaluate(EvalConfig(model="embedded", suites=list(DEMO_SUITES), out=str(root / "base-eval"),
                                     limit=limit), progress=pf)
    log(safety_card(before, "embedded model (SmolLM2-135M-Instruct) before alignment"))
    if not align:
        return {"before": before}
    log(f"\naligning with DCR + safety SFT ({recipe_path('dcr')}) ...")
    run = train_recipe(str(recipe_path("dcr")), [f"output_dir={root / 'dcr'}", *DEMO_OVERRIDES], log=log)
    with progress_factory() as pf:
        after = evaluate(EvalConfig(run=str(run.path), suites=list(DEMO_SUITES), out=str(root / "dcr-eval"),
                                    limit=limit), progress=pf)
    res = compare([str(root / "base-eval"), str(root / "dcr-eval")], labels=["base", "DCR + SFT"],
                  out=str(root / "compare"))
    log("")
    log(safety_card(before, "embedded model: before vs after DCR + SFT", after=after))
    for p in res["plots"]:
        log(f"plot: {p}")
    log(f"runs: {root}  (total {time.time() - t0:.0f} s)")
    return {"before": before, "after": after}
