"""How good is each offline judge? Measured on the gold test split (real replies labelled by
careful reading, docs/judging.md) and recorded in judge_heads/gold_accuracy.json, which every
report reads to print the judge's accuracy next to its numbers.

    tactful judges --validate        # re-measure and rewrite the record
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from tactful.data import gold
from tactful.eval.judges.base import JudgeItem, wilson_interval

OFFLINE_JUDGES = ("outcome-minilm", "embedding-minilm", "string-xstest", "string-gcg")
# refused-vs-not first: every judge is measured on it; outcome judges on every field they give
FIELDS = ("refused", "uplift", "uplift_recall", "helpful", "degenerate", "outcome_harmful", "outcome_benign")


def record_path() -> Path:
    return Path(__file__).resolve().parent.parent / "judge_heads" / "gold_accuracy.json"


def measured_accuracy(name: str) -> dict[str, Any]:
    """The recorded accuracy of judge `name` on the gold test split ({} if never measured)."""
    path = record_path()
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get("judges", {}).get(name, {})


def accuracy_record(pred: Sequence[bool], truth: Sequence[bool]) -> dict[str, Any]:
    """{n, accuracy, ci95 (Wilson)} of predictions against the truth; no number when n is 0."""
    n = len(truth)
    k = sum(bool(p) == bool(t) for p, t in zip(pred, truth))
    if not n:  # nothing of this kind in the split: no number rather than a NaN
        return {"n": 0, "accuracy": None, "ci95": None}
    lo, hi = wilson_interval(k, n)
    return {"n": n, "accuracy": round(k / n, 4), "ci95": [round(lo, 4), round(hi, 4)]}


def measure(judge: Any, rows: Sequence[dict]) -> dict[str, Any]:
    """Accuracy of one judge per field on gold rows (errors count as wrong)."""
    items = [JudgeItem(prompt=r["prompt"], response=r["response"], meta={"prompt_type": r["prompt_type"]})
             for r in rows]
    t0 = time.time()
    verdicts = judge.judge(items)
    seconds = time.time() - t0
    harm = [i for i, r in enumerate(rows) if gold.is_harmful(r["prompt_type"])]
    ben = [i for i, r in enumerate(rows) if not gold.is_harmful(r["prompt_type"])]
    out: dict[str, Any] = {"refused": accuracy_record([v.error is None and bool(v.refused) == gold.refused(r)
                                           for v, r in zip(verdicts, rows)], [True] * len(rows))}
    if any(v.degenerate is not None for v in verdicts):
        out["uplift"] = accuracy_record([bool(verdicts[i].uplift) for i in harm], [bool(rows[i]["uplift"]) for i in harm])
        # uplift is rare: say how much of it the judge finds and how often it is right when it says so
        out["uplift_recall"] = accuracy_record([bool(verdicts[i].uplift) for i in harm if rows[i]["uplift"]],
                                    [True for i in harm if rows[i]["uplift"]])
        out["uplift_precision"] = accuracy_record([bool(rows[i]["uplift"]) for i in harm if verdicts[i].uplift],
                                       [True for i in harm if verdicts[i].uplift])
        out["helpful"] = accuracy_record([bool(verdicts[i].helpful) for i in ben], [gold.helpful(rows[i]) for i in ben])
        out["degenerate"] = accuracy_record([bool(v.degenerate) for v in verdicts], [bool(r["degenerate"]) for r in rows])
        out["outcome_harmful"] = accuracy_record([verdicts[i].label == rows[i]["outcome"] for i in harm], [True] * len(harm))
        out["outcome_benign"] = accuracy_record([verdicts[i].label == rows[i]["outcome"] for i in ben], [True] * len(ben))
    out["seconds_per_1000"] = round(1000 * seconds / max(1, len(rows)), 1)
    return out


def validate(names: Sequence[str] = OFFLINE_JUDGES, *, write: bool = True,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure `names` on the gold test split; rewrite the record (atomically) when `write`."""
    from tactful.eval.judges.base import get_judge
    from tactful.io import atomic_write_json

    rows = gold.load_gold(split="test")
    record = {"gold_test_items": len(rows), "judges": {}}
    for name in names:
        log(f"measuring {name} on {len(rows)} gold test items ...")
        record["judges"][name] = measure(get_judge(name), rows)
    if write:
        atomic_write_json(record_path(), record)
    return record


def format_accuracy(acc: dict[str, Any], fields: Sequence[str] = ("refused", "uplift", "helpful", "degenerate")) -> str:
    """'refused 93.1% [90.2, 95.3], uplift ...' for the fields a judge was measured on."""
    parts = []
    for f in fields:
        r = acc.get(f)
        if r and r.get("accuracy") is not None:
            parts.append(f"{f} {100 * r['accuracy']:.1f}% [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]")
    return ", ".join(parts) if parts else "not measured on the gold set"


def format_table(record: dict[str, Any]) -> str:
    """Markdown: judges x fields, accuracy on the gold test split with 95% intervals."""
    head = "| judge | " + " | ".join(FIELDS) + " | s / 1000 replies |"
    lines = [head, "|---|" + "---|" * (len(FIELDS) + 1)]
    for name, acc in record["judges"].items():
        cells = []
        for f in FIELDS:
            r = acc.get(f)
            cells.append(f"{100 * r['accuracy']:.1f} [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}] (n={r['n']})"
                         if r else "—")
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {acc.get('seconds_per_1000', '—')} |")
    return "\n".join(lines)
