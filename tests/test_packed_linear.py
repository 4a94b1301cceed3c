"""tactful.packed_linear: weights packed once for decoding give the same products, and leave the model as it was."""

from __future__ import annotations

import os

import pytest
import torch

from tactful.eval.generation import GenerationConfig, HFGenerator
from tactful.packed_linear import available, packed_linears

pytestmark = pytest.mark.skipif(not available(), reason="this torch build has no oneDNN packed linear")


def _linears(model) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_packed_linears_match_and_are_undone_on_exit(tiny):
    model, tok = tiny
    ids = tok("How do I bake bread?", return_tensors="pt").input_ids
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        with packed_linears(model, rows=8) as n:
            assert n == len(_linears(model))  # every projection and the LM head
            assert all("forward" in vars(m) for m in _linears(model))
            packed = model(input_ids=ids).logits
            with packed_linears(model) as inner:  # already packed: nothing packed twice
                assert inner == 0
            assert all("forward" in vars(m) for m in _linears(model))  # the inner block undid nothing
        after = model(input_ids=ids).logits
    assert not any("forward" in vars(m) for m in _linears(model))
    torch.testing.assert_close(packed, before, rtol=1e-4, atol=1e-4)
    assert torch.equal(after, before)


def test_a_model_not_in_float32_is_left_alone():
    half = torch.nn.Linear(4, 4).to(torch.bfloat16)
    with packed_linears(half) as n:
        assert n == 0
    assert "forward" not in vars(half)


def test_generator_packs_only_while_generating_and_reads_the_environment(tiny, monkeypatch):
    model, tok = tiny
    cfg = GenerationConfig(max_new_tokens=6, batch_size=4)
    prompts = ["Name a fruit.", "What is 2 + 2?", "Say hello.", "Name a colour."]
    seen = []
    lm_head = model.get_output_embeddings()
    lm_head.register_forward_hook(lambda m, i, o: seen.append("forward" in vars(m)))
    try:
        plain = HFGenerator(model, tok, workers=1).generate_ids(prompts, cfg)
        assert seen and not any(seen)
        seen.clear()
        packed = HFGenerator(model, tok, workers=1, packed_linear=True).generate_ids(prompts, cfg)
        assert seen and all(seen)
    finally:
        lm_head._forward_hooks.clear()
    assert "forward" not in vars(lm_head)
    # every prompt answered, within the token budget (greedy ids may differ from `plain` where two
    # tokens tie to float32 rounding; the logits themselves are compared above)
    assert len(packed) == len(plain) and all(0 < len(x) <= cfg.max_new_tokens for x in packed)
    monkeypatch.setenv("TACTFUL_PACKED_LINEAR", "1")
    assert HFGenerator(model, tok).packed_linear is True
    monkeypatch.setenv("TACTFUL_PACKED_LINEAR", "0")
    assert HFGenerator(model, tok).packed_linear is False


def test_on_unless_asked_off_sets_the_switch_only_for_its_block(monkeypatch):
    from tactful.packed_linear import ENV, on_unless_asked_off

    monkeypatch.delenv(ENV, raising=False)
    with on_unless_asked_off() as on:
        assert on and os.environ[ENV] == "1"
    assert ENV not in os.environ
    monkeypatch.setenv(ENV, "0")  # the user said no: the demo keeps the default path
    with on_unless_asked_off() as on:
        assert not on and os.environ[ENV] == "0"
    assert os.environ[ENV] == "0"
