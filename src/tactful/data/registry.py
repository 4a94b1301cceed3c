"""The named-benchmark registry: load public safety and capability benchmarks by name.

Each `Benchmark` knows where its data lives (a Hugging Face id, or the data shipped in
the package for the built-in sets) and has an *adapter*: a small function that maps
rows in the benchmark's own columns (``goal,target`` for AdvBench, ``Behavior,...`` for
HarmBench, full transcripts for HH-RLHF, ...) to tactful's records
(`tactful.data.records`).

    load_benchmark("xstest")                                 # from the hub
    load_benchmark("advbench", path="harmful_behaviors.csv") # a local copy, same columns
    load_benchmark("builtin-harmful", split="test", n=50)    # shipped with tactful
    load_records("my_pairs.jsonl")                            # tactful's own record format

Every problem with the input (a missing column, a malformed value, an unknown name) is
a `UserError` naming the file and line, never a KeyError from deep inside an adapter.
"""

from __future__ import annotations

import difflib
import json
import logging
import random
import re
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from tactful.data import builtin
from tactful.data.readers import FORMATS, Row, parse_bool, read_hub, read_rows
from tactful.data.records import (
    BENIGN,
    HARMFUL,
    RECORD_TYPES,
    RESPONSE_CLASSES,
    SEEMINGLY_TOXIC,
    Example,
    LabelledResponse,
    MCItem,
    PreferencePair,
    PromptRecord,
)
from tactful.errors import UserError
from tactful.io import read_text_file

log = logging.getLogger(__name__)

Adapter = Callable[[list[Row]], list]

# Labels of BeaverTails-style (prompt, response) examples.
SAFE = "safe"
UNSAFE = "unsafe"


@dataclass(frozen=True)
class Benchmark:
    name: str  # e.g. "advbench", "xstest", "xstest-unsafe", "pku-saferlhf", "builtin-harmful"
    kind: str  # "prompts" | "pairs" | "mc" | "examples" | "labelled"
    description: str
    hub_id: str | None  # Hugging Face id used when no local path is given
    hub_split: str  # split on the hub
    license: str
    adapter: Adapter  # maps rows in the benchmark's own columns to records
    columns: tuple[str, ...]  # the benchmark's own required columns (for docs / error messages)
    hub_config: str | None = None


# --------------------------------------------------------------------------------------
# Field helpers: every access goes through these so bad input becomes a UserError.
# --------------------------------------------------------------------------------------


def _text(row: Row, *names: str) -> str:
    """The first of `names` present in the row, as text (hub mirrors rename columns, e.g.
    AdvBench's `goal` is `prompt` on walledai/AdvBench, so adapters accept both)."""
    for name in names:
        value = row.get(name)
        if value is not None:
            return _as_text(value, row, name)
    if len(names) == 1:
        row.require(names[0])  # raises the standard "missing field" error
    have = ", ".join(sorted(map(str, row.data))) or "none"
    raise UserError(f"missing field {' or '.join(repr(n) for n in names)} (fields present: {have})",
                    where=row.where)


def _opt_text(row: Row, *names: str) -> str | None:
    """Like `_text` but optional: missing, null and empty values give None."""
    for name in names:
        value = row.get(name)
        if value is not None and value != "":
            text = _as_text(value, row, name)
            return text if text.strip() else None
    return None


def _as_text(value: Any, row: Row, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # numeric ids and categories from CSV / Parquet
    raise UserError(f"field {name!r} should be text, got {type(value).__name__}", where=row.where)


def _structured(row: Row, name: str, want: type, value: Any = MISSING) -> Any:
    """A list/dict field; a JSON string is accepted (that is how CSV files carry them)."""
    if value is MISSING:
        value = row.require(name)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"field {name!r} should be a {want.__name__} (or its JSON), got {value[:60]!r}",
                            where=row.where) from None
    if not isinstance(value, want):
        raise UserError(f"field {name!r} should be a {want.__name__}, got {type(value).__name__}",
                        where=row.where)
    return value


def _int(value: Any, row: Row, name: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise UserError(f"field {name!r} should be an integer, got {value!r}", where=row.where)


def _true_keys(row: Row, name: str) -> list[str]:
    """Names set to true in a {category: bool} dict (PKU-SafeRLHF / BeaverTails harm categories)."""
    value = row.get(name)
    if value is None or value == "":
        return []
    cats = _structured(row, name, dict, value)
    return [str(k) for k, v in cats.items() if v is not None and parse_bool(v, row, f"{name}.{k}")]


def _row_id(row: Row, field_name: str, name: str, i: int) -> str:
    """The benchmark's own id if it has one, else `<name>-<index>`: stable ids let eval logs resume."""
    return _opt_text(row, field_name) or f"{name}-{i}"


def _meta(**items: Any) -> dict[str, Any]:
    return {k: v for k, v in items.items() if v is not None and v != "" and v != []}


# --------------------------------------------------------------------------------------
# Adapters: one small function per benchmark format.
# --------------------------------------------------------------------------------------


def _advbench(rows: list[Row]) -> list[PromptRecord]:
    return [
        PromptRecord(prompt=_text(r, "goal", "prompt"), label=HARMFUL, id=f"advbench-{i}", source="advbench",
                     meta=_meta(target=_opt_text(r, "target")))
        for i, r in enumerate(rows)
    ]


def _xstest_record(r: Row, i: int, source: str) -> PromptRecord:
    kind = _text(r, "type")
    # The 200 unsafe contrast prompts are exactly the types named contrast_*.
    label = HARMFUL if kind.startswith("contrast_") else SEEMINGLY_TOXIC
    return PromptRecord(prompt=_text(r, "prompt"), label=label, category=kind,
                        id=_row_id(r, "id", "xstest", i), source=source,
                        meta=_meta(focus=_opt_text(r, "focus"), note=_opt_text(r, "note")))


def _xstest(rows: list[Row]) -> list[PromptRecord]:
    return [_xstest_record(r, i, "xstest") for i, r in enumerate(rows)]


def _xstest_safe(rows: list[Row]) -> list[PromptRecord]:
    recs = (_xstest_record(r, i, "xstest-safe") for i, r in enumerate(rows))
    return [rec for rec in recs if rec.label == SEEMINGLY_TOXIC]


def _xstest_unsafe(rows: list[Row]) -> list[PromptRecord]:
    recs = (_xstest_record(r, i, "xstest-unsafe") for i, r in enumerate(rows))
    return [rec for rec in recs if rec.label == HARMFUL]


def _strongreject(rows: list[Row]) -> list[PromptRecord]:
    return [
        PromptRecord(prompt=_text(r, "forbidden_prompt", "prompt"), label=HARMFUL,
                     category=_opt_text(r, "category"), id=f"strongreject-{i}", source="strongreject",
                     meta=_meta(origin=_opt_text(r, "source")))
        for i, r in enumerate(rows)
    ]


def _harmbench(rows: list[Row]) -> list[PromptRecord]:
    out = []
    for i, r in enumerate(rows):
        behavior = _text(r, "Behavior", "prompt")
        context = _opt_text(r, "ContextString", "context")
        # Contextual behaviours only make sense with their context, which HarmBench puts first.
        prompt = f"{context}\n\n{behavior}" if context else behavior
        out.append(PromptRecord(
            prompt=prompt, label=HARMFUL, category=_opt_text(r, "SemanticCategory", "category"),
            id=_row_id(r, "BehaviorID", "harmbench", i), source="harmbench",
            meta=_meta(functional_category=_opt_text(r, "FunctionalCategory"), tags=_opt_text(r, "Tags"),
                       behavior=behavior if context else None)))
    return out


def _jbb(label: str, source: str) -> Adapter:
    def adapt(rows: list[Row]) -> list[PromptRecord]:
        return [
            PromptRecord(prompt=_text(r, "Goal"), label=label, category=_opt_text(r, "Category"),
                         id=f"{source}-{i}", source=source,
                         meta=_meta(target=_opt_text(r, "Target"), behavior=_opt_text(r, "Behavior"),
                                    origin=_opt_text(r, "Source")))
            for i, r in enumerate(rows)
        ]
    adapt.__name__ = f"_{source.replace('-', '_')}"
    return adapt


def _orbench(label: str, source: str) -> Adapter:
    def adapt(rows: list[Row]) -> list[PromptRecord]:
        return [PromptRecord(prompt=_text(r, "prompt"), label=label, category=_opt_text(r, "category"),
                             id=f"{source}-{i}", source=source)
                for i, r in enumerate(rows)]
    adapt.__name__ = f"_{source.replace('-', '_')}"
    return adapt


def _do_not_answer(rows: list[Row]) -> list[PromptRecord]:
    return [
        PromptRecord(prompt=_text(r, "question"), label=HARMFUL, category=_opt_text(r, "risk_area"),
                     id=_row_id(r, "id", "do-not-answer", i), source="do-not-answer",
                     meta=_meta(types_of_harm=_opt_text(r, "types_of_harm"),
                                specific_harms=_opt_text(r, "specific_harms")))
        for i, r in enumerate(rows)
    ]


def _sorry_bench(rows: list[Row]) -> list[PromptRecord]:
    out = []
    for i, r in enumerate(rows):
        turns = _structured(r, "turns", list)
        if not turns or not isinstance(turns[0], str):
            raise UserError("field 'turns' should be a non-empty list of strings", where=r.where)
        out.append(PromptRecord(prompt=turns[0], label=HARMFUL, category=_opt_text(r, "category"),
                                id=_row_id(r, "question_id", "sorry-bench", i), source="sorry-bench",
                                meta=_meta(prompt_style=_opt_text(r, "prompt_style"))))
    return out


def _safe_rlhf_eval(rows: list[Row]) -> list[PromptRecord]:
    return [PromptRecord(prompt=_text(r, "prompt"), label=HARMFUL, category=_opt_text(r, "category"),
                         id=f"safe-rlhf-eval-{i}", source="safe-rlhf-eval")
            for i, r in enumerate(rows)]


def _pku_saferlhf(rows: list[Row]) -> list[PreferencePair]:
    out = []
    for i, r in enumerate(rows):
        responses = [_text(r, "response_0"), _text(r, "response_1")]
        safe = [parse_bool(r.require(f"is_response_{k}_safe"), r, f"is_response_{k}_safe") for k in (0, 1)]
        cats = [_true_keys(r, f"response_{k}_harm_category") for k in (0, 1)]
        safer = _int(r.require("safer_response_id"), r, "safer_response_id")
        better = _int(r.require("better_response_id"), r, "better_response_id")
        for name, value in (("safer_response_id", safer), ("better_response_id", better)):
            if value not in (0, 1):
                raise UserError(f"field {name!r} should be 0 or 1, got {value}", where=r.where)
        c, j = safer, 1 - safer  # tactful aligns for safety: the safer response is chosen
        # The pair's category is the harm it teaches to avoid: that of the unsafe response
        # (the rejected one; if only the chosen one is unsafe, its harm).
        harms = [cats[k] for k in (j, c) if not safe[k] and cats[k]]
        out.append(PreferencePair(
            prompt=_text(r, "prompt"), chosen=responses[c], rejected=responses[j],
            chosen_safe=safe[c], rejected_safe=safe[j], category=harms[0][0] if harms else None,
            chosen_category=cats[c][0] if cats[c] else None, rejected_category=cats[j][0] if cats[j] else None,
            id=f"pku-saferlhf-{i}", source="pku-saferlhf",
            meta=_meta(chosen_categories=cats[c], rejected_categories=cats[j], chosen_is_better=(better == c))))
    return out


def _pku_safety_pairs(rows: list[Row]) -> list[PreferencePair]:
    out = []
    for i, r in enumerate(rows):
        response = _structured(r, "response", list)
        if len(response) != 2 or not all(isinstance(x, str) for x in response):
            raise UserError("field 'response' should be a list of two strings [safe, unsafe]", where=r.where)
        out.append(PreferencePair(prompt=_text(r, "prompt"), chosen=response[0], rejected=response[1],
                                  chosen_safe=True, rejected_safe=False,
                                  id=f"pku-saferlhf-safety-pairs-{i}", source="pku-saferlhf-safety-pairs"))
    return out


def _beavertails(rows: list[Row]) -> list[Example]:
    out = []
    for i, r in enumerate(rows):
        is_safe = parse_bool(r.require("is_safe"), r, "is_safe")
        cats = _true_keys(r, "category")
        out.append(Example(prompt=_text(r, "prompt"), response=_text(r, "response"),
                           label=SAFE if is_safe else UNSAFE, category=cats[0] if cats else None,
                           id=f"beavertails-{i}", source="beavertails", meta=_meta(categories=cats)))
    return out


def _beavertails_eval(rows: list[Row]) -> list[PromptRecord]:
    # The hub file has prompt,category; derived local subsets may carry only prompt.
    return [PromptRecord(prompt=_text(r, "prompt"), label=HARMFUL, category=_opt_text(r, "category"),
                         id=f"beavertails-eval-{i}", source="beavertails-eval")
            for i, r in enumerate(rows)]


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _hh_turns(text: str) -> list[tuple[str, str]] | None:
    """Split an HH-RLHF transcript into (role, text) turns; None if it is not one."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        return None
    return [("user" if role == "Human" else "assistant", body.strip())
            for role, body in zip(parts[1::2], parts[2::2])]


def _hh_rlhf(rows: list[Row]) -> list[PreferencePair]:
    out, skipped = [], []
    for i, r in enumerate(rows):
        chosen, rejected = _hh_turns(_text(r, "chosen")), _hh_turns(_text(r, "rejected"))
        # A usable pair is one conversation with two different final assistant replies.
        # A few upstream rows differ earlier (edited turns); they are not a clean
        # preference, so they are skipped and counted rather than failing the whole file.
        if (not chosen or not rejected or chosen[:-1] != rejected[:-1] or len(chosen) < 2
                or chosen[-1][0] != "assistant" or rejected[-1][0] != "assistant" or chosen[-2][0] != "user"):
            skipped.append(r.where)
            continue
        history = [{"role": role, "content": body} for role, body in chosen[:-2]]
        out.append(PreferencePair(prompt=chosen[-2][1], chosen=chosen[-1][1], rejected=rejected[-1][1],
                                  id=f"hh-rlhf-harmless-{i}", source="hh-rlhf-harmless",
                                  meta=_meta(history=history)))
    if skipped:
        log.warning("hh-rlhf-harmless: skipped %d of %d rows whose chosen and rejected transcripts are not "
                    "the same conversation up to the final reply (first: %s)", len(skipped), len(rows), skipped[0])
    return out


def _split_answers(row: Row, name: str) -> list[str]:
    return [a.strip() for a in _text(row, name).split(";") if a.strip()]


def _truthfulqa(rows: list[Row]) -> list[MCItem]:
    out = []
    for i, r in enumerate(rows):
        if "mc2_targets" in r.data:  # hub truthful_qa "multiple_choice" config
            mc2 = _targets(r, "mc2_targets")
            mc1 = _targets(r, "mc1_targets") if r.get("mc1_targets") is not None else None
            choices = mc2[0]
            answers = [k for k, lab in enumerate(mc2[1]) if lab]
            best = next((c for c, lab in zip(*mc1) if lab), None) if mc1 else None
            meta = _meta(best_answer=best)
        else:  # the original CSV: Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source
            correct = list(dict.fromkeys(_split_answers(r, "Correct Answers")))
            # A handful of upstream rows repeat an answer, a few even in both lists; a repeated
            # choice would be double-counted by MC2, so each text appears once (as correct if
            # it is listed as correct at all).
            incorrect = [a for a in dict.fromkeys(_split_answers(r, "Incorrect Answers")) if a not in correct]
            choices = correct + incorrect
            answers = list(range(len(correct)))
            meta = _meta(best_answer=_opt_text(r, "Best Answer"), type=_opt_text(r, "Type"),
                         category=_opt_text(r, "Category"), reference=_opt_text(r, "Source"))
        if not answers or len(answers) == len(choices):
            raise UserError("TruthfulQA item needs at least one correct and one incorrect answer", where=r.where)
        question = _text(r, "Question", "question")
        out.append(MCItem(question=question, choices=choices, answers=answers, id=f"truthfulqa-{i}",
                          source="truthfulqa-mc", meta=meta))
    return out


def _targets(row: Row, name: str) -> tuple[list[str], list[int]]:
    """A TruthfulQA hub {choices, labels} target set."""
    t = _structured(row, name, dict)
    choices, labels = t.get("choices"), t.get("labels")
    if not isinstance(choices, list) or not isinstance(labels, list) or len(choices) != len(labels):
        raise UserError(f"field {name!r} should be {{choices: [...], labels: [...]}} of equal length",
                        where=row.where)
    return [_as_text(c, row, name) for c in choices], [_int(lab, row, name) for lab in labels]


def _choices(row: Row, name: str, value: Any) -> tuple[list[str], list[str]]:
    """(texts, labels) from either [{text, label}, ...] (official AI2 files) or
    {text: [...], label: [...]} (the hub's flat format)."""
    if isinstance(value, list):
        if not all(isinstance(c, dict) and "text" in c and "label" in c for c in value):
            raise UserError(f"field {name!r} should be a list of {{text, label}} objects", where=row.where)
        return [_as_text(c["text"], row, name) for c in value], [str(c["label"]) for c in value]
    if isinstance(value, dict) and isinstance(value.get("text"), list) and isinstance(value.get("label"), list):
        if len(value["text"]) != len(value["label"]):
            raise UserError(f"field {name!r}: text and label lists differ in length", where=row.where)
        return [_as_text(t, row, name) for t in value["text"]], [str(lab) for lab in value["label"]]
    raise UserError(f"field {name!r} should be a list of {{text, label}} or {{text: [...], label: [...]}}",
                    where=row.where)


def _ai2_mc(row: Row, i: int, source: str, flat_stem: str) -> MCItem:
    """ARC / OpenBookQA: official nested question{stem, choices} or the hub's flat columns."""
    question = row.get("question")
    if isinstance(question, dict):  # official files (extra keys such as a choice's "para" are ignored)
        stem = question.get("stem")
        if not isinstance(stem, str):
            raise UserError("field 'question.stem' is missing or not text", where=row.where)
        if "choices" not in question:
            raise UserError("field 'question.choices' is missing", where=row.where)
        texts, labels = _choices(row, "question.choices", question["choices"])
    else:
        stem = _text(row, *dict.fromkeys((flat_stem, "question")))
        texts, labels = _choices(row, "choices", row.require("choices"))
    key = _text(row, "answerKey").strip()
    if key not in labels:
        raise UserError(f"answerKey {key!r} is not one of the choice labels {labels}", where=row.where)
    return MCItem(question=stem, choices=texts, answers=[labels.index(key)],
                  id=_row_id(row, "id", source, i), source=source,
                  meta=_meta(fact=_opt_text(row, "fact1")))


def _arc(source: str) -> Adapter:
    def adapt(rows: list[Row]) -> list[MCItem]:
        return [_ai2_mc(r, i, source, "question") for i, r in enumerate(rows)]
    adapt.__name__ = f"_{source.replace('-', '_')}"
    return adapt


def _openbookqa(rows: list[Row]) -> list[MCItem]:
    return [_ai2_mc(r, i, "openbookqa", "question_stem") for i, r in enumerate(rows)]


def _piqa(rows: list[Row]) -> list[MCItem]:
    out = []
    for i, r in enumerate(rows):
        if r.get("label") is None:
            raise UserError(
                "PIQA row has no 'label': keep the labels file next to the data file, named "
                "<stem>_labels.lst or <stem>-labels.lst (one 0/1 per line), or add a 'label' field",
                where=r.where)
        label = _int(r.get("label"), r, "label")
        if label not in (0, 1):
            raise UserError(f"PIQA label should be 0 or 1, got {label}", where=r.where)
        out.append(MCItem(question=_text(r, "goal"), choices=[_text(r, "sol1"), _text(r, "sol2")],
                          answers=[label], id=_row_id(r, "id", "piqa", i), source="piqa"))
    return out


def _attach_piqa_labels(path: Path, rows: list[Row]) -> list[Row]:
    """Official PIQA keeps labels in a separate, line-aligned file next to the data."""
    if all(r.get("label") is not None for r in rows):
        return rows
    stem = path.name.split(".")[0]
    for candidate in (path.with_name(f"{stem}_labels.lst"), path.with_name(f"{stem}-labels.lst")):
        if candidate.exists():
            break
    else:
        return rows  # the adapter explains what is missing, naming the first row
    labels = [(n, line.strip()) for n, line in enumerate(read_text_file(candidate, "labels file").splitlines(), 1)
              if line.strip()]
    if len(labels) != len(rows):
        raise UserError(f"labels file {candidate} has {len(labels)} labels but {path} has {len(rows)} rows")
    for n, lab in labels:
        if lab not in ("0", "1"):
            raise UserError(f"PIQA label should be 0 or 1, got {lab!r}", where=f"{candidate}:{n}")
    return [Row({**r.data, "label": int(lab)}, r.where) if r.get("label") is None else r
            for r, (_, lab) in zip(rows, labels)]


def _mmlu(rows: list[Row]) -> list[MCItem]:
    out = []
    for i, r in enumerate(rows):
        choices = _structured(r, "choices", list)
        answer = r.require("answer")
        if isinstance(answer, str) and answer.strip().upper() in "ABCDEFGH" and len(answer.strip()) == 1:
            index = "ABCDEFGH".index(answer.strip().upper())
        else:
            index = _int(answer, r, "answer")
        if not 0 <= index < len(choices):
            raise UserError(f"answer {answer!r} is out of range for {len(choices)} choices", where=r.where)
        out.append(MCItem(question=_text(r, "question"), choices=[_as_text(c, r, "choices") for c in choices],
                          answers=[index], id=f"mmlu-{i}", source="mmlu",
                          meta=_meta(subject=_opt_text(r, "subject"))))
    return out


# Built-in sets. Without a path they load through tactful.data.builtin (the source of truth);
# these adapters read a file in the same raw layout (e.g. a user's edited copy).

def _builtin_harmful(rows: list[Row]) -> list[PromptRecord]:
    return [PromptRecord(prompt=_text(r, "prompt"), label=HARMFUL, category=_opt_text(r, "category"),
                         id=_row_id(r, "id", "builtin-harmful", i), source="builtin:harmful",
                         meta=_meta(split=_opt_text(r, "split")))
            for i, r in enumerate(rows)]


def _builtin_harmful_questions(rows: list[Row]) -> list[PromptRecord]:
    return [PromptRecord(prompt=_text(r, "prompt"), label=HARMFUL, category=_opt_text(r, "category"),
                         id=_row_id(r, "id", "builtin-harmful-questions", i), source="builtin:harmful-questions",
                         meta=_meta(split=_opt_text(r, "split"), shape=_opt_text(r, "shape")))
            for i, r in enumerate(rows)]


def _builtin_question_declines(rows: list[Row]) -> list[Example]:
    return [Example(prompt=_text(r, "prompt"), response=_text(r, "decline"), label=HARMFUL,
                    category=_opt_text(r, "category"), id=_row_id(r, "id", "builtin-question-declines", i),
                    source="builtin:harmful-question-declines", meta=_meta(split=_opt_text(r, "split")))
            for i, r in enumerate(rows) if r.get("decline") and r.get("split", "train") == "train"]


def _builtin_seemingly_toxic(rows: list[Row]) -> list[PromptRecord]:
    return [PromptRecord(prompt=_text(r, "prompt"), label=SEEMINGLY_TOXIC, category=_opt_text(r, "type", "category"),
                         id=_row_id(r, "id", "builtin-seemingly-toxic", i), source="builtin:seemingly-toxic",
                         meta=_meta(split=_opt_text(r, "split")))
            for i, r in enumerate(rows)]


def _builtin_benign(rows: list[Row]) -> list[Example]:
    return [Example(prompt=_text(r, "prompt"), response=_text(r, "response"), label=BENIGN,
                    category=_opt_text(r, "category"), id=_row_id(r, "id", "builtin-benign", i),
                    source="builtin:benign", meta=_meta(split=_opt_text(r, "split")))
            for i, r in enumerate(rows)]


def _builtin_labelled(rows: list[Row]) -> list[LabelledResponse]:
    out = []
    for i, r in enumerate(rows):
        label = _text(r, "label")
        if label not in RESPONSE_CLASSES:
            raise UserError(f"label {label!r} should be one of {', '.join(RESPONSE_CLASSES)}", where=r.where)
        out.append(LabelledResponse(prompt=_text(r, "prompt"), response=_text(r, "response"), label=label,
                                    id=_row_id(r, "id", "builtin-labelled", i), source="builtin:labelled-responses",
                                    meta=_meta(split=_opt_text(r, "split"), prompt_label=_opt_text(r, "prompt_label"),
                                               style=_opt_text(r, "style"))))
    return out


def _builtin_harmful_examples(kind: str) -> Adapter:
    def adapt(rows: list[Row]) -> list[Example]:
        # Only train-split rows carry responses; rows without one are not examples.
        return [Example(prompt=_text(r, "prompt"), response=_text(r, kind), label=HARMFUL,
                        category=_opt_text(r, "category"), id=_row_id(r, "id", f"builtin-{kind}", i),
                        source=f"builtin:harmful-{kind}", meta=_meta(split=_opt_text(r, "split")))
                for i, r in enumerate(rows) if r.get(kind)]
    adapt.__name__ = f"_builtin_{kind}"
    return adapt


def _builtin_seemingly_toxic_answers(rows: list[Row]) -> list[Example]:
    return [Example(prompt=_text(r, "prompt"), response=_text(r, "response"), label=SEEMINGLY_TOXIC,
                    category=_opt_text(r, "type", "category"), id=_row_id(r, "id", "builtin-seemingly-toxic", i),
                    source="builtin:seemingly-toxic", meta=_meta(split=_opt_text(r, "split")))
            for i, r in enumerate(rows) if r.get("response")]


def _builtin_mc(source: str) -> Adapter:
    def adapt(rows: list[Row]) -> list[MCItem]:
        out = []
        for i, r in enumerate(rows):
            choices = _structured(r, "choices", list)
            answers = [_int(a, r, "answers") for a in _structured(r, "answers", list)]
            if not answers or any(not 0 <= a < len(choices) for a in answers):
                raise UserError(f"field 'answers' must index into the {len(choices)} choices", where=r.where)
            out.append(MCItem(question=_text(r, "question"), choices=[str(c) for c in choices], answers=answers,
                              id=_row_id(r, "id", source, i), source=source,
                              meta=_meta(split=_opt_text(r, "split"), category=_opt_text(r, "category"))))
        return out
    adapt.__name__ = f"_builtin_mc_{source}"
    return adapt


def _tactful_pairs(rows: list[Row]) -> list[PreferencePair]:
    """Pairs in tactful's own columns (a local copy of a built-in pairs set)."""
    return [_to_record(PreferencePair, "pairs", r) for r in rows]


_BUILTIN_LOADERS: dict[str, Callable[[str | None], list]] = {
    "builtin-harmful": lambda split: builtin.harmful_prompts(split),
    "builtin-seemingly-toxic": lambda split: builtin.seemingly_toxic(split),
    "builtin-benign": lambda split: builtin.benign(split),
    "builtin-labelled": lambda split: builtin.labelled_responses(split),
    "builtin-refusals": lambda split: builtin.harmful_examples("refusal", split=split),  # type: ignore[arg-type]
    "builtin-informative": lambda split: builtin.harmful_examples("informative", split=split),  # type: ignore[arg-type]
    "builtin-seemingly-toxic-answers": lambda split: builtin.seemingly_toxic_examples(split or "train"),
    "builtin-declines": lambda split: builtin.harmful_examples("decline", split=split),  # type: ignore[arg-type]
    "builtin-harmful-questions": lambda split: builtin.harmful_questions(split),
    "builtin-seemingly-toxic-more": lambda split: builtin.seemingly_toxic_more(split),
    "builtin-seemingly-toxic-more-answers": lambda split: builtin.seemingly_toxic_examples(split or "train", more=True),
    "builtin-question-declines": lambda split: builtin.harmful_question_declines(split or "train"),
    "builtin-own-helpful": lambda split: builtin.own_helpful_replies(split or "train"),
    "builtin-gold-pairs": lambda split: builtin.gold_pairs(split or "train"),
    "builtin-capability": lambda split: builtin.mc_capability(split),
    "builtin-truthfulness": lambda split: builtin.mc_truthfulness(split),
}

# Local-file preparation that needs the path itself, not just the rows.
_PREPARE: dict[str, Callable[[Path, list[Row]], list[Row]]] = {"piqa": _attach_piqa_labels}

# Hub datasets without configs whose files must be named (HH-RLHF keeps harmless-base in a folder).
_HUB_DATA_FILES: dict[str, Callable[[str], dict[str, str]]] = {
    "hh-rlhf-harmless": lambda split: {split: f"harmless-base/{split}.jsonl.gz"},
}


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------

_REGISTRY: dict[str, Benchmark] = {}


def _register(*benchmarks: Benchmark) -> None:
    for b in benchmarks:
        if b.kind not in RECORD_TYPES:
            raise ValueError(f"{b.name}: unknown kind {b.kind}")
        _REGISTRY[b.name] = b


_register(
    # Harmful prompts (should be refused)
    Benchmark("advbench", "prompts", "AdvBench harmful behaviors: 520 harmful requests (GCG paper).",
              "walledai/AdvBench", "train", "MIT", _advbench, ("goal", "target")),
    Benchmark("strongreject", "prompts", "StrongREJECT: 313 forbidden prompts in 6 categories.",
              "walledai/StrongREJECT", "train", "MIT", _strongreject, ("category", "source", "forbidden_prompt")),
    Benchmark("harmbench", "prompts",
              "HarmBench text behaviors (standard, contextual, copyright); contextual ones are prefixed "
              "with their context. The official CSVs are harmbench_behaviors_text_{all,val,test}.csv.",
              "walledai/HarmBench", "train", "MIT", _harmbench,
              ("Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID"),
              hub_config="standard"),
    Benchmark("jailbreakbench-harmful", "prompts", "JailbreakBench JBB-Behaviors: 100 harmful behaviors.",
              "JailbreakBench/JBB-Behaviors", "harmful", "MIT", _jbb(HARMFUL, "jailbreakbench-harmful"),
              ("Goal", "Target", "Behavior", "Category", "Source"), hub_config="behaviors"),
    Benchmark("do-not-answer", "prompts", "Do-Not-Answer: 939 risky instructions; category = risk area.",
              "LibrAI/do-not-answer", "train", "CC-BY-NC-SA-4.0", _do_not_answer,
              ("id", "risk_area", "types_of_harm", "specific_harms", "question")),
    Benchmark("sorry-bench", "prompts",
              "SORRY-Bench (gated: accept its terms on the hub and log in): unsafe instructions in 45 categories.",
              "sorry-bench/sorry-bench-202406", "train", "gated (see the hub card)", _sorry_bench,
              ("question_id", "category", "turns", "prompt_style")),
    Benchmark("orbench-toxic", "prompts", "OR-Bench toxic: truly harmful prompts (refusal expected).",
              "bench-llm/or-bench", "train", "CC-BY-4.0", _orbench(HARMFUL, "orbench-toxic"),
              ("prompt", "category"), hub_config="or-bench-toxic"),
    Benchmark("xstest-unsafe", "prompts", "XSTest v2 unsafe contrast prompts (200; types contrast_*).",
              "Paul/XSTest", "train", "CC-BY-4.0", _xstest_unsafe, ("id", "prompt", "type")),
    Benchmark("beavertails-eval", "prompts", "BeaverTails-Evaluation red-team prompts (700, 14 categories).",
              "PKU-Alignment/BeaverTails-Evaluation", "test", "CC-BY-NC-4.0", _beavertails_eval, ("prompt",)),
    Benchmark("safe-rlhf-eval", "prompts",
              "safe-rlhf GPT-4 evaluation red-team prompts (83, with category); local file only "
              "(safe_rlhf/evaluate/gpt4/problem.json in PKU-Alignment/safe-rlhf).",
              None, "", "Apache-2.0", _safe_rlhf_eval, ("prompt", "category")),
    # Over-refusal sets: benign prompts that sound harmful (should be answered)
    Benchmark("xstest", "prompts",
              "XSTest v2, all 450: 250 safe prompts (seemingly_toxic) and 200 unsafe contrast prompts (harmful).",
              "Paul/XSTest", "train", "CC-BY-4.0", _xstest, ("id", "prompt", "type")),
    Benchmark("xstest-safe", "prompts", "XSTest v2 safe prompts (250, 10 types) that only sound harmful.",
              "Paul/XSTest", "train", "CC-BY-4.0", _xstest_safe, ("id", "prompt", "type")),
    Benchmark("orbench-hard", "prompts", "OR-Bench hard-1k: benign prompts most models over-refuse.",
              "bench-llm/or-bench", "train", "CC-BY-4.0", _orbench(SEEMINGLY_TOXIC, "orbench-hard"),
              ("prompt", "category"), hub_config="or-bench-hard-1k"),
    Benchmark("jailbreakbench-benign", "prompts",
              "JailbreakBench benign behaviors: 100 benign requests on the harmful ones' topics (seemingly_toxic).",
              "JailbreakBench/JBB-Behaviors", "benign", "MIT", _jbb(SEEMINGLY_TOXIC, "jailbreakbench-benign"),
              ("Goal", "Target", "Behavior", "Category", "Source"), hub_config="behaviors"),
    # Preference pairs and labelled (prompt, response) data
    Benchmark("pku-saferlhf", "pairs",
              "PKU-SafeRLHF preference pairs; chosen = the safer response, with per-response safety and harm "
              "categories.",
              "PKU-Alignment/PKU-SafeRLHF", "test", "CC-BY-NC-4.0", _pku_saferlhf,
              ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
               "better_response_id", "safer_response_id")),
    Benchmark("pku-saferlhf-safety-pairs", "pairs",
              "Derived PKU-SafeRLHF pairs with exactly one safe response: response = [safe, unsafe]; local file only.",
              None, "", "CC-BY-NC-4.0", _pku_safety_pairs, ("prompt", "response")),
    Benchmark("hh-rlhf-harmless", "pairs",
              "Anthropic HH-RLHF harmless-base: transcripts split into history, last human turn and final replies.",
              "Anthropic/hh-rlhf", "test", "MIT", _hh_rlhf, ("chosen", "rejected")),
    Benchmark("beavertails", "examples", "BeaverTails QA pairs labelled safe / unsafe with harm categories.",
              "PKU-Alignment/BeaverTails", "30k_test", "CC-BY-NC-4.0", _beavertails,
              ("prompt", "response", "category", "is_safe")),
    # Capability (multiple choice, scored by log-likelihood)
    Benchmark("truthfulqa-mc", "mc",
              "TruthfulQA multiple choice (817): choices = correct + incorrect answers, answers = the correct ones "
              "(MC2); the original CSV or the hub's multiple_choice config.",
              "truthfulqa/truthful_qa", "validation", "Apache-2.0", _truthfulqa,
              ("Question", "Best Answer", "Correct Answers", "Incorrect Answers"), hub_config="multiple_choice"),
    Benchmark("arc-easy", "mc", "AI2 ARC-Easy (official JSONL or the hub's flat format).",
              "allenai/ai2_arc", "test", "CC-BY-SA-4.0", _arc("arc-easy"), ("id", "question", "answerKey"),
              hub_config="ARC-Easy"),
    Benchmark("arc-challenge", "mc", "AI2 ARC-Challenge (official JSONL or the hub's flat format).",
              "allenai/ai2_arc", "test", "CC-BY-SA-4.0", _arc("arc-challenge"), ("id", "question", "answerKey"),
              hub_config="ARC-Challenge"),
    Benchmark("openbookqa", "mc", "OpenBookQA main (official JSONL or the hub's flat question_stem format).",
              "allenai/openbookqa", "test", "Apache-2.0", _openbookqa, ("id", "question", "answerKey"),
              hub_config="main"),
    Benchmark("piqa", "mc",
              "PIQA physical commonsense (two solutions); a local JSONL needs its <stem>_labels.lst / "
              "<stem>-labels.lst next to it, or a label field.",
              "ybisk/piqa", "validation", "AFL-3.0", _piqa, ("goal", "sol1", "sol2")),
    Benchmark("mmlu", "mc", "MMLU (57 subjects, 4 choices).", "cais/mmlu", "test", "MIT", _mmlu,
              ("question", "subject", "choices", "answer"), hub_config="all"),
    # Built-in sets, written for tactful and shipped in the package; `split` picks train / test.
    Benchmark("builtin-harmful", "prompts", "tactful's built-in harmful requests across 8 harm domains.",
              None, "", "Apache-2.0", _builtin_harmful, ("prompt", "category", "id", "split")),
    Benchmark("builtin-harmful-questions", "prompts",
              "tactful's built-in short harmful requests, mostly plain questions, 30 per harm domain.",
              None, "", "Apache-2.0", _builtin_harmful_questions, ("prompt", "category", "id", "split", "shape")),
    Benchmark("builtin-question-declines", "examples",
              "tactful's built-in short harmful questions (train split) with a one-sentence decline.",
              None, "", "Apache-2.0", _builtin_question_declines, ("prompt", "decline", "category", "id")),
    Benchmark("builtin-seemingly-toxic", "prompts",
              "tactful's built-in benign prompts that only sound harmful (XSTest-style types).",
              None, "", "Apache-2.0", _builtin_seemingly_toxic, ("prompt", "type", "id", "split")),
    Benchmark("builtin-seemingly-toxic-more", "prompts",
              "a second set of tactful's built-in benign prompts that only sound harmful (20 per type).",
              None, "", "Apache-2.0", _builtin_seemingly_toxic, ("prompt", "type", "id", "split")),
    Benchmark("builtin-seemingly-toxic-more-answers", "examples",
              "the second set of built-in seemingly-toxic prompts with short compliant answers.",
              None, "", "Apache-2.0", _builtin_seemingly_toxic_answers, ("prompt", "response", "type", "id")),
    Benchmark("builtin-benign", "examples", "tactful's built-in ordinary instructions with good answers.",
              None, "", "Apache-2.0", _builtin_benign, ("prompt", "response", "category", "id", "split")),
    Benchmark("builtin-labelled", "labelled",
              "tactful's built-in responses labelled full_compliance / full_refusal / partial_refusal.",
              None, "", "Apache-2.0", _builtin_labelled, ("prompt", "response", "label", "id", "split")),
    Benchmark("builtin-refusals", "examples", "tactful's built-in harmful prompts paired with refusals.",
              None, "", "Apache-2.0", _builtin_harmful_examples("refusal"), ("prompt", "refusal", "category", "id")),
    Benchmark("builtin-informative", "examples",
              "tactful's built-in harmful prompts paired with safe-but-informative answers.",
              None, "", "Apache-2.0", _builtin_harmful_examples("informative"),
              ("prompt", "informative", "category", "id")),
    Benchmark("builtin-seemingly-toxic-answers", "examples",
              "tactful's built-in seemingly-toxic prompts with compliant answers (the STL-aug baseline's data).",
              None, "", "Apache-2.0", _builtin_seemingly_toxic_answers, ("prompt", "response", "type", "id")),
    Benchmark("builtin-declines", "examples",
              "tactful's built-in harmful prompts with a one-sentence decline (the informative answer's first "
              "sentence).", None, "", "Apache-2.0", _builtin_harmful_examples("informative"),
              ("prompt", "informative", "category", "id")),
    Benchmark("builtin-own-helpful", "examples",
              "the embedded model's own replies to built-in benign / seemingly-toxic prompts that careful reading "
              "found helpful (from the gold set), cut after the last full sentence: self-distillation data.",
              None, "", "Apache-2.0", _builtin_seemingly_toxic_answers, ("prompt", "response", "id")),
    Benchmark("builtin-gold-pairs", "pairs",
              "preference pairs from careful reading: replies of the embedded model and its fine-tuned variants "
              "to built-in train prompts, labelled in the gold set (declined > attempted or filler on harmful "
              "prompts; helpful > refused or failed on benign ones).", None, "", "Apache-2.0", _tactful_pairs,
              ("prompt", "chosen", "rejected", "id")),
    Benchmark("builtin-capability", "mc",
              "tactful's built-in grade-school multiple-choice questions (6 categories), scored by log-likelihood.",
              None, "", "Apache-2.0", _builtin_mc("builtin:capability"), ("question", "choices", "answers", "id")),
    Benchmark("builtin-truthfulness", "mc",
              "tactful's built-in misconception questions in TruthfulQA MC2 form.",
              None, "", "Apache-2.0", _builtin_mc("builtin:truthfulness"), ("question", "choices", "answers", "id")),
)


def list_benchmarks() -> list[Benchmark]:
    """All registered benchmarks, in registration order (harmful, over-refusal, pairs, capability, built-in)."""
    return list(_REGISTRY.values())


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called `name`; a UserError suggesting close names if there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown benchmark {name!r}{_suggest(name)}") from None


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name.lower(), list(_REGISTRY), n=3, cutoff=0.5)
    if close:
        return f"; did you mean {' or '.join(repr(c) for c in close)}?"
    return f"; known benchmarks: {', '.join(_REGISTRY)}"


def load_benchmark(name: str, *, path: str | None = None, split: str | None = None, n: int | None = None,
                   seed: int = 0) -> list:
    """Records of a named benchmark.

    With `path`, read that local file (in the benchmark's own columns) and adapt it;
    otherwise built-in sets load from the package and the rest from the hub (`split`
    overrides the hub split; for built-in sets it picks train / test, None = both).
    `n` keeps a deterministic subsample of n records (seeded, original order kept).
    """
    bench = get_benchmark(name)
    _check_n(n)
    if path is not None:
        file = Path(path).expanduser()
        rows = read_rows(file)
        if name in _PREPARE:
            rows = _PREPARE[name](file, rows)
        records = bench.adapter(rows)
        where = str(file)
    elif name in _BUILTIN_LOADERS:
        records = _load_builtin(name, split)
        where = f"built-in set {name}"
    else:
        if bench.hub_id is None:
            raise UserError(f"benchmark {name!r} has no hub copy; download it and pass its local path "
                            f"(columns: {', '.join(bench.columns)})")
        records = bench.adapter(_read_from_hub(bench, split or bench.hub_split))
        where = f"{bench.hub_id} [{split or bench.hub_split}]"
    if not records:
        raise UserError(f"{where} gave no {name} records (expected columns: {', '.join(bench.columns)})")
    return _subsample(records, n, seed)


def _load_builtin(name: str, split: str | None) -> list:
    try:
        return _BUILTIN_LOADERS[name](split)
    except FileNotFoundError as e:
        # Package data, not user input: a missing file means a broken or partial install.
        raise UserError(f"built-in data file {e.filename} is missing; reinstall tactful") from None


def _read_from_hub(bench: Benchmark, split: str) -> list[Row]:
    assert bench.hub_id is not None
    data_files = _HUB_DATA_FILES[bench.name](split) if bench.name in _HUB_DATA_FILES else None
    try:
        # read_hub passes data_files through to datasets.load_dataset, which takes a {split: file} dict.
        return read_hub(bench.hub_id, split=split, name=bench.hub_config,
                        data_files=data_files)  # type: ignore[arg-type]
    except UserError as e:
        if bench.license.startswith("gated"):
            raise UserError(f"{e} ({bench.hub_id} is gated: accept its terms on the hub and run "
                            "`huggingface-cli login`)") from None
        raise


def load_records(source: str, *, kind: str | None = None, split: str | None = None, n: int | None = None,
                 seed: int = 0) -> list:
    """Records from a registry name, or from a file already in tactful's record format.

    A file's kind is inferred from its first row when `kind` is None: prompt + chosen +
    rejected -> pairs, question + choices -> mc, prompt + response + a judge label ->
    labelled, prompt + response -> examples, prompt -> prompts.
    """
    if kind is not None and kind not in RECORD_TYPES:
        raise UserError(f"unknown record kind {kind!r}; choose one of {', '.join(RECORD_TYPES)}")
    _check_n(n)
    if source in _REGISTRY:
        bench = _REGISTRY[source]
        if kind is not None and kind != bench.kind:
            raise UserError(f"benchmark {source!r} gives {bench.kind}, not {kind}")
        return load_benchmark(source, split=split, n=n, seed=seed)
    path = Path(source).expanduser()
    if not path.exists() and not _looks_like_path(source):
        raise UserError(f"{source!r} is neither a registered benchmark nor an existing file{_suggest(source)}")
    rows = read_rows(path)  # a missing path is reported here as "does not exist"
    kind = kind or _infer_kind(rows[0])
    records = [_to_record(RECORD_TYPES[kind], kind, r) for r in rows]
    return _subsample(records, n, seed)


def _looks_like_path(source: str) -> bool:
    return "/" in source or "\\" in source or Path(source).suffix.lower().lstrip(".") in FORMATS + ("ndjson",)


def _infer_kind(row: Row) -> str:
    keys = set(row.data)
    if {"prompt", "chosen", "rejected"} <= keys:
        return "pairs"
    if {"question", "choices"} <= keys:
        return "mc"
    if {"prompt", "response"} <= keys:
        return "labelled" if row.get("label") in RESPONSE_CLASSES else "examples"
    if "prompt" in keys:
        return "prompts"
    have = ", ".join(sorted(map(str, keys))) or "none"
    raise UserError(
        f"cannot tell the record kind from the fields ({have}): expected prompt (prompts), prompt+response "
        "(examples or labelled), prompt+chosen+rejected (pairs) or question+choices (mc). A benchmark file in "
        "its own columns loads with load_benchmark(name, path=...)", where=row.where)


_TEXT_FIELDS = {"prompt", "response", "chosen", "rejected", "question", "label", "context"}


def _to_record(cls: type, kind: str, row: Row) -> Any:
    """One record from a row in tactful's own format, checking required fields and types."""
    d: dict[str, Any] = {}
    names = {f.name for f in fields(cls)}
    for f in fields(cls):
        required = f.default is MISSING and f.default_factory is MISSING
        value = row.require(f.name) if required else row.get(f.name)
        if not required and (value is None or value == ""):
            continue  # CSV files write absent optional fields as empty strings
        if f.name == "choices":
            value = [_as_text(c, row, "choices") for c in _structured(row, "choices", list, value)]
        elif f.name == "answers":
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value)  # one answer index, as a CSV cell
            value = [value] if isinstance(value, int) else _structured(row, "answers", list, value)
            value = [_int(a, row, "answers") for a in value]
        elif f.name in ("chosen_safe", "rejected_safe"):
            value = parse_bool(value, row, f.name)
        elif f.name == "meta":
            value = _structured(row, "meta", dict, value)
        else:
            value = _as_text(value, row, f.name)
            if f.name in _TEXT_FIELDS and required and not value.strip():
                raise UserError(f"field {f.name!r} is empty", where=row.where)
        d[f.name] = value
    extra = {k: v for k, v in row.data.items() if k not in names}
    if extra:  # unknown fields are kept, in meta, as from_dict does
        d["meta"] = {**d.get("meta", {}), **extra}
    if kind == "mc":
        bad = [a for a in d["answers"] if not 0 <= a < len(d["choices"])]
        if bad or not d["answers"]:
            raise UserError(f"answers {d['answers']} should be indices into the {len(d['choices'])} choices",
                            where=row.where)
    if kind == "labelled" and d["label"] not in RESPONSE_CLASSES:
        raise UserError(f"label {d['label']!r} should be one of {', '.join(RESPONSE_CLASSES)}", where=row.where)
    return cls(**d)


def _check_n(n: int | None) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UserError(f"n should be a positive number of records, got {n!r}")


def _subsample(records: list, n: int | None, seed: int) -> list:
    """n records chosen by a seeded shuffle, kept in their original order (same seed, same subset)."""
    if n is None or n >= len(records):
        return records
    chosen = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in chosen]


def benchmark_names(kind: str | None = None) -> list[str]:
    """Registered names, optionally only those giving records of `kind`."""
    return [b.name for b in _REGISTRY.values() if kind is None or b.kind == kind]
