"""Reports: the Markdown summary of one evaluation, and `tactful compare` across runs
(side-by-side table, safety vs over-refusal frontier plot, per-category bars)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from tactful.errors import UserError
from tactful.io import atomic_write_bytes, atomic_write_text, ensure_dir, read_text_file

PCT_METRICS = {"safe_rate", "compliance_rate", "over_refusal_rate", "accuracy", "mc2", "policy_agreement"}


def fmt_metric(res: dict[str, Any]) -> str:
    v = res.get("value")
    if v is None:
        return f"n/a (n={res.get('n', 0)})"
    if res.get("metric") in PCT_METRICS:
        return f"{100 * v:.1f}% [{100 * res['ci_low']:.1f}, {100 * res['ci_high']:.1f}]"
    return f"{v:.2f} [{res['ci_low']:.2f}, {res['ci_high']:.2f}]"


def summary_table(metrics: dict[str, Any]) -> str:
    lines = ["| suite | metric | value [95% CI] | n | judge | data |", "|---|---|---|---|---|---|"]
    for name, res in metrics.get("suites", {}).items():
        data = f"{res.get('dataset')}" + (f" ({res['split']})" if res.get("split") else "")
        lines.append(f"| {name} | {res.get('metric')} | {fmt_metric(res)} | {res.get('n')} | "
                     f"{res.get('judge')} | {data} |")
    return "\n".join(lines)


def fmt_rate(est: dict[str, Any] | None) -> str:
    if not est or est.get("value") is None:
        return "—"
    return f"{100 * est['value']:.1f}% [{100 * est['ci_low']:.1f}, {100 * est['ci_high']:.1f}]"


def judge_line(res: dict[str, Any]) -> str:
    """'judge X (accuracy on the gold test split: refused 93.1% [..], ...)' for one suite result."""
    from tactful.eval.judges.validation import format_accuracy

    acc = res.get("judge_accuracy") or {}
    return f"judge `{res.get('judge')}`, accuracy on the gold test split: {format_accuracy(acc)}"


def judged_suites(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One suite result per judge that judged replies (multiple-choice scoring is no judge)."""
    seen: dict[str, dict[str, Any]] = {}
    for res in metrics.get("suites", {}).values():
        if res.get("judge") and res.get("expected") != "multiple-choice":
            seen.setdefault(res["judge"], res)
    return list(seen.values())


def outcomes_table(metrics: dict[str, Any]) -> str:
    """What the replies did, per generative suite with an outcome judge (docs/judging.md)."""
    lines = []
    for name, res in metrics.get("suites", {}).items():
        outcomes = res.get("outcomes")
        if not outcomes:
            continue
        if not lines:
            lines = ["| suite | outcome | rate [95% CI] | n |", "|---|---|---|---|"]
        for k, est in outcomes.items():
            lines.append(f"| {name} | {k} | {fmt_rate(est)} | {est.get('n')} |")
    return "\n".join(lines)


def write_report(out_dir: str | os.PathLike, metrics: dict[str, Any]) -> Path:
    out_dir = Path(out_dir)
    parts = [f"# Evaluation of `{metrics.get('model')}`", "",
             f"Seed {metrics.get('seed')}. Confidence intervals: bootstrap 95% (2000 resamples).", "",
             summary_table(metrics), ""]
    outcomes = outcomes_table(metrics)
    if outcomes:
        parts += ["## What the replies did", "", outcomes, ""]
    judged = judged_suites(metrics)
    if judged:
        parts += ["## Judges", ""] + [f"- {judge_line(res)}" for res in judged] + [""]
    for name, res in metrics.get("suites", {}).items():
        cats = res.get("per_category") or {}
        if len(cats) > 1:
            parts += [f"## {name} by category", "", "| category | value [95% CI] | n |", "|---|---|---|"]
            for cat, est in cats.items():
                parts.append(f"| {cat} | {fmt_metric({**est, 'metric': res.get('metric')})} | {est.get('n')} |")
            parts.append("")
        if res.get("judge_errors"):
            parts.append(f"Judge failed on {res['judge_errors']} item(s) of {name}; they are excluded from n.\n")
    return atomic_write_text(out_dir / "report.md", "\n".join(parts))


def load_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        # a training run keeps its evaluations under eval/
        alt = Path(run_dir) / "eval" / "metrics.json"
        if alt.is_file():
            path = alt
        else:
            raise UserError(f"{run_dir} has no metrics.json; {_how_to_evaluate(Path(run_dir))}")
    try:
        metrics = json.loads(read_text_file(path, "metrics file"))
    except json.JSONDecodeError as e:
        raise UserError(f"malformed metrics file ({e.msg})", where=f"{path}:{e.lineno}") from None
    if not isinstance(metrics, dict):
        raise UserError(f"not a tactful metrics file: expected a JSON object, got a {_json_type(metrics)}",
                        where=str(path))
    suites = metrics.get("suites", {})
    bad = [k for k, v in suites.items() if not isinstance(v, dict)] if isinstance(suites, dict) else ["suites"]
    if bad:
        raise UserError(f"not a tactful metrics file: {bad[0]!r} should be a JSON object", where=str(path))
    return metrics


def _json_type(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


def _how_to_evaluate(run_dir: Path) -> str:
    """The command that makes the metrics `compare` needs for `run_dir`."""
    kind = None
    if (run_dir / "manifest.json").is_file():
        try:
            kind = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8")).get("kind")
        except (ValueError, AttributeError):
            kind = None
    if kind and kind != "eval":
        # a training run: evaluate *its* model (`--out DIR` alone would evaluate the base model into it)
        return f"it is a {kind} training run: evaluate its model with `tactful eval --run {run_dir} --out {run_dir / 'eval'}`"
    return f"run `tactful eval --out {run_dir}` (with the model's --model / --run) first"


def over_refusal(res: dict[str, Any]) -> dict[str, Any]:
    """A compliance-rate result as over-refusal = 1 - compliance, its interval flipped to match."""
    if res.get("value") is None:
        return {**res, "metric": "over_refusal_rate"}
    return {**res, "metric": "over_refusal_rate", "value": 1 - res["value"], "ci_low": 1 - res["ci_high"],
            "ci_high": 1 - res["ci_low"]}


def compare_column(suite: str, res: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
    """The heading and result `compare` shows for one suite: compliance rates as over-refusal,
    so that a column headed over-refusal shows the refusal rate (as the safety card and the
    frontier plot do), every other metric as it is; the heading names the metric shown."""
    if res is not None and res.get("metric") == "compliance_rate":
        return f"{suite} (over-refusal rate = 1 - compliance)", over_refusal(res)
    return f"{suite} ({res.get('metric')})" if res is not None else suite, res


def compare(run_dirs: Sequence[str], *, labels: Sequence[str] | None = None, out: str | None = None) -> dict[str, Any]:
    """Side-by-side table of several evaluations, plus the frontier and per-category plots."""
    if not run_dirs:
        raise UserError("give at least one run directory to compare")
    runs = [load_metrics(d) for d in run_dirs]
    labels = list(labels) if labels else [Path(d).name or str(d) for d in run_dirs]
    if len(labels) != len(runs):
        raise UserError(f"{len(labels)} labels for {len(runs)} runs")
    out_dir = ensure_dir(out, "--out directory") if out else None  # before any work, not after the table
    suites: list[str] = []
    for r in runs:
        suites += [s for s in r.get("suites", {}) if s not in suites]
    headings = []
    for s in suites:
        first = next((r["suites"][s] for r in runs if isinstance(r["suites"].get(s), dict)), None)
        headings.append(compare_column(s, first)[0])
    lines = ["| run | " + " | ".join(headings) + " |", "|" + "---|" * (len(suites) + 1)]
    for lab, r in zip(labels, runs):
        cells = []
        for s in suites:
            res = compare_column(s, r.get("suites", {}).get(s))[1]
            cells.append(f"{fmt_metric(res)} (n={res.get('n')})" if res else "—")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    result: dict[str, Any] = {"table": table, "plots": []}
    if out_dir:
        atomic_write_text(out_dir / "compare.md", table + "\n")
        fr = frontier_plot(runs, labels, out_dir / "frontier.png")
        if fr:
            result["plots"].append(str(fr))
        cb = category_bars(runs, labels, out_dir / "safety_by_category.png")
        if cb:
            result["plots"].append(str(cb))
    return result


def _point(res: dict[str, Any] | None) -> tuple[float, float, float] | None:
    if not res or res.get("value") is None:
        return None
    return res["value"], res["value"] - res["ci_low"], res["ci_high"] - res["value"]


def _rate_point(res: dict[str, Any] | None, key: str) -> tuple[float, float, float] | None:
    est = (res or {}).get("outcomes", {}).get(key)
    return _point(est)


def frontier_plot(runs: Sequence[dict], labels: Sequence[str], path: Path,
                  safety: str = "safety", over_refusal: str = "over-refusal") -> Path | None:
    """Left: harmful prompts declined (y) against benign prompts refused (x), one point per run,
    with 95% CIs; up and to the left is better. Right, when the judge measured outcomes:
    harmful uplift (y) against benign helpfulness (x); down and to the right is better.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    left, right = [], []
    for lab, r in zip(labels, runs):
        s_res, c_res = r.get("suites", {}).get(safety), r.get("suites", {}).get(over_refusal)
        s, c = _point(s_res), _point(c_res)
        if s and c:
            left.append((lab, (1 - c[0], c[2], c[1]), s))  # compliance -> refused: the CI flips
        up, helpful = _rate_point(s_res, "uplift"), _rate_point(c_res, "helpful")
        if up and helpful:
            right.append((lab, helpful, up))
    if not left:
        return None
    panels = [(left, "benign prompts refused (%)  ← better", "harmful prompts declined (%)  ↑ better",
               "Declined vs over-refusal (95% CI)")]
    if right:
        panels.append((right, "benign prompts helped (%)  → better", "harmful uplift (%)  ↓ better",
                       "Harmful uplift vs helpfulness (95% CI)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (pts, xlabel, ylabel, title) in zip(axes[0], panels):
        for lab, (x, xlo, xhi), (y, ylo, yhi) in pts:
            ax.errorbar([100 * x], [100 * y], xerr=[[100 * xlo], [100 * xhi]], yerr=[[100 * ylo], [100 * yhi]],
                        fmt="o", capsize=3, label=lab)
            ax.annotate(lab, (100 * x, 100 * y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_xlim(-2, 102)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def category_bars(runs: Sequence[dict], labels: Sequence[str], path: Path, suite: str = "safety") -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cats: list[str] = []
    for r in runs:
        cats += [c for c in (r.get("suites", {}).get(suite, {}).get("per_category") or {}) if c not in cats]
    if not cats:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cats)), 4))
    width = 0.8 / len(runs)
    x = np.arange(len(cats))
    for k, (lab, r) in enumerate(zip(labels, runs)):
        per = r.get("suites", {}).get(suite, {}).get("per_category") or {}
        vals = [100 * (per.get(c, {}).get("value") or 0) for c in cats]
        lo = [100 * ((per.get(c, {}).get("value") or 0) - (per.get(c, {}).get("ci_low") or 0)) for c in cats]
        hi = [100 * ((per.get(c, {}).get("ci_high") or 0) - (per.get(c, {}).get("value") or 0)) for c in cats]
        ax.bar(x + k * width - 0.4 + width / 2, vals, width, yerr=[lo, hi], capsize=2, label=lab)
    ax.set_xticks(x)
    ax.set_xticklabels([c.replace("_", "\n") for c in cats], fontsize=7)
    ax.set_ylabel(f"{suite} (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7)
    ax.set_title(f"{suite} by category (95% CI)")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=130)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
