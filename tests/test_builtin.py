"""The built-in sets: sizes the issue asks for, fixed splits with no prompt in both."""

from collections import Counter

import pytest

from tactful.data import builtin
from tactful.data.records import RESPONSE_CLASSES
from tactful.errors import UserError


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def test_harmful_prompts_cover_8_domains_with_40_or_more_each():
    recs = builtin.harmful_prompts()
    per = Counter(r.category for r in recs)
    assert set(per) == set(builtin.HARM_DOMAINS) and len(per) >= 8
    assert min(per.values()) >= 40


def test_refusals_and_informative_answers_per_domain():
    for kind in ("refusal", "informative"):
        per = Counter(e.category for e in builtin.harmful_examples(kind, split="train"))
        assert min(per[d] for d in builtin.HARM_DOMAINS) >= 30
    assert builtin.harmful_examples("refusal", split="test") == []  # held-out prompts carry no targets


def test_harmful_questions_are_short_and_cover_every_domain_and_shape():
    recs = builtin.harmful_questions()
    per = Counter((r.category, r.meta["split"]) for r in recs)
    assert {d for d, _ in per} == set(builtin.HARM_DOMAINS)
    assert all(per[(d, "train")] == 20 and per[(d, "test")] == 10 for d in builtin.HARM_DOMAINS)
    words = sorted(len(r.prompt.split()) for r in recs)
    assert words[len(words) // 2] <= 15 and words[-1] <= 30  # short: the point of the set
    assert len({r.meta["shape"] for r in recs}) >= 6
    declines = builtin.harmful_question_declines("train")
    assert len(declines) == 160 and builtin.harmful_question_declines("test") == []
    assert all(d.response.strip() and d.response.count(". ") == 0 for d in declines)  # one sentence each


def test_sizes():
    assert len(builtin.seemingly_toxic()) >= 250
    assert len(set(r.category for r in builtin.seemingly_toxic())) >= 8
    assert len(builtin.benign()) >= 250
    labelled = builtin.labelled_responses()
    assert len(labelled) >= 400
    assert {r.label for r in labelled} == set(RESPONSE_CLASSES)
    assert len(builtin.mc_capability()) >= 200


@pytest.mark.parametrize("loader", [
    lambda s: [r.prompt for r in builtin.harmful_prompts(s)],
    lambda s: [r.prompt for r in builtin.harmful_questions(s)],
    lambda s: [r.prompt for r in builtin.seemingly_toxic(s)],
    lambda s: [r.prompt for r in builtin.seemingly_toxic_more(s)],
    lambda s: [r.prompt for r in builtin.benign(s)],
    lambda s: [r.prompt for r in builtin.labelled_responses(s)],
    lambda s: [r.question for r in builtin.mc_capability(s)],
    lambda s: [r.question for r in builtin.mc_truthfulness(s)],
])
def test_no_prompt_in_both_train_and_test(loader):
    train, test = {_norm(p) for p in loader("train")}, {_norm(p) for p in loader("test")}
    assert train and test
    assert not train & test


def test_no_prompt_shared_across_harmful_and_benign_sets():
    harmful = {_norm(r.prompt) for r in builtin.harmful_prompts()}
    questions = {_norm(r.prompt) for r in builtin.harmful_questions()}
    assert not harmful & questions
    harmful |= questions
    benign = {_norm(r.prompt) for r in builtin.seemingly_toxic()} | {_norm(r.prompt) for r in builtin.benign()}
    more = {_norm(r.prompt) for r in builtin.seemingly_toxic_more()}
    assert not more & benign
    benign |= more
    assert not harmful & benign


def test_ids_unique():
    for recs in (builtin.harmful_prompts(), builtin.harmful_questions(), builtin.seemingly_toxic(),
                 builtin.seemingly_toxic_more(), builtin.benign(), builtin.labelled_responses(),
                 builtin.mc_capability(), builtin.mc_truthfulness()):
        ids = [r.id for r in recs]
        assert len(ids) == len(set(ids))


def test_mc_answers_valid():
    for item in builtin.mc_capability() + builtin.mc_truthfulness():
        assert item.answers and all(0 <= a < len(item.choices) for a in item.answers)


@pytest.mark.parametrize("loader", [builtin.harmful_prompts, builtin.harmful_questions, builtin.seemingly_toxic,
                                    builtin.seemingly_toxic_more, builtin.benign, builtin.mc_capability])
def test_fit_and_dev_partition_train(loader):
    """A recipe search trains on fit and chooses on dev: together they are train, never overlapping,
    and dev is about a fifth of it."""
    ids = {s: {r.id for r in loader(s)} for s in ("train", "fit", "dev", "test")}
    assert ids["fit"] | ids["dev"] == ids["train"]
    assert not ids["fit"] & ids["dev"]
    assert not ids["dev"] & ids["test"]
    assert 0.1 < len(ids["dev"]) / len(ids["train"]) < 0.3


def test_informative_declines_exist_on_fit_and_unknown_split_is_an_error():
    assert len(builtin.harmful_examples("informative", split="fit")) > 150
    with pytest.raises(UserError, match="unknown split"):
        builtin.benign("validation")


def test_own_helpful_replies_are_the_models_own_labelled_helpful_and_end_on_a_sentence():
    import json

    gold = {json.loads(x)["item_id"]: json.loads(x) for x in
            (builtin.builtin_dir() / "gold" / "gold.jsonl").read_text().splitlines() if x.strip()}
    train = builtin.own_helpful_replies("train")
    assert len(train) > 100
    for e in train:
        g = gold[e.id]
        assert g["generator"] in ("base", "base-sampled") and g["outcome"] == "helpful" and not g["degenerate"]
        assert g["response"].startswith(e.response)  # a prefix of the real reply, nothing added
        assert e.response.rstrip()[-1] in ".!?" or g["response"][len(e.response):].startswith("\n\n")
    fit, dev = builtin.own_helpful_replies("fit"), builtin.own_helpful_replies("dev")
    assert {e.id for e in fit} | {e.id for e in dev} == {e.id for e in train}
    assert not {e.prompt for e in fit} & {e.prompt for e in dev}
    assert builtin.own_helpful_replies("test") == []  # the gold set's prompts come from train splits


def test_declines_are_the_first_sentence_of_the_informative_answers():
    inf = {e.id: e.response for e in builtin.harmful_examples("informative", split="train")}
    dec = builtin.harmful_examples("decline", split="train")
    assert len(dec) == len(inf)
    for e in dec:
        assert inf[e.id].startswith(e.response) and e.response[-1] in ".!?"
        assert len(e.response) < len(inf[e.id])
    with pytest.raises(UserError, match="unknown response kind"):
        builtin.harmful_examples("polite")


def test_gold_pairs_come_from_careful_reading_of_train_prompts_only():
    from tactful.data import builtin
    from tactful.data.registry import load_records

    pairs = builtin.gold_pairs("train")
    fit, dev = builtin.gold_pairs("fit"), builtin.gold_pairs("dev")
    assert builtin.gold_pairs("test") == []  # never train on the prompts judges are measured on
    assert len(fit) + len(dev) == len(pairs) > 300 and not {p.id for p in fit} & {p.id for p in dev}
    gold = {r["item_id"]: r for r in builtin._rows("gold/gold.jsonl")}
    harmful = [p for p in pairs if p.chosen_safe and p.rejected_safe is False]
    benign = [p for p in pairs if p.rejected_safe]
    assert harmful and benign
    for p in pairs:
        assert p.chosen.strip() and p.rejected.strip() and p.chosen != p.rejected
        if p.meta["rejected"] in gold:  # what careful reading said of each side
            expected = ("attempted", "evasive") if p in harmful else ("refused", "failed")
            assert gold[p.meta["rejected"]]["outcome"] in expected
        if p.meta["chosen"] in gold:
            assert gold[p.meta["chosen"]]["outcome"] == ("declined" if p in harmful else "helpful")
            assert not gold[p.meta["chosen"]]["degenerate"]
    assert any(p.meta["rejected"] == "stock-refusal" for p in benign)  # benign prompts learn "do not refuse"
    assert [p.id for p in load_records("builtin-gold-pairs", kind="pairs", split="fit")] == [p.id for p in fit]


@pytest.mark.parametrize("name, prompts, source", [
    ("builtin-seemingly-toxic-answers", builtin.seemingly_toxic, "builtin:seemingly-toxic"),
    ("builtin-seemingly-toxic-more-answers", builtin.seemingly_toxic_more, "builtin:seemingly-toxic-more"),
])
def test_seemingly_toxic_answers_are_the_train_prompts_with_their_answers(name, prompts, source):
    from tactful.data.registry import load_records

    train = load_records(name, kind="examples", split="train")
    assert [e.prompt for e in train] == [r.prompt for r in prompts("train")]
    assert all(e.response.strip() and e.source == source and e.label == builtin.SEEMINGLY_TOXIC for e in train)
    # fit and dev partition train, so a search trains on one and judges on the other
    fit, dev = (load_records(name, kind="examples", split=s) for s in ("fit", "dev"))
    assert fit and dev and sorted(e.id for e in fit + dev) == sorted(e.id for e in train)
