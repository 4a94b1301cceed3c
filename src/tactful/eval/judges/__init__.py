"""Pluggable judges, always named in reports.

    from tactful.eval.judges import JudgeItem, get_judge
    judge = get_judge("embedding-minilm")
    verdicts = judge.judge([JudgeItem(prompt="...", response="...")])

Registered names (`list_judges()`):
- string-xstest, string-gcg: the two refusal string-match conventions (string_match.py)
- outcome-minilm: what a reply does (declined / evasive / attempted, uplift, helpful, degenerate),
  fit and measured on the gold set of real replies (outcome.py); the default
- embedding-minilm: MiniLM embeddings + a fitted 3-class refusal head, offline (embedding.py)
- llm-refusal, llm-strongreject, llm-informativeness, llm-policy: published rubrics sent to
  an OpenAI-compatible endpoint; options base_url, model, api_key_env (llm.py, rubrics.py)
- guard-classifier, guard-generative: local guard models; option model (guard.py)
- informativeness-proxy: offline proxy of the informativeness rubric (informativeness.py)
- policy-rules, policy-minilm: TRACE's policy judges (tactful/methods/trace/judges.py)
Shorthands: `llm:<model>:<rubric>` and `guard:<model>`.

Judges of modules that import this package (guard.py, TRACE's) are registered by import
path, so nothing here imports them back.

Heavy dependencies (torch, transformers) are imported only when a judge is created.
"""

from __future__ import annotations

from typing import Any

from tactful.errors import UserError

from tactful.eval.judges.base import (
    ERROR,
    REFUSAL_LABELS,
    REFUSED_LABELS,
    Judge,
    JudgeItem,
    Verdict,
    as_items,
    check_judge_name,
    error_verdict,
    evaluate_judges,
    format_judge_report,
    get_judge,
    judge_help,
    list_judges,
    refusal_verdict,
    register_judge,
    register_judge_prefix,
    wilson_interval,
)


def _string_xstest(**options: Any) -> Judge:
    from tactful.eval.judges.string_match import XSTestStringJudge

    if options:
        raise UserError(f"string-xstest takes no options (got {', '.join(options)})")
    return XSTestStringJudge()


def _string_gcg(**options: Any) -> Judge:
    from tactful.eval.judges.string_match import GCGStringJudge

    if options:
        raise UserError(f"string-gcg takes no options (got {', '.join(options)})")
    return GCGStringJudge()


def _embedding(**options: Any) -> Judge:
    from tactful.eval.judges.embedding import EmbeddingJudge

    return EmbeddingJudge(**options)


def _outcome(**options: Any) -> Judge:
    from tactful.eval.judges.outcome import OutcomeJudge

    return OutcomeJudge(**options)


def _llm(rubric: str):
    def make(**options: Any) -> Judge:
        from tactful.eval.judges.llm import LLMJudge

        return LLMJudge(rubric, **options)

    return make


register_judge("string-xstest", _string_xstest, "refusal if the lower-cased reply starts with an XSTest prefix")
register_judge("string-gcg", _string_gcg, "refusal if a GCG/AdvBench phrase appears anywhere (case-sensitive)")
register_judge("outcome-minilm", _outcome,
               "declined / evasive / attempted + harmful uplift; helpful / refused / failed; degenerate "
               "(MiniLM + heads fit on the gold set of real replies; the default)")
register_judge("embedding-minilm", _embedding,
               "offline MiniLM embeddings + fitted 3-class head (full_compliance/full_refusal/partial_refusal)")
register_judge("llm-refusal", _llm("refusal"), "XSTest 3-class rubric via an OpenAI-compatible endpoint")
register_judge("llm-strongreject", _llm("strongreject"), "StrongREJECT rubric (score 0-1) via an endpoint")
register_judge("llm-informativeness", _llm("informativeness"), "1-10 informativeness of safe answers via an endpoint")
register_judge("llm-policy", _llm("policy"), "Yes/No violation of item.meta['policy'] via an endpoint")
# By import path (see base.py): guard.py imports base, so base must not import it.
register_judge("guard-classifier", "tactful.eval.judges.guard:guard_classifier",
               "local sequence-classifier guard (option model)")
register_judge("guard-generative", "tactful.eval.judges.guard:guard_generative",
               "local Llama-Guard-style generative guard (option model)")
register_judge_prefix("guard:", "tactful.eval.judges.guard:guard_judge")

__all__ = [
    "ERROR", "REFUSAL_LABELS", "REFUSED_LABELS", "Judge", "JudgeItem", "Verdict", "as_items", "check_judge_name",
    "error_verdict", "evaluate_judges", "format_judge_report", "get_judge", "judge_help", "list_judges",
    "refusal_verdict", "register_judge", "register_judge_prefix", "wilson_interval",
]


def _informativeness_proxy(**options: Any) -> Judge:
    from tactful.eval.judges.informativeness import make

    return make(**options)


register_judge("informativeness-proxy", _informativeness_proxy,
               "offline proxy of the 1-10 informativeness rubric: on-topic substance of safe answers (MiniLM)")
# TRACE's policy judges live with the method (methods/trace/judges.py), a layer above this
# package; naming them by import path keeps `get_judge("policy-rules")` working without this
# package importing the method (which imports this package).
register_judge("policy-rules", "tactful.methods.trace.judges:policy_rules_judge",
               "transparent offline policy judge: category rule + refusal + allowed-context detection "
               "(options policy, refusal)")
register_judge("policy-minilm", "tactful.methods.trace.judges:policy_minilm_judge",
               "MiniLM + a head fitted for one policy (options head, policy)")
