"""The demo's gated model on public prompts no stage of it saw: the measurement the issue's targets use.

    python experiments/demo_recipe/public_eval.py --run runs/demo/aligned      # a `make demo` run
    python experiments/audit.py batch --out runs/audit/public-harmful --eval base=runs/public-eval/base \
        --eval gated=runs/public-eval/gated --n 40 --paired --kinds harmful    # then careful reading

The issue's starting point is careful reading of replies to public held-out benchmarks. The demo's
card reads the built-in test splits and XSTest, and XSTest helped decide what the gate's training
data should look like. This script takes the held-out halves of `gate.py --public` (five harmful
sets, three sets of ordinary questions; their dev halves chose the gate, the held-out halves were
only counted), draws --n prompts per set (seeded), and evaluates the base model and the gated run on
them with `tactful eval` (64 new tokens, greedy, judge outcome-minilm; the gated run takes the base
model's replies for the prompts its gate does not flag). The prompt files and evaluations live
under --out (not committed: they hold public text); results/public-eval.md and .json keep the
judge's rates, paired differences and the gate's routing, by set and kind, with no text.

--frontier also evaluates the adapter alone on every prompt and scores each prompt with the run's
gate, then composes the gated system at every threshold of gate.py's FRONTIER_THRESHOLDS (the
adapter's reply where P(harmful) >= threshold, the base model's elsewhere; greedy replies do not
depend on their batch): results/public-frontier.md and .json, for seeing where the targets bind on
public prompts, not for choosing the threshold.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import outcome_flags, pooled_paired  # noqa: E402
from gate import DATA_DIR, FRONTIER_THRESHOLDS, PUBLIC_HARMFUL, PUBLIC_ORDINARY, RESULTS, public_halves  # noqa: E402

SUITES = {"public-harmful": ("refuse", "safe_rate", PUBLIC_HARMFUL),
          "public-ordinary": ("comply", "compliance_rate", PUBLIC_ORDINARY)}
ROWS = [("public-harmful", "declined", "harmful declined"), ("public-harmful", "evasive", "harmful off-topic filler"),
        ("public-harmful", "uplift", "harmful uplift"), ("public-harmful", "degenerate", "harmful degenerate"),
        ("public-ordinary", "refused", "ordinary refused"), ("public-ordinary", "helpful", "ordinary helped"),
        ("public-ordinary", "degenerate", "ordinary degenerate")]


def write_suites(data_dir: Path, out: Path, n: int) -> list[Path]:
    """The held-out prompts (n per set, seeded) as tactful prompt files, and a suite file for each kind."""
    import yaml

    from tactful.io import atomic_write_text

    halves = public_halves(data_dir)
    paths = []
    for suite, (expected, metric, sets) in SUITES.items():
        rows = []
        for name in sets:
            held = halves[name]["held_out"]
            picks = sorted(random.Random(f"public-eval-{name}").sample(range(len(held)), min(n, len(held))))
            label = "harmful" if expected == "refuse" else "benign"
            rows += [{"id": f"{name}-{i}", "prompt": held[i], "label": label, "category": name} for i in picks]
        data = out / f"{suite}.jsonl"
        atomic_write_text(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        spec = {"name": suite, "description": f"held-out halves of gate.py --public, {n} per set (seeded)",
                "dataset": str(data), "expected": expected, "judge": "outcome-minilm", "metric": metric,
                "generation": {"max_new_tokens": 64}}
        path = out / f"{suite}.yaml"
        atomic_write_text(path, yaml.safe_dump(spec, sort_keys=False))
        paths.append(path)
    return paths


def tactful_eval(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "tactful", "eval", *args])
    if done.returncode:
        sys.exit(done.returncode)


def items(eval_dir: Path, suite: str) -> list[dict[str, Any]]:
    path = eval_dir / suite / "items.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def summarise(out: Path, run: Path, n: int) -> dict[str, Any]:
    from tactful.eval import metrics as M

    res: dict[str, Any] = {"run": str(run), "n_per_set": n, "rows": {}, "routes": {}, "by_set": {}}
    for suite, flag, label in ROWS:
        b = outcome_flags(out / "base", suite, flag)
        g = {k: v for k, v in outcome_flags(out / "gated", suite, flag).items() if k in b}
        res["rows"][label] = {"base": M.rate([bool(v) for v in b.values()]).to_dict(),
                              "gated": M.rate([bool(v) for v in g.values()]).to_dict(),
                              "paired": pooled_paired(b, [g])}
    for suite, (_, _, sets) in SUITES.items():
        routes = {str(r["id"]): r.get("route") for r in items(out / "gated", suite)}
        flag = "declined" if suite == "public-harmful" else "refused"
        per = {who: outcome_flags(out / who, suite, flag) for who in ("base", "gated")}
        for name in sets:
            ids = [i for i in routes if i.rsplit("-", 1)[0] == name]
            res["routes"][name] = {"adapter": sum(routes[i] == "adapter" for i in ids), "n": len(ids)}
            res["by_set"][name] = {who: {"flag": flag, "k": int(sum(per[who].get(i, 0) for i in ids)),
                                         "n": sum(i in per[who] for i in ids)} for who in per}
    return res


def adapter_alone(run: Path, dest: Path) -> Path:
    """A copy of the run's manifest and adapter without its gate: the adapter answers every prompt."""
    import shutil

    from tactful.io import atomic_write_json

    manifest = json.loads((run / "manifest.json").read_text())
    manifest.pop("gate", None)
    adapter = manifest.get("adapter")
    if not adapter or not (run / adapter).is_dir():
        sys.stderr.write(f"error: {run}/manifest.json names no adapter folder\n")
        sys.exit(2)
    shutil.copytree(run / adapter, dest / adapter, dirs_exist_ok=True)
    atomic_write_json(dest / "manifest.json", manifest)
    return dest


def gate_probabilities(run: Path, out: Path) -> dict[str, dict[str, float]]:
    """{suite: {item id: P(harmful)}} by the run's gate, read on its base model, for the prompt files."""
    from tactful.methods.prompt_gate import load_base_of_run, run_gate

    gate = run_gate(run)
    model, tok = load_base_of_run(run)
    probs = {}
    for suite in SUITES:
        rows = [json.loads(x) for x in (out / f"{suite}.jsonl").read_text().splitlines() if x.strip()]
        p = gate.score(model, tok, [r["prompt"] for r in rows])
        probs[suite] = {str(r["id"]): float(v) for r, v in zip(rows, p.tolist())}
    return probs


def reading(labels: list[dict[str, Any]], fires: dict[str, bool], routes: dict[str, str]) -> dict[str, float]:
    """Outcome rates by careful reading for the system `fires` describes, estimated from the blind audit
    sample: P(fires) x the adapter's rates on audited prompts it answered in the gated run + the rest x
    the base model's on audited prompts (the same estimate as gate.py's)."""
    if not fires or not labels:
        return {}
    p = sum(fires.values()) / len(fires)
    ad = [r for r in labels if r["arm"] == "gated" and routes.get(str(r["id"])) == "adapter" and fires.get(str(r["id"]))]
    ba = [r for r in labels if r["arm"] == "base" and not fires.get(str(r["id"]))]
    out = {}
    for o in sorted({r["outcome"] for r in labels}):
        a = sum(r["outcome"] == o for r in ad) / len(ad) if ad else (0.0 if p == 0 else None)
        b = sum(r["outcome"] == o for r in ba) / len(ba) if ba else (0.0 if p == 1 else None)
        if a is not None and b is not None:
            out[o] = p * a + (1 - p) * b
    return out


FRONTIER_COLS = (("public-harmful", "declined", "harmful declined"), ("public-harmful", "uplift", "harmful uplift"),
                 ("public-ordinary", "refused", "ordinary refused"), ("public-ordinary", "helpful", "ordinary helped"))


def frontier(out: Path, probs: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The gated system at every threshold, by the judge (paired with the base model) and by reading."""
    points = []
    # only the harmful audit is a random sample of both models' replies (the ordinary one read the
    # replies the gate changed), so only it gives a reading estimate at other thresholds
    path = RESULTS / "audit-public-harmful-labels.jsonl"
    labels = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    routes = {str(r["id"]): r.get("route") for r in items(out / "gated", "public-harmful")}
    for t in FRONTIER_THRESHOLDS:
        point: dict[str, Any] = {"threshold": t, "fires": {}}
        for suite in SUITES:
            fires = {i: p >= t for i, p in probs[suite].items()}
            point["fires"][suite] = {"k": sum(fires.values()), "n": len(fires)}
            if suite == "public-harmful":
                point["reading"] = reading(labels, fires, routes)
        for suite, flag, label in FRONTIER_COLS:
            b = outcome_flags(out / "base", suite, flag)
            ad = outcome_flags(out / "adapter", suite, flag)
            sys_ = {i: (ad[i] if probs[suite].get(i, 0) >= t and i in ad else v) for i, v in b.items()}
            paired = pooled_paired(b, [sys_])
            point[label] = {"base": sum(b.values()) / len(b), "system": sum(sys_.values()) / len(sys_), "paired": paired}
        points.append(point)
    return {"points": points}


def frontier_table(res: dict[str, Any], judge_accuracy: str, run: str, n: int) -> str:
    p0 = res["points"][0]
    lines = ["# The gate's threshold on public held-out prompts: the frontier it can reach", "",
             f"Model: the embedded SmolLM2-135M-Instruct and the demo's adapter (run `{Path(run).name}`, seed 0) behind "
             f"its gate; prompts: {n} per set (seeded) from the held-out halves of `gate.py --public`; greedy, 64 new "
             f"tokens; judge `outcome-minilm` ({judge_accuracy}). The system at a threshold: the adapter's reply where "
             "the gate's P(harmful) reaches it, the base model's elsewhere. Judge: rate, and paired difference vs the "
             "base model with its 95% bootstrap interval. Reading: the harmful prompts' declined rate estimated "
             "from the blind random sample of 40 (results/audit-public-harmful-labels.jsonl): P(fires) x the rate "
             "of the adapter's replies read (those the 0.5 gate sent it, standing for every prompt a threshold "
             "sends it) + the rest x the base model's on the prompts read that the gate keeps. The demo's threshold (0.5) was chosen on the dev halves; this table shows where the targets "
             "bind, it chooses nothing. `python experiments/demo_recipe/public_eval.py --frontier`", "",
             f"Base model (judge): harmful declined {100 * p0['harmful declined']['base']:.1f}, ordinary refused "
             f"{100 * p0['ordinary refused']['base']:.1f}, ordinary helped {100 * p0['ordinary helped']['base']:.1f}.",
             "", "| threshold | gate fires: harmful / ordinary | harmful declined | harmful uplift | ordinary refused | "
             "ordinary helped | reading: harmful declined |", "|---|---|---|---|---|---|---|"]

    def cell(c: dict[str, Any]) -> str:
        p = c["paired"]
        return f"{100 * c['system']:.1f} ({100 * p['delta']:+.1f} [{100 * p['ci_low']:+.1f}, {100 * p['ci_high']:+.1f}])"

    for pt in res["points"]:
        f = pt["fires"]
        rh = pt["reading"].get("declined")
        lines.append(f"| {pt['threshold']:g} | {f['public-harmful']['k']}/{f['public-harmful']['n']} / "
                     f"{f['public-ordinary']['k']}/{f['public-ordinary']['n']} | "
                     + " | ".join(cell(pt[c[2]]) for c in FRONTIER_COLS) + f" | {'—' if rh is None else f'{100 * rh:.0f}'} |")
    return "\n".join(lines) + "\n"


def table(res: dict[str, Any], judge_accuracy: str) -> str:
    lines = ["# The demo's gated model on public held-out prompts", "",
             f"Model: the embedded SmolLM2-135M-Instruct, before and after `make demo`'s alignment (run "
             f"`{Path(res['run']).name}`, seed 0); prompts: {res['n_per_set']} per set (seeded) from the held-out "
             "halves of `gate.py --public` (never fitted on or chosen on); greedy, 64 new tokens; judge "
             f"`outcome-minilm` ({judge_accuracy}). Paired difference: gated - base over the same prompts, 95% "
             "bootstrap CI. `python experiments/demo_recipe/public_eval.py`", "",
             "| outcome | base | gated | paired difference |", "|---|---|---|---|"]
    for label, r in res["rows"].items():
        p = r["paired"]
        lines.append(f"| {label} | {100 * r['base']['value']:.1f} | {100 * r['gated']['value']:.1f} | "
                     f"{100 * p['delta']:+.1f} [{100 * p['ci_low']:+.1f}, {100 * p['ci_high']:+.1f}] |")
    lines += ["", "By set (judge; the gate's routing):", "", "| set | gate sends to the adapter | judge, base | "
              "judge, gated |", "|---|---|---|---|"]
    for name, st in res["routes"].items():
        cells = res["by_set"].get(name, {})
        b, g = cells.get("base", {}), cells.get("gated", {})
        lines.append(f"| {name} | {st['adapter']}/{st['n']} | {b.get('flag', '')} {b.get('k', 0)}/{b.get('n', 0)} | "
                     f"{g.get('flag', '')} {g.get('k', 0)}/{g.get('n', 0)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo/aligned"), help="the gated training run")
    ap.add_argument("--data", type=Path, default=DATA_DIR, help="folder of the public benchmark files")
    ap.add_argument("--out", type=Path, default=Path("runs/public-eval"))
    ap.add_argument("--n", type=int, default=30, help="prompts per public set")
    ap.add_argument("--frontier", action="store_true",
                    help="also the adapter alone, and the gated system at every threshold (results/public-frontier.md)")
    a = ap.parse_args()
    missing = [f for f in (*PUBLIC_HARMFUL.values(), *PUBLIC_ORDINARY.values()) if not (a.data / f).is_file()]
    if missing:
        sys.stderr.write(f"error: {a.data / missing[0]} not found (--data names the folder of the public files)\n")
        sys.exit(2)
    if not (a.run / "gate").exists():
        sys.stderr.write(f"error: {a.run}: not a prompt-gated training run (give a `make demo` run's aligned/)\n")
        sys.exit(2)
    if a.n <= 0:
        sys.stderr.write("error: --n must be positive\n")
        sys.exit(2)
    suites = ",".join(str(p) for p in write_suites(a.data, a.out, a.n))
    tactful_eval(["--model", "embedded", "--suite", suites, "--out", str(a.out / "base")])
    tactful_eval(["--run", str(a.run), "--suite", suites, "--out", str(a.out / "gated"),
                  "--base-eval", str(a.out / "base")])
    res = summarise(a.out, a.run, a.n)
    from tactful.eval.judges.validation import format_accuracy
    from tactful.io import atomic_write_json, atomic_write_text

    final = json.loads((RESULTS / "final-sft-declines-anchors.json").read_text())
    acc = format_accuracy(final.get("judge_accuracy") or {})
    res["judge_accuracy"] = acc
    atomic_write_json(RESULTS / "public-eval.json", res)
    atomic_write_text(RESULTS / "public-eval.md", table(res, acc))
    print((RESULTS / "public-eval.md").read_text())
    if a.frontier:
        alone = adapter_alone(a.run, a.out / "adapter-run")
        tactful_eval(["--run", str(alone), "--suite", suites, "--out", str(a.out / "adapter")])
        fr = {"run": str(a.run), "n_per_set": a.n, "judge_accuracy": acc,
              **frontier(a.out, gate_probabilities(a.run, a.out))}
        atomic_write_json(RESULTS / "public-frontier.json", fr)
        atomic_write_text(RESULTS / "public-frontier.md", frontier_table(fr, acc, str(a.run), a.n))
        print((RESULTS / "public-frontier.md").read_text())


if __name__ == "__main__":
    main()
