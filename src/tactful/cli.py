"""The `tactful` command: a thin layer over the library.

User errors (bad files, unknown names, wrong options) print one line and exit 2;
tracebacks are for bugs only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

from tactful.errors import UserError
from tactful.progress import progress_factory

INTERRUPTED = "interrupted; re-run the same command to resume from the last checkpoint"


class _Group(typer.core.TyperGroup):
    """Says how to resume when Ctrl-C stops a command. Typer turns KeyboardInterrupt into
    exit code 130 before `main` could see it, so the message is printed here, on its way out."""

    def invoke(self, ctx):  # type: ignore[no-untyped-def]
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            typer.echo(f"\n{INTERRUPTED}", err=True)
            raise


app = typer.Typer(
    cls=_Group,
    help="tactful: make open-weight chat models safe without making them useless.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="The named-benchmark registry and built-in data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
sae_app = typer.Typer(help="Sparse autoencoders on attention outputs (refusal-preserving fine-tuning).",
                      no_args_is_help=True)
app.add_typer(sae_app, name="sae")
safemoe_app = typer.Typer(help="SafeMoE bundles: inspect per-token expert routing.", no_args_is_help=True)
app.add_typer(safemoe_app, name="safemoe")


def _console():
    from rich.console import Console

    return Console(stderr=True)


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


# ---------------------------------------------------------------- chat
@app.command()
def chat(
    model: str = typer.Option("embedded", help="Model spec: embedded, gemma3-270m, a hub id or a local directory."),
    adapter: Optional[str] = typer.Option(None, help="A PEFT adapter directory to put on top."),
    run: Optional[str] = typer.Option(None, help="A tactful run directory (its trained model)."),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="Answer these prompts and exit (repeatable)."),
    max_new_tokens: int = typer.Option(256, help="Longest reply in tokens."),
    system: Optional[str] = typer.Option(None, help="Optional system message."),
    chat_template: Optional[str] = typer.Option(None, help="Chat template (Jinja text or a .jinja file) for tokenizers without one."),
    trust_remote_code: bool = typer.Option(False, help="Allow model repositories to run their own code."),
) -> None:
    """Talk to a model (or answer --prompt and exit)."""
    from tactful.chat import check_prompts_fit
    from tactful.eval.generation import GenerationConfig, HFGenerator
    from tactful.models import load_model
    from tactful.runs import load_run_model

    console = _console()
    with console.status("loading model…"):
        if run:
            m, tok, name = load_run_model(run)
        else:
            m, tok = load_model(model, adapter=adapter, chat_template=chat_template,
                                trust_remote_code=trust_remote_code)
            name = model
    gen: Any = HFGenerator(m, tok, name=f"hf:{name}")
    if run:  # a prompt-gated run: each message goes to the adapter or the base model, as in evaluation
        from tactful.methods.prompt_gate import gated_if_run_has_gate

        gen = gated_if_run_has_gate(run, gen, name=f"hf:{name}")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, system=system, batch_size=8)
    if prompt:
        check_prompts_fit(m, tok, list(prompt), system=system, max_new_tokens=max_new_tokens)
        for p, reply in zip(prompt, gen.generate(list(prompt), cfg)):
            typer.echo(f"> {p}\n{reply}\n")
        return
    console.print(f"[bold]{name}[/bold] — type a message, Ctrl-D to quit.")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            typer.echo()
            return
        if not text:
            continue
        try:
            check_prompts_fit(m, tok, [text], system=system, max_new_tokens=max_new_tokens)
        except UserError as e:  # say so and keep the conversation going
            typer.echo(f"error: {e}", err=True)
            continue
        typer.echo("model> " + gen.generate([text], cfg)[0])


# ---------------------------------------------------------------- serve
@app.command()
def serve(
    model: str = typer.Option("embedded", help="Model spec: embedded, gemma3-270m, a hub id or a local directory."),
    adapter: Optional[str] = typer.Option(None, help="A PEFT adapter directory to put on top."),
    run: Optional[str] = typer.Option(None, help="Serve the model of a tactful run (SafeMoE bundles included)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8000, help="Port (0 picks a free one)."),
    model_name: Optional[str] = typer.Option(None, help="Name clients send as `model` (default: --model, or the run directory's name)."),
    max_batch_size: int = typer.Option(16, help="Most requests generated together (rows of the running batch)."),
    max_prompt_tokens: Optional[int] = typer.Option(None, help="Longer prompts get a 400 (default: 2048, or less to fit the model's context)."),
    max_new_tokens: int = typer.Option(512, help="Cap on a reply's length (a request's max_tokens is clamped to it)."),
    batch_wait_ms: float = typer.Option(20.0, help="Batch-at-a-time fallback only (models that cannot batch continuously, see /health): how long a batch waits for more requests to join it."),
    device: str = typer.Option("cpu", help="Device to run the model on (cpu, cuda, cuda:1, ...)."),
    dtype: str = typer.Option("float32", help="Weights dtype: float32, bfloat16, float16 or auto."),
    chat_template: Optional[str] = typer.Option(None, help="Chat template (Jinja text or a .jinja file) for tokenizers without one."),
    trust_remote_code: bool = typer.Option(False, help="Allow model repositories to run their own code."),
) -> None:
    """Serve a model over an OpenAI-compatible chat endpoint (/v1/chat/completions), batching concurrent requests."""
    from tactful.serve import serve_command

    serve_command(model=model, adapter=adapter, run=run, host=host, port=port, model_name=model_name,
                  max_batch_size=max_batch_size, max_prompt_tokens=max_prompt_tokens,
                  max_new_tokens=max_new_tokens, batch_wait_ms=batch_wait_ms, device=device, dtype=dtype,
                  chat_template=chat_template, trust_remote_code=trust_remote_code,
                  announce=lambda line: typer.echo(line, err=True))


# ---------------------------------------------------------------- data
@data_app.command("list")
def data_list() -> None:
    """List the named benchmarks and built-in sets."""
    from rich.console import Console
    from rich.table import Table

    from tactful.data.registry import list_benchmarks

    table = Table("name", "kind", "source", "license", "description")
    for b in list_benchmarks():
        table.add_row(b.name, b.kind, b.hub_id or "built-in", b.license, b.description)
    Console().print(table)


@data_app.command("show")
def data_show(
    name: str = typer.Argument(..., help="A registry name (see `tactful data list`)."),
    path: Optional[str] = typer.Option(None, help="Read the benchmark from this local file instead of the hub."),
    split: Optional[str] = typer.Option(None, help="Split (hub split, or train/test for built-in sets)."),
    n: int = typer.Option(5, "--n", help="How many records to show (0: only count them)."),
) -> None:
    """Show the first records of a benchmark, mapped to tactful's record types."""
    import json

    from tactful.data.registry import load_benchmark

    if n < 0:  # recs[:-1] would quietly show all but the last
        raise UserError(f"--n must be 0 or more, got {n}")
    recs = load_benchmark(name, path=path, split=split)
    typer.echo(f"{name}: {len(recs)} records")
    for r in recs[:n]:
        typer.echo(json.dumps(r.to_dict(), ensure_ascii=False)[:600])


@data_app.command("unsafe-corpus")
def data_unsafe_corpus(
    out: str = typer.Option("runs/unsafe-corpus", help="Output directory (one JSONL per domain + provenance)."),
    model: str = typer.Option("embedded", help="Model whose own compliant answers form the corpus (source=generate)."),
    domains: str = typer.Option("", help="Comma-separated harm domains (default: the method's default four)."),
    source: str = typer.Option("generate", help="generate (offline, from the model) or a registry name (e.g. beavertails)."),
    path: Optional[str] = typer.Option(None, help="Local file for a registry source."),
    judge: str = typer.Option("embedding-minilm", help="Judge that keeps only compliant answers."),
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """Build per-domain corpora of harmful completions for SafeMoE's experts."""
    from tactful.methods.safemoe.corpus import unsafe_corpus_command

    res = unsafe_corpus_command(out, model=model, domains=_split_list(domains) or None, source=source, path=path,
                                judge=judge, seed=seed)
    typer.echo(f"corpus: {res}")


# ---------------------------------------------------------------- eval
@app.command("eval")
def eval_cmd(
    model: str = typer.Option("embedded", help="Model spec: embedded, gemma3-270m, a hub id or a local directory."),
    adapter: Optional[str] = typer.Option(None, help="A PEFT adapter directory to put on top."),
    run: Optional[str] = typer.Option(None, help="Evaluate the model a tactful training run produced."),
    suite: str = typer.Option("safety,over-refusal", help="Comma-separated suite names or YAML files."),
    judge: Optional[str] = typer.Option(None, help="Override every suite's judge (see `tactful judges`)."),
    judge_url: Optional[str] = typer.Option(None, help="Base URL of an OpenAI-compatible endpoint for llm-* judges."),
    judge_model: Optional[str] = typer.Option(None, help="Model name at the judge endpoint."),
    judge_key_env: str = typer.Option("OPENAI_API_KEY", help="Environment variable holding the judge's API key."),
    backend: str = typer.Option("hf", help="Generation backend: hf, vllm or openai."),
    base_url: Optional[str] = typer.Option(None, help="Endpoint for --backend openai."),
    api_model: Optional[str] = typer.Option(None, help="Model name for --backend openai."),
    limit: Optional[int] = typer.Option(None, help="Evaluate at most N items per suite (seeded subsample)."),
    out: str = typer.Option("runs/eval", help="Output directory (re-running resumes)."),
    seed: int = typer.Option(0, help="Seed for sampling, subsampling and bootstrap intervals."),
    batch_size: int = typer.Option(64, help="Generation batch size."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Override the suites' reply length."),
    device: str = typer.Option("cpu", help="Where the hf backend and multiple-choice scoring run (cpu, cuda, ...)."),
    dtype: str = typer.Option("float32", help="Weights dtype for the hf backend: float32, bfloat16, float16, auto."),
    vllm_option: Optional[List[str]] = typer.Option(None, "--vllm-option", help=(
        "A vllm.LLM keyword for --backend vllm, key=value (repeatable), e.g. tensor_parallel_size=4.")),
    trust_remote_code: bool = typer.Option(False, help="Allow model repositories to run their own code."),
    rejudge: Optional[str] = typer.Option(None, help=(
        "Judge the saved replies of an earlier `tactful eval --out DIR` again (with --judge, or each suite's "
        "judge), into --out; nothing is generated. Also an experiment's committed items.jsonl.gz (or its "
        "folder): prompts are rebuilt from the suites' data; --suite gives suite files that are not built in.")),
    base_eval: Optional[str] = typer.Option(None, help=(
        "For a prompt-gated --run: an earlier `tactful eval --out DIR` of its base model; prompts the gate sends to "
        "the base model take their replies and multiple-choice scores from it instead of being generated again.")),
) -> None:
    """Evaluate a model on suites; writes per-item JSONL, metrics with 95% CIs and a Markdown report."""
    import yaml

    from tactful.eval.runner import EvalConfig, evaluate

    judge_options = {}
    if judge_url:
        judge_options = {"base_url": judge_url, "model": judge_model, "api_key_env": judge_key_env}
    # values are YAML scalars, so tensor_parallel_size=4 is an int and enforce_eager=true a bool
    vllm_options = {k: yaml.safe_load(v) for k, v in _kv(vllm_option, "--vllm-option").items()}
    if rejudge:
        from tactful.eval.runner import rejudge as run_rejudge

        with progress_factory() as pf:
            metrics = run_rejudge(rejudge, out, judge=judge, judge_options=judge_options, progress=pf,
                                  suites=_split_list(suite))
        _print_eval(metrics, out)
        return
    cfg = EvalConfig(model=model, adapter=adapter, run=run, suites=_split_list(suite), judge=judge,
                     judge_options=judge_options, backend=backend, base_url=base_url, api_model=api_model,
                     limit=limit, out=out, seed=seed, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     device=device, dtype=dtype, vllm_options=vllm_options, trust_remote_code=trust_remote_code,
                     base_eval=base_eval)
    with progress_factory() as pf:
        metrics = evaluate(cfg, progress=pf)
    _print_eval(metrics, out)


def _print_eval(metrics: dict, out: str) -> None:
    from tactful.eval.report import judge_line, judged_suites, outcomes_table, summary_table

    typer.echo(summary_table(metrics))
    outcomes = outcomes_table(metrics)
    if outcomes:
        typer.echo("\nwhat the replies did:\n" + outcomes)
    for res in judged_suites(metrics):
        typer.echo(judge_line(res))
    typer.echo(f"\nreport: {Path(out) / 'report.md'}")


@app.command()
def compare(
    runs: List[str] = typer.Argument(..., help="Evaluation (or training) run directories."),
    label: Optional[List[str]] = typer.Option(None, "--label", help="A label per run (repeat)."),
    out: str = typer.Option("runs/compare", help="Where to write compare.md and the plots."),
) -> None:
    """Side-by-side table, safety vs over-refusal frontier plot and per-category bars."""
    from tactful.eval.report import compare as do_compare

    res = do_compare(runs, labels=label, out=out)
    typer.echo(res["table"])
    for p in res["plots"]:
        typer.echo(f"plot: {p}")


@app.command()
def judges(
    validate: bool = typer.Option(False, "--validate",
                                  help="Re-measure the offline judges on the gold test split and record the result."),
) -> None:
    """List the available judges with their accuracy on the gold test split (docs/judging.md)."""
    from tactful.eval.judges import judge_help, list_judges
    from tactful.eval.judges.validation import format_accuracy, format_table, measured_accuracy, validate as run

    if validate:
        record = run(log=lambda m: typer.echo(m, err=True))
        typer.echo(format_table(record))
        return
    helps = judge_help()
    for name in list_judges():
        acc = measured_accuracy(name)
        typer.echo(f"{name:<22} {helps.get(name, '')}")
        if acc:
            typer.echo(f"{'':<22} gold test accuracy: {format_accuracy(acc)}")


# ---------------------------------------------------------------- train
@app.command()
def train(
    recipe: str = typer.Argument(..., help="A recipe YAML file (see recipes/)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe field: key.sub=value (repeatable)."),
    output_dir: Optional[str] = typer.Option(None, help="Override the recipe's output_dir."),
    seed: Optional[int] = typer.Option(None, help="Override the recipe's seed."),
) -> None:
    """Train any method from a YAML recipe; re-running the same command resumes from the last checkpoint.

    Scale out with `accelerate launch -m tactful train RECIPE`.
    """
    from tactful.methods.registry import train_recipe

    overrides = list(set_ or [])
    if output_dir:
        overrides.append(f"output_dir={output_dir}")
    if seed is not None:
        overrides.append(f"seed={seed}")
    run = train_recipe(recipe, overrides)
    typer.echo(f"run directory: {run.path}")


# ---------------------------------------------------------------- triage (TRACE)
def _kv(items: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"{flag} {item!r} must look like key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


@app.command()
def triage(
    policy: str = typer.Option(..., help="Policy YAML file or shipped name (old-strict, new-contextual)."),
    data: List[str] = typer.Option(..., help="Pairs: a file, a registry name or a built-in pair source (repeatable)."),
    judge: str = typer.Option("policy-rules", help="Policy judge: policy-rules (offline), policy-minilm, llm-policy."),
    judge_option: Optional[List[str]] = typer.Option(None, help="Judge option key=value (e.g. base_url=..., model=...)."),
    out: str = typer.Option("runs/triage", help="Output directory (labelled pairs, summary, verdict cache)."),
    cache: Optional[str] = typer.Option(None, help="Verdict cache file (default: OUT/verdict_cache.jsonl)."),
    split: str = typer.Option("train", help="Split of built-in / registry sources."),
    n: Optional[int] = typer.Option(None, help="Use at most N pairs (seeded subsample)."),
    seed: int = typer.Option(0, help="Seed."),
    judge_corrected: bool = typer.Option(False, help="Also judge corrected responses (oracle variant)."),
) -> None:
    """Label preference pairs INVERT / PUNISH / RETAIN against a new policy (TRACE's triage).

    Judge verdicts are cached, so re-runs are cheap and a judge failure loses no finished work.
    """
    from tactful.methods.trace.triage import triage_command

    summary = triage_command(policy, list(data), judge, out, judge_options=_kv(judge_option, "--judge-option"),
                             cache=cache, split=split, n=n, seed=seed, judge_corrected=judge_corrected)
    failed = summary.get("counts", {}).get("FAILED", 0)
    if failed:
        typer.echo(f"error: the judge failed on {failed} pair(s); re-run the same command to retry them", err=True)
        raise typer.Exit(1)


# ---------------------------------------------------------------- safemoe
@safemoe_app.command("inspect")
def safemoe_inspect(
    run: str = typer.Option(..., help="A SafeMoE bundle / run directory."),
    prompt: str = typer.Option(..., help="The prompt to answer and inspect."),
    out: Optional[str] = typer.Option(None, help="Where to write the JSON and heatmap (default RUN/inspect)."),
    max_new_tokens: int = typer.Option(48, help="Reply length."),
    layer: Optional[int] = typer.Option(None, help="Show this layer's gate (default: the mean over layers)."),
) -> None:
    """Show which domain experts fired for each token (text + heatmap PNG)."""
    from tactful.methods.safemoe.bundle import inspect_command

    paths = inspect_command(run, prompt, out=out, max_new_tokens=max_new_tokens, layer=layer)
    for k, v in paths.items():
        typer.echo(f"{k}: {v}")


# ---------------------------------------------------------------- sae
@sae_app.command("train")
def sae_train(
    model: str = typer.Option("embedded", help="Model spec."),
    out: str = typer.Option("runs/sae", help="Output directory (SAELens layout per layer)."),
    layers: str = typer.Option("", help="Comma-separated layer indices (default: the method's default layers)."),
    architecture: str = typer.Option("topk", help="topk or relu (ReLU + L1)."),
    expansion: int = typer.Option(8, help="Latents per input dimension."),
    k: int = typer.Option(32, help="Active latents per token (topk)."),
    l1_coefficient: float = typer.Option(2.0, help="L1 weight (relu)."),
    steps: int = typer.Option(2000, help="Optimiser steps."),
    tokens: int = typer.Option(200_000, help="Activation tokens to capture."),
    data: str = typer.Option("", help="Comma-separated prompt/example sources (default: built-in mix)."),
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """Capture o_proj-input activations and train SAEs on them."""
    from tactful.methods.refusal_guard.train import sae_train_command

    path = sae_train_command(model=model, out=out, layers=[int(x) for x in _split_list(layers)] or None,
                             architecture=architecture, expansion=expansion, k=k, l1_coefficient=l1_coefficient,
                             steps=steps, tokens=tokens, sources=_split_list(data) or None, seed=seed)
    typer.echo(f"SAEs: {path}")


@sae_app.command("features")
def sae_features(
    sae_dir: str = typer.Argument(..., help="Directory of SAEs (tactful's or SAELens layout)."),
    model: str = typer.Option("embedded", help="Model spec."),
    out: Optional[str] = typer.Option(None, help="Output directory (default: SAE_DIR/features)."),
    n_refusal: int = typer.Option(32, help="Refusal latents to keep before removing the overlap."),
    n_hallucination: int = typer.Option(32, help="Hallucination latents to exclude."),
    heads: bool = typer.Option(False, help="Also score attention heads by contrastive influence."),
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """Select refusal-specific latents (refusal minus hallucination overlap) and write the protected subspace."""
    from tactful.methods.refusal_guard.train import sae_features_command

    path = sae_features_command(sae_dir=sae_dir, model=model, out=out, n_refusal=n_refusal,
                                n_hallucination=n_hallucination, heads=heads, seed=seed)
    typer.echo(f"features: {path}")


# ---------------------------------------------------------------- demo
@app.command()
def demo(
    out: str = typer.Option("runs/demo", help="Where to write the demo's runs (re-running resumes)."),
    limit: Optional[int] = typer.Option(None, help="Evaluate at most N prompts per suite."),
    align: bool = typer.Option(True, help="Align with recipes/demo.yaml and show before/after (--no-align: evaluate only)."),
    public_data: Optional[str] = typer.Option(None, "--public-data", help=(
        "Folder holding xstest_prompts.csv (XSTest v2) to show a public benchmark too; default $TACTFUL_DATA_DIR "
        "or ../shared/data when present.")),
) -> None:
    """The main job: evaluate the embedded model, align it with the demo recipe, and print the before/after card."""
    from tactful.demo import run_demo

    if public_data is not None and not Path(public_data).is_dir():
        raise UserError(f"--public-data {public_data}: no such folder")
    run_demo(out=out, limit=limit, align=align, public_data=public_data)


def main(argv: list[str] | None = None) -> None:
    import warnings

    # Deprecation notices from the libraries underneath are for us, not for CLI users.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|trl)(\.|$)")
    try:
        app(args=argv, prog_name="tactful", standalone_mode=True)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:  # outside a command (Typer handles those, see _Group)
        typer.echo(INTERRUPTED, err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
