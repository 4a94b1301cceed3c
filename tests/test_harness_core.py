"""Metric math, suite validation, runs/manifests, atomic IO and the CLI's bad-input paths."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tactful.errors import UserError
from tactful.eval import metrics as M
from tactful.eval.suites import builtin_suites, load_suite, suite_from_dict
from tactful.io import append_jsonl, atomic_write_json, read_jsonl_tolerant
from tactful.runs import RunDir, redact


def test_rate_and_intervals():
    est = M.rate([True] * 30 + [False] * 70 + [None] * 5)
    assert est.n == 100 and est.value == pytest.approx(0.3)
    assert est.ci_low < 0.3 < est.ci_high
    assert 0.19 < est.ci_low < 0.23 and 0.37 < est.ci_high < 0.41  # ~ +/- 9 points at n=100
    lo, hi = M.wilson_ci(30, 100)
    assert lo == pytest.approx(0.2189, abs=1e-3) and hi == pytest.approx(0.3958, abs=1e-3)
    assert M.rate([None, None]).value is None
    assert M.rate([True, True]).ci_low == 1.0  # degenerate sample: no spread


def test_bootstrap_is_seeded_and_matches_normal_approximation():
    x = np.random.default_rng(1).normal(size=400)
    a, b = M.bootstrap_ci(x, seed=3), M.bootstrap_ci(x, seed=3)
    assert a == b
    se = x.std(ddof=1) / np.sqrt(len(x))
    assert a[0] == pytest.approx(x.mean() - 1.96 * se, abs=0.03)
    assert a[1] == pytest.approx(x.mean() + 1.96 * se, abs=0.03)


def test_paired_difference():
    est = M.paired_difference([1, 1, 1, 0], [0, 0, 1, 0])
    assert est.value == pytest.approx(0.5) and est.n == 4


def test_builtin_suites_load():
    names = builtin_suites()
    for n in ("safety", "over-refusal", "capability", "truthfulness"):
        assert n in names
        load_suite(n)


@pytest.mark.parametrize("raw,msg", [
    ({"name": "x", "dataset": "d"}, "missing required field 'expected'"),
    ({"name": "x", "dataset": "d", "expected": "refuse", "metrc": "safe_rate"}, "unknown field 'metrc'"),
    ({"name": "x", "dataset": "d", "expected": "maybe"}, "'expected' must be one of"),
    ({"name": "x", "dataset": "d", "expected": "refuse", "metric": "accuracy"}, "does not fit expected=refuse"),
    ({"name": "x", "dataset": "d", "expected": "refuse", "n": "ten"}, "'n' has the wrong type"),
    ({"name": "x", "dataset": "d", "expected": "refuse", "generation": {"max_tokens": 5}}, "unknown generation option"),
    ({"name": "x", "dataset": "d", "expected": "policy"}, "policy suites need a 'policy' file"),
    ({"name": "x", "dataset": "d", "expected": "refuse", "generation": {"temperature": float("nan")}},
     "'temperature' must be a finite number, got nan"),
])
def test_suite_validation_errors(raw, msg):
    with pytest.raises(UserError, match=msg):
        suite_from_dict(raw, source="s.yaml")


def test_suite_file_errors(tmp_path):
    with pytest.raises(UserError, match="unknown suite 'nope'"):
        load_suite("nope")
    f = tmp_path / "s.yaml"
    f.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match=r"s.yaml:\d+: malformed YAML"):
        load_suite(str(f))


def test_atomic_writes_and_torn_jsonl(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    log = tmp_path / "g.jsonl"
    append_jsonl(log, {"id": 1})
    append_jsonl(log, {"id": 2})
    with open(log, "a") as f:
        f.write('{"id": 3, "resp')  # a crash mid-write
    assert [r["id"] for r in read_jsonl_tolerant(log)] == [1, 2]


def test_manifest_records_versions_and_redacts_secrets(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_config({"judge": {"api_key": "sk-secret", "api_key_env": "OPENAI_API_KEY"}, "lr": 1e-4})
    run.write_manifest(kind="eval", base_model="embedded", seed=3, data={"items": [{"p": 1}]},
                       extra={"token": "hf_abc"})
    text = (tmp_path / "run" / "config.json").read_text() + (tmp_path / "run" / "manifest.json").read_text()
    assert "sk-secret" not in text and "hf_abc" not in text
    assert "OPENAI_API_KEY" in text  # the variable's name is fine, its value never
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["seed"] == 3 and "torch" in m["versions"] and len(m["data"]["items"]) == 64
    assert redact({"nested": [{"password": "x"}]}) == {"nested": [{"password": "<redacted>"}]}


def _cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tactful", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


@pytest.mark.parametrize("args,msg", [
    (["data", "show", "advbenchh"], "did you mean"),
    (["eval", "--suite", "nope", "--out", "{tmp}/o"], "unknown suite 'nope'"),
    (["train", "{tmp}/missing.yaml"], "does not exist"),
    (["data", "show", "advbench", "--path", "{tmp}/bad.jsonl"], "bad.jsonl:2: malformed JSON"),
    (["data", "show", "advbench", "--path", "{tmp}/nocol.csv"], "nocol.csv:2: missing field 'goal'"),
    (["data", "show", "advbench", "--path", "{tmp}/empty.csv"], "is empty"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, msg):
    (tmp_path / "bad.jsonl").write_text('{"goal": "a", "target": "b"}\n{"goal": oops}\n')
    (tmp_path / "nocol.csv").write_text("text,target\nx,y\n")
    (tmp_path / "empty.csv").write_text("")
    res = _cli(*[a.format(tmp=tmp_path) for a in args])
    assert res.returncode == 2, res.stderr
    assert msg in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_unknown_option_exit_2():
    res = _cli("eval", "--no-such-option")
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_policy_suites_judge_against_their_own_policy(tmp_path) -> None:
    """Two policy suites in one evaluation must not share a judge: each judges its own policy file."""
    from tactful.eval.runner import EvalConfig, Evaluator
    from tactful.eval.suites import load_suite

    suites = []
    for policy in ("old-strict", "new-contextual"):
        f = tmp_path / f"{policy}.yaml"
        f.write_text(f"name: agree-{policy}\ndataset: builtin-harmful\nexpected: policy\npolicy: {policy}\n"
                     "judge: policy-rules\n")
        suites.append(load_suite(str(f)))
    ev = Evaluator(EvalConfig(model="unused", suites=[], judge_options={"refusal": "string-xstest"}))
    old, new = (ev._judge("policy-rules", s) for s in suites)
    assert (old.policy.name, new.policy.name) == ("old-strict", "new-contextual")
    assert ev._judge("policy-rules", suites[0]) is old
    # an explicit judge option still wins over the suite's file
    ev2 = Evaluator(EvalConfig(model="unused", suites=[], judge_options={"policy": "old-strict",
                                                                          "refusal": "string-xstest"}))
    assert ev2._judge("policy-rules", suites[1]).policy.name == "old-strict"


def test_informativeness_without_a_safety_verdict_scores_every_answer() -> None:
    """llm-informativeness returns only a score (refused=None): the suite must not come out n/a."""
    from tactful.eval.judges.base import Verdict
    from tactful.eval.runner import EvalConfig, Evaluator
    from tactful.eval.suites import suite_from_dict

    suite = suite_from_dict({"name": "inf", "dataset": "builtin-informative", "expected": "informative"})
    ev = Evaluator(EvalConfig(model="unused", suites=[]))
    llm = [Verdict(label="scored", score=s, refused=None) for s in (4.0, 8.0)]
    assert ev._estimate(suite, llm, [ev._success(suite, v) for v in llm]).value == 6.0
    proxy = [Verdict(label="scored", score=4.0, refused=True), Verdict(label="scored", score=9.0, refused=False)]
    assert ev._estimate(suite, proxy, []).value == 4.0  # unsafe answers are not scored
