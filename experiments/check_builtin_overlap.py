"""Does a built-in prompt set copy, or closely echo, a public benchmark's prompts?

    python experiments/check_builtin_overlap.py builtin-harmful-questions builtin-seemingly-toxic-more

For each prompt of the named built-in sets: the most similar public prompt (character similarity,
difflib ratio over lower-cased letters and digits) among the public prompt sets in --data
(../shared/data by default: XSTest, AdvBench, HarmBench, Do-Not-Answer, BeaverTails, safe-rlhf), and
the XSTest prompts it shares two or more content words with (a shared target, e.g. the same
fictional character). Prints the --top closest pairs and every shared-target pair; public text is
printed, never written. Used when the built-in sets are written (src/tactful/data/builtin/README.md).
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
PUBLIC = {"xstest": "xstest_prompts.csv", "advbench": "advbench_harmful_behaviors.csv",
          "harmbench": "harmbench_behaviors_text_val.csv", "do-not-answer": "do_not_answer_en.csv",
          "beavertails-eval": "beavertails_eval_subset_140.json", "safe-rlhf-eval": "safe_rlhf_eval_problems.json"}
# words too common in requests to mark a shared target
COMMON = {"would", "could", "should", "people", "allowed", "about", "there", "where", "which", "their", "what's",
          "happened", "during", "without", "getting", "caught", "number", "phone"}


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", " ".join(text.lower().split()))


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z']+", text.lower()) if len(w) >= 5} - COMMON


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sets", nargs="+", help="built-in registry names (tactful data list)")
    ap.add_argument("--data", type=Path, default=DATA_DIR, help="folder of the public benchmark files")
    ap.add_argument("--top", type=int, default=10, help="closest pairs to print")
    a = ap.parse_args()
    missing = [f for f in PUBLIC.values() if not (a.data / f).is_file()]
    if missing:
        sys.stderr.write(f"error: {a.data / missing[0]} not found (--data names the folder of the public files)\n")
        sys.exit(2)
    from tactful.data.records import MCItem
    from tactful.data.registry import load_benchmark
    from tactful.errors import UserError

    try:
        own = [(name, r.id, r.question if isinstance(r, MCItem) else r.prompt)
               for name in a.sets for r in load_benchmark(name)]
        public = [(name, r.prompt) for name, f in PUBLIC.items()
                  for r in load_benchmark(name, path=str(a.data / f))]
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    pub = [(name, _norm(p), p) for name, p in public]
    closest = []
    for _, rid, prompt in own:
        q = _norm(prompt)
        # quick_ratio bounds ratio from above: rank by it, then measure the best few exactly
        cands = sorted(pub, key=lambda x: -difflib.SequenceMatcher(None, q, x[1]).quick_ratio())[:20]
        best = max(cands, key=lambda x: difflib.SequenceMatcher(None, q, x[1]).ratio())
        closest.append((difflib.SequenceMatcher(None, q, best[1]).ratio(), rid, prompt, best[0], best[2]))
    closest.sort(reverse=True)
    print(f"{len(own)} built-in prompts against {len(pub)} public ones; the {a.top} closest:")
    for ratio, rid, prompt, name, p in closest[:a.top]:
        print(f"  {ratio:.2f} {rid}: {prompt!r}\n       {name}: {p!r}")
    xstest = [p for name, p in public if name == "xstest"]
    shared = [(rid, prompt, p, sorted(_words(prompt) & _words(p))) for _, rid, prompt in own for p in xstest
              if len(_words(prompt) & _words(p)) >= 2]
    print(f"{len(shared)} pairs sharing two or more content words with an XSTest prompt:")
    for rid, prompt, p, words in shared:
        print(f"  {rid}: {prompt!r}\n       xstest: {p!r} {words}")


if __name__ == "__main__":
    main()
