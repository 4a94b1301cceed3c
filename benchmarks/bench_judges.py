"""Judging speed: seconds to judge 1,000 replies with `outcome-minilm` against `embedding-minilm`
(the previous default), on the same real replies (the gold set, cycled to --n), in one run.

    python benchmarks/bench_judges.py [--n 1000] [--threads 2]

Target (issue "Judges you can trust"): <= 60 s per 1,000 replies on 2 cores.
Writes benchmarks/results/judges.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from machine import machine_info

    from tactful.data import gold
    from tactful.eval.judges import JudgeItem, get_judge
    from tactful.eval.judges.embedding import get_encoder

    load = os.getloadavg()
    rows = gold.load_gold()
    rows = [rows[i % len(rows)] for i in range(args.n)]
    items = [JudgeItem(r["prompt"], r["response"], {"prompt_type": r["prompt_type"]}) for r in rows]
    get_encoder()  # loading the encoder once is not part of judging
    result = {"n": args.n, "machine": None, "judges": {}}
    for name in ("embedding-minilm", "outcome-minilm"):
        judge = get_judge(name)
        judge.judge(items[:8])  # warm-up
        t0 = time.perf_counter()
        judge.judge(items)
        dt = time.perf_counter() - t0
        result["judges"][name] = {"seconds": round(dt, 2), "seconds_per_1000": round(1000 * dt / args.n, 2)}
        print(f"{name:<18} {dt:7.1f} s for {args.n} replies ({1000 * dt / args.n:.1f} s / 1000)")
    a, b = (result["judges"][k]["seconds"] for k in ("outcome-minilm", "embedding-minilm"))
    result["ratio_outcome_vs_embedding"] = round(a / b, 2)
    result["machine"] = machine_info(load)
    print(f"outcome-minilm / embedding-minilm: {a / b:.2f}x")
    (HERE / "results" / "judges.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
