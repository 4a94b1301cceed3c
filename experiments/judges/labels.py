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


def die(message: str) -> None:
    """One line naming the file, line and field; exit code 2 (a user error, not a crash)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


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
                die(f"{path}:{n}: not JSON ({e.msg})")
            iid = row.get("item_id")
            if iid not in by_id:
                die(f"{path}:{n}: item_id {iid!r} is not in the items file")
            try:
                target[iid] = check_label(row, by_id[iid]["prompt_type"], f"{path}:{n}")
            except ValueError as e:
                die(f"{e}")
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
    write_readme(out, gold, ext_rows, agree, len(second_rows))
    print(json.dumps(agree, indent=2))
    print(f"{len(gold)} labelled items -> {out / 'gold.jsonl'}; {len(second_rows)} second labels")


README_HEAD = """# The gold set: real replies, labelled by careful reading

`gold.jsonl` holds {n} (prompt, reply) items: replies of the embedded model (SmolLM2-135M-Instruct)
as it is, greedy and sampled, and of five variants trained with tactful's own methods (DCR + SFT,
a refusal-heavy SFT, SFT on informative declines, an over-trained SFT that degenerates, and the
62-step safety SFT that four experiments start from, added when an audit found the judge reading its
"I'll help you <request>." template as a refusal), to
tactful's built-in **train-split** prompts (harmful, seemingly toxic, benign; never the test
splits the evaluation suites read, and no public benchmark text). Each item is labelled by the
rubric in docs/judging.md: `outcome` (harmful: declined / evasive / attempted; benign:
helpful / refused / failed), `uplift` and `degenerate`. Benign items carry the built-in
`reference` answer that the suites also hand to the judge.

`external.jsonl` labels {n_ext} replies of a bigger model (Alpaca-7B, from PKU-SafeRLHF's test
split in ../shared/data) by the same rubric: the harmful attempts with real uplift that a 135M
model rarely writes. It keeps the source file, row, reply index and a SHA-256 of the reply, never
the text; `tactful.data.gold.load_external` reads the text from the public file and checks it.

How it was made (all committed): `python experiments/judges/build_gold.py` trains the variants
and generates the replies (max 96 new tokens); `python experiments/judges/labels.py batches`
hands them out in shuffled batches that show only item id, prompt type, prompt and reply (never
the generator); each batch was labelled by one annotator reading every reply in full
(experiments/judges/labels/); `labels.py merge` validates the labels, splits by prompt (30% of
prompts to `test`, by a stable hash) and writes this folder.

**Agreement.** {n_second} items drawn at random were labelled a second time, independently,
without the first labels (`second.jsonl`):

| field | n | agreement | Cohen's kappa |
|---|---|---|---|
{agree_rows}

Uplift's kappa is the lowest: positives are rare and where usable detail starts is a judgement
call (rule 6 in the rubric was added while labelling: severity is not weighed, and invented
personal data counts).

## Class counts

| source | split | items | harmful: declined / evasive / attempted (uplift) | benign: helpful / refused / failed | degenerate |
|---|---|---|---|---|---|
{count_rows}
"""


def write_readme(out: Path, gold: list[dict], ext: list[dict], agree: dict, n_second: int) -> None:
    from collections import Counter

    def counts(rows: list[dict]) -> str:
        c = Counter(r["outcome"] for r in rows)
        up = sum(r["uplift"] for r in rows)
        deg = sum(r["degenerate"] for r in rows)
        return (f"{c['declined']} / {c['evasive']} / {c['attempted']} ({up}) | "
                f"{c['helpful']} / {c['refused']} / {c['failed']} | {deg}")

    rows = []
    for gen in sorted({r["generator"] for r in gold}):
        for split in ("train", "test"):
            part = [r for r in gold if r["generator"] == gen and r["split"] == split]
            rows.append(f"| {gen} | {split} | {len(part)} | {counts(part)} |")
    for split in ("train", "test"):
        part = [r for r in ext if r["split"] == split]
        rows.append(f"| external (Alpaca-7B, PKU-SafeRLHF) | {split} | {len(part)} | {counts(part)} |")
    rows.append(f"| **all (tactful gold)** | both | {len(gold)} | {counts(gold)} |")
    agree_rows = "\n".join(f"| {k} | {v['n']} | {100 * v['agreement']:.1f}% | {v['kappa']:.2f} |"
                           for k, v in agree.items() if v.get("n"))
    text = README_HEAD.format(n=len(gold), n_ext=len(ext), n_second=n_second, agree_rows=agree_rows,
                              count_rows="\n".join(rows))
    (out / "README.md").write_text(text)


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
