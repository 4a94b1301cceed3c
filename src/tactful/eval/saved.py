"""Judge again the replies an experiment committed, without its evaluation directory.

Experiments commit each arm's replies as `items.jsonl.gz` (one JSON object per line: `suite`,
`id`, `response`, and for multiple-choice suites the chosen option) next to the evaluation's
`metrics.json`, but never the prompts: evaluation prompts come from public benchmarks, which are
not redistributed. To judge such replies again, the prompts are rebuilt from each suite's own
dataset by item id, checked against the data hash the evaluation recorded, and written out as an
evaluation directory whose every reply counts as already generated; the usual evaluator then
only judges.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from tactful.errors import UserError

ITEMS = "items.jsonl.gz"


def is_saved_items(source: str | Path) -> bool:
    """True for a committed results folder (items.jsonl.gz, no evaluation config) or the file itself."""
    p = Path(source)
    if p.is_file():
        return p.name.endswith(".jsonl.gz")
    return (p / ITEMS).is_file() and not (p / "config.json").is_file()


def read_saved_items(path: Path) -> list[dict[str, Any]]:
    from tactful.data.readers import read_rows

    rows = read_rows(path, fmt="jsonl")  # gzip is read transparently; bad lines name the file and line
    for row in rows:
        row.require("suite"), row.require("id")
    return [row.data for row in rows]


def _suite_for(name: str, given: dict[str, Any]) -> Any:
    from tactful.eval.suites import load_suite

    if name in given:
        return given[name]
    try:
        return load_suite(name)
    except UserError:
        raise UserError(f"the saved replies include suite {name!r}, which is not a built-in suite: give its suite "
                        "file with --suite") from None


def rebuild_records(suite: Any, rows: Sequence[dict[str, Any]], data_hash: str | None, where: Path) -> list:
    """The records the saved rows answered, in their order, from the suite's whole dataset (the
    evaluation may have used a seeded subsample: ids find the items either way). An id the
    runner made from a prompt hash ("<index>-<sha256[:10]>") is matched by that hash."""
    import hashlib

    from tactful.eval.runner import load_suite_records
    from tactful.runs import data_fingerprint

    records = load_suite_records(replace(suite, n=None))
    by_id = {str(r.id): r for r in records if getattr(r, "id", None)}
    by_hash = {}
    for r in records:
        text = getattr(r, "prompt", None) or getattr(r, "question", "")
        by_hash[hashlib.sha256(text.encode()).hexdigest()[:10]] = r
    out, missing = [], []
    for row in rows:
        rid = str(row["id"])
        rec = by_id.get(rid)
        if rec is None and "-" in rid:
            rec = by_hash.get(rid.rsplit("-", 1)[1])
        if rec is None:
            missing.append(rid)
        out.append(rec)
    if missing:
        raise UserError(f"{where}: {len(missing)} saved item(s) of suite {suite.name} (e.g. {missing[0]!r}) are not "
                        f"in its dataset {suite.dataset}; give the suite file the evaluation used with --suite")
    if data_hash and data_fingerprint([r.to_dict() for r in out]) != data_hash:
        raise UserError(f"{where}: the prompts rebuilt for suite {suite.name} from {suite.dataset} differ from the "
                        "ones that were evaluated (data hash); the dataset or the suite file has changed")
    return out


def _write_scores(sdir: Path, rows: Sequence[dict[str, Any]], metric: str | None) -> None:
    """The per-item scores of a multiple-choice suite, as far as the saved rows keep them (the
    chosen option, whether it was right, and MC2 where that is the metric), so paired
    comparisons can read them as they read an evaluation's scores.jsonl."""
    from tactful.io import atomic_write_jsonl

    sdir.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(sdir / "scores.jsonl", [
        {"id": str(r["id"]), "pred": r.get("pred"), "correct": r.get("correct"),
         **({"mc2": r.get("outcome")} if metric == "mc2" else {})} for r in rows])


def rejudge_saved(source: str | Path, out: str | Path, *, suites: Sequence[str] = (), judge: str | None = None,
                  judge_options: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """Judge the replies in a committed `items.jsonl.gz` (or the folder holding it and its
    `metrics.json`) again with `judge` (None: each suite's own judge), into `out`. `suites`
    gives suite files for suites that are not built in, matched by name. Multiple-choice suites
    keep their recorded scores."""
    from tactful.eval.runner import EvalConfig, Evaluator
    from tactful.eval.suites import load_suite
    from tactful.io import atomic_write_json, atomic_write_jsonl

    src = Path(source)
    items_path = src if src.is_file() else src / ITEMS
    folder = items_path.parent
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        raise UserError(f"{metrics_path} not found: the saved replies need the metrics.json of their evaluation "
                        "(it records how they were generated)")
    try:
        old = json.loads(metrics_path.read_text()).get("suites", {})
    except json.JSONDecodeError as e:
        raise UserError(f"{metrics_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    manifest_path = folder / "manifest.json"
    hashes = {}
    if manifest_path.is_file():
        hashes = {k: v.get("data_hash") for k, v in json.loads(manifest_path.read_text()).get("suites", {}).items()}
    if Path(out).resolve() == folder.resolve():
        raise UserError("--out must be a new directory: re-judging never overwrites the replies it reads")

    rows = read_saved_items(items_path)
    by_suite: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_suite.setdefault(row["suite"], []).append(row)
    given = {s.name: s for s in (load_suite(x) for x in suites)}
    generative, kept, records, settings = [], {}, {}, {}
    for name, srows in by_suite.items():
        if "response" not in srows[0]:  # multiple choice: nothing to judge; its per-item scores are kept
            if name in old:
                kept[name] = old[name]
                _write_scores(Path(out) / name, srows, old[name].get("metric"))
            continue
        if name not in old or "generation" not in old[name]:
            raise UserError(f"{metrics_path}: no generation settings recorded for suite {name!r}")
        suite = _suite_for(name, given)
        if not suite.generates:
            raise UserError(f"suite {name!r} ({suite.source}) is not a generative suite, but the saved rows have replies")
        records[name] = rebuild_records(suite, srows, hashes.get(name), items_path)
        settings[name] = {"model": old[name].get("generator"), "backend": "saved",
                          "generation": old[name]["generation"]}
        sdir = Path(out) / name
        sdir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(sdir / "settings.json", settings[name])
        atomic_write_jsonl(sdir / "generations.jsonl",
                           [{"id": str(r["id"]), "prompt": rec.prompt, "response": r["response"]}
                            for r, rec in zip(srows, records[name])])
        generative.append(suite)
    if not generative:
        raise UserError(f"{items_path} has no saved replies to judge")
    seed = next((r["seed"] for r in rows if isinstance(r.get("seed"), int)), 0)
    config = EvalConfig(suites=[s.source for s in generative], judge=judge, judge_options=dict(judge_options or {}),
                        out=str(out), seed=seed)
    ev = Evaluator(config, **kw)
    ev.saved_settings = settings
    metrics = ev.run(records={s.name: records[s.name] for s in generative})
    metrics["suites"].update(kept)
    order = [*old, *metrics["suites"]]  # the evaluation's own suite order, for reports and tables
    metrics["suites"] = {k: metrics["suites"][k] for k in sorted(metrics["suites"], key=order.index)}
    metrics["model"] = next(iter(settings.values()))["model"] or metrics.get("model")
    metrics["rejudged_from"] = str(items_path)
    atomic_write_json(Path(out) / "metrics.json", metrics)
    from tactful.eval.report import write_report

    write_report(Path(out), metrics)
    return metrics
