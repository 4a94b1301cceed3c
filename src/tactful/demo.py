"""`tactful demo`: the main job, on the embedded model, offline, in about ten minutes on 2 CPU cores.

1. evaluate the embedded model (SmolLM2-135M-Instruct) on the built-in held-out test splits and,
   where its file is found, on a public benchmark it never trains on (XSTest: unsafe prompts and
   safe prompts that only sound unsafe). The base model's replies are deterministic, so they are
   cached by model and settings: a second demo does not generate them again;
2. align it with the recipe the demo recipe search chose (recipes/demo.yaml; the search and why it
   won: experiments/demo_recipe/);
3. evaluate the aligned model on the same prompts and print the before/after card of what the
   replies did (harmful: declined, off-topic filler, uplift, degenerate; seemingly toxic and
   ordinary prompts: refused, helped, degenerate; capability; each with n and a 95% CI, and the
   judge's measured accuracy), three prompts with both answers side by side, and where the time went.

Every step writes a run directory under --out and resumes if interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from tactful.eval.report import over_refusal  # the same numbers as `tactful compare`

DEMO_SUITES = ("safety", "over-refusal", "benign", "capability")
DEMO_RECIPE = "demo"  # recipes/demo.yaml
# The public benchmark the demo shows when its file is found: XSTest v2 (CC-BY-4.0), a seeded
# subsample of each half so that the demo stays within its time budget.
PUBLIC_FILE = "xstest_prompts.csv"
PUBLIC_N = 50
PUBLIC_SUITES = {
    "xstest-unsafe": ("refuse", "safe_rate", "XSTest v2 unsafe prompts (public; never trained on)"),
    "xstest-safe": ("comply", "compliance_rate", "XSTest v2 safe prompts that only sound unsafe (public)"),
}
CARD_WIDTH = 100
# Built-in suites the demo reads a seeded subsample of, to stay within ten minutes on 2 cores
# (the experiments report the full splits).
DEMO_SUBSAMPLE = {"over-refusal": 75}
# recipes/demo.yaml is the search candidate sft-declines-anchors trained on all of `train`, behind a
# prompt gate. The demo's own replies were read carefully, blind (experiments/audit.py: 40 random
# harmful prompts, every benign prompt whose reply the gate changed, and every XSTest unsafe one);
# the card says what that reading found and how often the judge agreed with it.
AUDIT_FILES = ("audit-gate-harmful.json", "audit-gate-benign.json", "audit-gate-xstest-unsafe.json")

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
    ("xstest-unsafe", "declined", "XSTest unsafe prompts declined", None),
    ("xstest-unsafe", "uplift", "XSTest unsafe: harmful uplift", None),
    ("xstest-unsafe", "degenerate", "XSTest unsafe: degenerate replies", None),
    ("xstest-safe", "refused", "XSTest safe prompts refused", None),
    ("xstest-safe", "helpful", "XSTest safe prompts helped", None),
    ("xstest-safe", "degenerate", "XSTest safe: degenerate replies", None),
    ("safety", None, "harmful prompts refused", lambda r: r),  # judges without outcomes
    ("over-refusal", None, "benign prompts refused", over_refusal),
    ("capability", None, "capability: multiple-choice accuracy", lambda r: r),
)


def quiet_libraries() -> None:
    """One progress display per stage: no library download/loading bars, deprecation notices or
    info logs between them (tactful's own rich bars stay)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


# ------------------------------------------------------------------------------ public benchmark

def find_public_file(data_dir: str | None = None) -> Path | None:
    """XSTest's CSV: in --public-data, $TACTFUL_DATA_DIR, or ../shared/data (a development checkout)."""
    for d in (data_dir, os.environ.get("TACTFUL_DATA_DIR"), "../shared/data"):
        if d and (Path(d) / PUBLIC_FILE).is_file():
            return (Path(d) / PUBLIC_FILE).resolve()
    return None


def write_public_suites(csv: Path, out: Path) -> list[str]:
    """Suite files for both halves of XSTest (judged by the default outcome judge)."""
    import yaml

    from tactful.io import atomic_write_text

    paths = []
    for name, (expected, metric, desc) in PUBLIC_SUITES.items():
        spec = {"name": name, "description": f"{desc}, seeded subsample of {PUBLIC_N}", "dataset": name,
                "path": str(csv), "n": PUBLIC_N, "expected": expected, "judge": "outcome-minilm", "metric": metric,
                "generation": {"max_new_tokens": 64}}
        path = out / f"{name}.yaml"
        atomic_write_text(path, yaml.safe_dump(spec, sort_keys=False))
        paths.append(str(path))
    return paths


def write_subsampled_suites(out: Path) -> dict[str, str]:
    """Copies of the built-in suites in DEMO_SUBSAMPLE with their `n` set (same names, so the
    card's rows still match); returns name -> suite file."""
    import yaml

    from tactful.eval.suites import suites_dir
    from tactful.io import atomic_write_text

    paths = {}
    for name, n in DEMO_SUBSAMPLE.items():
        spec = yaml.safe_load((suites_dir() / f"{name}.yaml").read_text())
        spec["n"] = n
        spec["description"] = f"{spec.get('description', '')} Demo: a seeded subsample of {n}."
        path = out / f"{name}.yaml"
        atomic_write_text(path, yaml.safe_dump(spec, sort_keys=False))
        paths[name] = str(path)
    return paths


# ------------------------------------------------------------------------------ base-model cache

def base_eval_key(suites: list[str], limit: int | None) -> str:
    """What the base model's replies depend on: the model file, the suites (their files and data)
    and the generation settings. Judging is re-done from the cached replies, so a new judge never
    reads stale verdicts."""
    from tactful.eval.runner import load_suite_records
    from tactful.eval.suites import load_suite
    from tactful.models import find_embedded_gguf

    gguf = find_embedded_gguf()
    parts: list[Any] = [gguf.name, gguf.stat().st_size, limit]
    for s in suites:
        suite = load_suite(s)
        recs = [] if suite.expected == "multiple-choice" else load_suite_records(suite, limit=limit)
        parts.append([suite.name, suite.expected, suite.generation, [r.prompt for r in recs]])
    if os.environ.get("TACTFUL_PACKED_LINEAR") == "1":  # rounds differently from the default path
        parts.append("packed-linear")
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def seed_from_cache(eval_dir: Path, key: str) -> bool:
    """Copy cached base-model replies into eval_dir (the runner then judges them without
    generating). True when the cache had them."""
    import shutil

    from tactful.models import tactful_home

    src = tactful_home() / "base-evals" / key
    if not src.is_dir() or (eval_dir / "metrics.json").exists():
        return False
    for gen in src.glob("*/generations.jsonl"):
        dest = eval_dir / gen.parent.name
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("generations.jsonl", "settings.json"):
            if (gen.parent / f).is_file() and not (dest / f).exists():
                shutil.copy(gen.parent / f, dest / f)
    return True


def store_in_cache(eval_dir: Path, key: str) -> None:
    import shutil

    from tactful.models import tactful_home

    dest = tactful_home() / "base-evals" / key
    if dest.is_dir():
        return
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    for gen in eval_dir.glob("*/generations.jsonl"):
        (tmp / gen.parent.name).mkdir(parents=True, exist_ok=True)
        for f in ("generations.jsonl", "settings.json"):
            if (gen.parent / f).is_file():
                shutil.copy(gen.parent / f, tmp / gen.parent.name / f)
    try:
        tmp.rename(dest)  # atomic: a cache entry is complete or absent
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another demo stored it first


# ------------------------------------------------------------------------------ the card

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


def audit_line(harmful: str = AUDIT_FILES[0], benign: str = AUDIT_FILES[1],
               xstest: str = AUDIT_FILES[2]) -> str | None:
    """What careful reading of this recipe's replies found, and how often the judge agreed with it
    (a repository checkout has the audits; an installed wheel does not)."""
    results = Path(__file__).resolve().parents[2] / "experiments" / "demo_recipe" / "results"
    if not (results / harmful).is_file():
        return None
    doc = json.loads((results / harmful).read_text())
    read, agree = doc.get("careful_reading", {}), doc.get("judge_agreement", {})

    def pct(e: dict[str, Any] | None, ci: bool = False) -> str:
        if not e:
            return "—"
        return f"{100 * e['value']:.0f}%" + (f" [{100 * e['ci_low']:.0f}, {100 * e['ci_high']:.0f}]" if ci else "")

    def declined(arm: str) -> dict[str, Any] | None:
        return read.get(arm, {}).get("harmful", {}).get("declined")

    n = read.get("gated", {}).get("harmful", {}).get("n", "?")
    line = (f"careful reading (blind) of {n} random harmful prompts: declined {pct(declined('base'))} before, "
            f"{pct(declined('gated'))} after; the judge agrees with it on refused-vs-not "
            f"{pct(agree.get('base', {}).get('refused'), True)} before, {pct(agree.get('gated', {}).get('refused'), True)}"
            " after")

    def read_of(name: str, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(gated, base) reading rates of one prompt kind in an audit of the replies the gate changed."""
        doc = json.loads((results / name).read_text()).get("careful_reading", {}) if (results / name).is_file() else {}
        return doc.get("gated", {}).get(kind, {}), doc.get("base", {}).get(kind, {})

    st_after, st_before = read_of(benign, "seemingly_toxic")
    if st_after:
        line += (f"; of the seemingly-toxic prompts the gate sent to the adapter ({st_after.get('n')}), reading "
                 f"finds {pct(st_after.get('refused'))} refused ({pct(st_before.get('refused'))} before)")
    x_after, x_before = read_of(xstest, "harmful")
    if x_after:
        line += (f"; of the XSTest unsafe prompts it sent there ({x_after.get('n')}), "
                 f"{pct(x_after.get('declined'))} declined ({pct(x_before.get('declined'))} before)")
    return line + " (experiments/demo_recipe/README.md)"


GATE_SUITES = (("safety", "harmful"), ("over-refusal", "seemingly toxic"), ("benign", "ordinary"),
               ("xstest-unsafe", "XSTest unsafe"), ("xstest-safe", "XSTest safe"), ("capability", "MC"))


def gate_line(eval_dir: Path) -> str | None:
    """Where a prompt-gated model's evaluation sent each suite's prompts (None for an ungated one)."""
    parts = []
    for suite, label in GATE_SUITES:
        path = eval_dir / suite / ("scores.jsonl" if suite == "capability" else "items.jsonl")
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
        routed = [r["route"] for r in rows if "route" in r]
        if routed:
            parts.append(f"{label} {routed.count('adapter')}/{len(routed)}")
    if not parts:
        return None
    return textwrap.fill("prompt gate: the safety adapter answered " + ", ".join(parts) + "; the model as it was "
                         "answered the rest", width=CARD_WIDTH - 2, initial_indent="  ", subsequent_indent="    ")


def safety_card(metrics: dict[str, Any], title: str, after: dict[str, Any] | None = None,
                data_line: str | None = None, gate: str | None = None) -> str:
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
        lines.append(textwrap.fill(judge_line(s["safety"]), width=CARD_WIDTH - 2, initial_indent="  ",
                                   subsequent_indent="    "))
        audit = audit_line() if after else None
        if audit:
            lines.append(textwrap.fill(audit, width=CARD_WIDTH - 2, initial_indent="  ", subsequent_indent="    "))
    if gate:
        lines.append(gate)
    lines.append(textwrap.fill(data_line or "data: tactful built-in test splits (never trained on); seed 0; "
                               "95% bootstrap intervals", width=CARD_WIDTH - 2, initial_indent="  ",
                               subsequent_indent="    "))
    return "\n".join(lines)


EXAMPLE_SUITES = (("safety", "a harmful request"), ("over-refusal", "a seemingly-toxic request"),
                  ("benign", "an ordinary request"))


def _items(eval_dir: Path, suite: str) -> dict[str, dict[str, Any]]:
    path = eval_dir / suite / "items.jsonl"
    if not path.is_file():
        return {}
    return {r["id"]: r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())}


def _verdict(row: dict[str, Any]) -> str:
    v = row.get("verdict") or {}
    label = v.get("label") or ("refused" if v.get("refused") else "complied")
    return label + (", degenerate" if v.get("degenerate") else "")


def examples_side_by_side(before_dir: Path, after_dir: Path, *, seed: int = 0, lines_per_reply: int = 6) -> str:
    """One random test prompt per kind (seeded, not picked for effect) with both replies in two columns."""
    rng = random.Random(seed)
    col = (CARD_WIDTH - 5) // 2
    out = ["== three random test prompts, before | after =="]
    for suite, kind in EXAMPLE_SUITES:
        before, after = _items(before_dir, suite), _items(after_dir, suite)
        shared = sorted(set(before) & set(after))
        if not shared:
            continue
        rid = rng.choice(shared)
        b, a = before[rid], after[rid]
        out.append(textwrap.shorten(f"{kind}: {b['prompt']}", width=CARD_WIDTH - 2, placeholder=" ..."))

        def column(row: dict[str, Any]) -> list[str]:
            text = " ".join(str(row.get("response") or "").split()) or "(empty reply)"
            wrapped = textwrap.wrap(text, width=col)
            if len(wrapped) > lines_per_reply:
                wrapped = wrapped[:lines_per_reply]
                wrapped[-1] = wrapped[-1][: col - 4] + " ..."
            return [f"[{_verdict(row)}]"[:col], *wrapped]

        left, right = column(b), column(a)
        for i in range(max(len(left), len(right))):
            lcell = left[i] if i < len(left) else ""
            rcell = right[i] if i < len(right) else ""
            out.append(f"  {lcell:<{col}} | {rcell}")
        out.append("")
    return "\n".join(out).rstrip()


# ------------------------------------------------------------------------------ the job

class Stages:
    """Wall time per stage, written to timings.json as the demo goes."""

    def __init__(self, path: Path):
        self.path = path
        self.times: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.time()
        result = fn()
        self.times[name] = round(time.time() - t0, 1)
        from tactful.io import atomic_write_json

        atomic_write_json(self.path, {"stages_s": self.times, "total_s": round(sum(self.times.values()), 1)})
        return result

    def line(self) -> str:
        parts = [f"{k} {v:.0f} s" for k, v in self.times.items()]
        return f"time: {' · '.join(parts)} · total {sum(self.times.values()):.0f} s"


def run_demo(out: str = "runs/demo", limit: int | None = None, align: bool = True, public_data: str | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate the embedded model, align it with recipes/demo.yaml, evaluate it again, print the card."""
    from tactful.packed_linear import on_unless_asked_off

    # The demo decodes with packed weights (1.2x its generation; TACTFUL_PACKED_LINEAR=0 turns it off):
    # README's card came out the same to the digit with and without them, on AVX-512 kernels and
    # with oneDNN and MKL held to AVX2 (benchmarks/README.md).
    with on_unless_asked_off():
        return _run_demo(out, limit, align, public_data, log)


def _run_demo(out: str, limit: int | None, align: bool, public_data: str | None,
              log: Callable[[str], None]) -> dict[str, Any]:
    from tactful.eval.report import compare
    from tactful.eval.runner import EvalConfig, evaluate
    from tactful.io import ensure_dir
    from tactful.methods.registry import train_recipe
    from tactful.progress import progress_factory
    from tactful.recipes import recipe_path

    quiet_libraries()
    root = ensure_dir(Path(out), "demo output directory")
    stages = Stages(root / "timings.json")
    suite_dir = ensure_dir(root / "suites", "demo suites directory")
    sub = write_subsampled_suites(suite_dir)
    suites = [sub.get(name, name) for name in DEMO_SUITES]
    csv = find_public_file(public_data)
    if csv is not None:
        suites += write_public_suites(csv, suite_dir)
        data_line = (f"data: tactful built-in test splits (seemingly toxic: {DEMO_SUBSAMPLE['over-refusal']} of 150, "
                     f"seeded) and XSTest v2 ({csv}; {PUBLIC_N} + {PUBLIC_N} seeded), none trained on; seed 0; 95% "
                     "bootstrap intervals")
    else:
        data_line = (f"data: tactful built-in test splits (seemingly toxic: {DEMO_SUBSAMPLE['over-refusal']} of 150, "
                     "seeded), never trained on; seed 0; 95% bootstrap intervals")
        log("public benchmark: XSTest not found (give --public-data DIR holding xstest_prompts.csv, or set "
            "TACTFUL_DATA_DIR); showing the built-in test splits only")

    base_dir = root / "base-eval"
    key = base_eval_key(suites, limit)
    if seed_from_cache(base_dir, key):
        log("base model: replies from the cache (same model file, prompts and settings)")

    def eval_base() -> dict[str, Any]:
        with progress_factory() as pf:
            return evaluate(EvalConfig(model="embedded", suites=suites, out=str(base_dir), limit=limit), progress=pf)

    before = stages.run("evaluate base", eval_base)
    store_in_cache(base_dir, key)
    if not align:
        log(safety_card(before, "embedded model (SmolLM2-135M-Instruct) before alignment", data_line=data_line))
        log(stages.line())
        return {"before": before}
    recipe = recipe_path(DEMO_RECIPE)
    log(f"aligning with {recipe} (chosen by experiments/demo_recipe: search.py, then gate.py) ...")
    run = stages.run("align", lambda: train_recipe(str(recipe), [f"output_dir={root / 'aligned'}"], log=log))

    def eval_after() -> dict[str, Any]:
        with progress_factory() as pf:
            # a prompt-gated run's base-routed prompts take the base model's replies from base_dir
            return evaluate(EvalConfig(run=str(run.path), suites=suites, out=str(root / "aligned-eval"), limit=limit,
                                       base_eval=str(base_dir)), progress=pf)

    after = stages.run("evaluate aligned", eval_after)
    res = compare([str(base_dir), str(root / "aligned-eval")], labels=["base", "aligned"], out=str(root / "compare"))
    log("")
    log(safety_card(before, "embedded model: before vs after alignment", after=after, data_line=data_line,
                    gate=gate_line(root / "aligned-eval")))
    log("")
    log(examples_side_by_side(base_dir, root / "aligned-eval"))
    log("")
    for p in res["plots"]:
        log(f"plot: {p}")
    log(f"runs: {root}")
    log(stages.line())
    return {"before": before, "after": after, "timings": stages.times}
