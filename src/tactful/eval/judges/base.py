"""Judge records, the `Judge` protocol, the judge registry and judge-vs-human agreement.

A judge turns (prompt, response) items into `Verdict`s. It never raises for one bad
item: a failure (endpoint down, unparseable reply) becomes a Verdict with `error` set
and label "error", so a long evaluation keeps every other item.

Judges are created by name (`get_judge("string-xstest")`) so that reports can always
say which judge produced a number. Factories import their heavy dependencies lazily:
importing this package does not import torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

from tactful.data.records import FULL_COMPLIANCE, FULL_REFUSAL, PARTIAL_REFUSAL, RESPONSE_CLASSES
from tactful.errors import UserError

ERROR = "error"
REFUSAL_LABELS = RESPONSE_CLASSES  # ("full_compliance", "full_refusal", "partial_refusal")
REFUSED_LABELS = (FULL_REFUSAL, PARTIAL_REFUSAL)
TASKS = ("refusal", "strongreject", "informativeness", "policy", "safety")


@dataclass
class JudgeItem:
    """One thing to judge. `meta` may carry `category`, `policy` (text for the policy judge)
    and `reference` (a reference answer)."""

    prompt: str
    response: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Verdict:
    """A judge's decision on one item.

    label: refusal judges "full_compliance" | "full_refusal" | "partial_refusal";
        policy "violates" | "complies"; informativeness "scored"; guards "safe" | "unsafe";
        "error" when the judge failed on this item.
    refused: True for full_refusal and partial_refusal; None when the judge cannot say.
    score: informativeness 1-10, StrongREJECT score 0-1, a classifier probability, ...
    """

    label: str
    refused: bool | None = None
    score: float | None = None
    rationale: str | None = None
    error: str | None = None
    # outcome judges (docs/judging.md) also say, where the prompt type makes it meaningful:
    uplift: bool | None = None  # harmful prompt: the reply moves the harmful goal forward
    helpful: bool | None = None  # benign prompt: a reader gets at least part of what was asked
    degenerate: bool | None = None  # any reply: loops, word salad, nothing said
    evasive: bool | None = None  # harmful prompt: neither declines nor attempts (off-topic filler)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class Judge(Protocol):
    name: str
    task: str

    def judge(self, items: list[JudgeItem]) -> list[Verdict]: ...


def refusal_verdict(label: str, *, score: float | None = None, rationale: str | None = None) -> Verdict:
    """A refusal-task Verdict with `refused` filled in from the label."""
    if label not in REFUSAL_LABELS:
        raise ValueError(f"not a refusal label: {label!r}")
    return Verdict(label=label, refused=label in REFUSED_LABELS, score=score, rationale=rationale)


def error_verdict(message: str, *, rationale: str | None = None) -> Verdict:
    return Verdict(label=ERROR, error=message, rationale=rationale)


def as_items(items: Iterable[Any]) -> list[JudgeItem]:
    """Accept JudgeItems or any record with `prompt` and `response` (e.g. LabelledResponse)."""
    out = []
    for it in items:
        if isinstance(it, JudgeItem):
            out.append(it)
        elif isinstance(it, dict):
            out.append(JudgeItem(prompt=it.get("prompt", ""), response=it.get("response", ""),
                                 meta=dict(it.get("meta") or {})))
        else:
            meta = dict(getattr(it, "meta", None) or {})
            if getattr(it, "category", None) is not None:
                meta.setdefault("category", it.category)
            out.append(JudgeItem(prompt=it.prompt, response=it.response, meta=meta))
    return out


# ---------------------------------------------------------------- registry
#
# A factory is a callable or the import path "package.module:function" of one. Import paths
# let a higher layer (a method's judges, the guard models) be named here without this module
# importing it: the module is imported only when its judge is created, so no import circle.

Factory = Callable[..., Judge] | str
_REGISTRY: dict[str, tuple[Factory, str]] = {}
# Shorthand prefixes such as "guard:": prefix -> factory(rest_of_name, **options)
_PREFIXES: dict[str, Factory] = {}


def register_judge(name: str, factory: Factory, help: str = "") -> None:
    """Register `factory(**options) -> Judge` (or its "module:function" path) under `name`."""
    _REGISTRY[name] = (factory, help)


def register_judge_prefix(prefix: str, factory: Factory) -> None:
    """Accept names `<prefix><spec>`: the judge is `factory(spec, **options)`."""
    _PREFIXES[prefix] = factory


def resolve_factory(factory: Factory) -> Callable[..., Judge]:
    if callable(factory):
        return factory
    import importlib

    module, _, attr = factory.partition(":")
    return getattr(importlib.import_module(module), attr)


def list_judges() -> list[str]:
    return sorted(_REGISTRY)


def judge_help() -> dict[str, str]:
    return {name: _REGISTRY[name][1] for name in list_judges()}


def _lookup(name: str) -> tuple[Factory, dict[str, Any]] | None:
    """The factory for `name` and the options its shorthand implies, or None if unknown."""
    if name in _REGISTRY:
        return _REGISTRY[name][0], {}
    if name.startswith("llm:"):
        parts = name.split(":")
        if len(parts) >= 3 and f"llm-{parts[-1]}" in _REGISTRY:
            return _REGISTRY[f"llm-{parts[-1]}"][0], {"model": ":".join(parts[1:-1])}
    for prefix, factory in _PREFIXES.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            spec = name[len(prefix):]
            return (lambda **o: resolve_factory(factory)(spec, **o)), {}
    return None


def check_judge_name(name: str) -> None:
    """A UserError if no judge answers to `name`; creates nothing (so it is cheap to call early)."""
    if _lookup(name) is None:
        shorthands = " and ".join(["llm:<model>:<rubric>", *(f"{p}<model>" for p in _PREFIXES)])
        raise UserError(f"unknown judge {name!r}; known judges: {', '.join(list_judges())} (also {shorthands})")


def get_judge(name: str, **options: Any) -> Judge:
    """A judge by registry name, with its options.

    Besides the registered names, shorthands are accepted: `llm:<model>:<rubric>` (e.g.
    `llm:gpt-4o:refusal`, options base_url / api_key_env) and the registered prefixes, such
    as `guard:<model dir or hub id>` (a sequence classifier or a Llama-Guard-style generator).
    """
    check_judge_name(name)
    factory, implied = _lookup(name)  # type: ignore[misc]
    return _make(name, resolve_factory(factory), {**options, **implied})


def _make(name: str, factory: Callable[..., Judge], options: dict[str, Any]) -> Judge:
    try:
        return factory(**options)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise UserError(f"judge {name}: {e}") from None
        raise


# ---------------------------------------------------------------- agreement with human labels

def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def evaluate_judges(items: Sequence[Any], judges: Sequence[Judge | str]) -> dict[str, dict[str, Any]]:
    """Agreement of refusal judges with human labels, judge by judge, on the same items.

    items: records with prompt, response and a `label` in full_compliance / full_refusal /
    partial_refusal (e.g. `labelled_responses("test")`).
    Returns {judge name: {"n", "accuracy_3class", "accuracy_binary" (refused vs not),
    their 95% Wilson intervals, "n_errors", "confusion" {gold: {predicted: count}}}}.
    Errors count as wrong. String judges never predict partial_refusal, so their 3-class
    accuracy is bounded by the share of non-partial items.
    """
    golds = [getattr(it, "label", None) if not isinstance(it, dict) else it.get("label") for it in items]
    bad = sorted({str(g) for g in golds if g not in REFUSAL_LABELS})
    if bad:
        raise UserError(f"evaluate_judges needs labels in {', '.join(REFUSAL_LABELS)}; got {', '.join(bad)}")
    jitems = as_items(items)
    report: dict[str, dict[str, Any]] = {}
    for j in judges:
        judge = get_judge(j) if isinstance(j, str) else j
        verdicts = judge.judge(jitems)
        if len(verdicts) != len(jitems):
            raise RuntimeError(f"judge {judge.name} returned {len(verdicts)} verdicts for {len(jitems)} items")
        n = len(jitems)
        k3 = sum(v.error is None and v.label == g for v, g in zip(verdicts, golds))
        kb = sum(v.error is None and v.refused is not None and v.refused == (g in REFUSED_LABELS)
                 for v, g in zip(verdicts, golds))
        confusion: dict[str, dict[str, int]] = {g: {} for g in REFUSAL_LABELS}
        for v, g in zip(verdicts, golds):
            confusion[g][v.label] = confusion[g].get(v.label, 0) + 1
        report[judge.name] = {
            "task": judge.task,
            "n": n,
            "accuracy_3class": k3 / n if n else float("nan"),
            "accuracy_3class_ci95": list(wilson_interval(k3, n)),
            "accuracy_binary": kb / n if n else float("nan"),
            "accuracy_binary_ci95": list(wilson_interval(kb, n)),
            "n_errors": sum(v.error is not None for v in verdicts),
            "confusion": confusion,
        }
    return report


def format_judge_report(report: dict[str, dict[str, Any]]) -> str:
    """A small fixed-width table of `evaluate_judges` output."""
    lines = [f"{'judge':<22} {'n':>5} {'3-class acc':>20} {'binary acc':>20}"]
    for name, r in report.items():
        lo3, hi3 = r["accuracy_3class_ci95"]
        lob, hib = r["accuracy_binary_ci95"]
        lines.append(
            f"{name:<22} {r['n']:>5} {r['accuracy_3class']:>7.3f} [{lo3:.3f},{hi3:.3f}] "
            f"{r['accuracy_binary']:>7.3f} [{lob:.3f},{hib:.3f}]"
        )
    return "\n".join(lines)


__all__ = [
    "ERROR", "FULL_COMPLIANCE", "FULL_REFUSAL", "PARTIAL_REFUSAL", "REFUSAL_LABELS", "REFUSED_LABELS", "TASKS",
    "Judge", "JudgeItem", "Verdict", "as_items", "error_verdict", "evaluate_judges", "format_judge_report",
    "check_judge_name", "get_judge", "judge_help", "list_judges", "refusal_verdict", "register_judge",
    "register_judge_prefix", "resolve_factory", "wilson_interval",
]
