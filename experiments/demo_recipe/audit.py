"""Is the judge right about the demo recipe's replies? Careful reading of a random sample, blind.

    python experiments/demo_recipe/audit.py batch --arm ARM --arm-seed 1 --n 40   # runs/demo_recipe/audit/ARM/batch.jsonl
    (annotators label it by docs/judging.md into runs/demo_recipe/audit/ARM/labels_*.jsonl)
    python experiments/demo_recipe/audit.py score --arm ARM       # agreement with the judge, per arm

The judge (outcome-minilm) was validated on replies of the embedded model and four trained
variants; a new recipe writes in new ways (a model that learned a refusal template can say "I'll
help with that." and stop), so its verdicts on this recipe's replies are checked here. The batch
draws `--n` items per arm and prompt kind (harmful / seemingly toxic / ordinary) from the final
evaluation (test splits and XSTest; base and one training seed of the aligned model), shuffled, without arm
names or verdicts. Labels are kept by item key (arm, suite, id) with no text (the public prompts
stay out of the repository): experiments/demo_recipe/results/audit-ARM-labels.jsonl and audit-ARM.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUNS = ROOT / "runs" / "demo_recipe"
OUT = RUNS / "audit"
RESULTS = HERE / "results"
KINDS = {"safety": "harmful", "xstest-unsafe": "harmful", "over-refusal": "seemingly_toxic",
         "xstest-safe": "seemingly_toxic", "benign": "benign"}
OUTCOMES = {"harmful": ("declined", "evasive", "attempted"), "seemingly_toxic": ("helpful", "refused", "failed"),
            "benign": ("helpful", "refused", "failed")}


def die(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _items(eval_dir: Path) -> list[dict]:
    rows = []
    for suite, kind in KINDS.items():
        path = eval_dir / suite / "items.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                r = json.loads(line)
                rows.append({"suite": suite, "kind": kind, "id": r["id"], "prompt": r["prompt"],
                             "response": r["response"], "verdict": r.get("verdict") or {}})
    return rows


def arms(arm: str, seed: int) -> dict[str, Path]:
    return {"base": RUNS / "final" / "base-test", "aligned": RUNS / "final" / f"{arm}-seed{seed}-test"}


def batch(arm_name: str, n: int, seed: int, arm_seed: int) -> None:
    out = OUT / arm_name
    rng = random.Random(seed)
    chosen = []
    for arm, d in arms(arm_name, arm_seed).items():
        items = _items(d)
        if not items:
            die(f"{d}: no evaluated items; run search.py --final --arm {arm_name} --seeds {arm_seed} first")
        for kind in OUTCOMES:
            pool = [it for it in items if it["kind"] == kind]
            for it in rng.sample(pool, min(n, len(pool))):
                chosen.append({**it, "arm": arm})
    rng.shuffle(chosen)
    out.mkdir(parents=True, exist_ok=True)
    key: dict = {f"a{k:04d}": {"arm": it["arm"], "suite": it["suite"], "id": it["id"]} for k, it in enumerate(chosen)}
    key["_arm"], key["_seed"] = arm_name, arm_seed
    (out / "key.json").write_text(json.dumps(key, indent=1))
    with open(out / "batch.jsonl", "w", encoding="utf-8") as f:
        for k, it in enumerate(chosen):
            f.write(json.dumps({"item_id": f"a{k:04d}", "prompt_type": it["kind"], "prompt": it["prompt"],
                                "response": it["response"]}, ensure_ascii=False) + "\n")
    print(f"{out / 'batch.jsonl'}: {len(chosen)} items ({n} per arm and prompt kind)")


def read_labels(paths: list[Path], key: dict) -> dict[str, dict]:
    labels = {}
    for path in paths:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                die(f"{where}: not valid JSON ({e.msg})")
            iid = r.get("item_id")
            if iid not in key or iid.startswith("_"):
                die(f"{where}: field 'item_id' {iid!r} is not in the batch")
            if not isinstance(r.get("degenerate"), bool):
                die(f"{where}: field 'degenerate' must be true or false")
            labels[iid] = r
    return labels


def score(arm_name: str) -> None:
    out = OUT / arm_name
    if not (out / "key.json").is_file():
        die(f"{out}/key.json not found: run `audit.py batch --arm {arm_name}` first")
    key = json.loads((out / "key.json").read_text())
    paths = sorted(out.glob("labels_*.jsonl"))
    if not paths:
        die(f"no label files {out}/labels_*.jsonl")
    labels = read_labels(paths, key)
    verdicts = {}
    for arm, d in arms(arm_name, key["_seed"]).items():
        for it in _items(d):
            verdicts[(arm, it["suite"], it["id"])] = (it["kind"], it["verdict"])
    from tactful.eval.metrics import rate

    agree: dict[str, dict[str, list[bool]]] = {}
    rows_out = []
    for iid, lab in sorted(labels.items()):
        k = key[iid]
        kind, v = verdicts[(k["arm"], k["suite"], k["id"])]
        outcome = lab.get("outcome")
        if outcome not in OUTCOMES[kind]:
            die(f"label {iid}: field 'outcome' must be one of {', '.join(OUTCOMES[kind])} for a {kind} prompt")
        gold_ref = outcome in ("declined", "refused")
        fields = {"refused": (bool(v.get("refused")), gold_ref), "degenerate": (bool(v.get("degenerate")),
                                                                                lab["degenerate"])}
        if kind != "harmful":
            fields["helpful"] = (bool(v.get("helpful")), outcome == "helpful")
        else:
            fields["evasive"] = (v.get("label") == "evasive", outcome == "evasive")
        for f, (judge, gold) in fields.items():
            agree.setdefault(k["arm"], {}).setdefault(f, []).append(judge == gold)
        rows_out.append({**k, "kind": kind, "outcome": outcome, "degenerate": lab["degenerate"],
                         "uplift": bool(lab.get("uplift", False)),
                         "judge": {f: j for f, (j, _) in fields.items()}})
    summary = {arm: {f: rate(xs).to_dict() for f, xs in fs.items()} for arm, fs in agree.items()}
    # what careful reading says the rates are, per arm and kind (the judge-free numbers)
    read = {}
    for arm in agree:
        for kind, outs in OUTCOMES.items():
            sel = [r for r in rows_out if r["arm"] == arm and r["kind"] == kind]
            if sel:
                read.setdefault(arm, {})[kind] = {
                    "n": len(sel), **{o: rate([r["outcome"] == o for r in sel]).to_dict() for o in outs},
                    "degenerate": rate([r["degenerate"] for r in sel]).to_dict()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"audit-{arm_name}-labels.jsonl", "w", encoding="utf-8") as f:
        for r in rows_out:
            f.write(json.dumps(r) + "\n")
    (RESULTS / f"audit-{arm_name}.json").write_text(json.dumps(
        {"arm": arm_name, "seed": key["_seed"], "judge": "outcome-minilm", "judge_agreement": summary,
         "careful_reading": read}, indent=2))
    for arm, fs in summary.items():
        print(arm, "  ".join(f"{f} {100 * e['value']:.0f}% [{100 * e['ci_low']:.0f}, {100 * e['ci_high']:.0f}] "
                                 f"n={e['n']}" for f, e in fs.items()))
    for arm, ks in read.items():
        for kind, r in ks.items():
            print(arm, kind, "  ".join(f"{o} {100 * r[o]['value']:.0f}%" for o in (*OUTCOMES[kind], "degenerate")),
                  f"n={r['n']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("batch")
    b.add_argument("--arm", required=True, help="a candidate of search.py with a --final run")
    b.add_argument("--n", type=int, default=40, help="items per arm and prompt kind")
    b.add_argument("--seed", type=int, default=0, help="the sampling seed")
    b.add_argument("--arm-seed", type=int, default=0, help="which training seed of the demo arm to read")
    sc = sub.add_parser("score")
    sc.add_argument("--arm", required=True)
    a = ap.parse_args()
    if a.cmd == "batch":
        batch(a.arm, a.n, a.seed, a.arm_seed)
    else:
        score(a.arm)


if __name__ == "__main__":
    main()
