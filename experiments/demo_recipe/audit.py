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
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
import audit as shared  # noqa: E402  (experiments/audit.py: batch and score for any evaluation)

RUNS = ROOT / "runs" / "demo_recipe"
OUT = RUNS / "audit"
RESULTS = HERE / "results"


def arms(arm: str, seed: int) -> dict[str, Path]:
    return {"base": RUNS / "final" / "base-test", "aligned": RUNS / "final" / f"{arm}-seed{seed}-test"}


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
        for d in arms(a.arm, a.arm_seed).values():
            if not shared.eval_items(d):
                shared.die(f"{d}: no evaluated items; run search.py --final --arm {a.arm} --seeds {a.arm_seed} first")
        shared.batch(arms(a.arm, a.arm_seed), OUT / a.arm, n=a.n, seed=a.seed)
        key = json.loads((OUT / a.arm / "key.json").read_text())
        key["_arm"], key["_seed"] = a.arm, a.arm_seed
        (OUT / a.arm / "key.json").write_text(json.dumps(key, indent=1))
    else:
        key_path = OUT / a.arm / "key.json"
        if not key_path.is_file():
            shared.die(f"{key_path} not found: run `audit.py batch --arm {a.arm}` first")
        seed = json.loads(key_path.read_text())["_seed"]
        shared.score(OUT / a.arm, RESULTS / f"audit-{a.arm}", evals=arms(a.arm, seed),
                     meta={"arm": a.arm, "seed": seed})


if __name__ == "__main__":
    main()
