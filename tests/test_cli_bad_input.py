"""Bad input at the CLI: one line naming the file / field / option, exit code 2, checked before
any model is loaded. Run in-process (no subprocess start-up); models are never loaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tactful.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    code = e.value.code if isinstance(e.value.code, int) else (0 if e.value.code is None else 1)
    return code, out.out, out.err


def assert_user_error(code: int, err: str, msg: str) -> None:
    assert code == 2, err
    assert msg in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


class _no_exit:
    """A successful command: main() ends with SystemExit(0) (or returns)."""

    def __enter__(self):
        return self

    def __exit__(self, tp, value, tb):
        return tp is None or (tp is SystemExit and value.code in (0, None))


@pytest.fixture()
def no_model(monkeypatch):
    """Loading a model fails the test: every check here must come before it."""
    import tactful.models

    def load_model(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(tactful.models, "load_model", load_model)


# ---------------------------------------------------------------- data show

def test_data_show_rejects_a_negative_n_and_n_0_only_counts(capsys):
    code, _, err = run_cli(capsys, "data", "show", "builtin-harmful", "--n", "-1")
    assert_user_error(code, err, "--n must be 0 or more, got -1")
    with _no_exit():
        main(["data", "show", "builtin-harmful", "--n", "0"])
    out = capsys.readouterr().out
    assert out.startswith("builtin-harmful: ") and out.strip().endswith("records") and len(out.splitlines()) == 1


@pytest.mark.parametrize("name,data,msg", [
    ("quote.csv", b'goal,target\nhello,a\n"broken,b\nthird,c\n', "quote.csv:3: unterminated quoted field"),
    ("bin.csv", b"\x00\x01\x02\xff\xfe binary", "bin.csv is a binary file"),
])
def test_data_files_that_would_lose_data_or_crash_are_user_errors(tmp_path, capsys, name, data, msg):
    (tmp_path / name).write_bytes(data)
    code, _, err = run_cli(capsys, "data", "show", "advbench", "--path", str(tmp_path / name))
    assert_user_error(code, err, msg)


def test_csv_with_a_byte_order_mark_is_read(tmp_path, capsys):
    (tmp_path / "bom.csv").write_bytes("\ufeffgoal,target\nx,y\n".encode("utf-8"))
    with _no_exit():
        main(["data", "show", "advbench", "--path", str(tmp_path / "bom.csv")])
    assert "advbench: 1 records" in capsys.readouterr().out


# ---------------------------------------------------------------- eval

@pytest.mark.parametrize("args,msg", [
    (["--limit", "0"], "--limit must be at least 1, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--judge", "no-such-judge", "--limit", "2"], "unknown judge 'no-such-judge'"),
    (["--suite", "safety,nope"], "unknown suite 'nope'"),
])
def test_eval_checks_numbers_and_names_before_loading_the_model(tmp_path, capsys, no_model, args, msg):
    code, _, err = run_cli(capsys, "eval", "--out", str(tmp_path / "o"), *args)
    assert_user_error(code, err, msg)


def test_output_directories_that_are_files_are_user_errors(tmp_path, capsys, no_model):
    f = tmp_path / "taken"
    f.write_text("x")
    code, _, err = run_cli(capsys, "eval", "--out", str(f), "--limit", "2")
    assert_user_error(code, err, f"output directory (--out) {f} is an existing file")
    code, _, err = run_cli(capsys, "eval", "--out", str(f / "sub"), "--limit", "2")
    assert_user_error(code, err, "part of the path is a file")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "sft.yaml"
    code, _, err = run_cli(capsys, "train", str(recipe), "--output-dir", str(f))
    assert_user_error(code, err, f"output_dir {f} is an existing file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_output_directory_is_a_user_error(tmp_path, capsys, no_model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run_cli(capsys, "eval", "--out", str(ro / "o"), "--limit", "2")
    finally:
        ro.chmod(0o700)
    assert_user_error(code, err, "cannot")


def test_a_directory_that_refuses_writes_is_a_user_error(tmp_path, monkeypatch):
    # root writes anywhere, so the refusal (a read-only mount, say) is simulated
    import tempfile

    from tactful.errors import UserError
    from tactful.io import ensure_dir

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(UserError, match=f"cannot write to output_dir {tmp_path}: Permission denied"):
        ensure_dir(tmp_path, "output_dir")


def test_train_rejects_negative_max_steps_naming_the_field(capsys, no_model):
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "sft.yaml"
    code, _, err = run_cli(capsys, "train", str(recipe), "--set", "training.max_steps=-5")
    assert_user_error(code, err, "field 'training.max_steps': must be at least 1, or -1")


# ---------------------------------------------------------------- compare

def _metrics(value: float, n: int = 100) -> dict:
    est = {"value": value, "ci_low": value - 0.05, "ci_high": value + 0.04, "n": n}
    return {"model": "m", "seed": 0, "suites": {
        "safety": {"metric": "safe_rate", **est},
        "over-refusal": {"metric": "compliance_rate", **{**est, "value": 0.887, "ci_low": 0.82, "ci_high": 0.93}},
    }}


def test_compare_bad_metrics_and_training_runs(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_text("[1, 2]")
    code, _, err = run_cli(capsys, "compare", str(bad), "--out", str(tmp_path / "c"))
    assert_user_error(code, err, f"{bad / 'metrics.json'}: not a tactful metrics file: expected a JSON object, got a list")

    trained = tmp_path / "sft-run"
    trained.mkdir()
    (trained / "manifest.json").write_text(json.dumps({"kind": "sft", "base_model": "embedded"}))
    code, _, err = run_cli(capsys, "compare", str(trained), "--out", str(tmp_path / "c"))
    assert_user_error(code, err, f"`tactful eval --run {trained} --out {trained / 'eval'}`")

    good = tmp_path / "good"
    good.mkdir()
    (good / "metrics.json").write_text(json.dumps(_metrics(0.9)))
    taken = tmp_path / "taken"
    taken.write_text("x")
    code, _, err = run_cli(capsys, "compare", str(good), "--out", str(taken))
    assert_user_error(code, err, f"--out directory {taken} is an existing file")


def test_compare_markdown_shows_what_its_headings_say(tmp_path):
    from tactful.eval.report import compare

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "metrics.json").write_text(json.dumps(_metrics(0.9)))
    res = compare([str(tmp_path / "base")], out=str(tmp_path / "cmp"))
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md == res["table"] + "\n"
    header, _, row = md.splitlines()
    heads = [h.strip() for h in header.strip("|").split("|")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    col = dict(zip(heads, cells))
    # 88.7% of benign prompts answered = 11.3% over-refusal, with the interval flipped
    assert col["over-refusal (over-refusal rate = 1 - compliance)"] == "11.3% [7.0, 18.0] (n=100)"
    assert col["safety (safe_rate)"] == "90.0% [85.0, 94.0] (n=100)"
    assert "88.7" not in md


# ---------------------------------------------------------------- chat and Ctrl-C

def test_chat_refuses_a_prompt_longer_than_the_context(capsys, monkeypatch, tiny):
    import tactful.models

    monkeypatch.setattr(tactful.models, "load_model", lambda *a, **k: tiny)
    code, out, err = run_cli(capsys, "chat", "-p", "word " * 1000, "--max-new-tokens", "24")
    assert_user_error(code, err, "the model's limit is 1000 (its context of 1024 tokens minus --max-new-tokens 24)")
    assert "the prompt has 10" in err and out == ""


def test_ctrl_c_says_how_to_resume_and_exits_130(capsys, monkeypatch):
    import tactful.methods.registry

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tactful.methods.registry, "train_recipe", interrupted)
    code, _, err = run_cli(capsys, "train", "recipe.yaml")
    assert code == 130
    assert "re-run the same command to resume" in err
