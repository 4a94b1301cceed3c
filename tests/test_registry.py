"""The named-benchmark registry: each adapter on a small fixture in the benchmark's own format.

The fixtures under tests/fixtures/benchmarks are invented rows in each benchmark's
columns, not copies of the benchmarks.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from tactful.data import builtin
from tactful.data.records import (
    BENIGN,
    HARMFUL,
    RESPONSE_CLASSES,
    SEEMINGLY_TOXIC,
    Example,
    LabelledResponse,
    MCItem,
    PreferencePair,
    PromptRecord,
)
from tactful.data.registry import Benchmark, get_benchmark, list_benchmarks, load_benchmark, load_records
from tactful.errors import UserError

FIX = Path(__file__).parent / "fixtures" / "benchmarks"


def load(name: str, fixture: str, **kw):
    return load_benchmark(name, path=str(FIX / fixture), **kw)


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------- registry


def test_registry_lists_every_benchmark_with_a_valid_kind():
    names = [b.name for b in list_benchmarks()]
    for expected in ["advbench", "xstest", "xstest-safe", "xstest-unsafe", "strongreject", "harmbench",
                     "jailbreakbench-harmful", "jailbreakbench-benign", "orbench-hard", "orbench-toxic",
                     "do-not-answer", "sorry-bench", "pku-saferlhf", "pku-saferlhf-safety-pairs", "beavertails",
                     "beavertails-eval", "hh-rlhf-harmless", "truthfulqa-mc", "arc-easy", "arc-challenge",
                     "openbookqa", "piqa", "mmlu", "builtin-harmful", "builtin-seemingly-toxic", "builtin-benign",
                     "builtin-labelled", "builtin-refusals", "builtin-informative"]:
        assert expected in names
    assert len(names) == len(set(names))
    for b in list_benchmarks():
        assert isinstance(b, Benchmark)
        assert b.kind in ("prompts", "pairs", "mc", "examples", "labelled")
        assert b.columns and b.description and b.license
        assert callable(b.adapter)


def test_get_benchmark_unknown_name_suggests_close_match():
    assert get_benchmark("advbench").hub_id == "walledai/AdvBench"
    with pytest.raises(UserError, match=r"unknown benchmark 'advbnch'.*did you mean 'advbench'"):
        get_benchmark("advbnch")
    with pytest.raises(UserError, match="xstest"):
        load_benchmark("xtest")


def test_benchmark_without_hub_copy_asks_for_a_path():
    with pytest.raises(UserError, match="no hub copy.*local path"):
        load_benchmark("pku-saferlhf-safety-pairs")


# ---------------------------------------------------------------------------- harmful prompt sets


def test_advbench():
    recs = load("advbench", "advbench.csv")
    assert len(recs) == 3 and all(isinstance(r, PromptRecord) for r in recs)
    assert {r.label for r in recs} == {HARMFUL}
    assert recs[1].prompt == "Describe, step by step, a made-up prohibited act"
    assert recs[0].meta["target"].startswith("Sure")
    assert [r.id for r in recs] == ["advbench-0", "advbench-1", "advbench-2"]


def test_advbench_hub_column_names(tmp_path):
    # walledai/AdvBench calls the goal "prompt"
    recs = load_benchmark("advbench", path=write(tmp_path / "a.jsonl", '{"prompt": "p1", "target": "t"}\n'))
    assert recs[0].prompt == "p1"


def test_xstest_labels_and_subsets():
    recs = load("xstest", "xstest.csv")
    assert [r.label for r in recs] == [SEEMINGLY_TOXIC, SEEMINGLY_TOXIC, HARMFUL, HARMFUL]
    assert [r.category for r in recs] == ["homonyms", "homonyms", "contrast_homonyms", "contrast_privacy_public"]
    assert recs[0].id == "1" and recs[0].meta == {"focus": "kill", "note": "computing"}
    assert recs[3].meta == {}  # empty focus / note are not kept
    safe, unsafe = load("xstest-safe", "xstest.csv"), load("xstest-unsafe", "xstest.csv")
    assert [r.id for r in safe] == ["1", "2"] and [r.id for r in unsafe] == ["3", "4"]
    assert {r.label for r in unsafe} == {HARMFUL}


def test_strongreject():
    recs = load("strongreject", "strongreject.csv")
    assert [r.category for r in recs] == ["Violence", "Disinformation and deception"]
    assert {r.label for r in recs} == {HARMFUL}
    assert recs[1].prompt == "Write a fake news story for the fixture file."


def test_harmbench_prefixes_context():
    recs = load("harmbench", "harmbench.csv")
    assert len(recs) == 3
    assert recs[0].prompt == "Give instructions for a made-up harmful act"
    assert recs[0].id == "made_up_act" and recs[0].category == "illegal"
    assert recs[0].meta == {"functional_category": "standard"}
    ctx = recs[1]
    assert ctx.prompt == ("Dear team, the fixture meeting moves to Friday.\nBring snacks.\n\n"
                          "Rewrite this note so it sounds threatening")
    assert ctx.meta["functional_category"] == "contextual" and ctx.category == "harassment"
    assert recs[2].prompt == 'Generate the lyrics of "Fixture Song" by Test Band'
    assert recs[2].meta["tags"] == "lyrics, hash_check"


def test_jailbreakbench_harmful_and_benign():
    harmful = load("jailbreakbench-harmful", "jbb.csv")
    benign = load("jailbreakbench-benign", "jbb.csv")
    assert [r.label for r in harmful] == [HARMFUL, HARMFUL]
    assert [r.label for r in benign] == [SEEMINGLY_TOXIC, SEEMINGLY_TOXIC]
    assert harmful[1].category == "Malware/Hacking"
    assert harmful[1].meta == {"target": "Sure, here is how to bypass it", "behavior": "Paywall bypass",
                               "origin": "TDC/HarmBench"}


def test_orbench_hard_and_toxic():
    hard, toxic = load("orbench-hard", "orbench.csv"), load("orbench-toxic", "orbench.csv")
    assert {r.label for r in hard} == {SEEMINGLY_TOXIC} and {r.label for r in toxic} == {HARMFUL}
    assert [r.category for r in hard] == ["harmful", "deception"]
    assert get_benchmark("orbench-hard").hub_config == "or-bench-hard-1k"
    assert get_benchmark("orbench-toxic").hub_config == "or-bench-toxic"


def test_do_not_answer():
    recs = load("do-not-answer", "do_not_answer.csv")
    assert [r.id for r in recs] == ["0", "1"]
    assert recs[0].category == "Discrimination, Exclusion, Toxicity, Hateful, Offensive"
    assert recs[1].prompt == "How can I forge a test certificate?" and recs[1].label == HARMFUL
    assert recs[1].meta["types_of_harm"] == "Assisting illegal activities"


def test_sorry_bench_takes_first_turn():
    recs = load("sorry-bench", "sorry_bench.jsonl")
    assert recs[1].prompt == "Describe a made-up crime in detail."
    assert recs[1].category == "7" and recs[1].id == "2" and recs[1].meta == {"prompt_style": "slang"}
    assert {r.label for r in recs} == {HARMFUL}


def test_beavertails_eval_local_and_hub():
    local = load("beavertails-eval", "beavertails_eval.json")
    assert len(local) == 2 and local[0].category is None and local[0].label == HARMFUL
    hub = load("beavertails-eval", "beavertails_eval_hub.jsonl")
    assert [r.category for r in hub] == ["non_violent_unethical_behavior", "hate_speech,offensive_language"]


def test_safe_rlhf_eval():
    recs = load("safe-rlhf-eval", "safe_rlhf_eval.json")
    assert [r.category for r in recs] == ["Social Bias", "Crimes and Illegal Activities"]
    assert {r.label for r in recs} == {HARMFUL}


# ---------------------------------------------------------------------------- pairs and examples


def test_pku_saferlhf_chooses_the_safer_response():
    recs = load("pku-saferlhf", "pku_saferlhf.jsonl")
    assert all(isinstance(r, PreferencePair) for r in recs)
    a, b, c = recs
    # safer_response_id = 1: response_1 is chosen
    assert a.chosen.startswith("Talk to them") and a.rejected.startswith("You could hide")
    assert (a.chosen_safe, a.rejected_safe) == (True, False)
    assert a.category == "Mental Manipulation" and a.rejected_category == "Mental Manipulation"
    assert a.chosen_category is None
    assert a.meta["rejected_categories"] == ["Mental Manipulation"] and a.meta["chosen_is_better"] is False
    # safer_response_id = 0
    assert b.chosen.startswith("Borrow") and b.rejected.startswith("Download")
    assert b.category == "Copyright Issues" and b.meta["rejected_categories"] == ["Copyright Issues", "Cybercrime"]
    assert b.meta["chosen_is_better"] is False
    # both unsafe, no harm-category dicts: still a pair, no categories
    assert c.chosen == "Play loud music until they move out." and (c.chosen_safe, c.rejected_safe) == (False, False)
    assert c.category is None and c.meta["chosen_is_better"] is False


def test_pku_saferlhf_bad_value_names_the_line(tmp_path):
    row = {"prompt": "p", "response_0": "a", "response_1": "b", "is_response_0_safe": "maybe",
           "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 1}
    f = write(tmp_path / "bad.jsonl", json.dumps(row) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:1.*is_response_0_safe"):
        load_benchmark("pku-saferlhf", path=f)
    row["is_response_0_safe"] = False
    row.pop("safer_response_id")
    f = write(tmp_path / "bad2.jsonl", "\n" + json.dumps(row) + "\n")  # a blank first line: the row is line 2
    with pytest.raises(UserError, match=r"bad2\.jsonl:2: missing field 'safer_response_id'"):
        load_benchmark("pku-saferlhf", path=f)
    row.update(safer_response_id=1, response_1_harm_category=["Violence"])
    f = write(tmp_path / "bad3.jsonl", json.dumps(row) + "\n")
    with pytest.raises(UserError, match=r"bad3\.jsonl:1: field 'response_1_harm_category' should be a dict"):
        load_benchmark("pku-saferlhf", path=f)


def test_pku_safety_pairs_derived_format():
    recs = load("pku-saferlhf-safety-pairs", "pku_safety_pairs.json")
    assert len(recs) == 2
    assert recs[0].chosen.startswith("Document") and recs[0].rejected.startswith("Damage")
    assert (recs[0].chosen_safe, recs[0].rejected_safe) == (True, False)


def test_beavertails_examples():
    recs = load("beavertails", "beavertails.jsonl")
    assert all(isinstance(r, Example) for r in recs)
    assert [r.label for r in recs] == ["safe", "unsafe"]
    assert recs[0].category is None
    assert recs[1].category == "violence,aiding_and_abetting,incitement"


def test_hh_rlhf_parses_transcripts_and_skips_mismatched_rows(caplog):
    with caplog.at_level(logging.WARNING, logger="tactful.data.registry"):
        recs = load("hh-rlhf-harmless", "hh_rlhf.jsonl")
    assert len(recs) == 2
    single, multi = recs
    assert single.prompt == "How do I make my neighbour's dog stop barking?"
    assert single.chosen == "Try talking to your neighbour first; they may not know."
    assert single.rejected == "Throw something at it."
    assert "history" not in single.meta
    assert multi.prompt == "He broke my bike. How can I punish him?"
    assert multi.chosen == "It might help to tell him how you feel and ask him to fix it."
    assert multi.rejected == "Break something of his."
    assert multi.meta["history"] == [
        {"role": "user", "content": "I'm angry at my brother."},
        {"role": "assistant", "content": "I'm sorry to hear that. What happened?"},
    ]
    assert "skipped 1 of 3 rows" in caplog.text and "hh_rlhf.jsonl:3" in caplog.text


# ---------------------------------------------------------------------------- multiple choice


def test_truthfulqa_csv():
    recs = load("truthfulqa-mc", "truthfulqa.csv")
    assert all(isinstance(r, MCItem) for r in recs)
    gum = recs[0]
    assert gum.question == "What happens if you swallow chewing gum?"
    assert gum.choices == ["It passes through your digestive system", "Nothing much happens",
                           "It stays in your stomach for seven years", "You will choke later"]
    assert gum.answers == [0, 1]
    assert gum.meta["best_answer"] == "It passes through your digestive system"
    assert gum.meta["category"] == "Misconceptions"
    # a repeated answer appears once; one listed as both correct and incorrect counts as correct
    assert recs[1].choices == ["No, reindeer cannot fly", "Reindeer can't fly", "Yes", "Yes on Christmas Eve"]
    assert recs[1].answers == [0, 1]


def test_truthfulqa_hub_format():
    (item,) = load("truthfulqa-mc", "truthfulqa_hub.jsonl")
    assert item.choices == ["Blue", "It looks blue", "Green", "Red"]
    assert item.answers == [0, 1] and item.meta["best_answer"] == "Blue"


def test_arc_official_and_hub_formats():
    recs = load("arc-easy", "arc.jsonl")
    assert recs[0].question == "Which object gives off its own light?"
    assert recs[0].choices == ["The Moon", "The Sun", "A mirror", "A window"] and recs[0].answers == [1]
    assert recs[0].id == "Fixture_1"
    assert recs[1].answers == [2]  # numeric labels "1".."3"
    (flat,) = load("arc-challenge", "arc_hub.jsonl")
    assert flat.choices == ["Ice", "Water", "Steam"] and flat.answers == [1] and flat.source == "arc-challenge"


def test_arc_answer_key_not_a_label(tmp_path):
    row = {"id": "x", "question": {"stem": "q", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "E"}
    f = write(tmp_path / "arc.jsonl", json.dumps(row) + "\n")
    with pytest.raises(UserError, match=r"arc\.jsonl:1: answerKey 'E'"):
        load_benchmark("arc-easy", path=f)


def test_openbookqa_official_and_hub_formats():
    recs = load("openbookqa", "openbookqa.jsonl")
    assert [r.answers for r in recs] == [[1], [0]] and recs[0].id == "fx-1"
    (flat,) = load("openbookqa", "openbookqa_hub.jsonl")
    assert flat.question == "Sound travels fastest through" and flat.answers == [2]
    assert flat.meta["fact"] == "sound travels faster in solids"


def test_piqa_sibling_labels_file_and_inline_label(tmp_path):
    recs = load("piqa", "piqa.jsonl")
    assert [r.answers for r in recs] == [[0], [1], [0]]
    assert recs[1].choices[1] == "Store it in a sealed bag in a cool place."
    (inline,) = load("piqa", "piqa_inline.jsonl")
    assert inline.answers == [0]
    # the official layout: valid.jsonl next to valid-labels.lst
    shutil.copy(FIX / "piqa.jsonl", tmp_path / "valid.jsonl")
    write(tmp_path / "valid-labels.lst", "1\n1\n0\n")
    assert [r.answers for r in load_benchmark("piqa", path=str(tmp_path / "valid.jsonl"))] == [[1], [1], [0]]


def test_piqa_without_labels_is_a_clear_error(tmp_path):
    shutil.copy(FIX / "piqa.jsonl", tmp_path / "dev.jsonl")
    with pytest.raises(UserError, match=r"dev\.jsonl:1: PIQA row has no 'label'.*_labels\.lst"):
        load_benchmark("piqa", path=str(tmp_path / "dev.jsonl"))
    write(tmp_path / "dev_labels.lst", "0\n1\n")  # one label short
    with pytest.raises(UserError, match="has 2 labels but .* has 3 rows"):
        load_benchmark("piqa", path=str(tmp_path / "dev.jsonl"))


def test_mmlu():
    recs = load("mmlu", "mmlu.jsonl")
    assert [r.answers for r in recs] == [[1], [2]]
    assert recs[1].choices[2] == "Carbon dioxide" and recs[1].meta == {"subject": "high_school_biology"}


# ---------------------------------------------------------------------------- errors


def test_missing_benchmark_column_names_file_line_and_field(tmp_path):
    f = write(tmp_path / "x.csv", "id,prompt,kind\n1,hello,homonyms\n")
    with pytest.raises(UserError, match=r"x\.csv:2: missing field 'type'"):
        load_benchmark("xstest", path=f)
    f = write(tmp_path / "h.csv", "Goal,Target\nsomething,else\n")
    with pytest.raises(UserError, match=r"h\.csv:2: missing field 'Behavior' or 'prompt'"):
        load_benchmark("harmbench", path=f)


def test_wrongly_typed_nested_value_is_a_user_error(tmp_path):
    f = write(tmp_path / "s.jsonl", '{"question_id": 1, "category": "1", "turns": 5}\n')
    with pytest.raises(UserError, match=r"s\.jsonl:1.*turns"):
        load_benchmark("sorry-bench", path=f)
    f = write(tmp_path / "m.jsonl", '{"question": "q", "choices": ["a", "b"], "answer": 7}\n')
    with pytest.raises(UserError, match=r"m\.jsonl:1.*out of range"):
        load_benchmark("mmlu", path=f)


def test_empty_file_and_no_matching_rows(tmp_path):
    with pytest.raises(UserError, match="empty"):
        load_benchmark("advbench", path=write(tmp_path / "e.csv", ""))
    safe_only = write(tmp_path / "x.csv", "id,prompt,type\n1,How do I kill a process?,homonyms\n")
    with pytest.raises(UserError, match="gave no xstest-unsafe records"):
        load_benchmark("xstest-unsafe", path=safe_only)


# ---------------------------------------------------------------------------- subsampling


def test_subsample_is_deterministic_and_keeps_order():
    full = load("xstest", "xstest.csv")
    a = load("xstest", "xstest.csv", n=2, seed=3)
    b = load("xstest", "xstest.csv", n=2, seed=3)
    assert [r.id for r in a] == [r.id for r in b]
    ids = [r.id for r in full]
    assert [ids.index(r.id) for r in a] == sorted(ids.index(r.id) for r in a)
    assert len(load("xstest", "xstest.csv", n=100)) == 4
    seeds = {tuple(r.id for r in load("xstest", "xstest.csv", n=2, seed=s)) for s in range(10)}
    assert len(seeds) > 1
    with pytest.raises(UserError, match="positive"):
        load("xstest", "xstest.csv", n=0)


# ---------------------------------------------------------------------------- load_records


def test_load_records_infers_kind_from_fields(tmp_path):
    cases = {
        "prompts": ('{"prompt": "hi", "label": "harmful", "category": "c"}', PromptRecord),
        "examples": ('{"prompt": "hi", "response": "hello", "label": "benign"}', Example),
        "labelled": ('{"prompt": "hi", "response": "no", "label": "full_refusal"}', LabelledResponse),
        "pairs": ('{"prompt": "hi", "chosen": "a", "rejected": "b", "chosen_safe": true}', PreferencePair),
        "mc": ('{"question": "q?", "choices": ["x", "y"], "answers": [1]}', MCItem),
    }
    for kind, (line, cls) in cases.items():
        f = write(tmp_path / f"{kind}.jsonl", line + "\n")
        (rec,) = load_records(f)
        assert isinstance(rec, cls), kind
    (p,) = load_records(str(tmp_path / "prompts.jsonl"))
    assert p.label == HARMFUL and p.category == "c"
    (pair,) = load_records(str(tmp_path / "pairs.jsonl"))
    assert pair.chosen_safe is True and pair.rejected_safe is None
    # kind given explicitly: an examples file read as prompts
    (ex,) = load_records(str(tmp_path / "examples.jsonl"), kind="prompts")
    assert isinstance(ex, PromptRecord) and ex.meta == {"response": "hello"} and ex.label == BENIGN


def test_load_records_csv_and_extra_fields(tmp_path):
    f = write(tmp_path / "p.csv", "prompt,label,category,note\nhi,harmful,,x\nyo,benign,c,\n")
    recs = load_records(f)
    assert [r.label for r in recs] == [HARMFUL, BENIGN]
    assert recs[0].category is None and recs[0].meta == {"note": "x"}
    f = write(tmp_path / "mc.csv", 'question,choices,answers\nq,"[""a"", ""b""]",0\n')
    (item,) = load_records(f)
    assert item.choices == ["a", "b"] and item.answers == [0]


def test_load_records_errors_name_file_line_and_field(tmp_path):
    f = write(tmp_path / "pairs.jsonl",
              '{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(UserError, match=r"pairs\.jsonl:2: missing field 'rejected'"):
        load_records(f)
    f = write(tmp_path / "odd.jsonl", '{"text": "hello"}\n')
    with pytest.raises(UserError, match=r"odd\.jsonl:1: cannot tell the record kind"):
        load_records(f)
    f = write(tmp_path / "mc.jsonl", '{"question": "q", "choices": ["a"], "answers": [3]}\n')
    with pytest.raises(UserError, match=r"mc\.jsonl:1: answers \[3\]"):
        load_records(f)
    f = write(tmp_path / "lab.jsonl", '{"prompt": "p", "response": "r", "label": "maybe"}\n')
    with pytest.raises(UserError, match=r"lab\.jsonl:1: label 'maybe'"):
        load_records(f, kind="labelled")
    f = write(tmp_path / "pb.jsonl", '{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_safe": "perhaps"}\n')
    with pytest.raises(UserError, match=r"pb\.jsonl:1.*chosen_safe"):
        load_records(f)
    with pytest.raises(UserError, match="unknown record kind"):
        load_records(f, kind="triples")


def test_load_records_names_and_missing_sources(tmp_path):
    with pytest.raises(UserError, match="gives prompts, not pairs"):
        load_records("advbench", kind="pairs")
    with pytest.raises(UserError, match=r"neither a registered benchmark.*did you mean 'xstest'"):
        load_records("xstets")
    with pytest.raises(UserError, match="does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))


# ---------------------------------------------------------------------------- built-in sets


def _builtin_files_present() -> bool:
    d = builtin.builtin_dir()
    return all((d / f"harmful/{dom}.jsonl").exists() for dom in builtin.HARM_DOMAINS) and all(
        (d / f).exists() for f in ("seemingly_toxic.jsonl", "benign.jsonl", "labelled_responses.jsonl"))


def test_builtin_data_files_exist():
    # The built-in sets are package data; this fails (rather than skips) if any is missing.
    missing = [str(p) for p in [*(builtin.builtin_dir() / f"harmful/{d}.jsonl" for d in builtin.HARM_DOMAINS),
                                *(builtin.builtin_dir() / f for f in ("seemingly_toxic.jsonl", "benign.jsonl",
                                                                      "labelled_responses.jsonl",
                                                                      "harmful_questions.jsonl",
                                                                      "seemingly_toxic_more.jsonl"))]
               if not p.exists()]
    assert not missing, f"built-in data files missing: {missing}"


@pytest.mark.parametrize("name, cls, label", [
    ("builtin-harmful", PromptRecord, HARMFUL),
    ("builtin-seemingly-toxic", PromptRecord, SEEMINGLY_TOXIC),
    ("builtin-benign", Example, BENIGN),
    ("builtin-labelled", LabelledResponse, None),
    ("builtin-refusals", Example, HARMFUL),
    ("builtin-informative", Example, HARMFUL),
    ("builtin-harmful-questions", PromptRecord, HARMFUL),
    ("builtin-question-declines", Example, HARMFUL),
    ("builtin-seemingly-toxic-more", PromptRecord, SEEMINGLY_TOXIC),
])
def test_builtin_sets_load_by_name_and_split(name, cls, label):
    assert _builtin_files_present(), "built-in data files are missing (see test_builtin_data_files_exist)"
    all_recs = load_benchmark(name)
    assert all_recs and all(isinstance(r, cls) for r in all_recs)
    if label is None:
        assert {r.label for r in all_recs} <= set(RESPONSE_CLASSES)
    else:
        assert {r.label for r in all_recs} == {label}
    by_split = {s: load_benchmark(name, split=s) if _has_split(name, s) else [] for s in builtin.SPLITS}
    assert sum(len(v) for v in by_split.values()) == len(all_recs)
    for s, recs in by_split.items():
        assert all(r.meta.get("split") == s for r in recs)
    # no prompt is in both splits
    train, test = ({r.prompt for r in by_split[s]} for s in ("train", "test"))
    assert not train & test
    with pytest.raises(UserError, match="unknown split"):
        load_benchmark(name, split="validation")
    # by name through load_records, subsampled
    some = load_records(name, n=3, seed=1)
    assert len(some) == min(3, len(all_recs)) and some == load_records(name, n=3, seed=1)


def _has_split(name: str, split: str) -> bool:
    try:
        load_benchmark(name, split=split)
        return True
    except UserError:  # e.g. refusals exist only in train: "gave no records"
        return False


def test_builtin_adapters_read_a_copy_in_the_raw_layout(tmp_path):
    harmful = write(tmp_path / "h.jsonl", '{"id": "h1", "prompt": "p", "category": "drugs", "split": "train", '
                                          '"refusal": "No.", "informative": "Here is safety info."}\n'
                                          '{"id": "h2", "prompt": "q", "category": "violence", "split": "test"}\n')
    prompts = load_benchmark("builtin-harmful", path=harmful)
    assert [(r.id, r.label, r.category, r.meta["split"]) for r in prompts] == [
        ("h1", HARMFUL, "drugs", "train"), ("h2", HARMFUL, "violence", "test")]
    (refusal,) = load_benchmark("builtin-refusals", path=harmful)
    assert refusal.response == "No." and refusal.id == "h1"
    (info,) = load_benchmark("builtin-informative", path=harmful)
    assert info.response == "Here is safety info."
    lab = write(tmp_path / "l.jsonl", '{"id": "l1", "prompt": "p", "response": "r", "label": "oops"}\n')
    with pytest.raises(UserError, match=r"l\.jsonl:1: label 'oops'"):
        load_benchmark("builtin-labelled", path=lab)


# ---------------------------------------------------------------------------- hub loading (no network)


def test_hub_loading_passes_id_split_config_and_files(monkeypatch):
    from tactful.data import registry
    from tactful.data.readers import Row

    calls = []

    def fake_read_hub(dataset_id, *, split, name=None, data_files=None):
        calls.append((dataset_id, split, name, data_files))
        rows = {
            "bench-llm/or-bench": [{"prompt": "p", "category": "c"}],
            "Anthropic/hh-rlhf": [{"chosen": "\n\nHuman: h\n\nAssistant: a",
                                   "rejected": "\n\nHuman: h\n\nAssistant: b"}],
        }[dataset_id]
        return [Row(r, f"{dataset_id}[{split}]#{i}") for i, r in enumerate(rows)]

    monkeypatch.setattr(registry, "read_hub", fake_read_hub)
    (rec,) = load_benchmark("orbench-hard")
    assert rec.label == SEEMINGLY_TOXIC
    (pair,) = load_benchmark("hh-rlhf-harmless", split="train")
    assert (pair.prompt, pair.chosen, pair.rejected) == ("h", "a", "b")
    assert calls == [("bench-llm/or-bench", "train", "or-bench-hard-1k", None),
                     ("Anthropic/hh-rlhf", "train", None, {"train": "harmless-base/train.jsonl.gz"})]


def test_gated_hub_failure_explains_login(monkeypatch):
    from tactful.data import registry

    def refuse(dataset_id, **kwargs):
        raise UserError(f"cannot load dataset {dataset_id!r}: access denied")

    monkeypatch.setattr(registry, "read_hub", refuse)
    with pytest.raises(UserError, match="gated.*huggingface-cli login"):
        load_benchmark("sorry-bench")
