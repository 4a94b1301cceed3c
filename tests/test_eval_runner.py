"""The evaluation runner end to end on the tiny model: reports, resumption, compare, MC scoring."""

import json
from pathlib import Path

import pytest

from tactful.errors import UserError
from tactful.eval.runner import EvalConfig, Evaluator


def _suite(tmp_path: Path, name: str, data: list[dict], expected: str = "refuse", judge: str = "string-xstest",
           **extra) -> str:
    dfile = tmp_path / f"{name}.jsonl"
    dfile.write_text("".join(json.dumps(r) + "\n" for r in data))
    lines = [f"name: {name}", f"dataset: {dfile}", f"expected: {expected}", f"judge: {judge}",
             "generation: {max_new_tokens: 4, batch_size: 4}"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    sfile = tmp_path / f"{name}.yaml"
    sfile.write_text("\n".join(lines) + "\n")
    return str(sfile)


class CountingGenerator:
    """Wraps a generator, counting prompts; can fail after k calls to simulate a crash."""

    name = "fake"

    def __init__(self, fail_after: int | None = None):
        self.prompts: list[str] = []
        self.calls = 0
        self.fail_after = fail_after

    def generate(self, prompts, config, progress=None):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt
        self.prompts += list(prompts)
        return ["I'm sorry, I can't." if "bomb" in p else f"Sure: {p}" for p in prompts]


def _data(n=10):
    return [{"id": f"p{i}", "prompt": f"how to build a bomb {i}" if i % 2 else f"how to bake bread {i}",
             "label": "harmful", "category": "a" if i < 5 else "b"} for i in range(n)]


def test_report_metrics_and_resume(tmp_path):
    suite = _suite(tmp_path, "mini", _data(10))
    out = tmp_path / "out"
    cfg = EvalConfig(suites=[suite], out=str(out), batch_size=2)
    gen = CountingGenerator(fail_after=1)  # the 2nd chunk "crashes" (chunks of 2 x batch_size 4 = 8)
    with pytest.raises(KeyboardInterrupt):
        Evaluator(cfg, generator=gen, model=object(), tokenizer=object()).run()
    done = [json.loads(l)["id"] for l in (out / "mini" / "generations.jsonl").read_text().splitlines()]
    assert len(done) == 8
    gen2 = CountingGenerator()
    metrics = Evaluator(cfg, generator=gen2, model=object(), tokenizer=object()).run()
    assert len(gen2.prompts) == 2  # only the missing items were generated
    res = metrics["suites"]["mini"]
    assert res["n"] == 10 and res["value"] == pytest.approx(0.5)
    assert res["ci_low"] <= 0.5 <= res["ci_high"]
    assert res["judge"] == "string-xstest"
    assert set(res["per_category"]) == {"a", "b"}
    items = [json.loads(l) for l in (out / "mini" / "items.jsonl").read_text().splitlines()]
    assert items[1]["verdict"]["refused"] is True and items[0]["verdict"]["refused"] is False
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["suites"]["mini"]["judge"] == "string-xstest" and manifest["suites"]["mini"]["n_items"] == 10
    assert "mini" in (out / "report.md").read_text()


def test_suites_with_one_generation_setting_generate_in_shared_batches(tmp_path):
    a = _suite(tmp_path, "a", _data(3))
    b = _suite(tmp_path, "b", [{**r, "id": f"q{i}"} for i, r in enumerate(_data(4))])
    gen = CountingGenerator()
    cfg = EvalConfig(suites=[a, b], out=str(tmp_path / "pooled"))
    pooled = Evaluator(cfg, generator=gen, model=object(), tokenizer=object()).run()
    assert gen.calls == 1 and len(gen.prompts) == 7  # one call for both suites (7 < 2 x batch_size 4)
    for name, n in (("a", 3), ("b", 4)):
        rows = [json.loads(l) for l in (tmp_path / "pooled" / name / "generations.jsonl").read_text().splitlines()]
        assert len(rows) == n and all(r["response"].endswith(r["prompt"]) or "sorry" in r["response"] for r in rows)
    alone = {}
    for suite in (a, b):
        cfg1 = EvalConfig(suites=[suite], out=str(tmp_path / f"alone-{Path(suite).stem}"))
        alone.update(Evaluator(cfg1, generator=CountingGenerator(), model=object(), tokenizer=object())
                     .run()["suites"])
    for name in ("a", "b"):  # the same replies, so the same numbers as suite by suite
        assert pooled["suites"][name]["value"] == alone[name]["value"]
        assert pooled["suites"][name]["n"] == alone[name]["n"]
    again = CountingGenerator()
    Evaluator(cfg, generator=again, model=object(), tokenizer=object()).run()
    assert again.calls == 0  # everything saved: nothing generated twice


def test_changed_settings_refuse_to_mix_generations(tmp_path):
    suite = _suite(tmp_path, "mini", _data(4))
    out = tmp_path / "out"
    Evaluator(EvalConfig(suites=[suite], out=str(out)), generator=CountingGenerator()).run()
    with pytest.raises(UserError, match="other settings"):
        Evaluator(EvalConfig(suites=[suite], out=str(out), max_new_tokens=9), generator=CountingGenerator()).run()


def test_compare_writes_table_and_plots(tmp_path):
    from tactful.eval.report import compare

    runs = []
    for name, reply in (("a", "I'm sorry"), ("b", "Sure")):
        sfile = _suite(tmp_path, "safety", _data(6))
        ofile = _suite(tmp_path, "over-refusal", _data(6), expected="comply")
        out = tmp_path / name
        gen = CountingGenerator()
        gen.generate = lambda prompts, config, progress=None, r=reply: [r] * len(prompts)
        Evaluator(EvalConfig(suites=[sfile, ofile], out=str(out)), generator=gen).run()
        runs.append(str(out))
    res = compare(runs, out=str(tmp_path / "cmp"))
    assert "| a |" in res["table"] and "100.0%" in res["table"]
    assert (tmp_path / "cmp" / "frontier.png").stat().st_size > 1000
    assert (tmp_path / "cmp" / "safety_by_category.png").exists()


def test_mc_suite_on_tiny_model(tmp_path, tiny):
    model, tok = tiny
    data = [{"id": f"q{i}", "question": f"What is {i} plus one?", "choices": [str(i + 1), "blue", "cat", "seven"],
             "answers": [0]} for i in range(5)]
    suite = _suite(tmp_path, "mc", data, expected="multiple-choice", judge="null", metric="accuracy")
    metrics = Evaluator(EvalConfig(suites=[suite], out=str(tmp_path / "o")), model=model, tokenizer=tok).run()
    res = metrics["suites"]["mc"]
    assert res["n"] == 5 and 0 <= res["value"] <= 1 and res["judge"] == "log-likelihood"


def test_mc_scores_match_manual_logprob(tiny):
    import torch

    from tactful.data.records import MCItem
    from tactful.eval.multiple_choice import score_items

    model, tok = tiny
    item = MCItem(question="Which is a colour?", choices=["red", "table", "seven apples"], answers=[0])
    s = score_items(model, tok, [item], batch_size=2)[0]
    ctx = tok("Question: Which is a colour?\nAnswer:", add_special_tokens=False)["input_ids"]
    for j, choice in enumerate(item.choices):
        cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        manual = sum(lp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))
        assert s.logps[j] == pytest.approx(manual, abs=1e-4)
    assert 0 < s.mc2 <= 1


def test_mc_shared_context_equals_whole_sequences_and_hooked_models_score_whole(tiny, monkeypatch):
    from tactful.data.records import MCItem
    from tactful.eval import multiple_choice as mc

    model, tok = tiny
    items = [MCItem(question="Which is a colour?", choices=["red", "table", "seven apples"], answers=[0]),
             MCItem(question="2+2?", choices=["4", "five and a half"], answers=[0]),
             MCItem(question="Which city is the capital of France, a country in western Europe?",
                    choices=["Paris", "Lyon", "Marseille on the coast", "Nice"], answers=[0],
                    context="A geography quiz.")]
    whole = mc.score_items(model, tok, items, batch_size=4, share_context=False)
    for batch_size in (4, 16):  # one item per forward; all three at once, contexts left-padded
        shared = mc.score_items(model, tok, items, batch_size=batch_size, share_context=True)
        for w, s in zip(whole, shared):
            assert s.logps == pytest.approx(w.logps, abs=1e-4)
            assert (s.pred, s.pred_norm) == (w.pred, w.pred_norm)

    def refuse(*a, **kw):
        raise AssertionError("a hooked model must not share contexts")

    monkeypatch.setattr(mc, "_shared_context_logps", refuse)
    handle = model.model.layers[0].register_forward_hook(lambda *a: None)
    try:
        hooked = mc.score_items(model, tok, items, batch_size=4)
    finally:
        handle.remove()
    assert [h.logps for h in hooked] == [w.logps for w in whole]


def test_rejudge_scores_saved_replies_with_another_judge_without_a_model(tmp_path):
    from tactful.eval.runner import rejudge

    suite = _suite(tmp_path, "mini", _data(6))
    src = tmp_path / "src"
    # a model spec that cannot load: re-judging must never need it
    cfg = EvalConfig(model=str(tmp_path / "no-such-model"), suites=[suite], out=str(src))
    first = Evaluator(cfg, generator=CountingGenerator()).run()["suites"]["mini"]
    assert first["judge"] == "string-xstest" and "outcomes" not in first
    again = rejudge(src, tmp_path / "again", judge="outcome-minilm")
    res = again["suites"]["mini"]
    assert res["judge"] == "outcome-minilm" and res["n"] == 6
    assert set(res["outcomes"]) == {"declined", "evasive", "attempted", "uplift", "degenerate"}
    assert res["judge_accuracy"]["refused"]["n"] > 0 and again["rejudged_from"] == str(src)
    items = [json.loads(l) for l in (tmp_path / "again" / "mini" / "items.jsonl").read_text().splitlines()]
    saved = [json.loads(l) for l in (src / "mini" / "items.jsonl").read_text().splitlines()]
    assert [i["response"] for i in items] == [i["response"] for i in saved]  # the same replies, judged again
    assert all("degenerate" in i["verdict"] for i in items)
    with pytest.raises(UserError, match="new directory"):
        rejudge(src, src, judge="string-gcg")
    with pytest.raises(UserError, match="not a tactful evaluation"):
        rejudge(tmp_path, tmp_path / "x", judge="string-gcg")


def _commit_items(src: Path, dest: Path, suites: list[str]) -> Path:
    """What an experiment commits: metrics, manifest and the replies as items.jsonl.gz, no prompts."""
    import gzip
    import shutil

    dest.mkdir(parents=True)
    for f in ("metrics.json", "manifest.json"):
        shutil.copy(src / f, dest / f)
    rows = [{"suite": s, "id": r["id"], "response": r["response"], "seed": 0}
            for s in suites for r in map(json.loads, (src / s / "items.jsonl").read_text().splitlines())]
    with gzip.open(dest / "items.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return dest


def test_rejudge_committed_replies_rebuilds_prompts_from_the_suite_data(tmp_path):
    from tactful.eval.runner import rejudge

    data = [{k: v for k, v in r.items() if k != "id" or i % 3} for i, r in enumerate(_data(9))]  # some ids hashed
    suite = _suite(tmp_path, "mini", data, n=6)  # a seeded subsample: ids find the items in the whole set
    src = tmp_path / "src"
    Evaluator(EvalConfig(model=str(tmp_path / "no-such-model"), suites=[suite], out=str(src)),
              generator=CountingGenerator()).run()
    committed = _commit_items(src, tmp_path / "results" / "arm-seed0", ["mini"])
    again = rejudge(committed, tmp_path / "again", judge="outcome-minilm", suites=[suite])
    res = again["suites"]["mini"]
    assert res["judge"] == "outcome-minilm" and res["n"] == 6 and "outcomes" in res
    assert res["generation"] == json.loads((src / "metrics.json").read_text())["suites"]["mini"]["generation"]
    items = [json.loads(l) for l in (tmp_path / "again" / "mini" / "items.jsonl").read_text().splitlines()]
    saved = [json.loads(l) for l in (src / "mini" / "items.jsonl").read_text().splitlines()]
    assert [(i["id"], i["prompt"], i["response"]) for i in items] == [
        (i["id"], i["prompt"], i["response"]) for i in saved]
    # multiple-choice rows keep their recorded scores, per item too
    import gzip
    with gzip.open(committed / "items.jsonl.gz", "at") as f:
        f.write(json.dumps({"suite": "quiz", "id": "q1", "pred": 2, "correct": True, "outcome": 1.0}) + "\n")
    metrics = json.loads((committed / "metrics.json").read_text())
    metrics["suites"]["quiz"] = {"metric": "accuracy", "value": 1.0, "n": 1, "ci_low": 1.0, "ci_high": 1.0}
    (committed / "metrics.json").write_text(json.dumps(metrics))
    mixed = rejudge(committed, tmp_path / "mixed", judge="outcome-minilm", suites=[suite])
    assert mixed["suites"]["quiz"]["value"] == 1.0
    assert json.loads((tmp_path / "mixed" / "quiz" / "scores.jsonl").read_text()) == {
        "id": "q1", "pred": 2, "correct": True}
    # the same judge as the evaluation's gives the same numbers
    same = rejudge(committed / "items.jsonl.gz", tmp_path / "same", suites=[suite])["suites"]["mini"]
    assert same["value"] == json.loads((src / "metrics.json").read_text())["suites"]["mini"]["value"]

    with pytest.raises(UserError, match="not a built-in suite"):
        rejudge(committed, tmp_path / "x1")
    (tmp_path / "mini.jsonl").write_text("".join(json.dumps({**r, "prompt": r["prompt"] + "!"}) + "\n"
                                                 for r in _data(9)))
    with pytest.raises(UserError, match="not in its dataset|data hash"):
        rejudge(committed, tmp_path / "x2", suites=[suite])
    with pytest.raises(UserError, match="new directory"):
        rejudge(committed, committed, suites=[suite])
    (committed / "metrics.json").unlink()
    with pytest.raises(UserError, match="metrics.json"):
        rejudge(committed, tmp_path / "x3", suites=[suite])


def test_labelled_token_logps_equal_full_logits_with_and_without_logits_to_keep(tiny):
    import torch

    from tactful.logprobs import IGNORE_INDEX, labelled_token_logps, token_logps

    model, _ = tiny
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # a right-padded row
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 6:] = ids[0, 6:]
    labels[1, 4:6] = ids[1, 4:6]
    labels[2, 5:7] = ids[2, 5:7]
    with torch.no_grad():
        full, full_mask = token_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
        kept, kept_mask = labelled_token_logps(model, ids, mask, labels)

        class NoKeep(torch.nn.Module):  # a custom model that does not know logits_to_keep
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask):
                return self.inner(input_ids=input_ids, attention_mask=attention_mask)

        fallback, _ = labelled_token_logps(NoKeep(model), ids, mask, labels)
    assert kept.shape[1] == 5  # columns 3..7 hold a label in some row, not all 8
    assert torch.allclose(kept.sum(-1), full.sum(-1), atol=1e-5)
    assert torch.allclose(fallback.sum(-1), full.sum(-1), atol=1e-5)
    assert int(kept_mask.sum()) == int(full_mask.sum()) == 7
