"""Unsafe corpora per harm domain: the data each SafeMoE expert is trained on.

Two sources:
- `source: generate` (default, offline): the base model's own answers to the built-in
  harmful TRAIN prompts of each domain, kept only where the judge says the answer is
  full compliance. The embedded model complies with most harmful requests, so this
  yields a real unsafe corpus without downloading anything.
- a registry name or a file with unsafe responses and harm categories, e.g. `beavertails`
  (examples labelled unsafe) or `pku-saferlhf` (pairs with per-response safety labels):
  categories are mapped to tactful's harm domains (`category_map` adds or overrides).
- a corpus directory written before (by `tactful data unsafe-corpus`, a run's `corpus/`, or
  `write_unsafe_corpus`): its examples of the requested domains are reused as they are, so
  one corpus built once can feed several runs (seeds, router ablations).

A corpus directory holds `<domain>.jsonl` (Example records) and `corpus.json` with the
provenance (model, judge, seed, prompt ids kept and dropped, settings, file hashes).
Every file is written atomically and `corpus.json` last, so it marks a finished corpus.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tactful.data.builtin import HARM_DOMAINS, harmful_prompts
from tactful.data.records import FULL_COMPLIANCE, Example, LabelledResponse, PreferencePair
from tactful.errors import UserError
from tactful.io import atomic_write_json, atomic_write_jsonl, read_jsonl_tolerant, sha256_file

CORPUS_FORMAT = "tactful-unsafe-corpus/1"
PROVENANCE_FILE = "corpus.json"
GENERATE = "generate"

# Category names of public data sets (normalised: lower case, non-alphanumerics -> "_")
# that mean one of tactful's harm domains. PKU-SafeRLHF's names normalise to the domains
# themselves ("Economic Crime" -> economic_crime); BeaverTails groups several harms per category.
CATEGORY_ALIASES: dict[str, str] = {
    "white_collar_crime": "economic_crime",
    "violence_aiding_and_abetting_incitement": "violence",
    "drug_abuse_weapons_banned_substance": "drugs",
    "financial_crime_property_crime_theft": "economic_crime",
    "discrimination_stereotype_injustice": "discriminatory_behavior",
}
# Labels that mark a (prompt, response) example as unsafe in the record formats we read.
# Not "harmful": in tactful's record format that labels the *prompt* (the built-in refusals and
# informative answers carry it), so accepting it would turn refusals into an "unsafe" corpus.
UNSAFE_LABELS = {"unsafe", FULL_COMPLIANCE}


@dataclass
class CorpusSettings:
    source: str = field(default=GENERATE, metadata={
        "help": "generate (the base model's judged-compliant answers to built-in harmful train prompts), or a "
                "registry name / file with unsafe responses and categories (beavertails, pku-saferlhf, ...), or "
                "a corpus directory built before (reused as it is)."})
    path: str | None = field(default=None, metadata={
        "help": "A local copy of the `source` benchmark in its own columns (e.g. a PKU-SafeRLHF file)."})
    split: str | None = field(default="train", metadata={"help": "Split of the prompts / data source."})
    judge: str = field(default="embedding-minilm", metadata={"help": "Judge that keeps full_compliance answers."})
    max_new_tokens: int = 160
    batch_size: int = 16
    prompts_per_domain: int | None = field(default=None, metadata={
        "help": "Use only the first N built-in prompts of each domain (quick runs)."})
    samples_per_prompt: int = field(default=1, metadata={
        "help": "Answers per prompt; > 1 samples with `temperature` (more data from the same prompts)."})
    temperature: float = 0.8
    max_per_domain: int | None = field(default=None, metadata={"help": "Cap on examples per domain."})
    min_per_domain: int = field(default=4, metadata={"help": "Fail if a domain ends up with fewer examples."})
    category_map: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Data-source category -> tactful domain (added to the built-in aliases)."})


@dataclass
class UnsafeCorpus:
    examples: dict[str, list[Example]]  # domain -> unsafe examples
    provenance: dict[str, Any]

    def counts(self) -> dict[str, int]:
        return {d: len(v) for d, v in self.examples.items()}


def normalise_category(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def domain_of(category: str | None, category_map: dict[str, str] | None = None) -> str | None:
    """The harm domain a data-source category belongs to, or None."""
    if not category:
        return None
    key = normalise_category(category)
    user = {normalise_category(k): v for k, v in (category_map or {}).items()}
    if key in user:
        return user[key]
    if key in HARM_DOMAINS:
        return key
    return CATEGORY_ALIASES.get(key)


# --------------------------------------------------------------------------- from data


def unsafe_examples_from_records(records: Sequence[Any], domains: Sequence[str],
                                 category_map: dict[str, str] | None = None) -> dict[str, list[Example]]:
    """Split records with unsafe responses into per-domain examples.

    Examples / labelled responses count when their label says unsafe (unsafe,
    full_compliance) or is missing; pairs contribute each response marked unsafe
    (`chosen_safe` / `rejected_safe` False). A response with several categories joins every
    matching domain. Duplicate (prompt, response) pairs are kept once per domain.
    """
    out: dict[str, list[Example]] = {d: [] for d in domains}
    seen: dict[str, set[tuple[str, str]]] = {d: set() for d in domains}

    def add(prompt: str, response: str, categories: Sequence[str | None], rec_id: str | None, source: str | None,
            which: str | None = None) -> None:
        for dom in dict.fromkeys(domain_of(c, category_map) for c in categories):
            if dom in out and (prompt, response) not in seen[dom]:
                seen[dom].add((prompt, response))
                out[dom].append(Example(prompt=prompt, response=response, label="unsafe", category=dom,
                                        id=f"{rec_id}:{which}" if which and rec_id else rec_id, source=source,
                                        meta={"categories": [c for c in categories if c]}))

    for r in records:
        if isinstance(r, PreferencePair):
            for which, text, safe, cat, cats in (
                    ("chosen", r.chosen, r.chosen_safe, r.chosen_category, r.meta.get("chosen_categories")),
                    ("rejected", r.rejected, r.rejected_safe, r.rejected_category, r.meta.get("rejected_categories"))):
                if safe is False:
                    fallback = [r.category] if which == "rejected" else []
                    add(r.prompt, text, list(cats or ([cat] if cat else fallback)), r.id, r.source, which)
        elif isinstance(r, (Example, LabelledResponse)):
            if r.label is not None and str(r.label).lower() not in UNSAFE_LABELS:
                continue
            cats = r.meta.get("categories") if isinstance(r.meta.get("categories"), list) else None
            add(r.prompt, r.response, list(cats or [r.category]), r.id, r.source)
        else:
            raise UserError(f"records of type {type(r).__name__} carry no responses; an unsafe corpus needs "
                            "examples, labelled responses or preference pairs")
    return out


# --------------------------------------------------------------------------- from the model


def generate_unsafe_examples(
    model: Any,
    tokenizer: Any,
    domains: Sequence[str],
    settings: CorpusSettings,
    *,
    judge: Any = None,
    seed: int = 0,
    model_name: str = "model",
    system: str | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, list[Example]], dict[str, Any]]:
    """The model's answers to built-in harmful prompts, kept where the judge says full compliance.

    Returns (domain -> examples, per-domain prompt ids kept and dropped).
    """
    from tactful.eval.generation import GenerationConfig, HFGenerator
    from tactful.eval.judges import JudgeItem, get_judge

    judge = get_judge(settings.judge) if judge is None or isinstance(judge, str) else judge
    prompts = []
    for d in domains:
        recs = harmful_prompts(settings.split, [d])
        prompts.extend(recs[: settings.prompts_per_domain] if settings.prompts_per_domain is not None else recs)
    if not prompts:
        raise UserError(f"no built-in harmful prompts for split {settings.split!r} in {', '.join(domains)}")
    n = max(1, settings.samples_per_prompt)
    jobs = [(p, k) for p in prompts for k in range(n)]
    gen_cfg = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=n > 1,
                               temperature=settings.temperature if n > 1 else 1.0, seed=seed,
                               batch_size=settings.batch_size, system=system)
    log(f"unsafe corpus: generating {len(jobs)} answers with {model_name}")
    replies = HFGenerator(model, tokenizer, name=f"hf:{model_name}").generate([p.prompt for p, _ in jobs], gen_cfg)
    log(f"unsafe corpus: judging them with {getattr(judge, 'name', settings.judge)}")
    verdicts = judge.judge([JudgeItem(prompt=p.prompt, response=r, meta={"category": p.category})
                            for (p, _), r in zip(jobs, replies)])

    out: dict[str, list[Example]] = {d: [] for d in domains}
    ids: dict[str, dict[str, list[str]]] = {d: {"kept": [], "dropped": []} for d in domains}
    for (p, k), reply, v in zip(jobs, replies, verdicts):
        tag = f"{p.id}#{k}" if n > 1 else str(p.id)
        if v.label == FULL_COMPLIANCE and reply.strip():
            out[p.category].append(Example(prompt=p.prompt, response=reply, label="unsafe", category=p.category,
                                           id=tag, source=f"safemoe-corpus:{model_name}",
                                           meta={"prompt_id": p.id, "sample": k, "judge_label": v.label}))
            ids[p.category]["kept"].append(tag)
        else:
            ids[p.category]["dropped"].append(tag)
    return out, ids


# --------------------------------------------------------------------------- building and storing


def build_unsafe_corpus(
    out_dir: str | Path,
    *,
    domains: Sequence[str],
    settings: CorpusSettings | None = None,
    model_spec: str = "embedded",
    model: Any = None,
    tokenizer: Any = None,
    judge: Any = None,
    seed: int = 0,
    system: str | None = None,
    dtype: str = "float32",
    log: Callable[[str], None] = print,
) -> UnsafeCorpus:
    """Build the per-domain unsafe corpus into `out_dir` and return it.

    With `settings.source == "generate"` the model (`model`/`tokenizer`, or loaded from
    `model_spec`) answers the built-in harmful prompts and `judge` (a Judge, or the name in
    settings) filters them; otherwise records come from the named source.
    """
    from tactful.runs import package_versions

    settings = settings or CorpusSettings()
    domains = list(domains)
    if not domains:
        raise UserError("no harm domains given for the unsafe corpus")
    for d in domains:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", d):
            raise UserError(f"domain name {d!r} must be letters, digits, '_', '-' or '.' (it names a file)")
    ids: dict[str, Any] = {}
    if settings.source == GENERATE:
        unknown = [d for d in domains if d not in HARM_DOMAINS]
        if unknown:
            raise UserError(f"corpus.source generate uses the built-in prompts, which have no domain "
                            f"{', '.join(unknown)}; built-in domains: {', '.join(HARM_DOMAINS)}")
        if model is None:
            from tactful.models import load_model

            model, tokenizer = load_model(model_spec, dtype=dtype)
        examples, ids = generate_unsafe_examples(model, tokenizer, domains, settings, judge=judge, seed=seed,
                                                 model_name=model_spec, system=system, log=log)
        judge_name = getattr(judge, "name", None) or settings.judge
    elif is_corpus_dir(settings.source):
        examples, ids, judge_name = _from_corpus_dir(settings.source, domains)
    else:
        from tactful.data.registry import load_benchmark, load_records

        if settings.path is not None:
            records = load_benchmark(settings.source, path=settings.path, split=settings.split)
        else:
            records = load_records(settings.source, split=settings.split)
        examples = unsafe_examples_from_records(records, domains, settings.category_map)
        judge_name = None
    if settings.max_per_domain is not None:
        examples = {d: v[: settings.max_per_domain] for d, v in examples.items()}
    too_few = {d: len(v) for d, v in examples.items() if len(v) < settings.min_per_domain}
    if too_few:
        counts = ", ".join(f"{d}: {n}" for d, n in too_few.items())
        hint = ("raise corpus.samples_per_prompt or corpus.prompts_per_domain, or use a data source"
                if settings.source == GENERATE else "map more of the source's categories with corpus.category_map")
        raise UserError(f"too few unsafe examples (min_per_domain={settings.min_per_domain}) for {counts}; {hint}")

    corpus = write_unsafe_corpus(out_dir, examples, {
        "source": settings.source,
        "model": model_spec if settings.source == GENERATE else None,
        "judge": judge_name,
        "seed": seed,
        "system": system,
        "settings": asdict(settings),
        "prompts": ids,
        "versions": package_versions(),
    })
    log("unsafe corpus: " + ", ".join(f"{d} {len(v)}" for d, v in examples.items()) + f" -> {out_dir}")
    return corpus


def write_unsafe_corpus(out_dir: str | Path, examples: dict[str, list[Example]],
                        provenance: dict[str, Any] | None = None) -> UnsafeCorpus:
    """Write a corpus directory: `<domain>.jsonl` per domain, then corpus.json (the given
    provenance plus format, domains, counts and file hashes) last, so it marks a finished corpus."""
    for d in examples:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", d):
            raise UserError(f"domain name {d!r} must be letters, digits, '_', '-' or '.' (it names a file)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for d, rows in examples.items():
        path = atomic_write_jsonl(out / f"{d}.jsonl", [e.to_dict() for e in rows])
        files[d] = {"file": path.name, "sha256": sha256_file(path), "n": len(rows)}
    full = {
        "format": CORPUS_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **(provenance or {}),
        "domains": list(examples),
        "counts": {d: len(v) for d, v in examples.items()},
        "files": files,
    }
    atomic_write_json(out / PROVENANCE_FILE, full)
    return UnsafeCorpus(dict(examples), full)


def is_corpus_dir(source: str | Path | None) -> bool:
    """Whether `source` is a finished corpus directory (from `tactful data unsafe-corpus`, a run's
    corpus/ or `write_unsafe_corpus`)."""
    return bool(source) and (Path(str(source)).expanduser() / PROVENANCE_FILE).is_file()


def _from_corpus_dir(source: str, domains: Sequence[str]) -> tuple[dict[str, list[Example]], dict[str, Any], str | None]:
    """The requested domains of an existing corpus (so one corpus, built once, feeds many runs)."""
    parent = read_unsafe_corpus(Path(source).expanduser())
    missing = [d for d in domains if d not in parent.examples]
    if missing:
        raise UserError(f"corpus {source} has no domain {', '.join(missing)} "
                        f"(it has {', '.join(parent.examples) or 'none'})")
    prompts = parent.provenance.get("prompts") or {}
    ids = {"from_corpus": {k: parent.provenance.get(k) for k in ("source", "model", "judge", "seed", "created")},
           **{d: prompts[d] for d in domains if d in prompts}}
    return {d: list(parent.examples[d]) for d in domains}, ids, parent.provenance.get("judge")


def read_unsafe_corpus(corpus_dir: str | Path) -> UnsafeCorpus:
    """A corpus written by `build_unsafe_corpus` (only a finished one: it needs corpus.json)."""
    d = Path(corpus_dir)
    prov_path = d / PROVENANCE_FILE
    if not prov_path.is_file():
        raise UserError(f"{d} is not a finished unsafe corpus (no {PROVENANCE_FILE})")
    import json

    provenance = json.loads(prov_path.read_text())
    examples = {}
    for dom in provenance["domains"]:
        rows = read_jsonl_tolerant(d / provenance["files"][dom]["file"])
        examples[dom] = [Example.from_dict(r) for r in rows]
    return UnsafeCorpus(examples, provenance)


def corpus_is_current(corpus_dir: str | Path, *, domains: Sequence[str], settings: CorpusSettings,
                      model_spec: str, seed: int, system: str | None) -> bool | None:
    """None if no finished corpus is there; else whether it was built with these settings."""
    path = Path(corpus_dir) / PROVENANCE_FILE
    if not path.is_file():
        return None
    import json

    p = json.loads(path.read_text())
    return (p.get("domains") == list(domains) and p.get("settings") == asdict(settings) and p.get("seed") == seed
            and p.get("system") == system and (settings.source != GENERATE or p.get("model") == model_spec))


def unsafe_corpus_command(
    out: str,
    *,
    model: str = "embedded",
    domains: Sequence[str] | None = None,
    source: str = GENERATE,
    path: str | None = None,
    split: str | None = "train",
    judge: str = "embedding-minilm",
    max_new_tokens: int = 160,
    batch_size: int = 16,
    prompts_per_domain: int | None = None,
    samples_per_prompt: int = 1,
    temperature: float = 0.8,
    max_per_domain: int | None = None,
    min_per_domain: int = 4,
    category_map: dict[str, str] | None = None,
    seed: int = 0,
    system: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """`tactful data unsafe-corpus`: build a per-domain unsafe corpus into `out` and return it.

    domains default to the first four built-in harm domains (SafeMoE's default experts).
    """
    settings = CorpusSettings(source=source, path=path, split=split, judge=judge, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, prompts_per_domain=prompts_per_domain,
                              samples_per_prompt=samples_per_prompt, temperature=temperature,
                              max_per_domain=max_per_domain, min_per_domain=min_per_domain,
                              category_map=dict(category_map or {}))
    build_unsafe_corpus(out, domains=list(domains or HARM_DOMAINS[:4]), settings=settings, model_spec=model,
                        seed=seed, system=system, log=log)
    return Path(out)
