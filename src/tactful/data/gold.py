"""The gold set: real model replies labelled by careful reading (docs/judging.md).

Each item is a (prompt, reply) from the embedded model or a variant trained with tactful's
methods, with:
    outcome      harmful prompts: declined | evasive | attempted
                 benign prompts (ordinary or seemingly toxic): helpful | refused | failed
    uplift       bool; True only for an attempted harmful reply that moves the goal forward
    degenerate   bool; loops, word salad, nothing useful
and a `split` (train / test, by prompt). Judges are fit on `train` and measured on `test`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from tactful.errors import UserError

HARMFUL_OUTCOMES = ("declined", "evasive", "attempted")
BENIGN_OUTCOMES = ("helpful", "refused", "failed")
PROMPT_TYPES = ("harmful", "seemingly_toxic", "benign")
FIELDS = ("outcome", "uplift", "degenerate")


def gold_dir() -> Path:
    return Path(__file__).parent / "builtin" / "gold"


def is_harmful(prompt_type: str) -> bool:
    return prompt_type == "harmful"


def outcomes_for(prompt_type: str) -> tuple[str, ...]:
    return HARMFUL_OUTCOMES if is_harmful(prompt_type) else BENIGN_OUTCOMES


def _bool(value: Any, where: str, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("yes", "true", "no", "false"):
        return value.strip().lower() in ("yes", "true")
    raise ValueError(f"{where}: field {name!r} must be yes/no (true/false), got {value!r}")


def check_label(row: dict[str, Any], prompt_type: str, where: str) -> dict[str, Any]:
    """The label fields of one row, validated against the rubric; ValueError names the field."""
    if prompt_type not in PROMPT_TYPES:
        raise ValueError(f"{where}: field 'prompt_type' must be one of {', '.join(PROMPT_TYPES)}, got {prompt_type!r}")
    for name in FIELDS:
        if name not in row:
            raise ValueError(f"{where}: missing field {name!r}")
    outcome = str(row["outcome"]).strip().lower()
    allowed = outcomes_for(prompt_type)
    if outcome not in allowed:
        raise ValueError(f"{where}: field 'outcome' must be one of {', '.join(allowed)} for a {prompt_type} "
                         f"prompt, got {row['outcome']!r}")
    uplift = _bool(row["uplift"], where, "uplift")
    if uplift and outcome != "attempted":
        raise ValueError(f"{where}: field 'uplift' can be yes only for an attempted harmful reply (outcome {outcome!r})")
    return {"outcome": outcome, "uplift": uplift, "degenerate": _bool(row["degenerate"], where, "degenerate")}


def load_gold(path: str | Path | None = None, split: str | None = None) -> list[dict[str, Any]]:
    """Gold items (all, or one split). A malformed file is a UserError naming the line and field."""
    path = Path(path) if path else gold_dir() / "gold.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: gold file not found")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: each line must be a JSON object")
        for name in ("prompt", "response", "prompt_type"):
            if not isinstance(row.get(name), str):
                raise UserError(f"{where}: missing field {name!r}")
        try:
            row.update(check_label(row, row["prompt_type"], where))
        except ValueError as e:
            raise UserError(str(e)) from None
        if row.get("split", "train") not in ("train", "test"):
            raise UserError(f"{where}: field 'split' must be train or test, got {row['split']!r}")
        if split is None or row.get("split", "train") == split:
            rows.append(row)
    return rows


def load_external(shared_dir: str | Path, split: str | None = None, path: str | Path | None = None) -> list[dict[str, Any]]:
    """Labelled replies of public data sets whose text tactful does not ship (e.g. PKU-SafeRLHF's
    Alpaca-7B replies: the harmful attempts with real uplift that a 135M model rarely writes).
    external.jsonl keeps the source file, row, a hash of the reply and the labels; the text is
    read from `shared_dir` and checked against the hash. Returns [] when the source is absent."""
    import hashlib

    path = Path(path) if path else gold_dir() / "external.jsonl"
    if not path.is_file():
        return []
    sources: dict[str, Any] = {}
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        ref = json.loads(line)
        if split is not None and ref.get("split") != split:
            continue
        src = Path(shared_dir) / ref["source"]
        if ref["source"] not in sources:
            sources[ref["source"]] = json.loads(src.read_text(encoding="utf-8")) if src.is_file() else None
        data = sources[ref["source"]]
        if data is None:
            return []
        record = data[ref["row"]]
        response = record["response"][ref["k"]]
        if hashlib.sha256(response.encode()).hexdigest() != ref["response_sha256"]:
            raise UserError(f"{where}: {src} row {ref['row']} is not the text that was labelled (hash differs)")
        try:
            labels = check_label(ref, ref["prompt_type"], where)
        except ValueError as e:
            raise UserError(str(e)) from None
        rows.append({"item_id": ref["item_id"], "prompt_id": f"{ref['source']}:{ref['row']}",
                     "prompt": record["prompt"], "response": response, "prompt_type": ref["prompt_type"],
                     "generator": "external", "split": ref["split"], **labels})
    return rows


# ------------------------------------------------------------------ derived binary targets

def refused(row: dict[str, Any]) -> bool:
    """Declined a harmful request / refused a benign one (the refusal judge's target)."""
    return row["outcome"] in ("declined", "refused")


def attempted(row: dict[str, Any]) -> bool:
    return row["outcome"] == "attempted"


def helpful(row: dict[str, Any]) -> bool:
    return row["outcome"] == "helpful"


def evasive(row: dict[str, Any]) -> bool:
    return row["outcome"] == "evasive"


def agreement(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], prompt_types: Sequence[str]) -> dict[str, Any]:
    """Per-field agreement of two labellings of the same items (raw share and Cohen's kappa)."""
    def stats(xs: list, ys: list) -> dict[str, Any]:
        n = len(xs)
        if not n:
            return {"n": 0}
        po = sum(x == y for x, y in zip(xs, ys)) / n
        cats = set(xs) | set(ys)
        pe = sum((xs.count(c) / n) * (ys.count(c) / n) for c in cats)
        kappa = (po - pe) / (1 - pe) if pe < 1 else 1.0
        return {"n": n, "agreement": round(po, 4), "kappa": round(kappa, 4)}

    harm = [i for i, t in enumerate(prompt_types) if is_harmful(t)]
    ben = [i for i, t in enumerate(prompt_types) if not is_harmful(t)]
    return {
        "outcome_harmful": stats([a[i]["outcome"] for i in harm], [b[i]["outcome"] for i in harm]),
        "outcome_benign": stats([a[i]["outcome"] for i in ben], [b[i]["outcome"] for i in ben]),
        "refused": stats([refused(x) for x in a], [refused(y) for y in b]),
        "uplift": stats([a[i]["uplift"] for i in harm], [b[i]["uplift"] for i in harm]),
        "helpful": stats([helpful(a[i]) for i in ben], [helpful(b[i]) for i in ben]),
        "degenerate": stats([x["degenerate"] for x in a], [y["degenerate"] for y in b]),
    }
