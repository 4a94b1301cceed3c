"""`tactful demo`: the main job, on the embedded model, offline, in minutes on 2 CPU cores.

1. evaluate the embedded model (SmolLM2-135M-Instruct) on the built-in held-out test splits;
2. align it with DCR + safety SFT on the built-in train splits (recipes/dcr.yaml, with a
   demo-sized budget);
3. evaluate the aligned model on the same test prompts and print the before/after card of
   what the replies did (harmful: declined, off-topic filler, uplift, degenerate; seemingly
   toxic and ordinary prompts: refused, helped, degenerate; capability; each with n and a 95% CI,
   and the judge's measured accuracy) and the frontier plot.

Every step writes a run directory under --out and resumes if interrupted.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any, Callable

from tactful.eval.report import over_refusal  # the same numbers as `tactful compare`

DEMO_SUITES = ("safety", "over-refusal", "benign", "capability")

# A demo-sized budget: the full recipes/dcr.yaml trains for an epoch; the demo trains for
# fewer steps so the whole job stays within ~10 minutes on two CPU cores.
DEMO_OVERRIDES = [
    "stage1.training.num_train_epochs=1",
    "stage1.gradient_coupling=false",
    "sft.training.max_steps=40",
    "sft.training.max_length=192",
    "sft.training.save_steps=10",
]


# (suite, outcome or None for the suite's headline, row label, transform)
ROWS = (
    ("safety", "declined", "harmful prompts declined", None),
    ("safety", "evasive", "harmful prompts: off-topic filler", None),
    ("safety", "uplift", "harmful prompts: harmful uplift", None),
    ("safety", "degenerate", "harmful prompts: degenerate replies", None),
    ("over-refusal", "refused", "seemingly-toxic prompts refused", None),
    ("over-refusal", "helpful", "seemingly-toxic prompts helped", None),
    ("over-refusal", "degenerate", "seemingly-toxic: degenerate replies", None),
    ("benign", "refused", "ordinary prompts refused", None),
    ("benign", "helpful", "ordinary prompts helped", None),
    ("benign", "degenerate", "ordinary prompts: degenerate replies", None),
    ("safety", None, "harmful prompts refused", lambda r: r),  # judges without outcomes
    ("over-refusal", None, "benign prompts refused", over_refusal),
    ("capability", None, "capability: multiple-choice accuracy", lambda r: r),
)


def _cell(suites: dict[str, Any], key: str, outcome: str | None, fn: Any) -> tuple[str, int | None] | None:
    from tactful.eval.report import fmt_rate

    res = suites.get(key)
    if not res:
        return None
    if outcome is not None:
        est = (res.get("outcomes") or {}).get(outcome)
        return (fmt_rate(est), est.get("n")) if est else None
    if res.get("outcomes"):  # the outcome rows above already say it
        return None
    return fmt_rate(fn(res)), res.get("n")


def safety_card(metrics: dict[str, Any], title: str, after: dict[str, Any] | None = None) -> str:
    """The before / after card (fits 100 columns): what the replies did, with 95% CIs and n."""
    from tactful.eval.report import judge_line

    s = metrics.get("suites", {})
    lines = [f"== {title} =="]
    if after:
        lines.append(f"  {'':38s} {'before':24s} {'after':24s}")
    for key, outcome, label, fn in ROWS:
        cell = _cell(s, key, outcome, fn)
        if cell is None:
            continue
        line = f"  {label:38s} {cell[0]:24s}"
        if after:
            other = _cell(after.get("suites", {}), key, outcome, fn)
            line += f" {other[0] if other else '—':24s}"
        lines.append(line + f" n={cell[1]}")
    if "safety" in s:
        lines.append(textwrap.fill(judge_line(s["safety"]), width=98, initial_indent="  ", subsequent_indent="    "))
    lines.append("  data: tactful built-in test splits (never trained on); seed 0; 95% bootstrap intervals")
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
