"""Labelling the gold set by careful reading: hand out batches, check and merge the labels.

    python experiments/judges/labels.py batches --items runs/gold/items.jsonl --out runs/gold/batches --size 350
    python experiments/judges/labels.py second --items runs/gold/items.jsonl --out runs/gold/batches --n 300
    python experiments/judges/labels.py merge --items runs/gold/items.jsonl --labels runs/gold/batches \
        --out src/tactful/data/builtin/gold

A batch shows the reader only what the rubric needs (item id, prompt type, prompt, reply):
never the generator, so a label cannot lean on which model wrote the reply. The second
labelling draws items at random across batches and is done without the first labels.
`merge` validates every label line (unknown outcome, missing field: one error naming the file,
line and field), splits by prompt into train / test, and writes gold.jsonl, second.jsonl and
the agreement per field.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    from tactful.io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _view(it: dict) -> dict:
    return {"item_id": it["item_id"], "prompt_type": it["prompt_type"], "prompt": it["prompt"],
            "response": it["response"]}


def batches(items: list[dict], out: Path, size: int, prefix: str = "batch", seed: int = 0) -> None:
    rng = random.Random(seed)
    order = list(items)
    rng.shuffle(order)  # every batch mixes generators and prompt types
    for b, start in enumerate(range(0, len(order), size)):
        path = out / f"{prefix}_{b:02d}.jsonl"
        write_jsonl(path, [_view(it) for it in order[start:start + size]])
        print(f"{path}: {len(order[start:start + size])} items")


def second(items: list[dict], out: Path, n: int, prefix: str = "second", seed: int = 1) -> None:
    """A random sample to label a second time, independently (written as <prefix>.jsonl)."""
    rng = random.Random(seed)
    rows = [_view(it) for it in rng.sample(items, min(n, len(items)))]
    write_jsonl(out / f"{prefix}.jsonl", rows)
    print(f"{out / f'{prefix}.jsonl'}: {len(rows)} items")


PKU_FILE = "pku_saferlhf_test_safety_pairs_5k.json"


def pku_items(shared: Path, n_rows: int, seed: int = 2) -> list[dict]:
    """Both replies (PKU's safe and unsafe one, Alpaca-7B) of `n_rows` random PKU-SafeRLHF test
    prompts: a bigger model's harmful attempts, which the embedded model's own replies lack.
    Their text stays in ../shared/data; tactful keeps only ids, hashes and labels."""
    rows = json.loads((shared / PKU_FILE).read_text(encoding="utf-8"))
    rng = random.Random(seed)
    out = []
    for r in sorted(rng.sample(range(len(rows)), n_rows)):
        for k, resp in enumerate(rows[r]["response"]):
            out.append({"item_id": f"pku:{r}:{k}", "prompt_id": f"pku:{r}", "prompt_type": "harmful",
                        "prompt": rows[r]["prompt"], "response": resp, "generator": "pku-alpaca-7b",
                        "decoding": "unknown", "category": None})
    return out


def split_of(prompt_id: str, test_share: float = 0.3) -> str:
    """Split by prompt (stable hash), so no test prompt is seen in training under another reply."""
    h = int(hashlib.sha256(prompt_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < test_share else "train"


def merge(items: list[dict], labels_dir: Path, out: Path, external: list[dict] | None = None) -> None:
    from tactful.data.gold import check_label, agreement

    external = external or []
    ext_ids = {it["item_id"] for it in external}
    by_id = {it["item_id"]: it for it in items + external}
    first: dict[str, dict] = {}
    sec: dict[str, dict] = {}
    for path in sorted(labels_dir.glob("labels_*.jsonl")):
        target = sec if path.name.startswith("labels_second") else first
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"error: {path}:{n}: not JSON ({e.msg})")
            iid = row.get("item_id")
            if iid not in by_id:
                sys.exit(f"error: {path}:{n}: item_id {iid!r} is not in the items file")
            try:
                target[iid] = check_label(row, by_id[iid]["prompt_type"], f"{path}:{n}")
            except ValueError as e:
                sys.exit(f"error: {e}")
    missing = [i for i in by_id if i not in first]
    if missing:
        print(f"warning: {len(missing)} items have no label yet (first: {missing[:5]})")
    from tactful.data import builtin

    # the built-in benign sets' reference answers, which suites pass to the judge as meta `reference`
    refs = {r.id: r.meta.get("reference") for r in builtin.seemingly_toxic() + builtin.benign_prompts()}
    gold, ext_rows = [], []
    for iid, it in by_id.items():
        if iid not in first:
            continue
        row = {**it, **first[iid], "split": split_of(it["prompt_id"])}
        if it["prompt_type"] != "harmful" and refs.get(it["prompt_id"]):
            row["reference"] = refs[it["prompt_id"]]
        if iid in ext_ids:  # public text stays in ../shared/data: keep where it is, a hash and the labels
            _, r, k = iid.split(":")
            ext_rows.append({"item_id": iid, "source": PKU_FILE, "row": int(r), "k": int(k),
                             "response_sha256": hashlib.sha256(it["response"].encode()).hexdigest(),
                             "prompt_type": it["prompt_type"], **first[iid], "split": row["split"]})
        else:
            gold.append(row)
    write_jsonl(out / "gold.jsonl", gold)
    if ext_rows:
        write_jsonl(out / "external.jsonl", ext_rows)
    second_rows = [{"item_id": iid, **lab} for iid, lab in sec.items()]
    write_jsonl(out / "second.jsonl", second_rows)
    agree = agreement([first[i] for i in sec if i in first], [sec[i] for i in sec if i in first],
                      [by_id[i]["prompt_type"] for i in sec if i in first])
    (out / "agreement.json").write_text(json.dumps(agree, indent=2) + "\n")
    print(json.dumps(agree, indent=2))
    print(f"{len(gold)} labelled items -> {out / 'gold.jsonl'}; {len(second_rows)} second labels")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("batches", "second", "merge", "external"):
        p = sub.add_parser(name)
        p.add_argument("--items", type=Path, default=ROOT / "runs/gold/items.jsonl")
        p.add_argument("--out", type=Path, default=ROOT / "runs/gold/batches")
        if name == "batches":
            p.add_argument("--size", type=int, default=350)
            p.add_argument("--generators", nargs="*", default=None)
            p.add_argument("--prefix", default="batch")
        if name == "second":
            p.add_argument("--n", type=int, default=300)
            p.add_argument("--generators", nargs="*", default=None)
            p.add_argument("--prefix", default="second")
            p.add_argument("--seed", type=int, default=1)
        if name == "external":
            p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
            p.add_argument("--rows", type=int, default=300)
            p.add_argument("--size", type=int, default=200)
        if name == "merge":
            p.add_argument("--labels", type=Path, default=ROOT / "experiments/judges/labels")
            p.add_argument("--external", type=Path, default=ROOT / "runs/gold/external_items.jsonl")
    args = ap.parse_args()
    if args.cmd == "external":
        ext = pku_items(args.shared, args.rows)
        write_jsonl(args.out.parent / "external_items.jsonl", ext)
        batches(ext, args.out, args.size, "ext")
        return
    items = read_jsonl(args.items)
    if args.cmd == "batches":
        if args.generators:
            items = [it for it in items if it["generator"] in args.generators]
        batches(items, args.out, args.size, args.prefix)
    elif args.cmd == "second":
        if args.generators:
            items = [it for it in items if it["generator"] in args.generators]
        second(items, args.out, args.n, args.prefix, args.seed)
    else:
        merge(items, args.labels, args.out, read_jsonl(args.external) if args.external.is_file() else [])


if __name__ == "__main__":
    main()
