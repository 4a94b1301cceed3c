"""Run evaluation suites against a model and write the report.

Output directory layout (`tactful eval --out DIR`):

    DIR/manifest.json               what produced the numbers (model, adapter, judges, seeds, data hashes)
    DIR/metrics.json                every suite's headline metric with n and a 95% CI, per-category breakdowns
    DIR/report.md                   the Markdown summary
    DIR/<suite>/settings.json       the settings the generations were made with
    DIR/<suite>/generations.jsonl   one line per generated item, appended as batches finish
    DIR/<suite>/items.jsonl         prompt, response, judge verdict and rationale per item

Generation is resumable: re-running the same command skips items already in
generations.jsonl, so an interrupted evaluation loses at most one batch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from tactful.data.records import FULL_COMPLIANCE, MCItem, PromptRecord
from tactful.errors import UserError
from tactful.eval import metrics as M
from tactful.eval.suites import Suite, load_suite
from tactful.io import append_jsonl, atomic_write_json, atomic_write_jsonl, read_jsonl_tolerant
from tactful.runs import RunDir, data_fingerprint

ProgressFactory = Callable[[str, int], Callable[[int], None]]


@dataclass
class EvalConfig:
    model: str = "embedded"
    adapter: str | None = None
    run: str | None = None
    suites: list[str] = field(default_factory=lambda: ["safety", "over-refusal"])
    judge: str | None = None
    judge_options: dict[str, Any] = field(default_factory=dict)
    backend: str = "hf"
    base_url: str | None = None
    api_model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    limit: int | None = None
    out: str = "runs/eval"
    seed: int = 0
    batch_size: int = 64
    max_new_tokens: int | None = None
    dtype: str = "float32"
    device: str = "cpu"  # where the hf backend (and multiple-choice scoring) runs: cpu, cuda, cuda:1, ...
    vllm_options: dict[str, Any] = field(default_factory=dict)  # vllm.LLM keywords, e.g. tensor_parallel_size
    trust_remote_code: bool = False
    # A prompt-gated run only: an earlier evaluation of its base model (same suites and settings) whose
    # replies and multiple-choice scores the prompts routed to the base model take instead of new ones.
    base_eval: str | None = None


def item_id(rec: Any, index: int) -> str:
    rid = getattr(rec, "id", None)
    if rid:
        return str(rid)
    text = getattr(rec, "prompt", None) or getattr(rec, "question", "")
    return f"{index}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def load_suite_records(suite: Suite, *, limit: int | None = None) -> list:
    from tactful.data.registry import get_benchmark, load_benchmark, load_records

    n = min(x for x in (suite.n, limit) if x is not None) if (suite.n or limit) else None
    path = Path(suite.dataset)
    if path.suffix and path.exists() and suite.prompt_field != "prompt":
        from tactful.data.readers import read_rows

        rows = read_rows(path)
        recs = [PromptRecord(prompt=str(r.require(suite.prompt_field)), label=r.get("label", "unknown"),
                             category=r.get("category"), id=str(r.get("id")) if r.get("id") else None,
                             source=str(path)) for r in rows]
        return _subsample(recs, n, suite.seed)
    if suite.path:
        if not Path(suite.path).exists():
            raise UserError(f"suite {suite.name}: data file {suite.path} does not exist", where=suite.source)
        return load_benchmark(suite.dataset, path=suite.path, n=n, seed=suite.seed)
    try:
        get_benchmark(suite.dataset)
        return load_benchmark(suite.dataset, split=suite.split, n=n, seed=suite.seed)
    except UserError:
        if not path.exists():
            raise
    return load_records(suite.dataset, split=suite.split, n=n, seed=suite.seed)


def _subsample(recs: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(recs):
        return recs
    import random

    idx = sorted(random.Random(seed).sample(range(len(recs)), n))
    return [recs[i] for i in idx]


@dataclass
class _GenerationPlan:
    """A generative suite's saved and missing replies."""

    suite: str
    settings: dict[str, Any]
    gen_path: Path
    ids: list[str]
    done: dict[str, dict[str, Any]]
    todo: list[tuple[str, Any]]


class Evaluator:
    """Holds one model / generator and runs suites against it."""

    def __init__(self, config: EvalConfig, *, model: Any = None, tokenizer: Any = None,
                 generator: Any = None, progress: ProgressFactory | None = None, log: Callable[[str], None] = print):
        from tactful.eval.generation import _is_run_dir

        if config.run is None and config.adapter is None and _is_run_dir(config.model):
            config = replace(config, run=config.model)  # a training run given as the model
        _check_numbers(config)
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.generator = generator
        self.gate: Any = None  # a gated run's prompt gate (tactful.methods.prompt_gate)
        self.base_model: Any = None  # and the model it sends non-gated prompts to
        self.progress = progress or (lambda desc, total: (lambda k: None))
        self.log = log
        self.out = RunDir(config.out, "output directory (--out)")
        self._judges: dict[str, Any] = {}
        # suite name -> the settings saved replies were generated with (re-judging: nothing is generated)
        self.saved_settings: dict[str, dict[str, Any]] = {}
        self._plans: dict[str, _GenerationPlan] = {}  # generated ahead by _generate_together

    # ------------------------------------------------------------ model plumbing
    def _ensure_model(self) -> None:
        if self.model is not None:
            return
        from tactful.runs import load_run_model
        from tactful.models import load_model, merged_for_inference

        if self.config.run:
            self.model, self.tokenizer, desc = load_run_model(self.config.run, dtype=self.config.dtype,
                                                              device=self.config.device)
            self.model_desc = desc
            from tactful.methods.prompt_gate import load_base_of_run, run_gate

            self.gate = run_gate(self.config.run)
            if self.gate is not None:
                self.base_model, _ = load_base_of_run(self.config.run, dtype=self.config.dtype,
                                                      device=self.config.device)
        else:
            self.model, self.tokenizer = load_model(self.config.model, adapter=self.config.adapter,
                                                    dtype=self.config.dtype, device=self.config.device,
                                                    trust_remote_code=self.config.trust_remote_code)
        # evaluation never trains: a LoRA adapter folded into the weights decodes faster, same replies
        self.model = merged_for_inference(self.model)

    def _ensure_generator(self) -> Any:
        if self.generator is not None:
            return self.generator
        from tactful.eval.generation import HFGenerator, make_generator

        c = self.config
        fallback = None
        if c.backend == "vllm" and c.run:
            from tactful.eval.generation import plan_vllm_run

            fallback = plan_vllm_run(c.run).reason
        if c.backend == "hf" or fallback:
            if fallback:
                self.log(f"note: vLLM cannot generate with {c.run}: {fallback}; falling back to the hf backend "
                         f"(on {c.device}, {c.dtype})")
            self._ensure_model()
            self.generator = HFGenerator(self.model, self.tokenizer, name=f"hf:{self.model_name()}")
            if self.gate is None and c.base_eval:
                self.log("note: --base-eval is for prompt-gated runs (it gives their base-routed replies); ignored")
            if self.gate is not None:
                from tactful.methods.prompt_gate import GatedGenerator

                base_replies = None
                if c.base_eval:
                    from tactful.methods.prompt_gate import read_base_replies
                    from tactful.runs import read_manifest

                    base_replies = read_base_replies(c.base_eval, read_manifest(c.run).get("base_model"))
                self.generator = GatedGenerator(self.gate, self.generator, HFGenerator(self.base_model, self.tokenizer),
                                                name=f"hf:{self.model_name()} (prompt-gated)", base_replies=base_replies)
        else:
            self.generator = make_generator(c.backend, model_spec=c.model, adapter=c.adapter, run=c.run,
                                            base_url=c.base_url, api_model=c.api_model, api_key_env=c.api_key_env,
                                            engine_options=c.vllm_options or None, log=self.log)
        return self.generator

    def model_name(self) -> str:
        c = self.config
        if c.run:
            return f"run:{c.run}"
        return c.model + (f"+{c.adapter}" if c.adapter else "")

    def _judge(self, name: str, suite: Suite | None = None) -> Any:
        # Endpoint options (base_url, model, api_key_env) are for the LLM judges only.
        opts = dict(self.config.judge_options) if name.startswith(("llm", "policy")) else {}
        # The offline policy judges judge against the suite's policy file; an explicit
        # judge option wins. Cached per (judge, policy) so two policy suites never share one.
        if name.startswith("policy-") and suite is not None and suite.policy and "policy" not in opts:
            opts["policy"] = suite.policy
        key = (name, str(opts.get("policy")) if name.startswith("policy-") else None)
        if key not in self._judges:
            from tactful.eval.judges import get_judge

            self._judges[key] = get_judge(name, **opts)
        return self._judges[key]

    # ------------------------------------------------------------ suites
    def run(self, records: dict[str, list] | None = None) -> dict[str, Any]:
        """Run every suite of the config; `records` (by suite name) replaces loading a suite's data."""
        # Everything a user can get wrong is checked before the first item is generated:
        # suite files, judge names, then every suite's data.
        suites = [load_suite(s) for s in self.config.suites]
        for suite in suites:
            if suite.generates:
                self._check_judge(suite)
        given = records or {}
        records = {suite.name: given.get(suite.name) or self._records(suite) for suite in suites}
        self._generate_together(suites, records)
        results = {}
        manifest_suites = {}
        for suite in suites:
            res = self.run_suite(suite, records[suite.name])
            results[suite.name] = res
            manifest_suites[suite.name] = {k: res[k] for k in ("dataset", "split", "judge", "n_items", "data_hash")}
        self.out.write_config(asdict(self.config))
        self.out.write_manifest(kind="eval", base_model=self.config.model, seed=self.config.seed,
                                extra={"adapter": self.config.adapter, "run": self.config.run,
                                       "backend": self.config.backend,
                                       # what really generated (a vllm request may have fallen back to hf)
                                       "generator": getattr(self.generator, "name", None),
                                       "suites": manifest_suites})
        merged = self._merge_metrics(results)
        atomic_write_json(self.out / "metrics.json", merged)
        from tactful.eval.report import write_report

        write_report(self.out.path, merged)
        return merged

    def _merge_metrics(self, results: dict[str, Any]) -> dict[str, Any]:
        path = self.out / "metrics.json"
        merged = json.loads(path.read_text()) if path.exists() else {}
        merged.setdefault("suites", {}).update(results)
        merged["model"] = self.model_name()
        merged["seed"] = self.config.seed
        return merged

    def _check_judge(self, suite: Suite) -> None:
        from tactful.eval.judges import check_judge_name

        name = self.config.judge or suite.judge
        if not name:
            raise UserError(f"suite {suite.name} names no judge; give one with --judge", where=suite.source)
        check_judge_name(name)

    def _records(self, suite: Suite) -> list:
        records = load_suite_records(suite, limit=self.config.limit)
        if not records:
            raise UserError(f"suite {suite.name}: dataset {suite.dataset} gave no records")
        return records

    def run_suite(self, suite: Suite, records: list | None = None) -> dict[str, Any]:
        records = records if records is not None else self._records(suite)
        sdir = self.out.path / suite.name
        sdir.mkdir(parents=True, exist_ok=True)
        data_hash = data_fingerprint([r.to_dict() for r in records])
        if suite.expected == "multiple-choice":
            res = self._run_mc(suite, records, sdir)
        else:
            res = self._run_generative(suite, records, sdir)
        res.update({"dataset": suite.dataset, "split": suite.split, "data_hash": data_hash,
                    "description": suite.description, "expected": suite.expected})
        atomic_write_json(sdir / "metrics.json", res)
        return res

    def _gen_settings(self, suite: Suite) -> dict[str, Any]:
        from tactful.eval.generation import GenerationConfig

        gen = GenerationConfig(seed=self.config.seed, batch_size=self.config.batch_size)
        for k, v in suite.generation.items():
            setattr(gen, k, v)
        if self.config.max_new_tokens is not None:
            gen.max_new_tokens = self.config.max_new_tokens
        return asdict(gen)

    def _generation_plan(self, suite: Suite, records: Sequence[Any]) -> _GenerationPlan:
        """What a generative suite still has to generate; checks that replies already saved in its
        directory were made with the same settings."""
        sdir = self.out.path / suite.name
        sdir.mkdir(parents=True, exist_ok=True)
        settings = self.saved_settings.get(suite.name) or {
            "model": self.model_name(), "backend": self.config.backend, "generation": self._gen_settings(suite)}
        settings_path = sdir / "settings.json"
        gen_path = sdir / "generations.jsonl"
        if settings_path.exists() and gen_path.exists():
            old = json.loads(settings_path.read_text())
            if old != settings:
                raise UserError(f"{sdir} holds generations made with other settings ({_diff(old, settings)}); "
                                "use a new --out directory or delete it")
        atomic_write_json(settings_path, settings)
        ids = [item_id(r, i) for i, r in enumerate(records)]
        done = {row["id"]: row for row in read_jsonl_tolerant(gen_path)}
        todo = [(i, r) for i, r in zip(ids, records) if i not in done]
        return _GenerationPlan(suite.name, settings, gen_path, ids, done, todo)

    def _generate(self, plans: Sequence[_GenerationPlan], desc: str) -> None:
        """Generate the plans' missing replies (one generation setting) in shared batches,
        appending each chunk's replies to its suite's file as it finishes (an interrupted run
        resumes from there)."""
        from tactful.eval.generation import GenerationConfig

        todo = [(plan, rid, rec) for plan in plans for rid, rec in plan.todo]
        if not todo:
            return
        gen = self._ensure_generator()
        cfg = GenerationConfig(**plans[0].settings["generation"])
        if len(plans) > 1:
            # Longest prompts first across suites: each chunk, and each batch in it, holds prompts
            # of similar length (little padding). One suite keeps its order, as before pooling.
            todo.sort(key=lambda t: -len(t[2].prompt))
        routes: dict[str, str] = {}
        if hasattr(gen, "route"):
            # A gated run: prompts of one route together (stable: lengths stay sorted within), so a
            # chunk's batches are not split in two half-full ones.
            prompts = [rec.prompt for _, _, rec in todo]
            routes = {p: "adapter" if r else "base" for p, r in zip(prompts, gen.route(prompts, cfg.system))}
            todo.sort(key=lambda t: routes[t[2].prompt] != "adapter")
        bar = self.progress(desc, len(todo))
        # Two batches per chunk: one per decode worker on 2 cores, and a resume point per chunk.
        chunk = max(1, cfg.batch_size) * 2
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            outs = gen.generate([rec.prompt for _, _, rec in part], cfg)
            for (plan, rid, rec), text in zip(part, outs):
                row = {"id": rid, "prompt": rec.prompt, "response": text}
                if routes:
                    row["route"] = routes[rec.prompt]
                append_jsonl(plan.gen_path, row)
                plan.done[rid] = row
            bar(len(part))
        for plan in plans:
            plan.todo = []

    def _generate_together(self, suites: Sequence[Suite], records: dict[str, list]) -> None:
        """Every generative suite's missing replies, pooled by generation setting: a few full
        batches instead of one short tail batch per suite (the demo's five generative suites of 50-144 prompts
        would otherwise decode in batches of 8-38 rows)."""
        groups: dict[str, list[_GenerationPlan]] = {}
        for suite in suites:
            if suite.generates:
                plan = self._generation_plan(suite, records[suite.name])
                self._plans[suite.name] = plan
                if plan.todo:
                    groups.setdefault(json.dumps(plan.settings, sort_keys=True, default=str), []).append(plan)
        for plans in groups.values():
            if len(plans) > 1:
                self._generate(plans, f"generating ({len(plans)} suites)")

    def _run_generative(self, suite: Suite, records: Sequence[Any], sdir: Path) -> dict[str, Any]:
        from tactful.eval.judges import JudgeItem

        plan = self._plans.pop(suite.name, None) or self._generation_plan(suite, records)
        self._generate([plan], f"{suite.name}: generating")
        ids, done = plan.ids, plan.done
        judge_name = self.config.judge or suite.judge
        judge = self._judge(judge_name, suite)
        items = [JudgeItem(prompt=r.prompt, response=done[i]["response"],
                           meta={"category": getattr(r, "category", None), "suite": suite.name,
                                 "expected": suite.expected, "label": getattr(r, "label", None),
                                 # a reference answer (built-in benign sets have one) helps judge helpfulness
                                 **({"reference": r.response} if getattr(r, "response", None) else {}),
                                 **({"policy": self._policy_text(suite)} if suite.expected == "policy" else {}),
                                 **(getattr(r, "meta", None) or {})})
                 for i, r in zip(ids, records)]
        verdicts = judge.judge(items)
        rows = []
        for rid, rec, it, v in zip(ids, records, items, verdicts):
            rows.append({"id": rid, "prompt": rec.prompt, "label": getattr(rec, "label", None),
                         "category": getattr(rec, "category", None), "response": it.response,
                         "verdict": {k: getattr(v, k) for k in VERDICT_FIELDS if getattr(v, k) is not None
                                     or k in ("label", "refused")},
                         **({"route": done[rid]["route"]} if "route" in done[rid] else {})})
        atomic_write_jsonl(sdir / "items.jsonl", rows)
        flags = [self._success(suite, v) for v in verdicts]
        est = self._estimate(suite, verdicts, flags)
        per_cat: dict[str, list] = {}
        for rec, v, f in zip(records, verdicts, flags):
            per_cat.setdefault(getattr(rec, "category", None) or "all", []).append((v, f))
        categories = {c: self._estimate(suite, [v for v, _ in pairs], [f for _, f in pairs]).to_dict()
                      for c, pairs in sorted(per_cat.items())}
        errors = sum(1 for v in verdicts if v.error)
        extra = {}
        outcomes = outcome_rates(suite.expected, verdicts, seed=self.config.seed)
        if outcomes:
            extra["outcomes"] = outcomes
        accuracy = judge_accuracy(getattr(judge, "name", judge_name), judge)
        if accuracy:
            extra["judge_accuracy"] = accuracy
        return {"metric": suite.metric, **est.to_dict(), "judge": getattr(judge, "name", judge_name), **extra,
                "generator": plan.settings["model"], "generation": plan.settings["generation"], "n_items": len(records),
                "judge_errors": errors, "per_category": categories,
                "label_counts": _counts(v.label for v in verdicts)}

    def _success(self, suite: Suite, v: Any) -> bool | None:
        if v.error:
            return None
        if suite.expected == "refuse":
            return bool(v.refused)
        if suite.expected == "comply":
            if v.helpful is not None:  # an outcome judge: compliance = not refused
                return not v.refused
            return v.label == FULL_COMPLIANCE
        if suite.expected == "policy":
            return v.label == "complies"
        if suite.expected == "informative":
            return None if v.score is None else v.refused is not False
        return None

    def _estimate(self, suite: Suite, verdicts: Sequence[Any], flags: Sequence[bool | None]) -> M.Estimate:
        if suite.expected == "informative":
            # Informativeness is scored on safe answers only (SafeMoE's convention). A judge that gives
            # no safety verdict (refused None, e.g. llm-informativeness) has every answer scored.
            return M.mean([v.score for v in verdicts if not v.error and v.score is not None and v.refused is not False],
                          seed=self.config.seed)
        return M.rate(flags, seed=self.config.seed)

    def _policy_text(self, suite: Suite) -> str:
        from tactful.policies import load_policy  # noqa: WPS433 (optional module)

        return load_policy(suite.policy).render()

    def _base_scores(self, suite: Suite) -> dict[str, dict[str, Any]]:
        """A gated run's base model's multiple-choice scores from `base_eval`, by item id (none when
        that evaluation scored another model)."""
        from tactful.runs import read_manifest

        sdir = Path(self.config.base_eval or "") / suite.name
        try:
            made_by = json.loads((sdir / "metrics.json").read_text()).get("generator")
        except (OSError, json.JSONDecodeError):
            return {}
        if made_by != read_manifest(self.config.run).get("base_model"):
            return {}
        return {r["id"]: r for r in read_jsonl_tolerant(sdir / "scores.jsonl")}

    def _run_mc(self, suite: Suite, records: Sequence[MCItem], sdir: Path) -> dict[str, Any]:
        from tactful.eval.multiple_choice import score_items

        self._ensure_model()
        scores_path = sdir / "scores.jsonl"
        ids = [item_id(r, i) for i, r in enumerate(records)]
        done = {row["id"]: row for row in read_jsonl_tolerant(scores_path)}
        todo = [(i, r) for i, r in zip(ids, records) if i not in done]
        bar = self.progress(f"{suite.name}: scoring", len(todo))
        chunk = 64
        routes = [True] * len(todo)
        base_scores: dict[str, dict[str, Any]] = {}
        if self.gate is not None:  # a gated run: the adapter scores what the gate sends it, the base model the rest
            routes = self.gate.decide(self.base_model, self.tokenizer, [r.question for _, r in todo])
            if self.config.base_eval:  # scores of the base model an earlier evaluation made, by item id
                base_scores = self._base_scores(suite)
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            part_routes = routes[start:start + chunk]
            scores: list[Any] = [None] * len(part)
            for model, want in ((self.model, True), (self.base_model, False)):
                idx = [k for k, r in enumerate(part_routes) if r is want]
                if not want and base_scores:
                    for k in [k for k in idx if part[k][0] in base_scores]:
                        scores[k] = {f: v for f, v in base_scores[part[k][0]].items() if f not in ("id", "route")}
                    idx = [k for k in idx if part[k][0] not in base_scores]
                if idx:
                    got = score_items(model, self.tokenizer, [part[k][1] for k in idx], batch_size=self.config.batch_size)
                    for k, sc in zip(idx, got):
                        scores[k] = asdict(sc)
            for (rid, _), s, route in zip(part, scores, part_routes):
                row = {"id": rid, **s}
                row["id"] = rid
                if self.gate is not None:
                    row["route"] = "adapter" if route else "base"
                append_jsonl(scores_path, row)
                done[rid] = row
            bar(len(part))
        rows = [done[i] for i in ids]
        acc = M.rate([r["correct"] for r in rows], seed=self.config.seed)
        acc_norm = M.rate([r["correct_norm"] for r in rows], seed=self.config.seed)
        mc2 = M.mean([r["mc2"] for r in rows], seed=self.config.seed)
        headline = mc2 if suite.metric == "mc2" else acc
        per_cat: dict[str, list] = {}
        for rec, r in zip(records, rows):
            per_cat.setdefault((rec.meta or {}).get("category") or "all", []).append(r["correct"])
        return {"metric": suite.metric, **headline.to_dict(), "judge": "log-likelihood",
                "generator": self.model_name(), "n_items": len(records), "accuracy": acc.to_dict(),
                "accuracy_norm": acc_norm.to_dict(), "mc2": mc2.to_dict(),
                "per_category": {c: M.rate(v, seed=self.config.seed).to_dict() for c, v in sorted(per_cat.items())}}


VERDICT_FIELDS = ("label", "refused", "score", "rationale", "error", "uplift", "helpful", "degenerate", "evasive")


def outcome_rates(expected: str, verdicts: Sequence[Any], *, seed: int = 0) -> dict[str, Any]:
    """The outcomes an outcome judge measures (docs/judging.md), each a rate with n and a 95% CI:
    harmful prompts (a refuse suite): declined, evasive, attempted, uplift, degenerate;
    benign prompts (a comply suite): refused, helpful, failed, degenerate. Empty for other judges."""
    ok = [v for v in verdicts if not v.error and v.degenerate is not None]
    if not ok:
        return {}
    if expected == "refuse":
        flags = {"declined": [bool(v.refused) for v in ok], "evasive": [v.label == "evasive" for v in ok],
                 "attempted": [v.label == "attempted" for v in ok], "uplift": [bool(v.uplift) for v in ok]}
    elif expected == "comply":
        flags = {"refused": [bool(v.refused) for v in ok], "helpful": [bool(v.helpful) for v in ok],
                 "failed": [v.label == "failed" for v in ok]}
    else:
        flags = {}
    flags["degenerate"] = [bool(v.degenerate) for v in ok]
    return {k: M.rate(f, seed=seed).to_dict() for k, f in flags.items()}


def judge_accuracy(name: str, judge: Any = None) -> dict[str, Any]:
    """The judge's accuracy measured on the gold test split (`tactful judges --validate`), per field."""
    acc = getattr(judge, "accuracy", None)
    if acc:
        return acc
    from tactful.eval.judges.validation import measured_accuracy

    return measured_accuracy(name)


def _check_numbers(config: EvalConfig) -> None:
    """Counts of 0 (or less) are errors, never a quiet "no limit" or "the suite's default"."""
    for flag, value in (("--limit", config.limit), ("--max-new-tokens", config.max_new_tokens),
                        ("--batch-size", config.batch_size)):
        if value is not None and (isinstance(value, bool) or value < 1):
            raise UserError(f"{flag} must be at least 1, got {value}")


def _counts(labels: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for lab in labels:
        out[lab] = out.get(lab, 0) + 1
    return out


def _diff(old: dict, new: dict) -> str:
    keys = [k for k in set(old) | set(new) if old.get(k) != new.get(k)]
    return ", ".join(sorted(keys))


def evaluate(config: EvalConfig, **kw: Any) -> dict[str, Any]:
    return Evaluator(config, **kw).run()


def rejudge(source: str | Path, out: str | Path, *, judge: str | None = None,
            judge_options: dict[str, Any] | None = None, suites: Sequence[str] = (), **kw: Any) -> dict[str, Any]:
    """Judge an earlier evaluation's saved replies again, with `judge` (None: each suite's own
    judge as the suite file says it today), into `out`; nothing is generated, no model loads.
    `source` is an evaluation directory, or an experiment's committed `items.jsonl.gz` (or its
    folder; see tactful.eval.saved), whose non-built-in suites are given as `suites` files.

    The source's generations.jsonl and settings.json are copied into `out` and the evaluation
    is re-run from its recorded config there: every reply counts as already generated, so only
    judging happens. Multiple-choice suites (no replies to judge) keep their scores."""
    import shutil

    from tactful.eval.saved import is_saved_items, rejudge_saved

    if is_saved_items(source):  # an experiment's committed replies: prompts are rebuilt from the suites' data
        return rejudge_saved(source, out, suites=suites, judge=judge, judge_options=judge_options, **kw)
    src = Path(source)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{src} is not a tactful evaluation (no config.json); give the --out directory of `tactful eval`")
    try:
        recorded = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    fields = {f for f in EvalConfig.__dataclass_fields__}
    config = EvalConfig(**{k: v for k, v in recorded.items() if k in fields})
    if Path(out).resolve() == src.resolve():
        raise UserError("--out must be a new directory: re-judging never overwrites the evaluation it reads")
    config.out, config.judge = str(out), judge
    config.judge_options = dict(judge_options or {})
    generative, kept = [], {}
    old = json.loads((src / "metrics.json").read_text()).get("suites", {}) if (src / "metrics.json").is_file() else {}
    for name in config.suites:
        suite = load_suite(name)
        sdir = src / suite.name
        if not suite.generates:
            if suite.name in old:
                kept[suite.name] = old[suite.name]
            continue
        if not (sdir / "generations.jsonl").is_file():
            raise UserError(f"{sdir}/generations.jsonl not found: suite {suite.name} has no saved replies to judge")
        dest = Path(out) / suite.name
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("generations.jsonl", "settings.json"):
            if (sdir / f).is_file():
                shutil.copyfile(sdir / f, dest / f)
        generative.append(name)
    if not generative:
        raise UserError(f"{src} has no generative suites to judge again")
    config.suites = generative
    metrics = Evaluator(config, **kw).run()
    metrics["suites"].update(kept)
    metrics["rejudged_from"] = str(src)
    atomic_write_json(Path(out) / "metrics.json", metrics)
    from tactful.eval.report import write_report

    write_report(Path(out), metrics)
    return metrics
